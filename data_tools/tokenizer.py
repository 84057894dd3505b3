"""Tokenizers, offline: any HF tokenizer directory, or a built-in one.

``builtin:qwen2.5`` rebuilds the Qwen2/Qwen2.5 BPE (151,643 ranks) from the ``qwen.tiktoken``
file that the ``dashscope`` package ships, adds the Qwen2.5 special tokens and the ChatML chat
template, and caches the result as a normal HF tokenizer directory. Nothing is fetched from a hub.

``builtin:qa-words`` is a word-level tokenizer over the words of the learnable QA task
(:mod:`data_tools.learnable_qa`): byte-level pre-tokenization (GPT-2's rule, so decoding gives
the text back exactly), one id per word, the Qwen2.5 special tokens and ChatML template. Words
outside the task become ``<unk>``. It is built in memory (it takes milliseconds) and saved with
the model like any tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from data_tools.common import package_data_file

BUILTIN_QWEN = "builtin:qwen2.5"
BUILTIN_QA_WORDS = "builtin:qa-words"

# Qwen2 pre-tokenizer: like GPT-4's, but digits are split one by one.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5 special tokens, ids 151643..151664 in this order.
QWEN25_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _default_cache() -> Path:
    root = os.environ.get("SOLOPO_CACHE", os.path.join(Path.home(), ".cache", "solopo_mcore"))
    return Path(root) / "qwen2.5-tokenizer"


def _qwen_tiktoken_file() -> Path:
    return package_data_file("dashscope", "resources/qwen.tiktoken",
                             "builtin:qwen2.5 (dashscope's qwen.tiktoken)", "dashscope==2.0.2")


def build_qwen25_tokenizer(out_dir: Optional[Path] = None):
    """Build (once) and load the offline Qwen2.5 tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out_dir = Path(out_dir or _default_cache())
    if (out_dir / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(out_dir)
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(_qwen_tiktoken_file()),
                                pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in QWEN25_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, model_max_length=131072, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished first
        pass
    return AutoTokenizer.from_pretrained(out_dir)


def build_qa_words_tokenizer():
    """The word-level tokenizer of the learnable QA task (see the module doc)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from data_tools.learnable_qa import vocabulary_words

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = sorted({piece for text in vocabulary_words()
                    for piece, _ in pre.pre_tokenize_str(text)})
    vocab = {word: i for i, word in enumerate(["<unk>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in QWEN25_SPECIAL_TOKENS[:3]])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<unk>", bos_token=None, model_max_length=131072,
        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_tokenizer(name_or_path: str):
    """``builtin:qwen2.5``, ``builtin:qa-words`` or a local HF tokenizer/model directory."""
    if name_or_path == BUILTIN_QWEN:
        return build_qwen25_tokenizer()
    if name_or_path == BUILTIN_QA_WORDS:
        return build_qa_words_tokenizer()
    from transformers import AutoTokenizer

    if not Path(name_or_path).exists():
        raise FileNotFoundError(f"tokenizer {name_or_path!r}: not a local directory (hub downloads "
                                f"are not used); pass a directory, {BUILTIN_QWEN!r} or "
                                f"{BUILTIN_QA_WORDS!r}")
    if _is_word_level(Path(name_or_path)):
        # AutoTokenizer would pick the model type's tokenizer class (Qwen2's BPE) and rebuild the
        # word-level vocabulary as merge-less BPE; load the saved tokenizer.json as it is
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path)


def _is_word_level(directory: Path) -> bool:
    """Whether ``directory`` holds a saved word-level tokenizer (``builtin:qa-words``)."""
    import json

    path = directory / "tokenizer.json" if directory.is_dir() else None
    if path is None or not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("model", {}).get("type") == "WordLevel"
