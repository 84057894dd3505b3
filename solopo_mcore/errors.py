"""What a user sees when an entry script fails: one short line, once, from the rank that raised.

Every entry script (``examples/*.py``, ``python -m data_tools.*``) runs its ``main`` inside
:func:`entry_point`. On an exception it

- prints ``[rank R] ErrorType: message`` (``tool: ErrorType: message`` outside torchrun) on one
  line to stderr. Errors raised for users derive from :class:`UserError` and their message
  already names the file, key or row and the fix;
- prints an identical line only once per node and launch: ranks that raise the same error stay
  quiet. A launch is torchrun's run id *and* its agent's PID (the ranks' parent): under a static
  rendezvous every run's id is ``none``, and a later run's error must still be printed. Markers of
  launches whose agent is gone are removed;
- names a rank stopped by a lost peer as such, and says whether the failing rank was on this
  node (its line is above) or on another node (its line is in that node's output);
- writes the full traceback to a log file and names it (``SOLOPO_TRACEBACK=1`` prints it too);
- writes the same short line to torchrun's error file (``TORCHELASTIC_ERROR_FILE``), so
  torchrun's failure summary shows it instead of a pointer to the docs;
- exits with status 1 (130 on Ctrl-C).

It also makes a rank launched by torchrun exit when its launcher dies
(:func:`solopo_mcore.processes.exit_with_parent`). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

#: Set to 1 to print the full traceback after the short line.
TRACEBACK_ENV = "SOLOPO_TRACEBACK"
#: Directory for the traceback logs (default: the system temporary directory).
LOG_DIR_ENV = "SOLOPO_ERROR_LOG_DIR"
#: Messages of collectives whose peer has gone: a consequence of another rank's failure.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "NCCL communicator was aborted", "ProcessGroupNCCL is aborted")


class UserError(Exception):
    """An error the user can fix: the message names the file, key or row, and the fix.

    The configuration, dataset, checkpoint, conversion and layout errors derive from it; an
    exception of any other type is reported as unexpected (a bug, or an environment problem)."""


def _rank() -> Optional[int]:
    rank = os.environ.get("RANK")
    return int(rank) if rank is not None and rank.isdigit() else None


def _launch_key() -> Optional[str]:
    """This torchrun launch on this node: its run id and its agent's PID, or None alone."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    return None if run is None else f"{run}-{os.getppid()}"


_MARKER_PREFIX = "solopo-reported-"


def _marker_dir() -> Optional[Path]:
    key = _launch_key()
    if key is None:
        return None
    path = Path(tempfile.gettempdir()) / f"{_MARKER_PREFIX}{key}"
    try:
        path.mkdir(exist_ok=True)
    except OSError:
        return None
    return path


