"""Activation memory and step time of ``model.activation_memory`` lean against megatron.

    python benchmarks/bench_activation_memory.py                      # KiB per token and layer (~20 s)
    python benchmarks/bench_activation_memory.py --ab /tmp/bvt_s4     # + step-time A/B

1. KiB per token and layer that a forward keeps, both settings, from the CPU allocator
   (``solopo_mcore/profiling/activations.py``: a 1- and a 3-layer model of the shape, one
   rank), next to the estimator's table. Default shape: ``small-vocab``'s layer (hidden 512, FFN
   1792, 8 / 2 heads), long-PO unshared.
2. ``--ab OUT``: our trainer alone on ``bench_vs_trl``'s inputs in OUT (small-vocab, ``--length``),
   one process per run through ``benchmarks/vs_trl/worker.py``, alternating lean, megatron,
   megatron, lean; 1 warm-up + 3 timed steps each; median s/step and peak RSS per setting.
Results: benchmarks/RESULTS.md, "Activation memory per token and layer".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = {"hidden_size": 512, "intermediate_size": 1792, "num_attention_heads": 8,
         "num_key_value_heads": 2, "num_hidden_layers": 3}


def per_token_layer(long_tokens: int) -> dict:
    from tests.helpers.activation_checks import kept_per_token_layer
    from solopo_mcore.models.tiny import build_tiny_hf_model
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29571"))
    from solopo_mcore import platform
    platform.apply_cpu_patches()
    platform.apply_megatron_fixes()
    with tempfile.TemporaryDirectory() as hf_dir:
        build_tiny_hf_model(hf_dir, "qwen2", vocab_size=4096, seed=0, overrides=SHAPE)
        return kept_per_token_layer(hf_dir, long_tokens)


def ab_inputs(out: Path, length: int) -> tuple[Path, str]:
    """The model folder and dataset prefix ``bench_vs_trl --out OUT`` built for small-vocab at
    ``length``; one line naming the command that builds them when they are not there."""
    inputs = out / "inputs" / f"small-vocab_{length}"
    configs, indexes = sorted(inputs.glob("**/config.json")), sorted(inputs.glob("**/*.idx"))
    if not configs or not indexes:
        raise SystemExit(f"--ab {out}: no small-vocab inputs at {length} tokens in {inputs}; "
                         f"build them with python benchmarks/bench_vs_trl.py --out {out} "
                         f"(needs the [compare] extra), or pass that run's --out and --length")
    return configs[0].parent, str(indexes[0])[:-len(".idx")]


def ab(out: Path, length: int) -> dict:
    from benchmarks.bench_vs_trl import CHECK_HYPER, _env
    from benchmarks.vs_trl.conventions import our_overrides
    model_dir, prefix = ab_inputs(out, length)
    hyper = CHECK_HYPER["orpo"]
    seconds, rss = {"lean": [], "megatron": []}, {"lean": [], "megatron": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, setting in enumerate(["lean", "megatron", "megatron", "lean"]):
            work = Path(tmp) / f"{i}_{setting}"
            work.mkdir()
            spec = {"side": "ours", "mode": "long", "shared_prefix": False, "steps": 4,
                    "threads": 2, "model_dir": str(model_dir), "data_prefix": prefix,
                    "overrides": [*our_overrides(hyper, model_dir, prefix),
                                  f"model.activation_memory={setting}"],
                    "hyper": hyper.to_dict(), "work_dir": str(work),
                    "out": str(work / "result.json"), "max_length": length + 1024}
            (work / "spec.json").write_text(json.dumps(spec))
            subprocess.run([sys.executable, "-m", "benchmarks.vs_trl.worker",
                            str(work / "spec.json")], cwd=REPO, env=_env("ours", 2), check=True,
                           capture_output=True)
            result = json.loads((work / "result.json").read_text())
            seconds[setting] += [s["seconds"] for s in result["steps"][1:]]
            rss[setting].append(round(result["peak_rss_gib"], 2))
    return {s: {"median_s": round(statistics.median(v), 2), "min_s": round(min(v), 2),
                "max_s": round(max(v), 2), "peak_rss_gib": rss[s]} for s, v in seconds.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long-tokens", type=int, default=1024,
                   help="long context of the measured long-PO pair (2 x this tokens)")
    p.add_argument("--ab", type=Path, help="bench_vs_trl --out folder whose inputs to time on")
    p.add_argument("--length", type=int, default=4096, help="--ab: small-vocab long length")
    args = p.parse_args(argv)
    if args.ab:
        ab_inputs(args.ab, args.length)  # before the measurement, not after it
    report = {"per_token_layer": per_token_layer(args.long_tokens)}
    print(json.dumps(report["per_token_layer"]), flush=True)
    if args.ab:
        report["ab"] = ab(args.ab, args.length)
        print(json.dumps(report["ab"]), flush=True)


if __name__ == "__main__":
    main()
