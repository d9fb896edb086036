"""Hostile and messy inputs: no code runs from model files, no silent drops or wrong answers, no hangs."""
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from conftest import DATA, REPO, free_port, run_cli

from mer_dist.config import DataConfig, ShardConfig, SynthConfig


class Evil:
    """Unpickling this runs a shell command: what a crafted model file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def error_line(stderr: str) -> str:
    """The one line the CLI prints for a user error (progress bars and logs may surround it)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("mer-dist: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


ALIGN = ["data.height=32", "data.width=32", "data.frames=4", "data.batch_size=4", "data.workers=0",
         "tracking.enabled=false", "train.eval_samples=0", "train.log_every=1", "train.warmup_steps=1",
         "guard.enabled=false"]    # the guard (on by default) has its own tests


@pytest.mark.slow
def test_crafted_model_files_are_refused_and_never_run(tmp_path, shards, teacher):
    marker = tmp_path / "pwned"
    evil = tmp_path / "encoder.pt"
    torch.save({"config": Evil(marker), "image_size": 32, "state_dict": {}}, evil)
    cases = [("finetune", "--shards", shards, "--teacher", teacher, "--visual", evil, "--modalities", "v",
              "--out", tmp_path / "ft", *DATA),
             ("align", "--shards", shards, "--teacher", teacher, "--out", tmp_path / "al", "--steps", "2",
              f"model.init={evil}", *ALIGN)]
    mdir = tmp_path / "model"
    mdir.mkdir()
    torch.save({"folds": [Evil(marker)]}, mdir / "model.pt")
    cases.append(("evaluate", "--model", mdir, "--out", tmp_path / "ev", "tracking.enabled=false"))
    for args in cases:
        p = run_cli(*args, check=False)
        assert p.returncode == 2, (args[0], p.stderr[-2000:])
        assert "refusing to load" in error_line(p.stderr), args[0]
        assert not marker.exists(), args[0]
    # the per-rank RNG file of a checkpoint that verifies (signed by the user's key) is data too: resuming from
    # one that holds a pickle refuses it and runs nothing
    from mer_dist.dist import DistEnv
    from mer_dist.train import checkpoint

    class Engine:          # the two calls checkpoint.save/load make of a DeepSpeed engine (real ones: test_align)
        def save_checkpoint(self, d, tag, client_state, save_latest):
            torch.save({"step": client_state["step"]}, f"{d}/{tag}/mp_rank_00_model_states.pt")

        def load_checkpoint(self, d, tag):
            return f"{d}/{tag}", {"step": 1}
    ckdir = tmp_path / "run" / "checkpoints"
    checkpoint.save(Engine(), ckdir, 1, {"step": 1}, keep=2, env=DistEnv())
    folder = ckdir / "step00000001"
    torch.save({"torch": Evil(marker)}, folder / "rng-rank00000.pt")
    mf = folder / checkpoint.MANIFEST
    m = json.loads(mf.read_text())
    m["files"] = checkpoint._digest(folder)
    m["signature"] = checkpoint._sign(m["files"], m["world_size"], folder.name, checkpoint.run_id(ckdir),
                                      checkpoint._key())
    mf.write_text(json.dumps(m))
    from mer_dist.errors import ModelError
    with pytest.raises(ModelError, match="rng-rank00000.pt: not a plain tensor file, refusing to load it"):
        checkpoint.load(Engine(), ckdir, DistEnv())
    assert not marker.exists()


def _align(out, shards, teacher, steps, *extra, nproc=1, wait=True, env=None):
    head = [sys.executable, "-m", "mer_dist"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
         "-m", "mer_dist"]
    cmd = [*head, "align", "--shards", str(shards), "--teacher", str(teacher), "--out", str(out), "--steps",
           str(steps), *ALIGN, *extra]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env={**os.environ, **(env or {})})
    if not wait:
        return p
    o, e = p.communicate(timeout=400)
    return p.returncode, o, e


def _rows(out):
    return [json.loads(r) for r in open(out / "metrics.jsonl")] if (out / "metrics.jsonl").exists() else []


