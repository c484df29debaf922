"""The DDP communication hook: top-k / threshold / DGC compression of gradient buckets.

In the idiom of ``torch.distributed.algorithms.ddp_comm_hooks``::

    from iotcompress.torch import CompressionState, compression_hook
    state = CompressionState(density=0.001, quant="int8", momentum=0.9, warmup_steps=200)
    ddp_model.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1, momentum=0.0)  # momentum lives in the hook

(No ``from __future__ import annotations`` here: DDP checks the hook's annotations at run time.)
"""


import math
import threading
import zlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

import iotcompress as ic

from .. import _iotcompress as _ext
from .._network import budget_bytes
from ._frames import join_frames, split_frames

__all__ = ["CompressionState", "compression_hook", "warmup_density"]

_STATE_FORMAT = 2  # 2 added delay and the in-flight exchanges; 1 (delay 0) still loads


def warmup_density(target: float, step: int, warmup_steps: int) -> float:
    """DGC's warm-up schedule (Lin et al., ICLR 2018, §4): over ``warmup_steps`` the density
    falls through 25 %, 6.25 %, 1.5625 % and 0.390625 % (four equal stages), then stays at
    ``target``; never below the target.

    Example::

        >>> [warmup_density(0.001, s, 8) for s in (0, 2, 4, 6, 8)]
        [0.25, 0.0625, 0.015625, 0.00390625, 0.001]
    """
    if step >= warmup_steps:
        return target
    stage = step * 4 // warmup_steps
    return max(target, 0.25 ** (stage + 1))


