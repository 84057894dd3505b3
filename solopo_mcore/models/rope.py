"""RoPE as the HF ``config.json`` defines it: plain, llama3-scaled or YaRN, and the positions a
model can use.

Megatron-Core has its own llama3 scaling and a ``YarnRotaryEmbedding``, but the latter builds its
frequencies on CUDA only and has no per-token position path (which shared-prefix segments need,
``models/shared_prefix.py``). So the builder keeps Megatron's plain ``RotaryEmbedding`` (with our
position path) and sets its inverse frequencies from :func:`inverse_frequencies`, which follows
transformers' ``modeling_rope_utils`` formulas for each type. YaRN's attention factor ``m``
multiplies cos and sin for both q and k in transformers, i.e. it scales every attention logit by
``m**2``; :func:`softmax_scale` folds that into the attention's softmax scale, as Megatron does for
YaRN in multi-latent attention, so every attention path (THD, context parallel, shared prefix, TE)
gets it without touching the rotation.

Usable positions (:func:`usable_positions`) are what the trainer and ``preprocess`` enforce:
``max_position_embeddings`` without scaling (and for llama3, whose ``max_position_embeddings`` is
already the scaled length), ``factor x original_max_position_embeddings`` with YaRN.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from solopo_mcore.errors import UserError


class RopeScalingError(UserError, ValueError):
    """A ``rope_scaling`` this project does not build (type, factor), named with its source."""

#: Scaling types this project builds; anything else in config.json is refused by name.
SUPPORTED_TYPES = ("llama3", "yarn")

#: Keys transformers reads for each type (the rest of a rope_scaling dict is ignored there too).
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def normalize_scaling(scaling: dict, max_position_embeddings: int,
                      top_level_original: Optional[int], source: str) -> dict:
    """One ``rope_type``-tagged dict with every value transformers would use, from a
    ``rope_scaling`` / ``rope_parameters`` entry (``type`` or ``rope_type``; missing
    ``original_max_position_embeddings`` defaults as in transformers: a top-level
    ``original_max_position_embeddings``, else ``max_position_embeddings``)."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in SUPPORTED_TYPES:
        raise RopeScalingError(
            f"{source}: rope scaling type {kind!r} is not supported (supported: none, "
            f"{', '.join(repr(t) for t in SUPPORTED_TYPES)})")
    if "factor" not in scaling or scaling["factor"] is None:
        raise RopeScalingError(f"{source}: rope scaling {kind!r} has no 'factor'")
    factor = float(scaling["factor"])
    if factor < 1.0:
        raise RopeScalingError(f"{source}: rope scaling factor {factor} must be >= 1")
    original = top_level_original if top_level_original is not None else \
        scaling.get("original_max_position_embeddings") or max_position_embeddings
    if kind == "llama3":
        return {"rope_type": "llama3", "factor": factor,
                "low_freq_factor": float(scaling.get("low_freq_factor",
                                                     _LLAMA3_DEFAULTS["low_freq_factor"])),
                "high_freq_factor": float(scaling.get("high_freq_factor",
                                                      _LLAMA3_DEFAULTS["high_freq_factor"])),
                "original_max_position_embeddings": int(
                    scaling.get("original_max_position_embeddings", 8192))}
    out = {"rope_type": "yarn", "factor": factor,
           "original_max_position_embeddings": int(original),
           # transformers: `or 32` / `or 1`, so 0 and None both mean the default
           "beta_fast": float(scaling.get("beta_fast") or 32.0),
           "beta_slow": float(scaling.get("beta_slow") or 1.0),
           "truncate": bool(scaling.get("truncate", True))}
    out["attention_factor"] = yarn_attention_factor(
        factor, scaling.get("attention_factor"), scaling.get("mscale"),
        scaling.get("mscale_all_dim"))
    return out


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, attention_factor=None, mscale=None,
                          mscale_all_dim=None) -> float:
    """The factor on cos and sin: given, or ``mscale(factor, mscale) / mscale(factor,
    mscale_all_dim)`` when both are set (and non-zero), else ``0.1 ln(factor) + 1``."""
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def _yarn_inverse_frequencies(base: float, dim: int, scaling: dict) -> torch.Tensor:
    """YaRN ("NTK-by-parts"): dimensions that rotate more than ``beta_fast`` times over the
    original context keep their frequency, those under ``beta_slow`` are divided by ``factor``,
    and a linear ramp blends the ones between."""
    original = scaling["original_max_position_embeddings"]

    def dim_for_rotations(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = dim_for_rotations(scaling["beta_fast"])
    high = dim_for_rotations(scaling["beta_slow"])
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    index = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
    ramp = ((index - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (original frequency), 0: interpolate (divided by factor)
    powers = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolated = 1.0 / powers
    interpolated = 1.0 / (scaling["factor"] * powers)
    return interpolated * (1 - keep) + extrapolated * keep


def _llama3_inverse_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: wavelengths above ``original / low_freq_factor`` divided by ``factor``, below
    ``original / high_freq_factor`` kept, smoothly blended between."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low_wavelen = original / scaling["low_freq_factor"]
    high_wavelen = original / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"])
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def inverse_frequencies(theta: float, dim: int, scaling: Optional[dict]) -> torch.Tensor:
    """float32 ``[dim / 2]`` inverse frequencies as transformers computes them for this RoPE (on
    the CPU, also under a ``torch.device("meta")`` context)."""
    if scaling is not None and scaling["rope_type"] == "yarn":
        return _yarn_inverse_frequencies(theta, dim, scaling)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is not None and scaling["rope_type"] == "llama3":
        inv_freq = _llama3_inverse_frequencies(inv_freq, scaling)
    return inv_freq


def attention_factor(scaling: Optional[dict]) -> float:
    """What transformers multiplies cos and sin by (1 except for YaRN)."""
    return scaling["attention_factor"] if scaling and scaling["rope_type"] == "yarn" else 1.0


def softmax_scale(kv_channels: int, scaling: Optional[dict]) -> Optional[float]:
    """The attention softmax scale that carries YaRN's attention factor (``m**2 / sqrt(d)``), or
    None (Megatron's default ``1 / sqrt(d)``) when there is none."""
    factor = attention_factor(scaling)
    return None if factor == 1.0 else factor * factor / math.sqrt(kv_channels)


def usable_positions(max_position_embeddings: int, scaling: Optional[dict]) -> int:
    """Positions the model may be trained at: ``factor x original`` with YaRN (whichever is
    larger than ``max_position_embeddings``), else ``max_position_embeddings``."""
    if scaling is not None and scaling["rope_type"] == "yarn":
        return max(max_position_embeddings,
                   int(scaling["factor"] * scaling["original_max_position_embeddings"]))
    return max_position_embeddings


def yarn_factor_for(needed_tokens: int, trained_positions: int) -> float:
    """The smallest power-of-two YaRN factor (at least 2) whose scaled limit covers
    ``needed_tokens``: 4.0 takes Qwen2.5's 32,768 positions to 131,072, as Qwen documents."""
    factor = 2.0
    while factor * trained_positions < needed_tokens:
        factor *= 2
    return factor


def yarn_config_for(needed_tokens: int, trained_positions: int) -> dict:
    """The ``rope_scaling`` entry to add for ``needed_tokens`` (Qwen's documented form)."""
    return {"type": "yarn", "factor": yarn_factor_for(needed_tokens, trained_positions),
            "original_max_position_embeddings": trained_positions}
