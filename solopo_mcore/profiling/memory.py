"""Memory figures: the torch allocator and NVML on GPU (``platform.device_memory_stats``); on CPU
the allocator's peak (profiler memory events) plus the live tensors, and resident set size."""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import sys

import psutil
import torch

from solopo_mcore.platform import GIB, device_memory_stats, reset_peak_memory


def peak_rss_bytes() -> int:
    """This process's peak resident set size, in bytes. On Linux the kernel's high-water mark
    of this process image (``VmHWM``), which starts afresh at ``exec``: ``ru_maxrss`` instead
    keeps the larger of it and the RSS of the process that forked this one (a launcher, or a
    test runner holding a model), so a small process started by a large one reports the large
    one's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(max_rss if sys.platform == "darwin" else max_rss * 1024)


def memory_stats() -> dict:
    """Namespaced memory metrics for this rank, in GiB: the device allocator's and NVML's on a
    GPU, and the process's resident set everywhere."""
    out = device_memory_stats()
    out["memory/rss_gib"] = psutil.Process().memory_info().rss / GIB
    out["memory/max_rss_gib"] = peak_rss_bytes() / GIB
    return out


def reset_peak() -> None:
    """Restart the device allocator's peak counters (a no-op on CPU)."""
    reset_peak_memory()


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


def live_storages() -> dict:
    """``{data_ptr: bytes}`` of every distinct tensor storage reachable from Python right now
    (weights, DDP buffers, optimizer state...): the static part of a CPU run's tensor memory."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.is_meta:
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (fakes, sparse)
            continue
        if storage.data_ptr():
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0),
                                               storage.nbytes())
    return storages


@contextlib.contextmanager
def silenced_native_output():
    """Discard what native code writes to fd 1 and 2 while the block runs.

    Kineto prints ``USDT: ... profiler_start`` / ``profiler_stop`` to stderr from C++ each time a
    CPU profiler starts or stops (torch 2.13; no environment setting turns it off), i.e. on every
    measured step; this wraps only the start and the stop, never the measured work."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


class AllocatorPeakTracker:
    """Peak bytes held by the CPU allocator for tensors allocated while the block runs.

    The CPU counterpart of ``torch.cuda.max_memory_allocated()`` minus what was allocated at
    entry: torch's profiler reports every allocation and free of the c10 CPU allocator (forward,
    backward, recompute, kernel workspaces, collectives' buffers); their running sum's maximum is
    the peak. Unlike process RSS it excludes the framework, the Python heap and the pages malloc
    keeps, so it is the figure the memory estimator is validated against on CPU. Frees of tensors
    allocated before the block are not reported, so the sum never counts them.
    """

    def __init__(self):
        self.peak_bytes = 0
        self.net_bytes = 0
        """Allocated during the block and still held at its end."""
        self._profile = None

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with silenced_native_output():
            self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        with silenced_native_output():
            self._profile.__exit__(*exc)
        current = 0
        for nbytes in self._memory_events():
            current += nbytes
            self.peak_bytes = max(self.peak_bytes, current)
        self.net_bytes = current
        return False

    def _memory_events(self) -> list:
        events = [e for e in self._profile.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_index() == -1]
        return [e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())]
