"""Replay the alignment guard's decision on finished `mer-dist demo` runs, with each of its probes (#19).

    python benchmarks/guard_replay.py runs/m-emotion runs/m-oracle          # every matched-pairs run of each
    python benchmarks/guard_replay.py runs/m-oracle/align/infonce-seed0       # or named runs

For every align run of a demo output (`align/<variant>-seed<s>/`, the shuffled-pairs control included), the guard of this commit
scores the run's initial encoder (random init with the run's seed, as `align` builds it) and its final encoder
(`encoder-last.pt`, else `encoder.pt`) on the run's own labeled split -- exactly its step-0 and last-checkpoint
scores -- with the `linear` and the `head` probe, and says which encoder each would export. Beside it: the test
WAF of the demo's visual-only rows for that seed (random init vs this encoder's final weights), which the guard
never sees. A choice is right when it keeps the encoder with the higher test WAF (a tie within 0.01 is right
either way)."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from mer_dist.config import AlignConfig, load
from mer_dist.models.visual import VisualEncoder, load_encoder
from mer_dist.train.guard import Guard, choose

sys.path.insert(0, str(Path(__file__).parent))
from robustness_matrix import _partial  # noqa: E402


def replay(folder: Path, runs: list[Path]) -> list[dict]:
    res = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else \
        _partial(folder)
    test = res.get("test_waf", {})
    rows, guard = [], None
    for run in runs:
        variant, seed = run.name.rsplit("-seed", 1)
        final = run / "encoder-last.pt" if (run / "encoder-last.pt").is_file() else run / "encoder.pt"
        if not final.is_file():
            continue
        cfg = load(AlignConfig, run / "config.yaml")
        cfg.guard = dataclasses.replace(cfg.guard, enabled=True)
        if guard is None:                    # the labeled clips are the same for every run of a demo
            guard = Guard(cfg, torch.device("cpu"), 0, 1)
        guard.seed = cfg.train.seed
        torch.manual_seed(cfg.train.seed)
        initial = VisualEncoder(cfg.model, cfg.data.height).eval()
        aligned = load_encoder(final).eval()
        row = {"regime": folder.name, "run": run.name}
        for probe in ("linear", "head"):
            guard.cfg = dataclasses.replace(guard.cfg, probe=probe)
            guard.scores = {}
            s0, s1 = guard.score(initial.embed, 0), guard.score(aligned.embed, 1)
            row[probe] = (s0, s1, "aligned" if choose(guard.scores, cfg.guard.min_gain) else "initial")
        key = f"visual/{variant}@last" if f"visual/{variant}@last" in test else f"visual/{variant}"
        s = int(seed)
        if key in test and s < len(test[key]) and s < len(test.get("visual/random", [])):
            row["test"] = (test["visual/random"][s], test[key][s])
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    cells = [f"{r['regime']:<10} {r['run']:<18}"]
    for probe in ("linear", "head"):
        s0, s1, pick = r[probe]
        cells.append(f"{probe}: {s0:.3f} -> {s1:.3f} keeps {pick:<8}")
    if "test" in r:
        t0, t1 = r["test"]
        best = "either" if abs(t1 - t0) < 0.01 else ("aligned" if t1 > t0 else "initial")
        cells.append(f"test visual-only: random {t0:.3f}, aligned {t1:.3f} (right: {best})")
    return " | ".join(cells)


if __name__ == "__main__":
    for arg in map(Path, sys.argv[1:]):
        if arg.parent.name == "align":
            replay(arg.parent.parent, [arg])
        else:
            replay(arg, sorted((arg / "align").glob("*-seed*")))
