//! The scalar kernels are the specification: every SIMD kernel this CPU runs must give the
//! same bits on random and adversarial inputs, and threaded compression must give the same
//! messages and state as one thread.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_arguments)]

mod common;

use common::*;
use iotcompress_core::kernels::{self, parallel, Accumulated, Level, Update};
use iotcompress_core::{
    Buffers, Compressor, Config, Error, Momentum, OwnedCompressor, Quant, Selection, Spare, Target,
};
use proptest::prelude::*;

/// Values that stress the kernels: ordinary magnitudes, signed zeros, subnormals, values
/// near the overflow edge, exact threshold ties, and (rarely) NaN and infinities.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => -1.0f32..1.0,
        2 => -1e-3f32..1e-3,
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => (1u32..0x80_0000).prop_map(f32::from_bits),
        1 => prop_oneof![Just(f32::MAX), Just(-f32::MAX), Just(3.0e38f32)],
        1 => prop_oneof![Just(0.5f32), Just(-0.5f32)],
        // Exact rounding ties of bfloat16 and of (normal) f16.
        1 => any::<u16>().prop_map(|h| f32::from_bits(((h as u32 & 0xff7f) << 16) | 0x8000)),
        1 => (0x0400u16..0x7c00, any::<bool>()).prop_map(|(c, neg)| {
            let tie = f32::from_bits(iotcompress_core::f16_to_f32(c).to_bits() + 0x1000);
            if neg { -tie } else { tie }
        }),
        1 => prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
    ]
}

fn finite_value() -> impl Strategy<Value = f32> {
    value().prop_map(|v| if v.is_finite() { v } else { 0.25 })
}

fn rule() -> impl Strategy<Value = Momentum> {
    prop_oneof![
        Just(Momentum::None),
        (0.0f32..0.99).prop_map(Momentum::Vanilla),
        (0.0f32..0.99).prop_map(Momentum::Nesterov),
    ]
}

/// Bits, with every NaN made the same (NaN payloads are not part of any result).
fn bits(x: &[f32]) -> Vec<u32> {
    x.iter()
        .map(|v| if v.is_nan() { 0x7fc0_0000 } else { v.to_bits() })
        .collect()
}

fn simd_levels() -> Vec<Level> {
    Level::all_supported()
        .filter(|l| *l != Level::Scalar)
        .collect()
}

type Run = (Accumulated, Vec<u32>, Vec<u32>, Vec<u32>);

fn run_accumulate(
    level: Level,
    rule: Momentum,
    r: &[f32],
    u: &[f32],
    g: &[f32],
    at: Option<u32>,
    cap: usize,
    base: u32,
) -> Run {
    let (mut r, mut u) = (r.to_vec(), u.to_vec());
    let mut list = vec![u32::MAX; cap];
    let upd = Update::InPlace {
        r: &mut r,
        u: &mut u,
    };
    let a = kernels::accumulate(level, rule, upd, g, at, &mut list, base);
    (a, bits(&r), bits(&u), list)
}

/// Out-of-place buffers starting `offset` floats into a fresh allocation (every 32-byte
/// alignment, so the AVX2 kernel's scalar head takes 0 to 7 elements), filled with garbage.
fn spare(n: usize, offset: usize) -> Vec<f32> {
    vec![f32::from_bits(0x7fa5_a5a5); n + offset]
}

