"""synth -> shard -> stream on real mp4/avi files, with corrupt input."""
import json
import shutil
import tarfile

import numpy as np
import pytest
from conftest import REPO, run_cli

from mer_dist.config import LABELS, DataConfig, ShardConfig, SynthConfig
from mer_dist.data.decode import DecodeError, decode, write_av
from mer_dist.data.ingest import DataError, read_corpus, shard_urls, write_shards
from mer_dist.data.stream import SkipTotals, eval_loader, iterate, train_loader
from mer_dist.data.synth import ClipSpec, generate, make_clip


@pytest.mark.slow
def test_round_trip_values(corpus, shards):
    man = json.loads((shards / "manifest.json").read_text())
    assert man["splits"]["train"]["samples"] == 96 and man["splits"]["test"]["samples"] == 24
    assert man["splits"]["unlabeled"]["samples"] == 64 and len(man["splits"]["train"]["shards"]) > 1
    labels = {r["name"]: r["discrete"] for r in __import__("csv").DictReader(open(corpus / "label-disdim.csv"))}
    texts = {r["name"]: r["english"] for r in __import__("csv").DictReader(open(corpus / "label-transcription.csv"))}
    assert sum(man["splits"]["train"]["labels"].values()) == 96
    cfg = DataConfig(frames=5, height=24, width=40, batch_size=7, workers=0)
    seen = 0
    for b in iterate(eval_loader(shard_urls(shards, "train"), cfg)):
        assert b["frames"].shape[1:] == (5, 3, 24, 40) and b["frames"].dtype.__str__() == "torch.uint8"
        for i, name in enumerate(b["name"]):
            assert LABELS[int(b["label"][i])] == labels[name]
            assert b["text"][i]["english"] == texts[name]
            dur = float(b["duration"][i])
            n = int(b["audio_lens"][i])
            assert abs(n - dur * 16000) < 0.1 * 16000, (name, n, dur)
            ft = b["frame_times"][i].numpy()
            assert np.allclose(ft, (np.arange(5) + 0.5) * dur / 5, atol=1e-4)
            assert b["frames"][i].float().std() > 5            # a drawn face, not a blank frame
        seen += len(b["name"])
    assert seen == 96


@pytest.mark.slow
def test_exactly_once_across_ranks_and_workers(shards):
    cfg = DataConfig(frames=1, height=16, width=16, batch_size=5, workers=2)
    names = []
    for rank in range(2):
        for b in iterate(eval_loader(shard_urls(shards, "train"), cfg, rank=rank, world=2)):
            names += b["name"]
    assert len(names) == 96 and len(set(names)) == 96
    # also with more slots than shards (sample-level split)
    one = [shard_urls(shards, "test")[0]]
    n_in_shard = json.loads((shards / "manifest.json").read_text())["splits"]["test"]["shards"][0]["samples"]
    names = []
    for rank in range(2):
        for b in iterate(eval_loader(one, cfg, rank=rank, world=2)):
            names += b["name"]
    assert len(names) == len(set(names)) == n_in_shard


def test_deterministic_synth_and_stream(tmp_path):
    a = generate(SynthConfig(out=str(tmp_path / "a"), num_labeled=6, num_unlabeled=3, num_test=2, height=32, width=32, seed=5, workers=1))
    b = generate(SynthConfig(out=str(tmp_path / "b"), num_labeled=6, num_unlabeled=3, num_test=2, height=32, width=32, seed=5, workers=2))
    for f in ("label-disdim.csv", "label-transcription.csv", "label-test.csv"):
        assert (a / f).read_text() == (b / f).read_text()
    # every clip byte for byte, whichever worker encoded it after whichever clips (x264 state must not leak)
    clips = sorted(p.relative_to(a) for p in a.glob("video-*/*.mp4"))
    assert len(clips) == 11 and all((a / c).read_bytes() == (b / c).read_bytes() for c in clips)
    x = decode(a / "video-labeled/sample_00000003.mp4", 4, 32, 32)
    y = decode(b / "video-labeled/sample_00000003.mp4", 4, 32, 32)
    assert np.array_equal(x.frames, y.frames) and np.array_equal(x.audio, y.audio)
    c = generate(SynthConfig(out=str(tmp_path / "c"), num_labeled=6, num_unlabeled=3, num_test=2, height=32, width=32, seed=6, workers=1))
    assert (a / "label-transcription.csv").read_text() != (c / "label-transcription.csv").read_text()


