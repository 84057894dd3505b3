"""Naming a rank that died without an error of its own (killed by the kernel's out-of-memory
killer, ``kill -9``): what its peers say instead of "a peer rank failed".

A rank killed by a signal prints nothing, and torchrun's summary gives only an exit code. So
each rank of a torchrun launch keeps a small status file beside the launch's error markers
(:func:`record`: its PID, what it was doing, its peak resident set size, and the machine's
out-of-memory kill count when it started). When a rank's collective fails because a peer is
gone, :func:`describe_lost_peers` reads the status files of the other ranks on this node, finds
those whose process has exited without reporting an error, and names each: rank, PID, the
signal (from the kernel while torchrun has not yet collected it), whether the kernel's OOM
killer ran meanwhile (cgroup ``memory.events``/``memory.oom_control``, else ``/proc/vmstat``),
its peak RSS and what it was doing, and the fix. Linux only; elsewhere nothing is recorded.
Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Optional

_STATUS = "status-rank{rank}.json"
_PHASES = {"data": "step {step}", "optimizer": "the optimizer update of step {step}",
           "log": "logging step {step}", "save": "the checkpoint save after step {step}",
           "start": "start-up"}
_state: dict = {}


def oom_kill_count() -> tuple[Optional[int], str]:
    """The kernel's out-of-memory kill count for this process's memory cgroup (v2
    ``memory.events``, v1 ``memory.oom_control``), else the machine's (``/proc/vmstat``), and
    where it was read; (None, "") where none is readable."""
    candidates = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                candidates.append(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events")
            elif "memory" in controllers.split(","):
                candidates.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/") /
                                  "memory.oom_control")
    candidates.append(Path("/proc/vmstat"))
    for path in candidates:
        with contextlib.suppress(OSError, ValueError):
            for line in path.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "oom_kill":
                    return int(value), str(path)
    return None, ""


def _own_memory_gib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in GiB, from /proc/self/status."""
    values = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line[:5]] = int(line.split()[1]) / 2 ** 20
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def record(folder: Optional[Path], rank: Optional[int], phase: str, step: int) -> None:
    """Note what this rank is doing (``phase``: one of data, optimizer, log, save, start) and
    its memory, in the launch's marker ``folder`` (:func:`solopo_mcore.errors.note_progress`
    passes it; None outside torchrun: nothing is written)."""
    if folder is None or rank is None:
        return
    if not _state:
        _state.update(zip(("oom_kills_at_start", "oom_source"), oom_kill_count()))
    rss, peak = _own_memory_gib()
    status = {"rank": rank, "pid": os.getpid(), "phase": phase, "step": step,
              "rss_gib": rss, "peak_rss_gib": peak, "time": time.time(), **_state}
    target = folder / _STATUS.format(rank=rank)
    with contextlib.suppress(OSError):
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, target)


def forget(folder: Path, rank: int) -> None:
    """Remove this rank's status file, and ``folder`` if nothing else is left in it."""
    with contextlib.suppress(OSError):
        (folder / _STATUS.format(rank=rank)).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _exit_signal(pid: int) -> tuple[bool, Optional[int]]:
    """(exited, signal): whether process ``pid`` has exited, and the signal that ended it while
    it is a zombie not yet collected by its parent (None when unknown or a normal exit)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True, None  # gone, and collected
    if fields[0] not in ("Z", "X"):
        return False, None
    with contextlib.suppress(IndexError, ValueError):
        code = int(fields[49])  # exit_code (field 52 of stat), as waitpid reports it
        return True, (code & 0x7F) or None
    return True, None


def describe_lost_peers(folder: Optional[Path], own_rank: Optional[int]) -> Optional[str]:
    """One sentence per rank of this node that exited without reporting an error, or None."""
    if folder is None:
        return None
    parts = []
    for path in sorted(folder.glob(_STATUS.format(rank="*"))):
        with contextlib.suppress(OSError, ValueError, KeyError):
            status = json.loads(path.read_text())
            rank, pid = status["rank"], status["pid"]
            if rank == own_rank or (folder / f"failed-rank{rank}").exists():
                continue
            exited, sig = _exit_signal(pid)
            if exited:
                parts.append(_sentence(status, sig))
    return " ".join(parts) or None


def _sentence(status: dict, sig: Optional[int]) -> str:
    """What happened to the rank of ``status``, whose process exited (``sig``: its signal while
    still uncollected, else None)."""
    before, source = status.get("oom_kills_at_start"), status.get("oom_source", "")
    now, _ = oom_kill_count()
    oom = before is not None and now is not None and now > before
    who = f"rank {status['rank']} (pid {status['pid']})"
    if oom:  # the OOM killer sends SIGKILL
        sig = sig or int(signal.SIGKILL)
        how = (f"was killed by the kernel (out of memory?) with signal {sig} "
               f"({signal.Signals(sig).name}), without an error of its own: the OOM-kill count "
               f"of {source} rose from {before} to {now} during this run")
    elif sig:
        how = (f"was killed by signal {sig} ({signal.Signals(sig).name}) without an error of "
               f"its own" + (" (the kernel's out-of-memory killer, or a kill -9)"
                             if sig == signal.SIGKILL else ""))
    else:
        how = ("exited without an error of its own (killed by a signal? torchrun's summary "
               "below gives its exit code)")
    doing = _PHASES.get(status.get("phase"), "{step}").format(step=status.get("step"))
    text = (f"{who} {how}; its peak RSS was {status.get('peak_rss_gib', 0.0):.1f} GiB when "
            f"last recorded, during {doing}.")
    if oom or sig == signal.SIGKILL:
        text += (" Fix: give each process more memory (fewer processes per node, or a node "
                 "with more), or lower what a rank holds (data.micro_batch_size, shorter "
                 "contexts, a larger tensor/pipeline parallel size, the distributed optimizer "
                 "if it is off); examples/estimate_memory.py plans it.")
    return text
