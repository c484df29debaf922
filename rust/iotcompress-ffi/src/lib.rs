//! # iotcompress-ffi
//!
//! The C ABI of `iotcompress-core`, for firmware written in C (bare metal, Zephyr, Arduino).
//! The header is `include/iotcompress.h`, generated from this file by cbindgen
//! (`make header-check` fails when it is stale); `docs/mcu.md` is the guide.
//!
//! Rules of this layer:
//!
//! * **No heap.** The caller owns the compressor state (a plain struct) and every buffer;
//!   [`iotcompress_sizes`] says how large they must be.
//! * **Types only.** Each function converts C arguments to core types, calls the core once and
//!   converts the result back; the pipeline lives in `iotcompress-core`.
//! * **No UB from bad arguments, no panics.** Null pointers, misaligned pointers, lengths
//!   that do not match, overlapping buffers, unknown enum values and uninitialised state all
//!   return an error code. All `unsafe` of the project is in this crate, each block with a
//!   `// SAFETY:` comment; what remains the caller's duty (pointers that point at `len` live
//!   elements) is stated under `# Safety` on each function.
//! * **The state is transparent.** [`IotcompressCompressor`] holds the configuration and the
//!   counters as plain fields, validated on every call, so a checkpoint is a `memcpy` and a
//!   garbage struct is an error code, never undefined behaviour.
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![warn(missing_docs)]

use core::ffi::{c_char, CStr};
use core::mem::{align_of, size_of};

pub mod novelty;

use iotcompress_core::{
    decode_add, parse, Buffers, Compressor, Config, Error, Header, IndexCoding, Momentum,
    NetworkProfile, Quant, Selection, StateFormat, StreamCompressor, StreamConfig, StreamMessage,
    StreamTarget, Target, ThresholdController,
};

// --- status codes ------------------------------------------------------------------------

/// The result of every function: `IOTCOMPRESS_OK` (0) or an error code.
///
/// Codes 1 to 14 are *decode* errors (the message bytes are malformed), 15 to 22 are caller
/// errors reported by the core, 100 and up are errors of the C layer (bad pointers, state).
/// The values are stable: new codes are only ever added. `iotcompress_error_name` and
/// `iotcompress_error_message` describe them.
pub type IotcompressStatus = i32;

/// Success.
pub const IOTCOMPRESS_OK: IotcompressStatus = 0;
/// The message ends before its header says it should.
pub const IOTCOMPRESS_ERR_TRUNCATED: IotcompressStatus = 1;
/// The message has bytes after its checksum or after its index block.
pub const IOTCOMPRESS_ERR_TRAILING_BYTES: IotcompressStatus = 2;
/// The first two bytes are not the magic "IC": not an iotcompress message.
pub const IOTCOMPRESS_ERR_BAD_MAGIC: IotcompressStatus = 3;
/// The version byte names a wire format this decoder does not know.
pub const IOTCOMPRESS_ERR_UNSUPPORTED_VERSION: IotcompressStatus = 4;
/// The codec byte names an unknown quantiser or index coding, or sets reserved bits.
pub const IOTCOMPRESS_ERR_UNKNOWN_CODEC: IotcompressStatus = 5;
/// A varint in the header is malformed.
pub const IOTCOMPRESS_ERR_BAD_VARINT: IotcompressStatus = 6;
/// The entry count is inconsistent with the element count or the index block.
pub const IOTCOMPRESS_ERR_BAD_ENTRY_COUNT: IotcompressStatus = 7;
/// An index points past the end of the tensor.
pub const IOTCOMPRESS_ERR_INDEX_OUT_OF_RANGE: IotcompressStatus = 8;
/// Padding bits or reserved fields are not zero.
pub const IOTCOMPRESS_ERR_NON_ZERO_PADDING: IotcompressStatus = 9;
/// A scale is negative or not finite, or the QSGD level count is zero.
pub const IOTCOMPRESS_ERR_BAD_SCALE: IotcompressStatus = 10;
/// A value is not finite or a packed code is outside its alphabet.
pub const IOTCOMPRESS_ERR_BAD_VALUE: IotcompressStatus = 11;
/// The CRC-32C does not match: the bytes were corrupted.
pub const IOTCOMPRESS_ERR_CHECKSUM_MISMATCH: IotcompressStatus = 12;
/// The message is for a tensor of another size than the output buffer.
pub const IOTCOMPRESS_ERR_NUMEL_MISMATCH: IotcompressStatus = 13;
/// The message announces more elements than the caller allows.
pub const IOTCOMPRESS_ERR_TOO_LARGE: IotcompressStatus = 14;
/// An output buffer is smaller than needed (see `iotcompress_sizes`).
pub const IOTCOMPRESS_ERR_BUFFER_TOO_SMALL: IotcompressStatus = 15;
/// The scratch buffer is smaller than `scratch_len` of `iotcompress_sizes`.
pub const IOTCOMPRESS_ERR_SCRATCH_TOO_SMALL: IotcompressStatus = 16;
/// A gradient or state buffer does not have the length the compressor needs.
pub const IOTCOMPRESS_ERR_LENGTH_MISMATCH: IotcompressStatus = 17;
/// The gradient contains NaN or infinity; the state was left unchanged.
pub const IOTCOMPRESS_ERR_NON_FINITE_GRADIENT: IotcompressStatus = 18;
/// Accumulating the gradient overflowed float32; the residual now holds infinities.
pub const IOTCOMPRESS_ERR_OVERFLOW: IotcompressStatus = 19;
/// An option is out of range or an enum value is unknown.
pub const IOTCOMPRESS_ERR_INVALID_CONFIG: IotcompressStatus = 20;
/// A streamed message was finished before all `numel` elements were fed.
pub const IOTCOMPRESS_ERR_INCOMPLETE: IotcompressStatus = 21;
/// A streamed message was fed or finished after it was finished (or before any begin).
pub const IOTCOMPRESS_ERR_STREAM_CLOSED: IotcompressStatus = 22;
/// A required pointer is NULL (or NULL with a non-zero length).
pub const IOTCOMPRESS_ERR_NULL_POINTER: IotcompressStatus = 100;
/// A pointer is not aligned for its element type.
pub const IOTCOMPRESS_ERR_MISALIGNED: IotcompressStatus = 101;
/// Two buffers overlap where one of them is written.
pub const IOTCOMPRESS_ERR_OVERLAP: IotcompressStatus = 102;
/// The compressor state was not set up by `iotcompress_init` (or was overwritten).
pub const IOTCOMPRESS_ERR_BAD_STATE: IotcompressStatus = 103;
/// An error this version of the C layer has no code for (a newer core); report it.
pub const IOTCOMPRESS_ERR_UNKNOWN: IotcompressStatus = 127;

/// The status codes inside this crate (the `IOTCOMPRESS_*` constants are their values).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok = IOTCOMPRESS_OK,
    ErrTruncated = IOTCOMPRESS_ERR_TRUNCATED,
    ErrTrailingBytes = IOTCOMPRESS_ERR_TRAILING_BYTES,
    ErrBadMagic = IOTCOMPRESS_ERR_BAD_MAGIC,
    ErrUnsupportedVersion = IOTCOMPRESS_ERR_UNSUPPORTED_VERSION,
    ErrUnknownCodec = IOTCOMPRESS_ERR_UNKNOWN_CODEC,
    ErrBadVarint = IOTCOMPRESS_ERR_BAD_VARINT,
    ErrBadEntryCount = IOTCOMPRESS_ERR_BAD_ENTRY_COUNT,
    ErrIndexOutOfRange = IOTCOMPRESS_ERR_INDEX_OUT_OF_RANGE,
    ErrNonZeroPadding = IOTCOMPRESS_ERR_NON_ZERO_PADDING,
    ErrBadScale = IOTCOMPRESS_ERR_BAD_SCALE,
    ErrBadValue = IOTCOMPRESS_ERR_BAD_VALUE,
    ErrChecksumMismatch = IOTCOMPRESS_ERR_CHECKSUM_MISMATCH,
    ErrNumelMismatch = IOTCOMPRESS_ERR_NUMEL_MISMATCH,
    ErrTooLarge = IOTCOMPRESS_ERR_TOO_LARGE,
    ErrBufferTooSmall = IOTCOMPRESS_ERR_BUFFER_TOO_SMALL,
    ErrScratchTooSmall = IOTCOMPRESS_ERR_SCRATCH_TOO_SMALL,
    ErrLengthMismatch = IOTCOMPRESS_ERR_LENGTH_MISMATCH,
    ErrNonFiniteGradient = IOTCOMPRESS_ERR_NON_FINITE_GRADIENT,
    ErrOverflow = IOTCOMPRESS_ERR_OVERFLOW,
    ErrInvalidConfig = IOTCOMPRESS_ERR_INVALID_CONFIG,
    ErrIncomplete = IOTCOMPRESS_ERR_INCOMPLETE,
    ErrStreamClosed = IOTCOMPRESS_ERR_STREAM_CLOSED,
    ErrNullPointer = IOTCOMPRESS_ERR_NULL_POINTER,
    ErrMisaligned = IOTCOMPRESS_ERR_MISALIGNED,
    ErrOverlap = IOTCOMPRESS_ERR_OVERLAP,
    ErrBadState = IOTCOMPRESS_ERR_BAD_STATE,
    ErrUnknown = IOTCOMPRESS_ERR_UNKNOWN,
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Truncated => Status::ErrTruncated,
            Error::TrailingBytes => Status::ErrTrailingBytes,
            Error::BadMagic => Status::ErrBadMagic,
            Error::UnsupportedVersion => Status::ErrUnsupportedVersion,
            Error::UnknownCodec => Status::ErrUnknownCodec,
            Error::BadVarint => Status::ErrBadVarint,
            Error::BadEntryCount => Status::ErrBadEntryCount,
            Error::IndexOutOfRange => Status::ErrIndexOutOfRange,
            Error::NonZeroPadding => Status::ErrNonZeroPadding,
            Error::BadScale => Status::ErrBadScale,
            Error::BadValue => Status::ErrBadValue,
            Error::ChecksumMismatch => Status::ErrChecksumMismatch,
            Error::NumelMismatch => Status::ErrNumelMismatch,
            Error::TooLarge => Status::ErrTooLarge,
            Error::BufferTooSmall => Status::ErrBufferTooSmall,
            Error::ScratchTooSmall => Status::ErrScratchTooSmall,
            Error::LengthMismatch => Status::ErrLengthMismatch,
            Error::NonFiniteGradient => Status::ErrNonFiniteGradient,
            Error::Overflow => Status::ErrOverflow,
            Error::InvalidConfig => Status::ErrInvalidConfig,
            Error::Incomplete => Status::ErrIncomplete,
            Error::StreamClosed => Status::ErrStreamClosed,
            _ => Status::ErrUnknown,
        }
    }
}

