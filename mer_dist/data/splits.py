"""Deterministic label-stratified splits of a labeled set (by sample name, never by position)."""
from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split


def _order(names: list[str]) -> np.ndarray:
    return np.argsort(np.asarray(names))


def holdout(names: list[str], labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train_part, val_part); the same names + seed give the same split in every stage."""
    idx = _order(names)
    y = np.asarray(labels)[idx]
    stratify = y if np.bincount(y).min() >= 2 else None
    tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(tr), np.sort(va)


def kfold(names: list[str], labels, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K stratified folds as (train_idx, val_idx): disjoint validation parts that cover the set."""
    idx = _order(names)
    y = np.asarray(labels)[idx]
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.sort(idx[tr]), np.sort(idx[va])) for tr, va in skf.split(idx, y)]
