"""`mer-dist recipe`: the whole method on your own corpus, one command, stage by stage, resumable.

shard -> probe-layers -> adapt-audio -> align (torchrun on this machine, srun inside a Slurm allocation; its guard
returns the initial encoder unless alignment helps) -> finetune twice: labeled only (a random-init visual encoder)
and on the aligned encoder -> the fusion guard keeps the aligned model only when it beats labeled only by more
than its spread -> guarded self-training rounds from the kept model (calibrated, class-aware pseudo-labels) ->
evaluate on the test split -> `recipe.md` / `recipe.json`: what each step added, with its spread, and what each
guard kept.

Every guard uses one rule (`train/round_guard.py`): the unselected out-of-fold WAF on the labeled clips, kept only
when a paired bootstrap's 90% lower bound of the gain is above 0. So the recipe never returns a model that its
own labeled clips say is worse than the labeled-only one -- whatever the corpus, the teacher or the pool.

A rerun skips each step whose output is complete (the stage's own record of a finished run: a manifest, a
teacher.json, an align summary with exit code 0, a model's metrics.json, a self-train kept.json, an evaluation's
metrics.json) and align resumes from its last checkpoint; a stage stopped half-way runs again. Align pre-empted
(exit 75) ends the recipe with 75 too, so a requeued job picks up where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mer_dist import config as C
from mer_dist.data.ingest import load_manifest
from mer_dist.dist import EXIT_PREEMPTED, launch_command
from mer_dist.io import write_json_atomic, write_text_atomic
from mer_dist.models.ensemble import read_metrics
from mer_dist.stages import run_stage
from mer_dist.train import round_guard
from mer_dist.train.checkpoint import read_summary


@dataclass
class Layout:
    """Where each step writes, below the recipe's out."""
    root: Path

    @property
    def shards(self) -> Path: return self.root / "shards"
    @property
    def probe(self) -> Path: return self.root / "probe"
    @property
    def teacher(self) -> Path: return self.root / "teacher"
    @property
    def align(self) -> Path: return self.root / "align"
    @property
    def labeled_only(self) -> Path: return self.root / "models" / "labeled-only"
    @property
    def aligned(self) -> Path: return self.root / "models" / "aligned"
    @property
    def self_train(self) -> Path: return self.root / "self-train"

    def evaluation(self, split: str) -> Path:
        return self.root / f"eval-{split}"


@dataclass
class RecipeResult:
    """What the recipe returns (and writes to recipe.json): the model to use and how it was chosen."""
    model: str                                       # the final finetune output (its fold ensemble answers)
    rows: list[dict] = field(default_factory=list)   # one per step: name, model, cv_waf, test_waf, gain, low, kept
    skipped: list[str] = field(default_factory=list)  # steps a rerun found done
    evaluation: str = ""                             # the final model's predictions on the test split


def run(cfg: C.RecipeConfig) -> RecipeResult | int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    at = Layout(Path(cfg.out).resolve())
    at.root.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []

    def step(name: str, done: Callable[[], bool], work: Callable[[], object]) -> None:
        if done():
            print(f"recipe: {name}: done before, skipped", flush=True)
            skipped.append(name)
            return
        print(f"\n=== recipe: {name} ===", flush=True)
        work()

    shard = dataclasses.replace(cfg.shard, corpus=cfg.corpus, out=str(at.shards))
    step("shard", lambda: (at.shards / "manifest.json").is_file(),
         lambda: run_stage("shard", shard))
    step("probe-layers", lambda: (at.probe / "layers.json").is_file(),
         lambda: run_stage("probe-layers", _with_shards(cfg.probe, at, out=str(at.probe))))
    step("adapt-audio", lambda: (at.teacher / "teacher.json").is_file(),
         lambda: run_stage("adapt-audio", _with_shards(cfg.adapt, at, out=str(at.teacher), probe=str(at.probe))))
    align = _with_shards(cfg.align, at, out=str(at.align), teacher=str(at.teacher))
    code = 0

    def run_align() -> None:
        nonlocal code
        C.save(align, at.root / "align.yaml")
        p = subprocess.run(launch_command(["align", "--config", str(at.root / "align.yaml")], cfg.align_procs,
                                          cfg.launcher, os.environ))
        code = p.returncode
    step("align", lambda: _align_done(at.align), run_align)
    if code == EXIT_PREEMPTED:
        print("recipe: align was pre-empted and saved its checkpoint; rerun the same command to go on", flush=True)
        return EXIT_PREEMPTED
    if code:        # its own line said why; a rerun resumes it from its last checkpoint
        print(f"recipe: align failed with exit code {code}; the recipe stops here (rerun it to resume)", flush=True)
        return code

    split = cfg.test_split if cfg.test_split in load_manifest(at.shards)["splits"] else ""   # a corpus may have none
    ft = dataclasses.replace(_with_shards(cfg.finetune, at, teacher=str(at.teacher)), test_split=split)
    for name, visual, dst in (("finetune labeled only", "random", at.labeled_only),
                              ("finetune aligned", str(at.align / "encoder.pt"), at.aligned)):
        step(name, lambda dst=dst: _model_done(dst),
             lambda visual=visual, dst=dst: run_stage("finetune", dataclasses.replace(ft, visual=visual, out=str(dst))))
    rows = [_row("labeled only (random-init visual encoder)", at.labeled_only, None, True),
            _align_row(at)]
    fused = round_guard.decide(at.labeled_only, at.aligned)
    rows.append(_row("+ alignment, fusion", at.aligned, fused, fused["keep"]))
    start = at.aligned if fused["keep"] else at.labeled_only
    if not fused["keep"]:
        print(f"recipe: guard: the aligned model did not beat labeled only by more than its spread "
              f"(gain {fused['gain']:+.3f}, low {fused['low']:+.3f}); self-training starts from labeled only", flush=True)
    final = start
    if cfg.rounds:
        st = C.SelfTrainConfig(
            finetune=dataclasses.replace(ft, visual=read_visual(start)), out=str(at.self_train), rounds=cfg.rounds,
            start=str(start), thresholds=list(cfg.thresholds), min_precision=cfg.min_precision,
            encoders=list(cfg.encoders), align_procs=cfg.align_procs, align_steps=cfg.align.train.steps)
        step("self-train", lambda: (at.self_train / "kept.json").is_file(), lambda: run_stage("self-train", st))
        kept = json.loads((at.self_train / "kept.json").read_text())
        final = Path(kept["model"])
        rounds = json.loads((at.self_train / "rounds.json").read_text())
        for r in rounds[1:]:
            rows.append(_row(f"+ self-training round {r['round']}", at.self_train / f"round{r['round']}",
                             {"gain": r.get("guard_gain"), "low": r.get("guard_low")}, r.get("guard") == "kept"))
    evaluation = ""
    if split:
        ev = C.EvaluateConfig(model=str(final), split=split, out=str(at.evaluation(split)),
                              tracking=cfg.finetune.tracking)
        step(f"evaluate {split}", lambda: (at.evaluation(split) / "metrics.json").is_file(),
             lambda: run_stage("evaluate", ev))
        evaluation = str(at.evaluation(split) / "predictions.csv")
    result = RecipeResult(model=str(final), rows=rows, skipped=skipped, evaluation=evaluation)
    _report(at, result, cfg)
    return result


