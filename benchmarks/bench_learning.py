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
measurement, not a test: it assumes no outcome. Each (length, seed) folder under OUT records
the settings it was made with (settings.json) and a rerun with other settings is refused there.

Results go to a ledger that is committed with the project (--results, default
benchmarks/results/learning.jsonl: one line per measured model, keyed by model, length, seed,
settings fingerprint and arm) so that runs in different sessions and on different checkouts add
up: a rerun skips every row the ledger holds and measures only the rest (OUT, the work folder with
data and checkpoints, may be gone). Beside the ledger: learning.md (mean ± sd over seeds, per
seed in brackets) and learning_<model>.png (answer accuracy per arm, a dot per seed). An arm
interrupted mid-run (killed, out of time) leaves its folder without a ledger row; the rerun
moves that folder and its answers aside (NAME.interrupted-N, nothing deleted) and measures the
arm again from the shared initialisation.

    python benchmarks/bench_learning.py --out runs/bench_learning \\
        --lengths 1024,2048 --seeds 0,1,2 --steps 300 --algorithm orpo

``--model smollm2-135m`` runs the comparison on the pretrained SmolLM2-135M-Instruct (fetched
and imported once, examples/fetch_pretrained.py) with the pretrained demo's task and settings
(solopo_mcore/evaluation/pretrained_demo.py: varied relations, sentence pairs and instruction,
2 processes, its lr and steps); every arm, and the base model, also gets the demo's depth x
length grid:

    python benchmarks/bench_learning.py --model smollm2-135m --out runs/bench_smollm2 \\
        --lengths 512,1024 --seeds 0,1,2 --arms solo,long/unshared,short,long/shared
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.learning_ledger import append_row, read_ledger, summarize  # noqa: E402
from data_tools.common import write_json  # noqa: E402
from data_tools.learnable_qa import (pipeline_commands,  # noqa: E402
                                     pretrained_pipeline_commands)
from solopo_mcore.config import load_config  # noqa: E402
from solopo_mcore.evaluation.learning import (answer_accuracy, evaluate_command,  # noqa: E402
                                              pairwise_series, wilson_interval, write_heldout)
from solopo_mcore.training.curves import read_metrics  # noqa: E402

RECIPE = "examples/recipes/tiny_cpu_qa.yaml"


@dataclass(frozen=True)
class Setup:
    """What differs between the from-scratch comparison and the pretrained one."""
    recipe: str
    num_processes: int
    overrides: tuple
    max_new_tokens: int
    base_name: str
    """The name the initial model's answers are recorded under."""
    hf_dir: Optional[Path] = None
    """The pretrained model's HF folder (None: each dataset builds its own random model)."""
    grid: tuple = ()
    """evaluate_qa --grid arguments (empty: no grid)."""


def make_setup(model: str, steps: int) -> Setup:
    if model == "tiny":
        return Setup(RECIPE, 1, ("parallel.tensor_model_parallel_size=1",), 32, "untrained")
    from solopo_mcore.convert.pretrained import fetch_pretrained
    from solopo_mcore.evaluation.pretrained_demo import DEMO

    overrides = [o for o in DEMO.training_overrides() if not o.startswith("training.train_steps")
                 and not o.startswith("checkpoint.save_interval")]
    return Setup(DEMO.recipe, 2, (*overrides, f"training.eval_interval={steps}"),
                 DEMO.max_new_tokens, "base", Path(fetch_pretrained(DEMO.model)),
                 tuple(DEMO.grid_arguments()))
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


def hf_init(setup: Setup, root: Path) -> Path:
    return setup.hf_dir or root / "model" / "hf_init"


def evaluate(setup: Setup, root: Path, name: str, checkpoint: Path, log: Path) -> dict:
    """Greedy answers on the held-out rows (and the grid): ``{"short", "long"[, "grid_long"]}``
    accuracy, each ``{"value", "ci95", "n"}``."""
    heldout = root / "data" / "heldout.jsonl"
    run(evaluate_command(sys.executable, heldout, root / "answers", {name: checkpoint},
                         setup.max_new_tokens), log)
    answer = answer_accuracy(str(root / "answers"), name)
    if setup.grid:
        run([*evaluate_command(sys.executable, heldout, root / "grid", {name: checkpoint},
                               setup.max_new_tokens), *setup.grid], log)
        answer["grid_long"] = answer_accuracy(str(root / "grid"), name)["long"]
    return answer