class CompressionState:
    """State of :func:`compression_hook`: one error-feedback compressor per parameter.

    The options are those of :class:`iotcompress.Compressor` plus:

    * ``warmup_steps``: DGC's density warm-up (needs ``density``), see :func:`warmup_density`;
    * ``clip_norm``: DGC's local gradient clipping: each parameter's gradient is scaled so
      its L2 norm is at most ``clip_norm / sqrt(world_size)`` before it enters the residual
      (per parameter, as in DGC's reference code, which also keeps it independent of DDP's
      bucket layout);
    * ``network``, ``budget_ms`` and ``model``: a per-device budget instead of a density or
      threshold. This rank's link (an :class:`iotcompress.NetworkProfile`) may spend
      ``budget_ms`` per step: the ``bytes_within(budget_ms)`` bytes are split over ``model``'s
      parameters (each gets what one entry needs, the rest in proportion to its size, less
      the frame lengths), and each parameter's adaptive threshold aims at its share and never
      exceeds it. So every step's ``T_c = latency + bytes / bandwidth`` of what this rank
      sends stays within ``budget_ms``; a rank on a worse link sends fewer entries (a higher
      ``Wt``). Ranks may have different links. :meth:`set_budget` changes them mid-training;
    * ``delay=D`` (int >= 0): delayed gradient averaging (Zhu et al., *Delayed Gradient
      Averaging*, NeurIPS 2021). The exchange of step ``t`` is waited for only at step
      ``t + D``, so it overlaps ``D`` steps of compute; the hook returns
      ``g_t - g_{t-D} + avg_{t-D}`` (this rank's gradient now, the average ``D`` steps late,
      correcting the stale local part), or ``g_t`` for ``t < D``. ``g`` is the bucket's raw
      gradient (before clipping and compression). ``delay=0`` is the synchronous hook.

    ``participating`` (default True, settable before any step): False makes this rank sit
    the round out: each parameter's gradient is only added into its residual
    (:meth:`iotcompress.Compressor.accumulate`, nothing is lost) and the rank sends an
    empty byte string; every rank divides the sum of the messages by the number of ranks
    that sent (a zero length in the sizes exchange is the flag). The rank still receives
    and applies the average, so the replicas stay equal.

    Each parameter has its own compressor, so residuals follow parameters, not buckets: DDP's
    bucket rebuild after the first iteration loses nothing. Parameters are keyed by their
    position in DDP's *initial* bucket layout, which is the same in every process started
    with the same model and ``bucket_cap_mb``; that is what makes :meth:`state_dict`
    restorable in a new process.

    ``stats`` (after each step): ``iteration``, ``bytes_sent`` and ``bytes_received`` by this
    rank in the last step, ``dense_bytes`` (what plain allreduce would have sent),
    ``density`` (entries sent / elements), ``residual_norm``, running totals
    ``total_bytes_sent``, ``total_bytes_received``, ``total_dense_bytes``, and with a
    ``network``: ``comm_time_ms`` (the modelled ``T_c`` of the bytes sent) and
    ``budget_bytes``.

    Example::

        state = CompressionState(density=0.001, quant="int8", momentum=0.9, warmup_steps=100)
        model.register_comm_hook(state, compression_hook)
        ...
        torch.save({"model": model.state_dict(), "hook": state.state_dict()}, path)

        # A rank on an LTE uplink that may spend 100 ms per step communicating:
        state = CompressionState(network=ic.NetworkProfile.preset("lte"), budget_ms=100,
                                 model=model, quant="int8", momentum=0.9)
    """

    __slots__ = (
        "process_group",
        "options",
        "warmup_steps",
        "clip_norm",
        "delay",
        "participating",
        "iteration",
        "stats",
        "_compressors",
        "_keys",
        "_pending",
        "_step",
        "_inflight",
        "_unlaunched",
        "network",
        "budget_ms",
        "_budgets",
    )

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        *,
        density: Optional[float] = None,
        threshold: Optional[float] = None,
        quant: str = "f32",
        momentum: float = 0.0,
        nesterov: bool = False,
        warmup_steps: int = 0,
        clip_norm: Optional[float] = None,
        seed: int = 0,
        delay: int = 0,
        network: Optional[ic.NetworkProfile] = None,
        budget_ms: Optional[float] = None,
        model: Optional[torch.nn.Module] = None,
    ) -> None:
        options = dict(density=density, threshold=threshold, quant=quant, momentum=momentum, nesterov=nesterov, seed=seed)
        ic.Compressor(1, **options)  # validates every option with the package's messages
        if network is not None and (density is not None or threshold is not None):
            raise ValueError("network=... sets the selection from the budget: leave out density and threshold")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if warmup_steps and density is None:
            raise ValueError("warmup_steps needs density=...: the warm-up lowers the top-k density step by step")
        if clip_norm is not None and not (isinstance(clip_norm, (int, float)) and clip_norm > 0 and math.isfinite(clip_norm)):
            raise ValueError(f"clip_norm must be a positive number, got {clip_norm!r}")
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ValueError(f"delay must be an int >= 0, got {delay!r}")
        self.process_group = process_group
        self.options = options
        self.warmup_steps = warmup_steps
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.delay = delay
        self.participating = True
        self.iteration = 0
        self.stats: Dict[str, Any] = {"total_bytes_sent": 0, "total_bytes_received": 0, "total_dense_bytes": 0}
        self._compressors: Dict[str, ic.Compressor] = {}
        self._keys: Dict[int, str] = {}
        self._pending: Dict[str, Dict[str, Any]] = {}
        self._step = _StepStats()
        # delay > 0: step -> parameter key -> (its exchange, this rank's gradient of that step)
        self._inflight: Dict[int, Dict[str, Tuple["_Exchange", np.ndarray]]] = {}
        # exchanges whose sizes are out but whose payload is not, in launch order
        self._unlaunched: List["_Exchange"] = []
        self.network: Optional[ic.NetworkProfile] = None
        self.budget_ms: Optional[float] = None
        self._budgets: Dict[int, int] = {}
        if network is not None or budget_ms is not None or model is not None:
            self.set_budget(network, budget_ms, model)

    # -- per-device budgets ---------------------------------------------------------------------

    def set_budget(self, network: Optional[ic.NetworkProfile], budget_ms: Optional[float], model: Optional[torch.nn.Module]) -> None:
        """Sets (or changes, mid-training) this rank's link and time budget per step; see the
        class docstring. ``model`` is the (DDP) model whose parameters share the budget.
        Raises :class:`ValueError` when the budget cannot carry one entry per parameter.

        Example::

            state.set_budget(ic.NetworkProfile.preset("lora"), 3000, ddp_model)  # the link got worse
        """
        if model is None or not isinstance(model, torch.nn.Module):
            raise ValueError("network=... needs model=...: the model whose parameters share the step's budget")
        if self.warmup_steps:
            raise ValueError("warmup_steps lowers a density step by step; a network budget sets the selection itself")
        total = budget_bytes(network, budget_ms)
        params = [p for p in model.parameters() if p.requires_grad]
        quant = self.options["quant"]
        # One entry per parameter first, then the rest by size; each frame costs its length.
        floors = [_ext.message_len_bound(p.numel(), 1, quant) + 5 for p in params]
        spare = total - sum(floors)
        if spare < 0:
            raise ValueError(
                f"{network!r} carries {total} bytes in {budget_ms} ms, but {len(params)} parameters need at "
                f"least {sum(floors)} (one entry each): raise budget_ms"
            )
        numel = sum(p.numel() for p in params) or 1
        self._budgets = {id(p): f - 5 + spare * p.numel() // numel for p, f in zip(params, floors)}
        self.network, self.budget_ms = network, float(budget_ms)
        self.options.update(density=None, threshold=None)
        for param_id, key in self._keys.items():
            comp = self._compressors.get(key)
            if comp is not None and param_id in self._budgets:
                comp.set_selection(target_bytes=self._budgets[param_id])

    # -- parameters and their compressors -------------------------------------------------

    def _density_now(self) -> Optional[float]:
        density = self.options["density"]
        if density is None or not self.warmup_steps:
            return density
        return warmup_density(density, self.iteration, self.warmup_steps)

    def _compressor(self, param: torch.Tensor, bucket_index: int, position: int) -> ic.Compressor:
        key = self._keys.get(id(param))
        if key is None:
            key = f"{bucket_index}.{position}"
            self._keys[id(param)] = key
        comp = self._compressors.get(key)
        if comp is None:
            opts = dict(self.options)
            # Each parameter gets its own random streams, the same in every process.
            opts["seed"] = (opts["seed"] * 0x9E3779B1 + zlib.crc32(key.encode())) % 2**64
            if opts["density"] is not None:
                opts["density"] = self._density_now()
            if self.network is not None:
                if id(param) not in self._budgets:
                    raise ValueError("a parameter of this DDP model is not in the model given to set_budget")
                opts["target_bytes"] = self._budgets[id(param)]
            comp = ic.Compressor(param.numel(), **opts)
            pending = self._pending.pop(key, None)
            if pending is not None:
                comp.load_state_dict(pending)
            self._compressors[key] = comp
        return comp

    def compressor_for(self, param: torch.Tensor) -> Optional[ic.Compressor]:
        """The compressor holding ``param``'s residual and velocity (None before the first
        step that saw it).

        Example::

            r = state.compressor_for(model.module.fc.weight).residual
        """
        key = self._keys.get(id(param))
        return None if key is None else self._compressors.get(key)

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Options, iteration, every parameter's compressor state (numpy arrays) and, with
        ``delay > 0``, the exchanges still in flight: call it between steps, on every rank.

        With a delay, the averages of the last ``delay`` steps have not been applied yet.
        This waits for the exchanges already launched and stores their decoded averages; the
        last step's exchange, whose sizes are out but whose payload is launched only at the
        next step, is stored as this rank's message and the gathered sizes, and the restored
        state launches it at its first step, as the uninterrupted run would. Together with
        this rank's gradients of those steps that makes the resumed run bit-identical.
        Nothing here talks to the other ranks.

        Example::

            torch.save(state.state_dict(), f"hook{rank}.pt")
        """
        compressors = {key: c.state_dict() for key, c in self._compressors.items()}
        compressors.update({k: v for k, v in self._pending.items() if k not in compressors})
        return {
            "format": _STATE_FORMAT,
            "options": dict(self.options),
            "warmup_steps": self.warmup_steps,
            "clip_norm": self.clip_norm,
            "delay": self.delay,
            "iteration": self.iteration,
            "stats": dict(self.stats),
            "network": None if self.network is None else self.network.to_dict(),
            "budget_ms": self.budget_ms,
            "compressors": compressors,
            "inflight": self._inflight_state(),
        }

    def _inflight_state(self) -> Dict[str, Any]:
        exchanges: List[_Exchange] = []
        index: Dict[int, int] = {}
        local: Dict[int, Dict[str, Tuple[int, np.ndarray]]] = {}
        for step in sorted(self._inflight):
            for key, (ex, grad) in self._inflight[step].items():
                if id(ex) not in index:
                    index[id(ex)] = len(exchanges)
                    exchanges.append(ex)
                local.setdefault(step, {})[key] = (index[id(ex)], np.array(grad, copy=True))
        unlaunched = {id(ex) for ex in self._unlaunched}
        saved = []
        for ex in exchanges:
            if id(ex) in unlaunched:
                saved.append(ex.unsent_state())
            else:
                saved.append(ex.decoded_state())
        order = [index[id(ex)] for ex in self._unlaunched if id(ex) in index]
        return {"exchanges": saved, "local": local, "unlaunched": order}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the options (``delay`` included) must match.
        Compressors are rebuilt lazily as their parameters appear, so this may be called
        before the first step.

        Example::

            state.load_state_dict(torch.load("hook.pt", weights_only=False))
        """
        if state.get("format") not in (1, _STATE_FORMAT):
            raise ValueError(f"unknown CompressionState format {state.get('format')!r}")
        mine = (self.options, self.warmup_steps, self.clip_norm, self.delay)
        theirs = (dict(state["options"]), state["warmup_steps"], state["clip_norm"], state.get("delay", 0))
        if mine != theirs:
            raise ValueError(f"checkpoint options {theirs} differ from this state's {mine}")
        self.iteration = int(state["iteration"])
        self.stats = dict(state["stats"])
        if self.network is None and state.get("network") is not None:
            # Unpickled without a model: the compressors carry their budgets; keep the link
            # for the stats.
            n = state["network"]
            self.network = ic.NetworkProfile(n["latency_ms"], n["bandwidth_mbps"], n["name"])
            self.budget_ms = state["budget_ms"]
        self._pending = dict(state["compressors"])
        for key, comp in self._compressors.items():
            if key in self._pending:
                comp.load_state_dict(self._pending.pop(key))
        inflight = state.get("inflight") or {"exchanges": [], "local": {}, "unlaunched": []}
        exchanges = [_Exchange.restore(e) for e in inflight["exchanges"]]
        self._inflight = {
            int(step): {key: (exchanges[i], np.asarray(g, dtype=np.float32)) for key, (i, g) in entries.items()}
            for step, entries in inflight["local"].items()
        }
        self._unlaunched = [exchanges[i] for i in inflight["unlaunched"]]

    def __getstate__(self) -> Dict[str, Any]:
        # The process group does not pickle; the restored state uses the default group.
        return self.state_dict()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        o = state["options"]
        CompressionState.__init__(
            self, None, density=o["density"], threshold=o["threshold"], quant=o["quant"], momentum=o["momentum"],
            nesterov=o["nesterov"], warmup_steps=state["warmup_steps"], clip_norm=state["clip_norm"], seed=o["seed"],
            delay=state.get("delay", 0),
        )
        self.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"CompressionState({self.options}, warmup_steps={self.warmup_steps}, clip_norm={self.clip_norm}, "
                f"delay={self.delay})")