/// Name and message of each code, NUL-terminated for C.
const STATUS_TEXT: [(Status, &CStr, &CStr); 27] = [
    (Status::Ok, c"IOTCOMPRESS_OK", c"success"),
    (
        Status::ErrTruncated,
        c"IOTCOMPRESS_ERR_TRUNCATED",
        c"message is truncated",
    ),
    (
        Status::ErrTrailingBytes,
        c"IOTCOMPRESS_ERR_TRAILING_BYTES",
        c"message has trailing bytes",
    ),
    (
        Status::ErrBadMagic,
        c"IOTCOMPRESS_ERR_BAD_MAGIC",
        c"not an iotcompress message (bad magic)",
    ),
    (
        Status::ErrUnsupportedVersion,
        c"IOTCOMPRESS_ERR_UNSUPPORTED_VERSION",
        c"unsupported wire format version",
    ),
    (
        Status::ErrUnknownCodec,
        c"IOTCOMPRESS_ERR_UNKNOWN_CODEC",
        c"unknown quantiser or index coding, or reserved codec bits set",
    ),
    (
        Status::ErrBadVarint,
        c"IOTCOMPRESS_ERR_BAD_VARINT",
        c"malformed varint in header",
    ),
    (
        Status::ErrBadEntryCount,
        c"IOTCOMPRESS_ERR_BAD_ENTRY_COUNT",
        c"entry count is inconsistent with the element count or index block",
    ),
    (
        Status::ErrIndexOutOfRange,
        c"IOTCOMPRESS_ERR_INDEX_OUT_OF_RANGE",
        c"an index points past the end of the tensor",
    ),
    (
        Status::ErrNonZeroPadding,
        c"IOTCOMPRESS_ERR_NON_ZERO_PADDING",
        c"padding bits are not zero",
    ),
    (
        Status::ErrBadScale,
        c"IOTCOMPRESS_ERR_BAD_SCALE",
        c"scale is negative or not finite, or QSGD levels are zero",
    ),
    (
        Status::ErrBadValue,
        c"IOTCOMPRESS_ERR_BAD_VALUE",
        c"a value is not finite or a code is outside its alphabet",
    ),
    (
        Status::ErrChecksumMismatch,
        c"IOTCOMPRESS_ERR_CHECKSUM_MISMATCH",
        c"checksum mismatch: the message was corrupted",
    ),
    (
        Status::ErrNumelMismatch,
        c"IOTCOMPRESS_ERR_NUMEL_MISMATCH",
        c"message element count differs from the expected one",
    ),
    (
        Status::ErrTooLarge,
        c"IOTCOMPRESS_ERR_TOO_LARGE",
        c"message element count exceeds the allowed maximum",
    ),
    (
        Status::ErrBufferTooSmall,
        c"IOTCOMPRESS_ERR_BUFFER_TOO_SMALL",
        c"output buffer is too small",
    ),
    (
        Status::ErrScratchTooSmall,
        c"IOTCOMPRESS_ERR_SCRATCH_TOO_SMALL",
        c"scratch buffer is too small",
    ),
    (
        Status::ErrLengthMismatch,
        c"IOTCOMPRESS_ERR_LENGTH_MISMATCH",
        c"buffer length differs from what the compressor needs",
    ),
    (
        Status::ErrNonFiniteGradient,
        c"IOTCOMPRESS_ERR_NON_FINITE_GRADIENT",
        c"gradient contains NaN or infinity (state left unchanged)",
    ),
    (
        Status::ErrOverflow,
        c"IOTCOMPRESS_ERR_OVERFLOW",
        c"accumulated gradient overflowed float32",
    ),
    (
        Status::ErrInvalidConfig,
        c"IOTCOMPRESS_ERR_INVALID_CONFIG",
        c"invalid compressor configuration",
    ),
    (
        Status::ErrIncomplete,
        c"IOTCOMPRESS_ERR_INCOMPLETE",
        c"streamed message finished before all elements were fed",
    ),
    (
        Status::ErrStreamClosed,
        c"IOTCOMPRESS_ERR_STREAM_CLOSED",
        c"streamed message already finished (or not begun)",
    ),
    (
        Status::ErrNullPointer,
        c"IOTCOMPRESS_ERR_NULL_POINTER",
        c"a required pointer is NULL",
    ),
    (
        Status::ErrMisaligned,
        c"IOTCOMPRESS_ERR_MISALIGNED",
        c"a pointer is not aligned for its element type",
    ),
    (
        Status::ErrOverlap,
        c"IOTCOMPRESS_ERR_OVERLAP",
        c"two buffers overlap where one of them is written",
    ),
    (
        Status::ErrBadState,
        c"IOTCOMPRESS_ERR_BAD_STATE",
        c"compressor state is not initialised (iotcompress_init)",
    ),
];

const UNKNOWN_TEXT: (&CStr, &CStr) = (c"IOTCOMPRESS_ERR_UNKNOWN", c"unknown error code");

fn status_text(code: i32) -> (&'static CStr, &'static CStr) {
    STATUS_TEXT
        .iter()
        .find(|(s, _, _)| *s as i32 == code)
        .map_or(UNKNOWN_TEXT, |&(_, name, message)| (name, message))
}

// --- enum values of the configuration ------------------------------------------------------

/// Selection rule of `IotcompressConfig.selection`.
pub type IotcompressSelection = u32;
/// Send every element.
pub const IOTCOMPRESS_SELECT_DENSE: IotcompressSelection = 0;
/// Send `|v| >= threshold` (field `threshold`).
pub const IOTCOMPRESS_SELECT_THRESHOLD: IotcompressSelection = 1;
/// Send the `ceil(density * numel)` largest magnitudes (fields `density`, `exact`).
pub const IOTCOMPRESS_SELECT_TOPK: IotcompressSelection = 2;
/// Threshold adapted step to step towards a density (field `density`).
pub const IOTCOMPRESS_SELECT_ADAPTIVE_DENSITY: IotcompressSelection = 3;
/// Threshold adapted step to step towards a message size (field `target_bytes`), which no
/// message exceeds (the largest entries that fit are sent, the rest stays in the residual).
pub const IOTCOMPRESS_SELECT_ADAPTIVE_BYTES: IotcompressSelection = 4;

/// Value quantiser of `IotcompressConfig.quant` and `IotcompressHeader.quant`; the
/// values are the wire ids (`docs/wire-format.md`).
pub type IotcompressQuant = u32;
/// float32 values.
pub const IOTCOMPRESS_QUANT_F32: IotcompressQuant = 0;
/// IEEE half precision.
pub const IOTCOMPRESS_QUANT_F16: IotcompressQuant = 1;
/// bfloat16.
pub const IOTCOMPRESS_QUANT_BF16: IotcompressQuant = 2;
/// 8-bit integers and one scale per message.
pub const IOTCOMPRESS_QUANT_INT8: IotcompressQuant = 3;
/// 4-bit integers and one scale per message.
pub const IOTCOMPRESS_QUANT_INT4: IotcompressQuant = 4;
/// One sign bit per value and one magnitude per message.
pub const IOTCOMPRESS_QUANT_SIGN: IotcompressQuant = 5;
/// Stochastic ternary (TernGrad).
pub const IOTCOMPRESS_QUANT_TERNARY: IotcompressQuant = 6;
/// Stochastic QSGD with `qsgd_levels` levels (1..=255).
pub const IOTCOMPRESS_QUANT_QSGD: IotcompressQuant = 7;

/// Momentum correction of `IotcompressConfig.momentum_kind`.
pub type IotcompressMomentum = u32;
/// Plain error feedback.
pub const IOTCOMPRESS_MOMENTUM_NONE: IotcompressMomentum = 0;
/// DGC momentum correction with factor `momentum`.
pub const IOTCOMPRESS_MOMENTUM_VANILLA: IotcompressMomentum = 1;
/// DGC Nesterov momentum correction with factor `momentum`.
pub const IOTCOMPRESS_MOMENTUM_NESTEROV: IotcompressMomentum = 2;

/// Element type of the residual and velocity (`IotcompressStreamConfig.state_format`;
/// `IotcompressConfig.state_format` of the batch compressor accepts only
/// `IOTCOMPRESS_STATE_F32`). See `IOTCOMPRESS_STREAM_STATE_LEN` for the sizes.
pub type IotcompressStateFormat = u32;
/// float32 residual and velocity (exact).
pub const IOTCOMPRESS_STATE_F32: IotcompressStateFormat = 0;
/// IEEE half precision (2 bytes an element; saturates beyond +-65504).
pub const IOTCOMPRESS_STATE_F16: IotcompressStateFormat = 1;
/// bfloat16 (2 bytes an element).
pub const IOTCOMPRESS_STATE_BF16: IotcompressStateFormat = 2;
/// int8 codes with one float scale per block of `IOTCOMPRESS_STATE_BLOCK` elements
/// (1 + 4/32 bytes an element).
pub const IOTCOMPRESS_STATE_INT8: IotcompressStateFormat = 3;
/// Elements per scale block of `IOTCOMPRESS_STATE_INT8`.
pub const IOTCOMPRESS_STATE_BLOCK: usize = 32;
const _: () = assert!(IOTCOMPRESS_STATE_BLOCK == StateFormat::BLOCK);

/// Index coding of `IotcompressHeader.index_coding` (wire ids).
pub type IotcompressIndexCoding = u32;
/// Every element is sent: no index block.
pub const IOTCOMPRESS_INDEX_DENSE: IotcompressIndexCoding = 0;
/// One bit per element.
pub const IOTCOMPRESS_INDEX_BITMAP: IotcompressIndexCoding = 1;
/// Golomb-Rice coded gaps with parameter `rice_k`.
pub const IOTCOMPRESS_INDEX_RICE: IotcompressIndexCoding = 2;

/// The wire format version this library writes and reads.
pub const IOTCOMPRESS_WIRE_VERSION: u32 = 1;
const _: () = assert!(IOTCOMPRESS_WIRE_VERSION == iotcompress_core::wire::VERSION as u32);
/// Value of `IotcompressCompressor.magic` after `iotcompress_init` ("ICS1").
pub const IOTCOMPRESS_STATE_MAGIC: u32 = 0x4943_5331;
/// Value of `IotcompressStream.magic` after `iotcompress_stream_init` ("ICT1").
pub const IOTCOMPRESS_STREAM_MAGIC: u32 = 0x4943_5431;