/// As [`run_accumulate`], out of place into buffers at the given offsets (`threads` > 1:
/// the threaded pass); checks that the old state is untouched.
fn run_into(
    level: Level,
    threads: usize,
    rule: Momentum,
    r: &[f32],
    u: &[f32],
    g: &[f32],
    at: Option<u32>,
    cap: usize,
    offsets: (usize, usize),
) -> Run {
    let (old_r, old_u) = (bits(r), bits(u));
    let (mut rn, mut un) = (spare(r.len(), offsets.0), spare(u.len(), offsets.1));
    let (r_new, u_new) = (&mut rn[offsets.0..], &mut un[offsets.1..]);
    let mut list = vec![u32::MAX; cap];
    // Streaming (non-temporal stores) and plain: the same bits.
    let stream = offsets.0 & 1 == 0;
    let upd = Update::Into {
        r,
        u,
        r_new,
        u_new,
        stream,
    };
    let a = if threads == 1 {
        kernels::accumulate(level, rule, upd, g, at, &mut list, 0)
    } else {
        parallel::accumulate_par(level, threads, rule, upd, g, at, &mut list)
    };
    assert_eq!((bits(r), bits(u)), (old_r, old_u), "the old state changed");
    (a, bits(&rn[offsets.0..]), bits(&un[offsets.1..]), list)
}

