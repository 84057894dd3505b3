"""The run fingerprint: the settings that decide what is being optimised (model shape, objective,
optimizer, data order, the dataset's and the reference sidecar's fingerprints). A checkpoint
records it and a resume must match it; docs/design.md lists the keys that may differ."""

from __future__ import annotations

import json
from typing import Optional

from solopo_mcore.config import to_dict

RESUME_CHECKED_SECTIONS = ("objective", "optimizer")
"""Config sections compared in full on resume (besides the keys listed below)."""
RESUME_CHECKED_KEYS = ("model.params_dtype", "data.num_eval_examples", "data.shuffle",
                       "training.seed")
"""Single keys compared on resume: numerics and what decides the training order."""


def run_fingerprint(config, shape, dataset_fingerprint: str,
                    reference_fingerprint: Optional[str]) -> dict:
    """The flat ``{key: value}`` a checkpoint records and a resume must match."""
    tree = to_dict(config)
    out = {f"model_shape.{k}": v for k, v in sorted(vars(shape).items()) if k != "raw"}
    for section in RESUME_CHECKED_SECTIONS:
        out.update({f"{section}.{k}": v for k, v in tree[section].items()})
    for free in ("optimizer.optimizer_cpu_offload", "optimizer.initial_loss_scale",
                 "optimizer.override_lr_schedule"):
        # where the state lives, the fp16 scale's start, how an extended run re-plans: not the run
        out.pop(free, None)
    for key in RESUME_CHECKED_KEYS:
        section, name = key.split(".")
        out[key] = tree[section][name]
    out["data.fingerprint"] = dataset_fingerprint
    out["data.reference_fingerprint"] = reference_fingerprint
    return json.loads(json.dumps(out, default=str))  # JSON-normal (tuples -> lists)


def compare_run_fingerprints(saved: dict, current: dict) -> list[tuple]:
    """``(key, saved value, current value)`` for every key that differs. (Checkpoints from before
    YaRN support recorded llama3 scaling without its ``rope_type``: read as llama3.)"""
    scaling = saved.get("model_shape.rope_scaling")
    if isinstance(scaling, dict) and "rope_type" not in scaling:
        saved = {**saved, "model_shape.rope_scaling": {"rope_type": "llama3", **scaling}}
    return [(k, saved.get(k, "<not recorded>"), current.get(k, "<not recorded>"))
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
