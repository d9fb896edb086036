import pytest
from conftest import run_cli

from mer_dist import config as C


def test_overrides_and_types(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("train:\n  steps: 7\ndata:\n  frames: 4\n")
    cfg = C.load(C.AlignConfig, f, ["train.lr=3e-4", "data.frames=16", "model.freeze_blocks=2"])
    assert (cfg.train.steps, cfg.train.lr, cfg.data.frames, cfg.model.freeze_blocks) == (7, 3e-4, 16, 2)
    assert C.load(C.AdaptConfig, None, ["layers=2,3"]).layers == [2, 3]


@pytest.mark.parametrize("override,needle", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("train.steps=abc", "config key 'train.steps': expected int"),
    ("loss=hinge", "config key 'loss': expected objectives from"),
])
def test_bad_keys(override, needle):
    with pytest.raises(C.ConfigError, match=needle.replace("(", r"\(")):
        C.load(C.AlignConfig, None, [override])


@pytest.mark.parametrize("overrides,needle", [
    (["encoders=[visual,lips]"], "config key 'encoders': expected a subset of [visual, audio]"),
    (["encoders=[visual]", "views=cross"], "config key 'views': expected fusion when encoders are set"),
    (["control=true"], "config key 'control': expected false unless encoders are set"),
])
def test_bad_self_train_encoders(overrides, needle):
    with pytest.raises(C.ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        C.load(C.SelfTrainConfig, None, overrides)


@pytest.mark.parametrize("cls,override,needle", [
    (C.FinetuneConfig, "epochs=0", "config key 'epochs': expected an integer >= 1"),
    (C.FinetuneConfig, "data.max_seconds=inf", "config key 'data.max_seconds': expected a finite number > 0"),
    (C.FinetuneConfig, "modalities=[a,x]", "config key 'modalities': expected a non-empty subset of [a, v, t]"),
    (C.FinetuneConfig, "lr=nan", "config key 'lr': expected a number > 0"),
    (C.DemoConfig, "seeds=0", "config key 'seeds': expected an integer >= 1"),
    (C.DemoConfig, "self_train_rounds=-1", "config key 'self_train_rounds': expected an integer >= 0"),
])
def test_range_checks_at_load(cls, override, needle):
    with pytest.raises(C.ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        C.load(cls, None, [override])


def test_combinations_that_cannot_work_are_refused_at_load():
    """README: `loss=kd targets=offline` (teacher.npy holds layer features, no posteriors) is one line at load."""
    for overrides, needle in ((["loss=[kd]", "targets=offline"], "config key 'targets': expected online for kd"),
                              (["loss=[mse]", "target_space=logits", "targets=offline"], "config key 'targets'"),
                              (["loss=[infonce]", "infonce_target=posteriors", "targets=offline"],
                               "config key 'infonce_target'")):
        with pytest.raises(C.ConfigError, match=needle):
            C.load(C.AlignConfig, None, overrides)
    assert C.load(C.AlignConfig, None, ["loss=[mse]", "targets=offline"]).targets == "offline"


def test_pseudo_labels_with_nan_probabilities_are_refused(tmp_path):
    from mer_dist.train.pseudo import read_pseudo
    rows = "name,discrete,confidence," + ",".join(C.LABELS) + ",modalities\n"
    (tmp_path / "pseudo.csv").write_text(rows + "clip_1,happy,0.9,nan,0,0.9,0,0,0.1,\n")
    with pytest.raises(ValueError, match=r"pseudo.csv:2 \(clip_1\): probabilities must be numbers in \[0, 1\]"):
        read_pseudo(tmp_path)


@pytest.mark.slow
def test_self_train_encoders_need_runs_to_rerun(tmp_path):
    r = run_cli("self-train", "--visual", "random", "--out", tmp_path / "st", "encoders=[visual]", check=False)
    assert r.returncode == 2 and "visual needs finetune.visual to be an align run's encoder.pt" in r.stderr
    r = run_cli("self-train", "--teacher", tmp_path, "--out", tmp_path / "st", "encoders=[audio]", check=False)
    assert r.returncode == 2 and f"not found: {tmp_path / 'config.yaml'}" in r.stderr and not (tmp_path / "st").exists()


@pytest.mark.slow
def test_cli_errors_are_one_line_exit_2(tmp_path):
    p = run_cli("align", "train.stepz=3", check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "train.stepz" in p.stderr
    p = run_cli("align", "--config", tmp_path / "nope.yaml", check=False)
    assert p.returncode == 2 and "config file not found" in p.stderr and "nope.yaml" in p.stderr
    p = run_cli("probe-layers", "--shards", tmp_path, "tracking.enabled=false", check=False)
    assert p.returncode == 2 and "manifest.json" in p.stderr
    # the installed `mer-dist` entry point itself (what the README runs), from outside the checkout
    import shutil
    import subprocess
    exe = shutil.which("mer-dist")
    assert exe, "the mer-dist console script is not installed"
    p = subprocess.run([exe, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0 and all(s in p.stdout for s in C.STAGES), p.stdout[-2000:]
    p = subprocess.run([exe, "align", "train.stepz=3"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "train.stepz" in p.stderr and p.stderr.strip().count("\n") == 0


def test_shipped_configs_load():
    from pathlib import Path
    names = {"probe": C.ProbeConfig, "adapt": C.AdaptConfig, "align": C.AlignConfig, "finetune": C.FinetuneConfig}
    for stage in C.STAGES.values():
        C.load(stage.config, Path("configs") / f"{stage.yaml}.yaml")
    for short, cls in names.items():
        C.load(cls, Path("configs/mer2024") / f"{short}.yaml")


def test_yaml_files_are_generated_from_the_dataclasses():
    """configs/<stage>.yaml never drift from the dataclasses: regenerate with `python -m mer_dist.config`."""
    from pathlib import Path
    for name, stage in C.STAGES.items():
        short = stage.yaml
        assert (Path("configs") / f"{short}.yaml").read_text() == C.render_yaml(stage.config, name), short


def test_every_field_has_a_doc():
    import dataclasses
    docs, seen, missing = C.field_docs(), set(), []

    def walk(cls):
        if cls in seen:
            return
        seen.add(cls)
        for f in dataclasses.fields(cls):
            if (cls.__name__, f.name) not in docs:
                missing.append(f"{cls.__name__}.{f.name}")
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default):
                walk(type(default))
    for cls in (stage.config for stage in C.STAGES.values()):
        walk(cls)
    assert not missing, missing


def test_cli_help_explains_every_stage_and_every_key(capsys):
    """#23 item 3: `mer-dist --help` gives each stage a line (its module's docstring) and the pipeline order;
    `mer-dist STAGE --help` lists every config key with its type, default and the doc configs/STAGE.yaml carries."""
    import dataclasses

    from mer_dist.cli import main, summary_line
    with pytest.raises(SystemExit):
        main(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    assert "-> align -> finetune -> evaluate" in top
    for name, stage in C.STAGES.items():
        words = summary_line(stage).split()
        assert len(words) >= 4 and f"{name} {' '.join(words[:4])}" in top, name

    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            yield from keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [(prefix + f.name, type(obj), f)]
    docs = C.field_docs()
    for name, stage in C.STAGES.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        for key, cls, f in keys(stage.config()):
            line = next((x for x in text.splitlines() if x.startswith(f"  {key} (")), "")
            assert line.endswith(docs.get((cls.__name__, f.name), "")) and "default" in line, (name, key)


def test_a_mistyped_key_suggests_the_nearest_valid_one():
    for typo, meant in (("train.lrr", "train.lr"), ("lr", "train.lr"), ("guard.max_clip", "guard.max_clips")):
        with pytest.raises(C.ConfigError, match=f"did you mean '{meant}'"):
            C.load(C.AlignConfig, overrides=[f"{typo}=1"])
    with pytest.raises(C.ConfigError, match=r"unknown config key 'zzz' \(valid: acoustic"):
        C.load(C.AlignConfig, overrides=["zzz=1"])


def _imports(path) -> set[str]:
    """The mer_dist modules a source file imports (module level and inside functions)."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mer_dist"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mer_dist")}
    return found


def test_stages_sit_above_the_library_rooms_and_never_import_each_other():
    """The layering the README's Layout promises: a stage module imports library code only; library code never
    imports a stage; every runner in the registry is a stage module or a library entry point (synth, shard,
    init-models) -- so a stage can be read, tested and replaced alone."""
    from pathlib import Path

    import mer_dist
    root = Path(mer_dist.__file__).parent
    stage_modules = {f"mer_dist.stages.{p.stem}" for p in (root / "stages").glob("*.py") if p.stem != "__init__"}
    assert {"mer_dist.stages.align", "mer_dist.stages.finetune", "mer_dist.stages.demo"} <= stage_modules
    for path in root.rglob("*.py"):
        module = "mer_dist." + ".".join(path.relative_to(root).with_suffix("").parts)
        wrong = _imports(path) & stage_modules
        assert not wrong, f"{module} imports the stage(s) {sorted(wrong)}"
    runners = {s.runner.split(":")[0] for s in C.STAGES.values()}
    assert runners - stage_modules == {"mer_dist.data.synth", "mer_dist.data.ingest", "mer_dist.models.presets"}


def test_pseudo_options_are_one_section_with_a_shorthand(tmp_path):
    """adapt-audio, align and finetune share one PseudoConfig; `pseudo=P` (command line or YAML) names its directory,
    in any order with its other keys; each stage keeps its own default for `soft`."""
    for overrides in (["pseudo=runs/p", "pseudo.soft=true"], ["pseudo.soft=true", "pseudo=runs/p"]):
        cfg = C.load(C.FinetuneConfig, overrides=overrides)
        assert (cfg.pseudo.dir, cfg.pseudo.soft, cfg.pseudo.weight) == ("runs/p", True, 0.5)
    (tmp_path / "a.yaml").write_text("pseudo: runs/q\nloss: [infonce, pseudo]\n")
    assert C.load(C.AlignConfig, tmp_path / "a.yaml").pseudo == C.PseudoConfig(dir="runs/q")
    assert C.FinetuneConfig().pseudo.soft is False and C.AdaptConfig().pseudo.soft is True
    # a run directory's config.yaml from before the section (self-train and ablate rerun from them) still loads
    (tmp_path / "old.yaml").write_text("pseudo: runs/p\npseudo_soft: false\ntest_split: ''\ntransductive: true\n")
    assert C.load(C.AdaptConfig, tmp_path / "old.yaml").pseudo == C.PseudoConfig(dir="runs/p", soft=False, test_split="",
                                                                               transductive=True)
    with pytest.raises(C.ConfigError, match="config key 'pseudo.weight': expected a number >= 0"):
        C.load(C.AdaptConfig, overrides=["pseudo.weight=-1"])
    with pytest.raises(C.ConfigError, match="config key 'lr': expected float"):
        C.load(C.FinetuneConfig, overrides=["lr.x=1"])
