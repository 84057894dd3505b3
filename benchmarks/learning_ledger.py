"""bench_learning's ledger: the measured rows, committed with the project, and what is made of
them (a table and a plot beside the ledger).

One JSON line per measured model (the initial one and each trained arm) for one (model, long
length, seed, settings fingerprint); a row also says when, where and with what it was measured.
A row is appended only once its measurement is complete and written with fsync, so a killed
run leaves either the whole row or, at worst, an unterminated last line: that line is cut off
on the next read, kept in ``LEDGER.cut-N`` (nothing is deleted) and its arm measured again.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from data_tools.common import atomic_output, read_jsonl_strict

REPO = Path(__file__).resolve().parents[1]
ARM_ORDER = tuple(f"{algorithm}-{arm}" if algorithm else arm
                  for algorithm in ("", "orpo", "dpo", "simpo")
                  for arm in (("base", "untrained") if not algorithm else
                              ("short", "long", "long-unshared", "long-shared", "solo",
                               "solo_both")))


REQUIRED_KEYS = ("model", "length", "seed", "settings_id", "name", "answer")


def _cut_tail(path: Path, tail: str, lines: list[str]) -> None:
    """Keep an unparseable unterminated last line in ``LEDGER.cut-N``; the ledger keeps the
    complete lines before it."""
    n = 1
    while path.with_name(f"{path.name}.cut-{n}").exists():
        n += 1
    kept = path.with_name(f"{path.name}.cut-{n}")
    kept.write_text(tail, encoding="utf-8")
    with atomic_output(str(path)) as f:
        f.write("".join(line + "\n" for line in lines))
    print(f"bench_learning: {path} ended in an incomplete line (a run killed while writing it); "
          f"it is kept in {kept} and its arm is measured again", flush=True)


def read_ledger(path: Path) -> list[dict]:
    """The ledger's rows (none when it does not exist yet).

    A last line without its newline is kept when it is a whole row (an editor may drop the
    final newline; the newline is added back) and cut off into ``LEDGER.cut-N`` otherwise. Any
    other line that is not a row (a JSON object with ``REQUIRED_KEYS``) is an error naming the
    file and line. Duplicate rows (the same model, length, seed, settings and arm measured
    twice, e.g. from two merged ledgers) are reported; the first is used."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    if tail.strip():
        try:
            json.loads(tail)
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
        except json.JSONDecodeError:
            _cut_tail(path, tail, lines)

    def not_json(number, exc):
        return SystemExit(f"bench_learning: {path} line {number} is not JSON ({exc}); fix or "
                          f"remove that line (the rest of the ledger is kept)")
    rows, seen, duplicates = [], set(), []
    for number, row in read_jsonl_strict(path, not_json):
        missing = ([k for k in REQUIRED_KEYS if k not in row] if isinstance(row, dict)
                   else list(REQUIRED_KEYS))
        if missing:
            raise SystemExit(f"bench_learning: {path} line {number} is not a result row (no "
                             f"{', '.join(missing)}); rows are written by bench_learning.py. Fix "
                             f"or remove that line (the rest of the ledger is kept)")
        key = row_key(row)
        if key in seen:
            duplicates.append(number)
            continue
        seen.add(key)
        rows.append(row)
    if duplicates:
        print(f"bench_learning: {path} line{'s' if len(duplicates) > 1 else ''} "
              f"{', '.join(map(str, duplicates))}: a (model, length, seed, settings, arm) that an "
              f"earlier line already measured; the earlier line is used", flush=True)
    return rows


def row_key(row: dict) -> tuple:
    """What identifies a measurement: model, long length, seed, settings fingerprint, arm."""
    return tuple(row.get(k) for k in ("model", "length", "seed", "settings_id", "name"))


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!benchmarks/results"],  # the ledger itself changes
                               cwd=REPO, text=True, capture_output=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    """Where and with what a row was measured."""
    def pkg(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {"date": time.strftime("%Y-%m-%d"), "commit": _git_commit(),
            "python": platform.python_version(), "torch": pkg("torch"),
            "megatron_core": pkg("megatron-core"), "transformers": pkg("transformers"),
            "cores": os.cpu_count(), "machine": platform.machine()}


def append_row(path: Path, row: dict) -> dict:
    """Append one complete row (with its environment) and make it durable before returning."""
    row = {**row, "environment": environment()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return row


def _cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}{spread} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def _pick(group: list[dict], *path) -> list[float]:
    values = []
    for row in group:
        node = row
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (int, float)):
            values.append(float(node))
    return values


