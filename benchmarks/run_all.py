"""Every CPU benchmark figure in one run: `python benchmarks/run_all.py [--quick]` (full: < 10 min on 2 cores).

Figure #8 (GPU MFU at ViT-B/16, F=16, 224x224, bf16) is `bench_gpu.py`, run on a GPU machine; see BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_align  # noqa: E402
import bench_decode  # noqa: E402
import bench_loader  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (the tests run this)")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    t0 = time.time()
    figures = {}
    figures |= bench_decode.run(a.quick)
    figures |= bench_loader.run(a.quick)
    figures |= bench_align.data_bound_and_targets(a.quick)
    figures |= bench_align.objectives(a.quick)
    figures |= bench_align.zero_and_scaling(a.quick)
    rows = [("#1 decode vs ffmpeg", "decode_vs_ffmpeg", ">= 0.8"), ("#2 loader vs W x 1-core", "loader_vs_linear", ">= 0.9"),
            ("#3 step: stream vs memory", "stream_vs_memory", "<= 1.10"), ("#4 offline vs online", "offline_vs_online", ">= 1"),
            ("#4 break-even epochs", "break_even_epochs", "report"), ("#5 ZeRO-1 vs 1 rank", "zero1_vs_1rank", "report"),
            ("#5 ZeRO-2 vs 1 rank", "zero2_vs_1rank", "report"), ("#5 ZeRO-3 vs 1 rank", "zero3_vs_1rank", "<= 0.55"),
            ("#6 2 ranks vs 1", "scaling_2_vs_1", ">= 1.7"),
            ("#9 kd step vs mse", "kd/features_vs_mse", "<= 1.15"), ("#9 infonce step vs mse", "infonce/features_vs_mse", "<= 1.15"),
            ("#9 kd+infonce step vs mse", "kd,infonce/features_vs_mse", "<= 1.15"), ("#7 worker RSS growth (MiB)", "worker_rss_growth_mb", "flat")]
    print("\n| figure | value | target |\n|---|---|---|")
    for name, key, target in rows:
        value = f"{figures[key]:.2f}" if key in figures else "not measured in --quick"
        print(f"| {name} | {value} | {target} |")
    print(f"\nall benchmarks: {time.time() - t0:.0f} s{' (quick)' if a.quick else ''}")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
