"""The profiler run behind examples/profile_solopo.py: build once, sweep, search, report."""

from __future__ import annotations

import argparse
import torch
import torch.distributed as dist

from solopo_mcore.compat import MEGATRON_CORE_VERSION
from solopo_mcore.config import ConfigError, load_config
from solopo_mcore.log import log
from solopo_mcore.parallel.layout import describe_layout, layout_sizes
from solopo_mcore.platform import device_name, on_cuda
from solopo_mcore.profiling.estimator import EstimateInputs, estimate_memory, inputs_from_batch
from solopo_mcore.profiling.flops import device_peak_tflops
from solopo_mcore.profiling.report import ratio_rows, write_report
from solopo_mcore.profiling.sweep import (DEFAULT_VARIANTS, ProfileTarget, find_max_length,
                                          pack_variant, parse_variants, probe_length,
                                          profile_length, synthetic_example, trace_step)
from solopo_mcore.stack import build_model_stack, load_hf_weights, setup_parallel
from solopo_mcore.training import build
from solopo_mcore.training.optim import build_optimizer


def _ints(text: str) -> list:
    return [int(x) for x in text.split(",") if x]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe (file or name)")
    parser.add_argument("--out", default="runs/profile",
                        help="output folder for results, plots and summary.md")
    parser.add_argument("--modes", default=DEFAULT_VARIANTS,
                        help="comma-separated variants to compare: MODE (packed as the recipe's "
                             "data.shared_prefix), MODE/shared or MODE/unshared; modes: solo "
                             "(SoLoPO), solo_both, long (long-PO), short. Default: SoLoPO and "
                             "solo_both against long-PO without sharing (the paper's baseline) "
                             "and with it (the strongest one)")
    parser.add_argument("--long-lengths", default="4096,8192,16384",
                        help="comma-separated long-segment lengths to time, in tokens: the long "
                             "context plus one response (what estimate_memory.py's --long-tokens "
                             "counts)")
    parser.add_argument("--short-tokens", type=int, default=1024,
                        help="short-segment length in tokens: the short context plus one "
                             "response")
    parser.add_argument("--response-tokens", type=int, default=128,
                        help="tokens per chosen/rejected response")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed warm-up steps per setting")
    parser.add_argument("--find-max-len", action="store_true",
                        help="search the longest trainable long context per variant")
    parser.add_argument("--max-len-start", type=int, default=8192,
                        help="--find-max-len: first length tried (then doubled)")
    parser.add_argument("--max-len-limit", type=int, default=262144,
                        help="--find-max-len: longest length tried; a result equal to it is a "
                             "lower bound")
    parser.add_argument("--max-len-granularity", type=int, default=2048,
                        help="--find-max-len: bisection stops at this many tokens")
    parser.add_argument("--memory-limit-gib", type=float,
                        help="treat a peak above this as out of memory (planning, tests)")
    parser.add_argument("--trace", action="store_true", help="torch profiler trace of one step")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. "
                        "parallel.context_parallel_size=2")


