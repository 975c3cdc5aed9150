//! The large-object retention policy learned across runs: how long freed large mappings
//! stay cached and how many resident bytes they may hold, from how the program reused
//! them in its last run (`large::ReuseCounters`).
//!
//! The rules, and why:
//!
//! * Nothing cached (no large object freed), or fewer than [`MIN_PUTS_NEVER_REUSED`]
//!   mappings cached and none reused: too little to learn from, the policy that ran
//!   stays (so a program that frees a large buffer or two can keep an inert plan).
//! * Never reused (no hit, no miss a recently unmapped mapping would have served): every
//!   cached byte was memory held for nothing, so the shortest delay and no floor (the
//!   newest freed mapping still stays, and the budget still follows the live bytes).
//! * Reused: reuses came within `W` ms of the free (the longest hit wait, or the
//!   longest wait of a miss an expired mapping would have served); a mapping unused for
//!   twice that is unlikely to be reused, so the delay is `2W`, rounded up to a power of
//!   two (runs that differ a little plan alike, and the plan is not rewritten for
//!   noise) and kept within `MIN_DELAY_MS..=MAX_DELAY_MS`. Expired ghosts lengthen it
//!   (their wait is past the old delay), quick reuse shortens it.
//! * The budget (resident bytes the cache may hold) is weighed against the page faults
//!   it saves. A reuse saves faulting in the reused mapping's resident bytes afresh
//!   (about [`FAULT_NS_PER_PAGE`] per page); a run counts the bytes it reused by how
//!   deep in the cache each mapping had been (`ReuseCounters::reused_by_depth`; the
//!   budget pushes the oldest out first, so a budget of `D` bytes keeps every reuse
//!   found within `D`), and the bytes of reuses the budget lost. The floor becomes the
//!   smallest of 0, 1 MiB, 2 MiB, ... 64 MiB whose lost reuses (those deeper than it
//!   and those already lost) would cost at most 1/[`FAULT_SHARE`] of the run's CPU time
//!   in page faults (2%), and the share of the live bytes goes (the floor holds what was
//!   reused). Only when the reuse already lost costs more than twice that does the
//!   budget grow: the floor doubles (from at least 1 MiB) and the live share doubles,
//!   up to the bounds. Between the two nothing changes, so a program whose runs differ
//!   a little keeps its policy (a fixed point: under a learned floor nothing is reused
//!   deeper than it, and what it loses costs at most its allowance).
//! * Observations stored before the depths were counted (no CPU time): when at least
//!   one in [`LOST_SHARE`] reuses was lost to the budget, the floor doubles (from at
//!   least the default) and the live share doubles; otherwise the budget stays.

use crate::large::{
    DEPTH_BUCKETS, MAX_DELAY_MS, MAX_FLOOR, MAX_LIVE_SHIFT, MIN_DELAY_MS, Retention, ReuseCounters,
};

/// What a run observed of its large mappings: the policy in force and the counters.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct LargeObserved {
    pub(crate) policy: Retention,
    pub(crate) reuse: ReuseCounters,
}

/// The budget grows when at least one in this many reuses was lost to it.
const LOST_SHARE: u64 = 8;

/// Mappings cached and never reused from which the run counts as never reusing them.
const MIN_PUTS_NEVER_REUSED: u64 = 4;

/// Requests served by cached mappings, or that recently unmapped ones would have served.
fn reuses(r: &ReuseCounters) -> u64 {
    r.hits
        .saturating_add(r.gathered)
        .saturating_add(r.ghost_evicted)
        .saturating_add(r.ghost_expired)
}

/// The policy for the next run, from what the last one observed (see the module text).
pub(crate) fn next_policy(observed: &LargeObserved) -> Retention {
    let (was, r) = (observed.policy, &observed.reuse);
    let reuses = reuses(r);
    // A few frees never reused say too little to change anything.
    if r.puts == 0 || (reuses == 0 && r.puts < MIN_PUTS_NEVER_REUSED) {
        return was;
    }
    if reuses == 0 {
        return Retention {
            delay_ms: MIN_DELAY_MS,
            floor: 0,
            live_shift: was.live_shift,
        };
    }
    let wait = r.longest_hit_wait_ms.max(r.longest_ghost_wait_ms) as u64;
    let delay_ms = (2 * wait)
        .next_power_of_two()
        .clamp(MIN_DELAY_MS as u64, MAX_DELAY_MS as u64) as u32;
    let (floor, live_shift) = if r.cpu_ms > 0 {
        weighed_budget(was, r)
    } else {
        counted_budget(was, r)
    };
    Retention {
        delay_ms,
        floor,
        live_shift,
    }
}

