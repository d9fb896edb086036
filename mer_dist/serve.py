"""The trained model as an MLflow model: what `finetune` logs beside its metrics, what `mlflow.pyfunc.load_model`
and `mlflow models serve` answer with.

`pack` copies a finetune output into one self-contained directory (model.pt whose encoder specs point inside it:
teacher/ with its base model when that is a local directory, encoder.pt, text/ when the text model is a local
directory; `minilm` is the PyPI package `mer-dist` depends on), so the model loads in a fresh process with only
`mer-dist` installed. `EmotionModel.predict` takes a DataFrame with a `video` column (the file's bytes, base64
over REST) or a `path` column, and optional `text` and `name`; it returns one row per input: name, discrete, the
6 probabilities, the modalities used, and `error` (why the row got no answer).

A client is an adversary: a `path` is honoured only under the directories the operator allowed (`Limits`), is
opened by us as a regular file and handed to FFmpeg as a file object (never a URL or protocol), every row is
bounded in bytes and decode time, and nothing one row holds can fail the request.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import BinaryIO

import mlflow.pyfunc
import pandas as pd
import torch

from mer_dist.config import LABELS
from mer_dist.data.decode import DecodeError, open_regular
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


REFUSED = "path refused: the server reads only regular files under the directories its operator allowed"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^[A-Za-z0-9_]+,")   # http: file: pipe: concat: ... subfile,


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may make a served model do. Set by its operator when serving, as environment variables
    (`MER_SERVE_ALLOWED_DIRS` ...) or as the same keys in MLflow's `model_config` (lower case, no prefix)."""

    allowed_dirs: tuple[str, ...] = ()
    """`path` rows are read only below these directories (os.pathsep-separated); none by default: a client's
    server-side path is refused unless the operator named where it may point."""
    max_rows: int = 64
    """Rows answered per request; each row past it gets an error naming this cap."""
    max_clip_bytes: int = 64 << 20
    """Bytes of one clip (decoded base64, or a path row's file size); a larger one gets an error, never decoded."""
    row_seconds: float = 20.0
    """How long one row's decode may take before it is stopped with an error."""
    request_seconds: float = 50.0
    """After this long, the request's remaining rows get an error instead of a decode (under MLflow's 60 s
    request timeout, so the worker is free again by the time a client sees a 504)."""

    @classmethod
    def load(cls, config: dict | None = None, env: dict | None = None) -> "Limits":
        env, config, out = os.environ if env is None else env, dict(config or {}), {}
        for f in dataclasses.fields(cls):
            var = f"MER_SERVE_{f.name.upper()}"
            raw = config.get(f.name, env.get(var))
            if raw is None or raw == "":
                continue
            try:
                if f.name == "allowed_dirs":
                    dirs = raw.split(os.pathsep) if isinstance(raw, str) else list(raw)
                    out[f.name] = tuple(os.path.realpath(d) for d in dirs if d)
                    continue
                value = (int if f.type == "int" else float)(raw)
            except (TypeError, ValueError):
                value = -1
            if not 0 < value < float("inf"):
                raise ValueError(f"{var} (model_config '{f.name}'): expected a number > 0, got {raw!r}")
            out[f.name] = value
        return cls(**out)


def open_allowed(path: str, limits: Limits) -> BinaryIO:
    """A client's `path` as an open regular file, or ValueError(REFUSED) -- the same text whether or not the file
    exists: never a URL or FFmpeg protocol, only absolute paths whose real location (symlinks resolved, and checked
    again on the opened descriptor) lies under an allowed directory."""
    if not limits.allowed_dirs or "\x00" in path or _SCHEME.match(path) or not os.path.isabs(path):
        raise ValueError(REFUSED)

    def inside(p: str) -> bool:
        return any(p == d or p.startswith(d.rstrip(os.sep) + os.sep) for d in limits.allowed_dirs)

    real = os.path.realpath(path)
    if not inside(real):
        raise ValueError(REFUSED)
    try:
        fh = open_regular(real, "")
    except DecodeError:
        raise ValueError(REFUSED) from None
    fd_path = f"/proc/self/fd/{fh.fileno()}"
    if os.path.exists(fd_path) and not inside(os.readlink(fd_path)):     # swapped between the check and the open
        fh.close()
        raise ValueError(REFUSED)
    if os.fstat(fh.fileno()).st_size > limits.max_clip_bytes:
        fh.close()
        raise ValueError(f"clip over the {limits.max_clip_bytes}-byte limit (MER_SERVE_MAX_CLIP_BYTES)")
    return fh


