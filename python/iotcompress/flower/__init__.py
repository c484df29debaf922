"""Compressed FedAvg on Flower (``pip install iotcompress[flower]``; Flower 1.42's Message API).

Two lines turn an existing Flower app into a compressed one::

    app = ClientApp(mods=[compression_mod(density=0.01)])            # client_app.py
    strategy = CompressedFedAvg(density=0.05, fraction_evaluate=0.0)  # server_app.py

The user's ``@app.train()`` function does not change: :func:`compression_mod` rebuilds the full
model ``ArrayRecord`` from the server's compressed update before it runs, and replaces the
trained model by the compressed delta after. :class:`CompressedFedAvg` (FedAvg's arguments and
weighting) decodes the replies, averages them and sends the next model as a compressed delta;
:class:`CompressedStrategy` does the same around another Message-API strategy (FedProx,
FedAvgM, FedAdam, ...). The protocol itself is :mod:`iotcompress.fedavg`, shared with the
fleet simulator. See docs/flower.md.
"""

from __future__ import annotations

import copy
import logging
import os
import zlib
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from .._network import NetworkProfile, budget_bytes
from ..errors import DecodeError
from ..fedavg import ClientState, FedAvgClient, FedAvgServer, Layout, ReplyError, weight_of

__all__ = ["compression_mod", "CompressedFedAvg", "CompressedStrategy", "ENVELOPE_KEY", "ARRAYS_KEY",
           "STATE_DIR_KEY", "LINK_KEY", "BUDGET_KEY", "state_path"]

#: The ConfigRecord entry that carries an envelope (bytes), both ways; also the reply's
#: ConfigRecord name and the ``context.state`` record name.
ENVELOPE_KEY = "iotcompress"
#: The downlink ConfigRecord entry naming the ArrayRecord the model is rebuilt into.
ARRAYS_KEY = "iotcompress-arrays"
#: Node config keys (``--node-config``) that override the mod's arguments on one node.
STATE_DIR_KEY, LINK_KEY, BUDGET_KEY = "iotcompress-state-dir", "iotcompress-link", "iotcompress-budget-ms"

log = logging.getLogger("flwr")


