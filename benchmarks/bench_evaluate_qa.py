"""Generations per second of the QA evaluation (greedy, transformers backend) with the tiny
Qwen2 model (real Qwen2.5 vocabulary) on grid prompts of each length.

    python benchmarks/bench_evaluate_qa.py --lengths 1024,4096 --num-examples 4 \\
        --batch-size 4 --max-new-tokens 32
"""

import argparse
import json
import tempfile
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096", help="grid lengths in tokens")
    parser.add_argument("--num-examples", type=int, default=4, help="examples per length")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()

    import torch

    from data_tools import build_triplets, synthetic
    from data_tools.distractors import load_pool
    from data_tools.tokenizer import load_tokenizer
    from solopo_mcore.evaluation import items as items_mod
    from solopo_mcore.evaluation.models import transformers_generate
    from solopo_mcore.models.tiny import build_tiny_hf_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_evaluate_qa_"))
    tokenizer = load_tokenizer("builtin:qwen2.5")
    synthetic.main(["--num-examples", str(args.num_examples), "--out",
                    str(work / "musique.jsonl")])
    build_triplets.run(str(work / "musique.jsonl"), str(work / "triplets.jsonl"),
                       "builtin:qwen2.5", 512, "builtin:wiki")
    build_tiny_hf_model(work / "model", "qwen2", vocab_size=len(tokenizer), seed=0,
                        tokenizer=tokenizer)
    rows = items_mod.read_heldout(str(work / "triplets.jsonl"), items_mod.GRID_FIELDS)
    pool = load_pool("builtin:wiki")
    generate = transformers_generate(str(work / "model"), "hf", args.max_new_tokens)
    results = []
    for length in [int(x) for x in args.lengths.split(",")]:
        start = time.time()
        grid = [i for i in items_mod.grid_items(rows, tokenizer, [length], [50], pool)
                if i.context == "long"]
        build_s = time.time() - start
        generate([grid[0].prompt])  # warm-up
        start = time.time()
        for first in range(0, len(grid), args.batch_size):
            generate([i.prompt for i in grid[first:first + args.batch_size]])
        seconds = time.time() - start
        results.append({"length_tokens": length, "num_generations": len(grid),
                        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                        "generations_per_sec": round(len(grid) / seconds, 3),
                        "seconds": round(seconds, 2), "grid_build_sec": round(build_s, 2),
                        "torch_threads": torch.get_num_threads()})
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
