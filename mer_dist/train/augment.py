"""Two views of one clip for the teacher-independent objective (`align loss=views`).

Where the teacher knows no emotion, alignment has nothing to transfer, but the pool still holds hundreds of faces
the labeled split never shows. Contrasting two augmented views of the same clip (SimCLR; in video CVRL's
temporally consistent spatial augmentation, and the contrastive branch of CAV-MAE / HiCMAE) learns what stays the
same under crop, flip, colour and timing -- the face and its expression -- from the video alone.

Every draw is per clip and the same for all its frames (a view is one camera, not a flicker), made on the frames'
device with torch's generator (each rank's own RNG state, which checkpoints save), in batched tensor ops: no
per-frame Python, nothing on the host. The module holds no tensors: `.to(device)` has nothing to move.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mer_dist.config import ViewsConfig

GRAY = (0.299, 0.587, 0.114)


class ClipAugment(nn.Module):
    """uint8 or float frames [B,F,3,H,W] (0..255) -> one random view of each clip, float [B,F,3,H,W] (0..255)."""

    def __init__(self, cfg: ViewsConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, f, c, h, w = frames.shape
        x = frames.float()
        x = self._timing(x)
        x = self._crop_flip(x.flatten(0, 1), b, f).view(b, f, c, h, w)
        return self._colour(x).clamp(0, 255)

    def _rand(self, *shape: int, like: torch.Tensor) -> torch.Tensor:
        return torch.rand(*shape, device=like.device, dtype=torch.float32)

    def _timing(self, x: torch.Tensor) -> torch.Tensor:
        """A random contiguous span of at least `min_span` of the clip, resampled to its F frames (nearest): the
        view starts, ends and moves at its own pace."""
        b, f = x.shape[:2]
        span = self.cfg.min_span + (1 - self.cfg.min_span) * self._rand(b, 1, like=x)
        start = (1 - span) * self._rand(b, 1, like=x)
        pos = (start + span * (torch.arange(f, device=x.device) + 0.5) / f) * f
        idx = pos.floor().long().clamp(0, f - 1)                                  # [B,F]
        return torch.gather(x, 1, idx[:, :, None, None, None].expand_as(x))

    def _crop_flip(self, x: torch.Tensor, b: int, f: int) -> torch.Tensor:
        """Random resized crop (area in [min_scale, 1], aspect ratio within [3/4, 4/3]) and a horizontal flip with
        probability 1/2, one affine warp per clip applied to every frame (bilinear)."""
        area = self.cfg.min_scale + (1 - self.cfg.min_scale) * self._rand(b, like=x)
        # the aspect ratio r as far into [3/4, 4/3] as a crop of this area fits the frame (area * r <= 1 both ways)
        log_r = (self._rand(b, like=x) * 2 - 1) * (-area.log()).clamp(max=math.log(4 / 3))
        sx, sy = (area * log_r.exp()).sqrt(), (area / log_r.exp()).sqrt()
        tx, ty = (1 - sx) * (self._rand(b, like=x) * 2 - 1), (1 - sy) * (self._rand(b, like=x) * 2 - 1)
        flip = torch.where(self._rand(b, like=x) < 0.5 if self.cfg.flip else torch.zeros(b, dtype=torch.bool,
                           device=x.device), -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
        grid = F.affine_grid(theta.repeat_interleave(f, 0), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and saturation each scaled by a factor in [1 - colour, 1 + colour]; grey with
        probability `grey`."""
        b = x.shape[0]
        j = self.cfg.colour

        def factor() -> torch.Tensor:
            return (1 + j * (self._rand(b, like=x) * 2 - 1)).view(b, 1, 1, 1, 1)

        gray_w = x.new_tensor(GRAY).view(1, 1, 3, 1, 1)
        x = x * factor()
        mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
        x = (x - mean) * factor() + mean
        gray = (x * gray_w).sum(2, keepdim=True)
        x = (x - gray) * factor() + gray
        grey = (self._rand(b, like=x) < self.cfg.grey).view(b, 1, 1, 1, 1)
        return torch.where(grey, gray.expand_as(x), x)
