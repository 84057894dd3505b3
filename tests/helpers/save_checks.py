"""Per-rank body of the save-memory tests: a checkpoint written by ours equals megatron-core's own,
tensor for tensor, and the optimizer state it saves copies only what it must."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def _step(hf_dir: str, tp: int, pp: int):
    """Model and distributed optimizer at the layout, after one real step (moments non-zero)."""
    from solopo_mcore.config import ObjectiveConfig, OptimizerConfig
    from solopo_mcore.training.engine import run_global_batch
    from solopo_mcore.training.forward_step import make_forward_step
    from solopo_mcore.training.optim import build_optimizer
    from tests.helpers.hf_reference import random_examples
    from tests.helpers.layout_checks import _microbatches, _setup

    shape, pg_collection, _, model, _, parallel = _setup(hf_dir, tp, pp,
                                                         distributed_optimizer=True)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2, weight_decay=0.0),
                                parallel, torch.float32, pg_collection)
    objective = ObjectiveConfig(algorithm="simpo", mode="solo", alpha=1.0, beta=2.0)
    examples = random_examples(4, shape.vocab_size, 3)
    run_global_batch(model, make_forward_step(objective, "solo", pg_collection.cp),
                     _microbatches(examples, pg_collection, "solo", 1, parallel), pg_collection)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    ok, _, _ = optimizer.step()
    assert ok
    return model, optimizer


def _tensors(folder: Path) -> dict:
    """Every tensor of a torch_dist checkpoint, whole, read without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    wanted = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
              for key, meta in reader.read_metadata().state_dict_metadata.items()
              if isinstance(meta, TensorStorageMetadata)}
    dcp.load(wanted, storage_reader=reader, no_dist=True)
    return wanted


def _copied_bytes(state, optimizer, model) -> int:
    """Bytes of the optimizer state dict's tensors that are new allocations: not a view of a
    parameter, a DDP buffer or an optimizer state tensor, and not a one-element placeholder."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    existing = set()
    for chunk in model:
        for buffer in getattr(chunk, "buffers", []):
            existing.add(buffer.param_data.untyped_storage().data_ptr())
        existing.update(p.untyped_storage().data_ptr() for p in chunk.parameters())
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in sub.optimizer.param_groups:
            for param in group["params"]:
                existing.add(param.untyped_storage().data_ptr())
                existing.update(t.untyped_storage().data_ptr()
                                for t in sub.optimizer.state[param].values()
                                if torch.is_tensor(t))
    total, seen = 0, set()
    for item in nested_values(state):
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)) and \
                torch.is_tensor(item.data):
            storage = item.data.untyped_storage()
            if storage.data_ptr() in existing or storage.data_ptr() in seen or \
                    storage.nbytes() <= 4:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def check_save_equals_megatrons(hf_dir: str, root: str, tp: int = 1, pp: int = 1) -> dict:
    """Save the same model and optimizer twice: with this project's save (one parameter's
    optimizer state at a time, one tensor written at a time) and with megatron-core's own
    (its optimizer gather and its writer). Rank 0 compares the two checkpoints' tensors."""
    from megatron.core import dist_checkpointing

    from solopo_mcore.storage.checkpoint import (OPTIMIZER_METADATA, CheckpointManager,
                                                 _model_state)
    from solopo_mcore.storage.optimizer_state import optimizer_state_for_save

    root = Path(root)
    model, optimizer = _step(hf_dir, tp, pp)
    split = sum(1 for sub in getattr(optimizer, "chained_optimizers", [optimizer])
                for maps in sub.gbuf_ranges for range_maps in maps.values()
                for range_map in range_maps for param, ranges in range_map["param_map"].items()
                if ranges["param"].size != param.numel())
    ours = CheckpointManager(str(root / "ours"), keep_last=1).save(1, model, optimizer, None, {})
    theirs = root / "megatron"
    if dist.get_rank() == 0:
        theirs.mkdir(parents=True)
    dist.barrier()
    sharded = _model_state(model)
    megatron_state = optimizer.sharded_state_dict(sharded, metadata=OPTIMIZER_METADATA)
    sharded["optimizer"] = megatron_state
    dist_checkpointing.save(sharded, str(theirs))
    out = {"rank": dist.get_rank(), "split_params": split,
           "copied_megatron": _copied_bytes(megatron_state, optimizer, model)}
    del sharded, megatron_state
    out["copied_ours"] = _copied_bytes(
        optimizer_state_for_save(optimizer, _model_state(model), OPTIMIZER_METADATA),
        optimizer, model)
    out["model_bytes"] = sum(p.numel() * 4 for c in model for p in c.parameters())
    dist.barrier()
    if dist.get_rank() == 0:
        a, b = _tensors(ours), _tensors(theirs)
        out["num_tensors"] = len(a)
        out["num_optimizer_tensors"] = sum(1 for k in a if k.startswith("optimizer."))
        out["only_in_one"] = sorted(set(a) ^ set(b))
        out["different"] = sorted(k for k in set(a) & set(b) if not torch.equal(a[k], b[k]))
        out["zero_moments"] = sorted(k for k in a if ".exp_avg_sq." in k and
                                     not a[k].abs().sum() > 0)
    return out

