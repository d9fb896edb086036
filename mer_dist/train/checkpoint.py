"""Atomic, resumable, signed DeepSpeed checkpoints.

Every rank writes its shards into `checkpoints/.tmp-stepN`; after a barrier rank 0 writes a manifest
(sha256 of every file, HMAC-signed with this run directory's key `<out>/.mer-dist-key`), renames the
directory to `stepN` and then replaces the `latest` file (temp + rename). A kill at any moment leaves
either the previous complete checkpoint or the new one as `latest`, never a torn one. A save that fails on
any rank (full disk, read-only directory) fails on every rank, with one line naming the path and cause.

Resuming on another number of ranks (16 GPUs today, 8 tomorrow): rank 0 converts the checkpoint with
DeepSpeed's universal-checkpoint tooling (`ds_to_universal`) into `<out>/checkpoints-universal/`, every rank
loads that (`checkpoint.load_universal`), and the run keeps its global batch (align adjusts accumulation),
step, LR schedule, samples seen and optimizer moments. The next save is an ordinary one on the new ranks.

DeepSpeed's `load_checkpoint` unpickles, so a checkpoint directory is *trusted input*: `load` refuses one
whose manifest this run directory did not sign (a downloaded or hand-edited checkpoint) unless the user
says `train.trust_checkpoint=true`. Our own per-rank RNG files hold tensors and numbers only.
(Checkpoints live on a filesystem shared by all nodes, as on any Slurm cluster.)
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch

from mer_dist import dist
from mer_dist.errors import CheckpointError
from mer_dist.io import write_text_atomic

MANIFEST = "mer-dist-manifest.json"


def latest_tag(ckdir: str | Path) -> str | None:
    f = Path(ckdir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (Path(ckdir) / tag).is_dir() else None


def _rng_state() -> dict:
    """Every RNG as tensors and plain numbers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": torch.tensor(internal, dtype=torch.int64), "python_meta": [version, gauss_next],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    kind, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, s["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, gauss_next = s["python_meta"]
    random.setstate((version, tuple(s["python"].tolist()), gauss_next))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _key(run_dir: Path) -> bytes:
    """This run directory's signing key (created by the first save; 0600)."""
    f = run_dir / ".mer-dist-key"
    if not f.is_file():
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return f.read_text().strip().encode()


