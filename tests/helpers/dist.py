"""Launch N gloo processes on free ports and report each rank's failure readably.

``run_distributed(world_size, "tests.helpers.some_module:function", **kwargs)`` starts ``world_size``
spawned processes, each calling ``function(**kwargs)`` after setting RANK/WORLD_SIZE/MASTER_*.
Each rank's return value is collected; any rank's exception fails the call with that rank's
traceback in the message.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import traceback
from typing import Any

from tests.helpers.launch import free_port


def _entry(rank: int, world_size: int, port: int, target: str, kwargs: dict, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    try:
        import warnings
        warnings.filterwarnings("ignore")
        import torch
        torch.set_num_threads(1)
        module_name, fn_name = target.split(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        result = fn(**kwargs)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from solopo_mcore.parallel.layout import destroy_parallel
            destroy_parallel()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(world_size: int, target: str, timeout_s: float = 300, **kwargs) -> list:
    """Run ``target`` on ``world_size`` gloo ranks; return the per-rank results in rank order.
    The ranks are forked by the warm launcher (tests/helpers/warm_launch.py), or spawned here
    with ``SOLOPO_TEST_REAL_TORCHRUN=1``."""
    from tests.helpers import warm_launch
    from tests.helpers.launch import REPO
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    outcomes = warm_launch.call(world_size, target, kwargs, REPO, env, timeout_s, free_port())
    if outcomes is not None:
        errors = {r: payload for r, (status, payload) in outcomes.items() if status != "ok"}
        missing = set(range(world_size)) - set(outcomes)
        if missing and not errors:
            errors[-1] = f"ranks {sorted(missing)} returned nothing"
        if errors:
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"{target} failed on {world_size} ranks:\n{text}")
        return [outcomes[r][1] for r in range(world_size)]
    return _spawned(world_size, target, timeout_s, kwargs)


def _spawned(world_size: int, target: str, timeout_s: float, kwargs: dict) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, target, kwargs, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world_size):
            # once a rank has failed the others usually fail or hang soon: wait briefly for them
            rank, status, payload = queue.get(timeout=15 if errors else timeout_s)
            if status == "ok":
                results[rank] = payload
            else:
                errors[rank] = payload
    except Exception as exc:  # noqa: BLE001 - queue.Empty on a hang
        if not errors:
            missing = sorted(set(range(world_size)) - set(results))
            errors[-1] = f"timed out after {timeout_s}s waiting for ranks {missing}: {exc!r}"
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"{target} failed on {world_size} ranks:\n{text}")
    return [results[r] for r in range(world_size)]
