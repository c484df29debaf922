"""iotcompress.flower with Flower 1.42's real classes in process (Message, RecordDict,
ArrayRecord, Context, ClientApp, FedAvg/FedProx): the mod's round trip, failed replies,
stale replicas, state that survives a restart, link budgets, and a 10-client non-IID digits
run against plain FedAvg. Real Flower processes (simulation and deployment) are tested in
tests/flower/."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import numpy as np
import pytest

if os.environ.get("IOTCOMPRESS_REQUIRE_FLOWER") == "1":  # CI: a missing flwr is a failure, not a skip
    with warnings.catch_warnings():  # as importorskip: flwr's typer trips click's deprecations
        warnings.simplefilter("ignore", DeprecationWarning)
        import flwr  # noqa: F401
else:
    flwr = pytest.importorskip("flwr", reason="pip install 'iotcompress[flower]'")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg, FedProx  # noqa: E402

import iotcompress as ic  # noqa: E402
from iotcompress.fedavg import HEADER_LEN, ClientState, parse_envelope  # noqa: E402
from iotcompress.flower import (  # noqa: E402
    ENVELOPE_KEY, CompressedFedAvg, CompressedStrategy, compression_mod, state_path,
)

sys.path.insert(0, os.path.dirname(__file__))
from flower_grid import InProcessGrid  # noqa: E402

logging.getLogger("flwr").setLevel(logging.ERROR)
NODES = [101, 102, 103]
SHAPES = [(30, 20), (20,)]


def _init():
    rng = np.random.default_rng(0)
    return ArrayRecord([rng.normal(size=s).astype(np.float32) for s in SHAPES])


def _app(mods, seen=None, break_reply=None):
    """A ClientApp whose train step is deterministic per node and round."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg, ctx):
        if seen is not None:
            seen.append((ctx.node_id, dict(msg.content["config"]), msg.content["arrays"].to_numpy_ndarrays()))
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        r = int(msg.content["config"]["server-round"])
        rng = np.random.default_rng(1000 * r + ctx.node_id)
        new = [(a - 0.05 * rng.normal(size=a.shape)).astype(np.float32) for a in arrays]
        metrics = {"num-examples": ctx.node_id - 100, "loss": float(r)}
        if break_reply is not None:
            metrics = break_reply(ctx.node_id, metrics)
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _model(strategy):
    return ArrayRecord(list(strategy.server.layout.unflatten(strategy.server.x).values()))


def _grid(app, nodes=NODES, extra=None):
    return InProcessGrid(app, {n: dict({"partition-id": n - 100}, **(extra or {}).get(n, {})) for n in nodes})


def test_mod_round_trip_user_code_sees_plain_fedavg_messages():
    seen = []
    grid = _grid(_app([compression_mod(density=0.1)], seen))
    strategy = CompressedFedAvg(fraction_evaluate=0.0, density=0.2)
    result = strategy.start(grid=grid, initial_arrays=_init(), num_rounds=3)
    server = strategy.server
    for node, config, arrays in seen:
        assert set(config) == {"server-round"}  # the envelope is gone
        assert [a.shape for a in arrays] == SHAPES
    # Round 1: every client trains from the (f16) keyframe; later rounds from the replica.
    first = [a for n, c, a in seen if c["server-round"] == 1]
    np.testing.assert_allclose(first[0][0], _init().to_numpy_ndarrays()[0], atol=1e-2)
    last = [a for n, c, a in seen if c["server-round"] == 3]
    flat = np.concatenate([x.reshape(-1) for x in last[0]])
    assert flat.tobytes() == server.y.tobytes()  # the client trained from the server's replica, bit for bit
    # What travelled: envelopes in ConfigRecords, no ArrayRecord either way after the mod.
    for m in grid.sent:
        assert not m.content.array_records and ENVELOPE_KEY in m.content["config"]
    rounds = [e for e in strategy.stats if e["phase"] == "train"]
    assert rounds[0]["keyframes"] == 3 and rounds[1]["keyframes"] == 0
    dense = 4 * sum(int(np.prod(s)) for s in SHAPES)
    assert all(b < dense / 5 for b in rounds[2]["up_bytes"].values())
    assert result.train_metrics_clientapp[3]["iotc-failed"] == 0
    assert result.train_metrics_clientapp[3]["loss"] == 3.0
    np.testing.assert_array_equal(np.concatenate([a.reshape(-1) for a in result.arrays.to_numpy_ndarrays()]), server.x)


