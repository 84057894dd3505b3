"""What a run learned, measured: the held-out split, pairwise accuracy with its interval, greedy
answer accuracy before and after, and the SoLo-RA distance over the run.

Used by ``examples/demo_cpu.py`` and ``benchmarks/bench_learning.py``. Pairwise accuracy is the
trainer's own eval (``eval/accuracy/{short,long}``: the fraction of held-out examples whose
chosen answer gets a higher reward than the rejected one); answer accuracy is
``examples/evaluate_qa.py``'s greedy sub-EM on the same held-out examples' short and long
prompts (:mod:`solopo_mcore.evaluation.runner`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from solopo_mcore.data.heldout import heldout_ids
from solopo_mcore.data.heldout import heldout_rows as rows_for_ids
from solopo_mcore.training.curves import read_metrics


#: What issue 21 asks the demo to reach on the long context.
TARGETS = {"pairwise_long": 0.9, "answer_long": 0.5}


def heldout_rows(triplets_path: str, dataset_prefix: str, num_eval_examples: int) -> list[dict]:
    """The rows of ``triplets_path`` (build_triplets output) that the trainer holds out: the
    last ``num_eval_examples`` examples of the dataset (``data.num_eval_examples``), by id."""
    meta = json.loads(Path(dataset_prefix + ".meta.json").read_text())
    return rows_for_ids(triplets_path, heldout_ids(meta, num_eval_examples))


def write_heldout(triplets_path: str, dataset_prefix: str, num_eval_examples: int,
                  out_path) -> Path:
    """Write :func:`heldout_rows` to ``out_path`` (JSONL), the input of evaluate_qa."""
    out = Path(out_path)
    with open(out, "w", encoding="utf-8") as f:
        for row in heldout_rows(triplets_path, dataset_prefix, num_eval_examples):
            f.write(json.dumps(row) + "\n")
    return out


def evaluate_command(python: str, heldout, out_dir, models: dict,
                     max_new_tokens: int = 32) -> list[str]:
    """``examples/evaluate_qa.py`` on the held-out rows: greedy, transformers, answers of the
    learnable task's length (32 new tokens); ``models`` = ``{name: checkpoint dir}``."""
    command = [python, "examples/evaluate_qa.py", "--input", str(heldout), "--output",
               str(out_dir), "--backend", "hf", "--max-new-tokens", str(max_new_tokens),
               "--batch-size", "16"]
    for name, path in models.items():
        command += ["--model", f"{name}={path}"]
    return command


def wilson_interval(accuracy: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``accuracy`` measured on ``n`` examples."""
    if n <= 0 or not math.isfinite(accuracy):
        return float("nan"), float("nan")
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pairwise_series(metrics_path: str) -> dict:
    """``{"short"|"long": [(step, accuracy)]}`` from the trainer's eval records."""
    out: dict = {"short": [], "long": []}
    for step, record in read_metrics(metrics_path).items():
        for ctx in out:
            value = record.get(f"eval/accuracy/{ctx}")
            if isinstance(value, (int, float)):
                out[ctx].append((step, float(value)))
    return out


def distance_series(metrics_path: str, key: str = "eval/reward/distance_chosen") -> list:
    """``[(step, |r(x_short, y_w) - r(x_long, y_w)|)]`` (held-out by default; the training
    batches' with ``key="reward/distance_chosen"``)."""
    return [(step, float(r[key])) for step, r in read_metrics(metrics_path).items()
            if isinstance(r.get(key), (int, float))]


def answer_accuracy(eval_dir: str, name: str) -> dict:
    """``{"short"|"long": {"value", "ci95", "n"}}`` from evaluate_qa's ``NAME/summary.json``."""
    summary = json.loads((Path(eval_dir) / name / "summary.json").read_text())
    return {ctx: summary[f"accuracy_{ctx}"] for ctx in ("short", "long")}


def fmt_interval(value: float, low: float, high: float) -> str:
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def learning_report(metrics_path: str, eval_dir: str, before: str, after: str,
                    num_eval_examples: int) -> dict:
    """Everything the closing summary states, as numbers: pairwise accuracy at the first and
    last eval (with Wilson intervals), answer accuracy of ``before`` and ``after`` (bootstrap
    intervals from evaluate_qa), and the held-out SoLo-RA distance at the first and last eval."""
    pairwise = pairwise_series(metrics_path)
    report: dict = {"num_eval_examples": num_eval_examples, "pairwise": {}, "answer": {}}
    for ctx, points in pairwise.items():
        if points:
            (s0, a0), (s1, a1) = points[0], points[-1]
            report["pairwise"][ctx] = {
                "first": {"step": s0, "value": a0,
                          "ci95": list(wilson_interval(a0, num_eval_examples))},
                "last": {"step": s1, "value": a1,
                         "ci95": list(wilson_interval(a1, num_eval_examples))}}
    for label, name in (("before", before), ("after", after)):
        report["answer"][label] = answer_accuracy(eval_dir, name)
    distances = distance_series(metrics_path)
    if distances:
        report["distance_chosen"] = {"first": list(distances[0]), "last": list(distances[-1])}
    return report


def describe(report: dict, scratch_targets: bool = True) -> str:
    """The closing sentences: the figures, each with its 95 % interval (and the from-scratch
    demo's long-context targets when ``scratch_targets``)."""
    n = report["num_eval_examples"]
    lines = []
    pw = report["pairwise"]
    if pw:
        parts = [f"{ctx} {fmt_interval(d['first']['value'], *d['first']['ci95'])} at step "
                 f"{d['first']['step']} -> "
                 f"{fmt_interval(d['last']['value'], *d['last']['ci95'])} at step "
                 f"{d['last']['step']}" for ctx, d in pw.items()]
        lines.append(f"Pairwise accuracy on {n} held-out examples (chosen reward > rejected, "
                     f"95% Wilson interval): " + "; ".join(parts) + ".")
    ans = report["answer"]
    parts = []
    for ctx in ("short", "long"):
        b, a = ans["before"][ctx], ans["after"][ctx]
        parts.append(f"{ctx} {fmt_interval(b['value'], *b['ci95'])} -> "
                     f"{fmt_interval(a['value'], *a['ci95'])}")
    lines.append("Greedy answer accuracy (sub-EM, evaluate_qa, 95% bootstrap interval), "
                 "untrained -> trained: " + "; ".join(parts) + ".")
    long_pairwise = pw.get("long", {}).get("last", {}).get("value", float("nan"))
    long_answer = ans["after"]["long"]["value"]
    met = long_pairwise >= TARGETS["pairwise_long"] and long_answer >= TARGETS["answer_long"]
    if scratch_targets:
            lines.append(f"Long-context targets (pairwise >= {TARGETS['pairwise_long']}, answer "
                     f"accuracy >= {TARGETS['answer_long']}): {'met' if met else 'not met'}"
                     + ("." if met else " (docs/data.md, 'The learnable task', says why)."))
    if "distance_chosen" in report:
        (s0, d0), (s1, d1) = report["distance_chosen"]["first"], report["distance_chosen"]["last"]
        lines.append(f"SoLo-RA distance |r(x_short, y_w) - r(x_long, y_w)| on held-out examples: "
                     f"{d0:.3f} at step {s0} -> {d1:.3f} at step {s1}.")
    return "\n".join(lines)
