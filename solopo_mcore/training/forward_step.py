"""``forward_step`` and ``loss_func`` for Megatron's ``get_forward_backward_func``.

Loss scaling — the one place it is decided
------------------------------------------
The objective is the mean of the per-example loss over the global batch. Megatron's schedule
would otherwise divide each microbatch's loss by ``num_microbatches`` and multiply it by the CP
size, and DDP would average gradients over DP x CP ranks; none of those equal "divide by the
number of examples". So the model config sets ``calculate_per_token_loss=True`` (builder.py), and:

* ``loss_func`` returns the *sum* of per-example losses in its microbatch and, as the "token"
  count, the number of examples — from CP rank 0 only, because ``finalize_model_grads`` sums the
  count over the DP x CP group and every CP rank holds the same examples;
* the schedule then leaves the loss unscaled, DDP sums gradients over DP x CP, and
  ``finalize_model_grads`` divides them by the global example count.

Per-response log-prob sums are first summed over the CP group with an identity backward
(:func:`solopo_mcore.parallel.context.sum_over_group`), so each CP rank back-propagates
``dL/dS`` into its own tokens and the DP x CP gradient sum adds the parts up exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional

import numpy as np

import torch
import torch.distributed as dist

from solopo_mcore.config import ObjectiveConfig
from solopo_mcore.data.packing import PackedMicrobatch
from solopo_mcore.losses.objective import SequenceStats, solopo_objective
from solopo_mcore.parallel.context import sum_over_group
from solopo_mcore.platform import without_cuda_rewrite


def response_logp_sums(token_logps: torch.Tensor, batch: PackedMicrobatch, cp_group
                       ) -> torch.Tensor:
    """Complete per-response log-prob sums ``[R]`` (TP already reduced; CP here)."""
    local = torch.zeros(batch.num_responses, dtype=token_logps.dtype, device=token_logps.device)
    local = local.index_add(0, batch.loss_token_response, token_logps)
    return sum_over_group(local, cp_group)


@dataclass
class ResponseLogps:
    """Complete (TP- and CP-reduced) log-prob sums of one microbatch's responses."""

    sums: torch.Tensor
    """[R] sum of log p(response token) per response."""
    example_index: torch.Tensor
    """[R] dataset index of each response's example."""
    role: torch.Tensor
    """[R] Role of each response."""

    @classmethod
    def of(cls, response_sums: torch.Tensor, batch: PackedMicrobatch) -> "ResponseLogps":
        return cls(response_sums.detach(), batch.example_index[batch.response_example],
                   batch.response_role)

    def scatter_into(self, table: np.ndarray) -> None:
        """``table[example_index, role] = sums`` (a dataset-wide ``[N, 4]`` table)."""
        table[self.example_index.cpu().numpy(), self.role.cpu().numpy()] = \
            self.sums.float().cpu().numpy()


def sequence_stats(response_sums: torch.Tensor, batch: PackedMicrobatch) -> SequenceStats:
    """Arrange per-response sums into ``[num_examples, 4]`` role tables."""
    shape = (batch.num_examples, 4)
    where = (batch.response_example, batch.response_role)
    logp = torch.zeros(shape, dtype=response_sums.dtype, device=response_sums.device)
    logp = logp.index_put(where, response_sums)
    ntok = torch.zeros(shape, dtype=torch.long, device=response_sums.device)
    ntok = ntok.index_put(where, batch.response_num_tokens)
    ref = batch.ref_logp_sum.to(response_sums.dtype) if batch.ref_logp_sum is not None else None
    return SequenceStats(logp_sum=logp, num_tokens=ntok, ref_logp_sum=ref)


def loss_func(batch: PackedMicrobatch, objective: ObjectiveConfig, mode: str, cp_group,
              response_sink: Optional[list], token_logps: torch.Tensor):
    """Megatron loss function: returns ``(loss_sum, num_examples, metrics)`` (see module doc).
    With a ``response_sink`` list, the microbatch's :class:`ResponseLogps` is appended to it."""
    response_sums = response_logp_sums(token_logps.float(), batch, cp_group)
    if response_sink is not None:
        response_sink.append(ResponseLogps.of(response_sums, batch))
    stats = sequence_stats(response_sums, batch)
    per_example, metrics = solopo_objective(stats, objective, mode)
    cp_rank = cp_group.rank() if cp_group is not None else 0
    num_examples = torch.tensor(batch.num_examples if cp_rank == 0 else 0, dtype=torch.int,
                                device=per_example.device)
    count = torch.tensor(float(batch.num_examples), device=per_example.device)
    reported = {key: torch.stack([value.detach().float().sum(), count])
                for key, value in metrics.items()}
    return per_example.sum(), num_examples, reported


def _forward(model, batch: PackedMicrobatch, cp_group) -> torch.Tensor:
    with without_cuda_rewrite():
        return model(batch.tokens, None, None, labels=batch.labels, loss_mask=batch.loss_mask,
                     packed_seq_params=batch.packed_seq_params(cp_group))


def _unrewritten(func: Callable) -> Callable:
    """``func`` run outside the CPU path's torch-function mode (platform.without_cuda_rewrite)."""
    @functools.wraps(func)
    def run(*args, **kwargs):
        with without_cuda_rewrite():
            return func(*args, **kwargs)
    return run


def make_forward_step(objective: ObjectiveConfig, mode: str, cp_group,
                      response_sink: Optional[list] = None) -> Callable:
    """A ``forward_step_func(data_iterator, model)`` for ``get_forward_backward_func``.

    The iterator yields :class:`PackedMicrobatch` objects already cut for this CP rank and on the
    right device. ``response_sink``: a list that collects each microbatch's :class:`ResponseLogps`
    (last pipeline stage), for callers that need the sums themselves."""

    def forward_step(data_iterator: Iterator[PackedMicrobatch], model):
        batch = next(data_iterator)
        return (_forward(model, batch, cp_group),
                _unrewritten(partial(loss_func, batch, objective, mode, cp_group, response_sink)))

    return forward_step


def _response_logps_output(batch: PackedMicrobatch, cp_group, token_logps: torch.Tensor,
                           non_loss_data: bool = True) -> ResponseLogps:
    """Forward-only "loss" function: the microbatch's response sums, no loss at all. Megatron's
    schedule calls it with ``non_loss_data=True`` under ``collect_non_loss_data``."""
    return ResponseLogps.of(response_logp_sums(token_logps.float(), batch, cp_group), batch)


def make_logprob_forward_step(cp_group) -> Callable:
    """A forward-only step whose outputs (``run_global_batch(..., collect_non_loss_data=True)``)
    are one :class:`ResponseLogps` per microbatch: what the reference pre-pass records."""

    def forward_step(data_iterator: Iterator[PackedMicrobatch], model):
        batch = next(data_iterator)
        return (_forward(model, batch, cp_group),
                _unrewritten(partial(_response_logps_output, batch, cp_group)))

    return forward_step


def reduce_metrics(microbatch_outputs: list, dp_group) -> dict:
    """Average the per-example metrics of a step's microbatches over the data-parallel group.

    Each output maps key -> ``[sum, count]``; the result maps key -> global mean. Every rank of the
    last pipeline stage returns the same dict; other stages return {}."""
    totals: dict = {}
    for output in microbatch_outputs:
        for key, value in output.items():
            totals[key] = totals.get(key, 0) + value
    if not totals:
        return {}
    keys = sorted(totals)
    stacked = torch.stack([totals[k] for k in keys])
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(stacked, group=dp_group)
    return {k: (v[0] / v[1].clamp(min=1)).item() for k, v in zip(keys, stacked)}