def test_messages_without_an_envelope_pass_through():
    app = _app([compression_mod(density=0.1)])
    grid = _grid(app)
    result = FedAvg(fraction_evaluate=0.0).start(grid=grid, initial_arrays=_init(), num_rounds=1)
    assert [a.shape for a in result.arrays.to_numpy_ndarrays()] == SHAPES


def _corrupt(reply_fn):
    """A mod outside compression_mod that damages the reply of node 102 or 103."""
    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if msg.metadata.message_type == "train" and ctx.node_id in (102, 103):
            reply_fn(ctx.node_id, reply)
        return reply
    return mod


def test_bad_replies_count_as_failed_clients_and_the_round_goes_on():
    def damage(node, reply):
        env = reply.content[ENVELOPE_KEY][ENVELOPE_KEY]
        if node == 102:  # flipped bits: the checksum catches it
            reply.content[ENVELOPE_KEY][ENVELOPE_KEY] = env[:-4] + bytes(4)
        else:  # another layout's fingerprint
            reply.content[ENVELOPE_KEY][ENVELOPE_KEY] = env[:6] + b"\x01" * 8 + env[14:]

    strategy = CompressedFedAvg(fraction_evaluate=0.0, density=0.2)
    grid = _grid(_app([_corrupt(damage), compression_mod(density=0.1, audit=True)]), nodes=[101, 102, 103, 104])
    result = strategy.start(grid=grid, initial_arrays=_init(), num_rounds=2)
    assert [e["failed"] for e in strategy.stats] == [2, 2]
    # Round 1's update of 102 was never used: round 2's envelope said so and the client took
    # it back into its residual. What counts as sent is round 2's update alone.
    st = ClientState.from_bytes(grid.contexts[102].state[ENVELOPE_KEY]["state"])
    np.testing.assert_allclose(st.sent_sum, ic.decode(st.last_sent), rtol=0, atol=1e-6)
    np.testing.assert_allclose(st.sent_sum + st.compressor["residual"], st.delta_sum, rtol=0, atol=1e-5)
    ok = ClientState.from_bytes(grid.contexts[101].state[ENVELOPE_KEY]["state"])
    assert np.abs(ok.sent_sum - ic.decode(ok.last_sent)).max() > 1e-3  # 101's round 1 was used
    assert result.train_metrics_clientapp[2]["iotc-failed"] == 2
    # The failed nodes are stale to the server: a keyframe in round 2, deltas for the others.
    sent2 = {m.metadata.dst_node_id: parse_envelope(m.content["config"][ENVELOPE_KEY]).kind for m in grid.sent[4:]}
    assert sent2 == {101: 0, 102: 1, 103: 1, 104: 0}


def test_missing_num_examples_or_an_error_reply_is_one_failure():
    def no_weight(node, metrics):
        return {k: v for k, v in metrics.items() if k != "num-examples"} if node == 102 else metrics

    def boom(node, reply):
        if node == 103:
            raise RuntimeError("device fell over")

    strategy = CompressedFedAvg(fraction_evaluate=0.0, density=0.2)
    grid = _grid(_app([_corrupt(boom), compression_mod(density=0.1)], break_reply=no_weight))
    result = strategy.start(grid=grid, initial_arrays=_init(), num_rounds=1)
    assert strategy.stats[0]["failed"] == 2
    assert result.arrays is not None  # aggregated from node 101 alone


