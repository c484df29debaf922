//! The streaming encoder with random configurations, state buffers (raw bytes, as a device
//! may hold after a brown-out), chunkings, injected errors (NaN, overflow, too many elements,
//! garbage in the message's fields, other buffers) and restores: no panic, no over-read;
//! every failing call leaves the state, the output, the message and the compressor exactly
//! as they were; two chunkings of one gradient give the same bytes and state; accumulate
//! and restore_message are all or nothing.
#![no_main]

use iotcompress_core::{
    Momentum, Quant, StateFormat, StreamCompressor, StreamConfig, StreamMessage, StreamTarget,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
use common::gradient;

fn config(u: &mut Unstructured<'_>) -> Result<StreamConfig> {
    let numel = u.int_in_range(0..=300usize)?;
    let threshold = f32::from_bits(u.arbitrary()?);
    let target = match u.int_in_range(0..=2u8)? {
        0 => StreamTarget::Fixed,
        1 => StreamTarget::Count(u.arbitrary()?),
        _ => StreamTarget::Bytes(u.arbitrary()?),
    };
    let quant = *u.choose(&[
        Quant::F32,
        Quant::F16,
        Quant::Bf16,
        Quant::Int8,
        Quant::Int4,
        Quant::Sign,
    ])?;
    let factor = f32::from_bits(u.arbitrary()?);
    let momentum = match u.int_in_range(0..=2u8)? {
        0 => Momentum::None,
        1 => Momentum::Vanilla(factor),
        _ => Momentum::Nesterov(factor),
    };
    let state = *u.choose(&[
        StateFormat::F32,
        StateFormat::F16,
        StateFormat::Bf16,
        StateFormat::Int8,
    ])?;
    Ok(StreamConfig {
        numel,
        threshold,
        target,
        quant,
        momentum,
        state,
    })
}

/// Some fields of an open message set to garbage.
fn garble(u: &mut Unstructured<'_>, m: &mut StreamMessage) -> Result<()> {
    match u.int_in_range(0..=9u8)? {
        0 => m.fed = u.arbitrary()?,
        1 => m.nnz = u.arbitrary()?,
        2 => m.selected = u.arbitrary()?,
        3 => m.rice_k = u.arbitrary()?,
        4 => m.index_bytes = u.arbitrary()?,
        5 => m.index_pending_bits = u.arbitrary()?,
        6 => m.value_bytes = u.arbitrary()?,
        7 => m.threshold = f32::from_bits(u.arbitrary()?),
        8 => m.scale = f32::from_bits(u.arbitrary()?),
        _ => m.next = u.arbitrary()?,
    }
    Ok(())
}

fn run(data: &[u8]) -> Result<()> {
    let mut u = Unstructured::new(data);
    let cfg = config(&mut u)?;
    let Ok(mut c) = StreamCompressor::new(cfg) else {
        return Ok(());
    };
    let n = cfg.numel;
    let mut state = vec![0u8; cfg.state_len()];
    if u.arbitrary()? {
        for b in state.iter_mut() {
            *b = u.arbitrary()?;
        }
    }
    let cap = u.int_in_range(0..=cfg.full_message_len() + 8)?;
    let mut out = vec![0u8; cap];
    let mut last: Option<Vec<u8>> = None;
    for _ in 0..u.int_in_range(1..=6u8)? {
        match u.int_in_range(0..=3u8)? {
            0 | 1 => {
                // A message fed in random chunks, some poisoned or garbled.
                let Ok(mut m) = c.begin(&state, &out) else {
                    continue;
                };
                let g = gradient(&mut u, n)?;
                // A garbled message that still passes the checks may encode garbage; it
                // must not panic, but its bytes need not decode.
                let mut garbled = false;
                let mut at = 0;
                // At most 16 pieces, then the rest in one (a drawn length of 0 is a legal
                // empty chunk, and what an exhausted input draws).
                for piece in 0..17 {
                    if at >= n && !u.ratio(1, 8)? {
                        break;
                    }
                    let len = if piece == 16 {
                        n - at.min(n)
                    } else {
                        u.int_in_range(0..=n - at.min(n) + 1)?
                    };
                    let mut chunk = g[at.min(n)..(at + len).min(n)].to_vec();
                    if len > n - at {
                        chunk.push(1.0); // one element too many
                    }
                    let mut m2 = m;
                    let mut this_garbled = false;
                    match u.int_in_range(0..=9u8)? {
                        0 if !chunk.is_empty() => {
                            let i = u.int_in_range(0..=chunk.len() - 1)?;
                            chunk[i] =
                                *u.choose(&[f32::NAN, f32::INFINITY, f32::MAX, -f32::MAX])?;
                        }
                        1 => {
                            garble(&mut u, &mut m2)?;
                            this_garbled = true;
                        }
                        _ => {}
                    }
                    // Debug forms: a garbled NaN field equals itself there, not under ==.
                    let before = (state.clone(), out.clone(), format!("{m2:?}{c:?}"));
                    match m2.feed(&c, &mut state, &mut out, &chunk) {
                        Ok(()) => {
                            m = m2;
                            garbled |= this_garbled;
                            at += chunk.len();
                        }
                        Err(e) => {
                            assert_eq!(
                                (state.clone(), out.clone(), format!("{m2:?}{c:?}")),
                                before,
                                "{e:?} changed something"
                            );
                            if at >= n {
                                break;
                            }
                        }
                    }
                }
                let before = (state.clone(), out.clone(), format!("{m:?}{c:?}"));
                match m.finish(&mut c, &state, &mut out) {
                    Ok(info) => {
                        let msg = out[..info.bytes].to_vec();
                        if !garbled {
                            iotcompress_core::decode_to_vec(&msg, n)
                                .expect("a streamed message decodes");
                        }
                        last = Some(msg);
                    }
                    Err(e) => assert_eq!(
                        (state.clone(), out.clone(), format!("{m:?}{c:?}")),
                        before,
                        "{e:?} changed something"
                    ),
                }
            }
            2 => {
                let mut g = gradient(&mut u, n)?;
                if !g.is_empty() && u.arbitrary()? {
                    g[0] = f32::NAN;
                }
                let before = state.clone();
                if let Err(e) = c.accumulate(&mut state, &g) {
                    assert_eq!(state, before, "{e:?} changed the state");
                }
            }
            _ => {
                let mut msg = match &last {
                    Some(m) => m.clone(),
                    None => u.arbitrary::<Vec<u8>>()?,
                };
                if !msg.is_empty() && u.arbitrary()? {
                    let at = u.int_in_range(0..=msg.len() - 1)?;
                    msg[at] ^= u.int_in_range(1..=255u8)?;
                }
                let before = state.clone();
                if let Err(e) = c.restore_message(&mut state, &msg) {
                    assert_eq!(state, before, "{e:?} changed the state");
                }
            }
        }
    }
    // Chunking does not change the bytes: one piece against two, from the same state.
    let g = gradient(&mut u, n)?;
    let cut = u.int_in_range(0..=n)?;
    let (mut c1, mut s1, mut o1) = (c, state.clone(), out.clone());
    let whole = c.compress(&mut state, &g, &mut out);
    let split = (|| {
        let mut m = c1.begin(&s1, &o1)?;
        m.feed(&c1, &mut s1, &mut o1, &g[..cut])?;
        m.feed(&c1, &mut s1, &mut o1, &g[cut..])?;
        m.finish(&mut c1, &s1, &mut o1)
    })();
    assert_eq!(whole.is_ok(), split.is_ok());
    if let (Ok(a), Ok(b)) = (whole, split) {
        assert_eq!(out[..a.bytes], o1[..b.bytes]);
        assert_eq!(state, s1);
        assert_eq!(c, c1);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
