"""The Megatron side of conversion in bounded memory: a model built on the meta device gives the
checkpoint's layout (names, shapes, TP/PP shards) without holding any weights.

* Writing (HF -> Megatron): :class:`LazyTorchDistSave` is megatron-core's own ``torch_dist``
  format, written by ``torch.distributed.checkpoint`` with one change: each tensor's value is
  produced when the file writer asks for it (:class:`_LazySavePlanner`), so a rank holds one
  parameter shard at a time. ``metadata.json`` and ``common.pt`` come from
  ``dist_checkpointing.save`` itself, which drives the strategy.
* Reading (Megatron -> HF): :func:`load_groups` materialises one transformer layer (plus the
  embedding on the first group and the final norm / output layer on the last) at a time and
  reads just its regions of the checkpoint; the caller frees it before the next.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from solopo_mcore.config import RunConfig
from solopo_mcore.convert.tables import ConversionError, global_param_names
from solopo_mcore.models.builder import build_model_chunks, build_transformer_config
from solopo_mcore.models.hf_config import ModelShape
from solopo_mcore.storage.writer import OneTensorAtATimeSave


def build_meta_chunks(config: RunConfig, shape: ModelShape, pg_collection) -> list:
    """This rank's model chunks with every parameter on the meta device (no memory, no
    initialisation): the layout the converter reads from and writes to."""
    tcfg = build_transformer_config(shape, config.model, config.parallel)
    tcfg.use_cpu_initialization = True  # no explicit device: the meta context applies
    tcfg.perform_initialization = False
    with torch.device("meta"):
        chunks = build_model_chunks(shape, config.model, config.parallel, pg_collection, tcfg)
    for chunk in chunks:  # a few modules name their device explicitly (norm weights)
        chunk.to("meta")
    return chunks


def _storage_id(tensor: torch.Tensor) -> int:
    """Which allocation ``tensor`` views: the same for a parameter and every view or detached
    alias of it, on the meta device too (where data pointers are all zero)."""
    return tensor.untyped_storage()._cdata


class _LazySavePlanner(MCoreSavePlanner):
    """megatron-core's save planner, with tensor values produced on demand by ``produce``
    (called with the meta view the checkpoint stores; returns a real tensor of its shape)."""

    def __init__(self, produce: Callable[[torch.Tensor], torch.Tensor], **kwargs):
        super().__init__(**kwargs)
        self._produce = produce

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self._produce(self.lookup_object(write_item.index))


class LazyTorchDistSave(OneTensorAtATimeSave):
    """megatron-core's ``torch_dist`` checkpoint format, written one tensor at a time
    (:class:`~solopo_mcore.storage.writer.OneTensorAtATimeSave`), each tensor's value produced
    just before it is written."""

    def __init__(self, produce: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self._produce = produce

    def planner(self) -> MCoreSavePlanner:
        return _LazySavePlanner(self._produce, dedup_replicated_tensors=False,
                                flatten_state_dict=False,
                                can_run_decentralized_global_plan=False)


def shard_producer(chunks: list, names: dict, make_shard: Callable[[torch.Tensor, str],
                                                                    torch.Tensor]):
    """``produce(view)`` for :class:`LazyTorchDistSave`: the real value of a meta view of one
    of ``chunks``' parameters. ``make_shard(param, global_name)`` builds a whole parameter
    shard; the last one is kept, since megatron stores SwiGLU's fused ``linear_fc1`` as two
    views of one parameter."""
    by_storage = {_storage_id(p): (p, names[id(p)]) for chunk in chunks
                  for p in chunk.parameters()}
    last = {}

    def produce(view: torch.Tensor) -> torch.Tensor:
        key = _storage_id(view)
        if key not in by_storage:
            raise ConversionError(f"checkpoint entry of shape {tuple(view.shape)} is not a "
                                  f"parameter of the model")
        param, name = by_storage[key]
        if last.get("key") != key:
            last.clear()
            last.update(key=key, value=make_shard(param, name).to(param.dtype).contiguous())
        value = last["value"]
        if view.shape == param.shape and view.storage_offset() == 0:
            return value.view(view.shape)
        return torch.as_strided(value, view.size(), view.stride(),
                                view.storage_offset()).clone()
    return produce


# --- reading one group of layers at a time ----------------------------------------------------

def _groups(chunk) -> list[list[torch.nn.Module]]:
    """The chunk's modules in load order, one group per transformer layer; the embedding joins
    the first group and the final norm and output layer the last."""
    groups = [[layer] for layer in chunk.decoder.layers] or [[]]
    if getattr(chunk, "embedding", None) is not None:
        groups[0].insert(0, chunk.embedding)
    for extra in (getattr(chunk.decoder, "final_layernorm", None),
                  getattr(chunk, "output_layer", None)):
        if extra is not None and any(True for _ in extra.parameters()):
            groups[-1].append(extra)
    covered = {id(p) for group in groups for module in group for p in module.parameters()}
    missed = [n for n, p in chunk.named_parameters() if id(p) not in covered]
    if missed:
        raise ConversionError(f"parameters outside the per-layer groups: {missed[:3]}")
    return groups


class _RegionLoadPlanner(LoadPlanner):
    """Reads given regions of a ``torch_dist`` checkpoint's tensors into given tensors, in
    place; each region must be covered completely by what the checkpoint stores."""

    def __init__(self, regions: list, checkpoint: str):
        # [(key, global offsets, destination, whether the stored shape may differ)]
        self.regions, self.checkpoint = regions, checkpoint
        self.targets = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for key, offsets, target, may_differ in self.regions:
            stored = self.metadata.state_dict_metadata.get(key)
            if stored is None or not hasattr(stored, "chunks"):
                raise ConversionError(f"{self.checkpoint}: no tensor {key!r}; is it a "
                                      f"checkpoint of this architecture?")
            if may_differ:  # vocabulary padding differs between TP sizes: read what overlaps
                target.zero_()
                for dim, (start, size) in enumerate(zip(offsets, stored.size)):
                    target = target.narrow(dim, 0, max(0, min(target.shape[dim], size - start)))
                if target.numel() == 0:
                    continue
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=target.shape)
            items = create_read_items_for_chunk_list(key, stored, [chunk])
            if sum(math.prod(item.lengths) for item in items) != target.numel():
                raise ConversionError(f"{self.checkpoint}: {key!r} of shape "
                                      f"{tuple(stored.size)} does not cover {tuple(target.shape)}"
                                      f" at {tuple(offsets)}; is it a checkpoint of this "
                                      f"architecture?")
            self.targets[(key, tuple(offsets))] = target
            requests += items
        return LoadPlan(requests)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise ConversionError(f"{self.checkpoint}: unexpected object {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item):
        target = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item, tensor):
        pass  # read in place


def _regions(sharded: dict, wanted: set) -> list:
    """``(checkpoint key, global offset, destination view, may differ)`` of every ShardedTensor whose data
    is one of the ``wanted`` storages (after megatron's factories, e.g. SwiGLU's split)."""
    apply_factories(sharded)
    regions = []
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor) and _storage_id(value.data) in wanted:
            if value.flattened_range is not None:
                raise ConversionError(f"{value.key}: flattened shards are not model weights")
            view = value.data.view((1,) * value.prepend_axis_num + tuple(value.local_shape))
            regions.append((value.key, tuple(value.global_offset), view,
                            bool(value.allow_shape_mismatch)))
    return regions


def check_checkpoint_layout(chunks: list, checkpoint: str) -> None:
    """Before any work: every parameter of ``chunks`` (meta) has its key in ``checkpoint``,
    covering its region; raises a ConversionError naming the first that does not."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata()
    for chunk in chunks:
        wanted = {_storage_id(p) for p in chunk.parameters()}
        with torch.no_grad():  # the planner zeroes padding rows of its (meta) targets
            planner = _RegionLoadPlanner(_regions(chunk.sharded_state_dict(), wanted),
                                         str(checkpoint))
            planner.set_up_planner({}, metadata)
            planner.create_local_plan()


