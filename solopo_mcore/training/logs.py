"""Run logs: a console line per interval (with ETA and a progress bar on a terminal),
``metrics.jsonl`` for scripts, TensorBoard, and optionally Weights & Biases (the same keys;
see :mod:`solopo_mcore.training.wandb_log`). Only the logging rank writes."""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from solopo_mcore.config import LoggingConfig

_CONSOLE = [  # (metric key, label, format)
    ("loss/total", "loss", "{:.4f}"), ("loss/po", "po", "{:.4f}"),
    ("loss/solo_ra", "ra", "{:.4f}"), ("reward/chosen_short", "r_w", "{:+.3f}"),
    ("reward/rejected_short", "r_l", "{:+.3f}"), ("reward/chosen_long", "r_w_long", "{:+.3f}"),
    ("reward/margin_short", "margin", "{:+.3f}"), ("accuracy/short", "acc", "{:.2f}"),
    ("optimizer/lr", "lr", "{:.2e}"), ("optimizer/grad_norm", "gnorm", "{:.3f}"),
    ("throughput/tokens_per_sec_per_gpu", "tok/s/gpu", "{:.0f}"),
    ("throughput/mfu", "mfu", "{:.1%}"),
]


def _fmt_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class RunLogger:
    def __init__(self, cfg: LoggingConfig, total_steps: int, enabled: bool,
                 run_config: Optional[dict] = None):
        self.cfg = cfg
        self.total_steps = total_steps
        self.enabled = enabled
        self.start_time = time.time()
        self.start_step: Optional[int] = None
        self.writer = None
        self.metrics_file = None
        self.bar = None
        self.wandb_run = None
        if not enabled:
            return
        if cfg.wandb_project:
            from solopo_mcore.training.wandb_log import init_run
            self.wandb_run = init_run(cfg.wandb_project, cfg.wandb_entity, cfg.wandb_run_name,
                                      cfg.wandb_tags, cfg.wandb_run_id, cfg.wandb_dir, run_config)
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(cfg.tensorboard_dir)
        if cfg.metrics_path:
            Path(cfg.metrics_path).parent.mkdir(parents=True, exist_ok=True)
            self.metrics_file = open(cfg.metrics_path, "a", encoding="utf-8")
        if cfg.progress_bar and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, dynamic_ncols=True, leave=False)

    def eta(self, step: int) -> float:
        if self.start_step is None or step <= self.start_step:
            return float("nan")
        rate = (time.time() - self.start_time) / (step - self.start_step)
        return rate * (self.total_steps - step)

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        if self.start_step is None and not prefix:  # the ETA counts training steps only
            self.start_step, self.start_time = step - 1, time.time() - metrics.get(
                "time/step_sec", 0.0)
        record = {"step": step, **{prefix + k: v for k, v in metrics.items()}}
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.writer:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            from solopo_mcore.training.wandb_log import finite_scalars
            scalars = finite_scalars(record)
            scalars.pop("step")
            self.wandb_run.log(scalars, step=step)
        if self.bar is not None and not prefix:
            self.bar.update(step - self.bar.n)
        self._print(step, metrics, prefix)

    def _print(self, step: int, metrics: dict, prefix: str) -> None:
        parts = [f"{'eval ' if prefix else ''}step {step}/{self.total_steps}"]
        for key, label, fmt in _CONSOLE:
            if key in metrics and metrics[key] is not None:
                parts.append(f"{label} {fmt.format(metrics[key])}")
        if prefix:
            for key in ("accuracy/long", "reward/distance_chosen"):
                if key in metrics:
                    parts.append(f"{key.split('/')[1]} {metrics[key]:.3f}")
        mem = metrics.get("memory/max_allocated_gib", metrics.get("memory/max_rss_gib"))
        if mem is not None:
            parts.append(f"mem {mem:.2f}GiB")
        if not prefix:
            parts.append(f"eta {_fmt_seconds(self.eta(step)) if math.isfinite(self.eta(step)) else '?'}")
        line = " | ".join(parts)
        (self.bar.write if self.bar is not None else print)(line)
        sys.stdout.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
