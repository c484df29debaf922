//! Issue 12: every failing call leaves the state as it was (both paths), and a message that
//! was not delivered is not lost (`restore`, `restore_message`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{config, momenta, selections, TestRng, QUANTS};
use iotcompress_core::{Error, Momentum, OwnedCompressor, Quant, Selection};
use proptest::prelude::*;

/// The state a message depends on: residual, velocity, step, controller (as bits).
type State = (Vec<u32>, Vec<u32>, u64, (u32, u32));

fn state(c: &OwnedCompressor) -> State {
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let core = c.core();
    (
        bits(c.residual()),
        bits(c.velocity()),
        core.step,
        (
            core.controller.threshold.to_bits(),
            core.controller.bits_per_entry.to_bits(),
        ),
    )
}

/// Everything a call may change: the state and the compressor's bound on it.
fn snapshot(c: &OwnedCompressor) -> (State, u32) {
    (state(c), c.core().state_bound.to_bits())
}

fn compressor(sel: Selection, quant: Quant, m: Momentum, n: usize, spare: bool) -> OwnedCompressor {
    let mut c = OwnedCompressor::new(config(sel, quant, m, 7), n).unwrap();
    c.set_double_buffering(spare);
    c
}

/// The example of the issue: below 2^23 elements (in place) a finite gradient whose sum
/// with the residual overflows left an inf in the residual and every later compress failed.
#[test]
fn overflow_in_place_leaves_the_state_unchanged() {
    let n = 1000;
    for spare in [false, true] {
        for m in momenta() {
            for sel in selections(0.5) {
                let mut c = compressor(sel, Quant::Int8, m, n, spare);
                let mut rng = TestRng(3);
                let mut g = rng.normals(n, 1.0);
                g[10] = 1e38;
                c.compress_to_vec(&g).unwrap();
                c.accumulate(&g).unwrap();
                let before = snapshot(&c);
                let mut g = rng.normals(n, 1.0);
                g[10] = 3e38; // r + g overflows (or u + g with momentum)
                g[500] = 3e38;
                for call in 0..2 {
                    let e = if call == 0 {
                        c.compress_to_vec(&g).unwrap_err()
                    } else {
                        c.accumulate(&g).unwrap_err()
                    };
                    assert_eq!(e, Error::Overflow, "{sel:?} {m:?} spare={spare}");
                    assert_eq!(snapshot(&c), before, "{sel:?} {m:?} spare={spare}");
                }
                // And the compressor goes on (with momentum, u = 3e38 alone would overflow v).
                if m == Momentum::None {
                    c.compress_to_vec(&rng.normals(n, 1.0)).unwrap();
                    assert!(c.residual().iter().all(|v| v.is_finite()));
                }
            }
        }
    }
}

/// A state of unknown bound (written from outside) takes the slow path and gives the same
/// bytes as one whose bound was kept; near the limit the dry run decides.
#[test]
fn unknown_and_large_bounds_give_the_same_messages() {
    let n = 500;
    let mut rng = TestRng(11);
    for m in momenta() {
        let mut a = compressor(
            Selection::TopK {
                density: 0.1,
                exact: true,
            },
            Quant::F32,
            m,
            n,
            false,
        );
        let mut b = a.clone();
        for _ in 0..3 {
            let g = rng.normals(n, 1e37);
            assert_eq!(
                a.compress_to_vec(&g).unwrap(),
                b.compress_to_vec(&g).unwrap()
            );
            b.residual_mut(); // marks the bound unknown
            assert_eq!(b.core().state_bound, f32::INFINITY);
        }
        assert_eq!(a.residual(), b.residual());
        // Residual entries near 2^127: the headroom rule cannot prove it, the dry run can.
        let r = a.residual_mut();
        r.iter_mut().for_each(|x| *x = 1e38);
        let mut g = vec![0.0; n];
        g[0] = 1e38;
        assert!(a.compress_to_vec(&g).is_ok(), "{m:?}");
    }
}