@pytest.mark.slow
def test_checkpoints_signed_one_writer_no_duplicate_rows_and_world_size(tmp_path, shards, teacher):
    out = tmp_path / "run"
    # killed hard (no checkpoint of the last steps) -> resumed: every step once in metrics.jsonl
    p = _align(out, shards, teacher, 400, "train.ckpt_every=4", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r.get("step", 0) >= 6 for r in _rows(out)):
        time.sleep(0.2)
    # a second writer into the same directory is refused while the first runs
    rc2, _, err2 = _align(out, shards, teacher, 400)
    assert rc2 == 2 and "another run is writing here" in error_line(err2)
    def just_after_a_checkpoint():      # the newest row is 1-2 steps past a checkpoint: kill there
        rows = [r for r in _rows(out) if "loss" in r]
        return rows and rows[-1]["step"] > 6 and rows[-1]["step"] % 4 in (1, 2)
    while time.time() < deadline and not just_after_a_checkpoint():
        time.sleep(0.05)
    assert p.poll() is None, "the first run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    last = int((out / "checkpoints" / "latest").read_text().strip()[len("step"):])
    assert max(r["step"] for r in _rows(out)) > last            # rows of steps the checkpoint does not hold
    rc, o, e = _align(out, shards, teacher, last + 4, "train.ckpt_every=4")
    assert rc == 0, e[-3000:]
    steps = [r["step"] for r in _rows(out) if "loss" in r]
    assert steps == list(range(1, last + 5)), (last, steps)
    # resuming on 2 ranks cannot keep this checkpoint's global batch (4) with 4 clips per rank: one line per
    # rank saying what to set, each exits 2 (torchrun then reports failure); test_align resumes across sizes
    rc, _, e = _align(out, shards, teacher, 20, nproc=2)
    lines = ["mer-dist: error:" + part for part in e.split("mer-dist: error:")[1:]]
    assert rc != 0 and len(lines) == 2 and all("global batch of 4 on 1 ranks" in ln for ln in lines), e[-3000:]
    assert "exitcode: 2" in e
    # a checkpoint the user's key did not sign (edited, or from elsewhere) is never unpickled: the run falls back to
    # the newest one that verifies and says so; with none it is refused; trust overrides
    def unsign(tag):
        mf = out / "checkpoints" / tag / "mer-dist-manifest.json"
        mf.write_text(json.dumps({**json.loads(mf.read_text()), "signature": "0" * 64}))
    unsign(f"step{last + 4:08d}")
    rc, o, e = _align(out, shards, teacher, last + 4, "train.ckpt_every=4")
    assert rc == 0 and f"resumed from checkpoint step{last:08d} at step {last} (latest step{last + 4:08d} is damaged)" in o
    for p in (out / "checkpoints").iterdir():
        if p.is_dir():
            unsign(p.name)
    rc, _, e = _align(out, shards, teacher, 20)
    assert rc == 2 and "refusing to unpickle" in error_line(e)
    rc, o, e = _align(out, shards, teacher, 18, "train.trust_checkpoint=true")
    assert rc == 0 and "resumed from checkpoint" in o, e[-2000:]


