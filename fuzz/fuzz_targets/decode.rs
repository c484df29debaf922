//! Arbitrary bytes into every decoder entry point: no panic, no over-read (the fuzz build
//! runs under AddressSanitizer), only decode errors, and `decode_add` all or nothing.
//! Each input also runs with its last four bytes replaced by the right CRC-32C, so that
//! mutations reach the checks behind the checksum.
#![no_main]

use iotcompress_core::wire::crc::crc32c;
use iotcompress_core::wire::{for_each_entry, parse, CHECKSUM_LEN};
use iotcompress_core::{decode_add, Error};
use libfuzzer_sys::fuzz_target;

/// Headers announcing more elements than this are not decoded into a buffer.
const MAX_NUMEL: usize = 1 << 20;
/// What the output buffer is prefilled with: on error it must still hold exactly this.
const FILL: f32 = -1.5;

thread_local! {
    static OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn decode_error(e: Error, what: &str) {
    assert!(e.is_decode_error(), "{what}: {e:?} is not a decode error");
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= CHECKSUM_LEN {
        let mut sealed = data.to_vec();
        let split = data.len() - CHECKSUM_LEN;
        let crc = crc32c(&data[..split]);
        sealed[split..].copy_from_slice(&crc.to_le_bytes());
        check(&sealed);
    }
});

fn check(data: &[u8]) {
    let m = match parse(data, usize::MAX) {
        Ok(m) => m,
        Err(e) => {
            decode_error(e, "parse");
            let mut out = [FILL; 8];
            assert_eq!(decode_add(data, &mut out, 1.0).err(), Some(e));
            assert!(out.iter().all(|x| x.to_bits() == FILL.to_bits()));
            return;
        }
    };
    let h = m.header;
    let numel = h.numel as usize;
    assert_eq!(m.len, data.len());
    if numel > 0 {
        assert_eq!(parse(data, numel - 1).err(), Some(Error::TooLarge));
    }

    let mut count = 0usize;
    let mut next = 0usize;
    let walked = for_each_entry(&m, |i, v| {
        assert!(
            i >= next && i < numel,
            "index {i}: next {next}, numel {numel}"
        );
        assert!(!v.is_nan(), "NaN value at {i}");
        next = i + 1;
        count += 1;
    });
    match walked {
        Ok(()) => assert_eq!(count, h.nnz as usize),
        Err(e) => decode_error(e, "for_each_entry"),
    }

    // Any other length is refused before anything is read.
    let mut other = [FILL; 1];
    let other_len = if numel == 1 { 0 } else { 1 };
    assert_eq!(
        decode_add(data, &mut other[..other_len], 1.0).err(),
        Some(Error::NumelMismatch)
    );

    if numel <= MAX_NUMEL {
        // One buffer reused across runs: a fresh 4 MiB allocation per input would make the
        // fuzzer spend its time in the kernel.
        OUT.with_borrow_mut(|out| {
            out.clear();
            out.resize(numel, FILL);
            match decode_add(data, out, 1.0) {
                Ok(_) => assert!(
                    walked.is_ok(),
                    "decode_add accepted, for_each_entry: {walked:?}"
                ),
                Err(e) => {
                    decode_error(e, "decode_add");
                    assert_eq!(Err(e), walked);
                    assert!(
                        out.iter().all(|x| x.to_bits() == FILL.to_bits()),
                        "decode_add changed the buffer and failed with {e:?}"
                    );
                }
            }
        });
    }
}
