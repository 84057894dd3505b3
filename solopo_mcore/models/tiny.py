"""Tiny random Qwen2 / Llama 3.1 models built from a config with ``transformers`` (no hub access).

Used by the CPU demo and the tests: real architectures, a few hundred thousand parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

TINY_SHAPES = {
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, use_sliding_window=False,
    ),
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
        intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        tie_word_embeddings=False, attention_bias=False,
    ),
}

#: Qwen2.5's documented YaRN, scaled down: 256 trained positions, factor 4 -> 1,024 usable
#: (max_position_embeddings stays at the trained length, as in Qwen2.5's config.json).
TINY_YARN_OVERRIDES = {
    "max_position_embeddings": 256,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
}


def build_tiny_hf_model(out_dir: str | Path, family: str = "qwen2", vocab_size: int = 1000,
                        seed: int = 0, tokenizer=None, overrides: Optional[dict] = None):
    """Write a random tiny HF model (config.json + safetensors) to ``out_dir``; return it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(TINY_SHAPES[family])
    fields["vocab_size"] = vocab_size
    fields.update(overrides or {})
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    if tokenizer is not None:
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF initialises norms to 1; perturb them so mapping errors show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return model
