//! The index block: which elements a message carries. The encoder measures every
//! coding exactly and writes the smallest (ties: dense, then bitmap, then the smallest
//! Rice parameter), so a message's bytes are a function of its content alone.

use super::{BitWriter, IndexCoding};

/// Collects the exact size of every index coding while the selected positions stream by.
///
/// A Rice code of gap `g` with parameter `k` costs `(g >> k) + 1 + k` bits, so the cost of
/// every `k` at once is `Σ_g (g >> k)` kept for each `k`: 32 independent shift-adds per
/// position, which vectorise (5x faster than counting the set bits of each gap, which
/// chains its increments through memory). The sums fit in `u32`: the gaps of one message
/// add up to less than its element count, itself a `u32`.
#[derive(Clone, Debug)]
pub(crate) struct IndexCost {
    next: u64,
    count: u64,
    shifted: [u32; 32],
}

impl IndexCost {
    pub fn new() -> Self {
        IndexCost {
            next: 0,
            count: 0,
            shifted: [0; 32],
        }
    }

    /// Records the next selected position (strictly increasing).
    #[inline(always)]
    pub fn push(&mut self, index: usize) {
        let gap = (index as u64 - self.next) as u32;
        self.next = index as u64 + 1;
        self.count += 1;
        for (k, sum) in self.shifted.iter_mut().enumerate() {
            *sum = sum.wrapping_add(gap >> k);
        }
    }

    /// Bits of the Rice-coded gaps with parameter `k`.
    fn rice_bits(&self, k: u32) -> u64 {
        self.shifted[k as usize] as u64 + self.count * (k as u64 + 1)
    }

    /// The smallest coding for `numel` elements, and its index-block byte length
    /// (the Rice parameter byte lives in the header and is counted in the comparison).
    pub fn choose(&self, numel: usize) -> (IndexCoding, usize) {
        if self.count == numel as u64 {
            return (IndexCoding::Dense, 0);
        }
        let mut best = (IndexCoding::Bitmap, numel.div_ceil(8));
        let mut best_total = best.1 as u64;
        for k in 0..32u32 {
            let bytes = self.rice_bits(k).div_ceil(8);
            if bytes + 1 < best_total {
                best = (IndexCoding::Rice { k: k as u8 }, bytes as usize);
                best_total = bytes + 1;
            }
        }
        best
    }
}

/// Writes the index block of the chosen coding.
#[derive(Debug)]
pub(crate) enum IndexWriter<'a> {
    Dense,
    /// The region must be zeroed by the caller.
    Bitmap(&'a mut [u8]),
    Rice {
        bits: BitWriter<'a>,
        k: u32,
        next: u64,
    },
}

impl<'a> IndexWriter<'a> {
    pub fn new(coding: IndexCoding, region: &'a mut [u8]) -> Self {
        match coding {
            IndexCoding::Dense => IndexWriter::Dense,
            IndexCoding::Bitmap => {
                region.fill(0);
                IndexWriter::Bitmap(region)
            }
            IndexCoding::Rice { k } => IndexWriter::Rice {
                bits: BitWriter::new(region),
                k: k as u32,
                next: 0,
            },
        }
    }

    #[inline(always)]
    pub fn push(&mut self, index: usize) {
        match self {
            IndexWriter::Dense => {}
            IndexWriter::Bitmap(map) => {
                if let Some(b) = map.get_mut(index / 8) {
                    *b |= 1 << (index % 8);
                }
            }
            IndexWriter::Rice { bits, k, next } => {
                let gap = index as u64 - *next;
                *next = index as u64 + 1;
                bits.put_unary(gap >> *k);
                bits.put((gap & ((1u64 << *k) - 1)) as u32, *k);
            }
        }
    }

    /// Flushes; false if the region was too small (an internal size-accounting bug).
    pub fn finish(self) -> bool {
        match self {
            IndexWriter::Rice { bits, .. } => bits.finish().is_some(),
            _ => true,
        }
    }
}
