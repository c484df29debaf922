//! Wire format v1: the bytes a compressed gradient travels as. The normative
//! description, with a table per field, is `docs/wire-format.md`; this module is its
//! reference implementation.
//!
//! ```text
//! magic "IC" | version 1 | codec | numel varint | nnz varint | [rice k] | [levels]
//! | [scale f32] | [stream u32] | index block | value block | CRC-32C
//! ```

mod bits;
pub mod crc;
mod decode;
mod index;

pub(crate) use bits::{BitReader, BitWriter};
pub use decode::{decode_add, for_each_entry, parse, Message};
pub(crate) use index::{IndexCost, IndexWriter};

use crate::quant::Quant;
use crate::Error;

/// The two magic bytes, ASCII `IC`.
pub const MAGIC: [u8; 2] = *b"IC";
/// The wire format version this crate writes and reads.
pub const VERSION: u8 = 1;
/// Bytes of the trailing checksum.
pub const CHECKSUM_LEN: usize = 4;
/// The largest header: magic 2, version 1, codec 1, two 5-byte varints, rice 1,
/// levels 1, scale 4, stream 4.
pub const MAX_HEADER_LEN: usize = 24;
/// The shortest valid message (an f32 message of an empty tensor).
pub const MIN_MESSAGE_LEN: usize = 2 + 1 + 1 + 1 + 1 + CHECKSUM_LEN;

/// How the positions of the sent entries are coded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IndexCoding {
    /// Every element is sent; no index block.
    Dense,
    /// One bit per element, LSB first.
    Bitmap,
    /// Gaps between positions, Golomb–Rice coded with parameter `k` (`2^k` per bucket).
    Rice {
        /// The Rice parameter, 0..=31.
        k: u8,
    },
}

impl IndexCoding {
    /// The wire id (bits 4–5 of the codec byte).
    pub const fn id(self) -> u8 {
        match self {
            IndexCoding::Dense => 0,
            IndexCoding::Bitmap => 1,
            IndexCoding::Rice { .. } => 2,
        }
    }

    /// Name used by `inspect`.
    pub const fn name(self) -> &'static str {
        match self {
            IndexCoding::Dense => "dense",
            IndexCoding::Bitmap => "bitmap",
            IndexCoding::Rice { .. } => "rice",
        }
    }
}

/// The decoded header of a message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Header {
    /// Elements of the dense tensor.
    pub numel: u32,
    /// Entries sent.
    pub nnz: u32,
    /// Value quantiser.
    pub quant: Quant,
    /// Index coding.
    pub index: IndexCoding,
    /// The message scale (0 for f32/f16/bf16).
    pub scale: f32,
    /// Random stream of the stochastic quantisers (0 for the others).
    pub stream: u32,
}

impl Header {
    /// Bytes this header occupies on the wire.
    pub fn encoded_len(&self) -> usize {
        4 + varint_len(self.numel)
            + varint_len(self.nnz)
            + matches!(self.index, IndexCoding::Rice { .. }) as usize
            + matches!(self.quant, Quant::Qsgd { .. }) as usize
            + if self.quant.has_scale() { 4 } else { 0 }
            + if self.quant.is_stochastic() { 4 } else { 0 }
    }

    /// Writes the header; returns its length. `out` must hold [`MAX_HEADER_LEN`] bytes.
    pub(crate) fn write(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut buf = [0u8; MAX_HEADER_LEN];
        buf[..2].copy_from_slice(&MAGIC);
        buf[2] = VERSION;
        buf[3] = self.quant.id() | (self.index.id() << 4);
        let mut p = 4;
        p += write_varint(self.numel, &mut buf[p..]);
        p += write_varint(self.nnz, &mut buf[p..]);
        if let IndexCoding::Rice { k } = self.index {
            buf[p] = k;
            p += 1;
        }
        if let Quant::Qsgd { levels } = self.quant {
            buf[p] = levels;
            p += 1;
        }
        if self.quant.has_scale() {
            buf[p..p + 4].copy_from_slice(&self.scale.to_le_bytes());
            p += 4;
        }
        if self.quant.is_stochastic() {
            buf[p..p + 4].copy_from_slice(&self.stream.to_le_bytes());
            p += 4;
        }
        out.get_mut(..p)
            .ok_or(Error::BufferTooSmall)?
            .copy_from_slice(&buf[..p]);
        Ok(p)
    }
}

