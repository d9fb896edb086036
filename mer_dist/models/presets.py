"""Real-size model directories without a download: the exact architectures of the MER2024 recipe, random weights.

`mer-dist init-models --preset mer2024 --out DIR` writes `save_pretrained` directories that every stage takes by
path exactly as it takes a downloaded copy, so the real-size job (shapes, layer indexing, pixel statistics,
memory, FLOPs, time) can be rehearsed where no weights can be fetched. Every config carries
`"mer_dist_initializer": "random"` and every directory a README saying so: these are not the released models.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

OPENAI_CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

# TencentGameMate/chinese-hubert-large: fairseq HuBERT-large (conv feature extractor with layer norm, pre-LN encoder)
HUBERT_LARGE = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, hidden_act="gelu",
    conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2], conv_bias=True,
    feat_extract_norm="layer", feat_extract_activation="gelu", do_stable_layer_norm=True,
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, layer_norm_eps=1e-5,
    hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.1,
    mask_time_prob=0.05, vocab_size=32)
HUBERT_PREPROCESSOR = {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
                       "padding_value": 0.0, "padding_side": "right", "do_normalize": True,
                       "return_attention_mask": True}

# openai/clip-vit-large-patch14: both towers, as the release ships them (align reads its vision tower)
CLIP_L14 = dict(
    projection_dim=768, logit_scale_init_value=2.6592,
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5))

# google/siglip-base-patch16-224
SIGLIP_B16 = dict(
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=16, image_size=224),
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=64, vocab_size=32000, pad_token_id=1, bos_token_id=None,
                     eos_token_id=1))

# facebook/dinov2-large
DINOV2_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                image_size=518, layerscale_value=1.0)

# hfl/chinese-roberta-wwm-ext-large: a BERT-large encoder over a 21128-entry character vocabulary
ROBERTA_WWM_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     max_position_embeddings=512, type_vocab_size=2, vocab_size=21128)


def _image_processor(mean_std: tuple[list, list], size: int, kind: str) -> dict:
    mean, std = mean_std
    return {"image_processor_type": kind, "do_resize": True, "size": {"shortest_edge": size},
            "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_normalize": True,
            "image_mean": mean, "image_std": std, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255}


def _hubert():
    from transformers import HubertConfig, HubertModel
    return HubertModel(HubertConfig(**HUBERT_LARGE)), HUBERT_PREPROCESSOR


def _clip():
    from transformers import CLIPConfig, CLIPModel
    return CLIPModel(CLIPConfig(**CLIP_L14)), _image_processor(OPENAI_CLIP, 224, "CLIPImageProcessor")


def _siglip():
    from transformers import SiglipConfig, SiglipModel
    return SiglipModel(SiglipConfig(**SIGLIP_B16)), {**_image_processor(([0.5] * 3, [0.5] * 3), 224,
                                                                         "SiglipImageProcessor"),
                                                     "size": {"height": 224, "width": 224}, "do_center_crop": False}


def _dinov2():
    from transformers import Dinov2Config, Dinov2Model
    return Dinov2Model(Dinov2Config(**DINOV2_L)), _image_processor(IMAGENET, 224, "BitImageProcessor")


def _roberta():
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(**ROBERTA_WWM_L), add_pooling_layer=True), None


# name -> (directory the release is usually copied to, builder, what it stands in for)
MODELS = {
    "chinese-hubert-large": (_hubert, "TencentGameMate/chinese-hubert-large (the teacher's base)"),
    "clip-vit-large-patch14": (_clip, "openai/clip-vit-large-patch14 (the visual encoder's backbone)"),
    "chinese-roberta-wwm-ext-large": (_roberta, "hfl/chinese-roberta-wwm-ext-large (the lexical encoder)"),
    "siglip-base-patch16-224": (_siglip, "google/siglip-base-patch16-224 (an alternative backbone)"),
    "dinov2-large": (_dinov2, "facebook/dinov2-large (an alternative backbone)"),
}
PRESETS = {
    "mer2024": ["chinese-hubert-large", "clip-vit-large-patch14", "chinese-roberta-wwm-ext-large"],
    "backbones": ["siglip-base-patch16-224", "dinov2-large"],
}
PRESETS["all"] = PRESETS["mer2024"] + PRESETS["backbones"]


def _char_vocab(size: int) -> list[str]:
    """A BERT WordPiece vocabulary of the release's size and layout ([PAD], [unused*], [UNK], [CLS], [SEP], [MASK],
    then single characters: ASCII, CJK punctuation, CJK ideographs): the release's exact entries are not known here,
    but Chinese text tokenises into characters the same way."""
    head = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(0x3000, 0x3040)]
    chars += [chr(c) for c in range(0x4E00, 0x4E00 + size)]
    vocab = head + [c for c in chars if c.strip()]
    return (vocab + [f"##{c}" for c in vocab[104:]])[:size]


def write(name: str, out: Path, seed: int = 0) -> dict:
    """One model directory; returns its summary (parameters, bytes)."""
    builder, stands_for = MODELS[name]
    torch.manual_seed(seed)
    model, preprocessor = builder()
    model.config.update({"mer_dist_initializer": "random", "mer_dist_stands_for": stands_for})
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if preprocessor is not None:
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1) + "\n")
    if name == "chinese-roberta-wwm-ext-large":
        from transformers import BertTokenizerFast
        (out / "vocab.txt").write_text("\n".join(_char_vocab(model.config.vocab_size)) + "\n")
        BertTokenizerFast(str(out / "vocab.txt"), do_lower_case=True, tokenize_chinese_chars=True).save_pretrained(str(out))
    params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(
        f"# {name}: RANDOM WEIGHTS\n\nWritten by `mer-dist init-models` (seed {seed}). The architecture (config.json, "
        f"{params:,} parameters) is that of {stands_for}; the weights are random, drawn by the model's own "
        f"initialiser. Use it to rehearse a real-size job (memory, FLOPs, time), never to measure accuracy. "
        f"Put a downloaded copy of the release here to run the real recipe.\n")
    return {"name": name, "dir": str(out), "parameters": params, "stands_for": stands_for}


def run(cfg) -> int:
    """`mer-dist init-models`: write the preset's model directories under `cfg.out` (existing ones are kept)."""
    out = Path(cfg.out)
    for name in PRESETS[cfg.preset]:
        target = out / name
        if (target / "config.json").is_file() and not cfg.overwrite:
            print(f"init-models: {target} exists, kept (overwrite=true to write it again)", flush=True)
            continue
        s = write(name, target, cfg.seed)
        print(f"init-models: {target}: {s['parameters'] / 1e6:.1f}M parameters, random weights "
              f"(architecture of {s['stands_for']})", flush=True)
    return 0
