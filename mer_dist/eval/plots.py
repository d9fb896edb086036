"""PNG plots logged as MLflow artifacts (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mer_dist.config import LABELS  # noqa: E402


def layer_curve(layers: list[int], wafs: list[float], accs: list[float], path: str | Path, top: list[int]) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(layers, wafs, "o-", label="WAF")
    ax.plot(layers, accs, "s--", alpha=0.6, label="accuracy")
    for layer in top:
        ax.axvline(layer, color="tab:red", alpha=0.25)
    ax.set_xlabel("HuBERT layer (0 = encoder input)")
    ax.set_ylabel("linear-probe score (validation)")
    ax.set_title("Emotion information per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(cm, path: str | Path, title: str = "Confusion matrix") -> None:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=45, ha="right")
    ax.set_yticks(range(len(LABELS)), LABELS)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
