"""Scores and summaries: sub-EM per generation, accuracies with 95 % bootstrap intervals.

``accuracy_short`` is the mean score of the short items, ``accuracy_long`` of the long items,
and ``gap`` = accuracy_short - accuracy_long: what the long context costs (the quantity SoLoPO
aims to shrink). Intervals are percentile bootstraps that resample *examples* (with all their
items), so an example's grid cells count as one correlated unit and the gap is paired.
"""

from __future__ import annotations

import collections
from typing import Optional

import numpy as np

from data_tools.scoring import final_answer, sub_em

NUM_BOOTSTRAP = 2000


def score(response: str, answers: list) -> tuple[str, int]:
    """(extracted answer, 1/0): the data_tools answer extraction and sub-EM."""
    return final_answer(response), int(sub_em(response, answers))


def _per_example(rows: list[dict]) -> tuple[list[str], np.ndarray]:
    """Example ids and a ``[n, 4]`` array: short sum, short count, long sum, long count."""
    table: dict = collections.OrderedDict()
    for row in rows:
        entry = table.setdefault(row["example_id"], [0.0, 0.0, 0.0, 0.0])
        k = 0 if row["context"] == "short" else 2
        entry[k] += row["score"]
        entry[k + 1] += 1
    return list(table), np.array(list(table.values()), dtype=np.float64).reshape(-1, 4)


def _stat(sums: np.ndarray) -> dict:
    """accuracy_short / accuracy_long / gap from column sums (NaN when a kind is absent)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        short = sums[..., 0] / sums[..., 1]
        long = sums[..., 2] / sums[..., 3]
    return {"accuracy_short": short, "accuracy_long": long, "gap": short - long}


def bootstrap(rows: list[dict], num_resamples: int = NUM_BOOTSTRAP, seed: int = 0) -> dict:
    """``{metric: {"value", "ci95": [lo, hi], "n"}}`` for accuracy_short, accuracy_long, gap."""
    _, table = _per_example(rows)
    point = _stat(table.sum(0))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(table), size=(num_resamples, len(table)))
    resampled = _stat(table[picks].sum(1))
    n = {"accuracy_short": int(table[:, 1].sum()), "accuracy_long": int(table[:, 3].sum()),
         "gap": int(((table[:, 1] > 0) & (table[:, 3] > 0)).sum())}
    out = {}
    for key, value in point.items():
        samples = resampled[key][np.isfinite(resampled[key])]
        finite = bool(np.isfinite(value))
        out[key] = {"value": float(value) if finite else None,
                    "ci95": ([float(np.percentile(samples, 2.5)),
                              float(np.percentile(samples, 97.5))]
                             if finite and samples.size else None),
                    "n": n[key]}
    return out


def summarize(rows: list[dict], name: str = "model", num_resamples: int = NUM_BOOTSTRAP,
              seed: int = 0) -> dict:
    """The summary.json content: overall metrics, per-length, per depth x length cell."""
    cells: dict = collections.defaultdict(list)
    lengths: dict = collections.defaultdict(list)
    for row in rows:
        if row["context"] == "long":
            if row.get("length_tokens") is not None:
                lengths[row["length_tokens"]].append(row["score"])
            if row.get("source") == "grid":
                cells[(row["length_tokens"], row["depth_percent"])].append(row["score"])
    metrics = bootstrap(rows, num_resamples, seed)
    return {
        "name": name,
        "num_examples": len({r["example_id"] for r in rows}),
        "num_generations": len(rows),
        **metrics,
        "by_length": [{"length_tokens": k, "accuracy": float(np.mean(v)), "n": len(v)}
                      for k, v in sorted(lengths.items())],
        "cells": [{"length_tokens": k[0], "depth_percent": k[1], "accuracy": float(np.mean(v)),
                   "n": len(v)} for k, v in sorted(cells.items())],
        "bootstrap": {"num_resamples": num_resamples, "seed": seed, "unit": "example"},
    }


def _fmt(metric: dict, signed: bool = False) -> str:
    if metric["value"] is None:
        return "n/a"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    ci = metric["ci95"]
    interval = f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else ""
    return f"{fmt.format(metric['value'])}{interval}"


def summary_markdown(summaries: list[dict], title: str = "QA evaluation") -> str:
    """One table row per checkpoint, then each checkpoint's depth x length grid."""
    lines = [f"# {title}", "",
             "sub-EM accuracy; 95 % bootstrap intervals over examples; gap = short - long.", "",
             "| checkpoint | accuracy short | accuracy long | gap | n short | n long |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['name']} | {_fmt(s['accuracy_short'])} | {_fmt(s['accuracy_long'])} "
                     f"| {_fmt(s['gap'], signed=True)} | {s['accuracy_short']['n']} | "
                     f"{s['accuracy_long']['n']} |")
    for s in summaries:
        grid = cell_grid(s)
        if grid is None:
            continue
        lengths, depths, acc = grid
        lines += ["", f"## {s['name']}: long accuracy by depth (rows) x length (columns)", "",
                  "| depth % | " + " | ".join(str(n) for n in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for i, depth in enumerate(depths):
            values = " | ".join("" if np.isnan(v) else f"{v:.2f}" for v in acc[i])
            lines.append(f"| {depth:g} | {values} |")
    return "\n".join(lines) + "\n"


def cell_grid(summary: dict) -> Optional[tuple[list, list, np.ndarray]]:
    """(lengths, depths, accuracy[depth, length]) or None when there are no grid cells."""
    cells = summary.get("cells") or []
    lengths = sorted({c["length_tokens"] for c in cells})
    depths = sorted({c["depth_percent"] for c in cells})
    if not cells or len(cells) < 2 or len(cells) != len({(c["length_tokens"],
                                                           c["depth_percent"]) for c in cells}):
        return None
    acc = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        acc[depths.index(c["depth_percent"]), lengths.index(c["length_tokens"])] = c["accuracy"]
    return lengths, depths, acc
