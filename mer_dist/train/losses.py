"""Alignment objectives: what the video encoder learns from the frozen audio teacher.

Each term is a function on plain tensors (unit-tested on hand-built values) plus, where it needs
trainable parts of its own (the student's emotion head for `kd`, projection heads and a temperature
for `infonce`), a small module. `create_objective` builds the weighted sum that `align` trains:

* `mse` / `cosine`: regress the encoder's frame predictions onto the teacher's frame targets in
  `align.target_space` (layer features, frame emotion logits, or both) -- the method's recipe;
* `kd`: soft distillation of the teacher's frame and utterance emotion posteriors,
  KL(teacher || student) at temperature tau, tau^2-scaled, optionally weighted by the teacher's confidence;
* `infonce`: symmetric contrastive loss between clip-level video and audio embeddings, negatives
  gathered across ranks with a differentiable all-gather (the number of negatives grows with the world);
* `pseudo`: self-training inside alignment -- cross-entropy of a clip-level emotion head onto the
  pseudo-labels (`mer-dist pseudo-label`) of the clips that have one (`align.pseudo`), so the unlabeled
  pool teaches the encoder what the fusion model already knows of emotion from all three modalities;
* `views`: no teacher at all -- the clip embeddings of two augmented views of each clip (`train/augment.py`)
  contrasted with the same gathered InfoNCE, so the pool teaches the encoder from its video alone.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from mer_dist.config import LossTerm
from mer_dist.models.teacher import masked_mean


def regression_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, kind: str = "mse",
                    frame_weight: float = 1.0, utterance_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame-level (masked where the audio is padding) + utterance-level regression; returns (loss, cosine)."""
    m = valid.to(pred.dtype)
    n = m.sum().clamp(min=1)
    cos = F.cosine_similarity(pred, target, dim=-1)
    frame = ((pred - target) ** 2).mean(-1) if kind == "mse" else 1 - cos
    loss = frame_weight * (frame * m).sum() / n
    if utterance_weight > 0:
        up, ut = masked_mean(pred, valid), masked_mean(target, valid)
        utt = ((up - ut) ** 2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(up, ut, dim=-1)
        loss = loss + utterance_weight * utt.mean()
    return loss, (cos * m).sum() / n


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """1 - normalised entropy of softmax(logits): 0 for a flat posterior, 1 for a certain one."""
    logp = logits.float().log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return 1 - ent / math.log(logits.shape[-1])


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, tau: float = 2.0,
            frame_weight: float = 1.0, utterance_weight: float = 1.0,
            confidence_weighting: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) of frame logits [B,F,C] at temperature tau (x tau^2, Hinton et al.), masked by
    valid [B,F]; plus the same on utterance logits (the mean of the frame logits: for the teacher exactly its
    utterance prediction). Returns (loss, agreement = fraction of valid frames whose argmax matches)."""
    def kl(s, t):                      # per row, summed over classes
        pt = F.softmax(t / tau, -1)
        return (pt * (F.log_softmax(t / tau, -1) - F.log_softmax(s / tau, -1))).sum(-1) * tau * tau

    m = valid.to(student.dtype)
    w = m * confidence(teacher).to(m.dtype) if confidence_weighting else m
    loss = frame_weight * (kl(student, teacher) * w).sum() / w.sum().clamp(min=1e-6)
    if utterance_weight > 0:
        us, ut = masked_mean(student, valid), masked_mean(teacher, valid)
        wu = confidence(ut).to(m.dtype) if confidence_weighting else torch.ones_like(us[:, 0])
        wu = wu * (m.sum(1) > 0)
        loss = loss + utterance_weight * (kl(us, ut) * wu).sum() / wu.sum().clamp(min=1e-6)
    agree = ((student.argmax(-1) == teacher.argmax(-1)).to(m.dtype) * m).sum() / m.sum().clamp(min=1)
    return loss, agree


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B,D] on each rank -> [W*B,D] in rank order; gradients flow back to every rank's own rows."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x.contiguous()), 0)


def infonce_loss(video: torch.Tensor, audio: torch.Tensor, logit_scale: torch.Tensor,
                 gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE between L2-normalised clip embeddings video/audio [B,D] (row i of each is a pair).

    Each rank scores its own rows against the rows of every rank (local loss, as open_clip's
    `local_loss=True`): the mean of the ranks' losses equals the loss of one process holding the whole
    batch, and the gradients DeepSpeed averages over ranks equal that process's gradients.
    Returns (loss, top-1 video->audio retrieval accuracy over the gathered batch)."""
    v, a = F.normalize(video.float(), dim=-1), F.normalize(audio.float(), dim=-1)
    rank = tdist.get_rank() if gather and tdist.is_available() and tdist.is_initialized() else 0
    all_v, all_a = (gather_with_grad(v), gather_with_grad(a)) if gather else (v, a)
    scale = logit_scale.exp().clamp(max=100)
    labels = torch.arange(len(v), device=v.device) + rank * len(v)
    logits_va, logits_av = scale * v @ all_a.T, scale * a @ all_v.T
    loss = (F.cross_entropy(logits_va, labels) + F.cross_entropy(logits_av, labels)) / 2
    acc = (logits_va.argmax(-1) == labels).float().mean()
    return loss, acc


