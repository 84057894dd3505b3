"""Per-rank memory estimate for a SoLoPO run: weights, gradients, optimizer state, activations.

Static bytes per parameter on the rank that holds it (Megatron DDP, ``grad_reduce_in_fp32``):

* weights: 2 (bf16/fp16) or 4 (fp32);
* gradients: 4 (the fp32 main-grad buffer);
* optimizer: Adam moments 8, plus a 4-byte fp32 master copy for bf16/fp16 weights; divided by
  the data-parallel x context-parallel size with the distributed optimizer (Megatron shards it
  over both); none on the GPU with CPU offload.

Parameters per rank: the transformer layers divided by TP x PP, plus the (TP-sharded, padded)
vocabulary: the embedding on the first stage and the output layer on the last (the larger of the
two with PP, both without).

Activations are counted tensor by tensor from what autograd keeps for backward on this project's
local-spec path (:func:`activation_table`), found with ``torch.autograd.graph.saved_tensors_hooks``
and validated end to end against measured peaks (:mod:`solopo_mcore.profiling.memory`;
benchmarks/RESULTS.md). Per token of a microbatch, per layer, with ``a`` the activation bytes:

* the two RMSNorms (:class:`~solopo_mcore.models.norm.SequenceParallelRMSNorm`) keep their
  input ``2 h a`` and their fp32 inverse RMS ``2 x 4``; with ``activation_memory="megatron"``
  their outputs are kept as the QKV / FC1 inputs too, ``2 h a`` (``"lean"``, the default, rebuilds
  them in backward: ``models/rebuilt_saves.py``). Without sequence parallelism these hidden states are replicated on every TP
  rank; with it (``sequence_parallel``, the default at TP > 1) each rank holds ``1/tp`` of the
  tokens, so these three terms are divided by ``tp``: Megatron's column-parallel linears keep
  their local input and all-gather it again in backward, into one reused full-sequence buffer
  (``h a`` per token, once per rank, not per layer: ``sp_gather_buffer``);
* RoPE keeps cos and sin for q and k: ``4 d a``;
* core attention (SDPA flash/efficient) keeps q, the GQA-expanded k and v, and its output:
  ``4 n_q d / tp a``, plus the fp32 log-sum-exp ``n_q / tp x 4``; with ``"megatron"`` the output
  projection's input too, ``n_q d / tp a`` (``"lean"`` rebuilds it from the SDPA outputs);
* the MLP keeps FC1's output ``2 f / tp a`` (``"lean"``: :class:`~solopo_mcore.models.mlp.LeanMLP`
  rebuilds FC2's input from it). With ``"megatron"`` it also keeps FC2's input ``f / tp a``, and
  torch's composite SwiGLU the SiLU output and the gate operand, ``2 f / tp a`` more, which
  Megatron's fused ``bias_swiglu`` (``bias_activation_fusion``, on with CUDA) recomputes.

Recompute: ``selective`` (core attention) keeps q, k, v (``(n_q + 2 n_kv) d / tp``) instead of the
attention internals and rebuilds one layer's internals in backward; ``full`` keeps each recompute
unit's input ``h a`` (``h a / tp`` with sequence parallelism) and rebuilds ``recompute_num_layers``
layers at a time. Backward's working set adds the FC1-output and hidden-state gradients, ``(2 f / tp
+ 2 h) a``, and with ``"lean"`` FC2's rebuilt input, ``f / tp a``. With PP the first stage holds min(PP, microbatches) microbatches' kept activations
(1F1B). With CP every term is per local token (tokens / CP) except the expanded k and v, which span
each segment's visible global prefix, ``(2 CP + 1) / (2 CP)`` of the global tokens. (On CPU only,
torch materializes the lower-right masks of CP chunks: ``materialized_cp_masks``.)

Shared-prefix segments (``[x, y_w, x[-1], y_l]``, ``models/shared_prefix.py``) have fewer tokens
than the two segments they replace (``x`` once, plus one repeated token), but the branch's SDPA
call gathers its keys again: it concatenates ``x[:-1]``'s keys and values with its own and expands
them for GQA, so the expanded k and v of a shared segment span ``L + |x| - 1`` tokens (and on CPU
the branch's lower-right mask is materialized too). Given the packed microbatch's segments
(:func:`segment_layouts`: padded lengths, hidden key ranges, response positions), the estimator
walks each CP rank's query pieces with the attention's own ``query_key_ranges`` and counts the
busiest rank's expanded keys, masks and response tokens exactly; a shared segment's ``y_w`` sits
in its middle, not at its end.

Response-only logits: the vocab-parallel cross entropy works in place on the fp32 logits
(``n_response x V_padded / tp x 4`` bytes, with the response tokens of the busiest CP rank: a
response ends its segment, in the last zigzag chunk, which CP rank 0 holds, so CP does not divide
responses shorter than a chunk), which become its saved softmax and then the gradient. Forward
adds a copy while the fp32 logits are made (from bf16 logits, or by masking padded-vocab columns);
backward adds the output weight's gradient (``V_padded / tp x h x a``)
before it is accumulated into the main-grad buffer. Context positions never get logits. The
logits exist at the end of forward and the start of backward, before backward's recomputed
tensors and working set, so the peak counts the larger of the two on top of the kept activations.
With tied embeddings on one stage, the output layer's weight gradient (``V_padded / tp x h x a``)
waits in autograd for the embedding's contribution through all of backward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from solopo_mcore.models.hf_config import ModelShape, padded_vocab_size
from solopo_mcore.models.shared_prefix import query_key_ranges

GIB = 1024 ** 3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class SegmentLayout:
    """One THD segment of a packed microbatch, as the estimator needs it."""

    length: int
    """Padded tokens (global, before the CP split)."""
    hidden_keys: Optional[tuple] = None
    """A shared-prefix segment's ``(lo, hi)``: queries at ``>= hi`` do not see keys ``[lo, hi)``;
    None for an ordinary causal segment."""
    response_spans: tuple = ()
    """``((start, end), ...)`` segment-relative positions where logits are computed."""


def segment_layouts(batch) -> tuple:
    """The :class:`SegmentLayout` of every segment of a global (unsplit) ``PackedMicrobatch``."""
    padded = batch.cu_seqlens_padded.tolist()
    mask = batch.loss_mask[0].tolist()
    layouts = []
    for index, (start, end) in enumerate(zip(padded[:-1], padded[1:])):
        length = end - start
        hidden = batch.hidden_keys[index] if batch.hidden_keys is not None else None
        if hidden is not None and hidden[0] >= length:
            hidden = None  # an ordinary segment in a microbatch that also holds shared ones
        spans, open_at = [], None
        for t in range(length + 1):
            on = t < length and mask[start + t]
            if on and open_at is None:
                open_at = t
            elif not on and open_at is not None:
                spans.append((open_at, t))
                open_at = None
        layouts.append(SegmentLayout(length, None if hidden is None else tuple(hidden),
                                     tuple(spans)))
    return tuple(layouts)


def inputs_from_batch(batch, repeat: int = 1) -> dict:
    """The microbatch fields of :class:`EstimateInputs` from a global packed microbatch, its
    segments repeated ``repeat`` times (a microbatch of ``repeat`` such examples)."""
    layouts = segment_layouts(batch) * repeat
    return dict(microbatch_tokens=sum(s.length for s in layouts),
                response_tokens=sum(e - b for s in layouts for b, e in s.response_spans),
                segment_tokens=tuple(s.length for s in layouts), segments=layouts)


@dataclass
class EstimateInputs:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    params_dtype: str = "bf16"
    distributed_optimizer: bool = True
    optimizer_cpu_offload: bool = False
    recompute: Optional[str] = "full"
    """None/"none", "selective" or "full"."""
    recompute_method: str = "uniform"
    """With full recompute: "uniform" (every layer, in units of recompute_num_layers) or "block"
    (only the first recompute_num_layers layers of each stage)."""
    recompute_num_layers: int = 1
    activation_memory: str = "lean"
    """``ModelConfig.activation_memory``: "lean" (the default) or "megatron"."""
    fused_swiglu: bool = True
    """With "megatron": Megatron's ``bias_activation_fusion`` SwiGLU (on with CUDA)."""
    microbatch_tokens: int = 0
    """Tokens in one packed microbatch (all its segments), before the CP split."""
    num_microbatches: Optional[int] = None
    """Microbatches per step; with PP the first stage holds min(PP, this) in flight (PP if None)."""
    response_tokens: int = 0
    """Response tokens in it (where logits are computed)."""
    segment_tokens: tuple = ()
    """Lengths of the microbatch's segments (only the CPU mask term below needs them; empty: one
    segment of microbatch_tokens)."""
    segments: tuple = ()
    """The microbatch's :class:`SegmentLayout` s (:func:`inputs_from_batch`); when given, the
    expanded k/v, the CPU masks and the busiest CP rank's response tokens are counted from them
    (shared-prefix segments included) instead of from ``segment_tokens``."""
    sequence_parallel: Optional[bool] = None
    """Megatron sequence parallelism; None: on whenever TP > 1 (the trainer's default)."""
    materialized_cp_masks: bool = False
    """CPU only: torch materializes the lower-right causal mask of each CP chunk (fp32,
    chunk x visible prefix), and of each shared-prefix branch, and its flash kernel keeps it for
    backward; CUDA kernels do not."""
    vocab_divisible_by: int = 128
    workspace_gib: float = 3.0
    """CUDA context, NCCL buffers, allocator fragmentation: outside the tensor figures."""


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


