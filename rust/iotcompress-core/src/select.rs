//! Which entries of the accumulated vector `v` are sent.
//!
//! * **Threshold** `Wt` (Strom, Interspeech 2015; the seed's step one): send every entry
//!   with `|v| >= Wt`. One pass, no sorting; devices on poor links use a higher `Wt`.
//! * **Top-k, exact**: the `k = ceil(density·n)` largest magnitudes (ties broken by lower
//!   index). On large tensors it runs the sampled path below aiming at `1.5k` candidates;
//!   once at least `k` arrive they hold the `k` largest, and `select_nth_unstable` over the
//!   candidates gives the exact answer. If the estimates miss, or the tensor is small, it
//!   selects over all magnitudes.
//! * **Top-k, sampled** (DGC, Lin et al., ICLR 2018, §3.1 and its reference code): estimate
//!   the threshold from a stratified random sample of `max(0.1 %·n, 64/density)` magnitudes
//!   (read in runs of four adjacent elements, one run per stratum), aiming at `1.2k`
//!   candidates; gather the candidates during the accumulation pass itself; if more than
//!   `k` arrive, pick the exact top-k among the candidates only. The count never exceeds
//!   `k`; it falls below `0.8k` only if several re-estimates all miss.
//! * **Dense**: everything.
//! * **Adaptive** ([`ThresholdController`]): threshold mode whose `Wt` is adjusted each step
//!   to hit a target density or byte budget, for devices that stream the gradient and cannot
//!   hold it for a top-k. A byte budget is never exceeded (see [`Target::Bytes`]); with
//!   [`crate::NetworkProfile::bytes_within`] it keeps a device's `T_c` within a time budget.
//!
//! Magnitudes are compared as the integer bits of `|v|`, which order like the floats.

use crate::float::{ceil_usize, sqrt_f64};

/// The selection rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selection {
    /// Send every element.
    Dense,
    /// Send `|v| >= Wt`.
    Threshold(f32),
    /// Send the `ceil(density·n)` largest magnitudes.
    TopK {
        /// Fraction of elements to send, in (0, 1].
        density: f64,
        /// Exact selection (all magnitudes) instead of DGC's sampled estimate.
        exact: bool,
    },
    /// Threshold mode with `Wt` adapted step to step towards a target.
    Adaptive(Target),
}

/// What the adaptive threshold aims at.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// A fraction of elements per message, in (0, 1].
    Density(f64),
    /// Bytes per message: a budget. The threshold aims at it, and a step whose threshold
    /// picks more than fits sends only the largest entries that fit for certain
    /// ([`entries_within`]); the rest stays in the residual.
    Bytes(u32),
}

/// `ceil(density·n)` for the decimal the caller wrote, at least 1 for a non-empty tensor,
/// at most `n`.
///
/// The f64 product of a decimal density and `n` can land just above a whole number
/// (`0.1 * 30 = 3.0000000000000004`), so it is shrunk by 2^-45 of itself before rounding up:
/// 128 times its worst rounding error, and far below the fraction any short decimal leaves
/// (`0.001 * 2_000_001 = 2000.001` still gives 2001).
pub fn k_for_density(density: f64, numel: usize) -> usize {
    if numel == 0 {
        return 0;
    }
    let k = density * numel as f64;
    ceil_usize(k - k / (1u64 << 45) as f64).clamp(1, numel)
}

/// The k-th largest magnitude (1-based) of `mags` and how many of the k largest are strictly
/// larger (the rest are ties). Reorders `mags`. `1 <= k <= mags.len()`.
pub(crate) fn kth_largest(mags: &mut [u32], k: usize) -> (u32, usize) {
    let (above, &mut t, _) = mags.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    let greater = above.iter().filter(|&&m| m > t).count();
    (t, greater)
}

/// Scratch layout of DGC's sampled top-k for `n` elements and target `k`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SamplePlan {
    pub sample: usize,
    pub cap: usize,
    /// The sample would cover most of the tensor: use the exact algorithm instead.
    pub exact: bool,
}

impl SamplePlan {
    pub fn new(numel: usize, k: usize) -> Self {
        let density = k as f64 / numel.max(1) as f64;
        let by_hits = ceil_usize(64.0 / density.max(1e-12));
        let sample = (numel / 1000).max(by_hits).max(256);
        let cap = (2 * k + 64).min(numel);
        // Sampling pays off only when sample and candidates are a small part of the tensor.
        let exact = sample.saturating_mul(2) >= numel || sample + 2 * cap >= numel;
        SamplePlan { sample, cap, exact }
    }

