"""Profile SoLoPO against long-PO on the user's model and hardware, and find the longest long
context that trains.

Each long length runs a few full training steps (forward, backward, optimizer) per mode on
synthetic triplets of the requested lengths, alternating the modes, plus one untimed step per mode
whose peak tensor memory is measured; then it times fwd+bwd of the short segments and of the long
segment(s). The max-length search doubles the long length until a step runs out of memory, then
bisects, recovering from each out-of-memory error.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from solopo_mcore.data.packing import TripletTokens, pack_triplets
from solopo_mcore.data.schema import Role
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


def synthetic_example(short_tokens: int, long_tokens: int, response_tokens: int, vocab: int,
                      seed: int) -> TripletTokens:
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(1, vocab) for _ in range(max(n, 1))]
    return TripletTokens(short_prompt=toks(short_tokens - response_tokens),
                         long_prompt=toks(long_tokens - response_tokens),
                         chosen=toks(response_tokens), rejected=toks(response_tokens), index=0,
                         ref_logp_sum=[-50.0] * 4)


def _tensor_peak_gib(target: "ProfileTarget", example: TripletTokens, roles, mode: str) -> float:
    """Peak tensor memory of one (untimed) training step: the CUDA allocator's maximum, or on CPU
    the tensors alive before the step plus the CPU allocator's peak during it."""
    if on_cuda():
        reset_peak()
        _timed_pass(target, example, roles, mode, with_optimizer=True)
        return memory_stats()["memory/max_allocated_gib"]
    static_bytes = sum(live_storages().values())
    with AllocatorPeakTracker() as tracker:
        _timed_pass(target, example, roles, mode, with_optimizer=True)
    return (static_bytes + tracker.peak_bytes) / GIB


def _timed_pass(target: ProfileTarget, example: TripletTokens, roles, mode: str,
                with_optimizer: bool) -> float:
    pg_collection = target.stack.pg_collection
    batch = pack_triplets([example], roles, pad_multiple=target.pad_multiple).for_cp_rank(
        pg_collection.cp.size(), pg_collection.cp.rank())
    forward_step = make_forward_step(target.objective, mode, pg_collection.cp)
    synchronize()
    start = time.time()
    run_global_batch(target.stack.model, forward_step, [batch], pg_collection)
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


def _first_step(target: ProfileTarget, example: TripletTokens, mode: str) -> None:
    """The run's very first step creates the optimizer state after backward, so its peak is not
    a steady-state one: take it untimed and unmeasured."""
    if not target.stepped:
        _timed_pass(target, example, MODE_ROLES[mode], mode, with_optimizer=True)
        target.stepped = True


def probe_length(target: ProfileTarget, mode: str, short_tokens: int, long_tokens: int) -> float:
    """Peak tensor memory (GiB) of one training step; raises out-of-memory (real, or above the
    injected limit) when it does not fit."""
    example = synthetic_example(short_tokens, long_tokens, target.response_tokens,
                                target.stack.shape.vocab_size, target.seed)
    _first_step(target, example, mode)
    peak = _tensor_peak_gib(target, example, MODE_ROLES[mode], mode)
    _check_limit(target, peak)
    return peak


def profile_length(target: ProfileTarget, modes: list, short_tokens: int, long_tokens: int,
                   num_steps: int = 3, num_warmup: int = 1) -> dict:
    """Step time, throughput, model TFLOP/s, MFU, peak memory and per-context segment times of
    each mode at one long length: ``{mode: result}``, ``None`` for a mode that ran out of memory.

    Each mode's peak comes from its own untimed step. The timed steps then alternate between the
    modes (solo, long, solo, long, ...), so a drift in the machine's speed affects all alike; the
    step time is the median."""
    shape = target.stack.shape
    example = synthetic_example(short_tokens, long_tokens, target.response_tokens,
                                shape.vocab_size, target.seed)
    peaks, rss, out = {}, {}, {}
    for mode in modes:
        try:
            with PeakRSSSampler() as sampler:
                peaks[mode] = probe_length(target, mode, short_tokens, long_tokens)
            rss[mode] = sampler.peak_gib
        except Exception as exc:  # noqa: BLE001 - an OOM setting is a result, not a crash
            if not is_oom(exc):
                raise
            out[mode] = None
            _release_memory()
    fitting = [m for m in modes if m in peaks]
    times = {m: [] for m in fitting}
    for i in range(num_warmup + num_steps):
        for mode in fitting:
            elapsed = _timed_pass(target, example, MODE_ROLES[mode], mode, with_optimizer=True)
            if i >= num_warmup:
                times[mode].append(elapsed)
    for mode in fitting:
        step = sorted(times[mode])[len(times[mode]) // 2]
        out[mode] = _result(target, example, mode, short_tokens, long_tokens, step,
                            peaks[mode], rss[mode])
        target.results.append(out[mode])
    return {m: out[m] for m in modes}


def _result(target, example, mode, short_tokens, long_tokens, step, peak, peak_rss) -> dict:
    shape = target.stack.shape
    roles = MODE_ROLES[mode]
    stats = memory_stats()
    segments = []
    for role in roles:
        prompt, response = example.segment(role)
        segments.append((len(prompt) + len(response), len(response)))
    tokens = sum(s for s, _ in segments)
    flops = training_step_flops(shape, segments)
    world = dist.get_world_size()
    dp = target.stack.pg_collection.dp.size()
    short_roles = [r for r in roles if r in (Role.SHORT_CHOSEN, Role.SHORT_REJECTED)]
    long_roles = [r for r in roles if r in (Role.LONG_CHOSEN, Role.LONG_REJECTED)]
    seg_times = {}
    for name, rs in (("short", short_roles), ("long", long_roles)):
        seg_times[f"time/{name}_segments_sec"] = (
            _timed_pass(target, example, rs, "solo_both", with_optimizer=False) if rs else 0.0)
    long_flops = training_step_flops(shape, [(long_tokens, target.response_tokens)] *
                                     len(long_roles))
    return {
        "mode": mode, "short_tokens": short_tokens, "long_tokens": long_tokens,
        "response_tokens": target.response_tokens, "step_sec": step,
        "tokens_per_sec_per_gpu": tokens * dp / step / world,
        "model_tflops_per_gpu": flops * dp / step / world / 1e12,
        "mfu": mfu(flops * dp, step, world, target.peak_tflops),
        "long_pass_mfu": (mfu(long_flops * dp, seg_times["time/long_segments_sec"], world,
                              target.peak_tflops) if long_roles else None),
        "peak_memory_gib": peak, "nvml_used_gib": stats.get("memory/nvml_used_gib"),
        "peak_rss_gib": peak_rss,
        "segment_tokens": [n for n, _ in segments],
        **{k.split("/")[1]: v for k, v in seg_times.items()},
    }


def _release_memory() -> None:
    gc.collect()
    empty_cache()


def trace_step(target: ProfileTarget, mode: str, short_tokens: int, long_tokens: int,
                path: str) -> None:
    """A torch profiler trace (Chrome JSON) of one training step of this setting."""
    example = synthetic_example(short_tokens, long_tokens, target.response_tokens,
                                target.stack.shape.vocab_size, target.seed)
    prof = torch.profiler.profile(activities=profiler_activities(), record_shapes=True)
    with silenced_native_output():
        prof.__enter__()
    try:
        _timed_pass(target, example, MODE_ROLES[mode], mode, with_optimizer=True)
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
