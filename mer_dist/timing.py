"""Frame timing, defined once: a clip of `duration` seconds seen through n visual frames; frame i stands for the
window [i, i + 1) * duration / n and sits at its centre. The audio teacher emits FRAME_RATE frames a second
(HuBERT's 20 ms hop). The decoder picks frames at these times; the teacher pools its outputs over these windows."""
from __future__ import annotations

import numpy as np

FRAME_RATE = 50.0


def frame_times(duration: float, n: int) -> np.ndarray:
    """Centres of the n windows (seconds, float32): the times the visual frames stand for."""
    return ((np.arange(n) + 0.5) * duration / n).astype(np.float32)


def frame_window(duration, n: int):
    """Width of each of the n windows (a float, or a tensor of durations)."""
    return duration / n
