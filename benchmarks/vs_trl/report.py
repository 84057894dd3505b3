"""Tables of bench_vs_trl.py: per shape, length and variant, s/step (median and range over every
timed step of every round), tokens/s, peak RSS, and TRL's time and memory over each variant's."""

from __future__ import annotations

import statistics
from pathlib import Path

#: The two TRL rows: as shipped (TRL 1.16's DPO/CPO/ORPO configs turn gradient checkpointing on
#: by default: every layer is recomputed in backward) and with it off. Each other row is compared
#: with the one whose recompute setting it shares (timings entries carry ``recompute``).
TRL_CHECKPOINTED = "TRL long-PO, gradient checkpointing (TRL's default)"
TRL_PLAIN = "TRL long-PO, no gradient checkpointing"


def summarize(timings: list) -> list:
    groups: dict = {}
    for entry in timings:
        groups.setdefault((entry["shape"], entry["long_tokens"], entry["variant"]), []).append(entry)
    rows = []
    for (shape, length, variant), entries in groups.items():
        ok = [e for e in entries if e["ok"]]
        row = {"shape": shape, "long_tokens": length, "variant": variant,
               "recompute": entries[0].get("recompute", True),
               "num_runs": len(entries), "num_failed": len(entries) - len(ok)}
        if ok:
            seconds = [s for e in ok for s in e["step_seconds"]]
            tokens = [t for e in ok for t in e["tokens"]]
            row.update(median_s=statistics.median(seconds), min_s=min(seconds),
                       max_s=max(seconds), num_steps=len(seconds),
                       tokens_per_step=statistics.median(tokens),
                       tokens_per_s=sum(tokens) / sum(seconds),
                       peak_rss_gib=max(e["peak_rss_gib"] for e in ok),
                       other_load_cores=None if any("other_load_cores" not in e for e in ok)
                       else max(e["other_load_cores"] for e in ok))
        else:
            row["error"] = entries[0].get("error", "")[:200]
            row["oom"] = any(e.get("oom") for e in entries)
        rows.append(row)
    for row in rows:
        baseline = TRL_CHECKPOINTED if row["recompute"] else TRL_PLAIN
        trl = next((r for r in rows if r["shape"] == row["shape"] and
                    r["long_tokens"] == row["long_tokens"] and r["variant"] == baseline), None)
        if trl and "median_s" in trl and "median_s" in row:
            row["trl_time_ratio"] = trl["median_s"] / row["median_s"]
            row["trl_rss_ratio"] = trl["peak_rss_gib"] / row["peak_rss_gib"]
            # the same examples' long-PO tokens (TRL's count) per second: comparable across rows
            row["pair_tokens_per_s"] = trl["tokens_per_step"] / row["median_s"]
    return rows


def _check_table(check: dict) -> list:
    lines = [f"Check on `{check['shape']}`, long context {check['long_tokens']} tokens, "
             f"mode=long, {check['steps']} steps: identical token ids on both sides.", "",
             "| algorithm | step | loss, ours | loss, TRL in our convention | loss, TRL as "
             "shipped | rel. diff | log-probs rel. diff (max) |", "|---|---|---|---|---|---|---|"]
    for algorithm, rows in check["algorithms"].items():
        for r in rows:
            lp = max(r["logps/chosen rel_diff"], r["logps/rejected rel_diff"])
            lines.append(f"| {algorithm} | {r['step']} | {r['ours']:.6f} | "
                         f"{r['trl_in_our_convention']:.6f} | {r['trl_as_shipped']:.6f} | "
                         f"{r['rel_diff']:.1e} | {lp:.1e} |")
    return lines


