"""`mer-dist pseudo-label`: the fold ensemble of a finetuned model labels the unlabeled pool.

Every clip of the split is predicted exactly once (features extracted over the ranks, as `evaluate` does); the
selection rule and the directory it writes are `train/pseudo.py`'s. The fold models' probabilities are first
temperature-scaled on the model's own out-of-fold probabilities (`eval/calibration.py`), so the threshold, the soft
targets and the precision it *expects* of its labels mean what they say. Truth never selects: on a synthetic corpus
its hidden truth file only reports the true precision beside the expected one.
"""
from __future__ import annotations

from pathlib import Path

from mer_dist import dist
from mer_dist.config import LABELS, PseudoLabelConfig
from mer_dist.data.synth import read_truth
from mer_dist.eval import calibration
from mer_dist.eval.evaluate import predict
from mer_dist.models.ensemble import load_model
from mer_dist.tracking import Tracker
from mer_dist.train.pseudo import precision, select, write
from mer_dist.train.round_guard import read_oof


def temperature(cfg: PseudoLabelConfig) -> tuple[float, dict]:
    """The temperature fitted on `cfg.model`'s out-of-fold probabilities (1 when not asked or not possible, with
    one line saying why) and the calibration figures for the summary."""
    oof = read_oof(cfg.model) if cfg.calibrate else None
    if oof is None:
        if cfg.calibrate:
            print(f"pseudo-label: {Path(cfg.model) / 'oof.npz'} not found (a model of an older mer-dist): "
                  f"probabilities uncalibrated, the expected precision is the raw confidence", flush=True)
        return 1.0, {"calibrated": False}
    _, y, probs = oof
    t = calibration.fit_temperature(probs, y)
    return t, {"calibrated": True, "oof_clips": int(len(y)), "oof_ece": calibration.reliability(probs, y),
               "oof_ece_calibrated": calibration.reliability(calibration.scaled(probs, t), y)}


def run(cfg: PseudoLabelConfig) -> dict:
    env = dist.setup()
    ck = load_model(cfg.model)
    names, _, per_fold = predict(ck, cfg.split, cfg.shards, None, env.rank, env.world_size)
    t, calib = temperature(cfg)
    per_fold = calibration.scaled(per_fold, t)      # each fold model calibrated, as its out-of-fold clips were
    probs = per_fold.mean(0)
    agree = None
    if cfg.agree_with:
        other_names, _, agree = predict(load_model(cfg.agree_with), cfg.split, cfg.shards, None, env.rank,
                                        env.world_size)
        agree = agree.mean(0)
        if other_names != names:
            raise ValueError(f"agree_with={cfg.agree_with}: predicts other clips than {cfg.model} on '{cfg.split}'")

    def select_and_write() -> dict:     # rank 0 writes; the others wait outside any collective
        kept = select(probs, cfg.threshold, cfg.top_per_class, agree, cfg.min_precision)
        pred = probs.argmax(1)
        view = "".join(cfg.student_modalities)
        summary = {"source_model": str(Path(cfg.model).resolve()), "split": cfg.split, "candidates": len(names),
                   "kept": int(len(kept)), "threshold": cfg.threshold, "top_per_class": cfg.top_per_class,
                   "min_precision": cfg.min_precision, "agree_with": cfg.agree_with, "folds": ck.split,
                   "student_modalities": view, "temperature": t, **calib,
                   "per_class": {lab: int((pred[kept] == c).sum()) for c, lab in enumerate(LABELS)},
                   "mean_confidence": float(probs[kept].max(1).mean()) if len(kept) else 0.0,
                   "expected_precision": calibration.expected_precision(probs[kept]),
                   "expected_precision_per_class": {lab: calibration.expected_precision(probs[kept][pred[kept] == c])
                                                    for c, lab in enumerate(LABELS)}}
        write(Path(cfg.out), names, probs, [view] * len(names), kept, summary, per_fold)
        truth = read_truth(cfg.truth, cfg.shards or ck.shards)
        true = f", true {precision(cfg.out, truth)['precision']:.3f}" if truth and len(kept) else ""
        tracker = Tracker(cfg.tracking, cfg.out, "pseudo-label", tags={"model": cfg.model, "split": cfg.split})
        tracker.params(cfg)
        tracker.metrics({"kept": len(kept), "expected_precision": summary["expected_precision"], "temperature": t,
                         **{f"kept_{k}": v for k, v in summary["per_class"].items()}}, 0)
        tracker.artifact(Path(cfg.out) / "summary.json")
        tracker.close()
        print(f"pseudo-label: kept {len(kept)}/{len(names)} clips of '{cfg.split}' "
              f"({', '.join(f'{k} {v}' for k, v in summary['per_class'].items())}); temperature {t:.2f}, expected "
              f"precision {summary['expected_precision']:.3f}{true} -> {Path(cfg.out) / 'pseudo.csv'}")
        return summary

    summary = dist.on_main(select_and_write)
    dist.cleanup()
    return summary
