"""The library's one console logger, rank-aware.

``log(tag, message)`` prints ``[tag] message`` once per job, from global rank 0; ``warn`` adds
``WARNING:``. With ``all_ranks=True`` every rank prints, prefixed with its rank (for findings
only some ranks make, such as a checksum one rank verified). Lines go to stdout, flushed, so they
interleave in order with the trainer's metric lines. Errors are not logged here: they are raised,
and :mod:`solopo_mcore.errors` reports them once.
"""

from __future__ import annotations

import os


def global_rank() -> int:
    """This process's rank in the default process group (RANK before it exists; 0 alone)."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isdigit() else 0


def log(tag: str, message: str, all_ranks: bool = False) -> None:
    """Print ``[tag] message`` (every line of a multi-line message carries the tag)."""
    rank = global_rank()
    if rank != 0 and not all_ranks:
        return
    prefix = f"[{tag}]" + (f" [rank {rank}]" if all_ranks else "")
    print("\n".join(f"{prefix} {line}" for line in message.split("\n")), flush=True)


def warn(tag: str, message: str, all_ranks: bool = False) -> None:
    """:func:`log` with ``WARNING:`` in front of the message."""
    log(tag, "WARNING: " + message, all_ranks)