def test_stale_client_gets_a_keyframe_and_rejoins():
    strategy = CompressedFedAvg(fraction_evaluate=0.0, density=0.2, catch_up=2)
    grid = _grid(_app([compression_mod(density=0.1)]))
    strategy.start(grid=grid, initial_arrays=_init(), num_rounds=1)
    grid.offline = {103}
    arrays = _model(strategy)
    for r in range(2, 6):  # 103 misses four rounds: more than catch_up deltas
        replies = grid.send_and_receive(strategy.configure_train(r, arrays, ConfigRecord({}), grid))
        arrays, _ = strategy.aggregate_train(r, replies)
    grid.offline = set()
    msgs = strategy.configure_train(6, arrays, ConfigRecord({}), grid)
    kinds = {m.metadata.dst_node_id: parse_envelope(m.content["config"][ENVELOPE_KEY]).kind for m in msgs}
    assert kinds == {101: 0, 102: 0, 103: 1}
    replies = grid.send_and_receive(msgs)
    strategy.aggregate_train(6, replies)
    assert strategy.stats[-1]["failed"] == 0


def test_client_restarted_without_state_fails_once_then_gets_a_keyframe():
    strategy = CompressedFedAvg(fraction_evaluate=0.0, density=0.2)
    grid = _grid(_app([compression_mod(density=0.1)]))
    strategy.start(grid=grid, initial_arrays=_init(), num_rounds=2)
    grid.contexts[102].state = RecordDict()  # a SuperNode restart loses context.state
    arrays = _model(strategy)
    for r, failed in ((3, 1), (4, 0)):
        msgs = strategy.configure_train(r, arrays, ConfigRecord({}), grid)
        arrays, _ = strategy.aggregate_train(r, grid.send_and_receive(msgs))
        assert strategy.stats[-1]["failed"] == failed
    assert strategy.stats[-1]["keyframes"] == 1


def test_state_dir_survives_a_restart_and_the_residual_sums_hold(tmp_path):
    mod = compression_mod(density=0.05, audit=True, state_dir=str(tmp_path), residual_format="f32")
    strategy = CompressedFedAvg(fraction_evaluate=0.0, density=0.2)
    grid = _grid(_app([mod]))
    strategy.start(grid=grid, initial_arrays=_init(), num_rounds=3)
    path = state_path(str(tmp_path), grid.contexts[102])
    before = ClientState.load(path)
    assert before.version == strategy.server.version and before.rounds == 3
    # context.state holds only small scalars when the state lives in a file.
    assert len(grid.contexts[102].state[ENVELOPE_KEY]) == 2
    for node in NODES:  # every SuperNode restarts: fresh contexts
        grid.contexts[node].state = RecordDict()
    arrays = _model(strategy)
    msgs = strategy.configure_train(4, arrays, ConfigRecord({}), grid)
    strategy.aggregate_train(4, grid.send_and_receive(msgs))
    assert strategy.stats[-1]["keyframes"] == 0 and strategy.stats[-1]["failed"] == 0  # resumed from the files
    after = ClientState.load(path)
    assert after.rounds == 4
    np.testing.assert_allclose(after.sent_sum + after.compressor["residual"], after.delta_sum, rtol=0, atol=1e-5)
    assert np.abs(after.compressor["residual"]).max() > 0


def test_state_in_context_state_uses_the_compact_format():
    sizes = {}
    for fmt in ("f32", "f16"):
        grid = _grid(_app([compression_mod(density=0.05, residual_format=fmt)]))
        CompressedFedAvg(fraction_evaluate=0.0).start(grid=grid, initial_arrays=_init(), num_rounds=1)
        sizes[fmt] = len(grid.contexts[101].state[ENVELOPE_KEY]["state"])
    n = sum(int(np.prod(s)) for s in SHAPES)
    assert sizes["f32"] - sizes["f16"] == 2 * n  # 2 bytes per residual element saved; no velocity


def test_lora_client_stays_within_its_budget_while_wifi_sends_more():
    budget_ms = 1500  # LoRa (1 s, 5 kbit/s): 312 bytes; home Wi-Fi: megabytes
    lora = ic.NetworkProfile.preset("lora").bytes_within(budget_ms)
    extra = {101: {"iotcompress-link": "lora"}, 102: {"iotcompress-link": "home-wifi"}, 103: {"iotcompress-link": "home-wifi"}}
    grid = _grid(_app([compression_mod(density=0.5, budget_ms=budget_ms)]), extra=extra)
    strategy = CompressedFedAvg(fraction_evaluate=0.0, density=0.2)
    strategy.start(grid=grid, initial_arrays=_init(), num_rounds=4)
    for e in strategy.stats:
        assert e["up_bytes"][101] <= lora
        assert min(e["up_bytes"][102], e["up_bytes"][103]) > lora  # the others are not held to it
    assert strategy.stats[-1]["failed"] == 0


