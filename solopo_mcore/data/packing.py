"""Pack triplet examples into one THD microbatch, and cut it for a context-parallel rank.

One microbatch is a single packed sequence of segments, e.g. for SoLoPO
``[x_short+y_w | x_short+y_l | x_long+y_w]`` per example, examples one after another.
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

from solopo_mcore.data.schema import Role
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
    """A packed microbatch: global (unsplit) or one CP rank's part of it."""

    tokens: torch.Tensor
    """[1, T] input ids."""
    labels: torch.Tensor
    """[1, T] next-token ids within the segment (0 where not used)."""
    loss_mask: torch.Tensor
    """[1, T] bool: the next token is a response token."""
    response_segment: torch.Tensor
    """[n] segment index of each loss-mask position, in order."""
    cu_seqlens: torch.Tensor
    """[S+1] int32 cumulative real segment lengths (global)."""
    cu_seqlens_padded: torch.Tensor
    """[S+1] int32 cumulative padded segment lengths (global)."""
    max_seqlen: int
    """Longest padded segment."""
    segment_example: torch.Tensor
    """[S] example slot (0..E-1) of each segment."""
    segment_role: torch.Tensor
    """[S] Role of each segment."""
    segment_num_tokens: torch.Tensor
    """[S] response tokens per segment (global, complete)."""
    example_index: torch.Tensor
    """[E] dataset index of each example."""
    ref_logp_sum: Optional[torch.Tensor] = None
    """[E, 4] reference log-prob sums per Role, or None."""
    num_real_tokens: int = 0
    """Unpadded tokens in the whole (global) microbatch, for throughput."""
    cp_size: int = 1

    @property
    def num_examples(self) -> int:
        return int(self.example_index.numel())

    def to(self, device) -> "PackedMicrobatch":
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return PackedMicrobatch(**moved)

    def packed_seq_params(self, cp_group=None) -> PackedSeqParams:
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=self.cu_seqlens_padded, cu_seqlens_kv_padded=self.cu_seqlens_padded,
            max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen,
            cp_group=cp_group,
        )

    def for_cp_rank(self, cp_size: int, cp_rank: int) -> "PackedMicrobatch":
        """The zigzag part of this (global) microbatch that ``cp_rank`` computes."""
        if cp_size == 1:
            return self
        lengths = (self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]).tolist()
        tokens, labels, mask = (split_for_cp_rank(t, lengths, cp_size, cp_rank)
                                for t in (self.tokens, self.labels, self.loss_mask))
        segment_of_token = torch.repeat_interleave(
            torch.arange(len(lengths)), torch.as_tensor(lengths)).unsqueeze(0)
        local_segment = split_for_cp_rank(segment_of_token, lengths, cp_size, cp_rank)
        return replace(self, tokens=tokens, labels=labels, loss_mask=mask,
                       response_segment=local_segment[mask], cp_size=cp_size)


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
    return replace(
        batch,
        tokens=torch.cat([batch.tokens, pad_ids], dim=1),
        labels=torch.cat([batch.labels, pad_ids], dim=1),
        loss_mask=torch.cat([batch.loss_mask, torch.zeros((1, extra), dtype=torch.bool)], dim=1),
        cu_seqlens=torch.cat([batch.cu_seqlens, batch.cu_seqlens[-1:] + extra_global]),
        cu_seqlens_padded=torch.cat([batch.cu_seqlens_padded,
                                     batch.cu_seqlens_padded[-1:] + extra_global]),
        max_seqlen=max(batch.max_seqlen, extra_global),
    )


def round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def pack_triplets(examples: Sequence[TripletTokens], roles: Sequence[Role],
                  pad_multiple: int = 1, pad_token_id: int = 0) -> PackedMicrobatch:
    """Pack ``roles`` segments of every example into one global THD microbatch."""
    tokens, labels, mask, resp_seg = [], [], [], []
    cu, cu_pad = [0], [0]
    seg_example, seg_role, seg_ntok = [], [], []
    for slot, ex in enumerate(examples):
        for role in roles:
            prompt, response = ex.segment(role)
            if len(prompt) == 0 or len(response) == 0:
                raise ValueError(f"example {ex.index}: {Role(role).name} has an empty prompt or "
                                 f"response")
            seq = list(prompt) + list(response)
            length = len(seq)
            padded = round_up(length, pad_multiple)
            segment_id = len(seg_role)
            seg_labels = seq[1:] + [pad_token_id] * (padded - length + 1)
            seg_mask = [False] * (len(prompt) - 1) + [True] * len(response) + \
                [False] * (padded - length + 1)
            tokens.extend(seq + [pad_token_id] * (padded - length))
            labels.extend(seg_labels)
            mask.extend(seg_mask)
            resp_seg.extend([segment_id] * len(response))
            cu.append(cu[-1] + length)
            cu_pad.append(cu_pad[-1] + padded)
            seg_example.append(slot)
            seg_role.append(int(role))
            seg_ntok.append(len(response))
    ref = None
    if examples and all(ex.ref_logp_sum is not None for ex in examples):
        ref = torch.tensor([list(ex.ref_logp_sum) for ex in examples], dtype=torch.float32)
    lengths = [b - a for a, b in zip(cu_pad[:-1], cu_pad[1:])]
    return PackedMicrobatch(
        tokens=torch.tensor([tokens], dtype=torch.long),
        labels=torch.tensor([labels], dtype=torch.long),
        loss_mask=torch.tensor([mask], dtype=torch.bool),
        response_segment=torch.tensor(resp_seg, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        cu_seqlens_padded=torch.tensor(cu_pad, dtype=torch.int32),
        max_seqlen=max(lengths),
        segment_example=torch.tensor(seg_example, dtype=torch.long),
        segment_role=torch.tensor(seg_role, dtype=torch.long),
        segment_num_tokens=torch.tensor(seg_ntok, dtype=torch.long),
        example_index=torch.tensor([ex.index for ex in examples], dtype=torch.long),
        ref_logp_sum=ref,
        num_real_tokens=cu[-1],
    )
