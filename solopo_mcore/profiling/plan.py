"""A memory plan for a recipe on a cluster: every TP/PP/CP layout under every recompute setting
(none, selective, full) and with optimizer CPU offload, the ones that fit first by predicted
cost, and the longest long context each setting can train.

Cost is the compute recompute adds, as a fraction of the step's model FLOPs
(:mod:`solopo_mcore.profiling.flops`): ``selective`` runs core attention's forward again
(``4 x pairs x heads x d`` per layer), ``full`` the recomputed layers' whole forward (their
share of the step's ``3 x forward``, the output layer excluded). Optimizer CPU offload adds no
FLOPs but moves the optimizer step and its state to the host; it is ranked after the same
layout without it and its cost is not predicted here. Among equal compute, fewer model-parallel
ranks (less communication) come first, then more headroom.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

from solopo_mcore.data.packing import TripletTokens, pack_triplets
from solopo_mcore.losses.objective import MODE_ROLES
from solopo_mcore.models.hf_config import ModelShape
from solopo_mcore.models.shared_prefix import hidden_key_pairs
from solopo_mcore.parallel.layout import sequence_pad_multiple
from solopo_mcore.profiling.estimator import (EstimateInputs, SegmentLayout, estimate_memory,
                                              segment_layouts, sequence_parallel_on,
                                              sequence_parallel_saving_gib)
from solopo_mcore.profiling.flops import training_step_flops

RECOMPUTE_SETTINGS = ("none", "selective", "full")
TP_SIZES, CP_SIZES, PP_SIZES = (1, 2, 4, 8), (1, 2, 4, 8, 16), (1, 2, 4, 8)


def microbatch(config, short_tokens: int, long_tokens: int, response_tokens: int,
               context_parallel_size: Optional[int] = None,
               tensor_model_parallel_size: Optional[int] = None) -> dict:
    """The estimator's microbatch fields for one example packed as the trainer packs it for the
    recipe (objective.mode, data.shared_prefix, padding at the given layout), repeated
    data.micro_batch_size times. Segment lengths count a context plus one response."""
    from dataclasses import replace

    parallel = replace(config.parallel, **{k: v for k, v in (
        ("context_parallel_size", context_parallel_size),
        ("tensor_model_parallel_size", tensor_model_parallel_size)) if v is not None})
    key = (id(config), short_tokens, long_tokens, response_tokens,
           sequence_pad_multiple(parallel))
    if key not in _PACKED:  # packing a long example is the slow part of a plan: once per key
        _PACKED.clear() if len(_PACKED) > 256 else None
        _PACKED[key] = _pack(config, parallel, short_tokens, long_tokens, response_tokens)
    return _PACKED[key]


_PACKED: dict = {}


def _pack(config, parallel, short_tokens, long_tokens, response_tokens) -> dict:
    """Pack with the trainer's packer. A long context changes its segments affinely: growing
    it by the padding multiple moves their lengths, hidden key ranges and response spans by the
    same amount. So long examples are packed at two short lengths congruent to the target and the
    layout is extended to it (``tests/test_profiling.py`` checks it against packing directly)."""
    pad = sequence_pad_multiple(parallel)
    small = response_tokens + 1 + (long_tokens - response_tokens - 1) % pad
    if long_tokens - small <= 4 * pad:
        layouts = _layouts(config, pad, short_tokens, long_tokens, response_tokens)
    else:
        a = _layouts(config, pad, short_tokens, small, response_tokens)
        b = _layouts(config, pad, short_tokens, small + pad, response_tokens)
        times = (long_tokens - small) // pad
        layouts = tuple(_extend(x, y, times) for x, y in zip(a, b))
    layouts = layouts * config.data.micro_batch_size
    return dict(microbatch_tokens=sum(s.length for s in layouts),
                response_tokens=sum(e - b for s in layouts for b, e in s.response_spans),
                segment_tokens=tuple(s.length for s in layouts), segments=layouts)


def _layouts(config, pad, short_tokens, long_tokens, response_tokens) -> tuple:
    response = [1] * response_tokens
    example = TripletTokens(short_prompt=[1] * (short_tokens - response_tokens),
                            long_prompt=[1] * (long_tokens - response_tokens),
                            chosen=response, rejected=response, index=0)
    batch = pack_triplets([example], MODE_ROLES[config.objective.mode], pad_multiple=pad,
                          shared_prefix=config.data.shared_prefix)
    return segment_layouts(batch)


def _extend(a: SegmentLayout, b: SegmentLayout, times: int) -> SegmentLayout:
    """``a`` moved ``times`` more steps of ``b - a`` (each field; unchanged where equal)."""
    def move(x, y):
        return x + times * (y - x)
    hidden = None if a.hidden_keys is None else tuple(
        move(x, y) for x, y in zip(a.hidden_keys, b.hidden_keys))
    spans = tuple((move(s, t), move(e, f)) for (s, e), (t, f) in zip(a.response_spans,
                                                                     b.response_spans))
    return SegmentLayout(move(a.length, b.length), hidden, spans)


def recompute_overhead(shape: ModelShape, segments: tuple, recompute: str, method: str = "uniform",
                       num_layers: int = 1, pp: int = 1) -> float:
    """Extra compute of a recompute setting as a fraction of the step's model FLOPs."""
    if recompute == "none":
        return 0.0
    model_flops = training_step_flops(shape, [(s.length, sum(e - b for b, e in s.response_spans),
                                               s.hidden_keys) for s in segments])
    q, d = shape.num_attention_heads, shape.kv_channels
    if recompute == "selective":
        extra = sum(2 * 2 * hidden_key_pairs(s.length, s.hidden_keys or (s.length, s.length))
                    * q * d for s in segments) * shape.num_layers
        return extra / model_flops
    logits = sum(2 * shape.hidden_size * shape.vocab_size * (e - b)
                 for s in segments for b, e in s.response_spans)
    layers_forward = model_flops / 3 - logits
    per_stage = shape.num_layers / pp
    share = 1.0 if method == "uniform" else min(num_layers, per_stage) / per_stage
    return layers_forward * share / model_flops


