"""Compressed FedAvg, written once: the client and server halves that both the Flower
integration (:mod:`iotcompress.flower`) and the fleet simulator (``iotcompress simulate``,
methods ``fedavg`` and ``fedavg-iotcompress``) drive. No Flower import here.

The protocol, per round ``t``:

* The server holds the global model ``x`` and a *broadcast replica* ``y``: the model every
  up-to-date client holds, bit for bit. It sends ``y``'s next step as a compressed delta
  ``m_t = C(x - y)`` and sets ``y += decode(m_t)``, exactly as the clients do. What the
  delta leaves out stays in ``x - y`` and goes out in later rounds: server-side error
  feedback without a separate residual.
* A client whose replica is at the previous version applies the delta. A client that
  missed rounds gets the deltas it missed (when they are smaller than the model) or a
  *keyframe*: the whole replica, exact. A new client gets a keyframe, which also carries
  the model's layout (names, shapes, dtypes).
* The client trains from its replica and sends ``C(trained - replica)`` with its own error
  feedback (an :class:`iotcompress.Compressor` whose residual persists, see
  :class:`ClientState`).
* The server decodes each reply (a reply that is malformed, for another layout or another
  base version is one failed client, :class:`ReplyError`), takes the weighted mean of the
  deltas (weights: ``num-examples``) and adds it to ``x``.

Every envelope starts with a 30-byte header: ``b"ICFL"``, format version 1, kind (0 delta
chain, 1 keyframe, 2 update), the layout fingerprint (8 bytes), the run's lineage (8 bytes,
random per server), base and new version (u32 LE each). A downlink envelope then carries the
*acknowledgement* (u32: the base version of this client's last update the server used,
``0xFFFFFFFF`` for none): a client whose last update was not used (lost, late, rejected) puts
it back into its residual, so it is delayed, not lost. Everything after it is length-checked;
the iotcompress messages inside are checksummed by the wire format.

Example::

    import numpy as np
    from iotcompress.fedavg import FedAvgClient, FedAvgServer, Layout
    layout = Layout.of({"w": np.zeros((4, 3), np.float32)})
    server = FedAvgServer(layout, np.ones(12, np.float32), density=0.5)
    client = FedAvgClient(density=0.5)
    model = client.receive(server.message_for("node-1"))   # a keyframe: the whole model
    up = client.send(model + 0.1)                           # trained - replica, compressed
    delta = server.decode_reply("node-1", up)
    server.aggregate([(delta, 10)])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._core import Compressor, decode, decode_add
from .errors import DecodeError, IotCompressError

__all__ = [
    "Layout", "FedAvgClient", "FedAvgServer", "ClientState", "ReplyError", "StaleReplicaError",
    "HEADER_LEN", "RESIDUAL_FORMATS", "KIND_DELTAS", "KIND_KEYFRAME", "KIND_UPDATE", "parse_envelope",
    "dirichlet_partition", "weight_of",
]

MAGIC = b"ICFL"
FORMAT = 1
KIND_DELTAS, KIND_KEYFRAME, KIND_UPDATE = 0, 1, 2
_HEADER = struct.Struct("<4sBB8s8sII")
#: Bytes of the envelope header every message carries.
HEADER_LEN = _HEADER.size
#: How a client's residual (and velocity) can be stored: exact, or compact for small state.
RESIDUAL_FORMATS = ("f32", "f16", "bf16", "int8")
_INT8_BLOCK = 32
_MAX_LAYOUT_JSON = 1 << 20
_MAX_CHAIN = 1024
_NONE = 0xFFFFFFFF


class ReplyError(DecodeError):
    """A client's reply cannot be used (malformed, another layout, another base version, no
    usable weight): the server counts it as one failed client and goes on."""


class StaleReplicaError(IotCompressError):
    """The client cannot rebuild the model from what the server sent: its replica is at
    another version (or it has none). The server sends it a keyframe next time."""


# ---------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """The model's arrays in order: ``(name, shape, dtype)`` each, flattened into one float32
    vector of :attr:`numel` elements. :attr:`fingerprint` (8 bytes) names it on the wire."""

    entries: Tuple[Tuple[str, Tuple[int, ...], str], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, Any]) -> "Layout":
        """The layout of a ``{name: ndarray}`` mapping (in its order)."""
        entries = []
        for name, a in arrays.items():
            a = np.asarray(a)
            entries.append((str(name), tuple(int(s) for s in a.shape), a.dtype.str))
        return cls._checked(entries)

    @classmethod
    def _checked(cls, entries: Sequence[Any]) -> "Layout":
        out = []
        for e in entries:
            if not (isinstance(e, (list, tuple)) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[2], str)):
                raise DecodeError(f"layout entry {e!r} is not [name, shape, dtype]")
            name, shape, dtype = e
            if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in shape):
                raise DecodeError(f"layout entry {name!r}: bad shape {shape!r}")
            try:
                dt = np.dtype(dtype)
            except TypeError:
                raise DecodeError(f"layout entry {name!r}: unknown dtype {dtype!r}") from None
            if dt.kind not in "fiub":
                raise DecodeError(f"layout entry {name!r}: dtype {dtype!r} is not numeric")
            out.append((name, tuple(shape), dtype))
        layout = cls(tuple(out))
        if not 0 < layout.numel < 2**32:
            raise DecodeError(f"layout has {layout.numel} elements; expected 1..2**32-1")
        if len({n for n, _, _ in out}) != len(out):
            raise DecodeError("layout has duplicate names")
        return layout

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s, _ in self.entries)  # exact: no int64 wrap-around

    def to_json(self) -> bytes:
        return json.dumps([[n, list(s), d] for n, s, d in self.entries], separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Layout":
        try:
            entries = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DecodeError(f"layout is not valid JSON: {e}") from None
        if not isinstance(entries, list):
            raise DecodeError("layout is not a list")
        return cls._checked(entries)

    @property
    def fingerprint(self) -> bytes:
        return hashlib.sha256(self.to_json()).digest()[:8]

    def flatten(self, arrays: Mapping[str, Any]) -> np.ndarray:
        """The arrays (same names, shapes, dtypes) as one new float32 vector."""
        names = [n for n, _, _ in self.entries]
        if list(arrays.keys()) != names:
            raise ValueError(f"arrays {list(arrays.keys())} do not match the layout's {names}")
        out = np.empty(self.numel, np.float32)
        at = 0
        for name, shape, dtype in self.entries:
            a = np.asarray(arrays[name])
            if a.shape != shape or a.dtype.str != dtype:
                raise ValueError(f"array {name!r} is {a.dtype.str}{a.shape}; the layout has {dtype}{shape}")
            n = a.size
            out[at:at + n] = a.reshape(-1)
            at += n
        return out

    def unflatten(self, vec: np.ndarray) -> Dict[str, np.ndarray]:
        """``{name: ndarray}`` in the layout's shapes and dtypes (integers rounded)."""
        out, at = {}, 0
        for name, shape, dtype in self.entries:
            n = math.prod(shape)
            part = vec[at:at + n].reshape(shape)
            dt = np.dtype(dtype)
            out[name] = (np.rint(part) if dt.kind in "iu" else part).astype(dt)
            at += n
        return out