def _arrays_to_numpy(record: ArrayRecord) -> Dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _numpy_to_arrays(arrays: Dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _envelope_record(content: RecordDict) -> Tuple[Optional[str], Optional[ConfigRecord]]:
    for name, rec in content.config_records.items():
        if ENVELOPE_KEY in rec:
            return name, rec
    return None, None


def _weight(content: RecordDict, key: str) -> float:
    for rec in content.metric_records.values():
        if key in rec:
            return weight_of(rec[key])
    raise ReplyError(f"the reply has no {key!r} metric")


# ----------------------------------------------------------------------------------- client


def state_path(directory: str, context: Context) -> str:
    """The state file of this node in ``directory``: named by ``partition-id`` when the node
    config has one (stable across restarts), else by the node id."""
    tag = context.node_config.get("partition-id", context.node_id)
    return os.path.join(directory, f"iotcompress-client-{tag}.state")


def compression_mod(
    density: Optional[float] = None,
    threshold: Optional[float] = None,
    quant: str = "int8",
    momentum: float = 0.0,
    link: Any = None,
    budget_ms: Optional[float] = None,
    residual_format: str = "f32",
    state_dir: Optional[str] = None,
    seed: Optional[int] = None,
    audit: bool = False,
):
    """A ClientApp mod ``mod(msg, context, call_next) -> Message`` for the compressed
    strategies of this module. List it before clipping or DP mods (it must see their
    output); it cannot be combined with ``secaggplus_mod``.

    Inbound (train and evaluate): rebuilds the model ``ArrayRecord`` from the server's
    envelope (a delta against this client's replica, or a keyframe) and removes the
    envelope from the config, so the wrapped function sees what plain FedAvg sends.
    Outbound (train): replaces the trained ``ArrayRecord`` by the compressed delta
    ``trained - replica`` (a ConfigRecord :data:`ENVELOPE_KEY`), with this client's error
    feedback kept across rounds, and adds ``iotc-bytes``/``iotc-nnz`` to its metrics. A
    message without an envelope passes through untouched.

    ``density``/``threshold``/``quant``/``momentum``: the uplink compressor. ``link`` (a
    :class:`~iotcompress.NetworkProfile` or a preset name such as ``"lora"``) with
    ``budget_ms``: the per-round byte budget ``link.bytes_within(budget_ms)``; no update is
    longer (without ``density`` the compressor aims at it). The node config keys
    ``iotcompress-link``, ``iotcompress-budget-ms`` and ``iotcompress-state-dir`` override
    ``link``, ``budget_ms`` and ``state_dir`` per node.

    State: with ``state_dir``, the replica and error feedback persist in a file per node
    (:func:`state_path`, written atomically) and survive a SuperNode or ClientApp restart;
    ``context.state`` then holds only the version. Without it, they live in
    ``context.state`` (lost when the SuperNode restarts). ``residual_format`` (``f32``,
    ``f16``, ``bf16``, ``int8``) shrinks the stored residual; the velocity is stored only
    when ``momentum > 0``. ``seed`` defaults to the node's ``partition-id`` (else a hash of the node id).
    ``audit`` keeps float64 sums of the deltas and of what was sent in the state, for checks.

    Example::

        from flwr.clientapp import ClientApp
        from iotcompress.flower import compression_mod
        app = ClientApp(mods=[compression_mod(density=0.01, quant="int8")])
    """
    FedAvgClient(density=density, threshold=threshold, quant=quant, momentum=momentum,
                 residual_format=residual_format)  # bad options fail when the app is built
    default_link = link

    def _client(context: Context) -> Tuple[FedAvgClient, Optional[str]]:
        cfg = context.node_config
        profile = cfg.get(LINK_KEY, default_link)
        budget = cfg.get(BUDGET_KEY, budget_ms)
        nbytes = None
        if profile is not None:
            if not isinstance(profile, NetworkProfile):
                profile = NetworkProfile.preset(str(profile))
            nbytes = budget_bytes(profile, None if budget is None else float(budget))
        directory = cfg.get(STATE_DIR_KEY, state_dir)
        path = None if directory in (None, "") else state_path(str(directory), context)
        try:
            if path is not None:
                state = ClientState.load(path)
            else:
                rec = context.state.config_records.get(ENVELOPE_KEY)
                state = None if rec is None or "state" not in rec else ClientState.from_bytes(rec["state"])
        except DecodeError as e:  # damaged: start over (the server sends a keyframe)
            log.warning("iotcompress: ignoring the saved state (%s): %s", path or "context.state", e)
            state = None
        tag = cfg.get("partition-id", context.node_id)
        # The simulator seeds device i with i: the same partition gives the same bytes in both.
        s = seed if seed is not None else tag if isinstance(tag, int) and tag >= 0 else zlib.crc32(str(tag).encode())
        client = FedAvgClient(density=density, threshold=threshold, quant=quant, momentum=momentum,
                              budget_bytes=nbytes, seed=s, residual_format=residual_format, audit=audit, state=state)
        return client, path

    def _save(client: FedAvgClient, path: Optional[str], context: Context) -> None:
        if path is not None:
            client.state.save(path)
            context.state[ENVELOPE_KEY] = ConfigRecord({"version": client.state.version, "rounds": client.state.rounds})
        else:
            context.state[ENVELOPE_KEY] = ConfigRecord({"state": client.state.to_bytes()})

    def mod(msg: Message, context: Context, call_next) -> Message:
        kind = msg.metadata.message_type.split(".")[0]
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE) or msg.has_error():
            return call_next(msg, context)
        name, rec = _envelope_record(msg.content)
        if rec is None:
            return call_next(msg, context)
        client, path = _client(context)
        model = client.receive(rec[ENVELOPE_KEY])  # DecodeError / StaleReplicaError: an error reply
        arrays_key = str(rec[ARRAYS_KEY]) if ARRAYS_KEY in rec else "arrays"
        # A copy of the message for the wrapped function; the one received stays as it was.
        content = RecordDict(dict(msg.content.items()))
        content[name] = ConfigRecord({k: v for k, v in rec.items() if k not in (ENVELOPE_KEY, ARRAYS_KEY)})
        content[arrays_key] = _numpy_to_arrays(client.state.layout.unflatten(model))
        inner = copy.copy(msg)
        inner.content = content
        reply = call_next(inner, context)
        if kind == MessageType.TRAIN and not reply.has_error():
            content = reply.content
            records = content.array_records
            key = arrays_key if arrays_key in records else (next(iter(records)) if len(records) == 1 else None)
            if key is None:
                raise ValueError(f"the train reply has no ArrayRecord {arrays_key!r} to compress")
            trained = client.state.layout.flatten(_arrays_to_numpy(records[key]))
            envelope = client.send(trained)
            del content[key]
            content[ENVELOPE_KEY] = ConfigRecord({ENVELOPE_KEY: envelope})
            for m in content.metric_records.values():
                m["iotc-bytes"] = len(envelope)
                m["iotc-nnz"] = int(client.last_info["nnz"])
                break
        _save(client, path, context)
        return reply

    return mod


