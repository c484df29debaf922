//! NEON kernels (NEON is part of every aarch64 CPU). Same structure and the same promise as
//! the AVX2 kernels: the scalar reference runs the tail, the arithmetic is the same IEEE
//! operations in the same order (separate multiply and add, never a fused `fmla`), and the
//! comparisons are on the same magnitude bits, so the output equals [`super::scalar`]'s.
#![allow(unsafe_code)]

use core::arch::aarch64::*;

use super::{scalar, with_scalar_ends, Accumulated, Ptrs, Update};
use crate::feedback::Momentum;

const LANES: usize = 4;
/// Elements per unrolled iteration.
const BLOCK: usize = 4 * LANES;

const NONE: u8 = 0;
const VANILLA: u8 = 1;
const NESTEROV: u8 = 2;

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
    let simd = |upd: Update<'_>, g: &[f32], list: &mut [u32], base: u32| {
        let body = g.len();
        let p = Ptrs::new(upd, g, None);
        // SAFETY: NEON is always present on aarch64; `with_scalar_ends` passes a part whose
        // slices (r, g, r_new, and u, u_new with momentum) all hold `body` elements, a
        // multiple of BLOCK. Out of place, the old state (shared borrows) and the new
        // (exclusive borrows) cannot overlap.
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
    with_scalar_ends(rule, upd, g, gather_at, list, base, 0, BLOCK, simd)
}

/// Pushes `base + i + j` for every `mags[j] >= at`, in index order (the scalar kernel's).
#[inline(always)]
fn push(mags: &[u32; BLOCK], at: u32, i: usize, base: u32, list: &mut [u32], count: &mut usize) {
    for (j, &mag) in mags.iter().enumerate() {
        if mag >= at {
            if let Some(slot) = list.get_mut(*count) {
                *slot = base.wrapping_add((i + j) as u32);
            }
            *count += 1;
        }
    }
}

/// # Safety
/// `p.r`, `p.g`, `p.r_new` (and `p.u`, `p.u_new` when `M != NONE`) must be valid for `body`
/// elements, a multiple of `BLOCK`, the new ones writable and not overlapping the old ones
/// unless equal.
#[target_feature(enable = "neon")]
unsafe fn acc<const M: u8, const GATHER: bool>(
    m: f32,
    p: Ptrs,
    body: usize,
    at: u32,
    list: &mut [u32],
    base: u32,
) -> Accumulated {
    let mf = vdupq_n_f32(m);
    let abs = vdupq_n_u32(0x7fff_ffff);
    let atv = vdupq_n_u32(at);
    let mut max = vdupq_n_u32(0);
    let mut count = 0usize;
    let mut i = 0;
    while i < body {
        let mut hits = vdupq_n_u32(0);
        let mut mags = [vdupq_n_u32(0); 4];
        for (lane, mag_out) in mags.iter_mut().enumerate() {
            let o = i + lane * LANES;
            // SAFETY: o + LANES <= body, in bounds of every pointer used (see # Safety).
            let (rv, gv) = unsafe { (vld1q_f32(p.r.add(o)), vld1q_f32(p.g.add(o))) };
            let v = if M == NONE {
                vaddq_f32(rv, gv)
            } else {
                // SAFETY: as above; u has `body` elements when M != NONE.
                let uv = unsafe { vld1q_f32(p.u.add(o)) };
                let (v, un) = if M == VANILLA {
                    let un = vaddq_f32(vmulq_f32(mf, uv), gv);
                    (vaddq_f32(rv, un), un)
                } else {
                    let un = vmulq_f32(mf, vaddq_f32(uv, gv));
                    (vaddq_f32(vaddq_f32(rv, un), gv), un)
                };
                // SAFETY: as above.
                unsafe { vst1q_f32(p.u_new.add(o), un) };
                max = vmaxq_u32(max, vandq_u32(vreinterpretq_u32_f32(un), abs));
                v
            };
            // SAFETY: as above.
            unsafe { vst1q_f32(p.r_new.add(o), v) };
            let mag = vandq_u32(vreinterpretq_u32_f32(v), abs);
            max = vmaxq_u32(max, mag);
            if GATHER {
                hits = vorrq_u32(hits, vcgeq_u32(mag, atv));
                *mag_out = mag;
            }
        }
        if GATHER && vmaxvq_u32(hits) != 0 {
            let mut all = [0u32; BLOCK];
            for (k, mag) in mags.iter().enumerate() {
                // SAFETY: `all` holds BLOCK = 4 * LANES words.
                unsafe { vst1q_u32(all.as_mut_ptr().add(k * LANES), *mag) };
            }
            push(&all, at, i, base, list, &mut count);
        }
        i += BLOCK;
    }
    Accumulated {
        count,
        max_mag: vmaxvq_u32(max),
    }
}