/// The largest message for `numel` elements with quantiser `quant`: a buffer of this
/// size can never be too small, whatever the selection.
pub const fn max_encoded_len(numel: usize, quant: Quant) -> usize {
    let values = match quant.value_bytes(numel as u64) {
        Some(v) => v as usize,
        None => usize::MAX / 2,
    };
    // The encoder never picks an index block larger than the bitmap.
    MAX_HEADER_LEN + numel.div_ceil(8) + values + CHECKSUM_LEN
}

/// An upper bound on the length of a message carrying `nnz` of `numel` elements, whatever
/// their positions: the encoder picks the smallest index coding, and Rice with `2^k` near
/// `numel / nnz` costs at most `numel >> k` quotient bits plus `k + 1` bits per entry (the
/// gaps sum to less than `numel`). Increasing in `nnz`.
pub fn message_len_bound(numel: usize, nnz: usize, quant: Quant) -> usize {
    if nnz >= numel {
        return max_encoded_len(numel, quant);
    }
    let (n, k) = (numel as u64, nnz as u64);
    let rice = (0..32u32)
        .map(|b| (n.div_ceil(1 << b) + k * (b as u64 + 1)).div_ceil(8))
        .min()
        .unwrap_or(u64::MAX);
    let index = rice.min(n.div_ceil(8));
    let values = quant.value_bytes(k).unwrap_or(u64::MAX / 4);
    (MAX_HEADER_LEN as u64 + CHECKSUM_LEN as u64 + index + values).min(usize::MAX as u64) as usize
}

/// Bytes of the LEB128 encoding of `v`.
pub const fn varint_len(v: u32) -> usize {
    match v {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0x0fff_ffff => 4,
        _ => 5,
    }
}

/// Writes `v` as unsigned LEB128 (7 bits a byte, low first, high bit = more follows).
fn write_varint(mut v: u32, out: &mut [u8]) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        out[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    out[i] = v as u8;
    i + 1
}

/// Reads a canonical LEB128 `u32`: at most five bytes, no redundant trailing zero byte.
pub(crate) fn read_varint(data: &[u8], pos: &mut usize) -> Result<u32, Error> {
    let mut v: u64 = 0;
    for i in 0..5 {
        let b = *data.get(*pos).ok_or(Error::Truncated)?;
        *pos += 1;
        v |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return Err(Error::BadVarint);
            }
            return u32::try_from(v).map_err(|_| Error::BadVarint);
        }
    }
    Err(Error::BadVarint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_canonical() {
        for &v in &[
            0u32,
            1,
            127,
            128,
            300,
            16383,
            16384,
            0x0fff_ffff,
            0x1000_0000,
            u32::MAX,
        ] {
            let mut buf = [0u8; 5];
            let n = write_varint(v, &mut buf);
            assert_eq!(n, varint_len(v));
            let mut pos = 0;
            assert_eq!(read_varint(&buf[..n], &mut pos), Ok(v));
            assert_eq!(pos, n);
        }
        let mut pos = 0;
        assert_eq!(read_varint(&[0x80, 0x00], &mut pos), Err(Error::BadVarint));
        pos = 0;
        assert_eq!(
            read_varint(&[0xff, 0xff, 0xff, 0xff, 0x1f], &mut pos),
            Err(Error::BadVarint)
        );
        pos = 0;
        assert_eq!(read_varint(&[0x80], &mut pos), Err(Error::Truncated));
    }
}
