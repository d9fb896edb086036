"""`mer-dist pseudo-label`: the fold ensemble of a finetuned model labels the unlabeled pool.

Every clip of the split is predicted exactly once (features extracted over the ranks, as `evaluate` does); the
selection rule and the directory it writes are `train/pseudo.py`'s. Truth is never read here.
"""
from __future__ import annotations

from pathlib import Path

from mer_dist import dist
from mer_dist.config import LABELS, PseudoLabelConfig
from mer_dist.eval.evaluate import predict
from mer_dist.models.ensemble import load_model
from mer_dist.tracking import Tracker
from mer_dist.train.pseudo import select, write


def run(cfg: PseudoLabelConfig) -> dict:
    env = dist.setup()
    ck = load_model(cfg.model)
    names, _, per_fold = predict(ck, cfg.split, cfg.shards, None, env.rank, env.world_size)
    probs = per_fold.mean(0)
    agree = None
    if cfg.agree_with:
        other_names, _, agree = predict(load_model(cfg.agree_with), cfg.split, cfg.shards, None, env.rank,
                                        env.world_size)
        agree = agree.mean(0)
        if other_names != names:
            raise ValueError(f"agree_with={cfg.agree_with}: predicts other clips than {cfg.model} on '{cfg.split}'")

    def select_and_write() -> dict:     # rank 0 writes; the others wait outside any collective
        kept = select(probs, cfg.threshold, cfg.top_per_class, agree)
        pred = probs.argmax(1)
        view = "".join(cfg.student_modalities)
        summary = {"source_model": str(Path(cfg.model).resolve()), "split": cfg.split, "candidates": len(names),
                   "kept": int(len(kept)), "threshold": cfg.threshold, "top_per_class": cfg.top_per_class,
                   "agree_with": cfg.agree_with, "folds": ck.split, "student_modalities": view,
                   "per_class": {lab: int((pred[kept] == c).sum()) for c, lab in enumerate(LABELS)},
                   "mean_confidence": float(probs[kept].max(1).mean()) if len(kept) else 0.0}
        write(Path(cfg.out), names, probs, [view] * len(names), kept, summary, per_fold)
        tracker = Tracker(cfg.tracking, cfg.out, "pseudo-label", tags={"model": cfg.model, "split": cfg.split})
        tracker.params(cfg)
        tracker.metrics({"kept": len(kept), **{f"kept_{k}": v for k, v in summary["per_class"].items()}}, 0)
        tracker.artifact(Path(cfg.out) / "summary.json")
        tracker.close()
        print(f"pseudo-label: kept {len(kept)}/{len(names)} clips of '{cfg.split}' "
              f"({', '.join(f'{k} {v}' for k, v in summary['per_class'].items())}) -> {Path(cfg.out) / 'pseudo.csv'}")
        return summary

    summary = dist.on_main(select_and_write)
    dist.cleanup()
    return summary
