"""The README's demo command, at a reduced size: every stage runs and every row of the table is computed."""
import json

import numpy as np
import pytest
from conftest import run_cli


@pytest.mark.slow
@pytest.mark.timeout(2400)     # the README's demo at a reduced size; a busy machine takes minutes more
def test_demo_small(tmp_path):
    p = run_cli("demo", "--out", tmp_path / "demo", "synth.num_labeled=60", "synth.num_unlabeled=60",
                "synth.num_test=24", "synth.height=32", "synth.width=32", "synth.seconds=1.2", "align_steps=12",
                "folds=2", "align_variants=[infonce,shuffled]", "--seeds", "2", timeout=2400)   # a busy machine: minutes more
    table = (tmp_path / "demo" / "RESULTS.md").read_text()
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    rows = ["audio-base", "audio", "text", "visual/random", "visual/infonce", "visual/shuffled", "fusion/random",
            "fusion/infonce", "fusion/shuffled", "self-train/fusion"]
    assert sorted(res["test_waf"]) == sorted(rows + ["visual/infonce@last", "fusion/infonce@last"])
    values = np.array([res["test_waf"][r] for r in rows])             # [rows, seeds]: computed, not copied
    assert values.shape == (len(rows), 2) and np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()
    assert len({tuple(v) for v in values.round(6)}) >= len(rows) - 2    # rows differ (ties only by chance)
    # the guard is on by default: encoder.pt is step 0 or the last step (12); the control runs without it
    steps = res["encoder_step"]
    assert set(steps["infonce"]) <= {0, 12} and steps["shuffled"] == [12, 12]
    for s, step in enumerate(steps["infonce"]):                      # "@last" is the final step's encoder either way
        for kind in ("visual", "fusion"):
            same = res["test_waf"][f"{kind}/infonce@last"][s] == res["test_waf"][f"{kind}/infonce"][s]
            assert same or step == 0
    assert p.stdout.count("align: guard: ") == 2
    # the control table a user runs on their own corpus ran on this one: CV only, a verdict per modality set
    ab = json.loads((tmp_path / "demo" / "ablate" / "ablate.json").read_text())
    assert set(ab["verdicts"]) == {"v"} and all(len(x) == 2 for c in ab["cv_waf"].values() for x in c.values())
    assert "ablate[v]: alignment" in p.stdout
    for r in rows:                                                     # the table shows what was measured
        w = np.asarray(res["test_waf"][r])
        assert f"{w.mean():.3f} ± {w.std(ddof=1):.3f}" in table, r
    # each encoder came from its own alignment run per seed, with the configured control
    for seed in (0, 1):
        cfg = (tmp_path / "demo" / "align" / f"shuffled-seed{seed}" / "config.yaml").read_text()
        assert "pairing: shuffled" in cfg and f"seed: {seed}" in cfg
    st = res["self_train"][0]
    assert (st["view"], st["seed"]) == ("fusion", 0) and [r["round"] for r in st["rows"]] == [0, 1]
    assert st["rows"][0]["test_waf"] == res["test_waf"]["fusion/infonce"][0]
    # the round kept exactly the pool clips whose calibrated confidence reached its threshold (0.7); a labeller
    # this small may honestly expect none of its labels to be right that often
    import csv
    pseudo = tmp_path / "demo" / "self-train-fusion-seed0" / "pseudo1"
    summary = json.loads((pseudo / "summary.json").read_text())
    kept = list(csv.DictReader(open(pseudo / "pseudo.csv")))
    assert summary["calibrated"] and st["rows"][1]["kept"] == len(kept) == summary["kept"] <= summary["candidates"]
    assert all(float(r["confidence"]) >= 0.7 for r in kept)
    assert "mlflow ui --backend-store-uri sqlite:///" in p.stdout
    # the dashboard it points at holds the demo's runs: each stage's, finished, nested under the demo's own run
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'demo' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    names = [r.info.run_name for r in runs]
    for stage in ("align", "finetune", "evaluate", "self-train"):
        assert any(n.startswith(stage) for n in names), (stage, names)
    assert sum(n.startswith("align") for n in names) >= 4 and all(r.info.status == "FINISHED" for r in runs), names
    (demo,) = [r for r in runs if r.info.run_name.startswith("demo")]
    ids = {r.info.run_id for r in runs}
    assert "mlflow.parentRunId" not in demo.data.tags
    assert all(r.data.tags.get("mlflow.parentRunId") in ids for r in runs if r is not demo)   # one tree
