"""#23 item 2: finetune logs the fold ensemble as an MLflow model; `mlflow models serve` answers over HTTP what
`mer-dist predict` answers."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import REPO, free_port, run_cli

LABELS = ["neutral", "angry", "happy", "sad", "worried", "surprise"]


@pytest.mark.slow
def test_logged_model_is_served_over_http_with_predicts_answers(shards, teacher, corpus, mlflow_server, tmp_path):
    uri = mlflow_server["uri"]
    out = tmp_path / "model"
    run_cli("finetune", "--shards", shards, "--teacher", teacher, "--visual", "random", "--out", out, "folds=2",
            "epochs=5", "data.height=32", "data.width=32", "data.frames=4", "data.batch_size=4",
            f"tracking.uri={uri}", "tracking.register_model=mer-emotion", "tracking.system_metrics=false")
    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(run_id, "model")}
    versions = client.search_model_versions("name='mer-emotion'")
    assert [v.run_id for v in versions] == [run_id] and versions[0].source == f"runs:/{run_id}/model"

    test = sorted(r["name"] for r in csv.DictReader(open(corpus / "label-test.csv")))[:2]
    paths = [corpus / "video-unlabeled" / f"{n}.mp4" for n in test]
    texts = {r["name"]: r["english"] for r in csv.DictReader(open(corpus / "label-transcription.csv", encoding="utf-8"))}
    run_cli("predict", "--model", out, *paths, "--transcripts", corpus / "label-transcription.csv",
            "--out", tmp_path / "p.csv")
    want = {r["name"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model",
                             "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "--workers", "1"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        sys.path.insert(0, str(REPO))
        from mer_dist.serve import as_dataframe
        frame = as_dataframe(paths, [texts[n] for n in test])
        body = {"dataframe_split": {"columns": list(frame.columns), "data": frame.values.tolist()}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        got = json.loads(urllib.request.urlopen(req, timeout=300).read())["predictions"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert [g["name"] for g in got] == test
    for g in got:
        w = want[g["name"]]
        assert g["discrete"] == w["discrete"] and g["modalities"] == w["modalities"] == "avt" and not g["error"]
        assert np.abs(np.array([g[k] for k in LABELS]) - np.array([float(w[k]) for k in LABELS])).max() <= 1e-5
