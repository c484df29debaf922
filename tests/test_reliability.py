"""Issue 12: nothing lost on any path. Every failing call leaves the state as it was, an
undelivered message can be put back (``restore``), loaded state is validated before it is
taken, and a compressor shared between threads serialises its calls."""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import iotcompress as ic
from wire_spec import crc32c


def randn(n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def state_of(c: ic.Compressor) -> tuple:
    s = c.state_dict()
    return (s["residual"].tobytes(), s["velocity"].tobytes(), s["step"], s["threshold"], s["bits_per_entry"])


OPTIONS = [
    dict(density=0.1),
    dict(density=0.1, exact=True, quant="int8", momentum=0.9),
    dict(threshold=0.5, quant="int4", momentum=0.9, nesterov=True),
    dict(density=0.05, adaptive=True, quant="sign"),
    dict(target_bytes=120, quant="ternary", momentum=0.5),
    dict(quant="f16"),
    dict(density=0.2, quant="qsgd:7", seed=3),
]


# --- restore -------------------------------------------------------------------------------


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_restore_is_accumulate_bit_for_bit(opts, low_memory):
    n = 400
    a = ic.Compressor(n, low_memory=low_memory, **opts)
    b = ic.Compressor(n, low_memory=not low_memory, **opts)
    for step in range(4):
        g1, g2 = randn(n, 2 * step), randn(n, 2 * step + 1)
        a.compress(g1)
        assert a.can_restore
        a.restore()
        assert not a.can_restore
        b.accumulate(g1)
        assert state_of(a) == state_of(b)
        assert a.compress(g2) == b.compress(g2)
        assert state_of(a) == state_of(b)


@pytest.mark.parametrize("opts", [o for o in OPTIONS if not o.get("momentum")], ids=str)
def test_compress_restore_compress_is_one_compress_of_the_sum(opts):
    """Plain error feedback (with momentum, see the accumulate test above)."""
    n = 300
    a, b = ic.Compressor(n, **opts), ic.Compressor(n, **opts)
    g1, g2 = randn(n, 1), randn(n, 2)
    a.compress(g1)
    a.restore()
    assert a.compress(g2) == b.compress(g1 + g2)  # 0 + g1 rounds to g1 exactly


def test_restore_without_a_message_raises_and_changes_nothing():
    c = ic.Compressor(100, density=0.1, momentum=0.9)
    with pytest.raises(ic.CompressError, match="nothing to restore"):
        c.restore()
    c.compress(randn(100, 1))
    c.accumulate(randn(100, 2))
    before = state_of(c)
    with pytest.raises(ic.CompressError, match="nothing to restore"):
        c.restore()
    assert state_of(c) == before


def test_restore_message_adds_it_back_and_refuses_bad_ones():
    n = 500
    c = ic.Compressor(n, density=0.05, quant="int8")
    g = randn(n, 5)
    msgs = [c.compress(g) for _ in range(3)]
    total_sent = sum(ic.decode(m, n) for m in msgs)
    r = c.residual
    c.restore(msgs[0])  # an earlier message, not the last
    np.testing.assert_allclose(c.residual, r + ic.decode(msgs[0], n), rtol=1e-6, atol=0)
    assert not c.can_restore
    before = state_of(c)
    bad = bytearray(msgs[1])
    bad[-1] ^= 0xFF
    with pytest.raises(ic.DecodeError):
        c.restore(bytes(bad))
    other = ic.Compressor(n + 1).compress(np.ones(n + 1, np.float32))
    with pytest.raises(ic.DecodeError):
        c.restore(other)
    assert state_of(c) == before
    # Nothing lost: residual + everything delivered == everything fed.
    delivered = total_sent - ic.decode(msgs[0], n)
    np.testing.assert_allclose(c.residual + delivered, 3 * g, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    opts=st.sampled_from(OPTIONS),
    low_memory=st.booleans(),
    ops=st.lists(st.sampled_from(["compress", "accumulate", "restore", "nan", "huge", "load"]), min_size=1, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_interleaving_keeps_the_state_whole(opts, low_memory, ops, seed):
    """State unchanged after every error, and (plain error feedback) the invariant
    residual + delivered == fed after any interleaving of compress/accumulate/restore/load."""
    n = 200
    c = ic.Compressor(n, low_memory=low_memory, **opts)
    fed = np.zeros(n)
    delivered = np.zeros(n)
    last = None
    for i, op in enumerate(ops):
        g = randn(n, seed + i)
        before = state_of(c)
        if op == "compress":
            last = c.compress(g)
            fed += g
            delivered += ic.decode(last, n)
        elif op == "accumulate":
            c.accumulate(g)
            fed += g
            last = None
        elif op == "restore":
            if last is None:
                with pytest.raises(ic.CompressError):
                    c.restore()
                assert state_of(c) == before
            else:
                c.restore()
                delivered -= ic.decode(last, n)
                last = None
        elif op in ("nan", "huge"):
            g[i % n] = np.nan if op == "nan" else np.finfo(np.float32).max
            try:
                c.compress(g) if i % 2 else c.accumulate(g)
            except ic.CompressError:
                assert state_of(c) == before
            else:
                assert op == "huge"  # it fitted (the state was small): start afresh
                c = ic.Compressor(n, low_memory=low_memory, **opts)
                fed[:], delivered[:], last = 0, 0, None
        elif op == "load":
            other = ic.Compressor(n, low_memory=not low_memory, **opts)
            other.load_state_dict(c.state_dict())
            c, last = other, None
        assert np.isfinite(c.residual).all()
    if not opts.get("momentum"):
        np.testing.assert_allclose(c.residual + delivered, fed, rtol=1e-4, atol=1e-3)


# --- all or nothing on overflow ---------------------------------------------------------------


@pytest.mark.parametrize("low_memory", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_finite_gradient_that_overflows_changes_nothing(low_memory, momentum):
    """Below 2**23 elements (or low_memory=True) the state used to be updated in place
    before the overflow was seen: an inf stayed in the residual and every later call failed."""
    n = 1000
    c = ic.Compressor(n, density=0.01, low_memory=low_memory, momentum=momentum)
    g = randn(n, 1)
    g[10] = 1e38
    c.accumulate(g)  # residual[10] ~ 1e38 (velocity too)
    before = state_of(c)
    g = randn(n, 2)
    g[10] = 3e38
    for call in (c.compress, c.accumulate):
        with pytest.raises(ic.CompressError, match="overflow"):
            call(g)
        assert state_of(c) == before
    g[10] = -1e38  # and it goes on
    c.compress(g)
    assert np.isfinite(c.residual).all()


def test_load_state_dict_with_a_bad_step_keeps_the_selection():
    """step=-1 raised OverflowError after switching the selection."""
    c = ic.Compressor(100, density=0.1)
    donor = ic.Compressor(100, density=0.5)
    donor.compress(randn(100, 1))
    state = donor.state_dict()
    state["step"] = -1
    with pytest.raises(ValueError, match="step"):
        c.load_state_dict(state)
    assert c.options["density"] == 0.1
    c.compress(randn(100, 2))
    assert c.last_nnz == 10


def _bad_states():
    def arr(value):
        return lambda s: s.update(residual=value)

    n = 100
    nan = np.zeros(n, np.float32)
    nan[3] = np.nan
    inf = np.zeros(n, np.float32)
    inf[3] = np.inf
    return [
        (arr(nan), ValueError, "residual"),
        (arr(inf), ValueError, "residual"),
        (arr(np.full(n, 1e300)), TypeError, "residual"),  # float64 that overflows float32
        (arr(np.zeros(n)), TypeError, "residual"),  # float64: no silent cast
        (arr(["0"] * n), TypeError, "residual"),
        (arr(np.zeros(n, np.complex64)), TypeError, "residual"),
        (lambda s: s.update(velocity=np.zeros(n, np.float16)), TypeError, "velocity"),
        (lambda s: s.update(step="3"), TypeError, "step"),
        (lambda s: s.update(step=2**64), ValueError, "step"),
        (lambda s: s.update(step=1.5), TypeError, "step"),
        (lambda s: s.update(threshold=float("inf")), ValueError, "threshold"),
        (lambda s: s.update(threshold=float("nan")), ValueError, "threshold"),
        (lambda s: s.update(threshold=-1.0), ValueError, "threshold"),
        (lambda s: s.update(threshold=1e39), ValueError, "threshold"),
        (lambda s: s.update(threshold=1j), TypeError, "threshold"),
        (lambda s: s.update(bits_per_entry="x"), TypeError, "bits_per_entry"),
        (lambda s: s.pop("velocity"), KeyError, "velocity"),
        (lambda s: s["options"].update(density=2.0), ValueError, "options"),
    ]


@pytest.mark.parametrize("change, error, key", _bad_states())
def test_load_state_dict_validates_everything_first(change, error, key):
    opts = dict(density=0.05, adaptive=True, quant="int8", momentum=0.9)
    c, twin = ic.Compressor(100, **opts), ic.Compressor(100, **opts)
    for i in range(3):
        assert c.compress(randn(100, i)) == twin.compress(randn(100, i))
    donor = ic.Compressor(100, **dict(opts, density=0.2))
    donor.compress(randn(100, 9))
    state = donor.state_dict()
    change(state)
    with pytest.raises(error, match=key):
        c.load_state_dict(state)
    assert state_of(c) == state_of(twin)
    assert c.options == twin.options
    assert c.compress(randn(100, 7)) == twin.compress(randn(100, 7))


def test_an_adaptive_threshold_of_inf_is_refused():
    c = ic.Compressor(100, density=0.1, adaptive=True)
    c.compress(randn(100, 1))
    state = c.state_dict()
    state["threshold"] = float("inf")
    with pytest.raises(ValueError, match="threshold"):
        c.load_state_dict(state)


@pytest.mark.parametrize(
    "scale, error", [(float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError), (1e39, ValueError), ("2", TypeError), (None, TypeError), (True, TypeError)]
)
def test_decode_add_refuses_bad_scales(scale, error):
    msg = ic.Compressor(10).compress(np.ones(10, np.float32))
    out = np.zeros(10, np.float32)
    with pytest.raises(error, match="scale"):
        ic.decode_add(msg, out, scale=scale)
    assert not out.any()


# --- inspect verifies as decode does -----------------------------------------------------------


def test_inspect_rejects_what_decode_rejects():
    """inspect used to check framing and CRC only: a bad code with a valid CRC passed."""
    n = 64
    msg = ic.Compressor(n, density=0.25, quant="f32").compress(randn(n, 3))
    rejected = 0
    rng = np.random.default_rng(0)
    for _ in range(3000):
        body = bytearray(msg[:-4])
        body[rng.integers(4, len(body))] ^= 1 << rng.integers(0, 8)
        mutant = bytes(body) + struct.pack("<I", crc32c(bytes(body)))
        try:
            ic.decode(mutant, max_numel=1 << 20)
        except ic.DecodeError:
            rejected += 1
            with pytest.raises(ic.DecodeError):
                ic.inspect(mutant)
        else:
            ic.inspect(mutant)
    assert rejected > 100


def test_inspect_refuses_an_infinite_value():
    n = 8
    msg = ic.Compressor(n, quant="f32").compress(np.ones(n, np.float32))
    body = bytearray(msg[:-4])
    body[-4:] = struct.pack("<f", float("inf"))  # the last value
    mutant = bytes(body) + struct.pack("<I", crc32c(bytes(body)))
    with pytest.raises(ic.DecodeError, match="not finite"):
        ic.decode(mutant)
    with pytest.raises(ic.DecodeError, match="not finite"):
        ic.inspect(mutant)


# --- threads -----------------------------------------------------------------------------------


def _run_threads(*targets, seconds: float = 1.0):
    stop = threading.Event()
    errors = []

    def wrap(f):
        def run():
            try:
                while not stop.is_set():
                    f()
            except BaseException as e:  # reported below
                errors.append(e)
                stop.set()

        return run

    threads = [threading.Thread(target=wrap(f)) for f in targets]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("low_memory", [True, False])
def test_property_reads_wait_for_a_running_compress(low_memory):
    """Reading residual/step/residual_norm while another thread compresses raised
    RuntimeError: Already mutably borrowed."""
    n = 200_000
    c = ic.Compressor(n, density=0.01, momentum=0.9, low_memory=low_memory)
    g = randn(n, 1)
    steps = []

    def compress():
        c.compress(g)

    def read():
        step = c.step
        assert c.residual.shape == (n,) and c.velocity.shape == (n,)
        assert c.residual_norm >= 0 and c.last_nnz >= 0
        s = c.state_dict()
        assert s["step"] >= step
        steps.append(step)

    _run_threads(compress, read, read)
    assert steps and c.step >= max(steps)


def test_calls_from_threads_take_turns():
    n = 50_000
    c = ic.Compressor(n, density=0.01, quant="int8")
    twin = ic.Compressor(n, density=0.01, quant="int8")
    grads = [randn(n, i) for i in range(4)]
    threads = [threading.Thread(target=lambda g=g: [c.accumulate(g) for _ in range(20)]) for g in grads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g in grads:
        for _ in range(20):
            twin.accumulate(g)
    # Same sums in another order: equal up to rounding, and nothing lost.
    np.testing.assert_allclose(c.residual, twin.residual, rtol=1e-4, atol=1e-3)


def test_concurrent_decode_add_into_one_buffer_is_serialised_or_refused():
    """Two threads decode_add-ing into one buffer got TypeError: already borrowed."""
    n = 1_000_000
    msg = ic.Compressor(n).compress(np.ones(n, np.float32))
    out = np.zeros(n, np.float32)
    applied = []
    busy = []

    def add():
        try:
            ic.decode_add(msg, out)
            applied.append(1)
        except ic.BusyError:
            busy.append(1)

    _run_threads(add, add, add, seconds=1.0)
    assert applied
    np.testing.assert_array_equal(out, np.full(n, len(applied), np.float32))


@pytest.mark.parametrize("low_memory", [True, False])
def test_a_gradient_changed_mid_call_never_poisons_the_state(low_memory):
    """The gradient was checked, then read again with the GIL released: a NaN written in
    between reached the residual."""
    n = 400_000
    c = ic.Compressor(n, density=0.01, low_memory=low_memory)
    g = randn(n, 1)
    outcomes = {"ok": 0, "refused": 0}

    def compress():
        try:
            c.compress(g)
            outcomes["ok"] += 1
        except ic.CompressError:
            outcomes["refused"] += 1
        assert not np.isnan(c.residual_norm)

    def poison():
        g[n // 2] = np.nan
        g[n // 2] = 1.0

    _run_threads(compress, poison, seconds=1.5)
    assert np.isfinite(c.residual).all()
    assert outcomes["ok"] + outcomes["refused"] > 0


def test_restorable_off_records_nothing_and_revert_still_works():
    g = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    c = ic.Compressor(1000, quant="f16")
    assert c.restorable
    c.restorable = False
    c.double_buffered = True
    before = c.state_dict()
    c.compress(g)
    assert not c.can_restore and c.can_revert
    with pytest.raises(ic.CompressError):
        c.restore()
    c.revert()
    after = c.state_dict()
    assert all(np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in before)
    c.restorable = True
    c.compress(g)
    assert c.can_restore
    with pytest.raises(TypeError):
        c.restorable = 1
