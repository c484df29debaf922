//! Error feedback and DGC momentum correction: the state that makes sparsification lossless
//! over time. Each step accumulates the update into the residual `r`; what is not sent stays
//! there for later steps ("nothing is lost, only delayed").
//!
//! Update rules, per element (Lin et al., "Deep Gradient Compression", ICLR 2018, §3.2):
//!
//! | momentum | velocity `u` | accumulated `v` |
//! | --- | --- | --- |
//! | none | – | `v = r + g` |
//! | vanilla, factor `m` | `u = m·u + g` | `v = r + u` |
//! | Nesterov, factor `m` | `u = m·(u + g)` | `v = (r + u) + g` |
//!
//! After selection and quantisation the new residual is `r = v − decoded`, and DGC's
//! *momentum factor masking* zeroes `u` wherever an entry was sent, so stale momentum does
//! not keep pushing a weight that has just been updated. Without momentum the invariant
//! `decoded + r_new == r_old + g` holds elementwise (bit-exact with f32 values).

/// Momentum correction applied before selection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Momentum {
    /// Plain error feedback.
    None,
    /// DGC momentum correction with factor `m` in [0, 1).
    Vanilla(f32),
    /// DGC Nesterov momentum correction with factor `m` in [0, 1).
    Nesterov(f32),
}

impl Momentum {
    /// Builds from the Python-style pair `(momentum, nesterov)`; factor 0 means none.
    pub fn new(factor: f32, nesterov: bool) -> Momentum {
        match (factor, nesterov) {
            (0.0, _) => Momentum::None,
            (m, false) => Momentum::Vanilla(m),
            (m, true) => Momentum::Nesterov(m),
        }
    }

    /// The momentum factor (0 for none).
    pub fn factor(self) -> f32 {
        match self {
            Momentum::None => 0.0,
            Momentum::Vanilla(m) | Momentum::Nesterov(m) => m,
        }
    }

    /// Whether a velocity buffer is kept.
    pub fn has_velocity(self) -> bool {
        !matches!(self, Momentum::None)
    }
}

/// One element of the accumulation: returns `(v, u_new)`. Every code path (full pass,
/// on-the-fly sampling) calls this, so they agree bit for bit.
#[inline(always)]
pub(crate) fn accumulate_one(momentum: Momentum, r: f32, u: f32, g: f32) -> (f32, f32) {
    match momentum {
        Momentum::None => (r + g, u),
        Momentum::Vanilla(m) => {
            let u = m * u + g;
            (r + u, u)
        }
        Momentum::Nesterov(m) => {
            let u = m * (u + g);
            (r + u + g, u)
        }
    }
}
