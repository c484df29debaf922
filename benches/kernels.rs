//! Criterion benches of the core (not tests): the kernels at every SIMD level this CPU runs,
//! and whole compress / decode_add calls, in elements per second.
//!
//!     cargo bench -p iotcompress-core --bench kernels            # everything
//!     cargo bench -p iotcompress-core --bench kernels -- accumulate
//!
//! `benches/suite.py` (make bench) reads criterion's estimates into benches/results/.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use iotcompress_core::kernels::{self, Level, Update};
use iotcompress_core::{
    decode_add, Buffers, Compressor, Config, Momentum, Quant, Selection, Target,
};

const SIZES: [usize; 4] = [10_000, 100_000, 1_000_000, 10_000_000];

/// Deterministic gradient-like data: |g| ~ 1e-3 with a sprinkling of larger entries.
fn gradient(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            if x & 0xff == 0 {
                u * 2e-2
            } else {
                u * 2e-3
            }
        })
        .collect()
}

fn modes() -> Vec<(&'static str, Config)> {
    let topk = |exact| Selection::TopK {
        density: 0.001,
        exact,
    };
    vec![
        (
            "topk0.1%_sampled_int8",
            Config {
                quant: Quant::Int8,
                ..Config::new(topk(false))
            },
        ),
        (
            "topk0.1%_sampled_int8_momentum",
            Config {
                quant: Quant::Int8,
                momentum: Momentum::Vanilla(0.9),
                ..Config::new(topk(false))
            },
        ),
        (
            "adaptive_threshold0.1%_int8",
            Config {
                quant: Quant::Int8,
                ..Config::new(Selection::Adaptive(Target::Density(0.001)))
            },
        ),
        (
            "topk0.1%_exact_int8",
            Config {
                quant: Quant::Int8,
                ..Config::new(topk(true))
            },
        ),
        (
            "dense_f16",
            Config {
                quant: Quant::F16,
                ..Config::new(Selection::Dense)
            },
        ),
        (
            "dense_int8",
            Config {
                quant: Quant::Int8,
                ..Config::new(Selection::Dense)
            },
        ),
    ]
}

fn accumulate(c: &mut Criterion) {
    let mut group = c.benchmark_group("accumulate");
    for n in SIZES {
        let g = gradient(n, 1);
        let neg: Vec<f32> = g.iter().map(|v| -v).collect();
        let mut r = vec![0.0f32; n];
        let mut u = vec![0.0f32; n];
        let mut list = vec![0u32; n / 100 + 64];
        group.throughput(Throughput::Elements(n as u64));
        for level in Level::all_supported() {
            for (name, rule) in [
                ("none", Momentum::None),
                ("momentum", Momentum::Vanilla(0.9)),
            ] {
                group.bench_function(
                    BenchmarkId::new(format!("{}/{name}", level.name()), n),
                    |b| {
                        let mut flip = false;
                        b.iter(|| {
                            // g and -g in turn keep the state bounded; the threshold (1.0) is
                            // never reached: this is the streaming cost.
                            flip = !flip;
                            black_box(kernels::accumulate(
                                level,
                                rule,
                                Update::InPlace {
                                    r: &mut r,
                                    u: &mut u,
                                },
                                if flip { &g } else { &neg },
                                Some(0x3f80_0000),
                                &mut list,
                                0,
                            ));
                        })
                    },
                );
            }
            group.bench_function(
                BenchmarkId::new(format!("{}/max_mag", level.name()), n),
                |b| b.iter(|| black_box(kernels::max_mag(level, &g))),
            );
            let bytes: Vec<u8> = g.iter().flat_map(|v| v.to_le_bytes()).collect();
            group.bench_function(
                BenchmarkId::new(format!("{}/crc32c", level.name()), n),
                |b| b.iter(|| black_box(kernels::crc32c_update(level, !0, &bytes))),
            );
        }
    }
    group.finish();
}

fn compress(c: &mut Criterion) {
    let mut group = c.benchmark_group("compress");
    for n in SIZES {
        let grads = [gradient(n, 2), gradient(n, 3)];
        group.throughput(Throughput::Elements(n as u64));
        for (name, config) in modes() {
            let mut comp = Compressor::new(config, n).unwrap();
            let mut r = vec![0.0f32; n];
            let mut u = vec![0.0f32; comp.velocity_len()];
            let mut s = vec![0u32; comp.scratch_len()];
            let mut out = vec![0u8; comp.max_message_len()];
            let mut step = 0usize;
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    step += 1;
                    let bufs = Buffers {
                        residual: &mut r,
                        velocity: &mut u,
                        scratch: &mut s,
                        spare: None,
                    };
                    black_box(comp.compress(bufs, &grads[step % 2], &mut out).unwrap())
                })
            });
        }
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_add");
    for n in SIZES {
        let g = gradient(n, 4);
        group.throughput(Throughput::Elements(n as u64));
        for (name, config) in modes() {
            let mut comp = iotcompress_core::OwnedCompressor::new(config, n).unwrap();
            let msg = comp.compress_to_vec(&g).unwrap();
            let mut out = vec![0.0f32; n];
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| black_box(decode_add(&msg, &mut out, 0.5).unwrap().header.nnz))
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = accumulate, compress, decode
}
criterion_main!(benches);
