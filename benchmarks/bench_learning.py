"""SoLoPO against long-PO on the learnable QA task: the paper's comparison at CPU scale.

For every (long length, seed): one dataset (data_tools.learnable_qa through the real pipeline)
and one random initialisation, shared by every arm; then each arm trains the same number of
optimizer steps on the same example order from that initialisation (1 process, fp32), and is
measured on the same held-out examples:

  * pairwise accuracy, short and long (the trainer's eval: chosen reward > rejected), with a
    95 % Wilson interval;
  * greedy answer accuracy, short and long (examples/evaluate_qa.py, sub-EM), with its 95 %
    bootstrap interval; the untrained initialisation is measured too;
  * wall time of the training command, median step time, and peak memory (max RSS of the
    training process, from its metrics).

Arms are ``MODE[/shared|/unshared]`` as in examples/profile_solopo.py: ``solo`` (SoLoPO),
``long/unshared`` (vanilla long-PO, the paper's baseline: the long context run for each answer)
and ``long/shared`` (long-PO with one pass over the long context for both answers). This is a
measurement, not a test: it assumes no outcome. Results go to OUT/results.jsonl (one line per
arm run; a rerun skips what is there) and OUT/summary.md.

    python benchmarks/bench_learning.py --out runs/bench_learning \\
        --lengths 1024,2048 --seeds 0,1,2 --steps 300 --algorithm orpo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_tools.learnable_qa import pipeline_commands  # noqa: E402
from solopo_mcore.config import load_config  # noqa: E402
from solopo_mcore.evaluation.learning import (answer_accuracy, evaluate_command,  # noqa: E402
                                              pairwise_series, wilson_interval, write_heldout)
from solopo_mcore.training.curves import read_metrics  # noqa: E402

RECIPE = "examples/recipes/tiny_cpu_qa.yaml"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}


def run(command: list, log_path: Path) -> float:
    """Run one command with its output in ``log_path``; its wall time in seconds."""
    start = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("\n$ " + " ".join(map(str, command)) + "\n")
        log.flush()
        result = subprocess.run([str(c) for c in command], cwd=REPO, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"bench_learning: `{' '.join(map(str, command[:4]))} ...` failed "
                         f"(exit {result.returncode}); see {log_path}")
    return time.time() - start


def arm_overrides(arm: str) -> list[str]:
    mode, _, sharing = arm.partition("/")
    out = [f"objective.mode={mode}"]
    if sharing:
        out.append(f"data.shared_prefix={'true' if sharing == 'shared' else 'false'}")
    return out


def measure_arm(args, root: Path, arm: str, seed: int, num_eval: int) -> dict:
    """Train one arm from the shared initialisation and measure it."""
    name = f"{args.algorithm}-{arm.replace('/', '-')}"
    folder = root / name
    data, model = root / "data", root / "model"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=1"]
    common = ["--config", RECIPE, f"model.hf_config_path={model / 'hf_init'}",
              f"data.data_path={data / 'qa'}", f"objective.algorithm={args.algorithm}",
              "parallel.tensor_model_parallel_size=1", f"training.seed={seed}",
              *arm_overrides(arm)]
    if args.algorithm == "dpo":
        common += [f"data.ref_logprobs_path={data / 'qa.ref'}"]
    seconds = run([*torchrun, "examples/pretrain_solopo.py", *common,
                   f"checkpoint.load_dir={model / 'mcore_init'}",
                   f"checkpoint.save_dir={folder / 'checkpoints'}",
                   f"checkpoint.export_hf_dir={folder / 'hf'}",
                   f"training.train_steps={args.steps}", "checkpoint.save_interval=0",
                   f"logging.metrics_path={folder / 'metrics.jsonl'}"], folder.with_suffix(".log"))
    run(evaluate_command(sys.executable, data / "heldout.jsonl", root / "answers",
                         {name: folder / "hf"}), folder.with_suffix(".log"))
    records = read_metrics(str(folder / "metrics.jsonl"))
    steps = [r["time/step_sec"] for r in records.values() if "time/step_sec" in r]
    rss = [r["memory/max_rss_gib"] for r in records.values() if "memory/max_rss_gib" in r]
    pairwise = {ctx: points[-1][1] for ctx, points in
                pairwise_series(str(folder / "metrics.jsonl")).items() if points}
    return {"arm": arm, "algorithm": args.algorithm, "name": name,
            "pairwise": {ctx: {"value": v, "ci95": list(wilson_interval(v, num_eval))}
                         for ctx, v in pairwise.items()},
            "answer": answer_accuracy(str(root / "answers"), name),
            "train_wall_sec": round(seconds, 1),
            "median_step_sec": round(statistics.median(steps), 4) if steps else None,
            "peak_rss_gib": round(max(rss), 3) if rss else None}


def prepare(args, root: Path, length: int, seed: int, num_eval: int) -> dict:
    """Data and initialisation for one (length, seed), and the untrained model's accuracy."""
    log = root / "prepare.log"
    if not (root / "model" / "mcore_init" / "latest").is_file():
        root.mkdir(parents=True, exist_ok=True)
        for command in pipeline_commands(sys.executable, root, args.examples, length, seed=seed,
                                         model_seed=seed):
            run(command, log)
    data = root / "data"
    write_heldout(str(data / "triplets.jsonl"), str(data / "qa"), num_eval, data / "heldout.jsonl")
    if args.algorithm == "dpo" and not (data / "qa.ref.npy").is_file():
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
             "examples/precompute_ref_logprobs.py", "--config", RECIPE,
             f"model.hf_config_path={root / 'model' / 'hf_init'}", f"data.data_path={data / 'qa'}",
             "objective.algorithm=dpo", "parallel.tensor_model_parallel_size=1",
             f"checkpoint.load_dir={root / 'model' / 'mcore_init'}", "--output", data / "qa.ref"],
            log)
    run(evaluate_command(sys.executable, data / "heldout.jsonl", root / "answers",
                         {"untrained": root / "model" / "hf_init"}), log)
    return answer_accuracy(str(root / "answers"), "untrained")


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{mean:.2f}{spread} ({', '.join(f'{v:.2f}' for v in values)})"


