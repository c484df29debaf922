//! Property tests of the streaming encoder (`src/stream.rs`): the error-feedback invariant
//! with every value quantiser and state format, chunking independence, equality with the
//! batch threshold compressor, held-back entries, and typed errors for misuse.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use iotcompress_core::{
    decode_to_vec, wire, Config, Error, IndexCoding, Momentum, Quant, Selection, StateFormat,
    StreamCompressor, StreamConfig, StreamMessage, StreamTarget,
};
use proptest::prelude::*;

const STREAM_QUANTS: [Quant; 5] = [
    Quant::F32,
    Quant::F16,
    Quant::Bf16,
    Quant::Int8,
    Quant::Int4,
];
const FORMATS: [StateFormat; 4] = [
    StateFormat::F32,
    StateFormat::F16,
    StateFormat::Bf16,
    StateFormat::Int8,
];

/// Random chunk lengths that add up to `n` (some empty).
fn split(n: usize, rng: &mut TestRng) -> Vec<usize> {
    let mut out = Vec::new();
    let mut left = n;
    while left > 0 {
        let len = match rng.next_u64() % 4 {
            0 => 0,
            1 => 1,
            2 => (rng.next_u64() % 40) as usize,
            _ => (rng.next_u64() % (n as u64 + 1)) as usize,
        }
        .min(left);
        out.push(len);
        left -= len;
    }
    out
}

/// One message through the encoder, `grad` fed in chunks of the given lengths.
fn stream_message(
    c: &mut StreamCompressor,
    state: &mut [u8],
    out: &mut [u8],
    grad: &[f32],
    chunks: &[usize],
) -> Vec<u8> {
    let mut enc = c.encoder(state, out).unwrap();
    let mut at = 0;
    for &len in chunks {
        enc.feed(&grad[at..at + len]).unwrap();
        at += len;
    }
    assert_eq!(at, grad.len());
    let info = enc.finish().unwrap();
    assert!(info.nnz <= info.selected);
    out[..info.bytes].to_vec()
}

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

/// The stated bound on the rounding of the compact state for the stored value of `x`, with
/// `block_max` the largest |x| of its int8 block.
fn state_bound(format: StateFormat, x: f64, block_max: f64) -> f64 {
    match format {
        StateFormat::F32 => 0.0,
        StateFormat::F16 => x.abs() * 2f64.powi(-11) + 2f64.powi(-25),
        StateFormat::Bf16 => x.abs() * 2f64.powi(-8) + 2f64.powi(-134),
        StateFormat::Int8 => (0.5 + 2f64.powi(-15)) * (block_max / 127.0) + 2f64.powi(-142),
    }
}

fn block_maxima(x: &[f64]) -> Vec<f64> {
    x.chunks(StateFormat::BLOCK)
        .flat_map(|b| {
            let m = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            std::iter::repeat_n(m, b.len())
        })
        .collect()
}

