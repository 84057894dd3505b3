"""Side by side with Hugging Face TRL: the same model, data, objective, optimizer and threads.

    pip install -e ".[compare]"              # TRL, pinned (benchmarks/vs_trl/conventions.py)
    python benchmarks/bench_vs_trl.py        # check, then time; about an hour on 2 CPU cores
    python benchmarks/bench_vs_trl.py --check-only

1. **Inputs** (benchmarks/vs_trl/inputs.py): per shape and long-context length, one random HF
   model and one dataset built by data_tools from the same ``pairs.jsonl``; TRL reads the rows
   as text with the chat template applied to the prompt, we read the indexed dataset.
2. **Check** (before any timing, on every shape at the shortest length; a failure stops the
   benchmark): for DPO, SimPO and ORPO on
   ``mode=long``, TRL's own tokenization must give exactly our token ids (prompt, chosen +
   EOS, rejected + EOS), and the losses and log-probs of the first ``--check-steps`` steps
   must agree. Where the conventions differ (ORPO's NLL term, conventions.py) TRL's loss is
   restated in ours from its own logged figures, and TRL's ORPO trainer optimises our NLL term
   (worker.py) so that later steps compare the same objective; the table shows TRL's loss as
   shipped too. DPO's first loss is log 2 on both sides whatever the inputs (policy =
   reference): its log-prob sums and later steps (after identical AdamW updates) are what tell.
3. **Timing**, interleaved: each round runs TRL long-PO, our long-PO without and with shared
   prefixes, and our SoLoPO, one process each (the order reversed every other round), at each
   shape and length. Each process runs ``--warmup`` untimed and ``--steps`` timed steps; a step
   is timed from the previous step's end to its own (data, forward, backward, optimizer,
   logging). Peak RSS is the process's own maximum resident set; a run whose process tree goes
   over ``--memory-limit-gib`` is stopped and reported as such. After every TRL run, the token
   ids it trained on are compared with ours again; a difference stops the benchmark.

Writes ``OUT/results.json`` and ``OUT/summary.md`` (the tables of benchmarks/RESULTS.md).
A benchmark, not a test: the figures go into RESULTS.md with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.vs_trl.conventions import TRL_VERSION, Hyper, our_overrides, trl_losses  # noqa: E402
from benchmarks.vs_trl.inputs import SHAPES, build_inputs, output_layer_share  # noqa: E402
from benchmarks.vs_trl.report import (TRL_CHECKPOINTED, TRL_PLAIN, summarize,  # noqa: E402
                                      write_summary)
from solopo_mcore.config.sections import ObjectiveConfig  # noqa: E402
from solopo_mcore.processes import parent_death_preexec  # noqa: E402

#: Hyperparameters of the check, per algorithm (SimPO's beta as in its paper's range).
CHECK_HYPER = {"dpo": Hyper(ObjectiveConfig("dpo", beta=0.1)),
               "simpo": Hyper(ObjectiveConfig("simpo", beta=2.0, gamma=0.5)),
               "orpo": Hyper(ObjectiveConfig("orpo", orpo_lambda=0.1))}

#: Other processes using more than this many cores during a run make its timing suspect.
OTHER_LOAD_WARNING_CORES = 0.2

#: Timed variants: (label, side, mode, shared_prefix, recompute). ``recompute``: TRL's gradient
#: checkpointing (on by default in TRL 1.16's DPO/CPO/ORPO configs) or ours
#: ``model.recompute_granularity=full`` (each layer rebuilt in backward, as HF's checkpointing
#: does); each row's "TRL ÷ this" ratios are against the TRL row with the same setting.
VARIANTS = [(TRL_CHECKPOINTED, "trl", "long", False, True),
            (TRL_PLAIN, "trl", "long", False, False),
            ("ours long-PO, unshared", "ours", "long", False, False),
            ("ours long-PO, unshared, full recompute", "ours", "long", False, True),
            ("ours long-PO, shared prefix", "ours", "long", True, False),
            ("ours SoLoPO", "ours", "solo", True, False)]


def log(message: str) -> None:
    print(f"[bench_vs_trl] {message}", flush=True)


def _ints(text: str) -> list:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_vs_trl", help="output folder (inputs are "
                   "built once under OUT/inputs and reused)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--lengths", default="1024,2048,4096",
                   help="long-context lengths in tokens")
    p.add_argument("--algorithm", default="orpo", choices=["dpo", "simpo", "orpo"],
                   help="the algorithm timed (all three are checked)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    p.add_argument("--check-steps", type=int, default=3, help="steps compared in the check")
    p.add_argument("--check-shapes", default=None,
                   help="shapes checked, at the shortest length (default: every --shapes)")
    p.add_argument("--check-tolerance", type=float, default=1e-4,
                   help="largest relative loss difference allowed in the check")
    p.add_argument("--check-only", action="store_true", help="check, do not time")
    p.add_argument("--skip-check", action="store_true", help="time without checking (the "
                   "timings then say nothing about whether both computed the same thing)")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="stop a run whose processes exceed this resident memory (default: 85%% "
                        "of this machine's memory)")
    args = p.parse_args(argv)
    for name, least in (("steps", 1), ("warmup", 0), ("rounds", 1), ("threads", 1),
                        ("check_steps", 1)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}")
    try:
        args.lengths = lengths = _ints(args.lengths)
    except ValueError:
        p.error(f"--lengths {args.lengths!r}: expected comma-separated token counts, e.g. 1024,2048")
    if not lengths or min(lengths) < 256:
        p.error(f"--lengths {args.lengths!r}: each long context needs at least 256 tokens (the "
                f"task's question and evidence alone take about 100)")
    if args.check_only and args.skip_check:
        p.error("--check-only and --skip-check together leave nothing to run")
    return args


def require_trl() -> str:
    try:
        import trl
    except ImportError:
        raise SystemExit("bench_vs_trl: TRL is not installed; install the pinned version with "
                         "`pip install -e \".[compare]\"` (from the repository root)") from None
    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"bench_vs_trl: TRL {trl.__version__} is installed; the convention "
                         f"mapping (benchmarks/vs_trl/conventions.py) was checked against "
                         f"{TRL_VERSION}: `pip install -e \".[compare]\"` installs it")
    return trl.__version__


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(side: str, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if side == "ours":  # one process, world size 1 (what torchrun --nproc-per-node 1 sets)
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return env


def _tree_rss_gib(proc) -> float:
    import psutil
    try:
        parent = psutil.Process(proc.pid)
        return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / 2**30
    except psutil.Error:
        return 0.0


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every process, every core)."""
    import psutil
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def run_process(args: list, env: dict, memory_limit_gib: float, log_path: Path) -> dict:
    """Run one process, stopping it above ``memory_limit_gib``; ``{"ok", "error",
    "other_load_cores"}``: the CPU the rest of the machine used meanwhile, in cores (a run
    that shared its cores with other work has timings that do not compare)."""
    import resource
    busy0, start = _busy_cpu_seconds(), time.perf_counter()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=parent_death_preexec())  # ends with the benchmark
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_gib(proc))
            if peak > memory_limit_gib:
                proc.kill()
                proc.wait()
                return {"ok": False, "error": f"stopped above --memory-limit-gib "
                                              f"{memory_limit_gib:.1f} GiB", "oom": True}
            time.sleep(0.25)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    other = max(0.0, (_busy_cpu_seconds() - busy0 - own) / (time.perf_counter() - start))
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        return {"ok": False, "error": f"exit {proc.returncode}; {log_path}:\n{tail}"}
    return {"ok": True, "other_load_cores": other}


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        if self.out.exists() and not self.out.is_dir():
            raise SystemExit(f"bench_vs_trl: --out {args.out} is a file; give a folder")
        # each invocation's runs in their own folder: a rerun never mixes with an earlier one
        self.runs = self.out / "runs" / time.strftime("%Y%m%d-%H%M%S")
        self.count = 0
        if args.memory_limit_gib is None:
            import psutil
            args.memory_limit_gib = 0.85 * psutil.virtual_memory().total / 2**30

    def require_examples(self, inputs, needed: int) -> None:
        from solopo_mcore.data.dataset import TripletDataset

        held = len(TripletDataset(str(inputs.data_prefix)))
        if held < needed:
            folder = inputs.data_prefix.parent.parent
            raise SystemExit(f"bench_vs_trl: {folder} holds {held} examples, this run needs "
                             f"{needed} (built by an earlier run with fewer steps); delete that "
                             f"folder or use a new --out, and run again")

    def job(self, side: str, inputs, hyper: Hyper, mode: str, shared: bool, steps: int,
            name: str, ref_path=None, orpo_nll: str = "shipped", recompute=None) -> dict:
        """``recompute``: None keeps each side's default (TRL: gradient checkpointing on; ours:
        no recompute), as the check runs them."""
        self.count += 1
        work = self.runs / f"{self.count:03d}_{name}"
        work.mkdir(parents=True, exist_ok=True)
        spec = {"side": side, "mode": mode, "shared_prefix": shared, "steps": steps,
                "threads": self.args.threads, "model_dir": str(inputs.model_dir),
                "data_prefix": str(inputs.data_prefix), "overrides": our_overrides(hyper, inputs.model_dir, inputs.data_prefix),
                "hyper": hyper.to_dict(), "work_dir": str(work), "out": str(work / "result.json"),
                "max_length": inputs.long_tokens + 1024, "orpo_nll": orpo_nll,
                "recompute": recompute,
                "ref_path": str(ref_path) if ref_path else None}
        if side == "trl":
            spec["rows"] = inputs.examples()
        (work / "spec.json").write_text(json.dumps(spec))
        status = run_process(["-m", "benchmarks.vs_trl.worker", work / "spec.json"],
                             _env(side, self.args.threads), self.args.memory_limit_gib,
                             work / "log.txt")
        if not status["ok"]:
            return status
        return {**status, **json.loads((work / "result.json").read_text())}

    def reference(self, inputs, hyper: Hyper) -> Path:
        """Our DPO reference sidecar for ``inputs`` (the policy's start: the same HF model)."""
        path = inputs.model_dir.parent / "ref"
        if not Path(str(path) + ".json").is_file():  # written last, atomically
            args = ["examples/precompute_ref_logprobs.py", "--output", path,
                    *our_overrides(hyper, inputs.model_dir, inputs.data_prefix)]
            status = run_process(args, _env("ours", self.args.threads),
                                 self.args.memory_limit_gib, path.with_suffix(".log"))
            if not status["ok"]:
                raise SystemExit(f"bench_vs_trl: the DPO reference pre-pass failed: "
                                 f"{status['error']}")
        return path


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def token_differences(trl_tokens: list, dataset) -> list:
    """Where TRL's tokenization of the rows differs from our dataset (prompt, chosen + EOS,
    rejected + EOS of each example TRL trained on); [] when identical."""
    out = []
    for i, (prompt, chosen, rejected) in enumerate(trl_tokens):
        mine = dataset[i]
        for field, a, b in (("prompt", prompt, mine.long_prompt), ("chosen", chosen, mine.chosen),
                            ("rejected", rejected, mine.rejected)):
            if list(a) != list(b):
                first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y),
                             min(len(a), len(b)))
                out.append(f"example {i} {field}: TRL's token ids differ from ours (TRL "
                           f"{len(a)} ids, ours {len(b)}; first difference at position {first})")
    return out


