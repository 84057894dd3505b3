"""Whole training runs on the learnable QA task at every parallel layout, and the golden curve.

Shared by ``tests/test_convergence.py`` (the checks) and ``tests/golden/regenerate.py`` (which
rewrites the golden file on purpose): the dataset, the initial weights, the recipe overrides,
the layouts, one run, the tolerances and the comparison of two curves live here once.

A run is the real trainer (``examples/pretrain_solopo.py`` under torchrun) with the tiny CPU
recipe and the overrides in :data:`TRAINING`: warm-up + cosine LR, AdamW with weight decay,
gradient clipping that engages on most steps but not all, two or more microbatches per step on
every rank, and a shuffled dataset of 60 examples read 8 per step, so that the run goes through
13 epochs and some global batches straddle two of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path

from tests.helpers.launch import REPO, TINY_RECIPE, run_script

GOLDEN_PATH = REPO / "tests" / "golden" / "convergence_1proc.json"

#: The dataset: data_tools' real pipeline on the learnable QA task, small enough for fast steps.
DATA = dict(num_examples=60, long_tokens=192, max_seq_length=320, num_samples=8, seed=0,
            tokenizer="builtin:qa-words")
#: The model: the tiny Qwen2 (4 layers, as PP2 x VPP2 needs; hidden 64, GQA, QKV bias, tied
#: embeddings), weights redrawn by :func:`_redraw_weights`.
MODEL = dict(family="qwen2", init_seed=0, overrides={"num_hidden_layers": 4, "hidden_size": 64})

STEPS = 100
#: Overrides common to every layout (on top of the tiny_cpu recipe). The global batch is the
#: same 8 examples per step at every layout; only its split into microbatches changes.
TRAINING = [
    "data.global_batch_size=8", "data.micro_batch_size=2", "data.num_eval_examples=0",
    "data.shuffle=true",
    "optimizer.lr=3e-3", "optimizer.min_lr=3e-4", "optimizer.lr_warmup_steps=10",
    "optimizer.weight_decay=0.1", "optimizer.clip_grad=1.0",
    "training.deterministic=true", "training.eval_interval=0", "training.seed=1234",
    f"training.train_steps={STEPS}",
    "checkpoint.save_interval=0", "logging.log_interval=1", "logging.progress_bar=false",
    "model.params_dtype=fp32", "parallel.use_distributed_optimizer=true",
]

#: name -> (processes, overrides). The tiny_cpu recipe says TP=2, so every layout sets TP.
#: Microbatches per step and rank: 4 at 1proc and PP2xVPP2 (the interleaved schedule needs 4 at
#: PP2 x VPP2, parallel/layout.py: check_interleaved_microbatches), 2 elsewhere (micro batch 4,
#: or DP2 with micro batch 2). Fewer, larger microbatches keep the 2-process runs within the
#: time budget (each microbatch costs a round of gloo collectives), and they also check that
#: the split of a global batch into microbatches does not change the step.
LAYOUTS = {
    "1proc": (1, ["parallel.tensor_model_parallel_size=1"]),
    "tp2_sp": (2, ["parallel.tensor_model_parallel_size=2",  # sequence parallel: on at TP>1
                   "data.micro_batch_size=4"]),
    "pp2": (2, ["parallel.tensor_model_parallel_size=1",
                "parallel.pipeline_model_parallel_size=2", "data.micro_batch_size=4"]),
    "pp2_vpp2": (2, ["parallel.tensor_model_parallel_size=1",
                     "parallel.pipeline_model_parallel_size=2",
                     "parallel.virtual_pipeline_model_parallel_size=2"]),
    "cp2": (2, ["parallel.tensor_model_parallel_size=1", "parallel.context_parallel_size=2",
                "data.micro_batch_size=4"]),
    "dp2_distopt": (2, ["parallel.tensor_model_parallel_size=1"]),
    # DP2 with megatron's plain (not distributed) optimizer, for the first 30 steps of the same
    # schedule (training.exit_interval stops the run there; nothing is saved without a save_dir)
    "dp2_plain_optimizer": (2, ["parallel.tensor_model_parallel_size=1",
                                "parallel.use_distributed_optimizer=false",
                                "training.exit_interval=30"]),
    # fp16 with Megatron's dynamic loss scaler, started at 2^20 so that the first steps
    # overflow and are skipped (the scale halves), for the first 20 steps
    "1proc_fp16": (1, ["parallel.tensor_model_parallel_size=1", "model.params_dtype=fp16",
                       "optimizer.initial_loss_scale=1048576", "training.exit_interval=20"]),
}

#: name -> (the layout the trainer reports at start-up, microbatches per step on each rank).
EXPECTED_LAYOUT = {
    "1proc": ("TP1 PP1 CP1 DP1", 4), "tp2_sp": ("TP2 PP1 CP1 DP1", 2),
    "pp2": ("TP1 PP2 CP1 DP1", 2), "pp2_vpp2": ("TP1 PP2 CP1 DP1", 4),
    "cp2": ("TP1 PP1 CP2 DP1", 2), "dp2_distopt": ("TP1 PP1 CP1 DP2", 2),
    "dp2_plain_optimizer": ("TP1 PP1 CP1 DP2", 2), "1proc_fp16": ("TP1 PP1 CP1 DP1", 4),
}

#: The per-step values compared between runs and stored in the golden file.
CURVE_KEYS = ("loss/total", "optimizer/grad_norm", "optimizer/lr")

# Tolerances, ``key -> (rtol, atol)``: ``|value - reference| <= atol + rtol * |reference|`` at
# every step. Measured on this machine (Python 3.11, torch 2.13.0 CPU, megatron-core 0.16.1, one
# intra-op thread), largest relative difference over the 100 steps:
#
#   run against the 1-process run             loss/total   grad_norm
#   TP2+SP, PP2, PP2xVPP2, CP2, DP2+distopt   <= 2.3e-5    <= 4.0e-4
#   1 process, micro batch 1 or 4 (not 2)     <= 2.3e-5    <= 3.9e-4
#   1 process, SDPA math instead of flash     1.3e-5       2.3e-4
#   1 process, every initial weight x (1 + 1e-6 N(0,1))   1.1e-4   1.7e-3
#   1 process, two intra-op threads           0 (bitwise)  0
#
# Differences in the order of fp32 sums (other layouts, microbatch splits, another attention
# kernel) stay near 2e-5 on the loss over the whole run: the curve does not amplify them much
# (grad norms move ~20x more than the loss, largest at the two gradient spikes, steps 11 and 59).
# The learning rate is a formula of the step and must be equal.

#: Layouts against the 1-process run: ~10x the largest layout difference measured above.
LAYOUT_TOLERANCES = {"loss/total": (2e-4, 1e-6), "optimizer/grad_norm": (4e-3, 1e-5),
                     "optimizer/lr": (1e-9, 0.0)}

#: The 1-process run against the golden file, which must also hold on CI's other leg (Python 3.12,
#: torch 2.14.1, megatron-core 0.19.2; not run here), where other kernels and library code sum in
#: other orders: ~100x the order-of-summation differences above and ~20x (loss) / ~10x (grad
#: norm) what a 1e-6 relative change of every initial weight does, yet well below what the
#: planted bugs of tests/golden/README.md did to the golden check (loss up to 0.045 and 0.14
#: relative, 46 and 78 of 100 steps outside; grad norm 4x, and up to 1.4 relative).
GOLDEN_TOLERANCES = {"loss/total": (2e-3, 1e-5), "optimizer/grad_norm": (2e-2, 1e-4),
                     "optimizer/lr": (1e-6, 0.0)}


# ---------------------------------------------------------------------------------- inputs
def _redraw_weights(model_dir: Path, seed: int) -> None:
    """Replace every weight of the saved model with values drawn by numpy's legacy
    ``RandomState`` (whose stream numpy keeps fixed across releases), in name order: normal(0,
    0.02) matrices, 1 + normal(0, 0.1) norms, normal(0, 0.05) biases. The golden curve then does
    not depend on how a transformers release initialises a model from its config (the order and
    the distributions of its init calls), only on the architecture."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    rng = np.random.RandomState(seed)
    for name in sorted(tensors):
        shape = tuple(tensors[name].shape)
        if name.endswith("norm.weight"):
            values = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            values = 0.05 * rng.standard_normal(shape)
        else:
            values = 0.02 * rng.standard_normal(shape)
        tensors[name] = torch.from_numpy(values.astype(np.float32))
    save_file(tensors, str(path), metadata={"format": "pt"})


