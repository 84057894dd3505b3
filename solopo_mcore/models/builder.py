"""Build Megatron-Core ``TransformerConfig`` + ``GPTModel`` chunks from an HF architecture.

The model class :class:`ResponseLogprobGPTModel` is Megatron's ``GPTModel`` with one change: when
labels are given, the output layer and the vocab-parallel log-softmax run only at the positions the
loss mask selects (response tokens), and the model returns those tokens' log-probs. A 128K context
therefore never materialises 128K x vocab logits. Under sequence parallelism only those positions'
hidden states are gathered from the TP ranks' sequence slices, never the whole sequence.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from solopo_mcore.compat import LabelledOutputGPTModel
from solopo_mcore.config import ConfigError, ModelConfig, ParallelConfig
from solopo_mcore.log import warn
from solopo_mcore.models.attention import TorchCoreAttention
from solopo_mcore.models.hf_config import ModelShape, padded_vocab_size
from solopo_mcore.models.mlp import LeanMLP
from solopo_mcore.models.norm import SequenceParallelRMSNorm
from solopo_mcore.models.rebuilt_saves import rebuilt_saves
from solopo_mcore.models.rope import inverse_frequencies, softmax_scale
from solopo_mcore.models.shared_prefix import enable_positioned_rope
from solopo_mcore.parallel.context import gather_first_dim
from solopo_mcore.platform import transformer_config_overrides, transformer_engine_available

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Printed once per process when ``model.layer_spec=te``: what no test or CI run has exercised.
TE_UNVALIDATED = (
    "model.layer_spec=te is NOT the tested path: Transformer Engine's THD + context-"
    "parallel attention on our packed triplets (segment boundaries, zigzag CP split, response-only "
    "log-probs) and TE's fused RoPE have not been validated against the transformers reference; "
    "CI tests model.layer_spec=auto/local (local spec + torch SDPA attention). Check the "
    "log-probs with `python examples/convert_checkpoint.py hf-to-mcore ... --verify` and "
    "benchmarks/device_run.sh before relying on it.")
_TE_NOTICE_SHOWN = False


def use_te_spec(model_cfg: ModelConfig) -> bool:
    """Whether the Transformer Engine layer spec is used: only when asked for by name.

    ``auto`` is the tested path (local spec + our torch attention) on every device, whether or not
    Transformer Engine is importable."""
    if model_cfg.layer_spec != "te":
        return False
    if not transformer_engine_available():
        raise ConfigError("model.layer_spec=te but Transformer Engine is not importable "
                          "(or no CUDA device); use model.layer_spec=auto (the tested path)")
    return True


def _announce_te_once() -> None:
    global _TE_NOTICE_SHOWN
    if _TE_NOTICE_SHOWN:
        return
    _TE_NOTICE_SHOWN = True
    warn("model", TE_UNVALIDATED)


def build_transformer_config(shape: ModelShape, model_cfg: ModelConfig,
                             parallel: ParallelConfig, **overrides) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for ``shape`` at the given layout and numerics."""
    dtype = _DTYPES[model_cfg.params_dtype]
    te = use_te_spec(model_cfg)
    kwargs = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=shape.add_qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        attention_dropout=model_cfg.attention_dropout,
        hidden_dropout=model_cfg.hidden_dropout,
        init_method_std=0.02,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel_enabled,
        # Packed microbatches differ in length, so the pipeline exchanges shapes first. Megatron
        # only allows that with the all-to-all dispatcher, even for dense models.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        # Loss is the mean over examples: loss_func returns per-microbatch sums and example counts
        # and finalize_model_grads divides by the global count (see training/forward_step.py).
        calculate_per_token_loss=True,
        recompute_granularity=model_cfg.recompute_granularity,
        recompute_method=model_cfg.recompute_method if model_cfg.recompute_granularity == "full"
        else None,
        recompute_num_layers=model_cfg.recompute_num_layers
        if model_cfg.recompute_granularity == "full" else None,
        # Device-dependent fusions (fused SwiGLU / bias-dropout-add on CUDA, RoPE and
        # grad-accumulation fusions with TE) and CPU initialisation: platform.py.
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        # YaRN's attention factor m (on cos and sin of q and k in transformers) as m^2 / sqrt(d)
        softmax_scale=softmax_scale(shape.kv_channels, shape.rope_scaling),
    )
    if model_cfg.recompute_granularity == "selective":
        kwargs["recompute_modules"] = ["core_attn"]
    kwargs.update(transformer_config_overrides(transformer_engine=te))
    if model_cfg.activation_memory == "lean" and not te:
        kwargs["bias_activation_fusion"] = False  # LeanMLP's SwiGLU on every device (mlp.py)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_layer_spec(model_cfg: ModelConfig):
    """The local spec with our torch core attention and :class:`SequenceParallelRMSNorm` (which,
    unlike megatron's torch fallback, allows sequence parallelism) for ``auto``/``local``: the
    tested path; or TE's spec when ``model.layer_spec=te`` (announced once as unvalidated)."""
    if use_te_spec(model_cfg):
        _announce_te_once()
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    lean = model_cfg.activation_memory == "lean"
    attention_cls = type("TorchCoreAttention", (TorchCoreAttention,),
                         {"backend_name": model_cfg.attention_backend, "rebuild_output": lean})
    spec.submodules.self_attention.submodules.core_attention = attention_cls
    norm_cls = type("SequenceParallelRMSNorm", (SequenceParallelRMSNorm,),
                    {"rebuild_output": lean})
    spec.submodules.input_layernorm = norm_cls
    spec.submodules.pre_mlp_layernorm = norm_cls
    return spec


