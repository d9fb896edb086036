"""Small file helpers every stage shares: atomic writes and the one-writer lock of an output directory."""
from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path

from mer_dist.errors import LockError, ModelError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()          # read once at import, on the importing thread (os.umask sets as it reads)


def fsync_dir(folder: str | Path) -> None:
    """A directory's entries (a rename into it) on disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_target(path: str | Path, suffix: str = ".tmp", durable: bool = False):
    """A fresh temp file beside `path` (unpredictable name, created exclusively), renamed onto `path` when the
    block succeeds and removed when it fails: a reader sees the old file or the new one, never half of one, and
    two writers of the same file (a seed sweep sharing a cache) never write into one temp file. The result has
    the mode a plain `open` would give (0666 less the umask: colleagues read a shared run directory).
    `durable`: fsync the file and its directory around the rename (checkpoints, models: a crash loses nothing).
    `suffix`: what numpy insists a name ends with (".npy", ".npz")."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text)


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def sheet_safe(cell: str) -> str:
    """A text cell a spreadsheet will not run: one starting like a formula (= + - @, tab, CR) gets a leading
    apostrophe (OWASP's CSV-injection advice). Names from elsewhere pass through this; numbers never do."""
    return "'" + cell if cell.startswith(_FORMULA) else cell


def write_csv_atomic(path: str | Path, header: list[str], rows) -> None:
    """A CSV written whole (temp + rename)."""
    with atomic_target(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


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


_HELD: dict[str, list] = {}          # output directory (resolved) -> [its lock, how many holders in this process]


@contextlib.contextmanager
def one_writer(out: str | Path):
    """The calling process is the one writer of `out` for the block: `OutputLock`, taken by rank 0 of a multi-rank
    job (the writer) and re-entrant within a process (a stage that runs another stage on its own directory)."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    if not out or rank != "0":
        yield
        return
    key = os.path.realpath(out)
    created = not os.path.exists(key)
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        lock = OutputLock(out)
        lock.acquire()
        _HELD[key] = [lock, 1]
    try:
        yield
    except BaseException:
        # a run refused before it wrote anything leaves no directory behind (it would look like a run)
        if created and _HELD[key][1] == 1 and os.listdir(key) == [".lock"]:
            os.unlink(os.path.join(key, ".lock"))
            os.rmdir(key)
        raise
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            _HELD.pop(key)[0].release()
