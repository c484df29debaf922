"""Property tests (hypothesis) of the compressor's contract: the error-feedback invariant,
DGC momentum correction with factor masking, which entries each selection sends, the
quantisers' error bounds and unbiasedness, and a decoder that rejects every malformed
message with DecodeError.

The set of sent entries is read from the message's index block (``sent_positions``, checked
against the independent spec decoder in ``wire_spec.py``), never guessed from non-zero
decoded values. Every float operation of the core is an IEEE basic operation in a fixed
order, so the numpy models below reproduce ``v`` and the velocity bit for bit.

All hypothesis tests are derandomized: the suite is deterministic.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import iotcompress as ic
from iotcompress import _iotcompress as _ext
from wire_spec import SpecError, crc32c
from wire_spec import varint as spec_varint
from wire_spec import decode as spec_decode

F32 = np.float32
EPS = float(np.finfo(np.float32).eps)  # 2**-23

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

QUANT_NAMES = ["f32", "f16", "bf16", "int8", "int4", "sign", "ternary", "qsgd", "qsgd:3"]
SELECTIONS = ["dense", "threshold", "sampled", "exact", "adaptive", "target_bytes"]


# --------------------------------------------------------------------------- helpers


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def sent_positions(msg: bytes) -> np.ndarray:
    """The positions a message carries, read from its index block (dense, bitmap or Rice)."""
    info = ic.inspect(msg)
    n, nnz, start, length = info["numel"], info["nnz"], info["header_bytes"], info["index_bytes"]
    block = np.frombuffer(msg, np.uint8, count=length, offset=start)
    if info["index"] == "dense":
        return np.arange(n)
    stream = np.unpackbits(block, bitorder="little")
    if info["index"] == "bitmap":
        return np.flatnonzero(stream[:n])
    k, s, p, nxt, out = info["rice_k"], stream.tobytes(), 0, 0, []
    for _ in range(nnz):
        z = s.index(b"\x00", p)  # unary quotient: ones up to the first zero
        q, p = z - p, z + 1
        r = sum(s[p + j] << j for j in range(k))
        p += k
        nxt += (q << k) | r
        out.append(nxt)
        nxt += 1
    return np.array(out, dtype=np.int64)


def sent_mask(msg: bytes, n: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[sent_positions(msg)] = True
    return mask


def accumulate(r, u, g, momentum, nesterov):
    """The documented update, in float32: returns (v, u_new)."""
    m = F32(momentum)
    if momentum == 0.0:
        return r + g, u
    if nesterov:
        u_new = m * (u + g)
        return (r + u_new) + g, u_new
    u_new = m * u + g
    return r + u_new, u_new


def selection_options(draw, selection: str, n: int) -> dict:
    density = draw(st.one_of(st.sampled_from([0.001, 0.01, 0.05, 0.1, 0.3, 1.0]), st.floats(0.001, 1.0)))
    if selection == "dense":
        return {}
    if selection == "threshold":
        return {"threshold": draw(st.one_of(st.just(0.0), st.floats(0.0, 3.0)))}
    if selection == "sampled":
        return {"density": density}
    if selection == "exact":
        return {"density": density, "exact": True}
    if selection == "adaptive":
        return {"density": density, "adaptive": True}
    if selection == "target_bytes":
        return {"target_bytes": draw(st.integers(16, 8 * n + 64))}
    raise AssertionError(selection)


SMALL_VALUES = st.one_of(
    st.floats(-1e4, 1e4, width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-3]),
)


def seeded_gradient(seed: int, kind: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        g = rng.standard_normal(n)
    elif kind == "heavy":
        g = np.clip(rng.standard_cauchy(n), -1e4, 1e4)
    elif kind == "ties":
        g = rng.integers(-3, 4, n).astype(np.float64)
    elif kind == "sparse":
        g = rng.standard_normal(n) * (rng.random(n) < 0.05)
    else:  # "scaled": a wide dynamic range
        g = rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 3, n)
    return g.astype(np.float32)


@st.composite
def gradient_steps(draw, max_steps: int = 3, small_n: int = 40, big_n: int = 4000):
    """1..max_steps gradients of one length: small ones with hypothesis-chosen values, or
    larger seeded ones (normal, heavy-tailed, many ties, mostly zero, wide range)."""
    steps = draw(st.integers(1, max_steps))
    if draw(st.booleans()):
        n = draw(st.integers(1, small_n))
        return [draw(arrays(np.float32, n, elements=SMALL_VALUES)) for _ in range(steps)]
    n = draw(st.integers(200, big_n))
    kind = draw(st.sampled_from(["normal", "heavy", "ties", "sparse", "scaled"]))
    seed = draw(st.integers(0, 2**32 - 1))
    return [seeded_gradient(seed + i, kind, n) for i in range(steps)]


def check_step(c: ic.Compressor, g: np.ndarray, quant: str, momentum: float = 0.0, nesterov: bool = False):
    """One compress with every per-step invariant checked; returns (v, sent mask, msg)."""
    n = g.shape[0]
    r_old, u_old, step = c.residual, c.velocity, c.step
    v, u_new = accumulate(r_old, u_old, g, momentum, nesterov)
    msg = c.compress(g)
    r_new, u_after = c.residual, c.velocity
    d = ic.decode(msg, numel=n)
    info = ic.inspect(msg)
    sent = sent_mask(msg, n)

    assert c.step == step + 1
    assert info["numel"] == n and info["nbytes"] == len(msg) <= c.max_message_len
    assert info["quant"] == quant.split(":")[0]
    assert info["nnz"] == c.last_nnz == int(sent.sum())
    # Not sent: nothing decoded, the residual keeps v bit for bit.
    assert not d[~sent].any()
    np.testing.assert_array_equal(bits(r_new[~sent]), bits(v[~sent]))
    # Sent: decoded + r_new == v (exactly for f32, within one f32 rounding otherwise).
    if quant == "f32":
        np.testing.assert_array_equal(d[sent], v[sent])
        assert not r_new[sent].any()
    else:
        dv, rv, vv = (x[sent].astype(np.float64) for x in (d, r_new, v))
        err = np.abs(dv + rv - vv)
        bound = 2 * EPS * (np.abs(vv) + np.abs(dv))
        assert (err <= bound).all(), (err - bound).max()
    # Factor masking: velocity zeroed where sent, u_new elsewhere; no velocity without momentum.
    if momentum:
        assert not u_after[sent].any()
        np.testing.assert_array_equal(bits(u_after[~sent]), bits(u_new[~sent]))
    else:
        assert not u_after.any()
    return v, sent, msg


# ------------------------------------------------------------ error feedback invariant


@pytest.mark.parametrize("quant", QUANT_NAMES)
@pytest.mark.parametrize("selection", SELECTIONS)
@settings(max_examples=12, **SETTINGS)
@given(data=st.data(), grads=gradient_steps())
def test_error_feedback_invariant(selection, quant, data, grads):
    n = grads[0].shape[0]
    opts = selection_options(data.draw, selection, n)
    c = ic.Compressor(n, quant=quant, seed=data.draw(st.integers(0, 2**64 - 1)), **opts)
    for g in grads:
        check_step(c, g, quant)


@pytest.mark.parametrize("nesterov", [False, True], ids=["vanilla", "nesterov"])
@pytest.mark.parametrize("selection", SELECTIONS)
@settings(max_examples=12, **SETTINGS)
@given(data=st.data(), grads=gradient_steps(max_steps=4))
def test_momentum_correction_and_factor_masking(selection, nesterov, data, grads):
    n = grads[0].shape[0]
    opts = selection_options(data.draw, selection, n)
    quant = data.draw(st.sampled_from(QUANT_NAMES))
    momentum = data.draw(st.one_of(st.sampled_from([0.9, 0.5, 0.99]), st.floats(0.001, 0.999)))
    c = ic.Compressor(n, quant=quant, momentum=momentum, nesterov=nesterov, **opts)
    for g in grads:
        check_step(c, g, quant, momentum, nesterov)


# ------------------------------------------------------------------------ selections


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
@settings(max_examples=40, **SETTINGS)
@given(data=st.data(), grads=gradient_steps())
def test_threshold_sends_exactly_the_entries_at_or_above_it(momentum, data, grads):
    n = grads[0].shape[0]
    wt = data.draw(st.one_of(st.just(0.0), st.floats(0.0, 3.0), st.sampled_from([0.5, 1.0, 2.0])))
    quant = data.draw(st.sampled_from(QUANT_NAMES))
    c = ic.Compressor(n, threshold=wt, quant=quant, momentum=momentum)
    assert c.threshold == wt
    for g in grads:
        v, sent, _ = check_step(c, g, quant, momentum)
        np.testing.assert_array_equal(sent, np.abs(v) >= F32(wt))


def top_k_reference(v: np.ndarray, k: int) -> np.ndarray:
    """The k largest magnitudes, ties to the lower index, zeros never sent."""
    mag = np.abs(v)
    order = np.lexsort((np.arange(v.shape[0]), -mag))
    chosen = order[:k]
    mask = np.zeros(v.shape[0], bool)
    mask[chosen[mag[chosen] > 0]] = True
    return mask


def expected_k(density, n: int) -> int:
    """ceil(density * n) in exact arithmetic on the decimal the caller wrote."""
    return max(1, min(n, math.ceil(Fraction(str(density)) * n)))


@st.composite
def density_for(draw, n: int):
    """``(density, k)`` where k is unambiguous: density = k/n (rounded to a float), or a short
    decimal whose exact product with n is rounded up."""
    if draw(st.booleans()):
        k = draw(st.integers(1, n))
        return k / n, k
    density = draw(st.sampled_from([0.001, 0.002, 0.01, 0.02, 0.05, 0.1, 0.125, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0]))
    return density, expected_k(density, n)


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), grads=gradient_steps())
def test_exact_top_k_sends_ceil_density_n_largest(data, grads):
    n = grads[0].shape[0]
    density, k = data.draw(density_for(n))
    quant = data.draw(st.sampled_from(QUANT_NAMES))
    momentum = data.draw(st.sampled_from([0.0, 0.9]))
    c = ic.Compressor(n, density=density, exact=True, quant=quant, momentum=momentum)
    for g in grads:
        v, sent, _ = check_step(c, g, quant, momentum)
        assert sent.sum() == min(k, np.count_nonzero(v))
        np.testing.assert_array_equal(sent, top_k_reference(v, k))


@pytest.mark.parametrize(
    "density, n, k",
    [(0.001, 20_000, 20), (0.1, 32, 4), (0.5, 3, 2), (1e-9, 10, 1), (1.0, 10, 10), (0.01, 1000, 10), (0.3, 10, 3)],
)
def test_exact_top_k_count_on_decimal_densities(density, n, k):
    g = seeded_gradient(7, "normal", n)
    c = ic.Compressor(n, density=density, exact=True)
    c.compress(g)
    assert c.last_nnz == k


def test_exact_top_k_count_for_large_n_with_small_fraction():
    n = 2_000_001
    g = seeded_gradient(0, "normal", n)
    c = ic.Compressor(n, density=0.001, exact=True)
    c.compress(g)
    assert c.last_nnz == math.ceil(0.001 * n) == 2001


def _dgc_samples(n: int, k: int) -> bool:
    """Whether the core samples (select.rs SamplePlan) rather than falling back to exact."""
    sample = max(n // 1000, math.ceil(64 / (k / n)), 256)
    cap = min(2 * k + 64, n)
    return not (2 * sample >= n or sample + 2 * cap >= n)


@st.composite
def sampled_regime(draw):
    """(gradients, density, k), mostly where the core really samples (DGC), sometimes anywhere."""
    if draw(st.integers(0, 3)) == 0:
        grads = draw(gradient_steps(big_n=6000))
        density, k = draw(density_for(grads[0].shape[0]))
        return grads, density, k
    n = draw(st.integers(2500, 12000))
    k = draw(st.integers(130, n // 5))
    assume(_dgc_samples(n, k))
    kind = draw(st.sampled_from(["normal", "heavy", "ties", "sparse", "scaled"]))
    seed = draw(st.integers(0, 2**32 - 1))
    return [seeded_gradient(seed + i, kind, n) for i in range(draw(st.integers(1, 3)))], k / n, k


@settings(max_examples=80, **SETTINGS)
@given(data=st.data(), case=sampled_regime())
def test_sampled_top_k_never_sends_more_than_k(data, case):
    grads, density, k = case
    n = grads[0].shape[0]
    quant = data.draw(st.sampled_from(QUANT_NAMES))
    c = ic.Compressor(n, density=density, quant=quant, seed=data.draw(st.integers(0, 2**32)))
    event("sampled plan" if _dgc_samples(n, k) else "exact fallback (sample would cover the tensor)")
    for g in grads:
        v, sent, _ = check_step(c, g, quant)
        nnz = int(sent.sum())
        assert nnz <= k
        assert (np.abs(v[sent]) > 0).all(), "a zero was sent"
        # Candidates are everything at or above an estimated threshold (then cut to the top
        # k): unless cut off at exactly k, no unsent entry is larger than a sent one.
        if 0 < nnz < k:
            assert np.abs(v[sent]).min() >= np.abs(v[~sent]).max(initial=0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n, density", [(20_000, 0.01), (100_000, 0.001), (50_000, 0.05)])
def test_sampled_top_k_on_gaussian_gradients_sends_the_top_between_0_8k_and_k(seed, n, density):
    c = ic.Compressor(n, density=density, seed=seed)
    k = expected_k(density, n)
    for step in range(3):
        g = seeded_gradient(100 * seed + step, "normal", n)
        v = c.residual + g
        msg = c.compress(g)
        sent = sent_mask(msg, n)
        assert 0.8 * k <= sent.sum() <= k
        assert np.abs(v[sent]).min() >= np.abs(v[~sent]).max()


@pytest.mark.parametrize("target", ["density", "bytes"])
@settings(max_examples=40, **SETTINGS)
@given(data=st.data(), grads=gradient_steps(max_steps=4))
def test_adaptive_threshold_is_a_threshold(target, data, grads):
    n = grads[0].shape[0]
    if target == "density":
        opts = {"density": data.draw(density_for(n))[0], "adaptive": True}
    else:
        opts = {"target_bytes": data.draw(st.integers(16, 4 * n + 64))}
    quant = data.draw(st.sampled_from(QUANT_NAMES))
    c = ic.Compressor(n, quant=quant, **opts)
    # A byte target is a budget: at most `cap` entries, whatever their positions.
    cap = n
    if target == "bytes":
        fits = lambda k: _ext.message_len_bound(n, k, quant) <= opts["target_bytes"]  # noqa: E731
        cap = max((k for k in range(n + 1) if fits(k)), default=0)
    assert c.threshold == 0.0
    for g in grads:
        wt = c.threshold
        v, sent, msg = check_step(c, g, quant)
        if target == "bytes":
            assert len(msg) <= max(opts["target_bytes"], _ext.message_len_bound(n, 0, quant))
            assert sent.sum() <= cap
        if wt > 0:
            # Calibrated: plain threshold mode (the largest `cap` of those over budget), then
            # Wt moves by at most x0.7 .. x1.4.
            above = np.abs(v) >= F32(wt)
            if above.sum() <= cap:
                np.testing.assert_array_equal(sent, above)
            else:
                assert sent.sum() == cap and not (sent & ~above).any()
                if 0 < cap:
                    assert np.abs(v[sent]).min() >= np.abs(v[above & ~sent]).max()
            assert 0.7 * wt * (1 - 1e-6) <= c.threshold <= 1.4 * wt * (1 + 1e-6)
        elif sent.any():
            # Calibration step: Wt becomes the smallest magnitude that was sent.
            assert c.threshold == np.abs(v[sent]).min()
        else:
            assert c.threshold == 0.0


# ---------------------------------------------------------------------- quantisers


def dense_roundtrip(v: np.ndarray, quant: str, seed: int = 0):
    msg = ic.Compressor(v.shape[0], quant=quant, seed=seed).compress(v)
    return ic.decode(msg, numel=v.shape[0]), ic.inspect(msg)


def bf16_rne(v: np.ndarray) -> np.ndarray:
    b = v.view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


@st.composite
def dense_vectors(draw, lo: float = -1e4, hi: float = 1e4):
    if draw(st.booleans()):
        n = draw(st.integers(1, 64))
        return draw(arrays(np.float32, n, elements=st.one_of(st.floats(lo, hi, width=32), st.sampled_from([0.0, -0.0]))))
    n = draw(st.integers(100, 3000))
    kind = draw(st.sampled_from(["normal", "heavy", "ties", "sparse", "scaled"]))
    return seeded_gradient(draw(st.integers(0, 2**32 - 1)), kind, n)


@pytest.mark.parametrize("quant", QUANT_NAMES)
@settings(max_examples=50, **SETTINGS)
@given(v=dense_vectors(), seed=st.integers(0, 2**64 - 1))
def test_quantiser_error_bounds(quant, v, seed):
    d, info = dense_roundtrip(v, quant, seed)
    v64, d64 = v.astype(np.float64), d.astype(np.float64)
    err = np.abs(v64 - d64)
    a = np.abs(v64)
    vmax = float(np.abs(v).max())
    # The f32 arithmetic of the scale and the codes, plus the absolute precision of f32
    # subnormals (2**-149 per operation), where a scale or code unit is that small.
    slack = 8 * EPS * (a + np.abs(d64)) + 4 * 2.0**-149
    scale = float(info["scale"])
    assert info["nnz"] == v.shape[0] and info["index"] == "dense"
    if quant == "f32":
        np.testing.assert_array_equal(d, v)
    elif quant == "f16":
        assert (err <= a * 2.0**-11 + 2.0**-25).all()
        np.testing.assert_array_equal(d, v.astype(np.float16).astype(np.float32))  # IEEE RNE
    elif quant == "bf16":
        normal = a >= 2.0**-126
        assert (err[normal] <= a[normal] * 2.0**-8).all()
        np.testing.assert_array_equal(d, bf16_rne(v))
    elif quant in ("int8", "int4"):
        levels = 127 if quant == "int8" else 7
        assert F32(scale) == F32(vmax) / F32(levels)
        assert (err <= scale / 2 + slack).all()
        if scale > 0:
            codes = d64 / scale
            assert np.allclose(codes, np.round(codes)) and (np.abs(codes) <= levels + 1e-3).all()
    elif quant == "sign":
        assert math.isclose(scale, float(np.abs(v64).mean()), rel_tol=1e-6)
        assert (err <= np.maximum(a, scale)).all()
        assert (np.abs(d) == F32(scale)).all()
        # The sign of the accumulated v = 0 + g (so -0.0 becomes +0.0 and goes out as +scale).
        np.testing.assert_array_equal(np.signbit(d), np.signbit(F32(0) + v))
    elif quant == "ternary":
        assert F32(scale) == F32(vmax)
        assert (err <= scale).all()
        assert np.isin(d, [0.0, F32(scale), -F32(scale)]).all()
        assert (d * v >= 0).all(), "a ternary code has the wrong sign"
    else:
        s = int(quant.split(":")[1]) if ":" in quant else 15
        assert F32(scale) == F32(vmax) and info["levels"] == s
        # The documented bound is ||v||_2/s; the max-norm scale makes it max|v|/s.
        assert (err <= scale / s + slack).all()
        assert (err <= float(np.linalg.norm(v64)) / s + slack).all()
        assert (d * v >= 0).all(), "a QSGD code has the wrong sign"


@pytest.mark.parametrize("quant", ["qsgd", "qsgd:4", "qsgd:1", "ternary"])
@settings(max_examples=6, **SETTINGS)
@given(
    v=arrays(
        np.float32,
        st.integers(2, 12),
        elements=st.floats(-100, 100, width=32).filter(lambda x: abs(x) > 1e-3),
    )
)
def test_stochastic_quantisers_are_unbiased(quant, v):
    trials = 1500
    total = np.zeros_like(v, dtype=np.float64)
    for seed in range(trials):
        d, info = dense_roundtrip(v, quant, seed)
        total += d
    mean = total / trials
    vmax = float(np.abs(v).max())
    s = 1 if quant == "ternary" else (int(quant.split(":")[1]) if ":" in quant else 15)
    # Each decoded entry lies on one of two adjacent levels vmax/s apart: its standard
    # deviation is at most vmax/(2s). Six standard errors, plus float rounding.
    se = vmax / (2 * s) / math.sqrt(trials)
    assert (np.abs(mean - v) <= 6 * se + 1e-5 * vmax).all(), np.abs(mean - v).max() / se


def test_stochastic_quantisers_actually_randomise():
    """Guards the unbiasedness test: a value between levels must take both neighbours."""
    v = np.array([1.0, 0.37, -0.62, 0.5], np.float32)
    for quant in ("qsgd", "ternary"):
        seen = {tuple(dense_roundtrip(v, quant, seed)[0][1:]) for seed in range(50)}
        assert len(seen) > 1


def test_stochastic_rounding_is_reproducible_per_seed():
    v = seeded_gradient(3, "normal", 500)
    a = ic.Compressor(500, quant="qsgd", seed=11)
    b = ic.Compressor(500, quant="qsgd", seed=11)
    assert [a.compress(v) for _ in range(3)] == [b.compress(v) for _ in range(3)]
    assert ic.Compressor(500, quant="qsgd", seed=12).compress(v) != ic.Compressor(500, quant="qsgd", seed=11).compress(v)


# ------------------------------------------------------------------------- decoder


def _expect_decode_error(fn, *args, **kwargs):
    with pytest.raises(ic.DecodeError):
        fn(*args, **kwargs)


@st.composite
def valid_messages(draw):
    grads = draw(gradient_steps(max_steps=2, small_n=40, big_n=300))
    n = grads[0].shape[0]
    opts = selection_options(draw, draw(st.sampled_from(SELECTIONS)), n)
    c = ic.Compressor(n, quant=draw(st.sampled_from(QUANT_NAMES)), **opts)
    msgs = [c.compress(g) for g in grads]
    return msgs[-1]


def test_sent_positions_agree_with_the_spec_decoder():
    """The helper that reads index blocks, against wire_spec.py on all three codings."""
    codings = set()
    for n, opts in [(50, {}), (64, {"density": 0.5, "exact": True}), (300, {"density": 0.02, "exact": True}), (40, {"threshold": 1e9})]:
        for quant in ("f32", "int4", "ternary"):
            msg = ic.Compressor(n, quant=quant, **opts).compress(seeded_gradient(n, "normal", n))
            codings.add(ic.inspect(msg)["index"])
            np.testing.assert_array_equal(sent_positions(msg), spec_decode(msg)["positions"])
    assert codings == {"dense", "bitmap", "rice"}


@settings(max_examples=60, **SETTINGS)
@given(msg=valid_messages())
def test_every_single_bit_flip_is_detected(msg):
    n = ic.inspect(msg)["numel"]
    out = np.arange(n, dtype=np.float32)
    before = out.copy()
    buf = bytearray(msg)
    for i in range(8 * len(msg)):
        buf[i // 8] ^= 1 << (i % 8)
        flipped = bytes(buf)
        buf[i // 8] ^= 1 << (i % 8)
        _expect_decode_error(ic.decode, flipped)
        _expect_decode_error(ic.inspect, flipped)
        _expect_decode_error(ic.decode_add, flipped, out)
    np.testing.assert_array_equal(out, before)
    assert bytes(buf) == msg


@settings(max_examples=60, **SETTINGS)
@given(msg=valid_messages(), extra=st.binary(min_size=1, max_size=4))
def test_truncations_and_extensions_are_rejected(msg, extra):
    n = ic.inspect(msg)["numel"]
    out = np.zeros(n, np.float32)
    for cut in range(len(msg)):
        _expect_decode_error(ic.decode, msg[:cut])
        _expect_decode_error(ic.inspect, msg[:cut])
        _expect_decode_error(ic.decode_add, msg[:cut], out)
    _expect_decode_error(ic.decode, msg + extra)
    _expect_decode_error(ic.decode_add, msg + extra, out)
    assert not out.any()


def _decode_or_none(msg: bytes):
    """The library's decode, with nothing but DecodeError allowed; None when rejected."""
    try:
        dense = ic.decode(msg, max_numel=1 << 16)
    except ic.DecodeError:
        with pytest.raises(ic.DecodeError):
            out = np.zeros(0, np.float32)
            ic.decode_add(msg, out)
        return None
    info = ic.inspect(msg)
    assert dense.dtype == np.float32 and dense.shape == (info["numel"],)
    return dense