def _sweep_finished_launches() -> None:
    """Remove the report markers of launches whose agent process has exited."""
    import shutil
    for folder in Path(tempfile.gettempdir()).glob(f"{_MARKER_PREFIX}*-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def error_log_path(tool: str, rank: Optional[int] = None) -> Path:
    """Where the full traceback of this process's failure is written."""
    base = Path(os.environ.get(LOG_DIR_ENV) or tempfile.gettempdir())
    run = _launch_key() or str(os.getpid())
    suffix = f"-rank{rank}" if rank is not None else ""
    return base / f"solopo-error-{tool}-{run}{suffix}.log"


def note_progress(phase: str, step: int) -> None:
    """Record what this torchrun rank is doing and its memory, so that its peers can name it if
    it is killed (:mod:`solopo_mcore.rank_status`). A no-op outside torchrun."""
    from solopo_mcore import rank_status
    rank = _rank()
    rank_status.record(_marker_dir() if rank is not None else None, rank, phase, step)


def _forget_progress() -> None:
    """A rank that ends normally removes its status file (and the launch's folder, once
    empty); after a failure they stay for the peers, and later launches sweep them."""
    from solopo_mcore import rank_status
    rank, folder = _rank(), _marker_dir()
    if rank is not None and folder is not None:
        rank_status.forget(folder, rank)


def short_line(exc: BaseException, tool: str, rank: Optional[int] = None) -> str:
    """``[rank R] ErrorType: message`` on one line (the message's lines joined by " | ")."""
    message = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    prefix = f"[rank {rank}]" if rank is not None else f"{tool}:"
    if rank is not None and any(text in message for text in PEER_GONE):
        if _failure_on_this_node():
            from solopo_mcore.rank_status import describe_lost_peers
            lost = describe_lost_peers(_marker_dir(), rank)
            if lost:
                return f"{prefix} stopped: a peer rank is gone: {lost}"
            return (f"{prefix} stopped: a peer rank failed (its error is above; torchrun's "
                    f"summary below names a rank that was killed)")
        return (f"{prefix} stopped: a rank on another node failed (its error is in that node's "
                f"output; this node's ranks lost their connection to it)")
    kind = type(exc).__name__ if isinstance(exc, UserError) else \
        f"unexpected {type(exc).__name__}"
    return f"{prefix} {kind}: {message}" if message else f"{prefix} {kind}"


def _failure_on_this_node(wait_s: float = 3.0) -> bool:
    """Whether a rank of this launch on this node failed with its own error (not a lost peer).
    All ranks on one node: yes. Otherwise the failing rank reports before its peers notice it
    is gone; allow it ``wait_s`` to do so."""
    world, local = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    if world is None or world == local:
        return True
    folder = _marker_dir()
    if folder is None:
        return True
    deadline = time.time() + wait_s
    while True:
        if any(folder.glob("failed-rank*")):
            return True
        if time.time() >= deadline:
            return False
        time.sleep(0.1)


def _first_on_node(line_without_rank: str) -> bool:
    """True for the first rank of this torchrun launch on this node to report this message."""
    folder = _marker_dir()
    if folder is None:
        return True
    digest = hashlib.sha1(line_without_rank.encode()).hexdigest()[:16]
    marker = folder / digest
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:
        return True


def _write_torchelastic_error_file(line: str, log: Optional[Path]) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    summary = line + (f"\n(full traceback: {log})" if log else "")
    data = {"message": {"message": line, "extraInfo": {"py_callstack": summary,
                                                       "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(data))


def report_exception(exc: BaseException, tool: str, stream=None) -> int:
    """Report ``exc`` as described in the module docstring; return the exit status."""
    stream = stream or sys.stderr
    rank = _rank()
    message = str(exc)
    folder = _marker_dir()
    if folder is not None and rank is not None and \
            not any(text in message for text in PEER_GONE):
        with contextlib.suppress(OSError):  # this node has a failure of its own
            (folder / f"failed-rank{rank}").touch()
    # first: a killed peer's exit signal is readable only until torchrun collects it
    line = short_line(exc, tool, rank)
    full = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    log: Optional[Path] = error_log_path(tool, rank)
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(full)
    except OSError:
        log = None
    _write_torchelastic_error_file(line, log)
    if _first_on_node(short_line(exc, tool, None)):
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            print(full, file=stream, end="")
        where = f"full traceback: {log}" if log else "traceback not written"
        print(f"{line}\n  ({where}; set {TRACEBACK_ENV}=1 to print it)", file=stream,
              flush=True)
    _sweep_finished_launches()
    return 1


@contextlib.contextmanager
def entry_point(tool: str):
    """Run an entry script's ``main`` with short error reports (see the module docstring).

        if __name__ == "__main__":
            with entry_point("pretrain_solopo"):
                main()
    """
    from solopo_mcore.processes import exit_with_parent

    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun rank: die with the launcher
        exit_with_parent()
        note_progress("start", 0)
    try:
        yield
        _forget_progress()
    except SystemExit as exc:
        if not exc.code:
            _forget_progress()
        raise
    except KeyboardInterrupt:
        print(f"{tool}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except BaseException as exc:  # noqa: BLE001 - reported, then a non-zero exit
        raise SystemExit(report_exception(exc, tool)) from None
