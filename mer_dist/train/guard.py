"""The never-hurt guard of `align`: alignment may spend the encoder on whatever audio and video share, and
on a corpus where that is lip motion, loudness and identity rather than emotion it makes the encoder worse.

The guard takes up to `guard.max_clips` labeled clips of `guard.split` (each rank holds the uint8 frames of its
share of the batches) and scores an encoder by the out-of-fold WAF of a probe on its frozen clip features,
gathered from the ranks -- the initial encoder before training, then each checkpoint. The probe is finetune's own
visual-only head (`guard.probe=head`): what the encoder is used for next, so the guard scores what the user will
see; a standardised logistic probe (`linear`) favoured random-init features and threw real gains away. `align`
keeps the best checkpoint out of rotation and exports it; the initial encoder wins unless a checkpoint beats it by
`guard.min_gain`. The test split is never read.
"""
from __future__ import annotations

import numpy as np
import torch

from mer_dist import dist
from mer_dist.config import LABELS, AlignConfig
from mer_dist.data.ingest import load_manifest, shard_urls
from mer_dist.data.stream import eval_loader, iterate
from mer_dist.eval.linear_probe import cv_waf
from mer_dist.train.folds import head_cv_waf


def choose(scores: dict[int, float], min_gain: float) -> int:
    """The step whose encoder to export: the best-scoring checkpoint, unless the initial encoder (step 0) is
    within `min_gain` of it (ties go to the earlier step)."""
    aligned = {s: v for s, v in scores.items() if s > 0}
    if not aligned:
        return 0
    best = max(sorted(aligned), key=lambda s: aligned[s])
    return 0 if 0 in scores and aligned[best] < scores[0] + min_gain else best


class Guard:
    def __init__(self, cfg: AlignConfig, device: torch.device, rank: int, world: int):
        self.cfg, self.device, self.rank, self.world = cfg.guard, device, rank, world
        self.seed = cfg.train.seed
        self.scores: dict[int, float] = {}
        self.batches: dict[int, torch.Tensor] = {}      # batch index -> frames: this rank's share (i % world)
        labels, n = [], 0
        if cfg.guard.split in load_manifest(cfg.data.shards)["splits"]:
            data = type(cfg.data)(**{**vars(cfg.data), "workers": 0})
            for b in iterate(eval_loader(shard_urls(cfg.data.shards, cfg.guard.split), data, 0, 1)):
                keep = torch.nonzero(b["label"] >= 0).flatten()[: cfg.guard.max_clips - len(labels)]
                if len(keep):
                    if n % world == rank or n == 0:       # batch 0 everywhere: what a rank out of batches repeats
                        self.batches[n] = b["frames"][keep]
                    labels += b["label"][keep].tolist()
                    n += 1
                if len(labels) >= cfg.guard.max_clips:
                    break
        self.n_batches = n
        self.y = np.asarray(labels, dtype=int)
        self.why_off = "" if len(self.y) >= 2 * len(LABELS) and len(set(self.y)) >= 2 else \
            f"split '{cfg.guard.split}' has {len(self.y)} labeled clip(s) of {len(set(self.y))} class(es) here " \
            f"(needs >= {2 * len(LABELS)} of 2 or more)"

    @property
    def active(self) -> bool:
        return not self.why_off

    @torch.no_grad()
    def score(self, embed, step: int) -> float:
        """CV probe WAF of `embed` (frames -> clip features) at `step`. Every rank calls it and runs the same number
        of forwards (ZeRO-3 gathers parameters in each: a rank out of batches repeats one); rank 0 fits the probe
        on the features gathered onto it and every rank gets its answer."""
        mine = [i for i in sorted(self.batches) if i % self.world == self.rank]
        feats = {}
        for j in range(-(-self.n_batches // self.world)):
            i = mine[j] if j < len(mine) else 0
            f = embed(self.batches[i].to(self.device))
            if j < len(mine):
                feats[i] = f.float().cpu().numpy()
        parts = dist.gather_to_main(feats)

        def fit() -> float:     # rank 0; the others wait outside any collective (a head per fold takes a while)
            merged = {i: f for part in parts for i, f in part.items()}
            x = np.concatenate([merged[i] for i in range(self.n_batches)])
            return float((head_cv_waf if self.cfg.probe == "head" else cv_waf)(x, self.y, self.cfg.folds, self.seed))
        self.scores[step] = float(dist.on_main(fit))
        return self.scores[step]

    def best_step(self) -> int:
        return choose(self.scores, self.cfg.min_gain)

    def state(self) -> dict:
        return {"scores": {str(k): v for k, v in sorted(self.scores.items())}}

    def restore(self, state: dict | None) -> None:
        self.scores.update({int(k): float(v) for k, v in (state or {}).get("scores", {}).items()})

    def verdict(self, final: int) -> str:
        """One line for the log: what the probe said and which encoder encoder.pt is."""
        best = self.best_step()
        where = f"CV {self.cfg.probe} probe WAF on '{self.cfg.split}' ({len(self.y)} clips, {self.cfg.folds} folds)"
        trail = ", ".join(f"{v:.3f}@{s}" for s, v in sorted(self.scores.items()))
        if best == 0 and 0 in self.scores:
            return (f"align: guard: alignment did not help this encoder: {where} {trail}; encoder.pt is the initial "
                    f"encoder (step 0), not step {final} (guard.enabled=false keeps the aligned one)")
        kept = "the final one" if best == final else f"step {best}'s, not step {final}'s"
        return f"align: guard: {where} {trail}; encoder.pt is {kept}"
