"""`mer-dist extract-targets`: run the frozen teacher once over a split, write shards with `teacher.npy`.

Rank r owns input shards r, r+W, ...; each output shard has the input's name, is written to a temp
file and renamed when complete, so a rerun skips finished shards and no two ranks write one file.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from webdataset.tariterators import tarfile_samples

from mer_dist import dist
from mer_dist.config import ExtractConfig
from mer_dist.data.decode import DecodeError
from mer_dist.data.ingest import load_manifest, shard_urls, tar_add
from mer_dist.data.stream import collate, decode_sample
from mer_dist.io import atomic_target, write_json_atomic
from mer_dist.models.teacher import Teacher
from mer_dist.timing import FRAME_RATE


def _process(url: str, dst: Path, teacher: Teacher, cfg: ExtractConfig, tmeta: dict) -> tuple[int, int]:
    kept = skipped = 0
    with atomic_target(dst) as tmp, tarfile.open(tmp, "w") as tar:
        pending: list[tuple[dict, dict]] = []

        def flush():
            nonlocal kept
            if not pending:
                return
            batch = collate([d for _, d in pending])
            feats, mask = teacher.features(batch["audio"], batch["audio_lens"])
            for i, (raw, _) in enumerate(pending):
                arr = feats[i, : int(mask[i].sum())].numpy().astype(cfg.dtype)
                buf = io.BytesIO()
                np.save(buf, arr)
                for k, v in raw.items():
                    if not k.startswith("__"):
                        tar_add(tar, f"{raw['__key__']}.{k}", v)
                tar_add(tar, f"{raw['__key__']}.teacher.npy", buf.getvalue())
                tar_add(tar, f"{raw['__key__']}.teacher.json", json.dumps(tmeta).encode())
                kept += 1
            pending.clear()

        for raw in tarfile_samples([{"url": url}]):
            try:
                pending.append((raw, decode_sample(raw, cfg.data, frames=0)))
            except DecodeError as e:
                skipped += 1
                print(f"extract-targets: skipping {e}")
            if len(pending) >= cfg.batch_size:
                flush()
        flush()
    return kept, skipped


def run(cfg: ExtractConfig) -> dict:
    env = dist.setup()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    urls = shard_urls(cfg.data.shards, cfg.split)
    teacher = Teacher.load(cfg.teacher)
    tmeta = {k: teacher.spec[k] for k in ("base_model", "adapter_hash", "feature_layers", "feature_reduce", "dim")}
    tmeta |= {"teacher_dir": str(Path(cfg.teacher).resolve()), "frame_rate": FRAME_RATE, "dtype": cfg.dtype}
    counts: dict[str, list[int]] = {}
    done = 0
    mine = urls[env.rank::env.world_size]
    for url in tqdm(mine, desc=f"extract-targets[rank {env.rank}]", unit="shard", disable=not env.is_main):
        dst = out / Path(url).name
        if dst.is_file():           # complete shards are renamed into place: safe to skip
            done += 1
            continue
        with torch.inference_mode():
            counts[dst.name] = list(_process(url, dst, teacher, cfg, tmeta))
    all_counts: dict[str, list[int]] = {}
    parts = dist.all_gather_object((counts, done))
    for part, _ in parts:
        all_counts.update(part)
    done = sum(d for _, d in parts)

    def write_manifest() -> None:     # rank 0; the others wait outside any collective
        man = load_manifest(cfg.data.shards)
        prev = load_manifest(out)["splits"].get(cfg.split, {}) if (out / "manifest.json").is_file() else {}
        prev_counts = {s["name"]: s["samples"] for s in prev.get("shards", [])}
        shards = [{"name": Path(u).name, "samples": all_counts.get(Path(u).name, [prev_counts.get(Path(u).name, 0)])[0]}
                  for u in urls]
        man["splits"][cfg.split] = {**man["splits"][cfg.split], "shards": shards,
                                    "samples": sum(s["samples"] for s in shards)}
        for split in man["splits"]:     # other splits stay readable from the new directory (links, no copies)
            if split != cfg.split:
                for s in man["splits"][split]["shards"]:
                    link = out / s["name"]
                    if not link.exists():
                        os.symlink((Path(cfg.data.shards) / s["name"]).resolve(), link)
        man["teacher"] = tmeta
        write_json_atomic(out / "manifest.json", man)
        print(f"extract-targets: {sum(s['samples'] for s in shards)} samples in {len(shards)} shards -> {out}"
              f" ({done} already complete, skipped)")

    dist.on_main(write_manifest)
    dist.cleanup()
    return all_counts
