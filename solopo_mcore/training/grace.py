"""Whether a SIGTERM can still reach a save: torchrun's shutdown grace period against the step.

On SIGTERM (Slurm preemption, ``scancel``, a stopped job) torchrun's agent forwards the signal to
its ranks and waits ``--shutdown-timeout`` seconds (default 30; also ``TORCH_ELASTIC_SHUTDOWN_
TIMEOUT``) before it sends SIGKILL. A rank saves at the end of the step it is in, so the save is
reached only if the rest of that step and the save itself fit in the grace period. A 5-minute
step (bf16 on CPU, a long context) never does: the ranks are killed mid-step and the steps since
the last checkpoint are lost.

:class:`GracePeriod` follows the trainer's phase marks. Once a step, or a step and a save, has
taken longer than the grace period, it says so once (the measured times, the grace period and
where it came from, and the ``--shutdown-timeout`` that would fit); and on SIGTERM it says when
the save will come and whether the grace period allows it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

DEFAULT_GRACE_S = 30.0
ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


def shutdown_grace() -> tuple[Optional[float], str]:
    """torchrun's grace period in seconds for this rank, and where it was read: the agent's
    command line (``--shutdown-timeout``), the environment, or torchrun's default. (None, "")
    outside torchrun."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return None, ""
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        args = []
    for i, arg in enumerate(args):
        for flag in ("--shutdown-timeout", "--shutdown_timeout"):
            value = arg[len(flag) + 1:] if arg.startswith(flag + "=") else (
                args[i + 1] if arg == flag and i + 1 < len(args) else None)
            if value is not None:
                try:
                    return float(value), f"torchrun {flag} {value}"
                except ValueError:
                    pass
    if os.environ.get(ENV, "").strip():
        try:
            return float(os.environ[ENV]), f"{ENV}={os.environ[ENV]}"
        except ValueError:
            pass
    return DEFAULT_GRACE_S, "torchrun's default; --shutdown-timeout sets it"


class GracePeriod:
    """Step and save times against torchrun's grace period (module docstring). ``mark`` takes
    the trainer's phase marks ("data" starts a step, "log" ends it, "save" starts a save);
    ``say`` prints a line (the logging rank's console)."""

    def __init__(self, say: Callable[[str], None], grace: Optional[tuple] = None):
        self.grace_s, self.source = grace if grace is not None else shutdown_grace()
        self.say = say
        self.step_s = self.save_s = 0.0
        self.step_started = self.save_started = None
        self.step = 0
        self.warned = False

    def mark(self, phase: str, step: int) -> None:
        now = time.monotonic()
        if self.save_started is not None:  # any mark after a save ends it
            self.save_s = max(self.save_s, now - self.save_started)
            self.save_started = None
            self._check()
        if phase == "data":
            self.step_started, self.step = now, step
        elif phase == "log" and self.step_started is not None:
            self.step_s = max(self.step_s, now - self.step_started)
            self.step_started = None
            self._check()
        elif phase == "save":
            self.save_started = now

    def needed_s(self) -> float:
        """Seconds a SIGTERM at the start of a step needs to reach a completed save."""
        return self.step_s + self.save_s

    def _check(self) -> None:
        if self.grace_s is None or self.warned or self.needed_s() <= self.grace_s:
            return
        self.warned = True
        fit = int(math.ceil(1.5 * self.needed_s() / 10.0)) * 10
        self.say(f"[solopo] warning: a step takes up to {self.step_s:.0f} s and a save "
                 f"{self.save_s:.0f} s, longer than torchrun's shutdown grace period "
                 f"({self.grace_s:.0f} s, {self.source}): on SIGTERM the ranks save at the end "
                 f"of their step, and torchrun kills them before that. Launch torchrun with "
                 f"--shutdown-timeout {fit} (Slurm: send the signal at least that early, "
                 f"sbatch --signal=TERM@{fit + 60}), or make a step shorter.")

    def on_sigterm(self) -> str:
        """The line to print when SIGTERM arrives."""
        if self.step_started is None:  # between steps: in a save, an evaluation, or failing
            return ("[solopo] SIGTERM between steps: the run saves and exits at its next step "
                    "boundary (no save if it is already stopping on an error)")
        running = time.monotonic() - self.step_started
        left = max(self.step_s - running, 0.0) + self.save_s
        text = (f"[solopo] SIGTERM during step {self.step}: saving when it ends (it has run "
                f"{running:.0f} s")
        if self.step_s:
            text += f"; about {left:.0f} s to the end of the save"
        text += ")"
        if self.grace_s is not None and self.step_s and left > self.grace_s:
            text += (f"; torchrun's grace period is {self.grace_s:.0f} s ({self.source}), so "
                     f"the save will probably not be reached: the steps since the last "
                     f"checkpoint would be lost. Next time launch with --shutdown-timeout "
                     f"{int(math.ceil(1.5 * self.needed_s() / 10.0)) * 10}")
        return text
