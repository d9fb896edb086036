"""Utterance features of frozen encoders, cached on disk by (encoder fingerprint, clip content).

A sweep over fusion hyper-parameters or seeds recomputes nothing: `<cache>/<modality>-<hash>.npz`
holds sample keys + features, and only keys not yet in it go through the encoder. A sample's key is
its name *and* the digest of its video bytes (written into the shard's JSON by `shard`), so two
corpora with the same clip names never share features. Extraction can be spread over ranks (each
reads its exact share of the split); rank 0 alone writes the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from webdataset.tariterators import tarfile_samples

from mer_dist import dist
from mer_dist.config import LABEL_TO_ID, DataConfig, VisualConfig
from mer_dist.data.ingest import shard_urls
from mer_dist.data.stream import SkipTotals, eval_loader, iterate
from mer_dist.io import atomic_target

log = logging.getLogger("mer_dist.features")


def index(shards: str, split: str) -> tuple[list[str], np.ndarray, list[dict], list[str]]:
    """Names, labels (-1 = unlabeled), transcripts and cache keys of a split, from the shards' JSON members only.

    The key is name + content digest; shards written before digests existed fall back to name + shard
    file identity (path, size, mtime), which still tells two corpora apart."""
    names, labels, texts, keys = [], [], [], []
    for url in shard_urls(shards, split):
        st = Path(url).stat()
        fallback = hashlib.sha256(f"{Path(url).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        for s in tarfile_samples([{"url": url}], select_files=lambda f: f.endswith(".json")):
            meta = json.loads(s["json"])
            name = meta.get("name", s["__key__"])       # tar keys are encoded (ingest.shard_key)
            names.append(name)
            labels.append(LABEL_TO_ID.get(meta.get("label"), -1))
            texts.append(meta.get("text") or {"english": meta.get("transcript", ""), "chinese": ""})
            keys.append(f"{name}|{meta.get('sha256') or fallback}")
    order = np.argsort(names)
    return ([names[i] for i in order], np.asarray(labels)[order], [texts[i] for i in order],
            [keys[i] for i in order])


def map_split(shards: str, split: str, data: DataConfig, env: dist.DistEnv, fn, desc: str
              ) -> tuple[list[str], list, list[int]]:
    """(names, `fn(batch)`'s per-sample outputs, labels) of a split's audio in name order, on rank 0; every rank
    applies `fn` to its exact share and the shares are gathered onto rank 0 only (the others get empty lists: a
    split's audio is never copied onto every rank). Corrupt samples are skipped and counted."""
    names, outs, labels = [], [], []
    totals = SkipTotals()
    loader = eval_loader(shard_urls(shards, split), data, env.rank, env.world_size, frames=0)
    for batch in tqdm(iterate(loader, totals), desc=desc, unit="batch", disable=not env.is_main):
        names += batch["name"]
        outs += list(fn(batch))
        labels += batch["label"].tolist()
    if totals.samples:
        log.warning("%s: skipped %d corrupt sample(s) on rank %d", desc, totals.samples, env.rank)
    # `env` may be one rank's own view (a single-process env inside a multi-rank job): then nothing is gathered
    parts = dist.gather_to_main((names, outs, labels)) if env.world_size > 1 else [(names, outs, labels)]
    if parts is None:
        return [], [], []
    names, outs, labels = (sum((p[i] for p in parts), []) for i in range(3))
    order = np.argsort(names)
    return [names[i] for i in order], [outs[i] for i in order], [labels[i] for i in order]


class Cache:
    def __init__(self, folder: str | Path, modality: str, fingerprint: str, read: bool = True):
        key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self.path = Path(folder) / f"{modality}-{key}.npz"
        self.data: dict[str, np.ndarray] = {}
        self.absent: set[str] = set()       # clips without this modality (no audio or video stream): never encoded
        if read:
            self.reload()

    def reload(self) -> None:
        """Merge in what the file holds now (entries only ever grow: every save merges)."""
        data, absent = self._read()
        self.data, self.absent = {**data, **self.data}, absent | self.absent

    def _read(self) -> tuple[dict[str, np.ndarray], set[str]]:
        """The saved entries; an unreadable file (torn by an older version) is recomputed, with one warning."""
        if not self.path.is_file():
            return {}, set()
        try:
            z = np.load(self.path, allow_pickle=False)
            absent = set(z["absent"].tolist()) if "absent" in z.files else set()
            return dict(zip(z["names"].tolist(), z["feats"])), absent
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            log.warning("%s: unreadable feature cache, recomputed (%s)", self.path, type(e).__name__)
            return {}, set()

    def missing(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.data and n not in self.absent]

    def put(self, names: list[str], feats: np.ndarray) -> None:
        self.data.update(zip(names, feats))

    def save(self) -> None:
        """Written through a unique temp file and merged with what another run (a seed sweep on the same cache)
        saved meanwhile: concurrent runs never tear the file, and at worst recompute an entry later."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.reload()
        names = sorted(self.data)
        feats = np.stack([self.data[n] for n in names]) if names else np.zeros((0, 1), np.float32)
        with atomic_target(self.path, ".npz") as tmp:
            np.savez(tmp, names=np.asarray(names, dtype=str), feats=feats,
                     absent=np.asarray(sorted(self.absent), dtype=str))


class Encoders:
    """The frozen encoders of a finetune run, built lazily: a fully cached run never builds one."""

    def __init__(self, specs: dict, image_size: int, device: str | torch.device = "cpu"):
        self.specs, self.image_size, self.device = specs, image_size, torch.device(device)
        self._built: dict = {}

    def fingerprint(self, m: str) -> str:
        s = self.specs[m]
        if m == "a":
            from mer_dist.models.teacher import read_spec
            tj = read_spec(s["teacher"])
            return f"a|{tj['base_model']}|{tj['adapter_hash'] if s['adapted'] else 'base'}|{tj['feature_layers']}|{tj['feature_reduce']}"
        if m == "v":
            if s["encoder"] == "random":
                return f"v|random|{s['seed']}|{json.dumps(s['visual_model'], sort_keys=True)}|{self.image_size}"
            p = Path(s["encoder"])
            if not p.is_file():
                from mer_dist.errors import ModelError
                raise ModelError(f"visual encoder {p}: file not found (run `mer-dist align`, or use visual=random)")
            return f"v|{hashlib.sha256(p.read_bytes()).hexdigest()}"
        from mer_dist.models.lexical import fingerprint
        return f"t|{fingerprint(s['model'])}|{s['column']}"

    def build(self, m: str):
        if m in self._built:
            return self._built[m]
        s = self.specs[m]
        if m == "a":
            from mer_dist.models.teacher import Teacher
            enc = Teacher.load(s["teacher"], adapted=s["adapted"])
        elif m == "v":
            from mer_dist.models.visual import VisualEncoder, load_encoder
            if s["encoder"] == "random":
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(s["seed"])
                    enc = VisualEncoder(VisualConfig(**s["visual_model"]), self.image_size).eval()
            else:
                enc = load_encoder(s["encoder"])
        else:
            from mer_dist.models.lexical import TextEncoder
            enc = TextEncoder(s["model"])
        self._built[m] = enc.to(self.device) if m in "av" else enc       # the text encoder stays on the CPU
        return self._built[m]

    @torch.inference_mode()
    def encode(self, m: str, batch: dict) -> np.ndarray:
        enc = self.build(m)
        if m == "a":
            return enc.utterance(batch["audio"].to(self.device), batch["audio_lens"].to(self.device)).float().cpu().numpy()
        if m == "v":
            return enc.embed(batch["frames"].to(self.device)).float().cpu().numpy()
        return enc.encode([t[self.specs["t"]["column"]] for t in batch["text"]])


def extract(encoders: Encoders, modalities: list[str], shards: str, split: str, data: DataConfig,
            cache_dir: str | Path, rank: int = 0, world: int = 1
            ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(names, labels, {modality: [N, D]}, present [N, M]) for a split; computes only what the cache lacks.

    With world > 1 every rank must call it: each encodes its exact share of the missing samples, the
    shares are gathered, and rank 0 writes the cache (one writer)."""
    names, labels, texts, keys = index(shards, split)
    key_of = dict(zip(names, keys))
    # one decision for every rank: rank 0 reads the caches and says what is missing; the others read only after
    # that (a concurrent sweep's save between two ranks' reads would otherwise send them down different branches)
    shared = world > 1
    caches = {m: Cache(cache_dir, m, encoders.fingerprint(m), read=rank == 0 or not shared) for m in modalities}
    need = {m: sorted(c.missing(keys)) for m, c in caches.items()} if rank == 0 or not shared else None
    if shared:
        need = dist.broadcast_object(need)
        if rank != 0:
            for c in caches.values():
                c.reload()
    need_sets = {m: set(v) for m, v in need.items()}
    if any(need_sets.values()):
        frames = data.frames if need_sets.get("v") else 0
        totals = SkipTotals()
        new: dict[str, dict[str, np.ndarray]] = {m: {} for m in caches}
        new_absent: dict[str, set[str]] = {m: set() for m in caches}
        loader = eval_loader(shard_urls(shards, split), data, rank, world, frames=frames, tolerant=True)
        for batch in iterate(loader, totals):
            bkeys = [key_of.get(n, n) for n in batch["name"]]
            has = {"a": batch["has_audio"].tolist(), "v": batch["has_video"].tolist(), "t": [True] * len(bkeys)}
            for m in caches:
                new_absent[m] |= {k for i, k in enumerate(bkeys) if k in need_sets[m] and not has[m][i]}
                idx = [i for i, k in enumerate(bkeys) if k in need_sets[m] and has[m][i]]
                if idx:
                    sub = {k: ([v[i] for i in idx] if isinstance(v, list) else v[idx]) for k, v in batch.items()
                           if k in ("audio", "audio_lens", "frames", "text")}
                    new[m].update(zip([bkeys[i] for i in idx], encoders.encode(m, sub)))
        skipped = totals.samples
        if shared:
            parts = dist.all_gather_object((new, new_absent, skipped))
            new = {m: {k: v for p, _, _ in parts for k, v in p[m].items()} for m in caches}
            new_absent = {m: set().union(*(a[m] for _, a, _ in parts)) for m in caches}
            skipped = sum(s for _, _, s in parts)
        for m, c in caches.items():
            c.put(list(new[m]), list(new[m].values()))
            c.absent |= new_absent[m]
        if skipped:
            log.warning("%s: %d sample(s) could not be decoded; they are predicted from the other modalities",
                        split, skipped)

        def save() -> None:         # one writer, rank 0
            for m, c in caches.items():
                if new[m] or new_absent[m]:
                    c.save()
        dist.on_main(save)
    dims = {m: (next(iter(c.data.values())).shape[0] if c.data else 1) for m, c in caches.items()}
    feats, present = {}, np.ones((len(names), len(modalities)), bool)
    for j, m in enumerate(modalities):
        c = caches[m]
        feats[m] = np.stack([c.data.get(k, np.zeros(dims[m], np.float32)) for k in keys]).astype(np.float32)
        present[:, j] = [k in c.data for k in keys]
        if m == "t":
            col = encoders.specs["t"]["column"]
            present[:, j] &= [bool(t.get(col, "").strip()) for t in texts]
    return names, labels, feats, present


def specs_for(cfg) -> dict:
    """Encoder specs of a FinetuneConfig (stored in the model so `evaluate` rebuilds the same features)."""
    return {"a": {"teacher": str(Path(cfg.teacher).resolve()), "adapted": cfg.acoustic == "adapted"},
            "v": {"encoder": cfg.visual if cfg.visual == "random" else str(Path(cfg.visual).resolve()),
                  "seed": cfg.seed, "visual_model": asdict(cfg.visual_model)},
            "t": {"model": cfg.text_model, "column": cfg.text_column}}


def frames(shards: str, split: str, data: DataConfig, cache_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """Decoded frames of a split, [N, F, 3, H, W] uint8 in name order, for fine-tuning the visual encoder end
    to end: decoded once into `<cache>/frames-<key>.npy` and then memory-mapped (disk, not RAM, bounds it).
    Clips that fail to decode get zero frames (and are counted in the log). Every rank must call it: rank 0
    alone decodes (one writer), the others wait for it outside any collective, then map the file."""
    names, _, _, keys = index(shards, split)
    key = hashlib.sha256(json.dumps([keys, data.frames, data.height, data.width]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"frames-{key}.npy"
    dist.on_main(lambda: None if path.is_file() else _decode_frames(path, names, shards, split, data))
    return names, np.load(path, mmap_mode="r")


def _decode_frames(path: Path, names: list[str], shards: str, split: str, data: DataConfig) -> None:
    """Rank 0 decodes a split's frames into `path` (memory-mapped while it writes: memory stays one batch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path, ".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(names), data.frames, 3, data.height, data.width))
        out[:] = 0
        where = {n: i for i, n in enumerate(names)}
        totals = SkipTotals()
        for batch in iterate(eval_loader(shard_urls(shards, split), data, 0, 1, tolerant=True), totals):
            for n, f in zip(batch["name"], batch["frames"].numpy()):
                out[where[n]] = f
        out.flush()
        del out
    if totals.samples:
        log.warning("%s: %d clip(s) could not be decoded; their frames are blank", split, totals.samples)


class StackedRows:
    """Rows of several arrays (memory-mapped frame caches), each through its own row indices, read as the rows of
    one array without copying them: `rows[idx]` reads just those rows, so a pool's frames stay on disk."""

    def __init__(self, *parts: tuple[np.ndarray, np.ndarray]):
        self.parts = [arr for arr, _ in parts]
        self.part = np.concatenate([np.full(len(rows), k) for k, (_, rows) in enumerate(parts)])
        self.row = np.concatenate([np.asarray(rows, dtype=np.int64) for _, rows in parts])

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), *self.parts[0].shape[1:]), self.parts[0].dtype)
        for k, arr in enumerate(self.parts):
            m = self.part[idx] == k
            if m.any():
                out[m] = arr[self.row[idx[m]]]
        return out