/// An old residual (`pad` extra elements first) with some entries equal to gradient values,
/// so that ties and cancellations occur, and a velocity when `rule` has one.
fn old_state(g: &[f32], seed: u64, rule: Momentum, pad: usize) -> (Vec<f32>, Vec<f32>) {
    let n = g.len();
    let mut rng = TestRng(seed | 1);
    let r = (0..n + pad)
        .map(|i| {
            if i % 7 == 0 && n > 0 {
                g[(i * 3) % n]
            } else {
                rng.normal()
            }
        })
        .collect();
    let u = if rule == Momentum::None {
        vec![]
    } else {
        rng.normals(n, 0.5)
    };
    (r, u)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn accumulate_matches_scalar(
        g in prop::collection::vec(value(), 0..300),
        seed in any::<u64>(),
        rule in rule(),
        at in prop_oneof![Just(None), Just(Some(0u32)), Just(Some(0x3f00_0000u32)), (0u32..0x7f80_0000).prop_map(Some)],
        cap in 0usize..64,
        base in any::<u32>(),
    ) {
        let (r, u) = old_state(&g, seed, rule, 0);
        // Also with the threshold at the largest finite |v|: the only hits are exact ties.
        let dry = run_accumulate(Level::Scalar, rule, &r, &u, &g, None, 0, 0);
        let top = dry.1.iter().map(|b| b & 0x7fff_ffff).filter(|m| *m < 0x7f80_0000).max();
        for at in [at, top] {
            let want = run_accumulate(Level::Scalar, rule, &r, &u, &g, at, cap, base);
            for level in simd_levels() {
                let got = run_accumulate(level, rule, &r, &u, &g, at, cap, base);
                prop_assert_eq!(&got, &want, "{:?}", level);
            }
        }
    }

    /// Out of place (double buffering): the in-place scalar result, in the new buffers, at
    /// every alignment of them, with the old state untouched; scalar included.
    #[test]
    fn accumulate_into_matches_scalar(
        g in prop::collection::vec(value(), 0..300),
        seed in any::<u64>(),
        rule in rule(),
        at in prop_oneof![Just(None), Just(Some(0u32)), Just(Some(0x3f00_0000u32)), (0u32..0x7f80_0000).prop_map(Some)],
        cap in 0usize..64,
        base in any::<u32>(),
        offsets in (0usize..8, 0usize..8),
        stream in any::<bool>(),
        r_start in 0usize..8,
    ) {
        let n = g.len();
        // The old state at an arbitrary offset too (its loads are unaligned).
        let (r, u) = old_state(&g, seed, rule, r_start);
        let r = &r[r_start..];
        let want = run_accumulate(Level::Scalar, rule, r, &u, &g, at, cap, base);
        for level in Level::all_supported() {
            let (mut rn, mut un) = (spare(n, offsets.0), spare(u.len(), offsets.1));
            let mut list = vec![u32::MAX; cap];
            let upd = Update::Into { r, u: &u, r_new: &mut rn[offsets.0..], u_new: &mut un[offsets.1..], stream };
            let a = kernels::accumulate(level, rule, upd, &g, at, &mut list, base);
            let got = (a, bits(&rn[offsets.0..]), bits(&un[offsets.1..]), list);
            prop_assert_eq!(&got, &want, "{:?} {:?}", level, offsets);
        }
    }

    #[test]
    fn read_only_kernels_match_scalar(
        x in prop::collection::vec(value(), 0..300),
        at in 0u32..0x7fff_ffff,
        cap in 0usize..64,
        base in any::<u32>(),
    ) {
        // The threshold at an element's own magnitude (exact ties) as well as a random one.
        let at = if at % 2 == 0 { x.first().map_or(at, |v| v.to_bits() & 0x7fff_ffff) } else { at };
        let want_max = kernels::scalar::max_mag(&x);
        let mut want_list = vec![u32::MAX; cap];
        let want_count = kernels::scalar::gather(&x, at, &mut want_list, base);
        let mut want_mags = vec![0u32; x.len()];
        kernels::scalar::magnitudes(&x, &mut want_mags);
        for level in simd_levels() {
            prop_assert_eq!(kernels::max_mag(level, &x), want_max);
            let mut list = vec![u32::MAX; cap];
            prop_assert_eq!(kernels::gather(level, &x, at, &mut list, base), want_count);
            prop_assert_eq!(&list, &want_list);
            let mut mags = vec![0u32; x.len()];
            kernels::magnitudes(level, &x, &mut mags);
            prop_assert_eq!(&mags, &want_mags);
        }
    }

    #[test]
    fn crc_matches_scalar(
        len in prop_oneof![0usize..100, 12_000usize..40_000],
        seed in any::<u64>(),
        start in any::<u32>(),
    ) {
        let mut rng = TestRng(seed | 1);
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let want = iotcompress_core::wire::crc::crc32c_update(start, &data);
        for level in simd_levels() {
            prop_assert_eq!(kernels::crc32c_update(level, start, &data), want);
        }
    }

    #[test]
    fn dense_quantisation_matches_scalar(
        r in prop::collection::vec(finite_value(), 0..200),
        quant in prop::sample::select(vec![Quant::F32, Quant::F16, Quant::Bf16, Quant::Int8, Quant::Sign]),
        scale in prop_oneof![Just(None), Just(Some(1e-3f32)), Just(Some(1e-35f32)), Just(Some(0.0f32)), (1e-6f32..10.0).prop_map(Some)],
        ties in any::<bool>(),
    ) {
        // With a power-of-two scale, half-integer multiples of it are exact rounding ties.
        let (r, scale) = if ties {
            let r: Vec<f32> = r.iter().enumerate().map(|(i, v)| {
                if i % 2 == 0 { ((v * 300.0) as i32 as f32 + 0.5) * 0.25 } else { *v }
            }).collect();
            (r, Some(0.25f32))
        } else {
            (r, scale)
        };
        // The pipeline's int8 scale is max|v|/127; other scales exercise clamping.
        let max = r.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = scale.unwrap_or((max / 127.0).max(f32::from_bits((max > 0.0) as u32)));
        let width = match quant { Quant::F32 => 4, Quant::Int8 => 1, Quant::Sign => 1, _ => 2 };
        let mut want_r = r.clone();
        let mut want = vec![0xa5u8; r.len() * width];
        kernels::scalar::quantize_dense(quant, scale, &mut want_r, &mut want);
        for level in simd_levels() {
            let mut got_r = r.clone();
            let mut got = vec![0xa5u8; r.len() * width];
            kernels::quantize_dense(level, quant, scale, &mut got_r, &mut got);
            prop_assert_eq!(&got, &want, "{:?} {:?}", level, quant);
            prop_assert_eq!(bits(&got_r), bits(&want_r));
        }
    }

    #[test]
    fn dense_f16_decode_matches_scalar(
        codes in prop::collection::vec(prop_oneof![8 => 0u16..0x7c00, 8 => 0x8000u16..0xfc00, 1 => any::<u16>()], 0..200),
        out in prop::collection::vec(-1.0f32..1.0, 200),
        scale in -4.0f32..4.0,
    ) {
        let bytes: Vec<u8> = codes.iter().flat_map(|c| c.to_le_bytes()).collect();
        let mut want = out[..codes.len()].to_vec();
        let ok = kernels::scalar::decode_add_f16(&bytes, &mut want, scale);
        for level in simd_levels() {
            let mut got = out[..codes.len()].to_vec();
            prop_assert_eq!(kernels::decode_add_f16(level, &bytes, &mut got, scale), ok);
            prop_assert_eq!(bits(&got), bits(&want));
        }
    }

    /// The whole pipeline, every selection and quantiser, with the SIMD level and the
    /// scalar one: the same messages and the same state.
    #[test]
    fn pipeline_is_the_same_without_simd(
        g in prop::collection::vec(finite_value(), 1..300),
        quant in prop::sample::select(QUANTS.to_vec()),
        selection in prop::sample::select(selections(0.5)),
        rule in prop::sample::select(momenta().to_vec()),
    ) {
        let config = Config { quant, momentum: rule, seed: 5, ..Config::new(selection) };
        // Double-buffered or not: the same messages and state.
        let run = |simd: bool, double: bool| {
            kernels::set_simd(simd);
            let mut c = OwnedCompressor::new(config, g.len()).unwrap();
            c.set_double_buffering(double);
            let mut msgs = Vec::new();
            for step in 0..3 {
                let grad: Vec<f32> = g.iter().map(|v| v * (step + 1) as f32 * 0.5).collect();
                msgs.push(c.compress_to_vec(&grad));
            }
            (msgs, bits(c.residual()), bits(c.velocity()))
        };
        let want = run(false, false);
        for (simd, double) in [(true, false), (true, true), (false, true)] {
            let got = run(simd, double);
            kernels::set_simd(true);
            prop_assert_eq!(&got, &want, "simd {} double {}", simd, double);
        }
    }
}

