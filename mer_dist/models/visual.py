"""Visual encoder: per-frame `transformers` backbone -> temporal transformer -> contextual frame embeddings.

The backbone is CLIP-ViT, ViT or DINOv2 from a local directory, or `tiny:vit` built in code. The
encoder knows nothing of launchers, DeepSpeed or alignment objectives (their heads live with the
losses); `export`/`load_encoder` give the plain PyTorch state dict that `finetune` loads, read back
with `weights_only=True` (an encoder file from elsewhere is data, never code).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, ViTConfig, ViTModel

from mer_dist.config import VisualConfig
from mer_dist.errors import ModelError
from mer_dist.io import atomic_target, load_tensors

TINY = {"vit": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        "vit-b16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        patch_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)}


def build_backbone(spec: str, image_size: int) -> tuple[nn.Module, int, tuple, tuple]:
    """(backbone, width, pixel mean, pixel std). A local directory is any `transformers` vision model (CLIP's
    vision tower, ViT, DINOv2, SigLIP, ...); its pixel statistics come from its own image-processor config."""
    if spec.startswith("tiny:"):
        preset = spec.split(":", 1)[1]
        if preset not in TINY:
            raise ModelError(f"unknown tiny vision preset '{preset}' (have {', '.join(TINY)})")
        cfg = ViTConfig(image_size=image_size, **TINY[preset])
        return ViTModel(cfg, add_pooling_layer=False), cfg.hidden_size, (0.5,) * 3, (0.5,) * 3
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ModelError(f"vision backbone directory {path}: no config.json (expected a local save_pretrained "
                         f"directory of a vision model, e.g. CLIP/ViT/DINOv2/SigLIP, or tiny:vit)")
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    try:
        if hasattr(cfg, "vision_config"):      # a two-tower checkpoint (CLIP, SigLIP): its vision tower
            model = AutoModel.from_pretrained(str(path), local_files_only=True).vision_model
            width = cfg.vision_config.hidden_size
        else:
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
            width = cfg.hidden_size
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"vision backbone {path}: cannot load ({str(e).splitlines()[0]})") from None
    mean, std = _pixel_stats(path)
    return model, width, mean, std


def _pixel_stats(path: Path) -> tuple[tuple, tuple]:
    """image_mean/image_std of the checkpoint's preprocessor_config.json (what it was trained with)."""
    f = path / "preprocessor_config.json"
    if not f.is_file():
        raise ModelError(f"vision backbone {path}: no preprocessor_config.json (its pixel mean/std are needed)")
    pre = json.loads(f.read_text())
    if "image_mean" not in pre or "image_std" not in pre:
        raise ModelError(f"{f}: expected image_mean and image_std")
    return tuple(pre["image_mean"]), tuple(pre["image_std"])


def _blocks(backbone: nn.Module) -> list[nn.Module]:
    """The transformer blocks, wherever this backbone's class keeps them (encoder.layer, layers, ...)."""
    for name, m in backbone.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers", "blocks"):
            return list(m)
    raise ModelError(f"{type(backbone).__name__}: no list of transformer blocks found")


def _before_blocks(backbone: nn.Module) -> list[nn.Module]:
    """Modules applied between the embeddings and the first block (CLIP's `pre_layrnorm`). Left trainable, they
    make autograd run backward through every frozen block below them (found at real size: +50% backward FLOPs)."""
    return [m for name, m in backbone.named_modules() if name.rsplit(".", 1)[-1].startswith("pre_")]


def _embeddings(backbone: nn.Module) -> nn.Module:
    return next(m for name, m in backbone.named_modules() if name.rsplit(".", 1)[-1] == "embeddings")