@pytest.mark.slow
def test_a_received_run_directory_never_unpickles_on_resume(tmp_path, shards, teacher):
    """A colleague's run directory, its model states replaced by a pickle that runs a command and its manifest
    re-signed with whatever key the directory carries (or the colleague's own): resuming from it is refused."""
    colleague, mine = tmp_path / "colleague-key", tmp_path / "my-key"
    rc, _, e = _align(tmp_path / "theirs", shards, teacher, 2, env={"MER_DIST_KEY_FILE": str(colleague)})
    assert rc == 0, e[-2000:]
    received = tmp_path / "received"
    shutil.copytree(tmp_path / "theirs", received)
    from mer_dist.train import checkpoint
    folder = received / "checkpoints" / (received / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "pwned"
    torch.save({"module": Evil(marker)}, folder / "mp_rank_00_model_states.pt")
    key = received / ".mer-dist-key" if (received / ".mer-dist-key").is_file() else colleague
    mf = folder / checkpoint.MANIFEST
    m = json.loads(mf.read_text())
    m["files"] = checkpoint._digest(folder)
    m["signature"] = checkpoint._sign(m["files"], m["world_size"], folder.name, checkpoint.run_id(folder.parent),
                                      key.read_text().strip().encode())
    mf.write_text(json.dumps(m))
    rc, _, e = _align(received, shards, teacher, 4, env={"MER_DIST_KEY_FILE": str(mine)})
    assert rc == 2 and "not signed by your key" in error_line(e) and "refusing to unpickle" in error_line(e)
    assert not marker.exists()


@pytest.mark.slow
def test_one_ranks_damaged_manifest_ends_every_rank_promptly(tmp_path, shards, teacher):
    out = tmp_path / "run"
    rc, _, e = _align(out, shards, teacher, 2, nproc=2)
    assert rc == 0, e[-2000:]
    mf = out / "checkpoints" / "step00000002" / "mer-dist-manifest.json"
    mf.write_text(json.dumps({**json.loads(mf.read_text()), "signature": "é" * 64}))   # compare_digest: TypeError
    t0 = time.time()
    rc, _, e = _align(out, shards, teacher, 4, nproc=2)
    lines = [ln[ln.index("mer-dist: error:"):] for ln in e.splitlines() if "mer-dist: error:" in ln]
    assert rc != 0 and len(lines) == 2 and all("not signed by your key" in ln for ln in lines), e[-3000:]
    assert "TypeError" not in e and time.time() - t0 < 120
    mf.write_text("{")                                                                  # JSONDecodeError
    rc, _, e = _align(out, shards, teacher, 4, nproc=2)
    lines = [ln for ln in e.splitlines() if "mer-dist: error:" in ln]
    assert rc != 0 and len(lines) == 2 and all("damaged manifest" in ln for ln in lines) and "json.decoder.JSONDecodeError" not in e


@pytest.mark.slow
def test_a_deleted_latest_checkpoint_resumes_from_the_one_before_and_keeps_history(tmp_path, shards, teacher):
    out = tmp_path / "run"
    rc, _, e = _align(out, shards, teacher, 6, "train.ckpt_every=2", "train.keep_checkpoints=3")
    assert rc == 0, e[-2000:]
    shutil.rmtree(out / "checkpoints" / "step00000006")      # "files differ from its manifest" -> deleted
    (out / "checkpoints" / ".tmp-step00000007").mkdir()       # a save killed before its rename
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')                            # a row cut short by the same kill
    rc, o, e = _align(out, shards, teacher, 8, "train.ckpt_every=2", "train.keep_checkpoints=3")
    assert rc == 0, e[-2000:]
    assert "align: resumed from checkpoint step00000004 at step 4 (latest step00000006 is missing)" in o
    assert [r["step"] for r in _rows(out) if "loss" in r] == list(range(1, 9))     # steps 1-4 kept, 5-8 redone
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step00000004", "step00000006",
                                                                                      "step00000008"]


def _rewrite_shards(src, dst, split, damage):
    """A copy of the shards whose `split` members pass through `damage(i, member_name, bytes) -> bytes`."""
    shutil.copytree(src, dst)
    from mer_dist.data.ingest import shard_urls
    i = 0
    for url in shard_urls(dst, split):
        with tarfile.open(url) as t:
            members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
        with tarfile.open(url, "w") as t:
            for m, data in members:
                if m.name.endswith(".json"):
                    i += 1
                data = damage(i, m.name, data)
                m.size = len(data)
                t.addfile(m, io.BytesIO(data))


