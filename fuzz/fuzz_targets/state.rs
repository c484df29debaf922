//! Sequences of compress / accumulate / restore / restore(msg) / revert / load / set_selection with
//! injected errors (NaN, overflowing and wrong-length gradients, corrupt messages, bad
//! selections) on an `OwnedCompressor`, both memory paths: no panic; every failing call
//! leaves residual, velocity, counters and bound exactly as they were; `restore()` after a
//! compress gives exactly the state `accumulate` gives; the state stays finite.
#![no_main]

use iotcompress_core::{OwnedCompressor, Selection};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use common::{config, gradient, MAX_NUMEL};

type Snapshot = (Vec<u32>, Vec<u32>, u64, u32, u32, u32);

fn snapshot(c: &OwnedCompressor) -> Snapshot {
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect();
    let k = c.core();
    (
        bits(c.residual()),
        bits(c.velocity()),
        k.step,
        k.controller.threshold.to_bits(),
        k.controller.bits_per_entry.to_bits(),
        k.state_bound.to_bits(),
    )
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let cfg = config(&mut u)?;
    let n = u.int_in_range(1..=MAX_NUMEL / 4)?;
    let Ok(mut c) = OwnedCompressor::new(cfg, n) else {
        return Ok(());
    };
    c.set_double_buffering(u.arbitrary()?);
    let mut last: Option<Vec<u8>> = None;
    for _ in 0..u.int_in_range(1..=12u8)? {
        let before = snapshot(&c);
        let result = match u.int_in_range(0..=9u8)? {
            0 | 1 => {
                let g = gradient(&mut u, n)?;
                let mut want = c.clone();
                let r = c.compress_to_vec(&g).map(|m| last = Some(m));
                if r.is_ok() && u.arbitrary()? {
                    // restore() == accumulate, bit for bit (the bound aside).
                    c.restore().expect("a message to restore");
                    want.accumulate(&g)
                        .expect("accumulate accepts what compress did");
                    assert_eq!(snapshot(&c).0, snapshot(&want).0);
                    assert_eq!(snapshot(&c).1, snapshot(&want).1);
                    assert_eq!(snapshot(&c).2, snapshot(&want).2);
                    last = None;
                } else if r.is_ok() && c.can_revert() && u.arbitrary()? {
                    // revert() == never called, bit for bit (bound and undo record too).
                    c.revert().expect("a call to revert");
                    assert_eq!(snapshot(&c), snapshot(&want));
                    assert_eq!(c.can_restore(), want.can_restore());
                    last = None;
                }
                r
            }
            2 => {
                let g = gradient(&mut u, n)?;
                c.accumulate(&g)
            }
            3 => {
                // Poisoned: NaN, infinity or a huge finite entry at a drawn index.
                let mut g = gradient(&mut u, n)?;
                let at = u.int_in_range(0..=n - 1)?;
                g[at] = *u.choose(&[f32::NAN, f32::INFINITY, f32::MAX, -f32::MAX])?;
                if u.arbitrary()? {
                    c.compress_to_vec(&g).map(|_| ())
                } else {
                    c.accumulate(&g)
                }
            }
            4 => c.restore(),
            5 => {
                let mut msg = match &last {
                    Some(m) => m.clone(),
                    None => u.arbitrary::<Vec<u8>>()?,
                };
                if u.arbitrary()? && !msg.is_empty() {
                    let at = u.int_in_range(0..=msg.len() - 1)?;
                    msg[at] ^= u.int_in_range(1..=255u8)?;
                }
                c.restore_message(&msg)
            }
            6 => {
                let sel = match u.int_in_range(0..=2u8)? {
                    0 => Selection::Threshold(f32::from_bits(u.arbitrary()?)),
                    1 => Selection::TopK {
                        density: f64::from_bits(u.arbitrary()?),
                        exact: u.arbitrary()?,
                    },
                    _ => Selection::Dense,
                };
                c.set_selection(sel)
            }
            8 => c.revert(),
            9 => {
                // A checkpoint loaded into the buffers (as load_state_dict does after checking).
                let r = gradient(&mut u, n)?;
                c.residual_mut().copy_from_slice(&r);
                if !c.velocity().is_empty() {
                    let v = gradient(&mut u, n)?;
                    c.velocity_mut().copy_from_slice(&v);
                }
                c.core_mut().step = u.arbitrary()?;
                last = None;
                Ok(())
            }
            _ => {
                // Wrong length.
                let g = gradient(&mut u, n + 1)?;
                c.compress_to_vec(&g).map(|_| ())
            }
        };
        if let Err(e) = result {
            assert_eq!(snapshot(&c), before, "{e:?} changed the state");
        }
        assert!(c.residual().iter().all(|x| x.is_finite()));
        assert!(c.velocity().iter().all(|x| x.is_finite()));
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
