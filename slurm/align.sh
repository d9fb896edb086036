#!/usr/bin/env bash
# mer-dist alignment pretraining on Slurm: one task per GPU (srun), or torchrun per node.
#
#   sbatch slurm/align.sh                                   # defaults below: 2 nodes x 8 GPUs
#   sbatch --nodes=4 slurm/align.sh                         # any #SBATCH value can be overridden
#   MER_CONFIG=configs/mer2024/align.yaml MER_OVERRIDES="train.steps=50000" sbatch slurm/align.sh
#   MER_LAUNCH=torchrun sbatch --ntasks-per-node=1 --signal=B:USR1@120 slurm/align.sh
#
# Environment (all optional): MER_CONFIG, MER_OVERRIDES (space-separated key=value), MER_LAUNCH
# (srun|torchrun), MER_PYTHON, MER_MAX_RESTARTS, MER_WORKDIR, CONTAINER_IMAGE with CONTAINER_RUNTIME
# (pyxis|apptainer), MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE. Left unset, the job derives the master
# (first node, port from the job id) in mer_dist.dist, the one place that knows how.
#
# Pre-emption: Slurm sends USR1 120 s before the time limit (or `scancel --signal=USR1 JOB`); every
# rank checkpoints and exits 75, and this script requeues the job, which resumes from `latest`.
#SBATCH --job-name=mer-align
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -uo pipefail

STAGE="${MER_STAGE:-align}"
CONFIG="${MER_CONFIG:-configs/${STAGE}.yaml}"
LAUNCH="${MER_LAUNCH:-srun}"
PYTHON="${MER_PYTHON:-python}"
MAX_RESTARTS="${MER_MAX_RESTARTS:-20}"
EXIT_PREEMPTED=75
# a relative MER_CONFIG names a file under the directory the job was submitted from, wherever it runs
case "$CONFIG" in /*) ;; *) CONFIG="${SLURM_SUBMIT_DIR:-$PWD}/${CONFIG}" ;; esac
cd "${MER_WORKDIR:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
mkdir -p logs

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
read -r -a OVERRIDES <<< "${MER_OVERRIDES:-}"

container=()
if [ -n "${CONTAINER_IMAGE:-}" ]; then
  case "${CONTAINER_RUNTIME:-pyxis}" in
    pyxis) container=(--container-image="${CONTAINER_IMAGE}" --container-workdir="$PWD" --container-mounts="$PWD:$PWD") ;;
    apptainer) ;;  # handled in the command below
    *) echo "[align.sh] unknown CONTAINER_RUNTIME=${CONTAINER_RUNTIME}" >&2; exit 2 ;;
  esac
fi
prefix=()
if [ -n "${CONTAINER_IMAGE:-}" ] && [ "${CONTAINER_RUNTIME:-pyxis}" = apptainer ]; then
  prefix=(apptainer exec --nv --bind "$PWD" "${CONTAINER_IMAGE}")
fi

echo "[align.sh] $(date -Is) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_JOB_NUM_NODES} node(s)," \
     "${SLURM_NTASKS} task(s), launch=${LAUNCH}, config=${CONFIG}"

preempted=0
child=""
# the job writes this file when it checkpointed for pre-emption (exit 75), even if srun then reports
# another code because it killed a slower rank on the way out
export MER_REQUEUE_MARKER="${MER_REQUEUE_MARKER:-$PWD/logs/.requeue-${SLURM_JOB_ID}}"
rm -f "$MER_REQUEUE_MARKER"
# torchrun's agent dies on USR1, so in torchrun mode the batch shell takes it (--signal=B:USR1@120)
# and forwards SIGTERM, which torchrun passes to its workers.
trap 'preempted=1; echo "[align.sh] USR1: pre-emption, checkpointing"; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' USR1

if [ "$LAUNCH" = torchrun ]; then
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${container[@]}" "${prefix[@]}" \
    "$PYTHON" -m mer_dist.dist torchrun -m mer_dist "$STAGE" --config "$CONFIG" "${OVERRIDES[@]}" &
else
  srun --kill-on-bad-exit=1 "${container[@]}" "${prefix[@]}" \
    "$PYTHON" -m mer_dist "$STAGE" --config "$CONFIG" "${OVERRIDES[@]}" &
fi
child=$!
# a trapped signal makes `wait` return early: keep waiting until the step is really gone
rc=0
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break
done

if [ -f "$MER_REQUEUE_MARKER" ]; then
  preempted=1
  rm -f "$MER_REQUEUE_MARKER"
fi
if [ "$rc" -eq "$EXIT_PREEMPTED" ] || [ "$preempted" -eq 1 ]; then
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_RESTARTS" ]; then
    echo "[align.sh] $(date -Is) checkpoint saved (rc=$rc): requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
  fi
  echo "[align.sh] restart limit ${MAX_RESTARTS} reached, not requeueing" >&2
fi
echo "[align.sh] $(date -Is) finished rc=$rc"
exit "$rc"
