"""A trained fold ensemble on decoded clips (`Ensemble`: decode as the model was trained, encode with its own
frozen encoders, score with its folds) and the inputs of `mer-dist predict` (video files, transcripts). The
served MLflow model answers through the same `Ensemble`."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from mer_dist.config import DataConfig, FusionConfig
from mer_dist.data.decode import Clip, decode
from mer_dist.data.stream import pad_audio
from mer_dist.errors import DataError
from mer_dist.eval.evaluate import visual_fold_encoders
from mer_dist.features import Encoders
from mer_dist.models.ensemble import FoldEnsemble
from mer_dist.models.fusion import FusionModel

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def video_files(paths: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files to predict, in a stable order: each PATH itself, or the videos below a directory; and what a
    directory holds under a video's name that is no regular file (a FIFO, a device, a dangling or looping
    symlink), with why, so it is counted as skipped, never silently passed over."""
    files, skipped = [], []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(f for f in p.rglob("*") if f.suffix.lower() in VIDEO_EXTENSIONS):
                try:
                    if f.is_file():
                        files.append(f)
                    elif not f.is_dir():
                        skipped.append((f, "not a regular file" if os.path.lexists(f) and f.exists()
                                        else "a dangling or looping symlink"))
                except OSError as e:            # ELOOP: a symlink that points at itself
                    skipped.append((f, f"cannot read ({e.strerror})"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such video file or directory")
    stems = {}
    for f in files:
        if f.stem in stems and stems[f.stem] != f:
            raise DataError(f"{f}: two videos named '{f.stem}' ({stems[f.stem]}); a clip's name is its file stem")
        stems[f.stem] = f
    return list(stems.values()), skipped


def transcripts(path: str, column: str) -> dict[str, str]:
    """name -> transcript from a CSV in the release's label-transcription.csv layout ("" = none)."""
    if not path:
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"name", column} <= set(rows[0]):
        raise DataError(f"{path}: expected columns name and {column} (the model reads the {column} transcript)")
    return {r["name"]: r[column] or "" for r in rows}


class Ensemble:
    """The model's encoders and fold models, built once on `device`."""

    def __init__(self, ck: FoldEnsemble, device: torch.device):
        self.ck, self.device, self.mods = ck, device, list(ck.modalities)
        self.data = DataConfig(**ck.data)
        self.encoders = Encoders(ck.specs, ck.image_size, device)
        self.folds = []
        for state in ck.folds:
            model = FusionModel(ck.dims, FusionConfig(**ck.fusion))
            model.load_state_dict(state)
            self.folds.append(model.to(device).eval())
        self.visual_folds = [enc.to(device) for enc in visual_fold_encoders(ck)]

    def decode(self, source: str | Path | bytes | BinaryIO, name: str, deadline: float = 0.0) -> Clip:
        """A video file, its bytes or an open file decoded as the model was trained (frames, size, audio; a clip
        without sound is scored without it); DecodeError if not, or once `deadline` (monotonic) passes."""
        d = self.data
        return decode(source, d.frames, d.height, d.width, d.sample_rate, d.max_seconds, name, d.decode_threads,
                      need_audio=False, deadline=deadline)

    def score(self, clips: list[Clip], texts: list[str]) -> tuple[np.ndarray, list[str]]:
        """Decoded clips and their transcripts ("" = none) -> the ensemble's probabilities [B, 6] and the
        modalities each clip was scored with ("avt", "av", ...)."""
        col = self.ck.specs["t"]["column"]
        # a clip without sound gets a short silence in its place and its audio marked missing
        audio, lens = pad_audio([c.audio if c.audio.size else np.zeros(400, np.float32) for c in clips])
        batch = {"frames": torch.from_numpy(np.stack([c.frames for c in clips])), "audio": audio,
                 "audio_lens": lens, "text": [{col: t} for t in texts]}
        have = {"a": [c.audio.size > 0 for c in clips], "v": [True] * len(clips), "t": [bool(t.strip()) for t in texts]}
        present = np.array([have[m] for m in self.mods], bool).T
        return self.probs(batch, present), ["".join(m for m, u in zip(self.mods, row) if u) for row in present]

    @torch.inference_mode()
    def probs(self, batch: dict, present: np.ndarray) -> np.ndarray:
        """The ensemble's probabilities [B, 6]: the mean over the fold models."""
        feats = {m: torch.from_numpy(self.encoders.encode(m, batch)).to(self.device)
                 for m in self.mods if not (m == "v" and self.visual_folds)}
        mask = torch.from_numpy(present).to(self.device)
        out = []
        for k, model in enumerate(self.folds):
            if self.visual_folds:
                feats["v"] = self.visual_folds[k].embed(batch["frames"].to(self.device)).float()
            out.append(model(feats, mask).softmax(-1).float().cpu().numpy())
        return np.mean(out, 0)
