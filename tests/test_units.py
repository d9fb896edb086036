"""Fast unit tests of the pieces under the end-to-end runs: collate, DeepSpeed config filling, checkpoint rotation,
the synthetic corpus's Bayes ceiling."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from mer_dist.config import AlignConfig
from mer_dist.data.stream import collate
from mer_dist import dist
from mer_dist.dist import DistEnv
from mer_dist.train import checkpoint
from mer_dist.train.zero import ds_config


def _sample(name, n_audio, n_teacher, label):
    return {"name": name, "text": {"english": name, "chinese": ""}, "paired_with": name, "label": label,
            "frames": np.full((2, 3, 4, 4), 7, np.uint8), "frame_times": np.array([0.25, 0.75], np.float32),
            "duration": 1.0, "audio": np.arange(1, n_audio + 1, dtype=np.float32),
            "teacher": np.ones((n_teacher, 3), np.float16)}


def test_collate_pads_to_the_longest_and_keeps_lengths():
    b = collate([_sample("a", 3, 2, 1), _sample("b", 5, 4, -1)])
    assert b["name"] == ["a", "b"] and b["label"].tolist() == [1, -1]
    assert b["frames"].dtype == torch.uint8 and b["frames"].shape == (2, 2, 3, 4, 4)
    assert b["audio"].shape == (2, 5) and b["audio_lens"].tolist() == [3, 5]
    assert b["audio"][0].tolist() == [1, 2, 3, 0, 0] and b["audio"][1].tolist() == [1, 2, 3, 4, 5]
    assert b["teacher"].shape == (2, 4, 3) and b["teacher"].dtype == torch.float32
    assert b["teacher_lens"].tolist() == [2, 4] and b["teacher"][0, 2:].abs().sum() == 0
    no_teacher = _sample("c", 2, 1, 0)
    del no_teacher["teacher"]
    assert "teacher" not in collate([_sample("a", 3, 2, 1), no_teacher])   # all or none


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ds_config_fills_every_auto_and_the_launch_file_chooses_the_stage(stage):
    cfg = AlignConfig()
    cfg.data.batch_size, cfg.train.grad_accum, cfg.train.steps, cfg.train.warmup_steps = 6, 3, 50, 80
    ds = ds_config(cfg, 64, on_gpu=False, launch_file=str(REPO / f"configs/ds/zero{stage}.json"))
    assert "auto" not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["gradient_accumulation_steps"] == 3
    assert ds["scheduler"]["params"]["total_num_steps"] == 50
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 49       # never past the end of the run
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["bf16"]["enabled"] is False   # CPU
    assert ds["optimizer"]["params"]["fused"] is False
    # on a GPU: still torch's AdamW (no nvcc JIT build on the nodes), with its fused kernels
    assert ds_config(cfg, 64, on_gpu=True, launch_file=str(REPO / f"configs/ds/zero{stage}.json"))[
        "optimizer"]["params"] == {**ds["optimizer"]["params"], "fused": True}
    assert "train_batch_size" not in ds           # DeepSpeed derives it from world size (elastic resume)


@pytest.mark.parametrize("steps,warmup", [(1, 30), (5, 0)])
def test_ds_config_warmup_is_one_step_at_least(steps, warmup):
    """DeepSpeed's WarmupCosineLR refuses 0 warm-up steps: a 1-step run (a rehearsal) or warmup_steps=0 must start."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR
    cfg = AlignConfig()
    cfg.train.steps, cfg.train.warmup_steps = steps, warmup
    params = ds_config(cfg, 64, on_gpu=False)["scheduler"]["params"]
    assert params["warmup_num_steps"] == 1
    WarmupCosineLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), **params)


class _Engine:
    """The one call checkpoint.save makes of a DeepSpeed engine (the real ones: test_align, test_hardening)."""

    def save_checkpoint(self, d, tag, client_state, save_latest):
        torch.save({"step": client_state["step"]}, f"{d}/{tag}/mp_rank_00_model_states.pt")


def test_checkpoint_rotation_keeps_the_newest_signed_and_complete(tmp_path):
    ckdir = tmp_path / "run" / "checkpoints"
    env = DistEnv()
    for step in range(1, 6):
        checkpoint.save(_Engine(), ckdir, step, {"step": step, "global_batch": 8}, keep=2, env=env)
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "run-id", "step00000004", "step00000005"]
    assert checkpoint.latest_tag(ckdir) == "step00000005"
    m = checkpoint.verify(ckdir, "step00000005")
    assert m["step"] == 5 and m["world_size"] == 1 and m["global_batch"] == 8
    assert set(m["files"]) == {"mp_rank_00_model_states.pt", "rng-rank00000.pt"}
    assert checkpoint.peek(ckdir)["step"] == 5
    for step in range(6, 9):
        checkpoint.save(_Engine(), ckdir, step, {"step": step}, keep=0, env=env)   # 0: keep all
    assert len([p for p in ckdir.iterdir() if p.is_dir()]) == 5


