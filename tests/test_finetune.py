"""Fusion model, feature cache, K-fold fine-tuning and evaluation on the real pipeline."""
import csv
import json

import numpy as np
import pytest
import torch
from conftest import DATA, run_cli

from mer_dist import config as C
from mer_dist.models.fusion import FusionModel


@pytest.mark.parametrize("kind", ["attention", "weights"])
@pytest.mark.parametrize("mods", [["a"], ["v", "t"], ["a", "v", "t"]])
def test_fusion_any_subset_forward_backward(kind, mods):
    dims = {"a": 8, "v": 12, "t": 6}
    model = FusionModel({m: dims[m] for m in mods}, C.FusionConfig(kind=kind, width=16, heads=2))
    feats = {m: torch.randn(5, dims[m]) for m in mods}
    present = torch.ones(5, len(mods), dtype=torch.bool)
    present[0, 0] = False                      # a sample missing its first modality
    present[1] = False                         # ... and one missing everything
    out = model(feats, present)
    assert out.shape == (5, 6) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.head[2].weight.grad.abs().sum() > 0
    assert all(model.proj[m][2].weight.grad.abs().sum() > 0 for m in mods)
    model.eval()
    if len(mods) > 1:   # a missing modality changes the prediction only through the others
        feats2 = {m: f.clone() for m, f in feats.items()}
        feats2[mods[0]][0] += 100.0
        assert torch.allclose(model(feats, present)[0], model(feats2, present)[0], atol=1e-5)


