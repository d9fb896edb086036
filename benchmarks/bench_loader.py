"""#2 loader: samples/s of the full training stream with W workers vs W x the 1-core decode rate.
#7 memory: RSS of a loader worker while streaming clips (growth after warm-up)."""
from __future__ import annotations

import argparse
import os
import time

import psutil
import torch
from common import report, setup


def run(quick: bool, workers: int = 2) -> dict:
    torch.set_num_threads(1)
    env = setup(quick)
    from mer_dist.config import DataConfig
    from mer_dist.data.decode import decode
    from mer_dist.data.ingest import shard_urls
    from mer_dist.data.stream import train_loader
    clips = sorted((env["corpus"] / "video-unlabeled").glob("*.mp4"))[:30]
    data = [c.read_bytes() for c in clips]
    t0 = time.perf_counter()
    for d in data:
        decode(d, 8, 64, 64, threads=1)
    one_core = len(data) / (time.perf_counter() - t0)
    cfg = DataConfig(frames=8, height=64, width=64, batch_size=8, workers=workers, decode_threads=1, shuffle_buffer=64)
    total = 200 if quick else 1000
    it = iter(train_loader(shard_urls(env["shards"], "unlabeled"), cfg, seed=0))
    next(it)                                                  # workers up, buffers primed
    rss, n, t0 = [], 0, time.perf_counter()
    me = psutil.Process()
    while n < total:
        b = next(it)
        n += len(b["name"])
        if n % 80 == 0 or n >= total:
            rss.append(max(c.memory_info().rss for c in me.children(recursive=True)) / 2**20)
    rate = n / (time.perf_counter() - t0)
    del it
    warm = rss[len(rss) // 4] if rss else 0.0
    res = {"loader_samples_per_s": rate, "loader_vs_linear": rate / (workers * one_core),
           "worker_rss_mb_warm": warm, "worker_rss_mb_end": rss[-1], "worker_rss_growth_mb": rss[-1] - warm}
    report(f"#2 loader ({workers} workers, batch 8, F=8 at 64x64)", [
        ("1-core decode rate", f"{one_core:.1f} clips/s"), ("training stream", f"{rate:.1f} samples/s"),
        (f"ratio vs {workers} x 1-core (target >= 0.9)", f"{rate / (workers * one_core):.2f}x"),
        ("cores on this machine", str(len(os.sched_getaffinity(0))))])
    report(f"#7 loader worker RSS while streaming {n} clips", [
        ("after warm-up", f"{warm:.0f} MiB"), ("at the end", f"{rss[-1]:.0f} MiB"),
        ("growth (target: flat)", f"{rss[-1] - warm:+.1f} MiB")])
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    run(ap.parse_args().quick)
