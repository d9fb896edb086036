"""`mer-dist self-train`: fine-tune -> pseudo-label the unlabeled pool -> fine-tune again, for R rounds.

Round 0 is plain fine-tuning; round r pseudo-labels with round r-1's fold ensemble at the r-th
threshold of the schedule and fine-tunes afresh with those clips in every fold's training part.
Each round is its own MLflow run, tagged with its round and the previous round's run id. The round
table (pseudo-labels kept per class, their precision where a truth file exists, CV and test WAF and
the change from the round before) is printed, written to `rounds.csv`/`rounds.json` and logged.

`views=cross` is co-training across modalities (`co_label`): each modality's view of the pool is labelled by a
model of the other modalities, and the student sees only that modality on those rows.

`encoders=[visual,audio]` takes each round's pseudo-labels into the encoders as well (`encoder_round`): the
labels of the whole pool train the visual encoder (alignment continues with a pseudo-label head) and the
adapter; a fusion model on the new encoders then labels the pool for the head. Labels for the head alone
cannot move what the frozen encoders see. `control=true` runs the same round without pseudo-labels.

Precision needs the truth of unlabeled clips, which a real corpus does not have; the synthetic
generator writes it to a hidden `.truth-unlabeled.csv` that only reports read (this table, `pseudo-label`'s line).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from mer_dist import dist
from mer_dist.config import (LABELS, AdaptConfig, AlignConfig, ConfigError, FinetuneConfig, PseudoConfig,
                             PseudoLabelConfig, SelfTrainConfig, load, save)
from mer_dist.data import synth
from mer_dist.io import write_csv_atomic, write_json_atomic, write_text_atomic
from mer_dist.tracking import Tracker, parent_of
from mer_dist.models.ensemble import read_metrics
from mer_dist.stages import run_stage
from mer_dist.train import pseudo, round_guard


def run(cfg: SelfTrainConfig) -> dict:
    out = Path(cfg.out)
    if cfg.encoders:
        _check_encoder_sources(cfg)
    truth = synth.read_truth(cfg.truth, cfg.finetune.data.shards)
    tracker = Tracker(cfg.finetune.tracking, out, "self-train", active=dist.detect().is_main,
                      tags={"rounds": cfg.rounds, "views": cfg.views,
                                                                        "encoders": ",".join(cfg.encoders) or "none"},
                      describe=f"rounds={cfg.rounds} views={cfg.views}" + (f" encoders={','.join(cfg.encoders)}"
                                                                            if cfg.encoders else "") +
                      f" seed={cfg.finetune.seed}", dataset=cfg.finetune.data.shards)
    with parent_of(tracker):    # every round's runs nest under this one
        rows, kept_round, model = _rounds(cfg, out, truth)
    if dist.detect().is_main:
        _report(cfg, out, rows, tracker, kept_round, model)
    return {"rounds": rows, "kept_round": kept_round, "model": model}


def _rounds(cfg: SelfTrainConfig, out: Path, truth: dict) -> tuple[list[dict], int, str]:
    """Every round's row, the round the guard kept and its model. A round starts from the kept round's model,
    pseudo-labels and encoders, so a rejected round costs its compute and nothing else."""
    rows, prev_model, prev_run, prev_pseudo = [], "", "", ""
    base = cfg.finetune         # its encoders change from round to round when `encoders` is set
    kept_round, kept = 0, None
    for r in range(cfg.rounds + 1):
        if kept is not None:
            prev_model, prev_pseudo, base = kept
        row: dict = {"round": r}
        pseudo_dir = ""
        tags = [*cfg.finetune.tracking.tags, f"self_train_round={r}", f"self_train_out={out.resolve()}"]
        if prev_run:
            tags.append(f"self_train_previous_run={prev_run}")
        tracking = dataclasses.replace(cfg.finetune.tracking, tags=tags)
        if r > 0:
            threshold = cfg.thresholds[min(r - 1, len(cfg.thresholds) - 1)]
            pseudo_dir = "" if cfg.control else out / f"pseudo{r}"     # control: no pseudo-label reaches the head
            label = lambda model, dst, view=(), thr=threshold: run_stage("pseudo-label", PseudoLabelConfig(  # noqa: E731
                model=model, shards=cfg.finetune.data.shards, split=cfg.finetune.pseudo.split, out=str(dst),
                threshold=thr, top_per_class=cfg.top_per_class, agree_with=cfg.agree_with,
                student_modalities=list(view), calibrate=cfg.calibrate, min_precision=cfg.min_precision,
                truth=cfg.truth, tracking=tracking))
            if cfg.encoders:
                base, enc_row = encoder_round(cfg, r, base, prev_model, tracking, label, truth)
                row |= enc_row
                if not cfg.control:     # the head's pseudo-labels come from a fusion model on the new encoders
                    labeller = dataclasses.replace(base, out=str(out / f"round{r}-encoders"), pseudo=_pseudo(base, ""),
                                                   tracking=tracking)
                    row["encoders_test_waf"] = run_stage("finetune", labeller).get(f"{base.test_split}_waf", -1.0)
                    prev_model = labeller.out
            if pseudo_dir:
                if cfg.views == "fusion":
                    summary = label(prev_model, pseudo_dir)
                else:
                    parts = [co_label(cfg, r, m, prev_pseudo, tracking, label) for m in cfg.finetune.modalities]
                    summary = pseudo.combine(parts, pseudo_dir) if dist.detect().is_main else {}
                    dist.barrier()
                    if truth:
                        row |= {f"precision_view_{p.name.rsplit('-', 1)[1]}": pseudo.precision(p, truth)["precision"]
                                for p in parts}
                row |= {"threshold": threshold, "kept": summary.get("kept", 0),
                        "expected_precision": summary.get("expected_precision", -1.0),
                        **{f"kept_{k}": v for k, v in summary.get("per_class", {}).items()}}
                if truth and summary:
                    row |= pseudo.precision(pseudo_dir, truth)
        ft = dataclasses.replace(base, out=str(out / f"round{r}"), pseudo=_pseudo(base, pseudo_dir), tracking=tracking)
        if r == 0 and cfg.start:
            ft = dataclasses.replace(ft, out=cfg.start)
            m = read_metrics(cfg.start)
        else:
            m = run_stage("finetune", ft)
        row |= {"cv_waf": m.get("cv_waf", -1.0), f"{ft.test_split}_waf": m.get(f"{ft.test_split}_waf", -1.0),
                "n_pseudo_trained": m.get("n_pseudo", 0)}
        if rows:
            row["test_waf_change"] = row[f"{ft.test_split}_waf"] - rows[-1][f"{ft.test_split}_waf"]
        row["guard"] = "start" if r == 0 else "off"
        if r > 0 and cfg.guard:
            d = round_guard.decide(kept[0], ft.out, cfg.guard_confidence, seed=cfg.finetune.seed)
            row |= {"guard": "kept" if d["keep"] else "rejected", "guard_gain": d["gain"], "guard_low": d["low"],
                    "guard_against_round": kept_round}
            print(f"self-train: guard: round {r} {'kept' if d['keep'] else 'rejected'}: unselected CV WAF "
                  f"{d['before']:.3f} -> {d['after']:.3f} ({d['gain']:+.3f}, {cfg.guard_confidence:.0%} lower bound "
                  f"{d['low']:+.3f}) against round {kept_round}", flush=True)
        rows.append(row)
        prev_run = m.get("mlflow_run_id", "")
        if row["guard"] != "rejected":
            kept_round, kept = r, (ft.out, pseudo_dir, base)
    if cfg.guard and cfg.rounds:
        print(f"self-train: guard: round {kept_round} kept -> {kept[0]}" + (
            "" if kept_round else " (no round beat plain fine-tuning by more than its spread: the input model stays)"),
            flush=True)
    return rows, kept_round, kept[0]


def _pseudo(ft: FinetuneConfig, folder) -> PseudoConfig:
    """`ft`'s pseudo-label settings with another directory ("" = none)."""
    return dataclasses.replace(ft.pseudo, dir=str(folder) if folder else "")