LEGEND = """\
- *long*: long-context tokens of the examples; every variant trains on the same examples, one
  pair per step. *s/step*: median over every timed step of every round, from one step's end to
  the next (data, forward, backward, clipping, AdamW, per-step logging); range: min-max.
- *tokens run/step*: tokens each variant puts through the model: the long context twice (TRL,
  ours unshared), once with both answers (shared prefix), or the short pair plus the long chosen
  (SoLoPO, a different objective on the same examples). *pair tokens/s*: the same examples'
  long-PO tokens (TRL's count) per second, so it compares across rows.
- *peak RSS*: the process's own maximum resident set (imports included). *TRL ÷ this*: TRL's
  s/step or peak RSS over the row's (above 1: this row is faster or smaller), against the TRL row
  with the same recompute setting: TRL as shipped (gradient checkpointing on, its default) for
  ours with full recompute, TRL without it for ours without recompute.
- *other load*: cores other processes used during the row's runs (the most of any run); above
  0.2 the timing is suspect."""


def _load(cores) -> str:
    return "not recorded" if cores is None else f"{cores:.2f}"


def _timing_table(rows: list, shape: str, order: list) -> list:
    lines = ["| long | variant | s/step median (range) | tokens run/step | pair tokens/s | peak "
             "RSS GiB | TRL ÷ this: time | TRL ÷ this: RSS | other load |",
             "|---|---|---|---|---|---|---|---|---|"]
    rank = {name: i for i, name in enumerate(order)}
    for r in sorted((r for r in rows if r["shape"] == shape),
                    key=lambda r: (r["long_tokens"], rank.get(r["variant"], len(rank)))):
        if "median_s" not in r:
            what = "over the memory limit" if r.get("oom") else f"failed: {r.get('error', '')}"
            lines.append(f"| {r['long_tokens']} | {r['variant']} | {what} | | | | | | |")
            continue
        ratio = (f"{r['trl_time_ratio']:.2f}x" if "trl_time_ratio" in r else "")
        rss = (f"{r['trl_rss_ratio']:.2f}x" if "trl_rss_ratio" in r else "")
        pair = (f"{r['pair_tokens_per_s']:.0f}" if "pair_tokens_per_s" in r else "")
        steps = f"{r['num_steps']} step{'s' if r['num_steps'] != 1 else ''}"
        lines.append(f"| {r['long_tokens']} | {r['variant']} | {r['median_s']:.2f} "
                     f"({r['min_s']:.2f}-{r['max_s']:.2f}, {steps}) | "
                     f"{r['tokens_per_step']:.0f} | {pair} | {r['peak_rss_gib']:.2f} | {ratio} | "
                     f"{rss} | {_load(r['other_load_cores'])} |")
    return lines


def write_summary(payload: dict, path: Path) -> str:
    env = payload["environment"]
    lines = ["# ours vs TRL", "",
             f"{env['date']}; Python {env['python']}, torch {env['torch']}, transformers "
             f"{env['transformers']}, TRL {env['trl']}, megatron-core {env['megatron_core']}; "
             f"{env['cores']} cores ({env['cpu']}), {env['threads']} torch threads per run, fp32.",
             "", f"Command: `{env['command']}`", ""]
    for name, shape in payload["shapes"].items():
        c = shape["config"]
        share = ", ".join(f"{n} tokens: {v:.1%}" for n, v in shape["output_layer_share"].items())
        lines.append(f"- `{name}`: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
                     f"vocab {c['vocab_size']}; share of the output layer in a full-logits "
                     f"forward at {share}; {shape['why']}")
    lines.append("")
    if "check" not in payload:
        lines += ["**No check ran** (`--skip-check`): nothing here shows that both trainers "
                  "computed the same thing on the same tokens.", ""]
    for check in payload.get("check", []):
        lines += _check_table(check) + [""]
    if "summary" in payload:
        order = payload.get("variant_order", [])
        for name in payload["shapes"]:
            algorithm = payload.get("timed_algorithm", "orpo").upper()
            lines += [f"## {name}: {algorithm}, timed", ""] + \
                _timing_table(payload["summary"], name, order) + [""]
        lines += [LEGEND, f"- Runs going over {payload['memory_limit_gib']:.1f} GiB resident "
                          f"(`--memory-limit-gib`) were stopped.", ""]
    text = "\n".join(lines)
    Path(path).write_text(text + "\n")
    return text
