"""Per-rank memory estimate for a SoLoPO run: weights, gradients, optimizer state, activations.

Bytes per parameter on the rank that holds it (Megatron with the DDP fp32 gradient buffer):

* weights: 2 (bf16) or 4 (fp32);
* gradients: 4 (``grad_reduce_in_fp32`` main-grad buffer);
* optimizer: fp32 master copy (bf16 only) + Adam moments = 12 (bf16) or 8 (fp32) bytes, divided
  by the data-parallel size with the distributed optimizer, and moved to host with CPU offload.

Parameters per rank: the transformer layers divided by TP x PP, plus the (vocab-sharded) embedding
on the first stage and the output layer on the last (counted on the stage holding the most).

Activations per token, per layer (bf16, Korthikanti et al. 2022 with flash-style attention, i.e.
no s^2 score tensor), divided by TP (no sequence parallelism) and CP:

* no recompute: ``h * (10 + 24 / tp)`` bytes plus the MLP's SwiGLU intermediates
  ``3 * f / tp * 2`` (our ffn is not 4h);
* selective (core attention recomputed): the same minus the attention-internal tensors;
* full: only each layer's input ``2 * h`` bytes is kept, plus one layer's worth while it is
  recomputed.

Response-only logits add ``n_response * V / tp * 4 * 3`` bytes (fp32 logits, softmax, grad) —
context positions never get logits. The whole microbatch (all segments) is in flight at once;
with PP, the first stage holds up to PP microbatches (1F1B), counted here.
"""

from __future__ import annotations

from dataclasses import dataclass

from solopo_mcore.models.hf_config import ModelShape

GIB = 1024 ** 3


@dataclass
class EstimateInputs:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    params_dtype: str = "bf16"
    distributed_optimizer: bool = True
    optimizer_cpu_offload: bool = False
    recompute: str = "full"
    """None/"none", "selective" or "full"."""
    microbatch_tokens: int = 0
    """Tokens in one packed microbatch (all its segments)."""
    response_tokens: int = 0
    """Response tokens in it (where logits are computed)."""
    workspace_gib: float = 3.0
    """CUDA context, NCCL buffers, allocator fragmentation."""


def parameter_counts(shape: ModelShape) -> dict:
    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.kv_channels
    q, kv = shape.num_attention_heads, shape.num_query_groups
    per_layer = h * (q + 2 * kv) * d + q * d * h + 3 * h * f + 2 * h
    if shape.add_qkv_bias:
        per_layer += (q + 2 * kv) * d
    embedding = shape.vocab_size * h
    output = 0 if shape.tie_word_embeddings else shape.vocab_size * h
    return {"per_layer": per_layer, "layers": per_layer * shape.num_layers,
            "embedding": embedding, "output": output,
            "total": per_layer * shape.num_layers + embedding + output + h}


def estimate_memory(shape: ModelShape, x: EstimateInputs) -> dict:
    """Per-rank GiB by component (the most loaded pipeline stage), and the total."""
    counts = parameter_counts(shape)
    layers_per_stage = shape.num_layers / x.pp
    stage_params = counts["per_layer"] * layers_per_stage / x.tp
    stage_params += max(counts["embedding"], counts["output"]) / x.tp if x.pp > 1 else \
        (counts["embedding"] + counts["output"]) / x.tp
    weight_bytes = 2 if x.params_dtype in ("bf16", "fp16") else 4
    optimizer_bytes = (12 if weight_bytes == 2 else 8) * stage_params
    if x.distributed_optimizer:
        optimizer_bytes /= x.dp
    if x.optimizer_cpu_offload:
        optimizer_bytes = 0.0
    h, f = shape.hidden_size, shape.ffn_hidden_size
    tokens = x.microbatch_tokens / x.cp
    full_layer = h * (10 + 24 / x.tp) + 3 * f / x.tp * 2
    recompute = (x.recompute or "none").lower()
    if recompute == "full":
        per_layer_kept = 2 * h
        activations = tokens * (per_layer_kept * layers_per_stage + full_layer)
    elif recompute == "selective":
        activations = tokens * layers_per_stage * (full_layer - 4 * h / x.tp)
    else:
        activations = tokens * layers_per_stage * full_layer
    activations *= x.pp  # 1F1B: the first stage holds PP microbatches in flight
    logits = x.response_tokens / x.cp * shape.vocab_size / x.tp * 4 * 3
    out = {
        "weights_gib": weight_bytes * stage_params / GIB,
        "gradients_gib": 4 * stage_params / GIB,
        "optimizer_gib": optimizer_bytes / GIB,
        "activations_gib": activations / GIB,
        "logits_gib": logits / GIB,
        "workspace_gib": x.workspace_gib,
        "params_per_rank": stage_params,
    }
    out["total_gib"] = sum(v for k, v in out.items() if k.endswith("_gib"))
    return out


def suggest_layouts(shape: ModelShape, world_size: int, microbatch_tokens: int,
                    response_tokens: int, device_gib: float, **kwargs) -> list[dict]:
    """Layouts (TP, PP, CP) that fit ``device_gib``, cheapest communication first."""
    fits = []
    for tp in (1, 2, 4, 8):
        if shape.num_attention_heads % tp or shape.num_query_groups % tp:
            continue
        for cp in (1, 2, 4, 8, 16):
            for pp in (1, 2, 4, 8):
                if world_size % (tp * cp * pp) or shape.num_layers % pp:
                    continue
                dp = world_size // (tp * cp * pp)
                est = estimate_memory(shape, EstimateInputs(
                    tp=tp, pp=pp, cp=cp, dp=dp, microbatch_tokens=microbatch_tokens,
                    response_tokens=response_tokens, **kwargs))
                if est["total_gib"] <= device_gib:
                    fits.append({"tp": tp, "pp": pp, "cp": cp, "dp": dp,
                                 "total_gib": round(est["total_gib"], 1)})
    # prefer fewer model-parallel ranks (less communication), then more headroom
    return sorted(fits, key=lambda r: (r["tp"] * r["pp"] * r["cp"], r["total_gib"]))
