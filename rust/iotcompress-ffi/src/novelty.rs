//! The C API of the novelty filter (`iotcompress_core::novelty`): a device offers each sensor
//! window and trains on or sends only those kept. The caller owns the filter (a plain
//! struct) and its bank of `iotcompress_novelty_bank_len` floats
//! (`IOTCOMPRESS_NOVELTY_BANK_LEN` for static buffers).

use core::mem::size_of;

use iotcompress_core::novelty::{bank_len, Metric, NoveltyConfig, NoveltyFilter};

use super::{
    reference, reference_mut, slice, slice_mut, status, write_opt, IotcompressStatus, Span, Status,
};

/// `IotcompressNovelty.magic` once initialised ("ICN1").
pub const IOTCOMPRESS_NOVELTY_MAGIC: u32 = 0x4943_4E31;
/// Squared L2 distance of the pooled values.
pub const IOTCOMPRESS_METRIC_EUCLIDEAN: u32 = 0;
/// Squared L2 distance of centred unit-length views (`2 - 2 cos`).
pub const IOTCOMPRESS_METRIC_COSINE: u32 = 1;

/// The options of a novelty filter (see `iotcompress_novelty_config_default`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IotcompressNoveltyConfig {
    /// Values in one sample: `channels` rows of `dim / channels`, row after row.
    pub dim: u32,
    /// Rows (sensor axes) of a sample; must divide `dim`.
    pub channels: u32,
    /// Values of a row averaged into one view value (1: none).
    pub pool: u32,
    /// Kept views remembered.
    pub capacity: u32,
    /// `IOTCOMPRESS_METRIC_EUCLIDEAN` or `IOTCOMPRESS_METRIC_COSINE`.
    pub metric: u32,
    /// Distance below which a sample is redundant (adaptive: the start; 0 = from the data).
    pub threshold: f32,
    /// Target fraction kept, in (0, 1]; 0 for a fixed threshold.
    pub keep: f32,
    /// Adaptation step of the threshold, in (0, 1).
    pub rate: f32,
}

impl IotcompressNoveltyConfig {
    fn core(&self) -> Result<NoveltyConfig, Status> {
        let c = NoveltyConfig {
            dim: self.dim,
            channels: self.channels,
            pool: self.pool,
            capacity: self.capacity,
            metric: Metric::from_id(self.metric).ok_or(Status::ErrInvalidConfig)?,
            threshold: self.threshold,
            keep: self.keep,
            rate: self.rate,
        };
        c.validate()?;
        Ok(c)
    }
}

/// A novelty filter: its configuration, counters, the ring's position and the threshold.
/// Set up by `iotcompress_novelty_init`; plain data, re-validated on every call (a
/// checkpoint is a copy of it and of the bank).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IotcompressNovelty {
    /// The configuration.
    pub config: IotcompressNoveltyConfig,
    /// Samples offered.
    pub seen: u64,
    /// Samples kept.
    pub kept: u64,
    /// `IOTCOMPRESS_NOVELTY_MAGIC` once initialised.
    pub magic: u32,
    /// The bank's work slot.
    pub head: u32,
    /// Views remembered (at most `config.capacity`).
    pub stored: u32,
    /// The current threshold.
    pub threshold: f32,
}

impl IotcompressNovelty {
    fn core(&self) -> Result<NoveltyFilter, Status> {
        if self.magic != IOTCOMPRESS_NOVELTY_MAGIC {
            return Err(Status::ErrBadState);
        }
        let c = self.config.core()?;
        NoveltyFilter::from_parts(
            c,
            self.head,
            self.stored,
            self.threshold,
            self.seen,
            self.kept,
        )
        .map_err(|_| Status::ErrBadState)
    }

    fn store(&mut self, f: &NoveltyFilter) {
        (self.head, self.stored) = f.ring();
        (self.threshold, self.seen, self.kept) = (f.threshold(), f.seen(), f.kept());
    }
}

/// Fills `*config` for samples of `dim` values remembering `capacity` views: one channel,
/// no pooling, cosine metric, fixed threshold 0 (set `threshold`, or `keep` for adaptive),
/// rate 0.05.
///
/// # Safety
/// `config` must be NULL or writable for one struct.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_novelty_config_default(
    config: *mut IotcompressNoveltyConfig,
    dim: u32,
    capacity: u32,
) -> IotcompressStatus {
    let c = NoveltyConfig::new(dim, capacity);
    let out = IotcompressNoveltyConfig {
        dim,
        channels: c.channels,
        pool: c.pool,
        capacity,
        metric: c.metric as u32,
        threshold: c.threshold,
        keep: c.keep,
        rate: c.rate,
    };
    if config.is_null() {
        return Status::ErrNullPointer as IotcompressStatus;
    }
    // SAFETY: forwarded contract: `config` is writable.
    status(unsafe { write_opt(config, out) })
}

