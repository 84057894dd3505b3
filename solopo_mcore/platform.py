"""CPU compatibility for megatron-core 0.16.1: every CUDA assumption we work around, in one place.

megatron-core assumes a CUDA device in a handful of places (see docs/design.md, "CPU").
:func:`apply_cpu_patches` makes those places work on a CPU-only torch with the gloo backend.
It is a no-op when CUDA is available, and nothing else in the package knows about it.

Each patch below names the upstream call it works around.
"""

from __future__ import annotations

import functools

import torch
from torch.overrides import TorchFunctionMode

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

    Works around, in megatron-core 0.16.1:
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
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    # rotary_pos_embedding.py / param buffers: ``torch.cuda.current_device()`` used as a device.
    torch.cuda.current_device = lambda: "cpu"
    # schedules.py p2p shape exchange, dist_checkpointing: ``torch.cuda.synchronize()``.
    torch.cuda.synchronize = lambda *a, **k: None
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
    _CudaToCpuMode().__enter__()
    _APPLIED = True
    return True


_FIXED = False


def apply_megatron_fixes() -> None:
    """Fixes for megatron-core 0.16.1 paths that break without apex/Transformer Engine (on CPU
    and on GPUs alike). Idempotent."""
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


def transformer_config_overrides() -> dict:
    """Megatron ``TransformerConfig`` fields that must differ on CPU/gloo (empty on GPU)."""
    if torch.cuda.is_available():
        return {}
    # p2p_communication.py ``_batched_p2p_ops``: gloo matches batched isend/irecv out of order in
    # the interleaved (virtual pipeline) schedule, swapping microbatches; send them one by one.
    return {"batch_p2p_comm": False}


@functools.lru_cache(maxsize=None)
def default_device() -> torch.device:
    """The device a rank computes on: its local CUDA device, or CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