@dataclass(frozen=True)
class PlanRow:
    tp: int
    pp: int
    cp: int
    dp: int
    recompute: str
    optimizer_cpu_offload: bool
    total_gib: float
    extra_compute: float
    """Recompute's added FLOPs over the step's model FLOPs (0.33 = a third more compute)."""
    sequence_parallel_saving_gib: Optional[float] = None

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("tp", "pp", "cp", "dp", "recompute",
                                              "optimizer_cpu_offload")}
        out.update(total_gib=round(self.total_gib, 1),
                   extra_compute_pct=round(100 * self.extra_compute, 1))
        if self.sequence_parallel_saving_gib is not None:
            out["sequence_parallel_saving_gib"] = round(self.sequence_parallel_saving_gib, 2)
        return out


def cost_key(row: PlanRow) -> tuple:
    return (round(row.extra_compute, 4), row.optimizer_cpu_offload, row.tp * row.pp * row.cp,
            row.total_gib)


def settings(common: dict) -> list[tuple]:
    """Every (recompute, optimizer CPU offload) pair; offload only with the distributed
    optimizer (megatron-core's hybrid offload needs it)."""
    offloads = (False, True) if common.get("distributed_optimizer", True) else (False,)
    return list(itertools.product(RECOMPUTE_SETTINGS, offloads))