class AlignmentObjective(nn.Module):
    """The weighted sum of the configured terms, with the trainable heads they need (never exported: the
    encoder alone is what `finetune` uses).

    Inputs: frame embeddings [B,F,W] of the encoder and a target dict from the teacher, all at the video's
    frame times: "regress" [B,F,D] (mse/cosine), "logits" [B,F,C] (kd), "clip" [B,Da] (infonce), "valid" [B,F];
    and for `pseudo` the clips' pseudo-label distributions "pseudo" [B,C] with "pseudo_weight" [B] (0: none).
    """

    def __init__(self, terms: list[LossTerm], width: int, regress_dim: int = 0, num_classes: int = 6,
                 audio_dim: int = 0, embed_dim: int = 128, tau: float = 2.0, confidence_weighting: bool = False,
                 frame_weight: float = 1.0, utterance_weight: float = 1.0, init_temperature: float = 0.07,
                 views_temperature: float = 0.1):
        super().__init__()
        self.terms, self.tau, self.conf = terms, tau, confidence_weighting
        self.frame_weight, self.utterance_weight = frame_weight, utterance_weight
        kinds = {t.kind for t in terms}
        self.regress = nn.Linear(width, regress_dim) if kinds & {"mse", "cosine"} else None
        self.kd_head = nn.Linear(width, num_classes) if "kd" in kinds else None
        self.pseudo_head = nn.Linear(width, num_classes) if "pseudo" in kinds else None
        if "infonce" in kinds:
            self.video_proj = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim))
            self.audio_proj = nn.Sequential(nn.LayerNorm(audio_dim), nn.Linear(audio_dim, width), nn.GELU(),
                                            nn.Linear(width, embed_dim))
            # shape [1], not a scalar: DeepSpeed broadcasts parameters as byte views, which a 0-dim tensor cannot give
            self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / init_temperature)))
        if "views" in kinds:
            self.views_proj = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim))
            self.views_logit_scale = nn.Parameter(torch.full((1,), math.log(1 / views_temperature)))

    @property
    def needs(self) -> set[str]:
        """What the terms read besides the clip itself: the teacher's "regress", "logits", "clip"; "pseudo"
        (pseudo-labels); "views" (a second augmented view of the clip, which the caller embeds)."""
        return {{"mse": "regress", "cosine": "regress", "kd": "logits", "infonce": "clip", "pseudo": "pseudo",
                 "views": "views"}[t.kind] for t in self.terms}

    def forward(self, emb: torch.Tensor, target: dict,
                view: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`emb` [B,F,W] of the clip (for `views`: of its first view) and `view` [B,F,W] of its second view."""
        # the teacher is frozen: whatever its outputs carry, no gradient flows back into them
        target = {k: v.detach() if torch.is_tensor(v) else v for k, v in target.items()}
        valid = target.get("valid")
        total, stats = emb.new_zeros((), dtype=torch.float32), {}
        for t in self.terms:
            if t.kind in ("mse", "cosine"):
                loss, stats["cos"] = regression_loss(self.regress(emb).float(), target["regress"], valid, t.kind,
                                                     self.frame_weight, self.utterance_weight)
            elif t.kind == "kd":
                loss, stats["kd_agree"] = kd_loss(self.kd_head(emb).float(), target["logits"], valid, self.tau,
                                                  self.frame_weight, self.utterance_weight, self.conf)
            elif t.kind == "pseudo":
                logits = self.pseudo_head(emb.mean(1)).float()
                loss = soft_cross_entropy(logits, target["pseudo"].float(), target["pseudo_weight"].float())
                has = target["pseudo_weight"] > 0
                stats["pseudo_agree"] = (logits.argmax(-1) == target["pseudo"].argmax(-1))[has].float().mean() \
                    if has.any() else logits.new_zeros(())
            elif t.kind == "views":
                z1, z2 = self.views_proj(emb.mean(1)).float(), self.views_proj(view.mean(1)).float()
                loss, stats["views_acc"] = infonce_loss(z1, z2, self.views_logit_scale.float())
            else:
                # heads run in the engine's precision (bf16 on GPUs); the loss in fp32
                v = self.video_proj(emb.mean(1)).float()      # the clip embedding `finetune` uses, projected
                a = self.audio_proj(target["clip"].to(emb.dtype)).float()
                loss, stats["nce_acc"] = infonce_loss(v, a, self.logit_scale.float())
                stats["temperature"] = (-self.logit_scale.detach()).exp().squeeze(0)
            stats[f"loss_{t.kind}"] = loss
            total = total + t.weight * loss
        return total, {k: v.detach() for k, v in stats.items()}


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Fusion fine-tuning: cross-entropy against target distributions [B,C] (one-hot for labeled clips and hard
    pseudo-labels, the teacher ensemble's probabilities for soft ones), per-sample weights [B] (labeled 1,
    pseudo-labelled `pseudo_weight`, times a class weight when asked); normalised by the weights."""
    per = -(target * logits.log_softmax(-1)).sum(-1)
    return (per * weight).sum() / weight.sum().clamp(min=1e-8)
