"""The trained model as an MLflow model: what `finetune` logs beside its metrics, what `mlflow.pyfunc.load_model`
and `mlflow models serve` answer with.

`pack` copies a finetune output into one self-contained directory (model.pt whose encoder specs point inside it:
teacher/ with its base model when that is a local directory, encoder.pt, text/ when the text model is a local
directory; `minilm` is the PyPI package `mer-dist` depends on), so the model loads in a fresh process with only
`mer-dist` installed. `EmotionModel.predict` takes a DataFrame with a `path` column (local video files) or a
`video` column (the file's bytes, base64 over REST) and an optional `text` column; it returns one row per input:
name, discrete, the 6 probabilities, the modalities used, and `error` (the reason a clip could not be decoded).
"""
from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import torch

from mer_dist.config import LABELS
from mer_dist.data.decode import DecodeError
from mer_dist.models.ensemble import FoldEnsemble, load_model
from mer_dist.models.teacher import read_spec, write_spec
from mer_dist.models.lexical import resolve

MODEL_DIR = "mer-dist-model"      # the artifact the pyfunc model carries


def pack(model_dir: str | Path, dst: str | Path) -> Path:
    """A self-contained copy of a finetune output (see the module docstring); returns `dst`."""
    ck, dst = load_model(model_dir), Path(dst)
    specs = json.loads(json.dumps(ck.specs))
    dst.mkdir(parents=True)
    if "a" in ck.modalities:
        shutil.copytree(specs["a"]["teacher"], dst / "teacher")
        meta = read_spec(dst / "teacher")
        base = meta["base_model"]
        if not base.startswith(("tiny:", "./")):        # a local HuBERT directory travels inside the teacher
            shutil.copytree(base, dst / "teacher" / "base")
            write_spec(dst / "teacher", {**meta, "base_model": "./base"})
        specs["a"]["teacher"] = "teacher"
    if "v" in ck.modalities and specs["v"]["encoder"] != "random":
        shutil.copy(specs["v"]["encoder"], dst / "encoder.pt")
        specs["v"]["encoder"] = "encoder.pt"
    if "t" in ck.modalities and specs["t"]["model"] != "minilm":
        shutil.copytree(resolve(specs["t"]["model"]), dst / "text")
        specs["t"]["model"] = "text"
    dataclasses.replace(ck, specs=specs).save(dst / "model.pt")
    return dst


def _absolute(ck: FoldEnsemble, root: Path) -> FoldEnsemble:
    specs = json.loads(json.dumps(ck.specs))
    for m, key in (("a", "teacher"), ("v", "encoder"), ("t", "model")):
        v = specs[m][key]
        if v not in ("random", "minilm") and not Path(v).is_absolute() and (root / v).exists():
            specs[m][key] = str(root / v)
    return dataclasses.replace(ck, specs=specs)


class EmotionModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from mer_dist.eval.predict import Ensemble
        root = Path(context.artifacts[MODEL_DIR])
        ck = _absolute(load_model(root), root)
        self.model = Ensemble(ck, torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = []
        for i, r in enumerate(model_input.to_dict("records")):
            name = str(r.get("name") or (Path(r["path"]).stem if r.get("path") else f"row{i}"))
            row = {"name": name, "discrete": "", **{k: float("nan") for k in LABELS}, "modalities": "", "error": ""}
            try:
                source = r["path"] if r.get("path") else _bytes(r.get("video"))
                clip = self.model.decode(source, name)
            except (DecodeError, ValueError, KeyError) as e:
                row["error"] = str(e) or type(e).__name__
                rows.append(row)
                continue
            probs, used = self.model.score([clip], [str(r.get("text") or "")])
            row.update({"discrete": LABELS[int(probs[0].argmax())], **dict(zip(LABELS, map(float, probs[0]))),
                        "modalities": used[0]})
            rows.append(row)
        return pd.DataFrame(rows, columns=["name", "discrete", *LABELS, "modalities", "error"])


def _bytes(video) -> bytes:
    if isinstance(video, (bytes, bytearray)):
        return bytes(video)
    if isinstance(video, str) and video:
        return base64.b64decode(video, validate=True)
    raise ValueError("each row needs a `path` (a local video file) or a `video` (its bytes, base64)")


def signature():
    """Every input column optional (a row has `path` or `video`); one output row per input row."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    inputs = Schema([ColSpec("string", c, required=False) for c in ("name", "path", "video", "text")])
    outputs = Schema([ColSpec("string", "name"), ColSpec("string", "discrete"),
                      *(ColSpec("double", k) for k in LABELS), ColSpec("string", "modalities"), ColSpec("string", "error")])
    return ModelSignature(inputs, outputs)


def save(model_dir: str | Path, dst: str | Path, example: bytes = b"") -> Path:
    """The MLflow model directory of a finetune output: pyfunc flavour, signature, and (given a clip's bytes) an
    input example of one base64 clip, as a REST client would send it."""
    import tempfile
    dst = Path(dst)
    work = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}-"))
    inp = pd.DataFrame({"name": ["example"], "video": [base64.b64encode(example).decode()]}) if example else None
    try:
        packed = pack(model_dir, work / MODEL_DIR)
        mlflow.pyfunc.save_model(str(dst), python_model=str(Path(__file__).with_name("serve_entry.py")),
                                 artifacts={MODEL_DIR: str(packed)}, signature=signature(), input_example=inp,
                                 pip_requirements=["mer-dist"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst


def as_dataframe(paths: list[str | Path], texts: list[str] | None = None) -> pd.DataFrame:
    """The REST payload's rows for local files: the `video` column as base64 (what `mlflow models serve` takes)."""
    return pd.DataFrame({"name": [Path(p).stem for p in paths],
                         "video": [base64.b64encode(Path(p).read_bytes()).decode() for p in paths],
                         "text": texts or [""] * len(paths)})

