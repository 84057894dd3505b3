"""Launched-rank side of tests/test_activation_memory.py (one gloo rank, CPU, fp32)."""

from __future__ import annotations

import dataclasses

import torch

LAYER_COUNTS = (1, 3)


def _batch(shape, long_tokens: int, mode: str):
    from solopo_mcore.data.packing import pack_triplets
    from solopo_mcore.losses.objective import MODE_ROLES
    from solopo_mcore.profiling.sweep import synthetic_example

    example = synthetic_example(64, long_tokens, 16, shape.vocab_size, 0)
    return pack_triplets([example], MODE_ROLES[mode], shared_prefix=False)


def kept_per_token_layer(hf_dir: str, long_tokens: int) -> dict:
    """Activation bytes per token and layer that a forward keeps (the CPU allocator's account,
    profiling/activations.py) with ``model.activation_memory`` lean and megatron, the estimator's
    table for each, and whether one solo step's gradients are bitwise equal between them."""
    from solopo_mcore.config import ObjectiveConfig, load_config
    from solopo_mcore.models.builder import set_activation_memory
    from solopo_mcore.profiling.activations import forward_kept_bytes, per_token_layer
    from solopo_mcore.profiling.estimator import activation_table
    from solopo_mcore.stack import build_model_stack, setup_parallel
    from solopo_mcore.training.engine import run_global_batch
    from solopo_mcore.training.forward_step import make_forward_step

    config = load_config("tiny_cpu", [f"model.hf_config_path={hf_dir}", "model.params_dtype=fp32",
                                      "parallel.tensor_model_parallel_size=1"])
    shape, pg = setup_parallel(config)
    long_po = ObjectiveConfig(algorithm="orpo", mode="long")
    batch = _batch(shape, long_tokens, "long")
    tokens = int(batch.tokens.numel())
    kept = {"lean": {}, "megatron": {}}
    stacks = {}
    for layers in LAYER_COUNTS:
        stacks[layers] = build_model_stack(config, dataclasses.replace(shape, num_layers=layers),
                                           pg)
        modules = [c.module for c in stacks[layers].model]
        for setting in kept:
            set_activation_memory(modules, setting)
            forward_kept_bytes(modules[0], batch, long_po, "long", pg.cp)  # allocator warm-up
            kept[setting][layers] = forward_kept_bytes(stacks[layers].model[0], batch, long_po,
                                                       "long", pg.cp)
    report = {"tokens": tokens}
    for setting in kept:
        report[f"{setting}_kib"] = per_token_layer(kept[setting], tokens) / 1024
        table = activation_table(shape, 1, 4, fused_swiglu=False, lean=setting == "lean")
        report[f"{setting}_estimate_kib"] = sum(table.values()) / 1024
    # one SoLoPO step of the deeper model with each setting: bitwise equal gradients
    stack = stacks[LAYER_COUNTS[-1]]
    modules = [c.module for c in stack.model]
    solo = ObjectiveConfig(algorithm="orpo", mode="solo", alpha=1.0)
    grads = {}
    for setting in ("megatron", "lean"):
        set_activation_memory(modules, setting)
        run_global_batch(stack.model, make_forward_step(solo, "solo", pg.cp),
                         [_batch(shape, long_tokens, "solo")], pg)
        grads[setting] = {n: p.main_grad.detach().clone() for c in stack.model
                          for n, p in c.module.named_parameters()}
    report["grads_compared"] = len(grads["lean"])
    report["grads_differ"] = [n for n in grads["lean"]
                              if not torch.equal(grads["lean"][n], grads["megatron"][n])]
    return report
