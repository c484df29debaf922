//! The C ABI called the way C calls it: golden vectors byte for byte, decode equal to the
//! core's, and every bad argument answered with an error code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::ptr::{null, null_mut};
use std::ffi::CStr;
use std::path::PathBuf;

use iotcompress::*;
use serde_json::Value;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors")
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(vectors_dir().join("cases.json")).unwrap();
    let manifest: Value = serde_json::from_str(&text).unwrap();
    manifest["cases"].as_array().unwrap().clone()
}

fn default_config() -> IotcompressConfig {
    let mut c = std::mem::MaybeUninit::<IotcompressConfig>::uninit();
    // SAFETY: a valid pointer to writable memory for one config.
    assert_eq!(
        unsafe { iotcompress_config_default(c.as_mut_ptr()) },
        IOTCOMPRESS_OK
    );
    // SAFETY: initialised by the call above.
    unsafe { c.assume_init() }
}

/// Options in the Python API's vocabulary, as a C programmer would fill the config.
fn config_from_options(o: &Value) -> IotcompressConfig {
    let mut c = default_config();
    let adaptive = o.get("adaptive").and_then(Value::as_bool).unwrap_or(false);
    if let Some(t) = o.get("threshold").and_then(Value::as_f64) {
        c.selection = IOTCOMPRESS_SELECT_THRESHOLD;
        c.threshold = t as f32;
    }
    if let Some(d) = o.get("density").and_then(Value::as_f64) {
        c.selection = if adaptive {
            IOTCOMPRESS_SELECT_ADAPTIVE_DENSITY
        } else {
            IOTCOMPRESS_SELECT_TOPK
        };
        c.density = d;
        c.exact = o.get("exact").and_then(Value::as_bool).unwrap_or(false) as u32;
    }
    if let Some(b) = o.get("target_bytes").and_then(Value::as_u64) {
        c.selection = IOTCOMPRESS_SELECT_ADAPTIVE_BYTES;
        c.target_bytes = b as u32;
    }
    let quant = o["quant"].as_str().unwrap();
    (c.quant, c.qsgd_levels) = match quant {
        "f32" => (IOTCOMPRESS_QUANT_F32, 0),
        "f16" => (IOTCOMPRESS_QUANT_F16, 0),
        "bf16" => (IOTCOMPRESS_QUANT_BF16, 0),
        "int8" => (IOTCOMPRESS_QUANT_INT8, 0),
        "int4" => (IOTCOMPRESS_QUANT_INT4, 0),
        "sign" => (IOTCOMPRESS_QUANT_SIGN, 0),
        "ternary" => (IOTCOMPRESS_QUANT_TERNARY, 0),
        "qsgd" => (IOTCOMPRESS_QUANT_QSGD, 15),
        q => (
            IOTCOMPRESS_QUANT_QSGD,
            q.strip_prefix("qsgd:").unwrap().parse().unwrap(),
        ),
    };
    if let Some(m) = o.get("momentum").and_then(Value::as_f64) {
        c.momentum = m as f32;
        c.momentum_kind = if o.get("nesterov").and_then(Value::as_bool) == Some(true) {
            IOTCOMPRESS_MOMENTUM_NESTEROV
        } else {
            IOTCOMPRESS_MOMENTUM_VANILLA
        };
    }
    c.seed = o.get("seed").and_then(Value::as_u64).unwrap_or(0);
    c
}

fn grad_of(step: &Value) -> Vec<f32> {
    step["grad"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| f32::from_bits(u32::from_str_radix(h.as_str().unwrap(), 16).unwrap()))
        .collect()
}

/// A compressor with its buffers, all owned by the test as C would own them.
struct Device {
    state: IotcompressCompressor,
    residual: Vec<f32>,
    velocity: Vec<f32>,
    scratch: Vec<u32>,
    out: Vec<u8>,
}