def test_wrapper_around_fedprox():
    grid = _grid(_app([compression_mod(density=0.1)]))
    strategy = CompressedStrategy(FedProx(proximal_mu=0.1, fraction_evaluate=0.0), density=0.2)
    result = strategy.start(grid=grid, initial_arrays=_init(), num_rounds=2)
    # FedProx aggregates like FedAvg: x + weighted mean of the deltas.
    plain = CompressedFedAvg(fraction_evaluate=0.0, density=0.2)
    grid2 = _grid(_app([compression_mod(density=0.1)]))
    ref = plain.start(grid=grid2, initial_arrays=_init(), num_rounds=2)
    for a, b in zip(result.arrays.to_numpy_ndarrays(), ref.arrays.to_numpy_ndarrays()):
        np.testing.assert_allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------- 10 clients, digits


def _digits_run(compressed: bool, rounds: int = 30, clients: int = 10):
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    from iotcompress.fedavg import dirichlet_partition

    X, Y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(X, Y, test_size=450, stratify=Y, random_state=0)
    parts = dirichlet_partition(ytr, clients, 0.5, seed=0)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))

    app = ClientApp(mods=[compression_mod(density=0.03, quant="sign")] if compressed else [])

    @app.train()
    def train(msg, ctx):
        m = model()
        m.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        pid = ctx.node_config["partition-id"]
        x, y = torch.from_numpy(xtr[parts[pid]]), torch.from_numpy(ytr[parts[pid]])
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 * int(msg.content["config"]["server-round"]) + pid)
        for _ in range(2):  # E = 2 local epochs
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), 32):
                b = perm[i:i + 32]
                opt.zero_grad()
                nn.functional.cross_entropy(m(x[b]), y[b]).backward()
                opt.step()
        return Message(RecordDict({"arrays": ArrayRecord(m.state_dict()),
                                   "metrics": MetricRecord({"num-examples": len(y)})}), reply_to=msg)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grid = InProcessGrid(app, {200 + i: {"partition-id": i} for i in range(clients)})
        strategy = CompressedFedAvg(fraction_evaluate=0.0, density=0.06, quant="int8") if compressed else FedAvg(fraction_evaluate=0.0)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model().state_dict()), num_rounds=rounds)
    finally:
        torch.set_num_threads(threads)
    m = model()
    m.load_state_dict(result.arrays.to_torch_state_dict())
    with torch.no_grad():
        acc = float((m(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    numel = sum(p.numel() for p in m.parameters())
    return acc, numel, strategy, grid


@pytest.mark.slow
def test_ten_clients_non_iid_digits_compressed_matches_fedavg_with_far_fewer_bytes():
    plain_acc, numel, _, _ = _digits_run(False)
    acc, _, strategy, _ = _digits_run(True)
    train = [e for e in strategy.stats if e["phase"] == "train"]
    up = np.mean([np.mean(list(e["up_bytes"].values())) for e in train])
    down = np.mean([np.mean(list(e["down_bytes"].values())) for e in train])  # keyframes included
    dense = 4 * numel  # plain FedAvg's float32 model, each way
    print(f"\nplain FedAvg {plain_acc:.3f}, compressed {acc:.3f}; per client per round: up {up:,.0f} B "
          f"({dense / up:,.0f}x), down {down:,.0f} B ({dense / down:,.1f}x), dense {dense:,} B")
    assert plain_acc > 0.9
    assert acc >= plain_acc - 0.01
    assert dense / up >= 100
    assert dense / down >= 20


def test_flower_and_the_simulator_run_the_same_compressed_fedavg():
    """The two drivers of iotcompress.fedavg agree bit for bit: the Flower mod + strategy and
    the simulator's fedavg-iotcompress method, fed the same local training, reach the same
    global model."""
    torch = pytest.importorskip("torch")
    from iotcompress.simulate.methods import Setup, make_method

    # Partition ids 0, 1, 2 seed the clients as the simulator seeds its devices 0, 1, 2.
    grid = InProcessGrid(_app([compression_mod(density=0.1)]), {101 + i: {"partition-id": i} for i in range(3)})
    strategy = CompressedFedAvg(fraction_evaluate=0.0, density=0.2)
    result = strategy.start(grid=grid, initial_arrays=_init(), num_rounds=3)

    n = sum(int(np.prod(s)) for s in SHAPES)
    setup = Setup(numel=n, devices=3, shapes=[("0", SHAPES[0]), ("1", SHAPES[1])], quant="int8",
                  density=0.1, down_density=0.2)
    x0 = np.concatenate([a.reshape(-1) for a in _init().to_numpy_ndarrays()])
    method = make_method("fedavg-iotcompress", setup, torch.from_numpy(x0), weights=np.array([1.0, 2.0, 3.0]))
    mask = np.ones(3, bool)
    split = int(np.prod(SHAPES[0]))
    for r in range(1, 4):
        W = method.begin(mask).clone()
        for i in range(3):  # the same "training" as _app's for node 101 + i
            rng = np.random.default_rng(1000 * r + 101 + i)
            parts = [W[i, :split].numpy().reshape(SHAPES[0]), W[i, split:].numpy()]
            new = [(a - 0.05 * rng.normal(size=a.shape)).astype(np.float32) for a in parts]
            W[i] = torch.from_numpy(np.concatenate([a.reshape(-1) for a in new]))
        method.finish(W, mask)
    flower_x = np.concatenate([a.reshape(-1) for a in result.arrays.to_numpy_ndarrays()])
    assert flower_x.tobytes() == method.server.numpy().tobytes()
    assert strategy.server.y.tobytes() == method.fed_server.y.tobytes()


def test_federated_evaluation_goes_compressed_too():
    app = _app([compression_mod(density=0.1)])

    @app.evaluate()
    def evaluate(msg, ctx):
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        assert [a.shape for a in arrays] == SHAPES and set(msg.content["config"]) == {"server-round"}
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "norm": float(np.abs(arrays[0]).sum())})}),
                       reply_to=msg)

    grid = _grid(app)
    strategy = CompressedFedAvg(density=0.2, min_evaluate_nodes=3)
    result = strategy.start(grid=grid, initial_arrays=_init(), num_rounds=2)
    evals = [e for e in strategy.stats if e["phase"] == "evaluate"]
    assert len(evals) == 2 and all(e["keyframes"] == 0 for e in evals)
    # Each evaluation moves the replicas to the new model; the next train round then only
    # brings them the (empty) rest: a header and no delta.
    train2 = [e for e in strategy.stats if e["phase"] == "train"][1]
    assert max(train2["down_bytes"].values()) == HEADER_LEN + 4 + 2  # header, acknowledgement, count 0
    assert result.evaluate_metrics_clientapp[2]["norm"] > 0


