"""Parallel layout: validation with actionable messages, and process-group start-up.

The groups are Megatron's own (``parallel_state.initialize_model_parallel``); they are collected
into a ``ProcessGroupCollection`` once, here, and passed explicitly to everything else.
"""

from __future__ import annotations

import datetime
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from solopo_mcore.config import ParallelConfig
from solopo_mcore.errors import UserError
from solopo_mcore.platform import (apply_cpu_patches, apply_megatron_fixes, distributed_backend,
                                   set_local_device)


class LayoutError(UserError, ValueError):
    pass


def validate_layout(parallel: ParallelConfig, world_size: int) -> int:
    """Check the layout against the world size; return the data-parallel size. (Whether the
    model's heads and layers split over it is the model's check:
    :func:`solopo_mcore.models.layout_fit.check_model_fits_layout`.)"""
    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    if world_size % (tp * pp * cp):
        raise LayoutError(
            f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = "
            f"{tp * pp * cp}; launch a multiple of {tp * pp * cp} processes or change the sizes")
    return world_size // (tp * pp * cp)


def check_interleaved_microbatches(pp: int, vpp: int, num_microbatches: int) -> None:
    """Refuse a training step of the interleaved pipeline whose first stage would run every
    microbatch in warm-up: ``M * vpp <= 2 (pp - 1) + (vpp - 1) pp`` (megatron-core's warm-up
    count with its default group of ``pp`` microbatches). That schedule deadlocks in the pipeline's
    shape/tensor exchange (measured on gloo with megatron-core 0.16.1, e.g. PP2 x VPP2 with 2
    microbatches; forward-only passes are not affected), and its bubble leaves the pipeline idle
    anyway."""
    if vpp <= 1 or pp <= 1:
        return
    warmup = 2 * (pp - 1) + (vpp - 1) * pp
    if num_microbatches * vpp > warmup:
        return
    needed = next(m for m in range(pp, 1000 * pp, pp) if m * vpp > warmup)
    raise LayoutError(
        f"parallel.virtual_pipeline_model_parallel_size={vpp} at pipeline_model_parallel_size="
        f"{pp} needs at least {needed} microbatches per step, this step has {num_microbatches}: "
        f"with fewer, the first stage runs them all in warm-up and the interleaved schedule "
        f"deadlocks. Raise data.global_batch_size or lower data.micro_batch_size (microbatches "
        f"per step = global_batch_size / (micro_batch_size x data-parallel size)), or drop the "
        f"virtual pipeline.")


def sequence_pad_multiple(parallel: ParallelConfig) -> int:
    """Every packed segment is padded to a multiple of this many tokens.

    CP's zigzag split cuts each segment into ``2 * CP`` equal chunks. Under sequence parallelism
    each CP rank's part (``1/CP`` of every segment) is then split again over the TP ranks, so
    ``padded / CP`` must divide by TP as well: the multiple is ``CP * lcm(2, TP)``
    (``TP`` without CP)."""
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    tp_share = tp if parallel.sequence_parallel_enabled else 1
    if cp == 1:
        return tp_share
    return cp * math.lcm(2, tp_share)


def layout_sizes(pg_collection) -> dict:
    """``{"tp": .., "pp": .., "cp": .., "dp": ..}``: this run's group sizes."""
    return {name: getattr(pg_collection, name).size() for name in ("tp", "pp", "cp", "dp")}


def describe_layout(pg_collection) -> str:
    """``TP2 PP1 CP1 DP1``, for logs and reports."""
    return " ".join(f"{k.upper()}{v}" for k, v in layout_sizes(pg_collection).items())


def init_distributed(timeout_minutes: int = 30) -> None:
    """Start torch.distributed from the torchrun environment (single process without one)."""
    apply_cpu_patches()
    apply_megatron_fixes()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python script.py`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    set_local_device()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store = _attempt_store(timeout)
    if store is None:
        dist.init_process_group(backend=distributed_backend(), timeout=timeout)
    else:
        dist.init_process_group(backend=distributed_backend(), timeout=timeout, store=store,
                                rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))


def _attempt_store(timeout: datetime.timedelta):
    """Under torchrun with the agent's store, a client of it whose keys belong to this attempt;
    None otherwise (``env://`` as usual).

    After a restart the agent's store still holds the previous attempt's process-group keys
    (torch 2.13, c10d and static rendezvous): a new rank then reads a dead rank's address and
    the group never forms (``connectFullMesh ... Connection refused``, or a hang). Each attempt
    therefore gets its own prefix, from :func:`agree_on_attempt`."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           is_master=False, timeout=timeout)
    attempt = agree_on_attempt(client, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                               timeout)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if os.environ["RANK"] == "0" and (restarts or attempt > 1):
        from solopo_mcore.log import log
        log("distributed", f"a restarted job: attempt {attempt} in this store, this node's "
                           f"restart {restarts} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS')}")
    return dist.PrefixStore(f"solopo/attempt_{attempt}/", client)


#: This process's attempt number (see :func:`agree_on_attempt`), for other per-attempt keys.
ATTEMPT: dict = {}


def agree_on_attempt(store, rank: int, world_size: int, timeout: datetime.timedelta) -> int:
    """A number every rank of this attempt of the job agrees on and no earlier attempt used.

    The restart count is not one: the node whose worker failed counts a restart, the others
    rejoin through a membership change and do not. Rank 0 takes a new number from a counter in
    the store and publishes it; every rank answers under that number with a random nonce; rank
    0 then publishes the list of nonces, and a rank proceeds only when its own nonce is in it.
    A rank that read the previous attempt's number finds its nonce missing there and reads
    again, so stale keys are never taken for this attempt's."""
    import json
    import secrets
    import time

    nonce = secrets.token_hex(8)
    if rank == 0:
        store.set("solopo/attempt", str(store.add("solopo/attempt_counter", 1)))
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        store.wait(["solopo/attempt"])
        number = int(store.get("solopo/attempt"))
        store.set(f"solopo/attempt_{number}/nonce/{rank}", nonce)
        if rank == 0:
            keys = [f"solopo/attempt_{number}/nonce/{r}" for r in range(world_size)]
            store.wait(keys)
            store.set(f"solopo/attempt_{number}/go",
                      json.dumps([store.get(k).decode() for k in keys]))
        try:
            store.wait([f"solopo/attempt_{number}/go"], datetime.timedelta(seconds=2))
        except Exception:  # noqa: BLE001 - not published yet (or a stale number): read again
            continue
        nonces = json.loads(store.get(f"solopo/attempt_{number}/go"))
        if len(nonces) == world_size and nonces[rank] == nonce:
            ATTEMPT["number"] = number
            return number
        time.sleep(0.2)
    raise TimeoutError(f"the ranks did not agree on an attempt within {timeout}")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(parallel: ParallelConfig, seed: int, timeout_minutes: int = 30):
    """Initialise Megatron's model-parallel groups and RNG; return a ``ProcessGroupCollection``.
    ``timeout_minutes`` bounds every collective of every group."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    init_distributed(timeout_minutes)
    validate_layout(parallel, dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
