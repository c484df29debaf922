//! A compressor configuration and a few finite gradients drawn from the fuzz bytes:
//! every message must decode, carry finite values, and satisfy error feedback:
//! `decoded + r_new == v` (bit-exact for f32 values, within one f32 rounding otherwise),
//! `r_new == v` where nothing was sent, and momentum masked where something was.
//!
//! It found three compressor bugs at once (an empty tensor with an adaptive byte target;
//! int8/QSGD of `f32::MAX` decoding to inf; QSGD of subnormal magnitudes overflowing), all
//! fixed and kept as regression tests in `rust/iotcompress-core/tests/decoder.rs`.
#![no_main]

use iotcompress_core::wire::{for_each_entry, parse};
use iotcompress_core::{
    decode_to_vec, Config, Error, Momentum, OwnedCompressor, Quant, Selection, Target,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use common::{config, gradient, MAX_NUMEL};

/// `(v, u_new)` as the core defines them (see `feedback.rs`).
fn accumulate(m: Momentum, r: f32, u: f32, g: f32) -> (f32, f32) {
    match m {
        Momentum::None => (r + g, u),
        Momentum::Vanilla(f) => {
            let x = f * u + g;
            (r + x, x)
        }
        Momentum::Nesterov(f) => {
            let x = f * (u + g);
            (r + x + g, x)
        }
    }
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let cfg = config(&mut u)?;
    let n = u.int_in_range(0..=MAX_NUMEL)?;
    let steps = u.int_in_range(1..=3u8)?;
    let mut c = OwnedCompressor::new(cfg, n).expect("every drawn config is valid");
    for step in 0..steps {
        let g = gradient(&mut u, n)?;
        let (v, u_new): (Vec<f32>, Vec<f32>) = (0..n)
            .map(|i| {
                let ui = c.velocity().get(i).copied().unwrap_or(0.0);
                accumulate(cfg.momentum, c.residual()[i], ui, g[i])
            })
            .unzip();
        let mut msg = vec![0u8; c.max_message_len()];
        let info = match c.compress(&g, &mut msg) {
            Ok(info) => info,
            // The accumulated state overflowed f32: documented, the state is now spent.
            Err(Error::Overflow) => return Ok(()),
            Err(e) => panic!("{cfg:?} n={n} step={step}: compress failed: {e:?}"),
        };
        let msg = &msg[..info.bytes];
        let decoded = decode_to_vec(msg, n);
        let d = decoded.expect("the encoder's message decodes");
        let m = parse(msg, n).expect("the encoder's message parses");
        assert_eq!(m.header.numel as usize, n);
        assert_eq!(m.header.nnz as usize, info.nnz);
        let mut sent = vec![false; n];
        for_each_entry(&m, |i, _| sent[i] = true).expect("entries decode");
        for i in 0..n {
            let (v, r) = (v[i], c.residual()[i]);
            let ctx = || {
                format!(
                    "{cfg:?} n={n} step={step} i={i}: g={} v={v} decoded={} r={r}",
                    g[i], d[i]
                )
            };
            assert!(d[i].is_finite() && r.is_finite(), "not finite: {}", ctx());
            let back = d[i] + r;
            if cfg.quant == Quant::F32 {
                assert_eq!(back.to_bits(), v.to_bits(), "{}", ctx());
            } else {
                let tol = 2.0 * f32::EPSILON * (v.abs() + d[i].abs());
                assert!((back - v).abs() <= tol, "off by {}: {}", back - v, ctx());
            }
            if !sent[i] {
                assert_eq!(r.to_bits(), v.to_bits(), "unsent entry changed: {}", ctx());
            }
            if cfg.momentum.has_velocity() {
                let want = if sent[i] { 0.0 } else { u_new[i] };
                assert_eq!(
                    c.velocity()[i].to_bits(),
                    want.to_bits(),
                    "velocity: {}",
                    ctx()
                );
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
