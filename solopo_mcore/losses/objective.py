"""The SoLoPO objective and the paper's baselines, per example.

Segments of one example are indexed by :class:`Role`. For each example the objective is

    solo:       L = L_PO(x_short; y_w, y_l) + alpha * d(r(x_short, y_w), r(x_long, y_w))
    solo_both:  L = L_PO(x_short; y_w, y_l) + alpha * [d(r(x_s, y_w), r(x_l, y_w))
                                                      + d(r(x_s, y_l), r(x_l, y_l))]
    short:      L = L_PO(x_short; y_w, y_l)
    long:       L = L_PO(x_long;  y_w, y_l)

``L_PO`` and ``r`` are the chosen algorithm's (rewards.py); ``d(a, b)`` is ``|a - b|`` or
``(a - b)^2``. The functions take per-segment log-prob sums that are already complete (reduced
over tensor- and context-parallel ranks); they are pure and know nothing about parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from solopo_mcore.config import ObjectiveConfig
from solopo_mcore.roles import Role
from solopo_mcore.losses import rewards


#: Segments each mode needs in training (the long context is run for y_w only in `solo`).
MODE_ROLES = {
    "solo": (Role.SHORT_CHOSEN, Role.SHORT_REJECTED, Role.LONG_CHOSEN),
    "solo_both": (Role.SHORT_CHOSEN, Role.SHORT_REJECTED, Role.LONG_CHOSEN, Role.LONG_REJECTED),
    "short": (Role.SHORT_CHOSEN, Role.SHORT_REJECTED),
    "long": (Role.LONG_CHOSEN, Role.LONG_REJECTED),
}

#: Evaluation runs all four segments so pairwise accuracy is known on both contexts.
EVAL_ROLES = MODE_ROLES["solo_both"]


@dataclass
class SequenceStats:
    """Per-example, per-role response statistics, shape ``[num_examples, 4]`` (columns = Role).
    Roles not run are 0 in both ``logp_sum`` and ``num_tokens``."""

    logp_sum: torch.Tensor
    num_tokens: torch.Tensor
    ref_logp_sum: Optional[torch.Tensor] = None

    def has(self, role: Role) -> bool:
        return bool((self.num_tokens[:, role] > 0).all())


def sequence_rewards(stats: SequenceStats, cfg: ObjectiveConfig) -> torch.Tensor:
    """The algorithm's reward for every (example, role): ``[num_examples, 4]``."""
    n = stats.num_tokens.clamp(min=1).to(stats.logp_sum.dtype)
    if cfg.algorithm == "dpo":
        if stats.ref_logp_sum is None:
            raise ValueError("DPO needs reference log-probs (data.ref_logprobs_path)")
        return rewards.dpo_reward(stats.logp_sum, stats.ref_logp_sum, cfg.beta)
    if cfg.algorithm == "simpo":
        return rewards.simpo_reward(stats.logp_sum, n, cfg.beta)
    if cfg.algorithm == "orpo":
        return rewards.orpo_reward(stats.logp_sum, n)
    raise ValueError(f"unknown algorithm {cfg.algorithm!r}")


def pair_loss(r_w: torch.Tensor, r_l: torch.Tensor, logp_w: torch.Tensor, n_w: torch.Tensor,
              cfg: ObjectiveConfig) -> torch.Tensor:
    """``L_PO`` for one (chosen, rejected) pair per example."""
    if cfg.algorithm == "dpo":
        return rewards.dpo_pair_loss(r_w, r_l, cfg.label_smoothing)
    if cfg.algorithm == "simpo":
        return rewards.simpo_pair_loss(r_w, r_l, cfg.gamma)
    return rewards.orpo_pair_loss(r_w, r_l, logp_w, n_w.to(logp_w.dtype), cfg.orpo_lambda)


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Reward distance ``|a - b|`` ("abs") or ``(a - b)^2`` ("squared")."""
    return (a - b).abs() if kind == "abs" else (a - b).square()


def solopo_objective(stats: SequenceStats, cfg: ObjectiveConfig, mode: Optional[str] = None
                     ) -> tuple[torch.Tensor, dict]:
    """Per-example loss ``[num_examples]`` and per-example metric tensors (see module doc)."""
    mode = mode or cfg.mode
    r = sequence_rewards(stats, cfg)
    S, n = stats.logp_sum, stats.num_tokens
    sc, sr, lc, lr = Role.SHORT_CHOSEN, Role.SHORT_REJECTED, Role.LONG_CHOSEN, Role.LONG_REJECTED
    zeros = torch.zeros_like(r[:, 0])
    if mode == "long":
        po = pair_loss(r[:, lc], r[:, lr], S[:, lc], n[:, lc], cfg)
    else:
        po = pair_loss(r[:, sc], r[:, sr], S[:, sc], n[:, sc], cfg)
    if mode == "solo":
        ra = distance(r[:, sc], r[:, lc], cfg.distance)
    elif mode == "solo_both":
        ra = distance(r[:, sc], r[:, lc], cfg.distance) + distance(r[:, sr], r[:, lr],
                                                                   cfg.distance)
    else:
        ra = zeros
    loss = po + cfg.alpha * ra
    metrics = {"loss/total": loss, "loss/po": po, "loss/solo_ra": ra}
    metrics.update(reward_metrics(stats, r))
    return loss, metrics


def reward_metrics(stats: SequenceStats, r: torch.Tensor) -> dict:
    """Rewards, margins, accuracies, distances and lengths for whichever roles were run."""
    out = {}
    names = {Role.SHORT_CHOSEN: "chosen_short", Role.SHORT_REJECTED: "rejected_short",
             Role.LONG_CHOSEN: "chosen_long", Role.LONG_REJECTED: "rejected_long"}
    for role, name in names.items():
        if stats.has(role):
            out[f"reward/{name}"] = r[:, role].detach()
            out[f"logps/{name}"] = (stats.logp_sum[:, role] / stats.num_tokens[:, role]).detach()
    for ctx, (w, l) in (("short", (Role.SHORT_CHOSEN, Role.SHORT_REJECTED)),
                        ("long", (Role.LONG_CHOSEN, Role.LONG_REJECTED))):
        if stats.has(w) and stats.has(l):
            margin = (r[:, w] - r[:, l]).detach()
            out[f"reward/margin_{ctx}"] = margin
            out[f"accuracy/{ctx}"] = (margin > 0).to(margin.dtype)
    if stats.has(Role.SHORT_CHOSEN) and stats.has(Role.LONG_CHOSEN):
        out["reward/distance_chosen"] = (r[:, Role.SHORT_CHOSEN] - r[:, Role.LONG_CHOSEN]).abs(
        ).detach()
    if stats.has(Role.SHORT_CHOSEN):
        out["length/chosen_tokens"] = stats.num_tokens[:, Role.SHORT_CHOSEN].to(r.dtype)
    if stats.has(Role.SHORT_REJECTED):
        out["length/rejected_tokens"] = stats.num_tokens[:, Role.SHORT_REJECTED].to(r.dtype)
    elif stats.has(Role.LONG_REJECTED):
        out["length/rejected_tokens"] = stats.num_tokens[:, Role.LONG_REJECTED].to(r.dtype)
    return out
