//! The hot loops of the pipeline, each written once as a plain loop ([`scalar`], the
//! specification) and again with SIMD where the target has it (AVX2 on x86_64, NEON on
//! aarch64). The SIMD
//! kernels give the same bits as the scalar ones (`tests/simd.rs` checks every kernel on
//! random and adversarial inputs), so the choice never changes a message.
//!
//! With `std` the level is chosen at run time from the CPU's features, and the environment
//! variable `IOTCOMPRESS_SIMD=off` (or [`set_simd`]) forces the scalar kernels; without
//! `std` it is chosen at compile time from the target features (`-C target-feature=+avx2`).
//!
//! This module is public for the equality tests and the benchmarks; it is not part of the
//! stable API.

// Kernels take their slices and parameters flat, as the loops use them.
#![allow(clippy::too_many_arguments)]

use crate::feedback::Momentum;
use crate::quant::Quant;
use crate::Error;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(feature = "std")]
pub mod parallel;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_64;

/// What an accumulation pass saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accumulated {
    /// Entries at or above the gather threshold (may exceed the list's capacity).
    pub count: usize,
    /// The largest magnitude bits among the new `v` and `u`: `>= 0x7f80_0000` when one of
    /// them is not finite.
    pub max_mag: u32,
}

impl Accumulated {
    /// Whether every accumulated value is finite.
    pub fn finite(&self) -> bool {
        self.max_mag < 0x7f80_0000
    }
}

/// A family of kernels.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    /// Plain loops (the reference).
    Scalar,
    /// x86_64 AVX2.
    Avx2,
    /// aarch64 NEON.
    Neon,
}

impl Level {
    /// A short name for tables.
    pub const fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Neon => "neon",
        }
    }

    /// Whether this CPU runs the level.
    pub fn supported(self) -> bool {
        match self {
            Level::Scalar => true,
            Level::Avx2 => avx2(),
            Level::Neon => cfg!(target_arch = "aarch64"),
        }
    }

    /// Every level this CPU runs, the reference first.
    pub fn all_supported() -> impl Iterator<Item = Level> {
        [Level::Scalar, Level::Avx2, Level::Neon]
            .into_iter()
            .filter(|l| l.supported())
    }

    /// The best level this CPU runs (ignores [`set_simd`]).
    pub fn best() -> Level {
        if avx2() {
            Level::Avx2
        } else if cfg!(target_arch = "aarch64") {
            Level::Neon
        } else {
            Level::Scalar
        }
    }

    /// The level the pipeline uses now: [`Level::best`] unless SIMD is turned off.
    pub fn active() -> Level {
        if simd_enabled() {
            Level::best()
        } else {
            Level::Scalar
        }
    }
}

#[cfg(all(target_arch = "x86_64", feature = "std"))]
fn avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
}

#[cfg(not(all(target_arch = "x86_64", feature = "std")))]
fn avx2() -> bool {
    cfg!(all(target_arch = "x86_64", target_feature = "avx2"))
}

#[cfg(feature = "std")]
mod switch {
    use core::sync::atomic::{AtomicU8, Ordering};

    /// 0: not read yet, 1: on, 2: off.
    static STATE: AtomicU8 = AtomicU8::new(0);

    pub fn enabled() -> bool {
        match STATE.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let off = std::env::var("IOTCOMPRESS_SIMD")
                    .map(|v| matches!(v.as_str(), "off" | "0" | "scalar"))
                    .unwrap_or(false);
                set(!off);
                !off
            }
        }
    }

    pub fn set(on: bool) {
        STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }
}

/// Turns the SIMD kernels on or off for the whole process (the output does not change, only
/// the speed). The default comes from `IOTCOMPRESS_SIMD` (`off` turns them off).
#[cfg(feature = "std")]
pub fn set_simd(enabled: bool) {
    switch::set(enabled)
}