/// A large gradient whose candidates bunch in one part of the tensor (so one thread's share
/// of the candidate list overflows while the whole list would not) and elsewhere are spread
/// thinly; plus ties at the threshold.
fn bunched_gradient(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = TestRng(seed);
    let mut g = rng.normals(n, 1e-3);
    for v in g.iter_mut().take(n / 50) {
        *v *= 40.0;
    }
    for i in (0..n).step_by(9973) {
        g[i] = 0.02;
    }
    g
}

#[test]
fn threads_give_the_same_messages() {
    let n = 3 * parallel::MIN_PER_THREAD + 777;
    let mut sels = selections(0.01);
    sels.push(Selection::TopK {
        density: 0.001,
        exact: false,
    });
    sels.push(Selection::Adaptive(Target::Bytes(900)));
    // The 5 % selections pick about 9,900 entries: enough for the passes over the picked
    // entries to split over two threads too. One of them runs every code width, so that
    // each part's value codes are seen to start on a byte of their own.
    for selection in sels {
        let quants = match selection {
            Selection::Adaptive(Target::Density(_)) => &QUANTS[..],
            _ => &[Quant::Int8, Quant::F32, Quant::Sign][..],
        };
        for rule in momenta() {
            for &quant in quants {
                let config = Config {
                    quant,
                    momentum: rule,
                    seed: 9,
                    ..Config::new(selection)
                };
                // In place (the caller's buffers) or double-buffered (the owned compressor
                // swapping its spare in).
                let run = |threads: usize, double: bool| {
                    let mut c = OwnedCompressor::new(config, n).unwrap();
                    c.set_threads(threads);
                    c.set_double_buffering(double);
                    let mut msgs = Vec::new();
                    for step in 0..3 {
                        let g = bunched_gradient(n, 100 + step);
                        msgs.push(c.compress_to_vec(&g).unwrap());
                    }
                    let (r, u) = (bits(c.residual()), bits(c.velocity()));
                    (msgs, r, u, c.core().controller)
                };
                let one = run(1, false);
                for (threads, double) in [(1, true), (2, false), (2, true), (3, true), (4, false)] {
                    let (msgs, r, u, controller) = run(threads, double);
                    let case =
                        format!("{selection:?} {rule:?} {quant:?} x{threads} double {double}");
                    assert_eq!(msgs, one.0, "{case}");
                    assert_eq!((r, u), (one.1.clone(), one.2.clone()), "{case}");
                    assert_eq!(controller, one.3, "{case}");
                }
            }
        }
    }
}

