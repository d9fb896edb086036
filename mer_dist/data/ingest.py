"""MER2024 release layout -> WebDataset shards + manifest.json.

Reads `video-labeled/`, `video-unlabeled/`, `label-disdim.csv`, `label-transcription.csv` and, when
present, `label-test.csv`. Every clip is probed (in a worker pool) before it is packed: clips that
fail to open or have neither a video nor an audio stream are reported by name and left out (or, with
`strict`, stop the run); a clip with one of the two is kept, the other marked missing in its JSON. Shards keep the original container bytes unless re-encoding is asked for.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from multiprocessing import get_context
from pathlib import Path
from urllib.parse import quote

import numpy as np
from tqdm import tqdm

from mer_dist.config import LABELS, ReencodeConfig, ShardConfig
from mer_dist.data.decode import DecodeError, probe, transcode
from mer_dist.errors import DataError
from mer_dist.io import atomic_target, write_json_atomic

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm")


def shard_key(name: str) -> str:
    """A clip name as a tar member key: WebDataset splits keys at the first dot of a member's name, so dots
    (and '%', '/', spaces, non-ASCII) are percent-encoded; the original name travels in the sample's JSON."""
    return quote(name, safe="-_~").replace(".", "%2E")


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing} (expected {list(required)})")
            return list(reader)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def _labels(path: Path, allow_duplicates: bool = False) -> dict[str, str]:
    out, line_of = {}, {}
    for row_no, row in enumerate(_read_csv(path, ("name", "discrete")), start=2):
        name = row["name"].strip()
        label = (row["discrete"] or "").strip().lower()
        if label not in LABELS:
            raise DataError(f"{path}:{row_no} ({name}): unknown label {row['discrete']!r} "
                            f"(expected one of {', '.join(LABELS)})")
        if name in out:
            msg = f"{path}:{row_no} ({name}): duplicate row, first at line {line_of[name]}"
            if not allow_duplicates:
                raise DataError(msg + " (shard.allow_duplicate_labels=true keeps the last one)")
            print(f"shard: warning: {msg}; line {row_no} ('{label}') wins over '{out[name]}'")
        out[name], line_of[name] = label, row_no
    return out


