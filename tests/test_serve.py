"""The served model (#23 item 2, #32 items 1-4): `finetune` logs the fold ensemble as an MLflow model, `mlflow models
serve` answers over HTTP what `mer-dist predict` answers, and a client cannot turn it against its server: no path
outside what the operator allowed, no URL or protocol, no row without a bound in bytes and time, no row that fails
the request."""
from __future__ import annotations

import base64
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, free_port, run_cli

from mer_dist.data.decode import DecodeError, decode
from mer_dist.serve import REFUSED, Limits, _cell, open_allowed

LABELS = ["neutral", "angry", "happy", "sad", "worried", "surprise"]


def test_limits_come_from_the_operator_and_bad_ones_are_one_line(tmp_path):
    assert Limits.load(env={}) == Limits()              # nothing allowed by default
    lim = Limits.load({"max_rows": 3}, env={"MER_SERVE_ALLOWED_DIRS": f"{tmp_path}{os.pathsep}/x/../srv",
                                             "MER_SERVE_MAX_ROWS": "9", "MER_SERVE_ROW_SECONDS": "2.5"})
    assert lim.allowed_dirs == (str(tmp_path.resolve()), "/srv") and lim.max_rows == 3 and lim.row_seconds == 2.5
    with pytest.raises(ValueError, match=r"MER_SERVE_MAX_CLIP_BYTES \(model_config 'max_clip_bytes'\): expected"):
        Limits.load(env={"MER_SERVE_MAX_CLIP_BYTES": "lots"})


def test_a_client_path_opens_only_regular_files_under_allowed_dirs(tmp_path, corpus):
    ok = tmp_path / "allowed"
    ok.mkdir()
    clip = next((corpus / "video-unlabeled").iterdir())
    (ok / "clip.mp4").write_bytes(clip.read_bytes())
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(clip.read_bytes())
    (ok / "escape.mp4").symlink_to(outside)
    (ok / "loop.mp4").symlink_to(ok / "loop.mp4")
    os.mkfifo(ok / "fifo.mp4")
    lim = Limits(allowed_dirs=(str(ok.resolve()),), max_clip_bytes=10 << 20)
    with open_allowed(str(ok / "clip.mp4"), lim) as fh:
        assert fh.read() == clip.read_bytes()
    refused = [str(outside), str(ok / "escape.mp4"), str(ok / "loop.mp4"), str(ok / "fifo.mp4"), str(ok / "nope.mp4"),
               str(ok / ".." / "outside.mp4"), "clip.mp4", f"file://{ok}/clip.mp4", f"file:{ok}/clip.mp4",
               "http://127.0.0.1:1/clip.mp4", f"concat:{ok}/clip.mp4", f"subfile,,start,0,end,0,,:{ok}/clip.mp4",
               "pipe:0", "/etc/passwd", "/root", str(ok), str(ok / "clip.mp4") + "\x00"]
    for p in refused:
        with pytest.raises(ValueError) as e:
            open_allowed(p, lim).close()
        assert str(e.value) == REFUSED, p            # one text: it never tells a missing file from a forbidden one
    with pytest.raises(ValueError) as e:
        open_allowed(str(ok / "clip.mp4"), Limits())  # nothing allowed by default
    assert str(e.value) == REFUSED
    with pytest.raises(ValueError, match="over the 100-byte limit"):
        open_allowed(str(ok / "clip.mp4"), Limits(allowed_dirs=lim.allowed_dirs, max_clip_bytes=100))


def test_decoding_never_lets_ffmpeg_pick_a_protocol_or_wait(tmp_path, corpus):
    """A playlist naming a URL is no video (FFmpeg's HLS demuxer would fetch it); a FIFO is refused, not waited
    on; a deadline stops a decode."""
    hits = []

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *a):
            pass
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{url}/seg.ts\n#EXT-X-ENDLIST\n".encode()
        for src in (playlist, f"{url}/clip.mp4"):
            with pytest.raises(DecodeError, match="cannot open"):
                decode(src, 2, 16, 16, name="x")
        assert hits == []
    finally:
        srv.shutdown()
    os.mkfifo(tmp_path / "f.mp4")
    with pytest.raises(DecodeError, match="not a regular file"):
        decode(tmp_path / "f.mp4", 2, 16, 16, name="x")
    clip = next((corpus / "video-unlabeled").iterdir()).read_bytes()
    assert decode(clip, 2, 16, 16, name="x").frames.shape == (2, 3, 16, 16)
    with pytest.raises(DecodeError, match="time limit"):
        decode(clip, 2, 16, 16, name="x", deadline=time.monotonic() - 1)