#[test]
fn threaded_kernels_match_one_thread_when_a_share_overflows() {
    let n = 4 * parallel::MIN_PER_THREAD;
    let g = bunched_gradient(n, 3);
    let at = 0.01f32.to_bits();
    for level in Level::all_supported() {
        for cap in [10usize, 4000, 6000, n] {
            let one = run_accumulate(
                level,
                Momentum::None,
                &vec![0.0; n],
                &[],
                &g,
                Some(at),
                cap,
                0,
            );
            for threads in [2, 4] {
                let mut r = vec![0.0f32; n];
                let mut list = vec![u32::MAX; cap];
                let upd = Update::InPlace {
                    r: &mut r,
                    u: &mut [],
                };
                let a = parallel::accumulate_par(
                    level,
                    threads,
                    Momentum::None,
                    upd,
                    &g,
                    Some(at),
                    &mut list,
                );
                assert_eq!(a, one.0, "cap {cap} x{threads}");
                assert_eq!(bits(&r), one.1);
                if a.count <= cap {
                    assert_eq!(list[..a.count], one.3[..a.count], "cap {cap} x{threads}");
                }
                // Out of place: the regather reads the new buffer.
                let zeros = vec![0.0f32; n];
                let into = run_into(
                    level,
                    threads,
                    Momentum::None,
                    &zeros,
                    &[],
                    &g,
                    Some(at),
                    cap,
                    (3, 0),
                );
                assert_eq!(
                    (into.0, &into.1),
                    (one.0, &one.1),
                    "into, cap {cap} x{threads}"
                );
                if a.count <= cap {
                    assert_eq!(
                        into.3[..a.count],
                        one.3[..a.count],
                        "into, cap {cap} x{threads}"
                    );
                }
                let max = parallel::max_mag_par(level, threads, &g);
                assert_eq!(max, kernels::scalar::max_mag(&g));
            }
        }
    }
}

/// The threaded out-of-place pass, every rule and thread count 1..4, parts of every
/// alignment, NaN and infinity included: the one-thread in-place scalar result.
#[test]
fn threaded_accumulate_into_matches_scalar() {
    let n = 3 * parallel::MIN_PER_THREAD + 1001;
    let mut rng = TestRng(77);
    let mut g = bunched_gradient(n, 5);
    let r = rng.normals(n, 1e-2);
    for rule in momenta() {
        let u = if rule == Momentum::None {
            vec![]
        } else {
            rng.normals(n, 1e-3)
        };
        for bad in [None, Some(f32::NAN), Some(f32::INFINITY)] {
            if let Some(b) = bad {
                g[n - 5] = b;
            }
            let at = Some(0.01f32.to_bits());
            let want = run_accumulate(Level::Scalar, rule, &r, &u, &g, at, n, 0);
            for level in Level::all_supported() {
                for threads in 1..=4 {
                    for offsets in [(0, 0), (1, 5), (7, 7), (2, 2)] {
                        let got = run_into(level, threads, rule, &r, &u, &g, at, n, offsets);
                        let case = format!("{level:?} {rule:?} x{threads} {offsets:?} {bad:?}");
                        assert_eq!(got.0, want.0, "{case}");
                        assert_eq!((&got.1, &got.2), (&want.1, &want.2), "{case}");
                        assert_eq!(got.3[..got.0.count], want.3[..want.0.count], "{case}");
                    }
                }
            }
        }
    }
}

