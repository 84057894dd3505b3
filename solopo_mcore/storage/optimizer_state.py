"""The distributed optimizer's state for a checkpoint save, gathered one parameter at a time.

megatron-core's ``fully_reshardable`` format stores, for every parameter of shape ``S``, its main
parameter and Adam moments as tensors of shape ``S`` (model space), so a checkpoint loads at any
TP/PP/DP layout. To build them, megatron's ``get_parameter_state_dp_zero`` copies this rank's
shard of every state into three flat buffers, all-gathers them over data parallelism, and
concatenates them into three world-sized buffers, on *every* DP rank. At the SmolLM2-135M size on
CPU (fp32, one rank) a save peaked at 7.0 GiB against 3.0 GiB for training, most of it
here (benchmarks/bench_save_memory.py, RESULTS.md).

:func:`optimizer_state_for_save` writes the same format (same keys, shapes and values; megatron
loads it with its own code) with megatron's ``sharded_state_dict``, but hands it per-parameter
state instead of the world buffers:

- each parameter's state tensors are written by one rank of its DP group, the one that holds the
  largest part of it (its *owner*; the replica ids say so). Where the owner holds all of it, the
  tensor is its own state, viewed, not copied; otherwise the other ranks send their parts and the
  owner assembles one parameter's tensor at a time;
- the other ranks hold a zero-size placeholder (never written: not the main replica).

So a rank's extra host memory during a save is the state of the parameters it owns but does not
hold whole (at one DP rank: nothing), instead of three world-sized copies and their gather
buffers on every rank; and DP ranks write their parameters in parallel.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

from solopo_mcore.log import warn
from solopo_mcore.platform import default_device, is_gloo

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
_WARNED: list = []  # the untested-on-GPU warning, once per process
_PREFIX = "optimizer.state."


def optimizer_state_for_save(optimizer, model_sharded: dict, metadata: dict) -> dict:
    """Collective over each DP group. ``optimizer.sharded_state_dict(model_sharded,
    metadata=metadata)`` for a save, with the distributed optimizer's parameter state built one
    parameter at a time (module docstring). Other optimizers and formats: megatron's own."""
    subs = [sub for sub in getattr(optimizer, "chained_optimizers", [optimizer])
            if callable(getattr(sub, "get_parameter_state_dp_zero", None))]
    if metadata.get("distrib_optim_sharding_type") != "fully_reshardable" or not subs:
        return optimizer.sharded_state_dict(model_sharded, metadata=metadata)
    replica_ids = {}
    for base in nested_values(extract_sharded_tensors_and_factories(model_sharded)[0]):
        replica_ids[id(base.data)] = (base.key, _as_tuple(base.replica_id))
    plans = []
    with contextlib.ExitStack() as stack:
        for sub in subs:
            plan = _plan(sub, replica_ids)
            if plan is None:
                continue
            plans.append(plan)
            sub.get_parameter_state_dp_zero = plan.state_dp_zero
            stack.callback(sub.__dict__.pop, "get_parameter_state_dp_zero", None)
        state = optimizer.sharded_state_dict(model_sharded, metadata=metadata)
    # megatron gave each state tensor its parameter's replica id (DP rank 0 writes); the owner
    # writes instead. Tensors are told apart by their memory (one key covers every layer).
    replica_by_address = {address: replica for plan in plans
                          for address, replica in plan.replica_by_address.items()}
    for item in nested_values(state):
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)) and \
                item.key.startswith(_PREFIX) and torch.is_tensor(item.data):
            replica = replica_by_address.get(item.data.data_ptr())
            if replica is not None:
                item.replica_id = replica
    return state


def _as_tuple(replica_id) -> tuple:
    return tuple(replica_id) if isinstance(replica_id, (tuple, list)) else (replica_id,)


