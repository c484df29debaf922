"""The compressed-FedAvg core (iotcompress.fedavg), without Flower: bit-identical replicas,
keyframes and catch-up for stale clients, replies that fail, persistent error feedback, byte
budgets, compact state formats, non-IID partitions."""

from __future__ import annotations

import os

import numpy as np
import pytest

import iotcompress as ic
from iotcompress.fedavg import (
    HEADER_LEN, ClientState, FedAvgClient, FedAvgServer, Layout, ReplyError, StaleReplicaError,
    dirichlet_partition, parse_envelope,
)

LAYOUT = Layout.of({"w": np.zeros((40, 25), np.float32), "b": np.zeros(25, np.float32), "n": np.zeros((), np.int64)})
N = LAYOUT.numel


def _x0(seed=0):
    return np.random.default_rng(seed).normal(size=N).astype(np.float32)


def _train(model, i, r):
    """A deterministic stand-in for local training: a step that depends on client and round."""
    g = np.random.default_rng(1000 * r + i).normal(size=N).astype(np.float32)
    return (model - 0.01 * g).astype(np.float32)


def _round(server, clients, r, skip=()):
    ups = []
    for i, c in enumerate(clients):
        if i in skip:
            continue
        model = c.receive(server.message_for(i))
        ups.append((i, c.send(_train(model, i, r))))
    deltas = []
    for i, up in ups:
        deltas.append((server.decode_reply(i, up), 10 + i))
        server.confirm(i, True)
    for i in skip:
        server.confirm(i, None)
    return server.aggregate(deltas)


def test_layout_round_trip_and_fingerprint():
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, np.int64)}
    lay = Layout.of(arrays)
    back = lay.unflatten(lay.flatten(arrays))
    assert list(back) == ["w", "n"] and back["n"].dtype == np.int64 and int(back["n"]) == 7
    np.testing.assert_array_equal(back["w"], arrays["w"])
    assert Layout.from_json(lay.to_json()) == lay
    other = Layout.of({"w": np.zeros((3, 2), np.float32), "n": np.array(7, np.int64)})
    assert other.fingerprint != lay.fingerprint
    with pytest.raises(ValueError):
        lay.flatten({"n": arrays["n"], "w": arrays["w"]})  # order matters


def test_replicas_stay_bit_identical_and_track_the_model():
    server = FedAvgServer(LAYOUT, _x0(), density=0.1)
    clients = [FedAvgClient(density=0.05, seed=i) for i in range(3)]
    for r in range(1, 8):
        _round(server, clients, r)
        for c in clients:
            assert c.state.version == server.version
            assert c.state.replica.tobytes() == server.y.tobytes()
    # Server-side error feedback: what the downlink left out is x - y, and it shrinks the
    # distance it would have without it (y alone would miss every unsent entry forever).
    gap = np.linalg.norm(server.x - server.y) / np.linalg.norm(server.x)
    assert gap < 0.2


def test_first_message_is_a_keyframe_with_layout_then_deltas():
    server = FedAvgServer(LAYOUT, _x0(), density=0.1)
    first = parse_envelope(server.message_for("a"))
    assert first.kind == 1 and first.layout == LAYOUT
    client = FedAvgClient(density=0.1)
    client.receive(server.message_for("a"))
    server.confirm("a", True)
    server.aggregate([(np.full(N, 0.1, np.float32), 1)])
    env = parse_envelope(server.message_for("a"))
    assert env.kind == 0 and (env.base, env.new) == (1, 2)
    assert len(server.message_for("a")) < 0.5 * len(server.keyframe())


def test_client_that_missed_rounds_catches_up_with_deltas_or_a_keyframe():
    server = FedAvgServer(LAYOUT, _x0(), density=0.02, catch_up=3)
    clients = [FedAvgClient(density=0.05, seed=i) for i in range(3)]
    _round(server, clients, 1)
    _round(server, clients, 2, skip={2})
    _round(server, clients, 3, skip={2})
    env = parse_envelope(server.message_for(2))
    assert env.kind == 0 and env.new - env.base == 3  # three deltas, smaller than a keyframe
    server.pending.pop(2)
    for r in range(4, 8):
        _round(server, clients, r, skip={2})
    env = parse_envelope(server.message_for(2))
    assert env.kind == 1  # beyond catch_up: the whole replica, exact
    clients[2].receive(server.message_for(2))
    assert clients[2].state.replica.tobytes() == server.y.tobytes()


def _after_one_round():
    """A server and a client after round 1 (client at version 1; the model has moved)."""
    server = FedAvgServer(LAYOUT, _x0(), density=0.1)
    c = FedAvgClient(density=0.1)
    c.receive(server.message_for(0))
    server.confirm(0, True)
    server.aggregate([(np.full(N, 0.1, np.float32), 1)])
    return server, c


