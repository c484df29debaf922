"""Links and per-device budgets: NetworkProfile arithmetic, and compressors whose messages keep
every device's T_c = latency + bytes / bandwidth within its budget."""

import numpy as np
import pytest

import iotcompress as ic
from iotcompress import NetworkProfile


def test_hand_computed_comm_times():
    p = NetworkProfile.preset("intercontinental")
    assert (p.latency_ms, p.bandwidth_mbps) == (78.0, 100.0)
    # 78 ms + 1 MB at 100 Mbit/s = 78 + 80 ms.
    assert p.comm_time_ms(1_000_000) == 158.0
    assert p.bytes_within(100) == 275_000  # 22 ms at 12.5 MB/s
    assert p.bytes_within(78) == 0
    lora = NetworkProfile.preset("lora")
    assert lora.comm_time_ms(625) == 2000.0  # 1 s + 625 B at 5 kbit/s
    assert lora.bytes_within(2000) == 625
    custom = NetworkProfile(latency_ms=2.5, bandwidth_mbps=0.008)  # 1 byte per ms
    assert custom.comm_time_ms(10) == 12.5
    assert custom.bytes_within(12.5) == 10
    assert custom.bytes_within(12.499) == 9


def test_bytes_within_is_the_largest_that_fits():
    rng = np.random.default_rng(5)
    for _ in range(500):
        p = NetworkProfile(float(rng.uniform(0, 2000)), float(rng.uniform(0.001, 10_000)))
        budget = float(rng.uniform(0, 5000))
        b = p.bytes_within(budget)
        if b:
            assert p.comm_time_ms(b) <= budget
        assert p.comm_time_ms(b + 1) > budget or b == 0 and p.latency_ms > budget


def test_presets_and_bad_input():
    assert set(NetworkProfile.PRESETS) == {"datacenter", "home-wifi", "lte", "lora", "intercontinental"}
    assert NetworkProfile.preset("lte") == NetworkProfile(50, 5)
    with pytest.raises(ValueError, match="unknown network preset 'dialup'"):
        NetworkProfile.preset("dialup")
    with pytest.raises(ValueError, match="bandwidth_mbps"):
        NetworkProfile(10, 0)
    with pytest.raises(ValueError, match="latency_ms"):
        NetworkProfile(-1, 10)
    with pytest.raises(ValueError, match="latency_ms"):
        NetworkProfile(float("nan"), 10)
    with pytest.raises(TypeError):
        NetworkProfile("10", 10)
    with pytest.raises(ValueError, match="nbytes"):
        NetworkProfile(1, 1).comm_time_ms(-1)
    lora = NetworkProfile.preset("lora")
    with pytest.raises(ValueError, match="latency alone is 1000 ms"):
        ic.Compressor(100, network=lora, budget_ms=900)
    with pytest.raises(ValueError, match="needs budget_ms"):
        ic.Compressor(100, network=lora)
    with pytest.raises(ValueError, match="needs network"):
        ic.Compressor(100, budget_ms=900)
    with pytest.raises(ValueError, match="at most one of"):
        ic.Compressor(100, network=lora, budget_ms=3000, density=0.1)
    with pytest.raises(TypeError, match="NetworkProfile"):
        ic.Compressor(100, network="lora", budget_ms=3000)


# A synthetic fleet: (link, step budget in ms, parameters).
FLEET = [
    ("datacenter", 0.5, 200_000),
    ("home-wifi", 16.0, 200_000),
    ("home-wifi", 40.0, 50_000),
    ("lte", 52.0, 200_000),
    ("lte", 80.0, 30_000),
    ("intercontinental", 79.0, 200_000),
    ("intercontinental", 90.0, 3_000),
    ("lora", 1300.0, 200_000),
    ("lora", 2000.0, 50_000),
    ("lora", 1100.0, 700),
]


@pytest.mark.parametrize("quant", ["int8", "f16", "int4"])
def test_every_device_stays_within_its_budget(quant):
    rng = np.random.default_rng(11)
    for name, budget_ms, n in FLEET:
        link = NetworkProfile.preset(name)
        c = ic.Compressor(n, network=link, budget_ms=budget_ms, quant=quant, momentum=0.9)
        budget = link.bytes_within(budget_ms)
        sizes = []
        for step in range(25):
            # A gradient whose scale jumps (x1000 at step 12): the threshold is far too low then.
            scale = 1000.0 if step == 12 else 1.0
            g = (rng.standard_normal(n) * scale).astype(np.float32)
            msg = c.compress(g)
            assert link.comm_time_ms(len(msg)) <= budget_ms, (name, budget_ms, n, step, len(msg))
            sizes.append(len(msg))
        # Adapting from the measured sizes: the late messages use most of the budget, unless
        # the whole tensor fits.
        dense = ic.Compressor(n, quant=quant).max_message_len
        late = np.mean(sizes[-5:])
        assert late >= 0.6 * min(budget, dense * 0.9), (name, budget_ms, n, sizes)


def test_worse_link_higher_threshold():
    """One gradient stream, the same time budget, three links: the worse the link, the fewer
    bytes and the higher the adapted Wt."""
    n = 200_000
    grads = [np.random.default_rng(s).standard_normal(n).astype(np.float32) for s in range(30)]
    links = {
        "wifi": NetworkProfile.preset("home-wifi"),  # 45 ms left at 20 Mbit/s: 112,500 B
        "lte": NetworkProfile.preset("lte"),  # 10 ms left at 5 Mbit/s: 6,250 B
        "slow lte": NetworkProfile(50, 1),  # 10 ms left at 1 Mbit/s: 1,250 B
    }
    thresholds, sizes = {}, {}
    for name, link in links.items():
        c = ic.Compressor(n, network=link, budget_ms=60.0, quant="int8")
        sizes[name] = [len(c.compress(g)) for g in grads][-1]
        thresholds[name] = c.threshold
    assert thresholds["slow lte"] > thresholds["lte"] > thresholds["wifi"]
    assert sizes["slow lte"] <= 1_250 < sizes["lte"] <= 6_250 < sizes["wifi"] <= 112_500


def test_set_selection_changes_the_link_and_keeps_the_residual():
    n = 20_000
    rng = np.random.default_rng(3)
    c = ic.Compressor(n, network=NetworkProfile.preset("home-wifi"), budget_ms=20, quant="int8")
    total = np.zeros(n, np.float32)
    grads = np.zeros(n, np.float64)
    for step in range(20):
        if step == 10:
            c.set_selection(network=NetworkProfile.preset("lora"), budget_ms=1500)
        g = rng.standard_normal(n).astype(np.float32)
        grads += g
        msg = c.compress(g)
        if step >= 10:
            assert len(msg) <= 312
        ic.decode_add(msg, total)
    assert c.options["target_bytes"] == 312
    np.testing.assert_allclose(total + c.residual, grads, atol=1e-3)


def test_entries_held_back_by_the_budget_raise_the_threshold():
    """When far more entries cross Wt than the budget carries, the budget sends the largest
    that fit, and the controller sees every entry that crossed: Wt rises by its full step."""
    n = 50_000
    rng = np.random.default_rng(8)
    c = ic.Compressor(n, target_bytes=2_000, quant="int8")
    for _ in range(5):
        c.compress(rng.standard_normal(n).astype(np.float32))
    wt = c.threshold
    msg = c.compress(1000 * rng.standard_normal(n).astype(np.float32))  # everything crosses Wt
    assert len(msg) <= 2_000
    assert c.threshold == pytest.approx(1.4 * wt, rel=1e-6)
