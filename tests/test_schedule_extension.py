"""Extending a finished run (training.train_steps raised on resume): the resume says what the LR
schedule does with the new steps, and optimizer.override_lr_schedule re-plans it."""

import math

import pytest
import torch

from solopo_mcore.config import OptimizerConfig
from solopo_mcore.training.optim import build_scheduler, reconcile_schedule

LR, MIN_LR = 1e-3, 1e-5


def _cosine(step_done: int, length: int) -> float:
    """Written out: cosine from LR to MIN_LR over ``length`` steps (no warmup)."""
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * min(step_done, length) / length))


def _resumed(train_steps: int, override: bool, done: int = 4, saved_length: int = 4):
    opt = OptimizerConfig(lr=LR, min_lr=MIN_LR, override_lr_schedule=override)
    first = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR), opt,
                            saved_length)
    for _ in range(done):
        first.step(increment=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = build_scheduler(optimizer, opt, train_steps)
    scheduler.load_state_dict(first.state_dict())  # Megatron keeps the checkpoint's length
    return scheduler, optimizer, reconcile_schedule(scheduler, opt, train_steps)


def test_extending_a_finished_run_says_the_new_steps_run_at_min_lr():
    scheduler, optimizer, message = _resumed(8, override=False)
    assert message.startswith("training.train_steps=8, but the checkpoint's LR schedule spans 4: "
                              "steps 5-8 run at min_lr 1e-05 (the schedule ended at step 4)")
    assert f"optimizer.override_lr_schedule=true (step 5 would run at LR {_cosine(4, 8):.3g})" \
        in message
    assert optimizer.param_groups[0]["lr"] == pytest.approx(MIN_LR)  # unchanged: what it says
    assert scheduler.lr_decay_steps == 4


def test_override_replans_the_cosine_over_the_new_length_from_the_current_step():
    scheduler, optimizer, message = _resumed(8, override=True)
    assert "re-planned warmup + cosine over 8 steps; step 5 runs at LR" in message
    for step_done in range(4, 8):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(_cosine(step_done, 8))
        scheduler.step(increment=1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(MIN_LR)


def test_shortening_and_unchanged_lengths():
    _, _, message = _resumed(6, override=False, done=2, saved_length=10)
    assert "the run stops at step 6 at LR" in message and "before the schedule reaches min_lr" \
        in message
    assert _resumed(4, override=False)[2] is None
