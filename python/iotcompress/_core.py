"""The numpy face of the core: :class:`Compressor`, :func:`decode`, :func:`decode_add`,
:func:`inspect`. Arguments are checked here, with messages that say what to do; the work
happens in the Rust extension with the GIL released."""

from __future__ import annotations

import math
import threading
from typing import Any, Dict, Mapping, Optional

import numpy as np

from . import _iotcompress as _ext
from ._network import NetworkProfile, budget_bytes

__all__ = ["Compressor", "decode", "decode_add", "inspect", "QUANTS", "DEFAULT_MAX_NUMEL"]

#: Value quantisers accepted by ``Compressor(quant=...)``; ``"qsgd:S"`` sets S levels (1..255).
QUANTS = ("f32", "f16", "bf16", "int8", "int4", "sign", "ternary", "qsgd")

#: The largest element count :func:`decode` allocates for when ``numel`` is not given
#: (2**28 float32 = 1 GiB). Pass ``max_numel`` to change it.
DEFAULT_MAX_NUMEL = 1 << 28

_STATE_FORMAT = 1


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "numpy")


def _as_vector(x: Any, name: str, numel: Optional[int] = None, writable: bool = False) -> np.ndarray:
    """A 1-D, C-contiguous float32 numpy view of ``x`` (a numpy array or a CPU torch tensor),
    never a copy."""
    if _is_torch_tensor(x):
        if x.device.type != "cpu":
            raise ValueError(f"{name} is on {x.device}; pass a CPU tensor (tensor.cpu())")
        if str(x.dtype) != "torch.float32":
            raise TypeError(f"{name} must be float32, got {x.dtype}; convert with tensor.float()")
        x = x.detach().numpy()  # shares memory
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy array or a CPU torch tensor, got {type(x).__name__}; "
            f"use np.asarray({name}, dtype=np.float32)"
        )
    if x.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}; convert with {name}.astype(np.float32)")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}; flatten it with {name}.reshape(-1)")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} is not contiguous; pass np.ascontiguousarray({name})")
    if not x.flags.aligned:
        raise ValueError(f"{name} is not aligned to 4 bytes; pass an aligned copy: np.array({name})")
    if numel is not None and x.shape[0] != numel:
        raise ValueError(f"{name} has {x.shape[0]} elements, expected {numel}")
    if writable and not x.flags.writeable:
        raise ValueError(f"{name} is read-only; pass a writable array")
    return x


def _as_message(msg: Any) -> bytes:
    if isinstance(msg, bytes):
        return msg
    if isinstance(msg, (bytearray, memoryview)):
        return bytes(msg)
    if _is_torch_tensor(msg):
        msg = msg.detach().cpu().numpy()
    if isinstance(msg, np.ndarray):
        if msg.dtype != np.uint8:
            raise TypeError(f"a message array must be uint8, got {msg.dtype}")
        return msg.tobytes()
    raise TypeError(f"a message must be bytes, bytearray, memoryview or a uint8 array, got {type(msg).__name__}")


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}; e.g. {name}=0.001 sends 0.1 % of the entries")
    return float(value)


def _check_quant(quant: Any) -> str:
    if not isinstance(quant, str):
        raise TypeError(f"quant must be a string, got {type(quant).__name__}")
    if quant in QUANTS:
        return quant
    if quant.startswith("qsgd:"):
        levels = quant[5:]
        if levels.isdigit() and 1 <= int(levels) <= 255:
            return quant
        raise ValueError(f"qsgd levels must be 1..255, got {levels!r}; e.g. quant='qsgd:15'")
    raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)} or 'qsgd:S'")


_SELECTION_KEYS = ("density", "threshold", "target_bytes", "adaptive", "exact")