def check(runner: Runner, inputs, dataset) -> dict:
    """Same tokens, same losses: see the module doc. Returns the comparison; exits on failure."""
    steps = runner.args.check_steps
    report = {"shape": inputs.shape.name, "long_tokens": inputs.long_tokens, "steps": steps,
              "algorithms": {}}
    failures = []
    for algorithm, hyper in CHECK_HYPER.items():
        ref = runner.reference(inputs, hyper) if algorithm == "dpo" else None
        ours = runner.job("ours", inputs, hyper, "long", True, steps, f"check_{algorithm}_ours",
                          ref_path=ref)
        trl = runner.job("trl", inputs, hyper, "long", False, steps, f"check_{algorithm}_trl",
                         orpo_nll="response")
        for side, result in (("ours", ours), ("TRL", trl)):
            if not result["ok"]:
                raise SystemExit(f"bench_vs_trl: check run ({algorithm}, {side}) failed: "
                                 f"{result['error']}")
        failures += [f"{algorithm}: {f}" for f in token_differences(trl["trl_tokens"], dataset)]
        rows = []
        for k in range(steps):
            t_logged, o_logged = trl["steps"][k]["logged"], ours["steps"][k]["logged"]
            shipped, trl_loss = trl_losses(algorithm, t_logged)
            row = {"step": k + 1, "ours": o_logged["loss/total"], "trl_as_shipped": shipped,
                   "trl_in_our_convention": trl_loss,
                   "rel_diff": _rel(trl_loss, o_logged["loss/total"])}
            n_chosen, n_rejected = len(dataset[k].chosen), len(dataset[k].rejected)
            # TRL logs DPO's log-prob sums, SimPO's and ORPO's per-token means; ours means
            scale = (n_chosen, n_rejected) if algorithm == "dpo" else (1, 1)
            for key, ours_key, n in (("logps/chosen", "logps/chosen_long", scale[0]),
                                     ("logps/rejected", "logps/rejected_long", scale[1])):
                row[f"{key} ours"] = o_logged[ours_key] * n
                row[f"{key} trl"] = t_logged[key]
                row[f"{key} rel_diff"] = _rel(t_logged[key], o_logged[ours_key] * n)
            rows.append(row)
            worst = max(v for key, v in row.items() if key.endswith("rel_diff"))
            if worst > runner.args.check_tolerance:
                failures.append(f"{algorithm} step {k + 1}: relative difference {worst:.2e} > "
                                f"--check-tolerance {runner.args.check_tolerance:g}: {row}")
        report["algorithms"][algorithm] = rows
        for row in rows:
            log(f"check {algorithm} step {row['step']}: loss ours {row['ours']:.6f}, TRL "
                f"{row['trl_in_our_convention']:.6f} in our convention ({row['trl_as_shipped']:.6f} "
                f"as shipped), rel. diff {row['rel_diff']:.1e}; log-probs rel. diff "
                f"{max(row['logps/chosen rel_diff'], row['logps/rejected rel_diff']):.1e}")
    report["failures"] = failures
    if failures:
        (runner.out / "check.json").write_text(json.dumps(report, indent=2))
        raise SystemExit("bench_vs_trl: the check failed, so no timing was run:\n  "
                         + "\n  ".join(failures))
    log(f"check passed on {inputs.shape.name}: identical token ids; losses and log-probs within "
        f"{runner.args.check_tolerance:g} (relative) over {steps} steps, all three algorithms")
    return report