/// Whether the pipeline may use SIMD kernels.
pub fn simd_enabled() -> bool {
    #[cfg(feature = "std")]
    {
        switch::enabled()
    }
    #[cfg(not(feature = "std"))]
    {
        true
    }
}

/// Hints the CPU to fetch `x[i]` into cache (a no-op where there is no such hint, or when
/// `i` is out of bounds).
#[inline(always)]
pub fn prefetch(x: &[f32], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = x.get(i) {
        x86_64::prefetch(v);
    }
    let _ = (x, i);
}

/// The CRC-32C register after `data` (see [`crate::wire::crc::crc32c_update`]); the x86_64
/// levels use the SSE4.2 `crc32` instruction.
pub fn crc32c_update(level: Level, crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 && sse42() {
        return x86_64::crc32c_update(crc, data);
    }
    let _ = level;
    crate::wire::crc::crc32c_update(crc, data)
}

#[cfg(all(target_arch = "x86_64", feature = "std"))]
fn sse42() -> bool {
    std::is_x86_feature_detected!("sse4.2")
}

#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
fn sse42() -> bool {
    cfg!(target_feature = "sse4.2")
}

/// The state an accumulation reads and where it writes the new state.
#[derive(Debug)]
pub enum Update<'a> {
    /// `r` (and `u`) are overwritten with `v` (and the new velocity).
    InPlace {
        /// Residual, becomes `v`.
        r: &'a mut [f32],
        /// Velocity (may be empty without momentum), becomes the new velocity.
        u: &'a mut [f32],
    },
    /// `r` and `u` are only read (they stay the old state); `v` and the new velocity go to
    /// `r_new` and `u_new`.
    Into {
        /// Old residual.
        r: &'a [f32],
        /// Old velocity (may be empty without momentum).
        u: &'a [f32],
        /// Receives `v`.
        r_new: &'a mut [f32],
        /// Receives the new velocity (may be empty without momentum).
        u_new: &'a mut [f32],
        /// Write the new values around the caches (AVX2: non-temporal stores, no read for
        /// ownership, so the pass moves as many bytes as `r += g`). Worth it when the
        /// tensors do not fit in the caches anyway; smaller ones are better left there for
        /// the next pass. Only the speed depends on it.
        stream: bool,
    },
}

impl<'a> Update<'a> {
    /// Elements updated: the shortest of the slices involved (velocities with momentum only).
    pub fn len(&self, rule: Momentum) -> usize {
        let has_u = rule.has_velocity();
        let u_len = |u: usize| if has_u { u } else { usize::MAX };
        match self {
            Update::InPlace { r, u } => r.len().min(u_len(u.len())),
            Update::Into {
                r, u, r_new, u_new, ..
            } => r
                .len()
                .min(r_new.len())
                .min(u_len(u.len()))
                .min(u_len(u_new.len())),
        }
    }

    /// Whether [`Update::len`] is 0.
    pub fn is_empty(&self, rule: Momentum) -> bool {
        self.len(rule) == 0
    }