// --- structs -----------------------------------------------------------------------------

/// Everything that shapes a message. Start from `iotcompress_config_default`, then set
/// the fields the selection and quantiser use; the others are ignored.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IotcompressConfig {
    /// Fraction of elements to send, in (0, 1]: `IOTCOMPRESS_SELECT_TOPK` and
    /// `IOTCOMPRESS_SELECT_ADAPTIVE_DENSITY`.
    pub density: f64,
    /// Seed of the sampling and stochastic-rounding streams.
    pub seed: u64,
    /// One of `IOTCOMPRESS_SELECT_*`.
    pub selection: IotcompressSelection,
    /// Threshold `Wt >= 0`: `IOTCOMPRESS_SELECT_THRESHOLD`.
    pub threshold: f32,
    /// Message size to aim at and never exceed, > 0: `IOTCOMPRESS_SELECT_ADAPTIVE_BYTES`
    /// (e.g. `iotcompress_network_budget_bytes`).
    pub target_bytes: u32,
    /// Non-zero: exact top-k over all magnitudes; zero: DGC's sampled estimate.
    pub exact: u32,
    /// One of `IOTCOMPRESS_QUANT_*`.
    pub quant: IotcompressQuant,
    /// QSGD level count, 1..=255 (`IOTCOMPRESS_QUANT_QSGD` only).
    pub qsgd_levels: u32,
    /// One of `IOTCOMPRESS_MOMENTUM_*`.
    pub momentum_kind: IotcompressMomentum,
    /// Momentum factor in [0, 1) (ignored with `IOTCOMPRESS_MOMENTUM_NONE`).
    pub momentum: f32,
    /// `IOTCOMPRESS_STATE_F32` (compact formats are for the streaming compressor; others
    /// are rejected here).
    pub state_format: IotcompressStateFormat,
    /// Must be 0.
    pub reserved: u32,
}

/// The compressor: configuration and counters, no tensors. Set up by `iotcompress_init`;
/// every call validates it, so the fields may be changed between steps (a new threshold,
/// a warm-up schedule) and a checkpoint is a copy of the struct plus the residual and
/// velocity buffers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IotcompressCompressor {
    /// The configuration (re-validated on every call).
    pub config: IotcompressConfig,
    /// Messages produced so far: it seeds each message's random streams.
    pub step: u64,
    /// `IOTCOMPRESS_STATE_MAGIC` once initialised.
    pub magic: u32,
    /// Elements per gradient.
    pub numel: u32,
    /// Adaptive selections: the current threshold (0 before the first step).
    pub adaptive_threshold: f32,
    /// Adaptive selections: measured bits per sent entry of the last message.
    pub adaptive_bits_per_entry: f32,
    /// An upper bound on every |residual| and |velocity| entry, kept by the compressor so
    /// that it can rule out an overflow before it writes anything (0 after
    /// `iotcompress_init`). After writing the residual or velocity yourself (other than
    /// restoring a checkpoint together with this struct), set it to `INFINITY`: the next
    /// step then measures the state.
    pub state_bound: f32,
}

/// How large the caller's buffers must be for a configuration and element count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotcompressSizes {
    /// `sizeof(IotcompressCompressor)` as this library was built.
    pub state_size: usize,
    /// Residual elements (`float`): `numel`.
    pub residual_len: usize,
    /// Velocity elements (`float`): `numel` with momentum, 0 without.
    pub velocity_len: usize,
    /// Scratch words (`uint32_t`), never more than `numel`.
    pub scratch_len: usize,
    /// The largest message this configuration can produce: size the output buffer with it.
    pub max_message_len: usize,
}

/// The caller-owned tensors of one compressor. A pointer may be NULL only when its length
/// is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IotcompressBuffers {
    /// Error-feedback residual, `residual_len` floats, zeros before the first step.
    pub residual: *mut f32,
    /// Elements of `residual`.
    pub residual_len: usize,
    /// Momentum velocity, `velocity_len` floats, zeros before the first step (NULL
    /// without momentum).
    pub velocity: *mut f32,
    /// Elements of `velocity`.
    pub velocity_len: usize,
    /// Working space; its contents do not matter between calls.
    pub scratch: *mut u32,
    /// Elements of `scratch`.
    pub scratch_len: usize,
}

/// What one call of `iotcompress_compress` produced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotcompressStepInfo {
    /// Bytes of the message, written at the start of the output buffer.
    pub bytes: usize,
    /// Entries sent.
    pub nnz: usize,
}

/// The header of a verified message (`iotcompress_parse`, `iotcompress_decode_add`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IotcompressHeader {
    /// Elements of the dense tensor.
    pub numel: u32,
    /// Entries sent.
    pub nnz: u32,
    /// One of `IOTCOMPRESS_QUANT_*`.
    pub quant: IotcompressQuant,
    /// QSGD level count (0 for the other quantisers).
    pub qsgd_levels: u32,
    /// One of `IOTCOMPRESS_INDEX_*`.
    pub index_coding: IotcompressIndexCoding,
    /// Golomb-Rice parameter (0 unless `IOTCOMPRESS_INDEX_RICE`).
    pub rice_k: u32,
    /// The message scale (0 for f32/f16/bf16).
    pub scale: f32,
    /// Random stream of the stochastic quantisers (0 for the others).
    pub stream: u32,
    /// Bytes of the header.
    pub header_len: usize,
    /// Bytes of the index block.
    pub index_len: usize,
    /// Bytes of the value block.
    pub values_len: usize,
    /// Bytes of the whole message, checksum included.
    pub message_len: usize,
}

/// Configuration of a streaming compressor (`iotcompress_stream_*`): threshold selection over
/// a gradient fed in chunks. Start from `iotcompress_stream_config_default`, then set `numel`
/// and `threshold` (and what else you need).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IotcompressStreamConfig {
    /// Elements of the whole gradient.
    pub numel: u32,
    /// Threshold `Wt` (finite, > 0): fixed, or the adaptive controller's starting point.
    pub threshold: f32,
    /// Adaptive threshold aiming at this many selected entries per message (0: not).
    pub target_count: u32,
    /// Adaptive threshold aiming at messages of about this many bytes (0: not). At most one
    /// of `target_count` and `target_bytes` may be non-zero; both zero: `Wt` stays fixed.
    pub target_bytes: u32,
    /// `IOTCOMPRESS_QUANT_F32`, `_F16`, `_BF16`, `_INT8` or `_INT4`.
    pub quant: IotcompressQuant,
    /// One of `IOTCOMPRESS_MOMENTUM_*`.
    pub momentum_kind: IotcompressMomentum,
    /// Momentum factor in [0, 1) (ignored with `IOTCOMPRESS_MOMENTUM_NONE`).
    pub momentum: f32,
    /// One of `IOTCOMPRESS_STATE_*`: how the residual (and velocity) are stored.
    pub state_format: IotcompressStateFormat,
}

/// How large the caller's buffers must be for a streaming configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotcompressStreamSizes {
    /// `sizeof(IotcompressStream)` as this library was built.
    pub stream_size: usize,
    /// Bytes of the state buffer (residual, then velocity with momentum); zero it before the
    /// first message. Equals `IOTCOMPRESS_STREAM_STATE_LEN`.
    pub state_len: usize,
    /// The smallest output buffer (header and checksum only: every entry held back).
    pub min_message_len: usize,
    /// The recommended output buffer (`IOTCOMPRESS_MAX_MESSAGE_LEN`): nothing is held back
    /// unless far more entries than expected cross the threshold.
    pub full_message_len: usize,
    /// Bytes reserved for the header at the start of the output while streaming.
    pub header_reserve: usize,
}

/// The caller-owned buffers of a streaming compressor: pass the same ones to begin, every
/// feed and finish of a message.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IotcompressStreamBuffers {
    /// The residual (and velocity) in the configured format, `state_len` bytes.
    pub state: *mut u8,
    /// Bytes of `state`.
    pub state_len: usize,
    /// The output buffer: the message is written here as the chunks arrive.
    pub out: *mut u8,
    /// Bytes of `out` (at least `min_message_len`).
    pub out_cap: usize,
}

/// A message in progress (inside `IotcompressStream`): plain numbers; change nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IotcompressStreamMessage {
    /// Address of the state buffer given to begin (compared, never dereferenced).
    pub state_addr: usize,
    /// Address of the output buffer given to begin (compared, never dereferenced).
    pub out_addr: usize,
    /// Bytes of the output buffer given to begin.
    pub out_len: usize,
    /// Elements of the gradient.
    pub numel: u32,
    /// Elements fed so far.
    pub fed: u32,
    /// Entries with `|v| >= Wt` so far.
    pub selected: u32,
    /// Entries sent so far.
    pub nnz: u32,
    /// The threshold of this message.
    pub threshold: f32,
    /// The value scale (int8/int4) of this message.
    pub scale: f32,
    /// The adaptive target count of this message (0 when fixed).
    pub target: u32,
    /// The Rice parameter of this message.
    pub rice_k: u32,
    /// Position after the last entry sent.
    pub next: u32,
    /// Whole bytes of the index block so far.
    pub index_bytes: u32,
    /// Index bits not yet a whole byte.
    pub index_pending: u32,
    /// Number of bits in `index_pending`.
    pub index_pending_bits: u32,
    /// Bytes of the value block so far.
    pub value_bytes: u32,
    /// The largest `|v|` selected so far.
    pub max_selected: f32,
    /// Non-zero once finished (and before the first begin).
    pub closed: u32,
    /// Int8 state: the new residual of the current block.
    pub block: [f32; IOTCOMPRESS_STATE_BLOCK],
    /// Int8 state with momentum: the new velocity of the current block.
    pub block_velocity: [f32; IOTCOMPRESS_STATE_BLOCK],
}

/// A streaming compressor: configuration, the state kept between messages (adaptive
/// threshold, the previous message's largest value and count) and the message in progress.
/// Set up by `iotcompress_stream_init`; a plain struct (a checkpoint is a copy of it plus the
/// state buffer), re-validated on every call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IotcompressStream {
    /// The configuration (re-validated on every call).
    pub config: IotcompressStreamConfig,
    /// Messages finished so far.
    pub messages: u64,
    /// `IOTCOMPRESS_STREAM_MAGIC` once initialised.
    pub magic: u32,
    /// Adaptive threshold (0 before the first message: `config.threshold` is used).
    pub threshold: f32,
    /// Adaptive: measured bits per sent entry of the last message.
    pub bits_per_entry: f32,
    /// The largest `|v|` selected by the last message that selected any (the next int8/int4
    /// scale is `max(last_max, 2 Wt) / 127` (or `/ 7`)).
    pub last_max: f32,
    /// Entries selected by the last message (sets the next Rice parameter when fixed).
    pub last_selected: u32,
    /// Must be 0.
    pub reserved: u32,
    /// The message in progress.
    pub message: IotcompressStreamMessage,
}

