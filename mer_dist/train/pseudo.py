"""Pseudo-labels: the selection rule and the pseudo-label directory, which this module alone reads and writes.

`select` keeps the confident predictions -- a probability threshold, then at most N per predicted class
(class-balanced: a frequent class cannot drown a rare one), optionally only where a second model agrees. A
pseudo-label directory (written by `mer-dist pseudo-label`, read by adapt-audio, align and finetune) holds
`pseudo.csv` (the kept rows: name, discrete, confidence, the 6 probabilities, the modalities a row may teach),
`summary.json` (counts per class, the rule, the source model and its folds) and `folds.npz` (every candidate's
probabilities under each fold model, for cross-fitting). Truth is never read here.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from mer_dist.config import LABEL_TO_ID, LABELS
from mer_dist.data.ingest import load_manifest
from mer_dist.io import atomic_target, write_json_atomic


def select(probs: np.ndarray, threshold: float, top_per_class: int = 0,
           agree: np.ndarray | None = None, min_precision: float = 0.0) -> np.ndarray:
    """Indices (ascending) of the rows kept: max probability >= threshold, the argmax equal to `agree`'s (when
    given), then per predicted class the most confident rows whose mean confidence -- with calibrated `probs`, the
    precision expected of them -- stays >= `min_precision` (class-aware: a class the model reads badly keeps fewer),
    then at most `top_per_class` of them (0 = all; a frequent class cannot drown a rare one)."""
    pred, conf = probs.argmax(1), probs.max(1)
    keep = conf >= threshold
    if agree is not None:
        keep &= agree.argmax(1) == pred
    for c in range(probs.shape[1]):
        idx = np.flatnonzero(keep & (pred == c))
        idx = idx[np.argsort(-conf[idx], kind="stable")]
        n = len(idx)
        if min_precision > 0:       # the running mean of a descending sequence only falls: a prefix passes
            n = int((np.cumsum(conf[idx]) / np.arange(1, len(idx) + 1) >= min_precision).sum())
        if top_per_class > 0:
            n = min(n, top_per_class)
        keep[idx[n:]] = False
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
    out = leave_out_test([names[i] for i in rows], shards, test_split, transductive, stage)
    rows = [i for i in rows if names[i] not in out]
    return [names[i] for i in rows], probs[rows]


def test_clips(names: list[str], shards: str, test_split: str) -> set[str]:
    """Those of `names` that are clips of `test_split` (MER2024 hides its test clips in the unlabeled pool)."""
    if not test_split or test_split not in load_manifest(shards)["splits"]:
        return set()
    from mer_dist.features import index
    return set(names) & set(index(shards, test_split)[0])


def leave_out_test(names: list[str], shards: str, test_split: str, transductive: bool, stage: str) -> set[str]:
    """The pseudo-labelled clips no training stage learns from: `test_split`'s, unless `transductive`; one line
    counts them. Returns the names left out."""
    test = set() if transductive else test_clips(names, shards, test_split)
    if test:
        print(f"{stage}: {len(test)} pseudo-labelled clip(s) are '{test_split}' clips: left out "
              f"(transductive=true uses them)")
    return test


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


def precision(folder: str | Path, truth: dict[str, str]) -> dict[str, float]:
    """Fraction of a pseudo-label directory's labels equal to `truth` (synthetic corpora only), overall and per
    predicted class (NaN-free: absent = -1)."""
    names, probs, _ = read_pseudo(folder)
    rows = [(n, LABELS[int(p.argmax())]) for n, p in zip(names, probs) if n in truth]
    out = {"precision": sum(d == truth[n] for n, d in rows) / len(rows) if rows else -1.0}
    for lab in LABELS:
        mine = [n for n, d in rows if d == lab]
        out[f"precision_{lab}"] = sum(truth[n] == lab for n in mine) / len(mine) if mine else -1.0
    return out


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
    with atomic_target(out / "folds.npz", ".npz") as tmp:
        np.savez(tmp, names=np.asarray(names), probs=fold_probs.astype(np.float32), views=np.asarray(views))
    write_json_atomic(out / "summary.json", summary)


def combine(parts: list[Path], out: Path) -> dict:
    """One pseudo-label directory from several (co-training: one per student view), for `finetune pseudo=out`."""
    summaries = [read_summary(p) for p in parts]
    read = [(read_pseudo(p), read_folds(p)) for p in parts]
    names = [n for _, z in read for n in z[0]]
    views = [v for _, z in read for v in z[2]]
    fold_probs = np.concatenate([z[1] for _, z in read], 1)       # [K, candidates of every part, 6]
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


def read_summary(folder: str | Path) -> dict:
    f = Path(folder) / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def read_folds(folder: str | Path) -> tuple[list[str], np.ndarray, list[str]] | None:
    """folds.npz: (candidate names, [K, N, 6] probabilities under each fold model, views), or None without one."""
    f = Path(folder) / "folds.npz"
    if not f.is_file():
        return None
    z = np.load(f, allow_pickle=False)
    names = [str(n) for n in z["names"]]
    return names, z["probs"], [str(v) for v in z["views"]] if "views" in z else [""] * len(names)