def time_all(runner: Runner, all_inputs: dict) -> list:
    """The interleaved timing runs (module doc, 3.); TRL's tokens are compared with ours after
    every TRL run."""
    from solopo_mcore.data.dataset import TripletDataset

    args = runner.args
    hyper = CHECK_HYPER[args.algorithm]
    results = []
    for (shape_name, length), inputs in all_inputs.items():
        ref = runner.reference(inputs, hyper) if args.algorithm == "dpo" else None
        dataset = TripletDataset(str(inputs.data_prefix))
        for round_index in range(args.rounds):
            order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
            for label, side, mode, shared, recompute in order:
                result = runner.job(side, inputs, hyper, mode, shared, args.warmup + args.steps,
                                    f"time_{shape_name}_{length}_{side}_{mode}"
                                    f"{'_shared' if shared else ''}"
                                    f"{'_recompute' if recompute else ''}_r{round_index}",
                                    ref_path=ref if side == "ours" else None,
                                    recompute=recompute)
                if result["ok"] and side == "trl":
                    differences = token_differences(result["trl_tokens"], dataset)
                    if differences:
                        raise SystemExit(f"bench_vs_trl: {inputs.data_prefix}: TRL trained on "
                                         f"other tokens than ours, so its timing would not "
                                         f"compare:\n  " + "\n  ".join(differences[:5]))
                entry = {"shape": shape_name, "long_tokens": length, "variant": label,
                         "recompute": recompute, "round": round_index, "ok": result["ok"]}
                if result["ok"]:
                    timed = result["steps"][args.warmup:]
                    entry.update(step_seconds=[s["seconds"] for s in timed],
                                 tokens=[s["tokens"] for s in timed],
                                 peak_rss_gib=result["peak_rss_gib"],
                                 other_load_cores=result["other_load_cores"])
                    if result["other_load_cores"] > OTHER_LOAD_WARNING_CORES:
                        log(f"warning: other processes used {result['other_load_cores']:.2f} "
                            f"cores during this run; its timing is not comparable (stop other "
                            f"work and run again)")
                    log(f"{shape_name} long {length} round {round_index + 1}: {label}: "
                        f"{statistics.median(entry['step_seconds']):.2f} s/step, peak RSS "
                        f"{entry['peak_rss_gib']:.2f} GiB")
                else:
                    entry.update(error=result["error"], oom=result.get("oom", False))
                    log(f"{shape_name} long {length} round {round_index + 1}: {label}: "
                        f"FAILED: {result['error'][:300]}")
                results.append(entry)
                (runner.out / "timings.partial.json").write_text(json.dumps(results))
    return results


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args, trl_version: str) -> dict:
    import torch
    import transformers
    from importlib.metadata import version

    return {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl_version, "megatron_core": version("megatron-core"),
            "cpu": _cpu_model(), "cores": os.cpu_count(),
            "threads": args.threads, "command": " ".join(["python", *sys.argv])}


