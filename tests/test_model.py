"""The Megatron model built from an HF config against transformers, in one process.

* logits equal transformers' for Qwen2 (tied and untied, QKV bias) and Llama 3.1 (rope scaling);
* response-only log-probs equal log_softmax of the HF logits at the response positions;
* a packed THD microbatch [a | b | c] equals running a, b and c separately (values and grads),
  also with shared-prefix segments [x, y_w, x[-1], y_l], whose answers never see each other;
* the torch core attention equals Megatron's local DotProductAttention on unpacked input.
"""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from solopo_mcore.config import ModelConfig, ParallelConfig
from solopo_mcore.convert.tables import load_hf_tensors_into_chunks
from solopo_mcore.data.packing import pack_triplets
from solopo_mcore.roles import Role
from solopo_mcore.losses.objective import MODE_ROLES
from solopo_mcore.models.builder import build_model_chunks, build_transformer_config
from solopo_mcore.models.hf_config import read_hf_config
from solopo_mcore.parallel.layout import initialize_parallel
from tests.helpers.hf_reference import assert_close, random_examples


@pytest.fixture(scope="module")
def groups():
    return initialize_parallel(ParallelConfig(), seed=5)


def _load(hf_dir, groups, layer_spec="local"):
    shape = read_hf_config(hf_dir)
    cfg = ModelConfig(params_dtype="fp32", layer_spec=layer_spec)
    model = build_model_chunks(shape, cfg, ParallelConfig(), groups)[0]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = hf.state_dict()
    load_hf_tensors_into_chunks([model], lambda n: state[n], shape, groups.tp)
    return shape, model, hf


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_qwen2_untied", "tiny_llama"])
def test_logits_match_transformers(fixture, groups, request):
    shape, model, hf = _load(request.getfixturevalue(fixture), groups)
    ids = torch.randint(0, shape.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids, None, None)[..., :shape.vocab_size]
        ref = hf(ids).logits
    assert_close(ours, ref, 1e-4, f"{fixture} logits")


def test_response_logprobs_equal_hf_log_softmax(tiny_llama, groups):
    shape, model, hf = _load(tiny_llama, groups)
    ids = torch.randint(0, shape.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, dims=1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 40:63] = True
    with torch.no_grad():
        ours = model(ids, None, None, labels=labels, loss_mask=mask)
        logp = torch.log_softmax(hf(ids).logits.float(), dim=-1)
    ref = logp.gather(-1, labels[..., None])[..., 0][mask]
    assert ours.shape == (23,)
    assert_close(ours, ref, 1e-5, "response log-probs")


def _separate_sums(model, example, roles):
    """Each role's ``[prompt, response]`` run alone: response log-prob sums, ``[len(roles)]``."""
    separate = []
    for role in roles:
        prompt, response = example.segment(role)
        seq = torch.tensor([list(prompt) + list(response)])
        labels = torch.roll(seq, -1, dims=1)
        mask = torch.zeros_like(seq, dtype=torch.bool)
        mask[0, len(prompt) - 1:seq.shape[1] - 1] = True
        separate.append(model(seq, None, None, labels=labels, loss_mask=mask).sum())
    return torch.stack(separate)


def _packed_sums(model, packed, groups):
    out = model(packed.tokens, None, None, labels=packed.labels, loss_mask=packed.loss_mask,
                packed_seq_params=packed.packed_seq_params(groups.cp))
    return torch.zeros(packed.num_responses).index_add(0, packed.loss_token_response, out)