def measure_arm(args, setup: Setup, root: Path, arm: str, seed: int, num_eval: int) -> dict:
    """Train one arm from the shared initialisation and measure it."""
    name = f"{args.algorithm}-{arm.replace('/', '-')}"
    folder = root / name
    data, model = root / "data", root / "model"
    set_aside([root / name, root / f"{name}.log", root / "answers" / name, root / "grid" / name],
              f"{root.parent.name}/{root.name}/{name}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={setup.num_processes}"]
    common = ["--config", setup.recipe, f"model.hf_config_path={hf_init(setup, root)}",
              f"data.data_path={data / 'qa'}", f"objective.algorithm={args.algorithm}",
              *setup.overrides, f"training.seed={seed}", *arm_overrides(arm)]
    if args.algorithm == "dpo":
        common += [f"data.ref_logprobs_path={data / 'qa.ref'}"]
    seconds = run([*torchrun, "examples/pretrain_solopo.py", *common,
                   f"checkpoint.load_dir={model / 'mcore_init'}",
                   f"checkpoint.save_dir={folder / 'checkpoints'}",
                   f"checkpoint.export_hf_dir={folder / 'hf'}",
                   f"training.train_steps={args.steps}", "checkpoint.save_interval=0",
                   f"logging.metrics_path={folder / 'metrics.jsonl'}"], folder.with_suffix(".log"))
    answer = evaluate(setup, root, name, folder / "hf", folder.with_suffix(".log"))
    records = read_metrics(str(folder / "metrics.jsonl"))
    steps = [r["time/step_sec"] for r in records.values() if "time/step_sec" in r]
    rss = [r["memory/max_rss_gib"] for r in records.values() if "memory/max_rss_gib" in r]
    pairwise = {ctx: points[-1][1] for ctx, points in
                pairwise_series(str(folder / "metrics.jsonl")).items() if points}
    return {"arm": arm, "algorithm": args.algorithm, "name": name,
            "pairwise": {ctx: {"value": v, "ci95": list(wilson_interval(v, num_eval))}
                         for ctx, v in pairwise.items()},
            "answer": answer,
            "train_wall_sec": round(seconds, 1),
            "median_step_sec": round(statistics.median(steps), 4) if steps else None,
            "peak_rss_gib": round(max(rss), 3) if rss else None}


def set_aside(paths: list, what: str) -> None:
    """Move what an interrupted step left (``paths`` that exist) to ``NAME.interrupted-N``
    beside them: nothing is deleted, and the step's rerun starts clean (its checkpoints,
    metrics and answers are only its own; the pipeline's tools refuse to overwrite)."""
    leftovers = [p for p in paths if p.exists()]
    if not leftovers:
        return
    n = 1
    while any(p.with_name(f"{p.name}.interrupted-{n}").exists() for p in leftovers):
        n += 1
    for p in leftovers:
        p.rename(p.with_name(f"{p.name}.interrupted-{n}"))
    print(f"bench_learning: {what} has files but no result (interrupted, or recorded in another "
          f"ledger); they are kept as *.interrupted-{n} and it runs again", flush=True)


