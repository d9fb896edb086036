"""`mer-dist evaluate`: fold-ensemble predictions on a split; metrics where labels exist; MER2024 submission CSV."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from mer_dist.config import LABELS, DataConfig, EvaluateConfig, FusionConfig, save
from mer_dist.data.ingest import write_json_atomic
from mer_dist.eval import plots
from mer_dist.eval.metrics import summary
from mer_dist.models.fusion import FusionModel
from mer_dist.tracking import Tracker
from mer_dist.train.features import Encoders, extract


def run(cfg: EvaluateConfig, encoders: Encoders | None = None) -> dict:
    model_file = Path(cfg.model) / "model.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: model not found (run `mer-dist finetune` first)")
    ck = torch.load(model_file, map_location="cpu", weights_only=False)
    data = DataConfig(**{**ck["data"], "shards": cfg.shards or ck["shards"]})
    encoders = encoders or Encoders(ck["specs"], ck["image_size"])
    names, y, feats, present = extract(encoders, ck["modalities"], data.shards, cfg.split, data, ck["cache"])
    probs = np.zeros((len(names), len(LABELS)))
    for state in ck["folds"]:
        model = FusionModel(ck["dims"], FusionConfig(**ck["fusion"]))
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            probs += model({m: torch.from_numpy(f) for m, f in feats.items()}, torch.from_numpy(present)).softmax(-1).numpy()
    probs /= len(ck["folds"])
    pred = probs.argmax(1)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "discrete"])
        w.writerows([n, LABELS[p]] for n, p in zip(names, pred))
    with open(out / "probabilities.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", *LABELS])
        w.writerows([n, *(f"{v:.6f}" for v in row)] for n, row in zip(names, probs))
    result: dict = {"split": cfg.split, "n": len(names)}
    labeled = y >= 0
    if labeled.any():
        s = summary(y[labeled], pred[labeled])
        result |= {k: s[k] for k in ("waf", "accuracy", "macro_f1", "per_class", "confusion")}
        with open(out / "confusion.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true\\pred", *LABELS])
            w.writerows([LABELS[i], *row] for i, row in enumerate(s["confusion"]))
        with open(out / "per_class.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "precision", "recall", "f1", "support"])
            w.writerows([lab, *(round(v[k], 4) for k in ("precision", "recall", "f1")), int(v["support"])]
                        for lab, v in s["per_class"].items())
        plots.confusion_matrix(s["confusion"], out / "confusion.png", f"{cfg.split} (WAF {s['waf']:.3f})")
        print(f"evaluate[{cfg.split}]: WAF {s['waf']:.3f}  accuracy {s['accuracy']:.3f}  macro-F1 {s['macro_f1']:.3f}"
              f"  (n={int(labeled.sum())}) -> {out}")
    else:
        print(f"evaluate[{cfg.split}]: {len(names)} predictions (no labels) -> {out / 'predictions.csv'}")
    write_json_atomic(out / "metrics.json", result)
    save(cfg, out / "config.yaml")
    tracker = Tracker(cfg.tracking, out, "evaluate", tags={"split": cfg.split, "model": str(cfg.model)})
    tracker.params(cfg)
    if "waf" in result:
        tracker.metrics({k: result[k] for k in ("waf", "accuracy", "macro_f1")}, 0)
    for f in ("predictions.csv", "probabilities.csv", "confusion.csv", "confusion.png", "per_class.csv", "metrics.json"):
        tracker.artifact(out / f)
    tracker.close()
    return result
