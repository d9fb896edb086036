"""Shared fixtures: one small synthetic corpus + shards + teacher per session, a real MLflow server."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mer_dist.dist import free_port  # noqa: F401  (tests import it from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the checkpoint signing key of the test user: outside the home directory, one per test session
os.environ.setdefault("MER_DIST_KEY_FILE", os.path.join(tempfile.mkdtemp(prefix="mer-dist-key-"), "checkpoint-key"))
REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None, timeout=600, check=True, cwd=None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "mer_dist", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd or REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"mer-dist {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    from mer_dist.config import SynthConfig
    from mer_dist.data.synth import generate
    out = tmp_path_factory.mktemp("corpus")
    generate(SynthConfig(out=str(out), num_labeled=96, num_unlabeled=64, num_test=24, seconds=1.6,
                         seconds_jitter=0.3, height=32, width=32, fps=10, workers=2, seed=3))
    return out


@pytest.fixture(scope="session")
def shards(corpus, tmp_path_factory) -> Path:
    from mer_dist.config import ShardConfig
    from mer_dist.data.ingest import write_shards
    out = tmp_path_factory.mktemp("shards")
    write_shards(ShardConfig(corpus=str(corpus), out=str(out), shard_mb=0.3, workers=2))
    return out


DATA = ["data.height=32", "data.width=32", "data.frames=4", "data.batch_size=4", "tracking.enabled=false"]


@pytest.fixture(scope="session")
def probe_dir(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe")
    run_cli("probe-layers", "--shards", shards, "--out", out, *DATA)
    return out


@pytest.fixture(scope="session")
def teacher(shards, probe_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    run_cli("adapt-audio", "--shards", shards, "--probe", probe_dir, "--out", out, "epochs=8", "patience=8", *DATA)
    return out


def start_mlflow(d: Path) -> tuple[str, subprocess.Popen]:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend; returns (uri, process)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--default-artifact-root", str(d / "art"),
                             "--workers", "1"], stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True,
                            # no background job runners (huey consumers outlive the server's process group)
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    import urllib.request
    for _ in range(120):
        try:
            urllib.request.urlopen(uri + "/health", timeout=1)
            return uri, proc
        except OSError:
            time.sleep(0.5)
    stop_mlflow(proc)
    raise RuntimeError(f"mlflow server did not start: {(d / 'server.log').read_text()[-2000:]}")


def stop_mlflow(proc: subprocess.Popen) -> None:
    import signal
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    uri, proc = start_mlflow(d)
    yield {"uri": uri, "proc": proc, "dir": d}
    stop_mlflow(proc)


@pytest.fixture(scope="session")
def logged_model(shards, teacher, mlflow_server, tmp_path_factory) -> Path:
    """One fine-tuned fusion model, logged and registered as `mer-emotion` on the session's MLflow server: what
    predict, evaluate-on-other-shards and serving are tested on (one finetune, not one per test file)."""
    out = tmp_path_factory.mktemp("model")
    run_cli("finetune", "--shards", shards, "--teacher", teacher, "--visual", "random", "--out", out, "folds=2",
            "epochs=5", *DATA[:-1], f"tracking.uri={mlflow_server['uri']}", "tracking.register_model=mer-emotion",
            "tracking.system_metrics=false")
    return out