def encoder_round(cfg: SelfTrainConfig, r: int, ft, prev_model: str, tracking, label, truth: dict) -> tuple:
    """Round r's pseudo-labels (soft, every clip from `encoder_threshold` up, from round r-1's model) train the
    visual encoder (alignment continues from it: its own objectives plus the pseudo-label head) and re-adapt the
    teacher, each from its run's saved config.yaml. Returns the fine-tuning config on the new encoders and the
    row's entries. Under `control` neither sees a pseudo-label: the same compute, nothing learnt from the pool."""
    out, row = Path(cfg.out), {"align_steps": 0}
    pl = ""
    if not cfg.control:
        pl = str(out / f"pseudo{r}-encoders")
        row["kept_encoders"] = label(prev_model, pl, thr=cfg.encoder_threshold).get("kept", 0)
        if truth:
            row["precision_encoders"] = pseudo.precision(Path(pl), truth)["precision"]
    # the encoders' stages read the shards the pseudo-labels were made on (their names are that corpus's), leave
    # out the clips fine-tuning leaves out, and read the split it reads
    take = {"dir": pl, "split": ft.pseudo.split, "test_split": ft.pseudo.test_split, "transductive": ft.pseudo.transductive}
    if "visual" in cfg.encoders:
        a = load(AlignConfig, Path(ft.visual).parent / "config.yaml")
        loss = [x for x in a.loss if x.split(":")[0] != "pseudo"] + ([] if cfg.control else ["pseudo"])
        a = dataclasses.replace(a, out=str(out / f"align{r}"), loss=loss, tracking=tracking,
                                data=dataclasses.replace(a.data, shards=ft.data.shards),
                                pseudo=dataclasses.replace(a.pseudo, **take),
                                model=dataclasses.replace(a.model, init=str(ft.visual)),
                                train=dataclasses.replace(a.train, steps=cfg.align_steps, seed=ft.seed))
        out.mkdir(parents=True, exist_ok=True)
        save(a, out / f"align{r}.yaml")
        dist.launch_local(["align", "--config", str(out / f"align{r}.yaml")], cfg.align_procs)
        ft, row["align_steps"] = dataclasses.replace(ft, visual=str(Path(a.out) / "encoder.pt")), cfg.align_steps
    if "audio" in cfg.encoders:
        ad = load(AdaptConfig, Path(ft.teacher) / "config.yaml")
        ad = dataclasses.replace(ad, out=str(out / f"teacher{r}"), seed=ft.seed, tracking=tracking,
                                 data=dataclasses.replace(ad.data, shards=ft.data.shards),
                                 pseudo=dataclasses.replace(ad.pseudo, **take))
        run_stage("adapt-audio", ad)
        ft = dataclasses.replace(ft, teacher=ad.out)
    return ft, row


