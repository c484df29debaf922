"""Gradient hooks for setups without DDP: a parameter server, a federated round, a device
with its own transport. Each parameter's gradient is compressed as soon as it is accumulated
and handed to ``send(name, message)``; the other side adds messages into ``.grad``."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Tuple, Union

import torch

import iotcompress as ic

from ._checkpoint import compressor_states, loaded_compressor, undo_of_compress, undoable

__all__ = ["GradientHooks", "register_gradient_hooks", "apply_messages"]


class GradientHooks:
    """What :func:`register_gradient_hooks` returns: the hook handles and one compressor per
    parameter (``compressors[name]``), with ``remove()``, ``state_dict()`` and
    ``load_state_dict()``.

    ``participating`` (default True): while False, the hooks only add each gradient into
    its parameter's residual (:meth:`iotcompress.Compressor.accumulate`) and send nothing:
    a round this device misses (no link, not selected, out of battery). Nothing is lost: the
    first message after the gap carries what was held back. :meth:`skip` sets it for one
    ``with`` block.

    Example::

        hooks = register_gradient_hooks(model, send, density=0.01, quant="int8")
        ...
        with hooks.skip():      # this round's gradients stay in the residuals
            loss.backward()
        hooks.remove()
    """

    __slots__ = ("compressors", "participating", "_handles")

    def __init__(self, compressors: Dict[str, ic.Compressor], handles: list) -> None:
        self.compressors = compressors
        self.participating = True
        self._handles = handles

    @contextlib.contextmanager
    def skip(self) -> Iterator["GradientHooks"]:
        """Within the block the hooks accumulate without sending (``participating = False``);
        the previous value is restored afterwards.

        Example::

            with hooks.skip():
                loss.backward()   # nothing sent, everything kept
        """
        before = self.participating
        self.participating = False
        try:
            yield self
        finally:
            self.participating = before

    def remove(self) -> None:
        """Removes every hook; the compressors (and their residuals) stay available."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> Dict[str, Any]:
        """Every compressor's state, by parameter name: torch tensors and plain Python types
        only, so ``torch.load(path)`` restores it with its default ``weights_only=True``.

        Example::

            torch.save(hooks.state_dict(), "hooks.pt")
        """
        return compressor_states(self.compressors)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` (tensors, or the numpy arrays of older checkpoints;
        names must match). Every entry is loaded into a new compressor first and only when
        all have loaded are they swapped in: on an error nothing has changed, and the error
        names the parameter.

        Example::

            hooks.load_state_dict(torch.load("hooks.pt"))
        """
        missing = set(self.compressors) - set(state)
        if missing:
            raise ValueError(f"checkpoint has no state for {sorted(missing)}")
        loaded = {
            name: loaded_compressor(name, lambda c=c: undoable(ic.Compressor(c.numel, **c.options, low_memory=c.low_memory)), state[name])
            for name, c in self.compressors.items()
        }
        self.compressors.update(loaded)


def _flat_f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)


def register_gradient_hooks(
    module: torch.nn.Module, send: Callable[[str, bytes], Any], **compressor_options: Any
) -> GradientHooks:
    """Compresses each parameter's gradient after it is accumulated (by
    ``register_post_accumulate_grad_hook``) and calls ``send(parameter_name, message)``.
    ``compressor_options`` are :class:`iotcompress.Compressor`'s. The local ``.grad`` is left
    as it is; what was not sent waits in the parameter's residual. While the returned
    hooks' ``participating`` is False nothing is sent and the gradients only accumulate.
    Zero-element parameters get no compressor and send nothing.

    On error, per parameter all or nothing: a gradient with NaN or infinity raises
    :class:`iotcompress.CompressError` from ``backward()`` with that parameter's compressor
    unchanged (messages of parameters hooked earlier in the backward were sent already);
    if ``send`` raises, the compressor is put back exactly as it was before that compress
    (:meth:`iotcompress.Compressor.revert`: the compressors are double-buffered, twice the
    state's memory, unless ``low_memory=True``, which keeps a copy of the state during the
    call instead) before the error propagates, so an
    undelivered message is not lost: its gradient is simply not taken yet.

    Example::

        outbox = []
        hooks = register_gradient_hooks(model, lambda name, msg: outbox.append((name, msg)),
                                        density=0.01, quant="int8", momentum=0.9)
        loss.backward()          # outbox now holds one message per parameter
    """
    compressors: Dict[str, ic.Compressor] = {}
    handles: list = []
    hooks = GradientHooks(compressors, handles)
    for name, param in module.named_parameters():
        if not param.requires_grad or not param.numel():
            continue  # a zero-element parameter has nothing to send
        compressors[name] = undoable(ic.Compressor(param.numel(), **compressor_options))

        def hook(p: torch.Tensor, name: str = name) -> None:
            comp = hooks.compressors[name]  # looked up now: load_state_dict swaps them
            if not hooks.participating:
                comp.accumulate(_flat_f32(p.grad))
                return
            undo = undo_of_compress(comp)
            msg = comp.compress(_flat_f32(p.grad))
            try:
                send(name, msg)
            except BaseException:
                undo()  # not delivered: the compressor is as before it
                raise

        handles.append(param.register_post_accumulate_grad_hook(hook))
    return hooks


def apply_messages(
    module: torch.nn.Module,
    messages: Union[Mapping[str, bytes], Iterable[Tuple[str, bytes]]],
    scale: float = 1.0,
    *,
    average: bool = False,
) -> None:
    """Adds ``scale * message`` into each named parameter's ``.grad`` (created as zeros when
    missing). ``messages`` is a mapping or an iterable of ``(name, message)`` pairs, so
    several devices' messages for one parameter can be summed (in float32, rounded once to
    the gradient's dtype). All or nothing: every message is decoded before any gradient
    changes, so a malformed one raises :class:`iotcompress.DecodeError` (naming its
    parameter) with every ``.grad`` as it was; an unknown name raises :class:`KeyError`
    before anything is decoded.

    Averaging over the devices that took part in the round (partial participation: devices
    that skipped it sent nothing), either way:

    * ``average=True``: each parameter's messages are divided by how many were given for
      that parameter, i.e. by the devices that sent it (``scale`` still multiplies);
    * ``scale=1 / senders`` with the caller's own count of the devices it heard from.

    Example::

        apply_messages(server_model, received, average=True)   # mean over the senders
        optimizer.step()
    """
    params = dict(module.named_parameters())
    items = list(messages.items() if isinstance(messages, Mapping) else messages)
    for name, _ in items:
        if name not in params:
            raise KeyError(f"no parameter named {name!r} in {type(module).__name__}")
    senders: Dict[str, int] = {}
    for name, _ in items:
        senders[name] = senders.get(name, 0) + 1
    # Every message is decoded into a float32 copy of its gradient first; the gradients
    # change only once all have decoded.
    staged: Dict[str, torch.Tensor] = {}
    for name, msg in items:
        p = params[name]
        if name not in staged:
            staged[name] = torch.zeros(p.numel()) if p.grad is None else _flat_f32(p.grad).clone()
        try:
            ic.decode_add(msg, staged[name], scale=scale / senders[name] if average else scale)
        except ic.DecodeError as e:
            raise type(e)(f"message for {name!r}: {e}") from e
    for name, total in staged.items():
        p = params[name]
        update = total.view_as(p).to(device=p.device, dtype=p.dtype)
        if p.grad is None:
            p.grad = update
        else:
            p.grad.copy_(update)