# -------------------------------------------------------------------------------- envelopes


def _header(kind: int, fingerprint: bytes, lineage: bytes, base: int, new: int) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT, kind, fingerprint, lineage, base, new)


@dataclass
class Envelope:
    kind: int
    fingerprint: bytes
    lineage: bytes
    base: int
    new: int
    messages: List[bytes] = field(default_factory=list)
    layout: Optional[Layout] = None
    acked: Optional[int] = None  # downlink: base version of the client's last update used


def parse_envelope(data: Any) -> Envelope:
    """Parses (and bounds-checks) an envelope; the iotcompress messages inside are checked
    when decoded. Raises :class:`DecodeError` with the reason."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise DecodeError(f"an envelope must be bytes, got {type(data).__name__}")
    if len(data) < HEADER_LEN:
        raise DecodeError(f"envelope of {len(data)} bytes is shorter than its {HEADER_LEN}-byte header")
    magic, fmt, kind, fp, lineage, base, new = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError("not an iotcompress FedAvg envelope (bad magic)")
    if fmt != FORMAT:
        raise DecodeError(f"envelope format {fmt} is not supported (this is format {FORMAT})")
    env = Envelope(kind, fp, lineage, base, new)
    body = memoryview(data)[HEADER_LEN:]
    if kind == KIND_UPDATE:
        env.messages = [bytes(body)]
        return env
    if kind in (KIND_KEYFRAME, KIND_DELTAS):
        if len(body) < 4:
            raise DecodeError("downlink envelope truncated before its acknowledgement")
        (acked,) = struct.unpack_from("<I", body)
        env.acked = None if acked == _NONE else acked
        body = body[4:]
    if kind == KIND_KEYFRAME:
        if len(body) < 4:
            raise DecodeError("keyframe truncated before its layout length")
        (n,) = struct.unpack_from("<I", body)
        if n > _MAX_LAYOUT_JSON or 4 + n > len(body):
            raise DecodeError(f"keyframe layout of {n} bytes does not fit the {len(body)} bytes left")
        env.layout = Layout.from_json(bytes(body[4:4 + n]))
        if env.layout.fingerprint != fp:
            raise DecodeError("keyframe layout does not match its fingerprint")
        env.messages = [bytes(body[4 + n:])]
        return env
    if kind == KIND_DELTAS:
        if len(body) < 2:
            raise DecodeError("delta chain truncated before its count")
        (count,) = struct.unpack_from("<H", body)
        if count > _MAX_CHAIN or new - base != count or new < base:
            raise DecodeError(f"delta chain of {count} messages does not lead from version {base} to {new}")
        at = 2
        for _ in range(count):
            if at + 4 > len(body):
                raise DecodeError("delta chain truncated before a message length")
            (n,) = struct.unpack_from("<I", body, at)
            at += 4
            if at + n > len(body):
                raise DecodeError(f"delta chain message of {n} bytes does not fit the {len(body) - at} bytes left")
            env.messages.append(bytes(body[at:at + n]))
            at += n
        if at != len(body):
            raise DecodeError(f"{len(body) - at} bytes after the delta chain")
        return env
    raise DecodeError(f"unknown envelope kind {kind}")


def _ack(acked: Optional[int]) -> bytes:
    return struct.pack("<I", _NONE if acked is None else acked)


def _chain(fp: bytes, lineage: bytes, base: int, msgs: Sequence[bytes], acked: Optional[int]) -> bytes:
    parts = [_header(KIND_DELTAS, fp, lineage, base, base + len(msgs)), _ack(acked), struct.pack("<H", len(msgs))]
    for m in msgs:
        parts += [struct.pack("<I", len(m)), m]
    return b"".join(parts)


def _keyframe_body(layout: Layout, msg: bytes) -> bytes:
    lj = layout.to_json()
    return struct.pack("<I", len(lj)) + lj + msg


# ------------------------------------------------------------------------- compact formats


def _pack(x: np.ndarray, fmt: str) -> bytes:
    """``x`` (float32) in a storage format: f32 exact; f16/bf16 rounded to nearest; int8 with
    one float32 scale per 32 elements."""
    x = np.ascontiguousarray(x, np.float32)
    if fmt == "f32":
        return x.tobytes()
    if fmt == "f16":
        return np.clip(x, -65504, 65504).astype("<f2").tobytes()
    if fmt == "bf16":
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even
        return np.minimum(u, 0x7F7F | (u & 0x8000)).astype("<u2").tobytes()
    if fmt == "int8":
        pad = (-len(x)) % _INT8_BLOCK
        blocks = np.concatenate([x, np.zeros(pad, np.float32)]).reshape(-1, _INT8_BLOCK)
        scale = (np.abs(blocks).max(axis=1) / 127).astype(np.float32)
        q = np.rint(blocks / np.where(scale == 0, 1, scale)[:, None]).clip(-127, 127).astype(np.int8)
        return scale.astype("<f4").tobytes() + q.tobytes()
    raise ValueError(f"unknown residual format {fmt!r}; choose one of {', '.join(RESIDUAL_FORMATS)}")


def _packed_len(numel: int, fmt: str) -> int:
    blocks = -(-numel // _INT8_BLOCK)
    return {"f32": 4 * numel, "f16": 2 * numel, "bf16": 2 * numel, "int8": 4 * blocks + _INT8_BLOCK * blocks}[fmt]


def _unpack(data: bytes, numel: int, fmt: str) -> np.ndarray:
    if fmt not in RESIDUAL_FORMATS:
        raise DecodeError(f"unknown residual format {fmt!r}")
    if len(data) != _packed_len(numel, fmt):
        raise DecodeError(f"a {fmt} vector of {numel} elements has {_packed_len(numel, fmt)} bytes, got {len(data)}")
    if fmt == "f32":
        out = np.frombuffer(data, "<f4").astype(np.float32)
    elif fmt == "f16":
        out = np.frombuffer(data, "<f2").astype(np.float32)
    elif fmt == "bf16":
        out = (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        blocks = -(-numel // _INT8_BLOCK)
        scale = np.frombuffer(data[:4 * blocks], "<f4").astype(np.float32)
        q = np.frombuffer(data[4 * blocks:], np.int8).reshape(blocks, _INT8_BLOCK)
        out = (q.astype(np.float32) * scale[:, None]).reshape(-1)[:numel]
    if not np.isfinite(out).all():
        raise DecodeError("stored vector holds NaN or infinity")
    return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------- client state


_STATE_MAGIC = b"ICFLSTA1"


@dataclass
class ClientState:
    """What a client keeps between rounds: its replica of the model (exact float32, version,
    lineage, layout) and its compressor's error feedback (residual, velocity when momentum
    is used, counters). With ``audit``, the float64 sums of its deltas and of what it sent,
    so that ``sent + residual == deltas`` can be checked from outside.

    :meth:`to_bytes` / :meth:`from_bytes` give a checksummed blob (the residual in
    ``residual_format``); :meth:`save` writes it atomically (temporary file, fsync, rename,
    fsync of the directory) and :meth:`load` reads it back (``None`` when missing)."""

    layout: Optional[Layout] = None
    lineage: bytes = b""
    version: int = 0
    replica: Optional[np.ndarray] = None
    compressor: Optional[Dict[str, Any]] = None  # Compressor.state_dict()
    residual_format: str = "f32"
    rounds: int = 0
    delta_sum: Optional[np.ndarray] = None
    sent_sum: Optional[np.ndarray] = None
    last_sent: Optional[bytes] = None  # the last update's message, until acknowledged
    last_sent_base: int = 0

    def to_bytes(self) -> bytes:
        meta: Dict[str, Any] = {
            "lineage": self.lineage.hex(), "version": self.version, "rounds": self.rounds,
            "layout": None if self.layout is None else self.layout.to_json().decode(),
            "residual_format": self.residual_format, "blobs": [], "last_sent_base": self.last_sent_base,
        }
        blobs: List[bytes] = []

        def add(name: str, data: bytes, fmt: str) -> None:
            meta["blobs"].append([name, fmt, len(data)])
            blobs.append(data)

        if self.replica is not None:
            add("replica", _pack(self.replica, "f32"), "f32")
        c = self.compressor
        if c is not None:
            meta["compressor"] = {k: c[k] for k in ("format", "numel", "options", "step", "threshold", "bits_per_entry")}
            add("residual", _pack(c["residual"], self.residual_format), self.residual_format)
            if c["options"].get("momentum", 0.0) > 0:
                add("velocity", _pack(c["velocity"], self.residual_format), self.residual_format)
        for name in ("delta_sum", "sent_sum"):
            v = getattr(self, name)
            if v is not None:
                add(name, np.ascontiguousarray(v, "<f8").tobytes(), "f64")
        if self.last_sent is not None:
            add("last_sent", self.last_sent, "raw")
        mj = json.dumps(meta, separators=(",", ":")).encode()
        body = _STATE_MAGIC + struct.pack("<I", len(mj)) + mj + b"".join(blobs)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ClientState":
        data = bytes(data)
        if len(data) < len(_STATE_MAGIC) + 4 + 32 or not data.startswith(_STATE_MAGIC):
            raise DecodeError("not an iotcompress client state")
        body, digest = data[:-32], data[-32:]
        if hashlib.sha256(body).digest() != digest:
            raise DecodeError("client state checksum mismatch (corrupted or truncated)")
        (n,) = struct.unpack_from("<I", body, len(_STATE_MAGIC))
        at = len(_STATE_MAGIC) + 4
        if at + n > len(body):
            raise DecodeError("client state metadata truncated")
        try:
            meta = json.loads(body[at:at + n])
            at += n
            layout = None if meta["layout"] is None else Layout.from_json(meta["layout"].encode())
            st = cls(layout=layout, lineage=bytes.fromhex(meta["lineage"]), version=int(meta["version"]),
                     residual_format=meta["residual_format"], rounds=int(meta["rounds"]),
                     last_sent_base=int(meta["last_sent_base"]))
            numel = 0 if layout is None else layout.numel
            arrays: Dict[str, np.ndarray] = {}
            for name, fmt, size in meta["blobs"]:
                blob = body[at:at + size]
                at += size
                if len(blob) != size:
                    raise DecodeError(f"client state blob {name!r} truncated")
                if fmt == "raw":
                    arrays[name] = blob
                elif fmt == "f64":
                    if size != 8 * numel:
                        raise DecodeError(f"client state blob {name!r} has {size} bytes")
                    arrays[name] = np.frombuffer(blob, "<f8").astype(np.float64)
                else:
                    arrays[name] = _unpack(blob, numel, fmt)
            if at != len(body):
                raise DecodeError("client state has trailing bytes")
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DecodeError):
                raise
            raise DecodeError(f"client state metadata is malformed: {e}") from None
        st.replica = arrays.get("replica")
        if "compressor" in meta:
            c = dict(meta["compressor"])
            c["residual"] = arrays["residual"]
            c["velocity"] = arrays.get("velocity", np.zeros(numel, np.float32))
            st.compressor = c
        st.delta_sum = arrays.get("delta_sum")
        st.sent_sum = arrays.get("sent_sum")
        st.last_sent = arrays.get("last_sent")
        return st

    def save(self, path: str) -> None:
        """Writes the state to ``path`` atomically: a reader (or a restarted process) sees the
        old file or the new one, never a torn one."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @classmethod
    def load(cls, path: str) -> Optional["ClientState"]:
        """The state saved at ``path``; ``None`` when there is none. A corrupted file raises
        :class:`DecodeError`."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return cls.from_bytes(data)


# ---------------------------------------------------------------------------------- client


def _selection(density: Optional[float], threshold: Optional[float]) -> Dict[str, Any]:
    if density is not None and threshold is not None:
        raise ValueError("set at most one of density and threshold")
    return {"density": density} if density is not None else {"threshold": threshold} if threshold is not None else {}


class FedAvgClient:
    """One client of compressed FedAvg: :meth:`receive` turns the server's envelope into the
    model to train from (its replica), :meth:`send` turns the trained model into the
    compressed update. The error feedback lives in :attr:`state` (a :class:`ClientState`),
    which a driver saves and restores between rounds.

    ``density``/``threshold``/``quant``/``momentum`` configure the uplink
    :class:`~iotcompress.Compressor`; ``budget_bytes`` caps every envelope (header
    included): with ``density`` a message that would exceed it is redone under the budget,
    without it the compressor aims at the budget. ``seed``: this client's own (sampling and
    stochastic rounding). ``residual_format``: how :meth:`ClientState.to_bytes` stores the
    residual (``f32`` exact; ``f16``, ``bf16``, ``int8`` compact). ``audit`` keeps the sums
    of deltas and of what was sent (float64, for tests and checks)."""

    def __init__(
        self,
        density: Optional[float] = None,
        threshold: Optional[float] = None,
        quant: str = "int8",
        momentum: float = 0.0,
        budget_bytes: Optional[int] = None,
        seed: int = 0,
        residual_format: str = "f32",
        audit: bool = False,
        state: Optional[ClientState] = None,
    ) -> None:
        self.selection = _selection(density, threshold)
        if budget_bytes is not None:
            if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < HEADER_LEN + 64:
                raise ValueError(f"budget_bytes must be an int >= {HEADER_LEN + 64} (header + a minimal message), got {budget_bytes!r}")
        if residual_format not in RESIDUAL_FORMATS:
            raise ValueError(f"residual_format must be one of {', '.join(RESIDUAL_FORMATS)}, got {residual_format!r}")
        self.quant, self.momentum, self.seed = quant, float(momentum), int(seed)
        self.budget_bytes = budget_bytes
        self.audit = audit
        Compressor(1, quant=quant, momentum=momentum, **self.selection)  # bad options fail here
        self.state = state if state is not None else ClientState()
        self.state.residual_format = residual_format
        self.last_info: Dict[str, Any] = {}

    # -- downlink
    def receive(self, data: Any) -> np.ndarray:
        """Applies the server's envelope to the replica; returns a copy of the model to train
        from. Raises :class:`DecodeError` for a malformed envelope and
        :class:`StaleReplicaError` when the replica cannot be brought to the server's
        version; in both cases the state is unchanged."""
        env = parse_envelope(data)
        st = self.state
        if env.kind == KIND_KEYFRAME:
            replica = decode(env.messages[0], env.layout.numel)
            layout, version = env.layout, env.new
        elif env.kind == KIND_DELTAS:
            if st.replica is None or st.layout is None:
                raise StaleReplicaError("this client has no replica yet; it needs a keyframe")
            if env.lineage != st.lineage or env.fingerprint != st.layout.fingerprint:
                raise StaleReplicaError("the replica belongs to another run or layout; it needs a keyframe")
            if not env.base <= st.version <= env.new:
                raise StaleReplicaError(f"the replica is at version {st.version}; the deltas lead from {env.base} to {env.new}")
            replica = st.replica.copy()
            for m in env.messages[st.version - env.base:]:
                decode_add(m, replica)  # DecodeError: nothing assigned yet
            layout, version = st.layout, env.new
        else:
            raise DecodeError(f"a client cannot receive an envelope of kind {env.kind}")
        if env.lineage != st.lineage or layout != st.layout:
            # Another run or model: the old residual and sums do not apply to it.
            st.compressor, st.delta_sum, st.sent_sum, st.rounds, st.last_sent = None, None, None, 0, None
        elif st.last_sent is not None and env.acked != st.last_sent_base:
            # The server did not use our last update: back into the residual it goes.
            c = self._compressor(layout.numel)
            c.restore(st.last_sent)
            sent = decode(st.last_sent, layout.numel) if self.audit and st.sent_sum is not None else None
            self._keep(c)
            if sent is not None:
                st.sent_sum -= sent
            st.last_sent = None
        elif st.last_sent is not None:
            st.last_sent = None  # acknowledged
        st.layout, st.lineage, st.version, st.replica = layout, env.lineage, version, replica
        return replica.copy()

    def _keep(self, c: Compressor) -> None:
        """Stores ``c``'s state with the rule to resume with (not a one-off budget retry)."""
        state = c.state_dict()
        options = dict(c.options, density=None, threshold=None, target_bytes=None, adaptive=False, exact=False)
        options.update(self._rule())
        state["options"] = options
        self.state.compressor = state

    def _compressor(self, numel: int) -> Compressor:
        c = Compressor(numel, quant=self.quant, momentum=self.momentum, seed=self.seed, **self._rule())
        saved = self.state.compressor
        if saved is not None and saved.get("numel") == numel:
            c.load_state_dict(dict(saved, options=dict(c.options)))
        return c

    def _rule(self) -> Dict[str, Any]:
        if self.selection or self.budget_bytes is None:
            return dict(self.selection)
        return {"target_bytes": self.budget_bytes - HEADER_LEN}

    # -- uplink
    def send(self, trained: np.ndarray) -> bytes:
        """Compresses ``trained - replica`` (a float32 vector of the layout's size) with this
        client's error feedback; returns the envelope. The state changes only on success."""
        st = self.state
        if st.replica is None or st.layout is None:
            raise StaleReplicaError("send() before receive(): there is no replica to take the delta from")
        trained = np.asarray(trained)
        if trained.shape != st.replica.shape or trained.dtype != np.float32:
            raise ValueError(f"trained must be float32 of shape {st.replica.shape}, got {trained.dtype}{trained.shape}")
        delta = trained - st.replica
        c = self._compressor(st.layout.numel)
        msg = c.compress(delta)
        if self.budget_bytes is not None and HEADER_LEN + len(msg) > self.budget_bytes:
            c.restore()  # bit-exact undo, then the same step under the budget
            c.set_selection(target_bytes=self.budget_bytes - HEADER_LEN)
            msg = c.compress(delta)
        envelope = _header(KIND_UPDATE, st.layout.fingerprint, st.lineage, st.version, st.version) + msg
        self._keep(c)
        st.rounds += 1
        st.last_sent, st.last_sent_base = msg, st.version
        if self.audit:
            if st.delta_sum is None:
                st.delta_sum = np.zeros(st.layout.numel)
                st.sent_sum = np.zeros(st.layout.numel)
            st.delta_sum += delta
            st.sent_sum += decode(msg, st.layout.numel)
        self.last_info = {"bytes": len(envelope), "nnz": c.last_nnz, "residual_norm": c.residual_norm}
        return envelope