def _check_encoder_sources(cfg: SelfTrainConfig) -> None:
    """Before any round: the runs `encoder_round` reruns exist, and nothing else launches this process's ranks."""
    world = dist.detect().world_size
    if world > 1:
        raise ConfigError(f"config key 'encoders': expected a single-process self-train (it launches align under "
                          f"torchrun itself), got {world} ranks")
    ft = cfg.finetune
    if "visual" in cfg.encoders and (ft.visual == "random" or not (Path(ft.visual).parent / "config.yaml").is_file()):
        raise ConfigError(f"config key 'encoders': visual needs finetune.visual to be an align run's encoder.pt "
                          f"(its config.yaml beside it), got {ft.visual!r}")
    if "audio" in cfg.encoders and not (Path(ft.teacher) / "config.yaml").is_file():
        raise ConfigError(f"config key 'encoders': audio needs finetune.teacher to be an adapt-audio output (its "
                          f"config.yaml in it), not found: {Path(ft.teacher) / 'config.yaml'}")


def co_label(cfg: SelfTrainConfig, r: int, m: str, prev_pseudo, tracking, label) -> Path:
    """Co-training, one view: a fusion model of the other modalities (fine-tuned on the labeled clips and on the
    previous round's pseudo-labels of its own views) labels the pool for a student that sees `m` alone. Its
    errors come from faces, voices or words the student never sees, so they do not confirm the student's own."""
    others = [x for x in cfg.finetune.modalities if x != m]
    tags = [*tracking.tags, f"self_train_view={m}"]
    ft = dataclasses.replace(cfg.finetune, modalities=others, out=str(Path(cfg.out) / f"round{r - 1}-without-{m}"),
                             pseudo=_pseudo(cfg.finetune, prev_pseudo), tracking=dataclasses.replace(tracking, tags=tags))
    run_stage("finetune", ft)
    dst = Path(cfg.out) / f"pseudo{r}-{m}"
    label(ft.out, dst, (m,))
    return dst


