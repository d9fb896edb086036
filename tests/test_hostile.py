"""#32: files from elsewhere are data. Shard names stay file names, ranks take one decision on a shared feature
cache, a checkpoint's signature binds where it lives, outputs are written whole and shareable."""
from __future__ import annotations

import json
import os

import pytest

from mer_dist.data.ingest import shard_urls
from mer_dist.errors import DataError


def test_a_shard_name_never_becomes_a_command_or_url(tmp_path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    evil = "pipe:id>PWNED.txt"
    (d / evil).write_bytes(b"")
    (d / "train-000000.tar").write_bytes(b"")
    man = {"splits": {"train": {"shards": [{"name": "train-000000.tar", "samples": 1}], "samples": 1},
                      "unlabeled": {"shards": [{"name": evil, "samples": 1}], "samples": 1},
                      "test": {"shards": [{"name": "http:x", "samples": 1}], "samples": 1}}}
    (d / "manifest.json").write_text(json.dumps(man))
    monkeypatch.chdir(d)
    for shards in (".", ""):             # `--shards .` and the empty default both resolve against the cwd
        assert shard_urls(shards, "train") == [str(d.resolve() / "train-000000.tar")]
        for split in ("unlabeled", "test"):
            with pytest.raises(DataError, match="looks like a URL scheme"):
                shard_urls(shards, split)
    assert not (d / "PWNED.txt").exists()


@pytest.mark.slow
def test_probe_layers_on_a_pipe_shard_refuses_it(tmp_path):
    from conftest import run_cli
    d = tmp_path / "d"
    d.mkdir()
    evil = "pipe:id>PWNED.txt"
    (d / evil).write_bytes(b"")
    (d / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": [{"name": evil, "samples": 1}],
                                                                      "samples": 1}}}))
    p = run_cli("probe-layers", "--shards", ".", "--model", "tiny:hubert", "--out", tmp_path / "x", cwd=d,
                check=False)
    assert p.returncode == 2 and "looks like a URL scheme" in p.stderr.strip().splitlines()[-1]
    assert not (d / "PWNED.txt").exists() and not os.path.exists(tmp_path / "PWNED.txt")


def _extract_rank(rank: int, port: int, shards: str, full: str, cache: str, out: str) -> None:
    """One of two gloo ranks of `features.extract`; rank 1's cache read is made to land after rank 0's and after a
    concurrent sweep saved a complete cache (`full`) into the shared cache directory."""
    import shutil
    import time
    from dataclasses import asdict
    from datetime import timedelta

    import numpy as np
    import torch.distributed as tdist

    from mer_dist import features
    from mer_dist.config import DataConfig, VisualConfig
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    read, flag = features.Cache._read, os.path.join(out, "rank0-read")

    def racing_read(self):
        if rank == 0:
            got = read(self)
            open(flag, "w").close()
            return got
        t0 = time.monotonic()
        while not os.path.exists(flag) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        if not self.path.exists():           # another sweep's save lands between the two ranks' reads
            shutil.copy(os.path.join(full, self.path.name), self.path)
        return read(self)
    features.Cache._read = racing_read
    enc = features.Encoders({"v": {"encoder": "random", "seed": 0, "visual_model": asdict(VisualConfig())}}, 16)
    data = DataConfig(shards=shards, frames=2, height=16, width=16, batch_size=4, workers=0)
    names, _, feats, present = features.extract(enc, ["v"], shards, "test", data, cache, rank, 2)
    np.savez(os.path.join(out, f"rank{rank}.npz"), names=np.asarray(names), v=feats["v"], present=present)
    tdist.destroy_process_group()


