"""Text generation backends shared by ``data_tools.sample_pairs`` and the QA evaluation.

A generator maps a batch of user messages to ``num_return_sequences`` responses each. The user
message is wrapped in the model's chat template (one user turn, generation prompt added);
decoding is greedy when ``temperature`` is 0, otherwise sampling at ``temperature`` / ``top_p``.

  hf    transformers ``generate``, batched with left padding (the default);
  vllm  vLLM's ``LLM.chat``, chosen by ``auto`` when vLLM is importable.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

BACKENDS = ("auto", "hf", "vllm")


def resolve_backend(name: str) -> str:
    """``auto`` -> ``vllm`` when vLLM is installed, else ``hf``; other names pass through."""
    if name == "auto":
        return "vllm" if importlib.util.find_spec("vllm") else "hf"
    if name not in ("hf", "vllm"):
        raise ValueError(f"generation backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def chat_text(tokenizer, user_message: str) -> str:
    """The user message in the tokenizer's chat template, ready for the assistant's turn."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                         add_generation_prompt=True, tokenize=False)


class HFGenerator:
    """transformers ``generate``; returns ``[[response] * num_return_sequences] * len(prompts)``."""

    def __init__(self, model_path: str, tokenizer_path: Optional[str] = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                 num_return_sequences: int = 1, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        from data_tools.tokenizer import load_tokenizer

        self.torch = torch
        self.tokenizer = load_tokenizer(tokenizer_path or model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        from solopo_mcore.platform import default_device, on_cuda

        dtype = torch.bfloat16 if on_cuda() else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(
            default_device())
        self.model.eval()
        if temperature > 0:
            decoding = dict(do_sample=True, temperature=temperature, top_p=top_p)
        else:  # greedy; unset the sampling knobs a generation_config.json may carry
            decoding = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        self.kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                           pad_token_id=self.tokenizer.pad_token_id, **decoding)
        self.num_return_sequences = num_return_sequences
        torch.manual_seed(seed)

    def __call__(self, prompts: list[str]) -> list[list[str]]:
        texts = [chat_text(self.tokenizer, p) for p in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True,
                               add_special_tokens=False).to(self.model.device)
        with self.torch.no_grad():
            out = self.model.generate(**batch, **self.kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        n = self.num_return_sequences
        return [decoded[i * n:(i + 1) * n] for i in range(len(prompts))]


class VLLMGenerator:
    """vLLM ``LLM.chat`` with the same interface as :class:`HFGenerator`."""

    def __init__(self, model_path: str, tokenizer_path: Optional[str] = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                 num_return_sequences: int = 1, seed: int = 0):
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=model_path, tokenizer=tokenizer_path or model_path, seed=seed)
        self.params = SamplingParams(n=num_return_sequences, temperature=temperature,
                                     top_p=top_p if temperature > 0 else 1.0,
                                     max_tokens=max_new_tokens, seed=seed)

    def __call__(self, prompts: list[str]) -> list[list[str]]:
        messages = [[{"role": "user", "content": p}] for p in prompts]
        outputs = self.llm.chat(messages, self.params, use_tqdm=False)
        return [[c.text for c in o.outputs] for o in outputs]


def make_generator(backend: str, model_path: str, tokenizer_path: Optional[str] = None, **kwargs):
    """An :class:`HFGenerator` or :class:`VLLMGenerator` (``backend`` may be ``auto``)."""
    cls = VLLMGenerator if resolve_backend(backend) == "vllm" else HFGenerator
    return cls(model_path, tokenizer_path, **kwargs)
