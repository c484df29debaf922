//! The one error type of the core. Every variant has a static message so that
//! `Display` needs no allocation (it also runs on microcontrollers).

use core::fmt;

/// Everything that can go wrong in the core.
///
/// Variants up to [`Error::ChecksumMismatch`] are *decode* errors: the bytes of a
/// message are malformed. The rest are caller errors (bad options, wrong lengths).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Error {
    /// The message ends before its header says it should.
    Truncated,
    /// The message has bytes after its checksum or after its index block.
    TrailingBytes,
    /// The first two bytes are not the magic `"IC"`: not an iotcompress message.
    BadMagic,
    /// The version byte names a wire format this decoder does not know.
    UnsupportedVersion,
    /// The codec byte names an unknown quantiser or index coding, or sets reserved bits.
    UnknownCodec,
    /// A varint is longer than five bytes, not canonical, or larger than `u32::MAX`.
    BadVarint,
    /// The entry count is impossible (more entries than elements, or it disagrees with the index block).
    BadEntryCount,
    /// An index points past the end of the tensor.
    IndexOutOfRange,
    /// Padding bits or reserved fields are not zero.
    NonZeroPadding,
    /// A scale is negative, NaN or infinite, or the QSGD level count is zero.
    BadScale,
    /// A value is NaN or infinite, or a packed code is outside its alphabet.
    BadValue,
    /// The CRC-32C of the message does not match: the bytes were corrupted.
    ChecksumMismatch,
    /// The message is for a tensor of another size than the caller expects.
    NumelMismatch,
    /// The message announces more elements than the caller allows.
    TooLarge,
    /// An output buffer is smaller than the size bound for this message.
    BufferTooSmall,
    /// The scratch buffer is smaller than `scratch_len()`.
    ScratchTooSmall,
    /// A gradient or state buffer does not have `numel` elements.
    LengthMismatch,
    /// The gradient contains NaN or infinity; the state was left unchanged.
    NonFiniteGradient,
    /// Accumulating the gradient would overflow f32; the state was left unchanged.
    Overflow,
    /// An option is out of range (density, threshold, momentum, levels, numel).
    InvalidConfig,
    /// A streamed message was finished before all `numel` elements were fed.
    Incomplete,
    /// A streamed message was fed or finished after it was finished.
    StreamClosed,
    /// `restore()` without a message: no compress since the last restore, accumulate or load.
    NothingToRestore,
}

impl Error {
    /// A one-line, human readable reason.
    pub const fn message(self) -> &'static str {
        match self {
            Error::Truncated => "message is truncated",
            Error::TrailingBytes => "message has trailing bytes",
            Error::BadMagic => "not an iotcompress message (bad magic)",
            Error::UnsupportedVersion => "unsupported wire format version",
            Error::UnknownCodec => "unknown quantiser or index coding, or reserved codec bits set",
            Error::BadVarint => "malformed varint in header",
            Error::BadEntryCount => {
                "entry count is inconsistent with the element count or index block"
            }
            Error::IndexOutOfRange => "an index points past the end of the tensor",
            Error::NonZeroPadding => "padding bits are not zero",
            Error::BadScale => "scale is negative or not finite, or QSGD levels are zero",
            Error::BadValue => "a value is not finite or a code is outside its alphabet",
            Error::ChecksumMismatch => "checksum mismatch: the message was corrupted",
            Error::NumelMismatch => "message element count differs from the expected one",
            Error::TooLarge => "message element count exceeds the allowed maximum",
            Error::BufferTooSmall => "output buffer is too small",
            Error::ScratchTooSmall => "scratch buffer is too small",
            Error::LengthMismatch => "buffer length differs from numel",
            Error::NonFiniteGradient => "gradient contains NaN or infinity (state left unchanged)",
            Error::Overflow => "accumulating the gradient would overflow float32",
            Error::InvalidConfig => "invalid compressor configuration",
            Error::Incomplete => "streamed message finished before all elements were fed",
            Error::StreamClosed => "streamed message already finished",
            Error::NothingToRestore => {
                "nothing to restore: no message since the last restore, accumulate or load"
            }
        }
    }

    /// True for errors caused by malformed message bytes.
    pub const fn is_decode_error(self) -> bool {
        matches!(
            self,
            Error::Truncated
                | Error::TrailingBytes
                | Error::BadMagic
                | Error::UnsupportedVersion
                | Error::UnknownCodec
                | Error::BadVarint
                | Error::BadEntryCount
                | Error::IndexOutOfRange
                | Error::NonZeroPadding
                | Error::BadScale
                | Error::BadValue
                | Error::ChecksumMismatch
                | Error::NumelMismatch
                | Error::TooLarge
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}
