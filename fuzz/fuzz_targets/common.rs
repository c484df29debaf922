//! Drawing configurations and gradients from fuzz bytes, shared by the targets.
#![allow(dead_code)]

use iotcompress_core::{Config, Momentum, Quant, Selection, Target};
use libfuzzer_sys::arbitrary::{Result, Unstructured};

pub const MAX_NUMEL: usize = 2048;

// The density conversions are identities while densities are f32.
#[allow(clippy::useless_conversion)]
pub fn config(u: &mut Unstructured<'_>) -> Result<Config> {
    let unit = |b: u8| (b as f32 + 1.0) / 256.0; // (0, 1]
    let selection = match u.int_in_range(0..=4u8)? {
        0 => Selection::Dense,
        1 => {
            // From 0 up to large thresholds, on a log scale.
            let e = u.int_in_range(-30i32..=30)?;
            Selection::Threshold(unit(u.arbitrary()?) * 2f32.powi(e))
        }
        2 => Selection::TopK {
            // `.into()`: densities are f32 or f64 depending on the core's version.
            density: unit(u.arbitrary()?).into(),
            exact: u.arbitrary()?,
        },
        3 => Selection::Adaptive(Target::Density(unit(u.arbitrary()?).into())),
        _ => Selection::Adaptive(Target::Bytes(u.int_in_range(1..=20_000u32)?)),
    };
    let quant = match u.int_in_range(0..=7u8)? {
        0 => Quant::F32,
        1 => Quant::F16,
        2 => Quant::Bf16,
        3 => Quant::Int8,
        4 => Quant::Int4,
        5 => Quant::Sign,
        6 => Quant::Ternary,
        _ => Quant::Qsgd {
            levels: u.int_in_range(1..=255u8)?,
        },
    };
    let factor = u.int_in_range(0..=255u8)? as f32 / 256.0; // [0, 1)
    let momentum = match u.int_in_range(0..=2u8)? {
        0 => Momentum::None,
        1 => Momentum::Vanilla(factor),
        _ => Momentum::Nesterov(factor),
    };
    Ok(Config {
        selection,
        quant,
        momentum,
        seed: u.arbitrary()?,
    })
}

/// A finite gradient: raw bit patterns (non-finite ones replaced) or values of one scale.
pub fn gradient(u: &mut Unstructured<'_>, n: usize) -> Result<Vec<f32>> {
    let raw = u.arbitrary::<bool>()?;
    let scale = 2f32.powi(u.int_in_range(-40i32..=40)?);
    let mut g = Vec::with_capacity(n);
    for _ in 0..n {
        let x = if raw {
            f32::from_bits(u.arbitrary()?)
        } else {
            u.arbitrary::<i16>()? as f32 / 32768.0 * scale
        };
        g.push(if x.is_finite() { x } else { 0.0 });
    }
    Ok(g)
}