class _StepStats:
    __slots__ = ("sent", "received", "dense", "nnz", "numel", "residual_sq")

    def __init__(self) -> None:
        self.sent = self.received = self.dense = self.nnz = self.numel = 0
        self.residual_sq = 0.0


class _Exchange:
    """One bucket's exchange of one step under ``delay > 0``: the sizes ``all_gather`` is
    launched by the hook of that step, the payload ``all_gather`` by the first hook of the
    next step (the sizes have long arrived by then), and the result is waited for ``delay``
    steps later. Every collective is issued from a hook call, never from a future's
    callback, so every rank issues them in the same order (DDP calls the hooks in bucket
    order)."""

    __slots__ = ("step", "keys", "numels", "blob", "lengths", "future", "_sizes", "_sizes_work", "_gathered",
                 "_averages", "_lock")

    def __init__(self, step: int, keys: List[str], numels: List[int], blob: bytes) -> None:
        self.step, self.keys, self.numels, self.blob = step, keys, numels, blob
        self.lengths: Optional[List[int]] = None
        self.future: Optional[torch.futures.Future] = None
        self._sizes: Optional[List[torch.Tensor]] = None
        self._sizes_work: Any = None
        self._gathered: Optional[List[torch.Tensor]] = None
        self._averages: Optional[Dict[str, np.ndarray]] = None
        self._lock = threading.Lock()

    def launch_sizes(self, group: Any, world: int, comm_device: torch.device) -> None:
        size = torch.tensor([len(self.blob)], dtype=torch.int64, device=comm_device)
        self._sizes = [torch.zeros(1, dtype=torch.int64, device=comm_device) for _ in range(world)]
        self._sizes_work = dist.all_gather(self._sizes, size, group=group, async_op=True)

    def _wait_sizes(self) -> List[int]:
        if self.lengths is None:
            self._sizes_work.wait()
            self.lengths = [int(s.item()) for s in self._sizes]
            self._sizes = self._sizes_work = None
        return self.lengths

    def launch_payload(self, group: Any, world: int, rank: int, comm_device: torch.device) -> int:
        """Launches the payload gather; returns the bytes this rank will receive."""
        lengths = self._wait_sizes()
        if len(lengths) != world:
            raise RuntimeError(f"in-flight exchange was gathered from {len(lengths)} ranks, the group has {world}")
        payload = _padded(self.blob, max(lengths))
        payload = payload.to(comm_device)
        self._gathered = [torch.empty_like(payload) for _ in range(world)]
        self.future = dist.all_gather(self._gathered, payload, group=group, async_op=True).get_future()
        self.blob = b""
        return sum(n for r, n in enumerate(lengths) if r != rank)

    def averages(self) -> Dict[str, np.ndarray]:
        """Each parameter's average over the ranks that sent (waits for the payload)."""
        with self._lock:
            if self._averages is None:
                if self.future is None:
                    raise RuntimeError("iotcompress: an exchange was used before its payload was launched")
                self.future.wait()
                assert self._gathered is not None and self.lengths is not None
                total = _decode_average([g[:n] for g, n in zip(self._gathered, self.lengths)], self.numels)
                offsets = np.cumsum([0] + self.numels)
                self._averages = {k: total[o : o + n] for k, o, n in zip(self.keys, offsets, self.numels)}
                self._gathered = None
            return self._averages

    def unsent_state(self) -> Dict[str, Any]:
        return {"step": self.step, "keys": list(self.keys), "numels": list(self.numels), "blob": bytes(self.blob),
                "lengths": list(self._wait_sizes()), "averages": None}

    def decoded_state(self) -> Dict[str, Any]:
        averages = {k: np.array(v, copy=True) for k, v in self.averages().items()}
        return {"step": self.step, "keys": list(self.keys), "numels": list(self.numels), "blob": None,
                "lengths": list(self.lengths or []), "averages": averages}

    @classmethod
    def restore(cls, saved: Dict[str, Any]) -> "_Exchange":
        ex = cls(int(saved["step"]), list(saved["keys"]), list(saved["numels"]), bytes(saved["blob"] or b""))
        ex.lengths = list(saved["lengths"])
        if saved["averages"] is not None:
            ex._averages = {k: np.asarray(v, dtype=np.float32) for k, v in saved["averages"].items()}
        return ex


