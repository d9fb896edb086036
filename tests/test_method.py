"""#19: the synthetic regimes, the alignment guard, the posteriors objective and `mer-dist ablate`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DATA, run_cli
from mer_dist.config import AblateConfig, ConfigError, SynthConfig, VisualConfig, load
from mer_dist.data.synth import ClipSpec, make_clip
from mer_dist.eval.ceiling import ceiling
from mer_dist.eval.ablation import verdict
from mer_dist.eval.linear_probe import cv_waf
from mer_dist.train.guard import choose


def _rms(cfg: SynthConfig, emotion: str, n: int = 12) -> np.ndarray:
    return np.array([np.sqrt((make_clip(cfg, ClipSpec("x", emotion, i))["audio"] ** 2).mean()) for i in range(n)])


@pytest.mark.parametrize("shared,separated", [("emotion", True), ("nuisance", False)])
def test_what_audio_and_video_share_follows_the_regime(shared, separated):
    """shared=emotion: an angry voice is louder than a sad one (loudness carries emotion into what the streams
    share); shared=nuisance: loudness comes from an energy drawn apart from the emotion."""
    cfg = SynthConfig(height=16, width=16, seconds=1.0, seconds_jitter=0.0, shared=shared, audio_noise=0.0)
    a, s = _rms(cfg, "angry"), _rms(cfg, "sad")
    effect = (a.mean() - s.mean()) / np.sqrt((a.var() + s.var()) / 2)
    assert (effect > 2.0) if separated else (abs(effect) < 0.5)


def test_speaker_faces_are_shared_by_a_speakers_clips_and_defaults_ignore_the_regime_options():
    cfg = SynthConfig(height=16, width=16, seconds=1.0, faces="speaker", speakers=3)
    clips = [make_clip(cfg, ClipSpec("x", "happy", i)) for i in range(12)]
    who = [c["meta"]["speaker"] for c in clips]
    bg = [c["frames"][:, :, 0].reshape(-1, 3).mean(0) for c in clips]     # the left column: background
    same = [np.abs(bg[i] - bg[j]).max() for i in range(12) for j in range(i) if who[i] == who[j]]
    other = [np.abs(bg[i] - bg[j]).max() for i in range(12) for j in range(i) if who[i] != who[j]]
    assert same and other and max(same) < 4.0 < np.median(other)
    # with faces=clip the speaker count draws nothing: the default corpus is the same clip for clip
    base = make_clip(SynthConfig(height=16, width=16, seconds=1.0), ClipSpec("x", "sad", 5))
    alt = make_clip(SynthConfig(height=16, width=16, seconds=1.0, speakers=7), ClipSpec("x", "sad", 5))
    assert np.array_equal(base["frames"], alt["frames"]) and np.array_equal(base["audio"], alt["audio"])
    assert base["meta"]["speaker"] == -1


def test_a_neutral_face_and_voice_have_no_ceiling(tmp_path):
    from mer_dist.data.synth import generate
    out = generate(SynthConfig(out=str(tmp_path / "c"), num_labeled=24, num_unlabeled=4, num_test=4, seconds=0.6,
                               seconds_jitter=0.0, height=16, width=16, expression=0.0, prosody=0.0,
                               shared="nuisance", workers=1))
    c = ceiling(out)
    assert c["v"] < 0.2 and c["a"] < 0.2 and c["avt"] == pytest.approx(c["t"]) and c["t"] > 0.3


def test_a_neutral_voice_sounds_the_same_whatever_its_emotion():
    from mer_dist.data.synth import _syllables, render_audio

    def voice(emotion, prosody):
        rng = np.random.default_rng(3)
        return render_audio(rng, emotion, 0.5, 1.0, _syllables(np.random.default_rng(4), 1.0, 0.5), speaker_f0=0.0,
                            loudness=0.6, prosody=prosody)
    assert np.array_equal(voice("angry", 0.0), voice("sad", 0.0))          # pitch level and contour: neutral's
    assert not np.array_equal(voice("angry", 0.5), voice("sad", 0.5))
    assert np.array_equal(voice("angry", 0.0), voice("neutral", 1.0))       # ... the neutral emotion's own voice


def test_synth_ranges_are_checked_at_load():
    with pytest.raises(ConfigError, match="expression"):
        load(SynthConfig, overrides=["expression=1.5"])
    with pytest.raises(ConfigError, match="synth.prosody"):
        load(SynthConfig, overrides=["prosody=-0.1"])
    with pytest.raises(ConfigError, match="speakers"):
        load(SynthConfig, overrides=["speakers=0"])


@pytest.mark.parametrize("scores,min_gain,expected", [
    ({0: 0.30, 100: 0.35, 200: 0.33}, 0.01, 100),     # the best checkpoint, not the last
    ({0: 0.30, 100: 0.305, 200: 0.29}, 0.01, 0),      # within min_gain of the initial encoder: keep it
    ({0: 0.30, 100: 0.35, 200: 0.35}, 0.01, 100),     # ties go to the earlier step
    ({100: 0.2, 200: 0.25}, 0.01, 200),               # no step-0 score (resumed from an unguarded run)
    ({0: 0.4}, 0.01, 0),
])
def test_guard_keeps_the_best_encoder_and_the_initial_one_unless_beaten(scores, min_gain, expected):
    assert choose(scores, min_gain) == expected


def test_cv_probe_reads_separable_features_and_not_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 20)
    noise = rng.normal(size=(120, 16))
    signal = noise + 3.0 * np.eye(6, 16)[y]
    assert cv_waf(signal, y, 5, 0) > 0.9 and cv_waf(noise, y, 5, 0) < 0.35
    first = cv_waf(signal, y, 5, 0)
    np.random.seed(1)                  # whatever the global random state, every rank gets the same score
    torch.manual_seed(1)
    assert cv_waf(signal, y, 5, 0) == first and cv_waf(signal, y, 5, 1) != first   # the seed is its only source


def test_guard_head_probe_is_finetunes_own_head_out_of_fold():
    """guard.probe=head scores features with finetune's visual-only head and recipe, out of fold: it reads signal,
    not noise, gives the same answer every time, and leaves align's random stream where it was."""
    from mer_dist.train.folds import head_cv_waf
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 10)
    noise = rng.normal(size=(60, 16)).astype(np.float32)
    signal = noise + 3.0 * np.eye(6, 16, dtype=np.float32)[y]
    torch.manual_seed(123)
    before, threads = torch.rand(1), torch.get_num_threads()
    torch.manual_seed(123)
    with torch.no_grad():                      # as the guard calls it
        good = head_cv_waf(signal, y, 5, 0)
    assert torch.equal(torch.rand(1), before) and torch.get_num_threads() == threads
    assert good > 0.9 and head_cv_waf(noise, y, 5, 0) < 0.35 and head_cv_waf(signal, y, 5, 0) == good