#[test]
fn restore_without_a_message_is_refused() {
    let mut c = compressor(
        Selection::TopK {
            density: 0.1,
            exact: false,
        },
        Quant::Int8,
        Momentum::Vanilla(0.9),
        100,
        false,
    );
    assert_eq!(c.restore(), Err(Error::NothingToRestore));
    let g: Vec<f32> = (0..100).map(|i| i as f32).collect();
    c.compress_to_vec(&g).unwrap();
    c.restore().unwrap();
    let before = snapshot(&c);
    assert_eq!(c.restore(), Err(Error::NothingToRestore));
    c.compress_to_vec(&g).unwrap();
    c.accumulate(&g).unwrap();
    assert_eq!(c.restore(), Err(Error::NothingToRestore));
    drop(before);
}

/// A failed compress keeps the previous message restorable.
#[test]
fn a_failed_compress_keeps_the_previous_undo_record() {
    let n = 200;
    let mut c = compressor(
        Selection::Threshold(0.5),
        Quant::Int4,
        Momentum::Nesterov(0.9),
        n,
        false,
    );
    let mut rng = TestRng(1);
    let mut reference = c.clone();
    let g = rng.normals(n, 1.0);
    c.compress_to_vec(&g).unwrap();
    reference.accumulate(&g).unwrap();
    let mut bad = rng.normals(n, 1.0);
    bad[3] = f32::NAN;
    assert_eq!(c.compress_to_vec(&bad), Err(Error::NonFiniteGradient));
    c.restore().unwrap();
    assert_eq!(state(&c), state(&reference));
}

#[test]
fn restore_message_adds_the_message_back() {
    let n = 300;
    let mut rng = TestRng(4);
    for quant in QUANTS {
        let mut c = compressor(
            Selection::TopK {
                density: 0.1,
                exact: true,
            },
            quant,
            Momentum::None,
            n,
            false,
        );
        let g = rng.normals(n, 1.0);
        let before: Vec<f32> = c.residual().to_vec();
        let msg = c.compress_to_vec(&g).unwrap();
        c.restore_message(&msg).unwrap();
        // Exact up to one rounding per entry: (v - q) + q against v = r + g.
        for (i, (&r, (&r0, &gi))) in c.residual().iter().zip(before.iter().zip(&g)).enumerate() {
            let v = r0 + gi;
            assert!(
                (r - v).abs() <= v.abs() * f32::EPSILON,
                "{quant:?} {i}: {r} vs {v}"
            );
        }
        assert_eq!(c.core().state_bound, f32::INFINITY);
        // A corrupt message (or one of another size) changes nothing.
        let snap = snapshot(&c);
        let mut bad = msg.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(c.restore_message(&bad).is_err());
        let other = compressor(Selection::Dense, quant, Momentum::None, n + 1, false)
            .compress_to_vec(&vec![1.0; n + 1])
            .unwrap();
        assert_eq!(c.restore_message(&other), Err(Error::NumelMismatch));
        assert_eq!(snapshot(&c), snap);
    }
}

fn any_selection() -> impl Strategy<Value = Selection> {
    prop_oneof![
        Just(Selection::Dense),
        (0.0f32..2.0).prop_map(Selection::Threshold),
        (0.01f64..0.5, any::<bool>())
            .prop_map(|(density, exact)| Selection::TopK { density, exact }),
        (0.01f64..0.5).prop_map(|d| Selection::Adaptive(iotcompress_core::Target::Density(d))),
        (40u32..400).prop_map(|b| Selection::Adaptive(iotcompress_core::Target::Bytes(b))),
    ]
}

fn any_momentum() -> impl Strategy<Value = Momentum> {
    prop_oneof![
        Just(Momentum::None),
        (0.0f32..0.99).prop_map(Momentum::Vanilla),
        (0.0f32..0.99).prop_map(Momentum::Nesterov),
    ]
}

