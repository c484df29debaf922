//! Property tests of the pipeline: error feedback, selection rules, quantiser bounds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use iotcompress_core::feedback::Momentum;
use iotcompress_core::{decode_to_vec, k_for_density, Config, Quant, Selection, Target};
use proptest::prelude::*;

fn gradient_strategy() -> impl Strategy<Value = (usize, u64, f32)> {
    (
        1usize..400,
        any::<u64>(),
        prop_oneof![Just(1e-3f32), Just(1.0f32), Just(1e3f32)],
    )
}

/// v = r_old (+) momentum-corrected g, as the core defines it, with the new velocity.
fn expected_v(m: Momentum, r: &[f32], u: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut v = Vec::with_capacity(g.len());
    let mut un = Vec::with_capacity(g.len());
    for i in 0..g.len() {
        let ui = u.get(i).copied().unwrap_or(0.0);
        let (vi, uni) = match m {
            Momentum::None => (r[i] + g[i], ui),
            Momentum::Vanilla(f) => {
                let x = f * ui + g[i];
                (r[i] + x, x)
            }
            Momentum::Nesterov(f) => {
                let x = f * (ui + g[i]);
                (r[i] + x + g[i], x)
            }
        };
        v.push(vi);
        un.push(uni);
    }
    (v, un)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// decoded + r_new == v (= r_old + accumulated update) in every mode: bit-exact with
    /// f32 values, within one f32 rounding otherwise; momentum is masked where sent.
    #[test]
    fn error_feedback_invariant((n, seed, scale) in gradient_strategy()) {
        let mut rng = TestRng(seed | 1);
        for sel in selections(scale) {
            for quant in QUANTS {
                for momentum in momenta() {
                    let mut c = compressor(config(sel, quant, momentum, seed), n);
                    for _step in 0..3 {
                        let g = rng.normals(n, scale);
                        let r_old = c.residual().to_vec();
                        let u_old = c.velocity().to_vec();
                        let msg = c.compress_to_vec(&g).unwrap();
                        let d = decode_to_vec(&msg, n).unwrap();
                        let (v, u_new) = expected_v(momentum, &r_old, &u_old, &g);
                        let sent: std::collections::HashSet<usize> = entries(&msg).iter().map(|e| e.0).collect();
                        for i in 0..n {
                            let back = d[i] + c.residual()[i];
                            if quant == Quant::F32 {
                                prop_assert_eq!(back, v[i], "{:?} {:?} {:?} i={}", sel, quant, momentum, i);
                            } else {
                                let tol = 2.0 * f32::EPSILON * (v[i].abs() + d[i].abs());
                                prop_assert!((back - v[i]).abs() <= tol, "{:?} {:?} {:?} i={} {} vs {}", sel, quant, momentum, i, back, v[i]);
                            }
                            if !sent.contains(&i) {
                                prop_assert_eq!(c.residual()[i], v[i]);
                            }
                            if momentum != Momentum::None {
                                let want = if sent.contains(&i) { 0.0 } else { u_new[i] };
                                prop_assert_eq!(c.velocity()[i], want);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Threshold mode sends exactly the entries with |v| >= Wt.
    #[test]
    fn threshold_sends_exactly_large_entries((n, seed, scale) in gradient_strategy(), wt_frac in 0.0f32..3.0) {
        let mut rng = TestRng(seed | 1);
        let wt = wt_frac * scale;
        for quant in QUANTS {
            let mut c = compressor(config(Selection::Threshold(wt), quant, Momentum::None, seed), n);
            for _ in 0..3 {
                let g = rng.normals(n, scale);
                let v: Vec<f32> = c.residual().iter().zip(&g).map(|(r, g)| r + g).collect();
                let msg = c.compress_to_vec(&g).unwrap();
                let sent: Vec<usize> = entries(&msg).iter().map(|e| e.0).collect();
                let want: Vec<usize> = (0..n).filter(|&i| v[i].abs() >= wt).collect();
                prop_assert_eq!(sent, want);
            }
        }
    }

    /// Exact top-k sends exactly k entries, the k largest; sampled never more than k.
    #[test]
    fn top_k_counts((n, seed, scale) in gradient_strategy(), density in 0.001f64..0.5) {
        let mut rng = TestRng(seed | 1);
        let k = k_for_density(density, n);
        let mut exact = compressor(config(Selection::TopK { density, exact: true }, Quant::F32, Momentum::None, seed), n);
        let mut sampled = compressor(config(Selection::TopK { density, exact: false }, Quant::F32, Momentum::None, seed), n);
        for _ in 0..3 {
            let g = rng.normals(n, scale);
            let v: Vec<f32> = exact.residual().iter().zip(&g).map(|(r, g)| r + g).collect();
            let msg = exact.compress_to_vec(&g).unwrap();
            let sent = entries(&msg);
            prop_assert_eq!(sent.len(), k);
            let smallest_sent = sent.iter().map(|e| e.1.abs()).fold(f32::INFINITY, f32::min);
            let sent_idx: std::collections::HashSet<usize> = sent.iter().map(|e| e.0).collect();
            for i in (0..n).filter(|i| !sent_idx.contains(i)) {
                prop_assert!(v[i].abs() <= smallest_sent);
            }
            let msg = sampled.compress_to_vec(&g).unwrap();
            prop_assert!(entries(&msg).len() <= k);
        }
    }

    /// Dense one-step roundtrip error is within each quantiser's stated bound.
    #[test]
    fn quantiser_error_bounds((n, seed, scale) in gradient_strategy()) {
        let mut rng = TestRng(seed | 1);
        let g = rng.normals(n, scale);
        let max = g.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let mean = g.iter().map(|x| x.abs() as f64).sum::<f64>() as f32 / n as f32;
        for quant in QUANTS {
            let mut c = compressor(config(Selection::Dense, quant, Momentum::None, seed), n);
            let d = decode_to_vec(&c.compress_to_vec(&g).unwrap(), n).unwrap();
            for i in 0..n {
                let (x, e) = (g[i], (d[i] - g[i]).abs());
                let bound = match quant {
                    Quant::F32 => 0.0,
                    Quant::F16 => x.abs() * 2f32.powi(-11) + 2f32.powi(-25),
                    Quant::Bf16 => x.abs() * 2f32.powi(-8),
                    Quant::Int8 => max / 127.0 * 0.5 * (1.0 + 1e-5),
                    Quant::Int4 => max / 7.0 * 0.5 * (1.0 + 1e-5),
                    Quant::Sign => x.abs().max(mean) * (1.0 + 1e-5),
                    Quant::Ternary => max * (1.0 + 1e-6),
                    Quant::Qsgd { levels } => max / levels as f32 * (1.0 + 1e-5),
                };
                prop_assert!(e <= bound, "{:?}: |{} - {}| = {} > {}", quant, d[i], x, e, bound);
            }
        }
    }
}

/// DGC's sampled top-k on ordinary (Gaussian) gradients sends between 0.8k and k.
#[test]
fn sampled_top_k_hits_at_least_80_percent() {
    for (n, density) in [
        (200_000usize, 0.001f64),
        (200_000, 0.01),
        (1_000_000, 0.001),
        (50_000, 0.05),
    ] {
        let k = k_for_density(density, n);
        for seed in 0..10u64 {
            let mut rng = TestRng(seed * 7 + 3);
            let mut c = compressor(
                config(
                    Selection::TopK {
                        density,
                        exact: false,
                    },
                    Quant::Int8,
                    Momentum::Vanilla(0.9),
                    seed,
                ),
                n,
            );
            for _ in 0..3 {
                let g = rng.normals(n, 1e-2);
                let sent = c.compress_to_vec(&g).unwrap();
                let nnz = entries(&sent).len();
                assert!(
                    nnz <= k && nnz as f64 >= 0.8 * k as f64,
                    "n={n} density={density} seed={seed}: {nnz} of {k}"
                );
            }
        }
    }
}

/// Pathological input: all magnitudes equal. Sampled top-k still never exceeds k.
#[test]
fn sampled_top_k_with_ties() {
    let n = 100_000;
    let k = k_for_density(0.001, n);
    let mut c = compressor(
        config(
            Selection::TopK {
                density: 0.001,
                exact: false,
            },
            Quant::F32,
            Momentum::None,
            1,
        ),
        n,
    );
    let g = vec![0.5f32; n];
    assert_eq!(entries(&c.compress_to_vec(&g).unwrap()).len(), k);
    let mut e = compressor(
        config(
            Selection::TopK {
                density: 0.001,
                exact: true,
            },
            Quant::F32,
            Momentum::None,
            1,
        ),
        n,
    );
    let sent = entries(&e.compress_to_vec(&g).unwrap());
    assert_eq!(sent.len(), k);
    assert_eq!(
        sent.iter().map(|e| e.0).collect::<Vec<_>>(),
        (0..k).collect::<Vec<_>>(),
        "ties go to lower indices"
    );
}

/// The adaptive threshold converges to its target density and byte budget.
#[test]
fn adaptive_threshold_tracks_targets() {
    let n = 100_000;
    let mut rng = TestRng(99);
    let mut c = compressor(
        config(
            Selection::Adaptive(Target::Density(0.01)),
            Quant::Int8,
            Momentum::None,
            0,
        ),
        n,
    );
    let mut counts = Vec::new();
    for _ in 0..30 {
        let msg = c.compress_to_vec(&rng.normals(n, 1.0)).unwrap();
        counts.push(entries(&msg).len());
    }
    let late: f64 = counts[20..].iter().sum::<usize>() as f64 / 10.0;
    assert!(
        (late / 1000.0 - 1.0).abs() < 0.25,
        "density target: {counts:?}"
    );

    let mut c = compressor(
        config(
            Selection::Adaptive(Target::Bytes(2000)),
            Quant::Int8,
            Momentum::None,
            0,
        ),
        n,
    );
    let mut sizes = Vec::new();
    for _ in 0..30 {
        sizes.push(c.compress_to_vec(&rng.normals(n, 1.0)).unwrap().len());
    }
    let late: f64 = sizes[20..].iter().sum::<usize>() as f64 / 10.0;
    assert!((late / 2000.0 - 1.0).abs() < 0.25, "byte target: {sizes:?}");
}

/// QSGD and ternary are unbiased: the mean of decoded values over many seeds approaches v.
#[test]
fn stochastic_quantisers_are_unbiased() {
    let n = 64;
    let mut rng = TestRng(5);
    let g = rng.normals(n, 1.0);
    for quant in [Quant::Qsgd { levels: 4 }, Quant::Ternary] {
        let trials = 4000;
        let mut mean = vec![0.0f64; n];
        for seed in 0..trials {
            let mut c = compressor(config(Selection::Dense, quant, Momentum::None, seed), n);
            let d = decode_to_vec(&c.compress_to_vec(&g).unwrap(), n).unwrap();
            for i in 0..n {
                mean[i] += d[i] as f64 / trials as f64;
            }
        }
        let max = g.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
        let scale = if quant == Quant::Ternary {
            max
        } else {
            max / 4.0
        };
        for i in 0..n {
            // Each draw is within one unit of v: the standard error is at most unit/sqrt(trials).
            let tol = 5.0 * scale / (trials as f64).sqrt();
            assert!(
                (mean[i] - g[i] as f64).abs() < tol,
                "{quant:?} i={i}: {} vs {}",
                mean[i],
                g[i]
            );
        }
    }
}

/// Gradients with NaN or infinity are refused and leave the state untouched.
#[test]
fn non_finite_gradient_is_refused_without_side_effects() {
    let n = 100;
    let mut c = compressor(
        config(
            Selection::TopK {
                density: 0.1,
                exact: false,
            },
            Quant::Int8,
            Momentum::Vanilla(0.9),
            3,
        ),
        n,
    );
    let mut rng = TestRng(1);
    c.compress_to_vec(&rng.normals(n, 1.0)).unwrap();
    let (r, u, step) = (c.residual().to_vec(), c.velocity().to_vec(), c.core().step);
    let mut g = rng.normals(n, 1.0);
    g[17] = f32::NAN;
    assert_eq!(
        c.compress_to_vec(&g),
        Err(iotcompress_core::Error::NonFiniteGradient)
    );
    assert_eq!(
        (c.residual(), c.velocity(), c.core().step),
        (&r[..], &u[..], step)
    );
}

/// The exact top-k of large tensors goes through sampled candidates; it must still be the
/// exact top-k (ties by lower index, zeros never), whatever the distribution.
#[test]
fn exact_top_k_of_large_tensors_is_exact() {
    let n = 100_000;
    let density = 0.01;
    let k = k_for_density(density, n);
    for case in 0..6u64 {
        let mut rng = TestRng(7 + case);
        let g: Vec<f32> = match case {
            // Few distinct magnitudes: many ties at the k-th value.
            0 | 1 => (0..n)
                .map(|_| (rng.normal() * 3.0).round() * 0.25)
                .collect(),
            // Fewer than k non-zeros.
            2 => (0..n)
                .map(|i| if i % 211 == 0 { rng.normal() } else { 0.0 })
                .collect(),
            // Heavy tail in one region (the sample may mislead).
            3 => (0..n)
                .map(|i| rng.normal() * if i < 2000 { 50.0 } else { 1.0 })
                .collect(),
            _ => rng.normals(n, 1e-3),
        };
        let selection = Selection::TopK {
            density,
            exact: true,
        };
        let mut c = compressor(Config::new(selection), n);
        let msg = c.compress_to_vec(&g).unwrap();
        let decoded = decode_to_vec(&msg, n).unwrap();
        let sent: Vec<usize> = (0..n).filter(|&i| decoded[i] != 0.0).collect();
        let mut order: Vec<usize> = (0..n).filter(|&i| g[i] != 0.0).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()).then(a.cmp(&b)));
        let mut want: Vec<usize> = order.into_iter().take(k).collect();
        want.sort_unstable();
        assert_eq!(sent, want, "case {case}");
    }
}

/// A byte target is a budget: no message is longer, even when the gradient's scale jumps
/// (the threshold is then far too low), and what does not fit stays in the residual.
#[test]
fn byte_budget_is_never_exceeded() {
    let mut rng = TestRng(2024);
    for &n in &[40usize, 3000, 70_000] {
        for quant in [Quant::Int8, Quant::F32, Quant::Int4, Quant::Sign] {
            for budget in [30u32, 64, 200, 1500] {
                let floor = iotcompress_core::wire::message_len_bound(n, 0, quant);
                let mut c = compressor(
                    config(
                        Selection::Adaptive(Target::Bytes(budget)),
                        quant,
                        Momentum::Vanilla(0.9),
                        7,
                    ),
                    n,
                );
                for step in 0..12 {
                    // Shocks at steps 5 and 9: a thousand times larger gradients.
                    let scale = if step == 5 || step == 9 { 1e3 } else { 1.0 };
                    let g = rng.normals(n, scale);
                    let (r_old, u_old) = (c.residual().to_vec(), c.velocity().to_vec());
                    let (v, _) = expected_v(Momentum::Vanilla(0.9), &r_old, &u_old, &g);
                    let msg = c.compress_to_vec(&g).unwrap();
                    assert!(
                        msg.len() <= (budget as usize).max(floor),
                        "n {n} {quant:?} budget {budget} step {step}: {} bytes",
                        msg.len()
                    );
                    // Nothing lost: what was sent plus what stays is what there was.
                    let d = decode_to_vec(&msg, n).unwrap();
                    for i in 0..n {
                        let kept = d[i] + c.residual()[i];
                        let tol = 2.0 * f32::EPSILON * (v[i].abs() + d[i].abs());
                        assert!(
                            (kept - v[i]).abs() <= tol,
                            "step {step} element {i}: {kept} != {}",
                            v[i]
                        );
                    }
                }
            }
        }
    }
}

/// `message_len_bound` bounds real messages wherever the entries lie.
#[test]
fn message_len_bound_holds() {
    let mut rng = TestRng(77);
    for &n in &[1usize, 9, 100, 5000, 100_000] {
        for density in [1e-4, 1e-3, 0.01, 0.1, 0.5, 0.9] {
            for quant in QUANTS {
                let sel = Selection::TopK {
                    density,
                    exact: true,
                };
                let mut c = compressor(config(sel, quant, Momentum::None, 3), n);
                // Clustered and spread-out positions.
                let mut g = rng.normals(n, 1.0);
                if density < 0.05 {
                    for (i, x) in g.iter_mut().enumerate() {
                        if i % 97 < 90 {
                            *x *= 1e-3;
                        }
                    }
                }
                let msg = c.compress_to_vec(&g).unwrap();
                let nnz = entries(&msg).len();
                let bound = iotcompress_core::wire::message_len_bound(n, nnz, quant);
                assert!(
                    msg.len() <= bound,
                    "n {n} d {density} {quant:?}: {} > {bound}",
                    msg.len()
                );
                let k = iotcompress_core::select::entries_within(bound, n, quant);
                assert!(k >= nnz, "entries_within({bound}) = {k} < {nnz}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// `accumulate` is the accumulation half of `compress`: the residual becomes v (the
    /// velocity its momentum update), nothing is sent and the message counter stays; a
    /// skipped round followed by a sent one sends what one round with the summed gradient
    /// would (from a zero state, where the f32 sums agree bit for bit).
    #[test]
    fn accumulate_is_compress_without_sending((n, seed, scale) in gradient_strategy()) {
        let mut rng = TestRng(seed | 1);
        for sel in selections(scale) {
            for momentum in momenta() {
                let cfg = config(sel, Quant::Int8, momentum, seed);
                let mut c = compressor(cfg, n);
                let g = rng.normals(n, scale);
                c.compress_to_vec(&rng.normals(n, scale)).unwrap();
                let (r_old, u_old, step) = (c.residual().to_vec(), c.velocity().to_vec(), c.core().step);
                c.accumulate(&g).unwrap();
                let (v, u_new) = expected_v(momentum, &r_old, &u_old, &g);
                prop_assert_eq!(c.residual(), &v[..]);
                if momentum != Momentum::None {
                    prop_assert_eq!(c.velocity(), &u_new[..]);
                }
                prop_assert_eq!(c.core().step, step);
            }
            let (g1, g2) = (rng.normals(n, scale), rng.normals(n, scale));
            let sum: Vec<f32> = g1.iter().zip(&g2).map(|(a, b)| a + b).collect();
            let mut skipped = compressor(config(sel, Quant::Int8, Momentum::None, seed), n);
            let mut once = compressor(config(sel, Quant::Int8, Momentum::None, seed), n);
            skipped.accumulate(&g1).unwrap();
            prop_assert_eq!(skipped.compress_to_vec(&g2).unwrap(), once.compress_to_vec(&sum).unwrap());
            prop_assert_eq!(skipped.residual(), once.residual());
        }
    }
}

/// A non-finite or mis-sized gradient leaves the state of `accumulate` unchanged.
#[test]
fn accumulate_rejects_bad_gradients_without_touching_the_state() {
    use iotcompress_core::Error;
    let n = 33;
    let mut rng = TestRng(7);
    let mut c = compressor(
        config(
            Selection::Threshold(0.5),
            Quant::F32,
            Momentum::Vanilla(0.9),
            1,
        ),
        n,
    );
    c.accumulate(&rng.normals(n, 1.0)).unwrap();
    let before = c.clone();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut g = rng.normals(n, 1.0);
        g[n / 2] = bad;
        assert_eq!(c.accumulate(&g), Err(Error::NonFiniteGradient));
    }
    assert_eq!(c.accumulate(&[1.0; 32]), Err(Error::LengthMismatch));
    assert_eq!(
        (c.residual(), c.velocity(), c.core()),
        (before.residual(), before.velocity(), before.core())
    );
}

/// `accumulate` into a spare (double buffering) gives the state the in-place path gives, and
/// a bad gradient or an overflow leaves the double-buffered state as it was.
#[test]
fn accumulate_double_buffered_equals_in_place() {
    use iotcompress_core::Error;
    let n = 1000;
    let mut rng = TestRng(31);
    for momentum in momenta() {
        let cfg = config(Selection::Threshold(1.0), Quant::Int8, momentum, 2);
        let (mut a, mut b) = (compressor(cfg, n), compressor(cfg, n));
        a.set_double_buffering(true);
        b.set_double_buffering(false);
        for step in 0..6 {
            let g = rng.normals(n, 1.0);
            if step % 2 == 0 {
                a.accumulate(&g).unwrap();
                b.accumulate(&g).unwrap();
            } else {
                assert_eq!(
                    a.compress_to_vec(&g).unwrap(),
                    b.compress_to_vec(&g).unwrap()
                );
            }
            assert_eq!((a.residual(), a.velocity()), (b.residual(), b.velocity()));
        }
        let mut g = rng.normals(n, 1.0);
        g[7] = f32::NAN;
        let before = (a.residual().to_vec(), a.velocity().to_vec());
        assert_eq!(a.accumulate(&g), Err(Error::NonFiniteGradient));
        assert_eq!((a.residual(), a.velocity()), (&before.0[..], &before.1[..]));
        // Finite gradients whose sum overflows: refused, the state as it was.
        let huge = vec![f32::MAX; n];
        let overflowed = (0..3).any(|_| {
            let before = (a.residual().to_vec(), a.velocity().to_vec());
            match a.accumulate(&huge) {
                Ok(()) => false,
                Err(e) => {
                    assert_eq!(e, Error::Overflow);
                    assert_eq!((a.residual(), a.velocity()), (&before.0[..], &before.1[..]));
                    true
                }
            }
        });
        assert!(overflowed);
    }
}

/// The message scale and the calibrated threshold are exactly the statistics of the values
/// sent, whichever way the selection picked them (trimmed candidates whose magnitudes it
/// kept, a list read back from the residual, a scan), on one thread or split over two.
#[test]
fn scale_is_the_statistic_of_the_sent_values() {
    let n = 200_000;
    let mut rng = TestRng(5);
    let (g1, g2) = (rng.normals(n, 1e-2), rng.normals(n, 1e-2));
    let selections = [
        Selection::TopK {
            density: 0.001,
            exact: false,
        },
        Selection::TopK {
            density: 0.05,
            exact: false,
        },
        Selection::TopK {
            density: 0.05,
            exact: true,
        },
        Selection::Threshold(0.02),
        Selection::Adaptive(Target::Density(0.05)),
        Selection::Adaptive(Target::Bytes(3000)),
    ];
    // The quantisers with a scale.
    let quants = QUANTS
        .into_iter()
        .filter(|q| !matches!(q, Quant::F32 | Quant::F16 | Quant::Bf16));
    for selection in selections {
        for quant in quants.clone() {
            for threads in [1, 2] {
                let case = format!("{selection:?} {quant:?} x{threads}");
                let mut c = compressor(config(selection, quant, Momentum::None, 1), n);
                c.set_threads(threads);
                for (step, g) in [&g1, &g2].into_iter().enumerate() {
                    // Without momentum the values are the residual plus the gradient.
                    let v: Vec<f32> = c.residual().iter().zip(g).map(|(r, g)| r + g).collect();
                    let msg = c.compress_to_vec(g).unwrap();
                    let sent: Vec<f32> = entries(&msg).iter().map(|&(i, _)| v[i].abs()).collect();
                    assert!(!sent.is_empty(), "{case}");
                    let max = sent.iter().fold(0f32, |a, &b| a.max(b));
                    let mean = sent.iter().map(|&a| a as f64).sum::<f64>() / sent.len() as f64;
                    let scale = match quant {
                        Quant::Int8 => max / 127.0,
                        Quant::Int4 => max / 7.0,
                        Quant::Sign => mean as f32,
                        _ => max,
                    };
                    let header = iotcompress_core::parse(&msg, usize::MAX).unwrap().header;
                    assert_eq!(
                        header.scale.to_bits(),
                        scale.to_bits(),
                        "{case} step {step}"
                    );
                    if step == 0 {
                        if let Selection::Adaptive(_) = selection {
                            // Calibration: the smallest magnitude sent becomes Wt.
                            let min = sent.iter().fold(f32::MAX, |a, &b| a.min(b));
                            assert_eq!(c.core().controller.threshold, min, "{case}");
                        }
                    }
                }
            }
        }
    }
}