    /// A shorter-lived copy (to split it and still read [`Update::new_r`] afterwards).
    pub fn reborrow(&mut self) -> Update<'_> {
        match self {
            Update::InPlace { r, u } => Update::InPlace { r, u },
            Update::Into {
                r,
                u,
                r_new,
                u_new,
                stream,
            } => Update::Into {
                r,
                u,
                r_new,
                u_new,
                stream: *stream,
            },
        }
    }

    /// The first `mid` elements and the rest; `mid <= self.len(rule)`. Without momentum the
    /// velocities of both parts are empty.
    pub fn split_at(self, mid: usize, rule: Momentum) -> (Update<'a>, Update<'a>) {
        let has_u = rule.has_velocity();
        match self {
            Update::InPlace { r, u } => {
                let (r0, r1) = r.split_at_mut(mid);
                let (u0, u1) = if has_u {
                    u.split_at_mut(mid)
                } else {
                    (&mut [][..], &mut [][..])
                };
                (
                    Update::InPlace { r: r0, u: u0 },
                    Update::InPlace { r: r1, u: u1 },
                )
            }
            Update::Into {
                r,
                u,
                r_new,
                u_new,
                stream,
            } => {
                let (r0, r1) = r.split_at(mid);
                let (n0, n1) = r_new.split_at_mut(mid);
                let ((u0, u1), (m0, m1)) = if has_u {
                    (u.split_at(mid), u_new.split_at_mut(mid))
                } else {
                    ((&[][..], &[][..]), (&mut [][..], &mut [][..]))
                };
                (
                    Update::Into {
                        r: r0,
                        u: u0,
                        r_new: n0,
                        u_new: m0,
                        stream,
                    },
                    Update::Into {
                        r: r1,
                        u: u1,
                        r_new: n1,
                        u_new: m1,
                        stream,
                    },
                )
            }
        }
    }

    /// Where `v` is (after the accumulation).
    pub fn new_r(&self) -> &[f32] {
        match self {
            Update::InPlace { r, .. } => r,
            Update::Into { r_new, .. } => r_new,
        }
    }
}

