"""HF -> Megatron and Megatron -> HF conversion at any TP/PP layout, with logits verification.

Both directions run in a world of ``tp * pp`` processes (the script relaunches itself with
torchrun when needed) around a model built on the meta device, so no rank ever holds the whole
model: HF -> Megatron reads each parameter shard's slice of the safetensors files as the
checkpoint writer asks for it; Megatron -> HF loads one layer at a time and writes HF files of
bounded size (``mcore_io``, ``hf_io``). The Megatron side is a ``dist_checkpointing``
checkpoint, loadable at any other layout. ``--verify`` is described in ``verify``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional


from solopo_mcore.config import ModelConfig, ParallelConfig, RunConfig
from solopo_mcore.convert.destination import StagedDestination, check_source_and_destination
from solopo_mcore.convert.hf_io import (DEFAULT_MAX_SHARD_BYTES, HFCheckpointReader,
                                        write_hf_checkpoint)
from solopo_mcore.convert.mcore_io import (LazyTorchDistSave, build_meta_chunks,
                                           check_checkpoint_layout, load_groups, shard_producer)
from solopo_mcore.convert.tables import (ConversionError, check_source_shapes,
                                         global_param_names, shard_for_param)
from solopo_mcore.convert.verify import streamed_megatron_stack, verify_against_hf
from solopo_mcore.models.hf_config import read_hf_config, shape_from_dict
from solopo_mcore.models.layout_fit import check_model_fits_layout
from solopo_mcore.parallel.layout import initialize_parallel
from solopo_mcore.platform import return_freed_tensors_to_the_system
from solopo_mcore.profiling.memory import peak_rss_bytes
from solopo_mcore.stack import ModelStack, setup_parallel
from solopo_mcore.storage.checkpoint import (find_checkpoint, read_marker, require_intact,
                                              save_model_only)

_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def peak_rss_gib() -> float:
    return peak_rss_bytes() / 2 ** 30


def _run_config(hf_config_dir: Optional[str], tp: int, pp: int, dtype: str) -> RunConfig:
    config = RunConfig()
    config.model = ModelConfig(hf_config_path=hf_config_dir, params_dtype=dtype)
    config.parallel = ParallelConfig(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp,
                                     use_distributed_optimizer=False)
    return config


def _checkpoint_dtype(cfg: dict, requested: Optional[str]) -> str:
    if requested:
        return requested
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    return _DTYPE_NAMES.get(name, "fp32")


def _export_dtype(marker: dict, raw: dict, requested: Optional[str]) -> str:
    """``--dtype``, else the dtype the checkpoint was saved in (the converter's or the
    trainer's record), else the HF config's."""
    saved = marker.get("params_dtype") or (marker.get("config") or {}).get(
        "model", {}).get("params_dtype")
    return requested or saved or _checkpoint_dtype(raw, None)


def _param_names(chunks: list) -> dict:
    """``{id(parameter): global Megatron name}`` over this rank's chunks."""
    out = {}
    for chunk in chunks:
        names = global_param_names(chunk)
        out.update({id(p): names[local] for local, p in chunk.named_parameters()})
    return out


def _verify(report: dict, destination: StagedDestination, stack: ModelStack, hf_dir: str,
            tolerance: float, cast: Optional[str] = None, verify_tokens: int = 64) -> None:
    """``cast``: how the weights were rounded on the way (e.g. "fp32 -> bf16"), for the hint."""
    start = time.time()
    try:
        report["max_abs_logit_diff"] = verify_against_hf(stack, hf_dir, tolerance,
                                                         seq_len=verify_tokens)
        report["verify_tokens"] = verify_tokens
    except ConversionError as exc:
        if cast:
            exc = ConversionError(f"{exc} (the weights were cast {cast}: the rounding alone "
                                  f"moves logits by about 1e-3 to 1e-2; pass a --tolerance "
                                  f"that allows it)")
        raise destination.fail_verification(exc) from None
    report["verify_seconds"] = round(time.time() - start, 1)
    report["peak_rss_gib_rank0_with_verify"] = round(peak_rss_gib(), 3)


def _check_verify_tokens(shape, verify: bool, verify_tokens: int) -> None:
    if verify and verify_tokens > shape.usable_positions:
        raise ConversionError(f"--verify-tokens {verify_tokens} is more than the model's "
                              f"{shape.usable_positions} usable positions; pass "
                              f"--verify-tokens {shape.usable_positions} or less")


def hf_to_mcore(src: str, dst: str, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                verify: bool = False, tolerance: float = 1e-3, overwrite: bool = False,
                verify_tokens: int = 64) -> dict:
    start = time.time()
    return_freed_tensors_to_the_system()  # one layer at a time stays one layer
    if not Path(src).exists():
        raise ConversionError(f"--src {src} does not exist")
    check_source_and_destination(src, dst)
    destination = StagedDestination(dst, overwrite)
    destination.check()
    shape = read_hf_config(src)
    _check_verify_tokens(shape, verify, verify_tokens)
    reader = HFCheckpointReader(src)
    reader.check_names(shape)
    config = _run_config(src, tp, pp, _checkpoint_dtype(shape.raw, dtype))
    shape, pg_collection = setup_parallel(config)
    chunks = build_meta_chunks(config, shape, pg_collection)
    tp_group = pg_collection.tp
    names = _param_names(chunks)
    for chunk in chunks:  # every shape, from the headers, before anything is staged
        for param in chunk.parameters():
            check_source_shapes(param, names[id(param)], reader.shapes, shape, tp_group.size())
    staging = destination.prepare()

    def make_shard(param, name):
        return shard_for_param(param, name, reader.source, shape, tp_group.size(),
                               tp_group.rank())
    produce = shard_producer(chunks, names, make_shard)
    with destination.writing():
        written = save_model_only(str(staging), chunks,
                                  state={"hf_config": shape.raw, "source_hf_dir": str(src),
                                         "params_dtype": config.model.params_dtype},
                                  sharded_strategy=LazyTorchDistSave(produce))
    report = {"direction": "hf-to-mcore", "src": src, "dst": dst, "tp": tp, "pp": pp,
              "seconds": round(time.time() - start, 1),
              "peak_rss_gib_rank0": round(peak_rss_gib(), 3)}
    if verify:
        stack = streamed_megatron_stack(config, shape, pg_collection, str(written))
        source_dtype = _checkpoint_dtype(shape.raw, None)
        cast = None if source_dtype == config.model.params_dtype else \
            f"{source_dtype} -> {config.model.params_dtype}"
        _verify(report, destination, stack, src, tolerance, cast, verify_tokens)
    destination.commit()
    return report


def mcore_to_hf(src: str, dst: str, tp: int = 1, pp: int = 1, hf_config: Optional[str] = None,
                verify: bool = False, tolerance: float = 1e-3, overwrite: bool = False,
                dtype: Optional[str] = None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, verify_tokens: int = 64) -> dict:
    start = time.time()
    return_freed_tensors_to_the_system()  # one layer at a time stays one layer
    if not Path(src).exists():
        raise ConversionError(f"--src {src} does not exist")
    check_source_and_destination(src, dst)
    destination = StagedDestination(dst, overwrite)
    destination.check()
    checkpoint = find_checkpoint(src) if (Path(src) / "latest").exists() or not \
        (Path(src) / "metadata.json").exists() else Path(src)
    if checkpoint is None:
        raise ConversionError(f"{src}: no complete checkpoint")
    marker = read_marker(checkpoint)
    raw = marker.get("hf_config")
    source_dir = marker.get("source_hf_dir") or (marker.get("config") or {}).get(
        "model", {}).get("hf_config_path")
    if hf_config is not None:
        raw = read_hf_config(hf_config).raw
        source_dir = hf_config
    if raw is None:
        raise ConversionError(f"{checkpoint}: no HF architecture recorded; pass --hf-config DIR")
    shape = shape_from_dict(raw, str(checkpoint))
    _check_verify_tokens(shape, verify, verify_tokens)
    config = _run_config(None, tp, pp, _export_dtype(marker, raw, dtype))
    check_model_fits_layout(shape, config.parallel)
    pg_collection = initialize_parallel(config.parallel, config.training.seed)
    require_intact(checkpoint)  # before anything is staged: a refusal leaves nothing behind
    chunks = build_meta_chunks(config, shape, pg_collection)
    check_checkpoint_layout(chunks, str(checkpoint))  # the architecture fits the checkpoint
    staging = destination.prepare()
    params = (pair for group in load_groups(chunks, str(checkpoint)) for pair in group)
    with destination.writing():
        write_hf_checkpoint(chunks, shape, str(staging), pg_collection, params=params,
                            source_dir=source_dir, max_shard_bytes=max_shard_bytes)
    report = {"direction": "mcore-to-hf", "src": str(checkpoint), "dst": dst, "tp": tp, "pp": pp,
              "seconds": round(time.time() - start, 1),
              "peak_rss_gib_rank0": round(peak_rss_gib(), 3)}
    if verify:
        stack = streamed_megatron_stack(config, shape, pg_collection, str(checkpoint))
        _verify(report, destination, stack, str(staging), tolerance, verify_tokens=verify_tokens)
    destination.commit()
    return report


def check_layout_before_launch(direction: str, src: str, hf_config: Optional[str], tp: int,
                               pp: int) -> None:
    """Before relaunching under torchrun: the model's heads, KV groups and layers split over
    ``--tp`` / ``--pp`` (one line naming the options). A source that cannot be read yet is left
    to the conversion itself, which names what is missing."""
    raw = None
    try:
        if direction == "hf-to-mcore" or hf_config is not None:
            raw = read_hf_config(src if direction == "hf-to-mcore" else hf_config).raw
        else:
            checkpoint = find_checkpoint(src) if (Path(src) / "latest").exists() or not \
                (Path(src) / "metadata.json").exists() else Path(src)
            raw = read_marker(checkpoint).get("hf_config") if checkpoint is not None else None
    except (OSError, ValueError):
        return
    if raw is not None:
        check_model_fits_layout(shape_from_dict(raw, src), ParallelConfig(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), "--tp", "--pp")
