//! The decoder. Every byte is untrusted: all reads are bounds-checked, nothing is
//! allocated, and a message is validated completely before a single output element is
//! touched, so a malformed message leaves the caller's buffer exactly as it was.

use super::{
    read_varint, BitReader, Header, IndexCoding, CHECKSUM_LEN, MAGIC, MIN_MESSAGE_LEN, VERSION,
};
use crate::float::is_finite_bits;
use crate::quant::{decode_code, decode_unit, Quant};
use crate::wire::crc::crc32c;
use crate::Error;

/// A message whose framing, sizes and checksum have been verified.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    /// The header fields.
    pub header: Header,
    /// Total length in bytes.
    pub len: usize,
    index: &'a [u8],
    values: &'a [u8],
}

impl Message<'_> {
    /// Bytes of the index block.
    pub fn index_len(&self) -> usize {
        self.index.len()
    }

    /// Bytes of the value block.
    pub fn values_len(&self) -> usize {
        self.values.len()
    }
}

/// Parses and verifies the header, block sizes and checksum. `max_numel` bounds the
/// element count a caller is prepared to allocate for.
pub fn parse(msg: &[u8], max_numel: usize) -> Result<Message<'_>, Error> {
    if msg.len() < 3 {
        return Err(if msg.len() >= 2 && msg[..2] != MAGIC {
            Error::BadMagic
        } else {
            Error::Truncated
        });
    }
    if msg[..2] != MAGIC {
        return Err(Error::BadMagic);
    }
    if msg[2] != VERSION {
        return Err(Error::UnsupportedVersion);
    }
    if msg.len() < MIN_MESSAGE_LEN {
        return Err(Error::Truncated);
    }
    let codec = msg[3];
    if codec & 0xc0 != 0 {
        return Err(Error::UnknownCodec);
    }
    let mut pos = 4;
    let numel = read_varint(msg, &mut pos)?;
    let nnz = read_varint(msg, &mut pos)?;
    if nnz > numel {
        return Err(Error::BadEntryCount);
    }
    let index = match codec >> 4 {
        0 => IndexCoding::Dense,
        1 => IndexCoding::Bitmap,
        2 => {
            let k = *msg.get(pos).ok_or(Error::Truncated)?;
            pos += 1;
            if k > 31 {
                return Err(Error::UnknownCodec);
            }
            IndexCoding::Rice { k }
        }
        _ => return Err(Error::UnknownCodec),
    };
    let quant = match codec & 0x0f {
        0 => Quant::F32,
        1 => Quant::F16,
        2 => Quant::Bf16,
        3 => Quant::Int8,
        4 => Quant::Int4,
        5 => Quant::Sign,
        6 => Quant::Ternary,
        7 => {
            let levels = *msg.get(pos).ok_or(Error::Truncated)?;
            pos += 1;
            if levels == 0 {
                return Err(Error::BadScale);
            }
            Quant::Qsgd { levels }
        }
        _ => return Err(Error::UnknownCodec),
    };
    let mut scale = 0.0;
    if quant.has_scale() {
        scale = f32::from_le_bytes(read4(msg, &mut pos)?);
        if !is_finite_bits(scale.to_bits()) || scale.is_sign_negative() {
            return Err(Error::BadScale);
        }
    }
    let mut stream = 0;
    if quant.is_stochastic() {
        stream = u32::from_le_bytes(read4(msg, &mut pos)?);
    }
    if index == IndexCoding::Dense && nnz != numel {
        return Err(Error::BadEntryCount);
    }
    if numel as u64 > max_numel as u64 {
        return Err(Error::TooLarge);
    }
    // Sizes in u64: nothing here can overflow, even on a 16-bit target.
    let body = (msg.len() - CHECKSUM_LEN) as u64;
    let values_len = quant.value_bytes(nnz as u64).ok_or(Error::BadEntryCount)?;
    let index_len = match index {
        IndexCoding::Dense => 0,
        IndexCoding::Bitmap => (numel as u64).div_ceil(8),
        // Self-delimiting: whatever lies between header and values (checked when decoded).
        IndexCoding::Rice { .. } => body.saturating_sub(pos as u64 + values_len),
    };
    let expected = pos as u64 + index_len + values_len;
    if expected > body {
        return Err(Error::Truncated);
    }
    if expected < body {
        return Err(Error::TrailingBytes);
    }
    let (content, crc) = msg.split_at(msg.len() - CHECKSUM_LEN);
    if crc32c(content) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Err(Error::ChecksumMismatch);
    }
    let (index_block, values) = content[pos..].split_at(index_len as usize);
    Ok(Message {
        header: Header {
            numel,
            nnz,
            quant,
            index,
            scale,
            stream,
        },
        len: msg.len(),
        index: index_block,
        values,
    })
}

