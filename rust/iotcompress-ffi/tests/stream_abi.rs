//! The streaming C ABI (`iotcompress_stream_*`) called the way C calls it: the same messages
//! as the core's streaming encoder, whatever the chunking, and every misuse an error code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::ptr::{null, null_mut};

use iotcompress::*;
use iotcompress_core::{
    decode_add, Momentum, Quant, StateFormat, StreamCompressor, StreamConfig, StreamTarget,
};

fn config(numel: u32) -> IotcompressStreamConfig {
    let mut c = std::mem::MaybeUninit::<IotcompressStreamConfig>::uninit();
    // SAFETY: a valid pointer to writable memory for one config.
    assert_eq!(
        unsafe { iotcompress_stream_config_default(c.as_mut_ptr()) },
        IOTCOMPRESS_OK
    );
    // SAFETY: initialised by the call above.
    let mut c = unsafe { c.assume_init() };
    c.numel = numel;
    c.threshold = 0.5;
    c
}

struct Device {
    stream: IotcompressStream,
    state: Vec<u8>,
    out: Vec<u8>,
}

impl Device {
    fn new(c: &IotcompressStreamConfig, out_cap: Option<usize>) -> Device {
        let mut sizes = IotcompressStreamSizes::default();
        // SAFETY: valid pointers.
        assert_eq!(
            unsafe { iotcompress_stream_sizes(c, &mut sizes) },
            IOTCOMPRESS_OK
        );
        assert_eq!(sizes.stream_size, std::mem::size_of::<IotcompressStream>());
        // SAFETY: all-zero bytes are a valid `IotcompressStream` (plain numbers).
        let mut stream: IotcompressStream = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers.
        assert_eq!(
            unsafe { iotcompress_stream_init(&mut stream, c) },
            IOTCOMPRESS_OK
        );
        Device {
            stream,
            state: vec![0; sizes.state_len],
            out: vec![0; out_cap.unwrap_or(sizes.full_message_len)],
        }
    }

    fn bufs(&mut self) -> IotcompressStreamBuffers {
        IotcompressStreamBuffers {
            state: self.state.as_mut_ptr(),
            state_len: self.state.len(),
            out: self.out.as_mut_ptr(),
            out_cap: self.out.len(),
        }
    }

    fn message(&mut self, grad: &[f32], chunk: usize) -> Vec<u8> {
        let bufs = self.bufs();
        let mut info = IotcompressStreamInfo::default();
        // SAFETY: the buffers are live for their lengths and disjoint.
        unsafe {
            assert_eq!(
                iotcompress_stream_begin(&mut self.stream, &bufs),
                IOTCOMPRESS_OK
            );
            for c in grad.chunks(chunk.max(1)) {
                assert_eq!(
                    iotcompress_stream_feed(&mut self.stream, &bufs, c.as_ptr(), c.len()),
                    IOTCOMPRESS_OK
                );
            }
            assert_eq!(
                iotcompress_stream_finish(&mut self.stream, &bufs, &mut info),
                IOTCOMPRESS_OK
            );
        }
        assert!(info.nnz <= info.selected);
        self.out[..info.bytes].to_vec()
    }
}

fn decode_to_vec(msg: &[u8], n: usize) -> Result<Vec<f32>, iotcompress_core::Error> {
    let mut out = vec![0.0; n];
    decode_add(msg, &mut out, 1.0)?;
    Ok(out)
}

