"""The one FLOPs function: model FLOPs of a training step, Megatron's convention.

Per token of a segment of length ``s`` (causal), per layer, forward:

* projections: ``2 * h * (q + 2 * kv) * d_head`` (QKV) + ``2 * q * d_head * h`` (output)
* MLP (SwiGLU): ``2 * 3 * h * f``
* attention: ``2 * 2 * s * q * d_head`` for QK^T and AV, **halved for causal masking**
  (each token attends to ``s/2`` keys on average). A shared-prefix segment
  (``models/shared_prefix.py``) computes ``s^2/2 - (s - hi) * (hi - lo)`` query-key pairs: its
  branch skips the hidden keys ``[lo, hi)``.

plus the output layer, ``2 * h * V``, counted only at the positions where logits are computed
(response tokens: this trainer never computes the context's logits). Training is 3x the forward
(backward = 2x forward). Recomputation is *not* counted: MFU is model FLOPs, not hardware FLOPs.

MFU = model FLOPs / (step time x devices x peak); :data:`PEAK_TFLOPS` lists dense bf16 peaks.
"""

from __future__ import annotations

from typing import Iterable, Optional

from solopo_mcore.models.hf_config import ModelShape
from solopo_mcore.models.shared_prefix import hidden_key_pairs

#: Dense bf16 peak TFLOP/s per device, from the vendors' spec sheets (no sparsity).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,   # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}


def forward_flops_per_segment(shape: ModelShape, seq_len: int, num_logit_tokens: int,
                              hidden_keys: Optional[tuple] = None) -> float:
    """Forward FLOPs of one causal segment of ``seq_len`` tokens with logits at
    ``num_logit_tokens`` positions; ``hidden_keys``: a shared-prefix segment's ``(lo, hi)``."""
    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.kv_channels
    q, kv = shape.num_attention_heads, shape.num_query_groups
    per_token_layer = 2 * h * (q + 2 * kv) * d + 2 * q * d * h + 2 * 3 * h * f
    pairs = hidden_key_pairs(seq_len, hidden_keys or (seq_len, seq_len))  # causal-halved
    attention_layer = 2 * 2 * pairs * q * d
    layers = shape.num_layers * (seq_len * per_token_layer + attention_layer)
    return float(layers + 2 * h * shape.vocab_size * num_logit_tokens)


def training_step_flops(shape: ModelShape, segments: Iterable[tuple]) -> float:
    """Model FLOPs of fwd+bwd over ``(seq_len, num_logit_tokens[, hidden_keys])`` segments
    (``PackedMicrobatch.segment_shapes()``)."""
    return 3.0 * sum(forward_flops_per_segment(shape, *segment) for segment in segments)


def device_peak_tflops(override: Optional[float] = None) -> Optional[float]:
    """The dense bf16 peak of this rank's device, ``override`` if given, None on CPU/unknown."""
    if override is not None:
        return override
    from solopo_mcore.platform import device_name, on_cuda

    if not on_cuda():
        return None
    name = device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def mfu(step_flops: float, step_seconds: float, num_devices: int,
        peak_tflops: Optional[float]) -> Optional[float]:
    if not peak_tflops or step_seconds <= 0:
        return None
    return step_flops / (step_seconds * num_devices * peak_tflops * 1e12)
