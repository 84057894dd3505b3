"""Figures: long accuracy over depth x length (heatmap), and checkpoints side by side (bars)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from solopo_mcore.evaluation.summary import cell_grid


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def heatmap(summary: dict, path: str) -> bool:
    """Write the depth x length heatmap of one checkpoint; False when it has no grid."""
    grid = cell_grid(summary)
    if grid is None:
        return False
    lengths, depths, acc = grid
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    image = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("evidence depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{summary['name']}: sub-EM accuracy (long)")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def comparison_bars(summaries: list[dict], path: str) -> None:
    """Short and long accuracy per checkpoint, with 95 % interval whiskers."""
    plt = _pyplot()
    kinds = [("accuracy_short", "short"), ("accuracy_long", "long")]
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * len(summaries), 3.5))
    x = np.arange(len(summaries))
    for k, (key, label) in enumerate(kinds):
        values = [s[key]["value"] if s[key]["value"] is not None else np.nan for s in summaries]
        errors = np.array([[v - s[key]["ci95"][0], s[key]["ci95"][1] - v]
                           if s[key]["ci95"] else [0.0, 0.0]
                           for v, s in zip(values, summaries)]).T
        ax.bar(x + (k - 0.5) * width, values, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(x, [s["name"] for s in summaries])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("sub-EM accuracy")
    ax.legend()
    ax.set_title("short vs long context accuracy (95% bootstrap CI)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