fn gradient(n: usize, step: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let x = i.wrapping_mul(2_654_435_761) ^ step.wrapping_mul(40_503);
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

#[test]
fn the_c_stream_equals_the_core_stream() {
    let n = 1000u32;
    for (quant, q) in [
        (IOTCOMPRESS_QUANT_F32, Quant::F32),
        (IOTCOMPRESS_QUANT_F16, Quant::F16),
        (IOTCOMPRESS_QUANT_BF16, Quant::Bf16),
        (IOTCOMPRESS_QUANT_INT8, Quant::Int8),
        (IOTCOMPRESS_QUANT_INT4, Quant::Int4),
    ] {
        for (format, f) in [
            (IOTCOMPRESS_STATE_F32, StateFormat::F32),
            (IOTCOMPRESS_STATE_F16, StateFormat::F16),
            (IOTCOMPRESS_STATE_BF16, StateFormat::Bf16),
            (IOTCOMPRESS_STATE_INT8, StateFormat::Int8),
        ] {
            let mut c = config(n);
            c.quant = quant;
            c.state_format = format;
            c.momentum_kind = IOTCOMPRESS_MOMENTUM_NESTEROV;
            c.momentum = 0.9;
            c.target_bytes = 200;
            let mut dev = Device::new(&c, None);
            let cfg = StreamConfig {
                quant: q,
                state: f,
                momentum: Momentum::Nesterov(0.9),
                target: StreamTarget::Bytes(200),
                ..StreamConfig::new(n as usize, 0.5)
            };
            let mut core = StreamCompressor::new(cfg).unwrap();
            let mut state = vec![0u8; cfg.state_len()];
            let mut out = vec![0u8; cfg.full_message_len()];
            for step in 0..6 {
                let g = gradient(n as usize, step);
                let msg = dev.message(&g, [1000, 7, 64, 333, 1, 999][step as usize]);
                let info = core.compress(&mut state, &g, &mut out).unwrap();
                assert_eq!(msg, &out[..info.bytes], "{quant} {format} step {step}");
                assert_eq!(dev.state, state);
                decode_to_vec(&msg, n as usize).unwrap();
            }
            assert_eq!(dev.stream.messages, 6);
            assert_eq!(dev.stream.threshold, core.controller.threshold);
        }
    }
}

#[test]
fn stream_misuse_is_an_error_code() {
    let n = 64u32;
    let mut c = config(n);
    c.quant = IOTCOMPRESS_QUANT_INT8;
    c.state_format = IOTCOMPRESS_STATE_INT8;
    let mut dev = Device::new(&c, None);
    let grad = [0.75f32; 64];
    let mut info = IotcompressStreamInfo::default();
    let bufs = dev.bufs();
    let st: *mut IotcompressStream = &mut dev.stream;
    // SAFETY (every call below): pointers are either NULL, or valid for their lengths, or
    // deliberately wrong in a way the function must detect before dereferencing.
    unsafe {
        assert_eq!(
            iotcompress_stream_config_default(null_mut()),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_stream_sizes(null(), &mut IotcompressStreamSizes::default()),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_stream_sizes(&c, null_mut()),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_stream_init(null_mut(), &c),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        // Invalid configurations.
        let mut sizes = IotcompressStreamSizes::default();
        for bad in [
            IotcompressStreamConfig {
                threshold: 0.0,
                ..c
            },
            IotcompressStreamConfig {
                target_count: 5,
                target_bytes: 100,
                ..c
            },
            IotcompressStreamConfig {
                quant: IOTCOMPRESS_QUANT_SIGN,
                ..c
            },
            IotcompressStreamConfig { quant: 99, ..c },
            IotcompressStreamConfig {
                state_format: 4,
                ..c
            },
            IotcompressStreamConfig {
                momentum_kind: 3,
                ..c
            },
            IotcompressStreamConfig {
                momentum_kind: IOTCOMPRESS_MOMENTUM_VANILLA,
                momentum: 1.0,
                ..c
            },
        ] {
            assert_eq!(
                iotcompress_stream_sizes(&bad, &mut sizes),
                IOTCOMPRESS_ERR_INVALID_CONFIG
            );
        }
        // Feed or finish before any begin.
        assert_eq!(
            iotcompress_stream_feed(st, &bufs, grad.as_ptr(), 1),
            IOTCOMPRESS_ERR_STREAM_CLOSED
        );
        assert_eq!(
            iotcompress_stream_finish(st, &bufs, &mut info),
            IOTCOMPRESS_ERR_STREAM_CLOSED
        );
        // Buffer sizes.
        let short_state = IotcompressStreamBuffers {
            state_len: bufs.state_len - 1,
            ..bufs
        };
        assert_eq!(
            iotcompress_stream_begin(st, &short_state),
            IOTCOMPRESS_ERR_LENGTH_MISMATCH
        );
        let tiny_out = IotcompressStreamBuffers {
            out_cap: 10,
            ..bufs
        };
        assert_eq!(
            iotcompress_stream_begin(st, &tiny_out),
            IOTCOMPRESS_ERR_BUFFER_TOO_SMALL
        );
        let null_out = IotcompressStreamBuffers {
            out: null_mut(),
            ..bufs
        };
        assert_eq!(
            iotcompress_stream_begin(st, &null_out),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_stream_begin(null_mut(), &bufs),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_stream_begin(st, null()),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        // Overlapping buffers.
        let overlap = IotcompressStreamBuffers {
            out: bufs.state.add(1),
            out_cap: 40,
            ..bufs
        };
        assert_eq!(
            iotcompress_stream_begin(st, &overlap),
            IOTCOMPRESS_ERR_OVERLAP
        );
        // A message: too many elements, finish early, other buffers, gradient in the output.
        assert_eq!(iotcompress_stream_begin(st, &bufs), IOTCOMPRESS_OK);
        assert_eq!(
            iotcompress_stream_feed(st, &bufs, grad.as_ptr(), 40),
            IOTCOMPRESS_OK
        );
        let before = (*st, dev.state.clone(), dev.out.clone());
        assert_eq!(
            iotcompress_stream_feed(st, &bufs, grad.as_ptr(), 25),
            IOTCOMPRESS_ERR_LENGTH_MISMATCH
        );
        assert_eq!(
            iotcompress_stream_finish(st, &bufs, &mut info),
            IOTCOMPRESS_ERR_INCOMPLETE
        );
        let nan = [f32::NAN; 3];
        assert_eq!(
            iotcompress_stream_feed(st, &bufs, nan.as_ptr(), 3),
            IOTCOMPRESS_ERR_NON_FINITE_GRADIENT
        );
        let mut other_out = vec![0u8; bufs.out_cap];
        let moved = IotcompressStreamBuffers {
            out: other_out.as_mut_ptr(),
            ..bufs
        };
        assert_eq!(
            iotcompress_stream_feed(st, &moved, grad.as_ptr(), 1),
            IOTCOMPRESS_ERR_LENGTH_MISMATCH
        );
        assert_eq!(
            iotcompress_stream_feed(st, &bufs, bufs.out as *const f32, 4),
            IOTCOMPRESS_ERR_OVERLAP
        );
        assert_eq!(
            iotcompress_stream_finish(st, &bufs, bufs.out as *mut IotcompressStreamInfo),
            IOTCOMPRESS_ERR_OVERLAP
        );
        assert!((*st, &dev.state, &dev.out) == (before.0, &before.1, &before.2));
        assert_eq!(
            iotcompress_stream_feed(st, &bufs, grad.as_ptr(), 24),
            IOTCOMPRESS_OK
        );
        assert_eq!(
            iotcompress_stream_finish(st, &bufs, &mut info),
            IOTCOMPRESS_OK
        );
        assert!(info.nnz > 0);
        decode_to_vec(&dev.out[..info.bytes], n as usize).unwrap();
        assert_eq!(
            iotcompress_stream_finish(st, &bufs, &mut info),
            IOTCOMPRESS_ERR_STREAM_CLOSED
        );
        // Garbage state.
        (*st).magic = 7;
        assert_eq!(
            iotcompress_stream_begin(st, &bufs),
            IOTCOMPRESS_ERR_BAD_STATE
        );
        (*st).magic = IOTCOMPRESS_STREAM_MAGIC;
        assert_eq!(iotcompress_stream_begin(st, &bufs), IOTCOMPRESS_OK);
        (*st).message.value_bytes = 1000;
        assert_eq!(
            iotcompress_stream_feed(st, &bufs, grad.as_ptr(), 1),
            IOTCOMPRESS_ERR_INVALID_CONFIG
        );
        (*st).config.quant = 42;
        assert_eq!(
            iotcompress_stream_begin(st, &bufs),
            IOTCOMPRESS_ERR_INVALID_CONFIG
        );
    }
}

/// A garbage struct (random bytes, then a valid magic and config) is never undefined
/// behaviour: every call returns, and what it writes stays inside the buffers.
#[test]
fn random_stream_structs_never_crash() {
    let c = config(100);
    let mut dev = Device::new(&c, Some(80));
    let bufs = dev.bufs();
    let grad = [1.5f32; 100];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..2000 {
        // SAFETY: any bit pattern is a valid `IotcompressStream` (plain numbers).
        let mut s: IotcompressStream = unsafe { std::mem::zeroed() };
        // SAFETY: writing bytes into a plain-data struct.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                &mut s as *mut IotcompressStream as *mut u8,
                std::mem::size_of::<IotcompressStream>(),
            )
        };
        for b in bytes.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = if x.is_multiple_of(3) { x as u8 } else { 0 };
        }
        s.magic = IOTCOMPRESS_STREAM_MAGIC;
        s.config = c;
        s.reserved = 0;
        s.message.state_addr = bufs.state as usize;
        s.message.out_addr = bufs.out as usize;
        // SAFETY: valid buffers; the struct's fields are garbage by design.
        unsafe {
            let _ = iotcompress_stream_feed(&mut s, &bufs, grad.as_ptr(), (x % 101) as usize);
            let mut info = IotcompressStreamInfo::default();
            if iotcompress_stream_finish(&mut s, &bufs, &mut info) == IOTCOMPRESS_OK {
                assert!(info.bytes <= dev.out.len());
            }
        }
    }
}

