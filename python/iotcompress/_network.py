"""Links and per-device budgets: :class:`NetworkProfile`.

A step's communication costs ``T_c = latency + bytes / bandwidth``. A device on a worse link
gets fewer bytes for the same time budget, so its adaptive threshold ``Wt`` rises. The
arithmetic is the core's (``iotcompress_core::NetworkProfile``): whole microseconds and bits
per second, exact, the same on a server and on a microcontroller."""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

from . import _iotcompress as _ext

__all__ = ["NetworkProfile"]


def _positive(value: Any, name: str, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{name} must be a finite number {'>=' if zero_ok else '>'} 0, got {value}")
    return float(value)


class NetworkProfile:
    """A device's link: ``latency_ms``, the round-trip latency of one exchange, and
    ``bandwidth_mbps`` (10^6 bit/s) of its slower direction. Times are kept in whole
    microseconds and bandwidths in whole bits per second.

    Presets (:attr:`PRESETS`): ``datacenter`` (0.1 ms, 10 Gbit/s), ``home-wifi`` (15 ms,
    20 Mbit/s), ``lte`` (50 ms, 5 Mbit/s), ``lora`` (1 s, 5 kbit/s: a LoRa-class radio) and
    ``intercontinental`` (78 ms, 100 Mbit/s: Shanghai to Boston at the speed of light in fibre).

    Example::

        >>> p = NetworkProfile.preset("intercontinental")
        >>> p.comm_time_ms(1_000_000)      # 78 ms + 1 MB at 100 Mbit/s
        158.0
        >>> p.bytes_within(100.0)           # the largest message that fits 100 ms
        275000
    """

    __slots__ = ("_latency_us", "_bandwidth_bps", "name")

    #: The preset names, for :meth:`preset`.
    PRESETS: Tuple[str, ...] = tuple(name for name, _, _ in _ext.network_presets())

    def __init__(self, latency_ms: float, bandwidth_mbps: float, name: str = "custom") -> None:
        latency_us = round(_positive(latency_ms, "latency_ms", zero_ok=True) * 1000)
        bandwidth_bps = round(_positive(bandwidth_mbps, "bandwidth_mbps") * 1e6)
        if bandwidth_bps < 1:
            raise ValueError(f"bandwidth_mbps must be at least 1e-6 (1 bit/s), got {bandwidth_mbps}")
        if latency_us >= 2**63 or bandwidth_bps >= 2**63:
            raise ValueError("latency_ms or bandwidth_mbps is out of range")
        if not isinstance(name, str):
            raise TypeError(f"name must be a string, got {type(name).__name__}")
        self._latency_us = latency_us
        self._bandwidth_bps = bandwidth_bps
        self.name = name

    @classmethod
    def preset(cls, name: str) -> "NetworkProfile":
        """The preset called ``name`` (one of :attr:`PRESETS`)."""
        for preset, latency_us, bandwidth_bps in _ext.network_presets():
            if preset == name:
                return cls(latency_us / 1000, bandwidth_bps / 1e6, name)
        raise ValueError(f"unknown network preset {name!r}; choose one of {', '.join(cls.PRESETS)}")

    @property
    def latency_ms(self) -> float:
        """Round-trip latency of one exchange, in milliseconds."""
        return self._latency_us / 1000

    @property
    def bandwidth_mbps(self) -> float:
        """Bandwidth in 10^6 bit/s."""
        return self._bandwidth_bps / 1e6

    def comm_time_ms(self, nbytes: int) -> float:
        """``T_c = latency + nbytes / bandwidth`` in milliseconds (rounded up to whole
        microseconds)."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
        return _ext.network_comm_time_us(self._latency_us, self._bandwidth_bps, min(nbytes, 2**64 - 1)) / 1000

    def bytes_within(self, budget_ms: float) -> int:
        """The most bytes one exchange can carry within ``budget_ms``: ``comm_time_ms`` of the
        result is at most the budget; 0 when the latency alone exceeds it."""
        budget_us = math.floor(_positive(budget_ms, "budget_ms", zero_ok=True) * 1000 + 1e-6)
        return _ext.network_bytes_within(self._latency_us, self._bandwidth_bps, min(budget_us, 2**64 - 1))

    def to_dict(self) -> Dict[str, Any]:
        """``{"name", "latency_ms", "bandwidth_mbps"}`` (for reports and checkpoints)."""
        return {"name": self.name, "latency_ms": self.latency_ms, "bandwidth_mbps": self.bandwidth_mbps}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NetworkProfile):
            return NotImplemented
        return (self._latency_us, self._bandwidth_bps) == (other._latency_us, other._bandwidth_bps)

    def __hash__(self) -> int:
        return hash((self._latency_us, self._bandwidth_bps))

    def __repr__(self) -> str:
        return f"NetworkProfile(latency_ms={self.latency_ms:g}, bandwidth_mbps={self.bandwidth_mbps:g}, name={self.name!r})"


def budget_bytes(network: Any, budget_ms: Any) -> int:
    """The byte budget of ``network`` within ``budget_ms``, with a clear error when there is
    none (the latency alone exceeds the budget)."""
    if not isinstance(network, NetworkProfile):
        raise TypeError(f"network must be an iotcompress.NetworkProfile, got {type(network).__name__}")
    if budget_ms is None:
        raise ValueError("network=... needs budget_ms=...: the time one step may spend communicating")
    nbytes = network.bytes_within(budget_ms)
    if nbytes == 0:
        raise ValueError(
            f"{network!r} cannot send anything within budget_ms={budget_ms}: its latency alone is "
            f"{network.latency_ms:g} ms; raise the budget (or use delayed averaging to overlap it)"
        )
    return min(nbytes, 2**32 - 1)