def prepare(args, setup: Setup, root: Path, length: int, seed: int, num_eval: int) -> None:
    """Data and initialisation for one (length, seed), and its held-out rows."""
    log = root / "prepare.log"
    if not (root / "model" / "mcore_init" / "latest").is_file():
        set_aside([root / "data", root / "model", log],
                  f"{root.parent.name}/{root.name}: data preparation")
        if setup.hf_dir is None:
            commands = pipeline_commands(sys.executable, root, args.examples, length, seed=seed,
                                         model_seed=seed)
        else:
            from solopo_mcore.evaluation.pretrained_demo import DEMO
            commands = pretrained_pipeline_commands(
                sys.executable, root, setup.hf_dir, args.examples, length, DEMO.num_distractors,
                DEMO.num_same_relation, DEMO.rule_style, DEMO.instruction, seed=seed)
        for command in commands:
            run(command, log)
    data = root / "data"
    write_heldout(str(data / "triplets.jsonl"), str(data / "qa"), num_eval, data / "heldout.jsonl")
    if args.algorithm == "dpo" and not (data / "qa.ref.npy").is_file():
        run([sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc-per-node={setup.num_processes}", "examples/precompute_ref_logprobs.py",
             "--config", setup.recipe, f"model.hf_config_path={hf_init(setup, root)}",
             f"data.data_path={data / 'qa'}", "objective.algorithm=dpo", *setup.overrides,
             f"checkpoint.load_dir={root / 'model' / 'mcore_init'}", "--output", data / "qa.ref"],
            log)


