//! AVX2 kernels. Each safe wrapper checks lengths, picks a monomorphic body and runs the
//! scalar reference on the tail, so the output equals [`super::scalar`]'s bit for bit:
//! the arithmetic is the same IEEE operations in the same order (no FMA), and the
//! comparisons are on the same magnitude bits.
#![allow(unsafe_code)]

use core::arch::x86_64::*;

use super::{scalar, with_scalar_ends, Accumulated, Ptrs, Update};
use crate::feedback::Momentum;
use crate::quant::{Quant, Quantizer};

const LANES: usize = 8;
/// Elements per unrolled iteration.
const BLOCK: usize = 2 * LANES;

/// Momentum rules as const parameters, so each combination compiles to its own loop.
const NONE: u8 = 0;
const VANILLA: u8 = 1;
const NESTEROV: u8 = 2;

#[inline(always)]
pub fn prefetch(x: &f32) {
    // SAFETY: a prefetch is only a hint, it never faults; SSE is part of x86_64.
    unsafe { _mm_prefetch::<_MM_HINT_T0>((x as *const f32).cast()) }
}

/// Bytes of alignment `_mm256_stream_ps` needs.
const STREAM_ALIGN: usize = 32;

pub fn accumulate(
    rule: Momentum,
    upd: Update<'_>,
    g: &[f32],
    gather_at: Option<u32>,
    list: &mut [u32],
    base: u32,
) -> Accumulated {
    let m = rule.factor();
    let at = gather_at.unwrap_or(0);
    // Streaming, the scalar kernel runs the elements before `r_new`'s first 32-byte
    // boundary, so that the body's stores of `v` are aligned and can bypass the cache.
    let head = match &upd {
        Update::Into {
            r_new,
            stream: true,
            ..
        } => r_new.as_ptr().align_offset(STREAM_ALIGN),
        _ => 0,
    };
    let simd = |upd: Update<'_>, g: &[f32], list: &mut [u32], base: u32| {
        let body = g.len();
        let p = Ptrs::new(upd, g, Some(STREAM_ALIGN));
        // SAFETY: the caller (`super::accumulate`) checked that the CPU has AVX2;
        // `with_scalar_ends` passes a part whose slices (r, g, r_new, and u, u_new with
        // momentum) all hold `body` elements, a multiple of BLOCK; `r_new`/`u_new` are
        // streamed to only when 32-byte aligned. Out of place, the old state (shared
        // borrows) and the new (exclusive borrows) cannot overlap.
        unsafe {
            match (rule, gather_at.is_some()) {
                (Momentum::None, true) => acc::<NONE, true>(m, p, body, at, list, base),
                (Momentum::None, false) => acc::<NONE, false>(m, p, body, at, list, base),
                (Momentum::Vanilla(_), true) => acc::<VANILLA, true>(m, p, body, at, list, base),
                (Momentum::Vanilla(_), false) => acc::<VANILLA, false>(m, p, body, at, list, base),
                (Momentum::Nesterov(_), true) => acc::<NESTEROV, true>(m, p, body, at, list, base),
                (Momentum::Nesterov(_), false) => {
                    acc::<NESTEROV, false>(m, p, body, at, list, base)
                }
            }
        }
    };
    with_scalar_ends(rule, upd, g, gather_at, list, base, head, BLOCK, simd)
}

/// Stores eight floats at `p`, bypassing the cache when `stream`.
///
/// # Safety
/// AVX2; `p` is valid for eight floats, and 32-byte aligned when `stream`.
#[inline(always)]
unsafe fn store(p: *mut f32, v: __m256, stream: bool) {
    // SAFETY: see # Safety.
    unsafe {
        if stream {
            _mm256_stream_ps(p, v)
        } else {
            _mm256_storeu_ps(p, v)
        }
    }
}

/// Pushes `base + i + j` for every set bit `j` of `mask` (the scalar kernel's order).
#[inline(always)]
fn push(mut mask: u32, i: usize, base: u32, list: &mut [u32], count: &mut usize) {
    while mask != 0 {
        let j = mask.trailing_zeros() as usize;
        if let Some(slot) = list.get_mut(*count) {
            *slot = base.wrapping_add((i + j) as u32);
        }
        *count += 1;
        mask &= mask - 1;
    }
}