/// What one streamed message contains.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IotcompressStreamInfo {
    /// Bytes of the message, at the start of the output buffer.
    pub bytes: usize,
    /// Entries sent.
    pub nnz: u32,
    /// Entries with `|v| >= Wt` (sent, or held back when the output buffer was full).
    pub selected: u32,
    /// The threshold `Wt` of this message.
    pub threshold: f32,
    /// The value scale of this message (int8/int4; 0 otherwise).
    pub scale: f32,
}

// --- conversions (no unsafe) ---------------------------------------------------------------

impl IotcompressConfig {
    /// Dense selection, f32 values, no momentum, seed 0.
    const DEFAULT: IotcompressConfig = IotcompressConfig {
        density: 0.0,
        seed: 0,
        selection: IOTCOMPRESS_SELECT_DENSE,
        threshold: 0.0,
        target_bytes: 0,
        exact: 0,
        quant: IOTCOMPRESS_QUANT_F32,
        qsgd_levels: 0,
        momentum_kind: IOTCOMPRESS_MOMENTUM_NONE,
        momentum: 0.0,
        state_format: IOTCOMPRESS_STATE_F32,
        reserved: 0,
    };

    /// The core configuration, or `ErrInvalidConfig`.
    fn core_config(&self) -> Result<Config, Status> {
        let selection = match self.selection {
            IOTCOMPRESS_SELECT_DENSE => Selection::Dense,
            IOTCOMPRESS_SELECT_THRESHOLD => Selection::Threshold(self.threshold),
            IOTCOMPRESS_SELECT_TOPK => Selection::TopK {
                density: self.density,
                exact: self.exact != 0,
            },
            IOTCOMPRESS_SELECT_ADAPTIVE_DENSITY => {
                Selection::Adaptive(Target::Density(self.density))
            }
            IOTCOMPRESS_SELECT_ADAPTIVE_BYTES => {
                Selection::Adaptive(Target::Bytes(self.target_bytes))
            }
            _ => return Err(Status::ErrInvalidConfig),
        };
        let quant = match self.quant {
            IOTCOMPRESS_QUANT_F32 => Quant::F32,
            IOTCOMPRESS_QUANT_F16 => Quant::F16,
            IOTCOMPRESS_QUANT_BF16 => Quant::Bf16,
            IOTCOMPRESS_QUANT_INT8 => Quant::Int8,
            IOTCOMPRESS_QUANT_INT4 => Quant::Int4,
            IOTCOMPRESS_QUANT_SIGN => Quant::Sign,
            IOTCOMPRESS_QUANT_TERNARY => Quant::Ternary,
            IOTCOMPRESS_QUANT_QSGD => match u8::try_from(self.qsgd_levels) {
                Ok(levels) if levels > 0 => Quant::Qsgd { levels },
                _ => return Err(Status::ErrInvalidConfig),
            },
            _ => return Err(Status::ErrInvalidConfig),
        };
        let momentum = match self.momentum_kind {
            IOTCOMPRESS_MOMENTUM_NONE => Momentum::None,
            IOTCOMPRESS_MOMENTUM_VANILLA => Momentum::Vanilla(self.momentum),
            IOTCOMPRESS_MOMENTUM_NESTEROV => Momentum::Nesterov(self.momentum),
            _ => return Err(Status::ErrInvalidConfig),
        };
        if self.state_format != IOTCOMPRESS_STATE_F32 || self.reserved != 0 {
            return Err(Status::ErrInvalidConfig);
        }
        let config = Config {
            selection,
            quant,
            momentum,
            seed: self.seed,
        };
        config.validate()?;
        Ok(config)
    }
}

impl IotcompressCompressor {
    /// The core compressor with this state's counters. `Compressor` is configuration plus
    /// `step`, `controller` and `state_bound`, all carried here (a test in `tests/abi.rs`
    /// notices if the core's struct grows).
    fn core_compressor(&self) -> Result<Compressor, Status> {
        if self.magic != IOTCOMPRESS_STATE_MAGIC {
            return Err(Status::ErrBadState);
        }
        let mut c = Compressor::new(self.config.core_config()?, self.numel as usize)?;
        c.step = self.step;
        c.controller = ThresholdController {
            threshold: self.adaptive_threshold,
            bits_per_entry: self.adaptive_bits_per_entry,
        };
        c.state_bound = self.state_bound;
        Ok(c)
    }

    /// Writes the counters back after a step.
    fn store(&mut self, c: &Compressor) {
        self.step = c.step;
        self.adaptive_threshold = c.controller.threshold;
        self.adaptive_bits_per_entry = c.controller.bits_per_entry;
        self.state_bound = c.state_bound;
    }
}

fn sizes_of(c: &Compressor) -> IotcompressSizes {
    IotcompressSizes {
        state_size: size_of::<IotcompressCompressor>(),
        residual_len: c.numel(),
        velocity_len: c.velocity_len(),
        scratch_len: c.scratch_len(),
        max_message_len: c.max_message_len(),
    }
}

impl IotcompressStreamConfig {
    /// No elements, no threshold (set both), f32 values and state, no momentum, fixed `Wt`.
    const DEFAULT: IotcompressStreamConfig = IotcompressStreamConfig {
        numel: 0,
        threshold: 0.0,
        target_count: 0,
        target_bytes: 0,
        quant: IOTCOMPRESS_QUANT_F32,
        momentum_kind: IOTCOMPRESS_MOMENTUM_NONE,
        momentum: 0.0,
        state_format: IOTCOMPRESS_STATE_F32,
    };

    /// The core configuration, or `ErrInvalidConfig`.
    fn core_config(&self) -> Result<StreamConfig, Status> {
        let target = match (self.target_count, self.target_bytes) {
            (0, 0) => StreamTarget::Fixed,
            (c, 0) => StreamTarget::Count(c),
            (0, b) => StreamTarget::Bytes(b),
            _ => return Err(Status::ErrInvalidConfig),
        };
        let quant = match self.quant {
            IOTCOMPRESS_QUANT_F32 => Quant::F32,
            IOTCOMPRESS_QUANT_F16 => Quant::F16,
            IOTCOMPRESS_QUANT_BF16 => Quant::Bf16,
            IOTCOMPRESS_QUANT_INT8 => Quant::Int8,
            IOTCOMPRESS_QUANT_INT4 => Quant::Int4,
            _ => return Err(Status::ErrInvalidConfig),
        };
        let momentum = match self.momentum_kind {
            IOTCOMPRESS_MOMENTUM_NONE => Momentum::None,
            IOTCOMPRESS_MOMENTUM_VANILLA => Momentum::Vanilla(self.momentum),
            IOTCOMPRESS_MOMENTUM_NESTEROV => Momentum::Nesterov(self.momentum),
            _ => return Err(Status::ErrInvalidConfig),
        };
        let state = match self.state_format {
            IOTCOMPRESS_STATE_F32 => StateFormat::F32,
            IOTCOMPRESS_STATE_F16 => StateFormat::F16,
            IOTCOMPRESS_STATE_BF16 => StateFormat::Bf16,
            IOTCOMPRESS_STATE_INT8 => StateFormat::Int8,
            _ => return Err(Status::ErrInvalidConfig),
        };
        let config = StreamConfig {
            numel: self.numel as usize,
            threshold: self.threshold,
            target,
            quant,
            momentum,
            state,
        };
        config.validate()?;
        Ok(config)
    }
}

impl IotcompressStreamMessage {
    fn from_core(m: &StreamMessage, state_addr: usize, out_addr: usize) -> Self {
        IotcompressStreamMessage {
            state_addr,
            out_addr,
            out_len: m.out_len,
            numel: m.numel,
            fed: m.fed,
            selected: m.selected,
            nnz: m.nnz,
            threshold: m.threshold,
            scale: m.scale,
            target: m.target,
            rice_k: m.rice_k,
            next: m.next,
            index_bytes: m.index_bytes,
            index_pending: m.index_pending,
            index_pending_bits: m.index_pending_bits,
            value_bytes: m.value_bytes,
            max_selected: m.max_selected,
            closed: m.closed as u32,
            block: m.block,
            block_velocity: m.block_velocity,
        }
    }

    fn core(&self) -> StreamMessage {
        StreamMessage {
            numel: self.numel,
            out_len: self.out_len,
            fed: self.fed,
            selected: self.selected,
            nnz: self.nnz,
            threshold: self.threshold,
            scale: self.scale,
            target: self.target,
            rice_k: self.rice_k,
            next: self.next,
            index_bytes: self.index_bytes,
            index_pending: self.index_pending,
            index_pending_bits: self.index_pending_bits,
            value_bytes: self.value_bytes,
            max_selected: self.max_selected,
            closed: self.closed != 0,
            block: self.block,
            block_velocity: self.block_velocity,
        }
    }

    /// A message that cannot be fed: before the first begin.
    const CLOSED: IotcompressStreamMessage = IotcompressStreamMessage {
        state_addr: 0,
        out_addr: 0,
        out_len: 0,
        numel: 0,
        fed: 0,
        selected: 0,
        nnz: 0,
        threshold: 0.0,
        scale: 0.0,
        target: 0,
        rice_k: 0,
        next: 0,
        index_bytes: 0,
        index_pending: 0,
        index_pending_bits: 0,
        value_bytes: 0,
        max_selected: 0.0,
        closed: 1,
        block: [0.0; IOTCOMPRESS_STATE_BLOCK],
        block_velocity: [0.0; IOTCOMPRESS_STATE_BLOCK],
    };
}

impl IotcompressStream {
    /// The core compressor with this struct's history.
    fn core(&self) -> Result<StreamCompressor, Status> {
        if self.magic != IOTCOMPRESS_STREAM_MAGIC || self.reserved != 0 {
            return Err(Status::ErrBadState);
        }
        let mut c = StreamCompressor::new(self.config.core_config()?)?;
        c.controller = ThresholdController {
            threshold: self.threshold,
            bits_per_entry: self.bits_per_entry,
        };
        c.messages = self.messages;
        c.last_max = self.last_max;
        c.last_selected = self.last_selected;
        Ok(c)
    }

    /// Writes the history back after a message.
    fn store(&mut self, c: &StreamCompressor) {
        self.threshold = c.controller.threshold;
        self.bits_per_entry = c.controller.bits_per_entry;
        self.messages = c.messages;
        self.last_max = c.last_max;
        self.last_selected = c.last_selected;
    }
}