def weights_digest(model_dir) -> str:
    """SHA-256 over the model's tensors (name, shape, float32 bytes, in name order): the same for
    the same weights whatever the safetensors release writes in the file's header."""
    import numpy as np
    from safetensors.numpy import load_file

    digest = hashlib.sha256()
    tensors = load_file(str(Path(model_dir) / "model.safetensors"))
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name], dtype="<f4")
        digest.update(f"{name}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def tokens_digest(prefix) -> str:
    """SHA-256 over the dataset's token sequences (lengths and ids as little-endian int64): the
    same for the same tokens whatever the indexed dataset's file format."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    digest = hashlib.sha256()
    dataset = IndexedDataset(str(prefix), multimodal=False, mmap=True)
    for i in range(len(dataset)):
        tokens = np.asarray(dataset[i], dtype="<i8")
        digest.update(np.asarray([len(tokens)], dtype="<i8").tobytes())
        digest.update(tokens.tobytes())
    return digest.hexdigest()


def build_inputs(root) -> dict:
    """The dataset (learnable_qa -> build_triplets -> sample_pairs -> preprocess, each through
    its command-line ``main``) and the tiny model, under ``root``. Returns the paths and the
    digests of both (:func:`tokens_digest`, :func:`weights_digest`)."""
    from data_tools import build_triplets, learnable_qa, preprocess, sample_pairs
    from data_tools.tokenizer import load_tokenizer
    from solopo_mcore.models.tiny import build_tiny_hf_model

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    d = DATA
    qa, triplets, pairs = root / "qa.jsonl", root / "triplets.jsonl", root / "pairs.jsonl"
    learnable_qa.main(["--num-examples", str(d["num_examples"]), "--out", str(qa),
                       "--long-tokens", str(d["long_tokens"]), "--seed", str(d["seed"])])
    build_triplets.main(["--input", str(qa), "--output", str(triplets),
                         "--tokenizer", d["tokenizer"],
                         "--target-long-tokens", str(d["long_tokens"]),
                         "--distractor-pool", "none"])
    sample_pairs.main(["--backend", "rule", "--num-samples", str(d["num_samples"]),
                       "--input", str(triplets), "--output", str(pairs)])
    tokenizer = load_tokenizer(d["tokenizer"])
    model_dir = root / "hf_init"
    build_tiny_hf_model(model_dir, MODEL["family"], vocab_size=len(tokenizer),
                        seed=MODEL["init_seed"], tokenizer=tokenizer,
                        overrides=MODEL["overrides"])
    _redraw_weights(model_dir, MODEL["init_seed"])
    prefix = root / "qa"
    preprocess.main(["--input", str(pairs), "--output-prefix", str(prefix),
                     "--tokenizer", d["tokenizer"], "--max-seq-length", str(d["max_seq_length"]),
                     "--num-proc", "1", "--model-config", str(model_dir)])
    meta = json.loads(Path(f"{prefix}.meta.json").read_text())
    return {"root": str(root), "prefix": str(prefix), "model": str(model_dir),
            "num_examples": int(meta["num_examples"]), "tokens_sha256": tokens_digest(prefix),
            "weights_sha256": weights_digest(model_dir)}


# ---------------------------------------------------------------------------------- runs
def layout_overrides(inputs: dict, layout: str, run_dir) -> list:
    """Every command-line override of one layout's run (later ones win)."""
    return [f"model.hf_config_path={inputs['model']}",
            f"checkpoint.hf_init_dir={inputs['model']}",
            f"data.data_path={inputs['prefix']}",
            f"logging.metrics_path={Path(run_dir) / 'metrics.jsonl'}",
            *TRAINING, *LAYOUTS[layout][1]]


def run_layout(inputs: dict, layout: str, run_dir, timeout: int = 600) -> dict:
    """Train at ``layout`` (a key of :data:`LAYOUTS`) and return its curve (:func:`read_curve`).
    The run's stdout/stderr are kept in ``run_dir``.

    One intra-op thread per process (``OMP_NUM_THREADS=1``, what torchrun sets at 2+ processes
    anyway): the single-process run then computes the same way on every machine, whatever its
    core count; the golden curve is one of those runs."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = run_script(LAYOUTS[layout][0], "examples/pretrain_solopo.py",
                        ["--config", TINY_RECIPE, *layout_overrides(inputs, layout, run_dir)],
                        env=env, timeout=timeout)
    (run_dir / "stdout.txt").write_text(result.stdout)
    (run_dir / "stderr.txt").write_text(result.stderr)
    if result.returncode != 0:
        raise AssertionError(f"{layout}: {' '.join(map(str, result.args))}\n"
                             f"exit {result.returncode}\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    layout_text, microbatches = EXPECTED_LAYOUT[layout]
    start_line = f"| {layout_text} |"
    assert start_line in result.stdout and f"| {microbatches} microbatches/step |" in \
        result.stdout, (f"{layout}: the trainer's start-up line does not say {start_line!r} and "
                        f"{microbatches} microbatches/step:\n{result.stdout[:3000]}")
    return read_curve(run_dir / "metrics.jsonl")


def read_curve(metrics_path) -> dict:
    """``{"step": [...], key: [...] for CURVE_KEYS and "data/epoch"}`` of a metrics.jsonl."""
    rows = [json.loads(line) for line in open(metrics_path)]
    rows = [r for r in rows if "loss/total" in r]
    curve = {"step": [int(r["step"]) for r in rows]}
    for key in (*CURVE_KEYS, "data/epoch"):
        curve[key] = [float(r[key]) for r in rows]
    return curve


def first_steps(curve: dict, count: int) -> dict:
    """The curve's first ``count`` steps."""
    return {key: values[:count] for key, values in curve.items()}


# ---------------------------------------------------------------------------------- comparison
def differences(curve: dict, reference: dict, key: str) -> dict:
    """The largest absolute and relative (to ``|reference|``) step-by-step difference of
    ``key``, with their steps. The two curves must have the same steps."""
    if curve["step"] != reference["step"]:
        raise AssertionError(f"the curves have different steps: {curve['step'][:3]}..."
                             f"{curve['step'][-1:]} vs {reference['step'][:3]}..."
                             f"{reference['step'][-1:]}")
    a, b = curve[key], reference[key]
    abs_diff = [abs(x - y) for x, y in zip(a, b)]
    rel_diff = [d / abs(y) if y else (0.0 if d == 0 else math.inf) for d, y in zip(abs_diff, b)]
    i_abs = max(range(len(a)), key=abs_diff.__getitem__)
    i_rel = max(range(len(a)), key=rel_diff.__getitem__)
    return {"max_abs": abs_diff[i_abs], "step_of_max_abs": curve["step"][i_abs],
            "max_rel": rel_diff[i_rel], "step_of_max_rel": curve["step"][i_rel]}


def check_close(curve: dict, reference: dict, tolerances: dict, what: str) -> dict:
    """Assert that every key of ``tolerances`` (``key -> (rtol, atol)``) satisfies
    ``|value - reference| <= atol + rtol * |reference|`` at every step; return the measured
    :func:`differences` per key."""
    measured, failures = {}, []
    for key, (rtol, atol) in tolerances.items():
        diff = measured[key] = differences(curve, reference, key)
        bad = [(s, x, y) for s, x, y in zip(curve["step"], curve[key], reference[key])
               if not abs(x - y) <= atol + rtol * abs(y)]
        if bad:
            s, x, y = bad[0]
            failures.append(
                f"{key}: {len(bad)} of {len(curve['step'])} steps outside rtol={rtol:g} "
                f"atol={atol:g}, the first at step {s}: {x:.7g} vs {y:.7g}; largest difference "
                f"{diff['max_abs']:.3g} absolute (step {diff['step_of_max_abs']}), "
                f"{diff['max_rel']:.3g} relative (step {diff['step_of_max_rel']})")
    assert not failures, f"{what}:\n  " + "\n  ".join(failures)
    return measured


def describe(measured: dict) -> str:
    """One line of measured differences, for test output and regenerate.py."""
    return "; ".join(f"{key}: max abs {d['max_abs']:.3g} (step {d['step_of_max_abs']}), "
                     f"max rel {d['max_rel']:.3g} (step {d['step_of_max_rel']})"
                     for key, d in measured.items())


# ---------------------------------------------------------------------------------- golden
def environment() -> dict:
    """The versions that produced a curve."""
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "torch": version("torch"),
            "megatron-core": version("megatron-core"), "transformers": version("transformers"),
            "numpy": version("numpy"), "machine": platform.machine()}


