//! Decoder robustness. Whatever the bytes, `parse`, `for_each_entry` and `decode_add` never
//! panic and only return decode errors; `decode_add` is all or nothing (on error the output
//! buffer is bit-identical to before). Valid messages are rejected after any truncation and
//! any single-bit flip; hand-built messages with a correct CRC-32C hit each structural error
//! of `docs/wire-format.md` ("Decoder obligations").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use iotcompress_core::wire::{self, crc::crc32c, CHECKSUM_LEN, MIN_MESSAGE_LEN};
use iotcompress_core::{decode_add, decode_to_vec, Error, IndexCoding, Momentum, Quant, Selection};
use proptest::prelude::*;

/// Headers announcing more elements than this are not decoded into a buffer.
const MAX_TEST_NUMEL: usize = 1 << 20;

/// The caller's scale passed to `decode_add` (not 1, so the product is exercised).
const ADD_SCALE: f32 = 0.75;

/// A non-zero, non-uniform output buffer: an all-or-nothing failure must leave it as is.
fn prefilled(numel: usize) -> Vec<f32> {
    (0..numel)
        .map(|i| (i as f32 + 0.5) * if i % 2 == 0 { -1.25 } else { 3.0 })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs every decoder entry point on `msg` and checks that they agree:
///
/// * every error is a decode error, and `decode_add` reports the same error as
///   `parse`/`for_each_entry` while leaving a prefilled buffer bit-identical;
/// * on success, entries are strictly increasing, below `numel`, exactly `nnz` of them, and
///   `decode_add` adds exactly them (bit-exact `out[i] += scale * v`);
/// * `parse` with `max_numel < numel` answers `TooLarge`, and a buffer of another length
///   `NumelMismatch`, both leaving the buffer untouched.
///
/// Returns the entries, or the error.
fn decode_checked(msg: &[u8]) -> Result<Vec<(usize, f32)>, Error> {
    let m = match wire::parse(msg, usize::MAX) {
        Ok(m) => m,
        Err(e) => {
            assert!(e.is_decode_error(), "parse: {e:?} is not a decode error");
            for len in [0usize, 1, 7] {
                let mut out = prefilled(len);
                assert_eq!(decode_add(msg, &mut out, ADD_SCALE).err(), Some(e));
                assert_eq!(bits(&out), bits(&prefilled(len)), "buffer changed on {e:?}");
            }
            // parse fails first, so nothing is allocated.
            assert_eq!(decode_to_vec(msg, usize::MAX).err(), Some(e));
            return Err(e);
        }
    };
    let h = m.header;
    let numel = h.numel as usize;
    assert_eq!(m.len, msg.len());
    if numel > 0 {
        assert_eq!(
            wire::parse(msg, numel - 1).err(),
            Some(Error::TooLarge),
            "max_numel below numel"
        );
    }

    let mut entries = Vec::new();
    let walked = wire::for_each_entry(&m, |i, v| entries.push((i, v)));
    if let Err(e) = walked {
        assert!(
            e.is_decode_error(),
            "for_each_entry: {e:?} is not a decode error"
        );
    }

    // A buffer of another length is refused before anything else.
    for len in [numel.wrapping_sub(1), numel + 1] {
        if len <= MAX_TEST_NUMEL {
            let mut out = prefilled(len);
            assert_eq!(
                decode_add(msg, &mut out, ADD_SCALE).err(),
                Some(Error::NumelMismatch)
            );
            assert_eq!(bits(&out), bits(&prefilled(len)));
        }
    }
    if numel > MAX_TEST_NUMEL {
        return walked.map(|()| entries);
    }

    let before = prefilled(numel);
    let mut out = before.clone();
    let added = decode_add(msg, &mut out, ADD_SCALE);
    match walked {
        Err(e) => {
            assert_eq!(
                added.err(),
                Some(e),
                "decode_add disagrees with for_each_entry"
            );
            assert_eq!(bits(&out), bits(&before), "buffer changed on {e:?}");
            assert_eq!(decode_to_vec(msg, numel).err(), Some(e));
            Err(e)
        }
        Ok(()) => {
            assert!(added.is_ok(), "decode_add: {added:?}, for_each_entry: Ok");
            assert_eq!(entries.len(), h.nnz as usize, "entry count");
            assert!(
                entries.windows(2).all(|w| w[0].0 < w[1].0),
                "not increasing"
            );
            assert!(entries.iter().all(|e| e.0 < numel), "index out of range");
            if h.index == IndexCoding::Dense {
                assert!(entries.iter().enumerate().all(|(j, e)| e.0 == j));
            }
            let mut want = before.clone();
            for &(i, v) in &entries {
                want[i] += ADD_SCALE * v;
            }
            assert_eq!(bits(&out), bits(&want), "decode_add added something else");
            let dense = decode_to_vec(msg, numel).expect("decode_to_vec of a valid message");
            let mut want = vec![0.0f32; numel];
            for &(i, v) in &entries {
                want[i] += v;
            }
            assert_eq!(bits(&dense), bits(&want));
            Ok(entries)
        }
    }
}

/// `decode_checked` must fail, with any decode error.
fn assert_rejected(msg: &[u8], what: &str) -> Error {
    match decode_checked(msg) {
        Err(e) => e,
        Ok(entries) => panic!("{what}: accepted, {} entries: {msg:02x?}", entries.len()),
    }
}

/// The selections of the shared helpers, plus a low threshold (dense-ish, bitmap-coded).
fn all_selections() -> Vec<Selection> {
    let mut s = selections(1.0);
    s.push(Selection::Threshold(0.1));
    s
}

/// Valid messages of `n` elements from one compressor of every selection × quantiser,
/// `steps` consecutive steps each (later steps carry a residual).
fn valid_messages(n: usize, seed: u64, steps: usize) -> Vec<(String, Vec<u8>)> {
    let mut rng = TestRng(seed | 1);
    let momentum = momenta()[(seed % 3) as usize];
    let mut out = Vec::new();
    for sel in all_selections() {
        for quant in QUANTS {
            let mut c = compressor(config(sel, quant, momentum, seed), n);
            for step in 0..steps {
                let g = rng.normals(n, 1.0);
                let msg = c.compress_to_vec(&g).expect("compress");
                out.push((format!("{sel:?} {quant:?} n={n} step={step}"), msg));
            }
        }
    }
    out
}

fn valid_message(n: usize, seed: u64, sel: usize, quant: usize, steps: usize) -> Vec<u8> {
    let sel = all_selections()[sel];
    let quant = QUANTS[quant];
    let mut rng = TestRng(seed | 1);
    let mut c = compressor(config(sel, quant, momenta()[(seed % 3) as usize], seed), n);
    let mut msg = Vec::new();
    for _ in 0..steps.max(1) {
        msg = c.compress_to_vec(&rng.normals(n, 1.0)).expect("compress");
    }
    msg
}

/// Recomputes the trailing CRC-32C of a message whose content was edited.
fn reseal(msg: &mut [u8]) {
    if msg.len() >= CHECKSUM_LEN {
        let split = msg.len() - CHECKSUM_LEN;
        let crc = crc32c(&msg[..split]);
        msg[split..].copy_from_slice(&crc.to_le_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// Arbitrary bytes: never a panic, only decode errors (an accidental valid message,
    /// one chance in 2^32, must then decode consistently).
    #[test]
    fn random_bytes(msg in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_checked(&msg);
    }

    /// Arbitrary bytes after a valid magic and version, with a codec byte that names a real
    /// quantiser and index coding half of the time.
    #[test]
    fn random_bytes_after_magic(
        codec in prop_oneof![any::<u8>(), (0u8..8, 0u8..3).prop_map(|(q, i)| q | (i << 4))],
        tail in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut msg = b"IC\x01".to_vec();
        msg.push(codec);
        msg.extend_from_slice(&tail);
        let _ = decode_checked(&msg);
    }

    /// The same with a correct CRC-32C, so that the body checks behind the checksum run on
    /// arbitrary bytes too. A small first varint keeps numel decodable into a buffer.
    #[test]
    fn random_body_with_valid_crc(
        codec in (0u8..8, 0u8..3).prop_map(|(q, i)| q | (i << 4)),
        numel in 0u8..128,
        tail in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut msg = b"IC\x01".to_vec();
        msg.push(codec);
        msg.push(numel);
        msg.extend_from_slice(&tail);
        msg.extend_from_slice(&[0; CHECKSUM_LEN]);
        reseal(&mut msg);
        let _ = decode_checked(&msg);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// A valid message with a few bytes overwritten and its CRC recomputed: structure-aware
    /// corruption that only the body checks can catch. Accepted or rejected, the decoder
    /// stays consistent and all-or-nothing.
    #[test]
    fn edited_messages_with_valid_crc(
        n in 1usize..200,
        seed in any::<u64>(),
        sel in 0usize..6,
        quant in 0usize..8,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
    ) {
        let mut msg = valid_message(n, seed, sel, quant, 2);
        let body = msg.len() - CHECKSUM_LEN;
        for (at, byte, how) in edits {
            let i = at.index(body);
            match how {
                0 => msg[i] = byte,
                1 => msg[i] ^= 1 << (byte % 8),
                _ => msg[i] = msg[i].wrapping_add(1),
            }
        }
        reseal(&mut msg);
        let _ = decode_checked(&msg);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Every proper prefix of every valid message is rejected. (For non-Rice messages the
    /// header fixes the length; a Rice prefix could only pass with a 2^-32 CRC collision.)
    #[test]
    fn every_truncation_is_rejected(n in 1usize..300, seed in any::<u64>()) {
        for (what, msg) in valid_messages(n, seed, 2) {
            prop_assert!(decode_checked(&msg).is_ok(), "{}", what);
            for len in 0..msg.len() {
                let e = assert_rejected(&msg[..len], &what);
                if len < 3 {
                    prop_assert_eq!(e, Error::Truncated);
                }
            }
        }
    }

    /// Every single-bit flip of every valid message is rejected: CRC-32C detects all of
    /// them, so this is deterministic. Only `decode_add` runs per flip (it parses, and is
    /// the all-or-nothing entry point); the full cross-check runs on a sample.
    #[test]
    fn every_single_bit_flip_is_rejected(n in 1usize..300, seed in any::<u64>()) {
        let before = prefilled(n);
        for (what, msg) in valid_messages(n, seed, 1) {
            let mut flipped = msg.clone();
            let mut out = before.clone();
            for bit in 0..msg.len() * 8 {
                flipped[bit / 8] ^= 1 << (bit % 8);
                let r = decode_add(&flipped, &mut out, ADD_SCALE).map(|m| m.len);
                prop_assert!(
                    matches!(r, Err(e) if e.is_decode_error()),
                    "{}: bit {} flipped: {:?}", what, bit, r
                );
                if bit % 61 == 0 {
                    assert_rejected(&flipped, &what);
                }
                flipped[bit / 8] ^= 1 << (bit % 8);
            }
            prop_assert_eq!(bits(&out), bits(&before), "{}: buffer changed", what);
            prop_assert_eq!(&flipped, &msg);
        }
    }

    /// Wrong version bytes, appended bytes and wrong buffer lengths are rejected, the
    /// buffer untouched.
    #[test]
    fn version_trailing_bytes_and_numel(
        n in 1usize..300,
        seed in any::<u64>(),
        extra in proptest::collection::vec(any::<u8>(), 1..9),
    ) {
        for (what, msg) in valid_messages(n, seed, 1) {
            for version in (0..=255u8).filter(|&v| v != wire::VERSION) {
                let mut m = msg.clone();
                m[2] = version;
                prop_assert_eq!(decode_checked(&m).err(), Some(Error::UnsupportedVersion), "{}", &what);
                reseal(&mut m);
                prop_assert_eq!(decode_checked(&m).err(), Some(Error::UnsupportedVersion), "{}", &what);
            }
            for take in 1..=extra.len() {
                let mut m = msg.clone();
                m.extend_from_slice(&extra[..take]);
                let e = assert_rejected(&m, &what);
                let rice = matches!(wire::parse(&msg, n).map(|m| m.header.index), Ok(IndexCoding::Rice { .. }));
                if !rice {
                    prop_assert_eq!(e, Error::TrailingBytes, "{}", &what);
                }
                // Bytes inserted before the checksum, which is then recomputed.
                let mut m = msg.clone();
                let at = m.len() - CHECKSUM_LEN;
                m.splice(at..at, extra[..take].iter().copied());
                reseal(&mut m);
                let e = assert_rejected(&m, &what);
                if !rice {
                    prop_assert_eq!(e, Error::TrailingBytes, "{}", &what);
                }
            }
            for len in [0, n - 1, n + 1, 2 * n + 3] {
                let mut out = prefilled(len);
                prop_assert_eq!(decode_add(&msg, &mut out, ADD_SCALE).err(), Some(Error::NumelMismatch));
                prop_assert_eq!(bits(&out), bits(&prefilled(len)));
            }
        }
    }
}

/// The generated messages cover every index coding and every quantiser.
#[test]
fn valid_messages_cover_every_coding() {
    let mut codings = std::collections::HashSet::new();
    let mut quants = std::collections::HashSet::new();
    for n in [1, 7, 64, 257] {
        for (what, msg) in valid_messages(n, 42, 2) {
            let h = wire::parse(&msg, n).expect(&what).header;
            codings.insert(h.index.id());
            quants.insert(h.quant.id());
            assert!(decode_checked(&msg).is_ok(), "{what}");
        }
    }
    assert_eq!(codings.len(), 3, "{codings:?}");
    assert_eq!(quants.len(), 8, "{quants:?}");
}

// ---------------------------------------------------------------------------------------
// Hand-built messages. `build` writes the header fields given and appends a correct CRC,
// so every error below comes from the structural check named, not from the checksum.

const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;
const INT8: u8 = 3;
const INT4: u8 = 4;
const SIGN: u8 = 5;
const TERNARY: u8 = 6;
const QSGD: u8 = 7;
const DENSE: u8 = 0x00;
const BITMAP: u8 = 0x10;
const RICE: u8 = 0x20;

fn varint(mut v: u32) -> Vec<u8> {
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

/// `"IC" 1 codec`, then the raw `fields` (varints, k, levels, scale, stream, blocks), then
/// the CRC-32C of all of it.
fn build(codec: u8, fields: &[&[u8]]) -> Vec<u8> {
    let mut msg = vec![b'I', b'C', 1, codec];
    for f in fields {
        msg.extend_from_slice(f);
    }
    msg.extend_from_slice(&[0; CHECKSUM_LEN]);
    reseal(&mut msg);
    msg
}

fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn scale(s: f32) -> [u8; 4] {
    s.to_le_bytes()
}

fn expect_ok(msg: &[u8], want: &[(usize, f32)]) {
    let got = decode_checked(msg).unwrap_or_else(|e| panic!("{e:?}: {msg:02x?}"));
    assert_eq!(got, want, "{msg:02x?}");
}

fn expect_err(msg: &[u8], want: Error) {
    assert_eq!(decode_checked(msg).err(), Some(want), "{msg:02x?}");
}

/// Rice, f32 values: one position in 10 elements, k = 0. Gap 9 is ten bits
/// `1111111110` (LSB first: ff 01); gap 10 points one past the end.
#[test]
fn rice_gap_past_numel_is_index_out_of_range() {
    let one = f32s(&[1.0]);
    let rice = |numel: u32, nnz: u32, k: u8, index: &[u8], values: &[u8]| {
        build(
            F32 | RICE,
            &[&varint(numel), &varint(nnz), &[k], index, values],
        )
    };
    expect_ok(&rice(10, 1, 0, &[0xff, 0x01], &one), &[(9, 1.0)]);
    expect_err(&rice(10, 1, 0, &[0xff, 0x03], &one), Error::IndexOutOfRange);
    // Quotient beyond what numel allows (12 ones for 4 elements).
    expect_err(&rice(4, 1, 0, &[0xff, 0x0f], &one), Error::IndexOutOfRange);
    // k = 2: gap 9 = q 2, r 1 -> 1 1 0 | 1 0; gap 10 = q 2, r 2 -> 1 1 0 | 0 1.
    expect_ok(&rice(10, 1, 2, &[0x0b], &one), &[(9, 1.0)]);
    expect_err(&rice(10, 1, 2, &[0x13], &one), Error::IndexOutOfRange);
    // Second gap: positions 5 then 5 + 1 + 3 = 9; with gap 4 the second lands on 10.
    let two = f32s(&[1.0, -2.0]);
    expect_ok(&rice(10, 2, 0, &[0xdf, 0x01], &two), &[(5, 1.0), (9, -2.0)]);
    expect_err(&rice(10, 2, 0, &[0xdf, 0x03], &two), Error::IndexOutOfRange);
    // Codes exhausted: the zero padding after the last code reads as gap 0 -> position 10.
    expect_err(&rice(10, 2, 0, &[0xff, 0x01], &two), Error::IndexOutOfRange);
    // An empty Rice block with nnz = 1: no code at all.
    expect_err(&rice(10, 1, 0, &[], &one), Error::IndexOutOfRange);
    // Remainder cut short: k = 8 needs 9 bits, one byte has 8.
    expect_ok(&rice(1000, 1, 8, &[0x00, 0x00], &one), &[(0, 1.0)]);
    expect_err(&rice(1000, 1, 8, &[0x00], &one), Error::Truncated);
    // After the last code: a non-zero padding bit, or a whole extra byte.
    expect_err(&rice(10, 1, 0, &[0xff, 0x81], &one), Error::NonZeroPadding);
    expect_err(
        &rice(10, 1, 0, &[0xff, 0x01, 0x00], &one),
        Error::TrailingBytes,
    );
    // k above 31.
    expect_err(&rice(10, 1, 32, &[0xff, 0x01], &one), Error::UnknownCodec);
    // Non-canonical but allowed: a large k for a small gap (k = 31: 1 + 31 bits).
    expect_ok(
        &rice(10, 1, 31, &[0x0a, 0x00, 0x00, 0x00], &one),
        &[(5, 1.0)],
    );
    // nnz = 0 with a non-empty block: the byte is trailing.
    expect_ok(&rice(10, 0, 0, &[], &[]), &[]);
    expect_err(&rice(10, 0, 0, &[0x00], &[]), Error::TrailingBytes);
}

/// Bitmap, int8 values, scale 1: 16 elements, entries 0 and 4.
#[test]
fn bitmap_popcount_and_padding() {
    let s = scale(1.0);
    let bitmap = |numel: u32, nnz: u32, index: &[u8], values: &[u8]| {
        build(
            INT8 | BITMAP,
            &[&varint(numel), &varint(nnz), &s, index, values],
        )
    };
    expect_ok(
        &bitmap(16, 2, &[0x11, 0x00], &[0x01, 0xff]),
        &[(0, 1.0), (4, -1.0)],
    );
    expect_err(
        &bitmap(16, 2, &[0x13, 0x00], &[0x01, 0xff]),
        Error::BadEntryCount,
    );
    expect_err(
        &bitmap(16, 2, &[0x01, 0x00], &[0x01, 0xff]),
        Error::BadEntryCount,
    );
    expect_err(
        &bitmap(16, 2, &[0x00, 0x00], &[0x01, 0xff]),
        Error::BadEntryCount,
    );
    // 10 elements: bits 10..15 of the second byte are padding.
    expect_ok(
        &bitmap(10, 2, &[0x01, 0x02], &[0x01, 0xff]),
        &[(0, 1.0), (9, -1.0)],
    );
    expect_err(
        &bitmap(10, 2, &[0x01, 0x10], &[0x01, 0xff]),
        Error::NonZeroPadding,
    );
    expect_err(
        &bitmap(10, 1, &[0x00, 0x80], &[0x01]),
        Error::NonZeroPadding,
    );
    // Block of the wrong length.
    expect_err(
        &bitmap(16, 2, &[0x11, 0x00, 0x00], &[0x01, 0xff]),
        Error::TrailingBytes,
    );
    expect_err(&bitmap(16, 2, &[0x11], &[0x01, 0xff]), Error::Truncated);
    // Allowed though never written by the encoder: a full bitmap with nnz == numel, and
    // int8 code -128.
    expect_ok(
        &bitmap(8, 8, &[0xff], &[0x80, 1, 2, 3, 4, 5, 6, 0x7f]),
        &[
            (0, -128.0),
            (1, 1.0),
            (2, 2.0),
            (3, 3.0),
            (4, 4.0),
            (5, 5.0),
            (6, 6.0),
            (7, 127.0),
        ],
    );
}

/// Unused high bits of the last value byte must be zero, and ternary's unused digits.
#[test]
fn value_padding_must_be_zero() {
    let s = scale(2.0);
    let dense = |quant: u8, numel: u32, extra: &[u8], values: &[u8]| {
        build(
            quant | DENSE,
            &[&varint(numel), &varint(numel), extra, values],
        )
    };
    // int4, one code in the low nibble.
    expect_ok(&dense(INT4, 1, &s, &[0x01]), &[(0, 2.0)]);
    expect_ok(&dense(INT4, 1, &s, &[0x08]), &[(0, -16.0)]);
    expect_err(&dense(INT4, 1, &s, &[0x11]), Error::NonZeroPadding);
    // sign, three bits.
    expect_ok(
        &dense(SIGN, 3, &s, &[0x05]),
        &[(0, -2.0), (1, 2.0), (2, -2.0)],
    );
    expect_err(&dense(SIGN, 3, &s, &[0x25]), Error::NonZeroPadding);
    expect_err(&dense(SIGN, 3, &s, &[0x85]), Error::NonZeroPadding);
    // ternary, two digits: the byte must be below 9.
    let st = [&s[..], &[9, 0, 0, 0]].concat();
    expect_ok(&dense(TERNARY, 2, &st, &[2 + 3]), &[(0, 2.0), (1, 0.0)]);
    expect_ok(&dense(TERNARY, 2, &st, &[8]), &[(0, 2.0), (1, 2.0)]);
    expect_err(&dense(TERNARY, 2, &st, &[9]), Error::NonZeroPadding);
    expect_err(&dense(TERNARY, 2, &st, &[242]), Error::NonZeroPadding);
    // QSGD s = 15: 5-bit codes, bits 5..7 of the byte are padding.
    let sq = [&[15u8][..], &s, &[0, 0, 0, 0]].concat();
    expect_ok(&dense(QSGD, 1, &sq, &[0x01]), &[(0, 2.0 / 15.0)]);
    expect_ok(&dense(QSGD, 1, &sq, &[0x11]), &[(0, -2.0 / 15.0)]);
    expect_err(&dense(QSGD, 1, &sq, &[0x21]), Error::NonZeroPadding);
}

/// Values that are not finite, and a full ternary byte of 243 or more.
#[test]
fn bad_values() {
    let dense = |quant: u8, numel: u32, extra: &[u8], values: &[u8]| {
        build(
            quant | DENSE,
            &[&varint(numel), &varint(numel), extra, values],
        )
    };
    expect_ok(&dense(F32, 1, &[], &f32s(&[-3.5])), &[(0, -3.5)]);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        expect_err(&dense(F32, 2, &[], &f32s(&[1.0, bad])), Error::BadValue);
    }
    expect_ok(&dense(F16, 1, &[], &[0x00, 0x3c]), &[(0, 1.0)]);
    for bad in [0x7c00u16, 0xfc00, 0x7e00, 0x7c01] {
        expect_err(&dense(F16, 1, &[], &bad.to_le_bytes()), Error::BadValue);
    }
    expect_ok(&dense(BF16, 1, &[], &[0x80, 0x3f]), &[(0, 1.0)]);
    for bad in [0x7f80u16, 0xff80, 0x7fc0, 0x7f81] {
        expect_err(&dense(BF16, 1, &[], &bad.to_le_bytes()), Error::BadValue);
    }
    let st = [&scale(1.0)[..], &[0, 0, 0, 0]].concat();
    expect_ok(
        &dense(TERNARY, 5, &st, &[242]),
        &[(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0)],
    );
    for b in [243u8, 250, 255] {
        expect_err(&dense(TERNARY, 5, &st, &[b]), Error::BadValue);
        expect_err(&dense(TERNARY, 7, &st, &[0, b]), Error::BadValue);
    }
}

/// Varints: redundant trailing zero group, more than five bytes, above `u32::MAX`.
#[test]
fn bad_varints() {
    let body = |numel: &[u8], nnz: &[u8]| build(F32 | RICE, &[numel, nnz, &[0], &[0; 8]]);
    expect_ok(&build(F32 | RICE, &[&[0x0a], &[0x00], &[0]]), &[]);
    for bad in [
        &[0x8a, 0x00][..],
        &[0x80, 0x80, 0x00],
        &[0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
        &[0xff, 0xff, 0xff, 0xff, 0x1f],
        &[0xff, 0xff, 0xff, 0xff, 0x10],
        &[0x80, 0x80, 0x80, 0x80, 0x80],
    ] {
        expect_err(&body(bad, &[0x00]), Error::BadVarint);
        expect_err(&body(&[0x0a], bad), Error::BadVarint);
    }
    // The largest value is fine (numel = u32::MAX, nothing sent).
    let m = build(
        F32 | RICE,
        &[&[0xff, 0xff, 0xff, 0xff, 0x0f], &[0x00], &[0]],
    );
    assert_eq!(decode_checked(&m), Ok(vec![]));
    assert_eq!(wire::parse(&m, 1 << 20).err(), Some(Error::TooLarge));
}

/// Scales must be finite with the sign bit clear; QSGD levels must be non-zero.
#[test]
fn bad_scales() {
    let int8 = |s: f32| build(INT8 | DENSE, &[&[1], &[1], &scale(s), &[0x02]]);
    expect_ok(&int8(0.5), &[(0, 1.0)]);
    expect_ok(&int8(0.0), &[(0, 0.0)]);
    expect_ok(&int8(f32::from_bits(1)), &[(0, 2.0 * f32::from_bits(1))]);
    for bad in [
        -1.0,
        -0.0,
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -f32::from_bits(1),
    ] {
        expect_err(&int8(bad), Error::BadScale);
    }
    let qsgd = |levels: u8, s: f32| {
        build(
            QSGD | DENSE,
            &[&[1], &[1], &[levels], &scale(s), &[0; 4], &[0x01]],
        )
    };
    expect_ok(&qsgd(1, 3.0), &[(0, 3.0)]);
    expect_err(&qsgd(0, 3.0), Error::BadScale);
    expect_err(&qsgd(4, -3.0), Error::BadScale);
    expect_err(&qsgd(4, f32::NAN), Error::BadScale);
}

/// Entry counts, codec bytes, magic, version, checksum, lengths.
#[test]
fn framing_errors() {
    let one = f32s(&[1.0]);
    // nnz > numel; dense with nnz != numel.
    expect_err(
        &build(F32 | RICE, &[&[1], &[2], &[0], &[0x00], &one, &one]),
        Error::BadEntryCount,
    );
    expect_ok(&build(F32 | DENSE, &[&[1], &[1], &one]), &[(0, 1.0)]);
    expect_err(
        &build(F32 | DENSE, &[&[2], &[1], &one]),
        Error::BadEntryCount,
    );
    expect_err(
        &build(F32 | DENSE, &[&[1], &[0], &[0; 4]]),
        Error::BadEntryCount,
    );
    // Reserved codec bits and ids.
    for codec in [0x40u8, 0x80, 0xc0, 0x08, 0x0f, 0x30, 0x3f] {
        expect_err(&build(codec, &[&[1], &[1], &one]), Error::UnknownCodec);
    }
    // Magic, version, short messages.
    let good = build(F32 | DENSE, &[&[1], &[1], &one]);
    for (i, b) in [(0usize, b'X'), (1, b'c')] {
        let mut m = good.clone();
        m[i] = b;
        reseal(&mut m);
        expect_err(&m, Error::BadMagic);
        expect_err(&m[..2], Error::BadMagic);
    }
    for v in [0u8, 2, 0xff] {
        let mut m = good.clone();
        m[2] = v;
        reseal(&mut m);
        expect_err(&m, Error::UnsupportedVersion);
    }
    for len in 0..3 {
        expect_err(&good[..len], Error::Truncated);
    }
    for len in 3..MIN_MESSAGE_LEN {
        expect_err(&good[..len], Error::Truncated);
    }
    // Checksum: every byte of it matters.
    for i in good.len() - CHECKSUM_LEN..good.len() {
        let mut m = good.clone();
        m[i] ^= 0x10;
        expect_err(&m, Error::ChecksumMismatch);
    }
    // The shortest message: f32, numel 0.
    let empty = build(F32 | DENSE, &[&[0], &[0]]);
    assert_eq!(empty.len(), MIN_MESSAGE_LEN);
    expect_ok(&empty, &[]);
}

/// QSGD level codes above `s` (up to 2^b − 1) are allowed by the spec and decode as
/// `l · scale / s`.
#[test]
fn qsgd_levels_up_to_the_field_width_decode() {
    // s = 2 -> b = 2, 3-bit codes; level 3 with sign.
    let m = build(
        QSGD | DENSE,
        &[&[1], &[1], &[2], &scale(4.0), &[0; 4], &[0x07]],
    );
    expect_ok(&m, &[(0, -6.0)]);
}

/// Messages of several million elements and a large Rice gap decode (u64 arithmetic).
#[test]
fn large_numel_and_gap() {
    let numel = 5_000_000u32;
    // k = 22: gap 4_999_999 = q 1, r 4_999_999 - 2^22.
    let gap = numel - 1;
    let (q, r) = (gap >> 22, gap & ((1 << 22) - 1));
    assert_eq!(q, 1);
    let code: u32 = 0b01 | (r << 2); // one 1-bit, a 0-bit, then 22 remainder bits
    let index = code.to_le_bytes()[..3].to_vec();
    let m = build(
        F32 | RICE,
        &[&varint(numel), &varint(1), &[22], &index, &f32s(&[7.0])],
    );
    let p = wire::parse(&m, numel as usize).expect("parse");
    let mut seen = Vec::new();
    wire::for_each_entry(&p, |i, v| seen.push((i, v))).expect("entries");
    assert_eq!(seen, vec![(gap as usize, 7.0)]);
    let mut out = vec![0.0f32; numel as usize];
    decode_add(&m, &mut out, 1.0).expect("decode_add");
    assert_eq!(out[gap as usize], 7.0);
    assert_eq!(
        wire::parse(&m, numel as usize - 1).err(),
        Some(Error::TooLarge)
    );
}

/// Sanity check of the test's own helper against the crate's `Quant` list.
#[test]
fn codec_ids_match() {
    let ids: Vec<u8> = QUANTS.iter().map(|q| q.id()).collect();
    assert_eq!(ids, vec![F32, F16, BF16, INT8, INT4, SIGN, TERNARY, QSGD]);
    assert_eq!(Quant::F32.id(), 0);
}

// ---------------------------------------------------------------------------------------
// Compressor edge cases that `fuzz/roundtrip` found (all fixed; kept as regression tests).

/// int8's scale `max|v| / 127` rounds up for `max|v| = f32::MAX`, so `127 · scale`
/// overflows: `compress` returns `Ok`, the message decodes to ±inf and the residual becomes
/// ∓inf. (QSGD does the same for 25 of the 255 level counts, e.g. 127.) A decoder that
/// only checks codes accepts the message; one that checks decoded values rejects it. Either
/// way the encoder should not produce it.
#[test]

fn int8_of_f32_max_decodes_finite() {
    let mut c = compressor(config(Selection::Dense, Quant::Int8, Momentum::None, 0), 3);
    let g = [f32::MAX, 1.0, -f32::MAX];
    let msg = c.compress_to_vec(&g).expect("compress");
    let d = decode_to_vec(&msg, 3).expect("decode");
    assert!(
        d.iter().chain(c.residual()).all(|x| x.is_finite()),
        "decoded {d:?}, residual {:?}, message {msg:02x?}",
        c.residual()
    );
}

/// `Selection::Adaptive(Target::Bytes(_))` on an empty tensor: `target_count` clamps k to
/// at least 1 and `kth_largest` panics on the empty slice.
#[test]

fn adaptive_bytes_on_empty_tensor() {
    let sel = Selection::Adaptive(iotcompress_core::Target::Bytes(1000));
    let mut c = compressor(config(sel, Quant::F32, Momentum::None, 0), 0);
    let msg = c.compress_to_vec(&[]).expect("compress");
    assert_eq!(decode_checked(&msg), Ok(vec![]));
}

/// QSGD with a largest magnitude so small that `levels / scale` is inf used to saturate and
/// overflow in `Quantizer::encode`. Now the encoder quantises against a pre-scaled scale; a
/// code unit `scale / levels` that underflows to 0 sends 0, and error feedback keeps the
/// value in the residual.
#[test]

fn qsgd_of_subnormal_gradient() {
    let mut c = compressor(
        config(
            Selection::Dense,
            Quant::Qsgd { levels: 15 },
            Momentum::None,
            0,
        ),
        1,
    );
    let g = [f32::from_bits(1)];
    let msg = c.compress_to_vec(&g).expect("compress");
    let d = decode_to_vec(&msg, 1).expect("decode");
    assert_eq!(
        d[0] + c.residual()[0],
        g[0],
        "error feedback keeps what the message cannot carry"
    );
    // Small but normal magnitudes quantise within the stated bound (scale / levels).
    for &x in &[1e-38f32, 3e-35, 1e-31] {
        let mut c = compressor(
            config(
                Selection::Dense,
                Quant::Qsgd { levels: 15 },
                Momentum::None,
                0,
            ),
            2,
        );
        let g = [x, -x / 3.0];
        let d = decode_to_vec(&c.compress_to_vec(&g).expect("compress"), 2).expect("decode");
        for i in 0..2 {
            assert!(
                (d[i] - g[i]).abs() <= x / 15.0 * 1.001,
                "{x}: {d:?} vs {g:?}"
            );
        }
    }
    // And int8 of tiny magnitudes keeps its scale/2 bound instead of saturating.
    let mut c = compressor(config(Selection::Dense, Quant::Int8, Momentum::None, 0), 3);
    let g = [1e-38f32, 1e-40, 0.0];
    let d = decode_to_vec(&c.compress_to_vec(&g).expect("compress"), 3).expect("decode");
    for i in 0..3 {
        assert!((d[i] - g[i]).abs() <= 1e-38 / 127.0 * 0.5 + 1e-45, "{d:?}");
    }
}