/// # Safety
/// AVX2 must be available; `p.r`, `p.g`, `p.r_new` (and `p.u`, `p.u_new` when `M != NONE`)
/// must be valid for `body` elements, a multiple of `BLOCK`, the new ones writable and not
/// overlapping the old ones unless equal; `p.r_new` (`p.u_new`) 32-byte aligned when
/// `p.stream_r` (`p.stream_u`).
#[target_feature(enable = "avx2")]
unsafe fn acc<const M: u8, const GATHER: bool>(
    m: f32,
    p: Ptrs,
    body: usize,
    at: u32,
    list: &mut [u32],
    base: u32,
) -> Accumulated {
    let mf = _mm256_set1_ps(m);
    let abs = _mm256_set1_epi32(0x7fff_ffff);
    // `mag >= at` as a signed `mag > at - 1`: magnitudes and `at` are below 2^31, and
    // `at == 0` gives -1, below every magnitude.
    let below = _mm256_set1_epi32((at as i32).wrapping_sub(1));
    let mut max = _mm256_setzero_si256();
    let mut count = 0usize;
    let mut i = 0;
    while i < body {
        let mut masks = 0u32;
        for lane in 0..2 {
            let o = i + lane * LANES;
            // SAFETY: o + LANES <= body, in bounds of every pointer used (see # Safety).
            let (rv, gv) = unsafe { (_mm256_loadu_ps(p.r.add(o)), _mm256_loadu_ps(p.g.add(o))) };
            let v = if M == NONE {
                _mm256_add_ps(rv, gv)
            } else {
                // SAFETY: as above; u has `body` elements when M != NONE.
                let uv = unsafe { _mm256_loadu_ps(p.u.add(o)) };
                let (v, un) = if M == VANILLA {
                    let un = _mm256_add_ps(_mm256_mul_ps(mf, uv), gv);
                    (_mm256_add_ps(rv, un), un)
                } else {
                    let un = _mm256_mul_ps(mf, _mm256_add_ps(uv, gv));
                    (_mm256_add_ps(_mm256_add_ps(rv, un), gv), un)
                };
                // SAFETY: as above; `o` is a multiple of 8 floats, so aligned when streaming.
                unsafe { store(p.u_new.add(o), un, p.stream_u) };
                max = _mm256_max_epi32(max, _mm256_and_si256(_mm256_castps_si256(un), abs));
                v
            };
            // SAFETY: as above.
            unsafe { store(p.r_new.add(o), v, p.stream_r) };
            let mag = _mm256_and_si256(_mm256_castps_si256(v), abs);
            max = _mm256_max_epi32(max, mag);
            if GATHER {
                let hit = _mm256_cmpgt_epi32(mag, below);
                masks |= (_mm256_movemask_ps(_mm256_castsi256_ps(hit)) as u32) << (lane * LANES);
            }
        }
        if GATHER && masks != 0 {
            push(masks, i, base, list, &mut count);
        }
        i += BLOCK;
    }
    if p.stream_r || p.stream_u {
        // Non-temporal stores are weakly ordered: make them visible before this thread's
        // later stores (and before it reports back to a joining thread).
        _mm_sfence();
    }
    Accumulated {
        count,
        max_mag: hmax(max),
    }
}

/// Horizontal max of eight non-negative i32.
#[target_feature(enable = "avx2")]
fn hmax(x: __m256i) -> u32 {
    let m = _mm_max_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    let m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0b01_00_11_10));
    let m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0b10_11_00_01));
    _mm_cvtsi128_si32(m) as u32
}

pub fn max_mag(x: &[f32]) -> u32 {
    // Four quarters read side by side: more independent streams keep more memory requests
    // in flight than one sequential read.
    let quarter = x.len() / 4 / LANES * LANES;
    let (a, rest) = x.split_at(quarter);
    let (b, rest) = rest.split_at(quarter);
    let (c, rest) = rest.split_at(quarter);
    let (d, tail) = rest.split_at(quarter);
    // SAFETY: AVX2 checked by the caller; the four parts have the same length, a multiple
    // of LANES.
    let head = unsafe { max_mag_avx2([a, b, c, d]) };
    head.max(scalar::max_mag(tail))
}

/// # Safety
/// AVX2 must be available; the parts have equal lengths, a multiple of `LANES`.
#[target_feature(enable = "avx2")]
unsafe fn max_mag_avx2(parts: [&[f32]; 4]) -> u32 {
    let abs = _mm256_set1_epi32(0x7fff_ffff);
    let mut acc = [_mm256_setzero_si256(); 4];
    let len = parts[0].len();
    let mut i = 0;
    while i < len {
        for (a, p) in acc.iter_mut().zip(parts) {
            // SAFETY: i + LANES <= len for every part.
            let v = unsafe { _mm256_loadu_si256(p.as_ptr().add(i).cast()) };
            *a = _mm256_max_epi32(*a, _mm256_and_si256(v, abs));
        }
        i += LANES;
    }
    let m = _mm256_max_epi32(
        _mm256_max_epi32(acc[0], acc[1]),
        _mm256_max_epi32(acc[2], acc[3]),
    );
    hmax(m)
}

