"""Recognising a full disk however the failure arrives, and saying so in one line.

A full filesystem reaches us as ``OSError(ENOSPC)`` (or ``EDQUOT``) somewhere in an exception's
cause chain, inside ``dist_checkpointing``'s per-rank failures, or only as the writer's own words
(torch's ``PytorchStreamWriter``: ``unexpected pos 704 vs 598``, a short write whose errno is
lost). The last kind is recognised by checking the folder's free space after the failure.
Tests mount a real small tmpfs (tests/test_full_disk.py).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional

from torch.distributed.checkpoint.api import CheckpointException

#: What a failed write raises: torch's ``CheckpointException`` (dist_checkpointing's per-rank
#: failures) derives from BaseException, so ``except Exception`` alone misses a full disk.
WRITE_ERRORS = (Exception, CheckpointException)

#: Words of write failures that lose their errno (torch's stream writer, dist_checkpointing).
_WRITE_FAILURE_WORDS = ("unexpected pos", "PytorchStreamWriter failed", "file write failed",
                        "Worker failure", "write failed")
#: A write failure with less free space than this is taken as a full disk.
NEARLY_FULL_BYTES = 64 * 2**20


def _chain(exc: BaseException):
    seen, todo = set(), [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        todo += [err.__cause__, err.__context__]
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
            todo += [f[0] for f in failures.values()
                     if isinstance(f, tuple) and f and isinstance(f[0], BaseException)]


def free_bytes(folder) -> Optional[int]:
    """Free bytes on the filesystem holding ``folder`` (its nearest existing parent)."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_out_of_space(exc: BaseException, folder) -> bool:
    """Whether ``exc`` means the filesystem of ``folder`` is full: ENOSPC / EDQUOT anywhere in
    what it wraps, the words of those errors, or a write failure whose cause is lost while the
    folder's filesystem has (almost) no free space left."""
    texts = []
    for err in _chain(exc):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        texts.append(str(err))
    text = " ".join(texts)
    if "No space left on device" in text or "[Errno 28]" in text or \
            "Disk quota exceeded" in text or "[Errno 122]" in text:
        return True
    if any(word in text for word in _WRITE_FAILURE_WORDS):
        free = free_bytes(folder)
        return free is not None and free < NEARLY_FULL_BYTES
    return False


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def free_text(folder) -> str:
    """``"0.00 GiB free on /mnt/x"``-style words for a message (the filesystem's mount point)."""
    free = free_bytes(folder)
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    mount = path.resolve()
    while not mount.is_mount() and mount != mount.parent:
        mount = mount.parent
    return f"{_human(free) if free is not None else 'unknown space'} free on {mount}"


def _human(num_bytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes / 1024:.0f} KiB"