impl Device {
    fn new(config: &IotcompressConfig, numel: u32) -> Device {
        let mut sizes = IotcompressSizes::default();
        // SAFETY: valid pointers.
        assert_eq!(
            unsafe { iotcompress_sizes(config, numel, &mut sizes) },
            IOTCOMPRESS_OK
        );
        assert_eq!(sizes.state_size, iotcompress_state_size());
        assert_eq!(sizes.residual_len, numel as usize);
        assert!(sizes.scratch_len <= numel as usize);
        let mut state = std::mem::MaybeUninit::<IotcompressCompressor>::zeroed();
        // SAFETY: valid pointers.
        assert_eq!(
            unsafe { iotcompress_init(state.as_mut_ptr(), config, numel) },
            IOTCOMPRESS_OK
        );
        Device {
            // SAFETY: initialised by iotcompress_init.
            state: unsafe { state.assume_init() },
            residual: vec![0.0; sizes.residual_len],
            velocity: vec![0.0; sizes.velocity_len],
            scratch: vec![0; sizes.scratch_len],
            out: vec![0; sizes.max_message_len],
        }
    }

    fn bufs(&mut self) -> IotcompressBuffers {
        IotcompressBuffers {
            residual: self.residual.as_mut_ptr(),
            residual_len: self.residual.len(),
            velocity: if self.velocity.is_empty() {
                null_mut()
            } else {
                self.velocity.as_mut_ptr()
            },
            velocity_len: self.velocity.len(),
            scratch: self.scratch.as_mut_ptr(),
            scratch_len: self.scratch.len(),
        }
    }

    fn compress(&mut self, grad: &[f32]) -> Result<Vec<u8>, IotcompressStatus> {
        let bufs = self.bufs();
        let mut info = IotcompressStepInfo::default();
        // SAFETY: every pointer is valid for its length and the buffers are distinct.
        let rc = unsafe {
            iotcompress_compress(
                &mut self.state,
                &bufs,
                grad.as_ptr(),
                grad.len(),
                self.out.as_mut_ptr(),
                self.out.len(),
                &mut info,
            )
        };
        if rc != IOTCOMPRESS_OK {
            return Err(rc);
        }
        Ok(self.out[..info.bytes].to_vec())
    }
}

fn decode(msg: &[u8], numel: usize) -> (Vec<f32>, IotcompressHeader) {
    let mut out = vec![0.0f32; numel];
    let mut header = IotcompressHeader::default();
    // SAFETY: valid pointers and lengths.
    let rc = unsafe {
        iotcompress_decode_add(
            msg.as_ptr(),
            msg.len(),
            out.as_mut_ptr(),
            out.len(),
            1.0,
            &mut header,
        )
    };
    assert_eq!(rc, IOTCOMPRESS_OK, "{}", name(rc));
    (out, header)
}

