"""`mer-dist probe-layers`: which HuBERT layers carry emotion? Linear probe per layer, WAF on a held-out part.

Features are streamed from the labeled train split, mean-pooled per layer on every rank (each rank
sees its own exact share), gathered on rank 0 and probed there. Test data is never touched.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mer_dist import dist
from mer_dist.config import ProbeConfig, save
from mer_dist.data.splits import holdout
from mer_dist.eval import plots
from mer_dist.eval.linear_probe import probe_scores, write_layers
from mer_dist.features import map_split
from mer_dist.models.teacher import build_hubert, hidden_states, masked_mean
from mer_dist.tracking import Tracker


def run(cfg: ProbeConfig) -> dict:
    env = dist.setup()
    out = Path(cfg.out)
    tracker = Tracker(cfg.tracking, out, "probe-layers", active=env.is_main,
                      tags={"world_size": env.world_size, "launcher": env.launcher, "model": cfg.model})
    model = build_hubert(cfg.model)

    def pooled(batch):
        with torch.inference_mode():
            hs, mask = hidden_states(model, batch["audio"], batch["audio_lens"])
            return torch.stack([masked_mean(h, mask) for h in hs], 1).numpy()   # [B, L+1, D]

    names, feats, labels = map_split(cfg.data.shards, "train", cfg.data, env, pooled, "probe: features")

    def probe_and_report() -> dict:     # rank 0 probes every layer; the others wait outside any collective
        x, y = np.stack(feats), np.asarray(labels)
        tr, va = holdout(names, y, cfg.val_fraction, cfg.seed)
        rows = []
        for layer in tqdm(range(x.shape[1]), desc="probe: layers"):
            rows.append({"layer": layer, **probe_scores(x[:, layer], y, tr, va, cfg.seed)})
        ranked = sorted((r for r in rows if r["layer"] > 0), key=lambda r: -r["waf"])
        top = sorted(r["layer"] for r in ranked[: cfg.top_k])
        result = {"model": cfg.model, "layers": rows, "top_k": top, "n_train": len(tr), "n_val": len(va),
                  "val_fraction": cfg.val_fraction, "seed": cfg.seed}
        write_layers(out, result)
        plots.layer_curve([r["layer"] for r in rows], [r["waf"] for r in rows], [r["accuracy"] for r in rows],
                          out / "layers.png", top)
        save(cfg, out / "config.yaml")
        tracker.params(cfg)
        for r in rows:
            tracker.metrics({"probe_waf": r["waf"], "probe_accuracy": r["accuracy"]}, step=r["layer"])
        for f in ("layers.csv", "layers.json", "layers.png", "config.yaml"):
            tracker.artifact(out / f)
        print("layer  WAF    acc")
        for r in rows:
            print(f"{r['layer']:>5}  {r['waf']:.3f}  {r['accuracy']:.3f}{'  *' if r['layer'] in top else ''}")
        print(f"probe-layers: top-{cfg.top_k} layers {top} -> {out / 'layers.json'}")
        print(json.dumps({"top_k": top}))
        return result

    result = dist.on_main(probe_and_report)
    tracker.close()
    dist.cleanup()
    return result
