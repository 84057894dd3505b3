"""Per-rank bodies of the multi-process layout tests (run through tests/dist_harness.py).

Each builds the tiny model at a layout from the same HF weights, runs a global batch through
Megatron's schedule with the real SoLoPO loss, and checks per-sequence log-prob sums, the loss and
the gradients (or the parameters after one optimizer step) against the single-process HF
reference with written-out formulas (tests/reference.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _setup(hf_dir, tp=1, pp=1, cp=1, vpp=None, distributed_optimizer=False,
           sequence_parallel=None, recompute=None):
    from solopo_mcore.config import ModelConfig, ParallelConfig
    from solopo_mcore.convert.tables import load_hf_tensors_into_chunks
    from solopo_mcore.models.builder import build_model_chunks, build_transformer_config
    from solopo_mcore.models.hf_config import read_hf_config
    from solopo_mcore.models.layout_fit import check_model_fits_layout
    from solopo_mcore.parallel.layout import initialize_parallel
    from solopo_mcore.stack import wrap_ddp
    from transformers import AutoModelForCausalLM

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              context_parallel_size=cp, virtual_pipeline_model_parallel_size=vpp,
                              use_distributed_optimizer=distributed_optimizer,
                              sequence_parallel=sequence_parallel)
    shape = read_hf_config(hf_dir)
    check_model_fits_layout(shape, parallel)
    pg_collection = initialize_parallel(parallel, seed=7)
    model_cfg = ModelConfig(params_dtype="fp32", recompute_granularity=recompute)
    tcfg = build_transformer_config(shape, model_cfg, parallel)
    chunks = build_model_chunks(shape, model_cfg, parallel, pg_collection, tcfg)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = hf.state_dict()
    load_hf_tensors_into_chunks(chunks, lambda n: state[n], shape, pg_collection.tp)
    model = wrap_ddp(chunks, tcfg, parallel, pg_collection)
    return shape, pg_collection, tcfg, model, hf, parallel


def _microbatches(examples, pg_collection, mode, num_microbatches, parallel, equal_lengths=False,
                  require_padding=False, shared_prefix=True):
    from solopo_mcore.data.packing import pack_triplets
    from solopo_mcore.losses.objective import MODE_ROLES
    from solopo_mcore.parallel.layout import sequence_pad_multiple

    dp_size, dp_rank = pg_collection.dp.size(), pg_collection.dp.rank()
    cp_size, cp_rank = pg_collection.cp.size(), pg_collection.cp.rank()
    per_rank = len(examples) // dp_size
    mine = examples[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    per_mb = len(mine) // num_microbatches
    pad = sequence_pad_multiple(parallel)
    packed = [pack_triplets(mine[i * per_mb:(i + 1) * per_mb], MODE_ROLES[mode], pad_multiple=pad,
                            shared_prefix=shared_prefix)
              for i in range(num_microbatches)]
    assert all((p.hidden_keys is not None) == shared_prefix for p in packed)
    if require_padding:
        assert pad > 1 and any(bool((p.cu_seqlens_padded != p.cu_seqlens).any())
                               for p in packed), "no segment needed padding"
    if equal_lengths:
        from solopo_mcore.data.packing import pad_to_length, round_up
        longest = round_up(max(int(p.tokens.shape[1]) for p in packed), pad)
        packed = [pad_to_length(p, longest) for p in packed]
    return [p.for_cp_rank(cp_size, cp_rank) for p in packed]


def _check_segment_sums(segment_logps, S_ref, rel):
    from tests.helpers.hf_reference import assert_close

    worst = 0.0
    for seg in segment_logps:
        expected = S_ref[seg.example_index, seg.role]
        worst = max(worst, assert_close(seg.sums, expected, rel,
                                        "per-sequence response log-prob sums"))
    return worst


def _expected_shard(hf_grads, global_name, shape, tp, tp_rank, param):
    from solopo_mcore.convert.tables import shard_for_param

    return shard_for_param(param, global_name, hf_grads.__getitem__, shape, tp, tp_rank)


def _compare_one(model, shape, pg_collection, hf, algorithm, mode, num_microbatches,
                 num_examples, rel, seed, long, parallel, require_padding=False,
                 report_norm_grads=False, packings=(True,)):
    from solopo_mcore.config import ObjectiveConfig
    from tests.helpers.hf_reference import assert_close, random_examples, reference_loss_and_grads

    objective = ObjectiveConfig(algorithm=algorithm, mode=mode, alpha=1.5, beta=0.5, gamma=0.3,
                                orpo_lambda=0.2, label_smoothing=0.1 if algorithm == "dpo"
                                else 0.0)
    examples = random_examples(num_examples, shape.vocab_size, seed, long=long,
                               with_ref=algorithm == "dpo")
    ref_loss, S_ref, hf_grads = reference_loss_and_grads(hf, examples, objective, mode)
    reports, results = [], []
    for shared in packings:
        report, sums, grads = _compare_packing(model, shape, pg_collection, objective, mode,
                                               examples, num_microbatches, rel, parallel,
                                               require_padding, report_norm_grads, shared,
                                               ref_loss, S_ref, hf_grads)
        reports.append(report)
        results.append((sums, grads))
    if len(results) == 2:  # shared against unshared directly, not only each against transformers
        (sums_a, grads_a), (sums_b, grads_b) = results
        where = f"[{algorithm}/{mode}] shared vs unshared"
        assert sums_a.keys() == sums_b.keys()
        for key in sums_a:
            assert_close(sums_a[key], sums_b[key], rel, f"{where} sum {key}")
        for name in grads_a:
            assert_close(grads_a[name], grads_b[name], rel, f"{where} gradient of {name}")
    return reports


def _compare_packing(model, shape, pg_collection, objective, mode, examples, num_microbatches,
                     rel, parallel, require_padding, report_norm_grads, shared_prefix, ref_loss,
                     S_ref, hf_grads):
    from solopo_mcore.convert.tables import global_param_names
    from solopo_mcore.training.engine import run_global_batch
    from solopo_mcore.training.forward_step import make_forward_step, reduce_metrics
    from tests.helpers.hf_reference import assert_close

    mbs = _microbatches(examples, pg_collection, mode, num_microbatches, parallel,
                        require_padding=require_padding, shared_prefix=shared_prefix)
    segment_logps = []
    forward_step = make_forward_step(objective, mode, pg_collection.cp, segment_logps)
    outputs = run_global_batch(model, forward_step, mbs, pg_collection)
    report = {"rank": dist.get_rank(), "shared_prefix": shared_prefix}
    where = f"[{objective.algorithm}/{mode}/{'shared' if shared_prefix else 'unshared'}]"
    if outputs:  # last pipeline stage
        report["sums_rel_err"] = _check_segment_sums(segment_logps, S_ref, rel)
        metrics = reduce_metrics(outputs, pg_collection.dp)
        report["loss_rel_err"] = assert_close(torch.tensor(metrics["loss/total"]), ref_loss, rel,
                                              f"{where} global-batch mean loss")
    sums = {(int(e), int(r)): v for seg in segment_logps
            for e, r, v in zip(seg.example_index, seg.role, seg.sums)}
    grads = {}
    worst = 0.0
    norm_grads = {}
    for chunk in model:
        names = global_param_names(chunk.module)
        for local, param in chunk.module.named_parameters():
            grads[names[local]] = param.main_grad.detach().clone()
            expected = _expected_shard(hf_grads, names[local], shape, pg_collection.tp.size(),
                                       pg_collection.tp.rank(), param)
            worst = max(worst, assert_close(param.main_grad, expected, rel,
                                            f"{where} gradient of {names[local]}"))
            if "norm" in names[local]:
                # plain lists: tensors would cross the result queue through shared memory that
                # the rank's exit can remove before the parent reads it
                norm_grads[names[local]] = param.main_grad.detach().tolist()
    report["grad_rel_err"] = worst
    if report_norm_grads:
        report.update(norm_grads=norm_grads, tp_rank=pg_collection.tp.rank(),
                      tp_peers=tuple(getattr(pg_collection, name).rank()
                                     for name in ("pp", "cp", "dp")))
    return report, sums, grads


def check_grads(hf_dir, tp=1, pp=1, cp=1, vpp=None, num_microbatches=1, num_examples=4,
                mode="solo", algorithm="orpo", rel=1e-5, seed=0, long=(20, 40),
                sequence_parallel=None, recompute=None, expect_sequence_parallel=None,
                require_padding=False, megatron_activations_equal=False):
    """Sums, loss and gradients of one global batch at a layout equal the reference.

    ``expect_sequence_parallel`` checks the built model's setting (the layout default when the
    config leaves it unset); with it the report carries the norm-weight gradients.
    ``megatron_activations_equal``: the same batch again with ``model.activation_memory=megatron``
    (Megatron's own unfused path on CPU) gives bit-for-bit the gradients of the default lean
    one (models/mlp.py, models/rebuilt_saves.py)."""
    shape, pg_collection, tcfg, model, hf, parallel = _setup(hf_dir, tp, pp, cp, vpp,
                                                   sequence_parallel=sequence_parallel,
                                                   recompute=recompute)
    if expect_sequence_parallel is not None:
        assert tcfg.sequence_parallel == expect_sequence_parallel, tcfg.sequence_parallel
    (report,) = _compare_one(model, shape, pg_collection, hf, algorithm, mode, num_microbatches,
                             num_examples, rel, seed, long, parallel,
                             require_padding=require_padding,
                             report_norm_grads=expect_sequence_parallel is not None)
    if megatron_activations_equal:
        report["megatron_activations_equal"] = _megatron_activations_equal(
            model, shape, pg_collection, hf, algorithm, mode, num_microbatches, num_examples,
            rel, seed, long, parallel, require_padding)
    return report


def _megatron_activations_equal(model, shape, pg_collection, hf, algorithm, mode,
                                num_microbatches, num_examples, rel, seed, long, parallel,
                                require_padding) -> int:
    """Rerun the batch just run (lean) with Megatron's activation path; every gradient shard
    must be bitwise equal. Returns how many were compared."""
    from solopo_mcore.models.builder import set_activation_memory

    lean = {(i, n): p.main_grad.detach().clone() for i, c in enumerate(model)
            for n, p in c.module.named_parameters()}
    modules = [c.module for c in model]
    set_activation_memory(modules, "megatron")
    try:
        _compare_one(model, shape, pg_collection, hf, algorithm, mode, num_microbatches,
                     num_examples, rel, seed, long, parallel, require_padding=require_padding)
    finally:
        set_activation_memory(modules, "lean")
    for i, chunk in enumerate(model):
        for name, param in chunk.module.named_parameters():
            assert torch.equal(param.main_grad, lean[(i, name)]), \
                f"gradient of {name}: lean activations differ from Megatron's " \
                f"(max |diff| {(param.main_grad - lean[(i, name)]).abs().max().item():.3e})"
    return len(lean)


def check_objectives(hf_dir, tp=1, pp=1, cp=1, num_microbatches=1, num_examples=4, rel=1e-5,
                     algorithms=("dpo", "simpo", "orpo"),
                     modes=("solo", "solo_both", "short", "long"), packings=(True, False)):
    """Every algorithm x mode at one layout, with and without shared prefixes, equals the
    written-out single-process reference (separate ``[x, y]`` sequences in transformers)."""
    shape, pg_collection, _, model, hf, parallel = _setup(hf_dir, tp, pp, cp)
    reports = []
    for i, algorithm in enumerate(algorithms):
        for j, mode in enumerate(modes):
            reports.extend(_compare_one(model, shape, pg_collection, hf, algorithm, mode,
                                        num_microbatches, num_examples, rel, seed=10 * i + j,
                                        long=(20, 40), parallel=parallel, packings=packings,
                                        require_padding=cp > 1))
    return reports


def check_optimizer_step(hf_dir, tp=1, pp=1, dp_expected=2, distributed_optimizer=True,
                         num_examples=4, num_microbatches=1, rel=1e-5):
    """One AdamW step through Megatron's (distributed) optimizer equals torch AdamW on HF.

    Compared on the update (after - before). A large eps keeps the first Adam step a smooth
    function of the gradient (with eps << |g| it is lr * sign(g), which hides gradient errors and
    turns fp32 rounding of near-zero gradients into large update differences)."""
    from solopo_mcore.config import ObjectiveConfig, OptimizerConfig
    from solopo_mcore.convert.tables import global_param_names
    from solopo_mcore.training.engine import run_global_batch
    from solopo_mcore.training.forward_step import make_forward_step
    from solopo_mcore.training.optim import build_optimizer
    from tests.helpers.hf_reference import assert_close, random_examples, reference_loss_and_grads

    shape, pg_collection, _, model, hf, parallel = _setup(hf_dir, tp, pp,
                                                distributed_optimizer=distributed_optimizer)
    assert pg_collection.dp.size() == dp_expected, pg_collection.dp.size()
    opt_cfg = OptimizerConfig(lr=1e-2, weight_decay=0.0, clip_grad=0.0, adam_beta2=0.999,
                              adam_eps=0.1)
    optimizer = build_optimizer(model, opt_cfg, parallel, torch.float32, pg_collection)
    objective = ObjectiveConfig(algorithm="simpo", mode="solo", alpha=1.0, beta=2.0)
    examples = random_examples(num_examples, shape.vocab_size, 3)
    _, _, _ = reference_loss_and_grads(hf, examples, objective, "solo")
    before = {k: v.detach().clone() for k, v in hf.named_parameters()}
    ref_opt = torch.optim.AdamW(hf.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=0.1,
                                weight_decay=0.0)
    ref_opt.step()
    hf_params = {k: v.detach() - before[k] for k, v in hf.named_parameters()}
    if shape.tie_word_embeddings:
        hf_params["lm_head.weight"] = hf_params["model.embed_tokens.weight"]

    start = {n: p.detach().clone() for c in model for n, p in c.module.named_parameters()}
    mbs = _microbatches(examples, pg_collection, "solo", num_microbatches, parallel)
    run_global_batch(model, make_forward_step(objective, "solo", pg_collection.cp), mbs,
                     pg_collection)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    ok, _, _ = optimizer.step()
    assert ok, "optimizer step was skipped"
    worst = 0.0
    for chunk in model:
        names = global_param_names(chunk.module)
        for local, param in chunk.module.named_parameters():
            expected = _expected_shard(hf_params, names[local], shape, pg_collection.tp.size(),
                                       pg_collection.tp.rank(), param)
            # atol: the update is a difference of fp32 parameters of magnitude <= ~1.5 (1 ulp
            # there is 1.2e-7)
            worst = max(worst, assert_close(param.detach() - start[local], expected, rel,
                                            f"AdamW update of {names[local]}", atol=2.5e-7))
    return {"rank": dist.get_rank(), "param_rel_err": worst}