def test_damaged_state_file_starts_over_with_a_keyframe(tmp_path):
    mod = compression_mod(density=0.1, state_dir=str(tmp_path))
    strategy = CompressedFedAvg(fraction_evaluate=0.0, density=0.2, catch_up=1)
    grid = _grid(_app([mod]))
    strategy.start(grid=grid, initial_arrays=_init(), num_rounds=2)
    path = state_path(str(tmp_path), grid.contexts[103])
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    for node in NODES:
        grid.contexts[node].state = RecordDict()
    msgs = strategy.configure_train(3, _model(strategy), ConfigRecord({}), grid)
    strategy.aggregate_train(3, grid.send_and_receive(msgs))
    assert strategy.stats[-1]["failed"] == 1  # 103 could not apply the delta ...
    msgs = strategy.configure_train(4, _model(strategy), ConfigRecord({}), grid)
    kinds = {m.metadata.dst_node_id: parse_envelope(m.content["config"][ENVELOPE_KEY]).kind for m in msgs}
    assert kinds == {101: 0, 102: 0, 103: 1}  # ... and gets a keyframe
    strategy.aggregate_train(4, grid.send_and_receive(msgs))
    assert strategy.stats[-1]["failed"] == 0
    assert ClientState.load(path).version == strategy.server.version
