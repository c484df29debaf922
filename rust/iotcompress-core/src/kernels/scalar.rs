//! The reference kernels: plain loops, the specification every SIMD kernel must match bit
//! for bit (`tests/simd.rs`). Always built; the only kernels on targets without SIMD.

use super::{Accumulated, Update};
use crate::feedback::accumulate_one;
use crate::feedback::Momentum;
use crate::float::mag_bits;
use crate::float::{f16_to_f32, is_finite_bits};
use crate::quant::{Quant, Quantizer};

/// `v = rule(r, u, g)` stored into `r` (and `u`), or into `r_new` (and `u_new`) with
/// [`Update::Into`]; indices (plus `base`) of `|v| >= at` pushed into `list`, counting past
/// its capacity; the largest magnitude of `v` and the new `u`.
pub fn accumulate(
    rule: Momentum,
    upd: Update<'_>,
    g: &[f32],
    gather_at: Option<u32>,
    list: &mut [u32],
    base: u32,
) -> Accumulated {
    let mut count = 0usize;
    let mut max_mag = 0u32;
    let mut step = |i: usize, r: f32, u: f32, g: f32| {
        let (v, un) = accumulate_one(rule, r, u, g);
        let mag = mag_bits(v);
        max_mag = max_mag.max(mag).max(mag_bits(un));
        if let Some(t) = gather_at {
            if mag >= t {
                if let Some(slot) = list.get_mut(count) {
                    *slot = base.wrapping_add(i as u32);
                }
                count += 1;
            }
        }
        (v, un)
    };
    match (upd, rule.has_velocity()) {
        (Update::InPlace { r, u }, true) => {
            for (i, ((r, u), &g)) in r.iter_mut().zip(u.iter_mut()).zip(g).enumerate() {
                (*r, *u) = step(i, *r, *u, g);
            }
        }
        (Update::InPlace { r, .. }, false) => {
            for (i, (r, &g)) in r.iter_mut().zip(g).enumerate() {
                *r = step(i, *r, 0.0, g).0;
            }
        }
        (
            Update::Into {
                r, u, r_new, u_new, ..
            },
            true,
        ) => {
            let new = r_new.iter_mut().zip(u_new.iter_mut());
            for (i, (((&r, &u), &g), (rn, un))) in r.iter().zip(u).zip(g).zip(new).enumerate() {
                (*rn, *un) = step(i, r, u, g);
            }
        }
        (Update::Into { r, r_new, .. }, false) => {
            for (i, ((&r, &g), rn)) in r.iter().zip(g).zip(r_new.iter_mut()).enumerate() {
                *rn = step(i, r, 0.0, g).0;
            }
        }
    }
    Accumulated { count, max_mag }
}

/// The largest magnitude bits of `x` (0 when empty); `>= 0x7f80_0000` iff not all finite.
pub fn max_mag(x: &[f32]) -> u32 {
    x.iter().fold(0, |m, &v| m.max(mag_bits(v)))
}

/// Indices (plus `base`) of `|x| >= at` into `list`, counting past its capacity.
pub fn gather(x: &[f32], at: u32, list: &mut [u32], base: u32) -> usize {
    let mut count = 0;
    for (i, &v) in x.iter().enumerate() {
        if mag_bits(v) >= at {
            if let Some(slot) = list.get_mut(count) {
                *slot = base.wrapping_add(i as u32);
            }
            count += 1;
        }
    }
    count
}

/// `out[i] = bits of |x[i]|` (the sort keys of the exact top-k).
pub fn magnitudes(x: &[f32], out: &mut [u32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = mag_bits(v);
    }
}

/// Dense emission for the byte-aligned quantisers (`f32 f16 bf16 int8`) of finite values:
/// `out` gets every element's code (little-endian) and `r` keeps `v - decoded`. Other
/// quantisers leave both untouched.
pub fn quantize_dense(quant: Quant, scale: f32, r: &mut [f32], out: &mut [u8]) {
    let q = &Quantizer::new(quant, scale, 0);
    fn each<const W: usize>(q: &Quantizer, r: &mut [f32], out: &mut [u8]) {
        for (v, o) in r.iter_mut().zip(out.chunks_exact_mut(W)) {
            let code = q.encode(*v, 0);
            o.copy_from_slice(&code.to_le_bytes()[..W]);
            *v -= q.decode(code);
        }
    }
    match q.quant {
        Quant::F32 => each::<4>(q, r, out),
        Quant::F16 | Quant::Bf16 => each::<2>(q, r, out),
        Quant::Int8 => each::<1>(q, r, out),
        _ => {}
    }
}

/// `out[i] += scale * f16(codes[i])` for little-endian f16 codes, all or nothing: false
/// (and `out` unchanged) if a code is infinite or NaN.
pub fn decode_add_f16(codes: &[u8], out: &mut [f32], scale: f32) -> bool {
    let code = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
    // OR-reduction without early exit, so it vectorises.
    let finite = codes.chunks_exact(2).fold(true, |ok, c| {
        ok & is_finite_bits(f16_to_f32(code(c)).to_bits())
    });
    if finite {
        for (o, c) in out.iter_mut().zip(codes.chunks_exact(2)) {
            *o += scale * f16_to_f32(code(c));
        }
    }
    finite
}
