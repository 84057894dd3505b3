"""Time the data pipeline at the paper's scale: N examples with long contexts of ~8K tokens
(build_triplets, then preprocess with the real Qwen2.5 tokenizer). Prints examples/s and
tokens/s for each stage.

    python benchmarks/bench_preprocess.py --num-examples 5000 --long-tokens 8192 --num-proc 2
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-examples", type=int, default=5000)
    parser.add_argument("--long-tokens", type=int, default=8192)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from data_tools import build_triplets, preprocess, synthetic
    from data_tools.sample_pairs import main as sample_pairs

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_"))
    synthetic.main(["--num-examples", str(args.num_examples), "--out",
                    str(work / "musique.jsonl")])
    start = time.time()
    summary = build_triplets.run(str(work / "musique.jsonl"), str(work / "triplets.jsonl"),
                                 "builtin:qwen2.5", args.long_tokens, "builtin:wiki")
    build_s = time.time() - start
    sample_pairs(["--backend", "rule", "--num-samples", "8", "--input",
                  str(work / "triplets.jsonl"), "--output", str(work / "pairs.jsonl")])
    start = time.time()
    meta = preprocess.run(str(work / "pairs.jsonl"), str(work / "solopo"), "builtin:qwen2.5",
                          args.long_tokens + 1024, num_proc=args.num_proc)
    pre_s = time.time() - start
    n = meta["num_examples"]
    result = {
        "num_examples": n, "long_tokens_target": args.long_tokens, "num_proc": args.num_proc,
        "mean_long_tokens": summary.get("mean_long_tokens"),
        "build_triplets_sec": round(build_s, 1),
        "build_triplets_examples_per_sec": round(summary["written"] / build_s, 1),
        "preprocess_sec": round(pre_s, 1), "preprocess_examples_per_sec": round(n / pre_s, 1),
        "preprocess_tokens_per_sec": round(meta["num_tokens"] / pre_s),
        "dataset_tokens": meta["num_tokens"], "workdir": str(work),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
