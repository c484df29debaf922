//! CRC-32C (Castagnoli polynomial 0x1EDC6F41, reflected 0x82F63B78), as in iSCSI and
//! ext4. It detects every single-bit error and every burst of up to 32 bits; a
//! slicing-by-4 table keeps it fast on hosts while costing 4 KiB of flash on an MCU. With the
//! feature `small-crc` (firmware builds) one 1 KiB table is used a byte at a time instead:
//! the same values, 3 KiB less flash, about three times the instructions per byte.

// The register-combination helpers serve the instruction-based kernels (x86_64 for now).
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

const POLY: u32 = 0x82f6_3b78;

const fn make_tables() -> [[u32; 256]; 4] {
    let mut t = [[0u32; 256]; 4];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 4 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

#[cfg(not(feature = "small-crc"))]
static TABLES: [[u32; 256]; 4] = make_tables();
#[cfg(feature = "small-crc")]
static TABLE: [u32; 256] = make_tables()[0];

/// CRC-32C of `data` (initial value and final xor 0xFFFFFFFF; `crc32c(b"123456789") == 0xE3069283`).
/// Uses the CPU's CRC instruction where the kernels have one (same result).
pub fn crc32c(data: &[u8]) -> u32 {
    !crate::kernels::crc32c_update(crate::kernels::Level::active(), !0, data)
}

/// The CRC register after feeding `data` into register `crc` (no pre- or post-inversion):
/// the reference the instruction-based kernels must match.
#[cfg(feature = "small-crc")]
pub fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = (crc >> 8) ^ TABLE[((crc ^ b as u32) & 0xff) as usize];
    }
    crc
}

/// The CRC register after feeding `data` into register `crc` (no pre- or post-inversion):
/// the reference the instruction-based kernels must match.
#[cfg(not(feature = "small-crc"))]
pub fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    let t = &TABLES;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        crc ^= u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        crc = t[3][(crc & 0xff) as usize]
            ^ t[2][((crc >> 8) & 0xff) as usize]
            ^ t[1][((crc >> 16) & 0xff) as usize]
            ^ t[0][(crc >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ b as u32) & 0xff) as usize];
    }
    crc
}

/// `a·b mod P` for polynomials in the reflected representation (bit 31 is x^0); after
/// Mark Adler's `multmodp` (crc32c.c, zlib licence).
const fn mul_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                return p;
            }
        }
        m >>= 1;
        if m == 0 {
            return p;
        }
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
}

/// `x^(8·bytes) mod P`: the operator that moves a CRC register past `bytes` zero bytes.
pub(crate) const fn shift_operator(bytes: usize) -> u32 {
    let mut result = 1u32 << 31; // x^0
    let mut square = 1u32 << 30; // x^1
    let mut e = bytes as u64 * 8;
    while e != 0 {
        if e & 1 != 0 {
            result = mul_mod_p(result, square);
        }
        square = mul_mod_p(square, square);
        e >>= 1;
    }
    result
}

/// The register of `A || B` from the register after `A` (shifted past `B`'s length by
/// `operator`) and `B`'s register started from zero: CRCs are linear.
#[inline]
pub(crate) const fn combine(crc_a: u32, operator: u32, crc_b: u32) -> u32 {
    mul_mod_p(operator, crc_a) ^ crc_b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combining_registers_equals_one_pass() {
        let data: [u8; 1000] = core::array::from_fn(|i| (i * 7 + i / 13) as u8);
        for split in [0, 1, 3, 64, 999, 1000] {
            let (a, b) = data.split_at(split);
            let whole = crc32c_update(!0, &data);
            let joined = combine(
                crc32c_update(!0, a),
                shift_operator(b.len()),
                crc32c_update(0, b),
            );
            assert_eq!(joined, whole, "split {split}");
        }
    }

    #[test]
    fn check_value() {
        assert_eq!(super::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(super::crc32c(b""), 0);
    }
}
