"""HuBERT: loading, per-layer features, adapters (LoRA / bottleneck), and the frozen teacher.

This module owns the teacher directory (`save_teacher` writes it, `Teacher.load` / `read_spec` read it; no other
module opens its files):
- `teacher.json`: base model (a preset, a local directory, or `./base` inside the teacher), adapted layers,
  method and its settings, feature spec (`feature_layers`, `feature_reduce`, `dim`, `frame_rate`), emotion head
  kind, `adapter_hash` (content hash of adapter + head: the cache key of every feature computed with it), and
  the adaptation's validation history;
- the adapter: `adapter/` (LoRA, peft's `save_pretrained`) or `bottleneck.pt` (tensors only);
- `head.pt`: the `EmotionHead` (tensors only); `stats.npz`: per-dimension feature mean/std on the labeled
  training part (standardised alignment targets); `base/`: a tiny random base model's weights.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import HubertConfig, HubertModel

from mer_dist.errors import ModelError
from mer_dist.io import load_tensors, write_json_atomic
from mer_dist.timing import FRAME_RATE, frame_window

TINY = {
    "hubert": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                   conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                   feat_extract_norm="layer", do_stable_layer_norm=True, hidden_dropout=0.0,
                   attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
                   mask_time_prob=0.0),
    "hubert6": dict(hidden_size=96, num_hidden_layers=6, num_attention_heads=4, intermediate_size=192,
                    conv_dim=(48,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                    feat_extract_norm="layer", do_stable_layer_norm=True, hidden_dropout=0.0,
                    attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
                    mask_time_prob=0.0),
}


def build_hubert(spec: str, seed: int = 0, **config) -> HubertModel:
    """`tiny:<preset>` (random weights, deterministic in `seed`; `config` overrides the preset's HubertConfig)
    or a local HuBERT directory. LayerDrop is always off: layers are read by index (probe, adapter, teacher), and
    transformers 5 records hidden states from the layers that ran, so a dropped layer shifts every index above it
    (released HuBERT-large configs ship layerdrop 0.1)."""
    if spec.startswith("tiny:"):
        preset = spec.split(":", 1)[1]
        if preset not in TINY:
            raise ModelError(f"unknown tiny HuBERT preset '{preset}' (have {', '.join(TINY)})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = HubertModel(HubertConfig(**{**TINY[preset], **config}))
        return model.eval()
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ModelError(f"HuBERT model directory {path}: no config.json (expected a local save_pretrained "
                         f"directory, e.g. a copy of chinese-hubert-large, or tiny:hubert)")
    try:
        return HubertModel.from_pretrained(str(path), local_files_only=True, layerdrop=0.0).eval()
    except (OSError, ValueError) as e:
        raise ModelError(f"HuBERT model directory {path}: cannot load ({str(e).splitlines()[0]})") from None


def hidden_states(model: nn.Module, audio: torch.Tensor, lens: torch.Tensor, mask_time_indices: torch.Tensor | None = None
                  ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """All hidden states ([0] = encoder input, [i] = layer i) and the valid-frame mask [B, T]
    (`mask_time_indices`: frames replaced by the learned mask embedding, for masked prediction)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    sample_mask = torch.arange(audio.shape[1], device=audio.device)[None] < lens[:, None]
    audio = (audio - _masked_stat(audio, sample_mask, "mean")) / (_masked_stat(audio, sample_mask, "std") + 1e-5)
    audio = audio * sample_mask
    kwargs = {"attention_mask": sample_mask.long()} if base.config.feat_extract_norm == "layer" else {}
    if mask_time_indices is not None:
        kwargs["mask_time_indices"] = mask_time_indices
    out = model(input_values=audio, output_hidden_states=True, **kwargs)
    flen = base._get_feat_extract_output_lengths(lens)
    t = out.hidden_states[0].shape[1]
    mask = torch.arange(t, device=audio.device)[None] < flen[:, None]
    return out.hidden_states, mask


def _masked_stat(x: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    n = mask.sum(1, keepdim=True).clamp(min=1)
    mean = (x * mask).sum(1, keepdim=True) / n
    if kind == "mean":
        return mean
    return (((x - mean) * mask) ** 2).sum(1, keepdim=True).div(n).sqrt()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over frames of [B,F,D] where mask [B,F]; a clip with no valid frame gives zeros."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def reduce_layers(hs: tuple[torch.Tensor, ...], layers: list[int], mode: str) -> torch.Tensor:
    if mode == "last":
        return hs[-1]
    if mode == "sum_last4":
        return torch.stack(hs[-4:]).sum(0)
    chosen = [hs[i] for i in layers]
    return torch.cat(chosen, -1) if mode == "concat" else torch.stack(chosen).mean(0)


def pool_to_frames(feats: torch.Tensor, mask: torch.Tensor, frame_times: torch.Tensor, window: torch.Tensor,
                   rate: float = FRAME_RATE) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the feature frames whose centres fall in [t - w/2, t + w/2) of each frame time.

    feats [B,T,D], mask [B,T], frame_times [B,F], window [B] -> ([B,F,D], valid [B,F]).
    A visual frame with no valid audio frame in its window (audio padding) is marked invalid.
    """
    centres = (torch.arange(feats.shape[1], device=feats.device, dtype=feats.dtype) + 0.5) / rate
    lo = frame_times - window[:, None] / 2
    hi = frame_times + window[:, None] / 2
    w = (centres[None, None] >= lo[..., None]) & (centres[None, None] < hi[..., None]) & mask[:, None, :].bool()
    w = w.to(feats.dtype)
    cnt = w.sum(-1, keepdim=True)
    return (w @ feats) / cnt.clamp(min=1), cnt.squeeze(-1) > 0


# ----------------------------------------------------------------------------- adapters
class Bottleneck(nn.Module):
    """Feed-forward followed by a residual bottleneck adapter (down -> ReLU -> up, zero-init up)."""

    def __init__(self, ff: nn.Module, dim: int, hidden: int):
        super().__init__()
        self.ff = ff
        self.down, self.up = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        y = self.ff(x)
        return y + self.up(torch.relu(self.down(y)))


def add_bottlenecks(model: HubertModel, layers: list[int], hidden: int) -> HubertModel:
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        block = model.encoder.layers[layer - 1]
        block.feed_forward = Bottleneck(block.feed_forward, model.config.hidden_size, hidden)
    return model


def add_lora(model: HubertModel, layers: list[int], rank: int, alpha: int, dropout: float, targets: list[str]):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                     layers_to_transform=[layer - 1 for layer in layers], layers_pattern="layers", bias="none")
    return get_peft_model(model, cfg)


def dir_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- teacher
class EmotionHead(nn.Module):
    """The adaptation head: per-layer standardisation (fixed, from the unadapted model on train, as the linear
    probe does) -> softmax layer weights (or the last chosen layer) -> linear.

    Linear in its input: applied to every 50 Hz frame, the mean of its outputs over an utterance is exactly
    its prediction on the mean-pooled utterance -- the frame-level posteriors used as alignment targets.
    """

    def __init__(self, num_layers: int, dim: int, kind: str = "weighted", num_classes: int = 6, dropout: float = 0.1):
        super().__init__()
        self.kind = kind
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.register_buffer("feat_mean", torch.zeros(num_layers, dim))
        self.register_buffer("feat_std", torch.ones(num_layers, dim))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., L, D] features of the chosen layers -> [..., num_classes] logits."""
        x = (x - self.feat_mean) / self.feat_std
        z = x[..., -1, :] if self.kind == "layer" else (torch.softmax(self.layer_logits, 0)[:, None] * x).sum(-2)
        return self.head(z)


class TargetStats(nn.Module):
    """Per-dimension mean/std of the teacher's features on train (`stats.npz`): standardised targets."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @classmethod
    def load(cls, teacher_dir: str | Path) -> "TargetStats":
        f = Path(teacher_dir) / "stats.npz"
        if not f.is_file():
            raise ModelError(f"{f}: teacher feature statistics not found (rerun `mer-dist adapt-audio`)")
        s = np.load(f, allow_pickle=False)
        stats = cls(int(s["mean"].shape[0]))
        stats.mean.copy_(torch.from_numpy(s["mean"]).float())
        stats.std.copy_(torch.from_numpy(s["std"]).float().clamp(min=1e-4))
        return stats

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean.to(feats.dtype)) / self.std.to(feats.dtype)


def frame_targets(feats: torch.Tensor, mask: torch.Tensor, frame_times: torch.Tensor,
                  duration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """50 Hz teacher outputs [B,T,D] -> one target per visual frame [B,F,D] + valid [B,F]: the one place where
    online targets, offline (`teacher.npy`) targets and the benchmarks meet the video's frame times."""
    return pool_to_frames(feats, mask, frame_times, frame_window(duration, frame_times.shape[1]))


class Teacher(nn.Module):
    """Frozen base + adapter + emotion head + target statistics, saved by `adapt-audio` and loaded here only.

    Every tensor it uses is a parameter or buffer of a submodule, so `.to(device)` moves all of it.
    """

    def __init__(self, hubert: nn.Module, spec: dict, head: EmotionHead | None, stats: TargetStats | None):
        super().__init__()
        self.hubert, self.spec = hubert, spec
        self.layers = list(spec["feature_layers"])
        self.reduce = spec["feature_reduce"]
        self.head, self.stats = head, stats
        self.eval().requires_grad_(False)

    @classmethod
    def load(cls, path: str | Path, adapted: bool = True) -> "Teacher":
        """`adapted=False`: the base model without its adapter (the "does adaptation matter" control); the
        emotion head and statistics are the adapted teacher's, so both variants give targets in one space."""
        path = Path(path)
        spec = read_spec(path)
        base = spec["base_model"]
        hubert = build_hubert(base if not base.startswith("./") else str(path / base[2:]))
        if adapted and spec["method"] == "lora":
            from peft import PeftModel
            hubert = PeftModel.from_pretrained(hubert, str(path / "adapter")).merge_and_unload()
        elif adapted and spec["method"] == "bottleneck":
            add_bottlenecks(hubert, spec["layers"], spec["bottleneck_dim"])
            hubert.load_state_dict(load_tensors(path / "bottleneck.pt"), strict=False)
        # layers above the last one we read are never needed: drop them (HuBERT-large: 24 -> ~22)
        read = list(spec["feature_layers"]) + list(spec["layers"])
        need = len(hubert.encoder.layers) if spec["feature_reduce"] in ("last", "sum_last4") else max(read) + 1
        if need < len(hubert.encoder.layers):
            hubert.encoder.layers = hubert.encoder.layers[:need]
        head = None
        if (path / "head.pt").is_file():
            head = EmotionHead(len(spec["layers"]), hubert.config.hidden_size, spec.get("head", "weighted"))
            head.load_state_dict(load_tensors(path / "head.pt"))
        stats = TargetStats.load(path) if (path / "stats.npz").is_file() else None
        return cls(hubert, spec, head, stats)

    @torch.inference_mode()
    def outputs(self, audio: torch.Tensor, lens: torch.Tensor, features: bool = True,
                logits: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One HuBERT pass -> [layer features [B,T,D]] and/or [frame emotion logits [B,T,6]], valid mask [B,T]."""
        hs, mask = hidden_states(self.hubert, audio, lens)
        out = [reduce_layers(hs, self.layers, self.reduce).float()] if features else []
        if logits:
            if self.head is None:
                raise ModelError("this teacher has no emotion head (head.pt); align on layer features only")
            out.append(self.head(torch.stack([hs[layer] for layer in self.spec["layers"]], 2)).float())
        return out, mask

    def features(self, audio: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (f,), mask = self.outputs(audio, lens)
        return f, mask

    def standardize(self, feats: torch.Tensor) -> torch.Tensor:
        if self.stats is None:
            raise ModelError("this teacher has no stats.npz; set align.standardize=false")
        return self.stats(feats)

    @torch.inference_mode()
    def utterance(self, audio: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        f, m = self.features(audio, lens)
        return masked_mean(f, m)


def read_spec(path: str | Path) -> dict:
    """A teacher directory's `teacher.json` (ModelError with one line when there is none)."""
    meta = Path(path) / "teacher.json"
    if not meta.is_file():
        raise ModelError(f"teacher directory {path}: no teacher.json (run `mer-dist adapt-audio` first)")
    return json.loads(meta.read_text())


def write_spec(path: str | Path, spec: dict) -> None:
    write_json_atomic(Path(path) / "teacher.json", spec)


class AudioClassifier(nn.Module):
    """HuBERT (with adapter) -> pooled chosen layers -> the teacher's `EmotionHead` (saved as head.pt)."""

    def __init__(self, hubert: nn.Module, layers: list[int], head: str, dim: int, num_classes: int):
        super().__init__()
        self.hubert, self.layers = hubert, layers
        self.head = EmotionHead(len(layers), dim, head, num_classes)

    def pooled(self, audio, lens) -> torch.Tensor:
        """[B, len(layers), D] pooled features of the chosen layers."""
        hs, mask = hidden_states(self.hubert, audio, lens)
        return torch.stack([masked_mean(hs[layer], mask) for layer in self.layers], 1)

    def forward(self, audio, lens):
        return self.head(self.pooled(audio, lens))

    @torch.no_grad()
    def fit_standardisation(self, batches) -> None:
        self.eval()
        x = torch.cat([self.pooled(a, n) for a, n in batches])
        self.head.feat_mean.copy_(x.mean(0))
        self.head.feat_std.copy_(x.std(0).clamp(min=1e-5))


def trainable_layers(model: nn.Module) -> set[int]:
    """Encoder layers (1-based) that own a trainable parameter."""
    found = set()
    for name, p in model.named_parameters():
        m = re.search(r"encoder\.layers\.(\d+)\.", name)
        if p.requires_grad and m:
            found.add(int(m.group(1)) + 1)
    return found


def save_teacher(out: Path, clf: AudioClassifier, method: str, model: str, spec: dict,
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Write a teacher directory from an adapted classifier: adapter, head, `teacher.json` (`spec` plus the base
    model, frame rate and content hash) and the feature statistics over `batches` (audio, lengths) of the
    labeled training part, computed with the saved teacher itself. Returns the full spec."""
    for p in ("adapter", "bottleneck.pt", "base"):
        if (out / p).is_dir():
            shutil.rmtree(out / p)
    if method == "lora":
        clf.hubert.save_pretrained(str(out / "adapter"))
        adapter_files = [out / "adapter"]
    else:
        torch.save({k: v for k, v in clf.hubert.state_dict().items() if ".down." in k or ".up." in k},
                   out / "bottleneck.pt")
        adapter_files = [out / "bottleneck.pt"]
    torch.save(clf.head.state_dict(), out / "head.pt")
    base_model = model
    if model.startswith("tiny:"):   # random tiny weights travel with the teacher
        build_hubert(model).save_pretrained(str(out / "base"))
        base_model = "./base"
    spec = {"base_model": base_model, "method": method, **spec, "frame_rate": FRAME_RATE,
            "adapter_hash": dir_hash(adapter_files + [out / "head.pt"])}
    write_spec(out, spec)
    teacher = Teacher.load(out)
    feats = []
    for x, lens in batches:
        f, m = teacher.features(x, lens)
        feats.append(f[m].numpy())
    allf = np.concatenate(feats)
    np.savez(out / "stats.npz", mean=allf.mean(0), std=allf.std(0))
    return spec