def _saved(tmp_path, steps, keep=0):
    ckdir = tmp_path / "run" / "checkpoints"
    for step in steps:
        checkpoint.save(_Engine(), ckdir, step, {"step": step}, keep=keep, env=DistEnv())
    return ckdir


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    ckdir = _saved(tmp_path, [1, 2, 3])
    (ckdir / ".tmp-step00000004").mkdir()                     # a save killed before its rename
    assert checkpoint._choose(ckdir, False)[::2] == ("step00000003", "")
    assert not (ckdir / ".tmp-step00000004").exists()
    with open(ckdir / "step00000003" / "mp_rank_00_model_states.pt", "ab") as f:
        f.write(b"x")                                          # damaged: files differ from the manifest
    assert checkpoint._choose(ckdir, False)[::2] == ("step00000002", "latest step00000003 is damaged")
    import shutil
    shutil.rmtree(ckdir / "step00000003")                      # what a user does with a damaged checkpoint
    tag, manifest, why = checkpoint._choose(ckdir, False)
    assert (tag, manifest["step"], why) == ("step00000002", 2, "latest step00000003 is missing")
    assert checkpoint.peek(ckdir)["step"] == 2
    # the next save after falling back from a later step: later (stale) checkpoints go, rotation is by step
    (ckdir / "step00000009").mkdir()
    checkpoint.save(_Engine(), ckdir, 3, {"step": 3}, keep=2, env=DistEnv())
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "run-id", "step00000002", "step00000003"]
    # nothing verifies: one line, never a fresh start over the run's history
    for tag in ("step00000002", "step00000003"):
        mf = ckdir / tag / checkpoint.MANIFEST
        mf.write_text(json.dumps({**json.loads(mf.read_text()), "signature": "é" * 64}))   # non-ASCII: no TypeError
    with pytest.raises(checkpoint.CheckpointError, match="not signed by your key.*no checkpoint in .* verifies"):
        checkpoint._choose(ckdir, False)
    (ckdir / "step00000003" / checkpoint.MANIFEST).write_text("{")
    with pytest.raises(checkpoint.CheckpointError, match="damaged manifest"):
        checkpoint.verify(ckdir, "step00000003")


def test_signing_key_lives_outside_the_run_and_is_refused_when_unsafe(tmp_path, monkeypatch):
    key = tmp_path / "cfg" / "mer-dist" / "checkpoint-key"
    monkeypatch.setenv("MER_DIST_KEY_FILE", str(key))
    ckdir = _saved(tmp_path, [1])
    assert key.is_file() and (key.stat().st_mode & 0o777) == 0o600 and not (tmp_path / "run" / ".mer-dist-key").exists()
    checkpoint.verify(ckdir, "step00000001")
    monkeypatch.setenv("MER_DIST_KEY_FILE", str(tmp_path / "colleague-key"))     # another user's key
    with pytest.raises(checkpoint.CheckpointError, match="not signed by your key"):
        checkpoint.verify(ckdir, "step00000001")
    assert checkpoint.verify(ckdir, "step00000001", trust=True)["step"] == 1
    monkeypatch.setenv("MER_DIST_KEY_FILE", str(key))
    key.chmod(0o644)
    with pytest.raises(checkpoint.CheckpointError, match="readable by others"):
        checkpoint.verify(ckdir, "step00000001")
    key.chmod(0o600)
    if os.getuid() == 0:
        os.chown(key, 65534, 65534)
        with pytest.raises(checkpoint.CheckpointError, match="belongs to uid 65534"):
            checkpoint.verify(ckdir, "step00000001")
        os.chown(key, 0, 0)
    link = tmp_path / "link-key"
    link.symlink_to(key)
    monkeypatch.setenv("MER_DIST_KEY_FILE", str(link))
    with pytest.raises(checkpoint.CheckpointError, match="symlink"):
        checkpoint.verify(ckdir, "step00000001")


def test_resume_drops_a_torn_metrics_row_and_the_rows_after_the_checkpoint(tmp_path, caplog):
    from mer_dist.config import TrackingConfig
    from mer_dist.tracking import Tracker
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
                                            + '{"step": 6, "lo')
    t = Tracker(TrackingConfig(enabled=False), tmp_path, "align")
    assert t.resume_at(3) == 2
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert "dropped 1 unreadable row" in caplog.text


