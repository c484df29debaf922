//! Value quantisers. Each maps a selected value `v` to a fixed-width code and back;
//! the one message-wide scale is derived from statistics of the selected values.
//!
//! | quantiser | code | scale | decoded value | error bound per entry |
//! | --- | --- | --- | --- | --- |
//! | `F32` | 32 bits | – | `v` | 0 |
//! | `F16` | 16 bits, IEEE binary16, RNE, saturating | – | `v` rounded | `2^-11·|v| + 2^-25` (|v| ≤ 65504) |
//! | `Bf16` | 16 bits, bfloat16, RNE | – | `v` rounded | `2^-8·|v|` |
//! | `Int8` | two's complement in [-127, 127] | `max|v|/127` | `code·scale` | `scale/2` |
//! | `Int4` | two's complement in [-7, 7] | `max|v|/7` | `code·scale` | `scale/2` |
//! | `Sign` | 1 bit (1 = negative) | `mean|v|` | `±scale` | `max(|v|, scale)` |
//! | `Ternary` | trit, 5 per byte | `max|v|` | `{-1,0,1}·scale`, unbiased | `scale` |
//! | `Qsgd{s}` | sign bit + level in [0, s] | `max|v|` | `sign·level·scale/s`, unbiased | `scale/s` |
//!
//! The bounds hold up to f32 rounding and, where a scale or code unit is subnormal, the
//! absolute precision of subnormals (2^-149 per operation).
//!
//! Sources: half precision is IEEE 754-2008; bfloat16 is Google Brain's format;
//! `Sign` is 1-bit SGD with error feedback (Seide et al., Interspeech 2014; Karimireddy
//! et al., "Error Feedback Fixes SignSGD", ICML 2019), whose scale is the mean magnitude
//! (Strom, Interspeech 2015, sends ±Wt, and mean|v| ≥ Wt in threshold mode);
//! `Ternary` is TernGrad (Wen et al., NeurIPS 2017): `P(code = sign(v)) = |v|/max|v|`;
//! `Qsgd` is QSGD (Alistarh et al., NeurIPS 2017): `level = floor(s|v|/scale) + Bernoulli(frac)`,
//! with the max-norm scale of its ∞-norm variant rather than `‖v‖₂`: the variance per entry
//! is at most `(max|v|/s)²/4` instead of `(‖v‖₂/s)²/4`, which keeps error feedback
//! contractive on dense selections of large tensors (with `‖v‖₂` and s = 15 on 38k
//! elements, one message's error is twice the gradient's norm and the residual diverges).
//! The stochastic quantisers draw from [`crate::rng`], seeded per message.

use crate::float::{
    abs, bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, is_finite_bits, round_half_away,
};
use crate::rng;

/// A value quantiser. `Qsgd { levels }` takes `levels` in `1..=255`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quant {
    /// Full precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit integers with one scale per message.
    Int8,
    /// 4-bit integers with one scale per message.
    Int4,
    /// One bit per value and one magnitude per message.
    Sign,
    /// Stochastic ternary {-1, 0, +1} times the maximum magnitude.
    Ternary,
    /// Stochastic quantisation to `levels` levels of the L2 norm.
    Qsgd {
        /// Number of non-zero levels `s`.
        levels: u8,
    },
}

/// Statistics of the selected values that the scales are made of.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ValueStats {
    pub max_abs: f32,
    pub sum_abs: f64,
}

impl Quant {
    /// The default QSGD level count for `"qsgd"` (4 level bits + 1 sign bit).
    pub const DEFAULT_QSGD_LEVELS: u8 = 15;

    /// The wire id (low four bits of the codec byte).
    pub const fn id(self) -> u8 {
        match self {
            Quant::F32 => 0,
            Quant::F16 => 1,
            Quant::Bf16 => 2,
            Quant::Int8 => 3,
            Quant::Int4 => 4,
            Quant::Sign => 5,
            Quant::Ternary => 6,
            Quant::Qsgd { .. } => 7,
        }
    }

