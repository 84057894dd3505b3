"""Read a Hugging Face ``config.json`` into the shape of a Megatron GPT model.

Supported architectures are rows of :data:`ARCHITECTURES`; anything else is refused by name.
Both RoPE formats are read: the classic ``rope_theta`` / ``rope_scaling`` keys (real Qwen2.5 and
Llama 3.1 checkpoints) and transformers-5 ``rope_parameters``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from solopo_mcore.errors import UserError
from solopo_mcore.models.rope import RopeScalingError, normalize_scaling, usable_positions


@dataclass(frozen=True)
class ArchitectureTraits:
    """What differs between the supported decoder families."""

    hf_model_type: str
    """``model_type`` written into exported configs."""
    qkv_bias_key: Optional[str]
    """config.json key that switches QKV bias on, or None if the family always has it."""
    qkv_bias_default: bool
    """QKV bias when the key is absent."""


ARCHITECTURES: dict[str, ArchitectureTraits] = {
    "Qwen2ForCausalLM": ArchitectureTraits("qwen2", None, True),
    "LlamaForCausalLM": ArchitectureTraits("llama", "attention_bias", False),
}


class UnsupportedModelError(UserError, ValueError):
    pass


class MissingHFConfigError(UserError, FileNotFoundError):
    """No ``config.json`` where a Hugging Face model was expected."""


@dataclass(frozen=True)
class ModelShape:
    """Everything Megatron needs to know about an HF decoder's architecture."""

    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    norm_epsilon: float
    add_qkv_bias: bool
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: Optional[dict]
    """None, or the scaling with every value transformers uses, tagged by ``rope_type``:
    ``llama3`` (factor, low/high_freq_factor, original_max_position_embeddings) or ``yarn``
    (factor, original_max_position_embeddings, beta_fast/slow, truncate, attention_factor);
    :func:`solopo_mcore.models.rope.normalize_scaling`."""
    max_position_embeddings: int
    raw: dict
    """The config.json contents, carried over on export."""

    @property
    def usable_positions(self) -> int:
        """The longest segment the model may be trained on: ``max_position_embeddings``, or
        YaRN's ``factor x original_max_position_embeddings``."""
        return usable_positions(self.max_position_embeddings, self.rope_scaling)


def _rope(cfg: dict, key: str) -> tuple[float, Optional[dict]]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind in (None, "default") else dict(params)
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling")
    if scaling is None:
        return float(theta), None
    original = cfg.get("original_max_position_embeddings")
    try:
        return float(theta), normalize_scaling(
            scaling, int(cfg.get("max_position_embeddings", 32768)),
            None if original is None else int(original), key)
    except RopeScalingError as exc:
        raise UnsupportedModelError(str(exc)) from None


def read_hf_config(path: Union[str, Path]) -> ModelShape:
    """Parse ``config.json`` (or the directory holding it) into a :class:`ModelShape`."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MissingHFConfigError(f"no Hugging Face config.json at {path}: point it at an HF "
                                   f"model folder (config.json, *.safetensors) or its "
                                   f"config.json")
    cfg = json.loads(path.read_text())
    return shape_from_dict(cfg, source=str(path))


def shape_from_dict(cfg: dict, source: str = "config") -> ModelShape:
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"{source}: architectures={archs!r} is not supported; supported: "
            f"{', '.join(ARCHITECTURES)}")
    traits = ARCHITECTURES[arch]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size"):
        if key not in cfg:
            raise UnsupportedModelError(f"{source}: missing key {key!r}")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg, source)
    qkv_bias = (traits.qkv_bias_default if traits.qkv_bias_key is None
                else bool(cfg.get(traits.qkv_bias_key, traits.qkv_bias_default)))
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported")
    return ModelShape(
        architecture=arch,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        kv_channels=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=int(cfg["vocab_size"]),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        add_qkv_bias=qkv_bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        raw=cfg,
    )


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padded vocabulary: ``vocab_size`` rounded up to a multiple of
    ``divisible_by x tp_size``, so every TP rank holds an equal slice (the one definition the
    builder, the converter and the memory estimator share)."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple
