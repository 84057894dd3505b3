"""Write profiling results: JSON, CSV, PNG plots (time and memory vs long length, per variant)
and a Markdown summary with the step-time and peak-memory ratios (SoLoPO against long-PO without
and with shared prefixes, solo_both against solo, long-PO shared against unshared), the longest
trainable lengths and the memory estimator's error against the measured peaks."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional


#: The comparisons the report makes, (numerator, denominator, what): a bare mode stands for
#: that mode's variant, shared when both were run (a bare pair: the same sharing for both).
RATIOS = (
    ("solo", "long/unshared", "SoLoPO / long-PO without sharing (the paper's baseline)"),
    ("solo", "long/shared", "SoLoPO / long-PO with sharing (the strongest baseline)"),
    ("solo_both", "solo", "solo_both / solo"),
    ("long/shared", "long/unshared", "long-PO with / without sharing"),
)


def _variant(result: dict) -> str:
    return result.get("variant") or f"{result['mode']}/unshared"


def _resolve(numerator: str, denominator: str, present: set):
    def pick(spec, sharing):
        name = spec if "/" in spec else f"{spec}/{sharing}"
        return name if name in present else None
    for sharing in ("shared", "unshared"):
        if "/" not in numerator and "/" not in denominator:  # same sharing for both
            pair = (pick(numerator, sharing), pick(denominator, sharing))
        else:
            pair = tuple(pick(spec, sharing) or pick(spec, "unshared")
                         for spec in (numerator, denominator))
        if all(pair) and pair[0] != pair[1]:
            return pair
    return None


def ratio_rows(results: list) -> list:
    """Each comparison of :data:`RATIOS` (and ``MODE/shared`` against ``MODE/unshared`` for every
    other mode run both ways) at every long length where both sides ran: step-time and
    peak-memory ratios."""
    by = {(_variant(r), r["long_tokens"]): r for r in results}
    rows = []
    for length in sorted({r["long_tokens"] for r in results}):
        present = {v for v, n in by if n == length}
        specs = list(RATIOS) + [(f"{m}/shared", f"{m}/unshared", f"{m} with / without sharing")
                                for m in sorted({v.split("/")[0] for v in present})
                                if m != "long"]
        seen = set()
        for numerator, denominator, what in specs:
            pair = _resolve(numerator, denominator, present)
            if pair is None or pair in seen:
                continue
            seen.add(pair)
            a, b = by[(pair[0], length)], by[(pair[1], length)]
            rows.append({"long_tokens": length, "label": what, "numerator": pair[0],
                         "denominator": pair[1], "step_time_ratio": a["step_sec"] / b["step_sec"],
                         "peak_memory_ratio": a["peak_memory_gib"] / b["peak_memory_gib"],
                         "numerator_peak_gib": a["peak_memory_gib"],
                         "denominator_peak_gib": b["peak_memory_gib"]})
    return rows


def not_available(context: dict) -> str:
    """What a missing figure is called: on CPU there is no peak TFLOP/s, hence no MFU."""
    return "n/a (CPU)" if str(context.get("device", "")).startswith("CPU") else "n/a"


def write_report(out_dir: str, results: list, context: dict, max_lengths: dict,
                 estimates: list, max_len_limit: Optional[int] = None) -> dict:
    """Write everything; a longest length equal to ``max_len_limit`` (the search's cap) is
    reported as a lower bound. Returns the JSON payload."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    na = not_available(context)
    lower_bounds = sorted(m for m, n in max_lengths.items()
                          if max_len_limit is not None and n >= max_len_limit)
    ratios = ratio_rows(results)
    payload = {"context": context, "results": results, "ratios": ratios,
               "max_long_tokens": max_lengths,
               "max_long_tokens_lower_bound": lower_bounds, "estimates": estimates}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    if results:
        keys = sorted({k for r in results for k in r})
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(results)
    _plots(out, results)
    def show(key):
        return na if context.get(key) is None else context[key]
    lines = [f"# SoLoPO profile — {show('model')}", "",
             f"{show('device')}; layout {show('layout')}; short {show('short_tokens')} tokens; "
             f"response {show('response_tokens')} tokens; peak {show('peak_tflops')} TFLOP/s; "
             f"recompute {context.get('recompute') or 'none'}; activations "
             f"{show('activation_memory')}; params {show('params_dtype')}",
             "",
             "| variant | long tokens | tokens | step s | tokens/s/GPU | model TFLOP/s/GPU | MFU | "
             "long-pass MFU | peak GiB | short segs s | long segs s |", "|" + "---|" * 11]
    for r in results:
        def f(v, fmt):
            return na if v is None else fmt.format(v)
        lines.append(f"| {_variant(r)} | {r['long_tokens']} | {f(r.get('tokens'), '{}')} | "
                     f"{r['step_sec']:.3f} | "
                     f"{r['tokens_per_sec_per_gpu']:.0f} | {r['model_tflops_per_gpu']:.2f} | "
                     f"{f(r['mfu'], '{:.1%}')} | {f(r['long_pass_mfu'], '{:.1%}')} | "
                     f"{r['peak_memory_gib']:.3f} | {r['short_segments_sec']:.3f} | "
                     f"{r['long_segments_sec']:.3f} |")
    lines += ["", "tokens and tokens/s count the tokens a variant actually runs: a shared-prefix "
              "segment runs its context once, so it shows fewer tokens/s for the same work; "
              "compare variants by step time."]
    if ratios:
        lines += ["", "Ratios (tokens: the real tokens each variant runs; a shared-prefix segment "
                  "runs its context once):", "",
                  "| long tokens | comparison | variants | step time ratio | peak memory ratio |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['long_tokens']} | {r['label']} | {r['numerator']} / {r['denominator']} "
                  f"| {r['step_time_ratio']:.2f} | {r['peak_memory_ratio']:.2f} |"
                  for r in ratios]
    if max_lengths:
        lines += ["", "Longest trainable long context: " + ", ".join(
            f"{variant} {'>= ' if variant in lower_bounds else ''}{n} tokens"
            for variant, n in max_lengths.items())]
        if lower_bounds:
            lines.append(f"(>= : a lower bound — the search reached --max-len-limit "
                         f"{max_len_limit} without running out of memory; raise the limit to "
                         f"find the real maximum)")
    if estimates:
        lines += ["", "Memory estimator (profiling/estimator.py) against the measured tensor peak "
                  "(CUDA max allocated; on CPU the allocator's peak plus the live tensors):", "",
                  "| variant | long tokens | estimated GiB | measured GiB | error |",
                  "|---|---|---|---|---|"]
        for e in estimates:
            err = na if e.get("error") is None else f"{e['error']:+.1%}"
            lines.append(f"| {e.get('variant', e['mode'])} | {e['long_tokens']} | "
                         f"{e['estimated_gib']:.3f} | "
                         f"{e['measured_gib']:.3f} | {err} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return payload


def _plots(out: Path, results: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, name in (("step_sec", "step time (s)", "time_vs_length.png"),
                             ("peak_memory_gib", "peak memory (GiB)", "memory_vs_length.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in sorted({_variant(r) for r in results}):
            rows = sorted((r for r in results if _variant(r) == variant),
                          key=lambda r: r["long_tokens"])
            ax.plot([r["long_tokens"] for r in rows], [r[key] for r in rows], marker="o",
                    label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("long context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
