"""A fold ensemble on a split of shards: `predict` gives each fold's probabilities (features extracted with the
model's own encoders, keyed by clip content, spread over ranks), `report` writes the evaluation directory
(predictions, probabilities, metrics and per-class tables where labels exist) for `evaluate` and `finetune`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mer_dist.config import (
    LABELS,
    DataConfig,
    EvaluateConfig,
    FusionConfig,
    VisualConfig,
    save,
)
from mer_dist.eval import plots
from mer_dist.eval.metrics import summary
from mer_dist.features import Encoders, extract, frames
from mer_dist.io import sheet_safe, write_csv_atomic, write_json_atomic
from mer_dist.models.ensemble import FoldEnsemble
from mer_dist.models.fusion import fold_probs
from mer_dist.tracking import Tracker


def predict(ck: FoldEnsemble, split: str, shards: str = "", encoders: Encoders | None = None, rank: int = 0,
            world: int = 1) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, labels or -1, each fold model's probabilities [K, N, 6]) for a split; every rank must call it.
    The ensemble's prediction is their mean over K."""
    data = DataConfig(**{**ck.data, "shards": shards or ck.shards})
    encoders = encoders or Encoders(ck.specs, ck.image_size)
    names, y, feats, present = extract(encoders, ck.modalities, data.shards, split, data, ck.cache, rank, world)
    if not ck.visual_folds:
        return names, y, fold_probs(ck.folds, ck.dims, FusionConfig(**ck.fusion), feats, present)
    # the visual encoder was fine-tuned with each fold: its features come from that fold's encoder
    _, clips = frames(data.shards, split, data, ck.cache)
    probs = []
    for fusion_state, enc in zip(ck.folds, visual_fold_encoders(ck)):
        with torch.no_grad():
            v = torch.cat([enc.embed(torch.from_numpy(np.array(clips[i:i + 64])))
                           for i in range(0, len(names), 64)]).numpy()
        probs.append(fold_probs([fusion_state], ck.dims, FusionConfig(**ck.fusion), {**feats, "v": v}, present)[0])
    return names, y, np.stack(probs)


def visual_fold_encoders(ck: FoldEnsemble):
    """The visual encoder fine-tuned with each fold (`finetune visual_train=top_k|full`), in eval mode, built one
    at a time as the caller asks (none when the model's visual features come from one frozen encoder)."""
    from mer_dist.models.visual import VisualEncoder
    for state in ck.visual_folds:
        enc = VisualEncoder(VisualConfig(**{**ck.visual_config, "init": ""}), ck.image_size)
        enc.load_state_dict(state)
        yield enc.eval()


def report(cfg: EvaluateConfig, names: list[str], y: np.ndarray, probs: np.ndarray) -> dict:
    """predictions.csv, probabilities.csv, metrics.json and, where labels exist, per-class + confusion; MLflow."""
    pred = probs.argmax(1)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "predictions.csv", ["name", "discrete"],
                     ([sheet_safe(n), LABELS[p]] for n, p in zip(names, pred)))
    write_csv_atomic(out / "probabilities.csv", ["name", *LABELS],
                     ([sheet_safe(n), *(f"{v:.6f}" for v in row)] for n, row in zip(names, probs)))
    result: dict = {"split": cfg.split, "n": len(names)}
    labeled = y >= 0
    if labeled.any():
        s = summary(y[labeled], pred[labeled])
        result |= {k: s[k] for k in ("waf", "accuracy", "macro_f1", "per_class", "confusion")}
        write_csv_atomic(out / "confusion.csv", ["true\\pred", *LABELS],
                         ([LABELS[i], *row] for i, row in enumerate(s["confusion"])))
        write_csv_atomic(out / "per_class.csv", ["label", "precision", "recall", "f1", "support"],
                         ([lab, *(round(v[k], 4) for k in ("precision", "recall", "f1")), int(v["support"])]
                          for lab, v in s["per_class"].items()))
        plots.confusion_matrix(s["confusion"], out / "confusion.png", f"{cfg.split} (WAF {s['waf']:.3f})")
        print(f"evaluate[{cfg.split}]: WAF {s['waf']:.3f}  accuracy {s['accuracy']:.3f}  macro-F1 {s['macro_f1']:.3f}"
              f"  (n={int(labeled.sum())}) -> {out}")
    else:
        print(f"evaluate[{cfg.split}]: {len(names)} predictions (no labels) -> {out / 'predictions.csv'}")
    write_json_atomic(out / "metrics.json", result)
    save(cfg, out / "config.yaml")
    tracker = Tracker(cfg.tracking, out, "evaluate", tags={"split": cfg.split, "model": str(cfg.model)},
                      describe=f"{Path(cfg.model).name} on {cfg.split}")
    tracker.params(cfg)
    if "waf" in result:
        tracker.metrics({k: result[k] for k in ("waf", "accuracy", "macro_f1")}, 0)
    for f in ("predictions.csv", "probabilities.csv", "confusion.csv", "confusion.png", "per_class.csv", "metrics.json"):
        tracker.artifact(out / f)
    tracker.close()
    return result