def test_new_or_reset_client_cannot_apply_a_delta_and_keeps_its_state():
    server, c = _after_one_round()
    delta = server.message_for(0)
    fresh = FedAvgClient(density=0.1)
    with pytest.raises(StaleReplicaError):
        fresh.receive(delta)
    assert fresh.state.replica is None
    server.confirm(0, False)  # its failed reply: a keyframe next time
    assert parse_envelope(server.message_for(0)).kind == 1


def test_corrupt_envelopes_raise_decode_error_and_change_nothing():
    server, c = _after_one_round()
    good = server.message_for(0)
    before = c.state.replica.copy(), c.state.version
    for bad in (good[:10], good[:-1], b"XXXX" + good[4:], good[:HEADER_LEN] + b"\xff\xff", bytes([b ^ 0xFF for b in good])):
        with pytest.raises(ic.DecodeError):
            c.receive(bad)
        assert c.state.replica.tobytes() == before[0].tobytes() and c.state.version == before[1]
    flipped = bytearray(good)
    flipped[-3] ^= 0x10  # inside the iotcompress message: its checksum catches it
    with pytest.raises(ic.DecodeError):
        c.receive(bytes(flipped))
    c.receive(good)  # the intact one still works


def test_server_rejects_bad_replies_as_reply_errors():
    server = FedAvgServer(LAYOUT, _x0(), density=0.1)
    c = FedAvgClient(density=0.1)
    model = c.receive(server.message_for(0))
    up = c.send(model + 1)
    other = Layout.of({"w": np.zeros(N, np.float32)})
    wrong_fp = up[:6] + other.fingerprint + up[14:]
    wrong_run = up[:14] + b"\0" * 8 + up[22:]
    wrong_base = up[:22] + (7).to_bytes(4, "little") * 2 + up[30:]
    for bad in (up[:-2], wrong_fp, wrong_run, wrong_base, b"", server.message_for(1)):
        with pytest.raises(ReplyError):
            server.decode_reply(0, bad)
    np.testing.assert_allclose(server.decode_reply(0, up).sum(), ic.decode(up[HEADER_LEN:]).sum())


@pytest.mark.parametrize("density,budget", [(0.5, 400), (None, 400)])
def test_byte_budget_holds_every_round(density, budget):
    server = FedAvgServer(LAYOUT, _x0(), density=0.1)
    c = FedAvgClient(density=density, budget_bytes=budget)
    sizes = []
    for r in range(1, 6):
        model = c.receive(server.message_for(0))
        up = c.send(_train(model, 0, r))
        sizes.append(len(up))
        server.decode_reply(0, up)
        server.confirm(0, True)
    assert max(sizes) <= budget
    unbounded = FedAvgClient(density=0.5)
    unbounded.receive(server.keyframe())
    assert len(unbounded.send(_train(unbounded.state.replica, 0, 9))) > budget  # the budget did bind


def test_residual_persists_atomically_and_sums_hold(tmp_path):
    path = str(tmp_path / "client.state")
    server = FedAvgServer(LAYOUT, _x0(), density=0.1)
    ref = FedAvgClient(density=0.05, seed=3, audit=True)  # never restarts
    sent = np.zeros(N)
    for r in range(1, 7):
        env = server.message_for(0)
        # The restarted client: everything it knows comes from the file.
        c = FedAvgClient(density=0.05, seed=3, audit=True, state=ClientState.load(path))
        model = c.receive(env)
        assert ref.receive(env).tobytes() == model.tobytes()
        up = c.send(_train(model, 0, r))
        assert up == ref.send(_train(model, 0, r))  # bit-identical to the one that kept running
        c.state.save(path)
        assert [f for f in os.listdir(tmp_path)] == ["client.state"]  # no temporary left behind
        sent += ic.decode(up[HEADER_LEN:])
        server.aggregate([(server.decode_reply(0, up), 1)])
        server.confirm(0, True)
    st = ClientState.load(path)
    np.testing.assert_allclose(st.sent_sum, sent, rtol=0, atol=1e-6)
    np.testing.assert_allclose(st.sent_sum + st.compressor["residual"], st.delta_sum, rtol=0, atol=1e-5)
    assert np.abs(st.compressor["residual"]).sum() > 0
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ic.DecodeError):
        ClientState.load(path)