def _with_shards(section, at: Layout, **paths):
    """A stage's config from the recipe's section, reading the recipe's shards and writing where the recipe says."""
    return dataclasses.replace(section, data=dataclasses.replace(section.data, shards=str(at.shards)), **paths)


def read_visual(model_dir: Path) -> str:
    """The visual encoder a finetune output was trained on (its config.yaml): the next rounds start from it."""
    return C.load(C.FinetuneConfig, Path(model_dir) / "config.yaml").visual


def _align_done(run: Path) -> bool:
    return read_summary(run).get("exit_code") == 0 and (run / "encoder.pt").is_file()


def _model_done(model: Path) -> bool:
    return (model / "metrics.json").is_file() and (model / "model.pt").is_file()


def _row(name: str, model: Path, guard: dict | None, kept: bool) -> dict:
    m = read_metrics(model)
    return {"step": name, "model": str(model), "cv_waf": m.get("cv_waf_unselected", m.get("cv_waf")),
            "test_waf": m.get("test_waf"), "gain": (guard or {}).get("gain"), "low": (guard or {}).get("low"),
            "kept": kept}


def _align_row(at: Layout) -> dict:
    """The align guard's choice, read from its summary: the step it kept and its CV probe scores."""
    s = read_summary(at.align)
    scores = (s.get("guard") or {}).get("scores", {})       # {"<step>": CV WAF of the probe}
    step = s.get("encoder_step")
    first, chosen = scores.get("0"), scores.get(str(step))
    gain = chosen - first if first is not None and chosen is not None else None
    return {"step": f"+ alignment, visual encoder (guard: step {step}{' = the initial encoder' if step == 0 else ''})",
            "model": str(at.align / "encoder.pt"), "cv_waf": chosen, "test_waf": None, "gain": gain, "low": None,
            "kept": step != 0}


def _report(at: Layout, result: RecipeResult, cfg: C.RecipeConfig) -> None:
    def num(x, fmt="{:.3f}"):
        return fmt.format(x) if isinstance(x, (int, float)) else "-"
    lines = ["| step | CV WAF (unselected; align: its guard's probe) | test WAF | gain over the step before "
             "(90% lower bound) | kept |", "|---|---|---|---|---|"]
    for r in result.rows:
        gain = f"{num(r['gain'], '{:+.3f}')} ({num(r['low'], '{:+.3f}')})" if r["gain"] is not None else "-"
        lines.append(f"| {r['step']} | {num(r['cv_waf'])} | {num(r['test_waf'])} | {gain} | "
                     f"{'yes' if r['kept'] else 'no'} |")
    lines += ["", f"final model: {result.model}"]
    if result.evaluation:
        lines.append(f"predictions on '{cfg.test_split}': {result.evaluation}")
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    write_text_atomic(at.root / "recipe.md", table + "\n")
    write_json_atomic(at.root / "recipe.json", dataclasses.asdict(result))
