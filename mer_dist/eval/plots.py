"""PNG plots logged as MLflow artifacts (matplotlib, headless).

Figures are built with matplotlib's object API, never pyplot: pyplot resolves a backend on first use and, when
IPython sits in sys.modules, calls into it -- and MLflow's tracker thread may be importing IPython at that moment
(seen under load: "cannot import name 'DummyMod' from partially initialized module"). Canvases look at IPython
once per class (cached), so both are made here, at import, on the importing thread."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mer_dist.config import LABELS
from mer_dist.io import atomic_target

FigureCanvasAgg(Figure())


def layer_curve(layers: list[int], wafs: list[float], accs: list[float], path: str | Path, top: list[int]) -> None:
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(layers, wafs, "o-", label="WAF")
    ax.plot(layers, accs, "s--", alpha=0.6, label="accuracy")
    for layer in top:
        ax.axvline(layer, color="tab:red", alpha=0.25)
    ax.set_xlabel("HuBERT layer (0 = encoder input)")
    ax.set_ylabel("linear-probe score (validation)")
    ax.set_title("Emotion information per layer")
    ax.legend()
    _save(fig, path)


def _save(fig: Figure, path: str | Path) -> None:
    """The figure as a PNG written whole (temp + rename)."""
    fig.tight_layout()
    with atomic_target(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)


def confusion_matrix(cm, path: str | Path, title: str = "Confusion matrix") -> None:
    cm = np.asarray(cm)
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=45, ha="right")
    ax.set_yticks(range(len(LABELS)), LABELS)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    _save(fig, path)