def _selection_options(density, threshold, target_bytes, adaptive, exact, network=None, budget_ms=None) -> Dict[str, Any]:
    """Checks the selection options; returns them normalised (a ``network`` and
    ``budget_ms`` become the ``target_bytes`` that fit)."""
    if budget_ms is not None and network is None:
        raise ValueError("budget_ms=... needs network=iotcompress.NetworkProfile(...): the link it is spent on")
    chosen = [
        n
        for n, v in (("density", density), ("threshold", threshold), ("target_bytes", target_bytes), ("network", network))
        if v is not None
    ]
    if len(chosen) > 1:
        raise ValueError(f"set at most one of density, threshold, target_bytes and network (got {', '.join(chosen)})")
    if network is not None:
        target_bytes = budget_bytes(network, budget_ms)
    if density is not None:
        density = _check_fraction(density, "density")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold must be finite and >= 0, got {threshold}")
        threshold = float(threshold)
    if target_bytes is not None:
        if isinstance(target_bytes, bool) or not isinstance(target_bytes, int) or not 0 < target_bytes < 2**32:
            raise ValueError(f"target_bytes must be a positive int, got {target_bytes!r}")
    if adaptive and density is None:
        raise ValueError("adaptive=True needs density=...: the density the threshold should aim at")
    if exact and density is None:
        raise ValueError("exact=True applies to top-k; also set density=...")
    if exact and adaptive:
        raise ValueError("exact=True and adaptive=True exclude each other")
    return dict(density=density, threshold=threshold, target_bytes=target_bytes, adaptive=bool(adaptive), exact=bool(exact))


