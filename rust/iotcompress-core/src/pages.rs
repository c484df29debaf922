//! Large state vectors on transparent huge pages (Linux with `std`).
//!
//! A pass over a 100 MB residual touches 25,000 4 KiB pages; with 2 MiB pages the TLB covers
//! the whole tensor, and the same pass runs about a quarter faster on a machine whose
//! transparent huge pages are `madvise` (the common default). numpy advises its large
//! arrays the same way, which is why `numpy.add` — the memory floor the benchmarks compare
//! against — has them.
#![allow(unsafe_code)]

use alloc::vec;
use alloc::vec::Vec;

/// `len` zeros, advised onto huge pages when large (before the first touch, so that the
/// kernel faults them in as huge pages).
pub(crate) fn zeroed<T: Clone + Default>(len: usize) -> Vec<T> {
    let mut v = vec![T::default(); len];
    advise(&mut v);
    v
}

#[cfg(all(feature = "std", target_os = "linux"))]
fn advise<T>(v: &mut [T]) {
    extern "C" {
        fn madvise(addr: *mut core::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    const MADV_HUGEPAGE: i32 = 14;
    const PAGE: usize = 4096;
    // Below this a vector stays on ordinary pages.
    const MIN_BYTES: usize = 4 << 20;
    let bytes = core::mem::size_of_val(v);
    if bytes < MIN_BYTES {
        return;
    }
    let start = v.as_mut_ptr() as usize;
    let first = start.next_multiple_of(PAGE);
    let end = (start + bytes) / PAGE * PAGE;
    if end > first {
        // SAFETY: [first, end) lies inside `v`'s allocation and is page-aligned; the advice
        // only changes how the kernel backs those pages, never their contents or validity.
        // A failure (an old kernel, THP disabled) leaves ordinary pages: nothing to handle.
        unsafe { madvise(first as *mut core::ffi::c_void, end - first, MADV_HUGEPAGE) };
    }
}

#[cfg(not(all(feature = "std", target_os = "linux")))]
fn advise<T>(_: &mut [T]) {}
