"""Atomic, resumable, signed DeepSpeed checkpoints.

Every rank writes its shards into `checkpoints/.tmp-stepN`; after a barrier rank 0 writes a manifest
(sha256 of every file, HMAC-signed with the user's key, `key_file()`), renames the directory to `stepN` and
then replaces the `latest` file (temp + rename). A kill at any moment leaves either the previous complete
checkpoint or the new one as `latest`, never a torn one. A save that fails on any rank (full disk, read-only
directory, anything rank 0 alone does) fails on every rank, with one line naming the path and cause.
Resuming takes `latest` if it verifies, else the newest checkpoint that does (saying why `latest` was passed
over), removes the `.tmp-stepN` left by killed saves, and rotation keeps the newest by step number.

Resuming on another number of ranks (16 GPUs today, 8 tomorrow): rank 0 converts the checkpoint with
DeepSpeed's universal-checkpoint tooling (`ds_to_universal`) into `<out>/checkpoints-universal/`, every rank
loads that (`checkpoint.load_universal`), and the run keeps its global batch (align adjusts accumulation),
step, LR schedule, samples seen and optimizer moments. The next save is an ordinary one on the new ranks.

DeepSpeed's `load_checkpoint` unpickles, so a checkpoint directory is *trusted input*: `load` refuses one
that the user's own key did not sign (a run directory copied from a colleague, a shared drive or an archive,
or a hand-edited checkpoint) unless the user says `train.trust_checkpoint=true`. The key lives outside every
run directory, so a received directory brings no key that verifies it. Our per-rank RNG files hold tensors
and numbers only.
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
import stat
import tempfile
from pathlib import Path

import numpy as np
import torch

from mer_dist import dist
from mer_dist.errors import CheckpointError
from mer_dist.io import fsync_dir, load_tensors, write_json_atomic, write_text_atomic

MANIFEST = "mer-dist-manifest.json"


RUN_ID = "run-id"


def tag(step: int) -> str:
    """The name of step `step`'s checkpoint directory."""
    return f"step{step:08d}"


def _plain_tag(name: str) -> bool:
    """A checkpoint tag is a direct child's name, `stepN`: never a path (`../../other/checkpoints/step...`)."""
    return Path(name).name == name and _step(Path(name)) >= 0


def latest_tag(ckdir: str | Path) -> str | None:
    f = Path(ckdir) / "latest"
    if not f.is_file():
        return None
    t = f.read_text().strip()
    return t if _plain_tag(t) and (Path(ckdir) / t).is_dir() else None


def run_id(ckdir: str | Path, create: bool = False) -> str:
    """The id of the run a checkpoint directory belongs to, written once when its first checkpoint is saved: a
    signature binds it, so a signed checkpoint copied into another run does not verify there ("" = none yet)."""
    f = Path(ckdir) / RUN_ID
    if create and not f.is_file():
        write_text_atomic(f, secrets.token_hex(16))
    return f.read_text().strip() if f.is_file() and not f.is_symlink() else ""


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


def key_file() -> Path:
    """The user's signing key: `$MER_DIST_KEY_FILE`, else `$XDG_CONFIG_HOME/mer-dist/checkpoint-key` (default
    `~/.config/...`): one per user, outside every run directory, shared by a job's nodes through the home
    directory (only rank 0 signs and verifies)."""
    if os.environ.get("MER_DIST_KEY_FILE"):
        return Path(os.environ["MER_DIST_KEY_FILE"])
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mer-dist" / "checkpoint-key"


def _key() -> bytes:
    """The key's bytes, created (0600, atomically: temp file + link) on first use. A key that is a symlink, not
    a regular file, owned by someone else or readable by others is refused with one line."""
    f = key_file()
    if not os.path.lexists(f):
        f.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=".checkpoint-key-")      # 0600
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, f)               # fails if another process made it first: theirs is the key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    st = os.lstat(f)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{f}: the checkpoint signing key is a symlink or not a regular file: refusing it")
    if st.st_uid != os.getuid():
        raise CheckpointError(f"{f}: the checkpoint signing key belongs to uid {st.st_uid}, not to you: refusing it")
    if st.st_mode & 0o077:
        raise CheckpointError(f"{f}: the checkpoint signing key is readable by others (mode {st.st_mode & 0o777:o}): "
                              f"chmod 600 it")
    fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as fh:
        key = fh.read().strip()
    if len(key) < 32:
        raise CheckpointError(f"{f}: the checkpoint signing key is empty or too short (delete it to make a new one; "
                              f"checkpoints it signed then need train.trust_checkpoint=true)")
    return key.encode()


def _step(path: Path) -> int:
    """The step number of a checkpoint directory name (`stepN`, `.tmp-stepN`), -1 for anything else."""
    digits = path.name.rsplit("step", 1)[-1]
    return int(digits) if path.name.rsplit("step", 1)[0] in ("", ".tmp-") and digits.isdigit() else -1