/// Floats of the bank for `config` into `*len`: `(capacity + 1) * channels *
/// ceil(dim / channels / pool)`. `IOTCOMPRESS_ERR_INVALID_CONFIG` for a bad configuration.
///
/// # Safety
/// `config` must be NULL or readable, `len` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_novelty_bank_len(
    config: *const IotcompressNoveltyConfig,
    len: *mut usize,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { reference(config) }.and_then(|c| {
        let n = bank_len(&c.core()?).ok_or(Status::ErrInvalidConfig)?;
        // SAFETY: forwarded contract: `len` is NULL or writable.
        unsafe { write_opt(len, n) }
    }))
}

/// Sets up `*filter` with `config` (copied): nothing remembered, nothing seen. The bank needs
/// no initialisation. `IOTCOMPRESS_ERR_INVALID_CONFIG` leaves `*filter` as it was.
///
/// # Safety
/// `filter` must be NULL or writable for one struct, `config` NULL or readable.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_novelty_init(
    filter: *mut IotcompressNovelty,
    config: *const IotcompressNoveltyConfig,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { reference(config) }.and_then(|config| {
        let core = NoveltyFilter::new(config.core()?)?;
        let mut fresh = IotcompressNovelty {
            config: *config,
            seen: 0,
            kept: 0,
            magic: IOTCOMPRESS_NOVELTY_MAGIC,
            head: 0,
            stored: 0,
            threshold: 0.0,
        };
        fresh.store(&core);
        if filter.is_null() {
            return Err(Status::ErrNullPointer);
        }
        // SAFETY: forwarded contract: `filter` is writable.
        unsafe { write_opt(filter, fresh) }
    }))
}

/// Offers one sample of `config.dim` floats; `*keep` (if not NULL) is 1 when the filter
/// keeps it (its view is then remembered in the bank), 0 when it is redundant.
///
/// Errors leave the filter and the remembered views unchanged:
/// `IOTCOMPRESS_ERR_LENGTH_MISMATCH` (`sample_len != dim`, `bank_len` not the bank's length),
/// `IOTCOMPRESS_ERR_NON_FINITE_GRADIENT` (the sample holds NaN or infinity),
/// `IOTCOMPRESS_ERR_BAD_STATE`, `IOTCOMPRESS_ERR_INVALID_CONFIG`, the pointer errors and
/// `IOTCOMPRESS_ERR_OVERLAP` (the sample or `keep` inside the bank).
///
/// # Safety
/// `filter` must point at a live struct, `bank` at `bank_len` floats, `sample` at
/// `sample_len` floats, `keep` be NULL or writable; no other thread may access them.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_novelty_offer(
    filter: *mut IotcompressNovelty,
    bank: *mut f32,
    bank_len: usize,
    sample: *const f32,
    sample_len: usize,
    keep: *mut u8,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { offer_impl(filter, bank, bank_len, sample, sample_len, keep) })
}

/// The body of `iotcompress_novelty_offer`.
///
/// # Safety
/// As for `iotcompress_novelty_offer`.
unsafe fn offer_impl(
    filter: *mut IotcompressNovelty,
    bank: *mut f32,
    bank_len: usize,
    sample: *const f32,
    sample_len: usize,
    keep: *mut u8,
) -> Result<(), Status> {
    let spans = [
        Span::of(bank, bank_len),
        Span::of(sample, sample_len),
        Span::of(keep, usize::from(!keep.is_null())),
        Span::of(filter, 1),
    ];
    for (i, a) in spans.iter().enumerate() {
        if spans[i + 1..].iter().any(|b| a.overlaps(*b)) {
            return Err(Status::ErrOverlap);
        }
    }
    // SAFETY: forwarded contract; the buffers are disjoint (checked above).
    let (f, bank, sample) = unsafe {
        (
            reference_mut(filter)?,
            slice_mut(bank, bank_len)?,
            slice(sample, sample_len)?,
        )
    };
    let mut core = f.core()?;
    let kept = core.offer(bank, sample)?;
    // SAFETY: forwarded contract: `keep` is NULL or writable (and disjoint, checked).
    unsafe { write_opt(keep, u8::from(kept)) }?;
    f.store(&core);
    Ok(())
}

/// `sizeof(IotcompressNovelty)` as the library was built.
#[no_mangle]
pub extern "C" fn iotcompress_novelty_size() -> usize {
    size_of::<IotcompressNovelty>()
}
