"""#1 decode: clips/s of mer_dist.data.decode (F frames + audio) vs `ffmpeg -threads 1` decoding everything.

Both on one core. ffmpeg reads all clips through one concat list (one process, no per-clip start-up), so
the comparison is decoder against decoder.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from common import report, setup, timed


def run(quick: bool) -> dict:
    torch.set_num_threads(1)
    env = setup(quick)
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {sorted(cores)[0]})   # one core for both decoders; restored below
    clips = sorted((env["corpus"] / "video-unlabeled").glob("*.mp4"))[: 40 if quick else 300]
    from mer_dist.data.decode import decode
    frames, h, w = 8, 64, 64
    data = [c.read_bytes() for c in clips]
    try:
        t_ours, _ = timed(lambda: [decode(d, frames, h, w, threads=1) for d in data])
    finally:
        os.sched_setaffinity(0, cores)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.writelines(f"file '{c}'\n" for c in clips)
    cmd = ["taskset", "-c", str(sorted(cores)[0]), "ffmpeg", "-v", "error", "-threads", "1",
           "-f", "concat", "-safe", "0", "-i", f.name, "-f", "null", "-"]
    t_ff, p = timed(subprocess.run, cmd, capture_output=True)
    Path(f.name).unlink()
    ours, ff = len(clips) / t_ours, len(clips) / t_ff
    res = {"decode_clips_per_s": ours, "ffmpeg_clips_per_s": ff, "decode_vs_ffmpeg": ours / ff}
    report("#1 decode (1 core)", [("clips", f"{len(clips)} x ~2 s, 64x64 @ 10 fps, H.264 + AAC 16 kHz"),
                                  ("mer_dist decode (F=8 at 64x64 + audio)", f"{ours:.1f} clips/s"),
                                  ("ffmpeg -threads 1 full decode", f"{ff:.1f} clips/s"),
                                  ("ratio (target >= 0.8)", f"{ours / ff:.2f}x")])
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    run(ap.parse_args().quick)