#[test]
fn stream_layout_is_stable() {
    assert_eq!(std::mem::size_of::<IotcompressStreamConfig>(), 32);
    // 64-bit: config 32, messages 8, six words 24, message 3 words + 16 words + 2 * 32 floats.
    assert_eq!(
        std::mem::size_of::<IotcompressStream>(),
        32 + 8 + 24 + 24 + 64 + 256
    );
    assert_eq!(
        iotcompress_stream_size(),
        std::mem::size_of::<IotcompressStream>()
    );
}

#[test]
fn the_c_stream_carries_everything_the_core_compressor_holds() {
    // IotcompressStream rebuilds a core StreamCompressor on every call from its config and
    // the four history fields below. If the core's struct grows another field, this size
    // changes: carry the new state in IotcompressStream too. (StreamMessage is converted
    // with exhaustive struct literals: a new field there does not compile.)
    use std::mem::size_of;
    let core = size_of::<StreamCompressor>();
    let parts = size_of::<StreamConfig>()
        + size_of::<iotcompress_core::ThresholdController>()
        + size_of::<u64>() // messages
        + size_of::<f32>() // last_max
        + size_of::<u32>(); // last_selected
    assert_eq!(
        core, parts,
        "iotcompress_core::StreamCompressor changed shape"
    );
}