class Compressor:
    """Error-feedback gradient compressor for one flat float32 tensor of ``numel`` elements.

    Each :meth:`compress` adds the gradient into a residual (optionally with DGC momentum
    correction), selects the entries to send, quantises them and returns the wire-format
    message; whatever was not sent stays in :attr:`residual` for later steps.
    :meth:`accumulate` only adds the gradient in (a round the device skips).

    Selection (set at most one of ``density``, ``threshold``, ``target_bytes``):

    * neither: dense, every entry is sent;
    * ``density=d``: top-k with ``k = ceil(d * numel)``; DGC's sampled threshold by default
      (sends between 0.8k and k), ``exact=True`` for exactly k;
    * ``threshold=wt``: every entry whose accumulated magnitude is at least ``wt``;
    * ``density=d, adaptive=True`` or ``target_bytes=b``: threshold mode with ``Wt`` adapted
      each step towards that density or message size; ``b`` is a budget: no message is
      longer (what does not fit stays in the residual);
    * ``network=profile, budget_ms=t``: ``target_bytes`` = the most bytes that
      ``profile`` (a :class:`NetworkProfile`) carries in ``t`` ms, so the step's
      ``T_c = latency + bytes / bandwidth`` stays within ``t``: a worse link, a higher ``Wt``.

    ``quant`` is one of ``f32 f16 bf16 int8 int4 sign ternary qsgd`` (``qsgd:S`` for S levels).
    ``momentum``/``nesterov`` turn on DGC momentum correction with factor masking (use a
    plain SGD optimizer then). ``seed`` drives sampling and stochastic rounding: equal seeds
    and inputs give equal bytes on every platform. ``threads`` splits the passes over large
    gradients (a few million elements and up) over that many cores, on one worker pool per
    process (a forked child makes its own); the messages do not depend on it. Next to torch
    on the same cores, set ``OMP_WAIT_POLICY=PASSIVE``: torch's idle OpenMP workers otherwise
    spin and take the cores these threads need. A compressor may be shared between Python
    threads: their calls take turns, and property reads wait for a running call and see
    the state before or after it, never half of it.

    Guarantees on error: every call that fails (:class:`CompressError` for a NaN, infinite
    or overflowing gradient, :class:`TypeError`/:class:`ValueError` for bad arguments)
    leaves the residual, velocity, step, adaptive threshold and the undo record exactly as
    they were, on both memory paths. A message the transport could not deliver is not
    lost: :meth:`restore` puts it back.

    Memory: gradients of at least 2**23 (8,388,608) elements are double-buffered, each step writes the
    new residual (and velocity) into a second buffer and keeps it only when every value is
    finite. That reads the gradient once instead of twice (a non-finite gradient is caught by
    the accumulation itself) at the cost of twice the state's memory: 2 x 4 bytes per element,
    4 x with momentum. ``low_memory=True`` turns it off (the state is updated in place after
    a finiteness check of the gradient, on a private copy of it so that another thread
    writing the array meanwhile cannot poison the state; messages are identical either way).

    Example::

        import numpy as np, iotcompress as ic
        c = ic.Compressor(1_000_000, density=0.001, quant="int8", momentum=0.9)
        msg = c.compress(np.random.randn(1_000_000).astype(np.float32))
        total = np.zeros(1_000_000, np.float32)
        ic.decode_add(msg, total)
    """

    __slots__ = ("_ext", "_numel", "_options", "_lock", "_low_memory")



    def __init__(
        self,
        numel: int,
        *,
        density: Optional[float] = None,
        threshold: Optional[float] = None,
        quant: str = "f32",
        momentum: float = 0.0,
        nesterov: bool = False,
        exact: bool = False,
        seed: int = 0,
        target_bytes: Optional[int] = None,
        adaptive: bool = False,
        threads: int = 1,
        network: Optional[NetworkProfile] = None,
        budget_ms: Optional[float] = None,
        low_memory: bool = False,
    ) -> None:
        if isinstance(numel, bool) or not isinstance(numel, (int, np.integer)):
            raise TypeError(f"numel must be an int, got {type(numel).__name__}")
        if not 0 < numel < 2**32:
            raise ValueError(f"numel must be in 1..2**32-1, got {numel}")
        selection = _selection_options(density, threshold, target_bytes, adaptive, exact, network, budget_ms)
        quant = _check_quant(quant)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0, e.g. momentum=0.9")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        self._numel = int(numel)
        self._options = dict(
            **selection, quant=quant, momentum=float(momentum), nesterov=bool(nesterov), seed=int(seed),
        )
        if not isinstance(low_memory, (bool, np.bool_)):
            raise TypeError(f"low_memory must be a bool, got {type(low_memory).__name__}")
        self._low_memory = bool(low_memory)
        self._ext = _ext.Compressor(self._numel, **self._options, low_memory=self._low_memory)
        self.threads = threads
        # Calls from several threads take turns (the extension releases the GIL while working).
        self._lock = threading.Lock()

    def compress(self, grad: Any) -> bytes:
        """Compresses one gradient and updates the state; returns the message.

        ``grad`` is a 1-D C-contiguous float32 numpy array or CPU torch tensor of ``numel``
        elements (not copied). Raises :class:`TypeError` for another dtype,
        :class:`ValueError` for another shape, and :class:`CompressError` if it contains
        NaN or infinity (then the state is unchanged).

        Example::

            msg = c.compress(param.grad.reshape(-1))
        """
        grad = _as_vector(grad, "grad", self._numel)
        with self._lock:
            return self._ext.compress(grad)

    def restore(self, msg: Any = None) -> None:
        """Puts an undelivered message back into the state, so error feedback sends it later.

        ``restore()`` undoes the last :meth:`compress` bit-exactly: the residual and velocity
        (momentum factor masking undone), :attr:`step` and the adaptive threshold become
        exactly what :meth:`accumulate` of that gradient would have left, so the next
        messages are those of "accumulate, then compress" byte for byte (from a zero state:
        of one compress of the summed gradients). It uses an O(nnz) undo record kept until
        the next :meth:`compress`, :meth:`accumulate`, :meth:`restore`,
        :meth:`set_selection` or :meth:`load_state_dict`; without one it raises
        :class:`CompressError` and changes nothing.

        ``restore(msg)`` adds any earlier message of this compressor back into the residual
        (``residual += decode(msg)``): exact up to one float32 rounding per entry; the
        velocity's factor masking is not undone. A malformed message, or one for another
        element count, raises :class:`DecodeError` and changes nothing. Drops the undo record.

        Example::

            msg = c.compress(g)
            if not link.send(msg):
                c.restore()          # nothing lost: it goes out with the next message
        """
        msg = None if msg is None else _as_message(msg)
        with self._lock:
            self._ext.restore(msg)

    @property
    def can_restore(self) -> bool:
        """Whether :meth:`restore` (without a message) has a message to put back."""
        return self._ext.can_restore

    def revert(self) -> None:
        """Takes the last :meth:`compress` or :meth:`accumulate` back whole: the residual,
        velocity, :attr:`step`, adaptive threshold and undo record become exactly what they
        were before that call, as if it had never run (:meth:`restore` instead keeps the
        gradient in the residual). O(1): a double-buffered compressor (see
        :attr:`double_buffered`) still holds the state from before the call in its spare.
        Available once, until any other call that changes the state (a failed compress or
        accumulate included, which may have written the spare); otherwise raises
        :class:`CompressError` and changes nothing. What a face uses to make a group of
        compressors all or nothing (the DDP hook's bucket).
        """
        with self._lock:
            self._ext.revert()

    @property
    def can_revert(self) -> bool:
        """Whether :meth:`revert` can take back the last call."""
        return self._ext.can_revert

    def accumulate(self, grad: Any) -> None:
        """Adds one gradient into the residual (with the momentum rule, exactly as
        :meth:`compress` does) without selecting or sending anything: for a round this device
        skips (partial participation, a lost link). Nothing is lost: the next
        :meth:`compress` sends from the accumulated sum. :attr:`step` (messages produced)
        does not change.

        ``grad`` is checked as in :meth:`compress`; a gradient with NaN or infinity raises
        :class:`CompressError` and leaves the state unchanged.

        Example::

            if link_down:
                c.accumulate(param.grad.reshape(-1))   # kept for a later round
            else:
                send(c.compress(param.grad.reshape(-1)))
        """
        grad = _as_vector(grad, "grad", self._numel)
        with self._lock:
            self._ext.accumulate(grad)

    def set_selection(
        self,
        *,
        density: Optional[float] = None,
        threshold: Optional[float] = None,
        target_bytes: Optional[int] = None,
        adaptive: bool = False,
        exact: bool = False,
        network: Optional[NetworkProfile] = None,
        budget_ms: Optional[float] = None,
    ) -> None:
        """Switches to another selection rule (same keywords as the constructor), keeping the
        residual and velocity: for warm-up schedules and links whose budget changes. The
        adaptive threshold keeps its ``Wt`` when the new rule is adaptive too.

        Example::

            c.set_selection(density=0.25)    # DGC warm-up: dense-ish first
            c.set_selection(density=0.001)   # then the target
            c.set_selection(network=ic.NetworkProfile.preset("lte"), budget_ms=80)  # the link got worse
        """
        selection = _selection_options(density, threshold, target_bytes, adaptive, exact, network, budget_ms)
        with self._lock:
            self._ext.set_selection(**selection)
            self._options.update(selection)

    @property
    def threads(self) -> int:
        """Threads for the passes over the whole gradient (settable; messages do not change).

        Example::

            c.threads = os.cpu_count()
        """
        return self._ext.threads

    @threads.setter
    def threads(self, threads: int) -> None:
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        self._ext.threads = min(int(threads), 64)

    @property
    def numel(self) -> int:
        """Elements per gradient."""
        return self._numel

    @property
    def low_memory(self) -> bool:
        """The constructor's ``low_memory``."""
        return self._low_memory

    @property
    def double_buffered(self) -> bool:
        """Whether the state is double-buffered: True from 2**23 elements unless the
        compressor was made with ``low_memory=True``. Settable (the state is kept; turning it
        on allocates the spare): on, :meth:`revert` is available after each call."""
        return self._ext.double_buffered

    @double_buffered.setter
    def double_buffered(self, on: bool) -> None:
        if not isinstance(on, (bool, np.bool_)):
            raise TypeError(f"double_buffered must be a bool, got {type(on).__name__}")
        with self._lock:
            self._ext.double_buffered = bool(on)

    @property
    def restorable(self) -> bool:
        """Whether :meth:`restore` can put the last message back: the compressor keeps an
        O(k) undo record of each message's entries (k = the message's entries, every entry
        for a dense one). True by default. Settable: off, nothing is recorded (a dense
        compress is a pass faster) and ``restore()`` without a message raises
        :class:`CompressError` until a compress with it on; :meth:`revert` is unaffected."""
        return self._ext.restorable

    @restorable.setter
    def restorable(self, on: bool) -> None:
        if not isinstance(on, (bool, np.bool_)):
            raise TypeError(f"restorable must be a bool, got {type(on).__name__}")
        with self._lock:
            self._ext.restorable = bool(on)

    @property
    def options(self) -> Dict[str, Any]:
        """The constructor's keyword options (a copy)."""
        return dict(self._options)

    @property
    def residual(self) -> np.ndarray:
        """A copy of the error-feedback residual (what has not been sent yet)."""
        return self._ext.residual

    @property
    def residual_norm(self) -> float:
        """The L2 norm of the residual, computed without a copy."""
        return math.sqrt(self._ext.residual_sq_norm)

    @property
    def velocity(self) -> np.ndarray:
        """A copy of the momentum velocity (zeros when ``momentum == 0``)."""
        return self._ext.velocity

    @property
    def step(self) -> int:
        """Messages produced so far."""
        return self._ext.step

    @property
    def threshold(self) -> Optional[float]:
        """The current adaptive threshold ``Wt`` (``None`` unless adaptive)."""
        if self._options["adaptive"] or self._options["target_bytes"] is not None:
            return self._ext.threshold
        return self._options["threshold"]

    @property
    def last_nnz(self) -> int:
        """Entries sent by the last :meth:`compress`."""
        return self._ext.last_nnz

    @property
    def max_message_len(self) -> int:
        """An upper bound on the size of any message of this compressor."""
        return self._ext.max_message_len

    def state_dict(self) -> Dict[str, Any]:
        """The complete state: options, residual, velocity and counters. Restoring it with
        :meth:`load_state_dict` makes the next messages bit-identical.

        Example::

            torch.save(c.state_dict(), "compressor.pt")
        """
        with self._lock:
            residual, velocity, (step, threshold, bits_per_entry) = self._ext.snapshot()
            options = dict(self._options)
        return {
            "format": _STATE_FORMAT,
            "numel": self._numel,
            "options": options,
            "residual": residual,
            "velocity": velocity,
            "step": step,
            "threshold": threshold,
            "bits_per_entry": bits_per_entry,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict`. ``numel`` and the value options (quant, momentum,
        nesterov, seed) must match this compressor's; the selection is taken from the state
        (it may have changed through :meth:`set_selection`).

        Everything is validated before anything is assigned: ``residual`` and ``velocity``
        must be float32 arrays (numpy or CPU torch; no silent casts) of shape ``(numel,)``
        with finite values, ``step`` an int in ``[0, 2**64)``, ``threshold`` and
        ``bits_per_entry`` finite floats ``>= 0``, the options valid. A bad state raises
        :class:`TypeError`, :class:`ValueError` or :class:`KeyError` naming the key, and
        leaves the compressor exactly as it was.

        Example::

            c = ic.Compressor(n, density=0.001)
            c.load_state_dict(torch.load("compressor.pt", weights_only=False))
        """
        checked = _check_state(state, self._numel, self._options)
        residual, velocity, counters, selection = checked
        with self._lock:
            self._ext.load_state(residual, velocity, counters, **selection)
            self._options.update(selection)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items() if v not in (None, False))
        return f"Compressor({self._numel}, {opts})"

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.state_dict(), low_memory=self._low_memory)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        Compressor.__init__(self, state["numel"], **state["options"], low_memory=state.get("low_memory", False))
        self.load_state_dict(state)


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if _is_torch_tensor(x) else np.asarray(x)


def _state_key(state: Mapping[str, Any], key: str) -> Any:
    if not isinstance(state, Mapping):
        raise TypeError(f"a state must be a mapping (a state_dict()), got {type(state).__name__}")
    if key not in state:
        raise KeyError(f"state has no {key!r}: not a state_dict() of this class")
    return state[key]


def _state_array(state: Mapping[str, Any], key: str, numel: int) -> np.ndarray:
    """``state[key]`` as a contiguous float32 array of ``numel`` finite values (checked, never cast)."""
    x = _state_key(state, key)
    if _is_torch_tensor(x):
        if str(x.dtype) != "torch.float32":
            raise TypeError(f"state[{key!r}] must be float32, got {x.dtype}")
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"state[{key!r}] must be a float32 array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"state[{key!r}] must be float32, got {x.dtype}")
    if x.shape != (numel,):
        raise ValueError(f"state[{key!r}] has shape {x.shape}, expected ({numel},)")
    if not np.isfinite(x).all():
        raise ValueError(f"state[{key!r}] holds NaN or infinity")
    return np.ascontiguousarray(x)


def _state_int(state: Mapping[str, Any], key: str, low: int, high: int) -> int:
    x = _state_key(state, key)
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"state[{key!r}] must be an int, got {type(x).__name__}")
    if not low <= int(x) < high:
        raise ValueError(f"state[{key!r}] must be in [{low}, {high}), got {x}")
    return int(x)


def _state_float(state: Mapping[str, Any], key: str) -> float:
    """``state[key]`` as a finite float ``>= 0`` that float32 holds."""
    x = _state_key(state, key)
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"state[{key!r}] must be a real number, got {type(x).__name__}")
    x = float(x)
    if not (math.isfinite(x) and 0.0 <= x <= float(np.finfo(np.float32).max)):
        raise ValueError(f"state[{key!r}] must be finite and >= 0, got {x}")
    return x


def _check_state(state: Mapping[str, Any], numel: int, mine: Mapping[str, Any]):
    """Every field of a :meth:`Compressor.state_dict`, validated; nothing assigned."""
    fmt = _state_key(state, "format")
    if fmt != _STATE_FORMAT:
        raise ValueError(f"state['format'] is {fmt!r}; expected {_STATE_FORMAT}")
    if _state_key(state, "numel") != numel:
        raise ValueError(f"state['numel']: the state is for numel={state['numel']!r}, this compressor has numel={numel}")
    options = _state_key(state, "options")
    if not isinstance(options, Mapping):
        raise TypeError(f"state['options'] must be a dict, got {type(options).__name__}")
    ours = {k: v for k, v in mine.items() if k not in _SELECTION_KEYS}
    theirs = {k: v for k, v in options.items() if k not in _SELECTION_KEYS}
    if theirs != ours:
        raise ValueError(f"state['options'] {theirs} differ from this compressor's {ours}")
    try:
        selection = _selection_options(*(options.get(k) for k in _SELECTION_KEYS))
    except (TypeError, ValueError) as e:
        raise type(e)(f"state['options']: {e}") from None
    residual = _state_array(state, "residual", numel)
    velocity = _state_array(state, "velocity", numel)
    counters = (
        _state_int(state, "step", 0, 2**64),
        _state_float(state, "threshold"),
        _state_float(state, "bits_per_entry"),
    )
    return residual, velocity, counters, selection


def decode(msg: Any, numel: Optional[int] = None, *, max_numel: int = DEFAULT_MAX_NUMEL) -> np.ndarray:
    """Decodes a message into a new dense float32 array.

    ``numel``, when given, must equal the message's element count (else :class:`DecodeError`).
    Without it, messages announcing more than ``max_numel`` elements are refused before
    anything is allocated. Every malformed input raises :class:`DecodeError`.

    Example::

        dense = ic.decode(msg, numel=1_000_000)
    """
    if numel is not None and (isinstance(numel, bool) or not isinstance(numel, (int, np.integer)) or numel < 0):
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if isinstance(max_numel, bool) or not isinstance(max_numel, (int, np.integer)) or max_numel < 0:
        raise ValueError(f"max_numel must be a non-negative int, got {max_numel!r}")
    if numel is not None:
        max_numel = numel
    return _ext.decode(_as_message(msg), None if numel is None else int(numel), min(int(max_numel), 2**64 - 1))


def decode_add(msg: Any, out: Any, scale: float = 1.0) -> None:
    """Adds ``scale * message`` into ``out`` in place (a 1-D contiguous float32 numpy array or
    CPU torch tensor). All or nothing: on :class:`DecodeError` ``out`` is unchanged.
    ``scale`` must be a finite real number (:class:`TypeError`/:class:`ValueError`
    otherwise). Two threads adding into one buffer at the same moment: the second gets
    :class:`BusyError` and changes nothing.

    Example::

        total = np.zeros(n, np.float32)
        for m in messages:
            ic.decode_add(m, total, scale=1 / len(messages))
    """
    out = _as_vector(out, "out", writable=True)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(scale) or abs(float(scale)) > float(np.finfo(np.float32).max):
        raise ValueError(f"scale must be finite (and within float32), got {scale}")
    _ext.decode_add(_as_message(msg), out, float(scale))


def inspect(msg: Any) -> Dict[str, Any]:
    """The header of a verified message: ``version, numel, nnz, quant, levels, index, rice_k,
    scale, stream, header_bytes, index_bytes, value_bytes, nbytes``. The message is verified
    exactly as :func:`decode` verifies it (framing, checksum, every index and value code),
    without allocating its dense array; a malformed one raises :class:`DecodeError`.

    Example::

        >>> ic.inspect(msg)["nnz"]
        1000
    """
    return _ext.inspect(_as_message(msg))



def simd_level() -> str:
    """The kernel family the compressor runs on this CPU: ``"avx2"`` or ``"scalar"``.

    Every family gives the same bytes; ``IOTCOMPRESS_SIMD=off`` in the environment forces
    ``"scalar"``.

    Example::

        print(ic.simd_level())
    """
    return _ext.simd_level()
