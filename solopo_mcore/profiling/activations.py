"""Activation memory a forward keeps for backward, per token and layer, measured on CPU.

``forward_kept_bytes`` runs one forward and loss with autograd on (no backward) under the CPU
allocator tracker (:class:`profiling.memory.AllocatorPeakTracker`: torch profiler memory events)
and returns the bytes allocated during it that are still held at its end: every tensor autograd
keeps for backward, plus the output and loss. Two depths of the same model give the per-layer
part alone (:func:`per_token_layer`): the embedding, final norm, output layer and loss cancel.

This is the profiler's own accounting, independent of how the model decides what to keep; the
memory estimator's ``activation_table`` is checked against it (tests/test_profiling.py) and the
activation-memory guard bounds it (tests/test_activation_memory.py).
"""

from __future__ import annotations

from solopo_mcore.data.packing import PackedMicrobatch
from solopo_mcore.platform import on_cuda
from solopo_mcore.profiling.memory import AllocatorPeakTracker
from solopo_mcore.training.forward_step import make_forward_step


def forward_kept_bytes(model, batch: PackedMicrobatch, objective, mode: str, cp_group) -> int:
    """Bytes one forward + loss of ``batch`` (with grad) leaves allocated for backward (CPU).
    ``model``: one model chunk covering every layer (PP = 1)."""
    if on_cuda():
        raise RuntimeError("forward_kept_bytes measures the CPU allocator; on a GPU read "
                           "torch.cuda.memory_allocated() around the forward instead")
    forward_step = make_forward_step(objective, mode, cp_group)
    with AllocatorPeakTracker() as tracker:
        output, loss_func = forward_step(iter([batch]), model)
        loss = loss_func(output)[0]
    del output, loss_func, loss  # frees the graph and what it kept
    return tracker.net_bytes


def per_token_layer(kept_by_layers: dict, num_tokens: int) -> float:
    """Bytes kept per token and layer from ``{num_layers: forward_kept_bytes}`` at two depths."""
    (few, kept_few), (many, kept_many) = sorted(kept_by_layers.items())[:2]
    return (kept_many - kept_few) / ((many - few) * num_tokens)
