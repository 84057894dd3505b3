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


class PeakRSSSampler:
    """Peak resident set size while the block runs, sampled by a thread (CPU runs, where the
    torch allocator keeps no statistics and ``ru_maxrss`` never goes down)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak_gib = 0.0
        self._stop = None
        self._thread = None

    def __enter__(self):
        import threading
        process = psutil.Process()
        self._stop = threading.Event()
        self.peak_gib = process.memory_info().rss / GIB

        def sample():
            while not self._stop.is_set():
                self.peak_gib = max(self.peak_gib, process.memory_info().rss / GIB)
                self._stop.wait(self.interval_s)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_gib = max(self.peak_gib, psutil.Process().memory_info().rss / GIB)
        return False
