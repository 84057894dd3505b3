"""Model-side support for shared-prefix segments: one pass over a context for both answers.

A shared-prefix segment (``data/packing.py`` builds it) is one THD segment laid out as

    [ x (a tokens) | y_w (b) | x[-1] (1) | y_l (c) | padding ]
      positions 0..a-1, a..a+b-1, a-1, a..a+c-1, then increasing

* ``y_w`` attends to ``x`` and itself causally, exactly as in ``[x, y_w]``.
* The branch ``[x[-1], y_l]`` attends to ``x[:-1]`` and to itself causally, **never** to ``y_w``
  (or to the first copy of ``x[-1]``): its keys ``[a-1, a+b)`` are hidden. ``x[-1]`` is repeated so
  that the branch's first position reproduces the hidden state of ``x``'s last token (same token,
  same position, same visible keys), and it predicts ``y_l[0]`` as ``x[-1]`` predicts ``y_w[0]``.
* RoPE positions continue from ``a`` in both answers, so each answer sees the relative distances
  it has in its own ``[x, y]`` segment. Megatron applies RoPE to THD input from a per-token table
  when the table has one row per (global, padded) token (``rope_utils._apply_rotary_pos_emb_thd``,
  "packed freqs", megatron-core 0.16.1 and 0.19.x), and picks this CP rank's zigzag rows itself.

Both facts travel to the model in :class:`SharedPrefixPackedSeqParams`, Megatron's
``PackedSeqParams`` with two fields more. An ordinary segment hides nothing (``hidden == (L, L)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class SharedPrefixPackedSeqParams(PackedSeqParams):
    """``PackedSeqParams`` of a microbatch holding at least one shared-prefix segment."""

    rope_positions: Optional[torch.Tensor] = None
    """[T] int64 RoPE position of every global (padded, unsplit) token."""
    hidden_keys: Optional[tuple] = None
    """Per segment ``(lo, hi)``, segment-relative: queries at ``>= hi`` do not see keys
    ``[lo, hi)``. ``(L, L)`` (L = padded length) for an ordinary causal segment."""


def query_key_ranges(q_start: int, q_end: int, hidden: tuple) -> list:
    """The causal attention of queries ``[q_start, q_end)`` of one segment (segment-relative
    positions) as ``[(q_lo, q_hi, key_ranges)]`` pieces, each a lower-right-aligned causal block
    over the concatenation of ``key_ranges``: queries before the branch see keys ``[0, q]``,
    queries in the branch (``>= hi``) see ``[0, lo)`` and ``[hi, q]``."""
    lo, hi = hidden
    pieces = []
    if q_start < min(q_end, hi):
        end = min(q_end, hi)
        pieces.append((q_start, end, ((0, end),)))
    if q_end > hi and q_end > q_start:
        start = max(q_start, hi)
        pieces.append((start, q_end, ((0, lo), (hi, q_end)) if lo > 0 else ((hi, q_end),)))
    return pieces


def hidden_key_pairs(length: int, hidden: tuple) -> float:
    """Query-key pairs of one segment, causal-halved (Megatron's FLOPs convention ``L^2 / 2``),
    less the pairs a shared-prefix branch does not compute."""
    lo, hi = hidden
    return length * length / 2.0 - max(length - hi, 0) * (hi - lo)


class PositionedRotaryEmbedding(RotaryEmbedding):
    """Megatron's ``RotaryEmbedding`` that, given :class:`SharedPrefixPackedSeqParams`, returns the
    per-token table ``[T, 1, 1, dim]`` at ``rope_positions`` (same inverse frequencies, scaling
    and layout as ``get_emb``); otherwise it is unchanged.

    ``GPTModel`` passes ``get_rotary_seq_len(...)``'s result straight to ``forward``, so the
    positions travel from the one to the other without state."""

    def get_rotary_seq_len(self, inference_context, transformer, transformer_input,
                           transformer_config, packed_seq_params=None, **kwargs):
        positions = getattr(packed_seq_params, "rope_positions", None)
        if positions is not None:
            return positions
        return super().get_rotary_seq_len(inference_context, transformer, transformer_input,
                                          transformer_config, packed_seq_params, **kwargs)

    def forward(self, max_seq_len, *args, **kwargs):
        if isinstance(max_seq_len, torch.Tensor):
            return self.emb_at(max_seq_len)
        return super().forward(max_seq_len, *args, **kwargs)

    def emb_at(self, positions: torch.Tensor) -> torch.Tensor:
        inv_freq = self.inv_freq.to(positions.device)
        seq = positions.to(inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            seq = seq * (1 / self.seq_len_interpolation_factor)
        freqs = torch.outer(seq, inv_freq)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(
                freqs.shape[0], -1)
        return emb[:, None, None, :]


def enable_positioned_rope(model) -> None:
    """Let ``model``'s RoPE take per-token positions (a subclass that only adds a path; the
    module's state is untouched)."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is not None and type(rotary) is RotaryEmbedding:
        rotary.__class__ = PositionedRotaryEmbedding