fn stream_sizes_of(c: &StreamConfig) -> IotcompressStreamSizes {
    IotcompressStreamSizes {
        stream_size: size_of::<IotcompressStream>(),
        state_len: c.state_len(),
        min_message_len: c.min_message_len(),
        full_message_len: c.full_message_len(),
        header_reserve: c.header_reserve(),
    }
}

fn header_of(h: &Header, len: usize, index_len: usize, values_len: usize) -> IotcompressHeader {
    IotcompressHeader {
        numel: h.numel,
        nnz: h.nnz,
        quant: h.quant.id() as u32,
        qsgd_levels: h.quant.levels() as u32,
        index_coding: h.index.id() as u32,
        rice_k: match h.index {
            IndexCoding::Rice { k } => k as u32,
            _ => 0,
        },
        scale: h.scale,
        stream: h.stream,
        header_len: h.encoded_len(),
        index_len,
        values_len,
        message_len: len,
    }
}

fn status(r: Result<(), Status>) -> IotcompressStatus {
    match r {
        Ok(()) => IOTCOMPRESS_OK,
        Err(s) => s as IotcompressStatus,
    }
}

// --- raw pointers: the only unsafe code of the project -------------------------------------

/// A byte range `[start, end)` of a buffer, for the overlap checks.
#[derive(Clone, Copy)]
struct Span(usize, usize);

impl Span {
    fn of<T>(ptr: *const T, len: usize) -> Span {
        let start = ptr as usize;
        Span(
            start,
            start.saturating_add(len.saturating_mul(size_of::<T>())),
        )
    }

    fn overlaps(self, other: Span) -> bool {
        self.0 < self.1 && other.0 < other.1 && self.0 < other.1 && other.0 < self.1
    }
}

/// Checks what can be checked of a (pointer, length) pair: NULL only when empty, alignment,
/// and a byte size that fits `isize`.
fn check_ptr<T>(ptr: *const T, len: usize) -> Result<(), Status> {
    if ptr.is_null() {
        return if len == 0 {
            Ok(())
        } else {
            Err(Status::ErrNullPointer)
        };
    }
    // `ptr.is_aligned()` and `is_multiple_of` are newer than Debian's rustc (1.85), which
    // builds this crate for Cortex-M.
    #[allow(clippy::manual_is_multiple_of)]
    if (ptr as usize) % align_of::<T>() != 0 {
        return Err(Status::ErrMisaligned);
    }
    if len > isize::MAX as usize / size_of::<T>().max(1) {
        return Err(Status::ErrLengthMismatch);
    }
    Ok(())
}

/// A shared slice from C.
///
/// # Safety
/// If `ptr` is not NULL and `len > 0`, `ptr` must point at `len` initialised elements that
/// nothing writes while the returned slice lives.
unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> Result<&'a [T], Status> {
    check_ptr(ptr, len)?;
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: `ptr` is non-null and aligned and `len * size_of::<T>() <= isize::MAX` (checked
    // above); that it points at `len` live, initialised elements not written meanwhile is
    // the caller's contract, stated on every public function.
    Ok(unsafe { core::slice::from_raw_parts(ptr, len) })
}

/// A mutable slice from C.
///
/// # Safety
/// If `ptr` is not NULL and `len > 0`, `ptr` must point at `len` initialised elements that
/// nothing else reads or writes while the returned slice lives.
unsafe fn slice_mut<'a, T>(ptr: *mut T, len: usize) -> Result<&'a mut [T], Status> {
    check_ptr(ptr, len)?;
    if len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `slice`; exclusivity towards the other buffers of the same call is
    // checked by the callers with `Span::overlaps`, exclusivity towards other threads is the
    // caller's contract.
    Ok(unsafe { core::slice::from_raw_parts_mut(ptr, len) })
}

/// A shared reference from C.
///
/// # Safety
/// If not NULL, `ptr` must point at a live `T` that nothing writes meanwhile.
unsafe fn reference<'a, T>(ptr: *const T) -> Result<&'a T, Status> {
    check_ptr(ptr, 1)?;
    // SAFETY: non-null and aligned (checked); every `T` used here is a `repr(C)` struct of
    // integers, floats and raw pointers, so any initialised bit pattern is a valid value.
    unsafe { ptr.as_ref() }.ok_or(Status::ErrNullPointer)
}

/// A mutable reference from C.
///
/// # Safety
/// If not NULL, `ptr` must point at a live `T` that nothing else accesses meanwhile.
unsafe fn reference_mut<'a, T>(ptr: *mut T) -> Result<&'a mut T, Status> {
    check_ptr(ptr, 1)?;
    // SAFETY: as in `reference`, plus exclusivity (caller's contract, and overlap checks
    // against the other arguments where they could coincide).
    unsafe { ptr.as_mut() }.ok_or(Status::ErrNullPointer)
}

/// Writes `value` through an optional out-pointer (NULL: nothing to do).
///
/// # Safety
/// If not NULL, `ptr` must be valid for a write of one `T`.
unsafe fn write_opt<T>(ptr: *mut T, value: T) -> Result<(), Status> {
    if ptr.is_null() {
        return Ok(());
    }
    check_ptr(ptr, 1)?;
    // SAFETY: non-null and aligned (checked), valid for writes (caller's contract); `T` is
    // `Copy` plain data, so overwriting without dropping the old value is fine.
    unsafe { ptr.write(value) };
    Ok(())
}

// --- the C functions -----------------------------------------------------------------------

/// Fills `*config` with the defaults: dense selection, f32 values, no momentum, seed 0,
/// float32 state.
///
/// Returns `IOTCOMPRESS_ERR_NULL_POINTER` if `config` is NULL.
///
/// # Safety
/// `config` must be NULL or point at writable memory for one `IotcompressConfig`.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_config_default(
    config: *mut IotcompressConfig,
) -> IotcompressStatus {
    if config.is_null() {
        return IOTCOMPRESS_ERR_NULL_POINTER;
    }
    // SAFETY: forwarded contract: `config` is writable for one `IotcompressConfig`.
    status(unsafe { write_opt(config, IotcompressConfig::DEFAULT) })
}

/// Reports the buffer sizes a compressor with `config` and `numel` elements needs (and
/// validates the configuration): the residual, velocity and scratch element counts, the
/// largest message and `sizeof(IotcompressCompressor)`.
///
/// Returns `IOTCOMPRESS_ERR_INVALID_CONFIG` for an out-of-range option or unknown enum value,
/// `IOTCOMPRESS_ERR_NULL_POINTER` if `config` or `sizes` is NULL.
///
/// # Safety
/// `config` must be NULL or point at a readable `IotcompressConfig`; `sizes` must be NULL or
/// point at writable memory for one `IotcompressSizes`.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_sizes(
    config: *const IotcompressConfig,
    numel: u32,
    sizes: *mut IotcompressSizes,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { sizes_impl(config, numel, sizes) })
}

/// The body of `iotcompress_sizes`.
///
/// # Safety
/// As for `iotcompress_sizes`.
unsafe fn sizes_impl(
    config: *const IotcompressConfig,
    numel: u32,
    sizes: *mut IotcompressSizes,
) -> Result<(), Status> {
    if sizes.is_null() {
        return Err(Status::ErrNullPointer);
    }
    // SAFETY: forwarded contract: `config` is NULL or readable.
    let config = unsafe { reference(config) }?;
    let c = Compressor::new(config.core_config()?, numel as usize)?;
    // SAFETY: forwarded contract: `sizes` is writable.
    unsafe { write_opt(sizes, sizes_of(&c)) }
}

/// `sizeof(IotcompressCompressor)` as the library was built: compare it with the
/// header's `sizeof` to catch a header/library mismatch.
#[no_mangle]
pub extern "C" fn iotcompress_state_size() -> usize {
    size_of::<IotcompressCompressor>()
}

/// Sets up `*state` for gradients of `numel` elements with `config` (copied), step 0.
/// The residual (and velocity) buffers must be zeroed by the caller before the first step.
///
/// Returns `IOTCOMPRESS_ERR_INVALID_CONFIG` for a bad configuration (then `*state` is left
/// as it was), `IOTCOMPRESS_ERR_NULL_POINTER` for a NULL argument.
///
/// # Safety
/// `state` must be NULL or point at writable memory for one `IotcompressCompressor`;
/// `config` must be NULL or point at a readable `IotcompressConfig`.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_init(
    state: *mut IotcompressCompressor,
    config: *const IotcompressConfig,
    numel: u32,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { init_impl(state, config, numel) })
}

/// The body of `iotcompress_init`.
///
/// # Safety
/// As for `iotcompress_init`.
unsafe fn init_impl(
    state: *mut IotcompressCompressor,
    config: *const IotcompressConfig,
    numel: u32,
) -> Result<(), Status> {
    if state.is_null() {
        return Err(Status::ErrNullPointer);
    }
    // SAFETY: forwarded contract: `config` is NULL or readable.
    let config = *unsafe { reference(config) }?;
    Compressor::new(config.core_config()?, numel as usize)?;
    let fresh = IotcompressCompressor {
        config,
        step: 0,
        magic: IOTCOMPRESS_STATE_MAGIC,
        numel,
        adaptive_threshold: 0.0,
        adaptive_bits_per_entry: 0.0,
        state_bound: 0.0,
    };
    // SAFETY: forwarded contract: `state` is writable.
    unsafe { write_opt(state, fresh) }
}

/// Compresses one gradient: accumulates `grad` into the residual (error feedback, with
/// momentum if configured), selects, quantises and writes one wire-format message at the
/// start of `out`; updates the residual, velocity and the counters in `*state`.
///
/// `grad_len` must equal the state's `numel`, `bufs` must have the lengths of
/// `iotcompress_sizes` (residual exactly `numel`, velocity and scratch at least their
/// counts), and `out_cap` must be at least `max_message_len`. On success `*info` (if not
/// NULL) receives the message length and entry count.
///
/// Errors: `IOTCOMPRESS_ERR_NON_FINITE_GRADIENT`, `IOTCOMPRESS_ERR_OVERFLOW` (the sum with
/// the state would overflow float32), `IOTCOMPRESS_ERR_LENGTH_MISMATCH`,
/// `IOTCOMPRESS_ERR_SCRATCH_TOO_SMALL`, `IOTCOMPRESS_ERR_BUFFER_TOO_SMALL`,
/// `IOTCOMPRESS_ERR_BAD_STATE`, `IOTCOMPRESS_ERR_INVALID_CONFIG` (a field of `state->config`
/// was changed to a bad value), `IOTCOMPRESS_ERR_NULL_POINTER`, `IOTCOMPRESS_ERR_MISALIGNED`,
/// `IOTCOMPRESS_ERR_OVERLAP`. All or nothing: on every error `*state`, the residual and the
/// velocity are exactly as they were (the scratch and `out` may have been written).
///
/// # Safety
/// Every non-NULL pointer must point at as many live elements as its length says (`state`,
/// `bufs` and `info` one struct each), and no other thread may access them during the call.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_compress(
    state: *mut IotcompressCompressor,
    bufs: *const IotcompressBuffers,
    grad: *const f32,
    grad_len: usize,
    out: *mut u8,
    out_cap: usize,
    info: *mut IotcompressStepInfo,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { compress_impl(state, bufs, grad, grad_len, out, out_cap, info) })
}

