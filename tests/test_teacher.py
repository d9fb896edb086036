"""HuBERT loading, layer probe, PEFT adaptation, frozen teacher, offline targets."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from mer_dist.models.teacher import (
    ModelError,
    Teacher,
    build_hubert,
    hidden_states,
    pool_to_frames,
)


def test_local_directory_round_trip(tmp_path):
    m = build_hubert("tiny:hubert")
    m.save_pretrained(tmp_path / "hub")
    loaded = build_hubert(str(tmp_path / "hub"))
    x, n = torch.randn(2, 16000), torch.tensor([16000, 12000])
    with torch.no_grad():
        a, ma = hidden_states(m, x, n)
        b, mb = hidden_states(loaded, x, n)
    assert torch.equal(ma, mb) and ma.shape == (2, 49) and int(ma[1].sum()) == 37
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a, b))
    with pytest.raises(ModelError, match="no config.json"):
        build_hubert(str(tmp_path / "missing"))


def test_a_saved_layerdrop_never_shifts_the_layer_indices(tmp_path):
    """Released HuBERT-large configs carry layerdrop 0.1; transformers 5 records hidden states from the layers that
    ran, so in train mode (adapt-audio, pretrain-audio) a dropped layer would shorten the tuple and shift index i to
    another layer (seen on a GPU machine: IndexError at layer 21 of the recipe)."""
    build_hubert("tiny:hubert", layerdrop=0.9).save_pretrained(tmp_path / "hub")
    model = build_hubert(str(tmp_path / "hub")).train()
    x, n = torch.randn(2, 8000), torch.tensor([8000, 8000])
    for _ in range(5):
        hs, _ = hidden_states(model, x, n)
        assert len(hs) == model.config.num_hidden_layers + 1
    raw = type(model).from_pretrained(str(tmp_path / "hub")).train()     # control: the saved config as it is
    with torch.no_grad():
        assert any(len(raw(input_values=x, output_hidden_states=True).hidden_states) < len(hs) for _ in range(5))


def test_pool_to_frames_hand_built():
    # 10 feature frames at 50 Hz (0.2 s); value of frame j is j; second sample has 6 valid frames
    feats = torch.arange(10, dtype=torch.float32).view(1, 10, 1).repeat(2, 1, 1)
    mask = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    times = torch.tensor([[0.05, 0.15], [0.05, 0.15]])
    pooled, valid = pool_to_frames(feats, mask, times, torch.tensor([0.1, 0.1]))
    # window [0, .1) holds centres .01,.03,.05,.07,.09 -> frames 0..4 ; [.1, .2) -> 5..9
    assert torch.allclose(pooled[0, :, 0], torch.tensor([2.0, 7.0]))
    assert torch.allclose(pooled[1, :, 0], torch.tensor([2.0, 5.0])) and valid.all()
    mask[1, 5:] = False
    _, valid = pool_to_frames(feats, mask, times, torch.tensor([0.1, 0.1]))
    assert valid[1].tolist() == [True, False]


@pytest.mark.slow
def test_probe_ranks_informative_layer_above_noise(probe_dir):
    from mer_dist.data.splits import holdout
    from mer_dist.eval.linear_probe import probe_scores
    res = json.loads((probe_dir / "layers.json").read_text())
    assert [r["layer"] for r in res["layers"]] == list(range(5)) and (probe_dir / "layers.png").stat().st_size > 1000
    assert len(res["top_k"]) == 2 and all(1 <= layer <= 4 for layer in res["top_k"])
    rows = list(csv.DictReader(open(probe_dir / "layers.csv", encoding="utf-8")))     # the table says the same
    assert [(int(r["layer"]), round(float(r["waf"]), 6), round(float(r["accuracy"]), 6)) for r in rows] == \
        [(r["layer"], round(r["waf"], 6), round(r["accuracy"], 6)) for r in res["layers"]]
    best = max(r["waf"] for r in res["layers"])
    # the same probe on a random "layer" of the same shape stays near chance; the best real layer beats it
    y = np.arange(96) % 6
    names = [f"s{i}" for i in range(96)]
    tr, va = holdout(names, y, 0.25, 0)
    noise = probe_scores(np.random.default_rng(0).normal(size=(96, 64)), y, tr, va, 0)["waf"]
    assert best > noise + 0.1, (best, noise)


@pytest.mark.slow
def test_adaptation_learns_and_teacher_round_trips(teacher, shards, tmp_path):
    spec = json.loads((teacher / "teacher.json").read_text())
    assert spec["method"] == "lora" and spec["layers"] == spec["feature_layers"]
    assert (teacher / "adapter" / "adapter_config.json").is_file()
    cfg = json.loads((teacher / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["layers_to_transform"]) == [la - 1 for la in spec["layers"]]
    # the adapted teacher differs from the base one only through the adapter; both frozen
    t, base = Teacher.load(teacher), Teacher.load(teacher, adapted=False)
    assert not any(p.requires_grad for p in t.parameters())
    x, n = torch.randn(2, 20000) * 0.1, torch.tensor([20000, 15000])
    fa, ma = t.features(x, n)
    fb, _ = base.features(x, n)
    assert fa.shape == (2, 62, spec["dim"]) and not torch.allclose(fa, fb)
    # save/load round trip: a fresh load gives identical outputs
    assert torch.equal(Teacher.load(teacher).features(x, n)[0], fa)
    # the adapted teacher learned emotion (above chance on the held-out part of train); whether LoRA beats the
    # probe of the same layers is a claim about a 96-clip corpus too small to order them stably: RESULTS.md
    # reports that comparison (audio-only, adapted vs base teacher) over 3 seeds instead
    assert spec["val_waf"] > 1 / 6 and spec["probe_val_waf"] is not None


def test_peft_touches_only_chosen_layers():
    from mer_dist.models.teacher import add_bottlenecks, add_lora
    from mer_dist.models.teacher import trainable_layers
    assert trainable_layers(add_lora(build_hubert("tiny:hubert"), [2, 4], 4, 8, 0.0, ["q_proj", "v_proj"])) == {2, 4}
    assert trainable_layers(add_bottlenecks(build_hubert("tiny:hubert"), [3], 8)) == {3}


@pytest.mark.slow
def test_extract_targets_two_ranks_offline_equals_online(teacher, shards, tmp_path):
    out = tmp_path / "st"
    port = str(__import__("conftest").free_port())
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        "-m", "mer_dist", "extract-targets", "--shards", str(shards), "--teacher", str(teacher),
                        "--out", str(out), "dtype=float32"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    from mer_dist.config import DataConfig
    from mer_dist.data.ingest import shard_urls
    from mer_dist.data.stream import eval_loader, iterate
    names, online_max = [], 0.0
    t = Teacher.load(teacher)
    for b in iterate(eval_loader(shard_urls(out, "unlabeled"), DataConfig(frames=2, height=16, width=16, workers=0))):
        names += b["name"]
        f, m = t.features(b["audio"], b["audio_lens"])
        for i in range(len(b["name"])):
            k = int(b["teacher_lens"][i])
            assert k == int(m[i].sum())
            online_max = max(online_max, float((f[i, :k] - b["teacher"][i, :k]).abs().max()))
    assert len(names) == len(set(names)) == 64          # every input sample exactly once
    assert online_max <= 1e-4, online_max
    # rerun skips finished shards: it says so, and leaves their files untouched
    before = {f.name: f.stat().st_mtime_ns for f in out.glob("unlabeled-*.tar")}
    p2 = subprocess.run([sys.executable, "-m", "mer_dist", "extract-targets", "--shards", str(shards), "--teacher",
                         str(teacher), "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p2.returncode == 0 and f"64 samples in {len(before)} shards" in p2.stdout, p2.stdout[-2000:]
    assert f"({len(before)} already complete, skipped)" in p2.stdout and before
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("unlabeled-*.tar")} == before
    # README: `targets=offline` trains from those shards' teacher.npy (the teacher loaded only for its statistics)
    run = tmp_path / "offline"
    p3 = subprocess.run([sys.executable, "-m", "mer_dist", "align", "--shards", str(out), "--teacher", str(teacher),
                         "--out", str(run), "--steps", "3", "targets=offline", "loss=[mse]", "guard.enabled=false",
                         "train.eval_samples=0", "train.log_every=1", "tracking.enabled=false", "data.height=32",
                         "data.width=32", "data.frames=4", "data.batch_size=4", "data.workers=0"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p3.returncode == 0, p3.stderr[-3000:]
    import yaml
    assert yaml.safe_load((run / "config.yaml").read_text())["targets"] == "offline"
    losses = [json.loads(x)["loss"] for x in open(run / "metrics.jsonl") if '"loss"' in x]
    assert len(losses) == 3 and all(np.isfinite(losses))


@pytest.mark.slow
def test_frame_posteriors_average_to_the_utterance_prediction(teacher):
    """The head is linear on mean-pooled features: the mean of the frame logits is the utterance logit."""
    from mer_dist.models.teacher import masked_mean
    t = Teacher.load(teacher)
    x, n = torch.randn(3, 24000) * 0.1, torch.tensor([24000, 18000, 9000])
    (frame_logits,), mask = t.outputs(x, n, features=False, logits=True)
    assert frame_logits.shape[-1] == 6 and mask.shape == frame_logits.shape[:2]
    hs, m2 = hidden_states(t.hubert, x, n)
    h, layers = t.head, json.loads((teacher / "teacher.json").read_text())["layers"]
    pooled = torch.stack([masked_mean(hs[la], m2) for la in layers], 1)
    z = (torch.softmax(h.layer_logits, 0)[None, :, None] * (pooled - h.feat_mean) / h.feat_std).sum(1)
    expected = h.head[1](z)
    assert torch.allclose(masked_mean(frame_logits, mask), expected, atol=1e-4)


def test_mfcc_frames_line_up_with_hubert_frames():
    from mer_dist.stages.pretrain_audio import mfcc
    model = build_hubert("tiny:hubert")
    for n in (400, 401, 16000, 16123, 33333):
        f = mfcc(np.random.default_rng(n).normal(0, 0.1, n).astype(np.float32))
        assert f.shape == (int(model._get_feat_extract_output_lengths(torch.tensor(n))), 39)
        assert np.isfinite(f).all()


@pytest.mark.slow
def test_pretrain_audio_learns_masked_units_and_loads_like_hubert(shards, tmp_path):
    out = tmp_path / "hubert-it1"
    p = subprocess.run([sys.executable, "-m", "mer_dist", "pretrain-audio", "--shards", str(shards), "--out", str(out),
                        "--steps", "150", "--clusters", "8", "data.workers=0", "tracking.enabled=false"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "pretrain.json").read_text())
    # predicting masked frames' clusters from context: above always guessing the largest cluster, and improving
    assert s["masked_accuracy_last"] > s["largest_cluster_share"] + 0.05 and s["loss_last"] < s["loss_first"], s
    model = build_hubert(str(out))                     # what probe-layers / adapt-audio load with model=DIR
    assert model.config.mask_time_prob == 0.0
    random = build_hubert("tiny:hubert").state_dict()
    assert any(not torch.equal(v, random[k]) for k, v in model.state_dict().items() if k in random)
