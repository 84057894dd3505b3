"""Megatron's MLP with an activation-lean SwiGLU: 2 x FFN values kept per token, not 5.

Megatron's unfused gated path (``glu`` in ``MLP.forward``) leaves autograd keeping, per token,
``linear_fc1``'s output ``[a, b]`` (2 f: ``silu`` keeps ``a``, the product keeps ``b``, both views
of it), ``silu(a)`` (f, kept by the product) and the product (f, kept by ``linear_fc2``): 4 f,
plus what the profiler attributes to the chunked views. Megatron's fused ``bias_swiglu`` keeps
``[a, b]`` and the product (3 f), and needs ``torch.compile`` (slower than eager on CPU, where it
was therefore off).

:class:`LeanMLP` keeps ``[a, b]`` only (2 f), on every device:

- :class:`SwiGLUFunction` saves its input and computes its gradient with the same ops autograd
  runs for the unfused expression (``silu_backward`` of ``g * b``, and ``g * silu(a)``), so the
  gradients are bit for bit the unfused path's;
- its output, which ``linear_fc2`` keeps for its weight gradient, is registered with
  :func:`rebuilt_saves.rebuild_in_backward`: backward recomputes ``silu(a) * b`` (bitwise the
  forward's) from the kept input when it reaches ``linear_fc2``.

Everything else (sharded state dict, TP/SP, the fc1 gate/up interleave, checkpoints) is
Megatron's ``MLP``; configurations this does not cover (other activations, clamps, GLU offsets,
MoE per-token scales, TE activation modules, Megatron's own fusion when asked for) run Megatron's
forward unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from solopo_mcore.models.rebuilt_saves import rebuild_in_backward


def _swiglu(fc1_out: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` bit for bit, in one f-wide buffer (no separate SiLU output)."""
    gate, up = torch.chunk(fc1_out, 2, dim=-1)
    out = torch.ops.aten.silu.out(gate, out=torch.empty_like(up))
    return out.mul_(up)


class SwiGLUFunction(torch.autograd.Function):
    """``silu(a) * b`` of ``[a, b] = x.chunk(2, -1)``, keeping only ``x`` for backward."""

    @staticmethod
    def forward(ctx, fc1_out):
        ctx.save_for_backward(fc1_out)
        return _swiglu(fc1_out)

    @staticmethod
    def backward(ctx, grad_out):
        fc1_out, = ctx.saved_tensors
        gate, up = torch.chunk(fc1_out, 2, dim=-1)
        # What autograd computes for F.silu(gate) * up: d/dup = g * silu(gate),
        # d/dgate = silu'(gate) * (g * up); each written into its half of the result, in place,
        # so backward holds g and the result only (3 f values per token)
        grad = torch.empty_like(fc1_out)
        grad_gate, grad_up = torch.chunk(grad, 2, dim=-1)
        torch.ops.aten.silu.out(gate, out=grad_up).mul_(grad_out)
        torch.mul(grad_out, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad


def lean_swiglu(fc1_out: torch.Tensor) -> torch.Tensor:
    """SwiGLU whose output backward rebuilds (see module doc)."""
    return rebuild_in_backward(SwiGLUFunction.apply(fc1_out), _swiglu, fc1_out)


class LeanMLP(MLP):
    """Megatron's ``MLP``; gated SiLU (SwiGLU) runs :func:`lean_swiglu`."""

    #: False: Megatron's forward (``model.activation_memory=megatron``; set by the builder)
    lean_saves: bool = True

    def _lean(self, per_token_scale) -> bool:
        c = self.config
        return (self.lean_saves and per_token_scale is None and c.gated_linear_unit and c.activation_func is F.silu
                and not c.use_te_activation_func and not c.bias_activation_fusion
                and getattr(c, "activation_func_clamp_value", None) is None
                and not getattr(c, "glu_linear_offset", 0.0))

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self._lean(per_token_scale):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        fc1_out, fc1_bias = self.linear_fc1(hidden_states)
        if fc1_bias is not None:
            fc1_out = fc1_out + fc1_bias
        return self.linear_fc2(lean_swiglu(fc1_out))
