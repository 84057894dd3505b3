"""Write profiling results: JSON, CSV, PNG plots (time and memory vs long length, per mode) and a
Markdown summary with the solo/long step-time ratio, the longest trainable lengths and the memory
estimator's error against the measured peaks."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional


def _ratio_rows(results: list) -> list:
    by = {(r["mode"], r["long_tokens"]): r for r in results}
    rows = []
    for (mode, length), r in sorted(by.items()):
        if mode == "solo" and ("long", length) in by:
            rows.append((length, r["step_sec"] / by[("long", length)]["step_sec"],
                         r["peak_memory_gib"], by[("long", length)]["peak_memory_gib"]))
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
    payload = {"context": context, "results": results, "max_long_tokens": max_lengths,
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
             f"recompute {context.get('recompute') or 'none'}; params {show('params_dtype')}",
             "",
             "| mode | long tokens | step s | tokens/s/GPU | model TFLOP/s/GPU | MFU | long-pass "
             "MFU | peak GiB | short segs s | long segs s |", "|" + "---|" * 10]
    for r in results:
        def f(v, fmt):
            return na if v is None else fmt.format(v)
        lines.append(f"| {r['mode']} | {r['long_tokens']} | {r['step_sec']:.3f} | "
                     f"{r['tokens_per_sec_per_gpu']:.0f} | {r['model_tflops_per_gpu']:.2f} | "
                     f"{f(r['mfu'], '{:.1%}')} | {f(r['long_pass_mfu'], '{:.1%}')} | "
                     f"{r['peak_memory_gib']:.3f} | {r['short_segments_sec']:.3f} | "
                     f"{r['long_segments_sec']:.3f} |")
    ratios = _ratio_rows(results)
    if ratios:
        lines += ["", "| long tokens | solo/long step time | solo peak GiB | long peak GiB |",
                  "|---|---|---|---|"]
        lines += [f"| {l} | {t:.2f} | {a:.3f} | {b:.3f} |" for l, t, a, b in ratios]
    if max_lengths:
        lines += ["", "Longest trainable long context: " + ", ".join(
            f"{mode} {'>= ' if mode in lower_bounds else ''}{n} tokens"
            for mode, n in max_lengths.items())]
        if lower_bounds:
            lines.append(f"(>= : a lower bound — the search reached --max-len-limit "
                         f"{max_len_limit} without running out of memory; raise the limit to "
                         f"find the real maximum)")
    if estimates:
        lines += ["", "Memory estimator (profiling/estimator.py) against the measured tensor peak "
                  "(CUDA max allocated; on CPU the allocator's peak plus the live tensors):", "",
                  "| mode | long tokens | estimated GiB | measured GiB | error |",
                  "|---|---|---|---|---|"]
        for e in estimates:
            err = na if e.get("error") is None else f"{e['error']:+.1%}"
            lines.append(f"| {e['mode']} | {e['long_tokens']} | {e['estimated_gib']:.3f} | "
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
        for mode in sorted({r["mode"] for r in results}):
            rows = sorted((r for r in results if r["mode"] == mode),
                          key=lambda r: r["long_tokens"])
            ax.plot([r["long_tokens"] for r in rows], [r[key] for r in rows], marker="o",
                    label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("long context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
