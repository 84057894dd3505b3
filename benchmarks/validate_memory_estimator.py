"""Validate the memory estimator against measured peaks over layouts and recompute settings.

    python benchmarks/validate_memory_estimator.py --lengths 1024,4096 \
        --layouts tp1,tp2,cp2,pp2 --recompute none,selective,full

Each (layout, recompute) pair runs ``examples/profile_solopo.py`` (the ``--modes`` variants, e.g.
``solo,long`` or ``long/unshared,long/shared`` for shared-prefix packing; the given long lengths)
on a small random Qwen2-architecture model, which reports the estimator's tensor total next to the
measured tensor peak: CUDA max allocated on GPU; on CPU the tensors alive before a step plus the
CPU allocator's peak during it. Prints one row per setting and the error range.
Any further ``key=value`` arguments are passed to every run as config overrides.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# (TP, PP, CP); TP > 1 runs with sequence parallelism (the default) unless the name ends "_nosp"
LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 1), "tp2_nosp": (2, 1, 1), "cp2": (1, 1, 2),
           "pp2": (1, 2, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--short-tokens", type=int, default=256)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--layouts", default="tp1,tp2,cp2,pp2")
    parser.add_argument("--modes", default="solo,long",
                        help="profile_solopo.py --modes: MODE, MODE/shared or MODE/unshared")
    parser.add_argument("--recompute", default="none,selective,full")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--out", help="write all rows as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from solopo_mcore.models.tiny import build_tiny_hf_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_tiny_hf_model(model_dir, vocab_size=args.vocab, overrides=dict(
            hidden_size=args.hidden, intermediate_size=3 * args.hidden,
            num_attention_heads=max(4, args.hidden // 32), num_key_value_heads=2))
        for layout in args.layouts.split(","):
            tp, pp, cp = LAYOUTS[layout]
            for recompute in args.recompute.split(","):
                out = Path(tmp) / f"{layout}_{recompute}"
                cmd = [sys.executable, "-m", "torch.distributed.run",
                       f"--nproc-per-node={tp * pp * cp}", "examples/profile_solopo.py",
                       "--config", "tiny_cpu", "--out", str(out), "--long-lengths", args.lengths,
                       "--modes", args.modes,
                       "--short-tokens", str(args.short_tokens),
                       "--response-tokens", str(args.response_tokens), "--steps", "1",
                       "--warmup", "1", f"model.hf_config_path={model_dir}",
                       f"parallel.tensor_model_parallel_size={tp}",
                       f"parallel.pipeline_model_parallel_size={pp}",
                       f"parallel.context_parallel_size={cp}"]
                if recompute != "none":
                    cmd.append(f"model.recompute_granularity={recompute}")
                if layout.endswith("_nosp"):
                    cmd.append("parallel.sequence_parallel=false")
                proc = subprocess.run(cmd + args.overrides, cwd=REPO, capture_output=True,
                                      text=True)
                if proc.returncode:
                    raise SystemExit(f"{layout}/{recompute} failed:\n{proc.stderr[-3000:]}")
                payload = json.loads((out / "results.json").read_text())
                for est in payload["estimates"]:
                    rows.append({"layout": layout, "recompute": recompute, **{
                        k: est[k] for k in ("variant", "mode", "long_tokens", "estimated_gib",
                                            "measured_gib", "error")}})
                    r = rows[-1]
                    print(f"{layout:8} {recompute:9} {r['variant']:14} long={r['long_tokens']:6} "
                          f"estimated {r['estimated_gib']:.4f} GiB  measured "
                          f"{r['measured_gib']:.4f} GiB  error {r['error']:+.1%}", flush=True)
    errors = [r["error"] for r in rows]
    print(f"device: {payload['context']['device']}; {len(rows)} settings; error from "
          f"{min(errors):+.1%} to {max(errors):+.1%}, mean |error| "
          f"{sum(abs(e) for e in errors) / len(errors):.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