def _order(name: str) -> tuple:
    return (ARM_ORDER.index(name) if name in ARM_ORDER else len(ARM_ORDER), name)


def groups(rows: list[dict]) -> dict:
    """``{(model, settings_id, length): {name: [rows, by seed]}}``."""
    out: dict = {}
    for row in rows:
        key = (row.get("model", "tiny"), row.get("settings_id", "-"), row["length"])
        out.setdefault(key, {}).setdefault(row["name"], []).append(row)
    for arms in out.values():
        for name in arms:
            arms[name].sort(key=lambda r: r["seed"])
    return out


def summarize(rows: list[dict], ledger: Path) -> str:
    """Mean ± sd over seeds (per-seed values in brackets; one seed: its value) per model,
    settings, length and arm, written to ``ledger``'s ``.md``; one plot per model beside it."""
    lines = ["| model | settings | long tokens | arm | seeds | pairwise short | pairwise long | "
             "answer short | answer long | grid long | train wall s | step s | peak RSS GiB |",
             "|" + "---|" * 13]
    grouped = groups(rows)
    for (model, sid, length), arms in sorted(grouped.items()):
        for name in sorted(arms, key=_order):
            group = arms[name]
            lines.append(
                f"| {model} | {sid} | {length} | {name} | "
                f"{','.join(str(r['seed']) for r in group)} | "
                f"{_cell(_pick(group, 'pairwise', 'short', 'value'))} | "
                f"{_cell(_pick(group, 'pairwise', 'long', 'value'))} | "
                f"{_cell(_pick(group, 'answer', 'short', 'value'))} | "
                f"{_cell(_pick(group, 'answer', 'long', 'value'))} | "
                f"{_cell(_pick(group, 'answer', 'grid_long', 'value'))} | "
                f"{_cell(_pick(group, 'train_wall_sec'), 0)} | "
                f"{_cell(_pick(group, 'median_step_sec'))} | "
                f"{_cell(_pick(group, 'peak_rss_gib'))} |")
    text = "\n".join(lines) + "\n"
    ledger.with_suffix(".md").write_text(text, encoding="utf-8")
    for model in sorted({key[0] for key in grouped}):
        plot(grouped, model, ledger.with_name(f"{ledger.stem}_{model}.png"))
    return text


def plot(grouped: dict, model: str, path: Path) -> None:
    """Answer accuracy (short, long, and long on the depth x length grid) per arm: the mean over
    seeds as a bar, each seed a dot; one panel per (settings, length) of ``model``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, arms) for key, arms in sorted(grouped.items()) if key[0] == model]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.0 + 4.2 * len(panels), 3.8),
                             squeeze=False)
    for ax, ((_, sid, length), arms) in zip(axes[0], panels):
        names = sorted(arms, key=_order)
        kinds = (("short", "tab:blue", "answer short"), ("long", "tab:orange", "answer long"),
                 ("grid_long", "tab:green", "grid long"))
        kinds = [kind for kind in kinds
                 if any(_pick(arms[n], "answer", kind[0], "value") for n in names)]
        width = 0.8 / len(kinds)
        for k, (ctx, colour, label) in enumerate(kinds):
            x = [i + (k - (len(kinds) - 1) / 2) * width for i in range(len(names))]
            seeds = [_pick(arms[n], "answer", ctx, "value") for n in names]
            ax.bar(x, [statistics.mean(v) if v else float("nan") for v in seeds], width,
                   color=colour, alpha=0.55, label=label)
            for xi, values in zip(x, seeds):
                ax.plot([xi] * len(values), values, "o", color=colour, markersize=3.5,
                        markeredgecolor="black", markeredgewidth=0.4)
        num_seeds = max(len(v) for v in arms.values())
        ax.set_xticks(range(len(names)), [n.replace("orpo-", "") for n in names], rotation=20)
        ax.set_ylim(0, 1.18)
        seeds = f"{num_seeds} seed" + ("s" if num_seeds != 1 else "")
        ax.set_title(f"{model}, long {length} tokens\n(settings {sid}, up to {seeds})",
                     fontsize=9)
        ax.set_ylabel("greedy sub-EM accuracy (held out)")
    axes[0][0].legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
