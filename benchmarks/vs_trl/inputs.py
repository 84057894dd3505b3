"""The one model and dataset both trainers get, per (shape, long-context length).

Each is built by the commands a user runs (data_tools.learnable_qa -> build_triplets ->
sample_pairs -> preprocess) and a random HF model written with ``transformers``; TRL reads the
same ``pairs.jsonl`` rows as text and the same HF directory, we read the indexed dataset that
``preprocess`` made of those rows and stream the same weights in.

Shapes (why two: the issue's first side by side used a tiny model with the real vocabulary, where
the output layer is most of the FLOPs, which flatters a trainer that skips the context's logits):

* ``tiny-realvocab``: hidden 256, 4 layers, Qwen2.5's 151,936-token vocabulary, the real Qwen2.5
  BPE (``builtin:qwen2.5``). The output layer is 83-89% of a full-logits forward.
* ``small-vocab``: hidden 512, 6 layers, 8 heads / 2 KV heads, FFN 1792, a 4,096-row vocabulary,
  data in the task's word-level tokenizer (``builtin:qa-words``, 633 ids used). The output layer
  is 6.0-8.2% of a full-logits forward at 4K-1K tokens, Qwen2.5-7B's is 7.3-7.6%
  (:func:`output_layer_share` prints both).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Shape:
    name: str
    tokenizer: str
    config: dict
    """HF config fields of the random model."""
    why: str


def _qwen2(**fields) -> dict:
    base = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6,
                rope_theta=1000000.0, max_position_embeddings=32768, use_sliding_window=False,
                tie_word_embeddings=False)
    return {**base, **fields}


SHAPES = {
    "tiny-realvocab": Shape(
        "tiny-realvocab", "builtin:qwen2.5",
        _qwen2(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=151936),
        "the issue's first shape: the real vocabulary makes the output layer most of the work"),
    "small-vocab": Shape(
        "small-vocab", "builtin:qa-words",
        _qwen2(hidden_size=512, intermediate_size=1792, num_hidden_layers=6,
               num_attention_heads=8, num_key_value_heads=2, vocab_size=4096),
        "a realistic output-layer share: Qwen2.5-7B's is 7.3-7.6% at 1K-4K tokens"),
}


def output_layer_share(config: dict, seq_len: int) -> float:
    """Share of the output layer in a forward with logits at every position (what a
    full-logits trainer computes), from the project's FLOPs function."""
    from solopo_mcore.models.hf_config import shape_from_dict
    from solopo_mcore.profiling.flops import forward_flops_per_segment

    shape = shape_from_dict(config)
    return 2 * shape.hidden_size * shape.vocab_size * seq_len / forward_flops_per_segment(
        shape, seq_len, seq_len)


@dataclass
class Inputs:
    """What both trainers read for one (shape, length)."""

    shape: Shape
    long_tokens: int
    model_dir: Path
    data_prefix: Path
    pairs_path: Path

    def examples(self) -> list:
        """``pairs.jsonl`` rows in dataset order (the indexed dataset's example ids)."""
        meta = json.loads(Path(str(self.data_prefix) + ".meta.json").read_text())
        ids = meta["example_ids"]
        rows = {}
        with open(self.pairs_path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                rows[str(row["id"])] = row
        missing = [i for i in ids if i not in rows]
        if missing:
            raise RuntimeError(f"{self.data_prefix}: example ids {missing[:3]} are not in "
                               f"{self.pairs_path}; rebuild the inputs (delete the folder)")
        return [rows[i] for i in ids]


def _run(args: list) -> None:
    from solopo_mcore.processes import run_child

    result = run_child([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(map(str, args[:3]))} ...` failed:\n"
                           f"{result.stdout[-2000:]}{result.stderr[-4000:]}")


def build_inputs(shape: Shape, long_tokens: int, root: Path, num_examples: int,
                 log=print) -> Inputs:
    """Build (once; reused when complete) the model and dataset for ``shape`` at
    ``long_tokens``."""
    final = Path(root) / f"{shape.name}_{long_tokens}"
    inputs = Inputs(shape, long_tokens, final / "model", final / "data" / "qa",
                    final / "data" / "pairs.jsonl")
    if final.is_dir():
        if (final / "data" / "qa.meta.json").is_file() and (final / "model" / "config.json").is_file():
            return inputs
        raise RuntimeError(f"{final} is an incomplete inputs folder (not made by this version, "
                           f"which builds in {final.name}.partial and renames it when complete); "
                           f"delete it and run again")
    # built in a scratch folder renamed when complete: an interrupted build is redone, never used
    out = final.with_name(final.name + ".partial")
    if out.exists():
        log(f"removing {out}: an interrupted build of these inputs")
        shutil.rmtree(out)
    model, data = out / "model", out / "data"
    log(f"building inputs: {shape.name}, long context {long_tokens} tokens -> {final}")
    data.mkdir(parents=True)
    build_model = (
        "import sys; from data_tools.tokenizer import load_tokenizer; "
        "from solopo_mcore.models.tiny import build_tiny_hf_model; "
        f"t = load_tokenizer({shape.tokenizer!r}); "
        f"c = {shape.config!r}; family = 'qwen2'; "
        f"build_tiny_hf_model({str(model)!r}, family, vocab_size=c['vocab_size'], seed=0, "
        f"tokenizer=t, overrides={{k: v for k, v in c.items() if k != 'vocab_size'}})")
    seed = "0"
    for command in (
            ["-m", "data_tools.learnable_qa", "--num-examples", num_examples, "--seed", seed,
             "--long-tokens", long_tokens, "--out", data / "qa.jsonl"],
            ["-m", "data_tools.build_triplets", "--input", data / "qa.jsonl", "--output",
             data / "triplets.jsonl", "--target-long-tokens", long_tokens,
             "--distractor-pool", "none", "--tokenizer", shape.tokenizer, "--seed", seed],
            ["-m", "data_tools.sample_pairs", "--backend", "rule", "--num-samples", 8,
             "--seed", seed, "--input", data / "triplets.jsonl", "--output",
             data / "pairs.jsonl"],
            ["-c", build_model],
            ["-m", "data_tools.preprocess", "--input", data / "pairs.jsonl", "--output-prefix",
             data / "qa", "--tokenizer", shape.tokenizer, "--max-seq-length",
             long_tokens + 512, "--num-proc", 1, "--model-config", model]):
        _run(command)
    os.replace(out, final)
    return inputs
