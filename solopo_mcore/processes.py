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
    :func:`protect_checkpoint_writer`): it ignores SIGTERM, which torchrun
    sends to a rank's whole process group while that rank still needs the server to save, and it
    is killed when the rank that started it dies. It starts with SIGTERM blocked (a pending one
    is discarded once ignored)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
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


_CHECKPOINT_WRITER_MANAGERS: list = []


def protect_checkpoint_writer() -> None:
    """Start dist_checkpointing's write-results queue ourselves, in a server that survives the
    rank's SIGTERM and dies with the rank. Idempotent; call before the first save.

    megatron-core (0.16.1 to 0.19.x, ``dist_checkpointing/strategies/filesystem_async.py``) keeps
    a module-global queue served by a ``multiprocessing`` Manager process that it starts at the
    first save and reuses. torchrun stops a rank by signalling its whole process group, so that
    server died with the same SIGTERM the rank handles by saving: the save then failed with
    BrokenPipeError and left ``iter_N.partial``. After ``kill -9`` the server outlived the rank.

    The server starts with SIGTERM blocked (a SIGTERM while it starts stays pending until its
    initializer ignores it; the rank's own arrives once the server runs, and the rank saves), and
    without re-importing the entry script: a spawned process runs the parent's ``__main__``
    module again, i.e. megatron-core and torch (~9 s on 2 cores), during which the same SIGTERM
    killed it ("unexpected EOFError" at a rank's first save).

    multiprocessing's resource tracker is started first: starting it unblocks SIGTERM in the
    calling thread (``resource_tracker.ensure_running`` blocks SIGINT and SIGTERM around its own
    spawn, then unblocks them), so when the server's spawn started it the server ran unprotected
    from exec to its initializer, tens of milliseconds in which a SIGTERM killed it ("unexpected
    EOFError" in CI, where a fast machine signalled during the first save)."""
    import signal
    from multiprocessing import get_context, resource_tracker
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    main = sys.modules.get("__main__")
    hidden = {key: main.__dict__.pop(key) for key in ("__file__",)
              if main is not None and key in main.__dict__}
    spec = getattr(main, "__spec__", None)
    if main is not None:
        main.__spec__ = None
    resource_tracker.ensure_running()  # before blocking: it would unblock SIGTERM (docstring)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        manager = SyncManager(ctx=get_context("spawn"))
        manager.start(initializer=checkpoint_writer_server_init)
    finally:
        if main is not None:
            main.__dict__.update(hidden)
            main.__spec__ = spec
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    _CHECKPOINT_WRITER_MANAGERS.append(manager)  # lives as long as the rank
    filesystem_async._results_queue = manager.Queue()
