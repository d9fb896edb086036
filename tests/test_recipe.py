"""`mer-dist recipe`: the whole method on a corpus in one command (shard -> probe -> adapt -> align on 2 ranks ->
finetune labeled only and aligned -> the fusion guard -> a guarded self-training round -> evaluate), its table,
and a rerun that finds every step done."""
import json
import sys

import pytest
import yaml
from conftest import run_cli

from mer_dist import config as C
from mer_dist.dist import launch_command
from mer_dist.train import round_guard

SMALL = {"data": {"height": 32, "width": 32, "frames": 4, "batch_size": 4}, "tracking": {"enabled": False}}


def test_launcher_is_srun_inside_a_slurm_allocation_else_torchrun():
    args = ["align", "--config", "a.yaml"]
    assert launch_command(args, 2, "auto", {"SLURM_JOB_ID": "7"})[:2] == ["srun", "--kill-on-bad-exit=1"]
    local = launch_command(args, 3, "auto", {})
    assert local[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node=3" in local
    assert local[-4:] == ["mer_dist", *args]
    assert launch_command(args, 2, "torchrun", {"SLURM_JOB_ID": "7"})[1:3] == ["-m", "torch.distributed.run"]
    assert launch_command(args, 2, "srun", {})[0] == "srun"


def test_recipe_yaml_for_mer2024_keeps_the_stage_files_settings():
    """configs/mer2024/recipe.yaml says the same as the stage files beside it (no drift between the two ways)."""
    recipe = C.load(C.RecipeConfig, "configs/mer2024/recipe.yaml")
    for section, cls, name in (("probe", C.ProbeConfig, "probe"), ("adapt", C.AdaptConfig, "adapt"),
                               ("align", C.AlignConfig, "align"), ("finetune", C.FinetuneConfig, "finetune")):
        alone = C.to_dict(C.load(cls, f"configs/mer2024/{name}.yaml"))
        mine = C.to_dict(getattr(recipe, section))
        for path in ("out", "teacher", "visual", "probe", "data.shards"):     # the recipe sets these itself
            for d in (alone, mine):
                head, _, key = path.rpartition(".")
                (d[head] if head else d).pop(key, None)
        assert mine == alone, section


@pytest.mark.slow
def test_recipe_end_to_end_then_a_rerun_skips_every_step(corpus, tmp_path):
    cfg = {"corpus": str(corpus), "out": str(tmp_path / "r"), "align_procs": 2, "rounds": 1,
           "probe": SMALL, "adapt": {**SMALL, "epochs": 6, "patience": 6},
           "align": {**SMALL, "train": {"steps": 6, "ckpt_every": 3, "eval_samples": 4, "log_every": 2},
                     "guard": {"max_clips": 48, "folds": 2}},
           "finetune": {**SMALL, "folds": 2, "epochs": 6}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(cfg))
    p = run_cli("recipe", "--config", tmp_path / "recipe.yaml", timeout=900)
    out = tmp_path / "r"
    res = json.loads((out / "recipe.json").read_text())
    assert res["skipped"] == [] and "=== recipe: align ===" in p.stdout
    for d in ("shards/manifest.json", "probe/layers.json", "teacher/teacher.json", "align/encoder.pt",
              "models/labeled-only/model.pt", "models/aligned/model.pt", "self-train/kept.json",
              "eval-test/predictions.csv", "recipe.md"):
        assert (out / d).is_file(), d
    steps = [r["step"] for r in res["rows"]]
    assert steps[0].startswith("labeled only") and steps[1].startswith("+ alignment, visual encoder")
    assert steps[2] == "+ alignment, fusion" and steps[3] == "+ self-training round 1"
    # the fusion guard's decision is the round guard's rule on the two models' out-of-fold predictions
    d = round_guard.decide(out / "models/labeled-only", out / "models/aligned")
    assert res["rows"][2]["kept"] == d["keep"] and res["rows"][2]["gain"] == pytest.approx(d["gain"])
    # self-training started from the model that guard kept, and the final model is the round its guard kept
    st = C.load(C.SelfTrainConfig, out / "self-train" / "config.yaml")
    assert st.start == str(out / "models" / ("aligned" if d["keep"] else "labeled-only"))
    assert st.min_precision == 0.6 and st.thresholds == [0.0]
    kept = json.loads((out / "self-train" / "kept.json").read_text())
    assert res["model"] == kept["model"] and res["rows"][3]["kept"] == (kept["round"] == 1)
    ev = json.loads((out / "eval-test" / "metrics.json").read_text())
    assert 0 <= ev["waf"] <= 1 and res["evaluation"] == str(out / "eval-test" / "predictions.csv")
    assert "final model: " + res["model"] in (out / "recipe.md").read_text()
    # a rerun finds every step done: nothing trains again, the same answer
    again = run_cli("recipe", "--config", tmp_path / "recipe.yaml", timeout=300)
    res2 = json.loads((out / "recipe.json").read_text())
    assert res2["skipped"] == ["shard", "probe-layers", "adapt-audio", "align", "finetune labeled only",
                               "finetune aligned", "self-train", "evaluate test"]
    assert res2["rows"] == res["rows"] and "===" not in again.stdout
