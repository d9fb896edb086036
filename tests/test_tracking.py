"""The tracker never crashes a stage: no mlflow import races, import failures are survived, and the run's
system metrics and artifacts land beside its own store (not in the current directory)."""
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys, time
    class Hook(importlib.abc.MetaPathFinder):
        # slows (or breaks) every mlflow import: a busy machine, made reproducible
        def find_spec(self, name, path, target=None):
            if name == "mlflow" or name.startswith("mlflow."):
                if MODE == "broken":
                    raise ImportError("mlflow is broken here")
                time.sleep(0.02)
            return None
    MODE = sys.argv[2]
    sys.meta_path.insert(0, Hook())
    from mer_dist.config import TrackingConfig
    from mer_dist.tracking import Tracker
    t = Tracker(TrackingConfig(system_metrics=MODE == "system", system_metrics_interval=0.5), sys.argv[1], "test",
                tags={"k": "v"})
    t.params({"a": 1, "b": {"c": [1, 2]}})
    for i in range(5):
        t.metrics({"loss": 1.0 / (i + 1)}, i)
    if MODE == "system":      # until the sampler has logged once (a busy machine takes more than a few intervals)
        from mlflow import MlflowClient
        c, run_id, deadline = MlflowClient(t.uri), t.wait_run_id(), time.monotonic() + 90
        while not any(k.startswith("system/") for k in c.get_run(run_id).data.metrics) and time.monotonic() < deadline:
            time.sleep(0.2)
    t.close()
    print("RUN", t.run_id)
""")


def _run(tmp_path, name, mode):
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    script = tmp_path / "t.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / name), mode], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _client(tmp_path):
    from mlflow.tracking import MlflowClient
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


@pytest.mark.slow  # an MLflow store and its system-metrics thread
def test_slow_mlflow_imports_never_race(tmp_path):
    procs = [_run(tmp_path, f"run{i}", "slow") for i in range(4)]     # concurrent: the machine is busy too
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err and "unavailable" not in err and "disabled" not in err, err[-3000:]
        ids.append(out.split("RUN")[1].strip())
    c = _client(tmp_path)
    for run_id in ids:
        r = c.get_run(run_id)
        assert r.info.status == "FINISHED"
        assert r.data.params == {"a": "1", "b.c": "[1, 2]"}
        assert [m.value for m in c.get_metric_history(run_id, "loss")] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
        assert r.data.tags["k"] == "v" and r.data.tags["stage"] == "test"


@pytest.mark.slow  # a subprocess
def test_broken_mlflow_import_leaves_the_stage_running(tmp_path):
    p = _run(tmp_path, "run", "broken")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    assert "MLflow disabled" in err and "mlflow is broken here" in err
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 5                    # the local record is complete


@pytest.mark.slow  # an MLflow store and its system-metrics thread
def test_system_metrics_and_artifacts_beside_the_store(tmp_path):
    p = _run(tmp_path, "run", "system")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    c = _client(tmp_path)
    r = c.get_run(out.split("RUN")[1].strip())
    assert any(k.startswith("system/") for k in r.data.metrics), sorted(r.data.metrics)
    exp = c.get_experiment(r.info.experiment_id)
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert sorted(os.listdir(tmp_path / "cwd")) == []          # no ./mlflow.db, no ./mlruns


def test_a_resumed_run_that_changes_a_setting_keeps_logging(tmp_path):
    """`align ... train.steps=N` raised to train on: MLflow params are immutable, so the first value stays, the change
    is a `resumed.<key>` tag, and tracking is not turned off for the rest of the run."""
    from mlflow.tracking import MlflowClient

    from mer_dist.config import TrackingConfig
    from mer_dist.tracking import Tracker
    cfg = TrackingConfig(system_metrics=False, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    t = Tracker(cfg, tmp_path, "align")
    t.params({"train": {"steps": 1}})
    t.metrics({"loss": 1.0}, 1)
    run_id = t.wait_run_id()
    t.close()
    t = Tracker(cfg, tmp_path, "align", run_id=run_id)
    t.params({"train": {"steps": 2, "lr": 0.1}})
    t.metrics({"loss": 0.5}, 2)
    t.close()
    assert not t.ever_down
    run = MlflowClient(cfg.uri).get_run(run_id)
    assert run.data.params == {"train.steps": "1", "train.lr": "0.1"}
    assert run.data.tags["resumed.train.steps"] == "1 -> 2"
    assert [m.step for m in MlflowClient(cfg.uri).get_metric_history(run_id, "loss")] == [1, 2]


@pytest.mark.slow
def test_the_dashboard_says_what_each_run_is_nests_and_ends_runs_honestly(shards, teacher, mlflow_server, tmp_path):
    """#23 item 4, through the MLflow client against a real server: the experiment is marked for model training,
    a run's name and tags say what it is (and the commit), the shards are its dataset input, its start is the
    stage's, a parent run nests the runs started under it, and a signal ends a run KILLED."""
    import json
    import signal
    import time

    from conftest import run_cli
    from mlflow import MlflowClient
    uri, exp_name = mlflow_server["uri"], "dashboard"
    client = MlflowClient(uri)
    common = ["tracking.system_metrics=false", f"tracking.uri={uri}", f"tracking.experiment={exp_name}",
              "data.height=32", "data.width=32", "data.frames=4"]
    parent = client.create_run(client.create_experiment("parents")).info.run_id
    t0 = time.time()
    run_cli("finetune", "--shards", shards, "--teacher", teacher, "--visual", "random", "--out", tmp_path / "m",
            "folds=2", "epochs=3", "seed=3", "tracking.log_model=false", "tracking.tags=[team=mer,site=a=b]", *common,
            env={"MER_DIST_PARENT_RUN": parent})
    exp = client.get_experiment_by_name(exp_name)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(json.loads((tmp_path / "m" / "metrics.json").read_text())["mlflow_run_id"])
    assert run.info.run_name == "finetune a,v,t visual=random seed=3"
    tags = run.data.tags
    assert tags["modalities"] == "avt" and tags["visual"] == "random" and tags["seed"] == "3"
    assert tags["team"] == "mer" and tags["site"] == "a=b"          # README: add your own with tracking.tags
    assert tags["mlflow.parentRunId"] == parent and len(tags.get("mlflow.source.git.commit", "x" * 40)) == 40
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [shards.name]
    assert len(run.inputs.dataset_inputs[0].dataset.digest) == 16
    # the run starts with the stage (before its feature extraction), not when the stage opens its tracker
    assert t0 - 1 <= run.info.start_time / 1000 <= t0 + 30 and run.info.status == "FINISHED"
    assert run.info.end_time >= run.info.start_time
    # a signal ends the run KILLED
    p = subprocess.Popen([sys.executable, "-m", "mer_dist", "pretrain-audio", "--shards", str(shards), "--out",
                          str(tmp_path / "h"), "steps=100000", *common], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not client.search_runs([exp.experiment_id], "attributes.run_name LIKE 'pretrain-audio%'"):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-2000:]
        time.sleep(1)
    (hung,) = client.search_runs([exp.experiment_id], "attributes.run_name LIKE 'pretrain-audio%'")
    while not client.get_metric_history(hung.info.run_id, "loss"):   # training (its handlers set), not starting
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-2000:]
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    (killed,) = client.search_runs([exp.experiment_id], "attributes.run_name LIKE 'pretrain-audio%'")
    assert killed.info.status == "KILLED"