/// The body of `iotcompress_compress`.
///
/// # Safety
/// As for `iotcompress_compress`.
unsafe fn compress_impl(
    state: *mut IotcompressCompressor,
    bufs: *const IotcompressBuffers,
    grad: *const f32,
    grad_len: usize,
    out: *mut u8,
    out_cap: usize,
    info: *mut IotcompressStepInfo,
) -> Result<(), Status> {
    if state.is_null() || bufs.is_null() || grad.is_null() || out.is_null() {
        return Err(Status::ErrNullPointer);
    }
    // SAFETY: forwarded contract: `bufs` is readable.
    let b = *unsafe { reference(bufs) }?;
    let written = [
        Span::of(b.residual, b.residual_len),
        Span::of(b.velocity, b.velocity_len),
        Span::of(b.scratch, b.scratch_len),
        Span::of(out, out_cap),
        Span::of(state, 1),
        Span::of(info, usize::from(!info.is_null())),
    ];
    let read = [Span::of(grad, grad_len), Span::of(bufs, 1)];
    for (i, w) in written.iter().enumerate() {
        if written[i + 1..]
            .iter()
            .chain(read.iter())
            .any(|o| w.overlaps(*o))
        {
            return Err(Status::ErrOverlap);
        }
    }
    // The regions written were checked pairwise disjoint and disjoint from the ones read, so
    // the references below do not alias.
    // SAFETY: forwarded contract: `state` is writable for one struct.
    let st = unsafe { reference_mut(state) }?;
    // SAFETY: forwarded contract: `residual` holds `residual_len` floats.
    let residual = unsafe { slice_mut(b.residual, b.residual_len) }?;
    // SAFETY: forwarded contract: `velocity` holds `velocity_len` floats (or is empty).
    let velocity = unsafe { slice_mut(b.velocity, b.velocity_len) }?;
    // SAFETY: forwarded contract: `scratch` holds `scratch_len` words.
    let scratch = unsafe { slice_mut(b.scratch, b.scratch_len) }?;
    // SAFETY: forwarded contract: `grad` holds `grad_len` floats, not written meanwhile.
    let grad = unsafe { slice(grad, grad_len) }?;
    // SAFETY: forwarded contract: `out` holds `out_cap` writable bytes.
    let out = unsafe { slice_mut(out, out_cap) }?;
    let mut c = st.core_compressor()?;
    let bufs = Buffers {
        residual,
        velocity,
        scratch,
        spare: None,
    };
    let step = c.compress(bufs, grad, out)?;
    st.store(&c);
    let step = IotcompressStepInfo {
        bytes: step.bytes,
        nnz: step.nnz,
    };
    // SAFETY: forwarded contract: `info` is NULL or writable.
    unsafe { write_opt(info, step) }
}

/// Puts a message that could not be delivered back into the state: `residual += message`
/// (error feedback then sends its entries again later; nothing is lost). Exact up to one
/// float32 rounding per entry; the velocity's factor masking is not undone. All or nothing:
/// a message that does not verify (or is for another element count:
/// `IOTCOMPRESS_ERR_NUMEL_MISMATCH`, a residual of another length:
/// `IOTCOMPRESS_ERR_LENGTH_MISMATCH`) leaves `*state` and the residual unchanged. Sets
/// `state->state_bound` to `INFINITY` (the next step measures the state once).
///
/// # Safety
/// `state` must be NULL or point at one live `IotcompressCompressor`, `residual` at
/// `residual_len` writable floats, `msg` at `msg_len` readable bytes (NULL only with length
/// 0); no other thread may access them during the call.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_restore(
    state: *mut IotcompressCompressor,
    residual: *mut f32,
    residual_len: usize,
    msg: *const u8,
    msg_len: usize,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { restore_impl(state, residual, residual_len, msg, msg_len) })
}

/// The body of `iotcompress_restore`.
///
/// # Safety
/// As for `iotcompress_restore`.
unsafe fn restore_impl(
    state: *mut IotcompressCompressor,
    residual: *mut f32,
    residual_len: usize,
    msg: *const u8,
    msg_len: usize,
) -> Result<(), Status> {
    if state.is_null() || residual.is_null() {
        return Err(Status::ErrNullPointer);
    }
    let written = [Span::of(residual, residual_len), Span::of(state, 1)];
    let read = Span::of(msg, msg_len);
    if written[0].overlaps(written[1]) || written.iter().any(|w| w.overlaps(read)) {
        return Err(Status::ErrOverlap);
    }
    // SAFETY: forwarded contract: `state` is writable for one struct.
    let st = unsafe { reference_mut(state) }?;
    // SAFETY: forwarded contract: `residual` holds `residual_len` writable floats, disjoint
    // from the others (checked above).
    let residual = unsafe { slice_mut(residual, residual_len) }?;
    // SAFETY: forwarded contract: `msg` holds `msg_len` readable bytes.
    let msg = unsafe { slice(msg, msg_len) }?;
    let mut c = st.core_compressor()?;
    c.restore_message(residual, msg)?;
    st.store(&c);
    Ok(())
}

/// Adds `scale * value` of every entry of message `msg` into `out[index]` (a server summing
/// the devices' messages, or a device applying an update). All or nothing: the message is
/// verified completely (framing, checksum, every index and code) before `out` is touched, so
/// on error `out` is unchanged. `out_len` must equal the message's element count
/// (`IOTCOMPRESS_ERR_NUMEL_MISMATCH` otherwise). If `header` is not NULL it receives the
/// parsed header on success.
///
/// # Safety
/// `msg` must point at `msg_len` readable bytes and `out` at `out_len` writable floats (either
/// may be NULL only with length 0); `header` must be NULL or writable for one struct.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_decode_add(
    msg: *const u8,
    msg_len: usize,
    out: *mut f32,
    out_len: usize,
    scale: f32,
    header: *mut IotcompressHeader,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { decode_add_impl(msg, msg_len, out, out_len, scale, header) })
}

/// The body of `iotcompress_decode_add`.
///
/// # Safety
/// As for `iotcompress_decode_add`.
unsafe fn decode_add_impl(
    msg: *const u8,
    msg_len: usize,
    out: *mut f32,
    out_len: usize,
    scale: f32,
    header: *mut IotcompressHeader,
) -> Result<(), Status> {
    let read = Span::of(msg, msg_len);
    let written = Span::of(out, out_len);
    let header_span = Span::of(header, usize::from(!header.is_null()));
    if written.overlaps(read) || header_span.overlaps(read) || header_span.overlaps(written) {
        return Err(Status::ErrOverlap);
    }
    // SAFETY: forwarded contract: `msg` holds `msg_len` readable bytes.
    let msg = unsafe { slice(msg, msg_len) }?;
    // SAFETY: forwarded contract: `out` holds `out_len` writable floats, disjoint from `msg`
    // (checked above).
    let out = unsafe { slice_mut(out, out_len) }?;
    let m = decode_add(msg, out, scale)?;
    let h = header_of(&m.header, m.len, m.index_len(), m.values_len());
    // SAFETY: forwarded contract: `header` is NULL or writable.
    unsafe { write_opt(header, h) }
}

/// Verifies a message's framing, block sizes and checksum and fills `*header`, without
/// decoding the values (the index and value codes are checked by `iotcompress_decode_add`).
/// `max_numel` bounds the element count the caller can handle
/// (`IOTCOMPRESS_ERR_TOO_LARGE` beyond it).
///
/// # Safety
/// `msg` must point at `msg_len` readable bytes (NULL only with length 0); `header` must be
/// NULL or writable for one struct.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_parse(
    msg: *const u8,
    msg_len: usize,
    max_numel: u32,
    header: *mut IotcompressHeader,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { parse_impl(msg, msg_len, max_numel, header) })
}

/// The body of `iotcompress_parse`.
///
/// # Safety
/// As for `iotcompress_parse`.
unsafe fn parse_impl(
    msg: *const u8,
    msg_len: usize,
    max_numel: u32,
    header: *mut IotcompressHeader,
) -> Result<(), Status> {
    if header.is_null() {
        return Err(Status::ErrNullPointer);
    }
    if Span::of(header, 1).overlaps(Span::of(msg, msg_len)) {
        return Err(Status::ErrOverlap);
    }
    // SAFETY: forwarded contract: `msg` readable for `msg_len` bytes.
    let msg = unsafe { slice(msg, msg_len) }?;
    let m = parse(msg, max_numel as usize)?;
    let h = header_of(&m.header, m.len, m.index_len(), m.values_len());
    // SAFETY: forwarded contract: `header` is writable.
    unsafe { write_opt(header, h) }
}

/// The largest message for `numel` elements with quantiser `quant` (and `qsgd_levels` for
/// QSGD), whatever the selection; 0 for an unknown quantiser or a level count outside
/// 1..=255.
#[no_mangle]
pub extern "C" fn iotcompress_max_message_len(
    quant: IotcompressQuant,
    qsgd_levels: u32,
    numel: u32,
) -> usize {
    let config = IotcompressConfig {
        quant,
        qsgd_levels,
        ..IotcompressConfig::DEFAULT
    };
    match config.core_config() {
        Ok(c) => iotcompress_core::max_encoded_len(numel as usize, c.quant),
        Err(_) => 0,
    }
}

// --- links and budgets ------------------------------------------------------------------

/// A device's link (see `iotcompress_core::NetworkProfile`): `T_c = latency + bytes /
/// bandwidth`, in whole microseconds and bits per second.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotcompressNetwork {
    /// Round-trip latency of one exchange, in microseconds.
    pub latency_us: u64,
    /// Bandwidth in bits per second (0: no link; nothing fits).
    pub bandwidth_bps: u64,
}