@pytest.mark.slow
def test_synthetic_ceiling_is_bayes_optimal_reading(corpus, tmp_path):
    """`synth.ceiling`: with no confusable expressions a perfect reader of any modality is always right; with the
    defaults, reading all three beats reading any one (the gap fusion can close)."""
    from mer_dist.config import SynthConfig
    from mer_dist.data.synth import generate
    from mer_dist.eval.ceiling import ceiling
    clean = generate(SynthConfig(out=str(tmp_path / "c"), num_labeled=8, num_unlabeled=4, num_test=4, seconds=0.8,
                                 seconds_jitter=0.0, height=16, width=16, visual_noise=0.0, audio_noise=0.0,
                                 text_noise=0.0, workers=1))
    assert all(v == 1.0 for v in ceiling(clean).values())
    c = ceiling(corpus)
    assert c["avt"] > max(c["a"], c["v"], c["t"]) and all(0 < v < 1 for v in c.values())


def test_stop_flag_keeps_a_signal_that_lands_inside_the_agreement(monkeypatch):
    # Slurm's USR1 may arrive while a rank waits in `should_stop`'s all-reduce (under load, most of a fast
    # step): Python runs the handler when the collective returns, before its result is stored
    real, calls = dist.max_across_ranks, []

    def reduce_then_signal(value):
        out = real(value)
        if not calls:
            os.kill(os.getpid(), signal.SIGUSR1)
        calls.append(value)
        return out

    monkeypatch.setattr(dist, "max_across_ranks", reduce_then_signal)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = dist.StopFlag()
        assert not stop.should_stop()           # this step's agreement was taken before the signal
        assert stop.should_stop() and stop.signum == signal.SIGUSR1 and calls == [0, signal.SIGUSR1]
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_feature_cache_survives_a_torn_file_and_merges_concurrent_writers(tmp_path, caplog):
    from mer_dist.features import Cache
    a, b = Cache(tmp_path, "a", "enc"), Cache(tmp_path, "a", "enc")    # two runs of a seed sweep, one cache file
    a.put(["x"], np.ones((1, 3), np.float32))
    b.put(["y"], np.zeros((1, 3), np.float32))
    a.save()
    b.save()                                     # does not drop what `a` saved meanwhile
    assert sorted(Cache(tmp_path, "a", "enc").data) == ["x", "y"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]       # no temp file left behind
    a.path.write_bytes(a.path.read_bytes()[:40])                               # a file torn by an older version
    assert Cache(tmp_path, "a", "enc").data == {} and "unreadable feature cache" in caplog.text


def test_stacked_rows_read_frame_caches_without_copying_them(tmp_path):
    """#22 item 8: fine-tuning the visual encoder on pseudo-labelled pool clips reads their frames from the pool's
    memory-mapped cache row by row (`StackedRows`) instead of copying every candidate's frames into memory."""
    from mer_dist.features import StackedRows
    a = np.lib.format.open_memmap(tmp_path / "a.npy", "w+", np.uint8, (5, 2, 3))
    b = np.lib.format.open_memmap(tmp_path / "b.npy", "w+", np.uint8, (4, 2, 3))
    a[:] = np.arange(5)[:, None, None]
    b[:] = 100 + np.arange(4)[:, None, None]
    rows = StackedRows((a, np.arange(5)), (b, np.array([3, 0, 3])))
    whole = np.concatenate([np.asarray(a), np.asarray(b)[[3, 0, 3]]])
    assert len(rows) == 8
    for idx in ([0, 5, 7], [7, 6, 1], np.arange(8)):
        assert (rows[idx] == whole[idx]).all()
    assert all(isinstance(p, np.memmap) for p in rows.parts)      # the data stays in the files


@pytest.mark.slow  # a subprocess
def test_plots_never_reach_into_a_half_imported_ipython(tmp_path):
    """MLflow's tracker thread may be importing IPython while a stage draws its plot; pyplot would then call into
    the half-initialised module (seen under load in test_serve). A stand-in IPython that fails like that one must
    not matter: the plots use matplotlib's object API and never import pyplot."""
    code = f"""
import sys, types
import numpy as np
from mer_dist.eval import plots
half = types.ModuleType("IPython")
def get_ipython():
    raise ImportError("cannot import name 'DummyMod' from partially initialized module 'IPython.core.interactiveshell'")
half.get_ipython = get_ipython
sys.modules["IPython"] = half     # appears after import, as when another thread is importing it
plots.confusion_matrix(np.eye(6, dtype=int), r"{tmp_path / 'cm.png'}")
plots.layer_curve([0, 1, 2], [0.2, 0.3, 0.25], [0.2, 0.3, 0.2], r"{tmp_path / 'layers.png'}", [1])
assert "matplotlib.pyplot" not in sys.modules
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ("cm.png", "layers.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