@pytest.mark.parametrize("fmt,tol", [("f32", 0), ("f16", 1e-3), ("bf16", 8e-3), ("int8", 1e-2)])
def test_compact_residual_formats(fmt, tol):
    server = FedAvgServer(LAYOUT, _x0(), density=0.1)
    c = FedAvgClient(density=0.05, residual_format=fmt)
    c.send(_train(c.receive(server.message_for(0)), 0, 1) * 1.5)
    blob = c.state.to_bytes()
    back = ClientState.from_bytes(blob)
    r = c.state.compressor["residual"]
    err = np.abs(back.compressor["residual"] - r).max() / np.abs(r).max()
    assert err <= tol
    assert back.replica.tobytes() == c.state.replica.tobytes()  # the replica is always exact
    c32 = FedAvgClient(density=0.05, residual_format="f32", state=ClientState.from_bytes(blob))
    assert len(blob) <= len(c32.state.to_bytes())
    # momentum 0: no velocity stored (8 bytes per element with it, 4 without at f32).
    cm = FedAvgClient(density=0.05, momentum=0.9, residual_format=fmt)
    cm.send(_train(cm.receive(server.keyframe()), 0, 1))
    assert len(cm.state.to_bytes()) > len(blob)


def test_dirichlet_partition_is_a_non_iid_partition():
    y = np.repeat(np.arange(10), 50)
    parts = dirichlet_partition(y, 8, 0.5, seed=1)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(y)))
    classes = [len(np.unique(y[p])) for p in parts]
    assert min(len(p) for p in parts) >= 2 and min(classes) < 10  # skewed
    assert [p.tolist() for p in parts] == [p.tolist() for p in dirichlet_partition(y, 8, 0.5, seed=1)]


def test_simulator_runs_fedavg_with_local_steps_and_non_iid_shards():
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from iotcompress.simulate import make_fleet
    from iotcompress.simulate.run import simulate

    result = simulate(make_fleet("uniform-lte", devices=4), methods=("fedavg", "fedavg-iotcompress"), rounds=4,
                      local_steps=3, alpha=0.5, compute_ms=5.0, progress=False)
    dense, ours = result["methods"]["fedavg"], result["methods"]["fedavg-iotcompress"]
    n = result["config"]["numel"]
    assert dense["local_steps"] == ours["local_steps"] == 3 and result["config"]["alpha"] == 0.5
    assert dense["upload_bytes_per_device_round"] == dense["download_bytes_per_device_round"] == 4 * n
    assert ours["upload_bytes_per_device_round"] < 4 * n / 50
    assert ours["download_bytes_per_device_round"] < 4 * n / 2  # the first keyframe (f16) is one of four rounds
    # Same compute (3 steps of 5 ms at speed 0.2: 75 ms a round), far fewer bytes on LTE: faster.
    assert ours["scalability"][-1]["speedup"] > dense["scalability"][-1]["speedup"]
    assert ours["step_ms"] > 75.0


def test_layouts_from_the_wire_are_checked():
    for bad in (b"not json", b"{}", b'[["w", [3], "object"]]', b'[["w", [-1], "<f4"]]', b'[["w", [65536, 65536, 65536], "<f4"]]',
                b'[["w", [2], "<f4"], ["w", [2], "<f4"]]', b'[["w", [0], "<f4"]]', b'[["w", [2], "nope"]]'):
        with pytest.raises(ic.DecodeError):
            Layout.from_json(bad)


def test_an_update_the_server_did_not_use_goes_back_into_the_residual():
    server = FedAvgServer(LAYOUT, _x0(), density=0.1)
    c = FedAvgClient(density=0.05, audit=True)
    c.send(_train(c.receive(server.message_for(0)), 0, 1))
    delta = c.state.delta_sum.copy()
    server.confirm(0, None)  # lost on the way: never decoded, never used
    c.receive(server.message_for(0))
    np.testing.assert_allclose(c.state.compressor["residual"], delta, rtol=0, atol=1e-6)  # all of it, delayed
    assert not c.state.sent_sum.any() and c.state.last_sent is None
    # Decoded but then rejected (say, no num-examples): not used either.
    up = c.send(_train(c.state.replica, 0, 2))
    server.decode_reply(0, up)
    server.confirm(0, False)
    restored = ClientState.from_bytes(c.state.to_bytes())  # the unacknowledged update survives a restart
    c = FedAvgClient(density=0.05, audit=True, state=restored)
    c.receive(server.message_for(0))
    np.testing.assert_allclose(c.state.compressor["residual"], c.state.delta_sum, rtol=0, atol=1e-5)
    # Used: acknowledged, and kept out of the residual.
    up = c.send(_train(c.state.replica, 0, 3))
    server.decode_reply(0, up)
    server.confirm(0, True)
    kept = c.state.compressor["residual"].tobytes()
    c.receive(server.message_for(0))
    assert c.state.compressor["residual"].tobytes() == kept and c.state.last_sent is None
    np.testing.assert_allclose(c.state.sent_sum + c.state.compressor["residual"], c.state.delta_sum, rtol=0, atol=1e-5)
