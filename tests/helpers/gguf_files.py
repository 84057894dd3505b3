"""Small GGUF files written the way llama.cpp's ``convert_hf_to_gguf.py`` writes a Llama, from a
random HF model: metadata keys, tensor names, Q/K rows permuted for llama.cpp's RoPE layout,
norms in F32, matrices in the chosen type, and a byte-level BPE vocabulary with a chat template.

The test then imports the file with the project's converter and compares the result with the
HF model the file was written from (an independent reference: the converter never sees it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: Byte-level BPE merges (GPT-2's byte alphabet: "Ġ" is the space byte).
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ w", "o r", "l l"]


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra, out = 0, {}
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def vocabulary() -> list[str]:
    return SPECIAL_TOKENS + _byte_alphabet() + ["".join(m.split()) for m in MERGES]


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order: each head's rotary halves interleaved."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _matrix(writer, name: str, value: np.ndarray, qtype: str) -> None:
    from gguf import GGMLQuantizationType, quants
    if qtype == "F32":
        writer.add_tensor(name, value.astype(np.float32))
    elif qtype == "F16":
        writer.add_tensor(name, value.astype(np.float16))
    else:
        kind = GGMLQuantizationType[qtype]
        writer.add_tensor(name, quants.quantize(value.astype(np.float32), kind),
                          raw_dtype=kind)


def write_llama_gguf(hf_dir: str | Path, out_path: str | Path, qtype: str) -> Path:
    """Write the Llama model in ``hf_dir`` (fp32 safetensors, vocab = :func:`vocabulary`) as a
    GGUF whose matrices are ``qtype`` (F32, F16 or Q8_0)."""
    import gguf
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    weights = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        weights.update(load_file(f))
    tokens = vocabulary()
    assert cfg["vocab_size"] == len(tokens), "build the HF model with len(vocabulary()) tokens"
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name("tiny-test-llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(cfg["rope_theta"] if "rope_theta" in cfg else
                              cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(cfg["hidden_size"] // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    _matrix(writer, "token_embd.weight", weights["model.embed_tokens.weight"], qtype)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if not cfg.get("tie_word_embeddings", False):
        _matrix(writer, "output.weight", weights["lm_head.weight"], qtype)
    for i in range(cfg["num_hidden_layers"]):
        hf = f"model.layers.{i}."
        gg = f"blk.{i}."
        writer.add_tensor(gg + "attn_norm.weight", weights[hf + "input_layernorm.weight"])
        writer.add_tensor(gg + "ffn_norm.weight", weights[hf + "post_attention_layernorm.weight"])
        _matrix(writer, gg + "attn_q.weight",
                llama_cpp_permute(weights[hf + "self_attn.q_proj.weight"], heads), qtype)
        _matrix(writer, gg + "attn_k.weight",
                llama_cpp_permute(weights[hf + "self_attn.k_proj.weight"], kv_heads), qtype)
        _matrix(writer, gg + "attn_v.weight", weights[hf + "self_attn.v_proj.weight"], qtype)
        _matrix(writer, gg + "attn_output.weight", weights[hf + "self_attn.o_proj.weight"], qtype)
        _matrix(writer, gg + "ffn_gate.weight", weights[hf + "mlp.gate_proj.weight"], qtype)
        _matrix(writer, gg + "ffn_up.weight", weights[hf + "mlp.up_proj.weight"], qtype)
        _matrix(writer, gg + "ffn_down.weight", weights[hf + "mlp.down_proj.weight"], qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_path)


def q8_0_error_bound(original: np.ndarray) -> np.ndarray:
    """Written out: Q8_0 stores blocks of 32 values as ``d * q``, ``d = max|x| / 127`` (an
    fp16), ``q`` an int8; each value is off by at most half a step (plus ``d``'s fp16
    rounding, up to 127 * 2^-11 * d). Per element, the largest allowed |dequantized - x|."""
    blocks = original.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    return np.broadcast_to(step * (0.5 + 127 * 2.0 ** -11) + 1e-12, blocks.shape).reshape(
        original.shape)