def _use_lean_mlp(model: GPTModel, lean: bool) -> None:
    """Make every ``MLP`` a :class:`LeanMLP` (which adds no state, only its forward). Done on the
    built modules, not in the spec: megatron-core builds an MLP from its spec with the TP group
    only when the spec names ``MLP`` itself (0.16), or rewraps only that class (0.19)."""
    for module in model.modules():
        if type(module) is MLP:
            module.__class__ = LeanMLP
            module.lean_saves = lean


def set_activation_memory(chunks: list, activation_memory: str) -> None:
    """Switch built model chunks between ``ModelConfig.activation_memory`` settings (tests
    compare both on the same weights); the transformer config's fused SwiGLU is not changed."""
    lean = activation_memory == "lean"
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, (TorchCoreAttention, SequenceParallelRMSNorm)):
                module.rebuild_output = lean
            elif isinstance(module, LeanMLP):
                module.lean_saves = lean


def build_decoder_spec(model_cfg: ModelConfig, config: TransformerConfig,
                       vp_stage: Optional[int], pp_rank: int):
    """The decoder spec of one model chunk. For the local spec, a block spec whose final norm is
    :class:`SequenceParallelRMSNorm` too (from a layer spec megatron picks its own norm class)."""
    layer_spec = build_layer_spec(model_cfg)
    if use_te_spec(model_cfg):
        return layer_spec
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers,
                                      layer_norm=SequenceParallelRMSNorm)


