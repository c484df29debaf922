"""The streaming encoder's numpy face: :class:`StreamingCompressor`. The same messages as a
device's ``iotcompress_stream_*`` calls (C API, docs/mcu.md) for the same inputs."""

from __future__ import annotations

import math
import threading
from typing import Any, Dict, Iterable, Optional

import numpy as np

from . import _iotcompress as _ext
from ._core import _as_vector

__all__ = ["StreamingCompressor", "STREAM_QUANTS", "STATE_FORMATS"]

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
        """Starts a message (an unfinished one is abandoned: finish every message you begin,
        or the entries it took from the residual are lost).

        Example::

            c.begin()
        """
        with self._lock:
            self._ext.begin()

    def feed(self, chunk: Any) -> None:
        """Feeds the next ``len(chunk)`` elements (a 1-D contiguous float32 array or CPU
        tensor). Raises :class:`CompressError` for more elements than remain or for NaN or
        infinity (then nothing changes).

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
            self._ext.begin()
            at = 0
            for length in lengths:
                self._ext.feed(grad[at:at + int(length)])
                at += int(length)
            return self._ext.finish()

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