impl From<IotcompressNetwork> for NetworkProfile {
    fn from(n: IotcompressNetwork) -> Self {
        NetworkProfile::new(n.latency_us, n.bandwidth_bps)
    }
}

/// A named link for `iotcompress_network_preset`.
pub type IotcompressNetworkPreset = u32;
/// 0.1 ms, 10 Gbit/s.
pub const IOTCOMPRESS_NETWORK_DATACENTER: IotcompressNetworkPreset = 0;
/// 15 ms, 20 Mbit/s.
pub const IOTCOMPRESS_NETWORK_HOME_WIFI: IotcompressNetworkPreset = 1;
/// 50 ms, 5 Mbit/s.
pub const IOTCOMPRESS_NETWORK_LTE: IotcompressNetworkPreset = 2;
/// 1 s, 5 kbit/s (a LoRa-class radio).
pub const IOTCOMPRESS_NETWORK_LORA: IotcompressNetworkPreset = 3;
/// 78 ms, 100 Mbit/s (Shanghai to Boston).
pub const IOTCOMPRESS_NETWORK_INTERCONTINENTAL: IotcompressNetworkPreset = 4;

/// The preset link `preset` (`IOTCOMPRESS_NETWORK_*`); an all-zero link (nothing fits) for
/// an unknown value.
#[no_mangle]
pub extern "C" fn iotcompress_network_preset(
    preset: IotcompressNetworkPreset,
) -> IotcompressNetwork {
    match NetworkProfile::PRESETS.get(preset as usize) {
        Some(&(_, p)) => IotcompressNetwork {
            latency_us: p.latency_us,
            bandwidth_bps: p.bandwidth_bps,
        },
        None => IotcompressNetwork::default(),
    }
}

/// `T_c` of one exchange of `bytes` on `network`, in microseconds (rounded up;
/// `UINT64_MAX` without bandwidth).
#[no_mangle]
pub extern "C" fn iotcompress_network_comm_time_us(network: IotcompressNetwork, bytes: u64) -> u64 {
    NetworkProfile::from(network).comm_time_us(bytes)
}

/// The most bytes one exchange on `network` carries within `budget_us` (at most
/// `UINT32_MAX`; 0 when the latency alone exceeds the budget). Use it as the streaming
/// config's `target_bytes` and as the output buffer's length (at least
/// `min_message_len`): the encoder never writes past the buffer, so every message's `T_c`
/// stays within the budget, and the adaptive threshold aims at that size.
#[no_mangle]
pub extern "C" fn iotcompress_network_budget_bytes(
    network: IotcompressNetwork,
    budget_us: u64,
) -> u32 {
    NetworkProfile::from(network)
        .bytes_within(budget_us)
        .min(u32::MAX as u64) as u32
}

// --- the streaming compressor --------------------------------------------------------------

/// Fills `*config` with the streaming defaults: no elements and no threshold (set `numel` and
/// `threshold`), f32 values, f32 state, no momentum, fixed threshold.
///
/// # Safety
/// `config` must be NULL or point at writable memory for one `IotcompressStreamConfig`.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_stream_config_default(
    config: *mut IotcompressStreamConfig,
) -> IotcompressStatus {
    if config.is_null() {
        return IOTCOMPRESS_ERR_NULL_POINTER;
    }
    // SAFETY: forwarded contract: `config` is writable for one struct.
    status(unsafe { write_opt(config, IotcompressStreamConfig::DEFAULT) })
}

/// Validates a streaming configuration and reports the sizes of the caller's buffers: the
/// state buffer (bytes), the smallest and the recommended output buffer, and
/// `sizeof(IotcompressStream)`.
///
/// # Safety
/// `config` must be NULL or point at a readable struct; `sizes` NULL or writable for one.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_stream_sizes(
    config: *const IotcompressStreamConfig,
    sizes: *mut IotcompressStreamSizes,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { stream_sizes_impl(config, sizes) })
}

/// The body of `iotcompress_stream_sizes`.
///
/// # Safety
/// As for `iotcompress_stream_sizes`.
unsafe fn stream_sizes_impl(
    config: *const IotcompressStreamConfig,
    sizes: *mut IotcompressStreamSizes,
) -> Result<(), Status> {
    if sizes.is_null() {
        return Err(Status::ErrNullPointer);
    }
    // SAFETY: forwarded contract: `config` is NULL or readable.
    let config = unsafe { reference(config) }?.core_config()?;
    // SAFETY: forwarded contract: `sizes` is writable.
    unsafe { write_opt(sizes, stream_sizes_of(&config)) }
}

/// Sets up `*stream` with `config` (copied): no message open, no history. Zero the state
/// buffer before the first message.
///
/// # Safety
/// `stream` must be NULL or writable for one `IotcompressStream`; `config` NULL or readable.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_stream_init(
    stream: *mut IotcompressStream,
    config: *const IotcompressStreamConfig,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { stream_init_impl(stream, config) })
}

/// The body of `iotcompress_stream_init`.
///
/// # Safety
/// As for `iotcompress_stream_init`.
unsafe fn stream_init_impl(
    stream: *mut IotcompressStream,
    config: *const IotcompressStreamConfig,
) -> Result<(), Status> {
    if stream.is_null() {
        return Err(Status::ErrNullPointer);
    }
    // SAFETY: forwarded contract: `config` is NULL or readable.
    let config = *unsafe { reference(config) }?;
    config.core_config()?;
    let fresh = IotcompressStream {
        config,
        messages: 0,
        magic: IOTCOMPRESS_STREAM_MAGIC,
        threshold: 0.0,
        bits_per_entry: 0.0,
        last_max: 0.0,
        last_selected: 0,
        reserved: 0,
        message: IotcompressStreamMessage::CLOSED,
    };
    // SAFETY: forwarded contract: `stream` is writable.
    unsafe { write_opt(stream, fresh) }
}

/// The stream struct and its buffers as Rust references, after the pointer and overlap
/// checks. `extra_read` is a further argument that is only read (the gradient).
///
/// # Safety
/// `stream` and `bufs` must be NULL or point at live structs; the buffers they describe must
/// hold as many bytes as their lengths say; nothing else may access them during the call.
unsafe fn stream_parts<'a>(
    stream: *mut IotcompressStream,
    bufs: *const IotcompressStreamBuffers,
    extra_read: Span,
    extra_written: Span,
) -> Result<(&'a mut IotcompressStream, &'a mut [u8], &'a mut [u8]), Status> {
    if stream.is_null() || bufs.is_null() {
        return Err(Status::ErrNullPointer);
    }
    // SAFETY: forwarded contract: `bufs` is readable.
    let b = *unsafe { reference(bufs) }?;
    if b.out.is_null() || b.state.is_null() && b.state_len > 0 {
        return Err(Status::ErrNullPointer);
    }
    let written = [
        Span::of(b.state, b.state_len),
        Span::of(b.out, b.out_cap),
        Span::of(stream, 1),
        extra_written,
    ];
    let read = [Span::of(bufs, 1), extra_read];
    for (i, w) in written.iter().enumerate() {
        if written[i + 1..]
            .iter()
            .chain(read.iter())
            .any(|o| w.overlaps(*o))
        {
            return Err(Status::ErrOverlap);
        }
    }
    // The written regions are pairwise disjoint and disjoint from the ones read.
    // SAFETY: forwarded contract: `stream` is writable for one struct.
    let st = unsafe { reference_mut(stream) }?;
    // SAFETY: forwarded contract: `state` holds `state_len` bytes.
    let state = unsafe { slice_mut(b.state, b.state_len) }?;
    // SAFETY: forwarded contract: `out` holds `out_cap` bytes.
    let out = unsafe { slice_mut(b.out, b.out_cap) }?;
    Ok((st, state, out))
}

/// Starts a message: fixes its threshold, Rice parameter and value scale and reserves the
/// header in `bufs->out`. Then feed the gradient in order with `iotcompress_stream_feed` and
/// end with `iotcompress_stream_finish`, with the same buffers (contents untouched between
/// the calls). A message that is open (begun, not finished) is never abandoned: begin
/// refuses it, and `iotcompress_stream_abort` closes it without losing anything.
///
/// Errors (nothing changed): `IOTCOMPRESS_ERR_LENGTH_MISMATCH` (`state_len` is not the
/// configured size), `IOTCOMPRESS_ERR_BUFFER_TOO_SMALL` (`out_cap` below `min_message_len`),
/// `IOTCOMPRESS_ERR_BAD_STATE` (a message is open, or the struct is not a stream),
/// `IOTCOMPRESS_ERR_INVALID_CONFIG`, and the pointer errors.
///
/// # Safety
/// `stream` and `bufs` must be NULL or point at live structs, and the buffers of `bufs` at
/// as many bytes as their lengths say; no other thread may access them during the call.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_stream_begin(
    stream: *mut IotcompressStream,
    bufs: *const IotcompressStreamBuffers,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { stream_begin_impl(stream, bufs) })
}

/// The body of `iotcompress_stream_begin`.
///
/// # Safety
/// As for `iotcompress_stream_begin`.
unsafe fn stream_begin_impl(
    stream: *mut IotcompressStream,
    bufs: *const IotcompressStreamBuffers,
) -> Result<(), Status> {
    let none = Span(0, 0);
    // SAFETY: forwarded contract.
    let (st, state, out) = unsafe { stream_parts(stream, bufs, none, none) }?;
    let c = st.core()?;
    if st.message.closed == 0 {
        // Its fed chunks have taken entries out of the residual: starting over would lose them.
        return Err(Status::ErrBadState);
    }
    let m = c.begin(state, out)?;
    st.message =
        IotcompressStreamMessage::from_core(&m, state.as_ptr() as usize, out.as_ptr() as usize);
    Ok(())
}

/// Feeds the next `grad_len` elements of the gradient (any chunking gives the same message).
///
/// Errors leave the stream, the state and the output unchanged:
/// `IOTCOMPRESS_ERR_LENGTH_MISMATCH` (more elements than remain, or other buffers than at
/// begin), `IOTCOMPRESS_ERR_NON_FINITE_GRADIENT`, `IOTCOMPRESS_ERR_OVERFLOW`,
/// `IOTCOMPRESS_ERR_STREAM_CLOSED` (no message open), `IOTCOMPRESS_ERR_BAD_STATE`,
/// `IOTCOMPRESS_ERR_INVALID_CONFIG` (the struct was changed), and the pointer errors.
///
/// # Safety
/// As for `iotcompress_stream_begin`; `grad` must point at `grad_len` readable floats (NULL
/// only with length 0).
#[no_mangle]
pub unsafe extern "C" fn iotcompress_stream_feed(
    stream: *mut IotcompressStream,
    bufs: *const IotcompressStreamBuffers,
    grad: *const f32,
    grad_len: usize,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { stream_feed_impl(stream, bufs, grad, grad_len) })
}

