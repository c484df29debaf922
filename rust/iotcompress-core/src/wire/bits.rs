//! Bit packing, least significant bit first (bit 0 of byte 0 is the first bit), like DEFLATE.
//! Neither side can panic or touch memory outside its slice: the writer records an
//! overflow flag, the reader answers `None` at the end of its data.

/// Writes bit fields into a byte slice that the caller has zeroed or will fully cover.
#[derive(Debug)]
pub(crate) struct BitWriter<'a> {
    out: &'a mut [u8],
    pos: usize,
    acc: u64,
    nbits: u32,
    overflow: bool,
}

impl<'a> BitWriter<'a> {
    pub fn new(out: &'a mut [u8]) -> Self {
        BitWriter {
            out,
            pos: 0,
            acc: 0,
            nbits: 0,
            overflow: false,
        }
    }

    /// Appends the low `n` bits of `value` (`n <= 32`, higher bits of `value` must be zero).
    #[inline(always)]
    pub fn put(&mut self, value: u32, n: u32) {
        self.acc |= (value as u64) << self.nbits;
        self.nbits += n;
        if self.nbits >= 32 {
            self.flush32();
        }
    }

    #[inline(always)]
    fn flush32(&mut self) {
        match self.out.get_mut(self.pos..self.pos + 4) {
            Some(dst) => dst.copy_from_slice(&(self.acc as u32).to_le_bytes()),
            None => self.overflow = true,
        }
        self.pos += 4;
        self.acc >>= 32;
        self.nbits -= 32;
    }

    /// Appends `count` one bits then a zero bit (unary code of `count`).
    #[inline]
    pub fn put_unary(&mut self, mut count: u64) {
        while count >= 31 {
            self.put(0x7fff_ffff, 31);
            count -= 31;
        }
        self.put((1u32 << count) - 1, count as u32 + 1);
    }

    /// Flushes the last partial byte (padding with zeros); returns the bytes written, or
    /// `None` if the output slice was too small.
    pub fn finish(mut self) -> Option<usize> {
        while self.nbits > 0 {
            match self.out.get_mut(self.pos) {
                Some(b) => *b = self.acc as u8,
                None => self.overflow = true,
            }
            self.pos += 1;
            self.acc >>= 8;
            self.nbits = self.nbits.saturating_sub(8);
        }
        (!self.overflow).then_some(self.pos)
    }
}

/// Reads bit fields from a byte slice.
#[derive(Debug)]
pub(crate) struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    nbits: u32,
}

impl<'a> BitReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        BitReader {
            data,
            pos: 0,
            acc: 0,
            nbits: 0,
        }
    }

    #[inline(always)]
    fn refill(&mut self) {
        if let Some(bytes) = self.data.get(self.pos..self.pos + 4) {
            if self.nbits <= 32 {
                let w = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                self.acc |= (w as u64) << self.nbits;
                self.nbits += 32;
                self.pos += 4;
                return;
            }
        }
        while self.nbits <= 56 {
            match self.data.get(self.pos) {
                Some(&b) => {
                    self.acc |= (b as u64) << self.nbits;
                    self.nbits += 8;
                    self.pos += 1;
                }
                None => break,
            }
        }
    }

    /// Reads `n <= 32` bits; `None` past the end.
    #[inline(always)]
    pub fn get(&mut self, n: u32) -> Option<u32> {
        if self.nbits < n {
            self.refill();
            if self.nbits < n {
                return None;
            }
        }
        let v = (self.acc & ((1u64 << n) - 1)) as u32;
        self.acc >>= n;
        self.nbits -= n;
        Some(v)
    }

    /// Reads a unary code (ones ended by a zero); `None` if the data ends first or
    /// the count exceeds `limit`.
    #[inline]
    pub fn get_unary(&mut self, limit: u64) -> Option<u64> {
        let mut count = 0u64;
        loop {
            if self.nbits == 0 {
                self.refill();
                if self.nbits == 0 {
                    return None;
                }
            }
            let ones = self.acc.trailing_ones().min(self.nbits);
            if ones < self.nbits {
                self.acc >>= ones + 1;
                self.nbits -= ones + 1;
                count += ones as u64;
                return if count <= limit { Some(count) } else { None };
            }
            count += ones as u64;
            if count > limit {
                return None;
            }
            self.acc = 0;
            self.nbits = 0;
        }
    }

    /// After the last field: the bytes consumed, if all unread bits of the last byte are
    /// zero (canonical padding); `Err(())` otherwise.
    pub fn finish(self) -> Result<usize, ()> {
        let pad = self.nbits % 8;
        if pad > 0 && self.acc & ((1u64 << pad) - 1) != 0 {
            return Err(());
        }
        // Whole bytes still buffered were not consumed.
        Ok(self.pos - (self.nbits / 8) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_mixed_widths() {
        let mut buf = [0u8; 64];
        let mut w = BitWriter::new(&mut buf);
        let fields: [(u32, u32); 7] = [
            (1, 1),
            (5, 3),
            (0xabcd, 16),
            (0, 0),
            (0x7fff_ffff, 31),
            (3, 2),
            (0xffff_ffff, 32),
        ];
        for &(v, n) in &fields {
            w.put(v, n);
        }
        w.put_unary(70);
        w.put_unary(0);
        let len = w.finish().unwrap();
        assert_eq!(len, (1 + 3 + 16 + 31 + 2 + 32 + 71 + 1usize).div_ceil(8));
        let mut r = BitReader::new(&buf[..len]);
        for &(v, n) in &fields {
            assert_eq!(r.get(n), Some(v));
        }
        assert_eq!(r.get_unary(1000), Some(70));
        assert_eq!(r.get_unary(1000), Some(0));
        assert_eq!(r.finish(), Ok(len));
    }

    #[test]
    fn writer_overflow_is_flagged() {
        let mut buf = [0u8; 3];
        let mut w = BitWriter::new(&mut buf);
        w.put(0xffff_ffff, 32);
        assert_eq!(w.finish(), None);
    }
}
