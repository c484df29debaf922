//! The C API's state structs filled with random bytes (a corrupted checkpoint, a struct
//! changed by hand, a brown-out), then compress / restore / decode and the streaming
//! begin / feed / finish / restore through the `extern "C"` functions, with buffers of
//! random lengths: no panic, no out-of-bounds access (ASan), and every failing call leaves
//! the struct and the state buffers exactly as they were, as the header promises.
#![no_main]

use core::mem::{size_of, MaybeUninit};
use iotcompress::*;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// A plain-old-data struct (integers and floats only) from raw fuzz bytes.
fn raw<T: Copy>(u: &mut Unstructured<'_>) -> Result<T> {
    let bytes = u.bytes(size_of::<T>())?;
    let mut out = MaybeUninit::<T>::zeroed();
    // SAFETY: every T used here is repr(C) of u32/u64/usize/f32/f64 fields (and arrays of
    // them), for which every bit pattern is a valid value; `bytes` has size_of::<T>() bytes.
    unsafe {
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr() as *mut u8, size_of::<T>());
        Ok(out.assume_init())
    }
}

fn bits<T: Copy>(x: &T) -> Vec<u8> {
    // SAFETY: reading the bytes of a plain repr(C) struct without padding-sensitive use.
    unsafe { core::slice::from_raw_parts(x as *const T as *const u8, size_of::<T>()).to_vec() }
}

fn floats(u: &mut Unstructured<'_>, n: usize) -> Result<Vec<f32>> {
    (0..n).map(|_| Ok(f32::from_bits(u.arbitrary()?))).collect()
}

fn batch(u: &mut Unstructured<'_>) -> Result<()> {
    let mut st: IotcompressCompressor = if u.arbitrary()? {
        raw(u)?
    } else {
        // A valid struct, then one field garbled.
        let mut cfg = MaybeUninit::<IotcompressConfig>::zeroed();
        // SAFETY: a writable struct.
        unsafe { iotcompress_config_default(cfg.as_mut_ptr()) };
        // SAFETY: written by iotcompress_config_default.
        let mut cfg = unsafe { cfg.assume_init() };
        cfg.selection = u.int_in_range(0..=4)?;
        cfg.quant = u.int_in_range(0..=8)?;
        cfg.density = (u.int_in_range(1..=255u8)? as f64) / 256.0;
        cfg.threshold = f32::from_bits(u.arbitrary()?);
        let mut st = MaybeUninit::<IotcompressCompressor>::zeroed();
        let n = u.int_in_range(0..=200u32)?;
        // SAFETY: live structs.
        if unsafe { iotcompress_init(st.as_mut_ptr(), &cfg, n) } != 0 {
            return Ok(());
        }
        // SAFETY: written by iotcompress_init.
        let mut st = unsafe { st.assume_init() };
        match u.int_in_range(0..=4u8)? {
            0 => st.numel = u.arbitrary()?,
            1 => st.adaptive_threshold = f32::from_bits(u.arbitrary()?),
            2 => st.state_bound = f32::from_bits(u.arbitrary()?), // kept only if a true bound
            3 => st.step = u.arbitrary()?,
            _ => {}
        }
        st
    };
    let n = (st.numel as usize).min(512);
    let mut residual = floats(u, n)?;
    let len = u.int_in_range(0..=n)?;
    let mut velocity = floats(u, len)?;
    // The header's contract for a state written from outside: `state_bound` is INFINITY, or
    // a true bound (a smaller one lets the in-place path skip its overflow proof).
    let max = residual.iter().chain(&velocity).fold(0.0f32, |m, x| {
        if x.is_nan() {
            f32::INFINITY
        } else {
            m.max(x.abs())
        }
    });
    if !(st.state_bound >= max) {
        st.state_bound = f32::INFINITY;
    }
    let mut scratch = vec![0u32; u.int_in_range(0..=4 * n + 64)?];
    let mut out = vec![0u8; u.int_in_range(0..=8 * n + 64)?];
    for _ in 0..u.int_in_range(1..=4u8)? {
        let before = (bits(&st), residual.clone(), velocity.clone());
        let bufs = IotcompressBuffers {
            residual: residual.as_mut_ptr(),
            residual_len: residual.len(),
            velocity: velocity.as_mut_ptr(),
            velocity_len: velocity.len(),
            scratch: scratch.as_mut_ptr(),
            scratch_len: scratch.len(),
        };
        let compressing = u.arbitrary()?;
        let code = if compressing {
            let len = u.int_in_range(0..=n + 1)?;
            let g = floats(u, len)?;
            let mut info = IotcompressStepInfo::default();
            // SAFETY: every pointer points at as many live elements as its length says.
            unsafe {
                iotcompress_compress(
                    &mut st,
                    &bufs,
                    g.as_ptr(),
                    g.len(),
                    out.as_mut_ptr(),
                    out.len(),
                    &mut info,
                )
            }
        } else {
            let msg: Vec<u8> = u.arbitrary()?;
            // SAFETY: as above.
            unsafe {
                iotcompress_restore(
                    &mut st,
                    residual.as_mut_ptr(),
                    residual.len(),
                    msg.as_ptr(),
                    msg.len(),
                )
            }
        };
        if code != 0 {
            assert_eq!(
                (bits(&st), residual.to_vec(), velocity.to_vec()).0,
                before.0,
                "code {code} changed the struct"
            );
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same(&residual, &before.1) && same(&velocity, &before.2),
                "code {code} changed the state (compress: {compressing}, bound {}, {:?} -> {:?})",
                st.state_bound,
                &before.1[..before.1.len().min(8)],
                &residual[..residual.len().min(8)]
            );
        }
    }
    Ok(())
}

