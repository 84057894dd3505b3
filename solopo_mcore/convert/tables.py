"""HF <-> Megatron-Core name and layout tables for Qwen2/Qwen2.5 and Llama 3/3.1.

A row says which HF tensors make one Megatron parameter and which *mapping* lays them out. The
mappings are the only code: each is a small class that builds one tensor-parallel shard from the
HF tensors (``to_shard``) and undoes that from all shards (``from_shards``). There is no
per-architecture branch; both families share the table, and tensors a model lacks (QKV bias on
Llama, ``lm_head`` when tied) are simply absent from it.

The tied-output rule every direction shares lives here once (:func:`is_tied_output`); the padded
vocabulary size is ``models.hf_config.padded_vocab_size``, the one function the model builder and
the memory estimator use too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from solopo_mcore.errors import UserError
from solopo_mcore.models.hf_config import ModelShape


class ConversionError(UserError, ValueError):
    pass


# --- sources: what a mapping reads from ----------------------------------------------------

class TensorSource:
    """A full HF tensor already in memory, read through the same interface as a file-backed
    source (``hf_io.SafetensorsSource`` reads only the rows or columns asked for)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def full(self) -> torch.Tensor:
        return self.tensor

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop]

    def cols(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[:, start:stop]


def as_source(value):
    """A tensor becomes a :class:`TensorSource`; a source is returned as it is."""
    return TensorSource(value) if isinstance(value, torch.Tensor) else value


def _part(size: int, tp: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of TP rank ``rank``'s equal part of ``size``."""
    step = size // tp
    return rank * step, (rank + 1) * step


# --- mappings: HF tensors -> one TP shard, and all TP shards -> HF tensors ---------------------

class Mapping:
    """How one Megatron parameter is laid out from its HF tensors, in both directions."""

    def to_shard(self, tensors: list, shape: ModelShape, tp: int, rank: int,
                 padded_rows: int) -> torch.Tensor:
        """This TP rank's shard of the parameter from the HF tensors (in table order): tensors
        or sources, of which only this rank's rows or columns are read."""
        raise NotImplementedError

    def from_shards(self, shards: list, shape: ModelShape) -> list:
        """The full HF tensors (in table order) from every TP rank's shard."""
        raise NotImplementedError


class Replicated(Mapping):
    """Identical on every TP rank (norm weights)."""

    def to_shard(self, tensors, shape, tp, rank, padded_rows):
        return as_source(tensors[0]).full()

    def from_shards(self, shards, shape):
        return [shards[0]]


class RowParallel(Mapping):
    """Split along the input dimension (``linear_proj``, ``linear_fc2``)."""

    def to_shard(self, tensors, shape, tp, rank, padded_rows):
        source = as_source(tensors[0])
        return source.cols(*_part(source.shape[1], tp, rank))

    def from_shards(self, shards, shape):
        return [torch.cat(shards, dim=1)]


class VocabParallel(Mapping):
    """Vocabulary rows, zero-padded to Megatron's padded size, then split over TP; the padding
    is trimmed on export."""

    def to_shard(self, tensors, shape, tp, rank, padded_rows):
        source = as_source(tensors[0])
        num_rows = source.shape[0]
        start, stop = _part(max(padded_rows, num_rows), tp, rank)
        part = source.rows(min(start, num_rows), min(stop, num_rows))
        if part.shape[0] < stop - start:
            part = torch.cat([part, part.new_zeros(stop - start - part.shape[0],
                                                   *part.shape[1:])])
        return part

    def from_shards(self, shards, shape):
        full = shards[0] if len(shards) == 1 else torch.cat(shards, dim=0)  # no copy at TP1
        return [full[: shape.vocab_size]]


class InterleavedQKV(Mapping):
    """HF's separate q/k/v (weights or biases) -> Megatron's fused QKV, grouped per KV head:
    ``[g, (q heads per group + 2) x d, ...]``, so a TP split keeps whole groups together."""

    def to_shard(self, tensors, shape, tp, rank, padded_rows):
        per, d = self._per_group(shape), shape.kv_channels
        first, last = _part(shape.num_query_groups, tp, rank)
        q, k, v = (as_source(t) for t in tensors)
        groups = last - first
        rest = tuple(q.shape[1:])
        grouped = torch.cat([q.rows(first * per * d, last * per * d).reshape(groups, per * d, *rest),
                             k.rows(first * d, last * d).reshape(groups, d, *rest),
                             v.rows(first * d, last * d).reshape(groups, d, *rest)], dim=1)
        return grouped.reshape(-1, *rest)

    def from_shards(self, shards, shape):
        g, per, d = shape.num_query_groups, self._per_group(shape), shape.kv_channels
        full = torch.cat(shards, dim=0)
        grouped = full.reshape(g, (per + 2) * d, *full.shape[1:])
        q, k, v = grouped.split([per * d, d, d], dim=1)
        return [t.reshape(-1, *full.shape[1:]).contiguous() for t in (q, k, v)]

    @staticmethod
    def _per_group(shape: ModelShape) -> int:
        return shape.num_attention_heads // shape.num_query_groups


class GatedMLP(Mapping):
    """HF's ``gate_proj`` and ``up_proj`` -> Megatron's SwiGLU ``linear_fc1``: each rank holds
    its slice of the gate followed by its slice of the up projection."""

    def to_shard(self, tensors, shape, tp, rank, padded_rows):
        gate, up = (as_source(t) for t in tensors)
        return torch.cat([gate.rows(*_part(gate.shape[0], tp, rank)),
                          up.rows(*_part(up.shape[0], tp, rank))])

    def from_shards(self, shards, shape):
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]


@dataclass(frozen=True)
class Row:
    local: str
    """Megatron parameter name with the local layer spec ({i} = global layer index)."""
    te: str
    """The same parameter's name with the Transformer Engine spec (fused norms)."""
    hf: tuple
    """HF tensor names it is built from, in order."""
    mapping: Mapping
    """How the HF tensors are laid out into TP shards and back."""
    optional: bool = False
    """Only some models have it (QKV bias: Qwen2 yes, Llama no)."""


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."
_REPLICATED, _ROW, _VOCAB, _QKV, _FC1 = (Replicated(), RowParallel(), VocabParallel(),
                                         InterleavedQKV(), GatedMLP())
EMBEDDING_HF_NAME = "model.embed_tokens.weight"
OUTPUT_HF_NAME = "lm_head.weight"
TABLE: tuple = (
    Row("embedding.word_embeddings.weight", "embedding.word_embeddings.weight",
        (EMBEDDING_HF_NAME,), _VOCAB),
    Row(_L + "input_layernorm.weight", _L + "self_attention.linear_qkv.layer_norm_weight",
        (_H + "input_layernorm.weight",), _REPLICATED),
    Row(_L + "self_attention.linear_qkv.weight", _L + "self_attention.linear_qkv.weight",
        (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight",
         _H + "self_attn.v_proj.weight"), _QKV),
    Row(_L + "self_attention.linear_qkv.bias", _L + "self_attention.linear_qkv.bias",
        (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias",
         _H + "self_attn.v_proj.bias"), _QKV, optional=True),
    Row(_L + "self_attention.linear_proj.weight", _L + "self_attention.linear_proj.weight",
        (_H + "self_attn.o_proj.weight",), _ROW),
    Row(_L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight",
        (_H + "post_attention_layernorm.weight",), _REPLICATED),
    Row(_L + "mlp.linear_fc1.weight", _L + "mlp.linear_fc1.weight",
        (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), _FC1),
    Row(_L + "mlp.linear_fc2.weight", _L + "mlp.linear_fc2.weight",
        (_H + "mlp.down_proj.weight",), _ROW),
    Row("decoder.final_layernorm.weight", "decoder.final_layernorm.weight",
        ("model.norm.weight",), _REPLICATED),
    Row("output_layer.weight", "output_layer.weight", (OUTPUT_HF_NAME,), _VOCAB),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_MCORE_PATTERNS = [(_pattern(r.local), r) for r in TABLE] + [(_pattern(r.te), r) for r in TABLE]


def match_mcore_name(name: str) -> tuple[Row, Optional[int]]:
    """The table row of a Megatron parameter name (global layer numbering) and its layer."""
    for pattern, row in _MCORE_PATTERNS:
        m = pattern.match(name)
        if m:
            return row, (int(m.group("i")) if "i" in m.groupdict() else None)
    raise ConversionError(f"Megatron parameter {name!r} has no row in the HF mapping table")


def hf_names(row: Row, layer: Optional[int]) -> list[str]:
    """The HF tensor names of ``row`` at ``layer`` (what an untied checkpoint stores)."""
    return [n.format(i=layer) for n in row.hf]


def is_tied_output(row: Row, shape: ModelShape) -> bool:
    """The tied-``lm_head`` rule: with tied embeddings the output layer is the embedding, so it
    is read from ``model.embed_tokens.weight`` and never written as ``lm_head.weight``."""
    return shape.tie_word_embeddings and row.hf == (OUTPUT_HF_NAME,)


def hf_source_names(row: Row, layer: Optional[int], shape: ModelShape) -> list[str]:
    """The HF tensors a Megatron parameter is *read* from (import, gradient references)."""
    return [EMBEDDING_HF_NAME] if is_tied_output(row, shape) else hf_names(row, layer)


def hf_stored_names(row: Row, layer: Optional[int], shape: ModelShape) -> list[str]:
    """The HF tensors a checkpoint of this shape *stores* for ``row`` (export, name checks)."""
    if is_tied_output(row, shape) or (row.optional and not shape.add_qkv_bias):
        return []
    return hf_names(row, layer)


def expected_hf_names(shape: ModelShape) -> set[str]:
    """Every tensor name an HF checkpoint of this shape must hold (and no other)."""
    names = set()
    for row in TABLE:
        layers = range(shape.num_layers) if "{i}" in row.local else [None]
        for layer in layers:
            names.update(hf_stored_names(row, layer, shape))
    return names


def global_param_names(chunk: torch.nn.Module) -> dict:
    """Map each parameter's local name in a (possibly pipeline-staged) chunk to its global name."""
    layers = getattr(getattr(chunk, "decoder", None), "layers", None)
    offset = (layers[0].layer_number - 1) if layers is not None and len(layers) else 0
    out = {}
    for name, _ in chunk.named_parameters():
        out[name] = re.sub(r"^decoder\.layers\.(\d+)\.",
                           lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
    return out


def check_source_shapes(param: torch.Tensor, global_name: str, shapes: dict,
                        shape: ModelShape, tp: int) -> None:
    """Refuse HF tensors (``shapes``: name -> shape) whose shape is not the one ``param`` (this
    rank's shard) implies, naming both. Sources are read in slices, so an oversized HF tensor
    would otherwise fit; the implied shapes are computed on the meta device."""
    row, layer = match_mcore_name(global_name)
    names = hf_source_names(row, layer, shape)
    implied = row.mapping.from_shards([torch.empty(param.shape, device="meta")] * tp, shape)
    for name, full in zip(names, implied):
        if name not in shapes:
            raise ConversionError(f"missing HF tensor {name} for {global_name}")
        if tuple(shapes[name]) != tuple(full.shape):
            raise ConversionError(f"{name} has shape {tuple(shapes[name])}; {global_name} "
                                  f"needs {tuple(full.shape)} (is the config.json that of "
                                  f"these weights?)")


def shard_for_param(param: torch.Tensor, global_name: str, get_tensor: Callable[[str], object],
                    shape: ModelShape, tp: int, rank: int) -> torch.Tensor:
    """The value of one (TP-sharded) Megatron parameter, built from HF tensors fetched by name
    (``get_tensor`` returns a tensor or a source that reads only this rank's slice). Refuses a
    shape mismatch naming both sides."""
    row, layer = match_mcore_name(global_name)
    sources = hf_source_names(row, layer, shape)
    padded_rows = param.shape[0] * tp if isinstance(row.mapping, VocabParallel) else 0
    tensors = [as_source(get_tensor(n)) for n in sources]
    check_source_shapes(param, global_name, {n: t.shape for n, t in zip(sources, tensors)},
                        shape, tp)
    shard = row.mapping.to_shard(tensors, shape, tp, rank, padded_rows)
    if shard.shape != param.shape:
        raise ConversionError(f"{', '.join(sources)} -> {global_name}: shape "
                              f"{tuple(shard.shape)} does not fit the model's {tuple(param.shape)}")
    return shard


def load_hf_tensors_into_chunks(chunks: list, get_tensor: Callable[[str], object],
                                shape: ModelShape, tp_group) -> None:
    """Copy HF tensors (fetched one at a time by name) into this rank's TP/PP shard, in place."""
    tp = tp_group.size() if tp_group is not None else 1
    rank = tp_group.rank() if tp_group is not None else 0
    for chunk in chunks:
        params = dict(chunk.named_parameters())
        for local, global_name in global_param_names(chunk).items():
            param = params[local]
            shard = shard_for_param(param, global_name, get_tensor, shape, tp, rank)
            with torch.no_grad():
                param.copy_(shard.to(param.dtype))


def hf_tensors_from_shards(global_name: str, shards: list, shape: ModelShape) -> dict:
    """``{HF name: full tensor}`` for one Megatron parameter from all its TP shards (empty for a
    tied output layer, which the embedding already stores)."""
    row, layer = match_mcore_name(global_name)
    names = hf_stored_names(row, layer, shape)
    return dict(zip(names, row.mapping.from_shards(shards, shape))) if names else {}
