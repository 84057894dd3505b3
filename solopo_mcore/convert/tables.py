"""HF <-> Megatron-Core name and layout tables for Qwen2/Qwen2.5 and Llama 3/3.1.

A row says which HF tensors make one Megatron parameter and how (its *kind*). The kinds are the
only code: each knows how to build one tensor-parallel shard from the HF tensors and how to undo
that from all shards. There is no per-architecture branch; both families share the table, and
tensors a model lacks (QKV bias on Llama, ``lm_head`` when tied) are simply absent from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from solopo_mcore.errors import UserError
from solopo_mcore.models.hf_config import ModelShape


@dataclass(frozen=True)
class Row:
    local: str
    """Megatron parameter name with the local layer spec ({i} = global layer index)."""
    te: str
    """The same parameter's name with the Transformer Engine spec (fused norms)."""
    hf: tuple
    """HF tensor names it is built from, in order."""
    kind: str
    """How: replicate | column | row | vocab | qkv | qkv_bias | fc1."""


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."
TABLE: tuple = (
    Row("embedding.word_embeddings.weight", "embedding.word_embeddings.weight",
        ("model.embed_tokens.weight",), "vocab"),
    Row(_L + "input_layernorm.weight", _L + "self_attention.linear_qkv.layer_norm_weight",
        (_H + "input_layernorm.weight",), "replicate"),
    Row(_L + "self_attention.linear_qkv.weight", _L + "self_attention.linear_qkv.weight",
        (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight",
         _H + "self_attn.v_proj.weight"), "qkv"),
    Row(_L + "self_attention.linear_qkv.bias", _L + "self_attention.linear_qkv.bias",
        (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias",
         _H + "self_attn.v_proj.bias"), "qkv_bias"),
    Row(_L + "self_attention.linear_proj.weight", _L + "self_attention.linear_proj.weight",
        (_H + "self_attn.o_proj.weight",), "row"),
    Row(_L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight",
        (_H + "post_attention_layernorm.weight",), "replicate"),
    Row(_L + "mlp.linear_fc1.weight", _L + "mlp.linear_fc1.weight",
        (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), "fc1"),
    Row(_L + "mlp.linear_fc2.weight", _L + "mlp.linear_fc2.weight",
        (_H + "mlp.down_proj.weight",), "row"),
    Row("decoder.final_layernorm.weight", "decoder.final_layernorm.weight",
        ("model.norm.weight",), "replicate"),
    Row("output_layer.weight", "output_layer.weight", ("lm_head.weight",), "vocab"),
)


class ConversionError(UserError, ValueError):
    pass


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
    return [n.format(i=layer) for n in row.hf]


def expected_hf_names(shape: ModelShape) -> set[str]:
    """Every tensor name an HF checkpoint of this shape must hold (and no other)."""
    names = set()
    for row in TABLE:
        if row.kind == "qkv_bias" and not shape.add_qkv_bias:
            continue
        if row.hf[0] == "lm_head.weight" and shape.tie_word_embeddings:
            continue
        layers = range(shape.num_layers) if "{i}" in row.local else [None]
        for layer in layers:
            names.update(hf_names(row, layer))
    return names


# --- kinds: HF tensors -> one TP shard, and all TP shards -> HF tensors -----------------------

def _qkv_groups(shape: ModelShape, q, k, v):
    g = shape.num_query_groups
    per = shape.num_attention_heads // g
    d = shape.kv_channels
    rest = q.shape[1:]
    return torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest),
                      v.reshape(g, d, *rest)], dim=1)  # [g, (per+2) d, ...]


def to_shard(row: Row, tensors: list, shape: ModelShape, tp: int, rank: int,
             padded_vocab: int) -> torch.Tensor:
    kind = row.kind
    if kind == "replicate":
        return tensors[0]
    if kind == "row":
        return tensors[0].chunk(tp, dim=1)[rank]
    if kind == "column":
        return tensors[0].chunk(tp, dim=0)[rank]
    if kind == "vocab":
        full = tensors[0]
        if padded_vocab > full.shape[0]:
            pad = full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])
            full = torch.cat([full, pad])
        return full.chunk(tp, dim=0)[rank]
    if kind in ("qkv", "qkv_bias"):
        grouped = _qkv_groups(shape, *tensors)
        part = grouped.chunk(tp, dim=0)[rank]
        return part.reshape(-1, *part.shape[2:])
    if kind == "fc1":
        gate, up = tensors
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
    raise ConversionError(f"unknown mapping kind {kind!r}")


def from_shards(row: Row, shards: list, shape: ModelShape) -> list:
    kind = row.kind
    if kind == "replicate":
        return [shards[0]]
    if kind == "row":
        return [torch.cat(shards, dim=1)]
    if kind == "column":
        return [torch.cat(shards, dim=0)]
    if kind == "vocab":
        return [torch.cat(shards, dim=0)[: shape.vocab_size]]
    if kind in ("qkv", "qkv_bias"):
        g = shape.num_query_groups
        per = shape.num_attention_heads // g
        d = shape.kv_channels
        full = torch.cat(shards, dim=0)
        grouped = full.reshape(g, (per + 2) * d, *full.shape[1:])
        q, k, v = grouped.split([per * d, d, d], dim=1)
        return [t.reshape(-1, *full.shape[1:]).contiguous() for t in (q, k, v)]
    if kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    raise ConversionError(f"unknown mapping kind {kind!r}")


def global_param_names(chunk: torch.nn.Module) -> dict:
    """Map each parameter's local name in a (possibly pipeline-staged) chunk to its global name."""
    layers = getattr(getattr(chunk, "decoder", None), "layers", None)
    offset = (layers[0].layer_number - 1) if layers is not None and len(layers) else 0
    out = {}
    for name, _ in chunk.named_parameters():
        out[name] = re.sub(r"^decoder\.layers\.(\d+)\.",
                           lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
    return out


def load_hf_tensors_into_chunks(chunks: list, get_tensor: Callable[[str], torch.Tensor],
                                shape: ModelShape, tp_group) -> None:
    """Copy HF tensors (fetched one at a time by name) into this rank's TP/PP shard, in place."""
    tp = tp_group.size() if tp_group is not None else 1
    rank = tp_group.rank() if tp_group is not None else 0
    for chunk in chunks:
        names = global_param_names(chunk)
        params = dict(chunk.named_parameters())
        for local, global_name in names.items():
            row, layer = match_mcore_name(global_name)
            if row.hf[0] == "lm_head.weight" and shape.tie_word_embeddings:
                tensors = [get_tensor("model.embed_tokens.weight")]
            else:
                tensors = [get_tensor(n) for n in hf_names(row, layer)]
            param = params[local]
            shard = to_shard(row, tensors, shape, tp, rank, _padded_rows(param, row, tp))
            if shard.shape != param.shape:
                raise ConversionError(
                    f"{', '.join(hf_names(row, layer))} -> {global_name}: shape "
                    f"{tuple(shard.shape)} does not fit the model's {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(shard.to(param.dtype))


def _padded_rows(param: torch.Tensor, row: Row, tp: int) -> int:
    return param.shape[0] * tp if row.kind == "vocab" else 0