@settings(max_examples=300, **SETTINGS)
@given(
    raw=st.one_of(
        st.binary(max_size=64),
        st.binary(max_size=48).map(lambda b: b"IC\x01" + b),
    )
)
def test_random_bytes_raise_only_decode_error(raw):
    _decode_or_none(raw)


def _varint(x: int) -> bytes:
    out = bytearray()
    while True:
        b, x = x & 0x7F, x >> 7
        out.append(b | (0x80 if x else 0))
        if not x:
            return bytes(out)


@st.composite
def checksummed_bodies(draw, max_numel: int = 2**32 - 1):
    """Random headers and blocks with a correct CRC: they get past the checksum and exercise
    the structural checks behind it."""
    codec = draw(st.one_of(st.integers(0, 255), st.sampled_from([0x00, 0x03, 0x04, 0x06, 0x07, 0x13, 0x17, 0x21, 0x25, 0x26])))
    numel = draw(st.one_of(st.integers(0, 40), st.integers(0, max_numel)))
    nnz = draw(st.one_of(st.integers(0, 40), st.integers(0, numel), st.just(numel)))
    head = b"IC\x01" + bytes([codec]) + _varint(numel) + _varint(nnz)
    body = head + draw(st.binary(max_size=40))
    return body + struct.pack("<I", crc32c(body))


