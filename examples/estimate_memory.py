"""Estimate per-GPU memory for a recipe on a cluster, and suggest TP/PP/CP layouts that fit.

    python examples/estimate_memory.py --config qwen2.5-7b_solo-orpo_64k_4node --world-size 32 \
        --long-tokens 65536 --short-tokens 1024 --device-gib 141

Reads the architecture from model.hf_config_path, or --model qwen2.5-7b|llama3.1-8b without the
weights. Formulas: solopo_mcore/profiling/estimator.py. The microbatch is the one the trainer
packs for the recipe's objective.mode and data.shared_prefix (a shared-prefix segment runs its
context once for both answers; data.shared_prefix=false compares). At TP > 1 the report and every
suggested layout say how many GiB per GPU sequence parallelism (on by default) saves there.
"""

import argparse
import json

from solopo_mcore.config import ConfigError, load_config
from solopo_mcore.errors import entry_point
from solopo_mcore.data.packing import TripletTokens, pack_triplets
from solopo_mcore.losses.objective import MODE_ROLES
from solopo_mcore.models.hf_config import read_hf_config, shape_from_dict
from solopo_mcore.models.reference_configs import BY_NAME
from solopo_mcore.parallel.layout import LayoutError, sequence_pad_multiple
from solopo_mcore.profiling.estimator import (EstimateInputs, estimate_memory, inputs_from_batch,
                                              sequence_parallel_saving_gib, suggest_layouts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="recipe: a YAML file or a name from examples/recipes/")
    parser.add_argument("--model", choices=sorted(BY_NAME),
                        help="use a known architecture instead of the recipe's "
                             "model.hf_config_path (no weights needed)")
    parser.add_argument("--world-size", type=int, required=True,
                        help="number of GPUs (ranks) of the run")
    parser.add_argument("--long-tokens", type=int, required=True,
                        help="tokens of one long segment: the long context plus one response "
                             "(what profile_solopo.py's --long-lengths counts)")
    parser.add_argument("--short-tokens", type=int, default=1024,
                        help="tokens of one short segment: the short context plus one response "
                             "(default: 1024)")
    parser.add_argument("--response-tokens", type=int, default=256,
                        help="tokens per chosen/rejected response (default: 256)")
    parser.add_argument("--device-gib", type=float, default=80.0,
                        help="memory per GPU in GiB (default: 80)")
    parser.add_argument("--json", action="store_true",
                        help="print the report as JSON (default: a table)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted recipe overrides, e.g. parallel.context_parallel_size=4")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    known = "{" + ",".join(sorted(BY_NAME)) + "}"
    if args.model:
        shape = shape_from_dict(BY_NAME[args.model])
    elif not cfg.model.hf_config_path:
        raise ConfigError(f"recipe {args.config!r} names no architecture (model.hf_config_path "
                          f"is unset); pass --model {known} or model.hf_config_path=HF_MODEL_DIR")
    else:
        try:
            shape = read_hf_config(cfg.model.hf_config_path)
        except FileNotFoundError:
            raise ConfigError(f"model.hf_config_path={cfg.model.hf_config_path}: no config.json "
                              f"there; pass --model {known} to estimate without the weights, or "
                              f"model.hf_config_path=HF_MODEL_DIR") from None
    p = cfg.parallel
    # one example packed as the trainer packs it, repeated micro_batch_size times
    response_ids = [1] * args.response_tokens
    for name in ("short_tokens", "long_tokens"):
        if getattr(args, name) <= args.response_tokens:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must exceed "
                              f"--response-tokens {args.response_tokens}: a segment is a context "
                              f"plus one response")
    example = TripletTokens(short_prompt=[1] * (args.short_tokens - args.response_tokens),
                            long_prompt=[1] * (args.long_tokens - args.response_tokens),
                            chosen=response_ids,
                            rejected=response_ids, index=0)
    batch = pack_triplets([example], MODE_ROLES[cfg.objective.mode],
                          pad_multiple=sequence_pad_multiple(p),
                          shared_prefix=cfg.data.shared_prefix)
    microbatch = inputs_from_batch(batch, repeat=cfg.data.micro_batch_size)
    tokens, response = microbatch["microbatch_tokens"], microbatch["response_tokens"]
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * \
        p.context_parallel_size
    if args.world_size <= 0 or args.world_size % model_parallel:
        raise LayoutError(
            f"--world-size {args.world_size} is not divisible by the recipe's TP x PP x CP = "
            f"{p.tensor_model_parallel_size} x {p.pipeline_model_parallel_size} x "
            f"{p.context_parallel_size} = {model_parallel}, so this layout cannot run on it; use "
            f"a world size that is a multiple of {model_parallel}, or override "
            f"parallel.tensor_model_parallel_size / pipeline_model_parallel_size / "
            f"context_parallel_size so that their product divides {args.world_size}")
    common = dict(params_dtype=cfg.model.params_dtype,
                  distributed_optimizer=p.use_distributed_optimizer,
                  optimizer_cpu_offload=cfg.optimizer.optimizer_cpu_offload,
                  recompute=cfg.model.recompute_granularity or "none",
                  recompute_method=cfg.model.recompute_method,
                  recompute_num_layers=cfg.model.recompute_num_layers,
                  vocab_divisible_by=cfg.model.make_vocab_size_divisible_by,
                  sequence_parallel=p.sequence_parallel)
    inputs = EstimateInputs(
        tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
        cp=p.context_parallel_size, dp=args.world_size // model_parallel,
        **microbatch, **common)
    estimate = estimate_memory(shape, inputs)
    fits = estimate["total_gib"] <= args.device_gib
    report = {"model": shape.architecture, "mode": cfg.objective.mode,
              "shared_prefix": cfg.data.shared_prefix,
              "microbatch_tokens": tokens, "recipe_layout": {
                  "tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
                  "cp": p.context_parallel_size,
                  "dp": args.world_size // model_parallel,
                  "sequence_parallel": p.sequence_parallel_enabled},
              # what sequence parallelism saves (or would save, if switched off) at this layout
              "sequence_parallel_saving_gib": round(sequence_parallel_saving_gib(shape, inputs),
                                                    2),
              "per_gpu_gib": {k: round(v, 2) for k, v in estimate.items() if k.endswith("_gib")},
              "fits": fits, "device_gib": args.device_gib,
              "layouts_that_fit": suggest_layouts(shape, args.world_size, tokens, response,
                                                  args.device_gib,
                                                  segment_tokens=microbatch["segment_tokens"],
                                                  segments=microbatch["segments"],
                                                  **common)[:8]}
    print(json.dumps(report, indent=2) if args.json else describe(report))
    return report


