"""Single-process checks of the pure index maths that the multi-process tests rely on: the zigzag
CP split and its inverse, packing offsets and masks, and the converter's TP shard slicing. Each
expectation is written out independently of the code under test."""

import random

import pytest
import torch

from solopo_mcore.convert.tables import (TABLE, GatedMLP, InterleavedQKV, Replicated, RowParallel,
                                         VocabParallel, expected_hf_names)
from solopo_mcore.data.packing import TripletTokens, pack_triplets
from solopo_mcore.roles import Role
from solopo_mcore.models.hf_config import ModelShape, padded_vocab_size, shape_from_dict
from solopo_mcore.parallel.context import (gathered_to_global_index, split_for_cp_rank,
                                           zigzag_local_index)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_split_gives_each_rank_chunks_r_and_mirror(cp):
    rng = random.Random(cp)
    lengths = [2 * cp * rng.randint(1, 5) for _ in range(4)]
    covered = []
    for rank in range(cp):
        got = zigzag_local_index(lengths, cp, rank).tolist()
        expected, start = [], 0
        for length in lengths:
            chunk = length // (2 * cp)
            expected += list(range(start + rank * chunk, start + (rank + 1) * chunk))
            mirror = 2 * cp - 1 - rank
            expected += list(range(start + mirror * chunk, start + (mirror + 1) * chunk))
            start += length
        assert got == expected
        covered += got
    assert sorted(covered) == list(range(sum(lengths)))  # a partition of the packed sequence


def test_zigzag_refuses_unpadded_segment():
    with pytest.raises(ValueError, match="multiple of 2\\*cp=4"):
        zigzag_local_index([6], 2, 0)


@pytest.mark.parametrize("cp", [2, 3])
def test_gathered_to_global_inverts_the_split(cp):
    lengths = [2 * cp * n for n in (3, 1, 2)]
    full = torch.arange(sum(lengths)) * 10 + 7
    locals_ = [split_for_cp_rank(full, lengths, cp, r) for r in range(cp)]
    gathered = torch.cat(locals_)  # what an all-gather over the CP group returns
    local_lengths = [n // cp for n in lengths]
    order = gathered_to_global_index(local_lengths, cp, torch.device("cpu"))
    assert torch.equal(gathered[order], full)


def test_packing_offsets_labels_and_response_mask():
    ex = TripletTokens(short_prompt=[1, 2], long_prompt=[3, 4, 5], chosen=[6, 7], rejected=[8],
                       index=11)
    roles = [Role.SHORT_CHOSEN, Role.SHORT_REJECTED, Role.LONG_CHOSEN]
    mb = pack_triplets([ex], roles, pad_multiple=4, pad_token_id=0, shared_prefix=False)
    # segments: [1 2 6 7] (4), [1 2 8] -> padded 4, [3 4 5 6 7] -> padded 8
    assert mb.cu_seqlens.tolist() == [0, 4, 7, 12]
    assert mb.cu_seqlens_padded.tolist() == [0, 4, 8, 16]
    assert mb.tokens.tolist() == [[1, 2, 6, 7, 1, 2, 8, 0, 3, 4, 5, 6, 7, 0, 0, 0]]
    # a position is selected when its NEXT token is a response token of the same segment
    selected = mb.loss_mask[0].nonzero().flatten().tolist()
    assert selected == [1, 2, 5, 10, 11]
    assert mb.labels[0, selected].tolist() == [6, 7, 8, 6, 7]
    assert mb.loss_token_response.tolist() == [0, 0, 1, 2, 2]
    assert mb.response_num_tokens.tolist() == [2, 1, 2]
    assert mb.num_real_tokens == 12 and mb.max_seqlen == 8


def test_shared_prefix_packing_layout_positions_and_hidden_keys():
    ex = TripletTokens(short_prompt=[1, 2, 3], long_prompt=[4, 5], chosen=[6, 7], rejected=[8, 9],
                       index=11)
    roles = [Role.SHORT_CHOSEN, Role.SHORT_REJECTED, Role.LONG_CHOSEN]
    mb = pack_triplets([ex], roles, pad_multiple=4, pad_token_id=0, shared_prefix=True)
    # [x_s, y_w, x_s[-1], y_l] = [1 2 3 6 7 | 3 8 9] (8), [x_l, y_w] = [4 5 6 7] (4)
    assert mb.tokens.tolist() == [[1, 2, 3, 6, 7, 3, 8, 9, 4, 5, 6, 7]]
    assert mb.cu_seqlens.tolist() == [0, 8, 12] and mb.cu_seqlens_padded.tolist() == [0, 8, 12]
    # the branch restarts at |x| - 1 = 2: y_l sits at the positions y_w has
    assert mb.rope_positions.tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 0, 1, 2, 3]
    # branch queries (>= 5) do not see keys [2, 5): x's last token and y_w
    assert mb.hidden_keys == ((2, 5), (4, 4))
    selected = mb.loss_mask[0].nonzero().flatten().tolist()
    assert selected == [2, 3, 5, 6, 9, 10]
    assert mb.labels[0, selected].tolist() == [6, 7, 8, 9, 6, 7]
    assert mb.loss_token_response.tolist() == [0, 0, 1, 1, 2, 2]
    assert mb.response_role.tolist() == [0, 1, 2] and mb.response_segment.tolist() == [0, 0, 1]
    assert mb.segment_shapes() == [(8, 4, (2, 5)), (4, 2, (4, 4))]
    assert mb.num_real_tokens == 12