def test_null_cells_are_missing_values():
    frame = pd.DataFrame({"video": ["abc", None], "path": [None, "/x"], "text": [float("nan"), "hi"]})
    rows = frame.to_dict("records")
    assert [_cell(r["video"]) for r in rows] == ["abc", None] and _cell(rows[0]["path"]) is None
    assert _cell(rows[0]["text"]) is None and _cell(pd.NA) is None and _cell("") is None and _cell(0.0) == 0.0


def _post(port: int, body: dict, timeout: float = 120) -> tuple[int, object]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())["predictions"]
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@pytest.mark.slow
def test_logged_model_is_served_over_http_and_holds_against_its_clients(logged_model, corpus, mlflow_server,
                                                                         tmp_path):
    uri, out = mlflow_server["uri"], logged_model
    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(run_id, "model")}
    versions = [v for v in client.search_model_versions("name='mer-emotion'") if v.run_id == run_id]
    assert len(versions) == 1 and versions[0].source == f"runs:/{run_id}/model"   # registered once (shared server)

    test = sorted(r["name"] for r in csv.DictReader(open(corpus / "label-test.csv")))[:2]
    paths = [corpus / "video-unlabeled" / f"{n}.mp4" for n in test]
    texts = {r["name"]: r["english"] for r in csv.DictReader(open(corpus / "label-transcription.csv", encoding="utf-8"))}
    run_cli("predict", "--model", out, *paths, "--transcripts", corpus / "label-transcription.csv",
            "--out", tmp_path / "p.csv")
    want = {r["name"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.mp4").write_bytes(paths[0].read_bytes())
    for k in range(6):
        os.mkfifo(allowed / f"fifo{k}.mp4")

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MER_SERVE_ALLOWED_DIRS": str(allowed),
           "MER_SERVE_MAX_ROWS": "6", "MER_SERVE_MAX_CLIP_BYTES": str(1 << 20)}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model",
                             "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "--workers", "1"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    hits = []
    lsock = socket.socket()                   # a peer that accepts and never sends: nothing may ever connect
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.settimeout(0.2)
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
        status, got = _post(port, {"dataframe_split": {"columns": list(frame.columns), "data": frame.values.tolist()}})
        assert status == 200
        assert [g["name"] for g in got] == test
        for g in got:
            w = want[g["name"]]
            assert g["discrete"] == w["discrete"] and g["modalities"] == w["modalities"] == "avt" and not g["error"]
            assert np.abs(np.array([g[k] for k in LABELS]) - np.array([float(w[k]) for k in LABELS])).max() <= 1e-5

        # six requests of a FIFO each (today they held every worker thread for good), then a normal one
        for k in range(6):
            status, rows = _post(port, {"dataframe_records": [{"path": str(allowed / f"fifo{k}.mp4")}]}, timeout=60)
            assert status == 200 and rows[0]["error"] == REFUSED
        peer = f"http://127.0.0.1:{lsock.getsockname()[1]}/clip.mp4"
        video0 = frame["video"][0]
        records = [{"name": "ok", "video": video0, "text": None},          # a null text is no transcript
                   {"path": str(allowed / "a.mp4"), "text": texts[test[0]]},
                   {"name": "peer", "path": peer},
                   {"name": "outside", "path": str(paths[1])},
                   {"name": "big", "video": base64.b64encode(b"\0" * (2 << 20)).decode()},
                   {"name": "empty"},
                   {"name": "past the cap", "video": video0}]
        status, rows = _post(port, {"dataframe_records": records})
        assert status == 200 and len(rows) == 7
        assert rows[0]["modalities"] == "av" and not rows[0]["error"]
        assert rows[1]["name"] == "a" and rows[1]["discrete"] == want[test[0]]["discrete"] and not rows[1]["error"]
        assert rows[2]["error"] == rows[3]["error"] == REFUSED
        assert "1048576-byte limit (MER_SERVE_MAX_CLIP_BYTES)" in rows[4]["error"]
        assert "neither `video`" in rows[5]["error"]
        assert "at most 6 rows (MER_SERVE_MAX_ROWS)" in rows[6]["error"] and rows[6]["discrete"] == ""
        try:
            lsock.accept()
            hits.append("connected")
        except TimeoutError:
            pass
        assert hits == []                     # the server never opened the client's URL
        # mixed nulls in dataframe_split, and no `name` column: every row answered, none fails the request
        status, rows = _post(port, {"dataframe_split": {"columns": ["video", "path"],
                                                        "data": [[video0, None], [None, str(allowed / "a.mp4")],
                                                                 [None, None]]}})
        assert status == 200 and [r["name"] for r in rows] == ["row0", "a", "row2"]
        assert not rows[0]["error"] and rows[0]["modalities"] == "av" and not rows[1]["error"]
        assert "neither" in rows[2]["error"] and "Traceback" not in json.dumps(rows)
    finally:
        lsock.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
