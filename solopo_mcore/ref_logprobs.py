"""Reference log-prob pre-pass for DPO: a forward-only run of the frozen starting model.

Every example's four segments (short/long x chosen/rejected) are run, at any parallel layout,
and their response log-prob sums are written to a sidecar aligned with the dataset by example
index (``PATH.npy`` [N, 4] by Role + ``PATH.json`` provenance, including a fingerprint of the
reference weights). Training refuses a sidecar whose dataset fingerprint or example count differs
from its dataset, or whose weights fingerprint differs from the run's starting weights.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel.utils import is_pp_last_stage

from solopo_mcore.config import ConfigError, RunConfig, require_training_data, to_dict
from solopo_mcore.data.dataset import save_reference_sidecar
from solopo_mcore.roles import ROLE_NAMES
from solopo_mcore.log import log
from solopo_mcore.losses.objective import EVAL_ROLES
from solopo_mcore.parallel.layout import layout_sizes
from solopo_mcore.stack import build_model_stack, load_hf_weights, setup_parallel
from solopo_mcore.training import build
from solopo_mcore.storage.checkpoint import CheckpointManager, find_verified_checkpoint
from solopo_mcore.training.engine import run_global_batch
from solopo_mcore.training.forward_step import make_logprob_forward_step
from solopo_mcore.storage.integrity import weights_fingerprint


def compute_reference(config: RunConfig, output_path: str, log_every: int = 10) -> np.ndarray:
    require_training_data(config, need_reference=False)  # the sidecar is what this writes
    build.check_positions(config)  # before any process group
    shape, pg_collection = setup_parallel(config)
    stack = build_model_stack(config, shape, pg_collection)
    source = {}
    # the reference must be exactly the start weights: a corrupt checkpoint is an error here
    checkpoint = find_verified_checkpoint(config.checkpoint.load_dir, strict=True) \
        if config.checkpoint.load_dir else None
    if checkpoint is not None:
        CheckpointManager.load(checkpoint, stack.model, load_rng=False, verified=True)
        source = {"megatron_checkpoint": str(checkpoint)}
        start_weights = str(checkpoint)
    elif config.checkpoint.hf_init_dir:
        load_hf_weights(stack, config.checkpoint.hf_init_dir)
        source = {"hf_checkpoint": config.checkpoint.hf_init_dir}
        start_weights = config.checkpoint.hf_init_dir
    else:
        raise ConfigError("set checkpoint.hf_init_dir or checkpoint.load_dir: the reference "
                         "model is the policy's starting point")
    dataset = build.open_dataset(config, shape, need_reference=False)
    forward_step = make_logprob_forward_step(pg_collection.cp)
    dp_rank, dp_size = pg_collection.dp.rank(), pg_collection.dp.size()
    # forward-only: DP replicas never communicate, so each simply takes every dp_size-th example
    index_lists = build.chunk_list(list(range(dp_rank, len(dataset), dp_size)),
                                   config.data.micro_batch_size)
    per_call = max(1, 8 // config.data.micro_batch_size)  # microbatches per schedule call
    table = np.full((len(dataset), 4), np.nan, dtype=np.float32)
    multiple = build.pad_multiple(config)
    for chunk in stack.model:
        chunk.eval()
    start = time.time()
    for call, first in enumerate(range(0, len(index_lists), per_call)):
        with torch.no_grad():
            mbs = build.make_microbatches(dataset, index_lists[first:first + per_call],
                                          EVAL_ROLES, pg_collection, multiple,
                                          config.data.shared_prefix)
            outputs = run_global_batch(stack.model, forward_step, mbs, pg_collection,
                                       forward_only=True, collect_non_loss_data=True)
        if is_pp_last_stage(pg_collection.pp):
            for response_logps in outputs:
                response_logps.scatter_into(table)
        if dist.get_rank() == 0 and call % log_every == 0:
            log("reference", f"{min(first + per_call, len(index_lists))}/{len(index_lists)} "
                             f"microbatches on rank 0, {time.time() - start:.0f}s")
    # each example was computed on exactly one DP rank's last stage: combine with a NaN-aware sum
    filled = torch.from_numpy(np.nan_to_num(table, nan=0.0)).double()
    count = torch.from_numpy(~np.isnan(table)).double()
    dist.all_reduce(filled)
    dist.all_reduce(count)
    result = (filled / count.clamp(min=1)).float().numpy()
    result[count.numpy() == 0] = np.nan
    missing = int(np.isnan(result).any(axis=1).sum())
    if missing:
        raise RuntimeError(f"{missing} examples have no reference log-probs")
    if dist.get_rank() == 0:
        save_reference_sidecar(output_path, result, {
            "dataset": config.data.data_path, "dataset_fingerprint": dataset.fingerprint,
            "num_examples": len(dataset), "roles": list(ROLE_NAMES),
            "model": source, "model_fingerprint": weights_fingerprint(start_weights),
            "layout": layout_sizes(pg_collection),
            "config": to_dict(config), "created_at": time.time(),
        })
        log("reference", f"wrote {output_path}.npy/.json ({len(dataset)} examples, "
                         f"{time.time() - start:.0f}s)")
    dist.barrier()
    return result