/// One operation of a random interleaving.
#[derive(Clone, Debug)]
enum Op {
    Compress(u64),
    Accumulate(u64),
    Restore,
    /// A gradient that fails: NaN at an index, or a huge entry (may overflow).
    Poison(u64, bool),
    /// Load the state of another compressor of the same configuration.
    Load,
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<u64>().prop_map(Op::Compress),
        2 => any::<u64>().prop_map(Op::Accumulate),
        2 => Just(Op::Restore),
        1 => (any::<u64>(), any::<bool>()).prop_map(|(s, nan)| Op::Poison(s, nan)),
        1 => Just(Op::Load),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Compress, restore, compress again equals accumulate, compress: bytes and state
    /// bit for bit, every selection, quantiser, momentum and path. From a zero state this
    /// is one compress of the summed gradient (0 + g1 is g1 exactly).
    #[test]
    fn restore_undoes_a_message_exactly(
        sel in any_selection(),
        quant in 0usize..8,
        m in any_momentum(),
        n in 1usize..400,
        spare: bool,
        seed: u64,
    ) {
        let quant = QUANTS[quant];
        let mut a = compressor(sel, quant, m, n, spare);
        let mut b = compressor(sel, quant, m, n, !spare);
        let mut rng = TestRng(seed | 1);
        let warm = rng.normals(n, 1.0);
        a.compress_to_vec(&warm).unwrap();
        b.compress_to_vec(&warm).unwrap();
        let (g1, g2) = (rng.normals(n, 1.0), rng.normals(n, 1.0));
        a.compress_to_vec(&g1).unwrap();
        a.restore().unwrap();
        b.accumulate(&g1).unwrap();
        prop_assert_eq!(state(&a), state(&b));
        prop_assert_eq!(a.compress_to_vec(&g2).unwrap(), b.compress_to_vec(&g2).unwrap());
        prop_assert_eq!(state(&a), state(&b));
        if m == Momentum::None {
            let mut c = compressor(sel, quant, m, n, spare);
            let mut d = c.clone();
            c.compress_to_vec(&g1).unwrap();
            c.restore().unwrap();
            let sum: Vec<f32> = g1.iter().zip(&g2).map(|(x, y)| x + y).collect();
            d.accumulate(&vec![0.0; n]).unwrap();
            // 0 + g1 + g2 rounds as g1 + g2.
            prop_assert_eq!(c.compress_to_vec(&g2).unwrap(), d.compress_to_vec(&sum).unwrap());
        }
    }

