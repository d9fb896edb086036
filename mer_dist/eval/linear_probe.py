"""Linear probes on frozen features: how much of the emotion a representation makes linearly readable.

`probe-layers` scores each HuBERT layer on a held-out part; the alignment guard scores encoders by
stratified cross-validation on the labeled split (never the test split). This module owns the probe's output
(`layers.csv` + `layers.json`: per layer WAF/accuracy, the top-k layers, the held-out split's sizes), which
`adapt-audio` reads to choose the layers it adapts."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mer_dist.errors import ModelError
from mer_dist.eval.metrics import summary
from mer_dist.io import write_csv_atomic, write_json_atomic


def _probe(seed: int):
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5, random_state=seed))


def probe_scores(x: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray, seed: int) -> dict:
    clf = _probe(seed).fit(x[tr], y[tr])
    s = summary(y[va], clf.predict(x[va]))
    return {"waf": s["waf"], "accuracy": s["accuracy"]}


def cv_waf(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> float:
    """WAF of out-of-fold predictions of a stratified K-fold probe (K at most the rarest class's count, >= 2)."""
    counts = np.bincount(y)
    k = int(max(2, min(folds, counts[counts > 0].min())))
    with warnings.catch_warnings():      # a class rarer than K: sklearn warns and still folds
        warnings.simplefilter("ignore")
        pred = cross_val_predict(_probe(seed), x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
    return summary(y, pred)["waf"]


def write_layers(out: Path, result: dict) -> None:
    """`result`: {"layers": [{"layer", "waf", "accuracy"}...], "top_k": [...], ...} -> layers.csv + layers.json."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "layers.csv", ["layer", "waf", "accuracy"],
                     ([r["layer"], r["waf"], r["accuracy"]] for r in result["layers"]))
    write_json_atomic(out / "layers.json", result)


def read_layers(probe_dir: str | Path) -> dict:
    p = Path(probe_dir) / "layers.json"
    if not p.is_file():
        raise ModelError(f"{p}: probe result not found (run `mer-dist probe-layers` first)")
    return json.loads(p.read_text())
