"""The WebDataset pipelines, in one place (the open_clip way).

Composed from webdataset's stages (ResampledShards / SimpleShardList, tarfile_to_samples, shuffle,
batched); only what webdataset lacks is ours: the exact-once sample split, shuffled pairing, decoding.

* `train_loader`: infinite, resampled shards. Every (rank, worker) draws shards with its own RNG,
  seeded from (seed, rank, worker), so no rank ever waits on a rank that ran out of shards, and a
  resumed run passes a new seed instead of replaying samples. Epochs are sample counts (the
  manifest's), kept by the training loop, not by `with_epoch` (which counts per worker).
* `eval_loader`: finite and exact. Each of world x workers slots reads its own shards (or, with
  fewer shards than slots, every shard but only its own samples): every sample appears exactly once.

Batches are built inside the workers. A sample that fails to decode is skipped and counted (never
a crash); a shard that cannot be read is logged by name. Each batch carries its worker's running
skip count so the trainer can log the total.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import io
import itertools
import json
import logging
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
import webdataset as wds

from mer_dist.config import LABEL_TO_ID, DataConfig
from mer_dist.data.decode import DecodeError, decode
from mer_dist.timing import frame_times
from mer_dist.errors import DataError

log = logging.getLogger("mer_dist.data")
VIDEO_KEYS = ("mp4", "avi", "mkv", "mov", "webm")


class SkipLog:
    """Counts skipped samples/shards and logs at most one line per `every_s` seconds."""

    def __init__(self, every_s: float = 10.0):
        self.samples = self.shards = 0
        self._last = 0.0
        self.every_s = every_s

    def sample(self, err: Exception) -> None:
        self.samples += 1
        self._maybe_log(f"skipped corrupt sample ({err}); {self.samples} skipped so far in this worker")

    def shard(self, err: Exception) -> bool:
        self.shards += 1
        log.warning("shard read error, rest of shard skipped: %s", err)  # always logged: shards matter
        return True

    def _maybe_log(self, msg: str) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s or self.samples <= 3:
            self._last = now
            log.warning(msg)


def _video(sample: dict) -> bytes:
    video = next((sample[k] for k in VIDEO_KEYS if k in sample), None)
    if video is None:
        raise DecodeError(sample["__key__"], f"no video member in shard sample "
                                             f"(have {sorted(k for k in sample if not k.startswith('_'))})")
    return video


def _meta(sample: dict) -> dict:
    """The sample's JSON member ({} without one); a malformed one is a bad sample (DecodeError), like a bad video."""
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise DecodeError(sample["__key__"], f"malformed .json member ({type(e).__name__}: {str(e)[:60]})") from None
    if not isinstance(meta, dict):
        raise DecodeError(sample["__key__"], f"malformed .json member (a {type(meta).__name__}, not an object)")
    return meta


def sample_name(sample: dict) -> str:
    """The clip's name: the JSON's (tar keys are percent-encoded, see ingest.shard_key)."""
    return str(_meta(sample).get("name", sample["__key__"]))


def _teacher(data: bytes, key: str) -> np.ndarray:
    """A `teacher.npy` member: float [T, D], T >= 1; anything else (truncated, pickled, wrongly shaped) is a bad
    sample."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DecodeError(key, f"unreadable teacher.npy ({type(e).__name__}: {str(e)[:60]})") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.dtype.kind != "f":
        raise DecodeError(key, f"teacher.npy of shape {arr.shape} and dtype {arr.dtype}, expected float [T, D]")
    return arr


def decode_sample(sample: dict, cfg: DataConfig, frames: int, tolerant: bool = False) -> dict:
    """A shard sample decoded; `tolerant`: a clip without sound, or without pictures (shard marks which), is
    decoded with that modality missing (`has_audio` / `has_video` false) instead of being a bad sample."""
    meta = _meta(sample)
    key = str(meta.get("name", sample["__key__"]))
    no_video = tolerant and frames > 0 and meta.get("has_video") is False
    clip = decode(_video(sample), 0 if no_video else frames, cfg.height, cfg.width, cfg.sample_rate,
                  cfg.max_seconds, key, cfg.decode_threads, need_audio=not tolerant)
    if no_video:
        clip.frames = np.zeros((frames, 3, cfg.height, cfg.width), np.uint8)
        clip.frame_times = frame_times(clip.duration, frames)
    out = {"name": key, "frames": clip.frames, "frame_times": clip.frame_times, "audio": clip.audio,
           "has_audio": clip.audio.size > 0, "has_video": not no_video,
           "duration": clip.duration, "label": LABEL_TO_ID.get(meta.get("label"), -1),
           "text": meta.get("text") or {"english": meta.get("transcript", ""), "chinese": ""}, "paired_with": key}
    if "teacher.npy" in sample:
        out["teacher"] = _teacher(sample["teacher.npy"], key)
    if "partner" in sample:     # pairing=shuffled: the audio side (and its teacher targets) is another clip's
        p = sample["partner"]
        out["audio"] = decode(_video(p), 0, cfg.height, cfg.width, cfg.sample_rate, cfg.max_seconds,
                              sample_name(p)).audio
        out["paired_with"] = sample_name(p)
        if "teacher.npy" in p:
            out["teacher"] = _teacher(p["teacher.npy"], out["paired_with"])
    return out


def pair_within_shards(stream, skips: "SkipLog"):
    """pairing=shuffled: each clip's video meets the audio of the next clip of its shard, the last one the
    first one's: a fixed clip-to-clip permutation (a resampled shard always gives the same pairs, whatever
    order the shuffle buffer then makes). A shard of one clip cannot pair it with another: skipped, counted."""
    first = prev = None
    for s in itertools.chain(stream, [None]):
        if prev is not None and (s is None or s.get("__url__") != prev.get("__url__")):
            if first is prev:
                skips.sample(DecodeError(prev["__key__"], "only clip of its shard: no partner for pairing=shuffled"))
            else:
                yield {**prev, "partner": first}
            first = None
        elif prev is not None:
            yield {**prev, "partner": s}
        if s is not None and first is None:
            first = s
        prev = s


def pad_audio(waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mono float waveforms -> zero-padded [B, T_max] and their lengths [B]."""
    lens = torch.tensor([w.size for w in waves], dtype=torch.long)
    audio = torch.zeros(len(waves), int(lens.max()) if waves else 0)
    for i, w in enumerate(waves):
        audio[i, : w.size] = torch.from_numpy(w)
    return audio, lens


