"""Classification metrics (WAF = weighted F1, the MER2024 metric): scikit-learn's, in one summary dict."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from mer_dist.config import LABELS

CLASSES = list(range(len(LABELS)))


def waf(y_true, y_pred) -> float:
    """Weighted F1 alone: for scores computed many times over (the self-training guard's bootstrap)."""
    return float(f1_score(y_true, y_pred, average="weighted", zero_division=0))


def summary(y_true, y_pred) -> dict:
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if len(y_true) == 0:
        return {"waf": 0.0, "accuracy": 0.0, "macro_f1": 0.0, "n": 0, "confusion": np.zeros((6, 6), int).tolist(),
                "per_class": {lab: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0.0} for lab in LABELS}}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=CLASSES, zero_division=0)
    return {
        "waf": waf(y_true, y_pred),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": {LABELS[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                  "support": float(s[i])} for i in CLASSES},
        "confusion": confusion_matrix(y_true, y_pred, labels=CLASSES).tolist(),
        "n": int(len(y_true)),
    }


def majority_waf(y_train, y_eval) -> float:
    """WAF of always predicting the training majority class: the floor a model must beat."""
    major = int(np.bincount(np.asarray(y_train, dtype=int), minlength=len(LABELS)).argmax())
    return summary(y_eval, np.full(len(y_eval), major))["waf"]