@pytest.mark.slow
def test_sample_faults_are_skipped_counted_and_named_and_a_failing_worker_never_hangs(tmp_path, shards, teacher,
                                                                                     caplog):
    bad = tmp_path / "bad"          # every third sample's .json cut to "{"
    _rewrite_shards(shards, bad, "unlabeled", lambda i, n, d: b"{" if n.endswith(".json") and i % 3 == 0 else d)
    out = tmp_path / "run"
    rc, o, e = _align(out, bad, teacher, 3, "data.workers=1", "train.log_every=1")
    assert rc == 0, e[-3000:]
    assert "malformed .json member" in e
    assert max(r.get("skipped_samples", 0) for r in _rows(out)) > 0
    # extract-targets skips the sample and keeps the rest of its shard
    p = run_cli("extract-targets", "--shards", bad, "--teacher", teacher, "--out", tmp_path / "ext", *DATA[:-1])
    man = json.loads((tmp_path / "ext" / "manifest.json").read_text())
    assert "malformed .json member" in p.stdout and man["splits"]["unlabeled"]["samples"] == 64 - 64 // 3
    # offline targets: a truncated teacher.npy and one of another width are skipped like a bad video
    import numpy as np
    n_npy, damaged = [0], [0]

    def teacher_damage(i, name, data):
        if not name.endswith(".teacher.npy"):
            return data
        n_npy[0] += 1
        if n_npy[0] % 5 in (1, 2):
            damaged[0] += 1
        if n_npy[0] % 5 == 1:
            return data[: len(data) // 2]
        if n_npy[0] % 5 == 2:
            buf = io.BytesIO()
            np.save(buf, np.zeros((4, 3), np.float16))
            return buf.getvalue()
        return data
    _rewrite_shards(tmp_path / "ext", tmp_path / "ext-bad", "unlabeled", teacher_damage)
    from mer_dist.data.ingest import shard_urls
    from mer_dist.data.stream import SkipTotals, eval_loader, iterate
    totals = SkipTotals()
    cfg = DataConfig(frames=2, height=16, width=16, batch_size=4, workers=0)      # in this process: its log is seen
    with caplog.at_level("WARNING"):
        names = [n for b in iterate(eval_loader(shard_urls(tmp_path / "ext-bad", "unlabeled"), cfg), totals)
                 for n in b["name"]]
    assert damaged[0] > 0 and totals.samples == damaged[0]
    assert len(names) == man["splits"]["unlabeled"]["samples"] - damaged[0]
    assert "unreadable teacher.npy" in caplog.text and "dims, this stream's have" in caplog.text
    # a loader worker that gives up (nothing decodes) ends the job with one line, promptly: no wait on the worker
    allbad = tmp_path / "allbad"
    _rewrite_shards(shards, allbad, "unlabeled", lambda i, n, d: b"{" if n.endswith(".json") else d)
    t0 = time.time()
    rc, o, e = _align(tmp_path / "run3", allbad, teacher, 3, "data.workers=1", "data.max_consecutive_failures=3")
    assert rc == 2 and "3 consecutive samples failed" in error_line(e) and time.time() - t0 < 120, e[-3000:]


@pytest.mark.slow
def test_checkpoint_on_a_full_disk_fails_every_rank_with_one_line(tmp_path, shards, teacher):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out / "checkpoints")]).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        rc, _, e = _align(out, shards, teacher, 4, "train.ckpt_every=2", nproc=2)
    finally:
        subprocess.run(["umount", "-l", str(out / "checkpoints")])
    assert rc != 0
    lines = [ln[ln.index("mer-dist: error:"):] for ln in e.splitlines() if "mer-dist: error:" in ln]
    assert len(lines) == 2, e[-3000:]                          # both ranks said it, neither hung
    assert all("checkpoint not written" in ln and "previous checkpoint stays latest" in ln for ln in lines)
    assert any("No space left on device" in ln for ln in lines), lines