@settings(max_examples=300, **SETTINGS)
@given(msg=checksummed_bodies())
def test_checksummed_garbage_raises_only_decode_error(msg):
    _decode_or_none(msg)


def _spec_accepts(msg: bytes):
    """The spec decoder's verdict (None: rejected). wire_spec.decode leaves a few rules of
    docs/wire-format.md unchecked, so they are checked here: header, index and value blocks
    fit before the checksum without overlapping; rice_k <= 31; QSGD levels >= 1; the scale
    is finite with its sign bit clear."""
    try:
        with np.errstate(all="ignore"):
            spec = spec_decode(msg)
    except (SpecError, KeyError, IndexError, ValueError, struct.error):
        return None
    nnz, quant = spec["nnz"], spec["quant"]
    code_bits = {"f32": 32, "f16": 16, "bf16": 16, "int8": 8, "int4": 4, "sign": 1, "qsgd": 1 + spec["levels"].bit_length()}
    value_bytes = (nnz + 4) // 5 if quant == "ternary" else (nnz * code_bits[quant] + 7) // 8
    room = len(msg) - 4 - spec["header_bytes"] - value_bytes
    index_bytes = {"dense": 0, "bitmap": (spec["numel"] + 7) // 8}.get(spec["index"])
    ok = room >= 0 if index_bytes is None else room == index_bytes
    ok &= spec["index"] != "rice" or spec["rice_k"] <= 31
    ok &= quant != "qsgd" or spec["levels"] >= 1
    scale = np.float32(spec["scale"])
    ok &= bool(np.isfinite(scale)) and not np.signbit(scale)
    return spec if ok else None


@st.composite
def mutated_messages(draw):
    """A valid message with a few bytes replaced, inserted or deleted, and the CRC fixed:
    near-valid inputs that reach the index and value decoders."""
    body = bytearray(draw(valid_messages())[:-4])
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "insert", "delete"]))
        at = draw(st.integers(0, len(body) - (op != "insert")))
        if op == "set":
            body[at] = draw(st.integers(0, 255))
        elif op == "insert":
            body[at:at] = bytes([draw(st.integers(0, 255))])
        else:
            del body[at]
    return bytes(body) + struct.pack("<I", crc32c(bytes(body)))


