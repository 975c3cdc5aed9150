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
//! * When at least one in [`LOST_SHARE`] reuses was lost to the budget (a miss a mapping
//!   the budget evicted would have served), the floor doubles (from at least the
//!   default) and the budget's share of the live bytes doubles, up to the bounds. A
//!   budget that lost nothing stays as it was: it is what made those hits, and shrinking
//!   it back would undo the lesson the next run (the rules are a fixed point for a
//!   program that behaves alike run after run).

use crate::large::{MAX_DELAY_MS, MAX_FLOOR, MIN_DELAY_MS, Retention, ReuseCounters};

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

/// The policy for the next run, from what the last one observed (see the module text).
pub(crate) fn next_policy(observed: &LargeObserved) -> Retention {
    let (was, r) = (observed.policy, &observed.reuse);
    let reuses = r
        .hits
        .saturating_add(r.gathered)
        .saturating_add(r.ghost_evicted)
        .saturating_add(r.ghost_expired);
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
    let lost = r.ghost_evicted > 0 && r.ghost_evicted.saturating_mul(LOST_SHARE) >= reuses;
    let (floor, live_shift) = if lost {
        (
            was.floor
                .max(Retention::DEFAULT.floor)
                .saturating_mul(2)
                .min(MAX_FLOOR),
            was.live_shift.saturating_sub(1),
        )
    } else {
        (was.floor, was.live_shift)
    };
    Retention {
        delay_ms,
        floor,
        live_shift,
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
}