# ---------------------------------------------------------------------------------- server


class FedAvgServer:
    """The server of compressed FedAvg for one model (``layout``, initial float32 vector
    ``x``): per-client downlink envelopes (:meth:`message_for`), reply decoding
    (:meth:`decode_reply`), weighted averaging (:meth:`aggregate`).

    ``density``/``threshold``/``quant`` compress each round's downlink delta ``x - y``
    (``density=None`` and ``threshold=None``: dense, in ``quant``). ``keyframe_quant`` is
    the first keyframe's precision (``f16`` halves it; later keyframes are exact, since a
    client must match the others bit for bit). ``catch_up``: how many past deltas are kept
    (at least 1): a client up to that many versions behind gets the deltas it lacks instead
    of a keyframe, when they are smaller; ``catch_up=1`` sends a keyframe to any client that
    missed a version.
    ``lineage``: 8 bytes naming this run (random by default)."""

    def __init__(
        self,
        layout: Layout,
        x: np.ndarray,
        density: Optional[float] = None,
        threshold: Optional[float] = None,
        quant: str = "int8",
        keyframe_quant: str = "f16",
        catch_up: int = 8,
        lineage: Optional[bytes] = None,
    ) -> None:
        self.layout = layout
        self.selection = _selection(density, threshold)
        self.quant = quant
        if keyframe_quant not in ("f32", "f16", "bf16"):
            raise ValueError(f"keyframe_quant must be f32, f16 or bf16, got {keyframe_quant!r}")
        self.keyframe_quant = keyframe_quant
        Compressor(1, quant=quant, **self.selection)  # bad options fail here
        if isinstance(catch_up, bool) or not isinstance(catch_up, int) or not 1 <= catch_up <= _MAX_CHAIN:
            raise ValueError(f"catch_up must be an int in 1..{_MAX_CHAIN}, got {catch_up!r}")
        self.catch_up = catch_up
        self.lineage = os.urandom(8) if lineage is None else bytes(lineage)
        if len(self.lineage) != 8:
            raise ValueError("lineage must be 8 bytes")
        self.x = self._vector(x)
        self.y: Optional[np.ndarray] = None  # the broadcast replica
        self.version = 0
        self.history: List[bytes] = []  # deltas to versions version-len+1 .. version
        self._dirty = True  # x moved since the last broadcast
        self.known: Dict[Any, int] = {}  # client -> replica version it confirmed
        self.pending: Dict[Any, int] = {}  # client -> version sent, not yet confirmed
        self.used: Dict[Any, int] = {}  # client -> base version of its last update aggregated
        self._decoded: Dict[Any, int] = {}  # client -> base of the update decode_reply accepted
        self._keyframe: Optional[bytes] = None  # the keyframe's body (after the acknowledgement)

    def _vector(self, x: Any) -> np.ndarray:
        x = np.array(x, np.float32, copy=True).reshape(-1)
        if x.shape != (self.layout.numel,):
            raise ValueError(f"the model has {x.size} elements; the layout {self.layout.numel}")
        return x

    def set_model(self, x: np.ndarray) -> None:
        """Replaces the global model (for a driver whose strategy computes it)."""
        x = self._vector(x)
        if not np.array_equal(x, self.x):
            self.x = x
            self._dirty = True

    def broadcast(self) -> None:
        """Moves the replica towards ``x`` by one compressed delta (a new version) if ``x``
        moved since the last one. The first call makes the first keyframe instead."""
        if not self._dirty:
            return
        self._dirty = False
        if self.y is None:
            msg = Compressor(self.layout.numel, quant=self.keyframe_quant).compress(self.x)
            self.y = decode(msg, self.layout.numel)
            self.version = 1
            self._keyframe = _keyframe_body(self.layout, msg)
            return
        c = Compressor(self.layout.numel, quant=self.quant, seed=self.version, **self.selection)
        msg = c.compress(self.x - self.y)
        decode_add(msg, self.y)  # exactly what every client does
        self.version += 1
        self.history = (self.history + [msg])[-self.catch_up:]
        self._keyframe = None

    def keyframe(self, acked: Optional[int] = None) -> bytes:
        """The current replica as a keyframe envelope (exact after the first)."""
        self.broadcast()
        if self._keyframe is None:
            msg = Compressor(self.layout.numel, quant="f32").compress(self.y)
            self._keyframe = _keyframe_body(self.layout, msg)
        return _header(KIND_KEYFRAME, self.layout.fingerprint, self.lineage, 0, self.version) + _ack(acked) + self._keyframe

    def message_for(self, client: Any) -> bytes:
        """The envelope that brings ``client``'s replica to the current version (after a
        :meth:`broadcast` when the model moved): the deltas it lacks or a keyframe."""
        self.broadcast()
        have, acked = self.known.get(client), self.used.get(client)
        self.pending[client] = self.version
        keyframe = self.keyframe(acked)
        if have is not None and self.version - len(self.history) <= have <= self.version:
            missed = self.history[len(self.history) - (self.version - have):]
            chain = _chain(self.layout.fingerprint, self.lineage, have, missed, acked)
            if len(chain) < len(keyframe) or have == self.version:
                return chain
        return keyframe

    def confirm(self, client: Any, ok: Optional[bool]) -> None:
        """After a round: ``ok=True`` the client replied (it holds the version sent; an
        update of it that :meth:`decode_reply` accepted is aggregated, and the next envelope
        acknowledges it), ``False`` it failed (unknown: a keyframe next time; its update is
        not used), ``None`` no reply (it may or may not have applied it; the deltas since its
        last confirmed version cover both)."""
        sent = self.pending.pop(client, None)
        decoded = self._decoded.pop(client, None)
        if ok and decoded is not None:  # its update goes into the aggregate: acknowledge it
            self.used[client] = decoded
        if ok and sent is not None:
            self.known[client] = sent
        elif ok is False:
            self.known.pop(client, None)

    def decode_reply(self, client: Any, data: Any) -> np.ndarray:
        """The dense delta of a client's update envelope. Raises :class:`ReplyError` (the
        client counts as failed) for a malformed envelope, another layout or run, or a delta
        from another version than the one sent to it."""
        try:
            env = parse_envelope(data)
            if env.kind != KIND_UPDATE:
                raise ReplyError(f"a reply must be an update envelope, got kind {env.kind}")
            if env.fingerprint != self.layout.fingerprint:
                raise ReplyError("the reply's layout fingerprint does not match the model's")
            if env.lineage != self.lineage:
                raise ReplyError("the reply belongs to another run")
            expected = self.pending.get(client, self.version)
            if env.base != expected:
                raise ReplyError(f"the reply is a delta from version {env.base}; version {expected} was sent")
            delta = decode(env.messages[0], self.layout.numel)
            self._decoded[client] = env.base  # used once confirm(client, True) says so
            return delta
        except ReplyError:
            raise
        except DecodeError as e:
            raise ReplyError(f"the reply does not decode: {e}") from None

    def aggregate(self, deltas: Iterable[Tuple[np.ndarray, float]]) -> np.ndarray:
        """FedAvg: ``x += sum(w_i delta_i) / sum(w_i)`` over ``(delta, weight)`` pairs; returns
        (a copy of) the new ``x``. No pairs: ``x`` stays."""
        total, acc = 0.0, np.zeros(self.layout.numel, np.float64)
        for delta, w in deltas:
            acc += float(w) * delta
            total += float(w)
        if total > 0:
            self.x = (self.x + acc / total).astype(np.float32)
            self._dirty = True
        return self.x.copy()