def _digest(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[str(f.relative_to(folder))] = h.hexdigest()
    return out


def _sign(files: dict, world_size: int, key: bytes) -> str:
    return hmac.new(key, json.dumps([files, world_size], sort_keys=True).encode(), "sha256").hexdigest()


def save(engine, ckdir: str | Path, step: int, client_state: dict, keep: int, env: dist.DistEnv) -> Path:
    ckdir = Path(ckdir)
    tag, tmp = f"step{step:08d}", f".tmp-step{step:08d}"
    error = ""
    if env.is_main:
        try:
            ckdir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(ckdir / tmp, ignore_errors=True)
            (ckdir / tmp).mkdir()
        except OSError as e:
            error = f"{ckdir / tmp}: {e.strerror or e}"
    if dist.max_across_ranks(int(bool(error))):
        raise CheckpointError(f"checkpoint not written: {error or 'rank 0 could not create its directory'}; "
                              f"the previous checkpoint stays latest")
    try:
        engine.save_checkpoint(str(ckdir), tag=tmp, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), ckdir / tmp / f"rng-rank{env.rank:05d}.pt")
    except (OSError, RuntimeError) as e:
        cause = getattr(e, "strerror", None) or str(e).splitlines()[0]
        if shutil.disk_usage(ckdir).free < (1 << 20):      # torch reports a full disk as a zip-writer error
            cause = f"No space left on device ({cause})"
        error = f"{ckdir / tmp} (rank {env.rank}): {cause}"
    if dist.max_across_ranks(int(bool(error))):
        if env.is_main:
            shutil.rmtree(ckdir / tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint not written: {error or 'another rank failed to write its part'}; "
                              f"the previous checkpoint stays latest")
    if env.is_main:
        files = _digest(ckdir / tmp)
        manifest = {"step": step, "world_size": env.world_size, "global_batch": client_state.get("global_batch"),
                    "files": files,
                    "signature": _sign(files, env.world_size, _key(ckdir.parent))}
        (ckdir / tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if (ckdir / tag).exists():
            shutil.rmtree(ckdir / tag)
        os.replace(ckdir / tmp, ckdir / tag)
        write_text_atomic(ckdir / "latest", tag)
        done = sorted(p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ckdir / tag


def peek(ckdir: str | Path) -> dict:
    """What the latest checkpoint's manifest says of its run ({} when there is none): planning only, before
    the engine exists (world size, global batch); `load` verifies it."""
    tag = latest_tag(ckdir)
    mf = Path(ckdir) / str(tag) / MANIFEST
    return json.loads(mf.read_text()) if tag and mf.is_file() else {}


def verify(ckdir: str | Path, tag: str, trust: bool = False) -> dict:
    """The manifest of a checkpoint this run directory wrote, checked; CheckpointError (one line) otherwise."""
    folder = Path(ckdir) / tag
    mf = folder / MANIFEST
    if not mf.is_file():
        if trust:
            return {}
        raise CheckpointError(f"{folder}: no {MANIFEST}: not written by mer-dist (DeepSpeed checkpoints unpickle "
                              f"code: pass train.trust_checkpoint=true only for a checkpoint you trust)")
    manifest = json.loads(mf.read_text())
    if not trust:
        key_file = Path(ckdir).parent / ".mer-dist-key"
        ok = key_file.is_file() and hmac.compare_digest(
            manifest.get("signature", ""), _sign(manifest.get("files", {}), manifest.get("world_size"), _key(Path(ckdir).parent)))
        if not ok:
            raise CheckpointError(f"{folder}: signed by another run directory (or edited): refusing to unpickle it "
                                  f"(train.trust_checkpoint=true if you trust it)")
        if _digest(folder) != manifest["files"]:
            raise CheckpointError(f"{folder}: files differ from its manifest (changed after it was written)")
    return manifest


def load(engine, ckdir: str | Path, env: dist.DistEnv, trust: bool = False) -> dict | None:
    """Restore engine (model, optimizer, LR schedule) and this rank's RNG; returns client_state or None.
    A checkpoint of another world size goes through a universal checkpoint (the engine must have been built
    with `checkpoint.load_universal`: `peek` tells before)."""
    ckdir = Path(ckdir)
    tag = latest_tag(ckdir)
    if tag is None:
        return None
    error, written_by = "", 0
    if env.is_main:       # one rank checks (hashing is I/O); every rank learns the verdict
        try:
            written_by = int(verify(ckdir, tag, trust).get("world_size") or env.world_size)
            if written_by != env.world_size:
                _to_universal(ckdir / tag, _universal_dir(ckdir) / tag)
        except CheckpointError as e:
            error = str(e)
    dist.raise_if_any(error, CheckpointError)
    written_by = int(dist.all_gather_object(written_by)[0])
    source = _universal_dir(ckdir) if written_by != env.world_size else ckdir
    if written_by != env.world_size and not engine.load_universal_checkpoint():
        raise CheckpointError(f"{ckdir / tag}: written by {written_by} ranks, resuming on {env.world_size}: "
                              f"the engine must be built with checkpoint.load_universal")
    path, client = engine.load_checkpoint(str(source), tag=tag)
    if path is None:
        raise CheckpointError(f"{ckdir / tag}: DeepSpeed could not load this checkpoint")
    rng = ckdir / tag / f"rng-rank{env.rank:05d}.pt"
    if rng.is_file() and written_by == env.world_size:     # another world size: ranks are other processes
        _set_rng_state(torch.load(rng, weights_only=True))
    dist.barrier()
    if source != ckdir and env.is_main:
        shutil.rmtree(source, ignore_errors=True)
    return {**(client or {}), "tag": tag, "resharded_from": written_by if written_by != env.world_size else 0}


def _universal_dir(ckdir: Path) -> Path:
    return ckdir.parent / "checkpoints-universal"


def _to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's ds_to_universal on one verified checkpoint (ZeRO 1-3): every parameter and its optimizer
    moments consolidated, to be sliced again for any number of ranks."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(dst.parent, ignore_errors=True)
    dst.parent.mkdir(parents=True)
    args = argparse.Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 - DeepSpeed's tool raises anything; one line, every rank
        raise CheckpointError(f"{src}: conversion to a universal checkpoint failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