def test_encoder_bytes_do_not_depend_on_process_history(tmp_path):
    # x264's macroblock-tree gave another first frame now and then when the same clip was encoded many times
    # in one process (CI's failure of the test above): 40 encodes, one set of bytes
    clip = make_clip(SynthConfig(out=str(tmp_path), height=32, width=32, seed=5), ClipSpec("c", "happy", 5))
    seen = set()
    for _ in range(40):
        write_av(tmp_path / "c.mp4", clip["frames"], clip["audio"], 25, "mp4")
        seen.add((tmp_path / "c.mp4").read_bytes())
    assert len(seen) == 1


@pytest.mark.slow
def test_train_stream_seeded(shards):
    cfg = DataConfig(frames=2, height=16, width=16, batch_size=4, workers=0, shuffle_buffer=8)
    def first(seed):
        it = iter(train_loader(shard_urls(shards, "unlabeled"), cfg, seed=seed))
        return [n for _ in range(3) for n in next(it)["name"]]
    assert first(1) == first(1) and first(1) != first(2)


def test_avi_and_bad_clips(tmp_path):
    root = generate(SynthConfig(out=str(tmp_path / "c"), num_labeled=8, num_unlabeled=4, num_test=0, height=32,
                                width=32, container="avi", workers=1))
    vids = sorted((root / "video-labeled").iterdir())
    vids[0].write_bytes(b"\x00" * 1000)                                       # corrupt
    vids[1].write_bytes(vids[1].read_bytes()[: 600])                          # truncated
    from mer_dist.data.decode import write_av
    from mer_dist.data.synth import ClipSpec, make_clip
    clip = make_clip(SynthConfig(height=32, width=32), ClipSpec("x", "sad", 0))
    vids[2].unlink()
    write_av(root / "video-labeled" / f"{vids[2].stem}.mp4", clip["frames"], None, 10, "mp4")   # no audio stream
    vids[3].unlink()
    write_av(root / "video-labeled" / f"{vids[3].stem}.mp4", None, clip["audio"], 10, "mp4")    # no video stream
    m = write_shards(ShardConfig(corpus=str(root), out=str(tmp_path / "s"), workers=1))
    skipped = {s["name"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {vids[0].stem, vids[1].stem}          # #32 item 9: one missing stream is no bad clip
    assert m["splits"]["train"]["samples"] == 6
    urls = shard_urls(tmp_path / "s", "train")
    cfg = DataConfig(frames=3, height=32, width=32, workers=0, batch_size=8)
    b = next(iterate(eval_loader(urls, cfg, tolerant=True)))     # the fusion model's features: modality missing
    assert b["frames"].shape == (6, 3, 3, 32, 32)
    has = {n: (a, v) for n, a, v in zip(b["name"], b["has_audio"].tolist(), b["has_video"].tolist())}
    assert has[vids[2].stem] == (False, True) and has[vids[3].stem] == (True, False)
    assert sum(a and v for a, v in has.values()) == 4 and not b["frames"][b["name"].index(vids[3].stem)].any()
    totals = SkipTotals()                                        # alignment's: needs both, skips and counts them
    names = [n for batch in iterate(eval_loader(urls, cfg), totals) for n in batch["name"]]
    assert totals.samples == 2 and len(names) == 4 and vids[2].stem not in names and vids[3].stem not in names
    from dataclasses import asdict

    from mer_dist.config import VisualConfig
    from mer_dist.features import Encoders, extract
    enc = Encoders({"v": {"encoder": "random", "seed": 0, "visual_model": asdict(VisualConfig())}}, 32)
    for _ in range(2):                        # the second call reads the cache, absent clip included
        got, _, _, present = extract(enc, ["v"], str(tmp_path / "s"), "train", cfg, tmp_path / "cache")
        assert dict(zip(got, present[:, 0].tolist())) == {n: n != vids[3].stem for n in got}
    with pytest.raises(DataError, match="bad clip"):
        write_shards(ShardConfig(corpus=str(root), out=str(tmp_path / "s2"), workers=1, strict=True))


@pytest.mark.slow
def test_wrong_label_names_the_row(tmp_path, corpus):
    root = tmp_path / "c"
    shutil.copytree(corpus, root)
    lines = (root / "label-disdim.csv").read_text().splitlines()
    name = lines[3].split(",")[0]
    lines[3] = f"{name},joyful,1.0"
    (root / "label-disdim.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"label-disdim.csv:4 \({name}\): unknown label 'joyful'"):
        read_corpus(root)


@pytest.mark.slow
def test_a_clip_in_both_train_and_test_labels_is_refused(tmp_path, corpus):
    root = tmp_path / "c"
    shutil.copytree(corpus, root)
    test_row = (root / "label-test.csv").read_text().splitlines()[1]
    with open(root / "label-disdim.csv", "a") as f:
        f.write(test_row + "\n")                  # the same clip, now also a training row
    p = run_cli("shard", "--corpus", root, "--out", tmp_path / "s", check=False)
    assert p.returncode == 2 and not (tmp_path / "s" / "manifest.json").exists()
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("mer-dist: error:")]
    assert len(line) == 1 and "1 clip(s) listed in both label-disdim.csv and label-test.csv" in line[0]
    assert test_row.split(",")[0] in line[0]


@pytest.mark.slow
def test_missing_shard_and_corrupt_sample_skipped(tmp_path, shards):
    s = tmp_path / "s"
    shutil.copytree(shards, s)
    urls = shard_urls(s, "unlabeled")
    # replace one sample's video bytes in a shard by garbage: the stream skips and counts it
    src = urls[0]
    with tarfile.open(src) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    bad_name = members[0][0].name
    import io
    with tarfile.open(src, "w") as t:
        for m, data in members:
            if m.name == bad_name:
                data = b"garbage" * 50
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    totals = SkipTotals()
    cfg = DataConfig(frames=2, height=16, width=16, batch_size=4, workers=1)
    names = [n for b in iterate(eval_loader(urls, cfg), totals) for n in b["name"]]
    assert totals.samples == 1 and bad_name.split(".")[0] not in names and len(names) == 63
    (s / urls[1].split("/")[-1]).unlink()
    with pytest.raises(DataError, match="shard listed in manifest.json is missing"):
        shard_urls(s, "unlabeled")
    with pytest.raises(DecodeError, match="cannot open"):
        decode(b"not a video", 2, 8, 8, name="x")


@pytest.mark.slow
def test_reencode_to_fixed_fps_and_size(tmp_path, corpus):
    from mer_dist.config import ReencodeConfig
    from mer_dist.data.decode import probe
    root = tmp_path / "c"
    root.mkdir()
    for f in ("label-disdim.csv", "label-transcription.csv"):
        lines = (corpus / f).read_text().splitlines()
        (root / f).write_text("\n".join(lines[:4]) + "\n")
    (root / "video-labeled").mkdir()
    for line in (corpus / "label-disdim.csv").read_text().splitlines()[1:4]:
        name = line.split(",")[0]
        shutil.copy(corpus / "video-labeled" / f"{name}.mp4", root / "video-labeled")
    write_shards(ShardConfig(corpus=str(root), out=str(tmp_path / "s"), workers=1,
                             reencode=ReencodeConfig(enabled=True, fps=5, height=16, width=24)))
    with tarfile.open(shard_urls(tmp_path / "s", "train")[0]) as t:
        mp4 = next(m for m in t.getmembers() if m.name.endswith(".mp4"))
        info = probe(t.extractfile(mp4).read())
    assert info["fps"] == 5.0 and info["has_audio"]
    b = next(iterate(eval_loader(shard_urls(tmp_path / "s", "train"), DataConfig(frames=2, height=16, width=24, workers=0))))
    assert len(b["name"]) == 3


@pytest.mark.slow
def test_shuffled_pairing_is_a_fixed_clip_to_clip_permutation(shards, corpus):
    """pairing=shuffled: every clip's video meets another clip's audio, always the same one, for any seed."""
    cfg = DataConfig(frames=2, height=16, width=16, batch_size=4, workers=0, shuffle_buffer=8)
    urls = shard_urls(shards, "unlabeled")
    pairs: dict[str, str] = {}
    for seed in (0, 1):
        it = iter(train_loader(urls, cfg, seed=seed, pairing="shuffled"))
        for _ in range(12):
            b = next(it)
            for name, partner, n in zip(b["name"], b["paired_with"], b["audio_lens"]):
                assert partner != name
                assert pairs.setdefault(name, partner) == partner          # fixed, across batches and seeds
                if len(pairs) < 4:   # the audio really is the partner's clip
                    ref = decode(corpus / "video-unlabeled" / f"{partner}.mp4", 0, 16, 16)
                    assert ref.audio.size == int(n)
    assert len(set(pairs.values())) == len(pairs)        # a permutation: no clip's audio serves two videos
    matched = next(iter(train_loader(urls, cfg, seed=0)))
    assert matched["paired_with"] == matched["name"]


@pytest.mark.slow
def test_manifest_shard_names_with_path_components_are_refused(tmp_path, shards):
    s = tmp_path / "s"
    shutil.copytree(shards, s)
    man = json.loads((s / "manifest.json").read_text())
    man["splits"]["train"]["shards"][0]["name"] = "../../etc/passwd"
    (s / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="shard name '../../etc/passwd' is not a plain file name"):
        shard_urls(s, "train")


def test_lock_file_is_never_opened_through_a_symlink(tmp_path):
    from mer_dist.errors import LockError
    from mer_dist.io import OutputLock
    victim = tmp_path / "bashrc"
    victim.write_text("keep me\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(victim)
    with pytest.raises(LockError, match="symlink is refused"):
        OutputLock(tmp_path / "run").acquire()
    assert victim.read_text() == "keep me\n"


def _lying_avi(path, seconds: float, claimed_s: float, fps: int = 10) -> None:
    """An .avi whose headers (avih total frames, each stream's strh length) claim `claimed_s` seconds."""
    import struct
    from mer_dist.data.decode import write_av
    rng = np.random.default_rng(0)
    write_av(path, rng.integers(0, 255, (int(seconds * fps), 32, 48, 3), dtype=np.uint8),
             (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), fps, "avi")
    b = bytearray(path.read_bytes())
    i = 0
    while (i := b.find(b"strh", i)) >= 0:
        struct.pack_into("<I", b, i + 40, int(claimed_s * (fps if b[i + 8:i + 12] == b"vids" else 16000)))
        i += 4
    struct.pack_into("<I", b, b.find(b"avih") + 24, int(claimed_s * fps))
    path.write_bytes(bytes(b))


def test_reencode_follows_the_video_not_the_duration_its_header_claims(tmp_path):
    """#22 item 8: a clip whose header claims an hour (2 s of video) is re-encoded in one streaming pass: memory
    stays a few frames (numpy allocations traced), the output holds the 2 s it really has, at the target fps, with
    its audio; the sample's JSON records that duration."""
    import tracemalloc

    from mer_dist.config import ReencodeConfig
    from mer_dist.data.decode import decode, probe
    from mer_dist.data.ingest import _reencode
    src = tmp_path / "liar.avi"
    _lying_avi(src, seconds=2.0, claimed_s=3600.0)
    assert probe(src)["duration_s"] == 3600.0           # the header's claim (what sizing by duration would trust)
    tracemalloc.start()
    data, duration = _reencode(str(src), ReencodeConfig(enabled=True, fps=10, height=64, width=64), tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 * 2 ** 20, f"peak {peak / 2 ** 20:.0f} MiB"       # an hour of 64x64 frames would be 442 MiB
    assert duration == pytest.approx(2.0, abs=0.15)
    info = probe(data)
    assert info["has_audio"] and info["fps"] == 10.0 and info["duration_s"] == pytest.approx(2.0, abs=0.15)
    clip = decode(data, 4, 64, 64, max_seconds=6.0)
    assert clip.audio.size == pytest.approx(2.0 * 16000, rel=0.05)
    # shard writes the real duration into the sample's JSON
    root = tmp_path / "c"
    (root / "video-labeled").mkdir(parents=True)
    shutil.copy(src, root / "video-labeled" / "liar.avi")
    (root / "label-disdim.csv").write_text("name,discrete,valence\nliar,happy,0\n")
    (root / "label-transcription.csv").write_text("name,english,chinese\nliar,hello,\n")
    write_shards(ShardConfig(corpus=str(root), out=str(tmp_path / "s"), workers=1,
                             reencode=ReencodeConfig(enabled=True, fps=10, height=32, width=32)))
    with tarfile.open(shard_urls(tmp_path / "s", "train")[0]) as t:
        meta = json.loads(t.extractfile(next(m for m in t.getmembers() if m.name.endswith(".json"))).read())
    assert meta["duration_s"] == pytest.approx(2.0, abs=0.15)


@pytest.mark.slow
def test_loader_workers_never_free_the_parents_ffmpeg_graphs():
    """A resampler's filter graph made in the trainer and left to the cyclic GC (what decoding PCM audio leaves):
    freed inside a forked worker, FFmpeg joins threads that exist only in the parent and the worker hangs holding
    the GIL (found on an AVI corpus: align made no step for 15 minutes). A plain DataLoader hangs; ours answers."""
    import os
    import signal
    import subprocess
    import sys
    script = str(REPO / "tests" / "forked_ffmpeg.py")
    ok = subprocess.run([sys.executable, script, "fixed"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert ok.returncode == 0 and "tensor([0.])" in ok.stdout, ok.stderr[-2000:]
    plain = subprocess.Popen([sys.executable, script, "plain"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=REPO, start_new_session=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            plain.wait(timeout=20)
    finally:        # the hung worker too: the whole session, not just its parent
        os.killpg(plain.pid, signal.SIGKILL)
        plain.wait()