@pytest.mark.slow
def test_finetune_evaluate_cache_and_predictions(shards, teacher, tmp_path):
    cache = tmp_path / "cache"
    common = ["--shards", shards, "--teacher", teacher, "--visual", "random", "folds=3", "epochs=40",
              f"cache={cache}", *DATA]
    p = run_cli("finetune", "--out", tmp_path / "m1", "--modalities", "a,v,t", *common)
    m = json.loads((tmp_path / "m1" / "metrics.json").read_text())
    assert m["folds"] == 3 and m["n_train"] == 96
    # beats the majority-class WAF by a clear margin, cross-validated and on test
    assert m["cv_waf"] > m["majority_waf"] + 0.15 and m["test_waf"] > m["majority_waf"] + 0.15, m
    assert "CV WAF" in p.stdout
    # cached features reused: a second run (another seed) calls no encoder at all
    from mer_dist.features import Encoders, extract, specs_for
    cfg = C.load(C.FinetuneConfig, overrides={"data.shards": str(shards), "teacher": str(teacher), "visual": "random",
                                               "cache": str(cache), "data.height": 32, "data.width": 32, "data.frames": 4})
    enc = Encoders(specs_for(cfg), 32)
    names, y, feats, present = extract(enc, ["a", "v", "t"], str(shards), "train", cfg.data, cache)
    assert enc._built == {} and len(names) == 96 and present.all()      # no encoder was even built
    enc2 = Encoders(specs_for(C.load(C.FinetuneConfig, overrides={**{"data.shards": str(shards), "teacher": str(teacher),
                                                                      "visual": "random", "seed": 7}})), 32)
    extract(enc2, ["v"], str(shards), "train", cfg.data, cache)
    assert "v" in enc2._built          # another random encoder is another cache key
    # evaluate: predictions for the unlabeled split (MER2024 submission format), every name once
    ev = tmp_path / "ev"
    run_cli("evaluate", "--model", tmp_path / "m1", "--split", "unlabeled", "--out", ev, "tracking.enabled=false")
    rows = list(csv.DictReader(open(ev / "predictions.csv")))
    assert len(rows) == 64 and len({r["name"] for r in rows}) == 64
    assert {r["discrete"] for r in rows} <= set(C.LABELS)
    probs = np.loadtxt(ev / "probabilities.csv", delimiter=",", skiprows=1, usecols=range(1, 7))
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    test = json.loads((tmp_path / "m1" / "eval-test" / "metrics.json").read_text())
    assert np.array(test["confusion"]).sum() == 24
    # confusion.csv says what metrics.json says (true rows, predicted columns, labelled), and the plot is a PNG
    table = list(csv.reader(open(tmp_path / "m1" / "eval-test" / "confusion.csv", encoding="utf-8")))
    assert table[0][1:] == list(C.LABELS) and [r[0] for r in table[1:]] == list(C.LABELS)
    assert [[int(x) for x in r[1:]] for r in table[1:]] == test["confusion"]
    png = (tmp_path / "m1" / "eval-test" / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


@pytest.mark.slow
def test_missing_transcript_still_predicted(corpus, teacher, tmp_path):
    """Clips whose transcript is blank in the corpus (both languages) are marked text-absent by `extract` and
    predicted from audio + video alone: whatever their text feature holds, their prediction is the same."""
    import shutil

    from mer_dist.data.ingest import write_shards
    from mer_dist.features import Encoders, extract, specs_for
    own = tmp_path / "corpus"
    shutil.copytree(corpus, own)
    rows = (own / "label-transcription.csv").read_text().splitlines()
    test = {line.split(",")[0] for line in (own / "label-test.csv").read_text().splitlines()[1:]}
    blank = sorted(r.split(",")[0] for r in rows[1:] if r.split(",")[0] in test)[:3]
    (own / "label-transcription.csv").write_text("\n".join(
        [rows[0]] + [f"{r.split(',')[0]},," if r.split(",")[0] in blank else r for r in rows[1:]]) + "\n")
    write_shards(C.ShardConfig(corpus=str(own), out=str(tmp_path / "shards"), shard_mb=0.3, workers=1))
    cfg = C.load(C.FinetuneConfig, overrides={"data.shards": str(tmp_path / "shards"), "teacher": str(teacher),
                                               "visual": "random", "cache": str(tmp_path / "c"),
                                               "data.height": 32, "data.width": 32, "data.frames": 4})
    names, y, feats, present = extract(Encoders(specs_for(cfg), 32), ["a", "v", "t"], str(tmp_path / "shards"),
                                       "test", cfg.data, cfg.cache)
    missing = np.array([n in blank for n in names])
    assert missing.sum() == 3 and (present[:, 2] == ~missing).all() and present[:, :2].all()
    torch.manual_seed(0)
    model = FusionModel({m: f.shape[1] for m, f in feats.items()}, cfg.fusion).eval()
    x = {m: torch.from_numpy(f) for m, f in feats.items()}
    other = {**x, "t": x["t"] + 5 * torch.randn_like(x["t"])}    # any text for every clip
    with torch.no_grad():
        a, b = model(x, torch.from_numpy(present)), model(other, torch.from_numpy(present))
    assert a.shape == (len(names), 6) and torch.isfinite(a).all()
    assert torch.allclose(a[missing], b[missing]) and not torch.allclose(a[~missing], b[~missing])


@pytest.mark.slow
def test_two_finetunes_share_one_feature_cache_at_once(shards, teacher, tmp_path):
    """#22 item 7: a seed sweep's jobs start together on one fresh cache: both compute and save the same features
    at the same time (unique temp names in the cache directory, merged on save). Both succeed, train on equal
    features (same seed: equal CV scores fold for fold), and the cache they leave holds every clip, readable."""
    import subprocess
    import sys

    from conftest import REPO

    from mer_dist.features import Cache, Encoders, index, specs_for
    cache = tmp_path / "cache"
    args = ["finetune", "--shards", shards, "--teacher", teacher, "--visual", "random", "--modalities", "a,v",
            "folds=2", "epochs=3", "test_split=", f"cache={cache}", *DATA]
    procs = [subprocess.Popen([sys.executable, "-m", "mer_dist", *map(str, args), "--out", str(tmp_path / f"m{i}")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    m0, m1 = (json.loads((tmp_path / f"m{i}" / "metrics.json").read_text()) for i in range(2))
    assert m0["cv_waf"] == m1["cv_waf"] and m0["fold_val_waf"] == m1["fold_val_waf"]
    cfg = C.load(C.FinetuneConfig, overrides=[f"data.shards={shards}", f"teacher={teacher}", "visual=random",
                                              "modalities=a,v", f"cache={cache}", *DATA])
    keys = index(str(shards), "train")[3]
    encoders = Encoders(specs_for(cfg), cfg.data.height)
    for m in ("a", "v"):
        saved = Cache(cache, m, encoders.fingerprint(m))
        assert not saved.missing(keys)                   # every clip, in a file that reads
    assert not [f for f in cache.iterdir() if f.name.startswith(".")]     # no temp file left behind
