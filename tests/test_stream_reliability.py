"""Issue 12 for the streaming encoder: all or nothing across chunks, no half-open message
abandoned silently, restore() / restore(msg), accumulate, state_dict / load_state_dict that
check first, pickling, threads. Each example of the issue is a test here; the property tests
run random chunkings with injected errors."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import iotcompress as ic

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def randn(n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def make(n: int = 300, **kw) -> ic.StreamingCompressor:
    opts = dict(threshold=0.8, target_count=20, quant="int8", state="int8", momentum=0.9)
    opts.update(kw)
    return ic.StreamingCompressor(n, **opts)


def snapshot(c: ic.StreamingCompressor):
    """Everything a call may change, the undo record's availability included."""
    return (c.state_bytes, c.threshold, c.messages, c.last, c.fed, c.can_restore)


def warmed(c: ic.StreamingCompressor, steps: int = 3) -> ic.StreamingCompressor:
    for s in range(steps):
        c.compress(randn(c.numel, 100 + s))
    return c


def test_nan_in_a_later_chunk_leaves_all_state_as_before():
    # The example: the earlier chunks had been applied and entries taken out.
    c, twin = warmed(make()), warmed(make())
    g = randn(300, 7)
    g[250] = np.nan
    before = snapshot(c)
    with pytest.raises(ic.CompressError, match="NaN"):
        c.compress(g, chunks=[100, 100, 100])
    assert snapshot(c) == before
    # Nothing half-open is left for the next call to abandon: it is the twin's next message.
    good = randn(300, 8)
    assert c.compress(good, chunks=[50, 250]) == twin.compress(good)
    assert c.state_bytes == twin.state_bytes


def test_overflow_in_a_later_chunk_leaves_all_state_as_before():
    c = make(state="f32", quant="f32", momentum=0.0, threshold=3.3e38, target_count=None)
    c.compress(np.full(300, 1.5e38, np.float32))  # nothing sent: the residual near the top
    assert c.residual.max() == np.float32(1.5e38)
    before = snapshot(c)
    g = randn(300, 1)
    g[299] = 3e38
    with pytest.raises(ic.CompressError):
        c.compress(g, chunks=[299, 1])
    assert snapshot(c) == before


def test_an_error_mid_message_keeps_it_open_and_begin_refuses_to_abandon_it():
    c = warmed(make())
    before = snapshot(c)
    c.begin()
    c.feed(randn(120, 1))
    bad = randn(180, 2)
    bad[5] = np.inf
    with pytest.raises(ic.CompressError):
        c.feed(bad)
    assert c.fed == 120
    with pytest.raises(ic.CompressError, match="open"):
        c.begin()
    with pytest.raises(ic.CompressError, match="open"):
        c.compress(randn(300, 3))
    assert c.fed == 120, "the refusals changed nothing"
    assert c.abort() is True
    assert snapshot(c) == before, "abort puts back the state from before begin"
    assert c.abort() is False


def test_restore_puts_the_last_message_back_as_an_accumulate():
    for state in ic.STATE_FORMATS:
        a, b = warmed(make(state=state)), warmed(make(state=state))
        g1, g2 = randn(300, 11, 2.0), randn(300, 12)
        msg = a.compress(g1, chunks=[7, 293])
        assert a.can_restore and ic.decode(msg).any()
        a.restore()
        b.accumulate(g1)
        assert snapshot(a) == snapshot(b), state
        assert a.compress(g2) == b.compress(g2), state
        with pytest.raises(ic.CompressError):
            b.restore(); b.restore()  # once per message


def test_compress_restore_compress_is_one_compress_of_the_sum():
    a, b = make(quant="f32", state="f32", momentum=0.0), make(quant="f32", state="f32", momentum=0.0)
    g1, g2 = randn(300, 1, 2.0), randn(300, 2, 2.0)
    a.compress(g1)
    a.restore()
    assert a.compress(g2) == b.compress(g1 + g2)


def test_restore_of_a_message_adds_it_back_and_a_bad_one_changes_nothing():
    c = warmed(make(state="f32", quant="f16", momentum=0.0))
    before_res = c.residual
    msg = c.compress(randn(300, 5))
    after = snapshot(c)
    for bad in (msg[:-1], msg[:5] + bytes([msg[5] ^ 0x40]) + msg[6:], ic.StreamingCompressor(10, threshold=1).compress(np.ones(10, np.float32))):
        with pytest.raises((ic.DecodeError, ic.CompressError)):
            c.restore(bad)
        assert snapshot(c) == after
    c.restore(msg)
    want = before_res + randn(300, 5)
    np.testing.assert_allclose(c.residual, want, rtol=1e-6, atol=1e-6)
    assert not c.can_restore


def test_state_dict_round_trips_and_pickles():
    c = warmed(make())
    d = make()
    d.load_state_dict(c.state_dict())
    assert snapshot(d)[:3] == snapshot(c)[:3]  # `last` is information, not state
    p = pickle.loads(pickle.dumps(c))
    g = randn(300, 9)
    assert c.compress(g) == d.compress(g) == p.compress(g)