def sequence_parallel_on(x: EstimateInputs) -> bool:
    return x.tp > 1 and x.sequence_parallel is not False


def activation_table(shape: ModelShape, tp: int, act_bytes: int, fused_swiglu: bool,
                     sequence_parallel: bool = False, lean: bool = True) -> dict:
    """Bytes per token that one transformer layer keeps for backward, by tensor (no recompute).
    The ``attention_*`` entries are what selective recompute drops; the ``norm_*`` entries are
    what sequence parallelism divides by TP."""
    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.kv_channels
    q_dim = shape.num_attention_heads * d / tp
    share = 1 / tp if sequence_parallel else 1
    return {
        "norm_inputs": 2 * h * act_bytes * share,
        "norm_inv_rms": 2 * 4 * share,
        "norm_outputs": 0 if lean else 2 * h * act_bytes * share,
        "rope_cos_sin": 4 * d * act_bytes,
        "attention_q_and_output": 2 * q_dim * act_bytes,
        "attention_expanded_kv": 2 * q_dim * act_bytes,
        "attention_lse": shape.num_attention_heads / tp * 4,
        "proj_input": 0 if lean else q_dim * act_bytes,
        "mlp": (2 if lean else 3 if fused_swiglu else 5) * f / tp * act_bytes,
    }


