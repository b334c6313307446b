"""Figures: head-profile heat map."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from hybridkv.head_profile import HeadProfile


def profile_heatmap(profile: HeadProfile, path: str | Path, title: str | None = None) -> None:
    """Layers x KV heads heat map: colour = staticness, marker 'D' on dynamic heads, 'o' on static."""
    staticness = np.array(profile.staticness)
    layers, heads = staticness.shape
    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * heads + 2), max(3, 0.25 * layers + 1.5)))
    image = ax.imshow(staticness, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for kind, marker in (("dynamic", "D"), ("static", "o")):
        ys, xs = np.nonzero(np.array(profile.head_types) == kind)
        ax.scatter(xs, ys, marker=marker, s=18, facecolors="none", edgecolors="white", label=kind)
    ax.set(xlabel="KV head", ylabel="layer")
    ax.set_title(title or f"head profile ({profile.identity['model_type']})", fontsize=9)
    ax.set_xticks(range(heads))
    fig.colorbar(image, ax=ax, label="staticness")
    ax.legend(loc="upper right", fontsize=7, framealpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