def describe(report: dict) -> str:
    """The report as a few aligned lines and a table of the layouts that fit."""
    layout = report["recipe_layout"]
    gib = report["per_gpu_gib"]
    sp = "on" if layout["sequence_parallel"] else "off"
    lines = [
        f"{report['model']}, mode {report['mode']}, shared prefix "
        f"{'on' if report['shared_prefix'] else 'off'}: {report['microbatch_tokens']} tokens "
        f"per microbatch",
        f"recipe layout TP{layout['tp']} PP{layout['pp']} CP{layout['cp']} DP{layout['dp']} "
        f"(sequence parallel {sp}): {gib['total_gib']:.1f} GiB per GPU of "
        f"{report['device_gib']:g} -> {'fits' if report['fits'] else 'DOES NOT FIT'}",
        "  " + ", ".join(f"{k[:-4]} {v:.1f}" for k, v in gib.items()
                         if k not in ("total_gib", "tensors_gib")) + " (GiB)",
    ]
    if layout["tp"] > 1:
        lines.append(f"  sequence parallelism saves {report['sequence_parallel_saving_gib']:.1f} "
                     f"GiB per GPU here")
    fitting = report["layouts_that_fit"]
    if fitting:
        lines += ["layouts that fit (first 8):", "   TP  PP  CP  DP  GiB/GPU"]
        lines += [f"  {r['tp']:3d} {r['pp']:3d} {r['cp']:3d} {r['dp']:3d}  {r['total_gib']:7.1f}"
                  for r in fitting]
    else:
        world = layout["tp"] * layout["pp"] * layout["cp"] * layout["dp"]
        lines.append(f"no TP/PP/CP layout of {world} GPUs fits {report['device_gib']:g} GiB "
                     f"per GPU")
    lines.append("(--json prints every figure)")
    return "\n".join(lines)


if __name__ == "__main__":
    with entry_point("estimate_memory"):
        main()
