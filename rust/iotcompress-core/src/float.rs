//! Float helpers written with integer and IEEE-754 basic operations only, so that
//! every platform (x86, Arm, Cortex-M without an FPU) computes the same bits and
//! no `libm` is needed in `no_std`.

/// Bits of |x|: for finite floats the order of these integers is the order of magnitudes.
#[inline(always)]
pub(crate) fn mag_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// True when `x` is neither NaN nor infinite.
#[inline(always)]
pub(crate) fn is_finite_bits(bits: u32) -> bool {
    bits & 0x7f80_0000 != 0x7f80_0000
}

/// |x| without `std`.
#[inline(always)]
pub(crate) fn abs(x: f32) -> f32 {
    f32::from_bits(mag_bits(x))
}

/// Round half away from zero, exact for |x| < 2^23 (callers clamp codes later).
#[inline(always)]
pub(crate) fn round_half_away(x: f32) -> i32 {
    let t = x as i32; // truncates toward zero, saturates, NaN -> 0
    let frac = x - t as f32; // exact: the fractional part of a float is representable
    if frac >= 0.5 {
        t.saturating_add(1)
    } else if frac <= -0.5 {
        t.saturating_sub(1)
    } else {
        t
    }
}

/// `ceil(x)` for `x >= 0` as usize (saturating), without `std`.
pub(crate) fn ceil_usize(x: f64) -> usize {
    let t = x as usize;
    if (t as f64) < x {
        t.saturating_add(1)
    } else {
        t
    }
}

/// f32 -> IEEE binary16, round to nearest even; finite values beyond the f16 range
/// saturate to ±65504 (error feedback keeps the rest in the residual).
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = b & 0x7fff_ffff;
    if a >= 0x7f80_0000 {
        return sign | if a > 0x7f80_0000 { 0x7e00 } else { 0x7c00 };
    }
    if a >= 0x477f_f000 {
        // 65520 and above would round to infinity.
        return sign | 0x7bff;
    }
    if a >= 0x3880_0000 {
        // Normal in f16: rebias the exponent (127 - 15 = 112) and round at bit 13.
        let a = a - 0x3800_0000;
        let round = 0x0fff + ((a >> 13) & 1);
        return sign | ((a + round) >> 13) as u16;
    }
    if a <= 0x3300_0000 {
        // At most 2^-25: rounds (ties to even) to zero.
        return sign;
    }
    // Subnormal in f16: value = m * 2^(e-150), code = value / 2^-24 = m >> (126 - e).
    let e = a >> 23;
    let m = (a & 0x7f_ffff) | 0x80_0000;
    let shift = 126 - e; // 14..=24
    let q = m >> shift;
    let rem = m & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    let q = if rem > half || (rem == half && q & 1 == 1) {
        q + 1
    } else {
        q
    };
    sign | q as u16
}

/// IEEE binary16 -> f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // Subnormal: normalise the mantissa.
            let shift = man.leading_zeros() - 21; // bring the top set bit to bit 10
            let man = (man << shift) & 0x3ff;
            let exp = 113 - shift; // 127 - 15 + 1 - shift
            sign | (exp << 23) | (man << 13)
        }
    } else if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// f32 -> bfloat16, round to nearest even; finite overflow saturates to ±max.
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return ((b >> 16) as u16) | 0x0040; // quiet NaN
    }
    if b & 0x7fff_ffff == 0x7f80_0000 {
        return (b >> 16) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    let r = (b.wrapping_add(round) >> 16) as u16;
    if r & 0x7fff == 0x7f80 {
        (r & 0x8000) | 0x7f7f
    } else {
        r
    }
}

/// bfloat16 -> f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Square root by Newton's method in f32 (IEEE basic operations only: the same bits on every
/// platform, no libm); within an ulp or two, far below what the controller needs.
pub(crate) fn sqrt_f32(x: f32) -> f32 {
    if x <= 0.0 || !is_finite_bits(x.to_bits()) {
        return if x == f32::INFINITY { x } else { 0.0 };
    }
    // Halving the exponent gives a first guess within a factor of two.
    let mut y = f32::from_bits((x.to_bits() >> 1) + (127 << 22));
    for _ in 0..5 {
        y = 0.5 * (y + x / y);
    }
    y
}

/// Square root by Newton's method in f64: deterministic on every platform (no libm),
/// accurate to about one f64 ulp, which is far below the f32 result's precision.
pub(crate) fn sqrt_f64(x: f64) -> f64 {
    if x <= 0.0 || x.is_nan() {
        return 0.0;
    }
    if x == f64::INFINITY {
        return x;
    }
    // Halving the exponent gives a first guess within a factor of two.
    let mut y = f64::from_bits((x.to_bits() >> 1) + (1023u64 << 51));
    for _ in 0..6 {
        y = 0.5 * (y + x / y);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_roundtrip_all_codes() {
        for h in 0..=u16::MAX {
            let exp = (h >> 10) & 0x1f;
            if exp == 0x1f {
                continue;
            }
            let f = f16_to_f32(h);
            assert_eq!(f32_to_f16(f), h, "code {h:#06x} -> {f}");
        }
    }

    #[test]
    fn f16_rounding_matches_nearest() {
        // Midpoints between consecutive f16 values round to the even code.
        for h in 0x0000u16..0x7bff {
            let lo = f16_to_f32(h) as f64;
            let hi = f16_to_f32(h + 1) as f64;
            let mid = ((lo + hi) / 2.0) as f32;
            if mid as f64 != (lo + hi) / 2.0 {
                continue;
            }
            let expect = if h & 1 == 0 { h } else { h + 1 };
            assert_eq!(f32_to_f16(mid), expect);
        }
        assert_eq!(f32_to_f16(1e9), 0x7bff);
        assert_eq!(f32_to_f16(-1e9), 0xfbff);
        assert_eq!(f32_to_f16(65519.0), 0x7bff);
    }

    #[test]
    fn bf16_basics() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f7f);
        assert_eq!(f32_to_bf16(-f32::MAX), 0xff7f);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to even (1.0).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
    }

    #[test]
    fn rounding_and_sqrt() {
        assert_eq!(round_half_away(0.5), 1);
        assert_eq!(round_half_away(-0.5), -1);
        assert_eq!(round_half_away(0.49999997), 0);
        assert_eq!(round_half_away(2.5), 3);
        assert_eq!(round_half_away(-126.6), -127);
        for &x in &[1.0, 2.0, 1e-30, 1e30, 0.25, 12345.678] {
            let s = sqrt_f64(x);
            assert!((s * s - x).abs() <= x * 1e-15, "{x}");
        }
    }
}
