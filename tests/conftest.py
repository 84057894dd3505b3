"""Shared fixtures: offline mode, tiny HF models written once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """Qwen2-shaped (GQA, QKV bias, tied embeddings, vocab 1000 -> padded 1024), fp32."""
    from solopo_mcore.models.tiny import build_tiny_hf_model
    path = tmp_path_factory.mktemp("tiny_qwen2")
    build_tiny_hf_model(path, "qwen2", vocab_size=1000, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen2_untied(tmp_path_factory):
    from solopo_mcore.models.tiny import build_tiny_hf_model
    path = tmp_path_factory.mktemp("tiny_qwen2_untied")
    build_tiny_hf_model(path, "qwen2", vocab_size=1000, seed=1,
                        overrides={"tie_word_embeddings": False})
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Llama 3.1-shaped (GQA, llama3 RoPE scaling, untied)."""
    from solopo_mcore.models.tiny import build_tiny_hf_model
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_hf_model(path, "llama", vocab_size=1000, seed=2)
    return str(path)