def enumerate_plan(shape: ModelShape, world_size: int, make_microbatch: Callable[[int, int], dict],
                   common: dict, only: Optional[list] = None,
                   with_saving: bool = True) -> list[PlanRow]:
    """Every layout of ``world_size`` the model's heads and layers allow, under every
    :func:`settings` pair (or ``only`` those), cheapest first. ``make_microbatch(cp, tp)`` gives
    the microbatch padded for that layout; ``common``: the other :class:`EstimateInputs` fields
    (recompute and offload excluded)."""
    rows = []
    for tp, cp, pp in itertools.product(TP_SIZES, CP_SIZES, PP_SIZES):
        if shape.num_attention_heads % tp or shape.num_query_groups % tp or \
                world_size % (tp * cp * pp) or shape.num_layers % pp:
            continue
        batch = make_microbatch(cp, tp)
        for recompute, offload in only or settings(common):
            inputs = EstimateInputs(tp=tp, pp=pp, cp=cp, dp=world_size // (tp * cp * pp),
                                    recompute=recompute, optimizer_cpu_offload=offload,
                                    **batch, **common)
            total = estimate_memory(shape, inputs)["total_gib"]
            saving = sequence_parallel_saving_gib(shape, inputs) \
                if with_saving and sequence_parallel_on(inputs) else None
            extra = recompute_overhead(shape, batch["segments"], recompute,
                                       common.get("recompute_method", "uniform"),
                                       common.get("recompute_num_layers", 1), pp)
            rows.append(PlanRow(tp, pp, cp, world_size // (tp * cp * pp), recompute, offload,
                                total, extra, saving))
    return sorted(rows, key=cost_key)