def main(argv=None) -> None:
    args = parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    check_shapes = [s for s in (args.check_shapes or args.shapes).split(",") if s]
    unknown = sorted({s for s in shapes + check_shapes if s not in SHAPES})
    if unknown:
        raise SystemExit(f"bench_vs_trl: unknown shape(s) {', '.join(unknown)}; known: "
                         f"{', '.join(SHAPES)}")
    trl_version = require_trl()
    runner = Runner(args)
    runner.out.mkdir(parents=True, exist_ok=True)
    lengths = args.lengths
    num_examples = max(args.warmup + args.steps, args.check_steps) + 8  # some may be skipped
    build = lambda shape, length: build_inputs(SHAPES[shape], length, runner.out / "inputs",  # noqa: E731
                                               num_examples, log)
    payload = {"environment": environment(args, trl_version),
               "shapes": {name: {"config": SHAPES[name].config, "why": SHAPES[name].why,
                                 "output_layer_share": {str(n): output_layer_share(
                                     SHAPES[name].config, n) for n in lengths}}
                          for name in shapes}}
    from solopo_mcore.data.dataset import TripletDataset

    if not args.skip_check:
        payload["check"] = []
        for shape in check_shapes:
            inputs = build(shape, min(lengths))
            runner.require_examples(inputs, args.check_steps)
            payload["check"].append(check(runner, inputs, TripletDataset(str(inputs.data_prefix))))
    failed = []
    if not args.check_only:
        all_inputs = {(s, n): build(s, n) for s in shapes for n in lengths}
        for inputs in all_inputs.values():
            runner.require_examples(inputs, args.warmup + args.steps)
        payload["timings"] = time_all(runner, all_inputs)
        payload["summary"] = summarize(payload["timings"])
        payload["variant_order"] = [label for label, *_ in VARIANTS]
        payload["variant_recompute"] = {label: v[-1] for label, *v in VARIANTS}
        payload["timed_algorithm"] = args.algorithm
        failed = [t for t in payload["timings"] if not t["ok"]]
    payload["memory_limit_gib"] = args.memory_limit_gib
    (runner.out / "results.json").write_text(json.dumps(payload, indent=2))
    text = write_summary(payload, runner.out / "summary.md")
    print(text)
    log(f"wrote {runner.out / 'results.json'} and {runner.out / 'summary.md'}")
    if failed:
        raise SystemExit(f"bench_vs_trl: {len(failed)} of {len(payload['timings'])} timed runs "
                         f"failed or went over the memory limit (see the tables above)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the workers end with this process (parent_death_preexec)
        print("bench_vs_trl: interrupted; built inputs are kept and reused, a half-built one is "
              "redone", file=sys.stderr)
        sys.exit(130)
