"""The never-hurt guard of `align`: alignment may spend the encoder on whatever audio and video share, and
on a corpus where that is lip motion, loudness and identity rather than emotion it makes the encoder worse.

The guard holds up to `guard.max_clips` labeled clips of `guard.split` (uint8 frames, the same on every rank)
and scores an encoder by the cross-validated WAF of a linear probe on its frozen clip features -- the initial
encoder before training, then each checkpoint. `align` keeps the best checkpoint out of rotation and exports
it; the initial encoder wins unless a checkpoint beats it by `guard.min_gain`. The test split is never read.
"""
from __future__ import annotations

import numpy as np
import torch

from mer_dist import dist
from mer_dist.config import LABELS, AlignConfig
from mer_dist.data.ingest import load_manifest, shard_urls
from mer_dist.data.stream import eval_loader, iterate
from mer_dist.eval.linear_probe import cv_waf


class Guard:
    def __init__(self, cfg: AlignConfig, device: torch.device, is_main: bool):
        self.cfg, self.device, self.is_main = cfg.guard, device, is_main
        self.seed = cfg.train.seed
        self.scores: dict[int, float] = {}
        self.batches, labels = [], []
        if cfg.guard.split in load_manifest(cfg.data.shards)["splits"]:
            data = type(cfg.data)(**{**vars(cfg.data), "workers": 0})
            for b in iterate(eval_loader(shard_urls(cfg.data.shards, cfg.guard.split), data, 0, 1)):
                has = b["label"] >= 0
                if has.any():
                    self.batches.append(b["frames"][has])
                    labels += b["label"][has].tolist()
                if len(labels) >= cfg.guard.max_clips:
                    break
        self.y = np.asarray(labels[: cfg.guard.max_clips], dtype=int)
        self.why_off = "" if len(self.y) >= 2 * len(LABELS) and len(set(self.y)) >= 2 else \
            f"split '{cfg.guard.split}' has {len(self.y)} labeled clip(s) of {len(set(self.y))} class(es) here " \
            f"(needs >= {2 * len(LABELS)} of 2 or more)"

    @property
    def active(self) -> bool:
        return not self.why_off

    @torch.no_grad()
    def score(self, embed, step: int) -> float:
        """CV probe WAF of `embed` (frames -> clip features) at `step`; every rank calls it (ZeRO-3 forwards run
        together), rank 0 fits the probe and every rank gets its answer."""
        feats = torch.cat([embed(f.to(self.device)).float().cpu() for f in self.batches])[: len(self.y)].numpy()
        waf = cv_waf(feats, self.y, self.cfg.folds, self.seed) if self.is_main else 0.0
        self.scores[step] = float(dist.all_gather_object(waf)[0])
        return self.scores[step]

    def best_step(self) -> int:
        """The step whose encoder to export: the best-scoring checkpoint, unless the initial encoder (step 0) is
        within `min_gain` of it (ties go to the earlier step)."""
        aligned = {s: v for s, v in self.scores.items() if s > 0}
        if not aligned:
            return 0
        best = max(sorted(aligned), key=lambda s: aligned[s])
        return 0 if 0 in self.scores and aligned[best] < self.scores[0] + self.cfg.min_gain else best

    def state(self) -> dict:
        return {"scores": {str(k): v for k, v in sorted(self.scores.items())}}

    def restore(self, state: dict | None) -> None:
        self.scores.update({int(k): float(v) for k, v in (state or {}).get("scores", {}).items()})

    def verdict(self, final: int) -> str:
        """One line for the log: what the probe said and which encoder encoder.pt is."""
        best = self.best_step()
        where = f"CV probe WAF on '{self.cfg.split}' ({len(self.y)} clips, {self.cfg.folds} folds)"
        trail = ", ".join(f"{v:.3f}@{s}" for s, v in sorted(self.scores.items()))
        if best == 0 and 0 in self.scores:
            return (f"align: guard: alignment did not help this encoder: {where} {trail}; encoder.pt is the initial "
                    f"encoder (step 0), not step {final} (guard.enabled=false keeps the aligned one)")
        kept = "the final one" if best == final else f"step {best}'s, not step {final}'s"
        return f"align: guard: {where} {trail}; encoder.pt is {kept}"
