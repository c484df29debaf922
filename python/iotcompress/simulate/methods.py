"""The ways a simulated round moves gradients: dense averaging, PowerSGD-like low rank,
iotcompress (a real :class:`iotcompress.Compressor` per device and per downlink) and
iotcompress with delayed averaging, one SGD step per round; and FedAvg, plain and compressed
(the :mod:`iotcompress.fedavg` client and server that the Flower integration runs), with
``local_steps`` local steps per round.

Each per-step method holds the devices' weights, takes one round's per-device gradients ``G``
(``[N, numel]``, float32) and the round's participant mask, updates the weights, and returns
the round's traffic: a list of exchanges ``(upload_bytes[N], download_bytes[N])``. A local
(FedAvg) method instead gives each participant its starting model (``begin``)
and takes the locally trained models back (``finish``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import iotcompress as ic

Traffic = List[Tuple[np.ndarray, np.ndarray]]

METHODS = ("dense", "lowrank", "iotcompress", "iotcompress-delayed", "fedavg", "fedavg-iotcompress")


@dataclass
class Setup:
    """What every method needs to know."""

    numel: int
    devices: int
    shapes: List[Tuple[str, Tuple[int, ...]]]  # parameter names and shapes, in flat order
    lr: float = 0.05
    momentum: float = 0.9
    rank: int = 2
    quant: str = "int8"
    delay: int = 4
    up_bytes: Optional[np.ndarray] = None  # per-device upload budgets (iotcompress)
    down_bytes: Optional[np.ndarray] = None  # per-device download budgets (iotcompress)
    density: float = 0.01  # fedavg-iotcompress: uplink density
    down_density: float = 0.05  # fedavg-iotcompress: downlink density
    budget_bound: bool = False  # fedavg-iotcompress: also hold each upload to up_bytes
    seed: int = 0
    slices: List[Tuple[str, int, int, Tuple[int, ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        off = 0
        self.slices = []
        for name, shape in self.shapes:
            n = int(np.prod(shape))
            self.slices.append((name, off, off + n, tuple(shape)))
            off += n
        if off != self.numel:
            raise ValueError(f"shapes cover {off} elements, numel is {self.numel}")


def _bytes(mask: np.ndarray, n: int) -> np.ndarray:
    return np.where(mask, n, 0).astype(np.int64)


class Method:
    """Base: ``shared`` methods keep one weight vector for all devices (``w``), the others one
    per device (``W``, ``[N, numel]``) plus the server's (``server``)."""

    key = ""
    label = ""
    shared = True
    local_training = False  # FedAvg: begin() / local steps / finish() instead of step()
    delay = 0
    exchanges = 1

    def __init__(self, setup: Setup, w0: torch.Tensor) -> None:
        self.s = setup
        if self.shared:
            self.w = w0.clone()
        else:
            self.W = w0.expand(setup.devices, -1).contiguous()
            self.server = w0.clone()

    def device_weights(self) -> torch.Tensor:
        """``[numel]`` (shared) or ``[N, numel]``."""
        return self.w if self.shared else self.W

    def server_weights(self) -> torch.Tensor:
        return self.w if self.shared else self.server

    def step(self, G: torch.Tensor, mask: np.ndarray) -> Traffic:
        raise NotImplementedError


class Dense(Method):
    """Every participant uploads its f32 gradient, the server averages and sends the average
    back (allreduce-equivalent); SGD with momentum on the average."""

    key, label = "dense", "dense f32"

    def __init__(self, setup: Setup, w0: torch.Tensor) -> None:
        super().__init__(setup, w0)
        self.vel = torch.zeros_like(self.w)

    def step(self, G: torch.Tensor, mask: np.ndarray) -> Traffic:
        avg = G[torch.from_numpy(mask)].mean(0)
        self.vel.mul_(self.s.momentum).add_(avg)
        self.w.sub_(self.s.lr * self.vel)
        n = 4 * self.s.numel
        return [(_bytes(mask, n), np.full(self.s.devices, n, np.int64))]


