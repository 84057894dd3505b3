"""Context-parallel helpers: the zigzag layout, a differentiable K/V all-gather, CP-sum reductions.

Layout (the one Transformer Engine's THD context parallelism uses): every packed segment is padded
to a multiple of ``2 * cp`` tokens and cut into ``2 * cp`` equal chunks; CP rank ``r`` holds chunks
``r`` and ``2*cp - 1 - r`` of every segment, concatenated segment by segment. Causal attention work
is then the same on every rank.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from solopo_mcore.platform import is_gloo


def zigzag_local_index(padded_seqlens: list[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices into the packed global sequence of the tokens CP rank ``cp_rank`` holds."""
    return torch.as_tensor(_zigzag_local_index(tuple(padded_seqlens), cp_size, cp_rank))


@functools.lru_cache(maxsize=64)
def _zigzag_local_index(padded_seqlens: tuple, cp_size: int, cp_rank: int) -> list:
    parts = []
    start = 0
    for length in padded_seqlens:
        if length % (2 * cp_size):
            raise ValueError(f"segment length {length} is not a multiple of 2*cp={2 * cp_size}")
        chunk = length // (2 * cp_size)
        for j in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.extend(range(start + j * chunk, start + (j + 1) * chunk))
        start += length
    return parts


def split_for_cp_rank(tensor: torch.Tensor, padded_seqlens: list[int], cp_size: int,
                      cp_rank: int, dim: int = -1) -> torch.Tensor:
    """The part of a packed global tensor (segments along ``dim``) that ``cp_rank`` holds."""
    if cp_size == 1:
        return tensor
    index = zigzag_local_index(padded_seqlens, cp_size, cp_rank).to(tensor.device)
    return tensor.index_select(dim, index)


@functools.lru_cache(maxsize=64)
def _gathered_to_global(local_seqlens: tuple, cp_size: int) -> list:
    """Index into ``cat(all_gathered_local)`` that yields the global (unsplit) token order."""
    local_total = sum(local_seqlens)
    order = []
    local_start = 0
    for local_len in local_seqlens:
        half = local_len // 2
        # Global chunk j < cp sits in rank j's first half; chunk j >= cp in rank (2cp-1-j)'s second.
        for j in range(2 * cp_size):
            rank, offset = (j, 0) if j < cp_size else (2 * cp_size - 1 - j, half)
            base = rank * local_total + local_start + offset
            order.extend(range(base, base + half))
        local_start += local_len
    return order


def gathered_to_global_index(local_seqlens: list[int], cp_size: int,
                             device: torch.device) -> torch.Tensor:
    return torch.as_tensor(_gathered_to_global(tuple(local_seqlens), cp_size), device=device)


def gather_first_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """All-gather equal-size tensors along dim 0 (no autograd): ``[world * n, ...]``."""
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    if is_gloo(group):  # gloo has no all_gather_into_tensor
        dist.all_gather(list(out.chunk(world)), tensor, group=group)
    else:
        dist.all_gather_into_tensor(out, tensor, group=group)
    return out


class _AllGatherFirstDim(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradient over the group and keeps this rank's
    slice (reduce-scatter on NCCL, all-reduce + slice where the backend lacks reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return gather_first_dim(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        grad = grad.contiguous()
        if is_gloo(group):  # gloo has no reduce_scatter_tensor
            dist.all_reduce(grad, group=group)
            return grad.chunk(world)[rank].contiguous(), None
        out = torch.empty((grad.shape[0] // world, *grad.shape[1:]), dtype=grad.dtype,
                          device=grad.device)
        dist.reduce_scatter_tensor(out, grad, group=group)
        return out, None


def all_gather_first_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    return _AllGatherFirstDim.apply(tensor, group)


class _SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce SUM. Backward: identity.

    Every rank of the group computes the same loss from the summed value, so each rank's local
    addend receives exactly dL/d(sum); the group's gradient contributions are then added by the
    data-parallel gradient reduce (which runs over the DP x CP group)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_group(tensor: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-reduce SUM whose backward is the identity (see :class:`_SumOverGroup`)."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _SumOverGroup.apply(tensor, group)
