"""Profile SoLoPO against long-PO on the user's model and hardware, and find the longest long
context that trains.

What is compared are *variants*: a mode (``solo``, ``solo_both``, ``long``, ``short``) packed with
or without shared prefixes (``data.shared_prefix``; ``models/shared_prefix.py``), written
``MODE/shared`` or ``MODE/unshared`` (:func:`parse_variants`). Each long length runs a few full
training steps (forward, backward, optimizer) per variant on synthetic triplets of the requested
lengths, alternating the variants, plus one untimed step per variant whose peak tensor memory is
measured; then it times fwd+bwd of the short segments and of the long segment(s), packed as the
variant packs them. Tokens and FLOPs come from the variant's packed microbatch
(``PackedMicrobatch.segment_shapes``): a shared segment runs its context once. The max-length
search doubles the long length until a step runs out of memory, then bisects, recovering from
each out-of-memory error.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from solopo_mcore.config import ConfigError
from solopo_mcore.data.packing import PackedMicrobatch, TripletTokens, pack_triplets
from solopo_mcore.roles import Role
from solopo_mcore.losses.objective import MODE_ROLES
from solopo_mcore.platform import empty_cache, on_cuda, profiler_activities, synchronize
from solopo_mcore.profiling.flops import mfu, training_step_flops
from solopo_mcore.profiling.memory import (GIB, AllocatorPeakTracker, PeakRSSSampler,
                                           live_storages, memory_stats, reset_peak,
                                           silenced_native_output)
from solopo_mcore.training.engine import run_global_batch
from solopo_mcore.training.forward_step import make_forward_step


class SimulatedOOM(torch.OutOfMemoryError if hasattr(torch, "OutOfMemoryError") else RuntimeError):
    """Raised when an injected memory limit (``memory_limit_gib``) is exceeded."""


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (SimulatedOOM, getattr(torch, "OutOfMemoryError", ()))) or \
        "out of memory" in str(exc).lower()


SHARING = {"shared": True, "unshared": False}

#: What the profiler compares by default: SoLoPO and solo_both (with the run's
#: ``data.shared_prefix``) against long-PO without sharing (the paper's baseline) and with it
#: (the strongest honest baseline).
DEFAULT_VARIANTS = "solo,solo_both,long/unshared,long/shared"


@dataclass(frozen=True)
class Variant:
    """One profiled setting: a mode, packed with or without shared prefixes."""

    mode: str
    shared_prefix: bool

    @property
    def name(self) -> str:
        """``MODE/shared`` or ``MODE/unshared``: the key of its results."""
        return f"{self.mode}/{'shared' if self.shared_prefix else 'unshared'}"

    @property
    def file_stem(self) -> str:
        """The name in file names (no slash)."""
        return self.name.replace("/", "-")

    @property
    def roles(self) -> tuple:
        return MODE_ROLES[self.mode]


def parse_variants(text: str, default_shared_prefix: bool) -> list:
    """``--modes`` entries, comma-separated: ``MODE`` (packed as the run's ``data.shared_prefix``,
    ``default_shared_prefix``), ``MODE/shared`` or ``MODE/unshared``. Duplicates are dropped."""
    variants = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        mode, slash, sharing = entry.partition("/")
        if mode not in MODE_ROLES or ((slash or sharing) and sharing not in SHARING):
            raise ConfigError(
                f"--modes entry {entry!r}: expected MODE, MODE/shared or MODE/unshared with MODE "
                f"one of {', '.join(MODE_ROLES)}, e.g. --modes {DEFAULT_VARIANTS}")
        variant = Variant(mode, SHARING[sharing] if sharing else bool(default_shared_prefix))
        if variant not in variants:
            variants.append(variant)
    if not variants:
        raise ConfigError(f"--modes {text!r} names no mode: give MODE, MODE/shared or "
                          f"MODE/unshared entries, e.g. --modes {DEFAULT_VARIANTS}")
    return variants


@dataclass
class ProfileTarget:
    """What the profiler drives: a built model stack, its optimizer and the run's objective."""

    stack: object
    optimizer: object
    objective: object
    pad_multiple: int = 1
    response_tokens: int = 128
    seed: int = 0
    memory_limit_gib: Optional[float] = None
    """Inject an out-of-memory error when the measured peak exceeds this (tests, planning)."""
    peak_tflops: Optional[float] = None
    results: list = field(default_factory=list)
    stepped: bool = False
    """Whether the optimizer has taken a step (its state exists)."""
    static_bytes: Optional[int] = None
    """CPU: bytes of the tensors alive between steps (weights, gradient buffers, optimizer
    state), counted once after the first step: they do not change after it, and counting them
    walks every Python object (~0.5 s a probe)."""


