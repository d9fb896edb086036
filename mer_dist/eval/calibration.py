"""Calibration of a finetuned model's probabilities: what precision its pseudo-labels can be *expected* to have.

A fold model's softmax is overconfident after a few epochs on a few hundred clips, so "confidence >= 0.7" says
little about how often such a label is right. Temperature scaling (Guo et al., 2017) fits one number on the
out-of-fold probabilities of the labeled clips (each scored by the fold model that never saw it, at an epoch its
label did not choose: `train/round_guard.py`'s `oof.npz`) and divides every log-probability by it. Calibrated, the
mean top probability of a set of clips is the fraction of them expected to be right -- the precision
`pseudo-label` reports (and selects by, `min_precision`) on a pool that has no labels.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

EPS = 1e-7


def scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities [..., C] with every log-probability divided by `temperature` (> 1 softens, < 1 sharpens)."""
    return np.exp(log_softmax(np.log(np.clip(probs, EPS, 1.0)) / temperature, axis=-1))


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature in [0.05, 20] that minimises the negative log-likelihood of labels `y` [N] under `probs`
    [N, C] (one parameter: the ranking, so accuracy and WAF, never changes)."""
    logp = np.log(np.clip(probs, EPS, 1.0))
    y = np.asarray(y, dtype=int)

    def nll(log_t: float) -> float:
        return float(-log_softmax(logp / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def expected_precision(probs: np.ndarray) -> float:
    """The fraction of argmax labels expected right under calibrated `probs` [N, C] (their mean top probability);
    -1 for no rows."""
    return float(probs.max(1).mean()) if len(probs) else -1.0


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the mean |accuracy - confidence| over equal-width confidence bins, weighted by
    their size (0 = perfectly calibrated)."""
    conf, right = probs.max(1), probs.argmax(1) == np.asarray(y)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    return float(sum(abs(right[idx == b].mean() - conf[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))