def _digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint; a symlink anywhere inside it is refused (it would be signed, and
    loaded, as whatever it points to)."""
    out = {}
    for p in folder.rglob("*"):
        if p.is_symlink():
            raise CheckpointError(f"{p}: a symlink inside a checkpoint: refusing it")
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[str(f.relative_to(folder))] = h.hexdigest()
    return out


def _sign(files: dict, world_size: int, tag_: str, run: str, key: bytes) -> str:
    """The HMAC of what a checkpoint is: its files, world size, its tag and the run it belongs to."""
    return hmac.new(key, json.dumps([files, world_size, tag_, run], sort_keys=True).encode(), "sha256").hexdigest()


def save(engine, ckdir: str | Path, step: int, client_state: dict, keep: int, env: dist.DistEnv,
         protect: str = "") -> Path:
    """Write `step`'s checkpoint atomically, point `latest` at it and keep the newest `keep` (and `protect`,
    the tag the alignment guard will export)."""
    ckdir = Path(ckdir)
    name, tmp = tag(step), f".tmp-{tag(step)}"
    error = ""
    if env.is_main:
        try:
            ckdir.mkdir(parents=True, exist_ok=True)
            run_id(ckdir, create=True)
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
    if env.is_main:       # rank 0 alone finishes the save; whatever goes wrong here reaches every rank
        try:
            _publish(ckdir, tmp, name, step, client_state, keep, env.world_size, protect)
        except Exception as e:  # noqa: BLE001 - any failure (OSError, a bad key, ...) must end every rank
            error = f"{ckdir / tmp}: {getattr(e, 'strerror', None) or (str(e).splitlines() or [type(e).__name__])[0]}"
    dist.raise_if_any(f"checkpoint not written: {error}; the previous checkpoint stays latest" if error else "",
                      CheckpointError)
    return ckdir / name


def _publish(ckdir: Path, tmp: str, name: str, step: int, client_state: dict, keep: int, world_size: int,
             protect: str = "") -> None:
    """Sign the written checkpoint, rename it into place, point `latest` at it, rotate. Checkpoints of later steps
    than this one are left from a run that fell back past them (a damaged `latest`): they go first."""
    files = _digest(ckdir / tmp)
    manifest = {"step": step, "world_size": world_size, "global_batch": client_state.get("global_batch"),
                "files": files, "signature": _sign(files, world_size, name, run_id(ckdir), _key())}
    write_text_atomic(ckdir / tmp / MANIFEST, json.dumps(manifest, indent=1))
    _fsync_tree(ckdir / tmp)
    if (ckdir / name).exists():
        shutil.rmtree(ckdir / name)
    os.replace(ckdir / tmp, ckdir / name)
    fsync_dir(ckdir)
    write_text_atomic(ckdir / "latest", name)
    done = sorted((p for p in ckdir.iterdir() if p.is_dir() and not p.name.startswith(".") and _step(p) >= 0),
                  key=_step)
    stale = [p for p in done if _step(p) > step]
    kept = [p for p in done if _step(p) <= step]
    for old in stale + [p for p in (kept[:-keep] if keep > 0 else []) if p.name != protect]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Every file DeepSpeed wrote, on disk before the rename publishes the checkpoint (a crash after the rename
    must not leave a signed checkpoint of empty files)."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def peek(ckdir: str | Path) -> dict:
    """What the newest readable manifest says of its run ({} when there is none): planning only, before the
    engine exists (world size, global batch); `load` verifies."""
    for tag in _candidates(Path(ckdir)):
        try:
            return json.loads((Path(ckdir) / tag / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
    return {}


def _candidates(ckdir: Path) -> list[str]:
    """Checkpoints to resume from, best first: the one `latest` names, then the others, newest step first."""
    latest = (ckdir / "latest").read_text().strip() if (ckdir / "latest").is_file() else ""
    latest = latest if _plain_tag(latest) else ""          # a path in `latest` is never followed
    others = sorted((p.name for p in ckdir.iterdir() if p.is_dir() and not p.name.startswith(".") and _step(p) >= 0),
                    key=lambda n: _step(Path(n)), reverse=True) if ckdir.is_dir() else []
    return ([latest] if latest else []) + [t for t in others if t != latest]


def verify(ckdir: str | Path, tag: str, trust: bool = False) -> dict:
    """The manifest of a checkpoint the user's key signed, checked; CheckpointError (one line) otherwise, whatever
    is wrong with it (a missing directory, an unreadable or edited manifest, changed files)."""
    folder = Path(ckdir) / tag
    mf = folder / MANIFEST
    if not _plain_tag(tag):
        raise CheckpointError(f"{folder}: {tag!r} is not a checkpoint of this run (expected stepNNNNNNNN)")
    if not folder.is_dir() or folder.is_symlink():
        raise CheckpointError(f"{folder}: missing")
    if not mf.is_file():
        if trust:
            return {}
        raise CheckpointError(f"{folder}: no {MANIFEST}: not written by mer-dist (DeepSpeed checkpoints unpickle "
                              f"code: pass train.trust_checkpoint=true only for a checkpoint you trust)")
    try:
        manifest = json.loads(mf.read_text())
        files, world, signature = manifest["files"], manifest.get("world_size"), str(manifest.get("signature", ""))
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{mf}: damaged manifest ({type(e).__name__}: {str(e)[:80]})") from None
    if not trust:
        expected = _sign(files, world, tag, run_id(ckdir), _key())
        if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected.encode()):
            raise CheckpointError(f"{folder}: not signed by your key {key_file()} for this run and step (a run "
                                  f"directory from elsewhere, a checkpoint copied from another run or step, or edited):"
                                  f" refusing to unpickle it (train.trust_checkpoint=true if you trust it)")
        if _digest(folder) != files:
            raise CheckpointError(f"{folder}: damaged: files differ from its manifest (changed after it was written)")
    return manifest


def _choose(ckdir: Path, trust: bool) -> tuple[str | None, dict, str]:
    """(tag to resume from, its manifest, why `latest` was passed over): the first candidate that verifies. No
    checkpoint at all -> (None, {}, ""); some, none verifying -> the best one's error (nothing restarts from zero
    over a run's history without being told)."""
    for leftover in ckdir.glob(".tmp-step*") if ckdir.is_dir() else []:      # saves killed before their rename
        shutil.rmtree(leftover, ignore_errors=True)
    candidates = _candidates(ckdir)
    first_error = ""
    for i, tag in enumerate(candidates):
        try:
            manifest = verify(ckdir, tag, trust)
        except CheckpointError as e:
            first_error = first_error or str(e)
            continue
        why = "" if i == 0 else f"latest {candidates[0]} is " + ("missing" if not (ckdir / candidates[0]).is_dir()
                                                                  else "damaged")
        return tag, manifest, why
    if candidates:
        raise CheckpointError(f"{first_error}; no checkpoint in {ckdir} verifies (remove the directory to start over)")
    return None, {}, ""


