"""Activations that backward rebuilds instead of keeping: what costs a few elementwise ops.

A transformer layer keeps, for backward, several tensors that are cheap functions of other tensors
it keeps anyway:

- the SwiGLU output ``silu(a) * b``, which ``linear_fc2`` keeps for its weight gradient, from
  ``linear_fc1``'s output ``[a, b]``, which the SwiGLU function keeps (:mod:`.mlp`);
- each RMSNorm's output, which ``linear_qkv`` / ``linear_fc1`` keep, from the norm's input and
  inverse RMS, which the norm keeps (:mod:`.norm`);
- the attention output in ``linear_proj``'s layout, from the SDPA outputs, which SDPA keeps
  (:mod:`.attention`).

A module that produces such a tensor registers it with :func:`rebuild_in_backward` (the tensor,
a function and the kept tensors it is a function of). While :func:`rebuilt_saves` is active (the
forward step runs the model under it), autograd's pack hook stores a registered tensor (or a
contiguous view of it) as that recipe instead of the tensor, and the unpack hook rebuilds it when
backward reaches it, under ``no_grad``. The recipe holds references only to tensors that are kept
anyway, so the registered tensor's memory is freed once forward drops it. The rebuilt values are
bit for bit the forward's (the same ops on the same inputs); an input modified in place since is
an error, as autograd's own check would be.

Outside :func:`rebuilt_saves` (evaluation, activation recompute in backward, a user's own
forward) registration does nothing and every tensor is saved as usual.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch

_entries: dict = {}
_active = False


class _Entry:
    __slots__ = ("ref", "fn", "inputs", "version")

    def __init__(self, ref, fn, inputs, version):
        self.ref, self.fn, self.inputs, self.version = ref, fn, inputs, version


class _Recipe:
    """What the pack hook stores for a registered tensor."""

    __slots__ = ("fn", "inputs", "versions", "shape")

    def __init__(self, fn, inputs, shape):
        self.fn, self.inputs, self.shape = fn, inputs, shape
        self.versions = tuple(t._version for t in inputs)


def _key(tensor: torch.Tensor):
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel(),
            tensor.dtype)


def rebuild_in_backward(tensor: torch.Tensor, fn: Callable, *inputs: torch.Tensor) -> torch.Tensor:
    """Register ``tensor == fn(*inputs)`` (bitwise) and return ``tensor``. ``inputs`` must be
    tensors that backward keeps anyway; a no-op outside :func:`rebuilt_saves` or without grad."""
    if not _active or not torch.is_grad_enabled() or not tensor.requires_grad \
            or not tensor.is_contiguous() or tensor.numel() == 0:
        return tensor
    key = _key(tensor)

    def forget(ref, key=key):
        entry = _entries.get(key)
        if entry is not None and entry.ref is ref:
            del _entries[key]
    # Alive while any view of its storage is: a view keeps its base alive, not the other views
    # (the caller may return a view that the next module reshapes again).
    anchor = tensor if tensor._base is None else tensor._base
    _entries[key] = _Entry(weakref.ref(anchor, forget), fn, inputs, tensor._version)
    return tensor


def _pack(tensor: torch.Tensor):
    if not _entries or tensor.layout != torch.strided or not tensor.is_contiguous():
        return tensor
    try:
        entry = _entries.get(_key(tensor))
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return tensor
    if entry is None or entry.ref() is None or tensor._version != entry.version:
        return tensor
    return _Recipe(entry.fn, entry.inputs, tensor.shape)


def _unpack(packed):
    if not isinstance(packed, _Recipe):
        return packed
    for tensor, version in zip(packed.inputs, packed.versions):
        if tensor._version != version:
            raise RuntimeError(
                "rebuilt_saves: a tensor that a saved activation is rebuilt from was modified in "
                f"place after it was saved (version {version} -> {tensor._version}); "
                "backward cannot rebuild it")
    with torch.no_grad():
        return packed.fn(*packed.inputs).view(packed.shape)


@contextlib.contextmanager
def rebuilt_saves():
    """Within this block, registered tensors that autograd saves are stored as their recipes."""
    global _active
    if _active:  # nested: the outer scope already hooks
        yield
        return
    _active = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _active = False
        _entries.clear()
