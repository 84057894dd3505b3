"""Build the pieces of a run from a :class:`RunConfig`: process groups, the wrapped model (with
HF or Megatron weights), the dataset, and packed microbatches. Shared by the trainer, the
reference pre-pass, the converter and the profiler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from solopo_mcore.config import RunConfig
from solopo_mcore.convert.hf_io import HFCheckpointReader
from solopo_mcore.convert.tables import load_hf_tensors_into_chunks
from solopo_mcore.data.dataset import TripletDataset
from solopo_mcore.data.packing import PackedMicrobatch, pack_triplets
from solopo_mcore.models.builder import build_model_chunks, build_transformer_config
from solopo_mcore.models.hf_config import ModelShape, read_hf_config
from solopo_mcore.parallel.layout import initialize_parallel, sequence_pad_multiple
from solopo_mcore.training.engine import wrap_ddp


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
        raise ValueError("model.hf_config_path (or checkpoint.hf_init_dir) must name an HF model "
                         "directory or config.json for the architecture")
    return path


def setup_parallel(config: RunConfig) -> tuple[ModelShape, object]:
    shape = read_hf_config(architecture_dir(config))
    if config.training.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    pgs = initialize_parallel(config.parallel, config.training.seed, shape)
    return shape, pgs


def build_model_stack(config: RunConfig, shape: ModelShape, pgs) -> ModelStack:
    tcfg = build_transformer_config(shape, config.model, config.parallel)
    chunks = build_model_chunks(shape, config.model, config.parallel, pgs, tcfg)
    model = wrap_ddp(chunks, tcfg, config.parallel, pgs)
    return ModelStack(shape, tcfg, model, pgs)


def load_hf_weights(stack: ModelStack, hf_dir: str) -> None:
    """Stream the HF checkpoint's tensors into this rank's shards (one tensor at a time).

    Call before building the optimizer: it copies the weights into its main parameters."""
    reader = HFCheckpointReader(hf_dir)
    reader.check_names(stack.shape)
    modules = [m.module for m in stack.model]
    load_hf_tensors_into_chunks(modules, reader.get, stack.shape, stack.pg_collection.tp)


def pad_multiple(config: RunConfig) -> int:
    """Segment padding for this layout (CP zigzag and sequence-parallel shares)."""
    return sequence_pad_multiple(config.parallel)


def open_dataset(config: RunConfig, shape: ModelShape, need_reference: bool) -> TripletDataset:
    dataset = TripletDataset(config.data.data_path)
    vocab = dataset.meta.get("vocab_size", 0)
    if vocab > shape.vocab_size:
        raise ValueError(f"dataset {config.data.data_path} was tokenized with {vocab} tokens, more "
                         f"than the model's vocab_size {shape.vocab_size}")
    if need_reference:
        dataset.attach_reference(config.data.ref_logprobs_path)
    return dataset


def make_microbatches(dataset: TripletDataset, index_lists: Sequence[Sequence[int]], roles,
                      pgs, multiple: int) -> list[PackedMicrobatch]:
    """Pack each list of example indices and cut it for this rank's CP slice."""
    cp_size, cp_rank = pgs.cp.size(), pgs.cp.rank()
    return [pack_triplets([dataset[i] for i in indices], roles, pad_multiple=multiple,
                          pad_token_id=dataset.pad_token_id).for_cp_rank(cp_size, cp_rank)
            for indices in index_lists]


def split_indices(num_examples: int, num_eval: int) -> tuple[range, range]:
    if num_eval >= num_examples:
        raise ValueError(f"data.num_eval_examples={num_eval} leaves no training examples "
                         f"(dataset has {num_examples})")
    return range(0, num_examples - num_eval), range(num_examples - num_eval, num_examples)


def chunk_list(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def maybe_export(stack: ModelStack, out_dir: Optional[str], source_dir: Optional[str]) -> None:
    if out_dir:
        from solopo_mcore.convert.hf_io import export_hf
        export_hf(stack.model, stack.shape, out_dir, stack.pg_collection, source_dir=source_dir)
