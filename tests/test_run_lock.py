"""One run per checkpoint folder (solopo_mcore/storage/lock.py): a live holder is named and the
second run refused; a dead or silent holder's lock is taken over with a warning; release
removes it. (A second trainer against a running one: tests/test_training_e2e.py, SIGTERM.)"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from solopo_mcore.storage import lock as lock_mod
from solopo_mcore.storage.lock import LOCK_NAME, RunLock, RunLockError


def _write_holder(folder, **fields):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "heartbeat": time.time(), "run_id": "other", **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(record))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_run_is_refused_naming_the_holder_and_release_frees_the_folder(tmp_path):
    first = RunLock(str(tmp_path / "ckpt"), run_id="job-1").acquire()
    holder = json.loads((tmp_path / "ckpt" / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["run_id"] == "job-1"
    with pytest.raises(RunLockError, match=rf"in use by another run \(host "
                                           rf"{socket.gethostname()}, PID {os.getpid()}, "
                                           rf"run id job-1.*another checkpoint.save_dir"):
        RunLock(str(tmp_path / "ckpt")).acquire()
    first.release()
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists()
    first.release()  # idempotent
    RunLock(str(tmp_path / "ckpt")).acquire().release()


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, capsys):
    dead = _dead_pid()
    _write_holder(tmp_path, pid=dead)
    taken = RunLock(str(tmp_path)).acquire()
    out = capsys.readouterr().out
    assert "WARNING: taking over the stale lock" in out and \
        f"its process {dead} on this host" in out, out
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    taken.release()


def test_a_silent_holder_on_another_host_expires_and_a_live_one_does_not(tmp_path):
    _write_holder(tmp_path, host="node-elsewhere", pid=1,
                  heartbeat=time.time() - lock_mod.HEARTBEAT_EXPIRY_S - 5)
    RunLock(str(tmp_path)).acquire().release()
    _write_holder(tmp_path, host="node-elsewhere", pid=1, heartbeat=time.time() - 10)
    with pytest.raises(RunLockError, match="host node-elsewhere, PID 1"):
        RunLock(str(tmp_path)).acquire()


def test_the_heartbeat_keeps_a_long_run_alive(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_mod, "HEARTBEAT_INTERVAL_S", 0.05)
    held = RunLock(str(tmp_path)).acquire()
    first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.4)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
    held.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_log_paths_are_locked_too_and_a_second_run_is_refused_naming_the_key(tmp_path):
    from solopo_mcore.storage.lock import lock_run_paths

    paths = {"checkpoint.save_dir": str(tmp_path / "ckpt"),
             "logging.metrics_path": str(tmp_path / "logs" / "metrics.jsonl"),
             "logging.tensorboard_dir": str(tmp_path / "ckpt"),  # the same folder: one lock
             "logging.wandb_dir": None}
    first = lock_run_paths(paths, "run-a")
    assert len(first) == 2
    assert (tmp_path / "logs" / f".metrics.jsonl{LOCK_NAME}").is_file()
    # another run with its own save_dir but the same metrics file
    with pytest.raises(RunLockError, match=rf"logging.metrics_path={tmp_path}/logs/metrics.jsonl "
                                           rf"is in use by another run \(host .*run id run-a"):
        lock_run_paths({"checkpoint.save_dir": str(tmp_path / "other"),
                        "logging.metrics_path": paths["logging.metrics_path"]}, "run-b")
    # what it had taken before the refusal is released: the other save_dir is free again
    assert not (tmp_path / "other" / LOCK_NAME).exists()
    with pytest.raises(RunLockError, match="logging.tensorboard_dir=.* would mix their records"):
        lock_run_paths({"logging.tensorboard_dir": str(tmp_path / "ckpt")}, "run-c")
    for lock in first:
        lock.release()
    assert len(lock_run_paths(paths, "run-d")) == 2
