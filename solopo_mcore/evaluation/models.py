"""Checkpoints to evaluate: Hugging Face directories as they are, Megatron (dist_checkpointing)
checkpoints exported on the fly to a temporary HF directory by :mod:`solopo_mcore.convert`."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from solopo_mcore.evaluation.items import EvalInputError
from solopo_mcore.log import log

#: generate(user messages) -> one response each
GenerateFn = Callable[[list], list]


def checkpoint_kind(path: str) -> str:
    """``hf`` (a config.json with weights) or ``megatron`` (``latest`` / ``iter_*`` / a
    dist_checkpointing ``metadata.json``)."""
    p = Path(path)
    if not p.is_dir():
        raise EvalInputError(f"model {path!r} is not a directory; pass an HF checkpoint dir or a "
                             f"Megatron checkpoint dir (--model NAME=PATH)")
    if (p / "config.json").is_file():
        return "hf"
    if (p / "latest").is_file() or (p / "metadata.json").is_file() or any(p.glob("iter_*")):
        return "megatron"
    raise EvalInputError(f"model {path!r}: neither an HF checkpoint (config.json) nor a Megatron "
                         f"checkpoint (latest / iter_* / metadata.json)")


def checkpoint_identity(path: str) -> dict:
    """What identifies the weights, for the resume check: path, kind, and the weight files'
    sizes and modification times (HF) or the ``latest`` marker (Megatron)."""
    p = Path(path).resolve()
    kind = checkpoint_kind(str(p))
    ident = {"path": str(p), "kind": kind}
    if kind == "hf":
        ident["files"] = sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                for f in p.iterdir() if f.suffix in (".safetensors", ".bin"))
    elif (p / "latest").is_file():
        ident["latest"] = (p / "latest").read_text().strip()
    return ident


@contextlib.contextmanager
def hf_directory(path: str, scratch_dir: str) -> Iterator[str]:
    """The HF directory to load: ``path`` itself, or a Megatron checkpoint exported into a
    temporary folder under ``scratch_dir`` (removed on exit). The export runs in this process
    as a world of one (tp = pp = 1)."""
    if checkpoint_kind(path) == "hf":
        yield path
        return
    from solopo_mcore.convert.commands import mcore_to_hf
    from solopo_mcore.parallel.layout import destroy_parallel, init_distributed

    Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_export.", dir=scratch_dir) as tmp:
        dst = str(Path(tmp) / "hf")
        init_distributed()
        try:
            report = mcore_to_hf(path, dst)
        finally:
            destroy_parallel()
        log("evaluate_qa", f"exported {report['src']} to a temporary HF checkpoint "
                           f"({report['seconds']} s)")
        yield dst


def transformers_generate(hf_dir: str, backend: str = "auto", max_new_tokens: int = 512,
                          tokenizer: str = None) -> GenerateFn:
    """Greedy generation with :mod:`data_tools.generation` (vLLM when installed, else HF)."""
    from data_tools.generation import make_generator

    generator = make_generator(backend, hf_dir, tokenizer, max_new_tokens=max_new_tokens,
                               temperature=0.0, num_return_sequences=1)

    def generate(prompts: list) -> list:
        return [responses[0] for responses in generator(prompts)]
    return generate
