"""Child processes that do not outlive their parent.

A killed launcher (``kill -9`` of the demo or of torchrun's agent) must not leave ranks behind
blocked in a collective. On Linux the kernel delivers a signal to a process when the thread that
started it exits (``prctl(PR_SET_PDEATHSIG)``); elsewhere these helpers do nothing.

- :func:`run_child` starts a command (the demo's steps, torchrun) that receives SIGTERM when the
  calling process dies; torchrun forwards SIGTERM to its ranks.
- :func:`exit_with_parent` makes the calling process (a torchrun rank, see
  :func:`solopo_mcore.errors.entry_point`) receive SIGKILL when its launcher dies: its peers are
  gone or going, and nothing it could still do would complete.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Receive ``sig`` when the parent process exits; exit now if it already has. Returns whether
    the platform supports it (Linux)."""
    parent = os.getppid()
    armed = _set_parent_death_signal(sig)
    if armed and os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), sig)
    return armed


def checkpoint_writer_server_init() -> None:
    """Initializer of the checkpoint writer's result-queue server process (see
    :func:`solopo_mcore.platform.protect_checkpoint_writer`): it ignores SIGTERM, which torchrun
    sends to a rank's whole process group while that rank still needs the server to save, and it
    is killed when the rank that started it dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent(signal.SIGKILL)


def _child_preexec(parent: int) -> None:  # runs in the child between fork and exec
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def parent_death_preexec():
    """A ``preexec_fn`` for :mod:`subprocess`: the child receives SIGTERM if this process dies
    (Linux; None elsewhere)."""
    return functools.partial(_child_preexec, os.getpid()) \
        if sys.platform.startswith("linux") else None


def run_child(args: list, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, **kwargs)``, the child receiving SIGTERM if this process dies."""
    return subprocess.run([str(a) for a in args], preexec_fn=parent_death_preexec(), **kwargs)