def longest_trainable(shape: ModelShape, world_size: int, device_gib: float,
                      make_microbatch: Callable[[int, int, int], dict], common: dict,
                      shortest: int, step_tokens: int = 1024,
                      longest: int = 1 << 20) -> dict:
    """Per (recompute, offload) setting: the longest long segment (a multiple of
    ``step_tokens``, up to ``longest``) that some layout fits, and that layout.
    ``make_microbatch(long_tokens, cp, tp)``."""
    out = {}
    for recompute, offload in settings(common):
        def best(long_tokens, recompute=recompute, offload=offload):
            fitting = [r for r in enumerate_plan(
                shape, world_size, lambda cp, tp: make_microbatch(long_tokens, cp, tp), common,
                only=[(recompute, offload)], with_saving=False) if r.total_gib <= device_gib]
            return fitting[0] if fitting else None

        name = _setting_name(recompute, offload)
        if best(shortest) is None:
            out[name] = None
            continue
        lo, hi = 0, longest // step_tokens  # lo*step fits (0: only `shortest`), hi+1 does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if mid * step_tokens >= shortest and best(mid * step_tokens) is not None:
                lo = mid
            elif mid * step_tokens < shortest:
                lo = mid
            else:
                hi = mid - 1
        tokens = max(lo * step_tokens, shortest)
        out[name] = {"long_tokens": tokens, "layout": best(tokens).as_dict(),
                     "at_search_limit": lo == longest // step_tokens}
    return out


def _setting_name(recompute: str, offload: bool) -> str:
    return f"recompute={recompute}" + (", optimizer CPU offload" if offload else "")


def positions_report(shape: ModelShape, long_tokens: int, source: Optional[str]) -> dict:
    """Whether the model's positions reach ``long_tokens``, and the fix when not (the same words
    as the trainer's and preprocess's refusal: :mod:`solopo_mcore.models.positions`)."""
    from solopo_mcore.models.positions import (position_limit_fix, position_limit_text,
                                               trained_positions, unscaled_extension_warning)

    trained = trained_positions(shape) or shape.max_position_embeddings
    out = {"usable_positions": shape.usable_positions, "trained_positions": trained,
           "rope_scaling": shape.rope_scaling, "fits": long_tokens <= shape.usable_positions,
           "warning": unscaled_extension_warning(shape, source or "config.json")}
    if not out["fits"]:
        out["message"] = (
            f"{long_tokens} tokens is {long_tokens / trained:.3g}x the model's {trained} trained "
            f"positions, past its {position_limit_text(shape)}: the trainer refuses such data. "
            f"Fix: " + position_limit_fix(shape, long_tokens, "shorten the long contexts"))
    return out


def describe(report: dict) -> str:
    """:func:`examples/estimate_memory.py`'s report as lines and tables."""
    layout, gib, positions = report["recipe_layout"], report["per_gpu_gib"], report["positions"]
    sp = "on" if layout["sequence_parallel"] else "off"
    offload = ", optimizer CPU offload" if layout["optimizer_cpu_offload"] else ""
    scaling = positions["rope_scaling"]
    lines = [
        f"{report['model']}, mode {report['mode']}, shared prefix "
        f"{'on' if report['shared_prefix'] else 'off'}, activations "
        f"{report.get('activation_memory', 'lean')}: {report['microbatch_tokens']} tokens "
        f"per microbatch ({report['long_tokens']}-token long segments)",
        f"positions: {positions['usable_positions']} usable" + (
            f" (YaRN factor {scaling['factor']:g} x {scaling['original_max_position_embeddings']}"
            f" trained)" if scaling and scaling["rope_type"] == "yarn" else "") + (
            " -> OK" if positions["fits"] else " -> TOO SHORT"),
    ]
    if not positions["fits"]:
        lines.append("  " + positions["message"])
    if positions["warning"]:
        lines.append("  WARNING: " + positions["warning"])
    lines += [
        f"recipe layout TP{layout['tp']} PP{layout['pp']} CP{layout['cp']} DP{layout['dp']} "
        f"(sequence parallel {sp}, recompute {layout['recompute']}{offload}): "
        f"{gib['total_gib']:.1f} GiB per GPU of {report['device_gib']:g} -> "
        f"{'fits' if report['fits'] else 'DOES NOT FIT'}",
        "  " + ", ".join(f"{k[:-4]} {v:.1f}" for k, v in gib.items()
                         if k not in ("total_gib", "tensors_gib")) + " (GiB)",
    ]
    if layout["tp"] > 1:
        lines.append(f"  sequence parallelism saves {report['sequence_parallel_saving_gib']:.1f} "
                     f"GiB per GPU here")
    rows = report["plan"]
    if rows:
        lines += [f"what fits, cheapest first ({len(rows)} settings; extra compute = the FLOPs "
                  f"recompute adds to a step; optimizer CPU offload adds host transfers and a "
                  f"CPU optimizer step, not predicted here, so it ranks after the same setting "
                  f"without it):",
                  "   TP  PP  CP  DP  recompute  offload  GiB/GPU  extra compute"]
        lines += [f"  {r['tp']:3d} {r['pp']:3d} {r['cp']:3d} {r['dp']:3d}  {r['recompute']:9s}  "
                  f"{'yes' if r['optimizer_cpu_offload'] else 'no':7s}  {r['total_gib']:7.1f}  "
                  f"{r['extra_compute_pct']:+6.1f}%" for r in rows[:12]]
        if len(rows) > 12:
            lines.append(f"  ... {len(rows) - 12} more (--json)")
    else:
        miss = report["nearest_miss"]
        world = layout["tp"] * layout["pp"] * layout["cp"] * layout["dp"]
        shorter = any(report["longest_trainable"].values())
        lines.append(
            f"nothing fits {report['device_gib']:g} GiB per GPU on {world} "
            f"GPU{'s' if world > 1 else ''} at this length: nearest miss TP{miss['tp']} "
            f"PP{miss['pp']} CP{miss['cp']} DP{miss['dp']} recompute {miss['recompute']}"
            f"{', offload' if miss['optimizer_cpu_offload'] else ''} at "
            f"{miss['total_gib']:.1f} GiB ({miss['over_by_gib']:.1f} over); " + (
                "the shorter long contexts below fit, or more GPUs (a larger CP) fit this one"
                if shorter else "no length fits on this many GPUs: use more GPUs (the weights, "
                "gradients and optimizer state are divided by TP x PP, and the optimizer's by "
                "DP x CP)"))
    lines.append("longest trainable long segment per setting (tokens, best layout):")
    for name, best in report["longest_trainable"].items():
        if best is None:
            lines.append(f"  {name:42s}      none fits")
            continue
        r = best["layout"]
        note = "" if best["long_tokens"] <= positions["usable_positions"] else \
            " (past the usable positions)"
        at_least = ">=" if best.get("at_search_limit") else "  "
        lines.append(f"  {name:42s} {at_least}{best['long_tokens']:8d}  TP{r['tp']} PP{r['pp']} "
                     f"CP{r['cp']} DP{r['dp']} {r['total_gib']:.1f} GiB{note}")
    lines.append("(--json prints every figure)")
    return "\n".join(lines)
