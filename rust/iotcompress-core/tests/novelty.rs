//! The novelty filter against a plain specification (a list of the last `capacity` kept
//! views, scanned whole), and its promises: deterministic, fixed memory, the exact variant
//! never keeps two remembered samples closer than its threshold, errors change nothing, the
//! adaptive threshold keeps about the fraction asked for.
#![allow(clippy::unwrap_used)]

use iotcompress_core::novelty::{
    bank_len, make_view, squared_distance, view_len, Metric, NoveltyConfig, NoveltyFilter,
};
use iotcompress_core::Error;
use proptest::prelude::*;

/// A redundant stream: a random walk of `dim`-value samples that often stands still, the
/// way overlapping sensor windows do.
fn stream(seed: u64, n: usize, dim: usize, still: f32) -> Vec<Vec<f32>> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut cur: Vec<f32> = (0..dim).map(|_| next()).collect();
    (0..n)
        .map(|_| {
            let step = if next() + 0.5 < still { 0.01 } else { 0.5 };
            cur.iter_mut().for_each(|c| *c += step * next());
            cur.clone()
        })
        .collect()
}

fn config(dim: u32, channels: u32, pool: u32, capacity: u32, metric: Metric) -> NoveltyConfig {
    NoveltyConfig {
        channels,
        pool,
        metric,
        ..NoveltyConfig::new(dim, capacity)
    }
}

/// The specification: every decision from the whole list of the last `capacity` kept views.
fn reference(c: &NoveltyConfig, samples: &[Vec<f32>]) -> (Vec<bool>, f32) {
    let mut kept: Vec<Vec<f32>> = Vec::new();
    let mut threshold = c.threshold;
    let mut out = Vec::new();
    for s in samples {
        let mut v = vec![0.0; view_len(c).unwrap()];
        make_view(c, s, &mut v);
        let nearest = kept
            .iter()
            .rev()
            .map(|k| squared_distance(&v, k))
            .fold(f32::INFINITY, f32::min);
        let keep = nearest >= threshold * threshold;
        if keep {
            kept.push(v);
            if kept.len() > c.capacity as usize {
                kept.remove(0);
            }
        }
        if c.keep > 0.0 {
            if threshold == 0.0 {
                if nearest.is_finite() {
                    threshold = (nearest as f64).sqrt() as f32;
                }
            } else {
                let f = if keep {
                    1.0 + c.rate * (1.0 - c.keep)
                } else {
                    1.0 - c.rate * c.keep
                };
                threshold *= f;
            }
        }
        out.push(keep);
    }
    (out, threshold)
}

fn run(c: NoveltyConfig, samples: &[Vec<f32>]) -> (Vec<bool>, NoveltyFilter, Vec<f32>) {
    let mut bank = vec![0.0; bank_len(&c).unwrap()];
    let mut f = NoveltyFilter::new(c).unwrap();
    let d = samples
        .iter()
        .map(|s| f.offer(&mut bank, s).unwrap())
        .collect();
    (d, f, bank)
}

