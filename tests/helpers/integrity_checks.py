"""Per-rank body of the checkpoint checksum test (run through tests/dist_harness.py)."""

from __future__ import annotations

import os
from pathlib import Path


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _strict_load_error(root: Path):
    """The error a strict search for a verified checkpoint in ``root`` raises, or None."""
    from solopo_mcore.storage.checkpoint import CheckpointError, find_verified_checkpoint

    try:
        find_verified_checkpoint(str(root), strict=True)
    except CheckpointError as exc:
        return str(exc)
    return None


def check_checksums_and_fallback(hf_dir: str, root: str) -> dict:
    import torch

    from solopo_mcore.storage.checkpoint import CheckpointManager, find_verified_checkpoint
    from tests.helpers.layout_checks import _setup

    root = Path(root)
    _, _, _, model, _, _ = _setup(hf_dir)
    weights = [p.detach().clone() for p in model[0].parameters()]
    manager = CheckpointManager(str(root), keep_last=2)
    manager.save(2, model, None, None, {})
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(1.0)
    manager.save(4, model, None, None, {})
    out = {"saved": _names(root / "iter_0000004")}

    # random bytes written into the latest shard (same size): strict -> error naming the file
    shard = sorted((root / "iter_0000004").glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        f.write(os.urandom(64))
    out["strict_error"] = _strict_load_error(root)
    from solopo_mcore.storage.checkpoint import CheckpointError
    try:  # a reader given the path itself (the converter, evaluation) verifies it as well
        CheckpointManager.load(root / "iter_0000004", model, load_rng=False)
        out["direct_load_error"] = None
    except CheckpointError as exc:
        out["direct_load_error"] = str(exc)
    out["shard"] = str(shard)
    out["after_strict"] = _names(root)

    # not strict: moved aside, the previous checkpoint is used, and loads the right weights
    found = find_verified_checkpoint(str(root), strict=False)
    out["fallback"] = found.name
    out["after_fallback"] = _names(root)
    CheckpointManager.load(found, model, load_rng=False)
    out["loaded_step2_weights"] = all(torch.equal(a, b.detach())
                                      for a, b in zip(weights, model[0].parameters()))

    # the next saves prune: the corrupt one never counts, the newest intact ones are kept
    manager.save(6, model, None, None, {})
    out["after_save6"] = _names(root)

    # a truncated latest shard: named (size), fallback to iter_2
    shard6 = sorted((root / "iter_0000006").glob("*.distcp"))[-1]
    with open(shard6, "r+b") as f:
        f.truncate(os.path.getsize(shard6) - 100)
    out["truncated_error"] = _strict_load_error(root)
    out["shard6"] = str(shard6)
    out["truncated_fallback"] = find_verified_checkpoint(str(root), strict=False).name
    return out


def check_disk_full_during_save(hf_dir: str, root: str) -> dict:
    """A save that hits ENOSPC inside dist_checkpointing (simulated: it writes a shard, then the
    disk is full): one clear error, the partial save removed, ``latest`` and the previous
    checkpoint untouched and loadable."""
    import errno

    from megatron.core import dist_checkpointing

    from solopo_mcore.storage import checkpoint as storage
    from tests.helpers.layout_checks import _setup

    root = Path(root)
    _, _, _, model, _, _ = _setup(hf_dir)
    manager = storage.CheckpointManager(str(root), keep_last=2)
    manager.save(2, model, None, None, {})
    real_save = dist_checkpointing.save

    def full_disk_save(sharded, directory, *args, **kwargs):
        (Path(directory) / "__0_0.distcp").write_bytes(b"x" * 1000)
        raise RuntimeError("CheckpointException ranks:dict_keys([0])") from OSError(
            errno.ENOSPC, "No space left on device")
    storage.dist_checkpointing.save = full_disk_save
    try:
        manager.save(4, model, None, None, {})
        out = {"error": None}
    except storage.CheckpointError as exc:
        out = {"error": str(exc)}
    finally:
        storage.dist_checkpointing.save = real_save
    out["after"] = _names(root)
    out["latest"] = (root / "latest").read_text()
    out["loads"] = storage.CheckpointManager.load(root / "iter_0000002", model,
                                                  load_rng=False)["step"]
    return out
