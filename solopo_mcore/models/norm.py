"""RMSNorm in plain torch that works under Megatron sequence parallelism.

megatron-core's torch fallback (``WrappedTorchNorm``) refuses ``sequence_parallel`` on every
version through 0.19, so without Transformer Engine or apex the norms, residual stream and dropout
of a TP run held the whole sequence on every TP rank. This norm needs nothing special for it:

- Under sequence parallelism its input is this TP rank's slice of the sequence (the embedding
  scatters to the sequence-parallel region; row-parallel linears reduce-scatter into it, and
  column-parallel linears all-gather out of it). RMSNorm normalises each token on its own, so it
  runs on the slice unchanged.
- Its weight then only sees this rank's tokens, so each rank's weight gradient is a partial sum.
  The weight carries ``sequence_parallel = True``, the attribute TE and apex norms set; Megatron's
  ``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``) sums the gradients of
  such parameters over the TP group before the data-parallel reduction and the optimizer step.

Numerics follow transformers' Llama/Qwen2 RMSNorm: normalise in float32, cast back to the input
dtype, then scale by the weight. Written as one autograd function that keeps only its input (in
the input dtype) and the float32 inverse RMS per token for backward; the normalized tensor is
rebuilt there. Composed torch ops would keep a float32 copy of the input and the normalized
tensor as well (see profiling/estimator.py). Its output, which the next linear keeps for its weight
gradient, is rebuilt in backward from that input (``models/rebuilt_saves.py``; off with
``model.activation_memory=megatron``).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from solopo_mcore.models.rebuilt_saves import rebuild_in_backward
from solopo_mcore.platform import default_device


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 input


def _normalized_output(x: torch.Tensor, weight: torch.Tensor, inv_rms: torch.Tensor):
    """The forward's output from its input and inverse RMS (backward rebuilds it bit for bit)."""
    return weight * (x.to(inv_rms.dtype) * inv_rms).to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, shared):
        x32 = x.to(_compute_dtype(x))
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inv_rms)
        if shared is not None:
            shared["inv_rms"] = inv_rms
        return weight * (x32 * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, inv_rms = ctx.saved_tensors
        normalized = x.to(inv_rms.dtype) * inv_rms
        grad_weight = (grad_out * normalized.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
        grad_normalized = (grad_out * weight).to(inv_rms.dtype)
        # d/dx of x * rsqrt(mean(x^2) + eps): inv_rms * (g - y * mean(g * y))
        grad_x = inv_rms * (grad_normalized -
                            normalized * (grad_normalized * normalized).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None, None


class SequenceParallelRMSNorm(torch.nn.Module):
    """``y = weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension.

    Takes the arguments of Megatron's norm builders (``config, hidden_size, eps``), so it drops
    into a layer spec in place of ``WrappedTorchNorm``/``TENorm``."""

    #: whether backward rebuilds the output instead of the next linear keeping it (set per
    #: instance by ``models.builder.set_activation_memory``)
    rebuild_output: bool = True

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **unused):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"SequenceParallelRMSNorm implements RMSNorm, not "
                             f"{config.normalization}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("SequenceParallelRMSNorm does not implement zero-centered gamma")
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype,
                       device="cpu" if config.use_cpu_initialization else default_device()))
        # Read by finalize_model_grads: all-reduce this gradient over TP (see module docstring).
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shared = {} if self.rebuild_output else None
        out = _RMSNormFunction.apply(hidden_states, self.weight, self.eps, shared)
        if shared is not None:  # the next linear keeps it; rebuilt from what this keeps
            rebuild_in_backward(out, _normalized_output, hidden_states, self.weight,
                                shared["inv_rms"])
        return out

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}, sequence_parallel=" \
               f"{self.weight.sequence_parallel}"
