"""The position limit as a rule: how long a segment a model may be trained on, what to do when
data is longer, and a warning when ``max_position_embeddings`` was raised without scaling.

One place for the trainer (before any process group), ``data_tools.preprocess`` and
``examples/estimate_memory.py``, so all three say the same thing.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from solopo_mcore.models.hf_config import ModelShape, read_hf_config, shape_from_dict
from solopo_mcore.models.reference_configs import BY_NAME
from solopo_mcore.models.rope import yarn_config_for

#: The fields that identify a known model family's layer shape (the reference configs).
_IDENTITY = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "vocab_size")


def with_rope_scaling(shape: ModelShape, rope_scaling: Optional[dict],
                      source: str = "model.rope_scaling") -> ModelShape:
    """``shape`` with ``rope_scaling`` (an HF ``rope_scaling`` entry, e.g.
    ``RopeScalingConfig.as_hf()``) in place of config.json's scaling; the raw config (exported
    with HF checkpoints and recorded in Megatron checkpoints) carries it in the format the
    config.json uses."""
    if rope_scaling is None:
        return shape
    raw = json.loads(json.dumps(shape.raw))
    entry = dict(rope_scaling)
    entry.setdefault("original_max_position_embeddings", _pretrained_positions_default(shape))
    if isinstance(raw.get("rope_parameters"), dict):  # transformers-5 format
        raw["rope_parameters"] = {"rope_type": entry.pop("type"), "rope_theta": shape.rope_theta,
                                  **entry}
    else:
        raw["rope_scaling"] = entry
    new = shape_from_dict(raw, source=source)
    return dataclasses.replace(new, raw=raw)


def _pretrained_positions_default(shape: ModelShape) -> int:
    return trained_positions(shape) or shape.max_position_embeddings


def model_shape(hf_config_path: str, rope_scaling: Optional[dict] = None) -> ModelShape:
    """The shape a run builds: config.json at ``hf_config_path`` with the recipe's
    ``model.rope_scaling`` applied."""
    return with_rope_scaling(read_hf_config(hf_config_path), rope_scaling)


def trained_positions(shape: ModelShape) -> Optional[int]:
    """Positions the model's RoPE was pretrained at, when knowable: a scaling's
    ``original_max_position_embeddings``, a top-level ``original_max_position_embeddings``, or a
    known reference model of the same shape (Qwen2.5-7B: 32,768). None when unknown."""
    if shape.rope_scaling is not None:
        return int(shape.rope_scaling["original_max_position_embeddings"])
    if shape.raw.get("original_max_position_embeddings"):
        return int(shape.raw["original_max_position_embeddings"])
    for reference in BY_NAME.values():
        if reference.get("rope_scaling") is None and all(
                shape.raw.get(k) == reference.get(k) for k in _IDENTITY):
            return int(reference["max_position_embeddings"])
    return None


def unscaled_extension_warning(shape: ModelShape, source: str) -> Optional[str]:
    """A warning when ``max_position_embeddings`` exceeds the positions the RoPE was trained for
    and no scaling is configured (plain RoPE past its trained positions); None otherwise."""
    trained = trained_positions(shape)
    if shape.rope_scaling is not None or trained is None or \
            shape.max_position_embeddings <= trained:
        return None
    yarn = yarn_config_for(shape.max_position_embeddings, trained)
    return (f"{source}: max_position_embeddings={shape.max_position_embeddings} exceeds the "
            f"{trained} positions this model's RoPE was trained at, and no RoPE scaling is set: "
            f"positions past {trained} get plain, untrained RoPE. Keep max_position_embeddings="
            f"{trained} and add YaRN instead ({_yarn_hint(yarn)})")


def _yarn_hint(yarn: dict) -> str:
    return (f"recipe: model.rope_scaling={{type: yarn, factor: {yarn['factor']:g}, "
            f"original_max_position_embeddings: {yarn['original_max_position_embeddings']}}}; "
            f"or in config.json: \"rope_scaling\": {json.dumps(yarn)}")


def position_limit_fix(shape: ModelShape, needed_tokens: int, shorten: str) -> str:
    """The fix for segments of up to ``needed_tokens`` tokens beyond
    ``shape.usable_positions``: the exact YaRN to add, or the factor to raise it to when YaRN is
    already set (llama3-scaled models are at their limit), or, ``shorten``, shorter data."""
    limit = shape.usable_positions
    base = trained_positions(shape) or shape.max_position_embeddings
    scaling = shape.rope_scaling
    yarn = yarn_config_for(needed_tokens, base)
    why = (f"the next power of two >= {needed_tokens} / {base} trained positions"
           if yarn["factor"] > 2 else f"{needed_tokens} / {base} trained positions <= 2")
    if scaling is None:
        grow = (f"either add YaRN RoPE scaling for the longest segment, {needed_tokens} tokens "
                f"(factor {yarn['factor']:g}: {why}; {_yarn_hint(yarn)}; with preprocess: "
                f"--yarn-factor {yarn['factor']:g}), or ")
    elif scaling["rope_type"] == "yarn":
        grow = (f"either raise the YaRN factor from {scaling['factor']:g} to "
                f"{yarn['factor']:g} for the longest segment, {needed_tokens} tokens ({why}; "
                f"recipe: model.rope_scaling.factor={yarn['factor']:g}, or \"factor\" in "
                f"config.json's rope_scaling; with preprocess: --yarn-factor "
                f"{yarn['factor']:g}), or ")
    else:
        grow = ""
    return f"{grow}{shorten} (<= {limit} tokens per segment)"


def position_limit_text(shape: ModelShape) -> str:
    """``"max_position_embeddings 32768"`` or ``"131072 positions (YaRN factor 4 x 32768)"``."""
    scaling = shape.rope_scaling
    if scaling is not None and scaling["rope_type"] == "yarn":
        return (f"{shape.usable_positions} usable positions (YaRN factor "
                f"{scaling['factor']:g} x {scaling['original_max_position_embeddings']})")
    return f"max_position_embeddings {shape.max_position_embeddings}"


def describe_rope(shape: ModelShape) -> str:
    """For a start-up banner: ``" YaRN x4 (131072 positions)"``, or "" without scaling."""
    scaling = shape.rope_scaling
    if scaling is None:
        return ""
    name = "YaRN" if scaling["rope_type"] == "yarn" else scaling["rope_type"]
    return f" {name} x{scaling['factor']:g} ({shape.usable_positions} positions)"