def activation_bytes(shape: ModelShape, x: EstimateInputs, layers: float) -> tuple:
    """(kept, backward) activation bytes on the most loaded pipeline stage (``layers`` layers):
    what the in-flight microbatches keep for backward, and what backward adds on top of it (the
    recomputed tensors and the working set)."""
    act = DTYPE_BYTES[x.params_dtype]
    sp = sequence_parallel_on(x)
    table = activation_table(shape, x.tp, act, x.fused_swiglu, sp,
                             lean=x.activation_memory == "lean")
    tokens = x.microbatch_tokens / x.cp
    layer_input = shape.hidden_size * act * tokens / (x.tp if sp else 1)
    keys = attention_key_bytes(x, table["attention_expanded_kv"])
    per_layer = sum(v for k, v in table.items() if k != "attention_expanded_kv") * tokens + keys
    attention_internals = (table["attention_q_and_output"] + table["attention_lse"]) * tokens + \
        keys
    h, f = shape.hidden_size, shape.ffn_hidden_size
    # "lean" adds FC2's rebuilt input to backward's FC1-output gradient (tests/test_profiling.py
    # checks both against the CPU allocator)
    working_set = ((3 if x.activation_memory == "lean" else 2) * f / x.tp + 2 * h) * act * tokens
    recompute = (x.recompute or "none").lower()
    if recompute == "full":
        unit = max(1, min(x.recompute_num_layers, int(layers)))
        if x.recompute_method == "block":
            kept = (layers - unit) * per_layer + unit * layer_input
            rebuilt = per_layer
        else:
            kept = layers / unit * layer_input
            rebuilt = unit * per_layer
    elif recompute == "selective":
        q_kv = (shape.num_attention_heads + 2 * shape.num_query_groups) * shape.kv_channels / x.tp
        kept = layers * (per_layer - attention_internals + q_kv * act * tokens)
        rebuilt = attention_internals
    else:
        kept, rebuilt = layers * per_layer, 0.0
    in_flight = min(x.pp, x.num_microbatches or x.pp)
    # the column-parallel linears' all-gather buffer: allocated once, reused by every layer
    gather_buffer = h * act * tokens if sp else 0.0
    return in_flight * kept + gather_buffer, rebuilt + working_set