@pytest.mark.parametrize("shared_prefix", [False, True], ids=["unshared", "shared"])
@pytest.mark.parametrize("mode", ["solo", "solo_both", "long"])
def test_packed_segments_equal_separate_runs(mode, shared_prefix, tiny_llama, groups):
    """Two examples packed (with shared prefixes: ``[x, y_w, x[-1], y_l]`` segments) give each
    response the log-prob sum, and the parameters the gradient, of running ``[x, y]`` alone.
    Llama 3.1 (RoPE scaling) and odd padding: positions must come from the packer's table."""
    shape, model, _ = _load(tiny_llama, groups)
    examples = random_examples(2, shape.vocab_size, seed=3)
    roles = MODE_ROLES[mode]
    packed = pack_triplets(examples, roles, pad_multiple=3, shared_prefix=shared_prefix)
    assert (packed.hidden_keys is not None) == shared_prefix
    weights = torch.linspace(-2.0, 1.5, packed.num_responses)
    params = list(model.parameters())

    model.zero_grad()
    sums = _packed_sums(model, packed, groups)
    (sums * weights).sum().backward()
    packed_grads = [p.grad.clone() for p in params]

    model.zero_grad()
    order = [(slot, Role(role)) for slot, role in zip(packed.response_example.tolist(),
                                                      packed.response_role.tolist())]
    separate = torch.cat([_separate_sums(model, examples[slot], [role]) for slot, role in order])
    (separate * weights).sum().backward()
    assert_close(sums.detach(), separate.detach(), 1e-5, "packed vs separate sums")
    for p, g in zip(params, packed_grads):
        assert_close(g, p.grad, 1e-5, "packed vs separate grads")


