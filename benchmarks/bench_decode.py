"""#1 decode: clips/s of mer_dist.data.decode (F frames + audio) vs `ffmpeg -threads 1` decoding everything.

Both on one core. ffmpeg reads all clips through one concat list (one process, no per-clip start-up), so
the comparison is decoder against decoder. Two corpora: the tiny one every benchmark uses (64x64, 10 fps,
~2 s: fixed per-clip costs dominate) and a realistic one (224x224, 25 fps, 2-10 s, F=16: the decoder
dominates, and frames nobody keeps are not decoded). The realistic figure alternates the two decoders over
`rounds` passes and reports the median ratio, so a machine whose speed drifts moves both sides alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch
from common import ROOT, report, setup, timed


def _ffmpeg(clips: list[Path], core: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.writelines(f"file '{c}'\n" for c in clips)
    cmd = ["taskset", "-c", str(core), "ffmpeg", "-v", "error", "-threads", "1",
           "-f", "concat", "-safe", "0", "-i", f.name, "-f", "null", "-"]
    t, _ = timed(subprocess.run, cmd, capture_output=True, check=True)
    Path(f.name).unlink()
    return t


def _compare(clips: list[Path], frames: int, size: int, rounds: int) -> tuple[float, float, list[float]]:
    """(our clips/s, ffmpeg clips/s, per-round ratios), medians over `rounds` alternating passes on one core."""
    from mer_dist.data.decode import decode
    torch.set_num_threads(1)
    cores = os.sched_getaffinity(0)
    core = sorted(cores)[0]
    data = [c.read_bytes() for c in clips]
    ours, ff = [], []
    os.sched_setaffinity(0, {core})
    try:
        [decode(d, frames, size, size, threads=1) for d in data[:4]]       # warm caches and the codec tables
        for _ in range(rounds):
            ours.append(timed(lambda: [decode(d, frames, size, size, threads=1) for d in data])[0])
            ff.append(_ffmpeg(clips, core))
    finally:
        os.sched_setaffinity(0, cores)
    ratios = [f / o for o, f in zip(ours, ff)]
    return len(clips) / statistics.median(ours), len(clips) / statistics.median(ff), ratios


def realistic_corpus(quick: bool) -> Path:
    """224x224 at 25 fps, 2-10 s clips (H.264 + AAC), built once."""
    from mer_dist.config import SynthConfig
    from mer_dist.data.synth import generate
    n = 8 if quick else 40
    base = ROOT / f"decode-224px-25fps-{n}"
    if not (base / "label-disdim.csv").is_file():
        generate(SynthConfig(out=str(base), num_labeled=n, num_unlabeled=0, num_test=0, seconds=6.0, seconds_jitter=4.0,
                             fps=25, height=224, width=224, workers=min(8, os.cpu_count() or 2)))
    return base


def run(quick: bool) -> dict:
    env = setup(quick)
    clips = sorted((env["corpus"] / "video-unlabeled").glob("*.mp4"))[: 40 if quick else 300]
    ours, ff, _ = _compare(clips, 8, 64, 1)
    res = {"decode_clips_per_s": ours, "ffmpeg_clips_per_s": ff, "decode_vs_ffmpeg": ours / ff}
    report("#1 decode (1 core)", [("clips", f"{len(clips)} x ~2 s, 64x64 @ 10 fps, H.264 + AAC 16 kHz"),
                                  ("mer_dist decode (F=8 at 64x64 + audio)", f"{ours:.1f} clips/s"),
                                  ("ffmpeg -threads 1 full decode", f"{ff:.1f} clips/s"),
                                  ("ratio (target >= 0.8)", f"{ours / ff:.2f}x")])
    real = sorted((realistic_corpus(quick) / "video-labeled").glob("*.mp4"))
    ours, ff, ratios = _compare(real, 16, 224, 1 if quick else 5)
    res |= {"decode224_clips_per_s": ours, "ffmpeg224_clips_per_s": ff,
            "decode224_vs_ffmpeg": statistics.median(ratios), "decode224_ms_per_clip": 1e3 / ours}
    report("#1b decode at real size (1 core)", [
        ("clips", f"{len(real)} x 2-10 s, 224x224 @ 25 fps, H.264 + AAC 16 kHz"),
        ("mer_dist decode (F=16 at 224x224 + audio)", f"{ours:.1f} clips/s ({1e3 / ours:.1f} ms/clip)"),
        ("ffmpeg -threads 1 full decode", f"{ff:.1f} clips/s"),
        ("ratio, median of rounds (target >= 1.2)", f"{statistics.median(ratios):.2f}x "
                                                    f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")])
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    run(ap.parse_args().quick)