/// What the page faults a reuse saves cost, about (ns per 4 KiB page counted). A first
/// touch of fresh memory costs 3.0 us per page on the virtual machine lgmalloc is
/// measured on (best of 10 runs of 64 MiB), and what lost reuse costs a real program
/// agrees: `git log -p` with no floor took 4,451 more page faults than with prediction
/// off and 13 ms (4.4%) more time (medians of 15 interleaved runs), 2.9 us a fault.
/// (At 1 us a page, the policy chose no floor there and cost more than the 2% it
/// allows.) The bytes counted are an upper bound of what the next user touches, so
/// this errs towards keeping memory.
const FAULT_NS_PER_PAGE: u64 = 3_000;

/// The page faults of lost reuse may cost 1 / this of the run's CPU time (2%).
const FAULT_SHARE: u64 = 50;

fn fault_ns(bytes: u64) -> u64 {
    bytes.div_ceil(4096).saturating_mul(FAULT_NS_PER_PAGE)
}

/// The budget of a run that counted its reuse depths (see the module text): `(floor,
/// live_shift)`.
fn weighed_budget(was: Retention, r: &ReuseCounters) -> (usize, u32) {
    let allowed = r.cpu_ms.saturating_mul(1_000_000) / FAULT_SHARE;
    let lost = fault_ns(r.lost_bytes);
    if lost > allowed.saturating_mul(2) {
        let floor = was.floor.max(1 << 20).saturating_mul(2).min(MAX_FLOOR);
        return (floor, was.live_shift.saturating_sub(1));
    }
    // Bytes reused deeper than each floor tried, from none kept at all.
    let mut deeper = r
        .reused_by_depth
        .iter()
        .fold(0u64, |a, &b| a.saturating_add(b));
    let costs = |deeper: u64| lost.saturating_add(fault_ns(deeper));
    if costs(deeper) <= allowed {
        return (0, MAX_LIVE_SHIFT);
    }
    for (k, &bytes) in r.reused_by_depth.iter().enumerate() {
        deeper = deeper.saturating_sub(bytes);
        if costs(deeper) <= allowed {
            let floor = if k + 1 < DEPTH_BUCKETS {
                (1 << 20) << k
            } else {
                MAX_FLOOR
            };
            return (floor.min(MAX_FLOOR), MAX_LIVE_SHIFT);
        }
    }
    // What was lost already uses the allowance, but not twice over: as it was.
    (was.floor, was.live_shift)
}