def synthetic_example(short_tokens: int, long_tokens: int, response_tokens: int, vocab: int,
                      seed: int) -> TripletTokens:
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(1, vocab) for _ in range(max(n, 1))]
    return TripletTokens(short_prompt=toks(short_tokens - response_tokens),
                         long_prompt=toks(long_tokens - response_tokens),
                         chosen=toks(response_tokens), rejected=toks(response_tokens), index=0,
                         ref_logp_sum=[-50.0] * 4)


def pack_variant(target: "ProfileTarget", example: TripletTokens, variant: Variant,
                 roles=None) -> PackedMicrobatch:
    """The global (unsplit) microbatch ``variant`` runs for ``example`` (``roles``: a subset of
    its roles, e.g. only the long ones, packed the same way)."""
    return pack_triplets([example], variant.roles if roles is None else roles,
                         pad_multiple=target.pad_multiple, shared_prefix=variant.shared_prefix)


def _tensor_peak_gib(target: "ProfileTarget", example: TripletTokens, variant: Variant) -> float:
    """Peak tensor memory of one (untimed) training step: the CUDA allocator's maximum, or on CPU
    the tensors alive before the step plus the CPU allocator's peak during it."""
    if on_cuda():
        reset_peak()
        _timed_pass(target, example, variant, with_optimizer=True)
        return memory_stats()["memory/max_allocated_gib"]
    if target.static_bytes is None or not target.stepped:
        target.static_bytes = sum(live_storages().values())
    with AllocatorPeakTracker() as tracker:
        _timed_pass(target, example, variant, with_optimizer=True)
    return (target.static_bytes + tracker.peak_bytes) / GIB


def _timed_pass(target: ProfileTarget, example: TripletTokens, variant: Variant,
                with_optimizer: bool, roles=None) -> float:
    """Seconds of one fwd+bwd (and optimizer step) of ``variant``'s packing of ``example``
    (``roles``: only these of its roles, for the per-context segment times)."""
    pg_collection = target.stack.pg_collection
    batch = pack_variant(target, example, variant, roles).for_cp_rank(
        pg_collection.cp.size(), pg_collection.cp.rank())
    forward_step = make_forward_step(target.objective, variant.mode if roles is None
                                     else "solo_both", pg_collection.cp)
    synchronize()
    start = time.time()
    run_global_batch(target.stack.model, forward_step, [batch], pg_collection,
                     optimizer=target.optimizer if with_optimizer else None)
    if with_optimizer:
        target.optimizer.step()
    synchronize()
    return time.time() - start


