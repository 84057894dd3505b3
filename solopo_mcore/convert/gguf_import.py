"""GGUF -> HF: a llama.cpp model file becomes a plain transformers folder the trainer starts from.

transformers reads the GGUF (its own loader: metadata -> ``config.json``, the vocabulary and
chat template -> a fast tokenizer, every tensor dequantized by ``gguf-py`` and un-permuted where
llama.cpp permuted Q/K for its RoPE layout). This module only checks the file before that work,
writes the result through :class:`~solopo_mcore.convert.destination.StagedDestination` (never
over the source, never deleting the old destination before the new one is complete), and
records where the weights came from in ``gguf_import.json``: a quantized GGUF's values are the
*dequantized* ones, not the original model's, and whoever trains from the folder should know.

Needs the optional extra: ``pip install -e ".[gguf]"`` (``gguf`` and ``accelerate``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from solopo_mcore.convert.destination import (OWN_MARKER, StagedDestination,
                                              check_source_and_destination)
from solopo_mcore.convert.tables import ConversionError
from solopo_mcore.storage.integrity import (CHECKSUMS, hash_files, sha256_file,
                                             write_checksums)

#: GGUF architectures the trainer builds (``models/hf_config.py``) and transformers reads.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
#: Float types stored as they are (no dequantization).
FLOAT_TYPES = ("F32", "F16", "BF16")
#: The record written next to the weights.
RECORD = "gguf_import.json"
_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_EXTRA_HINT = 'pip install -e ".[gguf]" (or: pip install gguf accelerate)'


def _require_extra() -> None:
    missing = []
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConversionError(f"gguf-to-hf needs the optional package(s) {', '.join(missing)}: "
                              f"{_EXTRA_HINT}")


def _dequantizable(qtype) -> bool:
    """Whether gguf-py (which transformers calls) dequantizes ``qtype``: one block of zeros."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, quants
    if qtype.name in FLOAT_TYPES:
        return True
    if qtype not in GGML_QUANT_SIZES:
        return False
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def inspect_gguf(path: str | Path) -> dict:
    """Header facts, before any tensor is read: ``architecture``, ``name`` and
    ``quantization_types`` (type name -> number of tensors). Refuses, in one line each, a file
    that is not GGUF, an architecture the trainer does not build, and a tensor type that
    cannot be dequantized."""
    from gguf import GGUFReader
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConversionError(f"--src {path} is not a GGUF file (it does not start with 'GGUF'); "
                              f"pass the .gguf model file")
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise ConversionError(f"--src {path}: unreadable GGUF ({exc}); the file may be "
                              f"truncated: download it again") from None

    def field(key: str) -> Optional[str]:
        entry = reader.fields.get(key)
        return None if entry is None else entry.contents()

    architecture = field("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"--src {path}: architecture {architecture!r} is not one this "
                              f"trainer builds (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    first_of_type = {}
    for tensor in reader.tensors:
        first_of_type.setdefault(tensor.tensor_type.name, tensor)
    for tensor in first_of_type.values():
        if not _dequantizable(tensor.tensor_type):
            count = types[tensor.tensor_type.name]
            raise ConversionError(f"--src {path}: tensor {tensor.name} (and {count - 1} more) "
                                  f"is quantized as {tensor.tensor_type.name}, which gguf-py "
                                  f"cannot dequantize; use a GGUF quantized as F32, F16, BF16, "
                                  f"Q8_0, Q4_0/1, Q5_0/1 or a K-quant")
    return {"architecture": architecture, "name": field("general.name"),
            "quantization_types": dict(sorted(types.items()))}


def _plain_config(model, torch_dtype: str) -> None:
    """A plain HF model: transformers' GGUF loader leaves a quantizer on the model (which
    refuses to save) and a ``quantization_config`` naming the file in its config (which would
    make a plain load look for the file). The tensors are already dequantized floats."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype


def _check_written(staging: Path, model) -> None:
    """``--verify``: the written folder, loaded by transformers, holds the GGUF's tensors bit
    for bit."""
    import torch
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=model.dtype)
    expected, got = model.state_dict(), reloaded.state_dict()
    if set(expected) != set(got):
        raise ConversionError(f"the written folder's tensors differ in names from the GGUF's: "
                              f"{sorted(set(expected) ^ set(got))[:4]}")
    for name, tensor in expected.items():
        if not torch.equal(tensor, got[name]):
            raise ConversionError(f"tensor {name} differs after writing and reading back")


def gguf_to_hf(src: str, dst: str, dtype: str = "fp32", overwrite: bool = False,
               verify: bool = False, max_shard_bytes: int = 5_000_000_000) -> dict:
    """Write the GGUF file ``src`` as an HF model folder ``dst`` (safetensors in ``dtype``,
    ``config.json``, tokenizer with its chat template, ``gguf_import.json``, and
    ``checksums.json`` over them all). Returns a report."""
    start = time.time()
    _require_extra()
    source = Path(src)
    if not source.exists():
        raise ConversionError(f"--src {src} does not exist")
    if source.is_dir():
        raise ConversionError(f"--src {src} is a directory; pass the .gguf file itself")
    check_source_and_destination(src, dst)
    destination = StagedDestination(dst, overwrite)
    destination.check()
    facts = inspect_gguf(source)
    torch_dtype = _TORCH_DTYPES[dtype]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = str(source.resolve().parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 dtype=getattr(torch, torch_dtype))
    _plain_config(model, torch_dtype)
    dequantized = sorted(t for t in facts["quantization_types"] if t not in FLOAT_TYPES)
    record = {
        "source": str(source.resolve()), "source_bytes": source.stat().st_size,
        "source_sha256": sha256_file(source), **facts,
        "dequantized_from": dequantized, "dtype": dtype,
        "note": ("the weights are the GGUF's values dequantized from "
                 f"{', '.join(dequantized)}, not the original model's" if dequantized else
                 "the weights are the GGUF's float values"),
        "transformers_version": _distribution_version("transformers"),
        "gguf_version": _distribution_version("gguf"),
    }
    staging = destination.prepare()
    with destination.writing():
        model.save_pretrained(str(staging), safe_serialization=True,
                              max_shard_size=max_shard_bytes)
        tokenizer.save_pretrained(str(staging))
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        # every file's SHA-256, so a reader (fetch_pretrained's reuse) can check the folder
        names = sorted(p.name for p in staging.iterdir()
                       if p.is_file() and p.name not in (CHECKSUMS, OWN_MARKER))
        write_checksums(staging, hash_files(staging, names))
    if verify:
        try:
            _check_written(staging, model)
        except ConversionError as exc:
            raise destination.fail_verification(exc) from None
    destination.commit()
    return {"direction": "gguf-to-hf", "src": str(src), "dst": str(dst),
            "architecture": facts["architecture"],
            "quantization_types": facts["quantization_types"], "dtype": dtype,
            "num_params": sum(p.numel() for p in model.parameters()),
            "verified_bitwise": bool(verify), "seconds": round(time.time() - start, 1)}


def _distribution_version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None