fn arb_config() -> impl Strategy<Value = NoveltyConfig> {
    (
        1u32..4,
        1u32..12,
        1u32..4,
        1u32..20,
        prop::bool::ANY,
        0.0f32..1.5,
    )
        .prop_map(|(ch, row, pool, cap, cos, t)| NoveltyConfig {
            threshold: t,
            ..config(
                ch * row,
                ch,
                pool,
                cap,
                if cos {
                    Metric::Cosine
                } else {
                    Metric::Euclidean
                },
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The ring, the early exit and the newest-first scan decide as the whole-list spec does
    /// (fixed threshold: exact comparisons, no square roots involved).
    #[test]
    fn fixed_threshold_equals_specification(c in arb_config(), seed in 0u64..1000, still in 0.0f32..1.0) {
        let samples = stream(seed, 120, c.dim as usize, still);
        let (got, f, _) = run(c, &samples);
        prop_assert_eq!(&got, &reference(&c, &samples).0);
        prop_assert_eq!(f.kept(), got.iter().filter(|&&k| k).count() as u64);
    }

    /// Same stream, same decisions, same state and bank bytes; also in adaptive mode.
    #[test]
    fn deterministic(c in arb_config(), keep in 0.05f32..1.0, seed in 0u64..1000) {
        let c = NoveltyConfig { keep, ..c };
        let samples = stream(seed, 150, c.dim as usize, 0.7);
        let (a, fa, ba) = run(c, &samples);
        let (b, fb, bb) = run(c, &samples);
        prop_assert_eq!(a, b);
        prop_assert_eq!(fa, fb);
        prop_assert_eq!(ba.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), bb.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    /// Exact variant with room for every kept view: no two kept samples are closer than the
    /// threshold (squared distances of their views).
    #[test]
    fn exact_never_keeps_two_close_samples(c in arb_config(), seed in 0u64..1000) {
        let c = NoveltyConfig { capacity: 200, ..c };
        let samples = stream(seed, 200, c.dim as usize, 0.5);
        let (got, _, _) = run(c, &samples);
        let views: Vec<Vec<f32>> = samples.iter().zip(&got).filter(|(_, &k)| k).map(|(s, _)| {
            let mut v = vec![0.0; view_len(&c).unwrap()];
            make_view(&c, s, &mut v);
            v
        }).collect();
        let limit = c.threshold * c.threshold;
        for i in 0..views.len() {
            for j in 0..i {
                prop_assert!(squared_distance(&views[i], &views[j]) >= limit, "kept {} and {} closer than the threshold", i, j);
            }
        }
    }
}

#[test]
fn adaptive_threshold_equals_specification_and_hits_the_fraction() {
    for &(keep, metric) in &[
        (0.1f32, Metric::Euclidean),
        (0.3, Metric::Cosine),
        (0.05, Metric::Euclidean),
    ] {
        let c = NoveltyConfig {
            keep,
            ..config(24, 3, 2, 32, metric)
        };
        let samples = stream(7, 6000, 24, 0.8);
        let (got, f, _) = run(c, &samples);
        let (want, threshold) = reference(&c, &samples);
        // The spec's first threshold comes from f64's sqrt, the filter's from f32 Newton:
        // within an ulp, which can flip a rare borderline decision; the fraction is the promise.
        let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
        assert!(
            same as f64 >= 0.99 * got.len() as f64,
            "{same} of {}",
            got.len()
        );
        assert!((f.threshold() / threshold - 1.0).abs() < 0.2);
        let fraction = f.kept() as f64 / f.seen() as f64;
        assert!(
            (fraction - keep as f64).abs() < 0.02,
            "asked {keep}, kept {fraction}"
        );
    }
}

#[test]
fn memory_is_fixed_by_the_caller() {
    let c = NoveltyConfig {
        keep: 0.2,
        ..config(100, 4, 5, 16, Metric::Euclidean)
    };
    assert_eq!(view_len(&c), Some(4 * 5));
    assert_eq!(bank_len(&c), Some(17 * 20));
    let mut f = NoveltyFilter::new(c).unwrap();
    let mut bank = vec![0.0; bank_len(&c).unwrap()];
    for s in stream(3, 3000, 100, 0.5) {
        f.offer(&mut bank, &s).unwrap();
        assert!(f.ring().1 <= 16);
    }
    assert_eq!(f.ring().1, 16, "the ring filled and stayed at capacity");
    // Any other bank length is refused.
    for len in [bank.len() - 1, bank.len() + 1] {
        let mut other = vec![0.0; len];
        assert_eq!(f.offer(&mut other, &[0.0; 100]), Err(Error::LengthMismatch));
    }
}

#[test]
fn errors_change_nothing() {
    let c = NoveltyConfig {
        keep: 0.3,
        ..config(8, 2, 2, 4, Metric::Cosine)
    };
    let samples = stream(11, 40, 8, 0.5);
    let (_, mut f, mut bank) = run(c, &samples);
    let (before, bank_before) = (f, bank.clone());
    let mut nan = samples[0].clone();
    nan[3] = f32::NAN;
    let mut inf = samples[0].clone();
    inf[7] = f32::NEG_INFINITY;
    assert_eq!(f.offer(&mut bank, &nan), Err(Error::NonFiniteGradient));
    assert_eq!(f.offer(&mut bank, &inf), Err(Error::NonFiniteGradient));
    assert_eq!(
        f.offer(&mut bank, &samples[0][..7]),
        Err(Error::LengthMismatch)
    );
    assert_eq!(f, before);
    assert_eq!(bank, bank_before);
}

#[test]
fn invalid_configs_are_refused() {
    let ok = config(12, 3, 2, 4, Metric::Cosine);
    assert!(ok.validate().is_ok());
    for bad in [
        NoveltyConfig { dim: 0, ..ok },
        NoveltyConfig { channels: 5, ..ok },
        NoveltyConfig { channels: 0, ..ok },
        NoveltyConfig { pool: 0, ..ok },
        NoveltyConfig { capacity: 0, ..ok },
        NoveltyConfig {
            threshold: -1.0,
            ..ok
        },
        NoveltyConfig {
            threshold: f32::NAN,
            ..ok
        },
        NoveltyConfig { keep: 1.5, ..ok },
        NoveltyConfig {
            keep: 0.5,
            rate: 0.0,
            ..ok
        },
        NoveltyConfig {
            keep: 0.5,
            rate: 1.0,
            ..ok
        },
        NoveltyConfig {
            capacity: u32::MAX,
            dim: u32::MAX,
            ..ok
        },
    ] {
        assert_eq!(
            NoveltyFilter::new(bad),
            Err(Error::InvalidConfig),
            "{bad:?}"
        );
    }
    assert!(NoveltyFilter::from_parts(ok, 5, 0, 0.0, 0, 0).is_err());
    assert!(NoveltyFilter::from_parts(ok, 0, 0, 0.0, 1, 2).is_err());
    assert!(NoveltyFilter::from_parts(ok, 4, 4, 0.5, 9, 9).is_ok());
}

#[test]
fn cosine_views_ignore_offset_and_scale_euclidean_does_not() {
    let c = config(6, 2, 1, 4, Metric::Cosine);
    let a = [1.0f32, 2.0, 4.0, -1.0, 0.0, 3.0];
    let b: Vec<f32> = a.iter().map(|x| 3.0 * x).collect();
    let b: Vec<f32> = b
        .chunks(3)
        .flat_map(|r| r.iter().map(|x| x + 10.0).collect::<Vec<_>>())
        .collect();
    let (mut va, mut vb) = ([0.0; 6], [0.0; 6]);
    make_view(&c, &a, &mut va);
    make_view(&c, &b, &mut vb);
    assert!(squared_distance(&va, &vb) < 1e-10);
    let norm: f32 = va.iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-6);
    let e = NoveltyConfig {
        metric: Metric::Euclidean,
        ..c
    };
    make_view(&e, &a, &mut va);
    make_view(&e, &b, &mut vb);
    assert!(squared_distance(&va, &vb) > 100.0);
}