#: The config sections whose values can change a single-process curve.
NUMERIC_SECTIONS = ("model", "parallel", "data", "objective", "optimizer", "training")


def settings() -> dict:
    """What the golden file records about how its run was made: the recipe, the overrides, the
    configuration they resolve to (:data:`NUMERIC_SECTIONS`, without paths), the data and model
    settings, and the thread count."""
    from solopo_mcore.config import load_config, to_dict

    overrides = TRAINING + LAYOUTS["1proc"][1]
    config = to_dict(load_config(str(REPO / TINY_RECIPE), overrides))
    resolved = {section: config[section] for section in NUMERIC_SECTIONS}
    resolved["model"].pop("hf_config_path", None)
    resolved["data"].pop("data_path", None)
    return json.loads(json.dumps({"recipe": TINY_RECIPE, "overrides": overrides,
                                  "resolved_config": resolved, "OMP_NUM_THREADS": 1,
                                  "data": DATA, "model": MODEL}))


def settings_differences(recorded: dict, current: dict) -> list:
    """Lines naming what differs between two :func:`settings`. Config keys present in only one
    of them are not differences (a new option with a default that changes nothing must not
    invalidate the golden file; if it changes the curve, the curve check says so)."""
    lines = [f"{key}: golden {recorded.get(key)!r}, now {current.get(key)!r}"
             for key in ("recipe", "overrides", "OMP_NUM_THREADS", "data", "model")
             if recorded.get(key) != current.get(key)]
    for section, values in current["resolved_config"].items():
        old = recorded.get("resolved_config", {}).get(section, {})
        lines += [f"{section}.{key}: golden {old[key]!r}, now {value!r}"
                  for key, value in values.items() if key in old and old[key] != value]
    return lines


def golden_inputs(inputs: dict) -> dict:
    """What the golden file records about its inputs, and compares before the curve."""
    return {key: inputs[key] for key in ("num_examples", "tokens_sha256", "weights_sha256")}


def golden_record(inputs: dict, curve: dict) -> dict:
    """The golden file's content for a single-process curve."""
    return {
        "about": "Golden curve of the single-process convergence run (tests/test_convergence.py"
                 "). Regenerate only on purpose, with `python tests/golden/regenerate.py`, and "
                 "write the reason in the commit message (tests/golden/README.md).",
        "produced_with": environment(),
        "settings": settings(),
        "inputs": golden_inputs(inputs),
        "curve": {"step": curve["step"], **{key: curve[key] for key in CURVE_KEYS}},
    }


def load_golden(path=GOLDEN_PATH) -> dict:
    return json.loads(Path(path).read_text())


def write_golden(record: dict, path=GOLDEN_PATH) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