def collate(samples: list[dict]) -> dict:
    """Pad audio (and teacher features) to the longest in the batch; frames stay uint8."""
    b = len(samples)
    audio, lens = pad_audio([s["audio"] for s in samples])
    batch = {"name": [s["name"] for s in samples], "text": [s["text"] for s in samples],
             "frames": torch.from_numpy(np.stack([s["frames"] for s in samples])),
             "frame_times": torch.from_numpy(np.stack([s["frame_times"] for s in samples])),
             "duration": torch.tensor([s["duration"] for s in samples], dtype=torch.float32),
             "audio": audio, "audio_lens": lens, "label": torch.tensor([s["label"] for s in samples]),
             "paired_with": [s["paired_with"] for s in samples],
             "has_audio": torch.tensor([s.get("has_audio", True) for s in samples]),
             "has_video": torch.tensor([s.get("has_video", True) for s in samples])}
    if all("teacher" in s for s in samples):
        tl = torch.tensor([s["teacher"].shape[0] for s in samples], dtype=torch.long)
        t = torch.zeros(b, int(tl.max()), samples[0]["teacher"].shape[1])
        for i, s in enumerate(samples):
            t[i, : tl[i]] = torch.from_numpy(s["teacher"].astype(np.float32))
        batch["teacher"], batch["teacher_lens"] = t, tl
    return batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _own_samples(stream, slot: int, nslots: int):
    """The exact-once split webdataset lacks: with fewer shards than rank x worker slots every slot reads
    every shard and keeps every nslots-th sample (split_by_node/worker would leave slots idle and, with
    several nodes, read env vars rather than the rank the caller names)."""
    return itertools.islice(stream, slot, None, nslots)


def _teacher_dim(urls: list[str]) -> int:
    """Width of the shards' teacher.npy members as their manifest names it (extract-targets writes it), 0 if none."""
    try:
        return int(json.loads((Path(urls[0]).parent / "manifest.json").read_text())["teacher"]["dim"])
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        return 0


def _decoded(stream, cfg: DataConfig, frames: int, skips: SkipLog, teacher_dim: int = 0, tolerant: bool = False):
    """Decode stage: a sample that fails is skipped and counted; a run of failures stops the stream with
    its causes (an infinite stream where nothing decodes would never yield a batch)."""
    failed: list[str] = []
    dim = teacher_dim or None      # a teacher.npy of another width (else: than the first) cannot share a batch
    for s in stream:
        try:
            d = decode_sample(s, cfg, frames, tolerant)
            if "teacher" in d:
                dim = dim or d["teacher"].shape[1]
                if d["teacher"].shape[1] != dim:
                    raise DecodeError(d["name"], f"teacher.npy has {d['teacher'].shape[1]} dims, this stream's have {dim}")
            yield d
            failed = []
        except DecodeError as e:
            skips.sample(e)
            failed.append(str(e))
            if len(failed) >= cfg.max_consecutive_failures:
                raise DataError(f"{len(failed)} consecutive samples failed to decode, e.g. "
                                f"{'; '.join(dict.fromkeys(failed[:3]))}") from None