def weight_of(value: Any) -> float:
    """A reply's ``num-examples`` as a positive weight, or :class:`ReplyError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ReplyError(f"num-examples must be a number, got {type(value).__name__}")
    w = float(value)
    if not (np.isfinite(w) and w > 0):
        raise ReplyError(f"num-examples must be finite and > 0, got {value!r}")
    return w


def dirichlet_partition(labels: Sequence[int], clients: int, alpha: float, seed: int = 0, min_size: int = 2) -> List[np.ndarray]:
    """Non-IID shares of a labelled dataset: for each class, its examples are split among the
    ``clients`` in proportions drawn from ``Dirichlet(alpha)`` (small ``alpha``: each client
    sees few classes). Redrawn until every client has at least ``min_size`` examples; returns
    one sorted index array per client.

    Example::

        parts = dirichlet_partition(y_train, clients=10, alpha=0.5, seed=0)
    """
    labels = np.asarray(labels)
    if clients < 1 or not alpha > 0:
        raise ValueError(f"clients must be >= 1 and alpha > 0, got {clients}, {alpha}")
    if clients * min_size > len(labels):
        raise ValueError(f"{len(labels)} examples cannot give {clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: List[List[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, float(alpha)))) * len(idx)).astype(int)[:-1]
            for i, share in enumerate(np.split(idx, cuts)):
                parts[i].extend(share.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) split gave every client {min_size} examples")  # pragma: no cover
