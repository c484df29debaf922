"""Gradient hooks for setups without DDP: a parameter server, a federated round, a device
with its own transport. Each parameter's gradient is compressed as soon as it is accumulated
and handed to ``send(name, message)``; the other side adds messages into ``.grad``."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Tuple, Union

import torch

import iotcompress as ic

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
        """Every compressor's state, by parameter name."""
        return {name: c.state_dict() for name, c in self.compressors.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` (names must match)."""
        missing = set(self.compressors) - set(state)
        if missing:
            raise ValueError(f"checkpoint has no state for {sorted(missing)}")
        for name, c in self.compressors.items():
            c.load_state_dict(state[name])


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
        if not param.requires_grad:
            continue
        comp = ic.Compressor(param.numel(), **compressor_options)
        compressors[name] = comp

        def hook(p: torch.Tensor, name: str = name, comp: ic.Compressor = comp) -> None:
            if hooks.participating:
                send(name, comp.compress(_flat_f32(p.grad)))
            else:
                comp.accumulate(_flat_f32(p.grad))

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
    several devices' messages for one parameter can be summed. Malformed messages raise
    :class:`iotcompress.DecodeError` and leave that gradient unchanged.

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
    if average:
        for name, _ in items:
            senders[name] = senders.get(name, 0) + 1
    for name, msg in items:
        p = params[name]
        s = scale / senders[name] if average else scale
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad
        if g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous():
            ic.decode_add(msg, g.detach().view(-1), scale=s)
        else:
            update = ic.decode(msg, numel=p.numel())
            g.add_(torch.from_numpy(update).view_as(g).to(device=g.device, dtype=g.dtype), alpha=s)
