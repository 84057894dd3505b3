"""A PNG of a run's loss, reward and eval-accuracy curves, from its ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

#: Panels: (title, metric-key prefix, keys left out). Eval keys carry the ``eval/`` prefix
#: (see Trainer); the SoLo-RA distance has its own panel.
DISTANCE_KEYS = ("reward/distance_chosen", "eval/reward/distance_chosen")
PANELS = (("training loss", "loss/", ()), ("training rewards", "reward/", DISTANCE_KEYS),
          ("pairwise accuracy (held-out)", "eval/accuracy/", ()))


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


def plot_curves(metrics_path: str, png_path: str, answer_accuracy: dict | None = None) -> Path:
    """Write the curves of ``metrics_path`` to ``png_path`` (matplotlib, Agg backend): training
    loss, rewards, held-out pairwise accuracy, the SoLo-RA distance and, when given,
    ``answer_accuracy`` = ``{label: [(step, value, low, high)]}`` (greedy answer accuracy with
    its interval, e.g. before and after training, per context)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    panels = [(title, prefix, sorted({k for r in records.values() for k in r
                                      if k.startswith(prefix) and k not in skip}))
              for title, prefix, skip in PANELS]
    panels.append(("SoLo-RA distance |r_short(y_w) - r_long(y_w)|", "",
                   [k for k in DISTANCE_KEYS if any(k in r for r in records.values())]))
    panels = [p for p in panels if p[2]]
    if not panels:
        raise ValueError(f"{metrics_path}: no loss/, reward/ or eval/accuracy/ metrics to plot")
    num = len(panels) + bool(answer_accuracy)
    cols = min(num, 3)
    rows = (num + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (title, prefix, keys) in zip(flat, panels):
        for key in keys:
            points = [(s, r[key]) for s, r in records.items()
                      if isinstance(r.get(key), (int, float))]
            if points:
                # the total is a wide pale band underneath; po (often equal to it at a small
                # alpha) is dashed on top, so both stay visible
                style = {"loss/total": dict(linewidth=3.5, alpha=0.35, zorder=1),
                         "loss/po": dict(linestyle="--", zorder=3)}.get(
                             key.removeprefix("eval/"), {})
                label = key[len(prefix):]
                if key.endswith("loss/solo_ra"):
                    label += " (before alpha)"
                ax.plot(*zip(*points), marker="o" if len(points) < 12 else None, markersize=3,
                        label=label, **style)
        if prefix == "eval/accuracy/":
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if answer_accuracy:
        ax = flat[len(panels)]
        for label, points in answer_accuracy.items():
            steps, values, lows, highs = zip(*points)
            colour = {"long": "C0", "short": "C1"}.get(label.split()[0])  # as the pairwise panel
            ax.errorbar(steps, values, yerr=[[v - lo for v, lo in zip(values, lows)],
                                             [hi - v for v, hi in zip(values, highs)]],
                        marker="o", capsize=4, label=label, color=colour)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("answer accuracy (greedy sub-EM, held-out)", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in flat[num:]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