fn read4(msg: &[u8], pos: &mut usize) -> Result<[u8; 4], Error> {
    let b = msg.get(*pos..*pos + 4).ok_or(Error::Truncated)?;
    *pos += 4;
    Ok([b[0], b[1], b[2], b[3]])
}

/// Calls `sink(index, value)` for every entry of a parsed message, in increasing index
/// order, after checking the index block and every code. On error, `sink` may have seen
/// a prefix of the entries: use [`decode_add`] to get all-or-nothing semantics.
pub fn for_each_entry(m: &Message<'_>, mut sink: impl FnMut(usize, f32)) -> Result<(), Error> {
    let h = m.header;
    let numel = h.numel as u64;
    let unit = decode_unit(h.quant, h.scale);
    let mut values = ValueReader::new(h.quant, m.values);
    let mut emit = |index: u64, values: &mut ValueReader<'_>| -> Result<(), Error> {
        let v = values.next(unit)?;
        sink(index as usize, v);
        Ok(())
    };
    match h.index {
        IndexCoding::Dense => {
            for i in 0..numel {
                emit(i, &mut values)?;
            }
        }
        IndexCoding::Bitmap => {
            let mut seen = 0u64;
            for (byte_index, &byte) in m.index.iter().enumerate() {
                let mut b = byte;
                while b != 0 {
                    let i = byte_index as u64 * 8 + b.trailing_zeros() as u64;
                    if i >= numel {
                        return Err(Error::NonZeroPadding);
                    }
                    seen += 1;
                    if seen > h.nnz as u64 {
                        return Err(Error::BadEntryCount);
                    }
                    emit(i, &mut values)?;
                    b &= b - 1;
                }
            }
            if seen != h.nnz as u64 {
                return Err(Error::BadEntryCount);
            }
        }
        IndexCoding::Rice { k } => {
            let k = k as u32;
            let mut bits = BitReader::new(m.index);
            let mut next = 0u64; // first position the next gap may point to
            for _ in 0..h.nnz {
                let remaining = numel.saturating_sub(next);
                let q = bits
                    .get_unary(remaining >> k)
                    .ok_or(Error::IndexOutOfRange)?;
                let r = bits.get(k).ok_or(Error::Truncated)? as u64;
                let i = next + ((q << k) | r);
                if i >= numel {
                    return Err(Error::IndexOutOfRange);
                }
                emit(i, &mut values)?;
                next = i + 1;
            }
            match bits.finish() {
                Ok(used) if used == m.index.len() => {}
                Ok(_) => return Err(Error::TrailingBytes),
                Err(()) => return Err(Error::NonZeroPadding),
            }
        }
    }
    values.finish()
}

/// `out[i] += scale * value[i]` for every entry, all or nothing: the message is fully
/// validated first, so on error `out` is unchanged. `out.len()` must equal the message's
/// element count.
pub fn decode_add<'a>(msg: &'a [u8], out: &mut [f32], scale: f32) -> Result<Message<'a>, Error> {
    let m = parse(msg, usize::MAX)?;
    if m.header.numel as usize != out.len() {
        return Err(Error::NumelMismatch);
    }
    if let Some(done) = decode_add_dense(&m, out, scale) {
        return done.map(|()| m);
    }
    for_each_entry(&m, |_, _| {})?;
    let mut applied = for_each_entry(&m, |i, v| {
        if let Some(o) = out.get_mut(i) {
            *o += scale * v;
        }
    });
    // Unreachable after the validation pass; kept so a bug cannot turn into a panic.
    if applied.is_err() {
        applied = Err(Error::BadValue);
    }
    applied.map(|()| m)
}