class LowRank(Method):
    """PowerSGD-like (Vogels et al. 2019): each weight matrix ``M = g + e`` (``e``: the
    device's error feedback) is approximated as ``P Qᵀ`` of rank ``r``: exchange 1 averages
    ``P_i = M_i Q`` (plus the vectors and small matrices, dense), the server orthonormalises
    ``P``; exchange 2 averages ``Q_i = M_iᵀ P``; ``Q`` warm-starts the next round. A matrix
    is compressed when ``n m >= 2 (n + m) r`` (as PyTorch's hook). SGD with momentum on the
    result. A device left out of a round adds its gradient to ``e``."""

    key, label = "lowrank", "low rank (PowerSGD-like)"
    exchanges = 2

    def __init__(self, setup: Setup, w0: torch.Tensor) -> None:
        super().__init__(setup, w0)
        self.vel = torch.zeros_like(self.w)
        gen = torch.Generator().manual_seed(setup.seed + 1)
        self.mats: Dict[str, Tuple[int, int, int]] = {}
        self.Q: Dict[str, torch.Tensor] = {}
        self.E: Dict[str, torch.Tensor] = {}
        self.bytes1 = 0
        self.bytes2 = 0
        for name, a, b, shape in setup.slices:
            if len(shape) >= 2:
                n, m = shape[0], (b - a) // shape[0]
                r = min(n, m, setup.rank)
                if n * m >= 2 * (n + m) * r:
                    self.mats[name] = (n, m, r)
                    self.Q[name] = torch.randn(m, r, generator=gen)
                    self.E[name] = torch.zeros(setup.devices, n, m)
                    self.bytes1 += 4 * n * r
                    self.bytes2 += 4 * m * r
                    continue
            self.bytes1 += 4 * (b - a)

    def step(self, G: torch.Tensor, mask: np.ndarray) -> Traffic:
        tmask = torch.from_numpy(mask)
        share = float(mask.sum()) / self.s.devices
        update = torch.empty(self.s.numel)
        for name, a, b, _ in self.s.slices:
            g = G[:, a:b]
            if name not in self.mats:
                update[a:b] = g[tmask].mean(0)
                continue
            n, m, r = self.mats[name]
            M = g.reshape(-1, n, m) + self.E[name]
            P = torch.linalg.qr((M[tmask] @ self.Q[name]).mean(0)).Q  # exchange 1, orthonormalised
            Q = (M[tmask].transpose(1, 2) @ P).mean(0)  # exchange 2
            approx = P @ Q.T
            self.E[name] = torch.where(tmask[:, None, None], M - approx, M)
            self.Q[name] = Q
            # A participant's M carries the rounds it missed (1/participation of them on
            # average): scale by the participating share, as iotcompress divides by N.
            update[a:b] = approx.reshape(-1) * share
        self.vel.mul_(self.s.momentum).add_(update)
        self.w.sub_(self.s.lr * self.vel)
        N = self.s.devices
        return [(_bytes(mask, self.bytes1), np.full(N, self.bytes1, np.int64)),
                (_bytes(mask, self.bytes2), np.full(N, self.bytes2, np.int64))]