pub fn max_mag(x: &[f32]) -> u32 {
    let body = x.len() / BLOCK * BLOCK;
    // SAFETY: NEON is always present; `body <= x.len()`.
    let head = unsafe { max_mag_neon(&x[..body]) };
    head.max(scalar::max_mag(&x[body..]))
}

/// # Safety
/// `x.len()` is a multiple of `BLOCK`.
#[target_feature(enable = "neon")]
unsafe fn max_mag_neon(x: &[f32]) -> u32 {
    let abs = vdupq_n_u32(0x7fff_ffff);
    let mut acc = [vdupq_n_u32(0); 4];
    for block in x.chunks_exact(BLOCK) {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: each block holds BLOCK elements.
            let v = unsafe { vld1q_u32(block.as_ptr().add(k * LANES).cast()) };
            *a = vmaxq_u32(*a, vandq_u32(v, abs));
        }
    }
    vmaxvq_u32(vmaxq_u32(
        vmaxq_u32(acc[0], acc[1]),
        vmaxq_u32(acc[2], acc[3]),
    ))
}

pub fn gather(x: &[f32], at: u32, list: &mut [u32], base: u32) -> usize {
    let body = x.len() / BLOCK * BLOCK;
    // SAFETY: NEON is always present; `body <= x.len()`.
    let count = unsafe { gather_neon(&x[..body], at, list, base) };
    count
        + scalar::gather(
            &x[body..],
            at,
            list.get_mut(count..).unwrap_or(&mut []),
            base.wrapping_add(body as u32),
        )
}

/// # Safety
/// `x.len()` is a multiple of `BLOCK`.
#[target_feature(enable = "neon")]
unsafe fn gather_neon(x: &[f32], at: u32, list: &mut [u32], base: u32) -> usize {
    let abs = vdupq_n_u32(0x7fff_ffff);
    let atv = vdupq_n_u32(at);
    let mut count = 0;
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let mut hits = vdupq_n_u32(0);
        for k in 0..4 {
            // SAFETY: each block holds BLOCK elements.
            let v = unsafe { vld1q_u32(block.as_ptr().add(k * LANES).cast()) };
            hits = vorrq_u32(hits, vcgeq_u32(vandq_u32(v, abs), atv));
        }
        if vmaxvq_u32(hits) != 0 {
            let mut mags = [0u32; BLOCK];
            scalar::magnitudes(block, &mut mags);
            push(&mags, at, b * BLOCK, base, list, &mut count);
        }
    }
    count
}

pub fn magnitudes(x: &[f32], out: &mut [u32]) {
    let n = x.len().min(out.len());
    let body = n / LANES * LANES;
    // SAFETY: NEON is always present; both slices hold `body` elements.
    unsafe { magnitudes_neon(&x[..body], &mut out[..body]) };
    scalar::magnitudes(&x[body..n], &mut out[body..n]);
}

/// # Safety
/// Equal lengths, a multiple of `LANES`.
#[target_feature(enable = "neon")]
unsafe fn magnitudes_neon(x: &[f32], out: &mut [u32]) {
    let abs = vdupq_n_u32(0x7fff_ffff);
    for (o, v) in out.chunks_exact_mut(LANES).zip(x.chunks_exact(LANES)) {
        // SAFETY: both chunks hold LANES elements.
        unsafe {
            let v = vld1q_u32(v.as_ptr().cast());
            vst1q_u32(o.as_mut_ptr(), vandq_u32(v, abs));
        }
    }
}
