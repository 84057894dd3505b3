"""Checkpoints with Megatron ``dist_checkpointing``: save, keep-last-K, ``latest``, safe resume.

Layout of ``save_dir``::

    iter_0000040/          a complete checkpoint (dist_checkpointing files + checksums.json
                           + solopo_state.json)
    latest                 "40": written (atomically) only after iter_0000040 is complete
    iter_0000030.corrupt/  a checkpoint whose checksums failed on load, moved aside (never deleted)

A save goes to ``iter_N.partial`` first; when every rank has finished, each rank hashes the shard
files it wrote (``checksums.json``), then the marker is written and the folder renamed, so a crash
mid-save never touches the previous checkpoint. On load, ``latest`` is followed if it names a
complete checkpoint; otherwise the newest complete one is used, with a warning naming the bad one.
:func:`find_verified_checkpoint` also verifies the checksums and falls back to the previous
checkpoint (with a warning naming the bad file) unless ``checkpoint.strict_load`` is set.
The model and optimizer are sharded tensors (loadable at another TP/PP layout); the step, the data
position, the LR schedule, the config and each rank's RNG state are in the checkpoint as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from solopo_mcore.errors import UserError
from solopo_mcore.log import log, warn
from solopo_mcore.platform import device_rng_state, set_device_rng_state
from solopo_mcore.processes import protect_checkpoint_writer
from solopo_mcore.storage.optimizer_state import optimizer_state_for_save
from solopo_mcore.storage.writer import OneTensorAtATimeSave
from solopo_mcore.storage.space import WRITE_ERRORS, free_text, gib, is_out_of_space
from solopo_mcore.storage.integrity import (CHECKSUMS, complete_checksums, files_written_by,
                                             hash_files, read_checksums, verify_files,
                                             write_checksums)

COMPLETE_MARKER = "solopo_state.json"
_ITER = re.compile(r"^iter_(\d{7})$")
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(UserError, RuntimeError):
    pass


def iter_dir(root: str, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / "metadata.json").is_file()


def find_checkpoint(root: str) -> Optional[Path]:
    """The checkpoint to resume from: ``latest`` if complete, else the newest complete one."""
    root_path = Path(root)
    if not root_path.is_dir():
        return None
    latest = root_path / "latest"
    if latest.is_file():
        text = latest.read_text().strip()
        candidate = iter_dir(root, int(text)) if text.isdigit() else None
        if candidate is not None and is_complete(candidate):
            return candidate
        warn("checkpoint", f"{latest} names {text!r}, which is not a complete checkpoint"
                           f"; falling back to the newest complete one")
    complete = sorted((p for p in root_path.iterdir() if _ITER.match(p.name) and is_complete(p)),
                      key=lambda p: p.name)
    for bad in (p for p in root_path.iterdir() if _ITER.match(p.name) and not is_complete(p)):
        warn("checkpoint", f"ignoring incomplete checkpoint {bad}")
    return complete[-1] if complete else None


def _complete_newest_first(root: str) -> list[Path]:
    """Complete checkpoints under ``root``: the one ``latest`` names first, then newest first."""
    first = find_checkpoint(root)
    if first is None:
        return []
    others = sorted((p for p in Path(root).iterdir()
                     if _ITER.match(p.name) and is_complete(p) and p != first),
                    key=lambda p: p.name, reverse=True)
    return [first] + others


def verify_checkpoint(path: Path) -> Optional[list[str]]:
    """Collective: every rank checks its round-robin share of ``checksums.json``. Returns the
    problems found (empty: intact), or None for a checkpoint saved without checksums."""
    table = read_checksums(path)
    if table is None:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = verify_files(path, table, rank, world)
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return sorted(p for part in gathered for p in part)


def require_intact(path: Path) -> None:
    """Collective. Raise :class:`CheckpointError` naming every file of ``path`` that fails its
    checksum (a checkpoint without checksums, saved by an older version, is loaded with a
    warning). For readers that must not fall back to another checkpoint: export, evaluation,
    the reference pre-pass."""
    problems = verify_checkpoint(path)
    if problems is None:
        if dist.get_rank() == 0:
            warn("checkpoint", f"{path} has no {CHECKSUMS} (saved by an older version): "
                               f"loading it unverified")
        return
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt:\n  " + "\n  ".join(problems) +
                              "\nRestore its files (or the run's previous checkpoint) from a "
                              "copy; nothing was read from it.")


def _move_aside(path: Path) -> Path:
    target = path.with_name(path.name + ".corrupt")
    k = 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}.corrupt{k}")
    os.replace(path, target)
    return target


def find_verified_checkpoint(root: str, strict: bool) -> Optional[Path]:
    """Collective. The newest complete checkpoint under ``root`` whose files match their
    checksums. A corrupt one is named; with ``strict`` that is an error, otherwise it is moved
    aside to ``iter_N.corrupt`` (so pruning never counts it) and the previous one is tried."""
    candidates = _complete_newest_first(root)
    for path in candidates:
        problems = verify_checkpoint(path)
        if problems is None:
            if dist.get_rank() == 0:
                warn("checkpoint", f"{path} has no {CHECKSUMS} (saved by an older "
                                   f"version): loading it unverified")
            return path
        if not problems:
            return path
        what = f"checkpoint {path} is corrupt:\n  " + "\n  ".join(problems)
        if strict:
            raise CheckpointError(f"{what}\ncheckpoint.strict_load=true, so there is no "
                                  f"fallback. Restore the files, or set "
                                  f"checkpoint.strict_load=false to resume from the previous "
                                  f"intact checkpoint.")
        dist.barrier()  # every rank has read the listing before rank 0 renames
        if dist.get_rank() == 0:
            moved = _move_aside(path)
            warn("checkpoint", f"{what}\nmoved it aside to {moved}; "
                               f"falling back to the previous checkpoint")
        dist.barrier()
    if candidates:
        raise CheckpointError(f"{root}: every checkpoint failed its checksums (moved aside as "
                              f"*.corrupt); nothing intact to resume. Restore one, or start a "
                              f"new run with a new checkpoint.save_dir.")
    return None


def read_marker(path: Path) -> dict:
    return json.loads((Path(path) / COMPLETE_MARKER).read_text())


def _unwrap(chunk):
    """The model chunk inside Megatron's DDP wrapper (a bare chunk is returned as it is)."""
    return getattr(chunk, "module", chunk)