class _Stream(IterableDataset):
    """One webdataset pipeline per (rank, worker), built when the worker starts iterating."""

    def __init__(self, urls: list[str], cfg: DataConfig, rank: int, world: int, seed: int, frames: int,
                 batch_size: int, train: bool, pairing: str = "matched", tolerant: bool = False):
        self.urls, self.cfg, self.rank, self.world, self.seed = urls, cfg, rank, world, seed
        self.frames, self.batch_size, self.train, self.pairing = frames, batch_size, train, pairing
        self.tolerant = tolerant

    def _pipeline(self, skips: SkipLog) -> wds.DataPipeline:
        wid, nw = _worker()
        cfg = self.cfg
        if self.train:
            # every (rank, worker) draws shards with its own seeded RNG: no rank waits on another's shards
            shards = wds.ResampledShards(self.urls, seed=self.seed, deterministic=True,
                                         worker_seed=lambda: self.rank * 1000 + wid)
            stages = [shards, wds.tarfile_to_samples(handler=skips.shard)]
        else:
            slot, nslots = self.rank * nw + wid, self.world * nw
            by_shard = len(self.urls) >= nslots
            stages = [wds.SimpleShardList(self.urls[slot::nslots] if by_shard else self.urls),
                      wds.tarfile_to_samples(handler=skips.shard)]
            if not by_shard:
                stages.append(functools.partial(_own_samples, slot=slot, nslots=nslots))
        if self.pairing == "shuffled":
            stages.append(functools.partial(pair_within_shards, skips=skips))
        if self.train:
            stages.append(wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer,
                                      rng=random.Random(wds.utils.make_seed(self.seed, self.rank, wid))))
        stages += [functools.partial(_decoded, cfg=cfg, frames=self.frames, skips=skips,
                                     teacher_dim=_teacher_dim(self.urls), tolerant=self.tolerant),
                   wds.batched(self.batch_size, collation_fn=collate, partial=True)]
        return wds.DataPipeline(*stages)

    def __iter__(self):
        skips = SkipLog()
        wid, _ = _worker()
        for batch in self._pipeline(skips):
            yield {**batch, "worker": wid, "skipped": skips.samples, "bad_shards": skips.shards}
        # only finite (eval) streams get here: a last marker carries the final skip counts
        yield {"worker": wid, "skipped": skips.samples, "bad_shards": skips.shards, "empty": True}


def _worker_init(_worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the trainer, which checkpoints and then shuts them down, and die
    with it (Linux): a trainer that gives up on a stalled worker must not leave it blocked on a dead mount. What a
    worker inherits from the trainer is frozen out of its garbage collector (see `Loader`)."""
    gc.freeze()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG


class Loader(DataLoader):
    """A DataLoader whose forked workers never free what the parent made. FFmpeg objects the parent created (an
    audio resampler's filter graph: every clip whose audio is not mono float at the target rate, e.g. the PCM of an
    AVI) own threads that exist only in the parent; if the cyclic GC frees one inside a worker, FFmpeg joins those
    threads forever while holding the GIL, and the worker -- and the rank waiting on it -- hangs. So the parent
    collects its garbage right before the workers fork, and each worker freezes what it inherited (`_worker_init`)."""

    def __iter__(self):
        if self.num_workers > 0:
            gc.collect()
        return super().__iter__()


def _loader(ds: _Stream, workers: int) -> DataLoader:
    return Loader(ds, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
                      worker_init_fn=_worker_init if workers > 0 else None)


def train_loader(urls: list[str], cfg: DataConfig, rank: int = 0, world: int = 1, seed: int = 0,
                 frames: int | None = None, pairing: str = "matched") -> DataLoader:
    if not urls:
        raise ValueError("train_loader: no shards")
    return _loader(_Stream(urls, cfg, rank, world, seed, cfg.frames if frames is None else frames,
                           cfg.batch_size, True, pairing), cfg.workers)


def eval_loader(urls: list[str], cfg: DataConfig, rank: int = 0, world: int = 1, frames: int | None = None,
                batch_size: int | None = None, tolerant: bool = False) -> DataLoader:
    """A finite, exact-once stream; `tolerant`: clips without sound or pictures come with that modality marked
    missing (the fusion model's features), else they are skipped and counted (the teacher's, alignment's)."""
    return _loader(_Stream(urls, cfg, rank, world, 0, cfg.frames if frames is None else frames,
                           batch_size or cfg.batch_size, False, tolerant=tolerant), cfg.workers)


class SkipTotals:
    """Sums the per-worker running skip counts that batches carry."""

    def __init__(self):
        self.by_worker: dict[int, tuple[int, int]] = {}

    def update(self, batch: dict) -> None:
        self.by_worker[batch["worker"]] = (batch["skipped"], batch["bad_shards"])

    @property
    def samples(self) -> int:
        return sum(v[0] for v in self.by_worker.values())

    @property
    def shards(self) -> int:
        return sum(v[1] for v in self.by_worker.values())


def iterate(loader: DataLoader, totals: SkipTotals | None = None):
    """Batches of a loader, with the empty end-of-worker markers folded into `totals`. Whatever a loader worker
    raises arrives as one DataError line (the DataLoader re-raises it with the worker's traceback as its text)."""
    try:
        for batch in loader:
            if totals is not None:
                totals.update(batch)
            if not batch.get("empty"):
                yield batch
    except Exception as e:  # noqa: BLE001 - any worker failure ends the stage with one line, never a hang
        text = str(e)
        if "DataLoader worker" not in text:
            raise
        cause = [ln for ln in text.splitlines() if ln.strip()][-1]
        raise DataError(f"data loader worker failed: {cause}") from None
