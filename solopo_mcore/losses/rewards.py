"""Sequence rewards and pairwise preference losses: pure functions of log-prob sums and lengths.

Notation for one response ``y`` to context ``x``: ``S = sum_t log pi(y_t | x, y_<t)`` is the
response log-prob sum and ``n = |y|`` the response token count. All functions take tensors of
any (matching) shape and work elementwise; nothing here knows about parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: ORPO's mean log-prob is capped here so that p = exp(S/n) never rounds to 1 (log-odds stays
#: finite, about 13.8). Below the cap the value and gradient are exact.
ORPO_MAX_MEAN_LOGP = -1e-6


def dpo_reward(logp_sum: torch.Tensor, ref_logp_sum: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO implicit reward ``r = beta * (S - S_ref)``."""
    return beta * (logp_sum - ref_logp_sum)


def simpo_reward(logp_sum: torch.Tensor, num_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    """SimPO length-normalised reward ``r = beta * S / n``."""
    return beta * logp_sum / num_tokens


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler, 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def orpo_reward(logp_sum: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """ORPO log-odds ``r = log(p / (1 - p))`` with ``p = exp(S / n)``.

    Computed in log space as ``S/n - log(1 - exp(S/n))``; ``S/n`` is capped at
    :data:`ORPO_MAX_MEAN_LOGP` so the value stays finite when ``p`` approaches 1."""
    mean_logp = torch.clamp(logp_sum / num_tokens, max=ORPO_MAX_MEAN_LOGP)
    return mean_logp - log1mexp(mean_logp)


def dpo_pair_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO: ``-(1 - eps) * log sigmoid(r_w - r_l) - eps * log sigmoid(r_l - r_w)``
    (``eps`` = label smoothing; 0 gives ``-log sigmoid(r_w - r_l)``)."""
    margin = reward_chosen - reward_rejected
    loss = -F.logsigmoid(margin)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-margin)
    return loss


def simpo_pair_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                    gamma: float) -> torch.Tensor:
    """SimPO: ``-log sigmoid(r_w - r_l - gamma)``."""
    return -F.logsigmoid(reward_chosen - reward_rejected - gamma)


def orpo_pair_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                   chosen_logp_sum: torch.Tensor, chosen_num_tokens: torch.Tensor,
                   orpo_lambda: float) -> torch.Tensor:
    """ORPO: ``NLL(y_w) - lambda * log sigmoid(r_w - r_l)`` with ``NLL(y_w) = -S_w / n_w``
    and ``r`` the log-odds of :func:`orpo_reward`."""
    return -chosen_logp_sum / chosen_num_tokens - orpo_lambda * F.logsigmoid(
        reward_chosen - reward_rejected)
