"""The DDP communication hook: top-k / threshold / DGC compression of gradient buckets.

In the idiom of ``torch.distributed.algorithms.ddp_comm_hooks``::

    from iotcompress.torch import CompressionState, compression_hook
    state = CompressionState(density=0.001, quant="int8", momentum=0.9, warmup_steps=200)
    ddp_model.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1, momentum=0.0)  # momentum lives in the hook

(No ``from __future__ import annotations`` here: DDP checks the hook's annotations at run time.)
"""


import json
import math
import threading
import zlib
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

import iotcompress as ic

from .. import _iotcompress as _ext
from .._network import budget_bytes
from ..errors import DecodeError, IotCompressError
from ._checkpoint import checked, compressor_states, f32_vector, loaded_compressor, to_checkpoint, undo_of_compress, undoable
from ._frames import FAILED, HEADER_LEN, MESSAGE, SAT_OUT, Header, decode_header, encode_header, framed_len, join_frames, split_frames

__all__ = ["CompressionState", "compression_hook", "warmup_density", "RankFailedError", "SettingsMismatchError"]

# 3: tensors instead of numpy arrays, participating, on_nonfinite, the budget rule;
# 2 added delay and the in-flight exchanges; 1 (delay 0); all three load.
_STATE_FORMAT = 3
_PROTOCOL = 1  # the hook's exchange: settings on the first step, then a header and the bytes per bucket
_MAX_SETTINGS_LEN = 1 << 20
_ON_NONFINITE = ("raise", "skip")


class RankFailedError(IotCompressError, RuntimeError):
    """Another rank's compression hook failed in this step: it sent an error frame instead of
    its bucket, and this rank's hook raises instead of waiting for it. The message names the
    failed rank and its reason. With ``delay=0`` every compressor is back where it was before
    the step (on every rank).

    Example::

        try:
            loss.backward()
        except RankFailedError as e:
            print("a peer failed:", e)
    """