/// A device on a LoRa-class link with 2 s per step: the preset's byte budget as the target
/// and as the output buffer keeps every message's `T_c` within the budget, the adaptive
/// threshold settles near the budget, and what is held back is not lost.
#[test]
fn network_budget_bounds_every_message() {
    let lora = iotcompress_network_preset(IOTCOMPRESS_NETWORK_LORA);
    assert_eq!(lora.latency_us, 1_000_000);
    assert_eq!(lora.bandwidth_bps, 5_000);
    let budget_us = 2_000_000;
    let bytes = iotcompress_network_budget_bytes(lora, budget_us);
    assert_eq!(bytes, 625); // 1 s of 5 kbit/s
    assert!(iotcompress_network_comm_time_us(lora, bytes as u64) <= budget_us);
    assert!(iotcompress_network_comm_time_us(lora, bytes as u64 + 1) > budget_us);
    assert_eq!(iotcompress_network_budget_bytes(lora, 999_999), 0);
    let unknown = iotcompress_network_preset(99);
    assert_eq!(iotcompress_network_budget_bytes(unknown, u64::MAX), 0);
    assert_eq!(iotcompress_network_comm_time_us(unknown, 1), u64::MAX);

    let n = 4000;
    let mut c = config(n);
    c.quant = IOTCOMPRESS_QUANT_INT8;
    c.target_bytes = bytes;
    c.threshold = 0.01; // far too low at first: the buffer must hold the line
    let mut dev = Device::new(&c, Some(bytes as usize));
    let mut x = 12345u64;
    let mut sizes = Vec::new();
    let mut sent_total = vec![0.0f32; n as usize];
    let mut grad_total = vec![0.0f64; n as usize];
    for _ in 0..40 {
        let g: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        for (t, &gi) in grad_total.iter_mut().zip(&g) {
            *t += gi as f64;
        }
        let msg = dev.message(&g, 333);
        assert!(msg.len() <= bytes as usize, "{} > {bytes}", msg.len());
        assert!(iotcompress_network_comm_time_us(lora, msg.len() as u64) <= budget_us);
        decode_add(&msg, &mut sent_total, 1.0).unwrap();
        sizes.push(msg.len());
    }
    let late = sizes[30..].iter().sum::<usize>() as f64 / 10.0;
    assert!(
        late > 0.7 * bytes as f64,
        "messages stay far below the budget: {sizes:?}"
    );
    // Sent + residual = every gradient so far (f32 state: up to rounding).
    for i in 0..n as usize {
        let r = f32::from_le_bytes(dev.state[4 * i..4 * i + 4].try_into().unwrap());
        let kept = sent_total[i] as f64 + r as f64;
        assert!(
            (kept - grad_total[i]).abs() < 1e-3,
            "element {i}: {kept} vs {}",
            grad_total[i]
        );
    }
}

