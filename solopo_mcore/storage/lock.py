"""One run per checkpoint folder: a lock file with its holder and a heartbeat.

``save_dir/.solopo-run.lock`` holds the host, PID, start time and run id of the run writing
there, and a heartbeat time that a daemon thread rewrites every :data:`HEARTBEAT_INTERVAL_S`.
A second run is refused, naming the holder. A lock is stale, and taken over with a warning,
when its PID is dead on this host, or when its heartbeat is older than
:data:`HEARTBEAT_EXPIRY_S` (a holder on another host that died). The lock is released on every
exit path the interpreter sees (normal end, an exception, SIGTERM's save-and-exit); a
``kill -9`` leaves it behind, and the next run finds it stale.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from solopo_mcore.errors import UserError
from solopo_mcore.log import warn

LOCK_NAME = ".solopo-run.lock"
HEARTBEAT_INTERVAL_S = 30.0
HEARTBEAT_EXPIRY_S = 180.0
"""A heartbeat this old means the holder is gone (6 missed beats; clocks of the hosts that
share the folder must agree to within a minute or so)."""


class RunLockError(UserError, RuntimeError):
    """Another live run holds the checkpoint folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # torn or foreign: judged by its age below


def stale_reason(holder: dict, path: Path, now: Optional[float] = None) -> Optional[str]:
    """Why the lock ``holder`` (read from ``path``) is stale, or None if it may be alive."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not _pid_alive(holder["pid"]):
        return f"its process {holder['pid']} on this host ({holder['host']}) is not running"
    beat = holder.get("heartbeat")
    if not isinstance(beat, (int, float)):
        beat = path.stat().st_mtime
    if now - beat > HEARTBEAT_EXPIRY_S:
        return f"its last heartbeat was {now - beat:.0f} s ago (expiry {HEARTBEAT_EXPIRY_S:.0f} s)"
    return None


def describe_holder(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, run id "
            f"{holder.get('run_id', '?')}, started {when}")


class RunLock:
    """The lock of one checkpoint folder (or log path: ``key``, ``lock_name``), held by this
    process until :meth:`release`."""

    def __init__(self, directory: str, run_id: Optional[str] = None,
                 key: str = "checkpoint.save_dir", lock_name: str = LOCK_NAME,
                 value: Optional[str] = None):
        self.directory = Path(directory)
        self.path = self.directory / lock_name
        self.key, self.value = key, value or str(directory)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.time(), "heartbeat": time.time(),
                       "run_id": run_id or os.environ.get("TORCHELASTIC_RUN_ID") or "none"}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.held = False

    def acquire(self) -> "RunLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    continue  # released meanwhile: try again
                reason = stale_reason(holder, self.path)
                if reason is None:
                    harm = ("resume and overwrite each other's checkpoints"
                            if self.key == "checkpoint.save_dir" else
                            "mix their records (and a new run would rename the live one's)")
                    raise RunLockError(
                        f"{self.key}={self.value} is in use by another run "
                        f"({describe_holder(holder)}; lock file {self.path}). Two runs there "
                        f"would {harm}. Wait for it or stop it, or give this run another "
                        f"{self.key}. If that run is certainly gone, delete {self.path}.")
                warn("checkpoint", f"taking over the stale lock {self.path} "
                                   f"({describe_holder(holder)}): {reason}")
                stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
                try:
                    os.replace(self.path, stale)
                    stale.unlink()
                except FileNotFoundError:
                    pass  # another starter took it over first; the O_EXCL retry decides
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            self.held = True
            self._thread = threading.Thread(target=self._beat, name="solopo-run-lock",
                                            daemon=True)
            self._thread.start()
            atexit.register(self.release)
            return self
        raise RunLockError(f"could not take {self.path}: other runs keep replacing it")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            current = _read(self.path)
            if not current or current.get("pid") != self.record["pid"] or \
                    current.get("host") != self.record["host"]:
                warn("checkpoint", f"{self.path} was taken over by another run "
                                   f"({describe_holder(current or {})}); this run no longer "
                                   f"holds checkpoint.save_dir")
                self.held = False
                return
            self.record["heartbeat"] = time.time()
            tmp = self.path.with_name(f"{LOCK_NAME}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self.record))
            os.replace(tmp, self.path)

    def release(self) -> None:
        """Remove the lock if this process still holds it (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.held:
            current = _read(self.path)
            if current and current.get("pid") == self.record["pid"] and \
                    current.get("host") == self.record["host"]:
                self.path.unlink(missing_ok=True)
            self.held = False


def new_run_id() -> str:
    """An id for one invocation of a run: its start time and 6 random hex digits."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def lock_run_paths(paths: dict, run_id: str) -> list:
    """Take the lock of every path a run writes (``{config key: path}``; a folder, or a file
    such as ``logging.metrics_path`` whose lock sits beside it), once per lock file. Refuses,
    naming the key and the holder, when another live run holds one; on a refusal the locks
    taken so far are released."""
    held, seen = [], set()
    try:
        for key, value in paths.items():
            if not value:
                continue
            path = Path(value)
            is_file = key.endswith("_path")
            directory = path.parent if is_file else path
            name = f".{path.name}{LOCK_NAME}" if is_file else LOCK_NAME
            where = (directory.resolve() / name)
            if where in seen:
                continue
            seen.add(where)
            held.append(RunLock(str(directory), run_id, key, name, str(value)).acquire())
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held
