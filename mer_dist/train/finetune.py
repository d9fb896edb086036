"""`mer-dist finetune`: fusion classifier on the labeled split, K-fold cross-validated.

Features of the frozen encoders come from the cache (computed once, on rank 0). Folds are spread
over ranks (fold k on rank k mod W); each fold keeps its best epoch by validation WAF, and test
probabilities are averaged over folds by `evaluate`.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mer_dist.config import LABELS, EvaluateConfig, FinetuneConfig, save, to_dict
from mer_dist.data.ingest import write_json_atomic
from mer_dist.data.splits import holdout, kfold
from mer_dist.eval import plots
from mer_dist.eval.metrics import majority_waf, summary
from mer_dist.models.fusion import FusionModel
from mer_dist.tracking import Tracker
from mer_dist.train import dist
from mer_dist.train.features import Encoders, extract, specs_for

VALID_MODALITIES = ("a", "v", "t")


def cache_dir(cfg: FinetuneConfig) -> Path:
    return Path(cfg.cache) if cfg.cache else Path(cfg.data.shards).resolve().parent / "feature-cache"


def train_fold(cfg: FinetuneConfig, feats: dict, present: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray,
               seed: int) -> tuple[dict, list[dict], float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = FusionModel({m: f.shape[1] for m, f in feats.items()}, cfg.fusion)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    counts = np.bincount(y[tr], minlength=len(LABELS)).astype(float)
    weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(LABELS), dtype=torch.float32) \
        if cfg.class_weights else None
    x = {m: torch.from_numpy(f) for m, f in feats.items()}
    p, yt = torch.from_numpy(present), torch.from_numpy(y)
    best, best_state, history = -1.0, None, []
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(tr)
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            idx = torch.from_numpy(order[i:i + cfg.batch_size])
            loss = nn.functional.cross_entropy(model({m: v[idx] for m, v in x.items()}, p[idx]), yt[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        val = summary(y[va], predict(model, {m: f[va] for m, f in feats.items()}, present[va]).argmax(1))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_waf": val["waf"]})
        if val["waf"] > best:
            best, best_state = val["waf"], copy.deepcopy(model.state_dict())
    return best_state, history, best


@torch.no_grad()
def predict(model: FusionModel, feats: dict[str, np.ndarray], present: np.ndarray) -> np.ndarray:
    model.eval()
    logits = model({m: torch.from_numpy(f) for m, f in feats.items()}, torch.from_numpy(present))
    return logits.softmax(-1).numpy()


def run(cfg: FinetuneConfig) -> dict:
    bad = [m for m in cfg.modalities if m not in VALID_MODALITIES]
    if bad or not cfg.modalities:
        raise ValueError(f"config key 'modalities': expected a non-empty subset of {list(VALID_MODALITIES)}, got {cfg.modalities}")
    env = dist.setup()
    out = Path(cfg.out)
    encoders = Encoders(specs_for(cfg), cfg.data.height)
    def features():
        return extract(encoders, cfg.modalities, cfg.data.shards, "train", cfg.data, cache_dir(cfg))
    train = features() if env.is_main else None   # rank 0 fills the cache; the other ranks then read it
    dist.barrier()
    names, y, feats, present = train or features()
    keep = y >= 0
    if not keep.all():
        raise ValueError(f"{cfg.data.shards}: {int((~keep).sum())} train sample(s) without a label")
    splits = kfold(names, y, cfg.folds, cfg.seed) if cfg.folds > 1 else [holdout(names, y, cfg.val_fraction, cfg.seed)]
    mine = [k for k in range(len(splits)) if k % env.world_size == env.rank]
    results = {}
    for k in tqdm(mine, desc="finetune: folds", unit="fold", disable=not env.is_main):
        tr, va = splits[k]
        results[k] = train_fold(cfg, feats, present, y, tr, va, cfg.seed * 1000 + k)
    gathered = {}
    for part in dist.all_gather_object(results):
        gathered.update(part)
    metrics: dict = {}
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        oof = np.zeros((len(y), len(LABELS)))
        for k, (tr, va) in enumerate(splits):
            model = FusionModel({m: f.shape[1] for m, f in feats.items()}, cfg.fusion)
            model.load_state_dict(gathered[k][0])
            oof[va] = predict(model, {m: f[va] for m, f in feats.items()}, present[va])
        covered = np.concatenate([va for _, va in splits])
        cv = summary(y[covered], oof[covered].argmax(1))
        metrics = {"cv_waf": cv["waf"], "cv_accuracy": cv["accuracy"], "cv_macro_f1": cv["macro_f1"],
                   "fold_val_waf": [gathered[k][2] for k in range(len(splits))],
                   "majority_waf": majority_waf(y, y[covered]), "n_train": len(y), "folds": len(splits)}
        torch.save({"folds": [gathered[k][0] for k in range(len(splits))], "dims": {m: f.shape[1] for m, f in feats.items()},
                    "fusion": to_dict(cfg.fusion), "modalities": cfg.modalities, "specs": encoders.specs,
                    "image_size": cfg.data.height, "data": to_dict(cfg.data), "shards": str(Path(cfg.data.shards).resolve()),
                    "cache": str(cache_dir(cfg).resolve())}, out / "model.pt")
        save(cfg, out / "config.yaml")
        plots.confusion_matrix(cv["confusion"], out / "cv_confusion.png", "Cross-validated (out-of-fold)")
        tracker = Tracker(cfg.tracking, out, "finetune", tags={"modalities": "".join(cfg.modalities),
                                                               "world_size": env.world_size, "launcher": env.launcher})
        tracker.params(cfg)
        for k in range(len(splits)):
            for h in gathered[k][1]:
                tracker.metrics({f"fold{k}_train_loss": h["train_loss"], f"fold{k}_val_waf": h["val_waf"]}, h["epoch"])
        tracker.metrics({k: v for k, v in metrics.items() if not isinstance(v, list)}, 0)
        for f in ("model.pt", "config.yaml", "cv_confusion.png"):
            tracker.artifact(out / f)
        tracker.close()
        print(f"finetune[{''.join(cfg.modalities)}]: CV WAF {cv['waf']:.3f} (majority {metrics['majority_waf']:.3f}) -> {out}")
        if cfg.test_split:
            from mer_dist.eval.evaluate import run as evaluate
            ev = evaluate(EvaluateConfig(model=str(out), split=cfg.test_split, out=str(out / f"eval-{cfg.test_split}"),
                                         tracking=cfg.tracking), encoders=encoders)
            metrics |= {f"{cfg.test_split}_{k}": v for k, v in ev.items() if k in ("waf", "accuracy", "macro_f1")}
        write_json_atomic(out / "metrics.json", metrics)
    dist.barrier()
    dist.cleanup()
    return metrics