def load(engine, ckdir: str | Path, env: dist.DistEnv, trust: bool = False) -> dict | None:
    """Restore engine (model, optimizer, LR schedule) and this rank's RNG; returns client_state or None.
    A checkpoint of another world size goes through a universal checkpoint (the engine must have been built
    with `checkpoint.load_universal`: `peek` tells before)."""
    ckdir = Path(ckdir)

    def choose() -> list:
        """Rank 0 verifies (hashing is I/O) and converts to another world size (minutes at real size); every rank
        learns the verdict, whatever it is, without waiting in a collective."""
        try:
            tag, manifest, why = _choose(ckdir, trust)
            written_by = int(manifest.get("world_size") or env.world_size)
            if tag is not None and written_by != env.world_size:
                _to_universal(ckdir / tag, _universal_dir(ckdir) / tag)
            return [tag, written_by, why]
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - an unexpected error on rank 0 is one line on every rank
            raise CheckpointError(f"{ckdir}: cannot resume ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None

    tag, written_by, why = dist.on_main(choose, CheckpointError)
    if tag is None:
        return None
    source = _universal_dir(ckdir) if written_by != env.world_size else ckdir
    if written_by != env.world_size and not engine.load_universal_checkpoint():
        raise CheckpointError(f"{ckdir / tag}: written by {written_by} ranks, resuming on {env.world_size}: "
                              f"the engine must be built with checkpoint.load_universal")
    path, client = engine.load_checkpoint(str(source), tag=tag)
    if path is None:
        raise CheckpointError(f"{ckdir / tag}: DeepSpeed could not load this checkpoint")
    rng = ckdir / tag / f"rng-rank{env.rank:05d}.pt"
    if rng.is_file() and written_by == env.world_size:     # another world size: ranks are other processes
        _set_rng_state(load_tensors(rng, "checkpoint RNG state "))     # tensors and numbers only, never code
    dist.barrier()
    if source != ckdir and env.is_main:
        shutil.rmtree(source, ignore_errors=True)
    return {**(client or {}), "tag": tag, "resharded_from": written_by if written_by != env.world_size else 0,
            "passed_over": why}


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


def write_summary(out: Path, summary: dict) -> None:
    """`<run>/summary.json`: how an align run ended (step, exit code, skipped samples, memory, the guard's choice)."""
    write_json_atomic(out / "summary.json", summary)


def read_summary(out: str | Path) -> dict:
    f = Path(out) / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else {}
