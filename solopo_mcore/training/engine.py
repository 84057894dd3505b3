"""The model as the trainer drives it: Megatron DDP wrapping and one forward(/backward) over a
global batch through ``get_forward_backward_func``. Shared by training, evaluation, the
reference-log-prob pre-pass and the profiler."""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.utils import get_model_config
from megatron.core.transformer.transformer_config import TransformerConfig

from solopo_mcore.config import ParallelConfig
from solopo_mcore.data.packing import PackedMicrobatch, pad_to_length
from solopo_mcore.platform import default_device, is_gloo


def wrap_ddp(chunks: list, config: TransformerConfig, parallel: ParallelConfig,
             pg_collection) -> list:
    """Wrap model chunks in Megatron's DDP (fp32 grad buffers; optional overlap)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None if parallel.overlap_grad_reduce else 10**12,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        chunk.to(default_device())
        wrapped.append(DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk,
            disable_bucketing=(i > 0), pg_collection=pg_collection))
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    if parallel.overlap_param_gather and parallel.use_distributed_optimizer:
        config.param_sync_func = [m.start_param_sync for m in wrapped] if len(wrapped) > 1 \
            else wrapped[0].start_param_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def run_global_batch(model: list, forward_step, microbatches: Sequence[PackedMicrobatch],
                     pg_collection, forward_only: bool = False,
                     collect_non_loss_data: bool = False) -> list:
    """Forward (and backward unless ``forward_only``) over this rank's microbatches.

    ``microbatches`` are already cut for this rank's CP slice. Returns the loss function's
    outputs on the last pipeline stage (one per microbatch), [] elsewhere. With
    ``collect_non_loss_data`` (forward-only) the loss function is called with
    ``non_loss_data=True`` and whatever it returns is collected as is."""
    device = default_device()
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
