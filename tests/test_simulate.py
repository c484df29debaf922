"""The fleet simulator (``iotcompress simulate``): its clock model on hand-computed cases,
fleet files, partial participation with the real compressor, and a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import iotcompress as ic
from iotcompress.simulate import budgets, comm_time_ms, device_comm_ms, load_fleet_file, make_fleet, round_time_ms

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")


# --------------------------------------------------------------------------- the clock


def test_comm_time_is_latency_plus_bytes_over_bandwidth():
    # 78 ms + 250,000 bytes * 8 / 100 Mbit/s = 78 ms + 20 ms.
    assert comm_time_ms(78.0, 100.0, 250_000) == pytest.approx(98.0)
    # The library's NetworkProfile agrees.
    assert ic.NetworkProfile.preset("intercontinental").comm_time_ms(250_000) == pytest.approx(98.0)
    # 1 s + 625 bytes * 8 / 5 kbit/s = 1 s + 1 s.
    assert comm_time_ms(1000.0, 0.005, 625) == pytest.approx(2000.0)


def test_one_device_round_is_compute_plus_tc():
    # compute 10 ms; upload 125,000 bytes and download 125,000 bytes over 78 ms / 100 Mbit/s:
    # T_c = 78 + 20 = 98 ms, the round 108 ms.
    assert round_time_ms([10.0], [78.0], [100.0], [([125_000], [125_000])]) == pytest.approx(108.0)
    # Two exchanges (low rank: P, then Q) pay the latency twice: 10 + 98 + 98.
    two = [([125_000], [125_000]), ([125_000], [125_000])]
    assert round_time_ms([10.0], [78.0], [100.0], two) == pytest.approx(206.0)
    assert device_comm_ms([78.0], [100.0], two)[0] == pytest.approx(196.0)


# Device A: 10 ms compute, 78 ms / 100 Mbit/s, 125,000 bytes each way (10 ms each way).
# Device B: 200 ms compute, 1 s / 5 kbit/s, 625 bytes each way (1 s each way).
TWO = dict(compute_ms=[10.0, 200.0], latency_ms=[78.0, 1000.0], bandwidth_mbps=[100.0, 0.005],
           exchanges=[([125_000, 625], [125_000, 625])])


def test_synchronous_round_waits_for_the_slowest_upload():
    # Uploads arrive at 10 + 39 + 10 = 59 ms (A) and 200 + 500 + 1000 = 1700 ms (B); the
    # server sends at 1700; A has it at 1700 + 49 = 1749, B at 1700 + 1500 = 3200.
    assert round_time_ms(**TWO) == pytest.approx(3200.0)
    # Without B in the round, A alone: 108 ms.
    assert round_time_ms(**TWO, participants=[True, False]) == pytest.approx(108.0)
    assert round_time_ms(**TWO, participants=[False, False]) == 0.0


def test_delayed_averaging_step():
    # Chain: max_i(c_i + up_i) = 1700; for B: 1700 + 1500 - 200 = 3000 ms to spread over D steps.
    # Link: B carries 1250 bytes per step at 5 kbit/s = 2000 ms. Compute: 200 ms.
    assert round_time_ms(**TWO, delay=1) == pytest.approx(3000.0)
    assert round_time_ms(**TWO, delay=4) == pytest.approx(2000.0)  # link-bound
    # A alone: chain 10 + 49 + 49 - 10 = 98 ms; D = 4 -> 24.5 ms > link 20 ms > compute 10 ms.
    assert round_time_ms(**TWO, delay=4, participants=[True, False]) == pytest.approx(24.5)
    with pytest.raises(ValueError, match="one exchange"):
        round_time_ms([1.0], [1.0], [1.0], [([1], [1]), ([1], [1])], delay=2)


def test_budgets_follow_the_link():
    fleet = make_fleet("mixed", devices=20, seed=3)
    b = budgets(fleet, budget_ms=200.0)
    for d, up in zip(fleet, b["up"]):
        expected = d.profile.bytes_within(200.0) // 2
        assert up == max(expected, 64)
        if expected >= 64:
            assert d.profile.comm_time_ms(2 * int(up)) <= 200.0
    # LoRa's 1 s latency does not fit 200 ms: the minimum, reported.
    lora = np.array([d.profile.name == "lora" for d in fleet])
    assert lora.any() and b["over_budget"][lora].all() and not b["over_budget"][~lora].any()
    # Default: twice each device's latency.
    b = budgets(fleet, None)
    assert all(u == max(d.profile.bytes_within(2 * d.profile.latency_ms) // 2, 64) for d, u in zip(fleet, b["up"]))


# --------------------------------------------------------------------------- fleets


def test_named_fleets():
    mixed = make_fleet("mixed", devices=64, seed=0)
    assert len(mixed) == 64
    counts = {row["link"]: row["devices"] for row in mixed.summary()}
    assert counts == {"datacenter": 7, "intercontinental": 13, "home-wifi": 19, "lte": 19, "lora": 6}
    assert [d.compute_speed for d in make_fleet("mixed", devices=64, seed=0)] == [d.compute_speed for d in mixed]
    lora = make_fleet("uniform-lora", devices=5)
    assert {d.profile.name for d in lora} == {"lora"} and lora.latency_ms.tolist() == [1000.0] * 5
    with pytest.raises(ValueError, match="unknown preset 'wifi'"):
        make_fleet("uniform-wifi")
    with pytest.raises(ValueError, match="unknown fleet"):
        make_fleet("everything")


def test_csv_fleet(tmp_path):
    path = tmp_path / "fleet.csv"
    path.write_text(
        "name,preset,latency_ms,bandwidth_mbps,compute_speed,count\n"
        "# a comment\n"
        "gateway,home-wifi,,,0.5,2\n"
        "sensor,lora,,,,3\n"
        "far,,150,200,1.5,\n"
        "slow-lte,lte,80,,,\n"
    )
    fleet = load_fleet_file(str(path))
    assert len(fleet) == 7
    assert [d.name for d in fleet] == ["gateway-0", "gateway-1", "sensor-0", "sensor-1", "sensor-2", "far", "slow-lte"]
    assert fleet[0].profile == ic.NetworkProfile.preset("home-wifi") and fleet[0].compute_speed == 0.5
    assert fleet[2].compute_speed == 0.01  # the LoRa class's default
    assert (fleet[5].profile.latency_ms, fleet[5].profile.bandwidth_mbps, fleet[5].compute_speed) == (150.0, 200.0, 1.5)
    assert (fleet[6].profile.latency_ms, fleet[6].profile.bandwidth_mbps) == (80.0, 5.0)  # lte's bandwidth
    # --devices repeats the file's devices in order.
    assert [d.name for d in make_fleet(str(path), devices=9)][7:] == ["gateway-0", "gateway-1"]


def test_toml_fleet(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[[device]]\npreset = "lte"\ncompute_speed = 0.2\ncount = 3\n\n'
        '[[device]]\nname = "far-server"\nlatency_ms = 150\nbandwidth_mbps = 200\n'
    )
    fleet = make_fleet(str(path))
    assert len(fleet) == 4 and fleet[3].name == "far-server"
    assert fleet.latency_ms.tolist() == [50.0, 50.0, 50.0, 150.0]
    assert fleet.compute_speed.tolist() == [0.2, 0.2, 0.2, 1.0]


@pytest.mark.parametrize(
    "suffix, text, message",
    [
        (".csv", "preset,compute_speed\nwifi,1\n", r"row 2: unknown preset 'wifi'"),
        (".csv", "latency_ms,compute_speed\n10,1\n", r"row 2: give a preset or both latency_ms and bandwidth_mbps"),
        (".csv", "preset,compute_speed\nlte,-1\n", r"row 2: compute_speed must be > 0"),
        (".csv", "preset,compute_speed\nlte,fast\n", r"row 2: compute_speed must be a number"),
        (".csv", "preset,speed\nlte,1\n", r"row 2: unknown field\(s\) speed"),
        (".csv", "preset,count\nlte,1.5\n", r"count must be a whole number"),
        (".csv", "preset\n", r"no devices below the header"),
        (".csv", "", r"empty fleet file"),
        (".toml", '[[device]]\npreset = "lte"\nbandwidth = 3\n', r"device 1: unknown field\(s\) bandwidth"),
        (".toml", '[[device]]\npreset = "lte"\n[[device]]\nlatency_ms = 5\n', r"device 2: give a preset or both"),
        (".toml", 'device = "lte"\n', r"no devices"),
        (".toml", "[[device]\n", r"not valid TOML"),
        (".toml", '[fleet]\npreset = "lte"\n', r"unknown table\(s\) fleet"),
    ],
)
def test_bad_fleet_files(tmp_path, suffix, text, message):
    path = tmp_path / f"fleet{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_fleet_file(str(path))


def test_fleet_file_must_exist_and_be_csv_or_toml(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        make_fleet(str(tmp_path / "missing.csv"))
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(ValueError, match="use a .csv or .toml file"):
        load_fleet_file(str(tmp_path / "f.json"))


# --------------------------------------------------------------------------- participation


def test_skipped_devices_keep_their_gradient_in_the_residual():
    from iotcompress.simulate.methods import Setup, make_method

    N, n = 4, 3000
    setup = Setup(numel=n, devices=N, shapes=[("w", (30, 100))], up_bytes=np.full(N, 400),
                  down_bytes=np.full(N, 400), seed=1)
    method = make_method("iotcompress", setup, torch.zeros(n))
    gen = torch.Generator().manual_seed(0)
    masks = [[True, True, True, True], [True, False, True, False], [False, False, True, False], [True, True, True, True]]
    for mask in map(np.array, masks):
        G = torch.randn(N, n, generator=gen)
        before = [method.residual(i) for i in range(N)]
        method.step(G, mask)
        after = [method.residual(i) for i in range(N)]
        for i in range(N):
            if not mask[i]:  # nothing sent: the whole gradient waits in the residual
                np.testing.assert_allclose(after[i], before[i] + G[i].numpy(), rtol=1e-6, atol=1e-6)
            else:  # sent: the residual holds what the 400-byte message could not carry
                assert 0 < np.linalg.norm(after[i]) < np.linalg.norm(before[i] + G[i].numpy())
        # Conservation: what the participants sent (the server's sum over N devices, times N)
        # plus every residual is every residual before plus every gradient.
        sent = method.agg.numpy() * N
        np.testing.assert_allclose(sum(after) + sent, sum(before) + G.sum(0).numpy(), rtol=1e-4, atol=1e-4)
    # Device 1 skipped two rounds and rejoined: it sent in the last round.
    assert np.linalg.norm(method.residual(1)) < np.linalg.norm(before[1] + G[1].numpy())


# --------------------------------------------------------------------------- end to end


def test_cli_end_to_end(tmp_path, capsys):
    from iotcompress.cli import main

    out = tmp_path / "sim"
    rc = main(["simulate", "--devices", "3", "--fleet", "uniform-lte", "--rounds", "4", "--delay", "2",
               "--participation", "0.67", "--compute-ms", "2.0", "--out", str(out), "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"dense", "lowrank", "iotcompress", "iotcompress-delayed"}
    for key, r in report["methods"].items():
        assert len(r["curve"]) == 5 and [s["devices"] for s in r["scalability"]] == [1, 2, 3]
        assert r["bytes_per_device_round"] > 0 and r["simulated_s"] > 0
    dense = report["methods"]["dense"]
    assert dense["upload_bytes_per_device_round"] == 4 * report["config"]["numel"]
    # Dense on LTE, 2 of 3 devices per round: 2 ms / 0.2 + 50 ms + 2 * 153,128 bytes at 5 Mbit/s.
    assert dense["step_ms"] == pytest.approx(10 + 50 + 2 * 153_128 * 8 / 5000)
    iot = report["methods"]["iotcompress"]
    assert iot["upload_bytes_per_device_round"] <= report["budgets"]["upload_bytes_median"]
    md = (out / "report.md").read_text()
    assert "iotcompress simulate --devices 3" in md and "![scalability](scalability.png)" in md
    for png in ("accuracy_vs_time.png", "scalability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report:" in capsys.readouterr().out


def test_cli_reports_bad_input(tmp_path, capsys):
    from iotcompress.cli import main

    assert main(["simulate", "--fleet", "uniform-wifi", "--out", str(tmp_path), "--quiet"]) == 2
    assert "unknown preset 'wifi'" in capsys.readouterr().err
    assert main(["simulate", "--devices", "2", "--participation", "1.5", "--compute-ms", "1",
                 "--out", str(tmp_path), "--quiet"]) == 2
    assert "participation must be in (0, 1]" in capsys.readouterr().err
    assert main(["simulate", "--devices", "2", "--quant", "int3", "--compute-ms", "1",
                 "--out", str(tmp_path), "--quiet"]) == 2
    assert "unknown quant 'int3'" in capsys.readouterr().err