class IotCompress(Method):
    """Each device has an :class:`iotcompress.Compressor` with its upload budget as
    ``target_bytes`` (a hard cap: what does not fit stays in its residual) and ``quant``
    values. The server averages the messages it gets and runs SGD with momentum on the
    average, as dense and low rank do; the update it applies (the velocity) goes back
    re-compressed by error-feedback compressors sized to the download budgets, one stream per
    distinct budget (devices with the same link get the same bytes, so the downlink is as
    sparse as the uplink and what a link cannot carry this round stays in the server's
    residual for it). Devices apply what they receive to their own weights, which therefore
    trail the server's by the downlink residual. A device left out of a round puts its
    gradient into its residual (``Compressor.accumulate``) and rejoins later."""

    key, label = "iotcompress", "iotcompress"
    shared = False

    def __init__(self, setup: Setup, w0: torch.Tensor) -> None:
        super().__init__(setup, w0)
        if setup.up_bytes is None or setup.down_bytes is None:
            raise ValueError("iotcompress needs per-device byte budgets (Setup.up_bytes, down_bytes)")
        N, n = setup.devices, setup.numel
        self.up = [ic.Compressor(n, target_bytes=int(setup.up_bytes[i]), quant=setup.quant, seed=setup.seed + i)
                   for i in range(N)]
        budgets = np.asarray(setup.down_bytes, np.int64)
        self.groups = []  # (device rows, downlink compressor) per distinct download budget
        for j, b in enumerate(np.unique(budgets)):
            rows = torch.from_numpy(np.flatnonzero(budgets == b))
            self.groups.append((rows, ic.Compressor(n, target_bytes=int(b), quant=setup.quant, seed=setup.seed + N + j)))
        self.agg = torch.zeros(n)
        self.vel = torch.zeros(n)

    def residual(self, i: int) -> np.ndarray:
        """What device ``i`` has not sent yet: its compressor's residual."""
        return self.up[i].residual

    def _upload(self, G: torch.Tensor, mask: np.ndarray) -> np.ndarray:
        """Devices compress and send; the server averages and takes its step; returns the
        upload sizes."""
        up = np.zeros(self.s.devices, np.int64)
        self.agg.zero_()
        # Over all N devices, not the participants: a device that rejoins brings the
        # gradients of the rounds it missed, so the averages summed over rounds are every
        # device's gradients summed over rounds / N (dividing by the participants would
        # scale the step by 1/participation).
        scale = 1.0 / self.s.devices
        for i in range(self.s.devices):
            if mask[i]:
                msg = self.up[i].compress(G[i])
                ic.decode_add(msg, self.agg, scale=scale)
                up[i] = len(msg)
            else:  # left out of the round: error feedback without sending
                self.up[i].accumulate(G[i])
        self.vel.mul_(self.s.momentum).add_(self.agg)
        self.server.sub_(self.s.lr * self.vel)
        return up

    def _download(self) -> Tuple[List[Tuple[torch.Tensor, bytes]], np.ndarray]:
        """The server's update, compressed per download budget: ``[(rows, message)]`` and the
        download sizes."""
        out, down = [], np.zeros(self.s.devices, np.int64)
        for rows, c in self.groups:
            msg = c.compress(self.vel)
            out.append((rows, msg))
            down[rows.numpy()] = len(msg)
        return out, down

    def _apply(self, msgs: List[Tuple[torch.Tensor, bytes]]) -> None:
        for rows, msg in msgs:
            update = torch.from_numpy(ic.decode(msg, self.s.numel))
            if len(rows) == self.s.devices:
                self.W.sub_(self.s.lr * update)
            else:
                self.W[rows] -= self.s.lr * update

    def step(self, G: torch.Tensor, mask: np.ndarray) -> Traffic:
        up = self._upload(G, mask)
        msgs, down = self._download()
        self._apply(msgs)
        return [(up, down)]


class IotCompressDelayed(IotCompress):
    """iotcompress with delayed averaging (Zhu et al., "Delayed Gradient Averaging", NeurIPS
    2021): each device applies its own step at once (its local momentum ``u = m u + g``) and
    the server's update of step ``t`` when it arrives, ``D`` steps later, in place of its own:
    ``w -= lr * (u_t - u_{t-D} + update_{t-D})``. Communication overlaps ``D`` steps."""

    key, label = "iotcompress-delayed", "iotcompress + delayed averaging"

    def __init__(self, setup: Setup, w0: torch.Tensor) -> None:
        super().__init__(setup, w0)
        if setup.delay < 1:
            raise ValueError("iotcompress-delayed needs delay >= 1")
        self.delay = setup.delay
        self.label = f"iotcompress + delayed averaging (D={setup.delay})"
        self.u = torch.zeros(setup.devices, setup.numel)
        self.local: collections.deque = collections.deque()
        self.inflight: collections.deque = collections.deque()

    def step(self, G: torch.Tensor, mask: np.ndarray) -> Traffic:
        self.u.mul_(self.s.momentum).add_(G)
        self.W.sub_(self.s.lr * self.u)  # the local step, at once
        self.local.append(self.u.clone())
        up = self._upload(G, mask)
        msgs, down = self._download()
        self.inflight.append(msgs)
        if len(self.inflight) > self.delay:  # the server's update of step t - D arrives
            self.W.add_(self.s.lr * self.local.popleft())
            self._apply(self.inflight.popleft())
        return [(up, down)]


