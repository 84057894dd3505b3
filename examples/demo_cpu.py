"""The main job, end to end on CPU (a few minutes on 2 cores):

1. build synthetic multi-hop QA (MuSiQue format) and short/long contexts (Wikipedia distractors);
2. pick chosen/rejected with the rule-based answerer (stands in for sample_pairs' model sampling);
3. preprocess with the real Qwen2.5 tokenizer into a Megatron indexed dataset;
4. build a tiny Qwen2-architecture HF model from a config;
5. convert it to a Megatron checkpoint (verified against transformers);
6. train SoLo-ORPO on 2 processes with TP=2 (use --algorithm dpo for SoLo-DPO with a reference
   pre-pass, --cp for context parallelism instead of TP);
7. export HF, plot the loss/reward/eval curves (curves.png), and print where everything went.

    python examples/demo_cpu.py [--out DIR] [--steps 30] [--algorithm orpo|dpo|simpo] [--cp]

Each variant (algorithm, --cp) writes to its own folder, runs/demo/ALGORITHM[-cp] by default.
"""

import argparse
import os
import sys
from pathlib import Path

from solopo_mcore.errors import UserError, entry_point
from solopo_mcore.processes import run_child

REPO = Path(__file__).resolve().parent.parent


class DemoStepError(UserError):
    """A step of the demo failed; its own error is printed above."""


def sh(*args, **env):
    """Run one step; it (and torchrun's ranks) exit if the demo is killed."""
    print("\n$ " + " ".join(str(a) for a in args), flush=True)
    result = run_child(args, cwd=REPO,
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
                            "HF_DATASETS_OFFLINE": "1", **env})
    if result.returncode != 0:
        raise DemoStepError(f"step `{' '.join(str(a) for a in args[:4])} ...` failed with exit "
                            f"status {result.returncode}; its error is printed above")


def eval_accuracy_note(metrics: dict, num_eval_examples: int) -> str:
    """One sentence on what the demo's eval accuracy means."""
    last = {k: v for k, v in metrics.items() if k.startswith("eval/accuracy/")}
    shown = ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in sorted(last.items())) or "n/a"
    return (f"Eval accuracy ({shown}) is the fraction of the {num_eval_examples} held-out pairs "
            f"whose chosen answer gets a higher reward than the rejected one: for a tiny "
            f"randomly initialised model trained for a few steps it stays near chance (0.5) and "
            f"moves in steps of 1/{num_eval_examples}, so it shows the pipeline works end to end, "
            f"not that the model learned the task.")