def run(args) -> dict:
    config = load_config(args.config, args.overrides)
    variants = parse_variants(args.modes, config.data.shared_prefix)
    shared = [v.name for v in variants if v.shared_prefix]
    if shared and config.model.layer_spec == "te":
        raise ConfigError(f"--modes {args.modes} profiles {','.join(shared)} with shared prefixes, "
                          f"which need our attention (model.layer_spec=auto or local), not "
                          f"Transformer Engine's; with model.layer_spec=te pass MODE/unshared "
                          f"variants only, e.g. --modes solo/unshared,long/unshared")
    shape, pg_collection = setup_parallel(config)
    stack = build_model_stack(config, shape, pg_collection)
    if config.checkpoint.hf_init_dir:
        load_hf_weights(stack, config.checkpoint.hf_init_dir)
    optimizer = build_optimizer(stack.model, config.optimizer, config.parallel,
                                stack.config.params_dtype, pg_collection)
    target = ProfileTarget(stack, optimizer, config.objective, build.pad_multiple(config),
                           args.response_tokens, config.training.seed, args.memory_limit_gib,
                           device_peak_tflops(config.logging.peak_tflops))
    estimates = []
    if dist.get_rank() == 0:
        from pathlib import Path
        Path(args.out).mkdir(parents=True, exist_ok=True)
    for length in _ints(args.long_lengths):
        results = profile_length(target, variants, args.short_tokens, length, args.steps,
                                 args.warmup)
        for variant in variants:
            result = results[variant.name]
            if result is None:
                if dist.get_rank() == 0:
                    log("profile", f"{variant.name} long={length}: out of memory")
                continue
            if args.trace and result is target.results[0]:
                trace_step(target, variant, args.short_tokens, length,
                           f"{args.out}/trace_{variant.file_stem}_{length}.json")
            estimates.append(_estimate(config, stack, pg_collection, target, variant, args,
                                       length, result))
            if dist.get_rank() == 0:
                log("profile", f"{variant.name} long={length}: step {result['step_sec']:.3f}s, "
                               f"{result['tokens']} tokens, "
                               f"{result['tokens_per_sec_per_gpu']:.0f} tok/s/GPU, peak "
                               f"{result['peak_memory_gib']:.3f} GiB")
        if dist.get_rank() == 0:
            for row in ratio_rows([r for r in results.values() if r is not None]):
                log("profile", f"long={length} {row['label']} ({row['numerator']} / "
                               f"{row['denominator']}): step time {row['step_time_ratio']:.2f}, "
                               f"peak memory {row['peak_memory_ratio']:.2f}")
    max_lengths = {}
    if args.find_max_len:
        for variant in variants:
            def fits(length, variant=variant):
                probe_length(target, variant, args.short_tokens, length)
                return True
            best, trials = find_max_length(fits, args.max_len_start, args.max_len_limit,
                                           args.max_len_granularity)
            max_lengths[variant.name] = best
            if dist.get_rank() == 0:
                capped = best >= args.max_len_limit
                bound = (" - a lower bound: it reached --max-len-limit; raise it to search "
                         "further" if capped else "")
                log("profile", f"longest trainable long context for {variant.name}: "
                               f"{'>= ' if capped else ''}{best} tokens ({len(trials)} trials)"
                               + bound)
    context = {"model": shape.architecture, "layers": shape.num_layers,
               "hidden": shape.hidden_size, "device": device_name(),
               "layout": describe_layout(pg_collection),
               "short_tokens": args.short_tokens, "response_tokens": args.response_tokens,
               "peak_tflops": target.peak_tflops, "torch": torch.__version__,
               "megatron_core": MEGATRON_CORE_VERSION,
               "recompute": config.model.recompute_granularity,
               "activation_memory": config.model.activation_memory,
               "variants": [v.name for v in variants],
               "params_dtype": config.model.params_dtype}
    payload = {}
    if dist.get_rank() == 0:
        payload = write_report(args.out, target.results, context, max_lengths, estimates,
                               args.max_len_limit if args.find_max_len else None)
        from pathlib import Path
        written = sorted(p.name for p in Path(args.out).iterdir() if p.is_file())
        log("profile", f"wrote {', '.join(written)} to {Path(args.out).resolve()}")
    dist.barrier()
    return payload


def _estimate(config, stack, pg_collection, target, variant, args, length, result) -> dict:
    """The estimator's figure for this setting next to the measured tensor peak, and its error.
    Its microbatch (segment lengths, shared-prefix key ranges, response positions) is the one the
    variant packs."""
    on_gpu = on_cuda()
    model = config.model
    example = synthetic_example(args.short_tokens, length, args.response_tokens,
                                stack.shape.vocab_size, target.seed)
    est = estimate_memory(stack.shape, EstimateInputs(
        **layout_sizes(pg_collection),
        params_dtype=model.params_dtype,
        distributed_optimizer=config.parallel.use_distributed_optimizer,
        optimizer_cpu_offload=config.optimizer.optimizer_cpu_offload,
        recompute=model.recompute_granularity, recompute_method=model.recompute_method,
        recompute_num_layers=model.recompute_num_layers,
        activation_memory=model.activation_memory,
        fused_swiglu=bool(stack.config.bias_activation_fusion),
        sequence_parallel=bool(stack.config.sequence_parallel),
        num_microbatches=1,
        **inputs_from_batch(pack_variant(target, example, variant)),
        vocab_divisible_by=model.make_vocab_size_divisible_by,
        materialized_cp_masks=not on_gpu, workspace_gib=0.0))
    measured = result["peak_memory_gib"]  # tensors only: CUDA max allocated / CPU allocator
    return {"variant": variant.name, "mode": variant.mode, "long_tokens": length,
            "estimated_gib": est["tensors_gib"], "measured_gib": measured,
            "error": (est["tensors_gib"] - measured) / measured if measured else None,
            "components": {k: v for k, v in est.items() if k.endswith("_gib")}}