fn name(code: i32) -> String {
    // SAFETY: the function returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(iotcompress_error_name(code)) }
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn golden_vectors_through_the_c_abi() {
    let cases = cases();
    assert!(cases.len() >= 10);
    for case in &cases {
        let numel = case["numel"].as_u64().unwrap() as u32;
        let config = config_from_options(&case["options"]);
        let mut dev = Device::new(&config, numel);
        for (i, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let want =
                std::fs::read(vectors_dir().join(step["message"].as_str().unwrap())).unwrap();
            let got = dev.compress(&grad_of(step)).unwrap();
            assert_eq!(got, want, "{} step {i}", case["name"]);
            assert_eq!(dev.state.step, i as u64 + 1);

            let (dense, header) = decode(&want, numel as usize);
            let mut core = vec![0.0f32; numel as usize];
            let m = iotcompress_core::decode_add(&want, &mut core, 1.0).unwrap();
            assert_eq!(
                dense.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                core.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(header.numel, m.header.numel);
            assert_eq!(header.nnz, m.header.nnz);
            assert_eq!(header.quant, m.header.quant.id() as u32);
            assert_eq!(header.message_len, want.len());
            assert_eq!(
                header.header_len + header.index_len + header.values_len + 4,
                want.len()
            );
            let mut parsed = IotcompressHeader::default();
            // SAFETY: valid pointers.
            let rc = unsafe { iotcompress_parse(want.as_ptr(), want.len(), numel, &mut parsed) };
            assert_eq!(rc, IOTCOMPRESS_OK);
            assert_eq!(parsed, header);
        }
    }
}

#[test]
fn sizes_match_the_core_and_the_static_bound() {
    let quants = [
        (IOTCOMPRESS_QUANT_F32, 0, 32),
        (IOTCOMPRESS_QUANT_F16, 0, 16),
        (IOTCOMPRESS_QUANT_BF16, 0, 16),
        (IOTCOMPRESS_QUANT_INT8, 0, 8),
        (IOTCOMPRESS_QUANT_INT4, 0, 4),
        (IOTCOMPRESS_QUANT_SIGN, 0, 1),
        (IOTCOMPRESS_QUANT_TERNARY, 0, 2),
        (IOTCOMPRESS_QUANT_QSGD, 1, 9),
        (IOTCOMPRESS_QUANT_QSGD, 255, 9),
    ];
    for numel in [0u32, 1, 7, 8, 100, 4096, 20_000, 1 << 20] {
        for &(quant, levels, bits) in &quants {
            let len = iotcompress_max_message_len(quant, levels, numel);
            // IOTCOMPRESS_MAX_MESSAGE_LEN of the header.
            let n = numel as usize;
            let bound = 24 + n.div_ceil(8) + (n * bits).div_ceil(8) + 4;
            assert!(len > 0 && len <= bound, "{quant} {numel}: {len} > {bound}");
        }
    }
    assert_eq!(iotcompress_max_message_len(99, 0, 10), 0);
    assert_eq!(
        iotcompress_max_message_len(IOTCOMPRESS_QUANT_QSGD, 0, 10),
        0
    );
    assert_eq!(
        iotcompress_max_message_len(IOTCOMPRESS_QUANT_QSGD, 256, 10),
        0
    );

    let mut c = default_config();
    c.selection = IOTCOMPRESS_SELECT_TOPK;
    c.density = 0.01;
    c.momentum_kind = IOTCOMPRESS_MOMENTUM_VANILLA;
    c.momentum = 0.9;
    let mut s = IotcompressSizes::default();
    // SAFETY: valid pointers.
    assert_eq!(
        unsafe { iotcompress_sizes(&c, 100_000, &mut s) },
        IOTCOMPRESS_OK
    );
    let core = iotcompress_core::Compressor::new(
        iotcompress_core::Config {
            selection: iotcompress_core::Selection::TopK {
                density: 0.01,
                exact: false,
            },
            momentum: iotcompress_core::Momentum::Vanilla(0.9),
            ..iotcompress_core::Config::new(iotcompress_core::Selection::Dense)
        },
        100_000,
    )
    .unwrap();
    assert_eq!(s.velocity_len, 100_000);
    assert_eq!(s.scratch_len, core.scratch_len());
    assert!(s.scratch_len < 100_000);
    assert_eq!(s.max_message_len, core.max_message_len());
}

#[test]
fn invalid_configs_are_rejected() {
    let base = default_config();
    let mut s = IotcompressSizes::default();
    type Edit = Box<dyn Fn(&mut IotcompressConfig)>;
    let bad: Vec<Edit> = vec![
        Box::new(|c| c.selection = 5),
        Box::new(|c| c.quant = 8),
        Box::new(|c| {
            c.quant = IOTCOMPRESS_QUANT_QSGD;
            c.qsgd_levels = 0;
        }),
        Box::new(|c| {
            c.quant = IOTCOMPRESS_QUANT_QSGD;
            c.qsgd_levels = 256;
        }),
        Box::new(|c| c.momentum_kind = 3),
        Box::new(|c| {
            c.momentum_kind = IOTCOMPRESS_MOMENTUM_VANILLA;
            c.momentum = 1.0;
        }),
        Box::new(|c| {
            c.selection = IOTCOMPRESS_SELECT_TOPK;
            c.density = 0.0;
        }),
        Box::new(|c| {
            c.selection = IOTCOMPRESS_SELECT_TOPK;
            c.density = f64::NAN;
        }),
        Box::new(|c| {
            c.selection = IOTCOMPRESS_SELECT_THRESHOLD;
            c.threshold = -1.0;
        }),
        Box::new(|c| {
            c.selection = IOTCOMPRESS_SELECT_ADAPTIVE_BYTES;
            c.target_bytes = 0;
        }),
        Box::new(|c| c.state_format = 1),
        Box::new(|c| c.reserved = 1),
    ];
    for (i, f) in bad.iter().enumerate() {
        let mut c = base;
        f(&mut c);
        // SAFETY: valid pointers.
        assert_eq!(
            unsafe { iotcompress_sizes(&c, 10, &mut s) },
            IOTCOMPRESS_ERR_INVALID_CONFIG,
            "case {i}"
        );
        let mut state = std::mem::MaybeUninit::<IotcompressCompressor>::zeroed();
        // SAFETY: valid pointers.
        assert_eq!(
            unsafe { iotcompress_init(state.as_mut_ptr(), &c, 10) },
            IOTCOMPRESS_ERR_INVALID_CONFIG
        );
        // SAFETY: zeroed is a valid value of this plain struct.
        assert_eq!(unsafe { state.assume_init() }.magic, 0, "state untouched");
    }
}

#[test]
fn bad_pointers_and_state_are_error_codes() {
    let mut c = default_config();
    c.selection = IOTCOMPRESS_SELECT_THRESHOLD;
    c.threshold = 0.5;
    c.quant = IOTCOMPRESS_QUANT_INT8;
    let mut dev = Device::new(&c, 16);
    let grad = [0.75f32; 16];
    let mut info = IotcompressStepInfo::default();
    let mut bufs = dev.bufs();
    let out = dev.out.as_mut_ptr();
    let cap = dev.out.len();
    let st: *mut IotcompressCompressor = &mut dev.state;
    // SAFETY (every call below): pointers are either NULL, or valid for their lengths, or
    // deliberately wrong in a way the function must detect before dereferencing.
    unsafe {
        assert_eq!(
            iotcompress_config_default(null_mut()),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_sizes(null(), 1, &mut IotcompressSizes::default()),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_sizes(&c, 1, null_mut()),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_init(null_mut(), &c, 1),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_init(st, null(), 1),
            IOTCOMPRESS_ERR_NULL_POINTER
        );

        let info_p: *mut IotcompressStepInfo = &mut info;
        let compress =
            |st: *mut IotcompressCompressor,
             bufs: *const IotcompressBuffers,
             g: *const f32,
             n: usize,
             o: *mut u8,
             cap: usize| { iotcompress_compress(st, bufs, g, n, o, cap, info_p) };
        assert_eq!(
            compress(null_mut(), &bufs, grad.as_ptr(), 16, out, cap),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            compress(st, null(), grad.as_ptr(), 16, out, cap),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            compress(st, &bufs, null(), 16, out, cap),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            compress(st, &bufs, grad.as_ptr(), 16, null_mut(), cap),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            compress(st, &bufs, grad.as_ptr(), 15, out, cap),
            IOTCOMPRESS_ERR_LENGTH_MISMATCH
        );
        assert_eq!(
            compress(st, &bufs, grad.as_ptr(), 16, out, cap - 1),
            IOTCOMPRESS_ERR_BUFFER_TOO_SMALL
        );
        let misaligned = (grad.as_ptr() as *const u8).add(1) as *const f32;
        assert_eq!(
            compress(st, &bufs, misaligned, 15, out, cap),
            IOTCOMPRESS_ERR_MISALIGNED
        );
        // The gradient is the residual: overlap.
        assert_eq!(
            compress(st, &bufs, bufs.residual, 16, out, cap),
            IOTCOMPRESS_ERR_OVERLAP
        );
        // The output overlaps the scratch.
        assert_eq!(
            compress(st, &bufs, grad.as_ptr(), 16, bufs.scratch as *mut u8, cap),
            IOTCOMPRESS_ERR_OVERLAP
        );
        let saved = bufs;
        bufs.scratch_len = 0;
        assert_eq!(
            compress(st, &bufs, grad.as_ptr(), 16, out, cap),
            IOTCOMPRESS_ERR_SCRATCH_TOO_SMALL
        );
        bufs = saved;
        bufs.residual = null_mut();
        assert_eq!(
            compress(st, &bufs, grad.as_ptr(), 16, out, cap),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        bufs = saved;
        let nan = [f32::NAN; 16];
        assert_eq!(
            compress(st, &bufs, nan.as_ptr(), 16, out, cap),
            IOTCOMPRESS_ERR_NON_FINITE_GRADIENT
        );
        assert_eq!((*st).step, 0);
        // Corrupt state: an error, never a crash.
        (*st).magic = 0;
        assert_eq!(
            compress(st, &bufs, grad.as_ptr(), 16, out, cap),
            IOTCOMPRESS_ERR_BAD_STATE
        );
        (*st).magic = IOTCOMPRESS_STATE_MAGIC;
        (*st).config.quant = 77;
        assert_eq!(
            compress(st, &bufs, grad.as_ptr(), 16, out, cap),
            IOTCOMPRESS_ERR_INVALID_CONFIG
        );
        (*st).config.quant = IOTCOMPRESS_QUANT_INT8;
        assert!(
            dev.residual.iter().all(|&r| r == 0.0),
            "errors left the residual alone"
        );
        assert_eq!(
            compress(st, &bufs, grad.as_ptr(), 16, out, cap),
            IOTCOMPRESS_OK
        );
        assert_eq!((*st).step, 1);
        // info may be NULL.
        assert_eq!(
            iotcompress_compress(st, &bufs, grad.as_ptr(), 16, out, cap, null_mut()),
            IOTCOMPRESS_OK
        );

        // Decoding.
        let msg = dev.out[..info.bytes].to_vec();
        let mut dense = [0.0f32; 16];
        let mut h = IotcompressHeader::default();
        assert_eq!(
            iotcompress_decode_add(null(), 5, dense.as_mut_ptr(), 16, 1.0, &mut h),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_decode_add(msg.as_ptr(), msg.len(), null_mut(), 16, 1.0, &mut h),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_decode_add(null(), 0, dense.as_mut_ptr(), 16, 1.0, null_mut()),
            IOTCOMPRESS_ERR_TRUNCATED
        );
        assert_eq!(
            iotcompress_decode_add(
                msg.as_ptr(),
                msg.len(),
                dense.as_mut_ptr(),
                15,
                1.0,
                null_mut()
            ),
            IOTCOMPRESS_ERR_NUMEL_MISMATCH
        );
        let mut bad = msg.clone();
        bad[6] ^= 1;
        assert_eq!(
            iotcompress_decode_add(
                bad.as_ptr(),
                bad.len(),
                dense.as_mut_ptr(),
                16,
                1.0,
                null_mut()
            ),
            IOTCOMPRESS_ERR_CHECKSUM_MISMATCH
        );
        assert!(dense.iter().all(|&v| v == 0.0), "all or nothing");
        assert_eq!(
            iotcompress_decode_add(
                msg.as_ptr(),
                msg.len(),
                dense.as_mut_ptr(),
                16,
                2.0,
                null_mut()
            ),
            IOTCOMPRESS_OK
        );
        assert!(dense.iter().any(|&v| v != 0.0));
        assert_eq!(
            iotcompress_parse(msg.as_ptr(), msg.len(), 15, &mut h),
            IOTCOMPRESS_ERR_TOO_LARGE
        );
        assert_eq!(
            iotcompress_parse(msg.as_ptr(), msg.len(), 16, null_mut()),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_parse(b"XY\x01".as_ptr(), 3, 16, &mut h),
            IOTCOMPRESS_ERR_BAD_MAGIC
        );
    }
}

#[test]
fn momentum_and_adaptive_counters_round_trip_through_the_struct() {
    // The adaptive controller and the step live in the C struct: copying the struct and the
    // residual (a checkpoint) and going on gives the same bytes as not stopping.
    let mut c = default_config();
    c.selection = IOTCOMPRESS_SELECT_ADAPTIVE_BYTES;
    c.target_bytes = 200;
    c.quant = IOTCOMPRESS_QUANT_INT4;
    c.momentum_kind = IOTCOMPRESS_MOMENTUM_NESTEROV;
    c.momentum = 0.9;
    let n: u32 = 3000;
    let grads: Vec<Vec<f32>> = (0..6u32)
        .map(|s| {
            (0..n)
                .map(|i| {
                    ((i.wrapping_mul(2_654_435_761).wrapping_add(s * 97)) % 2001) as f32 / 1000.0
                        - 1.0
                })
                .collect()
        })
        .collect();
    let mut a = Device::new(&c, n);
    let mut first = Vec::new();
    for g in &grads[..3] {
        first.push(a.compress(g).unwrap());
    }
    assert!(a.state.adaptive_threshold > 0.0);
    let mut b = Device::new(&c, n);
    b.state = a.state;
    b.residual.copy_from_slice(&a.residual);
    b.velocity.copy_from_slice(&a.velocity);
    for g in &grads[3..] {
        assert_eq!(a.compress(g).unwrap(), b.compress(g).unwrap());
    }
    assert_eq!(a.state, b.state);
}

#[test]
fn every_code_has_a_name_and_the_header_agrees() {
    let header = include_str!("../../../include/iotcompress.h");
    let mut seen = 0;
    for line in header.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("#define") {
            continue;
        }
        let (Some(ident), Some(value)) = (words.next(), words.next()) else {
            continue;
        };
        if ident == "IOTCOMPRESS_OK" || ident.starts_with("IOTCOMPRESS_ERR_") {
            let code: i32 = value.parse().unwrap();
            assert_eq!(name(code), ident);
            // SAFETY: static NUL-terminated string.
            let msg = unsafe { CStr::from_ptr(iotcompress_error_message(code)) };
            assert!(!msg.to_bytes().is_empty());
            seen += 1;
        }
    }
    assert_eq!(seen, 28);
    assert_eq!(name(-1), "IOTCOMPRESS_ERR_UNKNOWN");
    assert_eq!(name(55), "IOTCOMPRESS_ERR_UNKNOWN");
    assert_eq!(name(IOTCOMPRESS_ERR_UNKNOWN), "IOTCOMPRESS_ERR_UNKNOWN");
}

#[test]
fn state_layout_is_stable() {
    // The header's structs, as C compilers lay them out on 32- and 64-bit targets.
    assert_eq!(std::mem::size_of::<IotcompressConfig>(), 56);
    assert_eq!(std::mem::size_of::<IotcompressCompressor>(), 88);
    assert_eq!(std::mem::align_of::<IotcompressCompressor>(), 8);
}

#[test]
fn the_c_state_carries_everything_the_core_compressor_holds() {
    // IotcompressCompressor rebuilds a core Compressor on every call from its config, numel,
    // step and adaptive controller; `threads` (a speed knob that does not change the bytes)
    // stays at its default of 1. If the core's Compressor grows another field, this size
    // changes: carry the new state in IotcompressCompressor (and its checkpoint) too.
    let core = std::mem::size_of::<iotcompress_core::Compressor>();
    let parts = std::mem::size_of::<iotcompress_core::Config>()
        + std::mem::size_of::<usize>() // numel
        + std::mem::size_of::<u64>() // step
        + std::mem::size_of::<iotcompress_core::ThresholdController>()
        + std::mem::size_of::<usize>() // threads
        + std::mem::size_of::<f32>() // state_bound
        + 4; // padding
    assert_eq!(core, parts, "iotcompress_core::Compressor changed shape");
}