def _rank_query_pieces(segment: SegmentLayout, cp: int, rank: int):
    """The SDPA calls CP rank ``rank`` makes for ``segment``: ``(num_queries, key_ranges)``, as
    ``models/attention.py`` cuts them (zigzag chunks ``rank`` and ``2 CP - 1 - rank``)."""
    length = segment.length
    chunk = length / (2 * cp)
    ranges = [(0, length)] if cp == 1 else \
        [(j * chunk, (j + 1) * chunk) for j in (rank, 2 * cp - 1 - rank)]
    for start, end in ranges:
        for q_lo, q_hi, key_ranges in query_key_ranges(start, end,
                                                       segment.hidden_keys or (length, length)):
            yield q_hi - q_lo, key_ranges


def attention_key_bytes(x: EstimateInputs, expanded_kv_per_token: float) -> float:
    """Bytes per layer of the expanded k and v that SDPA keeps (and, with
    ``materialized_cp_masks``, the fp32 lower-right masks), on the busiest CP rank."""
    if not x.segments:
        # expanded k/v span each local chunk's visible global prefix (all of it without CP)
        kv_tokens = x.microbatch_tokens / x.cp if x.cp == 1 else \
            x.microbatch_tokens * (2 * x.cp + 1) / (2 * x.cp)
        masks = 0.0
        if x.materialized_cp_masks and x.cp > 1:
            # every rank's two chunks see (2 CP + 1) chunks of keys in all
            masks = sum(4 * (2 * x.cp + 1) * (n / (2 * x.cp)) ** 2
                        for n in (x.segment_tokens or (x.microbatch_tokens,)))
        return expanded_kv_per_token * kv_tokens + masks
    busiest = 0.0
    for rank in range(x.cp):
        held = 0.0
        for segment in x.segments:
            for num_queries, key_ranges in _rank_query_pieces(segment, x.cp, rank):
                num_keys = sum(end - start for start, end in key_ranges)
                held += expanded_kv_per_token * num_keys
                if x.materialized_cp_masks and num_keys != num_queries:  # lower-right mask
                    held += 4 * num_queries * num_keys
        busiest = max(busiest, held)
    return busiest


def response_tokens_on_busiest_cp_rank(x: EstimateInputs) -> float:
    """Responses end their segments; in the zigzag layout CP rank k holds chunks k and 2CP-1-k of
    every segment, so rank 0 gets each response's tail. Equal responses per segment assumed; all
    of them on one rank without ``segment_tokens``. With ``segments`` (:class:`SegmentLayout`),
    each response's own positions are used: a shared segment's ``y_w`` sits in its middle."""
    if x.segments:
        best = 0.0
        for rank in range(x.cp):
            held = 0.0
            for segment in x.segments:
                chunk = segment.length / (2 * x.cp)
                for index in (rank, 2 * x.cp - 1 - rank) if x.cp > 1 else (0,):
                    lo, hi = (index * chunk, (index + 1) * chunk) if x.cp > 1 else \
                        (0, segment.length)
                    held += sum(max(0.0, min(hi, end) - max(lo, start))
                                for start, end in segment.response_spans)
            best = max(best, held)
        return best
    if x.cp == 1 or not x.segment_tokens:
        return float(x.response_tokens)
    response = x.response_tokens / len(x.segment_tokens)
    best = 0.0
    for rank in range(x.cp):
        held = 0.0
        for length in x.segment_tokens:
            chunk = length / (2 * x.cp)
            for index in (rank, 2 * x.cp - 1 - rank):
                start, end = index * chunk, (index + 1) * chunk
                held += max(0.0, end - max(start, length - response))
        best = max(best, held)
    return best


