"""`mer-dist ablate`: did alignment help on *this* corpus? The control table any user can run on their own data.

For each modality set (visual only, fusion), fine-tune with a random-init encoder, the aligned encoder and
a shuffled-pairs control encoder (the same alignment with each video meeting a fixed other clip's audio:
what contrastive training gives without the audio-video correspondence), N seeds each, and compare their
cross-validated WAF on the labeled train split -- never the test split, which on MER2024 is hidden. One
line per modality set says whether the aligned encoder helped, with its spread.
"""
from __future__ import annotations

from pathlib import Path

from mer_dist import config as C
from mer_dist.dist import launch_local
from mer_dist.eval.ablation import mean_sd, row, verdict
from mer_dist.io import write_json_atomic, write_text_atomic
from mer_dist.models.visual import read_encoder
from mer_dist.stages import run_stage

ROWS = {"random": "random-init encoder", "aligned": "aligned encoder", "shuffled": "shuffled-pairs control encoder"}


def _aligned_config(run: Path) -> C.AlignConfig:
    for f in ("encoder.pt", "config.yaml"):
        if not (run / f).is_file():
            raise FileNotFoundError(f"{run / f}: aligned: expected an align run directory (encoder.pt, config.yaml)")
    return C.load(C.AlignConfig, run / "config.yaml")


def shuffled_control(cfg: C.AblateConfig, run: Path) -> Path:
    """The control encoder: `shuffled` when given, else the aligned run again with pairing=shuffled (guard off:
    the control shows what shuffled training does, not what the guard makes of it)."""
    if cfg.shuffled:
        return Path(cfg.shuffled) / "encoder.pt"
    dst = Path(cfg.out) / "shuffled"
    if not (dst / "encoder.pt").is_file():
        print(f"ablate: aligning the shuffled-pairs control like {run} ({cfg.procs} rank(s)) -> {dst}", flush=True)
        launch_local(["align", "--config", str(run / "config.yaml"), "--out", str(dst), "pairing=shuffled",
                      "guard.enabled=false"], cfg.procs)
    return dst / "encoder.pt"


def run(cfg: C.AblateConfig) -> dict:
    run_dir = Path(cfg.aligned)
    al = _aligned_config(run_dir)
    shards = cfg.shards or al.data.shards
    encoders = {"random": "random", "aligned": str(run_dir / "encoder.pt"),
                "shuffled": str(shuffled_control(cfg, run_dir))}
    guard_step = read_encoder(run_dir / "encoder.pt").get("step")
    scores: dict[str, dict[str, list[float]]] = {}
    for view in cfg.views:
        for name, visual in encoders.items():
            for seed in range(cfg.seeds):
                m = run_stage("finetune", C.load(C.FinetuneConfig, overrides={
                    "data": {**C.to_dict(al.data), "shards": shards}, "teacher": cfg.teacher, "visual": visual,
                    "visual_model": {**C.to_dict(al.model), "init": ""}, "modalities": list(view), "seed": seed,
                    "folds": cfg.folds, "epochs": cfg.epochs, "test_split": "", "tracking": {**C.to_dict(cfg.tracking), "log_model": False},
                    "out": str(Path(cfg.out) / "cells" / f"{view}-{name}-seed{seed}")}))
                scores.setdefault(view, {}).setdefault(name, []).append(m["cv_waf"])
    lines, verdicts = _report(cfg, scores, guard_step)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(cfg.out) / "table.md", "\n".join(lines) + "\n")
    write_json_atomic(Path(cfg.out) / "ablate.json", {"cv_waf": scores, "verdicts": verdicts, "encoders": encoders,
                                                      "aligned_encoder_step": guard_step})
    print("\n".join(lines))
    return {"cv_waf": scores, "verdicts": verdicts}


def _report(cfg: C.AblateConfig, scores: dict, guard_step) -> tuple[list[str], dict]:
    lines = [f"CV WAF on the labeled train split ({cfg.folds} folds), mean ± sd over {cfg.seeds} fine-tuning seeds; "
             f"the encoders are aligned once"]
    verdicts = {}
    for view, cells in scores.items():
        lines += ["", f"modalities {view}", "", "| encoder | CV WAF | per seed |", "|---|---|---|"]
        lines += [row(ROWS[name], values) for name, values in cells.items()]
        word, diff, margin = verdict(cells["aligned"], cells["random"])
        control = mean_sd(cells["shuffled"])[0] - mean_sd(cells["random"])[0]
        verdicts[view] = {"verdict": word, "gain": diff, "margin": margin, "shuffled_gain": control}
        lines.append(f"\nablate[{view}]: alignment {word}: aligned {diff:+.3f} over random init (needs more than "
                     f"±{margin:.3f} to count); the shuffled-pairs control {control:+.3f}")
    if guard_step == 0:
        lines.append("\nablate: the aligned run's guard kept its initial encoder (encoder.pt is step 0)")
    return lines, verdicts

