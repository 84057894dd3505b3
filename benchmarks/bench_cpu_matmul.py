"""What this CPU can do: the fp32 matmul rate at a model's layer shapes, per thread count.

    python benchmarks/bench_cpu_matmul.py                       # SmolLM2-135M's shapes
    python benchmarks/bench_cpu_matmul.py --hidden 896 --ffn 4864 --kv-dim 128 --tokens 2048

Each row times ``tokens x in @ in x out`` (a linear layer's forward; its two backward matmuls
have the same FLOPs) and prints GFLOP/s. Set against a training step's model FLOPs it says how
close the step is to the machine (docs/data.md, "The pretrained demo": the linear layers of a
SmolLM2-135M step run at this rate). Results: benchmarks/RESULTS.md, "CPU matmul rate".
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def rate_gflops(m: int, k: int, n: int, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = (time.perf_counter() - start) / repeats
    return 2 * m * k * n / seconds / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    p.add_argument("--ffn", type=int, default=1536, help="FFN size (SmolLM2-135M: 1536)")
    p.add_argument("--kv-dim", type=int, default=192, help="K/V width (3 KV heads x 64)")
    p.add_argument("--tokens", type=int, default=1536, help="rows: tokens in a microbatch")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    h, f, t = args.hidden, args.ffn, args.tokens
    shapes = {"qkv": (t, h, h + 2 * args.kv_dim), "attention out": (t, h, h),
              "fc1 (gate+up)": (t, h, 2 * f), "fc2": (t, f, h)}
    rows = []
    for threads in map(int, args.threads.split(",")):
        for name, (m, k, n) in shapes.items():
            gflops = rate_gflops(m, k, n, threads, args.repeats)
            rows.append({"threads": threads, "matmul": name, "m_k_n": [m, k, n],
                         "gflops": round(gflops, 1),
                         "gflops_per_thread": round(gflops / threads, 1)})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
