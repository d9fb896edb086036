"""The fold ensemble a `finetune` run writes, owned here: `FoldEnsemble.save` writes `model.pt` and `load_model`
reads it (evaluate, predict, pseudo-label and the served MLflow model all load it through here);
`write_metrics`/`read_metrics` the run's `metrics.json` (CV and test WAF, fold scores, pseudo-label counts).

`model.pt` holds tensors and plain values only (read with `weights_only=True`: a model from elsewhere is data,
never code): each fold's fusion state, and with `finetune visual_train=top_k|full` each fold's fine-tuned visual
encoder; the feature dimensions and fusion settings that rebuild the heads; the encoder specs, data settings and
feature cache that rebuild the exact features the folds were trained on.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mer_dist.errors import ModelError
from mer_dist.io import atomic_target, load_tensors, write_json_atomic


@dataclass
class FoldEnsemble:
    folds: list[dict]              # each fold's FusionModel state
    dims: dict[str, int]           # feature dimension per modality ("a", "v", "t")
    fusion: dict                   # the FusionConfig the folds were built with
    modalities: list[str]          # the modalities the fusion heads take, in order
    specs: dict                    # encoder specs (`features.specs_for`): teacher, visual encoder, text model
    image_size: int                # frame size the visual encoder expects
    data: dict                     # the DataConfig of training (decode settings; shards may be replaced)
    shards: str                    # the shards it was trained on (the default for evaluate / pseudo-label)
    cache: str                     # the feature cache it filled
    pseudo: str = ""               # the pseudo-label directory its folds learned from ("" = none)
    n_pseudo: int = 0              # pseudo-labelled clips per fold (mean)
    split: dict | None = None      # {"seed", "folds"}: the K-fold split (pseudo-label cross-fitting checks it)
    visual_folds: list[dict] = field(default_factory=list)   # each fold's fine-tuned visual encoder state
    visual_config: dict | None = None   # the VisualConfig those encoders were built with

    def save(self, path: str | Path) -> None:
        with atomic_target(path, ".pt", durable=True) as tmp:
            torch.save(dataclasses.asdict(self), tmp)


def load_model(model_dir: str | Path) -> FoldEnsemble:
    """`<model_dir>/model.pt` (one line naming the file when it is missing, not a tensor file or not ours)."""
    model_file = Path(model_dir) / "model.pt"
    if not model_file.is_file():
        raise ModelError(f"{model_file}: model not found (run `mer-dist finetune` first)")
    ck = load_tensors(model_file)
    names = {f.name for f in dataclasses.fields(FoldEnsemble)}
    need = {f.name for f in dataclasses.fields(FoldEnsemble)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not isinstance(ck, dict) or not need <= set(ck):
        raise ModelError(f"{model_file}: expected a model.pt written by `mer-dist finetune` (keys {sorted(need)})")
    return FoldEnsemble(**{k: v for k, v in ck.items() if k in names})


def write_metrics(model_dir: str | Path, metrics: dict) -> None:
    write_json_atomic(Path(model_dir) / "metrics.json", metrics)


def read_metrics(model_dir: str | Path) -> dict:
    f = Path(model_dir) / "metrics.json"
    if not f.is_file():
        raise ModelError(f"{f}: no metrics (not a finished `mer-dist finetune` output)")
    return json.loads(f.read_text())