def default_out(algorithm: str, cp: bool) -> str:
    """One folder per variant, so a variant never resumes another's checkpoints."""
    return f"runs/demo/{algorithm}{'-cp' if cp else ''}"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (default: runs/demo/ALGORITHM[-cp], one per "
                        "variant, so a variant never resumes another's checkpoints)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    parser.add_argument("--examples", type=int, default=72,
                        help="synthetic QA examples to build (default: 72)")
    parser.add_argument("--long-tokens", type=int, default=1024,
                        help="long-context length in tokens (default: 1024)")
    parser.add_argument("--algorithm", default="orpo", choices=["orpo", "dpo", "simpo"],
                        help="SoLo-ORPO (default), SoLo-DPO (with a reference pre-pass) or "
                             "SoLo-SimPO")
    parser.add_argument("--cp", action="store_true", help="CP=2 instead of TP=2")
    args = parser.parse_args()
    variant = args.algorithm + ("-cp" if args.cp else "")
    out = (REPO / (args.out or default_out(args.algorithm, args.cp))).resolve()
    print(f"demo variant {variant}: outputs go to {out}"
          + ("" if args.out else " (its own folder; --out chooses another)"), flush=True)
    py = sys.executable
    data, model, run = out / "data", out / "model", out / "run"
    torchrun = [py, "-m", "torch.distributed.run", "--nproc-per-node=2"]

    sh(py, "-m", "data_tools.synthetic", "--num-examples", args.examples,
       "--out", data / "musique_synthetic.jsonl")
    sh(py, "-m", "data_tools.build_triplets", "--input", data / "musique_synthetic.jsonl",
       "--output", data / "triplets.jsonl", "--target-long-tokens", args.long_tokens,
       "--distractor-pool", "builtin:wiki", "--tokenizer", "builtin:qwen2.5")
    sh(py, "-m", "data_tools.sample_pairs", "--backend", "rule", "--num-samples", 8,
       "--input", data / "triplets.jsonl", "--output", data / "pairs.jsonl")
    sh(py, "-c", "from solopo_mcore.models.tiny import build_tiny_hf_model; "
                 "from data_tools.tokenizer import load_tokenizer; "
                 "t = load_tokenizer('builtin:qwen2.5'); "
                 f"build_tiny_hf_model({str(model / 'hf_init')!r}, 'qwen2', vocab_size=len(t), "
                 "tokenizer=t); print('tiny Qwen2 HF model written')")
    sh(py, "-m", "data_tools.preprocess", "--input", data / "pairs.jsonl",
       "--output-prefix", data / "solopo", "--tokenizer", "builtin:qwen2.5",
       "--max-seq-length", args.long_tokens + 512, "--num-proc", 2,
       "--model-config", model / "hf_init")
    sh(py, "examples/convert_checkpoint.py", "hf-to-mcore", "--src", model / "hf_init",
       "--dst", model / "mcore_init", "--verify", "--overwrite")
    layout = (["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=1"]
              if args.cp else [])
    common = ["--config", "examples/recipes/tiny_cpu.yaml",
              f"model.hf_config_path={model / 'hf_init'}", f"data.data_path={data / 'solopo'}",
              f"objective.algorithm={args.algorithm}", *layout]
    if args.algorithm == "dpo":
        ref = data / "solopo.ref"
        sh(*torchrun, "examples/precompute_ref_logprobs.py", *common,
           f"checkpoint.load_dir={model / 'mcore_init'}", "--output", ref)
        common += [f"data.ref_logprobs_path={ref}", "objective.alpha=3.0",
                   "objective.beta=1.0", "optimizer.lr=1e-3"]
    sh(*torchrun, "examples/pretrain_solopo.py", *common,
       f"checkpoint.load_dir={model / 'mcore_init'}", f"checkpoint.save_dir={run / 'checkpoints'}",
       f"checkpoint.export_hf_dir={run / 'hf_export'}", f"training.train_steps={args.steps}",
       f"logging.metrics_path={run / 'metrics.jsonl'}",
       f"logging.tensorboard_dir={run / 'tensorboard'}")
    from solopo_mcore.config import load_config
    from solopo_mcore.training.curves import plot_curves, read_metrics

    curves = plot_curves(run / "metrics.jsonl", run / "curves.png")
    last_eval = {}
    for record in read_metrics(run / "metrics.jsonl").values():
        last_eval.update({k: v for k, v in record.items() if k.startswith("eval/")})
    num_eval = load_config(str(REPO / "examples/recipes/tiny_cpu.yaml")).data.num_eval_examples
    print(f"""
Done. Everything is under {out}:
  data        {data}/  (musique_synthetic.jsonl, triplets.jsonl, pairs.jsonl, solopo.bin/.idx/.meta.json)
  HF init     {model / 'hf_init'}        Megatron init  {model / 'mcore_init'}
  checkpoints {run / 'checkpoints'}      metrics        {run / 'metrics.jsonl'}
  TensorBoard {run / 'tensorboard'}      HF export      {run / 'hf_export'}
  curves      {curves}  (loss, rewards, eval accuracy)

{eval_accuracy_note(last_eval, num_eval)}
""")


if __name__ == "__main__":
    with entry_point("demo_cpu"):
        main()
