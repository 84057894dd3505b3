"""Estimate per-GPU memory for a recipe on a cluster: a plan of every TP/PP/CP layout under each
recompute setting (none, selective, full) and with optimizer CPU offload that fits, cheapest
predicted cost first (recompute's added compute), the longest trainable long context per setting,
and whether the model's positions reach the long context (YaRN otherwise).

    python examples/estimate_memory.py --config qwen2.5-7b_solo-orpo_128k_4node \\
        --world-size 32 --long-tokens 131072 --short-tokens 1024 --device-gib 80

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
from solopo_mcore.log import warn
from solopo_mcore.models.hf_config import read_hf_config, shape_from_dict
from solopo_mcore.models.positions import with_rope_scaling
from solopo_mcore.models.reference_configs import BY_NAME
from solopo_mcore.parallel.layout import LayoutError
from solopo_mcore.profiling import plan
from solopo_mcore.profiling.estimator import (EstimateInputs, estimate_memory,
                                              sequence_parallel_saving_gib)
from solopo_mcore.profiling.plan import positions_report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="recipe: a YAML file or the name of a shipped recipe "
                             "(solopo_mcore/recipes/)")
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
    for flag, value in (("--world-size", args.world_size), ("--device-gib", args.device_gib),
                        ("--response-tokens", args.response_tokens)):
        if not value > 0:
            parser.error(f"{flag} must be positive, got {value:g}")
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
    shape = with_rope_scaling(shape, cfg.model.rope_scaling.as_hf())
    p = cfg.parallel
    for name in ("short_tokens", "long_tokens"):
        if getattr(args, name) <= args.response_tokens:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must exceed "
                              f"--response-tokens {args.response_tokens}: a segment is a context "
                              f"plus one response")
    if args.short_tokens > args.long_tokens:
        warn("estimate_memory", f"--short-tokens {args.short_tokens} is longer than --long-tokens "
                                f"{args.long_tokens}: the short context is the evidence alone, "
                                f"the long one the same evidence among distractors")
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * \
        p.context_parallel_size
    if args.world_size % model_parallel:
        raise LayoutError(
            f"--world-size {args.world_size} is not divisible by the recipe's TP x PP x CP = "
            f"{p.tensor_model_parallel_size} x {p.pipeline_model_parallel_size} x "
            f"{p.context_parallel_size} = {model_parallel}, so this layout cannot run on it; use "
            f"a world size that is a multiple of {model_parallel}, or override "
            f"parallel.tensor_model_parallel_size / pipeline_model_parallel_size / "
            f"context_parallel_size so that their product divides {args.world_size}")

    def make(long_tokens, cp=None, tp=None):
        return plan.microbatch(cfg, args.short_tokens, long_tokens, args.response_tokens, cp, tp)

    microbatch = make(args.long_tokens)
    tokens, response = microbatch["microbatch_tokens"], microbatch["response_tokens"]
    common = dict(params_dtype=cfg.model.params_dtype,
                  distributed_optimizer=p.use_distributed_optimizer,
                  recompute_method=cfg.model.recompute_method,
                  recompute_num_layers=cfg.model.recompute_num_layers,
                  vocab_divisible_by=cfg.model.make_vocab_size_divisible_by,
                  sequence_parallel=p.sequence_parallel,
                  activation_memory=cfg.model.activation_memory)
    recipe = dict(common, optimizer_cpu_offload=cfg.optimizer.optimizer_cpu_offload,
                  recompute=cfg.model.recompute_granularity or "none")
    inputs = EstimateInputs(
        tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
        cp=p.context_parallel_size, dp=args.world_size // model_parallel,
        **microbatch, **recipe)
    estimate = estimate_memory(shape, inputs)
    fits = estimate["total_gib"] <= args.device_gib
    rows = plan.enumerate_plan(shape, args.world_size,
                               lambda cp, tp: make(args.long_tokens, cp, tp), common)
    fitting = [r for r in rows if r.total_gib <= args.device_gib]
    report = {"model": shape.architecture, "mode": cfg.objective.mode,
              "shared_prefix": cfg.data.shared_prefix,
              "activation_memory": cfg.model.activation_memory,
              "microbatch_tokens": tokens, "long_tokens": args.long_tokens,
              "positions": positions_report(shape, args.long_tokens, cfg.model.hf_config_path
                                            or args.model),
              "recipe_layout": {
                  "tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
                  "cp": p.context_parallel_size,
                  "dp": args.world_size // model_parallel,
                  "sequence_parallel": p.sequence_parallel_enabled,
                  "recompute": recipe["recompute"],
                  "optimizer_cpu_offload": recipe["optimizer_cpu_offload"]},
              # what sequence parallelism saves (or would save, if switched off) at this layout
              "sequence_parallel_saving_gib": round(sequence_parallel_saving_gib(shape, inputs),
                                                    2),
              "per_gpu_gib": {k: round(v, 2) for k, v in estimate.items() if k.endswith("_gib")},
              "fits": fits, "device_gib": args.device_gib,
              # the recipe's own recompute and offload settings, every layout that fits
              "layouts_that_fit": [
                  {k: v for k, v in r.as_dict().items() if k not in (
                      "recompute", "optimizer_cpu_offload", "extra_compute_pct")}
                  for r in fitting if r.recompute == recipe["recompute"] and
                  r.optimizer_cpu_offload == recipe["optimizer_cpu_offload"]],
              # every layout x recompute x offload that fits, cheapest predicted cost first
              "plan": [r.as_dict() for r in fitting],
              "longest_trainable": plan.longest_trainable(
                  shape, args.world_size, args.device_gib, make, common,
                  shortest=args.response_tokens + 1)}
    if not fitting:
        nearest = min(rows, key=lambda r: r.total_gib)
        report["nearest_miss"] = dict(nearest.as_dict(), over_by_gib=round(
            nearest.total_gib - args.device_gib, 1))
    print(json.dumps(report, indent=2) if args.json else describe(report))
    return report


def describe(report: dict) -> str:
    """The report as a few aligned lines and tables (``--json`` has every figure)."""
    return plan.describe(report)


if __name__ == "__main__":
    with entry_point("estimate_memory"):
        main()
