"""Atomic, resumable DeepSpeed checkpoints.

Every rank writes its shards into `checkpoints/.tmp-stepN`; after a barrier rank 0 renames the
directory to `stepN` and then replaces the `latest` file (temp + rename). A kill at any moment
leaves either the previous complete checkpoint or the new one as `latest`, never a torn one.
(Checkpoints live on a filesystem shared by all nodes, as on any Slurm cluster.)
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mer_dist.train import dist


def latest_tag(ckdir: str | Path) -> str | None:
    f = Path(ckdir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (Path(ckdir) / tag).is_dir() else None


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(engine, ckdir: str | Path, step: int, client_state: dict, keep: int, env: dist.DistEnv) -> Path:
    ckdir = Path(ckdir)
    tag, tmp = f"step{step:08d}", f".tmp-step{step:08d}"
    if env.is_main:
        ckdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckdir / tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(ckdir), tag=tmp, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), ckdir / tmp / f"rng-rank{env.rank:05d}.pt")
    dist.barrier()
    if env.is_main:
        if (ckdir / tag).exists():
            shutil.rmtree(ckdir / tag)
        os.replace(ckdir / tmp, ckdir / tag)
        _atomic_write(ckdir / "latest", tag)
        done = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ckdir / tag


def load(engine, ckdir: str | Path, env: dist.DistEnv) -> dict | None:
    """Restore engine (model, optimizer, LR schedule) and this rank's RNG; returns client_state or None."""
    tag = latest_tag(ckdir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(ckdir), tag=tag)
    if path is None:
        raise RuntimeError(f"{Path(ckdir) / tag}: DeepSpeed could not load this checkpoint")
    rng = Path(ckdir) / tag / f"rng-rank{env.rank:05d}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return {**(client or {}), "tag": tag}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