def _cell(value):
    """A request cell, with every kind of null (None, NaN, pandas NA) as None and empty strings as None."""
    if value is None or (not isinstance(value, (str, bytes, bytearray)) and bool(pd.isna(value))):
        return None
    return value if not isinstance(value, str) or value else None


class EmotionModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from mer_dist.eval.predict import Ensemble
        root = Path(context.artifacts[MODEL_DIR])
        ck = _absolute(load_model(root), root)
        self.model = Ensemble(ck, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.limits = Limits.load(getattr(context, "model_config", None))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """One answer row per input row, whatever a row holds: a row that cannot be read, is refused or runs past
        a limit gets its `error`, and the other rows are answered."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        lim = getattr(self, "limits", None) or Limits.load()
        end = time.monotonic() + lim.request_seconds
        rows = []
        for i, r in enumerate(frame.to_dict("records")):
            rows.append(self._row(i, r, lim, end))
        return pd.DataFrame(rows, columns=["name", "discrete", *LABELS, "modalities", "error"])

    def _row(self, i: int, r: dict, lim: Limits, end: float) -> dict:
        path, name = _cell(r.get("path")), _cell(r.get("name"))
        name = str(name) if name is not None else (Path(path).stem if isinstance(path, str) else f"row{i}")
        row = {"name": name, "discrete": "", **{k: float("nan") for k in LABELS}, "modalities": "", "error": ""}
        fh = None
        try:
            if i >= lim.max_rows:
                raise ValueError(f"not processed: a request takes at most {lim.max_rows} rows (MER_SERVE_MAX_ROWS)")
            if time.monotonic() > end:
                raise ValueError(f"not processed: the request ran past its {lim.request_seconds:g} s limit "
                                 f"(MER_SERVE_REQUEST_SECONDS)")
            video = _cell(r.get("video"))
            if video is not None:
                source = _bytes(video, lim.max_clip_bytes)
            elif path is not None:
                source = fh = open_allowed(str(path), lim)
            else:
                raise ValueError("the row has neither `video` (the file's bytes, base64) nor `path`")
            clip = self.model.decode(source, name, deadline=min(end, time.monotonic() + lim.row_seconds))
            text = _cell(r.get("text"))
            probs, used = self.model.score([clip], [str(text) if text is not None else ""])
            row.update({"discrete": LABELS[int(probs[0].argmax())], **dict(zip(LABELS, map(float, probs[0]))),
                        "modalities": used[0]})
        except (DecodeError, ValueError) as e:
            row["error"] = str(e) or type(e).__name__
        except Exception as e:  # noqa: BLE001 - nothing one row holds may fail the request or leak a traceback
            row["error"] = f"internal error scoring this row ({type(e).__name__})"
        finally:
            if fh is not None:
                fh.close()
        return row


def _bytes(video, cap: int) -> bytes:
    """A row's `video` cell as bytes, refused before decoding when it would exceed `cap`."""
    if isinstance(video, (bytes, bytearray)):
        data = bytes(video)
    elif isinstance(video, str):
        if len(video) * 3 // 4 > cap + 2:
            raise ValueError(f"clip over the {cap}-byte limit (MER_SERVE_MAX_CLIP_BYTES)")
        try:
            data = base64.b64decode(video, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("`video` is not base64 text") from None
    else:
        raise ValueError("`video` must be the file's bytes as base64 text")
    if len(data) > cap:
        raise ValueError(f"clip over the {cap}-byte limit (MER_SERVE_MAX_CLIP_BYTES)")
    return data


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

