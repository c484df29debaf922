"""The simulator's clock: pure functions of compute times, link profiles and byte counts.

Topology: a parameter server (or a cloud aggregator) whose own link is never the bottleneck;
device ``i`` reaches it over a link with round-trip latency ``L_i`` (ms) and bandwidth
``B_i`` (10^6 bit/s). One *exchange* is an upload of ``u_i`` bytes and a download of ``d_i``
bytes; the server starts the download only once every participant's upload has arrived.

* one-way upload time  ``up_i   = L_i / 2 + 8 u_i / (1000 B_i)``  (ms)
* one-way download time ``down_i = L_i / 2 + 8 d_i / (1000 B_i)``
* a device's communication time ``T_c,i = L_i + 8 (u_i + d_i) / (1000 B_i)`` per exchange: the
  ``NetworkProfile.comm_time_ms`` of the bytes it sends plus receives.

A synchronous round (``delay=0``) starts with every participant computing for ``c_i``; each
exchange then waits for the slowest upload and ends with each device's download::

    t_i = c_i;  for each exchange: s = max_i (t_i + up_i);  t_i = s + down_i
    round = max_i t_i

For one device and one exchange this is ``c + T_c``. Dense and iotcompress rounds have one
exchange, PowerSGD-like low rank two (P, then Q: latency twice).

Delayed averaging with delay ``D >= 1`` (Zhu et al., NeurIPS 2021): the gradient of step ``t``
is applied locally at once and its global average is needed only at the end of step ``t + D``,
so communication overlaps ``D`` steps of compute. With a steady step time ``S``, device ``i``
sends at ``t S + c_i``; the average is ready at ``t S + max_i (c_i + up_i)`` and reaches device
``j`` after ``down_j``; it must be there by ``(t + D) S + c_j``. Hence::

    S = max( max_i c_i,                                # compute
             max_i 8 (u_i + d_i) / (1000 B_i),         # the link carries one step's bytes per step
             max_j [max_i (c_i + up_i) + down_j - c_j] / D )   # the latency chain, spread over D

(one exchange; the link is taken as half-duplex, so upload and download bytes share it). Only
the round's participants enter the maxima: stragglers left out of a round do not hold it up.

Example::

    >>> from iotcompress.simulate.clock import round_time_ms
    >>> round_time_ms([10.0], [78.0], [100.0], [([125_000], [125_000])])   # 10 ms + 78 ms + 20 ms
    108.0
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

Exchange = Tuple[Sequence[float], Sequence[float]]

__all__ = ["comm_time_ms", "transfer_ms", "round_time_ms", "device_comm_ms"]


def transfer_ms(nbytes, bandwidth_mbps):
    """Serialisation time of ``nbytes`` on a link of ``bandwidth_mbps`` (10^6 bit/s), in ms."""
    return np.asarray(nbytes, dtype=np.float64) * 8.0 / (np.asarray(bandwidth_mbps, dtype=np.float64) * 1000.0)


def comm_time_ms(latency_ms, bandwidth_mbps, nbytes):
    """``T_c = latency + bytes / bandwidth`` (ms) for the bytes a device sends plus receives in
    one exchange; works elementwise on arrays.

    Example::

        >>> comm_time_ms(78.0, 100.0, 250_000)
        98.0
    """
    out = np.asarray(latency_ms, dtype=np.float64) + transfer_ms(nbytes, bandwidth_mbps)
    return float(out) if out.ndim == 0 else out


def device_comm_ms(latency_ms, bandwidth_mbps, exchanges: Sequence[Exchange]) -> np.ndarray:
    """Each device's total ``T_c`` over the round's exchanges (ms): latency once per exchange
    plus all its bytes over its bandwidth."""
    lat = np.asarray(latency_ms, dtype=np.float64)
    total = np.zeros_like(lat)
    for up, down in exchanges:
        total = total + comm_time_ms(lat, bandwidth_mbps, np.asarray(up, np.float64) + np.asarray(down, np.float64))
    return total


def round_time_ms(
    compute_ms,
    latency_ms,
    bandwidth_mbps,
    exchanges: Sequence[Exchange],
    delay: int = 0,
    participants: Optional[Sequence[bool]] = None,
) -> float:
    """The simulated duration (ms) of one round (``delay=0``) or of one steady step of delayed
    averaging (``delay=D >= 1``); see the module docstring for the model.

    ``compute_ms``, ``latency_ms``, ``bandwidth_mbps``: one entry per device. ``exchanges``: a
    list of ``(upload_bytes, download_bytes)`` pairs of per-device arrays, in order.
    ``participants``: a boolean mask of the devices in this round (default: all).
    Delayed averaging takes exactly one exchange.

    Example::

        >>> # 10 ms / 78 ms / 100 Mbit/s and 200 ms / 1 s / 5 kbit/s: the slow upload lands at 1.7 s
        >>> round_time_ms([10.0, 200.0], [78.0, 1000.0], [100.0, 0.005], [([125_000, 625], [125_000, 625])])
        3200.0
    """
    c = np.asarray(compute_ms, dtype=np.float64)
    lat = np.asarray(latency_ms, dtype=np.float64)
    bw = np.asarray(bandwidth_mbps, dtype=np.float64)
    if not (c.shape == lat.shape == bw.shape) or c.ndim != 1:
        raise ValueError("compute_ms, latency_ms and bandwidth_mbps need one entry per device")
    mask = np.ones(c.shape, bool) if participants is None else np.asarray(participants, bool)
    if mask.shape != c.shape:
        raise ValueError("participants needs one entry per device")
    if not mask.any():
        return 0.0
    if not isinstance(delay, (int, np.integer)) or delay < 0:
        raise ValueError(f"delay must be an int >= 0, got {delay!r}")
    c, lat, bw = c[mask], lat[mask], bw[mask]
    ups = [lat / 2 + transfer_ms(np.asarray(u, np.float64)[mask], bw) for u, _ in exchanges]
    downs = [lat / 2 + transfer_ms(np.asarray(d, np.float64)[mask], bw) for _, d in exchanges]
    if delay == 0:
        t = c.copy()
        for up, down in zip(ups, downs):
            t = np.max(t + up) + down
        return float(np.max(t))
    if len(exchanges) != 1:
        raise ValueError("delayed averaging is modelled for one exchange per step")
    (u, d), = exchanges
    link = transfer_ms(np.asarray(u, np.float64)[mask] + np.asarray(d, np.float64)[mask], bw)
    chain = np.max(c + ups[0]) + downs[0] - c
    return float(max(np.max(c), np.max(link), np.max(chain) / delay))
