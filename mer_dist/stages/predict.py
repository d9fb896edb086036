"""`mer-dist predict`: a trained model's answers for raw videos -- no shards, no labels.

Each PATH is a video file (mp4, avi, mkv, webm, mov) or a directory scanned for them. Clips are decoded
exactly as `shard` + `evaluate` would (the same decoder, frames and audio), encoded in batches by the model's
own frozen encoders, and scored by its fold ensemble; rows stream to `predictions.csv` (or stdout), so memory
does not grow with the number of files. Without a transcript the text modality is missing for that clip, which
the fusion model's modality dropout was trained for; each row says which modalities it used. A file that
cannot be decoded is named on stderr and skipped.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mer_dist.config import LABELS, PredictConfig
from mer_dist.data.decode import DecodeError
from mer_dist.errors import DataError
from mer_dist.eval.predict import Ensemble, transcripts, video_files
from mer_dist.io import atomic_target, sheet_safe
from mer_dist.models.ensemble import load_model


def run(cfg: PredictConfig) -> int:
    ck = load_model(cfg.model)
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    files, unreadable = video_files(cfg.paths)
    for f, why in unreadable:
        sys.stderr.write(f"predict: skipped {f}: {why}\n")
    if not files:
        raise DataError("predict: no video files (mp4, avi, mkv, webm, mov) in the given paths")
    texts = transcripts(cfg.transcripts, ck.specs["t"]["column"])
    model = Ensemble(ck, device)
    if cfg.out == "-":
        ok, bad = _write(sys.stdout, files, texts, model, cfg.batch_size)
    else:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_target(cfg.out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            ok, bad = _write(fh, files, texts, model, cfg.batch_size)
    sys.stderr.write(f"predict: {ok} clip(s) predicted, {bad + len(unreadable)} skipped -> {cfg.out}\n")
    return 0


def _write(fh, files: list[Path], texts: dict[str, str], model: Ensemble, batch_size: int) -> tuple[int, int]:
    """Decode, encode and score `files` in batches, one CSV row per readable clip; (predicted, skipped)."""
    w = csv.writer(fh)
    w.writerow(["name", "discrete", *LABELS, "modalities"])
    ok = bad = 0
    bar = tqdm(total=len(files), desc="predict", unit="clip", file=sys.stderr)
    for i in range(0, len(files), batch_size):
        clips, names = [], []
        for f in files[i:i + batch_size]:
            try:
                clips.append(model.decode(f, f.stem))
                names.append(f.stem)
            except DecodeError as e:
                bad += 1
                sys.stderr.write(f"predict: skipped {f}: {e}\n")
        bar.update(len(files[i:i + batch_size]))
        if not clips:
            continue
        probs, used = model.score(clips, [texts.get(n, "") for n in names])
        for n, p, u in zip(names, probs, used):
            w.writerow([sheet_safe(n), LABELS[int(p.argmax())], *(f"{v:.6f}" for v in p), u])
        ok += len(clips)
    bar.close()
    if ok == 0:
        raise DataError(f"predict: none of the {len(files)} file(s) could be read (each named above)")
    return ok, bad