pub fn gather(x: &[f32], at: u32, list: &mut [u32], base: u32) -> usize {
    let body = x.len() / BLOCK * BLOCK;
    // SAFETY: AVX2 checked by the caller; `body <= x.len()`.
    let count = unsafe { gather_avx2(&x[..body], at, list, base) };
    count
        + scalar::gather(
            &x[body..],
            at,
            list.get_mut(count..).unwrap_or(&mut []),
            base.wrapping_add(body as u32),
        )
}

/// # Safety
/// AVX2 must be available; `x.len()` is a multiple of `BLOCK`.
#[target_feature(enable = "avx2")]
unsafe fn gather_avx2(x: &[f32], at: u32, list: &mut [u32], base: u32) -> usize {
    let abs = _mm256_set1_epi32(0x7fff_ffff);
    let below = _mm256_set1_epi32((at as i32).wrapping_sub(1));
    let mut count = 0;
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let mut masks = 0u32;
        for lane in 0..2 {
            // SAFETY: each block holds BLOCK elements.
            let v = unsafe { _mm256_loadu_si256(block.as_ptr().add(lane * LANES).cast()) };
            let hit = _mm256_cmpgt_epi32(_mm256_and_si256(v, abs), below);
            masks |= (_mm256_movemask_ps(_mm256_castsi256_ps(hit)) as u32) << (lane * LANES);
        }
        if masks != 0 {
            push(masks, b * BLOCK, base, list, &mut count);
        }
    }
    count
}

pub fn magnitudes(x: &[f32], out: &mut [u32]) {
    let n = x.len().min(out.len());
    let body = n / LANES * LANES;
    // SAFETY: AVX2 checked by the caller; both slices hold `body` elements.
    unsafe { magnitudes_avx2(&x[..body], &mut out[..body]) };
    scalar::magnitudes(&x[body..n], &mut out[body..n]);
}

/// # Safety
/// AVX2 must be available; equal lengths, a multiple of `LANES`.
#[target_feature(enable = "avx2")]
unsafe fn magnitudes_avx2(x: &[f32], out: &mut [u32]) {
    let abs = _mm256_set1_epi32(0x7fff_ffff);
    for (o, v) in out.chunks_exact_mut(LANES).zip(x.chunks_exact(LANES)) {
        // SAFETY: both chunks hold LANES elements.
        unsafe {
            let v = _mm256_loadu_si256(v.as_ptr().cast());
            _mm256_storeu_si256(o.as_mut_ptr().cast(), _mm256_and_si256(v, abs));
        }
    }
}

/// Bytes per stream of the three interleaved CRC streams (the instruction's latency is three
/// times its throughput, so three independent registers keep it busy).
const CRC_STREAM: usize = 4096;

pub fn crc32c_update(crc: u32, data: &[u8]) -> u32 {
    // SAFETY: the caller (`super::crc32c_update`) checked that the CPU has SSE4.2.
    unsafe { crc32c_sse42(crc, data) }
}

/// # Safety
/// SSE4.2 must be available.
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(mut crc: u32, data: &[u8]) -> u32 {
    use crate::wire::crc::{combine, shift_operator};
    const SHIFT: u32 = shift_operator(CRC_STREAM);
    let mut blocks = data.chunks_exact(3 * CRC_STREAM);
    for block in &mut blocks {
        let (a, rest) = block.split_at(CRC_STREAM);
        let (b, c) = rest.split_at(CRC_STREAM);
        let (mut ca, mut cb, mut cc) = (crc as u64, 0u64, 0u64);
        for ((x, y), z) in a
            .chunks_exact(8)
            .zip(b.chunks_exact(8))
            .zip(c.chunks_exact(8))
        {
            ca = _mm_crc32_u64(ca, le64(x));
            cb = _mm_crc32_u64(cb, le64(y));
            cc = _mm_crc32_u64(cc, le64(z));
        }
        crc = combine(combine(ca as u32, SHIFT, cb as u32), SHIFT, cc as u32);
    }
    let rest = blocks.remainder();
    let mut words = rest.chunks_exact(8);
    let mut c64 = crc as u64;
    for w in &mut words {
        c64 = _mm_crc32_u64(c64, le64(w));
    }
    let mut crc = c64 as u32;
    for &byte in words.remainder() {
        crc = _mm_crc32_u8(crc, byte);
    }
    crc
}

#[inline(always)]
fn le64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    u64::from_le_bytes(w)
}

