"""`mer-dist demo`: the whole pipeline on a small synthetic corpus, alignment on 2 processes.

synth -> shard -> [pretrain-audio] -> probe-layers -> adapt-audio -> align (torchrun, DeepSpeed ZeRO-2; one run per alignment
variant and seed) -> finetune (the ablation rows) -> self-train (pseudo-labels on the unlabeled pool) ->
a table of stage times and test WAF per row, mean ± sd over seeds. Every number is computed by this run.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from mer_dist import config as C
from mer_dist.dist import launch_local
from mer_dist.eval import ablation
from mer_dist.io import write_json_atomic, write_text_atomic
from mer_dist.stages import run_stage
from mer_dist.train import round_guard
from mer_dist.train.checkpoint import read_summary
from mer_dist.tracking import Tracker, default_uri, parent_of

# alignment variants: name -> (what it is, align overrides). The first one is the product's default objective.
VARIANTS = {
    "infonce": ("InfoNCE, clip level, with the guard (default)", ["loss=infonce"]),
    # the controls run without the guard: they show what that training does, not what the guard makes of it
    "shuffled": ("InfoNCE, shuffled audio-video pairs (control)", ["loss=infonce", "pairing=shuffled", "guard.enabled=false"]),
    "base": ("InfoNCE, teacher without adapter (control)", ["loss=infonce", "acoustic=base", "guard.enabled=false"]),
    "mse-features": ("MSE onto layer features (the method's recipe)", ["loss=mse", "target_space=features"]),
    "mse-logits": ("MSE onto frame emotion logits", ["loss=mse", "target_space=logits"]),
    "kd": ("KD of frame + utterance posteriors", ["loss=kd"]),
    "kd+infonce": ("KD + InfoNCE", ["loss=kd,infonce"]),
    "posteriors": ("InfoNCE onto the teacher's clip emotion posteriors", ["loss=infonce", "infonce_target=posteriors"]),
    # teacher-independent: what the pool's video alone teaches (two augmented views of each clip contrasted)
    "views": ("two augmented views of each clip contrasted, no teacher", ["loss=views"]),
    "views+infonce": ("two views + InfoNCE onto the teacher", ["loss=infonce,views"]),
}
# self-training variants: name -> (what it is, self-train overrides)
SELF_TRAIN = {
    "fusion": ("the fusion model labels the pool (threshold 0.7, hard)", {"views": "fusion"}),
    "precision": ("the fusion model labels the pool, per class as many as its calibrated probabilities expect "
                  "to be right 60% of the time (soft)",
                  {"views": "fusion", "thresholds": "[0.0]", "min_precision": "0.6", "finetune.pseudo.soft": "true"}),
    "cross": ("co-training: a model without each modality labels the pool for it (all clips, soft)",
              {"views": "cross", "thresholds": "[0.0]", "finetune.pseudo.soft": "true"}),
    "encoders": ("pseudo-labels into the visual encoder, the adapter and the head",
                 {"encoders": "[visual,audio]"}),
    "encoders-control": ("control: that round's extra alignment and re-adaptation without pseudo-labels",
                         {"encoders": "[visual,audio]", "control": "true"}),
}
TOP_K_EPOCHS = 20      # end-to-end visual fine-tuning costs a forward+backward of the encoder per clip
SINGLE = [  # (row, description, modalities, acoustic)
    ("audio-base", "audio only, base teacher", ["a"], "base"),
    ("audio", "audio only, adapted teacher", ["a"], "adapted"),
    ("text", "text only", ["t"], "adapted"),
]


def run(cfg: C.DemoConfig) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for key, known in (("align_variants", VARIANTS), ("self_train_views", SELF_TRAIN),
                       ("single_rows", {row for row, *_ in SINGLE})):
        unknown = [v for v in getattr(cfg, key) if v not in known]
        if unknown:
            raise C.ConfigError(f"config key '{key}': unknown {unknown} (have {', '.join(known)})")
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_uri(out / "x"))
    parent = Tracker(C.TrackingConfig(), out, "demo", describe=f"seeds={cfg.seeds} variants={','.join(cfg.align_variants)}"
                     + (f" teacher={cfg.teacher}" if cfg.teacher != "weak" else ""), tags={"seeds": cfg.seeds})
    parent.params(cfg)
    with parent_of(parent):     # every stage's run nests under the demo's
        code = _run(cfg, out, parent)
    parent.close()
    return code


def _run(cfg: C.DemoConfig, out: Path, parent: Tracker) -> int:
    times: dict[str, float] = {}

    def stage(name, fn):
        t0 = time.time()
        print(f"\n=== {name} ===", flush=True)
        r = fn()
        times[name] = times.get(name, 0.0) + time.time() - t0
        return r

    from mer_dist.data.ingest import write_shards
    from mer_dist.data.synth import generate
    synth = C.SynthConfig(**{**vars(cfg.synth), "out": str(out / "corpus")})
    stage("synth", lambda: generate(synth))
    stage("shard", lambda: write_shards(C.ShardConfig(corpus=str(out / "corpus"), out=str(out / "shards"))))
    data = {"data.shards": str(out / "shards")}
    hubert = "tiny:hubert"
    if cfg.audio_pretrain_steps > 0:     # HuBERT's first iteration on the corpus audio instead of random weights
        hubert = str(out / "hubert-it1")
        stage("pretrain-audio", lambda: run_stage("pretrain-audio", C.load(C.PretrainAudioConfig, overrides={
            **data, "out": hubert, "steps": cfg.audio_pretrain_steps})))
    stage("probe-layers", lambda: run_stage("probe-layers", C.load(C.ProbeConfig, overrides={
        **data, "out": str(out / "probe"), "model": hubert})))
    oracle = {}
    if cfg.teacher == "oracle":     # the control: the pool's true labels join adaptation (test clips never do)
        oracle = {"pseudo.dir": str(_oracle_labels(out / "corpus", out / "oracle-labels")), "pseudo.weight": 1.0,
                  "pseudo.soft": False}
    stage("adapt-audio", lambda: run_stage("adapt-audio", C.load(C.AdaptConfig, overrides={
        **data, "out": str(out / "teacher"), "probe": str(out / "probe"), "epochs": 15, "model": hubert, **oracle})))

    def align(variant: str, seed: int) -> Path:
        dst = out / "align" / f"{variant}-seed{seed}"
        launch_local(["align", "--shards", str(out / "shards"), "--teacher", str(out / "teacher"), "--out", str(dst),
                      "--steps", str(cfg.align_steps), "data.workers=1", "train.eval_every=40", f"train.seed={seed}",
                      *VARIANTS[variant][1]], cfg.align_procs)
        return dst / "encoder.pt"

    def ft(row: str, seed: int, mods: list[str], visual: str, acoustic: str = "adapted", **extra) -> dict:
        return run_stage("finetune", C.load(C.FinetuneConfig, overrides={
            **data, "teacher": str(out / "teacher"), "modalities": mods, "acoustic": acoustic, "seed": seed,
            "folds": cfg.folds, "visual": visual, "out": str(out / "models" / f"{row}-seed{seed}"),
            # the MLflow model is logged for the row a user would deploy: fusion with the default encoder
            "tracking.log_model": row == f"fusion-{cfg.align_variants[0]}", **extra}))

    results: dict[str, list[float]] = {}
    cv: dict[str, list[float]] = {}         # the same rows' CV WAF on the labeled split: what `ablate` judges by
    rounds: list[list[dict]] = []
    for seed in range(cfg.seeds):
        encoders = {v: stage("align", lambda v=v: str(align(v, seed))) for v in cfg.align_variants}

        def finetune_rows():
            for row, _, mods, acoustic in (r for r in SINGLE if r[0] in cfg.single_rows):
                results.setdefault(row, []).append(ft(row, seed, mods, "random", acoustic)["test_waf"])
            # "<variant>@last": the final step's encoder where the guard kept another one (else the same numbers)
            for name, visual in [("random", "random"), *encoders.items(), *last_step(encoders).items()]:
                for mods, kind in ((["v"], "visual"), (["a", "v", "t"], "fusion")):
                    row = f"{kind}/{name}"
                    same = name.endswith("@last") and Path(visual).name == "encoder.pt"    # the guard kept the last step
                    m = {"test_waf": results[row[:-5]][-1], "cv_waf": cv[row[:-5]][-1]} if same else \
                        ft(row.replace("/", "-").replace("@", "-"), seed, mods, visual)
                    results.setdefault(row, []).append(m["test_waf"])
                    cv.setdefault(row, []).append(m["cv_waf"])
            if cfg.visual_top_k:   # the encoder's top block + temporal head train with the classifier
                for name, visual in (("random", "random"), (cfg.align_variants[0], encoders[cfg.align_variants[0]])):
                    row = f"visual-top_k/{name}"
                    results.setdefault(row, []).append(ft(row.replace("/", "-"), seed, ["v"], visual, visual_train="top_k",
                                                          epochs=TOP_K_EPOCHS)["test_waf"])
        stage("finetune+evaluate", finetune_rows)
        for view in cfg.self_train_views if cfg.self_train_rounds > 0 else []:
            st = C.load(C.SelfTrainConfig, overrides={
                **{f"finetune.{k}": v for k, v in data.items()}, "finetune.teacher": str(out / "teacher"),
                "finetune.visual": encoders[cfg.align_variants[0]], "finetune.seed": seed,
                "finetune.folds": cfg.folds, "rounds": cfg.self_train_rounds,
                "out": str(out / f"self-train-{view}-seed{seed}"),
                "start": str(out / "models" / f"fusion-{cfg.align_variants[0]}-seed{seed}"),   # round 0 = that row
                "align_steps": cfg.align_steps, "align_procs": cfg.align_procs,
                **SELF_TRAIN[view][1]})
            done = stage("self-train", lambda st=st: run_stage("self-train", st))
            rows = done["rounds"]
            rounds.append({"view": view, "seed": seed, "rows": rows, "kept_round": done["kept_round"]})
            # what the product returns: the round its guard kept (round 0 when no round beat its spread)
            results.setdefault(f"self-train/{view}", []).append(rows[done["kept_round"]]["test_waf"])
    if cfg.ablate_seeds:     # the control table a user runs on their own corpus, on this one
        v0 = cfg.align_variants[0]
        stage("ablate", lambda: run_stage("ablate", C.load(C.AblateConfig, overrides={
            "shards": str(out / "shards"), "teacher": str(out / "teacher"), "aligned": str(out / "align" / f"{v0}-seed0"),
            "shuffled": str(out / "align" / "shuffled-seed0") if "shuffled" in cfg.align_variants else "",
            # visual only, 30 epochs a cell (finetune keeps each fold's best epoch): the demo stays under 10 minutes
            "views": ["v"], "seeds": cfg.ablate_seeds, "folds": cfg.folds, "epochs": 30, "procs": cfg.align_procs,
            "out": str(out / "ablate")})))
    table = _table(results, times, rounds, cfg) + _verdicts(cv, cfg)
    print("\n" + table)
    write_text_atomic(out / "RESULTS.md", table + "\n")
    guard = {v: [read_summary(out / "align" / f"{v}-seed{s}").get("encoder_step")
                 for s in range(cfg.seeds)] for v in cfg.align_variants}
    write_json_atomic(out / "results.json", {"test_waf": results, "cv_waf": cv, "encoder_step": guard,
                                             "self_train": rounds, "seconds": times})
    parent.artifact(out / "RESULTS.md")
    print(f"\nLook at the runs:  mlflow ui --backend-store-uri {os.environ['MLFLOW_TRACKING_URI']} --host 127.0.0.1")
    return 0


def last_step(encoders: dict[str, str]) -> dict[str, str]:
    """"<variant>@last" -> the final step's encoder of each guarded variant: encoder-last.pt where the guard kept
    another step, else encoder.pt itself (unguarded variants have no such row)."""
    out = {}
    for v, path in encoders.items():
        if "guard.enabled=false" not in VARIANTS[v][1]:
            last = Path(path).with_name("encoder-last.pt")
            out[f"{v}@last"] = str(last if last.is_file() else path)
    return out


def _oracle_labels(corpus: Path, out: Path) -> Path:
    """A pseudo-label directory holding the synthetic pool's true emotions (one-hot): the oracle control only."""
    import csv

    from mer_dist.train.pseudo import write
    with open(corpus / C.TRUTH_FILE, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = [r["name"] for r in rows]
    probs = np.eye(len(C.LABELS))[[C.LABEL_TO_ID[r["discrete"]] for r in rows]]
    write(out, names, probs, [""] * len(names), np.arange(len(names)), {"source_model": "oracle: the generator's truth",
          "kept": len(names)}, probs[None])
    return out


def _verdicts(cv: dict[str, list[float]], cfg: C.DemoConfig) -> str:
    """`ablate`'s verdict on the demo's own rows (CV WAF on the labeled split, over the seeds)."""
    if cfg.seeds < 2:
        return "\n\n(one seed: no verdict; `mer-dist ablate` or seeds >= 2 says whether alignment helped)"
    lines = ["", "", "Did alignment help? (`mer-dist ablate`'s rule, on CV WAF of the labeled split)", ""]
    for kind in ("visual", "fusion"):
        for v in cfg.align_variants:
            word, diff, margin = ablation.verdict(cv[f"{kind}/{v}"], cv[f"{kind}/random"])
            lines.append(f"- {kind}, {VARIANTS[v][0]}: {word} ({diff:+.3f} over random init, margin ±{margin:.3f})")
    return "\n".join(lines)


def _table(results: dict[str, list[float]], times: dict[str, float], rounds: list[list[dict]], cfg: C.DemoConfig) -> str:
    lines = ["| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in times.items()]
    head = [f"| model | test WAF (mean ± sd over {cfg.seeds} seed(s)) | per seed |", "|---|---|---|"]
    lines += ["", "Single modalities", "", *head]
    lines += [ablation.row(desc, results[row]) for row, desc, *_ in SINGLE if row in results]
    for kind, mods in (("visual", "visual only (frozen encoder)"), ("fusion", "fusion a+v+t")):
        lines += ["", mods, "", *head, ablation.row("random-init encoder", results[f"{kind}/random"])]
        lines += [ablation.row(f"aligned: {VARIANTS[v][0]}", results[f"{kind}/{v}"]) for v in cfg.align_variants]
        lines += [ablation.row(f"aligned: {VARIANTS[v[:-5]][0]}, last step (guard off)", results[f"{kind}/{v}"])
                  for v in sorted(k.split("/", 1)[1] for k in results if k.startswith(f"{kind}/") and k.endswith("@last"))]
    if cfg.visual_top_k:
        lines += ["", f"visual only, top block + temporal head fine-tuned end to end ({TOP_K_EPOCHS} epochs)", "", *head,
                  ablation.row("random-init encoder", results["visual-top_k/random"]),
                  ablation.row(f"aligned: {VARIANTS[cfg.align_variants[0]][0]}", results[f"visual-top_k/{cfg.align_variants[0]}"])]
    if rounds:
        lines += ["", f"Self-training on the unlabeled pool ({cfg.self_train_rounds} round(s)) on top of fusion with the "
                  f"{cfg.align_variants[0]} encoder", "", *head,
                  ablation.row(f"fusion a+v+t, aligned ({cfg.align_variants[0]}), no self-training (round 0)",
                       results[f"fusion/{cfg.align_variants[0]}"])]
        lines += [ablation.row(f"after self-training: {SELF_TRAIN[v][0]} (the round its guard kept)",
                               results[f"self-train/{v}"]) for v in cfg.self_train_views]
        lines += ["", "| views | seed | round | pseudo-labels kept | precision | CV WAF | test WAF | guard |",
                  "|---|---|---|---|---|---|---|---|"]
        for run in rounds:
            for r in run["rows"]:
                prec = f"{r['precision']:.3f}" if r.get("precision", -1) >= 0 else "-"
                lines.append(f"| {run['view']} | {run['seed']} | {r['round']} | {r.get('kept', 0)} | {prec} | "
                             f"{r['cv_waf']:.3f} | {r['test_waf']:.3f} | {round_guard.cell(r)} |")
    return "\n".join(lines)
