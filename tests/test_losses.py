"""The objective's pure functions against the paper's formulas written out in tests/reference.py."""

import itertools

import pytest
import torch

from solopo_mcore.config import ObjectiveConfig
from solopo_mcore.losses import rewards
from solopo_mcore.roles import Role
from solopo_mcore.losses.objective import SequenceStats, solopo_objective
from tests.helpers.hf_reference import MODE_ROLE_IDS, written_objective


def _stats(mode, seed=0, num_examples=5):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(3, 30, (num_examples, 4), generator=g).double()
    S = -(torch.rand(num_examples, 4, generator=g, dtype=torch.float64) * 2 + 0.2) * n
    S_ref = S + torch.randn(num_examples, 4, generator=g, dtype=torch.float64)
    present = torch.zeros(4, dtype=torch.bool)
    present[list(MODE_ROLE_IDS[mode])] = True
    S = torch.where(present, S, torch.zeros_like(S)).requires_grad_(True)
    n = torch.where(present, n, torch.zeros_like(n))
    return S, n, S_ref


@pytest.mark.parametrize("algorithm,mode,distance", list(itertools.product(
    ["dpo", "simpo", "orpo"], ["solo", "solo_both", "short", "long"], ["abs", "squared"])))
def test_objective_and_gradient_match_written_formulas(algorithm, mode, distance):
    cfg = ObjectiveConfig(algorithm=algorithm, mode=mode, alpha=2.5, beta=0.3, gamma=0.7,
                          orpo_lambda=0.4, label_smoothing=0.15 if algorithm == "dpo" else 0.0,
                          distance=distance)
    S, n, S_ref = _stats(mode, seed=hash((algorithm, mode)) % 1000)
    ours, _ = solopo_objective(SequenceStats(S, n.long(), S_ref), cfg)
    (g_ours,) = torch.autograd.grad(ours.sum(), S)
    ref = written_objective(S, n, S_ref if algorithm == "dpo" else None, cfg, mode)
    (g_ref,) = torch.autograd.grad(ref.sum(), S)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["dpo", "simpo", "orpo"])
def test_alpha_zero_solo_equals_short(algorithm):
    S, n, S_ref = _stats("solo")
    solo, _ = solopo_objective(SequenceStats(S, n.long(), S_ref),
                               ObjectiveConfig(algorithm=algorithm, mode="solo", alpha=0.0))
    short, _ = solopo_objective(SequenceStats(S, n.long(), S_ref),
                                ObjectiveConfig(algorithm=algorithm, mode="short"))
    torch.testing.assert_close(solo, short)


def test_long_mode_is_the_po_loss_on_the_long_pair():
    S, n, _ = _stats("long")
    cfg = ObjectiveConfig(algorithm="simpo", mode="long", beta=2.0, gamma=0.5)
    ours, metrics = solopo_objective(SequenceStats(S, n.long()), cfg)
    r_w = 2.0 * S[:, Role.LONG_CHOSEN] / n[:, Role.LONG_CHOSEN]
    r_l = 2.0 * S[:, Role.LONG_REJECTED] / n[:, Role.LONG_REJECTED]
    torch.testing.assert_close(ours, -torch.log(torch.sigmoid(r_w - r_l - 0.5)))
    assert "accuracy/long" in metrics and "accuracy/short" not in metrics


def test_solo_reward_alignment_term_is_the_chosen_reward_distance():
    S, n, _ = _stats("solo")
    cfg = ObjectiveConfig(algorithm="orpo", mode="solo", alpha=3.0)
    _, metrics = solopo_objective(SequenceStats(S, n.long()), cfg)

    def log_odds(role):
        p = torch.exp(S[:, role] / n[:, role])
        return torch.log(p / (1 - p))
    expected = (log_odds(Role.SHORT_CHOSEN) - log_odds(Role.LONG_CHOSEN)).abs()
    torch.testing.assert_close(metrics["loss/solo_ra"], expected)


def test_orpo_stays_finite_when_mean_logprob_is_near_zero():
    for mean_logp in (-1e-12, -1e-9, -1e-7, 0.0):
        S = torch.tensor([mean_logp * 20, -30.0], dtype=torch.float32, requires_grad=True)
        n = torch.tensor([20.0, 15.0])
        r = rewards.orpo_reward(S, n)
        loss = rewards.orpo_pair_loss(r[0], r[1], S[0], n[0], 0.1)
        loss.backward()
        assert torch.isfinite(r).all() and torch.isfinite(loss) and torch.isfinite(S.grad).all()


def test_orpo_log_odds_matches_direct_formula_in_the_normal_range():
    S = torch.tensor([-0.5, -3.0, -40.0], dtype=torch.float64)
    n = torch.tensor([10.0, 3.0, 8.0], dtype=torch.float64)
    p = torch.exp(S / n)
    torch.testing.assert_close(rewards.orpo_reward(S, n), torch.log(p / (1 - p)))


def test_dpo_label_smoothing_formula():
    rw, rl = torch.tensor([1.3]), torch.tensor([0.2])
    eps = 0.2
    m = rw - rl
    expected = -(1 - eps) * torch.log(torch.sigmoid(m)) - eps * torch.log(torch.sigmoid(-m))
    torch.testing.assert_close(rewards.dpo_pair_loss(rw, rl, eps), expected)