def logits_bytes(shape: ModelShape, x: EstimateInputs, vocab: int, act: int) -> float:
    """Peak bytes of the response-only output layer (see the module docstring)."""
    elements = response_tokens_on_busiest_cp_rank(x) * vocab / x.tp
    # forward: the fp32 logits, plus a copy while it is made (bf16 -> fp32; padded-vocab mask)
    copy = max(act if act < 4 else 0, 4 if vocab > shape.vocab_size else 0)
    # backward: the fp32 softmax turned gradient, plus the output weight's gradient before it is
    # added into the fp32 main-grad buffer
    return max(elements * (4 + copy), elements * 4 + vocab / x.tp * shape.hidden_size * act)


def estimate_memory(shape: ModelShape, x: EstimateInputs) -> dict:
    """Per-rank GiB by component (the most loaded pipeline stage; ``activations_gib`` and
    ``logits_gib`` each at their own peak), the tensor total at the step's peak (what
    ``torch.cuda.max_memory_allocated`` measures) and the total with the workspace."""
    counts = parameter_counts(shape)
    vocab = padded_vocab_size(shape.vocab_size, x.vocab_divisible_by, x.tp)
    embedding = vocab * shape.hidden_size
    output = 0 if shape.tie_word_embeddings else embedding
    layers_per_stage = shape.num_layers / x.pp
    stage_params = counts["per_layer"] * layers_per_stage / x.tp
    stage_params += (max(embedding, output) if x.pp > 1 else embedding + output) / x.tp
    weight_bytes = DTYPE_BYTES[x.params_dtype]
    optimizer_bytes = (12 if weight_bytes == 2 else 8) * stage_params
    if x.distributed_optimizer:  # sharded over the data-parallel ranks, context-parallel included
        optimizer_bytes /= x.dp * x.cp
    if x.optimizer_cpu_offload:
        optimizer_bytes = 0.0
    logits = logits_bytes(shape, x, vocab, weight_bytes)
    kept, backward = activation_bytes(shape, x, layers_per_stage)
    if shape.tie_word_embeddings and x.pp == 1:
        # autograd holds the output layer's gradient of the shared weight until the embedding's
        # gradient arrives at the very end of backward, and only then accumulates it
        backward += vocab / x.tp * shape.hidden_size * weight_bytes
    out = {
        "weights_gib": weight_bytes * stage_params / GIB,
        "gradients_gib": 4 * stage_params / GIB,
        "optimizer_gib": optimizer_bytes / GIB,
        "activations_gib": (kept + backward) / GIB,
        "logits_gib": logits / GIB,
    }
    # the logits live at the end of forward, before backward adds its tensors: the larger counts
    out["tensors_gib"] = (weight_bytes + 4) * stage_params / GIB + out["optimizer_gib"] + \
        (kept + max(backward, logits)) / GIB
    out["workspace_gib"] = x.workspace_gib
    out["total_gib"] = out["tensors_gib"] + x.workspace_gib
    out["params_per_rank"] = stage_params
    return out


def sequence_parallel_saving_gib(shape: ModelShape, x: EstimateInputs) -> float:
    """Per-rank GiB that sequence parallelism saves at this layout (0 at TP = 1)."""
    if x.tp == 1:
        return 0.0
    with_sp = estimate_memory(shape, replace(x, sequence_parallel=True))["total_gib"]
    return estimate_memory(shape, replace(x, sequence_parallel=False))["total_gib"] - with_sp
