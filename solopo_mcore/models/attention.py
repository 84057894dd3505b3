"""Torch-native core attention for the local layer spec: SDPA, GQA, packed THD, context parallel.

It plugs into ``spec.submodules.self_attention.submodules.core_attention`` and receives what
Megatron's ``Attention`` gives a core attention: ``[s, b, h, d]`` tensors, or ``[t, h, d]`` with
``packed_seq_params.qkv_format == "thd"`` (RoPE already applied per segment from ``cu_seqlens``).

* Packed segments never attend to each other: SDPA runs once per segment, causally. A
  shared-prefix segment (``models/shared_prefix.py``) runs as two lower-right causal blocks: its
  first answer over ``[x, y_w]``, its branch over ``[x[:-1]]`` + its own keys.
* Context parallelism: K/V are all-gathered over the CP group (cheap with GQA's few KV heads) and
  each local zigzag chunk attends to the global prefix it needs, with a lower-right causal mask.
* Backend: cuDNN > flash > efficient > math on CUDA (not yet measured by this repo; the GPU run
  in benchmarks/device_run.sh reports it); on CPU torch's flash kernel, then math (measured
  faster, with less memory, in benchmarks/RESULTS.md), unless ``ModelConfig.attention_backend``
  names one (``platform.sdpa_backend_order``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention import sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from solopo_mcore.models.rebuilt_saves import rebuild_in_backward
from solopo_mcore.models.shared_prefix import query_key_ranges
from solopo_mcore.parallel.context import all_gather_first_dim, gathered_to_global_index
from solopo_mcore.platform import sdpa_backend_order


def _to_tokens_major(*outs: torch.Tensor) -> torch.Tensor:
    """The SDPA outputs ``[h, t_i, d]`` of a microbatch's segments as ``[t, h * d]`` (one copy)."""
    heads, _, dim = outs[0].shape
    out = outs[0].new_empty((sum(o.shape[1] for o in outs), heads, dim))
    start = 0
    for o in outs:
        out[start:start + o.shape[1]].copy_(o.transpose(0, 1))
        start += o.shape[1]
    return out.view(out.shape[0], heads * dim)


class TorchCoreAttention(MegatronModule):
    """Causal self-attention core built on ``F.scaled_dot_product_attention``."""

    #: set by the model builder from ``ModelConfig.attention_backend``
    backend_name: str = "auto"
    #: whether backward rebuilds the packed output from the SDPA outputs instead of linear_proj
    #: keeping it (set per instance by ``models.builder.set_activation_memory``)
    rebuild_output: bool = True

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"TorchCoreAttention supports causal masks only, got {attn_mask_type}")
        tp_size = config.tensor_model_parallel_size
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_heads = (config.num_query_groups or config.num_attention_heads) // tp_size
        self.head_dim = config.kv_channels
        # config.softmax_scale carries YaRN's attention factor (models/rope.py)
        self.softmax_scale = softmax_scale or config.softmax_scale or \
            1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_group = pg_collection.cp if pg_collection is not None else None
        self.cp_size = config.context_parallel_size

    # -- one causal SDPA call: q [hq, sq, d], k/v [hk, sk, d], queries are the LAST sq keys ----
    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sq, sk = q.shape[-2], k.shape[-2]
        if self.num_heads != self.num_kv_heads:
            # GQA: a view-expanded K/V works with every backend (enable_gqa does not, e.g. cuDNN).
            rep = self.num_heads // self.num_kv_heads
            k = k[:, None].expand(-1, rep, -1, -1).reshape(self.num_heads, sk, -1)
            v = v[:, None].expand(-1, rep, -1, -1).reshape(self.num_heads, sk, -1)
        dropout = self.dropout_p if self.training else 0.0
        kwargs = dict(dropout_p=dropout, scale=self.softmax_scale)
        if sq == sk:
            kwargs["is_causal"] = True
        else:
            kwargs["attn_mask"] = causal_lower_right(sq, sk)
        return F.scaled_dot_product_attention(q[None], k[None], v[None], **kwargs)[0]

    def _backend_scope(self, device: torch.device):
        order = sdpa_backend_order(self.backend_name, device)
        try:
            return sdpa_kernel(order, set_priority=True)
        except TypeError:  # torch without set_priority
            return sdpa_kernel(order)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("TorchCoreAttention does not take an attention bias")
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if self.training and self.dropout_p > 0 else contextlib.nullcontext())
        with rng, self._backend_scope(query.device):
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                return self._forward_thd(query, key, value, packed_seq_params)
            return self._forward_sbhd(query, key, value)

    def _forward_sbhd(self, query, key, value):
        if self.cp_size > 1:
            raise ValueError("context parallelism needs packed (THD) input; use the triplet packer")
        s, b = query.shape[:2]
        q = query.permute(1, 2, 0, 3)  # [b, h, s, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        out = torch.stack([self._sdpa(q[i], k[i], v[i]) for i in range(b)])  # [b, h, s, d]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _forward_thd(self, query, key, value, params):
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None \
            else params.cu_seqlens_q
        global_lens = (cu[1:] - cu[:-1]).tolist()
        hidden = getattr(params, "hidden_keys", None) or [(n, n) for n in global_lens]
        cp = self.cp_size
        local_lens = [n // cp for n in global_lens]
        q_all = query.transpose(0, 1)  # [h, t, d]
        if cp == 1:
            k_all, v_all = key.transpose(0, 1), value.transpose(0, 1)
        else:
            order = gathered_to_global_index(local_lens, cp, key.device)
            k_all = all_gather_first_dim(key, self.cp_group).index_select(0, order).transpose(0, 1)
            v_all = all_gather_first_dim(value, self.cp_group).index_select(0, order).transpose(0, 1)
        cp_rank = self.cp_group.rank() if cp > 1 else 0
        outs = []
        q_start = k_start = 0
        for local_len, global_len, seg_hidden in zip(local_lens, global_lens, hidden):
            k_seg = k_all[:, k_start:k_start + global_len]
            v_seg = v_all[:, k_start:k_start + global_len]
            # the global query ranges this rank holds: all of it, or zigzag chunks r, 2cp-1-r
            chunk = global_len // (2 * cp)
            ranges = [(0, global_len)] if cp == 1 else \
                [(j * chunk, (j + 1) * chunk) for j in (cp_rank, 2 * cp - 1 - cp_rank)]
            local = q_start
            for start, end in ranges:
                for q_lo, q_hi, key_ranges in query_key_ranges(start, end, seg_hidden):
                    q = q_all[:, local + q_lo - start:local + q_hi - start]
                    if len(key_ranges) == 1:
                        (k_lo, k_hi), = key_ranges
                        k, v = k_seg[:, k_lo:k_hi], v_seg[:, k_lo:k_hi]
                    else:  # a shared-prefix branch: the prefix, then the branch's own keys
                        k = torch.cat([k_seg[:, a:b] for a, b in key_ranges], dim=1)
                        v = torch.cat([v_seg[:, a:b] for a, b in key_ranges], dim=1)
                    outs.append(self._sdpa(q, k, v))
                local += end - start
            q_start += local_len
            k_start += global_len
        out = _to_tokens_major(*outs)
        if self.rebuild_output:  # linear_proj keeps it; SDPA keeps the outs (rebuilt_saves.py)
            rebuild_in_backward(out, _to_tokens_major, *outs)
        return out
