"""Megatron optimizer (AdamW, distributed or not, optional CPU offload) and LR schedule."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import get_model_config

from solopo_mcore.config import ConfigError, OptimizerConfig, ParallelConfig
from solopo_mcore.platform import transformer_engine_available, unsupported_on_cpu


def build_optimizer(model: list, opt: OptimizerConfig, parallel: ParallelConfig,
                    params_dtype: torch.dtype, pg_collection):
    """``get_megatron_optimizer`` for the DDP-wrapped chunks."""
    reason = unsupported_on_cpu("optimizer_cpu_offload")
    if opt.optimizer_cpu_offload and reason:
        raise ConfigError(f"optimizer.optimizer_cpu_offload {reason}; set it to false")
    config = McoreOptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        initial_loss_scale=opt.initial_loss_scale,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        optimizer_cpu_offload=opt.optimizer_cpu_offload,
        optimizer_offload_fraction=1.0 if opt.optimizer_cpu_offload else 0.0,
        overlap_cpu_optimizer_d2h_h2d=opt.optimizer_cpu_offload,
        # megatron-core's precision-aware path (TE FusedAdam) needs Transformer Engine; the
        # hybrid CPU-offload optimizer also runs without it.
        use_precision_aware_optimizer=opt.optimizer_cpu_offload and transformer_engine_available(),
        main_grads_dtype=torch.float32,
        main_params_dtype=torch.float32,
        exp_avg_dtype=torch.float32,
        exp_avg_sq_dtype=torch.float32,
    )
    optimizer = get_megatron_optimizer(config, model, pg_collection=pg_collection,
                                       use_gloo_process_groups=False)
    # fp16: the schedule multiplies each microbatch's loss by the optimizer's loss scale before
    # backward (Megatron's training loop sets the same hook); the optimizer unscales the grads,
    # and on inf/NaN skips the update and lowers the scale. bf16/fp32 have no scaler.
    get_model_config(model[0]).grad_scale_func = optimizer.scale_loss \
        if params_dtype == torch.float16 else None
    return optimizer


def schedule_length(opt: OptimizerConfig, train_steps: int) -> int:
    """The steps warmup + cosine decay span (Megatron's ``lr_decay_steps``)."""
    return max(train_steps, opt.lr_warmup_steps + 1)


def build_scheduler(optimizer, opt: OptimizerConfig, train_steps: int) -> OptimizerParamScheduler:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``train_steps``."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if opt.lr_warmup_steps else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_steps,
        lr_decay_steps=schedule_length(opt, train_steps),
        lr_decay_style="cosine",
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=max(train_steps, 1),
        wd_incr_style="constant",
    )


def _lr_for_step(scheduler: OptimizerParamScheduler, step: int) -> float:
    """The LR step ``step`` (1-based) runs at: the schedule at ``step - 1`` completed steps."""
    saved = scheduler.num_steps
    scheduler.num_steps = step - 1
    try:
        return scheduler.get_lr(scheduler.optimizer.param_groups[0])
    finally:
        scheduler.num_steps = saved


def reconcile_schedule(scheduler: OptimizerParamScheduler, opt: OptimizerConfig,
                       train_steps: int) -> Optional[str]:
    """After a resume: one line when this run's ``train_steps`` gives another schedule length
    than the checkpoint's (which Megatron keeps), saying what the new steps' LR will be; with
    ``opt.override_lr_schedule`` the schedule is first re-planned over the new length from the
    current step. None when the lengths agree."""
    saved, planned = scheduler.lr_decay_steps, schedule_length(opt, train_steps)
    if saved == planned:
        return None
    done = scheduler.num_steps
    first, last = done + 1, max(train_steps, done + 1)
    before = f"training.train_steps={train_steps}, but the checkpoint's LR schedule spans {saved}"
    if opt.override_lr_schedule:
        scheduler.lr_decay_steps = planned
        scheduler.wd_incr_steps = max(train_steps, 1)
        scheduler.step(increment=0)  # the param groups' LR for the next step, on the new plan
        return (f"{before}: optimizer.override_lr_schedule=true re-planned warmup + cosine over "
                f"{planned} steps; step {first} runs at LR {_lr_for_step(scheduler, first):.3g}, "
                f"step {last} at {_lr_for_step(scheduler, last):.3g}")
    if train_steps > saved:
        kept = (f"steps {max(first, saved + 1)}-{train_steps} run at min_lr "
                f"{opt.min_lr:g} (the schedule ended at step {saved})")
    else:
        kept = (f"the run stops at step {train_steps} at LR "
                f"{_lr_for_step(scheduler, train_steps):.3g}, before the schedule reaches min_lr")
    scheduler.lr_decay_steps = planned  # only to show what the re-planned schedule would give
    would = _lr_for_step(scheduler, first)
    scheduler.lr_decay_steps = saved
    return (f"{before}: {kept}. To re-plan the cosine over {planned} steps from here, add "
            f"optimizer.override_lr_schedule=true (step {first} would run at LR {would:.3g})")