@pytest.mark.parametrize("key, value, error, match", [
    ("state", b"\0" * 3, ValueError, "state"),
    ("state", "abc", TypeError, "state"),
    ("messages", -1, ValueError, "messages"),
    ("messages", 1.5, TypeError, "messages"),
    ("threshold", float("inf"), ValueError, "threshold"),
    ("threshold", 1j, TypeError, "threshold"),
    ("threshold", "0.5", TypeError, "threshold"),
    ("bits_per_entry", float("nan"), ValueError, "bits_per_entry"),
    ("last_max", -1.0, ValueError, "last_max"),
    ("last_selected", 301, ValueError, "last_selected"),
    ("numel", 299, ValueError, "numel"),
    ("options", {}, ValueError, "options"),
])
def test_load_state_dict_checks_everything_first_and_names_the_key(key, value, error, match):
    c = warmed(make())
    saved = warmed(make(), 5).state_dict()
    saved[key] = value
    before = snapshot(c)
    with pytest.raises(error, match=match):
        c.load_state_dict(saved)
    assert snapshot(c) == before


def test_load_state_dict_refuses_a_state_buffer_that_holds_nan():
    c = make(state="f32")
    saved = c.state_dict()
    raw = bytearray(saved["state"])
    raw[4:8] = np.array([np.nan], np.float32).tobytes()
    saved["state"] = bytes(raw)
    before = snapshot(c)
    with pytest.raises(ValueError, match="NaN"):
        c.load_state_dict(saved)
    assert snapshot(c) == before


def test_threads_take_turns_and_reads_are_consistent():
    c = make(3000)
    errors: list = []
    stop = threading.Event()

    def read():
        while not stop.is_set():
            try:
                c.residual, c.messages, c.state_bytes, c.threshold  # noqa: B018
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    workers = [threading.Thread(target=lambda s=s: [c.compress(randn(3000, s * 100 + i)) for i in range(10)]) for s in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors and c.messages == 20


chunkings = st.lists(st.integers(0, 120), max_size=6)


@PROPERTY
@given(state=st.sampled_from(ic.STATE_FORMATS), quant=st.sampled_from(ic.STREAM_QUANTS),
       momentum=st.sampled_from([0.0, 0.9]), seed=st.integers(0, 2**16),
       ops=st.lists(st.tuples(st.sampled_from(["compress", "poison", "restore", "accumulate", "feed-fail"]),
                              chunkings, st.integers(0, 299), st.booleans()), min_size=1, max_size=8))
def test_any_error_leaves_the_state_unchanged_and_restore_loses_nothing(state, quant, momentum, seed, ops):
    n = 300
    c = make(n, state=state, quant=quant, momentum=momentum)
    for k, (op, cuts, at, nan) in enumerate(ops):
        g = randn(n, seed + k)
        cuts = [x for x in np.cumsum(cuts) if x < n]
        lengths = list(np.diff([0, *cuts, n]).astype(int))
        before = snapshot(c)
        # After a restored or unsent 3e38 the state itself holds near-max values, and the next
        # r + g (with momentum, r + 0.9·u + g) really overflows: then the call must refuse and
        # change nothing. With ordinary state every call below must succeed.
        huge = max(np.abs(c.residual).max(), np.abs(c.velocity).max()) > 1e37
        try:
            _apply(c, op, g, lengths, at, nan, before)
        except ic.CompressError:
            if not huge:
                raise
            c.abort()  # a feed that failed leaves its message open
            assert snapshot(c)[:5] == before[:5]
        assert np.isfinite(c.residual).all() and np.isfinite(c.velocity).all()


def _apply(c, op, g, lengths, at, nan, before) -> None:
    """One step of the property test above; raises what the library raises."""
    n = c.numel
    if op == "compress":
        twin = _twin(c, before)
        assert c.compress(g, chunks=lengths) == twin.compress(g)
    elif op == "poison":
        g[at] = np.nan if nan else np.float32(3e38)
        try:
            c.compress(g, chunks=lengths)
        except ic.CompressError:
            assert snapshot(c) == before
        else:
            assert not nan  # 3e38 fitted: a valid message
    elif op == "restore":
        if c.can_restore:
            c.restore()
            assert not c.can_restore
        else:
            with pytest.raises(ic.CompressError):
                c.restore()
            assert snapshot(c) == before
    elif op == "accumulate":
        c.accumulate(g)
    else:  # a feed fails mid-message: the message stays open until aborted
        first = lengths[0] if lengths[0] < n else n // 2
        c.begin()
        c.feed(g[:first])
        g[max(at, first)] = np.nan
        with pytest.raises(ic.CompressError):
            c.feed(g[first:])
        assert c.fed == first
        c.abort()
        assert snapshot(c)[:5] == before[:5]


def _twin(c: ic.StreamingCompressor, snap) -> ic.StreamingCompressor:
    """A fresh compressor holding ``c``'s state (through state_dict): the reference."""
    t = ic.StreamingCompressor(c.numel, **c.options)
    t.load_state_dict(c.state_dict())
    assert t.state_bytes == snap[0]
    return t