fn stream(u: &mut Unstructured<'_>) -> Result<()> {
    let mut s: IotcompressStream = if u.arbitrary()? {
        raw(u)?
    } else {
        let mut cfg = MaybeUninit::<IotcompressStreamConfig>::zeroed();
        // SAFETY: a writable struct.
        unsafe { iotcompress_stream_config_default(cfg.as_mut_ptr()) };
        // SAFETY: written above.
        let mut cfg = unsafe { cfg.assume_init() };
        cfg.numel = u.int_in_range(0..=300)?;
        cfg.threshold = (u.int_in_range(1..=255u8)? as f32) / 64.0;
        cfg.target_count = u.int_in_range(0..=50)?;
        cfg.quant = u.int_in_range(0..=5)?;
        cfg.state_format = u.int_in_range(0..=4)?;
        cfg.momentum_kind = u.int_in_range(0..=2)?;
        cfg.momentum = 0.5;
        let mut s = MaybeUninit::<IotcompressStream>::zeroed();
        // SAFETY: live structs.
        if unsafe { iotcompress_stream_init(s.as_mut_ptr(), &cfg) } != 0 {
            return Ok(());
        }
        // SAFETY: written by iotcompress_stream_init.
        unsafe { s.assume_init() }
    };
    let n = (s.config.numel as usize).min(600);
    let mut state = vec![0u8; u.int_in_range(0..=6 * n + 64)?];
    if u.arbitrary()? {
        for b in state.iter_mut() {
            *b = u.arbitrary()?;
        }
    }
    let mut out = vec![0u8; u.int_in_range(0..=8 * n + 64)?];
    let mut last: Vec<u8> = Vec::new();
    for _ in 0..u.int_in_range(1..=10u8)? {
        let bufs = IotcompressStreamBuffers {
            state: state.as_mut_ptr(),
            state_len: state.len(),
            out: out.as_mut_ptr(),
            out_cap: out.len(),
        };
        let before = (bits(&s), state.clone());
        let code = match u.int_in_range(0..=5u8)? {
            // SAFETY (all arms): every pointer points at as many live elements as its length says.
            0 => unsafe { iotcompress_stream_begin(&mut s, &bufs) },
            1 | 2 => {
                let len = u.int_in_range(0..=n + 1)?;
                let g = floats(u, len)?;
                unsafe { iotcompress_stream_feed(&mut s, &bufs, g.as_ptr(), g.len()) }
            }
            3 => {
                let mut info = IotcompressStreamInfo::default();
                let code = unsafe { iotcompress_stream_finish(&mut s, &bufs, &mut info) };
                if code == 0 {
                    last = out[..info.bytes.min(out.len())].to_vec();
                }
                code
            }
            4 => {
                let mut msg = last.clone();
                if msg.is_empty() || u.arbitrary()? {
                    msg = u.arbitrary()?;
                }
                unsafe { iotcompress_stream_restore(&mut s, &bufs, msg.as_ptr(), msg.len()) }
            }
            _ => unsafe { iotcompress_stream_abort(&mut s, &bufs) },
        };
        if code != 0 {
            assert_eq!(bits(&s), before.0, "code {code} changed the stream");
            assert_eq!(state, before.1, "code {code} changed the state");
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = if u.arbitrary::<bool>().unwrap_or(false) {
        batch(&mut u)
    } else {
        stream(&mut u)
    };
});