def _read_modules(chunk, modules: list, checkpoint: str) -> list:
    """Materialise ``modules`` (of ``chunk``) on the CPU and read their weights from
    ``checkpoint``; returns their ``[(local name, parameter)]`` in the chunk's order."""
    for module in modules:
        if any(True for _ in module.buffers()):
            raise ConversionError(f"{type(module).__name__} has buffers; reading it a layer at "
                                  f"a time is not supported")
        module.to_empty(device="cpu")
    wanted = {_storage_id(p) for module in modules for p in module.parameters()}
    mine = [(n, p) for n, p in chunk.named_parameters() if _storage_id(p) in wanted]
    with torch.no_grad():  # in-place reads into parameter views
        regions = _regions(chunk.sharded_state_dict(), wanted)
        covered = {_storage_id(region[2]) for region in regions}
        missing = [n for n, p in mine if _storage_id(p) not in covered]
        if missing:
            raise ConversionError(f"no checkpoint entry for {missing[:3]}")
        dcp.load({}, storage_reader=dcp.FileSystemReader(str(checkpoint)),
                 planner=_RegionLoadPlanner(regions, str(checkpoint)), no_dist=True)
    return mine


def load_groups(chunks: list, checkpoint: str) -> Iterator[list]:
    """For each group of layers in turn: materialise it on the CPU, read its shards from
    ``checkpoint`` and yield its ``[(global name, parameter)]``; the modules return to the meta
    device when the caller asks for the next group.

    The layout (keys, offsets, SwiGLU's split) is megatron-core's own sharded state dict; the
    regions are read with ``torch.distributed.checkpoint`` on each rank independently
    (``no_dist``), since megatron's loader expects whole tensors per world."""
    for chunk in chunks:
        global_names = global_param_names(chunk)
        for group in _groups(chunk):
            mine = _read_modules(chunk, group, checkpoint)
            yield [(global_names[n], p) for n, p in mine]
            for module in group:
                module.to("meta")


def stream_weights_in_forward(chunks: list, checkpoint: str) -> None:
    """Forward hooks on meta-device ``chunks``: each module (embedding, transformer layer,
    final norm, output layer) reads its weights from ``checkpoint`` just before its forward and
    returns them to the meta device after it. With tied embeddings, the embedding of a chunk
    that also holds the output layer stays until the output layer has run."""
    for chunk in chunks:
        embedding = getattr(chunk, "embedding", None)
        output = getattr(chunk, "output_layer", None)
        tied = embedding is not None and output is not None and \
            getattr(chunk, "share_embeddings_and_output_weights", False)
        units = [m for m in (embedding, *chunk.decoder.layers,
                             getattr(chunk.decoder, "final_layernorm", None), output)
                 if m is not None]
        for module in units:
            keep = tied and module is embedding
            drop = [module, embedding] if tied and module is output else [module]

            def load(mod, args, kwargs, _chunk=chunk):
                _read_modules(_chunk, [mod], checkpoint)
                weight = kwargs.get("weight")
                if weight is not None and weight.is_meta:  # GPTModel fetched the (tied) output
                    # weight before this hook ran: hand over the one now read
                    kwargs = dict(kwargs, weight=_chunk.shared_embedding_or_output_weight())
                return args, kwargs

            def free(mod, args, result, _keep=keep, _drop=drop):
                if not _keep:
                    for m in _drop:
                        m.to("meta")
            module.register_forward_pre_hook(load, with_kwargs=True)
            module.register_forward_hook(free)