def summarize(rows: list[dict], out: Path) -> str:
    """Mean ± sd over seeds (per-seed values in brackets), per length and arm."""
    lines = ["| long tokens | arm | pairwise short | pairwise long | answer short | answer long "
             "| train wall s | step s | peak RSS GiB |", "|" + "---|" * 9]
    keys = sorted({(r["length"], r["name"]) for r in rows})
    for length, name in keys:
        group = [r for r in rows if r["length"] == length and r["name"] == name]

        def pick(*path):
            values = []
            for r in group:
                node = r
                for p in path:
                    node = node.get(p) if isinstance(node, dict) else None
                if isinstance(node, (int, float)):
                    values.append(float(node))
            return values
        lines.append(
            f"| {length} | {name} | {_cell(pick('pairwise', 'short', 'value'))} | "
            f"{_cell(pick('pairwise', 'long', 'value'))} | "
            f"{_cell(pick('answer', 'short', 'value'))} | {_cell(pick('answer', 'long', 'value'))}"
            f" | {_cell(pick('train_wall_sec'))} | {_cell(pick('median_step_sec'))} | "
            f"{_cell(pick('peak_rss_gib'))} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_learning", help="output folder (resumable)")
    parser.add_argument("--lengths", default="1024,2048", type=_int_list,
                        help="long-context lengths in tokens (user message), comma-separated")
    parser.add_argument("--seeds", default="0,1,2", type=_int_list,
                        help="seeds: data, initialisation, order")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per arm")
    parser.add_argument("--examples", type=int, default=1024, help="examples per dataset")
    parser.add_argument("--algorithm", default="orpo", choices=["orpo", "dpo", "simpo"])
    parser.add_argument("--arms", default="solo,long/unshared,long/shared",
                        help="MODE[/shared|/unshared], comma-separated")
    args = parser.parse_args(argv)
    modes = ("solo", "solo_both", "short", "long")
    for arm in args.arms.split(","):  # refuse a typo before minutes of data preparation
        mode, _, sharing = arm.partition("/")
        if mode not in modes or sharing not in ("", "shared", "unshared"):
            parser.error(f"--arms: {arm!r} is not MODE[/shared|/unshared] with MODE one of "
                         f"{', '.join(modes)}")
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    num_eval = load_config(str(REPO / RECIPE)).data.num_eval_examples
    results_path = out / "results.jsonl"
    done = [json.loads(line) for line in open(results_path)] if results_path.is_file() else []
    for length in args.lengths:
        for seed in args.seeds:
            root = out / f"long{length}_examples{args.examples}" / f"seed{seed}"
            untrained = prepare(args, root, length, seed, num_eval)
            base = {"length": length, "seed": seed, "steps": args.steps,
                    "examples": args.examples}
            if not any(r["name"] == "untrained" and r["length"] == length and r["seed"] == seed
                       and r.get("examples") == args.examples for r in done):
                done.append({**base, "name": "untrained", "arm": "untrained",
                             "answer": untrained})
                with open(results_path, "a") as f:
                    f.write(json.dumps(done[-1]) + "\n")
            for arm in args.arms.split(","):
                name = f"{args.algorithm}-{arm.replace('/', '-')}"
                if any(r["name"] == name and r["length"] == length and r["seed"] == seed
                       and r["steps"] == args.steps and r.get("examples") == args.examples
                       for r in done):
                    continue
                row = {**base, **measure_arm(args, root, arm, seed, num_eval)}
                done.append(row)
                with open(results_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"bench_learning: long {length} seed {seed} {name}: "
                      f"pairwise long {row['pairwise'].get('long', {}).get('value')}, answer "
                      f"long {row['answer']['long']['value']}, {row['train_wall_sec']} s",
                      flush=True)
    print(summarize(done, out))


if __name__ == "__main__":
    main()
