"""Pack triplet examples into one THD microbatch, and cut it for a context-parallel rank.

One microbatch is a single packed sequence of segments, e.g. for SoLoPO
``[x_short+y_w | x_short+y_l | x_long+y_w]`` per example, examples one after another; with shared
prefixes ``[x_short+y_w+x_short[-1]+y_l | x_long+y_w]`` (``models/shared_prefix.py``).
Each segment is padded at its end to ``pad_multiple`` tokens (``2 * CP`` for the zigzag split);
padding is never selected by the loss mask, so it never counts in any sum.

``labels[t]`` is the next token of the same segment and ``loss_mask[t]`` is true where that next
token belongs to the response: the model computes log-probs only there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from solopo_mcore.roles import Role
from solopo_mcore.models.shared_prefix import SharedPrefixPackedSeqParams
from solopo_mcore.parallel.context import split_for_cp_rank


@dataclass
class TripletTokens:
    """One training example as token ids (prompts end where the assistant turn starts)."""

    short_prompt: Sequence[int]
    long_prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]
    index: int = -1
    """Position in the dataset (aligns reference log-probs)."""
    ref_logp_sum: Optional[Sequence[float]] = None
    """Reference log-prob sums per Role (DPO), or None."""

    def segment(self, role: Role) -> tuple[Sequence[int], Sequence[int]]:
        """(prompt, response) token ids of one segment."""
        sequences = (self.short_prompt, self.long_prompt, self.chosen, self.rejected)
        return sequences[Role(role).prompt_sequence], sequences[Role(role).response_sequence]


@dataclass
class PackedMicrobatch:
    """A packed microbatch: global (unsplit) or one CP rank's part of it.

    *Segments* are the THD sequences attention keeps apart (``cu_seqlens``); *responses* are the
    scored answers, one per Role of an example. Without shared prefixes each segment holds one
    response; a shared-prefix segment holds two (``models/shared_prefix.py``)."""

    tokens: torch.Tensor
    """[1, T] input ids."""
    labels: torch.Tensor
    """[1, T] next-token ids within the segment (0 where not used)."""
    loss_mask: torch.Tensor
    """[1, T] bool: the next token is a response token."""
    token_response: torch.Tensor
    """[1, T] response index (0..R-1) of each loss-mask position, -1 elsewhere."""
    cu_seqlens: torch.Tensor
    """[S+1] int32 cumulative real segment lengths (global)."""
    cu_seqlens_padded: torch.Tensor
    """[S+1] int32 cumulative padded segment lengths (global)."""
    max_seqlen: int
    """Longest padded segment."""
    response_example: torch.Tensor
    """[R] example slot (0..E-1) of each response."""
    response_role: torch.Tensor
    """[R] Role of each response."""
    response_num_tokens: torch.Tensor
    """[R] tokens of each response (global, complete)."""
    response_segment: torch.Tensor
    """[R] segment (0..S-1) holding each response."""
    example_index: torch.Tensor
    """[E] dataset index of each example."""
    ref_logp_sum: Optional[torch.Tensor] = None
    """[E, 4] reference log-prob sums per Role, or None."""
    num_real_tokens: int = 0
    """Unpadded tokens in the whole (global) microbatch, for throughput."""
    cp_size: int = 1
    rope_positions: Optional[torch.Tensor] = None
    """[T_global] RoPE position of every global token; None when no segment shares a prefix
    (Megatron's per-segment positions)."""
    hidden_keys: Optional[tuple] = None
    """Per segment ``(lo, hi)``: queries at ``>= hi`` do not see keys ``[lo, hi)`` (segment-
    relative); ``(L, L)`` for an ordinary segment. None when no segment shares a prefix."""

    @property
    def num_examples(self) -> int:
        return int(self.example_index.numel())

    @property
    def num_responses(self) -> int:
        return int(self.response_role.numel())

    @property
    def loss_token_response(self) -> torch.Tensor:
        """[n] response index of each loss-mask position, in order."""
        return self.token_response[self.loss_mask]

    def segment_shapes(self) -> list[tuple[int, int, tuple]]:
        """``(real_length, num_logit_tokens, hidden_keys)`` per segment, for the FLOPs count."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
        padded = (self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]).tolist()
        logits = [0] * len(lengths)
        for segment, n in zip(self.response_segment.tolist(), self.response_num_tokens.tolist()):
            logits[segment] += n
        hidden = self.hidden_keys or tuple((n, n) for n in padded)
        return list(zip(lengths, logits, hidden))

    def to(self, device) -> "PackedMicrobatch":
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return PackedMicrobatch(**moved)

    def packed_seq_params(self, cp_group=None) -> PackedSeqParams:
        common = dict(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=self.cu_seqlens_padded, cu_seqlens_kv_padded=self.cu_seqlens_padded,
            max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen,
            cp_group=cp_group,
        )
        if self.hidden_keys is None:
            return PackedSeqParams(**common)
        return SharedPrefixPackedSeqParams(**common, rope_positions=self.rope_positions,
                                           hidden_keys=self.hidden_keys)

    def for_cp_rank(self, cp_size: int, cp_rank: int) -> "PackedMicrobatch":
        """The zigzag part of this (global) microbatch that ``cp_rank`` computes. (RoPE positions
        and hidden key ranges stay global: Megatron's RoPE and our attention cut them.)"""
        if cp_size == 1:
            return self
        lengths = (self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]).tolist()
        tokens, labels, mask, token_response = (
            split_for_cp_rank(t, lengths, cp_size, cp_rank)
            for t in (self.tokens, self.labels, self.loss_mask, self.token_response))
        return replace(self, tokens=tokens, labels=labels, loss_mask=mask,
                       token_response=token_response, cp_size=cp_size)


def pad_to_length(batch: PackedMicrobatch, length: int, pad_token_id: int = 0
                  ) -> PackedMicrobatch:
    """Append one padding segment so this (global or CP-local) microbatch has ``length`` tokens.

    Gives every microbatch the same shape where a schedule needs it (the interleaved pipeline on
    gloo, see training/engine.py). On a CP-local batch the global segment is ``cp`` times longer;
    its local part is all padding either way. It has no response tokens, so it adds to no sum."""
    extra = length - int(batch.tokens.shape[1])
    if extra < 0:
        raise ValueError(f"microbatch has {batch.tokens.shape[1]} tokens, more than {length}")
    if extra == 0:
        return batch
    extra_global = extra * batch.cp_size
    pad_ids = torch.full((1, extra), pad_token_id, dtype=torch.long)
    shared = {}
    if batch.hidden_keys is not None:
        shared = dict(rope_positions=torch.cat([batch.rope_positions,
                                                torch.arange(extra_global)]),
                      hidden_keys=batch.hidden_keys + ((extra_global, extra_global),))
    return replace(
        batch,
        tokens=torch.cat([batch.tokens, pad_ids], dim=1),
        labels=torch.cat([batch.labels, pad_ids], dim=1),
        loss_mask=torch.cat([batch.loss_mask, torch.zeros((1, extra), dtype=torch.bool)], dim=1),
        token_response=torch.cat([batch.token_response,
                                  torch.full((1, extra), -1, dtype=torch.long)], dim=1),
        cu_seqlens=torch.cat([batch.cu_seqlens, batch.cu_seqlens[-1:] + extra_global]),
        cu_seqlens_padded=torch.cat([batch.cu_seqlens_padded,
                                     batch.cu_seqlens_padded[-1:] + extra_global]),
        max_seqlen=max(batch.max_seqlen, extra_global),
        **shared,
    )


def round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def segment_groups(roles: Sequence[Role], shared_prefix: bool) -> list[tuple[Role, ...]]:
    """The segments that hold ``roles``: with ``shared_prefix``, a chosen and a rejected response
    to the same prompt share one segment (chosen first); every other role has its own."""
    roles = [Role(r) for r in roles]
    if not shared_prefix:
        return [(r,) for r in roles]
    groups: list[tuple[Role, ...]] = []
    for role in roles:
        partner = next((g for g in groups if len(g) == 1
                        and g[0].prompt_sequence == role.prompt_sequence), None)
        if partner is None:
            groups.append((role,))
        else:
            groups[groups.index(partner)] = tuple(sorted(partner + (role,)))
    return groups


class _Packer:
    """Accumulates segments into the flat lists of one microbatch."""

    def __init__(self, pad_multiple: int, pad_token_id: int):
        self.pad_multiple, self.pad_token_id = pad_multiple, pad_token_id
        self.tokens, self.labels, self.mask, self.token_response, self.positions = [], [], [], [], []
        self.cu, self.cu_pad, self.hidden = [0], [0], []
        self.response_example, self.response_role, self.response_num_tokens = [], [], []
        self.response_segment = []

    def _part(self, seq, first_position, num_context, response_id):
        """``seq`` = context tail + response: its tokens, next-token labels (the last one's is
        padding) and loss mask (true where the next token is a response token)."""
        n = len(seq)
        self.tokens.extend(seq)
        self.labels.extend(list(seq[1:]) + [self.pad_token_id])
        is_loss = [num_context - 1 <= t < n - 1 for t in range(n)]
        self.mask.extend(is_loss)
        self.token_response.extend(response_id if m else -1 for m in is_loss)
        self.positions.extend(range(first_position, first_position + n))

    def add_segment(self, slot: int, example: TripletTokens, group: tuple[Role, ...]) -> None:
        segment_id = len(self.hidden)
        start = len(self.tokens)
        prompt, first = example.segment(group[0])
        for role in group:
            if len(example.segment(role)[0]) == 0 or len(example.segment(role)[1]) == 0:
                raise ValueError(f"example {example.index}: {Role(role).name} has an empty "
                                 f"prompt or response")
        for role in group:
            self.response_example.append(slot)
            self.response_role.append(int(role))
            self.response_num_tokens.append(len(example.segment(role)[1]))
            self.response_segment.append(segment_id)
        first_id = len(self.response_role) - len(group)
        self._part(list(prompt) + list(first), 0, len(prompt), first_id)
        if len(group) == 2:
            # the branch: x[-1] again (predicts y_l[0]), then y_l, positions from |x| - 1
            second = example.segment(group[1])[1]
            self._part([prompt[-1]] + list(second), len(prompt) - 1, 1, first_id + 1)
        length = len(self.tokens) - start
        padded = round_up(length, self.pad_multiple)
        pad = padded - length
        self.tokens.extend([self.pad_token_id] * pad)
        self.labels.extend([self.pad_token_id] * pad)
        self.mask.extend([False] * pad)
        self.token_response.extend([-1] * pad)
        self.positions.extend(range(self.positions[-1] + 1, self.positions[-1] + 1 + pad))
        branch = len(prompt) + len(first)
        self.hidden.append((len(prompt) - 1, branch) if len(group) == 2 else (padded, padded))
        self.cu.append(self.cu[-1] + length)
        self.cu_pad.append(self.cu_pad[-1] + padded)


def pack_triplets(examples: Sequence[TripletTokens], roles: Sequence[Role], *,
                  shared_prefix: bool, pad_multiple: int = 1, pad_token_id: int = 0
                  ) -> PackedMicrobatch:
    """Pack ``roles`` responses of every example into one global THD microbatch; with
    ``shared_prefix`` a prompt's chosen and rejected responses share one segment
    (:func:`segment_groups`, ``models/shared_prefix.py``)."""
    groups = segment_groups(roles, shared_prefix)
    packer = _Packer(pad_multiple, pad_token_id)
    for slot, example in enumerate(examples):
        for group in groups:
            packer.add_segment(slot, example, group)
    ref = None
    if examples and all(ex.ref_logp_sum is not None for ex in examples):
        ref = torch.tensor([list(ex.ref_logp_sum) for ex in examples], dtype=torch.float32)
    lengths = [b - a for a, b in zip(packer.cu_pad[:-1], packer.cu_pad[1:])]
    any_shared = any(len(g) == 2 for g in groups)
    return PackedMicrobatch(
        tokens=torch.tensor([packer.tokens], dtype=torch.long),
        labels=torch.tensor([packer.labels], dtype=torch.long),
        loss_mask=torch.tensor([packer.mask], dtype=torch.bool),
        token_response=torch.tensor([packer.token_response], dtype=torch.long),
        cu_seqlens=torch.tensor(packer.cu, dtype=torch.int32),
        cu_seqlens_padded=torch.tensor(packer.cu_pad, dtype=torch.int32),
        max_seqlen=max(lengths),
        response_example=torch.tensor(packer.response_example, dtype=torch.long),
        response_role=torch.tensor(packer.response_role, dtype=torch.long),
        response_num_tokens=torch.tensor(packer.response_num_tokens, dtype=torch.long),
        response_segment=torch.tensor(packer.response_segment, dtype=torch.long),
        example_index=torch.tensor([ex.index for ex in examples], dtype=torch.long),
        ref_logp_sum=ref,
        num_real_tokens=packer.cu[-1],
        rope_positions=torch.tensor(packer.positions, dtype=torch.long) if any_shared else None,
        hidden_keys=tuple(packer.hidden) if any_shared else None,
    )
