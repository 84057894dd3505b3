"""The data side of a run from a :class:`RunConfig`: the checked dataset, the padding multiple,
and packed microbatches cut for this rank. (The model side is :mod:`solopo_mcore.stack`.)"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from solopo_mcore.config import ConfigError, RunConfig
from solopo_mcore.data.dataset import DatasetError, TripletDataset
from solopo_mcore.data.packing import PackedMicrobatch, pack_triplets
from solopo_mcore.log import warn
from solopo_mcore.models.hf_config import ModelShape, read_hf_config
from solopo_mcore.models.positions import model_shape, unscaled_extension_warning
from solopo_mcore.parallel.layout import sequence_pad_multiple
from solopo_mcore.stack import architecture_dir
from solopo_mcore.storage.integrity import weights_fingerprint


def pad_multiple(config: RunConfig) -> int:
    """Segment padding for this layout (CP zigzag and sequence-parallel shares)."""
    return sequence_pad_multiple(config.parallel)


RANDOM_INIT = "random initialisation"


def check_positions(config: RunConfig) -> ModelShape:
    """Before any process group: the run's model shape (config.json with
    ``model.rope_scaling``), a warning when its ``max_position_embeddings`` was raised without
    scaling, every dataset segment within its usable positions, and a warning when pretrained
    weights meet a from-scratch learning rate. Returns the shape."""
    override = config.model.rope_scaling.as_hf()
    shape = model_shape(architecture_dir(config), override)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    warning = unscaled_extension_warning(shape, architecture_dir(config))
    if warning and rank0:
        warn("model", warning)
    own = read_hf_config(architecture_dir(config)).rope_scaling
    if override is not None and own is not None and rank0:
        warn("model", f"model.rope_scaling (YaRN, factor {override['factor']:g}) replaces the "
                      f"{own['rope_type']} scaling (factor {own['factor']:g}) of "
                      f"{architecture_dir(config)}'s config.json")
    TripletDataset(config.data.data_path).check_max_length(shape)
    lr_warning = from_scratch_lr_warning(config)
    if lr_warning and rank0:
        warn("optimizer", lr_warning)
    return shape


#: Above this peak LR, pretrained weights are being trained at a from-scratch rate.
FROM_SCRATCH_LR = 1e-3


def from_scratch_lr_warning(config: RunConfig) -> Optional[str]:
    """A warning when pretrained weights (checkpoint.hf_init_dir) meet a from-scratch learning
    rate, as when a CPU demo recipe is pointed at a real model; None otherwise."""
    lr = config.optimizer.lr
    if not config.checkpoint.hf_init_dir or lr < FROM_SCRATCH_LR:
        return None
    return (f"optimizer.lr={lr:g} with pretrained weights ({config.checkpoint.hf_init_dir}): "
            f"a rate for training from scratch, which wrecks what the model knows; "
            f"preference training of pretrained models uses about 5e-7 to 5e-5 (the "
            f"smollm2-135m_cpu recipe: 2e-5). Set optimizer.lr (and optimizer.min_lr)")


def open_dataset(config: RunConfig, shape: ModelShape, need_reference: bool,
                 start_weights: Optional[str] = None) -> TripletDataset:
    """Open and check the dataset (files, vocabulary, segment lengths) and, for DPO, its
    reference sidecar; ``start_weights`` (a new run's initial weights: an HF directory, a
    checkpoint or :data:`RANDOM_INIT`; None on resume) must then be the weights the sidecar was
    computed with."""
    dataset = TripletDataset(config.data.data_path)
    vocab = dataset.meta.get("vocab_size", 0)
    if vocab > shape.vocab_size:
        raise DatasetError(f"dataset {config.data.data_path} was tokenized with {vocab} tokens, more "
                         f"than the model's vocab_size {shape.vocab_size}")
    dataset.check_max_length(shape)
    if need_reference:
        fingerprint = None if start_weights is None else (
            RANDOM_INIT if start_weights == RANDOM_INIT else weights_fingerprint(start_weights))
        dataset.attach_reference(config.data.ref_logprobs_path, start_weights, fingerprint)
    return dataset


def make_microbatches(dataset: TripletDataset, index_lists: Sequence[Sequence[int]], roles,
                      pg_collection, multiple: int, shared_prefix: bool
                      ) -> list[PackedMicrobatch]:
    """Pack each list of example indices (``shared_prefix``: ``data.shared_prefix``) and cut it
    for this rank's CP slice."""
    cp_size, cp_rank = pg_collection.cp.size(), pg_collection.cp.rank()
    return [pack_triplets([dataset[i] for i in indices], roles, pad_multiple=multiple,
                          pad_token_id=dataset.pad_token_id, shared_prefix=shared_prefix
                          ).for_cp_rank(cp_size, cp_rank)
            for indices in index_lists]


def split_indices(num_examples: int, num_eval: int) -> tuple[range, range]:
    if num_eval >= num_examples:
        raise ConfigError(f"data.num_eval_examples={num_eval} leaves no training examples "
                         f"(dataset has {num_examples})")
    return range(0, num_examples - num_eval), range(num_examples - num_eval, num_examples)


def chunk_list(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]
