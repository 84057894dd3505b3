"""Conversion at a real architecture's shape: wall time, GB/s and peak RSS of
``examples/convert_checkpoint.py`` both ways, at TP1 and TP2, and whether the round trip is
bitwise. A benchmark, not a test; the figures go in benchmarks/RESULTS.md.

    python benchmarks/bench_convert.py                        # Qwen2.5-1.5B shape, bf16
    python benchmarks/bench_convert.py --shape llama3.1-8b --layers 4 --verify

The HF model has random bf16 weights (written tensor by tensor, so building it needs little
memory). Each conversion runs in its own process tree; its peak RSS is the largest resident set
of any process in it (``RUSAGE_CHILDREN``), i.e. of the busiest rank. "x weights" divides that
by the bf16 weights' bytes (at TP2: by half of them, one rank's share).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: HF configs of the architectures' real shapes (weights are random).
SHAPES = {
    "qwen2.5-1.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                         hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=32768),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                       hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=32768),
    "llama3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                        tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                        max_position_embeddings=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
}

_MAXRSS_WRAPPER = ("import resource, subprocess, sys\n"
                   "code = subprocess.run(sys.argv[1:]).returncode\n"
                   "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
                   " file=sys.stderr)\n"
                   "sys.exit(code)\n")


def write_random_hf_model(out: Path, shape_name: str, num_layers: int | None,
                          shard_bytes: int = 2 ** 30) -> int:
    """A random-weight bf16 HF model of the named shape in ``out``; returns its weight bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(SHAPES[shape_name], torch_dtype="bfloat16")
    if num_layers:
        raw["num_hidden_layers"] = num_layers
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    shards, pending, pending_bytes, total = [], {}, 0, 0
    params = [(n, p.shape) for n, p in model.named_parameters()
              if not (config.tie_word_embeddings and n == "lm_head.weight")]

    def flush():
        nonlocal pending, pending_bytes
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(pending, str(out / name), metadata={"format": "pt"})
        shards.append((name, list(pending)))
        pending, pending_bytes = {}, 0
    for name, shape in params:
        value = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if name.endswith("norm.weight"):
            value = 1 + value
        if pending and pending_bytes + value.numel() * 2 > shard_bytes:
            flush()
        pending[name] = value
        pending_bytes += value.numel() * 2
        total += value.numel() * 2
    flush()
    weight_map = {}
    for number, (name, names) in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update({n: final for n in names})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def convert(direction: str, src: Path, dst: Path, tp: int, extra: list) -> dict:
    """One conversion in its own process tree: report, wall seconds, peak RSS (GiB)."""
    cmd = [sys.executable, "examples/convert_checkpoint.py", direction, "--src", str(src),
           "--dst", str(dst), "--tp", str(tp), "--overwrite", *extra]
    start = time.time()
    result = subprocess.run([sys.executable, "-c", _MAXRSS_WRAPPER, *cmd], cwd=REPO,
                            capture_output=True, text=True)
    wall = time.time() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    maxrss = [line for line in result.stderr.splitlines() if line.startswith("MAXRSS_KIB")]
    report = json.loads(result.stdout[result.stdout.index("{"):])
    return {"report": report, "wall_s": wall,
            "peak_rss_gib": int(maxrss[-1].split()[1]) / 2 ** 20}


def bitwise_equal(a: Path, b: Path) -> bool:
    """Every tensor of HF directory ``a`` equals ``b``'s (read one tensor at a time)."""
    import torch
    from safetensors import safe_open

    def index(d):
        return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    left, right = index(a), index(b)
    if set(left) != set(right):
        return False
    for name, file in left.items():
        with safe_open(a / file, "pt") as fa, safe_open(b / right[name], "pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--layers", type=int, help="cut the depth to N layers")
    parser.add_argument("--tp", default="1,2", help="TP sizes to convert at (default: 1,2)")
    parser.add_argument("--verify", action="store_true",
                        help="also run hf-to-mcore --verify at TP1 and state its peak")
    parser.add_argument("--tolerance", default="1e-1",
                        help="--verify's tolerance (bf16 Megatron vs float32 transformers)")
    parser.add_argument("--work", default="/tmp/bench_convert",
                        help="scratch folder (about 3x the weights on disk)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    work = Path(args.work)
    hf = work / "hf"
    start = time.time()
    weight_bytes = write_random_hf_model(hf, args.shape, args.layers)
    gib = weight_bytes / 2 ** 30
    print(f"{args.shape}{f' ({args.layers} layers)' if args.layers else ''}: {gib:.2f} GiB "
          f"of bf16 weights, written in {time.time() - start:.0f} s", flush=True)
    rows = []
    for tp in [int(t) for t in args.tp.split(",")]:
        share = gib / tp
        there = convert("hf-to-mcore", hf, work / f"mcore_tp{tp}", tp, [])
        back = convert("mcore-to-hf", work / f"mcore_tp{tp}", work / f"hf_tp{tp}", tp, [])
        same = bitwise_equal(hf, work / f"hf_tp{tp}")
        for direction, run in (("hf-to-mcore", there), ("mcore-to-hf", back)):
            rows.append({"direction": direction, "tp": tp, "wall_s": round(run["wall_s"], 1),
                         "gb_per_s": round(weight_bytes / 1e9 / run["wall_s"], 3),
                         "peak_rss_gib": round(run["peak_rss_gib"], 2),
                         "peak_over_share": round(run["peak_rss_gib"] / share, 2),
                         "bitwise_round_trip": same})
            print(json.dumps(rows[-1]), flush=True)
    if args.verify:
        run = convert("hf-to-mcore", hf, work / "mcore_verify", 1,
                      ["--verify", "--tolerance", args.tolerance])
        rows.append({"direction": "hf-to-mcore --verify", "tp": 1,
                     "wall_s": round(run["wall_s"], 1),
                     "gb_per_s": round(weight_bytes / 1e9 / run["wall_s"], 3),
                     "peak_rss_gib": round(run["peak_rss_gib"], 2),
                     "peak_over_share": round(run["peak_rss_gib"] / gib, 2),
                     "max_abs_logit_diff": run["report"].get("max_abs_logit_diff")})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| direction | TP | wall s | GB/s | peak RSS GiB (busiest rank) | x its share of "
          "the weights | bitwise round trip |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['direction']} | {r['tp']} | {r['wall_s']} | {r['gb_per_s']} | "
              f"{r['peak_rss_gib']} | {r['peak_over_share']} | "
              f"{r.get('bitwise_round_trip', '')} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"shape": args.shape, "layers": args.layers,
                                              "weight_gib": gib, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
