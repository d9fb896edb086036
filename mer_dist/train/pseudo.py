"""`mer-dist pseudo-label`: the fold ensemble of a finetuned model labels the unlabeled pool.

Every clip of the split is predicted exactly once (features extracted over the ranks, as `evaluate`
does); `select` keeps the confident ones -- a probability threshold, then at most N per predicted
class (class-balanced: a frequent class cannot drown a rare one), optionally only where a second
model agrees. Writes `pseudo.csv` (name, discrete, confidence, the 6 probabilities) and
`summary.json` (counts per class, the rule, the source model). Truth is never read here.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from mer_dist import dist
from mer_dist.config import LABEL_TO_ID, LABELS, PseudoLabelConfig
from mer_dist.data.ingest import load_manifest
from mer_dist.eval.evaluate import load_model, predict
from mer_dist.io import atomic_target, write_json_atomic


def select(probs: np.ndarray, threshold: float, top_per_class: int = 0,
           agree: np.ndarray | None = None) -> np.ndarray:
    """Indices (ascending) of the rows kept: max probability >= threshold, the argmax equal to `agree`'s (when
    given), then the `top_per_class` most confident rows of each predicted class (0 = all)."""
    pred, conf = probs.argmax(1), probs.max(1)
    keep = conf >= threshold
    if agree is not None:
        keep &= agree.argmax(1) == pred
    if top_per_class > 0:
        for c in range(probs.shape[1]):
            idx = np.flatnonzero(keep & (pred == c))
            if len(idx) > top_per_class:
                drop = idx[np.argsort(-conf[idx], kind="stable")[top_per_class:]]
                keep[drop] = False
    return np.flatnonzero(keep)


def read_pseudo(folder: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """pseudo.csv of `mer-dist pseudo-label` -> (names, probabilities [N, 6], views). A row's view names the
    modalities a student sees on that clip ("v"; "" = all): co-training labels a clip for one modality with a model
    that never saw it, so a name may appear once per view."""
    f = Path(folder) / "pseudo.csv" if Path(folder).is_dir() else Path(folder)
    if not f.is_file():
        raise FileNotFoundError(f"{f}: pseudo-labels not found (run `mer-dist pseudo-label`)")
    with open(f, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    missing = {"name", "discrete", *LABELS} - set(rows[0] if rows else {"name", "discrete", *LABELS})
    if missing:
        raise ValueError(f"{f}: missing column(s) {sorted(missing)}")
    probs = np.zeros((len(rows), len(LABELS)))
    for i, r in enumerate(rows, start=2):
        if r["discrete"] not in LABEL_TO_ID:
            raise ValueError(f"{f}:{i} ({r['name']}): unknown label {r['discrete']!r}")
        try:
            probs[i - 2] = [float(r[c]) for c in LABELS]
        except (TypeError, ValueError):
            probs[i - 2] = np.nan
        if not (np.isfinite(probs[i - 2]).all() and (probs[i - 2] >= 0).all() and (probs[i - 2] <= 1).all()):
            raise ValueError(f"{f}:{i} ({r['name']}): probabilities must be numbers in [0, 1], "
                             f"got {[r[c] for c in LABELS]}")
    return [r["name"] for r in rows], probs, [r.get("modalities") or "" for r in rows]


def for_training(folder: str | Path, shards: str, test_split: str, transductive: bool, stage: str,
                 modality: str) -> tuple[list[str], np.ndarray]:
    """The pseudo-labelled clips a one-modality training stage may learn from: the rows of pseudo.csv whose view
    includes `modality` (once per clip), less the clips of `test_split` (MER2024 hides test clips in the
    unlabeled pool), which only `transductive` keeps; the stage says how many it left out."""
    names, probs, views = read_pseudo(folder)
    seen: set[str] = set()
    rows = [i for i, (n, v) in enumerate(zip(names, views)) if (not v or modality in v) and not (n in seen or seen.add(n))]
    if test_split and not transductive and test_split in load_manifest(shards)["splits"]:
        from mer_dist.features import index
        test = set(index(shards, test_split)[0])
        kept = [i for i in rows if names[i] not in test]
        if len(kept) < len(rows):
            print(f"{stage}: {len(rows) - len(kept)} pseudo-labelled clip(s) are '{test_split}' clips: left out "
                  f"(transductive=true uses them)")
        rows = kept
    return [names[i] for i in rows], probs[rows]


def unreadable(folder: str | Path, wanted: list[str], read: set[str], shards: str, split: str, stage: str) -> set[str]:
    """The pseudo-labelled clips a stage could not read: those `split` holds but its stream skipped as corrupt (a
    truncated file, a clip without audio) are skipped with one line counting and naming them -- the stage that
    pseudo-labelled them may have read another part of the clip; a name the split does not hold at all is an error."""
    lost = [n for n in wanted if n not in read]
    if not lost:
        return set()
    from mer_dist.features import index
    listed = set(index(shards, split)[0])
    absent = [n for n in lost if n not in listed]
    if absent:
        raise ValueError(f"{folder}: {len(absent)} clip(s) not in split '{split}' of {shards} (first: {absent[0]})")
    print(f"{stage}: {len(lost)} pseudo-labelled clip(s) of '{split}' could not be read here: skipped "
          f"(first: {lost[0]})", flush=True)
    return set(lost)


def as_targets(probs: np.ndarray, soft: bool) -> np.ndarray:
    """Training targets of pseudo-labelled clips: their probabilities (soft) or the one-hot argmax (hard)."""
    return (probs if soft else np.eye(len(LABELS))[probs.argmax(1)]).astype(np.float32)


def refuse_labeled(folder: str | Path, pseudo_names: list[str], labeled: list[str] | set[str]) -> None:
    """A pseudo-label naming a labeled training clip is leakage: one line naming the file and the first clip."""
    leaked = sorted(set(pseudo_names) & set(labeled))
    if leaked:
        raise ValueError(f"{folder}: {len(leaked)} pseudo-labelled clip(s) are labeled training clips "
                         f"(first: {leaked[0]}); pseudo-labels must come from another split")


def write(out: Path, names: list[str], probs: np.ndarray, views: list[str], kept: np.ndarray, summary: dict,
          fold_probs: np.ndarray) -> None:
    """pseudo.csv (the kept rows), summary.json, and folds.npz: every candidate's probabilities under each fold
    model, which `finetune` cross-fits with (fold k learns from its own model's selection)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_target(out / "pseudo.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "discrete", "confidence", *LABELS, "modalities"])
        for i in kept:
            w.writerow([names[i], LABELS[int(probs[i].argmax())], f"{probs[i].max():.6f}",
                        *(f"{v:.6f}" for v in probs[i]), views[i]])
    np.savez(out / "folds.npz", names=np.asarray(names), probs=fold_probs.astype(np.float32), views=np.asarray(views))
    write_json_atomic(out / "summary.json", summary)


def combine(parts: list[Path], out: Path) -> dict:
    """One pseudo-label directory from several (co-training: one per student view), for `finetune pseudo=out`."""
    summaries = [json.loads((Path(p) / "summary.json").read_text()) for p in parts]
    read = [(read_pseudo(p), np.load(Path(p) / "folds.npz", allow_pickle=False)) for p in parts]
    names = [n for _, z in read for n in z["names"].tolist()]
    views = [str(v) for _, z in read for v in z["views"].tolist()]
    fold_probs = np.concatenate([z["probs"] for _, z in read], 1)       # [K, candidates of every part, 6]
    kept_keys = {(n, v) for (pn, _, pv), _ in read for n, v in zip(pn, pv)}
    kept = np.array([i for i, key in enumerate(zip(names, views)) if key in kept_keys], dtype=int)
    probs = fold_probs.mean(0)
    folds = {json.dumps(s.get("folds"), sort_keys=True) for s in summaries}
    summary = {**summaries[0], "source_model": [s["source_model"] for s in summaries], "candidates": len(names),
               "kept": int(len(kept)), "folds": summaries[0].get("folds") if len(folds) == 1 else None,
               "views": {s["student_modalities"] or "all": s["kept"] for s in summaries},
               "per_class": {lab: sum(s["per_class"][lab] for s in summaries) for lab in LABELS},
               "mean_confidence": float(probs[kept].max(1).mean()) if len(kept) else 0.0}
    write(out, names, probs, views, kept, summary, fold_probs)
    return summary


def run(cfg: PseudoLabelConfig) -> dict:
    from mer_dist.tracking import Tracker
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
    summary: dict = {}
    if env.is_main:
        kept = select(probs, cfg.threshold, cfg.top_per_class, agree)
        pred = probs.argmax(1)
        view = "".join(cfg.student_modalities)
        summary = {"source_model": str(Path(cfg.model).resolve()), "split": cfg.split, "candidates": len(names),
                   "kept": int(len(kept)), "threshold": cfg.threshold, "top_per_class": cfg.top_per_class,
                   "agree_with": cfg.agree_with, "folds": ck.get("split"), "student_modalities": view,
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
    dist.barrier()
    dist.cleanup()
    return summary
