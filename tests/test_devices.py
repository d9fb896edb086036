"""GPU paths proven on CPU: `.to(dtype)` reaches every tensor a model's forward uses (parameters, buffers,
submodules), so `.to("cuda")` does too. A float64 proxy: after `.to(torch.float64)` no float32 tensor may be
reachable, and a forward in float64 must work end to end."""
import pytest
import torch

from mer_dist import config as C
from mer_dist.models.fusion import FusionModel, VisualFusion
from mer_dist.models.teacher import Teacher
from mer_dist.models.visual import VisualEncoder
from mer_dist.train.losses import AlignmentObjective


def _no_float32(module: torch.nn.Module) -> None:
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.dtype == torch.float32]
    assert not left, left
    # nothing tensor-valued hides in plain attributes (a dict of tensors would not move)
    for name, m in module.named_modules():
        for k, v in vars(m).items():
            if k.startswith("_"):
                continue
            vals = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
            assert not any(torch.is_tensor(x) for x in vals), f"{name}.{k} holds a tensor outside params/buffers"


@pytest.mark.slow
def test_teacher_moves_whole(teacher):
    t = Teacher.load(teacher).to(torch.float64)
    _no_float32(t)
    x, n = torch.randn(2, 16000, dtype=torch.float64) * 0.1, torch.tensor([16000, 12000])
    (feats, logits), mask = t.outputs(x, n, features=True, logits=True)
    assert feats.shape[0] == 2 and logits.shape[-1] == 6 and torch.isfinite(logits).all()
    assert t.standardize(feats.double()).dtype == torch.float64


def test_visual_encoder_objective_and_fusion_move_whole():
    enc = VisualEncoder(C.VisualConfig(), 32)
    obj = AlignmentObjective(C.parse_loss(["mse", "kd", "infonce"]), enc.width, 8, 6, 8)
    fusion = FusionModel({"a": 8, "v": enc.width, "t": 4}, C.FusionConfig(width=16, heads=2))
    model = VisualFusion(enc, fusion)
    for m in (enc, obj, model):
        m.to(torch.float64)
        _no_float32(m)
    frames = torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8)
    emb = enc(frames)
    assert emb.dtype == torch.float64
    target = {"valid": torch.ones(2, 3, dtype=torch.bool), "regress": torch.randn(2, 3, 8, dtype=torch.float64),
              "logits": torch.randn(2, 3, 6, dtype=torch.float64), "clip": torch.randn(2, 8, dtype=torch.float64)}
    loss, _ = obj(emb, target)
    loss.backward()
    out = model({"a": torch.randn(2, 8, dtype=torch.float64), "t": torch.randn(2, 4, dtype=torch.float64)},
                torch.ones(2, 3, dtype=torch.bool), frames)
    assert out.dtype == torch.float64 and out.shape == (2, 6)


def test_meta_device_proxy():
    """A forward on the `meta` device (what `.to("cuda")` does to placement): any tensor a forward makes on the
    CPU (an `arange` or mask without `device=`) would meet meta tensors and raise, as it would on a GPU."""
    enc = VisualEncoder(C.VisualConfig(), 32).to("meta")
    emb = enc(torch.empty(2, 3, 3, 32, 32, dtype=torch.uint8, device="meta"))
    assert emb.device.type == "meta" and emb.shape[:2] == (2, 3)
    obj = AlignmentObjective(C.parse_loss(["mse", "kd", "infonce"]), enc.width, 8, 6, 8).to("meta")
    target = {"valid": torch.ones(2, 3, dtype=torch.bool, device="meta"),
              "regress": torch.empty(2, 3, 8, device="meta"), "logits": torch.empty(2, 3, 6, device="meta"),
              "clip": torch.empty(2, 8, device="meta")}
    loss, _ = obj(emb, target)
    fusion = FusionModel({"a": 8, "v": enc.width, "t": 4}, C.FusionConfig(width=16, heads=2)).to("meta")
    out = fusion({"a": torch.empty(2, 8, device="meta"), "v": emb.mean(1), "t": torch.empty(2, 4, device="meta")},
                 torch.ones(2, 3, dtype=torch.bool, device="meta"))
    assert loss.device.type == "meta" and out.device.type == "meta" and out.shape == (2, 6)


def test_local_vision_backbones_from_their_own_directories(tmp_path):
    """A new backbone is a local HF directory: CLIP's vision tower (CLS + pooler) and SigLIP (no CLS token), pixel
    statistics read from the checkpoint's preprocessor_config.json."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )
    for name, (cfg_cls, model_cls) in {"clip": (CLIPVisionConfig, CLIPVisionModel),
                                       "siglip": (SiglipVisionConfig, SiglipVisionModel)}.items():
        cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                      patch_size=8)
        model_cls(cfg).save_pretrained(tmp_path / name)
        CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.25]).save_pretrained(tmp_path / name)
        enc = VisualEncoder(C.VisualConfig(backbone=str(tmp_path / name)), 32)
        assert torch.allclose(enc.pix_mean.flatten(), torch.tensor([0.1, 0.2, 0.3]) * 255)
        assert torch.allclose(enc.pix_std.flatten(), torch.tensor([0.5, 0.5, 0.25]) * 255)
        out = enc(torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8))
        assert out.shape == (2, 3, 32) and torch.isfinite(out).all()
        enc.to(torch.float64)
        _no_float32(enc)
