"""Attention fusion of per-modality utterance features -> 6 emotions.

Each modality is projected to a common width and becomes one token (+ a learned modality
embedding). `attention`: a learned query attends over the present tokens (multi-head);
`weights`: the MER2024 baseline's learned per-modality weights (softmax over present ones).
Missing modalities (no audio stream, empty transcript) are masked out; modality dropout during
training teaches the model to cope.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mer_dist.config import LABELS, FusionConfig


class FusionModel(nn.Module):
    def __init__(self, dims: dict[str, int], cfg: FusionConfig):
        super().__init__()
        self.modalities, self.cfg = list(dims), cfg
        w = cfg.width
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(d), nn.Dropout(cfg.dropout), nn.Linear(d, w), nn.GELU())
                                   for m, d in dims.items()})
        self.mod_emb = nn.Parameter(torch.zeros(len(dims), w))
        if cfg.kind == "attention":
            self.query = nn.Parameter(torch.randn(1, 1, w) * 0.02)
            self.attn = nn.MultiheadAttention(w, cfg.heads, dropout=cfg.dropout, batch_first=True)
        else:
            self.logit_w = nn.Parameter(torch.zeros(len(dims)))
        self.head = nn.Sequential(nn.LayerNorm(w), nn.Dropout(cfg.dropout), nn.Linear(w, len(LABELS)))

    def forward(self, feats: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """feats[m]: [B, D_m]; present: bool [B, M] (M = len(self.modalities)) -> logits [B, 6]."""
        tokens = torch.stack([self.proj[m](feats[m]) for m in self.modalities], 1) + self.mod_emb
        present = present.clone()
        if self.training and self.cfg.modality_dropout > 0 and len(self.modalities) > 1:
            drop = torch.rand(present.shape, device=present.device) < self.cfg.modality_dropout
            keep_one = torch.zeros_like(drop)
            keep_one[torch.arange(len(drop)), torch.randint(len(self.modalities), (len(drop),))] = True
            present &= ~drop | keep_one
        present[~present.any(1)] = True   # nothing at all: fall back to whatever features we have
        if self.cfg.kind == "attention":
            q = self.query.expand(len(tokens), -1, -1)
            fused, _ = self.attn(q, tokens, tokens, key_padding_mask=~present)
            fused = fused[:, 0]
        else:
            w = self.logit_w.expand(len(tokens), -1).masked_fill(~present, float("-inf")).softmax(-1)
            fused = (w.unsqueeze(-1) * tokens).sum(1)
        return self.head(fused)


@torch.no_grad()
def predict_probs(model: FusionModel, feats: dict[str, np.ndarray], present: np.ndarray) -> np.ndarray:
    """Class probabilities [N, 6] of one fusion model (eval mode)."""
    model.eval()
    logits = model({m: torch.from_numpy(f) for m, f in feats.items()}, torch.from_numpy(present))
    return logits.softmax(-1).numpy()


def fold_probs(states: list[dict], dims: dict[str, int], cfg: FusionConfig, feats: dict[str, np.ndarray],
               present: np.ndarray) -> np.ndarray:
    """Class probabilities of each fold model [K, N, 6]; their mean is the K-fold ensemble's prediction."""
    out = []
    for state in states:
        model = FusionModel(dims, cfg)
        model.load_state_dict(state)
        out.append(predict_probs(model, feats, present))
    return np.stack(out)


class VisualFusion(nn.Module):
    """Fusion whose visual token comes from a visual encoder trained with it (`finetune visual_train=top_k|full`)
    instead of a cached frozen feature: `encoder.embed(frames)` replaces feats["v"]."""

    def __init__(self, encoder: nn.Module, fusion: FusionModel):
        super().__init__()
        self.encoder, self.fusion = encoder, fusion

    def forward(self, feats: dict[str, torch.Tensor], present: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.fusion({**feats, "v": self.encoder.embed(frames)}, present)
