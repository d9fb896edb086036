"""The stages the CLI runs (`mer-dist STAGE`), one module each, above the library rooms.

A stage reads its config, calls library code (`data/`, `models/`, `train/`, `eval/`, `features`, `tracking`) and
writes its outputs; it never imports another stage. The orchestrating stages (demo, self-train, ablate) run other
stages by name through the one stage registry (`config.STAGES`), as the CLI does: `run_stage`.
"""
from __future__ import annotations

from mer_dist.config import STAGES


def run_stage(name: str, cfg):
    """Run stage `name` (a key of config.STAGES) on its config, in this process; returns what the stage returns."""
    return STAGES[name].function()(cfg)