class _GatherSelectedRows(torch.autograd.Function):
    """All-gather each TP rank's selected rows of its sequence slice, in sequence order.

    ``counts[r]`` rows come from rank ``r`` (known on every rank from the loss mask, so nothing
    but the rows is exchanged). Rows are padded to the largest count for an equal-size all-gather
    (gloo has no uneven one). Backward keeps this rank's rows of the incoming gradient: the caller
    makes that gradient complete on every TP rank (the output layer all-reduces its input
    gradient, as ``copy_to_tensor_model_parallel_region`` does without SP)."""

    @staticmethod
    def forward(ctx, rows, counts, group):
        rank = group.rank()
        ctx.start = sum(counts[:rank])
        ctx.count = counts[rank]
        width = max(counts)
        if width == 0:  # no selected rows on any TP rank (e.g. a CP rank without responses)
            return rows.clone()
        padded = rows.new_zeros((width,) + tuple(rows.shape[1:]))
        padded[:rows.shape[0]] = rows
        gathered = gather_first_dim(padded, group)
        return torch.cat([gathered[r * width:r * width + n] for r, n in enumerate(counts)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start:ctx.start + ctx.count], None, None


class ResponseLogprobGPTModel(LabelledOutputGPTModel):
    """``GPTModel`` that, given labels, returns log-probs at loss-mask positions only.

    ``forward(input_ids, None, None, labels=..., loss_mask=..., packed_seq_params=...)`` returns
    a float32 tensor ``[n]``: ``log p(labels[i] | prefix)`` for the ``n`` positions where
    ``loss_mask`` is true, in order. The vocabulary is TP-sharded; the log-softmax is Megatron's
    vocab-parallel cross entropy, so the value is already reduced over TP. Vocabulary padding rows
    are masked out so the values equal the unpadded HF model's.
    """

    real_vocab_size: Optional[int] = None
    supports_shared_prefix: bool = True
    """False with Transformer Engine's attention, which cannot hide y_w from y_l."""

    def forward(self, *args, packed_seq_params=None, **kwargs):
        if getattr(packed_seq_params, "hidden_keys", None) is not None \
                and not self.supports_shared_prefix:
            raise ValueError("shared-prefix microbatches need our attention (model.layer_spec="
                             "auto or local); pack with shared_prefix=False (data.shared_prefix="
                             "false) for model.layer_spec=te")
        with rebuilt_saves():  # the tensors registered in this forward are rebuilt in backward
            return super().forward(*args, packed_seq_params=packed_seq_params, **kwargs)

    def labelled_output(self, hidden_states, labels, loss_mask, output_weight):
        """Log-probs of ``labels`` at ``loss_mask`` positions from the last decoder hidden states
        (called by the megatron-core version's output hook, see compat.py)."""
        if loss_mask is None:
            raise ValueError("ResponseLogprobGPTModel needs loss_mask with labels")
        index = loss_mask.reshape(-1).nonzero(as_tuple=True)[0]
        if self.config.sequence_parallel:
            selected = self._selected_sequence_parallel(hidden_states, loss_mask)
        else:
            # hidden [s, b, h] -> the selected positions, [n, 1, h]
            flat_hidden = hidden_states.transpose(0, 1).reshape(-1, hidden_states.shape[-1])
            selected = flat_hidden.index_select(0, index).unsqueeze(1)
        targets = labels.reshape(-1).index_select(0, index).unsqueeze(1)
        # The selected rows are already complete on every TP rank: with its sequence-parallel
        # flag off the output layer does not all-gather them along the sequence again, and
        # all-reduces their gradient over TP instead of reduce-scattering it.
        sp = self.output_layer.sequence_parallel
        self.output_layer.sequence_parallel = False
        try:
            logits, _ = self.output_layer(selected, weight=output_weight,
                                          runtime_gather_output=False)
        finally:
            self.output_layer.sequence_parallel = sp
        logits = logits.float()
        if self.real_vocab_size is not None and self.real_vocab_size < self.vocab_size:
            shard = logits.shape[-1]
            start = self.pg_collection.tp.rank() * shard
            ids = torch.arange(start, start + shard, device=logits.device)
            logits = logits.masked_fill(ids >= self.real_vocab_size, float("-inf"))
        nll = tensor_parallel.vocab_parallel_cross_entropy(logits, targets)
        return -nll.reshape(-1)

    def _selected_sequence_parallel(self, hidden_states, loss_mask):
        """[n, 1, h] hidden states at the loss-mask positions, gathered from the TP ranks' sequence
        slices (rank r holds positions [r*s/tp, (r+1)*s/tp) of the CP-local sequence): only the
        selected rows cross the network, never the whole sequence."""
        group = self.pg_collection.tp
        tp = group.size()
        if loss_mask.shape[0] != 1:
            raise ValueError(f"sequence parallelism expects packed THD microbatches (batch size "
                             f"1), got loss_mask of shape {tuple(loss_mask.shape)}")
        mask = loss_mask.reshape(-1)
        local_len = hidden_states.shape[0]
        if mask.numel() != local_len * tp:
            raise ValueError(f"loss_mask has {mask.numel()} positions but the TP ranks hold "
                             f"{tp} x {local_len}; pad microbatches to a multiple of TP "
                             f"(parallel.layout.sequence_pad_multiple)")
        counts = [int(c) for c in mask.reshape(tp, local_len).sum(dim=1).tolist()]
        rank = group.rank()
        local_mask = mask[rank * local_len:(rank + 1) * local_len]
        rows = hidden_states[:, 0][local_mask.nonzero(as_tuple=True)[0]]
        return _GatherSelectedRows.apply(rows, counts, group).unsqueeze(1)


def build_model_chunks(shape: ModelShape, model_cfg: ModelConfig, parallel: ParallelConfig,
                       pg_collection: ProcessGroupCollection,
                       config: Optional[TransformerConfig] = None) -> list:
    """One ``ResponseLogprobGPTModel`` per virtual-pipeline chunk on this rank (not yet wrapped)."""
    config = config or build_transformer_config(shape, model_cfg, parallel)
    vp_size = parallel.virtual_pipeline_model_parallel_size
    tp = parallel.tensor_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size or 1):
        first = is_pp_first_stage(pg_collection.pp) and vp_stage == 0
        last = is_pp_last_stage(pg_collection.pp) and vp_stage == (vp_size or 1) - 1
        model = ResponseLogprobGPTModel(
            config=config,
            transformer_layer_spec=build_decoder_spec(model_cfg, config,
                                                      vp_stage if vp_size else None,
                                                      pg_collection.pp.rank()),
            vocab_size=padded_vocab_size(shape.vocab_size, model_cfg.make_vocab_size_divisible_by,
                                         tp),
            max_sequence_length=shape.max_position_embeddings,
            pre_process=first,
            post_process=last,
            parallel_output=True,
            share_embeddings_and_output_weights=shape.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(shape.rope_theta),
            rope_scaling=False,  # every scaling's frequencies are set by _set_rope_frequencies
            pg_collection=pg_collection,
            vp_stage=vp_stage if vp_size else None,
        )
        model.real_vocab_size = shape.vocab_size
        _set_rope_frequencies(model, shape)
        model.supports_shared_prefix = not use_te_spec(model_cfg)
        if model.supports_shared_prefix:
            enable_positioned_rope(model)  # shared-prefix segments' RoPE positions
            _use_lean_mlp(model, model_cfg.activation_memory == "lean")
        chunks.append(model)
    return chunks


def _set_rope_frequencies(model: GPTModel, shape: ModelShape) -> None:
    """Set RoPE inverse frequencies as transformers computes them (float32, HF theta, llama3 or
    YaRN scaling: :func:`solopo_mcore.models.rope.inverse_frequencies`).

    Megatron fixes llama3's low/high frequency factors and original length at Llama 3.1's values
    and builds YaRN frequencies on CUDA only; the HF config is the source of truth. YaRN's
    attention factor is in the softmax scale (:func:`build_transformer_config`)."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        return
    inv_freq = inverse_frequencies(shape.rope_theta, rotary.inv_freq.numel() * 2,
                                   shape.rope_scaling)
    rotary.inv_freq = inv_freq.to(dtype=rotary.inv_freq.dtype, device=rotary.inv_freq.device)
