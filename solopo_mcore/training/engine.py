"""The model as the trainer drives it: one forward(/backward) over a global batch through
Megatron's ``get_forward_backward_func`` (DDP wrapping is in :mod:`solopo_mcore.stack`). Shared by training, evaluation, the
reference-log-prob pre-pass and the profiler."""

from __future__ import annotations

from typing import Sequence

from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.utils import get_model_config

from solopo_mcore.data.packing import PackedMicrobatch, pad_to_length
from solopo_mcore.parallel.layout import check_interleaved_microbatches
from solopo_mcore.platform import default_device, is_gloo


def run_global_batch(model: list, forward_step, microbatches: Sequence[PackedMicrobatch],
                     pg_collection, forward_only: bool = False,
                     collect_non_loss_data: bool = False, optimizer=None) -> list:
    """Forward (and backward unless ``forward_only``) over this rank's microbatches.

    Before a backward the gradients start from zero as in Megatron's training loop: the DDP
    buffers are zeroed and, given the ``optimizer`` that will step, ``optimizer.zero_grad()``
    drops the ``param.grad`` references it left (megatron-core's plain fp32 optimizer points them
    at the DDP buffer; kept, autograd would add the first microbatch's gradient into the buffer
    and DDP's hook would add it again).

    ``microbatches`` are already cut for this rank's CP slice. Returns the loss function's
    outputs on the last pipeline stage (one per microbatch), [] elsewhere. With
    ``collect_non_loss_data`` (forward-only) the loss function is called with
    ``non_loss_data=True`` and whatever it returns is collected as is."""
    device = default_device()
    if not forward_only:
        check_interleaved_microbatches(pg_collection.pp.size(), len(model), len(microbatches))
    if len(model) > 1 and is_gloo(pg_collection.pp):
        # Interleaved pipeline on gloo: ranks exchange activations in both directions with the
        # same peer and tag; gloo then matches messages by order, which needs equal sizes. Pad
        # microbatches to one length (every rank of a pipeline holds the same microbatches, so the
        # same max). NCCL needs no padding.
        longest = max(int(mb.tokens.shape[1]) for mb in microbatches)
        microbatches = [pad_to_length(mb, longest) for mb in microbatches]
    batches = [mb.to(device) for mb in microbatches]
    seq_length = max(int(mb.tokens.shape[1]) for mb in batches)
    if not forward_only:
        for chunk in model:
            chunk.zero_grad_buffer()
        if optimizer is not None:
            optimizer.zero_grad()
    iterators = [iter(batches) for _ in model] if len(model) > 1 else iter(batches)
    pp_size = pg_collection.pp.size()
    forward_backward = get_forward_backward_func(
        pp_size=pp_size, vp_size=len(model) if len(model) > 1 else None)
    extra = {}
    if pp_size > 1:
        extra["p2p_communicator"] = P2PCommunicator(pg_collection.pp, get_model_config(model[0]))
    return forward_backward(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
        pg_collection=pg_collection,
        **extra,
    )
