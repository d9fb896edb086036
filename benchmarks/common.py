"""Shared set-up for the benchmark scripts: a cached synthetic corpus + shards + teacher."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("MER_BENCH_DIR", "/tmp/mer-dist-bench"))
REPO = Path(__file__).resolve().parents[1]


def setup(quick: bool, size: int = 64, unlabeled: int = 0) -> dict:
    """Corpus (size x size @ 10 fps, ~2 s clips), shards and a teacher, built once per (mode, size, count) and
    reused; `unlabeled` = 0 keeps the mode's default count (96 quick, 1000 full)."""
    from mer_dist.config import ShardConfig, SynthConfig
    from mer_dist.data.ingest import write_shards
    from mer_dist.data.synth import generate
    n = (48 if quick else 96, unlabeled or (96 if quick else 1000), 0)
    base = ROOT / (("quick" if quick else "full") + (f"-{size}px-{n[1]}" if (size, unlabeled) != (64, 0) else ""))
    if not (base / "shards" / "manifest.json").is_file():
        generate(SynthConfig(out=str(base / "corpus"), num_labeled=n[0], num_unlabeled=n[1], num_test=n[2],
                             height=size, width=size, workers=min(8, os.cpu_count() or 2)))
        write_shards(ShardConfig(corpus=str(base / "corpus"), out=str(base / "shards"), shard_mb=4.0))
    if not (base / "teacher" / "teacher.json").is_file():
        run([sys.executable, "-m", "mer_dist", "adapt-audio", "--shards", str(base / "shards"),
             "--layers", "3,4", "--out", str(base / "teacher"), "epochs=1", "tracking.enabled=false"])
    return {"base": base, "corpus": base / "corpus", "shards": base / "shards", "teacher": base / "teacher"}


def run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """A benchmark's subprocess; when it fails, its last lines are shown (not swallowed) and the run stops."""
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).splitlines()[-40:])
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} ... failed ({p.returncode}):\n{tail}")
    return p


def fresh(base: Path, name: str) -> Path:
    """A new, empty output directory for one measurement: a rerun never resumes an earlier run's checkpoints."""
    import tempfile
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = fn(*args, **kwargs)
    return time.perf_counter() - t0, r


def report(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n## {title}")
    for k, v in rows:
        print(f"  {k:<48} {v}")
