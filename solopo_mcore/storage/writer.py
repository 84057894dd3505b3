"""Checkpoint writing in bounded host memory: megatron-core's ``torch_dist`` format, one tensor at
a time.

megatron-core's own ``torch_dist`` save strategy stages every tensor before writing: its writer
clones each tensor that is a view (the parameters, views of DDP's contiguous buffer; the
optimizer's model-space tensors, views of its gathered buffers) and moves each one to host
memory, all of them before the first byte is written. On a GPU that staging is the
device-to-host copy; on CPU the tensors are already in host memory and it only doubles them.
Measured on CPU at the SmolLM2-135M size (fp32, distributed optimizer, one rank): training
peaked at 3.0 GiB and megatron's save at 7.0 GiB (``benchmarks/bench_save_memory.py``).

:class:`OneTensorAtATimeSave` keeps megatron's key translation, planner and file format (a
checkpoint it writes loads with ``dist_checkpointing.load`` like any other) and writes with
``torch.distributed.checkpoint``'s synchronous single-threaded ``FileSystemWriter``. That writer
resolves one tensor, copies it to host memory only if it is elsewhere, clones it only if it is a
view of a larger allocation, writes it, and drops it before the next: the staging copy is one
tensor at most, on every device. The converter's :class:`~solopo_mcore.convert.mcore_io.
LazyTorchDistSave` is the same strategy with tensors produced on demand.
"""

from __future__ import annotations

import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict)


class OneTensorAtATimeSave(TorchDistSaveShardedStrategy):
    """megatron-core's ``torch_dist`` checkpoint format, written one tensor at a time (see the
    module docstring). Pass it as ``dist_checkpointing.save(..., sharded_strategy=...)``."""

    def __init__(self):
        super().__init__("torch_dist", 1)

    def planner(self) -> MCoreSavePlanner:
        """The save planner (megatron's; subclasses change how tensor values are resolved)."""
        return MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                flatten_state_dict=False, flatten_sharded_tensors=False,
                                can_run_decentralized_global_plan=False)

    def save(self, sharded_state_dict, checkpoint_dir):
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        state = mcore_to_pyt_state_dict(sharded_state_dict, False)
        writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True,
                                      thread_count=1)
        dcp.save(state, storage_writer=writer, planner=self.planner())