@pytest.mark.slow
def test_signal_while_the_loader_is_stalled_ends_the_job(tmp_path, shards, teacher):
    # every unlabeled shard a FIFO nobody writes: the loader worker blocks in open(), no batch ever comes
    stalled = tmp_path / "shards"
    shutil.copytree(shards, stalled)
    for tar in stalled.glob("unlabeled-*.tar"):
        tar.unlink()
        os.mkfifo(tar)
    out, marker = tmp_path / "run", tmp_path / "requeue"
    cmd = [sys.executable, "-m", "mer_dist", "align", "--shards", str(stalled), "--teacher", str(teacher),
           "--out", str(out), "--steps", "5", *ALIGN, "data.workers=1", "train.stop_grace_s=2"]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env={**os.environ, "MER_REQUEUE_MARKER": str(marker)})
    writers = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and not writers:
            for fifo in stalled.glob("unlabeled-*.tar"):   # a worker has opened a shard: a writer may open now
                try:                                       # (held open, never written: its read stalls)
                    writers.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
            time.sleep(0.1)
        assert writers and p.poll() is None     # into the wait for the first batch
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)  # today: still waiting long after the signal
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        for fd in writers:
            os.close(fd)
    assert p.returncode == 75 and "no batch came within stop_grace_s=2s" in err, err[-2000:]
    assert marker.exists()
    deadline = time.time() + 30             # the worker blocked on its shard dies with its trainer
    while (left := subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()) \
            and time.time() < deadline:
        time.sleep(0.2)
    assert not left, left


@pytest.mark.slow
def test_degenerate_configs_one_line_each():
    for bad, key in (("data.frames=0", "data.frames"), ("data.batch_size=0", "data.batch_size"),
                     ("train.steps=0", "train.steps")):
        p = run_cli("align", bad, check=False)
        assert p.returncode == 2 and key in error_line(p.stderr)


def test_stream_where_nothing_decodes_stops_with_the_causes(tmp_path):
    from mer_dist.data.stream import train_loader
    from mer_dist.errors import DataError
    tar = tmp_path / "unlabeled-000000.tar"
    with tarfile.open(tar, "w") as t:
        for i in range(4):
            for ext, payload in (("mp4", b"not a video"), ("json", b"{}")):
                info = tarfile.TarInfo(f"clip{i}.{ext}")
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
    cfg = DataConfig(frames=2, height=16, width=16, batch_size=2, workers=0, max_consecutive_failures=10)
    with pytest.raises(DataError, match="10 consecutive samples failed to decode, e.g. clip"):
        next(iter(train_loader([str(tar)], cfg)))