def _check_limit(target: ProfileTarget, peak: float) -> None:
    if target.memory_limit_gib is not None:
        flag = torch.tensor([float(peak > target.memory_limit_gib)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            raise SimulatedOOM(f"peak {peak:.2f} GiB > injected limit {target.memory_limit_gib}")


def _first_step(target: ProfileTarget, example: TripletTokens, variant: Variant) -> None:
    """The run's very first step creates the optimizer state after backward, so its peak is not
    a steady-state one: take it untimed and unmeasured."""
    if not target.stepped:
        _timed_pass(target, example, variant, with_optimizer=True)
        target.stepped = True


def probe_length(target: ProfileTarget, variant: Variant, short_tokens: int,
                 long_tokens: int) -> float:
    """Peak tensor memory (GiB) of one training step of ``variant``; raises out-of-memory (real,
    or above the injected limit) when it does not fit."""
    example = synthetic_example(short_tokens, long_tokens, target.response_tokens,
                                target.stack.shape.vocab_size, target.seed)
    _first_step(target, example, variant)
    peak = _tensor_peak_gib(target, example, variant)
    _check_limit(target, peak)
    return peak


def profile_length(target: ProfileTarget, variants: list, short_tokens: int, long_tokens: int,
                   num_steps: int = 3, num_warmup: int = 1) -> dict:
    """Step time, throughput, model TFLOP/s, MFU, peak memory and per-context segment times of
    each variant at one long length: ``{variant name: result}``, ``None`` for a variant that ran
    out of memory.

    Each variant's peak comes from its own untimed step. The timed steps then alternate between
    the variants (solo, long, solo, long, ...), so a drift in the machine's speed affects all
    alike; the step time is the median."""
    shape = target.stack.shape
    example = synthetic_example(short_tokens, long_tokens, target.response_tokens,
                                shape.vocab_size, target.seed)
    peaks, rss, out = {}, {}, {}
    for variant in variants:
        try:
            with PeakRSSSampler() as sampler:
                peaks[variant] = probe_length(target, variant, short_tokens, long_tokens)
            rss[variant] = sampler.peak_gib
        except Exception as exc:  # noqa: BLE001 - an OOM setting is a result, not a crash
            if not is_oom(exc):
                raise
            out[variant] = None
            _release_memory()
    fitting = [v for v in variants if v in peaks]
    times = {v: [] for v in fitting}
    for i in range(num_warmup + num_steps):
        for variant in fitting:
            elapsed = _timed_pass(target, example, variant, with_optimizer=True)
            if i >= num_warmup:
                times[variant].append(elapsed)
    for variant in fitting:
        step = sorted(times[variant])[len(times[variant]) // 2]
        out[variant] = _result(target, example, variant, short_tokens, long_tokens, step,
                               peaks[variant], rss[variant])
        target.results.append(out[variant])
    return {v.name: out[v] for v in variants}


def _result(target, example, variant: Variant, short_tokens, long_tokens, step, peak,
            peak_rss) -> dict:
    shape = target.stack.shape
    roles = variant.roles
    stats = memory_stats()
    segments = pack_variant(target, example, variant).segment_shapes()
    tokens = sum(length for length, _, _ in segments)  # real tokens run (padding excluded)
    flops = training_step_flops(shape, segments)
    world = dist.get_world_size()
    dp = target.stack.pg_collection.dp.size()
    short_roles = [r for r in roles if r in (Role.SHORT_CHOSEN, Role.SHORT_REJECTED)]
    long_roles = [r for r in roles if r in (Role.LONG_CHOSEN, Role.LONG_REJECTED)]
    seg_times = {}
    for name, rs in (("short", short_roles), ("long", long_roles)):
        seg_times[f"time/{name}_segments_sec"] = (
            _timed_pass(target, example, variant, with_optimizer=False, roles=rs) if rs else 0.0)
    long_flops = (training_step_flops(shape, pack_variant(target, example, variant, long_roles)
                                      .segment_shapes()) if long_roles else 0.0)
    return {
        "variant": variant.name, "mode": variant.mode, "shared_prefix": variant.shared_prefix,
        "short_tokens": short_tokens, "long_tokens": long_tokens,
        "response_tokens": target.response_tokens, "step_sec": step,
        "tokens": tokens, "model_flops": flops,
        "tokens_per_sec_per_gpu": tokens * dp / step / world,
        "model_tflops_per_gpu": flops * dp / step / world / 1e12,
        "mfu": mfu(flops * dp, step, world, target.peak_tflops),
        "long_pass_mfu": (mfu(long_flops * dp, seg_times["time/long_segments_sec"], world,
                              target.peak_tflops) if long_roles else None),
        "peak_memory_gib": peak, "nvml_used_gib": stats.get("memory/nvml_used_gib"),
        "peak_rss_gib": peak_rss,
        "segment_tokens": [length for length, _, _ in segments],
        **{k.split("/")[1]: v for k, v in seg_times.items()},
    }


def _release_memory() -> None:
    gc.collect()
    empty_cache()


def trace_step(target: ProfileTarget, variant: Variant, short_tokens: int, long_tokens: int,
               path: str) -> None:
    """A torch profiler trace (Chrome JSON) of one training step of this setting."""
    example = synthetic_example(short_tokens, long_tokens, target.response_tokens,
                                target.stack.shape.vocab_size, target.seed)
    prof = torch.profiler.profile(activities=profiler_activities(), record_shapes=True)
    with silenced_native_output():
        prof.__enter__()
    try:
        _timed_pass(target, example, variant, with_optimizer=True)
    finally:
        with silenced_native_output():
            prof.__exit__(None, None, None)
    if dist.get_rank() == 0:
        prof.export_chrome_trace(path)


def find_max_length(fits: Callable[[int], bool], start: int, limit: int,
                    granularity: int = 1024) -> tuple[int, list]:
    """Largest length in [start, limit] (multiple of ``granularity``) for which ``fits`` holds,
    by doubling then bisecting. ``fits`` returns False (or raises an out-of-memory error) when a
    length does not fit; other errors propagate. Returns (length or 0, trials)."""
    trials = []

    def attempt(length: int) -> bool:
        try:
            ok = bool(fits(length))
        except Exception as exc:  # noqa: BLE001 - only OOM is a "no"
            if not is_oom(exc):
                raise
            ok = False
        finally:
            _release_memory()
        trials.append({"long_tokens": length, "fits": ok})
        return ok

    lo, hi = 0, None
    length = start
    while length <= limit:  # doubling
        if not attempt(length):
            hi = length
            break
        lo, length = length, length * 2
    if hi is None:  # everything fit up to the last doubling: try the limit itself
        if lo >= limit or attempt(limit):
            return max(lo, limit) if lo < limit else lo, trials
        hi = limit
    while hi - lo > granularity:  # bisect (from 0 when even the start failed)
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials
