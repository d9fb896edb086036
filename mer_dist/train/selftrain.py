"""`mer-dist self-train`: fine-tune -> pseudo-label the unlabeled pool -> fine-tune again, for R rounds.

Round 0 is plain fine-tuning; round r pseudo-labels with round r-1's fold ensemble at the r-th
threshold of the schedule and fine-tunes afresh with those clips in every fold's training part.
Each round is its own MLflow run, tagged with its round and the previous round's run id. The round
table (pseudo-labels kept per class, their precision where a truth file exists, CV and test WAF and
the change from the round before) is printed, written to `rounds.csv`/`rounds.json` and logged.

`views=cross` is co-training across modalities (`co_label`): each modality's view of the pool is labelled by a
model of the other modalities, and the student sees only that modality on those rows.

Precision needs the truth of unlabeled clips, which a real corpus does not have; the synthetic
generator writes it to a hidden `.truth-unlabeled.csv` that only this report reads.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from mer_dist import dist
from mer_dist.config import LABELS, TRUTH_FILE, PseudoLabelConfig, SelfTrainConfig, save
from mer_dist.data.ingest import load_manifest
from mer_dist.io import write_json_atomic
from mer_dist.train import finetune, pseudo


def read_truth(cfg: SelfTrainConfig) -> dict[str, str]:
    path = Path(cfg.truth) if cfg.truth else Path(load_manifest(cfg.finetune.data.shards)["corpus"]) / TRUTH_FILE
    if not path.is_file():
        if cfg.truth:
            raise FileNotFoundError(f"{path}: truth file not found")
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {r["name"]: r["discrete"] for r in csv.DictReader(f)}


def precision(pseudo_dir: Path, truth: dict[str, str]) -> dict[str, float]:
    """Fraction of pseudo-labels equal to the truth, overall and per predicted class (NaN-free: absent = -1)."""
    with open(pseudo_dir / "pseudo.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["name"] in truth]
    out = {"precision": sum(r["discrete"] == truth[r["name"]] for r in rows) / len(rows) if rows else -1.0}
    for lab in LABELS:
        mine = [r for r in rows if r["discrete"] == lab]
        out[f"precision_{lab}"] = sum(truth[r["name"]] == lab for r in mine) / len(mine) if mine else -1.0
    return out


def run(cfg: SelfTrainConfig) -> dict:
    out = Path(cfg.out)
    truth = read_truth(cfg)
    rows, prev_model, prev_run, prev_pseudo = [], "", "", ""
    for r in range(cfg.rounds + 1):
        row: dict = {"round": r}
        pseudo_dir = ""
        tags = [*cfg.finetune.tracking.tags, f"self_train_round={r}", f"self_train_out={out.resolve()}"]
        if prev_run:
            tags.append(f"self_train_previous_run={prev_run}")
        tracking = dataclasses.replace(cfg.finetune.tracking, tags=tags)
        if r > 0:
            threshold = cfg.thresholds[min(r - 1, len(cfg.thresholds) - 1)]
            pseudo_dir = out / f"pseudo{r}"
            label = lambda model, dst, view=(): pseudo.run(PseudoLabelConfig(  # noqa: E731
                model=model, shards=cfg.finetune.data.shards, split=cfg.finetune.pseudo_split, out=str(dst),
                threshold=threshold, top_per_class=cfg.top_per_class, agree_with=cfg.agree_with,
                student_modalities=list(view), tracking=tracking))
            if cfg.views == "fusion":
                summary = label(prev_model, pseudo_dir)
            else:
                parts = [co_label(cfg, r, m, prev_pseudo, tracking, label) for m in cfg.finetune.modalities]
                summary = pseudo.combine(parts, pseudo_dir) if dist.detect().is_main else {}
                dist.barrier()
                if truth:
                    row |= {f"precision_view_{p.name.rsplit('-', 1)[1]}": precision(p, truth)["precision"] for p in parts}
            row |= {"threshold": threshold, "kept": summary.get("kept", 0),
                    **{f"kept_{k}": v for k, v in summary.get("per_class", {}).items()}}
            if truth and summary:
                row |= precision(pseudo_dir, truth)
        ft = dataclasses.replace(cfg.finetune, out=str(out / f"round{r}"), pseudo=str(pseudo_dir), tracking=tracking)
        if r == 0 and cfg.start:
            ft = dataclasses.replace(ft, out=cfg.start)
            m = json.loads((Path(cfg.start) / "metrics.json").read_text())
        else:
            m = finetune.run(ft)
        row |= {"cv_waf": m.get("cv_waf", -1.0), f"{ft.test_split}_waf": m.get(f"{ft.test_split}_waf", -1.0),
                "n_pseudo_trained": m.get("n_pseudo", 0)}
        if rows:
            row["test_waf_change"] = row[f"{ft.test_split}_waf"] - rows[-1][f"{ft.test_split}_waf"]
        rows.append(row)
        prev_model, prev_run, prev_pseudo = ft.out, m.get("mlflow_run_id", ""), pseudo_dir
    env = dist.detect()
    if env.is_main:
        _report(cfg, out, rows)
    return {"rounds": rows}


def co_label(cfg: SelfTrainConfig, r: int, m: str, prev_pseudo, tracking, label) -> Path:
    """Co-training, one view: a fusion model of the other modalities (fine-tuned on the labeled clips and on the
    previous round's pseudo-labels of its own views) labels the pool for a student that sees `m` alone. Its
    errors come from faces, voices or words the student never sees, so they do not confirm the student's own."""
    others = [x for x in cfg.finetune.modalities if x != m]
    tags = [*tracking.tags, f"self_train_view={m}"]
    ft = dataclasses.replace(cfg.finetune, modalities=others, out=str(Path(cfg.out) / f"round{r - 1}-without-{m}"),
                             pseudo=str(prev_pseudo), tracking=dataclasses.replace(tracking, tags=tags))
    finetune.run(ft)
    dst = Path(cfg.out) / f"pseudo{r}-{m}"
    label(ft.out, dst, (m,))
    return dst


def _report(cfg: SelfTrainConfig, out: Path, rows: list[dict]) -> None:
    from mer_dist.tracking import Tracker
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "round", k))
    with open(out / "rounds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    write_json_atomic(out / "rounds.json", rows)
    save(cfg, out / "config.yaml")
    test = f"{cfg.finetune.test_split}_waf"
    lines = ["| round | threshold | pseudo-labels kept (per class) | precision | CV WAF | test WAF | change |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        per = " ".join(f"{lab[:3]} {r.get(f'kept_{lab}', 0)}" for lab in LABELS)
        prec = f"{r['precision']:.3f}" if r.get("precision", -1) >= 0 else "n/a"
        views = [f"{k[len('precision_view_'):]} {v:.3f}" for k, v in sorted(r.items()) if k.startswith("precision_view_")]
        prec += f" ({', '.join(views)})" if views else ""
        lines.append(f"| {r['round']} | {r.get('threshold', '-')} | {r.get('kept', 0)} ({per}) | {prec} | "
                     f"{r['cv_waf']:.3f} | {r[test]:.3f} | {r.get('test_waf_change', 0.0):+.3f} |")
    table = "\n".join(lines)
    (out / "rounds.md").write_text(table + "\n")
    print("\nself-train rounds\n" + table, flush=True)
    tracker = Tracker(cfg.finetune.tracking, out, "self-train", tags={"rounds": cfg.rounds})
    tracker.params({"rounds": cfg.rounds, "thresholds": cfg.thresholds, "top_per_class": cfg.top_per_class})
    for r in rows:
        tracker.metrics({k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "round"}, r["round"])
    for f in ("rounds.csv", "rounds.md"):
        tracker.artifact(out / f)
    tracker.close()
