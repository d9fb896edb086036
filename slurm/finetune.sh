#!/usr/bin/env bash
# mer-dist fusion fine-tuning on Slurm: K folds spread over the tasks (fold k on rank k mod N).
#   sbatch slurm/finetune.sh
#   MER_CONFIG=configs/mer2024/finetune.yaml MER_OVERRIDES="seed=1" sbatch slurm/finetune.sh
#SBATCH --job-name=mer-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=5
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
CONFIG="${MER_CONFIG:-configs/finetune.yaml}"
# a relative MER_CONFIG names a file under the directory the job was submitted from, wherever it runs
case "$CONFIG" in /*) ;; *) CONFIG="${SLURM_SUBMIT_DIR:-$PWD}/${CONFIG}" ;; esac
cd "${MER_WORKDIR:-${SLURM_SUBMIT_DIR:-.}}"
mkdir -p logs
read -r -a OVERRIDES <<< "${MER_OVERRIDES:-}"
srun --kill-on-bad-exit=1 "${MER_PYTHON:-python}" -m mer_dist finetune --config "$CONFIG" "${OVERRIDES[@]}"