/// The body of `iotcompress_stream_feed`.
///
/// # Safety
/// As for `iotcompress_stream_feed`.
unsafe fn stream_feed_impl(
    stream: *mut IotcompressStream,
    bufs: *const IotcompressStreamBuffers,
    grad: *const f32,
    grad_len: usize,
) -> Result<(), Status> {
    // SAFETY: forwarded contract.
    let (st, state, out) =
        unsafe { stream_parts(stream, bufs, Span::of(grad, grad_len), Span(0, 0)) }?;
    // SAFETY: forwarded contract: `grad` holds `grad_len` floats, disjoint from the written
    // buffers (checked in `stream_parts`).
    let grad = unsafe { slice(grad, grad_len) }?;
    let c = st.core()?;
    let mut m = open_message(st, state, out)?;
    m.feed(&c, state, out, grad)?;
    let (sa, oa) = (st.message.state_addr, st.message.out_addr);
    st.message = IotcompressStreamMessage::from_core(&m, sa, oa);
    Ok(())
}

/// The open message of `st`, if `state` and `out` are the buffers it began with.
fn open_message(st: &IotcompressStream, state: &[u8], out: &[u8]) -> Result<StreamMessage, Status> {
    let m = &st.message;
    if m.closed != 0 {
        return Err(Status::ErrStreamClosed);
    }
    if m.state_addr != state.as_ptr() as usize || m.out_addr != out.as_ptr() as usize {
        return Err(Status::ErrLengthMismatch);
    }
    Ok(m.core())
}

/// Completes the message: writes the header, moves the blocks next to it and appends the
/// checksum; the message is `bufs->out[0 .. info->bytes]`. Then updates the adaptive
/// threshold and the next message's scale. `*info` (if not NULL) receives the length and the
/// counts.
///
/// Errors (nothing changed): `IOTCOMPRESS_ERR_INCOMPLETE` (not every element was fed),
/// `IOTCOMPRESS_ERR_STREAM_CLOSED`, `IOTCOMPRESS_ERR_LENGTH_MISMATCH` (other buffers),
/// `IOTCOMPRESS_ERR_BAD_STATE`, `IOTCOMPRESS_ERR_INVALID_CONFIG`, the pointer errors.
///
/// # Safety
/// As for `iotcompress_stream_begin`; `info` must be NULL or writable for one struct.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_stream_finish(
    stream: *mut IotcompressStream,
    bufs: *const IotcompressStreamBuffers,
    info: *mut IotcompressStreamInfo,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { stream_finish_impl(stream, bufs, info) })
}

/// The body of `iotcompress_stream_finish`.
///
/// # Safety
/// As for `iotcompress_stream_finish`.
unsafe fn stream_finish_impl(
    stream: *mut IotcompressStream,
    bufs: *const IotcompressStreamBuffers,
    info: *mut IotcompressStreamInfo,
) -> Result<(), Status> {
    let info_span = Span::of(info, usize::from(!info.is_null()));
    // SAFETY: forwarded contract.
    let (st, state, out) = unsafe { stream_parts(stream, bufs, Span(0, 0), info_span) }?;
    let mut c = st.core()?;
    let mut m = open_message(st, state, out)?;
    let done = m.finish(&mut c, state, out)?;
    st.store(&c);
    let (sa, oa) = (st.message.state_addr, st.message.out_addr);
    st.message = IotcompressStreamMessage::from_core(&m, sa, oa);
    let done = IotcompressStreamInfo {
        bytes: done.bytes,
        nnz: done.nnz as u32,
        selected: done.selected as u32,
        threshold: done.threshold,
        scale: done.scale,
    };
    // SAFETY: forwarded contract: `info` is NULL or writable (and disjoint, checked).
    unsafe { write_opt(info, done) }
}

/// Closes the open message without sending it and without losing anything: the elements not
/// yet fed are fed as zeros, the message is finished into `bufs->out` and put back into the
/// state as `iotcompress_stream_restore` does. Afterwards the residual holds everything the
/// fed chunks carried (as if their gradient had only been accumulated, exact up to one f32
/// rounding per sent entry and the state format's rounding) and the counters are those after
/// one message. What a device does after a feed failed (a NaN chunk): abort, then begin the
/// next message.
///
/// Errors (nothing changed): `IOTCOMPRESS_ERR_STREAM_CLOSED` (no message open),
/// `IOTCOMPRESS_ERR_LENGTH_MISMATCH` (other buffers than at begin),
/// `IOTCOMPRESS_ERR_BAD_STATE`, `IOTCOMPRESS_ERR_INVALID_CONFIG`, the pointer errors.
///
/// # Safety
/// As for `iotcompress_stream_begin`.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_stream_abort(
    stream: *mut IotcompressStream,
    bufs: *const IotcompressStreamBuffers,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { stream_abort_impl(stream, bufs) })
}

/// The body of `iotcompress_stream_abort`.
///
/// # Safety
/// As for `iotcompress_stream_abort`.
unsafe fn stream_abort_impl(
    stream: *mut IotcompressStream,
    bufs: *const IotcompressStreamBuffers,
) -> Result<(), Status> {
    let none = Span(0, 0);
    // SAFETY: forwarded contract.
    let (st, state, out) = unsafe { stream_parts(stream, bufs, none, none) }?;
    let mut c = st.core()?;
    let mut m = open_message(st, state, out)?;
    // Every check that can fail is behind us: zeros are finite and cannot overflow, the
    // buffers are the message's own, and putting back what was just taken out is finite.
    let zeros = [0.0f32; 64];
    while m.fed() < c.config().numel {
        let k = (c.config().numel - m.fed()).min(zeros.len());
        m.feed(&c, state, out, &zeros[..k])?;
    }
    let done = m.finish(&mut c, state, out)?;
    c.restore_message(
        state,
        out.get(..done.bytes).ok_or(Status::ErrBufferTooSmall)?,
    )?;
    st.store(&c);
    let (sa, oa) = (st.message.state_addr, st.message.out_addr);
    st.message = IotcompressStreamMessage::from_core(&m, sa, oa);
    Ok(())
}

/// Puts a finished message that could not be delivered back into the state: `residual +=
/// message` for every entry (error feedback sends them again later; nothing is lost), stored
/// in the state format (int8 blocks holding an entry are requantised). Exact up to one
/// float32 rounding per entry and that format's rounding; the velocity's factor masking is
/// not undone; the counters do not move. O(entries), no gradient needed: the device only
/// keeps the message. All or nothing: a message that does not verify (or is for another
/// element count: `IOTCOMPRESS_ERR_LENGTH_MISMATCH`), a sum that is not finite
/// (`IOTCOMPRESS_ERR_OVERFLOW`), a message still open (`IOTCOMPRESS_ERR_BAD_STATE`: finish
/// it first) or a wrong `state_len` leave the stream and the state unchanged. `bufs->out` is
/// not touched (it may hold `msg`).
///
/// # Safety
/// `stream` and `bufs` must be NULL or point at live structs, `bufs->state` at `state_len`
/// writable bytes, `msg` at `msg_len` readable bytes (NULL only with length 0); no other
/// thread may access them during the call.
#[no_mangle]
pub unsafe extern "C" fn iotcompress_stream_restore(
    stream: *mut IotcompressStream,
    bufs: *const IotcompressStreamBuffers,
    msg: *const u8,
    msg_len: usize,
) -> IotcompressStatus {
    // SAFETY: forwarded contract.
    status(unsafe { stream_restore_impl(stream, bufs, msg, msg_len) })
}

/// The body of `iotcompress_stream_restore`.
///
/// # Safety
/// As for `iotcompress_stream_restore`.
unsafe fn stream_restore_impl(
    stream: *mut IotcompressStream,
    bufs: *const IotcompressStreamBuffers,
    msg: *const u8,
    msg_len: usize,
) -> Result<(), Status> {
    if stream.is_null() || bufs.is_null() {
        return Err(Status::ErrNullPointer);
    }
    // SAFETY: forwarded contract: `bufs` is readable.
    let b = *unsafe { reference(bufs) }?;
    if b.state.is_null() && b.state_len > 0 {
        return Err(Status::ErrNullPointer);
    }
    let written = Span::of(b.state, b.state_len);
    let read = [
        Span::of(msg, msg_len),
        Span::of(stream, 1),
        Span::of(bufs, 1),
    ];
    if read.iter().any(|r| written.overlaps(*r)) {
        return Err(Status::ErrOverlap);
    }
    // SAFETY: forwarded contract: `stream` is readable for one struct.
    let st = unsafe { reference(stream) }?;
    let c = st.core()?;
    if st.message.closed == 0 {
        return Err(Status::ErrBadState);
    }
    // SAFETY: forwarded contract: `state` holds `state_len` writable bytes, disjoint from
    // what is read (checked above).
    let state = unsafe { slice_mut(b.state, b.state_len) }?;
    // SAFETY: forwarded contract: `msg` holds `msg_len` readable bytes.
    let msg = unsafe { slice(msg, msg_len) }?;
    c.restore_message(state, msg)?;
    Ok(())
}

/// `sizeof(IotcompressStream)` as the library was built.
#[no_mangle]
pub extern "C" fn iotcompress_stream_size() -> usize {
    size_of::<IotcompressStream>()
}

/// The name of a status code, e.g. `"IOTCOMPRESS_ERR_CHECKSUM_MISMATCH"`; never NULL
/// (`"IOTCOMPRESS_ERR_UNKNOWN"` for a value that is not a code). Static storage.
#[no_mangle]
pub extern "C" fn iotcompress_error_name(code: i32) -> *const c_char {
    status_text(code).0.as_ptr()
}

/// A one-line English description of a status code; never NULL. Static storage.
#[no_mangle]
pub extern "C" fn iotcompress_error_message(code: i32) -> *const c_char {
    status_text(code).1.as_ptr()
}

#[cfg(all(feature = "panic-handler", not(feature = "std"), not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // The C layer checks every argument, and the core returns errors instead of panicking on
    // bad input: reaching this is a bug. Trap so that a debugger or the HardFault handler
    // sees it.
    #[cfg(target_arch = "arm")]
    // SAFETY: `udf` only raises an undefined-instruction fault; it touches no memory.
    unsafe {
        core::arch::asm!("udf #0", options(noreturn, nomem, nostack))
    }
    #[cfg(not(target_arch = "arm"))]
    loop {
        core::hint::spin_loop();
    }
}
