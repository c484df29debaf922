//! Shared helpers for the integration tests.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use iotcompress_core::{wire, Config, Momentum, OwnedCompressor, Quant, Selection, Target};

/// A small deterministic generator for test data (xorshift64*).
pub struct TestRng(pub u64);

impl TestRng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

pub const QUANTS: [Quant; 8] = [
    Quant::F32,
    Quant::F16,
    Quant::Bf16,
    Quant::Int8,
    Quant::Int4,
    Quant::Sign,
    Quant::Ternary,
    Quant::Qsgd { levels: 15 },
];

pub fn selections(threshold: f32) -> Vec<Selection> {
    vec![
        Selection::Dense,
        Selection::Threshold(threshold),
        Selection::TopK {
            density: 0.05,
            exact: true,
        },
        Selection::TopK {
            density: 0.05,
            exact: false,
        },
        Selection::Adaptive(Target::Density(0.05)),
    ]
}

pub fn momenta() -> [Momentum; 3] {
    [
        Momentum::None,
        Momentum::Vanilla(0.9),
        Momentum::Nesterov(0.9),
    ]
}

pub fn config(selection: Selection, quant: Quant, momentum: Momentum, seed: u64) -> Config {
    Config {
        selection,
        quant,
        momentum,
        seed,
    }
}

/// The (index, value) entries of a message.
pub fn entries(msg: &[u8]) -> Vec<(usize, f32)> {
    let m = wire::parse(msg, usize::MAX).expect("valid message");
    let mut out = Vec::new();
    wire::for_each_entry(&m, |i, v| out.push((i, v))).expect("valid entries");
    out
}

pub fn compressor(cfg: Config, n: usize) -> OwnedCompressor {
    OwnedCompressor::new(cfg, n).expect("valid config")
}
