"""Classification metrics (WAF = weighted F1, the MER2024 metric), computed from the confusion matrix."""
from __future__ import annotations

import numpy as np

from mer_dist.config import LABELS


def confusion(y_true, y_pred, n: int = len(LABELS)) -> np.ndarray:
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return cm


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(float)
    support = cm.sum(1).astype(float)
    predicted = cm.sum(0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def waf(y_true, y_pred) -> float:
    """Weighted-average F1 over the classes present in y_true (= sklearn f1_score(average='weighted'))."""
    return summary(y_true, y_pred)["waf"]


def summary(y_true, y_pred) -> dict:
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    cm = confusion(y_true, y_pred)
    pc = per_class(cm)
    support = pc["support"]
    total = support.sum()
    present = support > 0
    labels_seen = present | (cm.sum(0) > 0)   # sklearn's macro F1 averages over labels seen anywhere
    return {
        "waf": float((pc["f1"] * support).sum() / total) if total else 0.0,
        "accuracy": float(np.diag(cm).sum() / total) if total else 0.0,
        "macro_f1": float(pc["f1"][labels_seen].mean()) if labels_seen.any() else 0.0,
        "per_class": {LABELS[i]: {k: float(pc[k][i]) for k in ("precision", "recall", "f1", "support")}
                      for i in range(len(LABELS))},
        "confusion": cm.tolist(),
        "n": int(total),
    }


def majority_waf(y_train, y_eval) -> float:
    """WAF of always predicting the training majority class: the floor a model must beat."""
    major = int(np.bincount(np.asarray(y_train, dtype=int), minlength=len(LABELS)).argmax())
    return waf(y_eval, np.full(len(y_eval), major))
