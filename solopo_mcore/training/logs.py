"""Run logs: a console line per interval (with ETA and a progress bar on a terminal),
``metrics.jsonl`` for scripts, TensorBoard, and optionally Weights & Biases (the same keys;
see :mod:`solopo_mcore.training.wandb_log`). Only the logging rank writes."""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from solopo_mcore.config import ConfigError, LoggingConfig

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


def rewind_metrics(path: Path, step: int) -> int:
    """Keep the records of ``path`` (metrics.jsonl) up to ``step``, the step a run resumes from
    (those after it were logged by an attempt whose state was lost and are about to be logged
    again); rewritten atomically. Returns the number of records dropped."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            if number == len(lines):  # a line cut short by the crash itself
                continue
            raise ConfigError(f"{path}:{number}: not a metrics record; move the file away or "
                             f"set logging.metrics_path to a new file") from None
        if record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return len(lines) - len(kept)


class RunLogger:
    def __init__(self, cfg: LoggingConfig, total_steps: int, enabled: bool,
                 run_config: Optional[dict] = None, start_step: int = 0,
                 run_id: Optional[str] = None):
        """``start_step``: the step the run starts or resumes from. Records of later steps,
        left by an attempt that stopped after its last checkpoint, are dropped from
        metrics.jsonl and purged from TensorBoard, so each series reads once, increasing.
        ``run_id``: this invocation's id, in every metrics.jsonl record (the log paths are
        locked by the trainer, so no other live run writes here)."""
        self.cfg = cfg
        self.run_id = run_id
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
                                      cfg.wandb_tags, cfg.wandb_run_id, cfg.wandb_dir, run_config,
                                      start_step=start_step)
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            # events at steps > start_step (all, on a new run) in the folder's older files are
            # hidden from readers
            self.writer = SummaryWriter(cfg.tensorboard_dir,
                                        purge_step=start_step + 1 if start_step else 0)
            if run_id is not None:
                self.writer.add_text("run_id", run_id, start_step)
        if cfg.metrics_path:
            path = Path(cfg.metrics_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file() and path.stat().st_size and not start_step:
                kept = path.with_name(f"{path.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(path, kept)
                print(f"[solopo] {path} holds records of an earlier run; this new run starts "
                      f"it again (the old one is now {kept})")
            elif path.is_file():
                dropped = rewind_metrics(path, start_step)
                if dropped:
                    print(f"[solopo] {path}: dropped {dropped} records after step {start_step}, "
                          f"where this run resumes (they are logged again)")
            self.metrics_file = open(path, "a", encoding="utf-8")
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
            tagged = record if self.run_id is None else {**record, "run_id": self.run_id}
            self.metrics_file.write(json.dumps(tagged) + "\n")
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