@pytest.mark.slow
def test_ranks_take_one_decision_on_a_cache_that_changes_between_their_reads(shards, tmp_path):
    from dataclasses import asdict

    import numpy as np
    import torch.multiprocessing as mp

    from mer_dist import features
    from mer_dist.config import DataConfig, VisualConfig
    from mer_dist.dist import free_port
    enc = features.Encoders({"v": {"encoder": "random", "seed": 0, "visual_model": asdict(VisualConfig())}}, 16)
    data = DataConfig(shards=str(shards), frames=2, height=16, width=16, batch_size=4, workers=0)
    full, cache = tmp_path / "full", tmp_path / "cache"
    cache.mkdir()
    names, _, want, _ = features.extract(enc, ["v"], str(shards), "test", data, full)
    mp.spawn(_extract_rank, args=(free_port(), str(shards), str(full), str(cache), str(tmp_path)), nprocs=2,
             join=True)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    assert r0["names"].tolist() == r1["names"].tolist() == names
    assert r0["present"].all() and r1["present"].all()
    np.testing.assert_allclose(r0["v"], want["v"], atol=1e-5)
    np.testing.assert_allclose(r1["v"], want["v"], atol=1e-5)


class _Engine:
    """The one call checkpoint.save makes of a DeepSpeed engine."""

    def save_checkpoint(self, d, tag, client_state, save_latest):
        import torch
        torch.save({"step": client_state["step"]}, f"{d}/{tag}/mp_rank_00_model_states.pt")


def test_a_checkpoint_signature_binds_its_step_and_its_run(tmp_path):
    import shutil

    from mer_dist.dist import DistEnv
    from mer_dist.errors import CheckpointError
    from mer_dist.train import checkpoint
    from mer_dist.train.zero import fp32_state
    a, b = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints"
    for ck in (a, b):
        for step in (1, 2):
            checkpoint.save(_Engine(), ck, step, {"step": step}, keep=0, env=DistEnv())
    assert checkpoint.run_id(a) != checkpoint.run_id(b) != ""
    checkpoint.verify(a, "step00000002")
    shutil.copytree(a / "step00000002", a / "step00000099")          # another step's name
    with pytest.raises(CheckpointError, match="for this run and step"):
        checkpoint.verify(a, "step00000099")
    shutil.copytree(a / "step00000001", b / "step00000003")          # another run's checkpoint, same tag rule
    shutil.rmtree(b / "step00000001")
    shutil.copytree(a / "step00000001", b / "step00000001")
    with pytest.raises(CheckpointError, match="for this run and step"):
        checkpoint.verify(b, "step00000001")
    (b / "latest").write_text("../../a/checkpoints/step00000002")    # `latest` must name a direct child
    assert checkpoint.latest_tag(b) is None
    assert checkpoint._choose(b, False)[0] == "step00000002"          # b's own newest verifying one
    with pytest.raises(CheckpointError, match="not a checkpoint of this run"):
        checkpoint.verify(b, "../../a/checkpoints/step00000002")
    secret = tmp_path / "secret.pt"
    secret.write_bytes(b"x")
    (a / "step00000002" / "mp_rank_00_model_states.pt").unlink()
    (a / "step00000002" / "mp_rank_00_model_states.pt").symlink_to(secret)
    with pytest.raises(CheckpointError, match="symlink inside a checkpoint"):
        checkpoint.verify(a, "step00000002")
    with pytest.raises(CheckpointError):                              # the guard's export verifies first too
        fp32_state(a, "step00000099", "encoder.")