    /// Scratch words: sample, candidate indices, candidate magnitudes.
    pub fn scratch_len(&self, numel: usize) -> usize {
        if self.exact {
            numel
        } else {
            self.sample + 2 * self.cap
        }
    }

    /// Sample hits whose magnitude becomes the threshold, for `aim` expected candidates.
    pub fn hits_for(&self, numel: usize, aim: f64) -> usize {
        let h = (aim * self.sample as f64 / numel as f64 + 0.5) as usize;
        h.clamp(1, self.sample)
    }
}

/// The most entries a message of `numel` elements may carry and still be at most `bytes`
/// long wherever they lie ([`crate::wire::message_len_bound`]); 0 when even that does not fit.
pub fn entries_within(bytes: usize, numel: usize, quant: crate::Quant) -> usize {
    let fits = |k: usize| crate::wire::message_len_bound(numel, k, quant) <= bytes;
    if fits(numel) {
        return numel;
    }
    // The bound increases with k: the largest k that fits, by bisection (0 if none does).
    let (mut lo, mut hi) = (0usize, numel);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Candidate-list capacity in threshold mode; beyond it the selection rescans instead.
pub(crate) fn threshold_list_cap(numel: usize) -> usize {
    numel.min((numel / 8).max(4096))
}

/// Adapts `Wt` multiplicatively: `Wt ← Wt · clamp((sent / target)^(1/8), 0.7, 1.4)`.
///
/// The count above `Wt` is steep in `Wt` (in a Gaussian tail at 1 % density,
/// `d log count / d log Wt ≈ −6`), and error feedback makes the residual grow while `Wt` is
/// too high, so the controller moves by the eighth root of the miss; the clamp bounds the
/// change per step so one odd gradient cannot swing it. The first step has no `Wt` yet: it runs a sampled top-k and takes the smallest
/// magnitude it sent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ThresholdController {
    /// The current threshold; 0 before the first step.
    pub threshold: f32,
    /// Measured bits per sent entry of the last message (index + value + its header share).
    pub bits_per_entry: f32,
}

impl ThresholdController {
    /// An uncalibrated controller.
    pub const fn new() -> Self {
        ThresholdController {
            threshold: 0.0,
            bits_per_entry: 0.0,
        }
    }

    /// Whether this is a state the controller can be in: both fields finite and `>= 0` (a
    /// threshold of infinity would never send anything again). Checked before a loaded
    /// checkpoint is taken.
    pub fn is_valid(&self) -> bool {
        let ok = |x: f32| x.is_finite() && x >= 0.0;
        ok(self.threshold) && ok(self.bits_per_entry)
    }

    /// The entry count to aim at this step.
    pub fn target_count(&self, target: Target, numel: usize, value_bits: u32) -> usize {
        match target {
            Target::Density(d) => k_for_density(d, numel),
            Target::Bytes(b) => {
                let body_bits = (b as f64 - 16.0).max(8.0) * 8.0;
                let bpe = if self.bits_per_entry > 0.0 {
                    self.bits_per_entry as f64
                } else {
                    value_bits as f64 + 12.0
                };
                ((body_bits / bpe) as usize)
                    .clamp(1, numel.max(1))
                    .min(numel)
            }
        }
    }

    /// Feeds back one step: `sent` entries went out in `bytes` bytes against `target`.
    pub fn update(&mut self, sent: usize, target: usize, bytes: usize) {
        if sent > 0 {
            self.bits_per_entry = (bytes as f32 * 8.0) / sent as f32;
        }
        let ratio = sent as f64 / target.max(1) as f64;
        // ratio^(1/8) by three square roots.
        let factor = sqrt_f64(sqrt_f64(sqrt_f64(ratio))).clamp(0.7, 1.4);
        self.threshold = (self.threshold as f64 * factor) as f32;
    }
}

impl Default for ThresholdController {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::k_for_density;

    #[test]
    fn decimal_densities_round_as_written() {
        assert_eq!(k_for_density(0.001, 20_000), 20);
        assert_eq!(k_for_density(0.001, 2_000_001), 2001);
        assert_eq!(k_for_density(0.1, 30), 3);
        assert_eq!(k_for_density(159.0 / 4456.0, 4456), 159);
        assert_eq!(k_for_density(0.001, 25_557_032), 25_558);
        assert_eq!(k_for_density(0.01, 1_000_000), 10_000);
        assert_eq!(k_for_density(0.1, 32), 4);
        assert_eq!(k_for_density(0.5, 3), 2);
        assert_eq!(k_for_density(1e-9, 10), 1);
        assert_eq!(k_for_density(1.0, 10), 10);
    }
}
