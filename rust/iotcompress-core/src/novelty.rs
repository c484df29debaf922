//! The novelty filter: keep a sample only if it differs enough from what was kept before.
//!
//! A device's own data is mostly repetition (overlapping accelerometer windows, a power
//! trace that is flat for hours), so it filters its samples before it trains on or sends
//! them. Each sample (`channels` rows of equal length, row-major) is reduced to a *view*:
//! every row averaged over blocks of `pool` values, and for [`Metric::Cosine`] each row
//! centred and the whole view scaled to unit length (so the squared distance of two views
//! is `2 - 2 cos`). The filter remembers the views of the last `capacity` kept samples in a
//! ring of caller-owned memory ([`bank_len`] floats) and keeps a sample when its squared
//! distance to every remembered view is at least `threshold²`.
//!
//! * **Exact** (`keep == 0`): the threshold is fixed, so no two kept samples less than
//!   `capacity` keeps apart are closer than `threshold`.
//! * **Adaptive** (`0 < keep <= 1`): the threshold follows the stream to keep about that
//!   fraction, like the adaptive `Wt` of [`crate::ThresholdController`]: after each decision
//!   it is multiplied by `1 + rate (1 - keep)` (kept) or `1 - rate keep` (dropped). A zero
//!   starting threshold is set from the first distance measured.
//!
//! Everything is IEEE f32 basic arithmetic in a fixed order (the squared distances sum in 8
//! lanes, reduced as a tree), so Rust, C on a Cortex-M4F and Python decide the same.
//!
//! ```
//! use iotcompress_core::novelty::{bank_len, Metric, NoveltyConfig, NoveltyFilter};
//!
//! let config = NoveltyConfig { threshold: 0.5, ..NoveltyConfig::new(4, 8) };
//! let mut bank = vec![0.0f32; bank_len(&config).unwrap()];
//! let mut filter = NoveltyFilter::new(config).unwrap();
//! assert!(filter.offer(&mut bank, &[1.0, 0.0, 0.0, 0.0]).unwrap());
//! assert!(!filter.offer(&mut bank, &[1.0, 0.01, 0.0, 0.0]).unwrap()); // nearly the same
//! assert!(filter.offer(&mut bank, &[0.0, 1.0, 0.0, 0.0]).unwrap());
//! assert_eq!((filter.seen(), filter.kept()), (3, 2));
//! ```

use crate::float::sqrt_f32 as sqrt;
use crate::Error;

/// The most views a filter remembers (a ring index stays far from overflow).
pub const MAX_CAPACITY: u32 = 1 << 24;

/// Lanes of the distance sum: the scalar order every implementation follows.
const LANES: usize = 8;

/// How two views are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Metric {
    /// Squared L2 distance of the pooled values (the units of the data).
    Euclidean = 0,
    /// Squared L2 distance of centred, unit-length views: `2 - 2 cos`, in `[0, 4]`;
    /// blind to offset and scale.
    Cosine = 1,
}

impl Metric {
    /// The metric of a stable id (0 Euclidean, 1 Cosine).
    pub const fn from_id(id: u32) -> Option<Metric> {
        match id {
            0 => Some(Metric::Euclidean),
            1 => Some(Metric::Cosine),
            _ => None,
        }
    }

    /// Its name, as the Python API spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Metric::Euclidean => "euclidean",
            Metric::Cosine => "cosine",
        }
    }
}

/// The filter's options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoveltyConfig {
    /// Values in one sample (`channels` rows of `dim / channels`).
    pub dim: u32,
    /// Rows of a sample (sensor axes); must divide `dim`. Pooling stays within a row.
    pub channels: u32,
    /// Values averaged into one view value (1: no downsampling).
    pub pool: u32,
    /// Kept views remembered (the ring's size), at most [`MAX_CAPACITY`].
    pub capacity: u32,
    /// How views are compared.
    pub metric: Metric,
    /// Distance below which a sample is redundant; with `keep > 0` the starting value (0: set
    /// from the first distance measured).
    pub threshold: f32,
    /// Target fraction of samples kept, in `(0, 1]`; 0 for a fixed threshold.
    pub keep: f32,
    /// Adaptation step of the threshold, in `(0, 1)`.
    pub rate: f32,
}