def test_verdict_needs_the_gain_to_clear_the_seed_spread():
    assert verdict([0.50, 0.52, 0.51], [0.40, 0.41, 0.39])[0] == "helped"
    assert verdict([0.30, 0.31, 0.29], [0.40, 0.41, 0.39])[0] == "hurt"
    word, diff, margin = verdict([0.50, 0.30, 0.45], [0.40, 0.41, 0.39])
    assert word == "no clear difference" and diff > 0 and margin > diff
    assert verdict([0.405, 0.405], [0.40, 0.40])[0] == "no clear difference"     # under the 0.01 floor


def test_ablate_refuses_bad_input_with_one_line(tmp_path, capsys):
    from mer_dist.cli import main
    with pytest.raises(ConfigError, match="seeds"):
        load(AblateConfig, overrides=["seeds=1"])
    with pytest.raises(ConfigError, match="views"):
        load(AblateConfig, overrides=["views=[a]"])
    assert main(["ablate", "--aligned", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoder.pt" in err[0] and "align run directory" in err[0]


def _align(shards, teacher, out, *extra):
    return run_cli("align", "--shards", shards, "--teacher", teacher, "--out", out, *DATA, "data.workers=0",
                   "train.log_every=1", *extra, check=False)


@pytest.mark.slow
def test_guard_returns_the_initial_encoder_when_alignment_does_not_beat_it(shards, teacher, tmp_path):
    """ZeRO-3, InfoNCE onto the teacher's emotion posteriors, on one rank; a min_gain no checkpoint can clear
    makes the outcome certain: encoder.pt is the initial (random-init) encoder -- the very encoder `finetune
    visual=random` builds with the same seed -- and encoder-last.pt the aligned one, and the log says so."""
    out = tmp_path / "run"
    p = _align(shards, teacher, out, "--steps", "6", "train.ckpt_every=3", "train.zero_stage=3", "train.seed=4",
               "infonce_target=posteriors", "guard.min_gain=1.0", "train.keep_checkpoints=1")     # the guard: default
    assert p.returncode == 0, p.stderr[-3000:]
    assert "alignment did not help" in p.stdout and "initial encoder (step 0)" in p.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["encoder_step"] == 0 and sorted(map(int, s["guard"]["scores"])) == [0, 3, 6]
    chosen, last = (torch.load(out / f, weights_only=True) for f in ("encoder.pt", "encoder-last.pt"))
    assert chosen["step"] == 0 and last["step"] == 6
    from mer_dist.models.visual import VisualEncoder
    torch.manual_seed(4)
    init = VisualEncoder(VisualConfig(), 32).state_dict()
    assert all(torch.equal(init[k].float(), v) for k, v in chosen["state_dict"].items())
    assert any(not torch.equal(init[k].float(), v) for k, v in last["state_dict"].items())
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "guard_cv_waf" in r] == [0, 3, 6]


@pytest.mark.slow
def test_ablate_compares_random_aligned_and_its_own_shuffled_control_on_cv_only(shards, teacher, tmp_path):
    """The answer is known: the "aligned" encoder is zeroed (its features are one constant, so its CV WAF is the
    majority-class floor) while random init carries the faces, so the verdict must be "hurt"."""
    aligned = tmp_path / "aligned"
    assert _align(shards, teacher, aligned, "--steps", "4", "train.ckpt_every=4").returncode == 0
    ck = torch.load(aligned / "encoder.pt", weights_only=True)
    ck["state_dict"] = {k: torch.zeros_like(v) for k, v in ck["state_dict"].items()}
    torch.save(ck, aligned / "encoder.pt")
    out = tmp_path / "ablate"
    p = run_cli("ablate", "--shards", shards, "--teacher", teacher, "--aligned", aligned, "--out", out,
                "seeds=2", "folds=2", "epochs=5", "views=[v]", "procs=1", "tracking.enabled=false")
    assert "aligning the shuffled-pairs control" in p.stdout
    assert (out / "shuffled" / "encoder.pt").is_file()
    shuffled_cfg = (out / "shuffled" / "config.yaml").read_text()
    assert "pairing: shuffled" in shuffled_cfg
    res = json.loads((out / "ablate.json").read_text())
    assert set(res["cv_waf"]["v"]) == {"random", "aligned", "shuffled"}
    assert all(len(v) == 2 for v in res["cv_waf"]["v"].values())
    cv = {k: np.mean(v) for k, v in res["cv_waf"]["v"].items()}
    assert res["verdicts"]["v"]["verdict"] == "hurt" and cv["aligned"] < cv["random"] - 0.05, cv
    assert f"ablate[v]: alignment {res['verdicts']['v']['verdict']}" in p.stdout
    cells = sorted(d for d in (out / "cells").iterdir() if d.name.startswith("v-"))
    assert len(cells) == 6
    for cell in cells:      # the test split is never read
        assert not any(k.startswith("test_") for k in json.loads((cell / "metrics.json").read_text()))
        assert not (cell / "eval-test").exists()
