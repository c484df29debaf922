"""State helpers shared by the torch faces. Checkpoints: state dicts hold only torch tensors
and plain Python types, so ``torch.load(path)`` restores them with its default
``weights_only=True``; loading accepts those tensors and the numpy arrays of older
checkpoints, and checks every entry before anything is assigned. Undo: how a face takes back
a compress whose message was never delivered, or a bucket whose step failed."""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, TypeVar

import functools

import numpy as np
import torch

import iotcompress as ic

T = TypeVar("T")


def to_checkpoint(obj: Any) -> Any:
    """``obj`` with every numpy array turned into a CPU tensor (a copy) and every numpy
    scalar into its Python value; dicts, lists and tuples are converted recursively."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, copy=True))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_checkpoint(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_checkpoint(v) for v in obj)
    return obj


def f32_vector(x: Any, name: str, numel: int) -> np.ndarray:
    """A checkpoint's float32 vector of ``numel`` finite values (a torch tensor or a numpy
    array, exactly float32) as a numpy array; otherwise ``TypeError`` / ``ValueError`` naming
    ``name``."""
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor, got {x.dtype}")
        arr = x.detach().cpu().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype != np.float32:
            raise TypeError(f"{name} must be a float32 array, got {x.dtype}")
        arr = x
    else:
        raise TypeError(f"{name} must be a float32 tensor or array, got {type(x).__name__}")
    if arr.shape != (numel,):
        raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected ({numel},)")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinity")
    return np.array(arr, dtype=np.float32, copy=True)


def checked(name: str, build: Callable[[], T]) -> T:
    """``build()``, with a library, type or value error re-raised (same class where it can
    be built from a message) with ``name`` in front: the key of the offending entry."""
    try:
        return build()
    except (ic.IotCompressError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
        if isinstance(e, KeyError):
            raise ValueError(f"{name}: missing {e}") from e
        if isinstance(e, AttributeError):
            raise TypeError(f"{name}: {e}") from e
        try:
            err = type(e)(f"{name}: {e}")
        except Exception:  # noqa: BLE001 - a class that takes other arguments
            err = ValueError(f"{name}: {e}")
        raise err from e


def loaded_compressor(name: str, make: Callable[[], ic.Compressor], state: Any) -> ic.Compressor:
    """A new compressor from ``make()`` holding ``state``: the checked copy that a
    ``load_state_dict`` assigns once every entry has loaded."""

    def build() -> ic.Compressor:
        if not isinstance(state, Mapping):
            raise TypeError(f"expected a Compressor state dict, got {type(state).__name__}")
        comp = make()
        comp.load_state_dict(state)
        return comp

    return checked(name, build)


def compressor_states(compressors: Mapping[str, ic.Compressor]) -> Dict[str, Any]:
    """Every compressor's state dict in checkpoint form, by key."""
    return {key: to_checkpoint(c.state_dict()) for key, c in compressors.items()}


def undoable(comp: ic.Compressor) -> ic.Compressor:
    """``comp``, double-buffered unless it was made with ``low_memory=True``: the faces take
    a call back with :meth:`iotcompress.Compressor.revert`, O(1), for twice the state's
    memory. They never put a message back with ``restore()``, so it keeps no undo record
    (``restorable = False``: for a dense message that record is a pass over every entry)."""
    if not comp.low_memory:
        comp.double_buffered = True
    comp.restorable = False
    return comp


def undo_of_compress(comp: ic.Compressor) -> Callable[[], None]:
    """How to take back the compress or accumulate about to run, leaving the compressor
    exactly as it was (residual, velocity, counters, undo record). Double-buffered (see
    :func:`undoable`): :meth:`iotcompress.Compressor.revert`, O(1), valid until the
    compressor's next call. With ``low_memory=True``: a copy of its state from before, O(n)."""
    if comp.double_buffered:
        return comp.revert
    return functools.partial(comp.load_state_dict, comp.state_dict())
