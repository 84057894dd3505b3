"""The device boundary: everything that differs between CPU/gloo and CUDA/NCCL, in one place.

No other module of the package asks ``torch.cuda`` anything or names a backend; they call the
functions below. Three parts:

* **Device queries and actions** (:func:`on_cuda`, :func:`default_device`,
  :func:`distributed_backend`, :func:`is_gloo`, :func:`synchronize`, memory statistics, RNG state,
  device name, SDPA backend order, the ``TransformerConfig`` fields that depend on the device).
  The CUDA side of each is listed in docs/design.md ("Runs only on GPU, untested here") and
  exercised by ``benchmarks/device_run.sh``.
* :func:`apply_cpu_patches`: megatron-core assumes a CUDA device in a handful of places; these
  patches make them work on a CPU-only torch with gloo. A no-op when CUDA is available.
* :func:`apply_megatron_fixes`: megatron-core paths that break without apex/Transformer Engine,
  on CPU and GPU alike.

megatron-core *version* differences live in :mod:`solopo_mcore.compat`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

GIB = 1024 ** 3

# ---------------------------------------------------------------------------------------------
# Device queries
# ---------------------------------------------------------------------------------------------


def on_cuda() -> bool:
    """True when this process computes on a CUDA device."""
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def default_device() -> torch.device:
    """The device a rank computes on: its local CUDA device, or CPU. Cached: call it after
    :func:`set_local_device` (``parallel.layout.init_distributed``)."""
    if on_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed_backend() -> str:
    """The torch.distributed backend for this machine: NCCL with CUDA, else gloo."""
    return "nccl" if on_cuda() else "gloo"


def is_gloo(group=None) -> bool:
    """True when ``group`` (default: the world) communicates through gloo. gloo-only workarounds
    ask this, not whether CUDA is present: a GPU run with NCCL must not pay for them."""
    if dist.is_initialized():
        return dist.get_backend(group) == "gloo"
    return distributed_backend() == "gloo"


def set_local_device() -> None:
    """Bind this process to its ``LOCAL_RANK`` GPU (nothing on CPU)."""
    if on_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def device_name() -> str:
    """Human-readable name of the compute device (the GPU's, or the CPU with its thread count)."""
    if on_cuda():
        return torch.cuda.get_device_name()
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def transformer_engine_available() -> bool:
    """Transformer Engine importable and a CUDA device present (TE has no CPU path)."""
    import importlib.util
    return importlib.util.find_spec("transformer_engine") is not None and on_cuda()


def unsupported_on_cpu(feature: str) -> Optional[str]:
    """Why ``feature`` cannot run on this machine, or None when it can.

    ``feature``: "optimizer_cpu_offload" (on CPU the optimizer state is in host memory
    already)."""
    if on_cuda():
        return None
    reasons = {
        "optimizer_cpu_offload": "needs a CUDA device (without one the optimizer state is in "
                                 "host memory already)",
    }
    return reasons[feature]


# ---------------------------------------------------------------------------------------------
# Device actions: synchronisation, memory, RNG, profiler
# ---------------------------------------------------------------------------------------------


def synchronize() -> None:
    """Wait for queued device work (timing); nothing to wait for on CPU."""
    if on_cuda():
        torch.cuda.synchronize()


def empty_cache() -> None:
    """Return cached allocator blocks to the device (between profiler settings)."""
    if on_cuda():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    """Restart the CUDA allocator's peak counters (CPU peaks are measured per block instead)."""
    if on_cuda():
        torch.cuda.reset_peak_memory_stats()


@functools.lru_cache(maxsize=1)
def _nvml_handle():
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - NVML is optional
        return None


def device_memory_stats() -> dict:
    """The CUDA allocator's figures and NVML's used memory, in GiB, namespaced ``memory/...``;
    empty on CPU (the caller adds host figures)."""
    if not on_cuda():
        return {}
    out = {"memory/max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
           "memory/max_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
           "memory/allocated_gib": torch.cuda.memory_allocated() / GIB}
    nvml = _nvml_handle()
    if nvml is not None:
        lib, handle = nvml
        out["memory/nvml_used_gib"] = lib.nvmlDeviceGetMemoryInfo(handle).used / GIB
    return out


#: glibc's ``M_MMAP_THRESHOLD`` (malloc.h); fixing it also stops its dynamic adjustment.
_M_MMAP_THRESHOLD = -3


def return_freed_tensors_to_the_system(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation of ``threshold_bytes`` or more with its own ``mmap`` (glibc), so
    that freeing it returns the memory to the system at once. By default glibc raises that
    threshold to the size of the largest block freed so far (up to 32 MiB); a process that
    frees and allocates layer-sized tensors in turn, as the converter does one layer at a
    time, then serves them from its heap, which fragments and keeps growing (measured: a
    16-layer export peaked 0.13 GB (~0.5x the weights it added) above a 2-layer one of the
    same width; with this, 0.003 GB). Not for training, whose CPU tensors would pay a page
    fault per reuse. Returns whether it applied (Linux with glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False


def device_rng_state() -> Optional[torch.Tensor]:
    """The CUDA generator's state to checkpoint (None on CPU: the CPU generator is saved apart)."""
    return torch.cuda.get_rng_state() if on_cuda() else None


def set_device_rng_state(state: Optional[torch.Tensor]) -> None:
    """Restore :func:`device_rng_state`'s value (ignored on CPU or when saved without CUDA)."""
    if on_cuda() and state is not None:
        torch.cuda.set_rng_state(state)


def profiler_activities() -> list:
    """torch.profiler activities for a trace: CPU, plus CUDA kernels on a GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_cuda():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def sdpa_backend_order(name: str, device: torch.device) -> list:
    """SDPA backends to allow, in priority order, for ``ModelConfig.attention_backend``.

    "auto": cuDNN > flash > efficient > math on CUDA (cuDNN measured 1.7-4x flash on Hopper);
    on CPU torch's flash kernel, then math (benchmarks/RESULTS.md)."""
    named = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if name != "auto":
        return [named[name]]
    if torch.device(device).type != "cuda":
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def transformer_config_overrides(transformer_engine: bool) -> dict:
    """Megatron ``TransformerConfig`` fields that depend on the device and backend.

    ``transformer_engine``: whether the TE layer spec is used (RoPE / grad-accumulation fusions
    need TE or apex)."""
    cuda = on_cuda()
    out = dict(
        use_cpu_initialization=not cuda,
        # Megatron's torch.compile'd bias_swiglu keeps only FC1's output for backward (3 f instead
        # of 5 f activations per token, profiling/estimator.py); bias_dropout_add is compiled too.
        # On CPU the eager path measured faster.
        bias_activation_fusion=cuda,
        bias_dropout_fusion=cuda,
        apply_rope_fusion=transformer_engine and cuda,
        gradient_accumulation_fusion=transformer_engine and cuda,
    )
    if distributed_backend() == "gloo":
        # p2p_communication.py ``_batched_p2p_ops``: gloo matches batched isend/irecv out of order
        # in the interleaved (virtual pipeline) schedule, swapping microbatches; send one by one.
        out["batch_p2p_comm"] = False
    return out


# ---------------------------------------------------------------------------------------------
# CPU patches (megatron-core 0.16.1 .. 0.19.x on a CPU-only torch with gloo)
# ---------------------------------------------------------------------------------------------

_APPLIED = False

# Tensor factories and movers whose ``device=`` argument megatron hard-codes to "cuda".
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` to CPU and reports CUDA type names for CPU float tensors.

    Works around, in megatron-core 0.16.1 (and still in 0.19):
      - ``pipeline_parallel/schedules.py``: ``torch.zeros([], device="cuda")`` (token counter);
      - ``distributed/param_and_grad_buffer.py``, ``optimizer/optimizer.py``,
        ``optimizer/clip_grads.py``, ``optimizer/grad_scaler.py``: ``torch.tensor(..., device='cuda')``;
      - ``optimizer/optimizer.py`` / ``distrib_optimizer.py`` / ``clip_grads.py``:
        ``param.type() == 'torch.cuda.FloatTensor'`` checks when wrapping and clipping.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_get_rng_state(device=None, clone=True, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def apply_cpu_patches() -> bool:
    """Apply the CPU patches once, if CUDA is absent. Returns True when they are active."""
    global _APPLIED
    if on_cuda():
        return False
    if _APPLIED:
        return True
    import warnings

    from megatron.core.tensor_parallel import random as mcore_random

    # Warnings the CPU path itself causes, printed per rank: CUDA_DEVICE_MAX_CONNECTIONS means
    # nothing without CUDA, and megatron-core reading ``.grad`` of a non-leaf tensor is reported
    # at our torch-function mode below (the same read on CUDA is silent).
    warnings.filterwarnings("ignore", message=r"When using sequence parallelism it is recommended "
                                              r"to set the environment variable "
                                              r"CUDA_DEVICE_MAX_CONNECTIONS")
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a "
                                              r"leaf Tensor", module=r"solopo_mcore\.platform")
    # rotary_pos_embedding.py / param buffers: ``torch.cuda.current_device()`` used as a device.
    torch.cuda.current_device = lambda: "cpu"
    # schedules.py p2p shape exchange, dist_checkpointing: ``torch.cuda.synchronize()``.
    torch.cuda.synchronize = lambda *a, **k: None
    # megatron-core 0.19 ``distributed/param_and_grad_buffer.py`` ``start_grad_sync`` takes
    # ``torch.cuda.current_stream()`` to wait on CUDA-graph events before every gradient
    # reduce ("Found no NVIDIA driver" on CPU). torch's CPU stream has the same
    # ``wait_event`` / ``wait_stream`` methods. Unused by 0.16.1 on this path, so harmless there.
    torch.cuda.current_stream = lambda *a, **k: torch.cpu.current_stream()
    # tensor_parallel/random.py: ``torch.cuda.get_rng_state`` / ``manual_seed`` in the RNG tracker
    # (``CudaRNGStatesTracker.add``) and ``model_parallel_cuda_manual_seed``.
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    # tensor_parallel/random.py: ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` used by
    # ``CudaRNGStatesTracker.fork`` and ``tensor_parallel.checkpoint`` (activation recompute).
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    # transformer/utils.py ``get_default_causal_mask``: ``torch.triu(..., device="cuda")``, and the
    # device/type checks listed on _CudaToCpuMode.
    global _MODE
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _APPLIED = True
    return True


_MODE: Optional[TorchFunctionMode] = None


@contextlib.contextmanager
def without_cuda_rewrite():
    """Runs its block without the CUDA-to-CPU torch-function mode (a no-op on CUDA).

    The mode sees every torch call from Python (~3.6 us each on our CPU): most of a step's calls
    are the model's forward and the loss, which never name a CUDA device (device placement there
    follows the inputs, and ``torch.cuda.current_device`` is patched above), so
    :mod:`solopo_mcore.training.forward_step` runs them without it. Every convergence layout
    runs this path in CI; a ``device="cuda"`` reaching it would fail there with "no NVIDIA
    driver"."""
    if _MODE is None or torch.overrides._get_current_function_mode() is not _MODE:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


# ---------------------------------------------------------------------------------------------
# Fixes for megatron-core without apex / Transformer Engine (CPU and GPU)
# ---------------------------------------------------------------------------------------------

_FIXED = False


def apply_megatron_fixes() -> None:
    """Fixes for megatron-core paths that break without apex/Transformer Engine (on CPU and on
    GPUs alike). Idempotent. Checked unchanged from 0.16.1 through 0.19.2."""
    global _FIXED
    if _FIXED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    # distrib_optimizer.py ``_set_main_param_and_optimizer_states`` / ``load_state_dict``: with
    # torch's Adam (no apex/TE FusedAdam) the state holds a per-parameter "step" that the loaders
    # leave out of ``tensors``, so the copy loop raises KeyError('step') on every load; and
    # ``load_state_dict`` gives every parameter the *same* step tensor, which torch's foreach
    # Adam then increments once per parameter, corrupting bias correction after a resume.
    # Keep the restored step, as a tensor of the parameter's own.
    def set_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state and "step" not in tensors:
                state["step"] = state["step"].detach().clone()
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    _FIXED = True
