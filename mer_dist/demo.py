"""`mer-dist demo`: the whole pipeline on a small synthetic corpus, alignment on 2 processes.

synth -> shard -> probe-layers -> adapt-audio -> align (torchrun, DeepSpeed ZeRO-2) -> finetune
(the ablation rows) -> evaluate, then a table of stage times and test WAF per row.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mer_dist import config as C
from mer_dist.tracking import default_uri
from mer_dist.train.dist import free_port

ROWS = [  # (row, description, modalities, visual, acoustic)
    ("a", "visual only, random-init encoder", ["v"], "random", "adapted"),
    ("b", "visual only, aligned encoder", ["v"], "aligned", "adapted"),
    ("c", "audio only, base teacher", ["a"], "random", "base"),
    ("d", "audio only, adapted teacher", ["a"], "random", "adapted"),
    ("e", "text only", ["t"], "random", "adapted"),
    ("f", "fusion a+v+t, aligned encoder", ["a", "v", "t"], "aligned", "adapted"),
    ("g", "fusion a+v+t, random encoder", ["a", "v", "t"], "random", "adapted"),
]


def run(cfg: C.DemoConfig) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_uri(out / "x"))
    times: dict[str, float] = {}

    def stage(name, fn):
        t0 = time.time()
        print(f"\n=== {name} ===", flush=True)
        r = fn()
        times[name] = time.time() - t0
        return r

    from mer_dist.data.ingest import write_shards
    from mer_dist.data.synth import generate
    from mer_dist.train import adapt, finetune, probe
    synth = C.SynthConfig(**{**vars(cfg.synth), "out": str(out / "corpus")})
    stage("synth", lambda: generate(synth))
    stage("shard", lambda: write_shards(C.ShardConfig(corpus=str(out / "corpus"), out=str(out / "shards"))))
    data = {"data.shards": str(out / "shards")}
    stage("probe-layers", lambda: probe.run(C.load(C.ProbeConfig, overrides={**data, "out": str(out / "probe")})))
    stage("adapt-audio", lambda: adapt.run(C.load(C.AdaptConfig, overrides={
        **data, "out": str(out / "teacher"), "probe": str(out / "probe"), "epochs": 15})))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.align_procs}",
           f"--master_port={free_port()}", "-m", "mer_dist", "align", "--shards", str(out / "shards"),
           "--teacher", str(out / "teacher"), "--out", str(out / "align"), "--steps", str(cfg.align_steps),
           "data.workers=1", "train.eval_every=40", f"target_space={cfg.align_target_space}"]
    stage("align", lambda: subprocess.run(cmd, check=True))
    results: dict[str, list[float]] = {}

    def ablation():
        for row, _, mods, visual, acoustic in ROWS:
            for seed in range(cfg.seeds):
                ft = C.load(C.FinetuneConfig, overrides={
                    **data, "teacher": str(out / "teacher"), "modalities": mods, "acoustic": acoustic, "seed": seed,
                    "folds": cfg.folds, "visual": str(out / "align" / "encoder.pt") if visual == "aligned" else "random",
                    "out": str(out / "models" / f"{row}-seed{seed}")})
                m = finetune.run(ft)
                results.setdefault(row, []).append(m["test_waf"])
    stage("finetune+evaluate", ablation)
    table = _table(results, times, cfg)
    print("\n" + table)
    (out / "RESULTS.md").write_text(table + "\n")
    print(f"\nLook at the runs:  mlflow ui --backend-store-uri {os.environ['MLFLOW_TRACKING_URI']} --host 127.0.0.1")
    return 0


def _table(results: dict[str, list[float]], times: dict[str, float], cfg: C.DemoConfig) -> str:
    lines = ["| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in times.items()]
    lines += ["", f"| row | model | test WAF (mean ± std over {cfg.seeds} seed(s)) |", "|---|---|---|"]
    for row, desc, *_ in ROWS:
        w = np.asarray(results.get(row, [np.nan]))
        lines.append(f"| ({row}) | {desc} | {w.mean():.3f} ± {w.std():.3f} |")
    return "\n".join(lines)