class SettingsMismatchError(IotCompressError, ValueError):
    """On their first step the ranks' hooks found that a setting that must agree differs
    (quant, selection, delay, momentum, bucket layout, wire version, ...): raised on every
    rank, naming each differing setting and every rank's value.

    Example::

        with pytest.raises(SettingsMismatchError, match="delay"):
            loss.backward()
    """


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
      gradient (before clipping and compression). ``delay=0`` is the synchronous hook;
    * ``on_nonfinite``: what a bucket whose gradient cannot be compressed (NaN or infinity in
      it, or a residual that would overflow float32: :class:`iotcompress.CompressError`)
      does. ``"raise"`` (the default): this rank's hook raises that error and its peers raise
      :class:`RankFailedError` naming it (see :func:`compression_hook`). ``"skip"``: this rank
      sits out the rest of the step, from that bucket on: it sends nothing, its compressors
      are left exactly as they were, the others average without it, and it applies their
      average (with a delay, its own gradient of those buckets counts as zero). The count is
      in ``stats["nonfinite_skips"]``. What a fleet wants from one bad sensor.

    ``participating`` (default True, settable before any step): False makes this rank sit
    the round out: each parameter's gradient is only added into its residual
    (:meth:`iotcompress.Compressor.accumulate`, nothing is lost) and the rank sends no
    message; every rank divides the sum of the messages by the number of ranks that sent
    (the bucket headers say who did). The rank still receives and applies the average, so
    the replicas stay equal.

    Each parameter has its own compressor, so residuals follow parameters, not buckets: DDP's
    bucket rebuild after the first iteration loses nothing. Parameters are keyed by their
    position in DDP's *initial* bucket layout, which is the same in every process started
    with the same model and ``bucket_cap_mb``; that is what makes :meth:`state_dict`
    restorable in a new process.

    ``stats`` (after each step): ``iteration``, ``bytes_sent`` and ``bytes_received`` by this
    rank in the last step, ``dense_bytes`` (what plain allreduce would have sent),
    ``density`` (entries sent / elements), ``residual_norm``, running totals
    ``total_bytes_sent``, ``total_bytes_received``, ``total_dense_bytes``,
    ``nonfinite_skips``, and with a ``network``: ``comm_time_ms`` (the modelled ``T_c`` of the
    bytes sent) and ``budget_bytes``.

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
        "on_nonfinite",
        "participating",
        "iteration",
        "stats",
        "_compressors",
        "_keys",
        "_step",
        "_inflight",
        "_unlaunched",
        "_undo_last",
        "_verify_step",
        "network",
        "budget_ms",
        "_budget_rule",
        "_budget_params",
        "_dense_values",
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
        on_nonfinite: str = "raise",
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
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.process_group = process_group
        self.options = options
        self.warmup_steps = warmup_steps
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.delay = delay
        self.on_nonfinite = on_nonfinite
        self.participating = True
        self.iteration = 0
        self.stats: Dict[str, Any] = {"total_bytes_sent": 0, "total_bytes_received": 0, "total_dense_bytes": 0,
                                      "nonfinite_skips": 0}
        self._compressors: Dict[str, ic.Compressor] = {}
        self._keys: Dict[int, str] = {}
        self._step = _StepStats()
        # delay > 0: step -> parameter key -> (its exchange, this rank's gradient of that step)
        self._inflight: Dict[int, Dict[str, Tuple["_Exchange", np.ndarray]]] = {}
        # exchanges whose headers are out but whose payload is not, in launch order
        self._unlaunched: List["_Exchange"] = []
        # delay > 0: the undo of the last finished step, until the next one compresses
        self._undo_last: List[Callable[[], None]] = []
        self._verify_step: Optional[int] = None  # the step whose hooks compare the ranks' settings
        self.network: Optional[ic.NetworkProfile] = None
        # Dense wire values per bucket index, reused every step: a fresh bucket-sized array
        # each step costs its page faults, more than the copy into it.
        self._dense_values: Dict[int, np.ndarray] = {}
        self.budget_ms: Optional[float] = None
        self._budget_rule: Optional[Tuple[int, int]] = None  # (spare bytes, elements) of set_budget
        self._budget_params: set = set()
        if network is not None or budget_ms is not None or model is not None:
            self.set_budget(network, budget_ms, model)

    # -- per-device budgets ---------------------------------------------------------------------

    def set_budget(self, network: Optional[ic.NetworkProfile], budget_ms: Optional[float], model: Optional[torch.nn.Module]) -> None:
        """Sets (or changes, mid-training) this rank's link and time budget per step; see the
        class docstring. ``model`` is the (DDP) model whose parameters share the budget.
        Raises :class:`ValueError` when the budget cannot carry one entry per parameter
        (then nothing changes).

        Example::

            state.set_budget(ic.NetworkProfile.preset("lora"), 3000, ddp_model)  # the link got worse
        """
        if model is None or not isinstance(model, torch.nn.Module):
            raise ValueError("network=... needs model=...: the model whose parameters share the step's budget")
        if self.warmup_steps:
            raise ValueError("warmup_steps lowers a density step by step; a network budget sets the selection itself")
        total = budget_bytes(network, budget_ms)
        params = [p for p in model.parameters() if p.requires_grad and p.numel()]
        quant = self.options["quant"]
        # One entry per parameter first, then the rest by size; each frame costs its length.
        floors = [_ext.message_len_bound(p.numel(), 1, quant) + 5 for p in params]
        spare = total - sum(floors)
        if spare < 0:
            raise ValueError(
                f"{network!r} carries {total} bytes in {budget_ms} ms, but {len(params)} parameters need at "
                f"least {sum(floors)} (one entry each): raise budget_ms"
            )
        self._budget_rule = (spare, sum(p.numel() for p in params) or 1)
        self._budget_params = {id(p) for p in params}
        self.network, self.budget_ms = network, float(budget_ms)
        self.options.update(density=None, threshold=None)
        for comp in self._compressors.values():
            comp.set_selection(target_bytes=self._budget_for(comp.numel))

    def _budget_for(self, numel: int) -> int:
        """A parameter's share of the step's bytes: one entry, plus its part of the spare."""
        assert self._budget_rule is not None
        spare, total = self._budget_rule
        return _ext.message_len_bound(numel, 1, self.options["quant"]) + spare * numel // total

    # -- parameters and their compressors -------------------------------------------------

    def _density_now(self) -> Optional[float]:
        density = self.options["density"]
        if density is None or not self.warmup_steps:
            return density
        return warmup_density(density, self.iteration, self.warmup_steps)

    def _new_compressor(self, key: str, numel: int) -> ic.Compressor:
        opts = dict(self.options)
        # Each parameter gets its own random streams, the same in every process.
        opts["seed"] = (opts["seed"] * 0x9E3779B1 + zlib.crc32(key.encode())) % 2**64
        if opts["density"] is not None:
            opts["density"] = self._density_now()
        if self._budget_rule is not None:
            opts["target_bytes"] = self._budget_for(numel)
        return undoable(ic.Compressor(numel, **opts))

    def _compressor(self, param: torch.Tensor, bucket_index: int, position: int) -> ic.Compressor:
        key = self._keys.setdefault(id(param), f"{bucket_index}.{position}")
        comp = self._compressors.get(key)
        if comp is None:
            if self._budget_params and id(param) not in self._budget_params:
                raise ValueError("a parameter of this DDP model is not in the model given to set_budget")
            comp = self._compressors[key] = self._new_compressor(key, param.numel())
        elif comp.numel != param.numel():
            raise ValueError(f"compressor {key!r} holds {comp.numel} elements, its parameter has {param.numel()}: "
                             "a checkpoint of another model or bucket_cap_mb?")
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
        """Options, iteration, every parameter's compressor state and, with ``delay > 0``,
        the exchanges still in flight: call it between steps, on every rank. It holds only
        torch tensors and plain Python types, so ``torch.load(path)`` restores it with its
        default ``weights_only=True``.

        With a delay, the averages of the last ``delay`` steps have not been applied yet.
        This waits for the exchanges already launched and stores their decoded averages; the
        last step's exchange, whose headers are out but whose payload is launched only at the
        next step, is stored as this rank's message and the gathered headers, and the
        restored state launches it at its first step, as the uninterrupted run would.
        Together with this rank's gradients of those steps that makes the resumed run
        bit-identical. Nothing here talks to the other ranks.

        Example::

            torch.save(state.state_dict(), f"hook{rank}.pt")
            state.load_state_dict(torch.load(f"hook{rank}.pt"))
        """
        return {
            "format": _STATE_FORMAT,
            "options": dict(self.options),
            "warmup_steps": self.warmup_steps,
            "clip_norm": self.clip_norm,
            "delay": self.delay,
            "on_nonfinite": self.on_nonfinite,
            "participating": bool(self.participating),
            "iteration": self.iteration,
            "stats": dict(self.stats),
            "network": None if self.network is None else self.network.to_dict(),
            "budget_ms": self.budget_ms,
            "budget_rule": None if self._budget_rule is None else list(self._budget_rule),
            "compressors": compressor_states(self._compressors),
            "inflight": to_checkpoint(self._inflight_state()),
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
                local.setdefault(step, {})[key] = (index[id(ex)], grad)
        unlaunched = {id(ex) for ex in self._unlaunched}
        saved = [ex.unsent_state(self.options["quant"]) if id(ex) in unlaunched else ex.decoded_state() for ex in exchanges]
        order = [index[id(ex)] for ex in self._unlaunched if id(ex) in index]
        return {"exchanges": saved, "local": local, "unlaunched": order}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` (tensors, or the numpy arrays of older checkpoints);
        the options (``delay`` included) must match. Every entry is checked first (the
        compressors are rebuilt from their states, the in-flight exchanges' keys, shapes and
        indices checked) and only then is anything assigned: on an error nothing has changed,
        and the error (:class:`ValueError`, :class:`TypeError` or a library error) names the
        offending key. Compressors of parameters not seen yet are kept until their parameters
        appear, so this may be called before the first step.

        Example::

            state.load_state_dict(torch.load("hook.pt"))
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"expected a CompressionState state dict, got {type(state).__name__}")
        if state.get("format") not in (1, 2, _STATE_FORMAT):
            raise ValueError(f"unknown CompressionState format {state.get('format')!r}")
        mine = (self.options, self.warmup_steps, self.clip_norm, self.delay)
        theirs = checked("options", lambda: (dict(state["options"]), state["warmup_steps"], state["clip_norm"],
                                             state.get("delay", 0)))
        if mine != theirs:
            raise ValueError(f"checkpoint options {theirs} differ from this state's {mine}")
        iteration = checked("iteration", lambda: _count(state["iteration"]))
        stats = checked("stats", lambda: _stats(state["stats"]))
        participating = checked("participating", lambda: _flag(state.get("participating", self.participating)))
        network, budget_ms, rule = self.network, self.budget_ms, self._budget_rule
        if network is None and state.get("network") is not None:
            # Unpickled without a model: the saved link and budget rule stand in for it.
            n = state["network"]
            network = checked("network", lambda: ic.NetworkProfile(n["latency_ms"], n["bandwidth_mbps"], n["name"]))
            budget_ms = checked("budget_ms", lambda: float(state["budget_ms"]))
            rule = checked("budget_rule", lambda: _budget_rule(state.get("budget_rule")))
        entries = checked("compressors", lambda: dict(state["compressors"]))
        compressors = {
            key: loaded_compressor(f"compressors[{key!r}]", self._template(key, entry), entry)
            for key, entry in entries.items()
        }
        inflight, unlaunched = checked("inflight", lambda: _load_inflight(state.get("inflight")))
        # Everything checked: assign.
        self.iteration, self.stats, self.participating = iteration, stats, participating
        self.network, self.budget_ms, self._budget_rule = network, budget_ms, rule
        self._compressors.update(compressors)
        self._inflight, self._unlaunched, self._undo_last = inflight, unlaunched, []

    def _template(self, key: str, entry: Any) -> Callable[[], ic.Compressor]:
        existing = self._compressors.get(key)
        if existing is not None:
            return lambda: undoable(ic.Compressor(existing.numel, **existing.options))
        return lambda: self._new_compressor(key, entry["numel"])

    def __getstate__(self) -> Dict[str, Any]:
        # The process group does not pickle; the restored state uses the default group.
        return self.state_dict()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        o = state["options"]
        CompressionState.__init__(
            self, None, density=o["density"], threshold=o["threshold"], quant=o["quant"], momentum=o["momentum"],
            nesterov=o["nesterov"], warmup_steps=state["warmup_steps"], clip_norm=state["clip_norm"], seed=o["seed"],
            delay=state.get("delay", 0), on_nonfinite=state.get("on_nonfinite", "raise"),
        )
        self.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"CompressionState({self.options}, warmup_steps={self.warmup_steps}, clip_norm={self.clip_norm}, "
                f"delay={self.delay}, on_nonfinite={self.on_nonfinite!r})")


def _count(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
        raise ValueError(f"expected an int >= 0, got {x!r}")
    return int(x)


def _flag(x: Any) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"expected a bool, got {type(x).__name__}")
    return bool(x)


def _stats(x: Any) -> Dict[str, Any]:
    stats = dict(x)
    for k, v in stats.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{k!r} must be a finite number, got {v!r}")
    return stats


def _budget_rule(x: Any) -> Optional[Tuple[int, int]]:
    if x is None:
        return None
    spare, total = x
    return _count(spare), max(_count(total), 1)


def _load_inflight(saved: Any) -> Tuple[Dict[int, Dict[str, Tuple["_Exchange", np.ndarray]]], List["_Exchange"]]:
    """The in-flight exchanges of a checkpoint, every index, key and shape checked."""
    saved = saved or {"exchanges": [], "local": {}, "unlaunched": []}
    exchanges = [checked(f"exchanges[{i}]", lambda e=e: _Exchange.restore(e)) for i, e in enumerate(saved["exchanges"])]

    def exchange(i: Any) -> "_Exchange":
        if not 0 <= _count(i) < len(exchanges):
            raise ValueError(f"exchange index {i} out of range")
        return exchanges[i]

    inflight: Dict[int, Dict[str, Tuple[_Exchange, np.ndarray]]] = {}
    for step, entries in dict(saved["local"]).items():
        for key, (i, grad) in dict(entries).items():
            ex = exchange(i)
            if key not in ex.keys:
                raise ValueError(f"local[{step}][{key!r}] is not in its exchange")
            numel = ex.numels[ex.keys.index(key)]
            inflight.setdefault(_count(step), {})[key] = (ex, f32_vector(grad, f"local[{step}][{key!r}]", numel))
    return inflight, [exchange(i) for i in saved["unlaunched"]]


class _StepStats:
    """What one step did so far: counters for ``stats`` and how to undo it."""

    __slots__ = ("sent", "received", "dense", "nnz", "numel", "residual_sq", "undo", "sitting_out", "error")

    def __init__(self) -> None:
        self.sent = self.received = self.dense = self.nnz = self.numel = 0
        self.residual_sq = 0.0
        self.undo: List[Callable[[], None]] = []  # per compressor changed, in order
        self.sitting_out = False  # on_nonfinite="skip" took this rank out of the step
        self.error: Optional[BaseException] = None  # delay > 0: this rank failed in this step


class _Link(NamedTuple):
    group: Any
    world: int
    rank: int
    device: torch.device


def _undo(changes: List[Callable[[], None]]) -> None:
    for change in reversed(changes):
        change()
    changes.clear()


def _abandon_step(state: CompressionState) -> None:
    """Puts back every compressor this step changed, on this rank; the step starts over."""
    _undo(state._step.undo)
    state._step = _StepStats()


def _failure(headers: List[Header], rank: int, error: Optional[BaseException], where: str) -> Optional[BaseException]:
    """The error this rank raises when some rank's header says it failed: its own, or a
    :class:`RankFailedError` naming every failed rank and its reason."""
    failed = [(r, h.reason) for r, h in enumerate(headers) if h.kind == FAILED]
    if not failed:
        return None
    if error is not None and any(r == rank for r, _ in failed):
        return error
    named = "; ".join(f"rank {r}: {reason}" for r, reason in failed)
    return RankFailedError(f"iotcompress: the compression hook failed {where} on {named}")


def _gather_fixed(data: bytes, link: _Link) -> List[bytes]:
    """Every rank's ``data`` (all of the same length), blocking."""
    mine = _padded(data, len(data)).to(link.device)
    out = [torch.empty_like(mine) for _ in range(link.world)]
    dist.all_gather(out, mine, group=link.group)
    return [o.cpu().numpy().tobytes()[: len(data)] for o in out]


def _gather_bytes(data: bytes, link: _Link, max_len: int) -> List[bytes]:
    """Every rank's ``data`` (any length up to ``max_len``), blocking."""
    lengths = [int.from_bytes(n, "little") for n in _gather_fixed(len(data).to_bytes(8, "little"), link)]
    for r, n in enumerate(lengths):
        if n > max_len:
            raise DecodeError(f"rank {r} announced {n} bytes, at most {max_len} allowed")
    blobs = _gather_fixed(data.ljust(max(lengths), b"\0"), link)
    return [b[:n] for b, n in zip(blobs, lengths)]


def _settings(state: CompressionState, bucket_index: int, numels: List[int]) -> Dict[str, Any]:
    """Everything that must be equal on every rank for the exchanges to match and the
    averages to mean something. Per-rank things may differ: links and budgets, seeds,
    ``on_nonfinite``, ``participating``."""
    o = state.options
    return {
        "protocol": _PROTOCOL,
        "wire_version": ic.WIRE_VERSION,
        "quant": o["quant"],
        "selection": "network budget" if state.network is not None else {"density": o["density"],
                                                                         "threshold": o["threshold"]},
        "momentum": o["momentum"],
        "nesterov": o["nesterov"],
        "warmup_steps": state.warmup_steps,
        "clip_norm": state.clip_norm,
        "delay": state.delay,
        "iteration": state.iteration,
        "bucket_layout": {"index": bucket_index, "numels": numels},
    }


def _verify_settings(state: CompressionState, bucket_index: int, numels: List[int], link: _Link) -> None:
    """Exchanges :func:`_settings` (JSON) and raises :class:`SettingsMismatchError` on every
    rank, naming each setting that differs and every rank's value."""
    mine = json.dumps(_settings(state, bucket_index, numels), sort_keys=True).encode()
    everyone = []
    for r, blob in enumerate(_gather_bytes(mine, link, _MAX_SETTINGS_LEN)):
        try:
            settings = json.loads(blob.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise DecodeError(f"rank {r} sent unreadable hook settings: {e}") from None
        if not isinstance(settings, dict):
            raise DecodeError(f"rank {r} sent hook settings that are not a JSON object")
        everyone.append(settings)
    differences = []
    for key in sorted(set().union(*everyone)):
        values = [s.get(key) for s in everyone]
        if any(v != values[0] for v in values):
            differences.append(f"{key} (" + ", ".join(f"rank {r}: {json.dumps(v)}" for r, v in enumerate(values)) + ")")
    if differences:
        raise SettingsMismatchError(
            "iotcompress: the ranks' compression hooks disagree on " + "; ".join(differences)
            + ": every rank needs the same CompressionState options, model and bucket_cap_mb"
        )


def _max_blob_len(numels: List[int], quant: str) -> int:
    """The longest framed bucket a rank can send: each message's bound and its length."""
    return sum(_ext.message_len_bound(n, n, quant) + 5 for n in numels)


class _Exchange:
    """One bucket's exchange of one step under ``delay > 0``: the headers ``all_gather`` is
    launched by the hook of that step, the payload ``all_gather`` by the first hook of the
    next step (the headers have long arrived by then), and the result is waited for ``delay``
    steps later. Every collective is issued from a hook call, never from a future's
    callback, so every rank issues them in the same order (DDP calls the hooks in bucket
    order)."""

    __slots__ = ("step", "keys", "numels", "header", "blob", "headers", "future", "_header_out", "_header_work",
                 "_gathered", "_averages", "_lock")

    def __init__(self, step: int, keys: List[str], numels: List[int], header: bytes, blob: bytes) -> None:
        self.step, self.keys, self.numels, self.header, self.blob = step, keys, numels, header, blob
        self.headers: Optional[List[Header]] = None
        self.future: Optional[torch.futures.Future] = None
        self._header_out: Optional[List[torch.Tensor]] = None
        self._header_work: Any = None
        self._gathered: Optional[List[torch.Tensor]] = None
        self._averages: Optional[Dict[str, np.ndarray]] = None
        self._lock = threading.Lock()

    def launch_headers(self, link: _Link) -> None:
        mine = _padded(self.header, HEADER_LEN).to(link.device)
        self._header_out = [torch.empty_like(mine) for _ in range(link.world)]
        self._header_work = dist.all_gather(self._header_out, mine, group=link.group, async_op=True)

    def _wait_headers(self, quant: str) -> List[Header]:
        if self.headers is None:
            self._header_work.wait()
            bound = _max_blob_len(self.numels, quant)
            assert self._header_out is not None
            self.headers = [decode_header(h.cpu().numpy().tobytes(), r, bound) for r, h in enumerate(self._header_out)]
            self._header_out = self._header_work = None
        return self.headers

    def launch_payload(self, link: _Link, quant: str) -> int:
        """Launches the payload gather; returns the bytes this rank will receive. Raises
        the failure of any rank whose header says it failed (then nothing is launched)."""
        headers = self._wait_headers(quant)
        if len(headers) != link.world:
            raise RuntimeError(f"in-flight exchange was gathered from {len(headers)} ranks, the group has {link.world}")
        failure = _failure(headers, link.rank, None, f"at step {self.step}")
        if failure is not None:
            raise failure
        lengths = [h.length for h in headers]
        payload = _padded(self.blob, max(lengths)).to(link.device)
        self._gathered = [torch.empty_like(payload) for _ in range(link.world)]
        self.future = dist.all_gather(self._gathered, payload, group=link.group, async_op=True).get_future()
        self.blob = b""
        return sum(n for r, n in enumerate(lengths) if r != link.rank)

    def averages(self) -> Dict[str, np.ndarray]:
        """Each parameter's average over the ranks that sent (waits for the payload)."""
        with self._lock:
            if self._averages is None:
                if self.future is None:
                    raise RuntimeError("iotcompress: an exchange was used before its payload was launched")
                self.future.wait()
                assert self._gathered is not None and self.headers is not None
                total = _decode_average(_received(self._gathered, self.headers), self.numels)
                offsets = np.cumsum([0] + self.numels)
                self._averages = {k: total[o : o + n] for k, o, n in zip(self.keys, offsets, self.numels)}
                self._gathered = None
            return self._averages

    def unsent_state(self, quant: str) -> Dict[str, Any]:
        headers = self._wait_headers(quant)
        return {"step": self.step, "keys": list(self.keys), "numels": list(self.numels), "blob": bytes(self.blob),
                "lengths": [h.length for h in headers], "senders": [h.kind == MESSAGE for h in headers],
                "averages": None}

    def decoded_state(self) -> Dict[str, Any]:
        averages = {k: np.array(v, copy=True) for k, v in self.averages().items()}
        return {"step": self.step, "keys": list(self.keys), "numels": list(self.numels), "blob": None,
                "lengths": [], "senders": [], "averages": averages}

    @classmethod
    def restore(cls, saved: Mapping[str, Any]) -> "_Exchange":
        """An exchange from :meth:`unsent_state` / :meth:`decoded_state` (or format 2's,
        where a length of 0 marked a rank that sat out), every field checked."""
        keys = [str(k) for k in saved["keys"]]
        numels = [_count(n) for n in saved["numels"]]
        if len(keys) != len(numels) or len(set(keys)) != len(keys):
            raise ValueError("keys and numels do not match")
        blob = saved["blob"]
        if blob is not None and not isinstance(blob, (bytes, bytearray)):
            raise TypeError(f"blob must be bytes, got {type(blob).__name__}")
        lengths = [_count(n) for n in saved["lengths"]]
        senders = [_flag(s) for s in saved.get("senders", [n > 0 for n in lengths])]
        if len(senders) != len(lengths):
            raise ValueError("senders and lengths do not match")
        ex = cls(_count(saved["step"]), keys, numels, b"", bytes(blob or b""))
        ex.headers = [Header(MESSAGE if s else SAT_OUT, n, "") for s, n in zip(senders, lengths)]
        averages = saved["averages"]
        if averages is not None:
            if set(averages) != set(keys):
                raise ValueError("averages and keys do not match")
            ex._averages = {k: f32_vector(averages[k], f"averages[{k!r}]", n) for k, n in zip(keys, numels)}
        elif blob is None:
            raise ValueError("an exchange needs its message or its averages")
        return ex


def _padded(blob: bytes, length: int) -> torch.Tensor:
    """``blob`` in a uint8 tensor of ``max(length, 1)`` bytes (zero padding)."""
    payload = torch.zeros(max(length, 1), dtype=torch.uint8)
    if blob:
        payload[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return payload


def _received(gathered: List[torch.Tensor], headers: List[Header]) -> List[Optional[bytes]]:
    """Each rank's framed bucket, None for a rank that sent none."""
    return [g[: h.length].cpu().numpy().tobytes() if h.kind == MESSAGE else None for g, h in zip(gathered, headers)]


def _decode_average(blobs: List[Optional[bytes]], numels: List[int]) -> np.ndarray:
    """The bucket's average: every sending rank's messages (one frame per parameter of
    ``numels`` elements, in rank order) summed and divided by the number of ranks that sent
    (None is a rank that sat the round out)."""
    total = np.zeros(sum(numels), dtype=np.float32)
    senders = sum(1 for b in blobs if b is not None)
    offsets = np.cumsum([0] + numels)
    for blob in blobs:
        if blob is None:
            continue
        frames = split_frames(blob, len(numels))
        for offset, numel, msg in zip(offsets, numels, frames):
            ic.decode_add(msg, total[offset : offset + numel], scale=1.0 / senders)
    return total


def _bucket_layout(bucket: dist.GradBucket) -> List[Tuple[torch.Tensor, int, int, int]]:
    """(parameter, its position in the bucket, offset in the flat buffer, numel) of every
    parameter with elements (zero-element ones have nothing to send)."""
    layout, offset = [], 0
    for position, p in enumerate(bucket.parameters()):
        if p.numel():
            layout.append((p, position, offset, p.numel()))
        offset += p.numel()
    return layout


def _compress_bucket(state: CompressionState, bucket: dist.GradBucket, grad: np.ndarray,
                     layout: List[Tuple[torch.Tensor, int, int, int]], world: int) -> Tuple[bytes, List[bytes]]:
    """This rank's header and messages (one per parameter with elements; none when it sends
    nothing), which travel framed (:func:`join_frames`). All or nothing: on any error every compressor
    of the bucket is put back to its state from before (:meth:`iotcompress.Compressor.revert`,
    O(1) per compressor) and the header says FAILED (the error is kept in the
    step), or, for a :class:`iotcompress.CompressError` under ``on_nonfinite="skip"``, SAT_OUT
    for the rest of the step."""
    step = state._step
    if step.error is not None:
        return encode_header(FAILED, 0, _reason(step.error)), []
    if step.sitting_out:
        return encode_header(SAT_OUT), []
    clip = None if state.clip_norm is None else state.clip_norm / math.sqrt(world)
    density = state._density_now()
    participating = bool(state.participating)
    messages: List[bytes] = []
    undo: List[Callable[[], None]] = []
    nnz, residual_sq = 0, 0.0
    try:
        for param, position, offset, numel in layout:
            comp = state._compressor(param, bucket.index(), position)
            if density is not None and comp.options["density"] != density:
                comp.set_selection(density=density, exact=comp.options["exact"])
            g = grad[offset : offset + numel]
            if clip is not None:
                norm = float(np.sqrt(np.dot(g.astype(np.float64), g.astype(np.float64))))
                if norm > clip:
                    g = g * np.float32(clip / norm)
            before = undo_of_compress(comp)
            if participating:
                messages.append(comp.compress(g))
                nnz += comp.last_nnz
            else:
                comp.accumulate(g)  # this round is skipped: the gradient waits in the residual
            undo.append(before)
            residual_sq += comp.residual_norm**2
    except Exception as e:  # noqa: BLE001 - every failure becomes an error frame for the peers
        _undo(undo)
        if isinstance(e, ic.CompressError) and state.on_nonfinite == "skip":
            step.sitting_out = True
            state.stats["nonfinite_skips"] = state.stats.get("nonfinite_skips", 0) + 1
            return encode_header(SAT_OUT), []
        if state.delay:
            _undo(step.undo)  # the step is lost on every rank: put this rank's part back now
        step.error = e
        return encode_header(FAILED, 0, _reason(e)), []
    step.undo.extend(undo)
    step.nnz += nnz
    step.residual_sq += residual_sq
    step.numel += grad.size
    step.dense += 4 * grad.size
    if not participating:
        return encode_header(SAT_OUT), []
    length = framed_len(messages)
    step.sent += length
    return encode_header(MESSAGE, length), messages


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compresses this rank's bucket with error feedback, exchanges
    a fixed-size header (what this rank sends: a message, nothing, or an error) and then the
    variable-size messages with ``all_gather``, adds every sending rank's message into a
    dense buffer and divides by the number of ranks that sent (the world size unless some
    set ``state.participating = False`` or sat out a non-finite gradient).

    With ``state.delay = D > 0`` (delayed gradient averaging) the exchange of step ``t`` is
    waited for only at step ``t + D``; the future completes with
    ``g_t - g_{t-D} + avg_{t-D}`` (``g_t`` alone for ``t < D``).

    On the first step this state runs, the hooks first exchange their settings (quant,
    selection, momentum, warm-up, clipping, delay, iteration, each bucket's layout, protocol
    and wire version): if any differ, every rank raises :class:`SettingsMismatchError`
    naming them, before any other collective.

    On error, all or nothing: a bucket is compressed whole or not at all (the compressors
    already done are restored). A rank whose bucket fails still takes part in the step's
    exchange with an error frame, so no rank waits for the process group's timeout:

    * ``delay=0``: every rank learns it from that bucket's headers; the failed rank raises
      its own error, the others :class:`RankFailedError` naming it and its reason, and every
      rank first puts back every compressor the step changed (the step can be retried);
    * ``delay=D > 0``: the failed rank's futures for that bucket and the rest of the step
      complete with its error (its changes of the step put back); the others raise
      :class:`RankFailedError` at the first hook of the next step, before compressing
      anything, and put back the failed step's compressions. Their optimizer has applied the
      failed step's result already (it was ``D`` steps old): resume from a checkpoint.

    With ``CompressionState(on_nonfinite="skip")`` a non-finite gradient makes this rank sit
    out the rest of the step instead (see :class:`CompressionState`).

    Works with gloo (CPU tensors) and NCCL (CUDA tensors, compressed through a CPU copy), with
    fp32, fp16 and bf16 buckets. A message that carries no entry is legal.

    Example::

        ddp_model.register_comm_hook(CompressionState(density=0.001, quant="int8"), compression_hook)
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    device, dtype = buffer.device, buffer.dtype
    link = _Link(group, dist.get_world_size(group), dist.get_rank(group),
                 device if dist.get_backend(group) == "nccl" else torch.device("cpu"))

    flat = buffer.detach()
    if flat.device.type != "cpu":
        staging = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        staging.copy_(flat)
        flat = staging
    grad = flat.to(torch.float32).contiguous().numpy()
    layout = _bucket_layout(bucket)
    numels = [n for *_, n in layout]
    if state._verify_step is None:
        state._verify_step = state.iteration
    if state._verify_step == state.iteration:
        _verify_settings(state, bucket.index(), numels, link)
    if state.delay:
        return _delayed(state, bucket, grad, layout, link, device, dtype)

    header, messages = _compress_bucket(state, bucket, grad, layout, link.world)
    error = state._step.error
    try:
        bound = _max_blob_len(numels, state.options["quant"])
        headers = [decode_header(h, r, bound) for r, h in enumerate(_gather_fixed(header, link))]
        failure = _failure(headers, link.rank, error, f"at step {state.iteration}, bucket {bucket.index()}")
    except BaseException:
        _abandon_step(state)
        raise
    if failure is not None:
        _abandon_step(state)
        raise failure
    if state.options["quant"] in _SUMMABLE and state.options["density"] is None and state.options["threshold"] is None \
            and state.network is None:
        return _allreduce_dense(state, bucket, messages, headers, numels, link, device, dtype)
    lengths = [h.length for h in headers]
    payload = _padded(join_frames(messages), max(lengths)).to(link.device)
    gathered = [torch.empty_like(payload) for _ in range(link.world)]
    fut = dist.all_gather(gathered, payload, group=link.group, async_op=True).get_future()
    is_last = bucket.is_last()
    step = state._step

    def decode(_: torch.futures.Future) -> torch.Tensor:
        step.received += sum(n for rank, n in enumerate(lengths) if rank != link.rank)
        total = _decode_average(_received(gathered, headers), numels)
        if is_last:
            _finish_step(state)
        return torch.from_numpy(total).to(device=device, dtype=dtype)

    return fut.then(decode)


# Wire types whose dense values add up as they are, and the integers that hold their bits.
# A message's header is at most this long (the core's MAX_HEADER_LEN).
MAX_HEADER_LEN = 24
_SUMMABLE = {"f32": (torch.float32, np.uint32), "f16": (torch.float16, np.uint16), "bf16": (torch.bfloat16, np.uint16)}


def _allreduce_dense(state: CompressionState, bucket: dist.GradBucket, messages: List[bytes], headers: List[Header],
                     numels: List[int], link: _Link, device: torch.device,
                     dtype: torch.dtype) -> torch.futures.Future[torch.Tensor]:
    """Dense f32, f16 and bf16 values add up as they are, so the bucket is reduced with one
    ``allreduce`` in the wire type, as PyTorch's ``fp16_compress_hook`` does (each rank's
    values divided by the world size, then summed), not gathered. The values are this rank's
    messages' value blocks: error feedback of the rounding, momentum and clipping as in every
    mode. A rank that sends nothing adds zeros; the sum is rescaled to the ranks that sent."""
    wire, bits = _SUMMABLE[state.options["quant"]]
    width = np.dtype(bits).itemsize
    values = state._dense_values.get(bucket.index())
    if values is None or values.size != sum(numels):
        values = state._dense_values[bucket.index()] = np.empty(sum(numels), dtype=bits)
    if not messages:
        values.fill(0)
    offset = 0
    for numel, msg in zip(numels, messages):
        # This rank's own dense message: header, the values, a 4-byte CRC (no index block).
        start = len(msg) - 4 - numel * width
        if not 0 < start <= MAX_HEADER_LEN:
            raise RuntimeError(f"iotcompress: a dense message of {len(msg)} bytes cannot hold {numel} values")
        values[offset : offset + numel] = np.frombuffer(msg, bits, numel, start)
        offset += numel
    flat = torch.from_numpy(values).view(wire).div_(link.world)
    senders = sum(h.kind == MESSAGE for h in headers)
    step, nbytes = state._step, flat.numel() * flat.element_size()
    step.sent += nbytes - framed_len(messages) if messages else 0  # what travels is the values, not the messages
    step.received += nbytes
    is_last = bucket.is_last()
    fut = dist.all_reduce(flat.to(link.device), group=link.group, async_op=True).get_future()

    buffer = bucket.buffer()

    def average(f: torch.futures.Future) -> torch.Tensor:
        # Into the bucket in place, as PyTorch's own hooks do: no fresh bucket-sized tensor.
        buffer.copy_(f.value()[0])
        if senders != link.world:
            buffer.mul_(link.world / senders if senders else 0.0)
        if is_last:
            _finish_step(state)
        return buffer

    return fut.then(average)


def _delayed(state: CompressionState, bucket: dist.GradBucket, grad: np.ndarray,
             layout: List[Tuple[torch.Tensor, int, int, int]], link: _Link, device: torch.device,
             dtype: torch.dtype) -> torch.futures.Future[torch.Tensor]:
    """Delayed gradient averaging (Zhu et al., NeurIPS 2021): launch this step's exchange,
    return ``g_t - g_{t-D} + avg_{t-D}`` per parameter."""
    t, delay, quant = state.iteration, state.delay, state.options["quant"]
    # The payloads of earlier steps: their headers went out at least one step ago. In launch
    # order, from the hook: the same collectives in the same order on every rank. Before
    # anything is compressed, so that a failed step can still be put back.
    while state._unlaunched and state._unlaunched[0].step < t:
        try:
            state._step.received += state._unlaunched[0].launch_payload(link, quant)
        except BaseException:
            _undo(state._undo_last)
            failed = state._unlaunched[0].step
            state._unlaunched = [ex for ex in state._unlaunched if ex.step != failed]
            state._inflight.pop(failed, None)
            raise
        state._unlaunched.pop(0)
    state._undo_last = []
    local = np.array(grad, dtype=np.float32, copy=True)  # the bucket is overwritten with the result
    header, messages = _compress_bucket(state, bucket, grad, layout, link.world)
    blob = join_frames(messages)
    if state._step.sitting_out:
        local[:] = 0  # a non-finite gradient this rank sat out counts as zero here too
    keys = [state._keys[id(p)] for p, *_ in layout]
    ex = _Exchange(t, keys, [n for *_, n in layout], header, blob)
    ex.launch_headers(link)
    state._unlaunched.append(ex)
    error = state._step.error
    mine = state._inflight.setdefault(t, {})
    old = state._inflight.get(t - delay, {})
    pairs = []
    for key, (_, _, offset, numel) in zip(keys, layout):
        mine[key] = (ex, local[offset : offset + numel])
        pairs.append((key, offset, numel, old.pop(key, None)))
    if not old:
        state._inflight.pop(t - delay, None)
    if bucket.is_last():
        if error is not None:
            # The peers read these headers only at their next step: make sure they have left
            # this process before its error ends it.
            for pending in state._unlaunched:
                pending._wait_headers(quant)
        _finish_step(state)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    if error is not None:
        # DDP rethrows a callback's error with its type and message (a future made with
        # set_exception reaches it as an uncastable value).
        def fail(_: Any) -> torch.Tensor:
            raise error

        fut.set_result(torch.empty(0))
        return fut.then(fail)

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
    # With a delay the peers learn of a failed step at the next one: keep its undo till then.
    state._undo_last = s.undo if state.delay else []
    state._step = _StepStats()