# ----------------------------------------------------------------------------------- server


class CompressedStrategy(Strategy):
    """Wraps a Message-API ``strategy`` (FedAvg, FedProx, FedAvgM, FedAdam, ...) so that its
    models travel compressed: the downlink as a delta against each client's replica (with
    server-side error feedback; a keyframe for a client that is new or stale), the uplink
    as the clients' compressed deltas (:func:`compression_mod`).

    The wrapped strategy samples the clients and builds their configs as usual; its
    ``aggregate_train`` receives each reply as it would from plain FedAvg (the global model
    plus that client's decoded delta, under its ArrayRecord key) and computes the next
    model. For plain FedAvg the weighted mean is computed directly (:class:`CompressedFedAvg`).
    A reply that has an error, does not decode, fails the layout fingerprint, or lacks
    ``num-examples`` counts as one failed client; the round goes on.

    ``density``/``threshold``/``quant``: the downlink delta's compression (dense ``quant``
    when both are None); ``keyframe_quant``: the first keyframe's precision; ``catch_up``:
    past deltas kept for clients that missed rounds (``catch_up=1``: a keyframe for any
    client that missed one).

    :attr:`stats` has one entry per round: payload bytes sent to and received from each
    client, keyframes, failures (what docs/flower.md calls payload bytes).

    Example::

        from flwr.serverapp.strategy import FedProx
        strategy = CompressedStrategy(FedProx(proximal_mu=0.1), density=0.05)
    """

    def __init__(
        self,
        strategy: Strategy,
        density: Optional[float] = 0.05,
        threshold: Optional[float] = None,
        quant: str = "int8",
        keyframe_quant: str = "f16",
        catch_up: int = 8,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a flwr.serverapp.strategy.Strategy, got {type(strategy).__name__}")
        self.strategy = strategy
        self._down = dict(density=density, threshold=threshold, quant=quant, keyframe_quant=keyframe_quant,
                          catch_up=catch_up)
        FedAvgServer(Layout.of({"x": np.zeros(1, np.float32)}), np.zeros(1, np.float32), **self._down)  # checks
        self.server: Optional[FedAvgServer] = None
        self.stats: List[Dict[str, Any]] = []
        self._keys: List[str] = []

    @property
    def arrayrecord_key(self) -> str:
        return getattr(self.strategy, "arrayrecord_key", "arrays")

    @property
    def weighted_by_key(self) -> str:
        return getattr(self.strategy, "weighted_by_key", "num-examples")

    def summary(self) -> None:
        self.strategy.summary()
        log.info("\t└──> iotcompress: downlink %s", ", ".join(f"{k}={v}" for k, v in self._down.items()))

    def _round_stats(self, server_round: int, phase: str) -> Dict[str, Any]:
        entry = {"round": server_round, "phase": phase, "down_bytes": {}, "up_bytes": {}, "keyframes": 0, "failed": 0}
        self.stats.append(entry)
        return entry

    def _compress(self, server_round: int, phase: str, arrays: ArrayRecord, messages: Iterable[Message]) -> List[Message]:
        messages = list(messages)
        if not messages:
            return []
        numpy = _arrays_to_numpy(arrays)
        if self.server is None:
            layout = Layout.of(numpy)
            self.server = FedAvgServer(layout, layout.flatten(numpy), **self._down)
        else:
            self.server.set_model(self.server.layout.flatten(numpy))
        entry = self._round_stats(server_round, phase)
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            envelope = self.server.message_for(node)
            content = RecordDict()
            config_name = None
            for k, rec in m.content.items():
                if k == self.arrayrecord_key and isinstance(rec, ArrayRecord):
                    continue  # the model travels in the envelope
                if isinstance(rec, ConfigRecord) and config_name is None:
                    config_name, rec = k, ConfigRecord(dict(rec.items()))  # a copy per node
                content[k] = rec
            if config_name is None:
                config_name = "config"
                content[config_name] = ConfigRecord()
            content[config_name][ENVELOPE_KEY] = envelope
            content[config_name][ARRAYS_KEY] = self.arrayrecord_key
            entry["down_bytes"][node] = len(envelope)
            entry["keyframes"] += int(envelope[5] == 1)
            out.append(Message(content=content, dst_node_id=node, message_type=m.metadata.message_type,
                               group_id=m.metadata.group_id or None, ttl=m.metadata.ttl or None))
        return out

    def _settle(self, replies: List[Message]) -> None:
        """Nodes that were sent something and did not answer: unknown whether they applied it."""
        answered = {r.metadata.src_node_id for r in replies}
        for node in list(self.server.pending):
            if node not in answered:
                self.server.confirm(node, None)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._compress(server_round, "train", arrays, self.strategy.configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._compress(server_round, "evaluate", arrays, self.strategy.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        replies = list(replies)
        if self.server is None:  # nothing was sent: nothing of ours can be in the replies
            return self.strategy.aggregate_train(server_round, replies)
        entry = self.stats[-1] if self.stats and self.stats[-1]["phase"] == "train" else self._round_stats(server_round, "train")
        good: List[Tuple[Message, np.ndarray, float]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                if msg.has_error():
                    raise ReplyError(f"error reply: {msg.error.reason}")
                _, rec = _envelope_record(msg.content)
                if rec is None:
                    raise ReplyError("the reply carries no iotcompress update (is compression_mod on the ClientApp?)")
                envelope = rec[ENVELOPE_KEY]
                entry["up_bytes"][node] = len(envelope) if isinstance(envelope, bytes) else 0
                delta = self.server.decode_reply(node, envelope)
                weight = _weight(msg.content, self.weighted_by_key)
            except (ReplyError, TypeError) as e:
                log.warning("iotcompress: reply from node %s counts as a failure: %s", node, e)
                self.server.confirm(node, False)
                entry["failed"] += 1
                continue
            self.server.confirm(node, True)
            good.append((msg, delta, weight))
        self._settle(replies)
        if not good:
            return None, None
        contents = []
        for msg, delta, _ in good:
            c = RecordDict({k: v for k, v in msg.content.items() if k != ENVELOPE_KEY})
            contents.append((c, delta))
        if type(self.strategy) is FedAvg:
            x = self.server.aggregate([(d, w) for _, d, w in good])
            arrays = _numpy_to_arrays(self.server.layout.unflatten(x))
            metrics = self.strategy.train_metrics_aggr_fn([c for c, _ in contents], self.weighted_by_key)
        else:
            synthetic = []
            for (c, delta), (msg, _, _) in zip(contents, good):
                c[self.arrayrecord_key] = _numpy_to_arrays(self.server.layout.unflatten(self.server.x + delta))
                synthetic.append(Message(content=c, dst_node_id=msg.metadata.dst_node_id, message_type=MessageType.TRAIN))
            arrays, metrics = self.strategy.aggregate_train(server_round, synthetic)
            if arrays is not None:
                self.server.set_model(self.server.layout.flatten(_arrays_to_numpy(arrays)))
        if metrics is not None:
            metrics["iotc-failed"] = entry["failed"]
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        replies = list(replies)
        if self.server is not None:
            for msg in replies:
                self.server.confirm(msg.metadata.src_node_id, not msg.has_error())
            self._settle(replies)
        return self.strategy.aggregate_evaluate(server_round, replies)


_DOWNLINK = ("density", "threshold", "quant", "keyframe_quant", "catch_up")


class CompressedFedAvg(CompressedStrategy):
    """FedAvg (weighted by ``num-examples``) with compressed models both ways:
    :class:`CompressedStrategy` around :class:`flwr.serverapp.strategy.FedAvg`, which gets
    every other keyword (``fraction_train``, ``min_available_nodes``, ``weighted_by_key``,
    ...). ``density``/``threshold``/``quant``/``keyframe_quant``/``catch_up`` configure the
    downlink; the uplink is configured on the clients (:func:`compression_mod`).

    Example::

        strategy = CompressedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, density=0.05)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=30)
    """

    def __init__(self, **kwargs: Any) -> None:
        downlink = {k: kwargs.pop(k) for k in _DOWNLINK if k in kwargs}
        super().__init__(FedAvg(**kwargs), **downlink)
