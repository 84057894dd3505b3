"""Did long-context QA improve? Short vs long sub-EM accuracy, and NIAH-style depth x length maps.

    # each held-out triplet's short and long prompt
    python examples/evaluate_qa.py --input heldout_triplets.jsonl --output eval/ \\
        --model base=/models/Qwen2.5-7B-Instruct --model solo=runs/solo_orpo/hf
    # the evidence of each held-out example at depths 0..100 % of 4K..32K tokens of distractors
    python examples/evaluate_qa.py --input heldout_triplets.jsonl --output eval_grid/ --grid \\
        --lengths 4096,8192,16384,32768 --depths 0,25,50,75,100 --model solo=runs/solo_orpo/ckpt

A --model PATH is an HF checkpoint dir or a Megatron checkpoint dir (exported on the fly).
Generation is greedy: vLLM when installed, else transformers. Rerunning with the same --output
resumes; see README "Evaluation" for the outputs and for LongBench / RULER.
"""

import argparse
import json
import os


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text):
    return [float(x) for x in text.split(",") if x.strip()]


def _model(text):
    name, sep, path = text.partition("=")
    if not sep:
        name, path = os.path.basename(os.path.normpath(text)), text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH or PATH")
    return name, path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="held-out rows from `python -m data_tools.build_triplets` (JSONL)")
    p.add_argument("--output", required=True,
                   help="output folder (one subfolder per checkpoint; reused to resume)")
    p.add_argument("--model", action="append", type=_model, required=True,
                   help="NAME=PATH of an HF or Megatron checkpoint; repeat to compare several")
    p.add_argument("--grid", action="store_true",
                   help="NIAH-style grid from each row's evidence instead of its prompt_long")
    p.add_argument("--lengths", type=_ints, default=[4096, 8192, 16384, 32768],
                   help="grid: comma-separated user-message lengths in tokens")
    p.add_argument("--depths", type=_floats, default=[0, 25, 50, 75, 100],
                   help="grid: comma-separated evidence depths in percent")
    p.add_argument("--distractor-pool", default="builtin:wiki",
                   help="grid: builtin:wiki, a .jsonl with 'text', or a .txt file")
    p.add_argument("--tokenizer", help="grid: tokenizer that measures lengths (default: the "
                                       "first HF checkpoint's, else builtin:qwen2.5)")
    p.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"],
                   help="auto: vLLM when installed, else transformers")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer budget in tokens")
    p.add_argument("--limit", type=int, help="only the first N examples (a quick look)")
    p.add_argument("--seed", type=int, default=0, help="distractor choice and bootstrap seed")
    p.add_argument("--wandb-project", help="also log the summary to this W&B project")
    p.add_argument("--wandb-entity", help="W&B entity (team or user)")
    p.add_argument("--wandb-run-id", help="W&B run to add the summary to (e.g. the training "
                                          "run's id); default: a new run")
    p.add_argument("--wandb-run-name", help="W&B display name of a new run")
    p.add_argument("--wandb-dir", help="folder for W&B's local files (default: ./wandb)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from solopo_mcore.evaluation.runner import EvalConfig, run_evaluation
    from solopo_mcore.training.wandb_log import log_eval_summaries

    cfg = EvalConfig(
        input_path=args.input, output_dir=args.output, models=args.model,
        mode="grid" if args.grid else "triplets", lengths_tokens=args.lengths,
        depths_percent=args.depths, distractor_pool=args.distractor_pool,
        tokenizer=args.tokenizer, backend=args.backend, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, limit=args.limit, seed=args.seed)
    summaries = run_evaluation(cfg)
    print(open(os.path.join(args.output, "summary.md"), encoding="utf-8").read())
    if args.wandb_project:
        run_id = log_eval_summaries(summaries, args.output, args.wandb_project, args.wandb_entity,
                                    args.wandb_run_id, args.wandb_run_name, args.wandb_dir)
        print(f"evaluate_qa: summary logged to W&B run {run_id}")
    print(json.dumps({"output": args.output, "checkpoints": [s["name"] for s in summaries]}))


if __name__ == "__main__":
    from solopo_mcore.errors import entry_point

    with entry_point("evaluate_qa"):
        main()