def _padded(blob: bytes, length: int) -> torch.Tensor:
    """``blob`` in a uint8 tensor of ``max(length, 1)`` bytes (zero padding)."""
    payload = torch.zeros(max(length, 1), dtype=torch.uint8)
    if blob:
        payload[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return payload


def _decode_average(blobs: List[torch.Tensor], numels: List[int]) -> np.ndarray:
    """The bucket's average: every sending rank's messages (one frame per parameter of
    ``numels`` elements, in rank order) summed and divided by the number of ranks that sent
    (an empty blob is a rank that sat the round out)."""
    total = np.zeros(sum(numels), dtype=np.float32)
    senders = sum(1 for b in blobs if b.numel())
    offsets = np.cumsum([0] + numels)
    for blob in blobs:
        if not blob.numel():
            continue
        frames = split_frames(blob.cpu().numpy().tobytes(), len(numels))
        for offset, numel, msg in zip(offsets, numels, frames):
            ic.decode_add(msg, total[offset : offset + numel], scale=1.0 / senders)
    return total


def _bucket_layout(bucket: dist.GradBucket) -> List[Tuple[torch.Tensor, int, int]]:
    """(parameter, offset, numel) in the bucket's flat buffer."""
    layout, offset = [], 0
    for p in bucket.parameters():
        layout.append((p, offset, p.numel()))
        offset += p.numel()
    return layout


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compresses this rank's bucket with error feedback, exchanges
    the variable-size messages with ``all_gather`` (sizes first, then the bytes), adds every
    sending rank's message into a dense buffer and divides by the number of ranks that sent
    (the world size unless some set ``state.participating = False``).

    With ``state.delay = D > 0`` (delayed gradient averaging) the exchange of step ``t`` is
    waited for only at step ``t + D``; the future completes with
    ``g_t - g_{t-D} + avg_{t-D}`` (``g_t`` alone for ``t < D``).

    Works with gloo (CPU tensors) and NCCL (CUDA tensors, compressed through a CPU copy), with
    fp32, fp16 and bf16 buckets. A message that carries no entry is legal.

    Example::

        ddp_model.register_comm_hook(CompressionState(density=0.001, quant="int8"), compression_hook)
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    device, dtype = buffer.device, buffer.dtype
    comm_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")

    flat = buffer.detach()
    if flat.device.type != "cpu":
        staging = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        staging.copy_(flat)
        flat = staging
    grad = flat.to(torch.float32).contiguous().numpy()
    clip = None if state.clip_norm is None else state.clip_norm / math.sqrt(world)

    layout = _bucket_layout(bucket)
    density = state._density_now()
    messages = []
    keys = []
    step = state._step
    participating = bool(state.participating)
    for position, (param, offset, numel) in enumerate(layout):
        comp = state._compressor(param, bucket.index(), position)
        keys.append(state._keys[id(param)])
        if density is not None and comp.options["density"] != density:
            comp.set_selection(density=density, exact=comp.options["exact"])
        g = grad[offset : offset + numel]
        if clip is not None:
            norm = float(np.sqrt(np.dot(g.astype(np.float64), g.astype(np.float64))))
            if norm > clip:
                g = g * np.float32(clip / norm)
        if participating:
            messages.append(comp.compress(g))
            step.nnz += comp.last_nnz
        else:
            comp.accumulate(g)  # this round is skipped: the gradient waits in the residual
        step.residual_sq += comp.residual_norm**2
    # A rank that sits the round out sends nothing at all: length 0 is its flag.
    blob = join_frames(messages) if participating else b""
    step.numel += grad.size
    step.sent += len(blob)
    step.dense += 4 * grad.size
    if state.delay:
        return _delayed(state, bucket, grad, layout, keys, blob, group, world, comm_device, device, dtype)

    # Sizes first (tiny, blocking), then the bytes padded to the largest message.
    size = torch.tensor([len(blob)], dtype=torch.int64, device=comm_device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=comm_device) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s.item()) for s in sizes]
    payload = _padded(blob, max(lengths)).to(comm_device)
    gathered = [torch.empty_like(payload) for _ in range(world)]
    fut = dist.all_gather(gathered, payload, group=group, async_op=True).get_future()
    is_last = bucket.is_last()
    me = dist.get_rank(group)

    def decode(_: torch.futures.Future) -> torch.Tensor:
        step.received += sum(n for rank, n in enumerate(lengths) if rank != me)
        total = _decode_average([g[:n] for g, n in zip(gathered, lengths)], [n for _, _, n in layout])
        if is_last:
            _finish_step(state)
        return torch.from_numpy(total).to(device=device, dtype=dtype)

    return fut.then(decode)


