"""The example app in Flower's Simulation Engine (Ray), 10 non-IID clients, 30 rounds:
compressed FedAvg against plain FedAvg, both run by ``flwr run`` on a simulation SuperLink."""

import pytest

from harness import Flower

pytestmark = [pytest.mark.flower, pytest.mark.slow]

ROUNDS, CLIENTS = 30, 10


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    flower = Flower(tmp_path_factory.mktemp("flower-sim"))
    try:
        flower.superlink(simulation=True)
        conn = flower.write_connections(simulation_nodes=CLIENTS)
        out = {}
        for compress in (False, True):
            path = flower.dir / f"report-{compress}.json"
            flower.run(conn, {"num-server-rounds": ROUNDS, "compress": compress, "min-nodes": CLIENTS,
                              "report-path": str(path)})
            out[compress] = flower.wait_report(path, timeout=240)
        yield out
    finally:
        flower.close()


def _per_client_round(report, direction):
    values = [b for row in report["rounds"] for b in row[direction].values()]
    assert len(values) == ROUNDS * CLIENTS, f"{direction}: {len(values)} client-rounds"
    return sum(values) / len(values)


@pytest.mark.timeout(420)
def test_compressed_matches_plain_accuracy_with_far_fewer_bytes(reports):
    plain, comp = reports[False], reports[True]
    for r in (plain, comp):
        assert len(r["rounds"]) == ROUNDS and all(not row["errors"] for row in r["rounds"])
        assert all(len(row["up"]) == CLIENTS for row in r["rounds"])
    # Plain FedAvg learns (so the comparison means something), and compression costs < 1 point.
    assert plain["final_accuracy"] > 0.9, plain["accuracy"]
    assert comp["final_accuracy"] >= plain["final_accuracy"] - 0.01, (comp["accuracy"], plain["accuracy"])
    up_ratio = _per_client_round(plain, "up") / _per_client_round(comp, "up")
    down_ratio = _per_client_round(plain, "down") / _per_client_round(comp, "down")
    assert up_ratio >= 100, up_ratio
    assert down_ratio >= 20, down_ratio
    # Round 1 sends every client a keyframe (it has no replica), every later round a delta.
    assert set(comp["rounds"][0]["down_kind"].values()) == {"keyframe"}
    assert all(set(row["down_kind"].values()) == {"delta"} for row in comp["rounds"][1:])
    # The strategy's own accounting agrees with what the Grid saw leave and arrive.
    train_stats = [s for s in comp["strategy_stats"] if s["phase"] == "train"]
    for row, stats in zip(comp["rounds"], train_stats):
        assert {int(k): v for k, v in row["up"].items()} == {int(k): v for k, v in stats["up_bytes"].items()}
        assert stats["failed"] == 0
