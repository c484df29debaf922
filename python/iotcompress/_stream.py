"""The streaming encoder's numpy face: :class:`StreamingCompressor`. The same messages as a
device's ``iotcompress_stream_*`` calls (C API, docs/mcu.md) for the same inputs."""

from __future__ import annotations

import math
import threading
from typing import Any, Dict, Iterable, Mapping, Optional

import numpy as np

from . import _iotcompress as _ext
from ._core import _as_message, _as_vector, _state_float, _state_int, _state_key
from .errors import CompressError

__all__ = ["StreamingCompressor", "STREAM_QUANTS", "STATE_FORMATS"]

#: Version of :meth:`StreamingCompressor.state_dict`'s layout.
_STATE_FORMAT = "iotcompress-stream-state-1"

#: Value quantisers a streamed message can use.
STREAM_QUANTS = ("f32", "f16", "bf16", "int8", "int4")
#: How the residual (and velocity) can be stored.
STATE_FORMATS = ("f32", "f16", "bf16", "int8")


def _positive_int(value: Any, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 < value < 2**32:
        raise ValueError(f"{name} must be a positive int below 2**32, got {value!r}")
    return int(value)


class StreamingCompressor:
    """Threshold compression of a gradient that arrives in chunks (layer by layer), for
    devices that cannot hold all of it: the streaming encoder of the core, as it runs on a
    microcontroller (docs/mcu.md).

    Each message: :meth:`begin`, :meth:`feed` every chunk in order, :meth:`finish` (or
    :meth:`compress` for all three). Every element with ``|r + g| >= Wt`` is sent (``Wt``
    fixed at ``threshold``, or adapted after each message towards ``target_count`` entries
    or ``target_bytes`` bytes); what is not sent stays in the residual. ``quant`` is one of
    ``f32 f16 bf16 int8 int4`` (int8/int4 scales are fixed when the message begins:
    ``max(largest |v| of the last message, 2 Wt) / 127``, and clipped values leave their
    excess in the residual). ``state`` stores the residual (and the DGC velocity with
    ``momentum``) as ``f32``, ``f16``, ``bf16`` or ``int8`` (one scale per 32 elements), for
    small RAM. ``capacity`` bounds the message size (default: room for every entry); entries
    that do not fit are held back in the residual. The messages decode with
    :func:`iotcompress.decode` like any other, and do not depend on how the gradient was cut
    into chunks.

    Example::

        import numpy as np, iotcompress as ic
        c = ic.StreamingCompressor(1000, threshold=0.5, target_count=50, quant="int8", state="int8")
        c.begin()
        for layer in np.split(np.random.randn(1000).astype(np.float32), [600, 900]):
            c.feed(layer)
        msg = c.finish()
        dense = ic.decode(msg)

    Guarantees on error: :meth:`compress` is all or nothing (a NaN, infinity or overflow in
    any chunk raises :class:`CompressError` with the state, counters and undo record exactly
    as before the call); :meth:`feed` leaves everything as it was (the open message stays
    open: feed a good chunk, or :meth:`abort` it, which puts back the state from before
    :meth:`begin`); :meth:`begin` while a message is open raises instead of abandoning it;
    :meth:`restore` and :meth:`load_state_dict` check everything first. A compressor may be
    shared between threads: calls take turns, property reads see the state before or after
    a call. Memory: the host keeps the state from before the open or last message and its
    gradient (for :meth:`abort` and :meth:`restore`), about twice the state plus ``4 *
    numel`` bytes; a device (the C API) keeps none of it.
    """

    __slots__ = ("_ext", "_numel", "_options", "_lock")

    def __init__(
        self,
        numel: int,
        *,
        threshold: float,
        target_count: Optional[int] = None,
        target_bytes: Optional[int] = None,
        quant: str = "f32",
        state: str = "f32",
        momentum: float = 0.0,
        nesterov: bool = False,
        capacity: Optional[int] = None,
    ) -> None:
        if isinstance(numel, bool) or not isinstance(numel, (int, np.integer)) or not 0 <= numel < 2**32:
            raise ValueError(f"numel must be an int in 0..2**32-1, got {numel!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be finite and > 0, got {threshold}; it is the first message's Wt")
        target_count = _positive_int(target_count, "target_count")
        target_bytes = _positive_int(target_bytes, "target_bytes")
        if target_count is not None and target_bytes is not None:
            raise ValueError("set at most one of target_count and target_bytes")
        if quant not in STREAM_QUANTS:
            raise ValueError(f"quant must be one of {', '.join(STREAM_QUANTS)} for streaming, got {quant!r}")
        if state not in STATE_FORMATS:
            raise ValueError(f"state must be one of {', '.join(STATE_FORMATS)}, got {state!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0, e.g. momentum=0.9")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer))):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        self._numel = int(numel)
        self._options = dict(
            threshold=float(threshold), target_count=target_count, target_bytes=target_bytes, quant=quant,
            state=state, momentum=float(momentum), nesterov=bool(nesterov),
            capacity=None if capacity is None else int(capacity),
        )
        self._ext = _ext.StreamingCompressor(self._numel, **self._options)
        self._lock = threading.Lock()

    def begin(self) -> None:
        """Starts a message. Raises :class:`CompressError` if one is open (finish it, or
        :meth:`abort` it): an unfinished message is never abandoned silently.

        Example::

            c.begin()
        """
        with self._lock:
            if self._ext.is_open:
                raise CompressError("a message is open: finish() it or abort() it before begin()")
            self._ext.begin()

    def abort(self) -> bool:
        """Takes back the open message: the state and counters become exactly what they were
        before :meth:`begin` (what its chunks took out of the residual goes back, their
        gradient is dropped). Returns whether a message was open.

        Example::

            try:
                c.feed(chunk)
            except ic.CompressError:
                c.abort()
        """
        with self._lock:
            return self._ext.abort()

    def feed(self, chunk: Any) -> None:
        """Feeds the next ``len(chunk)`` elements (a 1-D contiguous float32 array or CPU
        tensor). Raises :class:`CompressError` for more elements than remain, for NaN or
        infinity or an overflowing sum, or with no message open (then nothing changes; the
        message stays open).

        Example::

            c.feed(layer.weight.grad.reshape(-1))
        """
        chunk = _as_vector(chunk, "chunk")
        with self._lock:
            self._ext.feed(chunk)

    def finish(self) -> bytes:
        """Completes the message and returns it; updates the adaptive threshold. Raises
        :class:`CompressError` if not every element was fed.

        Example::

            msg = c.finish()
        """
        with self._lock:
            return self._ext.finish()

    def compress(self, grad: Any, chunks: Optional[Iterable[int]] = None) -> bytes:
        """One message from a whole gradient, fed in pieces of the lengths ``chunks`` (one
        piece by default; the bytes do not depend on it).

        Example::

            msg = c.compress(grad, chunks=[600, 300, 100])
        """
        grad = _as_vector(grad, "grad", self._numel)
        lengths = [self._numel] if chunks is None else [int(c) for c in chunks]
        if any(c < 0 for c in lengths) or sum(lengths) != self._numel:
            raise ValueError(f"chunks must be non-negative lengths adding up to numel={self._numel}, got {lengths}")
        with self._lock:
            if self._ext.is_open:
                raise CompressError("a message is open: finish() it or abort() it before compress()")
            return self._ext.compress(grad, lengths)

    def accumulate(self, grad: Any) -> None:
        """Adds a whole gradient into the residual (with the momentum rule) without sending:
        exactly what a message that selects nothing would store; for a round this device
        skips. The counters do not move. A NaN, infinite or overflowing gradient raises
        :class:`CompressError` and changes nothing; so does a message being open. Drops the
        undo record of :meth:`restore`.

        Example::

            c.accumulate(grad)   # this round's link is down: send it with the next message
        """
        grad = _as_vector(grad, "grad", self._numel)
        with self._lock:
            if self._ext.is_open:
                raise CompressError("a message is open: finish() it or abort() it before accumulate()")
            self._ext.accumulate(grad)

    def restore(self, msg: Any = None) -> None:
        """Puts an undelivered message back into the state, so error feedback sends it later.

        ``restore()`` takes back the last finished message bit-exactly: the state becomes
        exactly what a message that selected nothing would have stored from the same
        gradient (the residual keeps all of it), and the counters (messages, adaptive
        threshold, scale and Rice statistics) are as before that message, so the next
        message is that of the summed gradients. Available until the next :meth:`begin`,
        :meth:`compress`, :meth:`restore` or :meth:`load_state_dict`; otherwise, or while a
        message is open, :class:`CompressError` and nothing changes.

        ``restore(msg)`` adds any earlier message back into the residual (exact up to one
        f32 rounding per entry and the state format's rounding; int8 blocks with an entry
        are requantised; the velocity's factor masking is not undone). A malformed message,
        one for another element count or an overflowing sum raises and changes nothing.
        This is what a device does (``iotcompress_stream_restore``), holding only the
        message.

        Example::

            msg = c.compress(grad)
            if not link.send(msg):
                c.restore()
        """
        msg = None if msg is None else _as_message(msg)
        with self._lock:
            self._ext.restore(msg)

    @property
    def can_restore(self) -> bool:
        """Whether :meth:`restore` (without a message) has a finished message to put back."""
        return self._ext.can_restore

    def state_dict(self) -> Dict[str, Any]:
        """The compressor's state: ``numel``, ``options``, ``state`` (the raw state buffer,
        bytes in the configured format) and the counters ``messages``, ``threshold``,
        ``bits_per_entry``, ``last_max``, ``last_selected``. Plain Python types, so
        ``torch.load`` accepts it with its defaults. An open message is not part of it.

        Example::

            torch.save(c.state_dict(), "stream.pt")
        """
        with self._lock:
            state, (messages, threshold, bpe, last_max, last_selected) = self._ext.get_state()
        return {"format": _STATE_FORMAT, "numel": self._numel, "options": dict(self._options), "state": bytes(state),
                "messages": messages, "threshold": threshold, "bits_per_entry": bpe, "last_max": last_max,
                "last_selected": last_selected}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict` of a compressor with the same ``numel`` and options.
        Everything is checked before anything is assigned (``state`` bytes of exactly
        :attr:`state_len` whose every stored value is finite, ``messages`` an int in
        ``[0, 2**64)``, ``threshold``, ``bits_per_entry`` and ``last_max`` finite floats
        ``>= 0``, ``last_selected`` an int in ``[0, numel]``); a bad state raises
        :class:`TypeError`, :class:`ValueError` or :class:`KeyError` naming the key and
        changes nothing. Drops an open message and the undo record of :meth:`restore`.

        Example::

            c.load_state_dict(torch.load("stream.pt"))
        """
        fmt = _state_key(state, "format")
        if fmt != _STATE_FORMAT:
            raise ValueError(f"state['format'] is {fmt!r}; expected {_STATE_FORMAT}")
        if _state_key(state, "numel") != self._numel:
            raise ValueError(f"state['numel']: the state is for numel={state['numel']!r}, this compressor has numel={self._numel}")
        if _state_key(state, "options") != self._options:
            raise ValueError(f"state['options'] {state['options']} differ from this compressor's {self._options}")
        raw = _state_key(state, "state")
        if not isinstance(raw, (bytes, bytearray)):
            raise TypeError(f"state['state'] must be bytes, got {type(raw).__name__}")
        if len(raw) != self.state_len:
            raise ValueError(f"state['state'] has {len(raw)} bytes, expected {self.state_len}")
        counters = (
            _state_int(state, "messages", 0, 2**64),
            _state_float(state, "threshold"),
            _state_float(state, "bits_per_entry"),
            _state_float(state, "last_max"),
            _state_int(state, "last_selected", 0, self._numel + 1),
        )
        with self._lock:
            try:
                self._ext.load_state(bytes(raw), counters)
            except ValueError as e:
                raise ValueError(f"state['state']: {e}") from None

    def __getstate__(self) -> Dict[str, Any]:
        return self.state_dict()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        StreamingCompressor.__init__(self, state["numel"], **state["options"])
        self.load_state_dict(state)

    @property
    def numel(self) -> int:
        """Elements per gradient."""
        return self._numel

    @property
    def options(self) -> Dict[str, Any]:
        """The constructor's keyword options (a copy)."""
        return dict(self._options)

    @property
    def residual(self) -> np.ndarray:
        """The stored residual as float32 (a copy; decoded from the compact format)."""
        return self._ext.residual

    @property
    def velocity(self) -> np.ndarray:
        """The stored velocity as float32 (zeros without momentum)."""
        return self._ext.velocity

    @property
    def state_bytes(self) -> bytes:
        """The raw state buffer, as a device holds it (residual, then velocity)."""
        return self._ext.state_bytes

    @property
    def threshold(self) -> float:
        """The threshold ``Wt`` of the next message."""
        return self._ext.threshold

    @property
    def messages(self) -> int:
        """Messages finished so far."""
        return self._ext.messages

    @property
    def fed(self) -> int:
        """Elements fed to the open message (0 when none is open)."""
        return self._ext.fed

    @property
    def last(self) -> Dict[str, Any]:
        """The last message's ``bytes, nnz, selected`` (sent or held back), ``threshold``
        and ``scale``."""
        keys = ("bytes", "nnz", "selected", "threshold", "scale")
        return dict(zip(keys, self._ext.last_info()))

    @property
    def capacity(self) -> int:
        """Bytes of the output buffer: no message is longer."""
        return self._ext.capacity

    @property
    def state_len(self) -> int:
        """Bytes of the state buffer a device needs (``IOTCOMPRESS_STREAM_STATE_LEN``)."""
        return self._ext.state_len

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items() if v not in (None, False))
        return f"StreamingCompressor({self._numel}, {opts})"