    /// Parses a name: `f32 f16 bf16 int8 int4 sign ternary qsgd qsgd:S` (S in 1..=255).
    pub fn from_name(name: &str) -> Option<Quant> {
        Some(match name {
            "f32" => Quant::F32,
            "f16" => Quant::F16,
            "bf16" => Quant::Bf16,
            "int8" => Quant::Int8,
            "int4" => Quant::Int4,
            "sign" => Quant::Sign,
            "ternary" => Quant::Ternary,
            "qsgd" => Quant::Qsgd {
                levels: Self::DEFAULT_QSGD_LEVELS,
            },
            _ => {
                let levels: u8 = name.strip_prefix("qsgd:")?.parse().ok()?;
                if levels == 0 {
                    return None;
                }
                Quant::Qsgd { levels }
            }
        })
    }

    /// The short name (`qsgd` for every level count; see [`Quant::levels`]).
    pub const fn name(self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::Bf16 => "bf16",
            Quant::Int8 => "int8",
            Quant::Int4 => "int4",
            Quant::Sign => "sign",
            Quant::Ternary => "ternary",
            Quant::Qsgd { .. } => "qsgd",
        }
    }

    /// QSGD's level count, 0 for the other quantisers.
    pub const fn levels(self) -> u8 {
        match self {
            Quant::Qsgd { levels } => levels,
            _ => 0,
        }
    }

    /// Whether the header carries a scale.
    pub const fn has_scale(self) -> bool {
        !matches!(self, Quant::F32 | Quant::F16 | Quant::Bf16)
    }

    /// Whether the quantiser draws random numbers (the header carries the stream).
    pub const fn is_stochastic(self) -> bool {
        matches!(self, Quant::Ternary | Quant::Qsgd { .. })
    }

    /// Bits per code for the bit-packed quantisers (ternary packs base 3 instead).
    pub(crate) const fn code_bits(self) -> u32 {
        match self {
            Quant::F32 => 32,
            Quant::F16 | Quant::Bf16 => 16,
            Quant::Int8 => 8,
            Quant::Int4 => 4,
            Quant::Sign => 1,
            Quant::Ternary => 0,
            Quant::Qsgd { levels } => 1 + level_bits(levels),
        }
    }

    /// Bytes of the value block for `nnz` entries (`None` on overflow).
    pub const fn value_bytes(self, nnz: u64) -> Option<u64> {
        if let Quant::Ternary = self {
            return Some(nnz.div_ceil(5));
        }
        match nnz.checked_mul(self.code_bits() as u64) {
            Some(bits) => Some(bits.div_ceil(8)),
            None => None,
        }
    }

    /// Which statistics the scale needs (to skip the others in the hot loop).
    /// `(max |v|, sum |v|)`.
    pub(crate) const fn needs(self) -> (bool, bool) {
        match self {
            Quant::Int8 | Quant::Int4 | Quant::Ternary | Quant::Qsgd { .. } => (true, false),
            Quant::Sign => (false, true),
            _ => (false, false),
        }
    }

    /// The message scale from the statistics of the `nnz` selected values.
    pub(crate) fn scale(self, s: &ValueStats, nnz: usize) -> f32 {
        let mut scale = match self {
            // A non-zero maximum never gets a zero scale (subnormal underflow).
            Quant::Int8 => (s.max_abs / 127.0).max(f32::from_bits((s.max_abs > 0.0) as u32)),
            Quant::Int4 => (s.max_abs / 7.0).max(f32::from_bits((s.max_abs > 0.0) as u32)),
            Quant::Ternary => s.max_abs,
            Quant::Sign if nnz > 0 => (s.sum_abs / nnz as f64) as f32,
            Quant::Qsgd { .. } => s.max_abs,
            _ => return 0.0,
        };
        // The largest code must decode to a finite value: near f32::MAX, `(max/127)·127` can
        // round up to infinity. Step the scale down until it does not (at most a few ulps).
        while scale > 0.0
            && !is_finite_bits(
                decode_code(self, decode_unit(self, scale), self.max_code()).to_bits(),
            )
        {
            scale = f32::from_bits(scale.to_bits() - 1);
        }
        scale
    }

    /// The code of the largest positive value.
    const fn max_code(self) -> u32 {
        match self {
            Quant::Int8 => 127,
            Quant::Int4 => 7,
            Quant::Ternary => 2,
            Quant::Qsgd { levels } => levels as u32,
            _ => 0,
        }
    }
}

/// Bits for a level in `0..=levels`.
pub(crate) const fn level_bits(levels: u8) -> u32 {
    8 - levels.leading_zeros()
}

