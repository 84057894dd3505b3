"""HF -> Megatron and Megatron -> HF conversion at any TP/PP layout, with logits verification.

Both directions build the model at the requested layout in a world of ``tp * pp`` processes
(the script relaunches itself with torchrun when needed) and stream one tensor at a time.
The Megatron side is a ``dist_checkpointing`` checkpoint, loadable at any other layout.
"""

from __future__ import annotations

import json
import shutil
import resource
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.utils import is_pp_last_stage

from solopo_mcore.config import ModelConfig, ParallelConfig, RunConfig
from solopo_mcore.convert.destination import StagedDestination, check_source_and_destination
from solopo_mcore.convert.hf_io import HFCheckpointReader, export_hf
from solopo_mcore.convert.tables import ConversionError
from solopo_mcore.log import log
from solopo_mcore.models.hf_config import read_hf_config, shape_from_dict
from solopo_mcore.platform import default_device
from solopo_mcore.stack import build_model_stack, load_hf_weights, setup_parallel
from solopo_mcore.storage.checkpoint import (CheckpointManager, find_checkpoint, read_marker,
                                              require_intact, save_model_only)

_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def _run_config(hf_config_dir: str, tp: int, pp: int, dtype: str) -> RunConfig:
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


def megatron_logits(stack, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Full-vocabulary logits ``[b, s, V]`` through the pipeline (last stage; None elsewhere)."""
    pg_collection = stack.pg_collection
    tokens = tokens.to(default_device())

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch, None, None)

        def loss_func(output):
            return output.sum() * 0.0, {"logits": output.detach()}
        return out, loss_func

    extra = {}
    if pg_collection.pp.size() > 1:
        extra["p2p_communicator"] = P2PCommunicator(pg_collection.pp, stack.config)
    stack.config.variable_seq_lengths = True
    for chunk in stack.model:
        chunk.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func(pp_size=pg_collection.pp.size())(
            forward_step_func=forward_step, data_iterator=iter([tokens]),
            model=stack.model[0], num_microbatches=1, seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0], forward_only=True, pg_collection=pg_collection,
            **extra)
    if not is_pp_last_stage(pg_collection.pp):
        return None
    logits = outputs[0]["logits"].float()
    parts = [torch.empty_like(logits) for _ in range(pg_collection.tp.size())]
    dist.all_gather(parts, logits.contiguous(), group=pg_collection.tp)
    return torch.cat(parts, dim=-1)[..., :stack.shape.vocab_size]


def verify_against_hf(stack, hf_dir: str, tolerance: float, seq_len: int = 64,
                      seed: int = 0) -> float:
    """Max |logit difference| between this model and ``transformers`` on random tokens; raises
    above ``tolerance``. Collective; every rank returns the same value."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, stack.shape.vocab_size, (2, seq_len), generator=g)
    ours = megatron_logits(stack, tokens)
    diff = torch.zeros(1, dtype=torch.float64)
    if ours is not None and stack.pg_collection.tp.rank() == 0:
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        with torch.no_grad():
            ref = hf(tokens).logits.float()
        diff[0] = (ours.cpu() - ref).abs().max().item()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    value = float(diff.item())
    if dist.get_rank() == 0:
        log("verify", f"max |logit diff| vs transformers: {value:.3e} (tolerance {tolerance:g})")
    if value > tolerance:
        raise ConversionError(f"verification failed: max |logit diff| {value:.3e} > {tolerance:g}")
    return value


def hf_to_mcore(src: str, dst: str, tp: int = 1, pp: int = 1, dtype: Optional[str] = None,
                verify: bool = False, tolerance: float = 1e-3, overwrite: bool = False) -> dict:
    start = time.time()
    if not Path(src).exists():
        raise ConversionError(f"--src {src} does not exist")
    check_source_and_destination(src, dst)
    destination = StagedDestination(dst, overwrite)
    destination.check()
    shape = read_hf_config(src)
    reader = HFCheckpointReader(src)
    reader.check_names(shape)
    config = _run_config(src, tp, pp, _checkpoint_dtype(shape.raw, dtype))
    shape, pg_collection = setup_parallel(config)
    staging = destination.prepare()
    stack = build_model_stack(config, shape, pg_collection)
    load_hf_weights(stack, src)
    save_model_only(str(staging), stack.model,
                    state={"hf_config": shape.raw, "source_hf_dir": str(src),
                           "params_dtype": config.model.params_dtype})
    report = {"direction": "hf-to-mcore", "src": src, "dst": dst, "tp": tp, "pp": pp,
              "seconds": round(time.time() - start, 1)}
    if verify:
        try:
            report["max_abs_logit_diff"] = verify_against_hf(stack, src, tolerance)
        except ConversionError as exc:
            raise destination.fail_verification(exc) from None
    destination.commit()
    report["peak_rss_gib_rank0"] = round(peak_rss_gib(), 3)
    return report


def mcore_to_hf(src: str, dst: str, tp: int = 1, pp: int = 1, hf_config: Optional[str] = None,
                verify: bool = False, tolerance: float = 1e-3, overwrite: bool = False,
                dtype: Optional[str] = None) -> dict:
    start = time.time()
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
    config_dir = Path(dst).parent / (Path(dst).name + ".config_tmp")
    if not dist.is_initialized() or dist.get_rank() == 0:
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "config.json").write_text(json.dumps(raw))
    if dist.is_initialized():
        dist.barrier()
    config = _run_config(str(config_dir), tp, pp, _checkpoint_dtype(raw, dtype))
    try:
        shape, pg_collection = setup_parallel(config)  # every rank has read config_dir
    finally:
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(config_dir, ignore_errors=True)
    require_intact(checkpoint)  # before anything is staged: a refusal leaves nothing behind
    staging = destination.prepare()
    stack = build_model_stack(config, shape, pg_collection)
    CheckpointManager.load(checkpoint, stack.model, load_rng=False, verified=True)
    export_hf(stack.model, shape, str(staging), pg_collection, source_dir=source_dir)
    if dist.get_rank() == 0 and not (staging / "config.json").is_file():
        (staging / "config.json").write_text(json.dumps(raw, indent=2))
    dist.barrier()
    report = {"direction": "mcore-to-hf", "src": str(checkpoint), "dst": dst, "tp": tp, "pp": pp,
              "seconds": round(time.time() - start, 1)}
    if verify:
        try:
            report["max_abs_logit_diff"] = verify_against_hf(stack, str(staging), tolerance)
        except ConversionError as exc:
            raise destination.fail_verification(exc) from None
    destination.commit()
    report["peak_rss_gib_rank0"] = round(peak_rss_gib(), 3)
    return report
