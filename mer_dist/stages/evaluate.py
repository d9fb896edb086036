"""`mer-dist evaluate`: fold-ensemble predictions on a split; metrics where labels exist; MER2024 submission CSV."""
from __future__ import annotations

from mer_dist import dist
from mer_dist.config import EvaluateConfig
from mer_dist.eval.evaluate import predict, report
from mer_dist.models.ensemble import load_model


def run(cfg: EvaluateConfig) -> dict:
    env = dist.setup()
    names, y, probs = predict(load_model(cfg.model), cfg.split, cfg.shards, None, env.rank, env.world_size)
    result = report(cfg, names, y, probs.mean(0)) if env.is_main else {}
    dist.cleanup()
    return result
