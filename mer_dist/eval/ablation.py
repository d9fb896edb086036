"""The control table's arithmetic: mean ± sd rows and the one verdict both `ablate` and the demo print.

A gain counts when it clears both two standard errors of the difference of means (the seed spread of
each row) and 0.01 WAF: with three seeds a single lucky fold split cannot pass for a gain."""
from __future__ import annotations

import numpy as np


def mean_sd(values: list[float]) -> tuple[float, float]:
    w = np.asarray(values, dtype=float)
    return float(w.mean()), float(w.std(ddof=1)) if len(w) > 1 else 0.0


def row(name: str, values: list[float]) -> str:
    """A markdown row: name | mean ± sd | the values."""
    m, sd = mean_sd(values)
    return f"| {name} | {m:.3f} ± {sd:.3f} | {', '.join(f'{v:.3f}' for v in values)} |"


def verdict(aligned: list[float], random: list[float], floor: float = 0.01) -> tuple[str, float, float]:
    """("helped" | "hurt" | "no clear difference", aligned - random mean, the margin it had to clear)."""
    (ma, sa), (mr, sr) = mean_sd(aligned), mean_sd(random)
    margin = max(floor, 2.0 * float(np.sqrt(sa ** 2 / len(aligned) + sr ** 2 / len(random))))
    diff = ma - mr
    word = "helped" if diff > margin else "hurt" if diff < -margin else "no clear difference"
    return word, diff, margin
