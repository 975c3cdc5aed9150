//! Verify mode's census of call sites: every site it meets, with its calls per standard
//! class, so that at exit it can say how far any prediction per call site could go on
//! this run. A site predicted at its most frequent class is right for that class's
//! calls only; taking sites from the most to the least regular while at least 90% of
//! the calls taken stay exact gives the most calls a per-site prediction could cover
//! (`site-bound` on the verify line). Where that bound is far from half the calls, the
//! program's sizes vary within its call sites, and no plan of sites can close the gap.
//!
//! Fixed tables in `.bss` (untouched, so not resident, outside verify mode), claimed by
//! compare-and-swap: recording allocates nothing.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::sample::ClassTally;
use crate::size_class;

/// Sites recorded at most; calls of later ones count as unpredictable.
const SITES: usize = 4096;
/// Classes counted apart per site; calls in further classes count against the site.
const CLASSES: usize = 8;
/// Slots probed from a site's hash before it counts as dropped.
const PROBES: usize = 64;
/// The share of the taken calls that must stay exact, in percent.
const EXACT_PERCENT: u64 = 90;

struct Site {
    /// Return address; 0 = free.
    ret: AtomicUsize,
    /// Calls per class (`class_of`).
    calls: ClassTally<CLASSES>,
    /// Calls in no counted class.
    other: AtomicU64,
}

static CENSUS: [Site; SITES] = [const {
    Site {
        ret: AtomicUsize::new(0),
        calls: ClassTally::new(),
        other: AtomicU64::new(0),
    }
}; SITES];

/// Counts one call of `size` bytes from the site returning to `ret` (0: unknown, never
/// counted, so it stays out of the bound).
pub(super) fn record(ret: usize, size: usize) {
    if ret == 0 {
        return;
    }
    let Some(site) = claim(ret) else { return };
    if !site.calls.add(class_of(size), 1) {
        site.other.fetch_add(1, Ordering::Relaxed);
    }
}

/// The standard block size of a small request; a large one's own mapping size (whole
/// pages), which any request size can ask for without overflowing.
fn class_of(size: usize) -> usize {
    if size <= size_class::MAX_SMALL_SIZE {
        size_class::standard_block_size(size.max(1))
    } else {
        size.checked_next_multiple_of(4096).unwrap_or(usize::MAX)
    }
}

fn claim(ret: usize) -> Option<&'static Site> {
    let start = (ret as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52;
    for k in 0..PROBES {
        let site = CENSUS.get((start as usize + k) % SITES)?;
        match site
            .ret
            .compare_exchange(0, ret, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => return Some(site),
            Err(r) if r == ret => return Some(site),
            Err(_) => {}
        }
    }
    None
}

/// The most calls a prediction per call site could cover with at least 90% of them
/// exact, over the sites recorded so far.
pub(super) fn site_bound() -> u64 {
    // (calls in the site's most frequent class, all its calls)
    let mut sites: Vec<(u64, u64)> = CENSUS
        .iter()
        .filter(|s| s.ret.load(Ordering::Relaxed) != 0)
        .map(|s| {
            let counts = s.calls.snapshot().map(|c| c.1);
            let top = counts.iter().copied().fold(0, u64::max);
            let all = counts.iter().sum::<u64>() + s.other.load(Ordering::Relaxed);
            (top, all)
        })
        .filter(|&(_, all)| all > 0)
        .collect();
    bound_of(&mut sites)
}

/// The greedy bound over `(top, all)` pairs: the most regular sites first, while the
/// exact share of what is taken stays at least [`EXACT_PERCENT`].
fn bound_of(sites: &mut [(u64, u64)]) -> u64 {
    // top_a / all_a > top_b / all_b, compared without division.
    sites.sort_unstable_by(|a, b| {
        (u128::from(b.0) * u128::from(a.1)).cmp(&(u128::from(a.0) * u128::from(b.1)))
    });
    let (mut taken, mut exact) = (0u64, 0u64);
    for &(top, all) in sites.iter() {
        if (exact + top) * 100 < (taken + all) * EXACT_PERCENT {
            break;
        }
        taken += all;
        exact += top;
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_takes_regular_sites_while_90_percent_stay_exact() {
        // 100 calls all in one class, 100 at 85%, 100 at 50%: the first two keep
        // 185 of 200 exact (92.5%); adding the third would drop to 235 of 300.
        let mut s = [(50, 100), (100, 100), (85, 100)];
        assert_eq!(bound_of(&mut s), 200);
        // A site too irregular on its own is never taken.
        assert_eq!(bound_of(&mut [(40, 100)]), 0);
        assert_eq!(bound_of(&mut []), 0);
    }

    #[test]
    fn every_request_size_has_a_class() {
        assert_eq!(class_of(0), 16);
        assert_eq!(
            class_of(size_class::MAX_SMALL_SIZE),
            size_class::MAX_SMALL_SIZE
        );
        assert_eq!(class_of(size_class::MAX_SMALL_SIZE + 1), (256 << 10) + 4096);
        assert_eq!(class_of(usize::MAX - 5), usize::MAX);
    }
}
