"""Memory figures: the torch allocator and NVML on GPU, resident set size on CPU."""

from __future__ import annotations

import functools
import resource
import sys

import psutil
import torch

GIB = 1024 ** 3


@functools.lru_cache(maxsize=1)
def _nvml_handle():
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - NVML is optional
        return None


def memory_stats() -> dict:
    """Namespaced memory metrics for this rank, in GiB."""
    out = {}
    if torch.cuda.is_available():
        out["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        out["memory/max_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        out["memory/allocated_gib"] = torch.cuda.memory_allocated() / GIB
        nvml = _nvml_handle()
        if nvml is not None:
            lib, handle = nvml
            out["memory/nvml_used_gib"] = lib.nvmlDeviceGetMemoryInfo(handle).used / GIB
    out["memory/rss_gib"] = psutil.Process().memory_info().rss / GIB
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out["memory/max_rss_gib"] = max_rss / (GIB if sys.platform == "darwin" else 1024 ** 2)
    return out


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