def hold_lock(ledger: Path):
    """An exclusive lock beside the ledger for this run: two runs appending to one ledger at
    once would measure the same arms twice (and share 2 cores)."""
    import fcntl

    ledger.parent.mkdir(parents=True, exist_ok=True)
    handle = open(ledger.with_name(ledger.name + ".lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"bench_learning: another bench_learning run is using {ledger} (it "
                         f"holds {handle.name}); wait for it to finish, or give this run its own "
                         f"--results")
    return handle


def run_settings(args, setup: Setup) -> dict:
    """What a (length, seed) folder's results depend on, besides its length and seed."""
    settings = {"model": args.model, "examples": args.examples, "steps": args.steps,
                "algorithm": args.algorithm, "recipe": setup.recipe,
                "overrides": list(setup.overrides), "max_new_tokens": setup.max_new_tokens,
                "grid": list(setup.grid)}
    if args.model != "tiny":
        from solopo_mcore.evaluation.pretrained_demo import DEMO
        settings["task"] = {k: getattr(DEMO, k) for k in
                            ("num_distractors", "num_same_relation", "rule_style",
                             "instruction")}
    return settings


def settings_id(settings: dict) -> str:
    """A short fingerprint of ``settings``, kept in each result row."""
    import hashlib
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def check_settings(root: Path, settings: dict) -> None:
    """Record ``settings`` in a new ``root``; refuse a ``root`` made with other settings (its
    data and rows would be mixed with this run's)."""
    path = root / "settings.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        changed = sorted(k for k in {*recorded, *settings} if recorded.get(k) != settings.get(k))
        if changed:
            raise SystemExit(
                f"bench_learning: {root} was made with other settings ({', '.join(changed)}: "
                f"{path} has {', '.join(f'{k}={recorded.get(k)!r}' for k in changed)}, this run "
                f"{', '.join(f'{k}={settings.get(k)!r}' for k in changed)}); its data and "
                f"results are not this run's. Use a new --out, or the settings it was made with")
    elif root.exists() and any(root.iterdir()):
        raise SystemExit(f"bench_learning: {root} holds files but no settings.json (made before "
                         f"settings were recorded, or not by this script): its settings are "
                         f"unknown. Use a new --out")
    else:
        root.mkdir(parents=True, exist_ok=True)
        write_json(str(path), settings)  # atomic: a killed write leaves no half file


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_learning",
                        help="work folder: data, checkpoints, answers (resumable; a relative "
                             "path is taken from the repository root)")
    parser.add_argument("--results", default="benchmarks/results/learning.jsonl",
                        help="the ledger of measured rows, committed with the project: a rerun "
                             "measures only what it lacks; learning.md and learning_MODEL.png "
                             "are rewritten beside it after every row (a relative path is taken "
                             "from the repository root)")
    parser.add_argument("--summarize", action="store_true",
                        help="only rewrite the table and plots from the ledger, run nothing")
    parser.add_argument("--lengths", default="1024,2048", type=_int_list,
                        help="long-context lengths in tokens (user message), comma-separated")
    parser.add_argument("--seeds", default="0,1,2", type=_int_list,
                        help="seeds: data, initialisation, order")
    parser.add_argument("--model", default="tiny", choices=["tiny", "smollm2-135m"],
                        help="tiny: random initialisation on the one-relation task (default); "
                             "smollm2-135m: the pretrained model, the pretrained demo's task and "
                             "settings, 2 processes")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per arm (default: 300 tiny, the pretrained "
                             "demo's for smollm2-135m)")
    parser.add_argument("--examples", type=int, default=None,
                        help="examples per dataset (default: 1024 tiny, the pretrained demo's "
                             "for smollm2-135m)")
    parser.add_argument("--algorithm", default="orpo", choices=["orpo", "dpo", "simpo"])
    parser.add_argument("--arms", default="solo,long/unshared,long/shared",
                        help="MODE[/shared|/unshared], comma-separated")
    args = parser.parse_args(argv)
    results_path = (REPO / args.results).resolve()
    if args.summarize:
        print(summarize(read_ledger(results_path), results_path))
        return
    modes = ("solo", "solo_both", "short", "long")
    arms = args.arms.split(",")
    if len(set(arms)) != len(arms):
        parser.error(f"--arms: {args.arms!r} names an arm twice; name each once")
    for name in ("steps", "examples"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive (leave it out for the default)")
    for arm in arms:  # refuse a typo before minutes of data preparation
        mode, _, sharing = arm.partition("/")
        if mode not in modes or sharing not in ("", "shared", "unshared"):
            parser.error(f"--arms: {arm!r} is not MODE[/shared|/unshared] with MODE one of "
                         f"{', '.join(modes)}")
    from solopo_mcore.evaluation.pretrained_demo import DEMO

    pretrained = args.model != "tiny"
    args.steps = args.steps or (DEMO.train_steps if pretrained else 300)
    args.examples = args.examples or (DEMO.num_examples if pretrained else 1024)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    setup = make_setup(args.model, args.steps)
    num_eval = (DEMO.num_eval_examples if pretrained
                else load_config(str(REPO / RECIPE)).data.num_eval_examples)
    settings = run_settings(args, setup)
    args.ledger_lock = hold_lock(results_path)  # held until the process exits
    done = read_ledger(results_path)
    command = " ".join(["python", "benchmarks/bench_learning.py", *sys.argv[1:]])
    for length in args.lengths:
        for seed in args.seeds:
            model_dir = "" if args.model == "tiny" else f"{args.model}_"
            root = out / f"{model_dir}long{length}_examples{args.examples}" / f"seed{seed}"
            base = {"length": length, "seed": seed, "steps": args.steps,
                    "examples": args.examples, "model": args.model,
                    "settings_id": settings_id(settings)}
            recorded = {r["name"] for r in done if all(r.get(k) == v for k, v in base.items())}
            names = [f"{args.algorithm}-{arm.replace('/', '-')}" for arm in arms]
            base.update(settings=settings, command=command)
            if setup.base_name in recorded and recorded.issuperset(names):
                print(f"bench_learning: long {length} seed {seed}: every arm is in {results_path}",
                      flush=True)
                continue
            check_settings(root, settings)
            prepare(args, setup, root, length, seed, num_eval)
            if setup.base_name not in recorded:
                initial = evaluate(setup, root, setup.base_name, hf_init(setup, root),
                                   root / "prepare.log")
                done.append(append_row(results_path, {**base, "name": setup.base_name,
                                                      "arm": setup.base_name, "answer": initial}))
                summarize(done, results_path)
            for arm, name in zip(arms, names):
                if name in recorded:
                    continue
                row = append_row(results_path,
                                 {**base, **measure_arm(args, setup, root, arm, seed, num_eval)})
                done.append(row)
                summarize(done, results_path)
                print(f"bench_learning: long {length} seed {seed} {name}: "
                      f"pairwise long {row['pairwise'].get('long', {}).get('value')}, answer "
                      f"long {row['answer']['long']['value']}, {row['train_wall_sec']} s",
                      flush=True)
    print(summarize(done, results_path))

if __name__ == "__main__":
    main()