impl NoveltyConfig {
    /// `dim` values a sample, one channel, no pooling, `capacity` views, cosine, a fixed
    /// threshold of 0 (set one), rate 0.05.
    pub const fn new(dim: u32, capacity: u32) -> NoveltyConfig {
        NoveltyConfig {
            dim,
            channels: 1,
            pool: 1,
            capacity,
            metric: Metric::Cosine,
            threshold: 0.0,
            keep: 0.0,
            rate: 0.05,
        }
    }

    /// Checks every option; `InvalidConfig` names nothing, so the faces check with reasons.
    // `is_multiple_of` is newer than Debian's rustc (1.85), which builds the core for Cortex-M.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn validate(&self) -> Result<(), Error> {
        let ok = self.dim > 0
            && self.channels > 0
            && self.dim % self.channels == 0
            && self.pool > 0
            && self.capacity > 0
            && self.capacity <= MAX_CAPACITY
            && self.threshold.is_finite()
            && self.threshold >= 0.0
            && (0.0..=1.0).contains(&self.keep)
            && (self.keep == 0.0 || (self.rate > 0.0 && self.rate < 1.0));
        let fits = matches!(bank_len(self), Some(n) if n <= isize::MAX as usize / 4);
        match ok && fits {
            true => Ok(()),
            false => Err(Error::InvalidConfig),
        }
    }
}

/// Floats of one view: `channels * ceil(row / pool)`.
pub const fn view_len(config: &NoveltyConfig) -> Option<usize> {
    if config.channels == 0 || config.pool == 0 {
        return None;
    }
    let row = (config.dim / config.channels) as usize;
    (config.channels as usize).checked_mul(row.div_ceil(config.pool as usize))
}

/// Floats of the memory the caller provides: `(capacity + 1)` views (one is the work view).
pub const fn bank_len(config: &NoveltyConfig) -> Option<usize> {
    match view_len(config) {
        Some(v) => v.checked_mul(config.capacity as usize + 1),
        None => None,
    }
}

/// The filter's state: the configuration, the ring's position and the adaptive threshold.
/// Plain data (a checkpoint is a copy of it and of the bank); the views live in the caller's
/// bank of [`bank_len`] floats, passed to every call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoveltyFilter {
    config: NoveltyConfig,
    view: usize,
    /// The work slot of the ring; the remembered views are the `stored` slots before it.
    head: u32,
    stored: u32,
    threshold: f32,
    seen: u64,
    kept: u64,
}

impl NoveltyFilter {
    /// A filter with nothing remembered.
    pub fn new(config: NoveltyConfig) -> Result<NoveltyFilter, Error> {
        config.validate()?;
        Ok(NoveltyFilter {
            config,
            view: view_len(&config).ok_or(Error::InvalidConfig)?,
            head: 0,
            stored: 0,
            threshold: config.threshold,
            seen: 0,
            kept: 0,
        })
    }

    /// Rebuilds a filter from its parts (the C layer's transparent struct); checks them.
    pub fn from_parts(
        config: NoveltyConfig,
        head: u32,
        stored: u32,
        threshold: f32,
        seen: u64,
        kept: u64,
    ) -> Result<NoveltyFilter, Error> {
        let mut f = NoveltyFilter::new(config)?;
        let valid = head <= config.capacity
            && stored <= config.capacity
            && threshold.is_finite()
            && threshold >= 0.0
            && kept <= seen;
        if !valid {
            return Err(Error::InvalidConfig);
        }
        (f.head, f.stored, f.threshold, f.seen, f.kept) = (head, stored, threshold, seen, kept);
        Ok(f)
    }

    /// The configuration.
    pub fn config(&self) -> &NoveltyConfig {
        &self.config
    }

    /// The current threshold (a distance).
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Samples offered so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Samples kept so far.
    pub fn kept(&self) -> u64 {
        self.kept
    }

    /// The ring's work slot and the number of remembered views (for the C layer's struct).
    pub fn ring(&self) -> (u32, u32) {
        (self.head, self.stored)
    }