def _model_state(model: list) -> dict:
    if len(model) == 1:
        return {"model": _unwrap(model[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(m).sharded_state_dict() for i, m in enumerate(model)}


def _rng_object(rank: int, world: int) -> ShardedObject:
    state = {"python_rng_state": None, "torch_rng_state": torch.get_rng_state(),
             "cuda_rng_state": device_rng_state(),
             "tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer real state tensors (and a step count) before loading into it.

    Without apex/Transformer Engine, megatron-core's optimizers read ``state['step']`` while
    building the sharded state dict to load into, and a never-stepped torch Adam has none. One
    step on zero gradients creates the state; everything it touches is then overwritten by the
    load (model and main parameters, moments, step)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        if any(len(inner.state[p]) for group in inner.param_groups for p in group["params"]):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad(set_to_none=True)


def checkpoint_num_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


_gib = gib


class CheckpointManager:
    def __init__(self, save_dir: Optional[str], keep_last: int):
        self.save_dir = save_dir
        self.keep_last = keep_last

    def space_problem(self) -> Optional[str]:
        """A warning when the disk under ``save_dir`` has less free space than the newest
        complete checkpoint there takes (the next save needs as much), else None."""
        if not self.save_dir or not Path(self.save_dir).is_dir():
            return None
        newest = find_checkpoint(self.save_dir)
        if newest is None:
            return None
        needed, free = checkpoint_num_bytes(newest), shutil.disk_usage(self.save_dir).free
        if free >= needed:
            return None
        return (f"{self.save_dir}: {_gib(free)} free, the next checkpoint needs about "
                f"{_gib(needed)} (the size of {newest.name}); free space, lower "
                f"checkpoint.keep_last, or move checkpoint.save_dir to a larger disk")

    def save(self, step: int, model: list, optimizer, scheduler, state: dict,
             sharded_strategy=None) -> Path:
        """Collective. ``state`` (JSON-able: data position, counters, config) goes in the marker.
        ``sharded_strategy``: a dist_checkpointing save strategy (default:
        :class:`~solopo_mcore.storage.writer.OneTensorAtATimeSave`, megatron's format written
        one tensor at a time)."""
        if self.save_dir is None:
            raise CheckpointError("checkpoint.save_dir is not set")
        rank, world = dist.get_rank(), dist.get_world_size()
        final = iter_dir(self.save_dir, step)
        partial = final.with_name(final.name + ".partial")
        start = time.time()
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        sharded = _model_state(model)
        if optimizer is not None:
            sharded["optimizer"] = optimizer_state_for_save(optimizer, sharded,
                                                            OPTIMIZER_METADATA)
        sharded["rng_state"] = _rng_object(rank, world)
        sharded["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        protect_checkpoint_writer()
        if rank == 0:
            problem = self.space_problem()
            if problem:
                warn("checkpoint", problem)
        try:
            dist_checkpointing.save(sharded, str(partial),
                                    sharded_strategy=sharded_strategy or OneTensorAtATimeSave())
        except WRITE_ERRORS as exc:
            if not is_out_of_space(exc, partial):
                raise
            self._fail_disk_full(step, final, partial, rank)
        dist.barrier()
        exclude = (COMPLETE_MARKER, CHECKSUMS)
        mine = hash_files(partial, files_written_by(partial, rank, exclude))
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            merged = {name: entry for part in gathered for name, entry in part.items()}
            write_checksums(partial, complete_checksums(partial, merged, exclude))
            marker = {"step": step, "world_size": world, "saved_at": time.time(), **state}
            (partial / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            tmp = Path(self.save_dir) / "latest.tmp"
            tmp.write_text(str(step))
            os.replace(tmp, Path(self.save_dir) / "latest")
            self._prune()
            log("checkpoint", f"saved {final} in {time.time() - start:.1f}s")
        dist.barrier()
        return final

    def remove_stale_partials(self) -> list:
        """Remove ``iter_N.partial`` folders left by a save whose writer died (killed, out of
        memory, out of space). Call only while holding the run's lock (no live writer). Returns
        what was removed."""
        if not self.save_dir or not Path(self.save_dir).is_dir():
            return []
        stale = sorted(p for p in Path(self.save_dir).iterdir()
                       if p.is_dir() and p.name.endswith(".partial") and
                       _ITER.match(p.name[:-len(".partial")]))
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
            log("checkpoint", f"removed {folder}: a save that never completed (its writer "
                              f"stopped); the checkpoints before it are unaffected")
        return stale

    def _fail_disk_full(self, step: int, final: Path, partial: Path, rank: int) -> None:
        """The disk filled up during a save: remove the partial save and raise one line."""
        latest = find_checkpoint(self.save_dir)
        needed = checkpoint_num_bytes(latest) if latest is not None else None
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        need = f"about {_gib(needed)} needed (the size of {latest.name}), " if needed else ""
        kept = (f"the last good checkpoint {latest} is intact and stays latest"
                if latest is not None else "no earlier checkpoint exists")
        raise CheckpointError(
            f"no space left on the device while saving step {step} to {final}: {need}"
            f"{free_text(self.save_dir)} after removing the partial save; {kept}. Free space "
            f"(or lower "
            f"checkpoint.keep_last, or move checkpoint.save_dir to a larger disk) and run the "
            f"same command again to resume.")

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints. The newest is the one just saved
        (its checksums were computed from the files on disk); checkpoints found corrupt on load
        were moved aside, so they never take the place of an intact one."""
        complete = sorted(p for p in Path(self.save_dir).iterdir()
                          if _ITER.match(p.name) and is_complete(p))
        for old in complete[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(path: Path, model: list, optimizer=None, scheduler=None, load_rng: bool = True,
             verified: bool = False) -> dict:
        """Collective. Load into the (already built, wrapped) model and optimizer; return the
        marker state. The files are checked against their checksums first
        (:func:`require_intact`) unless the caller has just done so (``verified``: a checkpoint
        :func:`find_verified_checkpoint` returned)."""
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} "
                                  f"or metadata.json)")
        if not verified:
            require_intact(path)
        marker = json.loads((path / COMPLETE_MARKER).read_text())
        sharded = _model_state(model)
        if optimizer is not None:
            _materialize_optimizer_state(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True,
                                                                metadata=OPTIMIZER_METADATA)
        same_world = marker.get("world_size") == dist.get_world_size()
        if load_rng and same_world:
            sharded["rng_state"] = _rng_object(dist.get_rank(), dist.get_world_size())
        try:
            state = dist_checkpointing.load(sharded, str(path))
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise CheckpointError(f"failed to load {path}: {exc}") from exc
        keys = [k for k in state if k.startswith("model")]
        for chunk, key in zip(model, sorted(keys)):
            _unwrap(chunk).load_state_dict(state[key], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if "rng_state" in state:
            rng = state["rng_state"]
            torch.set_rng_state(rng["torch_rng_state"])
            set_device_rng_state(rng["cuda_rng_state"])
            tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker_states"])
        return marker


def save_model_only(path: str, model: list, step: int = 0, state: Optional[dict] = None,
                    sharded_strategy=None) -> Path:
    """A weights-only checkpoint (the converter's output): ``path/iter_0000000`` + ``latest``."""
    manager = CheckpointManager(path, keep_last=1)
    return manager.save(step, model, None, None, dict(state or {}, weights_only=True),
                        sharded_strategy=sharded_strategy)