def _encoder_cells(r: dict) -> str:
    kept = f"{r['kept_encoders']}" if "kept_encoders" in r else "-"
    kept += f" ({r['precision_encoders']:.3f})" if "precision_encoders" in r else ""
    return f"{kept} | " + (f"{r['encoders_test_waf']:.3f}" if "encoders_test_waf" in r else "-")


def _report(cfg: SelfTrainConfig, out: Path, rows: list[dict], tracker: Tracker, kept_round: int, model: str) -> None:
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "round", k))
    write_csv_atomic(out / "rounds.csv", keys, ([r.get(k, "") for k in keys] for r in rows))
    write_json_atomic(out / "rounds.json", rows)
    write_json_atomic(out / "kept.json", {"round": kept_round, "model": str(model), "guard": cfg.guard})
    save(cfg, out / "config.yaml")
    test = f"{cfg.finetune.test_split}_waf"
    enc = bool(cfg.encoders)
    lines = ["| round | threshold | pseudo-labels kept (per class) | precision (expected) | CV WAF | test WAF | change | guard |"
             + (" encoders: pseudo-labels (precision) | encoders: test WAF before the head's pseudo-labels |" if enc else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if enc else "")]
    for r in rows:
        per = " ".join(f"{lab[:3]} {r.get(f'kept_{lab}', 0)}" for lab in LABELS)
        prec = f"{r['precision']:.3f}" if r.get("precision", -1) >= 0 else "n/a"
        views = [f"{k[len('precision_view_'):]} {v:.3f}" for k, v in sorted(r.items()) if k.startswith("precision_view_")]
        prec += f" ({', '.join(views)})" if views else ""
        prec += f" ({r['expected_precision']:.3f})" if r.get("expected_precision", -1) >= 0 else ""
        lines.append(f"| {r['round']} | {r.get('threshold', '-')} | {r.get('kept', 0)} ({per}) | {prec} | "
                     f"{r['cv_waf']:.3f} | {r[test]:.3f} | {r.get('test_waf_change', 0.0):+.3f} | {round_guard.cell(r)} |"
                     + (f" {_encoder_cells(r)} |" if enc else ""))
    table = "\n".join(lines) + f"\n\nkept: round {kept_round} ({model})"
    write_text_atomic(out / "rounds.md", table + "\n")
    print("\nself-train rounds\n" + table, flush=True)
    tracker.params({"rounds": cfg.rounds, "thresholds": cfg.thresholds, "top_per_class": cfg.top_per_class,
                    "views": cfg.views, "encoders": cfg.encoders, "control": cfg.control})
    for r in rows:
        tracker.metrics({k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "round"}, r["round"])
    for f in ("rounds.csv", "rounds.md", "kept.json"):
        tracker.artifact(out / f)
    tracker.close()