/// Per-message quantiser with its precomputed reciprocal.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Quantizer {
    pub quant: Quant,
    /// Pre-multiplier of `v` (1, or 2^64 for tiny scales).
    pub pre: f32,
    /// Multiplier taking `|v|·pre` to code units (0 when the scale is 0).
    pub inv: f32,
    /// Decoded magnitude of one code unit.
    pub unit: f32,
    pub stream: u32,
}

impl Quantizer {
    pub fn new(quant: Quant, scale: f32, stream: u32) -> Self {
        // A tiny (e.g. subnormal) scale has no finite reciprocal: quantise `v·2^64` against
        // `scale·2^64` instead. For ordinary scales `pre` is 1 and changes no bit.
        let pre = if scale > 0.0 && scale < 1e-30 {
            18_446_744_073_709_551_616.0
        } else {
            1.0
        };
        let (inv, unit) = match quant {
            Quant::Int8 | Quant::Int4 | Quant::Ternary | Quant::Sign => (
                if scale > 0.0 {
                    1.0 / (scale * pre)
                } else {
                    0.0
                },
                scale,
            ),
            Quant::Qsgd { levels } => {
                let s = levels as f32;
                (if scale > 0.0 { s / (scale * pre) } else { 0.0 }, scale / s)
            }
            _ => (0.0, 0.0),
        };
        Quantizer {
            quant,
            pre,
            inv,
            unit,
            stream,
        }
    }

    /// The code for value `v` of element `index`.
    #[inline(always)]
    pub fn encode(&self, v: f32, index: u32) -> u32 {
        match self.quant {
            Quant::F32 => v.to_bits(),
            Quant::F16 => f32_to_f16(v) as u32,
            Quant::Bf16 => f32_to_bf16(v) as u32,
            Quant::Int8 => {
                (round_half_away(v * self.pre * self.inv).clamp(-127, 127) as u32) & 0xff
            }
            Quant::Int4 => (round_half_away(v * self.pre * self.inv).clamp(-7, 7) as u32) & 0xf,
            Quant::Sign => (v.to_bits() >> 31) & 1,
            Quant::Ternary => {
                let p = abs(v) * self.pre * self.inv;
                if rng::uniform(self.stream, index) < p {
                    if v < 0.0 {
                        0
                    } else {
                        2
                    }
                } else {
                    1
                }
            }
            Quant::Qsgd { levels } => {
                let x = abs(v) * self.pre * self.inv;
                let floor = x as u32; // x >= 0
                let frac = x - floor as f32;
                let up = (rng::uniform(self.stream, index) < frac) as u32;
                let level = floor.saturating_add(up).min(levels as u32);
                let sign = if level > 0 {
                    (v.to_bits() >> 31) & 1
                } else {
                    0
                };
                (sign << level_bits(levels)) | level
            }
        }
    }

    /// The value of a code. Total: every code decodes (validity is checked by the decoder).
    #[inline(always)]
    pub fn decode(&self, code: u32) -> f32 {
        decode_code(self.quant, self.unit, code)
    }
}

/// Decodes one code given the value of one code unit (`scale`, or `scale/levels` for QSGD).
#[inline(always)]
pub(crate) fn decode_code(quant: Quant, unit: f32, code: u32) -> f32 {
    match quant {
        Quant::F32 => f32::from_bits(code),
        Quant::F16 => f16_to_f32(code as u16),
        Quant::Bf16 => bf16_to_f32(code as u16),
        Quant::Int8 => (code as u8 as i8) as f32 * unit,
        Quant::Int4 => (((code << 28) as i32) >> 28) as f32 * unit,
        Quant::Sign => {
            if code & 1 == 1 {
                -unit
            } else {
                unit
            }
        }
        Quant::Ternary => (code as f32 - 1.0) * unit,
        Quant::Qsgd { levels } => {
            let lb = level_bits(levels);
            let level = (code & ((1 << lb) - 1)) as f32 * unit;
            if (code >> lb) & 1 == 1 {
                -level
            } else {
                level
            }
        }
    }
}

/// The unit a decoder multiplies codes by, from the header's scale.
pub(crate) fn decode_unit(quant: Quant, scale: f32) -> f32 {
    match quant {
        Quant::Qsgd { levels } => scale / levels as f32,
        _ => scale,
    }
}
