"""``--verify``: logits of the Megatron checkpoint against ``transformers`` on random tokens,
both in float32, whatever the checkpoint's dtype.

Neither model is held whole. Both are built on the meta device and run one module at a time:
a forward pre-hook reads the module's weights (Megatron: its regions of the dist checkpoint,
at the conversion's TP/PP layout, through the pipeline schedule; transformers: its tensors of
the safetensors files) and a forward hook returns them to the meta device. A rank holds one
decoder layer, or the embedding / output matrix, in float32 at a time; the two models run one
after the other.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.utils import is_pp_last_stage

from solopo_mcore.config import RunConfig
from solopo_mcore.convert.hf_io import HFCheckpointReader
from solopo_mcore.convert.mcore_io import build_meta_chunks, stream_weights_in_forward
from solopo_mcore.convert.tables import EMBEDDING_HF_NAME, OUTPUT_HF_NAME, ConversionError
from solopo_mcore.log import log
from solopo_mcore.models.hf_config import ModelShape
from solopo_mcore.platform import default_device
from solopo_mcore.stack import ModelStack


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


def _set_params(module: torch.nn.Module, values: dict) -> None:
    """Replace ``module``'s parameters (dotted local names) with ``values``."""
    for name, value in values.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


class _StreamedWeights:
    """Forward hooks that give one module its float32 weights for the length of its forward."""

    def __init__(self, reader: HFCheckpointReader, tied: bool):
        self.reader, self.tied = reader, tied

    def attach(self, module: torch.nn.Module, prefix: str) -> None:
        names = {local: f"{prefix}.{local}" for local, _ in module.named_parameters()}
        if self.tied and prefix == OUTPUT_HF_NAME.rsplit(".", 1)[0]:
            names = {local: EMBEDDING_HF_NAME for local in names}
        meta = {local: (p.shape, p.dtype) for local, p in module.named_parameters()}

        def load(mod, args):
            _set_params(mod, {local: self.reader.get(hf).to(torch.float32)
                              for local, hf in names.items()})

        def free(mod, args, output):
            _set_params(mod, {local: torch.empty(shape, dtype=dtype, device="meta")
                              for local, (shape, dtype) in meta.items()})

        module.register_forward_pre_hook(load)
        module.register_forward_hook(free)


def streamed_hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 ``transformers`` logits of ``tokens``, holding one module's weights at a time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    inner = model.model
    # RoPE frequencies are computed at construction: build that module again on the CPU.
    inner.rotary_emb = type(inner.rotary_emb)(config=model.config)
    streamed = [("model.embed_tokens", inner.embed_tokens), ("model.norm", inner.norm),
                ("lm_head", model.lm_head)]
    streamed += [(f"model.layers.{i}", layer) for i, layer in enumerate(inner.layers)]
    hooks = _StreamedWeights(HFCheckpointReader(hf_dir), bool(config.tie_word_embeddings))
    for prefix, module in streamed:
        hooks.attach(module, prefix)
    stray = [n for n, b in model.named_buffers() if b.is_meta]
    if stray:
        raise ConversionError(f"{Path(hf_dir).name}: streamed verification does not know "
                              f"this architecture's buffers {stray[:3]}")
    with torch.no_grad():
        return model(tokens).logits.float()


def streamed_megatron_stack(config: RunConfig, shape: ModelShape, pg_collection,
                            checkpoint: str) -> ModelStack:
    """The model at ``config``'s layout in float32 on the meta device, reading each module's
    weights from ``checkpoint`` during its forward."""
    config = copy.deepcopy(config)
    config.model.params_dtype = "fp32"
    chunks = build_meta_chunks(config, shape, pg_collection)
    stream_weights_in_forward(chunks, checkpoint)
    return ModelStack(shape, chunks[0].config, chunks, pg_collection)


def verify_against_hf(stack: ModelStack, hf_dir: str, tolerance: float, seq_len: int = 64,
                      seed: int = 0) -> float:
    """Max |logit difference| between ``stack``'s model and ``transformers`` (float32, streamed)
    on random tokens; raises above ``tolerance``. Collective; every rank returns the same
    value."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, stack.shape.vocab_size, (2, seq_len), generator=g)
    ours = megatron_logits(stack, tokens)
    diff = torch.zeros(1, dtype=torch.float64)
    if ours is not None and stack.pg_collection.tp.rank() == 0:
        ref = streamed_hf_logits(hf_dir, tokens)
        finite = bool(torch.isfinite(ours).all() and torch.isfinite(ref).all())
        # a NaN difference would compare as "not above the tolerance": count it as infinite
        diff[0] = (ours.cpu() - ref).abs().max().item() if finite else float("inf")
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    value = float(diff.item())
    if dist.get_rank() == 0:
        log("verify", f"max |logit diff| vs transformers: {value:.3e} (tolerance {tolerance:g})")
    if value > tolerance:
        raise ConversionError(f"verification failed: max |logit diff| {value:.3e} > {tolerance:g}")
    return value