class FedAvgDense(Method):
    """FedAvg (McMahan et al. 2017): each participant trains ``local_steps`` steps from the
    global model and uploads its float32 model; the server takes the mean weighted by shard
    size and sends the float32 model back."""

    key, label = "fedavg", "FedAvg (dense f32)"
    shared = False
    local_training = True

    def __init__(self, setup: Setup, w0: torch.Tensor, weights: Optional[np.ndarray] = None) -> None:
        super().__init__(setup, w0)
        self.weights = np.ones(setup.devices) if weights is None else np.asarray(weights, np.float64)

    def begin(self, mask: np.ndarray) -> torch.Tensor:
        """The participants' starting models (``[N, numel]``; other rows unused)."""
        self.W[torch.from_numpy(mask)] = self.server
        return self.W

    def finish(self, W: torch.Tensor, mask: np.ndarray) -> Traffic:
        w = torch.from_numpy(np.where(mask, self.weights, 0.0)).float()
        self.server = (w[:, None] * W).sum(0) / w.sum()
        n = 4 * self.s.numel
        return [(_bytes(mask, n), _bytes(mask, n))]


class FedAvgCompressed(FedAvgDense):
    """FedAvg with compressed models both ways, through :mod:`iotcompress.fedavg`: the same
    :class:`~iotcompress.fedavg.FedAvgClient` and :class:`~iotcompress.fedavg.FedAvgServer`
    that :func:`iotcompress.flower.compression_mod` and :class:`iotcompress.flower.CompressedFedAvg`
    run. Each device trains from its replica, sends its compressed delta (``density``, its
    own error feedback, capped at its upload budget with ``budget_bound``); the server sends
    the global model's compressed delta (``down_density``) or a keyframe to a device whose
    replica is stale. The byte counts are the envelopes' lengths."""

    key, label = "fedavg-iotcompress", "FedAvg + iotcompress"

    def __init__(self, setup: Setup, w0: torch.Tensor, weights: Optional[np.ndarray] = None) -> None:
        super().__init__(setup, w0, weights)
        from iotcompress.fedavg import HEADER_LEN, FedAvgClient, FedAvgServer, Layout

        layout = Layout.of({"w": np.zeros(setup.numel, np.float32)})
        self.fed_server = FedAvgServer(layout, w0.numpy(), density=setup.down_density, quant=setup.quant,
                                       lineage=setup.seed.to_bytes(8, "little"))
        floor = HEADER_LEN + 64
        self.clients = [
            FedAvgClient(density=setup.density, quant=setup.quant, seed=setup.seed + i,
                         budget_bytes=max(int(setup.up_bytes[i]), floor) if setup.budget_bound else None)
            for i in range(setup.devices)
        ]
        self._down = np.zeros(setup.devices, np.int64)

    def residual(self, i: int) -> np.ndarray:
        c = self.clients[i].state.compressor
        return np.zeros(self.s.numel, np.float32) if c is None else c["residual"]

    def begin(self, mask: np.ndarray) -> torch.Tensor:
        self._down[:] = 0
        for i in np.flatnonzero(mask):
            envelope = self.fed_server.message_for(int(i))
            self._down[i] = len(envelope)
            self.W[i] = torch.from_numpy(self.clients[i].receive(envelope))
        return self.W

    def finish(self, W: torch.Tensor, mask: np.ndarray) -> Traffic:
        up = np.zeros(self.s.devices, np.int64)
        deltas = []
        for i in range(self.s.devices):
            if not mask[i]:
                self.fed_server.confirm(i, None)
                continue
            envelope = self.clients[i].send(W[i].numpy())
            up[i] = len(envelope)
            deltas.append((self.fed_server.decode_reply(i, envelope), self.weights[i]))
            self.fed_server.confirm(i, True)
        self.server = torch.from_numpy(self.fed_server.aggregate(deltas))
        return [(up, self._down.copy())]


def make_method(key: str, setup: Setup, w0: torch.Tensor, weights: Optional[np.ndarray] = None) -> Method:
    if key in ("fedavg", "fedavg-iotcompress"):
        return (FedAvgDense if key == "fedavg" else FedAvgCompressed)(setup, w0, weights)
    classes = {c.key: c for c in (Dense, LowRank, IotCompress, IotCompressDelayed)}
    if key not in classes:
        raise ValueError(f"unknown method {key!r}; choose from {', '.join(METHODS)}")
    return classes[key](setup, w0)