def _videos(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in VIDEO_EXTS:
            if p.stem in out:
                raise DataError(f"{out[p.stem]} and {p.name}: two videos of clip '{p.stem}'; keep one")
            out[p.stem] = p
    return out


def read_corpus(root: str | Path, test_in_unlabeled: bool = False,
                allow_duplicates: bool = False) -> dict[str, list[dict]]:
    """{split: [sample records]} for splits train / test / unlabeled; "unlisted": labeled videos with no row."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: corpus directory not found")
    labeled, unlabeled = _videos(root / "video-labeled"), _videos(root / "video-unlabeled")
    if not labeled and not unlabeled:
        raise DataError(f"{root}: no videos under video-labeled/ or video-unlabeled/")
    train_labels = _labels(root / "label-disdim.csv", allow_duplicates)
    test_labels = _labels(root / "label-test.csv", allow_duplicates) if (root / "label-test.csv").is_file() else {}
    both = sorted(set(train_labels) & set(test_labels))
    if both:        # one clip in both splits: training on test clips inflates every test figure
        raise DataError(f"{root}: {len(both)} clip(s) listed in both label-disdim.csv and label-test.csv "
                        f"(train/test leakage): {', '.join(both[:5])}{' ...' if len(both) > 5 else ''}")
    texts = {}
    tpath = root / "label-transcription.csv"
    if tpath.is_file():
        for row in _read_csv(tpath, ("name",)):
            texts[row["name"].strip()] = {"english": (row.get("english") or "").strip(),
                                          "chinese": (row.get("chinese") or "").strip()}

    def rec(name: str, path: Path | None, split: str, label: str | None) -> dict:
        return {"name": name, "path": str(path) if path else "", "split": split, "label": label,
                "text": texts.get(name, {"english": "", "chinese": ""})}

    splits: dict[str, list[dict]] = {"train": [], "test": [], "unlabeled": []}
    for name, label in sorted(train_labels.items()):
        splits["train"].append(rec(name, labeled.get(name) or unlabeled.get(name), "train", label))
    for name, label in sorted(test_labels.items()):
        splits["test"].append(rec(name, unlabeled.get(name) or labeled.get(name), "test", label))
    for name, path in unlabeled.items():
        if name in train_labels or (name in test_labels and not test_in_unlabeled):
            continue
        splits["unlabeled"].append(rec(name, path, "unlabeled", None))
    unlisted = sorted(set(labeled) - set(train_labels) - set(test_labels))
    return {**splits, "unlisted": [rec(name, labeled[name], "unlisted", None) for name in unlisted]}


def _check(rec: dict) -> dict:
    """Probe one clip in a worker: stream presence and duration; never raises."""
    if not rec["path"]:
        return {**rec, "error": "video file not found"}
    try:
        info = probe(rec["path"], rec["name"])
    except DecodeError as e:
        return {**rec, "error": e.reason}
    if not info["has_video"] and not info["has_audio"]:
        return {**rec, "error": "no video or audio stream"}
    # a clip with one of its streams is kept, the other marked missing: fusion is trained for missing modalities,
    # and a stage that needs both (align, the teacher's) skips and counts it
    return {**rec, **info, "bytes": os.path.getsize(rec["path"])}


def _reencode(path: str, cfg: ReencodeConfig, workdir: Path) -> tuple[bytes, float]:
    """A fresh H.264+AAC mp4 at the target fps/size and its real duration, streamed frame by frame (`transcode`:
    memory and length follow the video, never the duration its header claims), via a private temp file in the
    output directory (created exclusively, so a planted link cannot redirect the write)."""
    fd, tmp = tempfile.mkstemp(prefix=".reencode-", suffix=".mp4", dir=workdir)
    os.close(fd)
    try:
        n = transcode(path, Path(tmp), cfg.fps, cfg.height, cfg.width)
        return Path(tmp).read_bytes(), n / cfg.fps
    finally:
        os.unlink(tmp)


def tar_add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """One shard member with fixed mtime/mode, so the same input gives byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


def _write_shard(job: tuple[str, list[dict], ReencodeConfig]) -> str:
    """Write one shard to a temp name, then rename: a crashed run never leaves a half shard."""
    path, samples, reenc = job
    with atomic_target(path) as tmp, tarfile.open(tmp, "w") as tar:
        for s in samples:
            duration = s["duration_s"]
            if reenc.enabled:
                (data, duration), ext, fps = _reencode(s["path"], reenc, Path(path).parent), "mp4", reenc.fps
            else:
                data, ext = Path(s["path"]).read_bytes(), Path(s["path"]).suffix.lstrip(".").lower()
                fps = s["fps"]
            meta = {"name": s["name"], "split": s["split"], "duration_s": round(duration, 4), "fps": fps,
                    "source": s["path"], "transcript": s["text"]["english"] or s["text"]["chinese"],
                    "text": s["text"], "sha256": hashlib.sha256(data).hexdigest(),   # content key of caches
                    "has_video": s["has_video"], "has_audio": s["has_audio"]}
            if s["label"] is not None:
                meta["label"] = s["label"]
            tar_add(tar, f"{shard_key(s['name'])}.{ext}", data)
            tar_add(tar, f"{shard_key(s['name'])}.json", json.dumps(meta, ensure_ascii=False).encode())
    return path


def write_shards(cfg: ShardConfig) -> dict:
    """Probe, pack and write all splits; returns the manifest (also written to out/manifest.json)."""
    splits = read_corpus(cfg.corpus, cfg.test_in_unlabeled, cfg.allow_duplicate_labels)
    unlisted = [r["name"] for r in splits.pop("unlisted")]
    if unlisted:
        print(f"shard: {len(unlisted)} video(s) in video-labeled/ have no row in label-disdim.csv or label-test.csv "
              f"and are not sharded: {', '.join(unlisted[:10])}{' ...' if len(unlisted) > 10 else ''}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    recs = [r for split in splits.values() for r in split]
    with get_context("spawn").Pool(max(1, cfg.workers)) as pool:
        checked = list(tqdm(pool.imap(_check, recs, chunksize=8), total=len(recs), desc="probe", unit="clip"))
    bad = [{"name": r["name"], "split": r["split"], "reason": r["error"]} for r in checked if "error" in r]
    for b in bad:
        print(f"shard: skipping {b['name']} ({b['split']}): {b['reason']}")
    if bad and cfg.strict:
        raise DataError(f"{len(bad)} bad clip(s), first: {bad[0]['name']}: {bad[0]['reason']} (strict mode)")
    good = [r for r in checked if "error" not in r]
    for stream in ("audio", "video"):
        without = [r["name"] for r in good if not r[f"has_{stream}"]]
        if without:
            print(f"shard: {len(without)} clip(s) kept without a{'n' * (stream == 'audio')} {stream} stream (marked "
                  f"missing; stages that need it skip and count them): {', '.join(without[:10])}"
                  f"{' ...' if len(without) > 10 else ''}")
    target = cfg.shard_mb * 1e6
    jobs, manifest = [], {"version": 1, "corpus": str(Path(cfg.corpus).resolve()), "labels": list(LABELS),
                          "splits": {}, "skipped": bad}
    for split in ("train", "test", "unlabeled"):
        samples = [r for r in good if r["split"] == split]
        groups, cur, size = [], [], 0.0
        for s in samples:
            if cur and size + s["bytes"] > target:
                groups.append(cur)
                cur, size = [], 0.0
            cur.append(s)
            size += s["bytes"]
        if cur:
            groups.append(cur)
        shard_list = []
        for i, g in enumerate(groups):
            name = f"{split}-{i:06d}.tar"
            jobs.append((str(out / name), g, cfg.reencode))
            shard_list.append({"name": name, "samples": len(g)})
        manifest["splits"][split] = {
            "shards": shard_list, "samples": len(samples),
            "labels": dict(Counter(s["label"] for s in samples if s["label"] is not None)),
            "duration_s": round(float(np.sum([s["duration_s"] for s in samples])) if samples else 0.0, 2)}
    with get_context("spawn").Pool(max(1, cfg.workers)) as pool:
        list(tqdm(pool.imap_unordered(_write_shard, jobs), total=len(jobs), desc="shards", unit="shard"))
    manifest["unlisted"] = unlisted
    write_json_atomic(out / "manifest.json", manifest)
    n = sum(v["samples"] for v in manifest["splits"].values())
    print(f"shard: {n} clips in {len(jobs)} shards ({time.time() - t0:.1f}s), skipped {len(bad)} -> {out}")
    return manifest


def load_manifest(shards: str | Path) -> dict:
    p = Path(shards) / "manifest.json"
    if not p.is_file():
        raise DataError(f"{p}: manifest not found (run `mer-dist shard` first, or check data.shards)")
    return json.loads(p.read_text())


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def shard_urls(shards: str | Path, split: str) -> list[str]:
    """Shard paths of a split, checked to exist: a missing shard is an error, never a silent gap. Each is an
    absolute local path, which webdataset opens as a file: a manifest's name never becomes a URL or a command
    (`pipe:...`), whatever directory the shards were given as."""
    man = load_manifest(shards)
    if split not in man["splits"]:
        raise DataError(f"{Path(shards) / 'manifest.json'}: no split '{split}' (have {list(man['splits'])})")
    root = Path(shards).resolve()
    urls = []
    for s in man["splits"][split]["shards"]:
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise DataError(f"{Path(shards) / 'manifest.json'}: shard name {name!r} is not a plain file name "
                            f"(a shard lives beside its manifest; path components are refused)")
        if _SCHEME.match(name):
            raise DataError(f"{Path(shards) / 'manifest.json'}: shard name {name!r} looks like a URL scheme "
                            f"(shard names are plain file names such as train-000000.tar)")
        p = root / name
        if not p.exists() or p.is_dir():     # a file, or anything readable as one (a pipe, a device)
            raise DataError(f"{p}: shard listed in manifest.json is missing")
        urls.append(str(p))
    return urls