    /// Decides on one sample of `dim` values: `true` to keep it (then it is remembered).
    ///
    /// Errors leave the filter and the remembered views unchanged: `LengthMismatch` (the
    /// sample is not `dim` values or the bank not [`bank_len`]), `NonFiniteGradient` (the
    /// sample holds NaN or infinity).
    pub fn offer(&mut self, bank: &mut [f32], sample: &[f32]) -> Result<bool, Error> {
        if sample.len() != self.config.dim as usize || Some(bank.len()) != bank_len(&self.config) {
            return Err(Error::LengthMismatch);
        }
        if !sample.iter().all(|v| v.is_finite()) {
            return Err(Error::NonFiniteGradient);
        }
        let slots = self.config.capacity + 1;
        let (v, head) = (self.view, self.head as usize);
        let (before, rest) = bank.split_at_mut(head * v);
        let (work, after) = rest.split_at_mut(v);
        make_view(&self.config, sample, work);
        // The remembered views, newest first (a stream repeats its recent past).
        let limit = self.threshold * self.threshold;
        let mut nearest = f32::INFINITY;
        for back in 1..=self.stored as usize {
            let slot = (head + slots as usize - back) % slots as usize;
            let other = match slot.cmp(&head) {
                core::cmp::Ordering::Less => &before[slot * v..(slot + 1) * v],
                _ => &after[(slot - head - 1) * v..(slot - head) * v],
            };
            nearest = nearest.min(squared_distance(work, other));
            if nearest < limit {
                break;
            }
        }
        // `f32::min` skips NaN, so `nearest` is a number or infinity.
        let keep = nearest >= limit;
        self.seen += 1;
        if keep {
            self.kept += 1;
            self.head = (self.head + 1) % slots;
            self.stored = (self.stored + 1).min(self.config.capacity);
        }
        self.adapt(keep, nearest);
        Ok(keep)
    }

    /// The adaptive threshold's step after a decision.
    fn adapt(&mut self, keep: bool, nearest: f32) {
        let rho = self.config.keep;
        if rho == 0.0 {
            return;
        }
        if self.threshold == 0.0 {
            // Start at the first distance measured (a first sample measures none).
            if nearest.is_finite() {
                self.threshold = sqrt(nearest);
            }
            return;
        }
        let rate = self.config.rate;
        let factor = if keep {
            1.0 + rate * (1.0 - rho)
        } else {
            1.0 - rate * rho
        };
        let t = self.threshold * factor;
        // Stay finite and positive whatever the stream does.
        self.threshold = if t.is_finite() && t > f32::MIN_POSITIVE {
            t
        } else {
            self.threshold
        };
    }
}

/// Writes the view of `sample` into `out` (`view_len` floats): row-wise block means, then
/// for cosine each row centred and the whole view scaled to unit length (an all-constant
/// sample's view is zero).
pub fn make_view(config: &NoveltyConfig, sample: &[f32], out: &mut [f32]) {
    let channels = config.channels as usize;
    let row = sample.len() / channels;
    let pool = config.pool as usize;
    let per_row = out.len() / channels;
    for (src, dst) in sample.chunks_exact(row).zip(out.chunks_exact_mut(per_row)) {
        for (block, o) in src.chunks(pool).zip(dst.iter_mut()) {
            *o = block.iter().fold(0.0f32, |s, &x| s + x) / block.len() as f32;
        }
        if config.metric == Metric::Cosine {
            let mean = dst.iter().fold(0.0f32, |s, &x| s + x) / per_row as f32;
            dst.iter_mut().for_each(|o| *o -= mean);
        }
    }
    if config.metric == Metric::Cosine {
        let norm = sqrt(lane_sum(out.iter().map(|&x| x * x)));
        let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
        out.iter_mut().for_each(|o| *o *= inv);
    }
}

/// `sum (a_i - b_i)²` in the specified order: value `i` goes to lane `i % 8`, the lanes are
/// reduced as `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))` (the order of an 8-wide SIMD sum).
pub fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    lane_sum(a.iter().zip(b).map(|(&x, &y)| (x - y) * (x - y)))
}

fn lane_sum(terms: impl Iterator<Item = f32>) -> f32 {
    let mut l = [0.0f32; LANES];
    for (i, t) in terms.enumerate() {
        l[i % LANES] += t;
    }
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqrt_is_close() {
        for &x in &[1.0f32, 2.0, 1e-30, 1e30, 0.25, 3.5] {
            let s = sqrt(x) as f64;
            assert!((s - (x as f64).sqrt()).abs() <= 2e-7 * s, "{x}");
        }
        assert_eq!(sqrt(0.0), 0.0);
    }
}
