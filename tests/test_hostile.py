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
