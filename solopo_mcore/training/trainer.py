"""The SoLoPO training loop: data -> Megatron schedule -> optimizer -> logs / eval / checkpoints."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel.utils import is_pp_last_stage

from solopo_mcore.config import RunConfig, check_launch, require_training_data, to_dict
from solopo_mcore.data.sampler import SamplerState, TripletSampler
from solopo_mcore.errors import UserError, note_progress, report_exception
from solopo_mcore.log import log, warn
from solopo_mcore.losses.objective import EVAL_ROLES, MODE_ROLES
from solopo_mcore.models.builder import use_te_spec
from solopo_mcore.parallel.layout import describe_layout, destroy_parallel
from solopo_mcore.parallel.watchdog import HangError, marking, start_watchdog
from solopo_mcore.platform import default_device
from solopo_mcore.profiling.flops import device_peak_tflops, mfu, training_step_flops
from solopo_mcore.profiling.memory import memory_stats, reset_peak
from solopo_mcore.stack import (build_model_stack, load_hf_weights, maybe_export,
                                 setup_parallel)
from solopo_mcore.storage.checkpoint import (CheckpointError, CheckpointManager,
                                              find_verified_checkpoint, read_marker)
from solopo_mcore.storage.lock import lock_run_paths, new_run_id
from solopo_mcore.storage.paths import overlap
from solopo_mcore.training import build
from solopo_mcore.training.engine import run_global_batch
from solopo_mcore.training.forward_step import make_forward_step, reduce_metrics
from solopo_mcore.training.grace import GracePeriod
from solopo_mcore.training.run_fingerprint import compare_run_fingerprints, run_fingerprint
from solopo_mcore.training.logs import RunLogger
from solopo_mcore.data.heldout import write_heldout
from solopo_mcore.models.positions import describe_rope
from solopo_mcore.training.optim import build_optimizer, build_scheduler, reconcile_schedule


class NonFiniteLossError(UserError, RuntimeError):
    pass


class ResumeMismatchError(UserError, RuntimeError):
    """The checkpoint in save_dir was made by a run with other optimisation settings."""


class Trainer:
    """Builds a run from its config; :meth:`train` runs it to ``training.train_steps``."""

    def __init__(self, config: RunConfig):
        require_training_data(config)  # before any process group or model
        build.check_positions(config)  # segments within the model's positions (YaRN: scaled)
        check_launch(config, int(os.environ.get("WORLD_SIZE", "1")))
        self.config = config
        self.run_locks = []
        self.run_id = new_run_id()
        if int(os.environ.get("RANK", "0")) == 0:
            # one live run per save_dir and per log path (storage/lock.py); rank 0 holds them
            lg = config.logging
            self.run_locks = lock_run_paths({
                "checkpoint.save_dir": config.checkpoint.save_dir,
                "logging.metrics_path": lg.metrics_path,
                "logging.tensorboard_dir": lg.tensorboard_dir,
                "logging.wandb_dir": lg.wandb_dir if lg.wandb_project else None}, self.run_id)
            CheckpointManager(config.checkpoint.save_dir, 1).remove_stale_partials()
        self.shape, self.pg_collection = setup_parallel(config)
        shared_id = [self.run_id]  # rank 0's: the id its locks and every record carry
        dist.broadcast_object_list(shared_id, src=0)
        self.run_id = shared_id[0]
        self.watchdog = start_watchdog(config.distributed.watchdog_minutes, self._on_hang,
                                       dist.get_rank(), dist.get_world_size())
        obj = config.objective
        checkpoint, resuming = self._checkpoint_to_load()
        start_weights = None if resuming else (
            str(checkpoint) if checkpoint is not None
            else config.checkpoint.hf_init_dir or build.RANDOM_INIT)
        self.dataset = build.open_dataset(config, self.shape, need_reference=obj.algorithm == "dpo",
                                          start_weights=start_weights)
        self.run_fingerprint = run_fingerprint(config, self.shape, self.dataset.fingerprint,
                                               self.dataset.reference_fingerprint)
        if resuming:
            self._check_resumable(checkpoint)
        self.stack = build_model_stack(config, self.shape, self.pg_collection)
        self.model = self.stack.model
        train_idx, self.eval_idx = build.split_indices(len(self.dataset),
                                                       config.data.num_eval_examples)
        self.pad_multiple = build.pad_multiple(config)
        self.step = 0
        self.num_nonfinite_in_row = 0
        self.num_skipped_steps = 0
        sampler_state = SamplerState()
        weights_only = checkpoint is not None and not resuming
        if checkpoint is None and config.checkpoint.hf_init_dir:
            load_hf_weights(self.stack, config.checkpoint.hf_init_dir)
        if weights_only:  # before the optimizer copies the weights into its main params
            CheckpointManager.load(checkpoint, self.model, load_rng=False, verified=True)
            log("solopo", f"initialised weights from {checkpoint}")
        dtype = self.stack.config.params_dtype
        self.optimizer = build_optimizer(self.model, config.optimizer, config.parallel, dtype,
                                         self.pg_collection)
        self.scheduler = build_scheduler(self.optimizer, config.optimizer,
                                         config.training.train_steps)
        self.checkpoints = CheckpointManager(config.checkpoint.save_dir,
                                             config.checkpoint.keep_last)
        problem = self.checkpoints.space_problem() if dist.get_rank() == 0 else None
        if problem:
            warn("checkpoint", problem)
        if resuming:
            sampler_state = self._resume(checkpoint)
        self.sampler = TripletSampler(
            np.asarray(train_idx), config.data.global_batch_size, config.data.micro_batch_size,
            self.pg_collection.dp.rank(), self.pg_collection.dp.size(), config.training.seed,
            config.data.shuffle, sampler_state)
        self.forward_step = marking(make_forward_step(obj, obj.mode, self.pg_collection.cp),
                                    self.watchdog, "forward-backward", lambda: self.step + 1)
        # all four segments (every accuracy), scored with the training objective
        self.eval_forward_step = marking(make_forward_step(obj, obj.mode, self.pg_collection.cp),
                                         self.watchdog, "eval", lambda: self.step)
        self.is_last_stage = is_pp_last_stage(self.pg_collection.pp)
        self.is_logging_rank = self.is_last_stage and all(
            getattr(self.pg_collection, name).rank() == 0 for name in ("tp", "cp", "dp"))
        self.logger = RunLogger(config.logging, config.training.train_steps, self.is_logging_rank,
                                run_config=to_dict(config), start_step=self.step,
                                run_id=self.run_id)
        if self.is_logging_rank and config.logging.metrics_path and len(self.eval_idx):
            rows = write_heldout(config.data.data_path, self.dataset.meta, len(self.eval_idx),
                                 os.path.dirname(os.path.abspath(config.logging.metrics_path)))
            log("solopo", f"held-out examples for examples/evaluate_qa.py --input: {rows}"
                if rows else "held-out example ids: heldout_ids.json beside the metrics")
        self.peak_tflops = device_peak_tflops(config.logging.peak_tflops)
        self._stop_requested = False
        self.grace = GracePeriod(self.logger.message)  # can a SIGTERM reach a save?
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.logger.message(
            f"[solopo] {config.objective.mode}/{config.objective.algorithm} | "
            f"{self.shape.architecture} {self.shape.num_layers}L h{self.shape.hidden_size}"
            f"{describe_rope(self.shape)} | "
            f"{describe_layout(self.pg_collection)} | "
            f"{'TE' if use_te_spec(config.model) else 'torch SDPA'} "
            f"attention{', shared prefixes' if config.data.shared_prefix else ''}, "
            f"{config.model.activation_memory} activations | "
            f"{len(train_idx)} train / {len(self.eval_idx)} eval "
            f"examples | {self.sampler.num_microbatches} microbatches/step | start step "
            f"{self.step}")

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_to_load(self) -> tuple[Optional[Path], bool]:
        """``(checkpoint, resuming)``. A checkpoint in save_dir is resumed (a restarted run);
        else load_dir's is resumed, or with checkpoint.finetune (or a weights-only checkpoint)
        its weights start a new run; else the run starts from hf_init_dir or from scratch.
        Checkpoints are verified against their checksums (collective)."""
        ck = self.config.checkpoint
        if ck.save_dir:
            found = find_verified_checkpoint(ck.save_dir, ck.strict_load)
            if found is not None:
                if ck.finetune and dist.get_rank() == 0:
                    log("solopo", f"checkpoint.finetune applies to checkpoint.load_dir; "
                                  f"checkpoint.save_dir already holds {found}, which is resumed")
                return found, not read_marker(found).get("weights_only", False)
        if ck.load_dir and not (ck.save_dir and overlap(ck.load_dir, ck.save_dir) == "is"):
            found = find_verified_checkpoint(ck.load_dir, ck.strict_load)
            if found is None:
                raise CheckpointError(f"checkpoint.load_dir={ck.load_dir}: no complete "
                                        f"checkpoint")
            return found, not (ck.finetune or read_marker(found).get("weights_only", False))
        return None, False

    def _check_resumable(self, path: Path) -> None:
        """Refuse to resume a checkpoint made by a run that optimised something else."""
        saved = read_marker(path).get("run_fingerprint")
        if saved is None:
            warn("solopo", f"{path} records no run fingerprint (saved by an older "
                           f"version): resuming without checking its settings")
            return
        differences = compare_run_fingerprints(saved, self.run_fingerprint)
        if not differences:
            return
        lines = "\n".join(f"  {key}: checkpoint {old!r}, this run {new!r}"
                          for key, old, new in differences)
        source = path.parent
        raise ResumeMismatchError(
            f"refusing to resume {path}: it was trained with different settings:\n{lines}\n"
            f"To keep both runs, give this one a new checkpoint.save_dir. To start a new run "
            f"from that checkpoint's weights (fresh optimizer, step 0, data from the start): "
            f"checkpoint.load_dir={source} checkpoint.finetune=true and a new "
            f"checkpoint.save_dir. Keys that may change on a resume are listed in "
            f"docs/design.md (Failure behaviour).")

    def _resume(self, path) -> SamplerState:
        marker = CheckpointManager.load(path, self.model, self.optimizer, self.scheduler,
                                        verified=True)
        self.step = int(marker["step"])
        self.num_skipped_steps = int(marker.get("num_skipped_steps", 0))
        log("solopo", f"resumed from {path} at step {self.step}")
        schedule = reconcile_schedule(self.scheduler, self.config.optimizer,
                                      self.config.training.train_steps)
        if schedule:
            (log if self.config.optimizer.override_lr_schedule else warn)("solopo", schedule)
        return SamplerState(consumed_examples=int(marker["consumed_examples"]))

    def save(self) -> None:
        if not self.config.checkpoint.save_dir:
            return
        self._mark("save", self.step)
        self.checkpoints.save(self.step, self.model, self.optimizer, self.scheduler, {
            "consumed_examples": self.sampler.state.consumed_examples,
            "num_skipped_steps": self.num_skipped_steps,
            "config": to_dict(self.config),
            "dataset_fingerprint": self.dataset.fingerprint,
            "run_fingerprint": self.run_fingerprint,
            "hf_config": self.shape.raw,
            "source_hf_dir": self.config.checkpoint.hf_init_dir or self.config.model.hf_config_path,
        })

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True
        self.logger.message(self.grace.on_sigterm())

    def _mark(self, phase: str, step: int) -> None:
        note_progress(phase, step)  # what its peers say if this rank is killed (OOM)
        self.grace.mark(phase, step)
        if self.watchdog is not None:
            self.watchdog.mark(phase, step)

    def _on_hang(self, message: str) -> None:
        """The watchdog found a hang (its thread; the main thread may be stuck in a
        collective): report it like any error and exit non-zero, so that torchrun stops the
        job, or restarts it with --max-restarts."""
        code = report_exception(HangError(message), "pretrain_solopo")
        for lock in self.run_locks:  # a restart, maybe on another host, may take them at once
            lock.release()
        os._exit(code)

    # ------------------------------------------------------------------ one step
    def _all_ranks(self, value: float, op) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=default_device())
        dist.all_reduce(t, op=op)
        return float(t.item())

    def _grads_finite(self) -> bool:
        finite = True
        for chunk in self.model:
            for buffer in getattr(chunk, "buffers", []):
                finite &= bool(torch.isfinite(buffer.grad_data).all())
        return finite

    def train_step(self) -> dict:
        reset_peak()
        start = time.time()
        self._mark("data", self.step + 1)
        index_lists = self.sampler.next_step()
        microbatches = build.make_microbatches(self.dataset, index_lists,
                                               MODE_ROLES[self.config.objective.mode],
                                               self.pg_collection, self.pad_multiple,
                                               self.config.data.shared_prefix)
        outputs = run_global_batch(self.model, self.forward_step, microbatches, self.pg_collection,
                                   optimizer=self.optimizer)
        metrics = reduce_metrics(outputs, self.pg_collection.dp) if self.is_last_stage else {}
        loss_ok = not self.is_last_stage or math.isfinite(metrics.get("loss/total", 0.0))
        loss_finite = self._all_ranks(float(loss_ok), dist.ReduceOp.MIN) > 0
        # fp16's loss scaler checks the (scaled) gradients itself and must see an overflow to
        # lower the scale; without one, a non-finite gradient is ours to catch
        scaled = self.stack.config.params_dtype == torch.float16
        grads_ok = scaled or self._all_ranks(float(self._grads_finite()), dist.ReduceOp.MIN) > 0
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (Megatron's warmup
        # starts at 0, so with lr_warmup_steps > 0 the first step does not change the weights)
        updated, grad_norm = False, float("nan")
        self._mark("optimizer", self.step + 1)
        if loss_finite and grads_ok:
            # ``updated`` is False when the fp16 scaler found inf/NaN gradients (scale lowered)
            updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)
            self.num_nonfinite_in_row = 0
        else:
            self.num_skipped_steps += 1
            if not (scaled and loss_finite):  # a loss-scale overflow is not a failing run
                self.num_nonfinite_in_row += 1
        self.step += 1
        seconds = time.time() - start
        metrics.update(self._throughput(microbatches, seconds))
        metrics.update({"optimizer/lr": lr,
                        "optimizer/grad_norm": float(grad_norm) if grad_norm is not None
                        else float("nan"),
                        "optimizer/skipped_steps": float(self.num_skipped_steps),
                        "time/step_sec": seconds, "data/epoch": self.sampler.epoch})
        if not updated and scaled and loss_finite:
            self.logger.message(f"[solopo] step {self.step}: fp16 gradients overflowed, step "
                                f"skipped, loss scale lowered to "
                                f"{self.optimizer.get_loss_scale().item():g}")
        elif not updated:
            self.logger.message(f"[solopo] step {self.step}: non-finite loss or gradient, step "
                                f"skipped ({self.num_nonfinite_in_row} in a row)")
        return metrics

    def _throughput(self, microbatches, seconds: float) -> dict:
        tokens = sum(mb.num_real_tokens for mb in microbatches)
        segments = [shape for mb in microbatches for shape in mb.segment_shapes()]
        flops = training_step_flops(self.shape, segments)
        totals = torch.tensor([tokens, flops], dtype=torch.float64)
        # every CP/TP/PP rank of a DP replica holds the same microbatches: sum over DP only
        if self.pg_collection.dp.size() > 1:
            dist.all_reduce(totals, group=self.pg_collection.dp)
        world = dist.get_world_size()
        mem = memory_stats()
        keys = sorted(mem)
        peak = torch.tensor([mem[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        out = {"throughput/tokens_per_sec_per_gpu": totals[0].item() / seconds / world,
               "throughput/tflops_per_gpu": totals[1].item() / seconds / world / 1e12,
               "throughput/tokens_per_step": totals[0].item()}
        out["throughput/mfu"] = mfu(totals[1].item(), seconds, world, self.peak_tflops)
        out.update(zip(keys, peak.tolist()))
        return out

    # ------------------------------------------------------------------ eval
    def evaluate(self) -> dict:
        """Pairwise accuracy on short and long contexts and the short/long reward distance,
        on the held-out examples (all four segments per example)."""
        if not len(self.eval_idx):
            return {}
        mine = list(self.eval_idx)[self.pg_collection.dp.rank()::self.pg_collection.dp.size()]
        index_lists = build.chunk_list(mine, self.config.data.micro_batch_size)
        if not index_lists:
            return {}
        for chunk in self.model:
            chunk.eval()
        with torch.no_grad():
            microbatches = build.make_microbatches(self.dataset, index_lists, EVAL_ROLES,
                                                   self.pg_collection, self.pad_multiple,
                                                   self.config.data.shared_prefix)
            outputs = run_global_batch(self.model, self.eval_forward_step, microbatches,
                                       self.pg_collection, forward_only=True)
        for chunk in self.model:
            chunk.train()
        return reduce_metrics(outputs, self.pg_collection.dp) if self.is_last_stage else {}

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        cfg = self.config
        total = cfg.training.train_steps
        first_step = self.step
        if self.step >= total:
            self.logger.message(
                f"[solopo] nothing to train: the checkpoint is at step {self.step} and "
                f"training.train_steps={total}. Checkpoints and exports are left as they are. "
                f"Raise training.train_steps to train further, or use a new "
                f"checkpoint.save_dir for a new run.")
            return
        if cfg.training.eval_interval and cfg.training.eval_at_start and self.step == 0:
            self.logger.log(0, self.evaluate(), prefix="eval/")
        while self.step < total:
            metrics = self.train_step()
            self._mark("log", self.step)
            if self.step % cfg.logging.log_interval == 0 or self.step == total:
                self.logger.log(self.step, metrics)
            if self.num_nonfinite_in_row >= cfg.training.max_consecutive_nonfinite_steps:
                self.save()
                raise NonFiniteLossError(
                    f"{self.num_nonfinite_in_row} consecutive steps had a non-finite loss or "
                    f"gradient (last at step {self.step}); the last state was saved. Lower "
                    f"optimizer.lr, check the data, or raise "
                    f"training.max_consecutive_nonfinite_steps.")
            if cfg.training.eval_interval and self.step % cfg.training.eval_interval == 0:
                self.logger.log(self.step, self.evaluate(), prefix="eval/")
            stop = self._all_ranks(float(self._stop_requested), dist.ReduceOp.MAX) > 0
            exit_now = bool(cfg.training.exit_interval) and \
                self.step - first_step >= cfg.training.exit_interval and self.step < total
            if stop or exit_now:
                reason = "SIGTERM" if stop else "training.exit_interval"
                self.logger.message(f"[solopo] {reason}: saving at step {self.step} and exiting")
                self.save()
                return
            if cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0:
                self.save()
        if cfg.training.eval_interval and self.step % cfg.training.eval_interval:
            self.logger.log(self.step, self.evaluate(), prefix="eval/")
        if not cfg.checkpoint.save_interval or self.step % cfg.checkpoint.save_interval:
            self.save()
        maybe_export(self.stack, cfg.checkpoint.export_hf_dir,
                           cfg.checkpoint.hf_init_dir or cfg.model.hf_config_path)
        if cfg.checkpoint.export_hf_dir:
            self.logger.message(f"[solopo] exported HF checkpoint to "
                                f"{cfg.checkpoint.export_hf_dir}")

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        self.logger.close()
        destroy_parallel()
        for lock in self.run_locks:
            lock.release()
