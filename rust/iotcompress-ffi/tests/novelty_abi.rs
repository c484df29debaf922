//! The novelty filter's C ABI (`iotcompress_novelty_*`) called the way C calls it: the
//! core's decisions, and every misuse an error code that changes nothing.

#![allow(clippy::unwrap_used)]

use core::ptr::{null, null_mut};

use iotcompress::novelty::*;
use iotcompress::*;
use iotcompress_core::novelty::{Metric, NoveltyConfig, NoveltyFilter};

fn setup(keep: f32) -> (IotcompressNovelty, Vec<f32>) {
    let mut cfg = std::mem::MaybeUninit::<IotcompressNoveltyConfig>::uninit();
    // SAFETY: valid pointers to writable memory.
    unsafe {
        assert_eq!(
            iotcompress_novelty_config_default(cfg.as_mut_ptr(), 12, 8),
            IOTCOMPRESS_OK
        );
    }
    // SAFETY: initialised by the call above.
    let mut cfg = unsafe { cfg.assume_init() };
    (cfg.channels, cfg.pool, cfg.metric, cfg.keep) = (3, 2, IOTCOMPRESS_METRIC_EUCLIDEAN, keep);
    let mut len = 0usize;
    let mut f = std::mem::MaybeUninit::<IotcompressNovelty>::uninit();
    // SAFETY: valid pointers.
    unsafe {
        assert_eq!(iotcompress_novelty_bank_len(&cfg, &mut len), IOTCOMPRESS_OK);
        assert_eq!(
            iotcompress_novelty_init(f.as_mut_ptr(), &cfg),
            IOTCOMPRESS_OK
        );
    }
    assert_eq!(len, 9 * 3 * 2);
    // SAFETY: initialised by init.
    (unsafe { f.assume_init() }, vec![0.0; len])
}

fn sample(i: usize) -> [f32; 12] {
    core::array::from_fn(|j| (((i / 3) * 7 + j * 3) % 11) as f32 * 0.3)
}

#[test]
fn decisions_equal_the_core() {
    let (mut f, mut bank) = setup(0.3);
    let c = NoveltyConfig {
        channels: 3,
        pool: 2,
        metric: Metric::Euclidean,
        keep: 0.3,
        ..NoveltyConfig::new(12, 8)
    };
    let (mut core, mut core_bank) = (NoveltyFilter::new(c).unwrap(), bank.clone());
    for i in 0..200 {
        let s = sample(i);
        let mut keep = 7u8;
        // SAFETY: valid pointers and lengths.
        let rc = unsafe {
            iotcompress_novelty_offer(
                &mut f,
                bank.as_mut_ptr(),
                bank.len(),
                s.as_ptr(),
                12,
                &mut keep,
            )
        };
        assert_eq!(rc, IOTCOMPRESS_OK);
        assert_eq!(keep == 1, core.offer(&mut core_bank, &s).unwrap());
    }
    assert_eq!(
        (f.seen, f.kept, f.threshold.to_bits()),
        (core.seen(), core.kept(), core.threshold().to_bits())
    );
    assert!(f.kept > 0 && f.kept < 200);
    assert_eq!(
        iotcompress_novelty_size(),
        core::mem::size_of::<IotcompressNovelty>()
    );
}

#[test]
fn misuse_is_an_error_that_changes_nothing() {
    let (mut f, mut bank) = setup(0.0);
    f.config.threshold = 0.5;
    let s = sample(0);
    let (before, bank_before) = (f, bank.clone());
    let mut nan = s;
    nan[2] = f32::NAN;
    let len = bank.len();
    let p = bank.as_mut_ptr();
    // SAFETY: each call gets valid memory or a deliberately bad argument the ABI must catch.
    unsafe {
        assert_eq!(
            iotcompress_novelty_offer(&mut f, p, len, nan.as_ptr(), 12, null_mut()),
            IOTCOMPRESS_ERR_NON_FINITE_GRADIENT
        );
        assert_eq!(
            iotcompress_novelty_offer(&mut f, p, len, s.as_ptr(), 11, null_mut()),
            IOTCOMPRESS_ERR_LENGTH_MISMATCH
        );
        assert_eq!(
            iotcompress_novelty_offer(&mut f, p, len - 1, s.as_ptr(), 12, null_mut()),
            IOTCOMPRESS_ERR_LENGTH_MISMATCH
        );
        assert_eq!(
            iotcompress_novelty_offer(&mut f, p, len, null(), 12, null_mut()),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_novelty_offer(null_mut(), p, len, s.as_ptr(), 12, null_mut()),
            IOTCOMPRESS_ERR_NULL_POINTER
        );
        assert_eq!(
            iotcompress_novelty_offer(&mut f, p, len, p, 12, null_mut()),
            IOTCOMPRESS_ERR_OVERLAP
        );
        assert_eq!(
            iotcompress_novelty_offer(&mut f, p, len, s.as_ptr(), 12, p.cast::<u8>()),
            IOTCOMPRESS_ERR_OVERLAP
        );
    }
    assert_eq!(f, before);
    assert_eq!(bank, bank_before);
    for (field, status) in [
        (0usize, IOTCOMPRESS_ERR_BAD_STATE),
        (1, IOTCOMPRESS_ERR_INVALID_CONFIG),
        (2, IOTCOMPRESS_ERR_BAD_STATE),
    ] {
        let mut bad = f;
        match field {
            0 => bad.magic = 0,
            1 => bad.config.metric = 9,
            _ => bad.stored = 99,
        }
        // SAFETY: valid pointers; the struct's fields are wrong on purpose.
        let rc = unsafe { iotcompress_novelty_offer(&mut bad, p, len, s.as_ptr(), 12, null_mut()) };
        assert_eq!(rc, status, "field {field}");
    }
    let mut cfg = f.config;
    cfg.channels = 5;
    let mut other = f;
    // SAFETY: valid pointers.
    assert_eq!(
        unsafe { iotcompress_novelty_init(&mut other, &cfg) },
        IOTCOMPRESS_ERR_INVALID_CONFIG
    );
    assert_eq!(other, f);
}