/// The budget of a run stored before depths were counted: `(floor, live_shift)`.
fn counted_budget(was: Retention, r: &ReuseCounters) -> (usize, u32) {
    let lost = r.ghost_evicted > 0 && r.ghost_evicted.saturating_mul(LOST_SHARE) >= reuses(r);
    if lost {
        (
            was.floor
                .max(Retention::DEFAULT.floor)
                .saturating_mul(2)
                .min(MAX_FLOOR),
            was.live_shift.saturating_sub(1),
        )
    } else {
        (was.floor, was.live_shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(policy: Retention, reuse: ReuseCounters) -> LargeObserved {
        LargeObserved { policy, reuse }
    }

    #[test]
    fn a_few_frees_never_reused_change_nothing() {
        let few = ReuseCounters {
            puts: MIN_PUTS_NEVER_REUSED - 1,
            misses: 3,
            expired: 3,
            ..ReuseCounters::default()
        };
        assert_eq!(
            next_policy(&observed(Retention::DEFAULT, few)),
            Retention::DEFAULT
        );
        let enough = ReuseCounters {
            puts: MIN_PUTS_NEVER_REUSED,
            ..few
        };
        assert_eq!(next_policy(&observed(Retention::DEFAULT, enough)).floor, 0);
    }

    #[test]
    fn planted_counts_saturate() {
        let huge = ReuseCounters {
            puts: 1,
            hits: 1,
            gathered: u64::MAX,
            ghost_evicted: u64::MAX,
            ..ReuseCounters::default()
        };
        let p = next_policy(&observed(Retention::DEFAULT, huge));
        assert!(p.delay_ms >= MIN_DELAY_MS && p.floor > 0, "{p:?}");
    }

    #[test]
    fn nothing_cached_keeps_the_policy() {
        let o = observed(Retention::DEFAULT, ReuseCounters::default());
        assert_eq!(next_policy(&o), Retention::DEFAULT);
    }

    #[test]
    fn a_program_that_never_reuses_returns_memory_promptly() {
        let reuse = ReuseCounters {
            puts: 40,
            misses: 40,
            expired: 30,
            evicted: 9,
            ..ReuseCounters::default()
        };
        let p = next_policy(&observed(Retention::DEFAULT, reuse));
        assert_eq!(
            p,
            Retention {
                delay_ms: MIN_DELAY_MS,
                floor: 0,
                live_shift: 1
            }
        );
        // The next run, which behaves alike, keeps it (no rewrite of the plan).
        assert_eq!(next_policy(&observed(p, reuse)), p);
    }

    #[test]
    fn reuse_after_the_delay_lengthens_it_and_the_longer_delay_holds() {
        // 700 ms pauses: the default 500 ms delay unmapped what the next request wanted.
        let first = ReuseCounters {
            puts: 2,
            misses: 2,
            expired: 1,
            ghost_expired: 1,
            longest_ghost_wait_ms: 700,
            ..ReuseCounters::default()
        };
        let p = next_policy(&observed(Retention::DEFAULT, first));
        assert_eq!(p.delay_ms, 2048);
        assert_eq!((p.floor, p.live_shift), (16 << 20, 1));
        // With it the mapping is reused after 700 ms: the policy stays.
        let second = ReuseCounters {
            puts: 2,
            hits: 1,
            misses: 1,
            longest_hit_wait_ms: 700,
            ..ReuseCounters::default()
        };
        assert_eq!(next_policy(&observed(p, second)), p);
        // Waits are bounded by the longest delay.
        let long = ReuseCounters {
            longest_ghost_wait_ms: 4_900,
            ..first
        };
        assert_eq!(
            next_policy(&observed(Retention::DEFAULT, long)).delay_ms,
            MAX_DELAY_MS
        );
    }

    #[test]
    fn quick_reuse_shortens_the_delay() {
        let reuse = ReuseCounters {
            puts: 5000,
            hits: 4900,
            misses: 100,
            longest_hit_wait_ms: 40,
            ..ReuseCounters::default()
        };
        let p = next_policy(&observed(Retention::DEFAULT, reuse));
        assert_eq!(p.delay_ms, 128);
        assert_eq!((p.floor, p.live_shift), (16 << 20, 1));
    }

    #[test]
    fn reuse_lost_to_the_budget_grows_it_until_none_is_lost() {
        let lossy = ReuseCounters {
            puts: 1000,
            hits: 700,
            misses: 300,
            evicted: 200,
            ghost_evicted: 100,
            longest_hit_wait_ms: 10,
            ..ReuseCounters::default()
        };
        let p = next_policy(&observed(Retention::DEFAULT, lossy));
        assert_eq!((p.floor, p.live_shift), (32 << 20, 0));
        let q = next_policy(&observed(p, lossy));
        assert_eq!((q.floor, q.live_shift), (64 << 20, 0));
        // Bounded.
        let mut r = q;
        for _ in 0..10 {
            r = next_policy(&observed(r, lossy));
        }
        assert_eq!(r.floor, MAX_FLOOR);
        // A few lost (under one in eight reuses) do not grow it; none lost keeps it.
        let few = ReuseCounters {
            ghost_evicted: 5,
            ..lossy
        };
        assert_eq!(next_policy(&observed(q, few)).floor, q.floor);
        let none = ReuseCounters {
            ghost_evicted: 0,
            ..lossy
        };
        assert_eq!(next_policy(&observed(q, none)), q);
    }

    /// Counters of a run that took `cpu_ms` of CPU time and counted depths.
    fn weighed(
        cpu_ms: u64,
        reused_by_depth: [u64; DEPTH_BUCKETS],
        lost_bytes: u64,
    ) -> ReuseCounters {
        ReuseCounters {
            puts: 100,
            hits: 90,
            misses: 10,
            ghost_evicted: 5,
            longest_hit_wait_ms: 10,
            reused_by_depth,
            lost_bytes,
            cpu_ms,
            ..ReuseCounters::default()
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_budget_shrinks_to_the_depth_costly_reuse_was_found_at() {
        // 3 s of CPU: the faults of lost reuse may cost 60 ms, 20,000 pages, 78 MiB.
        // 400 MiB reused within 4 MiB of the newest and 40 MiB deeper: a 4 MiB floor
        // loses 40 MiB of reuse, within the allowance; 2 MiB would lose 440.
        let r = weighed(3000, [0, 0, 400 * MIB, 40 * MIB, 0, 0, 0, 0], 0);
        let p = next_policy(&observed(Retention::DEFAULT, r));
        assert_eq!((p.floor, p.live_shift), (4 << 20, MAX_LIVE_SHIFT));
        // The next run, under it, reuses nothing deeper and loses the 40 MiB: it keeps
        // the policy (no rewrite of the plan).
        let under = weighed(3000, [0, 0, 400 * MIB, 0, 0, 0, 0, 0], 40 * MIB);
        assert_eq!(next_policy(&observed(p, under)), p);
    }

    #[test]
    fn reuse_cheaper_than_its_memory_keeps_no_floor() {
        // 10 MiB reused in a run of 3 s: its faults cost 7.7 ms, under 60 ms.
        let r = weighed(3000, [0, 10 * MIB, 0, 0, 0, 0, 0, 0], 0);
        let p = next_policy(&observed(Retention::DEFAULT, r));
        assert_eq!((p.floor, p.live_shift), (0, MAX_LIVE_SHIFT));
        // A short run reusing as much (30 ms of CPU: 0.6 ms allowed) keeps 2 MiB.
        let short = weighed(30, [0, 10 * MIB, 0, 0, 0, 0, 0, 0], 0);
        let q = next_policy(&observed(Retention::DEFAULT, short));
        assert_eq!((q.floor, q.live_shift), (2 << 20, MAX_LIVE_SHIFT));
        // Reuse deeper than 64 MiB needs the largest floor.
        let deep = weighed(30, [0, 0, 0, 0, 0, 0, 0, 10 * MIB], 0);
        assert_eq!(
            next_policy(&observed(Retention::DEFAULT, deep)).floor,
            MAX_FLOOR
        );
    }

    #[test]
    fn reuse_lost_at_more_than_twice_the_allowance_grows_the_budget() {
        let was = Retention {
            delay_ms: 128,
            floor: 4 << 20,
            live_shift: MAX_LIVE_SHIFT,
        };
        // 3 s of CPU allow 60 ms of faults: 100 MiB lost costs 77 ms (kept as it is),
        // 200 MiB 154 ms (grown).
        let band = weighed(3000, [0, 0, 10 * MIB, 0, 0, 0, 0, 0], 100 * MIB);
        assert_eq!(next_policy(&observed(was, band)).floor, was.floor);
        let costly = weighed(3000, [0, 0, 10 * MIB, 0, 0, 0, 0, 0], 200 * MIB);
        let p = next_policy(&observed(was, costly));
        assert_eq!((p.floor, p.live_shift), (8 << 20, MAX_LIVE_SHIFT - 1));
        // From no floor at all, it starts at 2 MiB.
        let none = Retention { floor: 0, ..was };
        assert_eq!(next_policy(&observed(none, costly)).floor, 2 << 20);
    }

    #[test]
    fn depths_fall_in_power_of_two_buckets_from_1_mib() {
        use crate::large::depth_bucket;
        let mib = 1usize << 20;
        let cases = [
            (0, 0),
            (mib, 0),
            (mib + 1, 1),
            (2 * mib, 1),
            (2 * mib + 1, 2),
            (64 * mib, 6),
            (64 * mib + 1, 7),
            (usize::MAX, 7),
        ];
        for (depth, bucket) in cases {
            assert_eq!(depth_bucket(depth), bucket, "depth {depth}");
        }
    }
}
