"""The alignment objective's side of `mer-dist align`: what the DeepSpeed engine trains (`Aligner`) and the teacher
targets each batch is scored against (`batch_targets`, online or offline, plus pseudo-labels). The stage that runs
it (`stages/align.py`) owns the loop, checkpoints and the run directory.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mer_dist.config import LABELS, AlignConfig
from mer_dist.models.teacher import TargetStats, Teacher, frame_targets, masked_mean
from mer_dist.models.visual import VisualEncoder
from mer_dist.train.augment import ClipAugment
from mer_dist.train.losses import AlignmentObjective
from mer_dist.train.pseudo import as_targets, for_training


class Aligner(nn.Module):
    """What the engine trains: the encoder (exported) and the objective's heads (alignment only). With loss `views`
    (`augment` given) the encoder sees two augmented views of every clip in one batched pass; the teacher's
    terms read the first."""

    def __init__(self, encoder: VisualEncoder, objective: AlignmentObjective, augment: ClipAugment | None = None):
        super().__init__()
        self.encoder, self.objective, self.augment = encoder, objective, augment

    def forward(self, frames: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if self.augment is None:
            return self.objective(self.encoder(frames), target)
        emb, view = self.encoder(torch.cat([self.augment(frames), self.augment(frames)])).chunk(2)
        return self.objective(emb, target, view)


def batch_targets(batch: dict, teacher: Teacher | None, stats: TargetStats | None, need: set[str],
                  target_space: str, device: torch.device, clip_space: str = "features") -> dict:
    """The teacher's outputs for a batch at the video's frame times, as the objective's terms `need` them:
    "regress" (in `target_space`), "logits" (frame posteriors), "clip" (utterance embedding: pooled features, or
    with `clip_space=posteriors` the utterance's emotion posteriors), and "valid".
    Online (a live `teacher`, one HuBERT pass) or offline (`teacher.npy` features in the batch): one path."""
    clip_feats = "clip" in need and clip_space == "features"
    want_feats = clip_feats or ("regress" in need and target_space != "logits")
    want_logits = "logits" in need or ("regress" in need and target_space != "features") or \
        ("clip" in need and clip_space == "posteriors")
    if teacher is not None:
        parts, mask = teacher.outputs(batch["audio"].to(device), batch["audio_lens"].to(device),
                                      features=want_feats, logits=want_logits)
        feats, logits = (parts[0] if want_feats else None), (parts[-1] if want_logits else None)
    else:
        if "teacher" not in batch:
            raise ValueError("align.targets=offline but the shards have no teacher.npy (run extract-targets)")
        feats, logits = batch["teacher"].to(device).float(), None
        mask = torch.arange(feats.shape[1], device=device)[None] < batch["teacher_lens"].to(device)[:, None]
    if feats is not None and stats is not None:
        feats = stats(feats)
    per_frame = torch.cat([x for x in (feats, logits) if x is not None], -1)
    pooled, valid = frame_targets(per_frame, mask, batch["frame_times"].to(device), batch["duration"].to(device))
    f_part = pooled[..., :feats.shape[-1]] if feats is not None else None
    l_part = pooled[..., -logits.shape[-1]:] if logits is not None else None
    target = {"valid": valid}
    if "regress" in need:
        target["regress"] = {"features": f_part, "logits": l_part}.get(target_space)
        if target_space == "both":
            target["regress"] = torch.cat([f_part, l_part], -1)
    if "logits" in need:
        target["logits"] = l_part
    if "clip" in need:
        target["clip"] = masked_mean(feats, mask) if clip_feats else masked_mean(logits.float(), mask).softmax(-1)
    return target


def target_fn(cfg: AlignConfig, device: torch.device, need: set[str], kinds: set[str]) -> Callable:
    """batch -> targets: one live teacher pass (online) or the shards' teacher.npy (offline), plus pseudo-labels;
    no teacher at all when no term reads one (`views`, `pseudo`)."""
    heard = need & {"regress", "logits", "clip"}
    teacher = Teacher.load(cfg.teacher, adapted=cfg.acoustic == "adapted").to(device) \
        if cfg.targets == "online" and heard else None
    if teacher is not None and teacher.head is None and ("kd" in kinds or cfg.infonce_target == "posteriors"):
        raise ValueError(f"{cfg.teacher}: loss kd and infonce_target=posteriors need the teacher's emotion head (head.pt)")
    stats = (teacher.stats if teacher is not None else TargetStats.load(cfg.teacher).to(device)) \
        if cfg.standardize and heard else None
    pseudo = PseudoTargets(cfg) if cfg.pseudo.dir else None

    def targets(batch: dict, teacher=teacher) -> dict:
        if "target" in batch:           # the fixed eval set's, computed once
            return batch["target"]
        t = batch_targets(batch, teacher, stats, need, cfg.target_space, device, cfg.infonce_target) if heard else {}
        return t | pseudo.batch(batch["name"], device) if pseudo is not None else t
    targets.teacher = lambda: (teacher or Teacher.load(cfg.teacher, adapted=cfg.acoustic == "adapted").to(device)) \
        if heard else None
    return targets


class PseudoTargets:
    """Loss `pseudo`: the pseudo-label distribution of each clip that has one (soft, or one-hot with
    `pseudo_soft=false`); a clip without one weighs 0 (the held-out set, clips the selection left out)."""

    def __init__(self, cfg: AlignConfig):
        names, probs = for_training(cfg.pseudo.dir, cfg.data.shards, cfg.pseudo.test_split, cfg.pseudo.transductive, "align", "v")
        self.table = {n: torch.from_numpy(p) for n, p in zip(names, as_targets(probs, cfg.pseudo.soft))}
        self.none = torch.zeros(len(LABELS))

    def batch(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        rows = [self.table.get(n, self.none) for n in names]
        return {"pseudo": torch.stack(rows).to(device),
                "pseudo_weight": torch.tensor([float(n in self.table) for n in names], device=device)}
