"""A PNG of a run's loss, reward and eval-accuracy curves, from its ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

#: Panels: (title, metric-key prefix). Eval keys carry the ``eval/`` prefix (see Trainer).
PANELS = (("training loss", "loss/"), ("training rewards", "reward/"),
          ("eval accuracy", "eval/accuracy/"))


def read_metrics(metrics_path: str) -> dict:
    """``{step: record}``; a step logged twice (a resumed run) keeps its last record, and train
    and eval records of the same step are merged."""
    by_step: dict = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step.setdefault(int(record["step"]), {}).update(record)
    return dict(sorted(by_step.items()))


def plot_curves(metrics_path: str, png_path: str) -> Path:
    """Write the curves of ``metrics_path`` to ``png_path`` (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    panels = [(title, prefix, sorted({k for r in records.values() for k in r
                                      if k.startswith(prefix)}))
              for title, prefix in PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        raise ValueError(f"{metrics_path}: no loss/, reward/ or eval/accuracy/ metrics to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (title, prefix, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(s, r[key]) for s, r in records.items()
                      if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 8 else None, markersize=3,
                        label=key[len(prefix):])
        if prefix == "eval/accuracy/":
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