/// Where one SIMD accumulation body reads and writes (`r == r_new`, `u == u_new` in place).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
struct Ptrs {
    r: *const f32,
    u: *const f32,
    g: *const f32,
    r_new: *mut f32,
    u_new: *mut f32,
    /// Non-temporal stores into `r_new` (`u_new`): aligned and not read back by the body.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    stream_r: bool,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    stream_u: bool,
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl Ptrs {
    /// The pointers of `upd` and `g`. With `stream_align`, an [`Update::Into`] that asks to
    /// stream does so into each new slice that starts at a multiple of that many bytes.
    fn new(upd: Update<'_>, g: &[f32], stream_align: Option<usize>) -> Ptrs {
        let streams = |x: &[f32], stream: bool| {
            stream && stream_align.is_some_and(|a| (x.as_ptr() as usize).is_multiple_of(a))
        };
        match upd {
            Update::InPlace { r, u } => {
                let (rp, up) = (r.as_mut_ptr(), u.as_mut_ptr());
                Ptrs {
                    r: rp,
                    u: up,
                    g: g.as_ptr(),
                    r_new: rp,
                    u_new: up,
                    stream_r: false,
                    stream_u: false,
                }
            }
            Update::Into {
                r,
                u,
                r_new,
                u_new,
                stream,
            } => Ptrs {
                r: r.as_ptr(),
                u: u.as_ptr(),
                g: g.as_ptr(),
                stream_r: streams(r_new, stream),
                stream_u: streams(u_new, stream),
                r_new: r_new.as_mut_ptr(),
                u_new: u_new.as_mut_ptr(),
            },
        }
    }
}

impl Accumulated {
    /// The result of one pass over this part followed by `next`.
    fn then(self, next: Accumulated) -> Accumulated {
        Accumulated {
            count: self.count + next.count,
            max_mag: self.max_mag.max(next.max_mag),
        }
    }
}

/// The shape every SIMD accumulation shares: the scalar kernel runs the first `head`
/// elements (to align the stores) and the tail, `simd(part, g, list, base)` the body between
/// them (a multiple of `block` elements), and the results are joined as one pass would have
/// made them.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn with_scalar_ends(
    rule: Momentum,
    upd: Update<'_>,
    g: &[f32],
    gather_at: Option<u32>,
    list: &mut [u32],
    base: u32,
    head: usize,
    block: usize,
    simd: impl FnOnce(Update<'_>, &[f32], &mut [u32], u32) -> Accumulated,
) -> Accumulated {
    let n = upd.len(rule).min(g.len());
    let head = head.min(n);
    let body = (n - head) / block * block;
    let (upd, _) = upd.split_at(n, rule);
    let (first, rest) = upd.split_at(head, rule);
    let (mid, last) = rest.split_at(body, rule);
    let (g0, rest) = g[..n].split_at(head);
    let (g1, g2) = rest.split_at(body);
    let at = |base: u32, from: usize| base.wrapping_add(from as u32);
    let a = scalar::accumulate(rule, first, g0, gather_at, list, base);
    let b = simd(
        mid,
        g1,
        list.get_mut(a.count..).unwrap_or(&mut []),
        at(base, head),
    );
    let ab = a.then(b);
    let c = scalar::accumulate(
        rule,
        last,
        g2,
        gather_at,
        list.get_mut(ab.count..).unwrap_or(&mut []),
        at(base, head + body),
    );
    ab.then(c)
}

/// Error feedback (and momentum) over a whole slice, fused with the candidate gather: see
/// [`scalar::accumulate`]. `u` may be empty without momentum; otherwise all lengths match.
pub fn accumulate(
    level: Level,
    rule: Momentum,
    upd: Update<'_>,
    g: &[f32],
    gather_at: Option<u32>,
    list: &mut [u32],
    base: u32,
) -> Accumulated {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 && avx2() {
        return x86_64::accumulate(rule, upd, g, gather_at, list, base);
    }
    #[cfg(target_arch = "aarch64")]
    if level == Level::Neon {
        return aarch64::accumulate(rule, upd, g, gather_at, list, base);
    }
    let _ = level;
    scalar::accumulate(rule, upd, g, gather_at, list, base)
}

/// The largest magnitude bits of `x`: see [`scalar::max_mag`].
pub fn max_mag(level: Level, x: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 && avx2() {
        return x86_64::max_mag(x);
    }
    #[cfg(target_arch = "aarch64")]
    if level == Level::Neon {
        return aarch64::max_mag(x);
    }
    let _ = level;
    scalar::max_mag(x)
}

/// Read-only gather of `|x| >= at`: see [`scalar::gather`].
pub fn gather(level: Level, x: &[f32], at: u32, list: &mut [u32], base: u32) -> usize {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 && avx2() {
        return x86_64::gather(x, at, list, base);
    }
    #[cfg(target_arch = "aarch64")]
    if level == Level::Neon {
        return aarch64::gather(x, at, list, base);
    }
    let _ = level;
    scalar::gather(x, at, list, base)
}

/// Dense codes and residuals: see [`scalar::quantize_dense`] (finite values only).
pub fn quantize_dense(level: Level, quant: Quant, scale: f32, r: &mut [f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 && avx2() && x86_64::quantize_dense(quant, scale, r, out) {
        return;
    }
    let _ = level;
    scalar::quantize_dense(quant, scale, r, out)
}

/// Dense f16 decode-add: see [`scalar::decode_add_f16`].
pub fn decode_add_f16(level: Level, codes: &[u8], out: &mut [f32], scale: f32) -> bool {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 && avx2() && f16c() {
        return x86_64::decode_add_f16(codes, out, scale);
    }
    let _ = level;
    scalar::decode_add_f16(codes, out, scale)
}

#[cfg(all(target_arch = "x86_64", feature = "std"))]
fn f16c() -> bool {
    std::is_x86_feature_detected!("f16c")
}

#[cfg(all(target_arch = "x86_64", not(feature = "std")))]
fn f16c() -> bool {
    cfg!(target_feature = "f16c")
}

/// Magnitude bits: see [`scalar::magnitudes`].
pub fn magnitudes(level: Level, x: &[f32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 && avx2() {
        return x86_64::magnitudes(x, out);
    }
    #[cfg(target_arch = "aarch64")]
    if level == Level::Neon {
        return aarch64::magnitudes(x, out);
    }
    let _ = level;
    scalar::magnitudes(x, out)
}

/// The whole-tensor passes of one `compress` call, at one kernel level and thread count.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Passes {
    pub level: Level,
    /// Threads for the passes over whole tensors (unused without `std`).
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    pub threads: usize,
}

impl Passes {
    pub fn new(threads: usize) -> Self {
        Passes {
            level: Level::active(),
            threads,
        }
    }

    /// `v` (and the new velocity) into `upd`'s destination, gathering `|v| >= gather_at`
    /// into `list`; the candidate count and the largest new magnitude. When a new value is not finite:
    /// [`Error::NonFiniteGradient`] if `g` is not finite, else [`Error::Overflow`].
    pub fn accumulate(
        &self,
        rule: Momentum,
        upd: Update<'_>,
        g: &[f32],
        gather_at: Option<u32>,
        list: &mut [u32],
    ) -> Result<Accumulated, Error> {
        #[cfg(feature = "std")]
        let a = parallel::accumulate_par(self.level, self.threads, rule, upd, g, gather_at, list);
        #[cfg(not(feature = "std"))]
        let a = accumulate(self.level, rule, upd, g, gather_at, list, 0);
        if a.finite() {
            Ok(a)
        } else if self.all_finite(g) {
            Err(Error::Overflow)
        } else {
            Err(Error::NonFiniteGradient)
        }
    }

    /// Whether every element of `x` is finite.
    pub fn all_finite(&self, x: &[f32]) -> bool {
        self.max_mag(x) < 0x7f80_0000
    }

    /// Calls `f(offset, part)` for consecutive parts of `data` (part lengths multiples of
    /// `align`), on up to `threads` threads when each gets at least `min_part` elements.
    pub fn for_parts<T: Send>(
        &self,
        data: &mut [T],
        align: usize,
        min_part: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        #[cfg(feature = "std")]
        {
            let t = self
                .threads
                .min(parallel::MAX_THREADS)
                .min(data.len() / min_part.max(1));
            if t > 1 {
                let part = data.len().div_ceil(t).next_multiple_of(align.max(1));
                let used = data.len().div_ceil(part);
                let mut parts: [_; parallel::MAX_THREADS] = core::array::from_fn(|_| (0, None));
                for (j, (slot, chunk)) in parts.iter_mut().zip(data.chunks_mut(part)).enumerate() {
                    *slot = (j * part, Some(chunk));
                }
                parallel::each(self.threads, &mut parts[..used], |(offset, chunk)| {
                    if let Some(chunk) = chunk {
                        f(*offset, chunk);
                    }
                });
                return;
            }
        }
        let _ = (align, min_part);
        f(0, data)
    }

    /// Calls `f` on every item, the items on up to `threads` threads (the first on the
    /// calling thread); in turn on one thread, or without `std`.
    pub fn each<T: Send>(&self, items: &mut [T], f: impl Fn(&mut T) + Sync) {
        #[cfg(feature = "std")]
        return parallel::each(self.threads, items, f);
        #[cfg(not(feature = "std"))]
        items.iter_mut().for_each(f)
    }

    /// Read-only gather over `x` into `list` (indices from 0).
    pub fn gather(&self, x: &[f32], at: u32, list: &mut [u32]) -> usize {
        gather(self.level, x, at, list, 0)
    }

    /// The largest magnitude bits of `x`.
    pub fn max_mag(&self, x: &[f32]) -> u32 {
        #[cfg(feature = "std")]
        return parallel::max_mag_par(self.level, self.threads, x);
        #[cfg(not(feature = "std"))]
        max_mag(self.level, x)
    }

    /// Dense codes of `r` into `out`, the quantisation error left in `r`.
    pub fn quantize_dense(&self, quant: Quant, scale: f32, r: &mut [f32], out: &mut [u8]) {
        quantize_dense(self.level, quant, scale, r, out)
    }

    /// Magnitude bits of `x` into `out`.
    pub fn magnitudes(&self, x: &[f32], out: &mut [u32]) {
        magnitudes(self.level, x, out)
    }
}
