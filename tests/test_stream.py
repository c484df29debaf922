"""The streaming encoder through Python: messages decode like any other, chunking does not
change the bytes, the batch threshold compressor sends the same entries, error feedback
keeps what is not sent, misuse raises with the reason."""

from __future__ import annotations

import numpy as np
import pytest

import iotcompress as ic


def randn(n: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def cuts(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    points = np.sort(rng.integers(0, n + 1, size=rng.integers(0, 12)))
    return list(np.diff(np.concatenate([[0], points, [n]])).astype(int))


@pytest.mark.parametrize("quant", ic.STREAM_QUANTS)
@pytest.mark.parametrize("state", ic.STATE_FORMATS)
def test_chunking_does_not_change_the_bytes_and_messages_decode(quant, state):
    n = 777
    a = ic.StreamingCompressor(n, threshold=1.0, target_count=40, quant=quant, state=state, momentum=0.9)
    b = ic.StreamingCompressor(n, threshold=1.0, target_count=40, quant=quant, state=state, momentum=0.9)
    for step in range(5):
        g = randn(n, step)
        one = a.compress(g)
        many = b.compress(g, chunks=cuts(n, step))
        assert one == many
        assert a.state_bytes == b.state_bytes
        info = ic.inspect(one)
        assert info["numel"] == n and info["index"] == "rice" and info["quant"] == quant
        assert np.count_nonzero(ic.decode(one)) <= info["nnz"]


def test_f32_stream_equals_the_batch_threshold_compressor():
    n = 2000
    s = ic.StreamingCompressor(n, threshold=1.5, momentum=0.9)
    c = ic.Compressor(n, threshold=1.5, momentum=0.9)
    for step in range(4):
        g = randn(n, step)
        got, want = ic.decode(s.compress(g, chunks=[500, 1000, 500])), ic.decode(c.compress(g))
        assert got.tobytes() == want.tobytes()
        assert s.residual.tobytes() == c.residual.tobytes()
        assert s.velocity.tobytes() == c.velocity.tobytes()


@pytest.mark.parametrize("state", ic.STATE_FORMATS)
def test_error_feedback_keeps_what_is_not_sent(state):
    n = 1000
    c = ic.StreamingCompressor(n, threshold=0.8, quant="int8", state=state)
    g = randn(n, 3)
    total = np.zeros(n, np.float64)
    for step in range(60):
        msg = c.compress(g if step == 0 else np.zeros(n, np.float32))
        total += ic.decode(msg)
    # Sent + left in the residual = the gradient, up to the compact state's rounding.
    tol = {"f32": 1e-6, "f16": 2e-3, "bf16": 1e-2, "int8": 1e-2}[state]
    np.testing.assert_allclose(total + c.residual, g, atol=tol)
    assert np.abs(c.residual).max() < 0.8 + tol


def test_capacity_bounds_every_message():
    n = 5000
    c = ic.StreamingCompressor(n, threshold=0.5, quant="int8", capacity=200)
    for step in range(10):
        msg = c.compress(randn(n, step))
        assert len(msg) <= 200
        assert c.last["nnz"] < c.last["selected"]
        ic.decode(msg)


def test_misuse_raises_with_the_reason():
    c = ic.StreamingCompressor(10, threshold=1.0)
    with pytest.raises(ic.CompressError, match="already finished"):
        c.feed(np.zeros(3, np.float32))
    c.begin()
    c.feed(np.zeros(6, np.float32))
    with pytest.raises(ic.CompressError, match="length"):
        c.feed(np.zeros(5, np.float32))
    with pytest.raises(ic.CompressError, match="before all elements"):
        c.finish()
    bad = np.zeros(4, np.float32)
    bad[2] = np.nan
    with pytest.raises(ic.CompressError, match="NaN"):
        c.feed(bad)
    assert c.fed == 6
    c.feed(np.ones(4, np.float32))
    assert len(c.finish()) > 0
    with pytest.raises(TypeError):
        c.feed(np.zeros(3))
    for kwargs in (
        dict(threshold=0.0),
        dict(threshold=float("nan")),
        dict(threshold=1.0, quant="sign"),
        dict(threshold=1.0, state="f64"),
        dict(threshold=1.0, target_count=5, target_bytes=100),
        dict(threshold=1.0, target_count=0),
        dict(threshold=1.0, momentum=1.0),
        dict(threshold=1.0, nesterov=True),
    ):
        with pytest.raises(ValueError):
            ic.StreamingCompressor(10, **kwargs)
    with pytest.raises(ValueError, match="adding up"):
        c.compress(np.zeros(10, np.float32), chunks=[4, 4])
    with pytest.raises(ic.CompressError, match="too small"):
        ic.StreamingCompressor(10, threshold=1.0, capacity=5).begin()


def test_state_len_matches_the_c_macro():
    # IOTCOMPRESS_STREAM_STATE_LEN: 4, 2, 2 or 1 + 4/32 bytes an element, twice with momentum.
    for n in (0, 1, 31, 32, 33, 1000):
        for state, per in (("f32", 4 * n), ("f16", 2 * n), ("bf16", 2 * n), ("int8", n + 4 * ((n + 31) // 32))):
            assert ic.StreamingCompressor(n, threshold=1.0, state=state).state_len == per
            assert ic.StreamingCompressor(n, threshold=1.0, state=state, momentum=0.5).state_len == 2 * per


def test_compact_state_costs_no_accuracy_on_digits():
    """A short run of tests/compact_state_accuracy.py (docs/mcu.md has the full table): the
    int8 residual trains the 2410-parameter MLP as well as the f32 one, within noise."""
    pytest.importorskip("sklearn")
    import compact_state_accuracy as exp

    f32 = exp.train(0, 8, "f32", 24)["accuracy"]
    int8 = exp.train(0, 8, "int8", 24)["accuracy"]
    assert f32 > 0.9 and int8 > 0.9
    assert abs(f32 - int8) < 0.02


@pytest.mark.parametrize("quant", ic.STREAM_QUANTS)
def test_the_independent_spec_decoder_reads_streamed_messages(quant):
    """tests/wire_spec.py, written from docs/wire-format.md alone, decodes streamed messages to
    the library's values (they are ordinary, if non-canonical, wire format v1)."""
    import wire_spec

    n = 3000
    c = ic.StreamingCompressor(n, threshold=1.0, target_bytes=400, quant=quant, state="int8", momentum=0.5)
    for step in range(4):
        msg = c.compress(randn(n, step), chunks=cuts(n, step))
        spec = wire_spec.decode(msg)
        dense = np.zeros(n, np.float32)
        dense[np.asarray(spec["positions"], dtype=np.int64)] = spec["values"]
        assert spec["index"] == "rice" and spec["nnz"] == ic.inspect(msg)["nnz"]
        assert dense.tobytes() == ic.decode(msg).tobytes()
