//! Whole-tensor passes split over threads (feature `std`). Each thread runs the same kernel
//! on a contiguous part; results are merged in index order, so the output is identical to
//! one thread's.
//!
//! The parts run on a persistent rayon pool, the first on the calling thread: spawning
//! threads for every pass cost about 90 µs a pass on a 2-core VM, 1.5 % of a 6 ms compress.

use std::sync::{Arc, Mutex, TryLockError};

use super::{accumulate, gather, max_mag, Accumulated, Level, Update};
use crate::feedback::Momentum;

/// Below this many elements per thread a pass stays on the calling thread.
pub const MIN_PER_THREAD: usize = 1 << 16;
/// More threads than this are not used.
pub const MAX_THREADS: usize = 64;

/// This process's worker pool (as many workers as cores), made on first use; `None` where
/// threads cannot be started, and then the parts run in turn.
///
/// A forked child inherits the pool but not its threads: work queued there would wait
/// forever, so the child makes a pool of its own. The inherited one is leaked, not dropped:
/// dropping it wakes its workers through their locks, and a fork can catch one of those held
/// by a worker going to sleep (a child hung 3 times in 1,500 forks right after a compress).
/// For the same reason a contended lock here means one thread, not a wait.
fn pool() -> Option<Arc<rayon::ThreadPool>> {
    static POOL: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut slot = match POOL.try_lock() {
        Ok(slot) => slot,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return None,
    };
    if let Some((owner, pool)) = &*slot {
        if *owner == pid {
            return Some(pool.clone());
        }
    }
    if let Some((_, inherited)) = slot.take() {
        core::mem::forget(inherited);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("iotcompress-{i}"))
        .build()
        .ok()
        .map(Arc::new)?;
    *slot = Some((pid, pool.clone()));
    Some(pool)
}

/// Calls `f` on every item: the first on the calling thread, the others on the pool when
/// `threads > 1`; in turn otherwise (or when no pool can be had).
pub fn each<T: Send>(threads: usize, items: &mut [T], f: impl Fn(&mut T) + Sync) {
    if threads > 1 && items.len() > 1 {
        if let Some(pool) = pool() {
            let f = &f;
            let (first, rest) = items.split_at_mut(1);
            pool.in_place_scope(|s| {
                for item in rest {
                    s.spawn(move |_| f(item));
                }
                first.iter_mut().for_each(f);
            });
            return;
        }
    }
    items.iter_mut().for_each(f)
}

/// Parts of `n` elements for `threads` threads: the part length, a multiple of 64.
fn part_len(n: usize, threads: usize) -> Option<usize> {
    let t = threads.min(MAX_THREADS).min(n / MIN_PER_THREAD);
    if t <= 1 {
        return None;
    }
    Some(n.div_ceil(t).next_multiple_of(64))
}

/// [`super::accumulate`] over `threads` threads.
pub fn accumulate_par(
    level: Level,
    threads: usize,
    rule: Momentum,
    mut upd: Update<'_>,
    g: &[f32],
    gather_at: Option<u32>,
    list: &mut [u32],
) -> Accumulated {
    let n = upd.len(rule).min(g.len());
    let Some(part) = part_len(n, threads) else {
        return accumulate(level, rule, upd, g, gather_at, list, 0);
    };
    let parts = n.div_ceil(part);
    // Each part gathers into its own share of the list.
    let share = list.len() / parts;
    // One job per part: its state, gradient and share of the list; its result.
    let mut jobs: [_; MAX_THREADS] = core::array::from_fn(|_| None);
    let (mut u_rest, _) = upd.reborrow().split_at(n, rule);
    let (mut g_rest, mut l_rest) = (&g[..n], &mut *list);
    for (j, job) in jobs.iter_mut().take(parts).enumerate() {
        let len = part.min(g_rest.len());
        let (up, ur) = u_rest.split_at(len, rule);
        let (gp, gr) = g_rest.split_at(len);
        let (lp, lr) = l_rest.split_at_mut(share.min(l_rest.len()));
        *job = Some((up, gp, lp, (j * part) as u32, Accumulated::default()));
        (u_rest, g_rest, l_rest) = (ur, gr, lr);
    }
    // Each thread's kernel fences its own non-temporal stores before it returns.
    each(threads, &mut jobs[..parts], |job| {
        if let Some((up, gp, lp, base, seen)) = job {
            *seen = accumulate(level, rule, up.reborrow(), gp, gather_at, lp, *base);
        }
    });
    let mut seen = [Accumulated::default(); MAX_THREADS];
    for (s, job) in seen.iter_mut().zip(jobs.iter().flatten()) {
        *s = job.4;
    }
    let seen = &seen[..parts];
    let count: usize = seen.iter().map(|a| a.count).sum();
    let max_mag = seen.iter().map(|a| a.max_mag).max().unwrap_or(0);
    if let Some(at) = gather_at {
        if count <= list.len() {
            if seen.iter().all(|a| a.count <= share) {
                // Close the gaps between the shares, in order.
                let mut to = 0;
                for (j, a) in seen.iter().enumerate() {
                    list.copy_within(j * share..j * share + a.count, to);
                    to += a.count;
                }
            } else {
                // One share overflowed though the whole list would not: gather again from
                // the new residual, which holds `v` (rare: the candidates bunch in one part).
                gather(level, &upd.new_r()[..n], at, list, 0);
            }
        }
    }
    Accumulated { count, max_mag }
}

/// [`super::max_mag`] over `threads` threads.
pub fn max_mag_par(level: Level, threads: usize, x: &[f32]) -> u32 {
    let Some(part) = part_len(x.len(), threads) else {
        return max_mag(level, x);
    };
    let mut parts = [(&[][..], 0u32); MAX_THREADS];
    for (slot, p) in parts.iter_mut().zip(x.chunks(part)) {
        slot.0 = p;
    }
    each(threads, &mut parts[..x.len().div_ceil(part)], |(p, max)| {
        *max = max_mag(level, p);
    });
    parts.iter().map(|p| p.1).max().unwrap_or(0)
}