/// Dense codes for `f16` (with F16C), `bf16` and `int8`; false for the other quantisers (the
/// caller falls back to the scalar kernel). Values must be finite, as after accumulation.
pub fn quantize_dense(quant: Quant, scale: f32, r: &mut [f32], out: &mut [u8]) -> bool {
    const GROUP: usize = 4 * LANES;
    let width = match quant {
        Quant::F16 if f16c() => 2,
        Quant::Bf16 => 2,
        Quant::Int8 => 1,
        _ => return false,
    };
    let n = r.len().min(out.len() / width);
    let body = n / GROUP * GROUP;
    let q = Quantizer::new(quant, scale, 0);
    let (rb, rt) = r[..n].split_at_mut(body);
    let (ob, ot) = out[..n * width].split_at_mut(body * width);
    // SAFETY: AVX2 (and F16C for f16) checked by the caller / above; `rb` holds `body`
    // elements, a multiple of GROUP, and `ob` `body * width` bytes.
    unsafe {
        match quant {
            Quant::F16 => f16_codes(rb, ob),
            Quant::Bf16 => bf16_codes(rb, ob),
            _ => int8_codes(rb, ob, q.pre, q.inv, q.unit),
        }
    }
    scalar::quantize_dense(quant, scale, rt, ot);
    true
}

#[cfg(feature = "std")]
fn f16c() -> bool {
    std::is_x86_feature_detected!("f16c")
}

#[cfg(not(feature = "std"))]
fn f16c() -> bool {
    cfg!(target_feature = "f16c")
}

/// # Safety
/// AVX2 and F16C; `out.len() == 2 * r.len()`, a multiple of 8 elements.
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_codes(r: &mut [f32], out: &mut [u8]) {
    // The scalar conversion saturates finite values at ±65504; the instruction would give
    // infinity from 65520 up, so clamp first (values below round the same either way).
    let hi = _mm256_set1_ps(65504.0);
    let lo = _mm256_set1_ps(-65504.0);
    for (v, o) in r
        .chunks_exact_mut(LANES)
        .zip(out.chunks_exact_mut(2 * LANES))
    {
        // SAFETY: each chunk holds LANES floats and 2 * LANES bytes.
        unsafe {
            let x = _mm256_loadu_ps(v.as_ptr());
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_min_ps(
                _mm256_max_ps(x, lo),
                hi,
            ));
            _mm_storeu_si128(o.as_mut_ptr().cast(), h);
            _mm256_storeu_ps(v.as_mut_ptr(), _mm256_sub_ps(x, _mm256_cvtph_ps(h)));
        }
    }
}

/// # Safety
/// AVX2; `out.len() == 2 * r.len()`, a multiple of 16 elements.
#[target_feature(enable = "avx2")]
unsafe fn bf16_codes(r: &mut [f32], out: &mut [u8]) {
    let one = _mm256_set1_epi32(1);
    let half = _mm256_set1_epi32(0x7fff);
    let exp = _mm256_set1_epi32(0x7fff);
    let inf = _mm256_set1_epi32(0x7f80);
    let sat = _mm256_set1_epi32(0x7f7f);
    let sign = _mm256_set1_epi32(0x8000);
    let code = |b: __m256i| {
        // Round to nearest even at bit 16; a finite value that rounds to infinity saturates
        // to the largest finite bfloat16, as in the scalar kernel.
        let round = _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(b, 16), one));
        let c = _mm256_srli_epi32(_mm256_add_epi32(b, round), 16);
        let over = _mm256_cmpeq_epi32(_mm256_and_si256(c, exp), inf);
        let saturated = _mm256_or_si256(_mm256_and_si256(c, sign), sat);
        _mm256_blendv_epi8(c, saturated, over)
    };
    for (v, o) in r
        .chunks_exact_mut(2 * LANES)
        .zip(out.chunks_exact_mut(4 * LANES))
    {
        // SAFETY: each chunk holds 2 * LANES floats and 4 * LANES bytes.
        unsafe {
            let xa = _mm256_loadu_ps(v.as_ptr());
            let xb = _mm256_loadu_ps(v.as_ptr().add(LANES));
            let (ca, cb) = (code(_mm256_castps_si256(xa)), code(_mm256_castps_si256(xb)));
            let packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(ca, cb), 0b11_01_10_00);
            _mm256_storeu_si256(o.as_mut_ptr().cast(), packed);
            let da = _mm256_castsi256_ps(_mm256_slli_epi32(ca, 16));
            let db = _mm256_castsi256_ps(_mm256_slli_epi32(cb, 16));
            _mm256_storeu_ps(v.as_mut_ptr(), _mm256_sub_ps(xa, da));
            _mm256_storeu_ps(v.as_mut_ptr().add(LANES), _mm256_sub_ps(xb, db));
        }
    }
}

