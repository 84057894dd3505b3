"""The model stack every entry point builds: process groups, the Megatron model chunks wrapped in
Megatron's DDP, HF weights streamed in through the conversion tables, and HF export.

Shared by training, the reference pre-pass, the converter, the profiler and evaluation. It sits
beside ``training`` and ``convert`` rather than in either, so neither package imports the other
for it (``training`` never imports ``convert``; both use ``storage`` for checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.transformer.transformer_config import TransformerConfig

from solopo_mcore.config import ConfigError, ParallelConfig, RunConfig
from solopo_mcore.convert.hf_io import HFCheckpointReader, export_hf
from solopo_mcore.convert.tables import load_hf_tensors_into_chunks
from solopo_mcore.models.builder import build_model_chunks, build_transformer_config
from solopo_mcore.models.hf_config import ModelShape
from solopo_mcore.models.positions import model_shape
from solopo_mcore.models.layout_fit import check_model_fits_layout
from solopo_mcore.parallel.layout import initialize_parallel
from solopo_mcore.platform import default_device


@dataclass
class ModelStack:
    shape: ModelShape
    config: object
    """Megatron TransformerConfig."""
    model: list
    """DDP-wrapped chunks (one per virtual pipeline stage)."""
    pg_collection: object


def architecture_dir(config: RunConfig) -> str:
    path = config.model.hf_config_path or config.checkpoint.hf_init_dir
    if path is None:
        raise ConfigError("model.hf_config_path (or checkpoint.hf_init_dir) must name an HF model "
                         "directory or config.json for the architecture")
    return path


def setup_parallel(config: RunConfig) -> tuple[ModelShape, object]:
    shape = model_shape(architecture_dir(config), config.model.rope_scaling.as_hf())
    if config.training.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    check_model_fits_layout(shape, config.parallel)
    pg_collection = initialize_parallel(config.parallel, config.training.seed,
                                        config.distributed.timeout_minutes)
    return shape, pg_collection


def build_model_stack(config: RunConfig, shape: ModelShape, pg_collection) -> ModelStack:
    tcfg = build_transformer_config(shape, config.model, config.parallel)
    chunks = build_model_chunks(shape, config.model, config.parallel, pg_collection, tcfg)
    model = wrap_ddp(chunks, tcfg, config.parallel, pg_collection)
    return ModelStack(shape, tcfg, model, pg_collection)


def load_hf_weights(stack: ModelStack, hf_dir: str) -> None:
    """Stream the HF checkpoint's tensors into this rank's shards (one tensor at a time).

    Call before building the optimizer: it copies the weights into its main parameters."""
    reader = HFCheckpointReader(hf_dir)
    reader.check_names(stack.shape)
    modules = [m.module for m in stack.model]
    load_hf_tensors_into_chunks(modules, reader.source, stack.shape, stack.pg_collection.tp)


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


def maybe_export(stack: ModelStack, out_dir: Optional[str], source_dir: Optional[str]) -> None:
    """Export an HF checkpoint to ``out_dir`` when one is asked for (collective)."""
    if out_dir:
        export_hf(stack.model, stack.shape, out_dir, stack.pg_collection, source_dir=source_dir)