def _delayed(state: CompressionState, bucket: dist.GradBucket, grad: np.ndarray, layout: List[Tuple[torch.Tensor, int, int]],
             keys: List[str], blob: bytes, group: Any, world: int, comm_device: torch.device, device: torch.device,
             dtype: torch.dtype) -> torch.futures.Future[torch.Tensor]:
    """Delayed gradient averaging (Zhu et al., NeurIPS 2021): launch this step's exchange,
    return ``g_t - g_{t-D} + avg_{t-D}`` per parameter."""
    t, delay, rank = state.iteration, state.delay, dist.get_rank(group)
    local = np.array(grad, dtype=np.float32, copy=True)  # the bucket is overwritten with the result
    # The payloads of earlier steps: their sizes went out at least one step ago. In launch
    # order, from the hook: the same collectives in the same order on every rank.
    while state._unlaunched and state._unlaunched[0].step < t:
        state._step.received += state._unlaunched.pop(0).launch_payload(group, world, rank, comm_device)
    ex = _Exchange(t, keys, [n for _, _, n in layout], blob)
    ex.launch_sizes(group, world, comm_device)
    state._unlaunched.append(ex)
    mine = state._inflight.setdefault(t, {})
    old = state._inflight.get(t - delay, {})
    pairs = []
    for key, (_, offset, numel) in zip(keys, layout):
        mine[key] = (ex, local[offset : offset + numel])
        pairs.append((key, offset, numel, old.pop(key, None)))
    if not old:
        state._inflight.pop(t - delay, None)
    if bucket.is_last():
        _finish_step(state)

    def combine(_: Any = None) -> torch.Tensor:
        out = local.copy()
        for key, offset, numel, entry in pairs:
            if entry is not None:
                exchange, before = entry
                part = out[offset : offset + numel]
                part -= before
                part += exchange.averages()[key]
        return torch.from_numpy(out).to(device=device, dtype=dtype)

    waits, seen = [], set()
    for *_, entry in pairs:
        if entry is not None and entry[0].future is not None and id(entry[0]) not in seen:
            seen.add(id(entry[0]))
            waits.append(entry[0].future)
    if waits:
        return torch.futures.collect_all(waits).then(combine)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(combine())
    return fut


def _finish_step(state: CompressionState) -> None:
    s = state._step
    state.stats.update(
        iteration=state.iteration,
        bytes_sent=s.sent,
        bytes_received=s.received,
        dense_bytes=s.dense,
        density=s.nnz / max(s.numel, 1),
        residual_norm=math.sqrt(s.residual_sq),
        total_bytes_sent=state.stats.get("total_bytes_sent", 0) + s.sent,
        total_bytes_received=state.stats.get("total_bytes_received", 0) + s.received,
        total_dense_bytes=state.stats.get("total_dense_bytes", 0) + s.dense,
    )
    if state.network is not None:
        state.stats.update(
            comm_time_ms=state.network.comm_time_ms(s.sent),
            budget_bytes=state.network.bytes_within(state.budget_ms),
        )
    state.iteration += 1
    state._step = _StepStats()