class _Plan:
    """Who writes which parameter's state in one distributed optimizer's DP group, and the
    stand-in for ``get_parameter_state_dp_zero`` that hands megatron per-parameter tensors."""

    def __init__(self, sub, buffers: list):
        self.sub = sub
        # per gbuf: (dtype, [((param, numel, pieces, owner, writable, replica), (start, end))])
        self.buffers = buffers
        self.replica_by_address = {}  # data_ptr of each tensor handed out -> its replica id

    def state_dp_zero(self, use_gloo_comm: bool = True, empty_data: bool = False,
                      return_on_all_ranks: bool = False):
        if empty_data:  # loading: megatron's own (it allocates what it loads into)
            return type(self.sub).get_parameter_state_dp_zero(
                self.sub, use_gloo_comm=use_gloo_comm, empty_data=empty_data,
                return_on_all_ranks=return_on_all_ranks)
        state = {"buckets_coalesced": True}
        for gbuf_idx, (dtype, params) in enumerate(self.buffers):
            by_range = {(start, end): entry for entry, (start, end) in params}
            world = {key: _PerParameterWorld(self, key, by_range) for key in STATE_KEYS}
            world["numel_unpadded"] = self.sub.buffers[gbuf_idx].numel_unpadded
            state[gbuf_idx] = {dtype: world}
        return state

    def tensor(self, key: str, entry: tuple) -> torch.Tensor:
        """One state tensor of one parameter, flat (collective over the DP group when the
        parameter is split), remembered with the replica id it is to be written under."""
        out = self._tensor(key, entry)
        self.replica_by_address[out.data_ptr()] = entry[5]
        return out

    def _tensor(self, key: str, entry: tuple) -> torch.Tensor:
        """This rank's own state (viewed), assembled from the ranks' parts, or a placeholder."""
        param, numel, pieces, owner, writable, _ = entry
        group = self.sub.data_parallel_group
        me = group.rank()
        mine = pieces.get(me)
        local = self.sub._get_main_param_and_optimizer_states(param)[key] if mine else None
        if not writable or len(pieces) == 1 and me != owner:
            return _placeholder(numel)  # never written here: not the main replica
        if mine == (0, numel):  # the owner holds all of it: its own state, not a copy
            return local.detach().view(-1).float()
        ranks = dist.get_process_group_ranks(group)
        on_cpu = is_gloo(group)
        device = torch.device("cpu") if on_cpu else default_device()  # NCCL: the GPU
        if me != owner:
            if mine:
                dist.send(local.detach().view(-1).float().to(device).contiguous(),
                          ranks[owner], group=group)
            return _placeholder(numel)
        out = torch.empty(numel, dtype=torch.float32)
        requests = []
        for rank, (start, end) in sorted(pieces.items()):
            if rank == me:
                out[start:end].copy_(local.detach().view(-1))
            elif on_cpu:
                requests.append(dist.irecv(out[start:end], ranks[rank], group=group))
            else:
                buffer = torch.empty(end - start, dtype=torch.float32, device=device)
                dist.recv(buffer, ranks[rank], group=group)
                out[start:end].copy_(buffer)
        for request in requests:
            request.wait()
        return out


class _PerParameterWorld:
    """Looks like megatron's flat world buffer of one state key to the code that slices it
    per parameter (``world[start:end]``), and returns that parameter's tensor."""

    def __init__(self, plan: _Plan, key: str, by_range: dict):
        self.plan, self.key, self.by_range = plan, key, by_range

    def __getitem__(self, index: slice) -> torch.Tensor:
        return self.plan.tensor(self.key, self.by_range[(index.start, index.stop)])


def _placeholder(numel: int) -> torch.Tensor:
    """A tensor of ``numel`` elements that holds one: the state of a parameter this rank does
    not write (megatron needs its shape only)."""
    return torch.zeros((), dtype=torch.float32).expand(numel)


def _plan(sub, replica_ids: dict) -> Optional[_Plan]:
    """Collective over ``sub``'s DP group: exchange which part of each parameter every rank
    holds, and pick each parameter's owner. None (megatron's own gather is used, with a
    warning) where the replica ids do not follow megatron's (TP/PP prefix, DP rank last)."""
    group = sub.data_parallel_group
    if not is_gloo(group) and not _WARNED:
        _WARNED.append(True)
        warn("checkpoint", "the optimizer state is saved one parameter at a time, its split "
                           "parameters sent point to point over NCCL: this path is tested on "
                           "CPU (gloo) only; the files are megatron-core's format either way")
    buffers, table = [], []
    for gbuf_idx, gbuf_range_maps in enumerate(sub.gbuf_ranges):
        if len(gbuf_range_maps) != 1:
            return None
        (dtype, range_maps), = gbuf_range_maps.items()
        held = {}
        for range_map in range_maps:
            for param, ranges in range_map["param_map"].items():
                held[param] = (ranges["param"].start, ranges["param"].end)
        order = list(sub.buffers[gbuf_idx].param_index_map.items())
        mine = []
        for param, (start, end, _bucket) in order:
            key, replica = replica_ids.get(id(param), (None, None))
            mine.append((key, replica, held.get(param)))
        buffers.append((dtype, order))
        table.append(mine)
    gathered = [None] * group.size()
    dist.all_gather_object(gathered, table, group=group)
    planned = []
    for gbuf_idx, (dtype, order) in enumerate(buffers):
        params = []
        for i, (param, (start, end, _bucket)) in enumerate(order):
            rows = [ranks_table[gbuf_idx][i] for ranks_table in gathered]
            keys = {row[0] for row in rows}
            prefixes = {row[1][:-1] if row[1] else None for row in rows}
            if None in keys or len(keys) != 1 or len(prefixes) != 1:
                warn("checkpoint", "optimizer state: unexpected replica ids; using "
                                   "megatron-core's gather (more memory during the save)")
                return None
            pieces = {rank: row[2] for rank, row in enumerate(rows) if row[2]}
            prefix = prefixes.pop()
            writable = all(coordinate == 0 for coordinate in prefix)
            owner = max(pieces, key=lambda rank: (pieces[rank][1] - pieces[rank][0], -rank))
            me = group.rank()
            replica = prefix + ((0 if me == owner else 1 + me),) if writable else rows[me][1]
            params.append(((param, end - start, pieces, owner, writable, replica),
                           (start, end)))
        planned.append((dtype, params))
    return _Plan(sub, planned)