/// Issue 12: a message the device could not deliver goes back into its state
/// (`iotcompress_stream_restore`), all or nothing, refused while a message is open.
#[test]
fn stream_restore_puts_an_undelivered_message_back() {
    let n = 300u32;
    let mut c = config(n);
    c.state_format = IOTCOMPRESS_STATE_F32;
    let mut dev = Device::new(&c, None);
    let g = gradient(n as usize, 1);
    let msg = dev.message(&g, 64);
    let sent = decode_to_vec(&msg, n as usize).unwrap();
    assert!(sent.iter().any(|&x| x != 0.0));
    let stream_before = dev.stream;
    let state_before = dev.state.clone();
    let bufs = dev.bufs();
    // A corrupt message, or one for another element count: nothing changes.
    let mut bad = msg.clone();
    bad[3] ^= 0x10;
    let other = Device::new(&config(10), None).message(&[1.0; 10], 10);
    for m in [&bad, &other] {
        // SAFETY: live buffers.
        let code =
            unsafe { iotcompress_stream_restore(&mut dev.stream, &bufs, m.as_ptr(), m.len()) };
        assert_ne!(code, IOTCOMPRESS_OK);
        assert_eq!(dev.state, state_before);
        assert_eq!(dev.stream, stream_before);
    }
    // SAFETY: live buffers.
    let code =
        unsafe { iotcompress_stream_restore(&mut dev.stream, &bufs, msg.as_ptr(), msg.len()) };
    assert_eq!(code, IOTCOMPRESS_OK);
    // f32 values and f32 state: the residual is exactly the accumulated gradient again.
    let core = StreamCompressor::new(StreamConfig::new(n as usize, 0.5)).unwrap();
    for (i, &gi) in g.iter().enumerate() {
        assert_eq!(core.residual_at(&dev.state, i), gi, "{i}");
    }
    assert_eq!(dev.stream, stream_before, "the counters do not move");
    // While a message is open: refused.
    // SAFETY: live buffers.
    unsafe {
        assert_eq!(
            iotcompress_stream_begin(&mut dev.stream, &bufs),
            IOTCOMPRESS_OK
        );
        assert_eq!(
            iotcompress_stream_restore(&mut dev.stream, &bufs, msg.as_ptr(), msg.len()),
            IOTCOMPRESS_ERR_BAD_STATE
        );
    }
}

#[test]
fn an_open_message_is_never_abandoned_and_abort_loses_nothing() {
    let n = 300u32;
    let mut c = config(n);
    c.state_format = IOTCOMPRESS_STATE_F32;
    let mut dev = Device::new(&c, None);
    let earlier = gradient(n as usize, 2);
    dev.message(&earlier, 100);
    let core = StreamCompressor::new(StreamConfig::new(n as usize, 0.5)).unwrap();
    let residual_before: Vec<f32> = (0..n as usize)
        .map(|i| core.residual_at(&dev.state, i))
        .collect();
    let g = gradient(n as usize, 3);
    let nan = [f32::NAN; 4];
    let bufs = dev.bufs();
    // SAFETY: live, disjoint buffers.
    unsafe {
        assert_eq!(
            iotcompress_stream_abort(&mut dev.stream, &bufs),
            IOTCOMPRESS_ERR_STREAM_CLOSED
        );
        assert_eq!(
            iotcompress_stream_begin(&mut dev.stream, &bufs),
            IOTCOMPRESS_OK
        );
        assert_eq!(
            iotcompress_stream_feed(&mut dev.stream, &bufs, g.as_ptr(), 120),
            IOTCOMPRESS_OK
        );
        assert!(
            dev.stream.message.selected > 0,
            "the fed chunk took entries out"
        );
        // The next chunk fails; beginning over would lose the first chunk's entries.
        assert_eq!(
            iotcompress_stream_feed(&mut dev.stream, &bufs, nan.as_ptr(), nan.len()),
            IOTCOMPRESS_ERR_NON_FINITE_GRADIENT
        );
        let (stream_open, state_open) = (dev.stream, dev.state.clone());
        assert_eq!(
            iotcompress_stream_begin(&mut dev.stream, &bufs),
            IOTCOMPRESS_ERR_BAD_STATE
        );
        assert_eq!((dev.stream, &dev.state), (stream_open, &state_open));
        assert_eq!(
            iotcompress_stream_abort(&mut dev.stream, &bufs),
            IOTCOMPRESS_OK
        );
    }
    // Everything the fed chunk carried is in the residual (f32 values and state: the sum of
    // the put-back entry and what stayed is the accumulated value, up to one rounding).
    for i in 0..n as usize {
        let want = residual_before[i] + if i < 120 { g[i] } else { 0.0 };
        let got = core.residual_at(&dev.state, i);
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{i}: {got} vs {want}"
        );
    }
    // And the stream goes on.
    dev.message(&g, 64);
}
