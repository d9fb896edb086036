"""`mer-dist demo`: the whole pipeline on a small synthetic corpus, alignment on 2 processes.

synth -> shard -> [pretrain-audio] -> probe-layers -> adapt-audio -> align (torchrun, DeepSpeed ZeRO-2; one run per alignment
variant and seed) -> finetune (the ablation rows) -> self-train (pseudo-labels on the unlabeled pool) ->
a table of stage times and test WAF per row, mean ± sd over seeds. Every number is computed by this run.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from mer_dist import config as C
from mer_dist.dist import launch_local
from mer_dist.tracking import default_uri

# alignment variants: name -> (what it is, align overrides). The first one is the product's default objective.
VARIANTS = {
    "infonce": ("InfoNCE, clip level (default)", ["loss=infonce"]),
    "shuffled": ("InfoNCE, shuffled audio-video pairs (control)", ["loss=infonce", "pairing=shuffled"]),
    "base": ("InfoNCE, teacher without adapter (control)", ["loss=infonce", "acoustic=base"]),
    "mse-features": ("MSE onto layer features (the method's recipe)", ["loss=mse", "target_space=features"]),
    "mse-logits": ("MSE onto frame emotion logits", ["loss=mse", "target_space=logits"]),
    "kd": ("KD of frame + utterance posteriors", ["loss=kd"]),
    "kd+infonce": ("KD + InfoNCE", ["loss=kd,infonce"]),
}
# self-training variants: name -> (what it is, self-train overrides)
SELF_TRAIN = {
    "fusion": ("the fusion model labels the pool (threshold 0.7, hard)", {"views": "fusion"}),
    "cross": ("co-training: a model without each modality labels the pool for it (all clips, soft)",
              {"views": "cross", "thresholds": "[0.0]", "finetune.pseudo_soft": "true"}),
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
    for key, known in (("align_variants", VARIANTS), ("self_train_views", SELF_TRAIN)):
        unknown = [v for v in getattr(cfg, key) if v not in known]
        if unknown:
            raise C.ConfigError(f"config key '{key}': unknown {unknown} (have {', '.join(known)})")
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_uri(out / "x"))
    times: dict[str, float] = {}

    def stage(name, fn):
        t0 = time.time()
        print(f"\n=== {name} ===", flush=True)
        r = fn()
        times[name] = times.get(name, 0.0) + time.time() - t0
        return r

    from mer_dist.data.ingest import write_shards
    from mer_dist.data.synth import generate
    from mer_dist.train import adapt, finetune, probe, selftrain
    synth = C.SynthConfig(**{**vars(cfg.synth), "out": str(out / "corpus")})
    stage("synth", lambda: generate(synth))
    stage("shard", lambda: write_shards(C.ShardConfig(corpus=str(out / "corpus"), out=str(out / "shards"))))
    data = {"data.shards": str(out / "shards")}
    hubert = "tiny:hubert"
    if cfg.audio_pretrain_steps > 0:     # HuBERT's first iteration on the corpus audio instead of random weights
        from mer_dist.train import pretrain_audio
        hubert = str(out / "hubert-it1")
        stage("pretrain-audio", lambda: pretrain_audio.run(C.load(C.PretrainAudioConfig, overrides={
            **data, "out": hubert, "steps": cfg.audio_pretrain_steps})))
    stage("probe-layers", lambda: probe.run(C.load(C.ProbeConfig, overrides={
        **data, "out": str(out / "probe"), "model": hubert})))
    stage("adapt-audio", lambda: adapt.run(C.load(C.AdaptConfig, overrides={
        **data, "out": str(out / "teacher"), "probe": str(out / "probe"), "epochs": 15, "model": hubert})))

    def align(variant: str, seed: int) -> Path:
        dst = out / "align" / f"{variant}-seed{seed}"
        launch_local(["align", "--shards", str(out / "shards"), "--teacher", str(out / "teacher"), "--out", str(dst),
                      "--steps", str(cfg.align_steps), "data.workers=1", "train.eval_every=40", f"train.seed={seed}",
                      *VARIANTS[variant][1]], cfg.align_procs)
        return dst / "encoder.pt"

    def ft(row: str, seed: int, mods: list[str], visual: str, acoustic: str = "adapted", **extra) -> dict:
        return finetune.run(C.load(C.FinetuneConfig, overrides={
            **data, "teacher": str(out / "teacher"), "modalities": mods, "acoustic": acoustic, "seed": seed,
            "folds": cfg.folds, "visual": visual, "out": str(out / "models" / f"{row}-seed{seed}"), **extra}))

    results: dict[str, list[float]] = {}
    rounds: list[list[dict]] = []
    for seed in range(cfg.seeds):
        encoders = {v: stage("align", lambda v=v: str(align(v, seed))) for v in cfg.align_variants}

        def ablation():
            for row, _, mods, acoustic in SINGLE:
                results.setdefault(row, []).append(ft(row, seed, mods, "random", acoustic)["test_waf"])
            for name, visual in [("random", "random"), *encoders.items()]:
                for mods, kind in ((["v"], "visual"), (["a", "v", "t"], "fusion")):
                    row = f"{kind}/{name}"
                    results.setdefault(row, []).append(ft(row.replace("/", "-"), seed, mods, visual)["test_waf"])
            if cfg.visual_top_k:   # the encoder's top block + temporal head train with the classifier
                for name, visual in (("random", "random"), (cfg.align_variants[0], encoders[cfg.align_variants[0]])):
                    row = f"visual-top_k/{name}"
                    results.setdefault(row, []).append(ft(row.replace("/", "-"), seed, ["v"], visual, visual_train="top_k",
                                                          epochs=TOP_K_EPOCHS)["test_waf"])
        stage("finetune+evaluate", ablation)
        for view in cfg.self_train_views if cfg.self_train_rounds > 0 else []:
            st = C.load(C.SelfTrainConfig, overrides={
                **{f"finetune.{k}": v for k, v in data.items()}, "finetune.teacher": str(out / "teacher"),
                "finetune.visual": encoders[cfg.align_variants[0]], "finetune.seed": seed,
                "finetune.folds": cfg.folds, "rounds": cfg.self_train_rounds,
                "out": str(out / f"self-train-{view}-seed{seed}"),
                "start": str(out / "models" / f"fusion-{cfg.align_variants[0]}-seed{seed}"),   # round 0 = that row
                "align_steps": cfg.align_steps, "align_procs": cfg.align_procs,
                **SELF_TRAIN[view][1]})
            rows = stage("self-train", lambda st=st: selftrain.run(st))["rounds"]
            rounds.append({"view": view, "seed": seed, "rows": rows})
            results.setdefault(f"self-train/{view}", []).append(rows[-1]["test_waf"])
    table = _table(results, times, rounds, cfg)
    print("\n" + table)
    (out / "RESULTS.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"test_waf": results, "self_train": rounds, "seconds": times}, indent=1))
    print(f"\nLook at the runs:  mlflow ui --backend-store-uri {os.environ['MLFLOW_TRACKING_URI']} --host 127.0.0.1")
    return 0


def _row(name: str, values: list[float]) -> str:
    w = np.asarray(values, dtype=float)
    return f"| {name} | {w.mean():.3f} ± {w.std(ddof=1) if len(w) > 1 else 0.0:.3f} | {', '.join(f'{v:.3f}' for v in w)} |"


def _table(results: dict[str, list[float]], times: dict[str, float], rounds: list[list[dict]], cfg: C.DemoConfig) -> str:
    lines = ["| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in times.items()]
    head = [f"| model | test WAF (mean ± sd over {cfg.seeds} seed(s)) | per seed |", "|---|---|---|"]
    lines += ["", "Single modalities", "", *head]
    lines += [_row(desc, results[row]) for row, desc, *_ in SINGLE]
    for kind, mods in (("visual", "visual only (frozen encoder)"), ("fusion", "fusion a+v+t")):
        lines += ["", mods, "", *head, _row("random-init encoder", results[f"{kind}/random"])]
        lines += [_row(f"aligned: {VARIANTS[v][0]}", results[f"{kind}/{v}"]) for v in cfg.align_variants]
    if cfg.visual_top_k:
        lines += ["", f"visual only, top block + temporal head fine-tuned end to end ({TOP_K_EPOCHS} epochs)", "", *head,
                  _row("random-init encoder", results["visual-top_k/random"]),
                  _row(f"aligned: {VARIANTS[cfg.align_variants[0]][0]}", results[f"visual-top_k/{cfg.align_variants[0]}"])]
    if rounds:
        lines += ["", f"Self-training on the unlabeled pool ({cfg.self_train_rounds} round(s)) on top of fusion with the "
                  f"{cfg.align_variants[0]} encoder", "", *head,
                  _row(f"fusion a+v+t, aligned ({cfg.align_variants[0]}), no self-training (round 0)",
                       results[f"fusion/{cfg.align_variants[0]}"])]
        lines += [_row(f"after self-training: {SELF_TRAIN[v][0]}", results[f"self-train/{v}"]) for v in cfg.self_train_views]
        lines += ["", "| views | seed | round | pseudo-labels kept | precision | CV WAF | test WAF |",
                  "|---|---|---|---|---|---|---|"]
        for run in rounds:
            for r in run["rows"]:
                prec = f"{r['precision']:.3f}" if r.get("precision", -1) >= 0 else "-"
                lines.append(f"| {run['view']} | {run['seed']} | {r['round']} | {r.get('kept', 0)} | {prec} | "
                             f"{r['cv_waf']:.3f} | {r['test_waf']:.3f} |")
    return "\n".join(lines)
