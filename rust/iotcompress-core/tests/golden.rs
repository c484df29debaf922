//! Golden vectors: `tests/vectors/cases.json` lists inputs and options, `tests/vectors/*.bin`
//! the exact messages. This test asserts them byte for byte; the Python suite asserts the same
//! files through the bindings, and an independent decoder written from `docs/wire-format.md`
//! parses every one of them.
//!
//! Regenerate (only for an intentional wire change, with a version bump):
//! `IOTCOMPRESS_BLESS=1 cargo test -p iotcompress-core --test golden`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::TestRng;
use iotcompress_core::{Config, Momentum, OwnedCompressor, Quant, Selection, Target};
use serde_json::{json, Value};
use std::path::PathBuf;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors")
}

/// Options in the Python API's vocabulary, mapped the way the bindings map them.
fn config_from_options(o: &Value) -> Config {
    let f = |k: &str| o.get(k).and_then(Value::as_f64).map(|x| x as f32);
    let b = |k: &str| o.get(k).and_then(Value::as_bool).unwrap_or(false);
    let selection = match (
        o.get("density").and_then(Value::as_f64),
        f("threshold"),
        o.get("target_bytes").and_then(Value::as_u64),
    ) {
        (None, None, None) => Selection::Dense,
        (Some(d), None, None) if b("adaptive") => Selection::Adaptive(Target::Density(d)),
        (Some(d), None, None) => Selection::TopK {
            density: d,
            exact: b("exact"),
        },
        (None, Some(t), None) => Selection::Threshold(t),
        (None, None, Some(bytes)) => Selection::Adaptive(Target::Bytes(bytes as u32)),
        _ => panic!("conflicting options {o}"),
    };
    Config {
        selection,
        quant: Quant::from_name(o["quant"].as_str().unwrap()).unwrap(),
        momentum: Momentum::new(f("momentum").unwrap_or(0.0), b("nesterov")),
        seed: o.get("seed").and_then(Value::as_u64).unwrap_or(0),
    }
}

/// The cases: name, numel, options, steps, input scale. Small numel so that the
/// documentation can walk through their bytes.
fn specs() -> Vec<(&'static str, usize, Value, usize, f32)> {
    vec![
        (
            "threshold_int8",
            16,
            json!({"threshold": 0.5, "quant": "int8"}),
            2,
            0.5,
        ),
        (
            "topk_exact_f32",
            32,
            json!({"density": 0.1, "exact": true, "quant": "f32"}),
            2,
            1.0,
        ),
        ("dense_f16", 8, json!({"quant": "f16"}), 1, 10.0),
        ("dense_bf16", 8, json!({"quant": "bf16"}), 1, 10.0),
        (
            "threshold_int4_bitmap",
            40,
            json!({"threshold": 0.3, "quant": "int4"}),
            2,
            0.5,
        ),
        (
            "topk_sign",
            64,
            json!({"density": 0.125, "exact": true, "quant": "sign"}),
            2,
            1.0,
        ),
        (
            "dense_ternary",
            12,
            json!({"quant": "ternary", "seed": 7}),
            2,
            1.0,
        ),
        (
            "topk_qsgd4",
            48,
            json!({"density": 0.25, "exact": true, "quant": "qsgd:4", "seed": 3}),
            2,
            1.0,
        ),
        (
            "empty_int8",
            20,
            json!({"threshold": 100.0, "quant": "int8"}),
            1,
            1.0,
        ),
        (
            "sampled_nesterov_int8",
            20000,
            json!({"density": 0.001, "quant": "int8", "momentum": 0.9, "nesterov": true, "seed": 11}),
            3,
            1e-2,
        ),
        (
            "adaptive_density_f16",
            5000,
            json!({"density": 0.01, "adaptive": true, "quant": "f16"}),
            3,
            1.0,
        ),
    ]
}

fn hex_bits(g: &[f32]) -> Value {
    Value::Array(
        g.iter()
            .map(|x| Value::String(format!("{:08x}", x.to_bits())))
            .collect(),
    )
}

fn parse_bits(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| f32::from_bits(u32::from_str_radix(s.as_str().unwrap(), 16).unwrap()))
        .collect()
}

fn bless() {
    let dir = vectors_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let mut cases = Vec::new();
    for (i, (name, numel, options, steps, scale)) in specs().into_iter().enumerate() {
        let mut rng = TestRng(0x9e37_79b9 + i as u64);
        let mut c = OwnedCompressor::new(config_from_options(&options), numel).unwrap();
        let mut step_list = Vec::new();
        for s in 0..steps {
            // Round inputs to 1/1024ths so the JSON stays readable; bits are what count.
            let g: Vec<f32> = rng
                .normals(numel, scale)
                .iter()
                .map(|x| (x * 1024.0).round() / 1024.0)
                .collect();
            let msg = c.compress_to_vec(&g).unwrap();
            let file = format!("{name}.{s}.bin");
            std::fs::write(dir.join(&file), &msg).unwrap();
            step_list.push(json!({"grad": hex_bits(&g), "message": file}));
        }
        cases.push(json!({"name": name, "numel": numel, "options": options, "steps": step_list}));
    }
    let manifest = json!({
        "wire_version": iotcompress_core::wire::VERSION,
        "about": "grad: float32 bit patterns (hex, little-endian value order); message: the exact bytes of compress() at that step, starting from zero state",
        "cases": cases,
    });
    std::fs::write(
        dir.join("cases.json"),
        serde_json::to_string_pretty(&manifest).unwrap() + "\n",
    )
    .unwrap();
}

#[test]
fn golden_vectors_byte_for_byte() {
    if std::env::var_os("IOTCOMPRESS_BLESS").is_some() {
        bless();
    }
    let dir = vectors_dir();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
    assert_eq!(manifest["wire_version"], iotcompress_core::wire::VERSION);
    let cases = manifest["cases"].as_array().unwrap();
    assert_eq!(cases.len(), specs().len());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let numel = case["numel"].as_u64().unwrap() as usize;
        let mut c = OwnedCompressor::new(config_from_options(&case["options"]), numel).unwrap();
        for (s, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let g = parse_bits(&step["grad"]);
            let want = std::fs::read(dir.join(step["message"].as_str().unwrap())).unwrap();
            let got = c.compress_to_vec(&g).unwrap();
            assert_eq!(got, want, "{name} step {s}");
            // And the decoder accepts what the encoder wrote.
            let mut out = vec![0.0f32; numel];
            iotcompress_core::decode_add(&want, &mut out, 1.0).unwrap();
        }
    }
}

/// Field-level checks of the smallest vector against the byte tables of the spec.
#[test]
fn header_fields_match_the_spec() {
    let dir = vectors_dir();
    let msg = std::fs::read(dir.join("threshold_int8.0.bin")).unwrap();
    assert_eq!(&msg[..2], b"IC", "magic");
    assert_eq!(msg[2], 1, "version");
    let quant_id = msg[3] & 0x0f;
    let index_id = msg[3] >> 4;
    assert_eq!(quant_id, 3, "int8");
    assert!(index_id <= 2);
    assert_eq!(msg[4], 16, "numel varint");
    let m = iotcompress_core::parse(&msg, 16).unwrap();
    let crc = iotcompress_core::wire::crc::crc32c(&msg[..msg.len() - 4]);
    assert_eq!(
        msg[msg.len() - 4..],
        crc.to_le_bytes(),
        "trailing CRC-32C, little-endian"
    );
    assert_eq!(m.header.nnz as usize, common::entries(&msg).len());
}