class VisualEncoder(nn.Module):
    def __init__(self, cfg: VisualConfig, image_size: int, max_frames: int = 64):
        super().__init__()
        self.cfg, self.image_size = cfg, image_size
        self.backbone, width, mean, std = build_backbone(cfg.backbone, image_size)
        self.width = width
        self.register_buffer("pix_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("pix_std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.pos = nn.Parameter(torch.zeros(1, max_frames, width))
        layer = nn.TransformerEncoderLayer(width, cfg.temporal_heads, 2 * width, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.temporal = nn.TransformerEncoder(layer, cfg.temporal_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        if cfg.freeze_blocks > 0:
            for m in [_embeddings(self.backbone), *_before_blocks(self.backbone)] + _blocks(self.backbone)[: cfg.freeze_blocks]:
                m.requires_grad_(False)
        if cfg.gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable()

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B,F,3,H,W] -> temporally contextualised frame embeddings [B,F,width]."""
        b, f = frames.shape[:2]
        x = frames.flatten(0, 1).to(self.pix_mean.dtype)
        x = ((x - self.pix_mean) / self.pix_std).to(next(self.backbone.parameters()).dtype)
        out = self.backbone(pixel_values=x)
        # one vector per frame: the model's own pooled output where it has one (CLIP, SigLIP), else the CLS
        # token when the model has one (ViT, DINOv2), else the mean of the patch tokens
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            tokens = out.last_hidden_state
            pooled = tokens[:, 0] if getattr(self.backbone.config, "model_type", "") in ("vit", "dinov2") \
                else tokens.mean(1)
        h = pooled
        h = h.view(b, f, -1) + self.pos[:, :f].to(h.dtype)
        return self.norm(self.temporal(h))

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """Clip-level feature for downstream fusion: mean over frames of the contextual embeddings."""
        return self(frames).mean(1)

    def trainable_groups(self, mode: str, top_k: int, lr: float, decay: float) -> list[dict]:
        """Parameter groups for fine-tuning inside `finetune`: `top_k` = the top k backbone blocks + the temporal
        head (pos, temporal transformer, norm); `full` = everything. Layer-wise LR decay: the temporal head
        trains at `lr`, the top block at lr*decay, the next at lr*decay^2, ..., the embeddings last.
        Everything else is frozen (requires_grad False)."""
        self.requires_grad_(False)
        blocks = _blocks(self.backbone)
        emb = _embeddings(self.backbone)
        chosen = blocks[::-1][: top_k if mode == "top_k" else len(blocks)]
        groups = [{"params": [self.pos, *self.temporal.parameters(), *self.norm.parameters()], "lr": lr}]
        groups += [{"params": list(b.parameters()), "lr": lr * decay ** (i + 1)} for i, b in enumerate(chosen)]
        if mode == "full":
            rest = [p for n, p in self.backbone.named_parameters()
                    if not any(p is q for b in blocks for q in b.parameters())]
            groups.append({"params": rest + list(emb.parameters()), "lr": lr * decay ** (len(blocks) + 1)})
        for g in groups:
            g["params"] = list({id(p): p for p in g["params"]}.values())
            for p in g["params"]:
                p.requires_grad_(True)
        return groups


def export(model: VisualEncoder, state_dict: dict, path: str | Path, extra: dict | None = None) -> None:
    """Plain PyTorch checkpoint (no DeepSpeed needed to read it), written atomically."""
    with atomic_target(path, durable=True) as tmp:
        torch.save({"config": dataclasses.asdict(model.cfg), "image_size": model.image_size,
                    "state_dict": {k: v.detach().float().cpu() for k, v in state_dict.items()}, **(extra or {})}, tmp)


def read_encoder(path: str | Path) -> dict:
    """An exported encoder file: tensors and plain values only (`weights_only`), checked for its fields."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"visual encoder {path}: file not found (run `mer-dist align`, or use visual=random)")
    ck = load_tensors(path, "visual encoder ")
    if not isinstance(ck, dict) or not {"config", "image_size", "state_dict"} <= set(ck):
        raise ModelError(f"visual encoder {path}: expected an encoder.pt written by `mer-dist align` "
                         f"(keys config, image_size, state_dict)")
    return ck


def load_encoder(path: str | Path) -> VisualEncoder:
    ck = read_encoder(path)
    cfg = VisualConfig(**{**ck["config"], "init": "", "gradient_checkpointing": False})
    model = VisualEncoder(cfg, ck["image_size"])
    model.load_state_dict(ck["state_dict"])
    return model.eval()