    /// Any interleaving of compress / accumulate / restore / failing calls / loads: every
    /// failure leaves the state as it was, and the error-feedback invariant holds for plain
    /// error feedback: residual + everything delivered == everything fed (up to rounding).
    #[test]
    fn state_is_unchanged_after_any_error_and_nothing_is_lost(
        sel in any_selection(),
        quant in 0usize..8,
        m in any_momentum(),
        n in 1usize..300,
        spare: bool,
        ops in proptest::collection::vec(any_op(), 1..25),
    ) {
        let quant = QUANTS[quant];
        let mut c = compressor(sel, quant, m, n, spare);
        let mut fed = vec![0.0f64; n];
        let mut delivered = vec![0.0f64; n];
        let mut last: Option<Vec<u8>> = None;
        for op in ops {
            match op {
                Op::Compress(s) => {
                    let g = TestRng(s | 1).normals(n, 1.0);
                    let msg = c.compress_to_vec(&g).unwrap();
                    g.iter().zip(&mut fed).for_each(|(&x, f)| *f += x as f64);
                    for (i, v) in common::entries(&msg) {
                        delivered[i] += v as f64;
                    }
                    last = Some(msg);
                }
                Op::Accumulate(s) => {
                    let g = TestRng(s | 1).normals(n, 1.0);
                    c.accumulate(&g).unwrap();
                    g.iter().zip(&mut fed).for_each(|(&x, f)| *f += x as f64);
                    last = None;
                }
                Op::Restore => {
                    let before = snapshot(&c);
                    match c.restore() {
                        Ok(()) => {
                            let msg = last.take().expect("restorable only after a compress");
                            for (i, v) in common::entries(&msg) {
                                delivered[i] -= v as f64;
                            }
                        }
                        Err(e) => {
                            prop_assert_eq!(e, Error::NothingToRestore);
                            prop_assert_eq!(snapshot(&c), before);
                        }
                    }
                }
                Op::Poison(s, nan) => {
                    let mut rng = TestRng(s | 1);
                    let mut g = rng.normals(n, 1.0);
                    let at = (s as usize) % n;
                    g[at] = if nan { f32::NAN } else { f32::MAX };
                    let before = snapshot(&c);
                    let r = if s % 2 == 0 { c.compress_to_vec(&g).map(Some) } else { c.accumulate(&g).map(|_| None) };
                    match r {
                        Err(e) => {
                            prop_assert!(matches!(e, Error::NonFiniteGradient | Error::Overflow), "{:?}", e);
                            prop_assert!(nan || e == Error::Overflow);
                            prop_assert_eq!(snapshot(&c), before);
                        }
                        Ok(_) => {
                            // f32::MAX fitted: the state was small enough. Start afresh.
                            prop_assert!(!nan);
                            c = compressor(sel, quant, m, n, spare);
                            fed.iter_mut().for_each(|f| *f = 0.0);
                            delivered.iter_mut().for_each(|f| *f = 0.0);
                            last = None;
                        }
                    }
                }
                Op::Load => {
                    let mut other = compressor(sel, quant, m, n, !spare);
                    other.residual_mut().copy_from_slice(c.residual());
                    other.velocity_mut().copy_from_slice(c.velocity());
                    *other.core_mut() = *c.core();
                    c = other;
                    last = None;
                }
            }
            prop_assert!(c.residual().iter().all(|v| v.is_finite()));
        }
        if m == Momentum::None {
            for i in 0..n {
                let lhs = c.residual()[i] as f64 + delivered[i];
                prop_assert!((lhs - fed[i]).abs() <= 1e-3 * (1.0 + fed[i].abs()), "{} {} {}", i, lhs, fed[i]);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// `revert` takes the last compress or accumulate back whole (state, bound and undo
    /// record as before it: the same messages follow), once, and only while nothing else
    /// touched the state; without a spare it is never available.
    #[test]
    fn revert_takes_back_the_last_call_whole(
        sel in any_selection(),
        quant in 0usize..8,
        m in any_momentum(),
        n in 1usize..300,
        spare: bool,
        ops in proptest::collection::vec(any_op(), 1..25),
        reverts in proptest::collection::vec(any::<bool>(), 25),
    ) {
        let quant = QUANTS[quant];
        let mut c = compressor(sel, quant, m, n, spare);
        let mut revertible = false;
        let mut before = c.clone(); // before the call a revert takes back
        for (op, revert) in ops.into_iter().zip(reverts) {
            if !matches!(op, Op::Restore) {
                before = c.clone();
            }
            // Whether the op can be reverted: a compress or accumulate that succeeded into
            // the spare; a failed restore changes nothing, not even that.
            revertible = spare && match op {
                Op::Compress(s) => c.compress_to_vec(&TestRng(s | 1).normals(n, 1.0)).is_ok(),
                Op::Accumulate(s) => c.accumulate(&TestRng(s | 1).normals(n, 1.0)).is_ok(),
                Op::Restore => c.restore().is_err() && revertible,
                Op::Poison(s, nan) => {
                    let mut g = TestRng(s | 1).normals(n, 1.0);
                    g[(s as usize) % n] = if nan { f32::NAN } else { f32::MAX };
                    c.compress_to_vec(&g).is_ok()
                }
                Op::Load => {
                    let r = c.residual().to_vec();
                    c.residual_mut().copy_from_slice(&r);
                    false
                }
            };
            prop_assert_eq!(c.can_revert(), revertible);
            if !revert {
                continue;
            }
            let after = snapshot(&c);
            match c.revert() {
                Ok(()) => {
                    revertible = false;
                    prop_assert_eq!(snapshot(&c), snapshot(&before));
                    prop_assert_eq!(c.can_restore(), before.can_restore());
                    prop_assert!(!c.can_revert());
                    let (mut x, mut y) = (c.clone(), before.clone());
                    prop_assert_eq!(x.restore(), y.restore());
                    prop_assert_eq!(snapshot(&x), snapshot(&y));
                    let g = TestRng(n as u64).normals(n, 1.0);
                    prop_assert_eq!(x.compress_to_vec(&g), y.compress_to_vec(&g));
                }
                Err(e) => {
                    prop_assert_eq!(e, Error::NothingToRestore);
                    prop_assert_eq!(snapshot(&c), after);
                }
            }
        }
    }
}