def test_outputs_are_whole_shareable_files_and_names_never_formulas(tmp_path):
    import stat

    from mer_dist.io import atomic_target, sheet_safe, write_csv_atomic
    old = os.umask(0o022)
    try:
        import importlib

        import mer_dist.io as mio
        importlib.reload(mio)                    # the umask is read at import
        with mio.atomic_target(tmp_path / "m.json") as t:
            t.write_text("{}")
        assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
        with mio.atomic_target(tmp_path / "model.pt", durable=True) as t:
            t.write_bytes(b"w")
        assert stat.S_IMODE((tmp_path / "model.pt").stat().st_mode) == 0o644
    finally:
        os.umask(old)
        importlib.reload(mio)
    with pytest.raises(RuntimeError), atomic_target(tmp_path / "x.csv") as t:
        t.write_text("half")
        raise RuntimeError
    assert sorted(os.listdir(tmp_path)) == ["m.json", "model.pt"]          # a failed write leaves nothing
    assert [sheet_safe(n) for n in ('=HYPERLINK("http:x","y")', "+1", "-2", "@a", "\tx", "clip_01")] == \
        ["'=HYPERLINK(\"http:x\",\"y\")", "'+1", "'-2", "'@a", "'\tx", "clip_01"]
    write_csv_atomic(tmp_path / "p.csv", ["name"], [[sheet_safe("=1+1")]])
    assert (tmp_path / "p.csv").read_text().splitlines() == ["name", "'=1+1"]


def test_every_stage_that_writes_a_directory_takes_its_lock(tmp_path):
    import subprocess
    import sys

    from mer_dist import config as C
    from mer_dist.errors import LockError
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mer_dist.io import OutputLock; "
                               f"lock = OutputLock({str(tmp_path)!r}); lock.acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for name in ("finetune", "evaluate", "probe-layers", "pseudo-label", "self-train", "ablate", "demo"):
            cfg = C.STAGES[name].config(out=str(tmp_path))
            with pytest.raises(LockError, match="another run is writing here"):
                C.STAGES[name].function()(cfg)         # refused before it reads or writes anything
        assert not C.STAGES["align"].locks_out and not C.STAGES["predict"].locks_out   # their own rules
    finally:
        holder.kill()
        holder.wait()


def test_a_run_refused_before_it_writes_leaves_no_directory(tmp_path):
    from mer_dist.io import one_writer
    with pytest.raises(ValueError), one_writer(tmp_path / "new"):
        raise ValueError("refused at load")
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError), one_writer(tmp_path / "kept"):
        (tmp_path / "kept" / "log.txt").write_text("it wrote")    # a run that wrote something keeps its directory
        raise ValueError("failed later")
    assert (tmp_path / "kept" / "log.txt").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(ValueError), one_writer(tmp_path / "old"):
        raise ValueError("refused")
    assert (tmp_path / "old").is_dir()                            # a directory the user made stays


_STARTS: list[tuple[float, float]] = []


def _record_start(cfg) -> None:
    """A stand-in stage: what its MLflow run would take as its start time, and when it really started."""
    import time

    from mer_dist import tracking
    _STARTS.append((tracking.STAGE_START, time.time()))
    time.sleep(1.2)


def test_each_in_process_stage_starts_its_run_when_it_starts():
    """#34 item 1: in the demo every in-process stage's MLflow run started at the demo's start."""
    from mer_dist import config as C
    from mer_dist import tracking
    parent = tracking.STAGE_START
    stage = C.Stage(C.EvaluateConfig, "test_hostile:_record_start", "evaluate", {}, locks_out=False)
    for _ in range(2):                         # a demo-like parent running two stages in-process, one after another
        stage.function()(C.EvaluateConfig())
    (s1, t1), (s2, t2) = _STARTS
    assert abs(s1 - t1) < 1 and abs(s2 - t2) < 1 and s2 - s1 >= 1.2
    assert tracking.STAGE_START == parent      # the parent's own run keeps its start


def test_free_ports_stay_out_of_the_ephemeral_range_and_never_repeat():
    """#34 item 5: a port from bind(0) sits in the range outgoing connections draw from, so another process could
    take it before the child binds it; ours come from below that range, free at the time, each one once."""
    import socket

    from mer_dist.dist import free_port
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    held = []
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(10000 <= p < min(20000, low) for p in ports)
    for p in ports[:5]:                         # each was free: a child can bind it
        s = socket.socket()
        s.bind(("127.0.0.1", p))
        held.append(s)
    for s in held:
        s.close()