def _mini_corpus(src, dst, renames):
    """A corpus of a few labeled clips of `src`, renamed: {old: new}."""
    (dst / "video-labeled").mkdir(parents=True)
    (dst / "video-unlabeled").mkdir()
    rows = {r["name"]: r for r in csv.DictReader(open(src / "label-disdim.csv"))}
    with open(dst / "label-disdim.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "discrete", "valence"])
        for old, new in renames.items():
            shutil.copy(src / "video-labeled" / f"{old}.mp4", dst / "video-labeled" / f"{new}.mp4")
            w.writerow([new, rows[old]["discrete"], rows[old]["valence"]])
    return dst


@pytest.mark.slow
def test_names_with_dots_spaces_and_unicode_round_trip(tmp_path, corpus):
    from mer_dist.data.ingest import shard_urls, write_shards
    from mer_dist.data.stream import eval_loader, iterate
    from mer_dist.features import index
    src = sorted(r["name"] for r in csv.DictReader(open(corpus / "label-disdim.csv")))[:4]
    names = ["ok.dot.name", "with space", "émotion_日本", "plain"]
    c = _mini_corpus(corpus, tmp_path / "c", dict(zip(src, names)))
    write_shards(ShardConfig(corpus=str(c), out=str(tmp_path / "s"), workers=1))
    got = [n for b in iterate(eval_loader(shard_urls(tmp_path / "s", "train"), DataConfig(frames=2, height=16,
                                                                                          width=16, workers=0)))
           for n in b["name"]]
    assert sorted(got) == sorted(names)
    assert sorted(index(str(tmp_path / "s"), "train")[0]) == sorted(names)


@pytest.mark.slow
def test_label_conflicts_are_errors_naming_file_and_line(tmp_path, corpus):
    from mer_dist.data.ingest import DataError, read_corpus, write_shards
    src = sorted(r["name"] for r in csv.DictReader(open(corpus / "label-disdim.csv")))[:3]
    c = _mini_corpus(corpus, tmp_path / "c", {s: s for s in src})
    text = (c / "label-disdim.csv").read_text()
    (c / "label-disdim.csv").write_text(text + f"{src[0]},angry,0\n")
    with pytest.raises(DataError, match=r"label-disdim.csv:5 \(" + src[0] + r"\): duplicate row, first at line 2"):
        read_corpus(c)
    assert read_corpus(c, allow_duplicates=True)["train"][0]["label"] == "angry"
    (c / "label-disdim.csv").write_text(text)
    shutil.copy(c / "video-labeled" / f"{src[0]}.mp4", c / "video-labeled" / f"{src[0]}.avi")
    with pytest.raises(DataError, match="two videos of clip"):
        read_corpus(c)
    (c / "video-labeled" / f"{src[0]}.avi").unlink()
    (c / "label-disdim.csv").write_bytes("name,discrete\nclïp,happy\n".encode("latin-1"))
    with pytest.raises(DataError, match="label-disdim.csv: not UTF-8"):
        read_corpus(c)
    (c / "label-disdim.csv").write_text("\n".join(text.splitlines()[:-1]) + "\n")   # the last clip loses its row
    m = write_shards(ShardConfig(corpus=str(c), out=str(tmp_path / "s"), workers=1))
    assert m["unlisted"] == [src[2]] and m["splits"]["train"]["samples"] == 2


@pytest.mark.slow
def test_evaluate_on_other_shards_uses_their_clips(tmp_path, shards, teacher, corpus):
    from mer_dist.data.ingest import write_shards
    from mer_dist.data.synth import generate
    other = tmp_path / "c2"      # same clip names as the session corpus, other content, same parent dir
    generate(SynthConfig(out=str(other), num_labeled=8, num_unlabeled=2, num_test=2, seconds=1.2, height=32,
                         width=32, fps=10, workers=1, seed=11))
    write_shards(ShardConfig(corpus=str(other), out=str(tmp_path / "s2"), workers=1))
    model = tmp_path / "m"
    run_cli("finetune", "--shards", shards, "--teacher", teacher, "--visual", "random", "--modalities", "a,v",
            "--out", model, "folds=2", "epochs=3", "test_split=", f"cache={tmp_path / 'cache'}", *DATA)
    run_cli("evaluate", "--model", model, "--split", "train", "--out", tmp_path / "e1", "tracking.enabled=false")
    run_cli("evaluate", "--model", model, "--split", "train", "--shards", tmp_path / "s2", "--out", tmp_path / "e2",
            "tracking.enabled=false")
    p1 = {r["name"]: r for r in csv.DictReader(open(tmp_path / "e1" / "probabilities.csv"))}
    p2 = {r["name"]: r for r in csv.DictReader(open(tmp_path / "e2" / "probabilities.csv"))}
    shared = set(p1) & set(p2)
    assert len(p2) == 8 and len(shared) == 8            # same names (sample_00000000 ...) ...
    assert all(p1[n] != p2[n] for n in shared)          # ... but the second corpus's answers
    # names with dots, spaces and non-ASCII come back in predictions.csv as they were (tar keys are encoded)
    src = sorted(r["name"] for r in csv.DictReader(open(corpus / "label-disdim.csv")))[:4]
    odd = ["ok.dot.name", "with space", "émotion_日本", "plain"]
    write_shards(ShardConfig(corpus=str(_mini_corpus(corpus, tmp_path / "c3", dict(zip(src, odd)))),
                             out=str(tmp_path / "s3"), workers=1))
    run_cli("evaluate", "--model", model, "--split", "train", "--shards", tmp_path / "s3", "--out", tmp_path / "e3",
            "tracking.enabled=false")
    got = [r["name"] for r in csv.DictReader(open(tmp_path / "e3" / "predictions.csv", encoding="utf-8"))]
    assert sorted(got) == sorted(odd)


@pytest.mark.slow
def test_a_pseudo_labelled_clip_another_stage_cannot_read_is_skipped_not_fatal(shards, capsys):
    """#22 item 9: a clip the split holds but this stage's stream skipped (truncated, no audio) is skipped with one
    line naming it; a name the split does not hold at all stays an error."""
    from mer_dist.features import index
    from mer_dist.train.pseudo import unreadable
    names = index(str(shards), "unlabeled")[0]
    skipped = unreadable("P", names[:3], set(names[1:]), str(shards), "unlabeled", "finetune")
    assert skipped == {names[0]}
    out = capsys.readouterr().out
    assert "finetune: 1 pseudo-labelled clip(s) of 'unlabeled' could not be read here: skipped" in out and names[0] in out
    assert unreadable("P", names[:3], set(names), str(shards), "unlabeled", "finetune") == set()
    with pytest.raises(ValueError, match="not in split 'unlabeled'.*no_such_clip"):
        unreadable("P", ["no_such_clip"], set(), str(shards), "unlabeled", "finetune")


_ON_MAIN_WORKER = '''
import os, sys, time
from mer_dist import dist
mode = sys.argv[1]
env = dist.setup()
t0 = time.time()


def work():
    time.sleep(float(os.environ["WORK_S"]))
    if mode == "fail":
        raise ValueError("rank 0: the work failed")
    return [env.rank, "done"]


try:
    if mode == "barrier":          # the control: rank 0 works while the others wait in a collective
        if env.is_main:
            work()
        dist.barrier()
        r = "barrier"
    else:
        r = dist.on_main(work)
    dist.barrier()
    print(f"rank {env.rank}: {r} after {time.time() - t0:.1f}s", flush=True)
except Exception as e:
    print(f"rank {env.rank}: {type(e).__name__}: {str(e).splitlines()[0][:160]} after {time.time() - t0:.1f}s", flush=True)
    sys.exit(3)
'''


@pytest.mark.slow
def test_rank0_work_outlasts_the_group_timeout_setting(tmp_path, shards):
    """#22 item 3: MER_DIST_TIMEOUT_S is the process group's timeout (README: Waits between ranks); work
    that only rank 0 does (`dist.on_main`: adapting the teacher, pretraining HuBERT, decoding a frame cache, writing
    a feature cache, converting a checkpoint) may last longer than it, because the other ranks wait outside any
    collective. Under the same setting a plain barrier times out (the control); a failure of rank 0's work reaches
    the other rank with its one line; a bad setting is one line and exit 2; a real adapt-audio on 2 ranks whose
    rank-0 training outlasts a 2 s timeout completes."""
    (tmp_path / "w.py").write_text(_ON_MAIN_WORKER)
    env = {**os.environ, "MER_DIST_TIMEOUT_S": "2", "WORK_S": "6", "PYTHONPATH": str(REPO)}

    def launch(mode):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={free_port()}", str(tmp_path / "w.py"), mode],
                              capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    ok = launch("ok")
    assert ok.returncode == 0, ok.stdout + ok.stderr[-2000:]
    assert "rank 1: [0, 'done']" in ok.stdout and "rank 0: [0, 'done']" in ok.stdout
    control = launch("barrier")
    assert control.returncode != 0 and "Timed out" in control.stdout + control.stderr
    fail = launch("fail")
    lines = [x for x in fail.stdout.splitlines() if x.startswith("rank ")]
    assert len(lines) == 2 and all("ValueError: rank 0: the work failed" in x for x in lines), fail.stdout
    assert all(float(x.rsplit("after ", 1)[1].rstrip("s")) < 15 for x in lines)      # promptly, not at a timeout
    bad = run_cli("evaluate", "--model", tmp_path / "none", env={"MER_DIST_TIMEOUT_S": "soon"}, check=False)
    assert bad.returncode == 2 and "MER_DIST_TIMEOUT_S" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    out = tmp_path / "teacher"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "-m", "mer_dist", "adapt-audio", "--shards", shards,
                        "--layers", "1,2", "--out", out, "epochs=3", "patience=3", *DATA],
                       capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    spec = json.loads((out / "teacher.json").read_text())
    assert spec["layers"] == [1, 2]
    assert spec["history"][-1]["seconds"] > 2 * 2    # rank 0's own work (no imports) outlasted the 2 s timeout