@settings(max_examples=500, **SETTINGS)
@given(msg=st.one_of(checksummed_bodies(max_numel=64), mutated_messages()))
def test_checksummed_garbage_agrees_with_the_spec_decoder(msg):
    dense = _decode_or_none(msg)
    try:
        numel = spec_varint(msg, 4)[0]
    except (SpecError, IndexError):
        numel = 0
    assume(numel <= 4096)  # wire_spec.py lists every position of a dense message
    spec = _spec_accepts(msg)
    assert dense is None or np.isfinite(dense).all(), "decoded values must be finite"
    event("valid" if spec is not None else "invalid")
    assert (dense is None) == (spec is None), "library and spec decoder disagree on validity"
    if dense is not None:
        want = np.zeros(spec["numel"], np.float32)
        want[spec["positions"]] = spec["values"]
        np.testing.assert_array_equal(dense, want)


@pytest.mark.parametrize("quant, codec, code", [("int8", 0x03, bytes([127])), ("int4", 0x04, bytes([7])), ("qsgd:2", 0x07, bytes([0b011]))])
def test_decoder_rejects_codes_whose_value_overflows(quant, codec, code):
    levels = bytes([2]) if quant.startswith("qsgd") else b""
    stream = b"\0\0\0\0" if quant.startswith("qsgd") else b""
    body = b"IC\x01" + bytes([codec]) + b"\x01\x01" + levels + struct.pack("<f", 3.0e38) + stream + code
    msg = body + struct.pack("<I", crc32c(body))
    assert _spec_accepts(msg) is None  # the independent decoder refuses it
    out = np.zeros(1, np.float32)
    try:
        dense = ic.decode(msg)
        ic.decode_add(msg, out)
    except ic.DecodeError:
        return
    assert np.isfinite(dense).all() and np.isfinite(out).all(), "decoded a non-finite value"
