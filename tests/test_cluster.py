"""A real Slurm on localhost: sbatch slurm/align.sh, pre-emption by USR1, requeue and resume. Lints."""
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest
from conftest import REPO

SLURM = REPO / "tests" / "cluster" / "local_slurm.sh"


@pytest.mark.slow
def test_shellcheck_and_hadolint():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed (tests/setup.sh installs it)")
    p = subprocess.run(["shellcheck", "slurm/align.sh", "slurm/finetune.sh", "tests/setup.sh", ".ci/run",
                        str(SLURM)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
    p = subprocess.run(["hadolint", "docker/Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("local Slurm needs root (daemons + munge key)")
    # its own state directory (no state left by another session's cluster); the job runs outside the checkout
    env = {**os.environ, "SLURM_LOCAL_CPUS": "4", "SLURM_LOCAL_DIR": tempfile.mkdtemp(prefix="mer-dist-slurm-")}
    p = subprocess.run(["bash", str(SLURM), "start"], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    yield env
    subprocess.run(["bash", str(SLURM), "stop"], capture_output=True, env=env, timeout=120)


@pytest.mark.slow
def test_sbatch_preempt_requeue_resume(slurm, shards, teacher, tmp_path, mlflow_server):
    out = tmp_path / "run"
    overrides = (f"data.shards={shards} teacher={teacher} out={out} train.steps=100 train.ckpt_every=25 "
                 "train.log_every=2 train.eval_samples=0 data.height=32 data.width=32 data.frames=4 "
                 "data.batch_size=4 data.workers=1")
    env = {**slurm, "MER_OVERRIDES": overrides, "MER_WORKDIR": str(tmp_path), "MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    log = tmp_path / "job.out"
    job = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                          "--cpus-per-task=1", "--time=20", f"--output={log}", "slurm/align.sh"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.time() + 300
    while time.time() < deadline:   # pre-empt once training is under way (after step 24 > first checkpoint)
        if (out / "metrics.jsonl").exists() and any(json.loads(x).get("step", 0) >= 24 for x in open(out / "metrics.jsonl")):
            break
        queued = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=slurm, capture_output=True, text=True)
        assert queued.stdout.strip(), (log.read_text() if log.exists() else "")[-4000:]    # ended before step 24
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    w = subprocess.run(["bash", str(SLURM), "wait", job, "600"], env=slurm, capture_output=True, text=True)
    text = log.read_text()
    assert w.returncode == 0, text[-4000:]
    assert "requeueing job" in text and "restart 1" in text, text[:1500] + "\n...\n" + text[-3000:]
    stop = int(text.split("align: signal 10 -> checkpoint at step ")[1].split()[0])
    assert 24 <= stop < 100
    assert f"resumed from checkpoint step{stop:08d} at step {stop}" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == 100 and s["world_size"] == 2 and s["launcher"] == "slurm" and (out / "encoder.pt").is_file()
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl") if '"loss"' in x]
    # no step logged twice: the resumed run continued from the pre-emption checkpoint itself
    assert len(steps) == len(set(steps)) and steps[-1] == 100
    from mlflow.tracking import MlflowClient
    c = MlflowClient(mlflow_server["uri"])
    runs = c.search_runs([c.get_experiment_by_name("mer-dist").experiment_id], f"tags.slurm_job_id = '{job}'")
    # one MLflow run for the job: the requeued job reattached to it (restart tag 1), every step logged once
    assert len(runs) == 1, [r.data.tags.get("restart") for r in runs]
    run = runs[0]
    assert run.data.tags["restart"] == "1" and run.data.tags["launcher"] == "slurm" and run.data.tags["world_size"] == "2"
    assert run.info.status == "FINISHED"
    logged = [m.step for m in c.get_metric_history(run.info.run_id, "loss")]
    assert sorted(logged) == list(range(2, 101, 2)), logged


@pytest.mark.slow
def test_sbatch_torchrun_mode(slurm, shards, teacher, tmp_path):
    # one torchrun agent per node, its rendezvous from `python -m mer_dist.dist torchrun` inside the job
    out, log = tmp_path / "run", tmp_path / "job.out"
    overrides = (f"data.shards={shards} teacher={teacher} out={out} train.steps=12 train.ckpt_every=6 "
                 "train.log_every=2 train.eval_samples=0 data.height=32 data.width=32 data.frames=4 "
                 "data.batch_size=4 data.workers=0 tracking.enabled=false guard.enabled=false")
    env = {**slurm, "MER_OVERRIDES": overrides, "MER_WORKDIR": str(tmp_path), "MER_LAUNCH": "torchrun", "GPUS_PER_NODE": "2"}
    job = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
                          "--cpus-per-task=2", "--time=10", f"--output={log}", "slurm/align.sh"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    w = subprocess.run(["bash", str(SLURM), "wait", job, "400"], env=slurm, capture_output=True, text=True)
    assert w.returncode == 0, log.read_text()[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == 12 and s["world_size"] == 2 and s["launcher"] == "torchrun" and s["exit_code"] == 0


def test_slurm_rendezvous_has_one_definition():
    from mer_dist.dist import detect, torchrun_args
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "3", "SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "3",
           "SLURM_JOB_NODELIST": "gpu[003-005]", "SLURM_TASKS_PER_NODE": "1(x3)", "GPUS_PER_NODE": "8"}
    d = detect(env)
    assert (d.rank, d.world_size, d.master_addr, d.master_port) == (1, 3, "gpu003", 23456)
    assert torchrun_args(env) == ["--nnodes=3", "--nproc_per_node=8", "--rdzv_backend=c10d",
                                  "--rdzv_endpoint=gpu003:23456", "--rdzv_id=123456"]
    assert detect({**env, "MASTER_PORT": "4000"}).master_port == 4000      # the user's choice wins
    # a derived port already taken on the first node: one line naming the port and the way out, not a hang
    import socket
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # as torch's TCPStore binds its listener
    for taken in range(24000, 26000):                   # a port the derivation can give (20000-39999), free now
        try:
            held.bind(("", taken))
            break
        except OSError:
            continue
    held.listen()
    job = {**env, "SLURM_JOB_ID": str(taken - 20000 + 20000 * 3)}
    with pytest.raises(ValueError, match=f"MASTER_PORT {taken} .* is in use .*set MASTER_PORT to a free port"):
        torchrun_args(job)
    assert torchrun_args({**job, "SLURM_NODEID": "1"})[3].endswith(f":{taken}")   # only the first node binds it
    # a requeued job finds its own port in TIME_WAIT (the last run's store closed first): that port is free
    peer = socket.create_connection(("127.0.0.1", taken))
    conn, _ = held.accept()
    conn.close()
    held.close()
    peer.close()
    torchrun_args(job)
    # the scripts leave the port to mer_dist.dist: no second formula to drift
    for script in ("slurm/align.sh", "slurm/finetune.sh"):
        assert "SLURM_JOB_ID %" not in (REPO / script).read_text()
