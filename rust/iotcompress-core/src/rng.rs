//! A counter-based pseudo-random generator: the number for element `i` of the message
//! with stream `s` is `mix64(s << 32 | i)`. Integer-only, so every platform and every
//! code path (scalar, SIMD, threaded) draws the same numbers, and any element's number
//! can be computed without the others.

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The SplitMix64 finaliser (Steele, Lea, Flood: "Fast splittable pseudorandom number
/// generators", OOPSLA 2014): a bijection on u64 with strong avalanche.
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Purposes get separate streams so that sampling and rounding never correlate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    Rounding = 1,
    Sampling = 2,
}

/// The 32-bit stream for one message: a hash of the user's seed, the step and the purpose.
#[inline]
pub(crate) fn stream(seed: u64, step: u64, purpose: Purpose) -> u32 {
    let z = mix64(seed ^ mix64(step.wrapping_add(GOLDEN).wrapping_mul(purpose as u64)));
    (z >> 32) as u32
}

/// A uniform number in [0, 1) with 24 random bits, for element `i` of `stream`.
#[inline(always)]
pub(crate) fn uniform(stream: u32, i: u32) -> f32 {
    let z = mix64(((stream as u64) << 32) | i as u64);
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// A uniform integer in [0, n) for draw `j` of `stream` (multiply-shift, no division).
#[inline(always)]
pub(crate) fn below(stream: u32, j: u32, n: u32) -> u32 {
    let z = mix64(((stream as u64) << 32) | j as u64);
    (((z >> 32) * n as u64) >> 32) as u32
}
