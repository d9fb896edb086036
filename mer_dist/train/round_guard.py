"""The self-training guard: a round is kept only when a score its own pseudo-labels cannot inflate says it helps
by more than its spread; otherwise the round's input model stays (`mer-dist self-train`, `rounds.json` "guard").

Why not CV WAF: each fold keeps its best epoch *by its validation clips*, so CV WAF is the maximum of a noisy
curve, and pseudo-labels make the curve noisier -- CV rises while the test falls (#33: in every seed). The score
here never lets a clip's label choose the epoch that scores it: each fold's validation clips are split in two
halves, the epoch is chosen on one half and the other half is scored with it (and the other way round). Fold k of
round r learns from fold k's model of round r-1 (cross-fitting), which never saw fold k, so no validation label
reaches its training. The spread is a paired bootstrap over the labeled clips: both rounds scored on the same
resamples, the gain's lower confidence bound must be above 0.

`oof.npz` (written by finetune beside metrics.json): names, labels, and the out-of-fold probabilities so chosen.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mer_dist.eval.metrics import waf as _waf
from mer_dist.io import atomic_target


def unselected(y_val: np.ndarray, epoch_probs: list[np.ndarray], seed: int) -> np.ndarray:
    """[n, C] validation probabilities where each half of the clips is scored at the epoch the *other* half chose."""
    p = np.stack(epoch_probs)                                   # [epochs, n, C]
    half = np.random.default_rng(seed).permutation(len(y_val)) % 2 == 0
    out = np.empty_like(p[-1])
    for scored in (half, ~half):
        chooser = ~scored
        if not chooser.any():
            out[scored] = p[-1][scored]
            continue
        best = int(np.argmax([_waf(y_val[chooser], e[chooser].argmax(1)) for e in p]))
        out[scored] = p[best][scored]
    return out


def write_oof(model_dir: str | Path, names: list[str], y: np.ndarray, probs: np.ndarray) -> None:
    with atomic_target(Path(model_dir) / "oof.npz", ".npz") as tmp:
        np.savez(tmp, names=np.asarray(names), y=np.asarray(y, dtype=np.int64), probs=probs.astype(np.float32))


def read_oof(model_dir: str | Path) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    f = Path(model_dir) / "oof.npz"
    if not f.is_file():
        return None
    z = np.load(f, allow_pickle=False)
    return [str(n) for n in z["names"]], z["y"], z["probs"]


def decide(before: str | Path, after: str | Path, confidence: float = 0.9, resamples: int = 1000,
           seed: int = 0) -> dict:
    """{"keep", "gain", "low", "before", "after"}: the unselected out-of-fold WAF of both finetune outputs on their
    common labeled clips, and the gain's one-sided lower bound at `confidence` (paired bootstrap). Kept only when
    that bound is above 0. Raises ValueError naming the file when a model has no oof.npz."""
    oof = [read_oof(d) for d in (before, after)]
    for d, r in zip((before, after), oof):
        if r is None:
            raise ValueError(f"{Path(d) / 'oof.npz'}: not found (a finetune output of an older mer-dist: run it again)")
    (na, ya, pa), (nb, _, pb) = oof
    index = {n: i for i, n in enumerate(nb)}
    common = [i for i, n in enumerate(na) if n in index]
    if not common:
        raise ValueError(f"{before} and {after}: no labeled clip in common")
    j = np.array([index[na[i]] for i in common])
    y, a, b = ya[common], pa[common].argmax(1), pb[j].argmax(1)
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    for t in range(resamples):
        s = rng.integers(0, len(y), len(y))
        boot[t] = _waf(y[s], b[s]) - _waf(y[s], a[s])
    gain, low = _waf(y, b) - _waf(y, a), float(np.quantile(boot, 1 - confidence))
    return {"keep": bool(low > 0), "gain": gain, "low": low, "before": _waf(y, a), "after": _waf(y, b)}


def cell(r: dict) -> str:
    """A round's guard decision, as the round tables show it."""
    if "guard_gain" not in r:
        return r.get("guard", "-")
    return f"{r['guard']} ({r['guard_gain']:+.3f}, low {r['guard_low']:+.3f})"
