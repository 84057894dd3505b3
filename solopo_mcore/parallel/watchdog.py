"""Hang detection: name the rank that holds a job up, instead of waiting out the collective
timeout in silence.

Every rank publishes two things to the job's c10d key-value store (the one torchrun's agent
hosts, at ``MASTER_ADDR:MASTER_PORT``), under a prefix of this launch and restart:

* a *heartbeat*, from a daemon thread every ``poll_s``: it stops when the process is stopped
  (SIGSTOP, a frozen node) or dead, not when the main thread is blocked in a collective;
* its *progress*, ``(step, phase, microbatch)``, each time the trainer calls :meth:`mark`.

Two ranks (the first and the last) also read everyone's. They stop the run, through
``on_hang(message)``, when

* a rank's heartbeat has not changed for ``timeout_s``: that rank stopped responding;
* no rank's progress has changed for ``timeout_s``: the ranks at the earliest (step, phase) are
  the ones the others wait for; if all are at the same place, all are named.

Changes are timed on the reader's own clock, so clocks of different hosts never compare. The
cost on the training path is one store ``set`` per :meth:`mark` (a few per step).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

from solopo_mcore.errors import UserError

#: Phases in the order a step passes them (for "who is behind").
PHASES = ("start", "data", "forward-backward", "optimizer", "log", "eval", "save", "done")


class HangError(UserError, RuntimeError):
    """A rank stopped responding, or no rank made progress, for distributed.watchdog_minutes."""


def connect_job_store(host: str, port: int, timeout_s: float = 60.0):
    """A client of the job's c10d store (hosted by torchrun's agent), under a prefix of this
    job and attempt (``layout.agree_on_attempt``), so a restarted job never reads the previous
    attempt's heartbeats."""
    import torch.distributed as dist

    from solopo_mcore.parallel.layout import ATTEMPT

    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    attempt = ATTEMPT.get("number", os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return dist.PrefixStore(f"solopo-watchdog/{run_id}/{attempt}/", store)


class ProgressWatchdog:
    """Heartbeats and progress marks of one rank; reads everyone's on the checking ranks."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float,
                 on_hang: Callable[[str], None], poll_s: Optional[float] = None,
                 host: Optional[str] = None):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s = timeout_s
        self.poll_s = poll_s or min(10.0, max(0.5, timeout_s / 10))
        self.on_hang = on_hang
        self.host = host or socket.gethostname()
        self.checks = rank in (0, world_size - 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="solopo-watchdog", daemon=True)
        self._beats = 0
        self._seen = {}  # (kind, rank) -> (value, local time it last changed)
        self.position = ("start", 0, 0)

    def start(self) -> "ProgressWatchdog":
        self.mark("start", 0)
        self._beat()
        self._thread.start()
        return self

    def mark(self, phase: str, step: int, microbatch: int = 0) -> None:
        """Record that this rank entered ``phase`` of ``step`` (cheap: one store write)."""
        self.position = (phase, step, microbatch)
        self.store.set(f"progress/{self.rank}",
                       json.dumps([step, phase, microbatch, self.host]))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.poll_s * 2)

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(f"alive/{self.rank}", str(self._beats))

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._beat()
                message = self._check(time.monotonic()) if self.checks else None
            except Exception:  # noqa: BLE001 - the store went away: the job is ending
                return
            if message:
                self.on_hang(message)
                return

    def _read(self, kind: str, now: float) -> dict:
        """``{rank: (value, seconds since it last changed)}`` for ranks that wrote ``kind``."""
        keys = [f"{kind}/{r}" for r in range(self.world_size)]
        present = [k for k in keys if self.store.check([k])]
        out = {}
        for key in present:
            rank = int(key.rsplit("/", 1)[1])
            value = self.store.get(key).decode()
            last = self._seen.get((kind, rank))
            if last is None or last[0] != value:
                self._seen[(kind, rank)] = last = (value, now)
            out[rank] = (value, now - last[1])
        return out

    def _check(self, now: float) -> Optional[str]:
        alive = self._read("alive", now)
        progress = self._read("progress", now)
        silent = sorted(r for r, (_, age) in alive.items() if age > self.timeout_s)
        if silent:
            return (f"{self._describe(silent, progress)} sent no heartbeat for "
                    f"{self.timeout_s:.0f} s: stopped or frozen (SIGSTOP, a hung node, swap); "
                    f"the other ranks are waiting for {'it' if len(silent) == 1 else 'them'}")
        if len(progress) == self.world_size and \
                all(age > self.timeout_s for _, age in progress.values()):
            order = {r: self._order(v) for r, (v, _) in progress.items()}
            earliest = min(order.values())
            late = sorted(r for r, o in order.items() if o == earliest)
            if len(late) == self.world_size:
                step, phase, _, _ = json.loads(progress[late[0]][0])
                where = f"every rank has been {self._where(phase, step, None)} for more than " \
                    f"{self.timeout_s:.0f} s"
            else:
                where = (f"no rank made progress for {self.timeout_s:.0f} s; "
                         f"{self._describe(late, progress)} "
                         f"{'is' if len(late) == 1 else 'are'} furthest behind")
            return (f"{where} (a collective that never completes, a stuck device or file "
                    f"system); raise distributed.watchdog_minutes if that phase can "
                    f"legitimately take longer")
        return None

    @staticmethod
    def _order(value: str) -> tuple:
        step, phase, microbatch, _ = json.loads(value)
        return (step, PHASES.index(phase) if phase in PHASES else -1, microbatch)

    @staticmethod
    def _where(phase: str, step: int, microbatch) -> str:
        detail = f", microbatch {microbatch}" if microbatch and phase in (
            "forward-backward", "eval") else ""
        return f"in {phase} of step {step}{detail}"

    def _describe(self, ranks: list, progress: dict) -> str:
        parts = []
        for rank in ranks[:8]:
            if rank in progress:
                step, phase, microbatch, host = json.loads(progress[rank][0])
                parts.append(f"rank {rank} on {host}, {self._where(phase, step, microbatch)},")
            else:
                parts.append(f"rank {rank} (no progress recorded)")
        more = f" and {len(ranks) - 8} more" if len(ranks) > 8 else ""
        return ", ".join(parts) + more


def start_watchdog(minutes: float, on_hang: Callable[[str], None], rank: int,
                   world_size: int) -> Optional[ProgressWatchdog]:
    """The watchdog of this rank of a torchrun job (None when off, alone, or not under a
    store-hosting launcher)."""
    if minutes <= 0 or world_size == 1 or "MASTER_PORT" not in os.environ:
        return None
    store = connect_job_store(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                              int(os.environ["MASTER_PORT"]))
    return ProgressWatchdog(store, rank, world_size, minutes * 60, on_hang).start()


def marking(forward_step: Callable, watchdog: Optional[ProgressWatchdog], phase: str,
            step: Callable[[], int]) -> Callable:
    """``forward_step`` that first marks ``phase`` of ``step()`` with a microbatch count."""
    if watchdog is None:
        return forward_step
    count = {"step": None, "microbatch": 0}

    def wrapped(data_iterator, model, *args, **kwargs):
        current = step()
        if count["step"] != current:
            count.update(step=current, microbatch=0)
        count["microbatch"] += 1
        watchdog.mark(phase, current, count["microbatch"])
        return forward_step(data_iterator, model, *args, **kwargs)
    return wrapped
