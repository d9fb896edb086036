"""Real-size architectures without a download: `mer-dist init-models` writes the MER2024 recipe's models (random
weights) that every loader takes by path, and the decoder skips frames nobody keeps without changing a pixel."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from mer_dist.models import presets

# parameter counts of the released checkpoints' architectures (CLIP ViT-L/14 and DINOv2-L: the model cards' exact
# figures; HuBERT-large: fairseq's large config; RoBERTa-wwm-ext-large: BERT-large over a 21128-entry vocabulary)
RELEASED = {"chinese-hubert-large": 315_438_720, "clip-vit-large-patch14": 427_616_513,
            "chinese-roberta-wwm-ext-large": 325_522_432, "siglip-base-patch16-224": 203_155_970,
            "dinov2-large": 304_368_640}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_preset_is_the_release_architecture(name):
    with torch.device("meta"):       # shapes only: no memory, no time
        model, _ = presets.MODELS[name][0]()
    assert sum(p.numel() for p in model.parameters()) == RELEASED[name]


def test_char_vocab_has_the_release_layout():
    v = presets._char_vocab(21128)
    assert len(v) == len(set(v)) == 21128
    assert v[0] == "[PAD]" and v[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] and "我" in v


@pytest.mark.slow
def test_init_models_directories_load_at_real_size(tmp_path):
    out = tmp_path / "models"
    p = run_cli("init-models", "--preset", "mer2024", "--out", out)
    assert p.stdout.count("random weights") == 3
    for name in presets.PRESETS["mer2024"]:
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["mer_dist_initializer"] == "random"
        assert "RANDOM WEIGHTS" in (out / name / "README.md").read_text()
    assert "exists, kept" in run_cli("init-models", "--preset", "mer2024", "--out", out).stdout
    from mer_dist.config import VisualConfig
    from mer_dist.models.lexical import TextEncoder
    from mer_dist.models.teacher import build_hubert, hidden_states
    from mer_dist.models.visual import VisualEncoder, _blocks
    hubert = build_hubert(str(out / "chinese-hubert-large"))
    hs, mask = hidden_states(hubert, torch.randn(1, 16000), torch.tensor([16000]))
    assert len(hs) == 25 and hs[-1].shape == (1, 49, 1024) and mask.all()
    enc = VisualEncoder(VisualConfig(backbone=str(out / "clip-vit-large-patch14"), temporal_layers=2, temporal_heads=8,
                                     freeze_blocks=12, gradient_checkpointing=True), 224)
    assert len(_blocks(enc.backbone)) == 24 and enc.width == 1024
    assert torch.allclose(enc.pix_mean.flatten() / 255, torch.tensor(presets.OPENAI_CLIP[0]))
    frozen = sum(p.numel() for b in _blocks(enc.backbone)[:12] for p in b.parameters())
    assert not any(p.requires_grad for b in _blocks(enc.backbone)[:12] for p in b.parameters()) and frozen > 140e6
    y = enc(torch.randint(0, 255, (1, 1, 3, 224, 224), dtype=torch.uint8))
    assert y.shape == (1, 1, 1024)
    text = TextEncoder(str(out / "chinese-roberta-wwm-ext-large"))
    assert text.tokenizer.tokenize("我很高兴") == ["我", "很", "高", "兴"] and text.encode(["我很高兴"]).shape == (1, 1024)


def test_decode_skips_frames_nobody_keeps_without_changing_a_pixel(tmp_path):
    import av

    from mer_dist.config import SynthConfig
    from mer_dist.data.decode import _duration, _KeepWindows, decode
    from mer_dist.data.synth import generate
    from mer_dist.timing import frame_times
    corpus = generate(SynthConfig(out=str(tmp_path / "c"), num_labeled=4, num_unlabeled=0, num_test=0, seconds=5.0,
                                  seconds_jitter=1.0, fps=25, height=48, width=48, workers=1))
    for clip in sorted((corpus / "video-labeled").glob("*.mp4")):
        for frames in (16, 5):
            skipping = decode(clip, frames, 32, 32, threads=1)          # one thread: unneeded frames are skipped
            everything = decode(clip, frames, 32, 32, threads=2)        # frame threads: every frame is decoded
            assert np.array_equal(skipping.frames, everything.frames)
            assert np.array_equal(skipping.audio, everything.audio)
        with av.open(str(clip)) as c:
            v = c.streams.video[0]
            half, tb = 0.5 / float(v.average_rate), float(v.time_base)     # read before the container closes
            duration = _duration(c, v, c.streams.audio[0])
            keep = _KeepWindows(frame_times(duration, 16), half, duration, v.time_base)
            pts = [p.pts for p in c.demux(v) if p.pts is not None]
        kept = [keep(x) for x in pts]
        assert sum(kept) < 0.4 * len(pts)       # 16 of ~125 frames (+ the last ones) may be kept, the rest skipped
        times = np.array(sorted(pts)) * tb
        for t in frame_times(duration, 16):     # the frame that first reaches each target is among the kept ones
            first = times[np.argmax(times + half >= t)]
            assert keep(round(first / tb))


def test_freeze_blocks_freezes_what_runs_before_the_first_trainable_block(tmp_path):
    """CLIP's vision tower has a `pre_layrnorm` between its embeddings and its blocks: left trainable, backward ran
    through every frozen block below it (+50% backward FLOPs at ViT-L/14). Counted on a small CLIP of the same
    class, saved and loaded by path like the release."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mer_dist.config import VisualConfig
    from mer_dist.models.visual import VisualEncoder, _blocks
    d = tmp_path / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     patch_size=8, image_size=32)).save_pretrained(str(d))
    (d / "preprocessor_config.json").write_text(json.dumps(presets._image_processor(presets.OPENAI_CLIP, 32, "x")))
    bwd = {}
    for k in (0, 2):
        enc = VisualEncoder(VisualConfig(backbone=str(d), freeze_blocks=k), 32).train()
        y = enc(torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8))
        with FlopCounterMode(display=False) as count:
            y.pow(2).mean().backward()
        bwd[k] = count.get_total_flops()
        if k:
            below = [p for n, p in enc.backbone.named_parameters() if "pre_layrnorm" in n or "embeddings" in n]
            below += [p for b in _blocks(enc.backbone)[:k] for p in b.parameters()]
            assert below and not any(p.requires_grad for p in below) and all(p.grad is None for p in below)
    # backward through 2 of 4 blocks (and no input gradients below them): well under the full model's
    assert bwd[2] < 0.65 * bwd[0], bwd