/// [`decode_add`] of an index-free message with byte-aligned codes, in two monomorphic
/// passes (validate every value, then add): the same results as the general path, at
/// memory speed. `None` for the other messages.
fn decode_add_dense(m: &Message<'_>, out: &mut [f32], scale: f32) -> Option<Result<(), Error>> {
    fn run<const W: usize>(
        values: &[u8],
        out: &mut [f32],
        scale: f32,
        decode: impl Fn(u32) -> f32,
    ) -> Result<(), Error> {
        let code = |c: &[u8]| {
            let mut b = [0u8; 4];
            b[..W].copy_from_slice(c);
            u32::from_le_bytes(b)
        };
        let codes = values.chunks_exact(W);
        if codes.len() != out.len() || !codes.remainder().is_empty() {
            return Err(Error::BadEntryCount);
        }
        // OR of "not finite" over fixed blocks, so the check vectorises; no early exit.
        let finite = codes
            .clone()
            .fold(true, |ok, c| ok & is_finite_bits(decode(code(c)).to_bits()));
        if !finite {
            return Err(Error::BadValue);
        }
        for (o, c) in out.iter_mut().zip(codes) {
            *o += scale * decode(code(c));
        }
        Ok(())
    }
    let h = m.header;
    if h.index != IndexCoding::Dense {
        return None;
    }
    let unit = decode_unit(h.quant, h.scale);
    let q = h.quant;
    Some(match q {
        Quant::F32 => run::<4>(m.values, out, scale, |c| decode_code(Quant::F32, unit, c)),
        Quant::F16 => {
            if m.values.len() != 2 * out.len() {
                Err(Error::BadEntryCount)
            } else if crate::kernels::decode_add_f16(
                crate::kernels::Level::active(),
                m.values,
                out,
                scale,
            ) {
                Ok(())
            } else {
                Err(Error::BadValue)
            }
        }
        Quant::Bf16 => run::<2>(m.values, out, scale, |c| decode_code(Quant::Bf16, unit, c)),
        Quant::Int8 => run::<1>(m.values, out, scale, |c| decode_code(Quant::Int8, unit, c)),
        _ => return None,
    })
}

/// Reads the value block code by code.
struct ValueReader<'a> {
    quant: Quant,
    bits: BitReader<'a>,
    data: &'a [u8],
    /// Ternary: trits left in the current byte, and the byte's remaining value.
    trits_left: u32,
    trit_byte: u32,
    byte_pos: usize,
}

impl<'a> ValueReader<'a> {
    fn new(quant: Quant, data: &'a [u8]) -> Self {
        ValueReader {
            quant,
            bits: BitReader::new(data),
            data,
            trits_left: 0,
            trit_byte: 0,
            byte_pos: 0,
        }
    }

    #[inline(always)]
    fn next(&mut self, unit: f32) -> Result<f32, Error> {
        let code = if let Quant::Ternary = self.quant {
            if self.trits_left == 0 {
                let b = *self.data.get(self.byte_pos).ok_or(Error::Truncated)? as u32;
                if b >= 243 {
                    return Err(Error::BadValue);
                }
                self.byte_pos += 1;
                self.trit_byte = b;
                self.trits_left = 5;
            }
            let t = self.trit_byte % 3;
            self.trit_byte /= 3;
            self.trits_left -= 1;
            t
        } else {
            self.bits
                .get(self.quant.code_bits())
                .ok_or(Error::Truncated)?
        };
        // A finite code times a large finite scale can still overflow: check the value.
        let value = decode_code(self.quant, unit, code);
        if !is_finite_bits(value.to_bits()) {
            return Err(Error::BadValue);
        }
        Ok(value)
    }

    /// Checks that the block was consumed exactly and its padding is zero.
    fn finish(self) -> Result<(), Error> {
        if let Quant::Ternary = self.quant {
            // Unused trits of the last byte must be zero digits.
            if self.trit_byte != 0 {
                return Err(Error::NonZeroPadding);
            }
            return if self.byte_pos == self.data.len() {
                Ok(())
            } else {
                Err(Error::TrailingBytes)
            };
        }
        match self.bits.finish() {
            Ok(used) if used == self.data.len() => Ok(()),
            Ok(_) => Err(Error::TrailingBytes),
            Err(()) => Err(Error::NonZeroPadding),
        }
    }
}