/// Double-buffered, a NaN or infinite gradient and an overflowing sum both leave the state
/// (residual, velocity, step, controller) exactly as it was, at every thread count; the
/// caller-lent core path reports where the state went.
#[test]
fn double_buffering_loses_nothing_on_bad_input() {
    let n = 2 * parallel::MIN_PER_THREAD + 333;
    for selection in [
        Selection::TopK {
            density: 0.001,
            exact: false,
        },
        Selection::Adaptive(Target::Density(0.01)),
        Selection::Dense,
    ] {
        for rule in momenta() {
            let config = Config {
                quant: Quant::Int8,
                momentum: rule,
                seed: 3,
                ..Config::new(selection)
            };
            for threads in 1..=3 {
                // Two steps, then a residual entry close to the overflow edge.
                let warm = |c: &mut OwnedCompressor| {
                    let mut rng = TestRng(11);
                    for _ in 0..2 {
                        c.compress_to_vec(&rng.normals(n, 1.0)).unwrap();
                    }
                    c.residual_mut()[n / 2] = 3e38;
                    rng
                };
                let mut c = OwnedCompressor::new(config, n).unwrap();
                assert!(!c.double_buffering(), "below DOUBLE_BUFFER_MIN");
                c.set_double_buffering(true);
                c.set_threads(threads);
                let mut rng = warm(&mut c);
                let before = (bits(c.residual()), bits(c.velocity()), *c.core());
                let mut g = rng.normals(n, 1.0);
                for (i, bad, err) in [
                    (n - 1, f32::NAN, Error::NonFiniteGradient),
                    (7, f32::NEG_INFINITY, Error::NonFiniteGradient),
                    (n / 2, 3e38, Error::Overflow),
                ] {
                    let keep = g[i];
                    g[i] = bad;
                    assert_eq!(c.compress_to_vec(&g), Err(err), "{selection:?} {rule:?}");
                    let after = (bits(c.residual()), bits(c.velocity()), *c.core());
                    assert!(after == before, "{selection:?} {rule:?} x{threads} {err:?}");
                    g[i] = keep;
                }
                // And it goes on as if the bad calls had not happened.
                let mut twin = OwnedCompressor::new(config, n).unwrap();
                twin.set_double_buffering(false);
                warm(&mut twin);
                assert_eq!(c.compress_to_vec(&g), twin.compress_to_vec(&g));
            }
        }
    }
    // The core API: with a spare the new state is there, and says so.
    let config = Config::new(Selection::Threshold(0.5));
    let mut c = Compressor::new(config, 100).unwrap();
    let (mut r, mut r2, mut s) = (
        vec![0.0f32; 100],
        vec![9.0f32; 100],
        vec![0u32; c.scratch_len()],
    );
    let mut out = vec![0u8; c.max_message_len()];
    let g: Vec<f32> = (0..100).map(|i| i as f32 / 200.0).collect();
    let spare = Some(Spare {
        residual: &mut r2,
        velocity: &mut [],
    });
    let bufs = Buffers {
        residual: &mut r,
        velocity: &mut [],
        scratch: &mut s,
        spare,
    };
    let info = c.compress(bufs, &g, &mut out).unwrap();
    assert!(info.swapped);
    assert!(r.iter().all(|v| *v == 0.0));
    assert_eq!(
        r2[..100],
        g[..100]
            .iter()
            .map(|v| if *v >= 0.5 { 0.0 } else { *v })
            .collect::<Vec<_>>()[..]
    );
}

#[test]
fn this_machine_runs_simd_where_the_cpu_has_it() {
    // CI runs on x86_64 with AVX2: if detection broke, the equality tests above would
    // silently compare scalar with scalar.
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        assert!(Level::all_supported().any(|l| l == Level::Avx2));
    }
    // Every aarch64 CPU has NEON (CI runs this suite for aarch64 under qemu-user).
    #[cfg(target_arch = "aarch64")]
    assert!(Level::all_supported().any(|l| l == Level::Neon));
}