fn gradient_strategy() -> impl Strategy<Value = (usize, u64, f32)> {
    (
        1usize..300,
        any::<u64>(),
        prop_oneof![Just(1e-3f32), Just(1.0f32), Just(1e3f32)],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// `d + r' = v + ε + η` (module docs): exact with f32 values and f32 state, within the
    /// stated roundings otherwise; unsent entries keep `v` (rounded by the state format);
    /// the velocity is masked where sent. Every message decodes on the host.
    #[test]
    fn error_feedback_invariant((n, seed, scale) in gradient_strategy()) {
        let mut rng = TestRng(seed | 1);
        for quant in STREAM_QUANTS {
            for format in FORMATS {
                for momentum in momenta() {
                    let cfg = StreamConfig {
                        quant,
                        momentum,
                        state: format,
                        target: StreamTarget::Count((n as u32 / 10).max(1)),
                        ..StreamConfig::new(n, 1.5 * scale)
                    };
                    let mut c = StreamCompressor::new(cfg).unwrap();
                    let mut state = vec![0u8; cfg.state_len()];
                    let mut out = vec![0u8; cfg.full_message_len()];
                    for _step in 0..3 {
                        let g = rng.normals(n, scale);
                        let r_old: Vec<f32> = (0..n).map(|i| c.residual_at(&state, i)).collect();
                        let u_old: Vec<f32> = (0..n).map(|i| c.velocity_at(&state, i)).collect();
                        let chunks = split(n, &mut rng);
                        let msg = stream_message(&mut c, &mut state, &mut out, &g, &chunks);
                        let d = decode_to_vec(&msg, n).unwrap();
                        let sent: std::collections::HashSet<usize> =
                            entries(&msg).iter().map(|e| e.0).collect();
                        let (mut v, mut un) = (vec![0f32; n], vec![0f32; n]);
                        for i in 0..n {
                            (v[i], un[i]) = accumulate(momentum, r_old[i], u_old[i], g[i]);
                        }
                        let x: Vec<f64> = (0..n).map(|i| (v[i] - d[i]) as f64).collect();
                        let xmax = block_maxima(&x);
                        let uwant: Vec<f64> = (0..n)
                            .map(|i| if sent.contains(&i) { 0.0 } else { un[i] as f64 })
                            .collect();
                        let umax = block_maxima(&uwant);
                        for i in 0..n {
                            let r_new = c.residual_at(&state, i);
                            let back = d[i] as f64 + r_new as f64;
                            let eps = if quant == Quant::F32 { 0.0 } else { 2f64.powi(-24) * x[i].abs() };
                            let bound = eps + state_bound(format, x[i], xmax[i]);
                            prop_assert!((back - v[i] as f64).abs() <= bound,
                                "{:?} {:?} {:?} i={} d={} r'={} v={}", quant, format, momentum, i, d[i], r_new, v[i]);
                            if quant == Quant::F32 && format == StateFormat::F32 {
                                prop_assert_eq!(d[i] + r_new, v[i]);
                            }
                            if !sent.contains(&i) {
                                prop_assert_eq!(d[i], 0.0);
                            }
                            if momentum != Momentum::None {
                                let u_new = c.velocity_at(&state, i) as f64;
                                prop_assert!((u_new - uwant[i]).abs() <= state_bound(format, uwant[i], umax[i]),
                                    "velocity {:?} {:?} i={} {} vs {}", quant, format, i, u_new, uwant[i]);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The same gradients fed in one chunk or in chunks of random sizes give identical
    /// messages and identical state, message after message (adaptive threshold included).
    #[test]
    fn chunk_boundaries_do_not_change_the_bytes((n, seed, scale) in gradient_strategy(), cap_frac in 0.0f64..1.2) {
        let mut rng = TestRng(seed | 1);
        for quant in STREAM_QUANTS {
            for format in FORMATS {
                let momentum = if seed % 2 == 0 { Momentum::Vanilla(0.9) } else { Momentum::None };
                let cfg = StreamConfig {
                    quant,
                    momentum,
                    state: format,
                    target: if seed % 3 == 0 { StreamTarget::Bytes(64) } else { StreamTarget::Count(5) },
                    ..StreamConfig::new(n, scale)
                };
                // Sometimes an output buffer too small for everything: held-back entries too.
                let cap = cfg.min_message_len()
                    + ((cfg.full_message_len() - cfg.min_message_len()) as f64 * cap_frac) as usize;
                let (mut a, mut b) = (StreamCompressor::new(cfg).unwrap(), StreamCompressor::new(cfg).unwrap());
                let (mut sa, mut sb) = (vec![0u8; cfg.state_len()], vec![0u8; cfg.state_len()]);
                let (mut oa, mut ob) = (vec![0u8; cap], vec![0xa5u8; cap]);
                for _ in 0..4 {
                    let g = rng.normals(n, scale);
                    let one = stream_message(&mut a, &mut sa, &mut oa, &g, &[n]);
                    let chunks = split(n, &mut rng);
                    let many = stream_message(&mut b, &mut sb, &mut ob, &g, &chunks);
                    prop_assert_eq!(&one, &many, "{:?} {:?} chunks {:?}", quant, format, chunks);
                    prop_assert!(one.len() <= cap);
                    prop_assert_eq!(&sa, &sb);
                    prop_assert_eq!(a, b);
                    decode_to_vec(&one, n).unwrap();
                }
            }
        }
    }

    /// With a fixed threshold, a single message selects exactly the batch threshold
    /// compressor's entries; with f32 values and f32 state it also sends the same values
    /// and leaves the same residual and velocity, step after step (the bytes differ only in
    /// the index coding: Rice with the parameter fixed up front).
    #[test]
    fn fixed_threshold_equals_the_batch_threshold((n, seed, scale) in gradient_strategy(), wt_frac in 0.1f32..3.0) {
        let mut rng = TestRng(seed | 1);
        let wt = wt_frac * scale;
        for momentum in momenta() {
            for quant in STREAM_QUANTS {
                let cfg = StreamConfig { quant, momentum, ..StreamConfig::new(n, wt) };
                let mut s = StreamCompressor::new(cfg).unwrap();
                let mut state = vec![0u8; cfg.state_len()];
                // Room for any Rice block (at most 32 bits an element): nothing held back.
                let mut out = vec![0u8; cfg.full_message_len() + 4 * n];
                let mut batch = compressor(
                    Config { selection: Selection::Threshold(wt), quant, momentum, seed: 0 }, n);
                for _ in 0..3 {
                    let g = rng.normals(n, scale);
                    let chunks = split(n, &mut rng);
                    let msg = stream_message(&mut s, &mut state, &mut out, &g, &chunks);
                    let want = batch.compress_to_vec(&g).unwrap();
                    let (got_e, want_e) = (entries(&msg), entries(&want));
                    let got_idx: Vec<usize> = got_e.iter().map(|e| e.0).collect();
                    let want_idx: Vec<usize> = want_e.iter().map(|e| e.0).collect();
                    prop_assert_eq!(&got_idx, &want_idx, "{:?} {:?}", quant, momentum);
                    if quant != Quant::F32 {
                        break; // values (and so the residuals) differ from here on
                    }
                    prop_assert_eq!(got_e, want_e);
                    for i in 0..n {
                        prop_assert_eq!(s.residual_at(&state, i).to_bits(), batch.residual()[i].to_bits());
                        if momentum != Momentum::None {
                            prop_assert_eq!(s.velocity_at(&state, i).to_bits(), batch.velocity()[i].to_bits());
                        }
                    }
                    let h = wire::parse(&msg, n).unwrap().header;
                    let is_rice = matches!(h.index, IndexCoding::Rice { .. });
                    prop_assert!(is_rice);
                }
            }
        }
    }

    /// Misuse gives typed errors, never a panic, and leaves state and message unchanged.
    #[test]
    fn misuse_gives_typed_errors((n, seed, scale) in gradient_strategy()) {
        let mut rng = TestRng(seed | 1);
        let cfg = StreamConfig {
            quant: Quant::Int8,
            state: StateFormat::Int8,
            momentum: Momentum::Nesterov(0.5),
            ..StreamConfig::new(n, scale)
        };
        let mut c = StreamCompressor::new(cfg).unwrap();
        let mut state = vec![0u8; cfg.state_len()];
        let mut out = vec![0u8; cfg.full_message_len()];
        prop_assert_eq!(c.begin(&state[1..], &out).unwrap_err(), Error::LengthMismatch);
        prop_assert_eq!(c.begin(&state, &out[..cfg.min_message_len() - 1]).unwrap_err(), Error::BufferTooSmall);
        let g = rng.normals(n + 5, scale);
        let mut msg = c.begin(&state, &out).unwrap();
        // A first message to have a non-zero state.
        msg.feed(&c, &mut state, &mut out, &g[..n]).unwrap();
        msg.finish(&mut c, &state, &mut out).unwrap();

        let before = (c, state.clone());
        let mut msg = c.begin(&state, &out).unwrap();
        let half = n / 2;
        msg.feed(&c, &mut state, &mut out, &g[..half]).unwrap();
        let snapshot = (msg, state.clone(), out.clone());
        prop_assert_eq!(msg.feed(&c, &mut state, &mut out, &g[..n - half + 1]), Err(Error::LengthMismatch));
        prop_assert_eq!(msg.finish(&mut c, &state, &mut out), Err(Error::Incomplete));
        let mut bad = g[..n - half].to_vec();
        *bad.last_mut().unwrap() = f32::NAN;
        prop_assert_eq!(msg.feed(&c, &mut state, &mut out, &bad), Err(Error::NonFiniteGradient));
        prop_assert_eq!((msg, &state, &out), (snapshot.0, &snapshot.1, &snapshot.2));
        prop_assert_eq!(msg.feed(&c, &mut state, &mut out[1..], &g[..1]), Err(Error::LengthMismatch));
        prop_assert_eq!(msg.feed(&c, &mut state[1..], &mut out, &g[..1]), Err(Error::LengthMismatch));
        prop_assert_eq!(c, before.0);
        msg.feed(&c, &mut state, &mut out, &g[half..n]).unwrap();
        let info = msg.finish(&mut c, &state, &mut out).unwrap();
        decode_to_vec(&out[..info.bytes], n).unwrap();
        prop_assert_eq!(msg.feed(&c, &mut state, &mut out, &[]), Err(Error::StreamClosed));
        prop_assert_eq!(msg.finish(&mut c, &state, &mut out), Err(Error::StreamClosed));
    }

    /// A message whose fields were overwritten (a C program's garbage struct) gives errors or
    /// a valid message, never a panic or a write outside the buffers.
    #[test]
    fn garbage_message_fields_never_panic(seed in any::<u64>(), field in 0usize..14, value in any::<u32>()) {
        let n = 100;
        let mut rng = TestRng(seed | 1);
        let cfg = StreamConfig { quant: Quant::Int4, state: StateFormat::Int8, ..StreamConfig::new(n, 0.5) };
        let mut c = StreamCompressor::new(cfg).unwrap();
        let mut state = vec![0u8; cfg.state_len()];
        let mut out = vec![0u8; 60];
        let g = rng.normals(n, 1.0);
        let mut msg = c.begin(&state, &out).unwrap();
        msg.feed(&c, &mut state, &mut out, &g[..50]).unwrap();
        let f = f32::from_bits(value);
        match field {
            0 => msg.numel = value,
            1 => msg.out_len = value as usize,
            2 => msg.fed = value,
            3 => msg.selected = value,
            4 => msg.nnz = value,
            5 => msg.threshold = f,
            6 => msg.scale = f,
            7 => msg.rice_k = value,
            8 => msg.next = value,
            9 => msg.index_bytes = value,
            10 => msg.index_pending = value,
            11 => msg.index_pending_bits = value,
            12 => msg.value_bytes = value,
            _ => msg.max_selected = f,
        }
        let _ = msg.feed(&c, &mut state, &mut out, &g[50..]);
        if let Ok(info) = msg.finish(&mut c, &state, &mut out) {
            prop_assert!(info.bytes <= out.len());
        }
    }
}

/// A tiny output buffer holds entries back; they stay in the residual and go out later.
#[test]
fn held_back_entries_stay_in_the_residual() {
    let n = 1000;
    let cfg = StreamConfig {
        quant: Quant::Int8,
        ..StreamConfig::new(n, 0.5)
    };
    let mut c = StreamCompressor::new(cfg).unwrap();
    let mut state = vec![0u8; cfg.state_len()];
    let mut out = vec![0u8; 64];
    let mut rng = TestRng(7);
    let g = rng.normals(n, 1.0);
    let mut total = vec![0.0f64; n];
    let info = c.compress(&mut state, &g, &mut out).unwrap();
    assert!(info.bytes <= 64 && info.nnz > 0 && info.nnz < info.selected);
    let d = decode_to_vec(&out[..info.bytes], n).unwrap();
    for i in 0..n {
        total[i] += d[i] as f64;
    }
    // Later messages without new gradient drain the residual.
    let zero = vec![0.0f32; n];
    for _ in 0..200 {
        let info = c.compress(&mut state, &zero, &mut out).unwrap();
        let d = decode_to_vec(&out[..info.bytes], n).unwrap();
        for i in 0..n {
            total[i] += d[i] as f64;
        }
    }
    for i in 0..n {
        let r = c.residual_at(&state, i) as f64;
        assert!((total[i] + r - g[i] as f64).abs() <= 1e-5, "i={i}");
        assert!(r.abs() < 0.5 + 1e-6, "i={i}: {r} not drained below Wt");
    }
}

/// The int8 value scale is fixed up front: `max(M_prev, 2·Wt)/127`.
#[test]
fn value_scale_rule() {
    let n = 64;
    let wt = 0.25f32;
    let cfg = StreamConfig {
        quant: Quant::Int8,
        ..StreamConfig::new(n, wt)
    };
    let mut c = StreamCompressor::new(cfg).unwrap();
    let mut state = vec![0u8; cfg.state_len()];
    let mut out = vec![0u8; cfg.full_message_len()];
    let mut g = vec![0.0f32; n];
    g[3] = 3.0; // clipped at 2·Wt = 0.5 on the first message
    g[9] = -0.3;
    let info = c.compress(&mut state, &g, &mut out).unwrap();
    assert_eq!(info.scale, 0.5 / 127.0);
    let d = decode_to_vec(&out[..info.bytes], n).unwrap();
    assert_eq!(d[3], 127.0 * info.scale);
    assert_eq!(c.residual_at(&state, 3), 3.0 - d[3]);
    assert_eq!(c.last_max, 3.0);
    let info = c.compress(&mut state, &[0.0; 64], &mut out).unwrap();
    assert_eq!(info.scale, 3.0 / 127.0);
    assert_eq!(info.nnz, 1); // element 3's clipped excess
    let d = decode_to_vec(&out[..info.bytes], n).unwrap();
    assert!((d[3] - 2.5).abs() <= info.scale / 2.0);
}

/// The adaptive threshold settles near its target count; the messages decode. (With
/// momentum the counts alternate high/low from step to step, as in the batch compressor's
/// adaptive mode: the controller's eighth-root steps balance their geometric mean.)
#[test]
fn adaptive_threshold_tracks_its_target() {
    let n = 5000;
    for (format, momentum) in FORMATS
        .into_iter()
        .flat_map(|f| [(f, Momentum::None), (f, Momentum::Vanilla(0.9))])
    {
        let cfg = StreamConfig {
            quant: Quant::Int8,
            state: format,
            target: StreamTarget::Count(100),
            momentum,
            ..StreamConfig::new(n, 10.0) // far too high at first
        };
        let mut c = StreamCompressor::new(cfg).unwrap();
        let mut state = vec![0u8; cfg.state_len()];
        let mut out = vec![0u8; cfg.full_message_len()];
        let mut rng = TestRng(11);
        let mut last = Vec::new();
        for step in 0..80 {
            let g = rng.normals(n, 0.01);
            let info = c.compress(&mut state, &g, &mut out).unwrap();
            assert_eq!(info.nnz, info.selected);
            decode_to_vec(&out[..info.bytes], n).unwrap();
            if step >= 60 {
                last.push((info.selected as f64).max(1.0).ln());
            }
        }
        let mean = (last.iter().sum::<f64>() / last.len() as f64).exp();
        assert!(
            (60.0..170.0).contains(&mean),
            "{format:?} {momentum:?}: geometric mean selected {mean}"
        );
    }
}

/// Configurations the encoder cannot stream are refused.
#[test]
fn invalid_configs() {
    let ok = StreamConfig::new(10, 1.0);
    assert!(StreamCompressor::new(ok).is_ok());
    for bad in [
        StreamConfig {
            threshold: 0.0,
            ..ok
        },
        StreamConfig {
            threshold: f32::NAN,
            ..ok
        },
        StreamConfig {
            threshold: f32::INFINITY,
            ..ok
        },
        StreamConfig {
            quant: Quant::Sign,
            ..ok
        },
        StreamConfig {
            quant: Quant::Ternary,
            ..ok
        },
        StreamConfig {
            quant: Quant::Qsgd { levels: 4 },
            ..ok
        },
        StreamConfig {
            target: StreamTarget::Count(0),
            ..ok
        },
        StreamConfig {
            target: StreamTarget::Bytes(0),
            ..ok
        },
        StreamConfig {
            momentum: Momentum::Vanilla(1.0),
            ..ok
        },
        StreamConfig {
            momentum: Momentum::Vanilla(f32::NAN),
            ..ok
        },
        StreamConfig {
            numel: u32::MAX as usize + 1,
            ..ok
        },
    ] {
        assert_eq!(
            StreamCompressor::new(bad),
            Err(Error::InvalidConfig),
            "{bad:?}"
        );
    }
}

/// `v` that would overflow f32 is refused before anything changes.
#[test]
fn overflow_leaves_everything_unchanged() {
    let n = 10;
    let cfg = StreamConfig::new(n, 1.0);
    let mut c = StreamCompressor::new(cfg).unwrap();
    let mut state: Vec<u8> = [f32::MAX; 10]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let mut out = vec![0u8; cfg.full_message_len()];
    let mut msg = c.begin(&state, &out).unwrap();
    msg.feed(&c, &mut state, &mut out, &[-1.0; 3]).unwrap();
    let snapshot = (msg, state.clone(), out.clone());
    let mut g = [0.0f32; 7];
    g[5] = f32::MAX;
    assert_eq!(msg.feed(&c, &mut state, &mut out, &g), Err(Error::Overflow));
    assert_eq!((msg, &state, &out), (snapshot.0, &snapshot.1, &snapshot.2));
    g[5] = 0.0;
    msg.feed(&c, &mut state, &mut out, &g).unwrap();
    let info = msg.finish(&mut c, &state, &mut out).unwrap();
    assert_eq!(info.nnz, 10);
    assert_eq!(decode_to_vec(&out[..info.bytes], n).unwrap()[9], f32::MAX);
}

/// An empty tensor and a message that selects nothing are valid messages.
#[test]
fn empty_messages() {
    for n in [0usize, 1, 40] {
        let cfg = StreamConfig {
            quant: Quant::Int4,
            state: StateFormat::Int8,
            ..StreamConfig::new(n, 1e30)
        };
        let mut c = StreamCompressor::new(cfg).unwrap();
        let mut state = vec![0u8; cfg.state_len()];
        let mut out = vec![0u8; cfg.min_message_len()];
        let info = c.compress(&mut state, &vec![1.0; n], &mut out).unwrap();
        assert_eq!(info.nnz, 0);
        let m = wire::parse(&out[..info.bytes], n).unwrap();
        assert_eq!((m.header.numel as usize, m.header.nnz), (n, 0));
        let _: StreamMessage = c.begin(&state, &out).unwrap();
    }
}