def test_shared_prefix_answers_do_not_see_each_other(tiny_qwen2, groups):
    """In a shared-prefix segment, changing y_w's tokens (and length) leaves y_l's per-token
    log-probs unchanged, and changing y_l's leaves y_w's unchanged; changing the context
    changes both (the check can fail)."""
    shape, model, _ = _load(tiny_qwen2, groups)
    (example,) = random_examples(1, shape.vocab_size, seed=9)
    roles = MODE_ROLES["short"]

    def per_response(ex):
        packed = pack_triplets([ex], roles, shared_prefix=True)
        with torch.no_grad():
            out = model(packed.tokens, None, None, labels=packed.labels,
                        loss_mask=packed.loss_mask, packed_seq_params=packed.packed_seq_params(
                            groups.cp))
        return [out[packed.loss_token_response == r] for r in range(2)]

    def max_diff(a, b):
        return float((a - b).abs().max())

    # Other y_w lengths move y_l within the packed tensor, so the SDPA kernel may block its keys
    # differently: float rounding (~1e-7 here), not bit identity, is what no leak leaves; one
    # changed visible token moves these log-probs by orders of magnitude more (checked below).
    noise = 1e-5
    base_w, base_l = per_response(example)
    other = [(t * 7 + 3) % shape.vocab_size for t in example.chosen] + [5, 6, 7]
    _, new_l = per_response(replace(example, chosen=other))
    assert max_diff(new_l, base_l) <= noise, "y_l's log-probs changed with y_w's tokens"
    new_w, _ = per_response(replace(example, rejected=list(reversed(example.rejected[:-2]))))
    assert max_diff(new_w, base_w) <= noise, "y_w's log-probs changed with y_l's tokens"
    context = list(example.short_prompt)
    context[len(context) // 2] = (context[len(context) // 2] + 1) % shape.vocab_size
    ctx_w, ctx_l = per_response(replace(example, short_prompt=context))
    assert min(max_diff(ctx_w, base_w), max_diff(ctx_l, base_l)) > 100 * noise


def test_torch_attention_equals_local_dot_product_attention(tiny_qwen2, groups):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    shape, ours, _ = _load(tiny_qwen2, groups)
    _, theirs, _ = _load(tiny_qwen2, groups)
    assert type(theirs.decoder.layers[0].self_attention.core_attention).__name__ == \
        "TorchCoreAttention"
    # Rebuild the reference with Megatron's own core attention from the stock local spec.
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    assert spec.submodules.self_attention.submodules.core_attention is DotProductAttention
    config = build_transformer_config(shape, ModelConfig(params_dtype="fp32"), ParallelConfig())
    for layer in theirs.decoder.layers:
        layer.self_attention.core_attention = DotProductAttention(
            config=config, layer_number=layer.layer_number,
            attn_mask_type=layer.self_attention.attn_mask_type, attention_type="self")
    ids = torch.randint(0, shape.vocab_size, (2, 50), generator=torch.Generator().manual_seed(2))
    causal = torch.triu(torch.ones(50, 50, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        a = ours(ids, None, None)
        b = theirs(ids, None, causal)
    assert_close(a, b, 1e-5, "torch SDPA vs local DotProductAttention logits")


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_activation_recompute_gives_the_same_gradients(granularity, tiny_qwen2, groups):
    shape = read_hf_config(tiny_qwen2)
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    state = hf.state_dict()
    grads = []
    for recompute in (None, granularity):
        cfg = ModelConfig(params_dtype="fp32", recompute_granularity=recompute)
        tcfg = build_transformer_config(shape, cfg, ParallelConfig())
        model = build_model_chunks(shape, cfg, ParallelConfig(), groups, tcfg)[0]
        load_hf_tensors_into_chunks([model], lambda n: state[n], shape, groups.tp)
        ids = torch.randint(0, shape.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, 20:39] = True
        model(ids, None, None, labels=torch.roll(ids, -1, 1), loss_mask=mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert tcfg.recompute_granularity == granularity
    for a, b in zip(*grads):
        assert_close(b, a, 1e-6, f"{granularity} recompute gradient")


def _norm(dtype, sequence_parallel=True):
    from types import SimpleNamespace

    from solopo_mcore.models.norm import SequenceParallelRMSNorm
    cfg = SimpleNamespace(normalization="RMSNorm", layernorm_zero_centered_gamma=False,
                          params_dtype=dtype, use_cpu_initialization=True,
                          sequence_parallel=sequence_parallel)
    norm = SequenceParallelRMSNorm(cfg, 24, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    return norm


def test_rmsnorm_gradients_are_exact_in_float64():
    """The hand-written backward equals finite differences (float64 is computed in float64)."""
    from solopo_mcore.models.norm import _RMSNormFunction
    norm = _norm(torch.float64)
    x = (3 * torch.randn(4, 2, 24, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormFunction.apply(a, w, 1e-6, None),
                                    (x, norm.weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_transformers_and_keeps_only_input_and_inverse_rms(dtype):
    """Values and gradients equal transformers' Qwen2RMSNorm (float32 maths, cast, then scale);
    backward keeps the input in its own dtype and one float32 inverse RMS per token, nothing
    of hidden size in float32; the weight is marked for the sequence-parallel TP all-reduce."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    norm = _norm(dtype)
    assert norm.weight.sequence_parallel is True
    assert _norm(dtype, sequence_parallel=False).weight.sequence_parallel is False
    hf = Qwen2RMSNorm(24, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(norm.weight)
    x = 3 * torch.randn(5, 2, 24, dtype=dtype)
    grad = torch.randn(5, 2, 24, dtype=dtype)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y_ours = norm(x_ours)
    y_hf = hf(x_hf)
    (y_ours * grad).sum().backward()
    (y_hf * grad).sum().backward()
    rel = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close(y_ours, y_hf, rel, "RMSNorm output")
    assert_close(x_ours.grad, x_hf.grad, rel, "RMSNorm input gradient")
    assert_close(norm.weight.grad, hf.weight.grad, rel, "RMSNorm weight gradient")
    assert sorted((tuple(t.shape), t.dtype) for t in saved if t is not norm.weight) == \
        sorted([((5, 2, 24), dtype), ((5, 2, 1), torch.float32)])


def test_lean_swiglu_gradients_are_exact_in_float64():
    """LeanMLP's SwiGLU backward (models/mlp.py: in place, into the two halves of one tensor)
    equals finite differences of silu(a) * b."""
    from solopo_mcore.models.mlp import SwiGLUFunction
    fc1_out = torch.randn(3, 2, 2 * 10, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (fc1_out,))
