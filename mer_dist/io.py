"""Small file helpers every stage shares: atomic writes and the one-writer lock of an output directory."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path

from mer_dist.errors import LockError, ModelError


@contextlib.contextmanager
def atomic_target(path: str | Path, suffix: str = ".tmp"):
    """A fresh temp file beside `path` (unpredictable name, created exclusively, 0600), renamed onto `path` when
    the block succeeds and removed when it fails: a reader sees the old file or the new one, never half of one,
    and two writers of the same file (a seed sweep sharing a cache) never write into one temp file.
    `suffix`: what numpy insists a name ends with (".npy", ".npz")."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False))


def load_tensors(path: str | Path, what: str = ""):
    """A file of tensors and plain values (`torch.load(weights_only=True)`): a model file from elsewhere is data,
    never code; one that needs unpickling anything else is refused with one line (ModelError)."""
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - refusals of pickled code come in several exception types
        raise ModelError(f"{what}{path}: not a plain tensor file, refusing to load it "
                         f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})") from None


class OutputLock:
    """An exclusive advisory lock on `<out>/.lock`, held for the life of the process (the kernel drops it when
    the process dies, so a killed or requeued job never leaves a stale lock behind). A second writer gets a
    one-line error naming the holder."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / ".lock"
        self._fh = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:   # never through a symlink (`ln -s ~/.bashrc RUN/.lock` must not truncate ~/.bashrc)
            fh = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        except OSError as e:
            raise LockError(f"{self.path}: cannot open the run's lock file ({e.strerror}; a symlink is refused)") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise LockError(f"{self.path.parent}: another run is writing here ({holder}); "
                            f"use another output directory or wait for it to finish") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
