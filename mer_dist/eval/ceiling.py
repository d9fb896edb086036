"""The Bayes ceiling of a synthetic corpus: `python -m mer_dist.eval.ceiling CORPUS` prints it per modality subset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mer_dist.config import LABELS
from mer_dist.data.synth import CONFUSABLE
from mer_dist.eval.metrics import summary


def ceiling(corpus: str | Path) -> dict[str, float]:
    """WAF of the Bayes-optimal reader of each modality subset over every clip of the corpus, from the generator's
    hidden record of which emotion each modality showed: how far a model could get if it read faces, voices and
    sentences perfectly. It separates the gap a better encoder can close from the one no labels can (the
    confusable expressions). Reports only; no stage reads it."""
    meta = json.loads((Path(corpus) / "synth.json").read_text())
    cfg, clips = meta["config"], meta["clips"]
    prior = np.asarray(cfg["label_balance"], float) / sum(cfg["label_balance"])

    def likelihood(shown: str, noise: float) -> np.ndarray:      # P(modality shows `shown` | emotion), per emotion
        return np.array([(1 - noise) * (shown == e) + noise * (shown in CONFUSABLE[e]) / len(CONFUSABLE[e])
                         for e in LABELS])
    y = np.array([LABELS.index(c["emotion"]) for c in clips])
    # a neutral face shows nothing; so does a neutral voice whose loudness and tempo are energy (shared=nuisance)
    faded = {"v": cfg.get("expression", 1.0) == 0.0, "t": False,
             "a": cfg.get("prosody", 1.0) == 0.0 and cfg.get("shared", "emotion") == "nuisance"}
    out = {}
    for mods in ("v", "a", "t", "av", "at", "vt", "avt"):
        post = np.tile(prior, (len(clips), 1))
        for m, key in (("v", "visual"), ("a", "audio"), ("t", "text")):
            if m in mods and not faded[m]:
                post *= np.stack([likelihood(c[key], cfg[f"{key}_noise"]) for c in clips])
        out[mods] = summary(y, post.argmax(1))["waf"]
    return out


if __name__ == "__main__":
    import sys
    for k, v in ceiling(sys.argv[1]).items():
        print(f"{k:>4}  {v:.3f}")