@pytest.mark.parametrize("vocab,divisible,tp,expected", [
    (1000, 128, 1, 1024), (1000, 128, 2, 1024), (1000, 128, 4, 1024), (1025, 128, 2, 1280),
    (151665, 128, 1, 151680), (152064, 128, 4, 152064), (128256, 128, 8, 129024)])
def test_padded_vocab_size(vocab, divisible, tp, expected):
    assert padded_vocab_size(vocab, divisible, tp) == expected


def _shape(**over) -> ModelShape:
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 24,
           "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 6,
           "num_key_value_heads": 2, "vocab_size": 50, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 64, "rope_theta": 10000.0, "tie_word_embeddings": True}
    cfg.update(over)
    return shape_from_dict(cfg)


@pytest.mark.parametrize("tp", [1, 2])
def test_qkv_shard_holds_whole_kv_groups_in_megatron_order(tp):
    shape = _shape()  # 6 query heads, 2 KV groups, head dim 4
    d, g, per = shape.kv_channels, shape.num_query_groups, 3
    q = torch.arange(6 * d * 24, dtype=torch.float32).reshape(6 * d, 24)
    k = -torch.arange(2 * d * 24, dtype=torch.float32).reshape(2 * d, 24) - 1
    v = k - 1000
    mapping = InterleavedQKV()
    shards = [mapping.to_shard([q, k, v], shape, tp, r, 0) for r in range(tp)]
    for rank, shard in enumerate(shards):
        expected = []
        for group in range(rank * g // tp, (rank + 1) * g // tp):
            expected += [q[(group * per + h) * d:(group * per + h + 1) * d] for h in range(per)]
            expected += [k[group * d:(group + 1) * d], v[group * d:(group + 1) * d]]
        assert torch.equal(shard, torch.cat(expected))
    back = mapping.from_shards(shards, shape)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_mapping_round_trips_and_slices_as_written(tp):
    shape = _shape()
    w = torch.randn(40, 24)
    gate, up = torch.randn(40, 24), torch.randn(40, 24)
    emb = torch.randn(50, 24)
    padded = padded_vocab_size(50, 16, tp)
    cases = [
        (Replicated(), [w], [w] * tp),
        (RowParallel(), [w], [w[:, r * 24 // tp:(r + 1) * 24 // tp] for r in range(tp)]),
        (GatedMLP(), [gate, up], [torch.cat([gate[r * 40 // tp:(r + 1) * 40 // tp],
                                             up[r * 40 // tp:(r + 1) * 40 // tp]])
                                  for r in range(tp)]),
    ]
    padded_emb = torch.cat([emb, torch.zeros(padded - 50, 24)])
    cases.append((VocabParallel(), [emb], [padded_emb[r * padded // tp:(r + 1) * padded // tp]
                                           for r in range(tp)]))
    for mapping, tensors, expected in cases:
        shards = [mapping.to_shard(tensors, shape, tp, r, padded) for r in range(tp)]
        for got, want in zip(shards, expected):
            assert torch.equal(got, want), type(mapping).__name__
        back = mapping.from_shards(shards, shape)
        assert all(torch.equal(a, b) for a, b in zip(back, tensors)), type(mapping).__name__


def test_expected_names_follow_tied_head_and_optional_bias():
    tied = expected_hf_names(_shape())
    assert "lm_head.weight" not in tied and "model.embed_tokens.weight" in tied
    assert "model.layers.1.self_attn.q_proj.bias" in tied
    untied = expected_hf_names(_shape(tie_word_embeddings=False,
                                      architectures=["LlamaForCausalLM"], model_type="llama"))
    assert "lm_head.weight" in untied
    assert not any(name.endswith("proj.bias") for name in untied)
    per_layer = sum(len(r.hf) for r in TABLE if "{i}" in r.local)
    assert len(tied) == 2 * per_layer + 2  # 2 layers + embedding + final norm