/// # Safety
/// AVX2; `out.len() == r.len()`, a multiple of 32 elements.
#[target_feature(enable = "avx2")]
unsafe fn int8_codes(r: &mut [f32], out: &mut [u8], pre: f32, inv: f32, unit: f32) {
    let (pre, inv, unit) = (
        _mm256_set1_ps(pre),
        _mm256_set1_ps(inv),
        _mm256_set1_ps(unit),
    );
    // Clamping x to ±128 first keeps the truncation in range and changes no final code.
    let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(128.0));
    let (half, neg_half) = (_mm256_set1_ps(0.5), _mm256_set1_ps(-0.5));
    let (cmin, cmax) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (v, o) in r
        .chunks_exact_mut(4 * LANES)
        .zip(out.chunks_exact_mut(4 * LANES))
    {
        let mut codes = [_mm256_setzero_si256(); 4];
        for (k, c) in codes.iter_mut().enumerate() {
            // SAFETY: each chunk holds 4 * LANES floats.
            let x = unsafe { _mm256_loadu_ps(v.as_ptr().add(k * LANES)) };
            // round half away from zero of (v·pre)·inv, as `round_half_away` does it.
            let y = _mm256_min_ps(
                _mm256_max_ps(_mm256_mul_ps(_mm256_mul_ps(x, pre), inv), lo),
                hi,
            );
            let t = _mm256_cvttps_epi32(y);
            let frac = _mm256_sub_ps(y, _mm256_cvtepi32_ps(t));
            let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half));
            let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(frac, neg_half));
            // The masks are -1 where true: subtracting `up` adds one, adding `down` takes one.
            let t = _mm256_add_epi32(_mm256_sub_epi32(t, up), down);
            let t = _mm256_min_epi32(_mm256_max_epi32(t, cmin), cmax);
            let decoded = _mm256_mul_ps(_mm256_cvtepi32_ps(t), unit);
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr().add(k * LANES), _mm256_sub_ps(x, decoded)) };
            *c = t;
        }
        let ab = _mm256_packs_epi32(codes[0], codes[1]);
        let cd = _mm256_packs_epi32(codes[2], codes[3]);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
        // SAFETY: the chunk holds 4 * LANES bytes.
        unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), bytes) };
    }
}

/// Dense f16 decode-add: see [`scalar::decode_add_f16`].
pub fn decode_add_f16(codes: &[u8], out: &mut [f32], scale: f32) -> bool {
    let n = out.len().min(codes.len() / 2);
    let body = n / LANES * LANES;
    let (cb, ct) = codes[..2 * n].split_at(2 * body);
    // SAFETY: AVX2 and F16C checked by the caller; `cb` holds 2 * body bytes.
    if !unsafe { f16_all_finite(cb) } || !scalar::decode_add_f16(ct, &mut [], 0.0) {
        return false;
    }
    let (ob, ot) = out[..n].split_at_mut(body);
    // SAFETY: as above; `ob` holds `body` floats.
    unsafe { f16_add(cb, ob, scale) };
    scalar::decode_add_f16(ct, ot, scale)
}

/// # Safety
/// AVX2; `codes.len()` a multiple of 16 bytes.
#[target_feature(enable = "avx2")]
unsafe fn f16_all_finite(codes: &[u8]) -> bool {
    let exp = _mm_set1_epi16(0x7c00);
    let mut bad = _mm_setzero_si128();
    for c in codes.chunks_exact(2 * LANES) {
        // SAFETY: 16 bytes per chunk.
        let h = unsafe { _mm_loadu_si128(c.as_ptr().cast()) };
        bad = _mm_or_si128(bad, _mm_cmpeq_epi16(_mm_and_si128(h, exp), exp));
    }
    _mm_testz_si128(bad, bad) == 1
}

/// # Safety
/// AVX2 and F16C; `codes.len() == 2 * out.len()`, a multiple of 8 elements.
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_add(codes: &[u8], out: &mut [f32], scale: f32) {
    let s = _mm256_set1_ps(scale);
    for (c, o) in codes
        .chunks_exact(2 * LANES)
        .zip(out.chunks_exact_mut(LANES))
    {
        // SAFETY: 16 bytes and 8 floats per chunk.
        unsafe {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(c.as_ptr().cast()));
            let acc = _mm256_add_ps(_mm256_loadu_ps(o.as_ptr()), _mm256_mul_ps(s, v));
            _mm256_storeu_ps(o.as_mut_ptr(), acc);
        }
    }
}
