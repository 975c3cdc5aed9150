//! Size classes shaped to the program: from the stored sampled profile, the requested
//! sizes that hold enough live bytes, and waste enough of them in their standard class,
//! to be worth an exact-fit class of their own.
//!
//! Static analysis finds sizes a program may ask for; the profile says how much memory
//! each one really holds. A size that wastes more than 1/32 of its standard block is a
//! candidate (the static rule, without that evidence, asks for 1/16). It is chosen when
//! the bytes its exact class would save exceed what the class costs: the partly used
//! page each thread that uses it keeps. Candidates rank by that net saving.

use super::learn::Learned;
use super::profile::{Profile, ProfileSite};
use crate::size_class::{self, TABLE_MAX_SIZE};

/// Profile-chosen exact-fit classes need their standard class to waste more than
/// `1 >> PROFILE_WASTE_SHIFT` (1/32) of a block.
pub(super) const PROFILE_WASTE_SHIFT: usize = 5;

/// Bytes a class's partly used page leaves unused in each thread that uses it, on
/// average: half of a full-grown page (the heap grows a busy class's pages to 64 KiB).
/// A small class's first pages are smaller, but a class worth shaping holds enough
/// bytes to reach full-sized pages.
const PARTLY_USED_PAGE_BYTES: f64 = (32 << 10) as f64;

/// A size the profile makes worth an exact-fit class.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct ShapedSize {
    /// The exact block size: the requested size rounded up to 16.
    pub(super) size: usize,
    /// Samples of it in the profile (over all runs stored).
    pub(super) samples: u64,
    /// Bytes per run the exact class is expected to save, less its cost.
    pub(super) net_saving: f64,
}

/// One requested size, summed over the sites that ask for it.
struct Candidate {
    size: usize,
    samples: u64,
    /// Expected live blocks of it (time-averaged, per run).
    live_blocks: f64,
    several_threads: bool,
}

/// Sizes that earn an exact-fit class, best net saving first, at most `room` of them.
///
/// Live bytes per site: each sample stands for `interval` allocated bytes. A sampled
/// block never freed before exit counts as live through the run (it holds memory from
/// its allocation to the end, and the peak sees it). A freed one counts for the share
/// of the run it lived (Little's law: mean live bytes = bytes allocated x mean lifetime
/// / run length). The profile records no run length, so the longest lifetime any
/// sampled block had stands for it: a lower bound, so a freed block weighs at most
/// what it would with the true length (capped at one: live for the whole run). A
/// program whose blocks all die young thus gets its short-lived sizes over-weighted;
/// the cost of a page per thread, and the waste threshold, keep that from adding
/// classes for sizes with few samples.
pub(super) fn exact_sizes(profile: &Profile, learned: &Learned, room: usize) -> Vec<ShapedSize> {
    if room == 0 {
        return Vec::new();
    }
    let mut chosen: Vec<ShapedSize> = candidates(profile)
        .iter()
        .filter_map(|c| {
            let standard = size_class::standard_block_size(c.size);
            if (standard - c.size) << PROFILE_WASTE_SHIFT <= standard {
                return None;
            }
            let net_saving = net_saving(c, learned);
            (net_saving > 0.0).then_some(ShapedSize {
                size: c.size,
                samples: c.samples,
                net_saving,
            })
        })
        .collect();
    chosen.sort_by(|a, b| {
        b.net_saving
            .total_cmp(&a.net_saving)
            .then(a.size.cmp(&b.size))
    });
    chosen.truncate(room);
    chosen
}

/// What the sampled profile decided when a plan was built: the exact-fit sizes it chose
/// ([`exact_sizes`]) within the room the plan's other classes left. The profile grows
/// with every run merged into it, and a choice made from a young one goes stale: a
/// program first run on small inputs would otherwise keep the plan those runs made.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct ProfileChoice {
    /// Exact-fit classes the profile could add.
    pub(super) room: usize,
    /// The block sizes it chose, ascending.
    pub(super) sizes: Vec<usize>,
}

impl ProfileChoice {
    /// The choice `shaped` (what [`exact_sizes`] returned for `room`) records.
    pub(super) fn new(room: usize, shaped: &[ShapedSize]) -> Self {
        let mut sizes: Vec<usize> = shaped.iter().map(|s| s.size).collect();
        sizes.sort_unstable();
        Self { room, sizes }
    }

    /// Whether `profile` (with the observations the plan was built from) still makes
    /// the same choice.
    pub(super) fn still_made_by(&self, profile: &Profile, learned: &Learned) -> bool {
        *self == Self::new(self.room, &exact_sizes(profile, learned, self.room))
    }
}

/// Whether an exact-fit class of `block` bytes (a multiple of 16) saves more than it
/// costs by `profile`'s evidence: a size the profile never sampled holds too few bytes
/// to pay for a partly used page.
pub(super) fn pays_off(profile: &Profile, learned: &Learned, block: usize) -> bool {
    candidates(profile)
        .iter()
        .find(|c| c.size == block)
        .is_some_and(|c| net_saving(c, learned) > 0.0)
}

/// Bytes per run an exact-fit class for `c` would save, less its cost.
fn net_saving(c: &Candidate, learned: &Learned) -> f64 {
    let waste = size_class::standard_block_size(c.size) - c.size;
    c.live_blocks * waste as f64 - threads_using(c, learned) * PARTLY_USED_PAGE_BYTES
}

/// The profile's requested sizes (rounded up to 16), summed over the sites asking for
/// them, with their expected live blocks (see [`exact_sizes`]).
fn candidates(profile: &Profile) -> Vec<Candidate> {
    if profile.runs == 0 || profile.interval == 0 {
        return Vec::new();
    }
    let run_ns = profile
        .sites
        .iter()
        .map(|s| s.lifetime_max_ns)
        .max()
        .unwrap_or(0);
    let per_sample = profile.interval as f64 / profile.runs as f64;
    let mut candidates: Vec<Candidate> = Vec::new();
    for s in &profile.sites {
        // An aligned request is served by an aligned standard class, never by the
        // table's routing.
        if s.align > 16 {
            continue;
        }
        let Some((requested, share)) = dominant_size(s) else {
            continue;
        };
        if requested == 0 || requested > TABLE_MAX_SIZE {
            continue;
        }
        // Lifetimes are known for the followed samples only (all of those up to 8 KiB,
        // a share of larger ones); they stand for the site's other samples.
        let never_freed = s.followed.saturating_sub(s.freed) as f64;
        let freed_weight = if run_ns == 0 {
            0.0
        } else {
            (s.lifetime_ns as f64 / run_ns as f64).min(s.freed as f64)
        };
        let live_samples = if s.followed == 0 {
            s.samples as f64
        } else {
            (never_freed + freed_weight) * s.samples as f64 / s.followed as f64
        };
        // The site's other sizes are assumed to live as long as its dominant one.
        let live_blocks = share * live_samples * per_sample / requested as f64;
        let size = requested.next_multiple_of(16);
        match candidates.iter_mut().find(|c| c.size == size) {
            Some(c) => {
                c.samples = c.samples.saturating_add(s.samples);
                c.live_blocks += live_blocks;
                c.several_threads |= s.threads > 1;
            }
            None => candidates.push(Candidate {
                size,
                samples: s.samples,
                live_blocks,
                several_threads: s.threads > 1,
            }),
        }
    }
    candidates
}

/// A site's samples must fall in one 16-byte block at least this often for it to count
/// as asking for that block's size.
const DOMINANT_MIN_SHARE: f64 = 0.9;

/// The size nearly all of a site's samples ask for, and the share of them that (at
/// least) do. A constant site is the plain case. The stored profile keeps only the
/// smallest and largest size each site saw over all runs, so one odd sample (an
/// interpreter's object allocator serving mostly one object size) would hide a site's
/// size for good; the mean bounds how many samples can lie away from either end: with
/// samples above the largest size's block (`hi - 16`) the ones outside it are at most
/// `hi - 16` bytes, so the share in it is at least
/// `(mean - (hi - 16)) / (max - (hi - 16))`, and likewise at the smallest size's end.
fn dominant_size(s: &ProfileSite) -> Option<(usize, f64)> {
    if s.size_min == s.size_max {
        return Some((s.size_min as usize, 1.0));
    }
    let mean = s.bytes as f64 / s.samples.max(1) as f64;
    let (min, max) = (s.size_min as f64, s.size_max as f64);
    // Sizes at or below `below_hi` lie outside the largest size's block; at or above
    // `above_lo`, outside the smallest's.
    let below_hi = (s.size_max.next_multiple_of(16) - 16) as f64;
    let above_lo = (s.size_min.next_multiple_of(16) + 1) as f64;
    let at_max = (mean - below_hi) / (max - below_hi);
    let at_min = (above_lo - mean) / (above_lo - min);
    if at_max >= DOMINANT_MIN_SHARE {
        Some((s.size_max as usize, at_max.min(1.0)))
    } else if at_min >= DOMINANT_MIN_SHARE {
        Some((s.size_min as usize, at_min.min(1.0)))
    } else {
        None
    }
}

/// Threads expected to use `c`'s class: one when the profile saw one; else as many
/// as earlier runs saw using its standard class (or the exact class, once it exists),
/// or as ran at all, and at least two ("several").
fn threads_using(c: &Candidate, learned: &Learned) -> f64 {
    if !c.several_threads {
        return 1.0;
    }
    let standard = size_class::standard_block_size(c.size);
    let using = learned
        .classes
        .iter()
        .filter(|l| l.0 == c.size || l.0 == standard)
        .map(|l| l.2)
        .max()
        .unwrap_or(learned.threads);
    using.max(2) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile of one run with sites of `(size, samples, freed, lifetime_ns,
    /// threads)`.
    fn profile(sites: &[(u64, u64, u64, u64, u64)]) -> Profile {
        Profile {
            runs: 1,
            interval: 256 << 10,
            modules: vec!["/prog".into()],
            sites: sites
                .iter()
                .enumerate()
                .map(
                    |(i, &(size, samples, freed, lifetime_ns, threads))| ProfileSite {
                        module: 0,
                        offset: i as u64 * 8,
                        samples,
                        followed: samples,
                        bytes: size * samples,
                        size_min: size,
                        size_max: size,
                        align: 16,
                        threads,
                        freed,
                        lifetime_ns,
                        lifetime_max_ns: lifetime_ns / freed.max(1),
                        calls: samples * ((256 << 10) / size),
                        mode_size: size_class::standard_block_size(size as usize) as u64,
                        mode_calls: samples * ((256 << 10) / size),
                    },
                )
                .collect(),
            classes: Vec::new(),
        }
    }

    fn sizes(p: &Profile) -> Vec<usize> {
        exact_sizes(p, &Learned::default(), 16)
            .iter()
            .map(|s| s.size)
            .collect()
    }

    // 4360 bytes: 4368-byte blocks in the 4608 class, 5.2% waste. 4512: 2.1%.
    #[test]
    fn a_live_size_wasting_over_1_32_gets_a_class_and_one_under_does_not() {
        // 128 samples never freed: 32 MiB live, 1.8 MB saved.
        assert_eq!(sizes(&profile(&[(4360, 128, 0, 0, 1)])), [4368]);
        assert_eq!(
            sizes(&profile(&[(4512, 128, 0, 0, 1)])),
            Vec::<usize>::new()
        );
        // 4448 wastes 160 (3.5%); 4464 exactly 1/32 (144), which is not more.
        assert_eq!(sizes(&profile(&[(4448, 128, 0, 0, 1)])), [4448]);
        assert_eq!(
            sizes(&profile(&[(4464, 128, 0, 0, 1)])),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn negligible_live_bytes_do_not_pay_for_a_page() {
        // One sample: 256 KiB, 13 KB saved, under half a 64 KiB page.
        assert_eq!(sizes(&profile(&[(4360, 1, 0, 0, 1)])), Vec::<usize>::new());
        // Three: 40 KB saved, over it.
        assert_eq!(sizes(&profile(&[(4360, 3, 0, 0, 1)])), [4368]);
        // Several threads pay a page each: three samples do not cover two pages.
        assert_eq!(sizes(&profile(&[(4360, 3, 0, 0, 2)])), Vec::<usize>::new());
        // Earlier runs saw eight threads use the class: 8 pages (256 KiB) outweigh
        // 16 samples' 231 KB; two pages do not.
        let learned = Learned {
            classes: vec![(4608, 1000, 8)],
            total: 1000,
            threads: 8,
            ..Learned::default()
        };
        let p = profile(&[(4360, 16, 0, 0, 2)]);
        assert!(exact_sizes(&p, &learned, 16).is_empty());
        assert_eq!(exact_sizes(&p, &Learned::default(), 16).len(), 1);
    }

    #[test]
    fn a_choice_goes_stale_when_the_grown_profile_chooses_otherwise() {
        let none = Learned::default();
        // One run with one sample of 4360 bytes chooses nothing (see above).
        let young = profile(&[(4360, 1, 0, 0, 1)]);
        let choice = ProfileChoice::new(16, &exact_sizes(&young, &none, 16));
        assert!(choice.sizes.is_empty() && choice.still_made_by(&young, &none));
        // Merged with a run of five, the profile holds three samples a run: 4368.
        let mut grown = young.clone();
        grown.merge(&profile(&[(4360, 5, 0, 0, 1)]));
        assert!(!choice.still_made_by(&grown, &none));
        let now = ProfileChoice::new(16, &exact_sizes(&grown, &none, 16));
        assert_eq!(now.sizes, [4368]);
        assert!(now.still_made_by(&grown, &none));
        // Without room for it the profile chooses nothing, then as now.
        let full = ProfileChoice::new(0, &[]);
        assert!(full.still_made_by(&grown, &none));
    }

    #[test]
    fn short_lived_blocks_weigh_by_their_share_of_the_run() {
        // 64 samples freed after 1 us each, beside a block that lived 1 s: negligible.
        let p = profile(&[(4360, 64, 64, 64_000, 1), (48, 1, 1, 1_000_000_000, 1)]);
        assert_eq!(sizes(&p), Vec::<usize>::new());
        // The same blocks freed after half the run weigh half: 16 MiB live.
        let p = profile(&[
            (4360, 64, 64, 32_000_000_000, 1),
            (48, 1, 1, 1_000_000_000, 1),
        ]);
        let shaped = exact_sizes(&p, &Learned::default(), 16);
        assert_eq!(shaped.len(), 1);
        let live = 32.0 * (256 << 10) as f64 / 4360.0 * 240.0;
        assert!((shaped[0].net_saving - (live - PARTLY_USED_PAGE_BYTES)).abs() < 1.0);
    }

    #[test]
    fn sites_of_one_size_add_up_and_the_best_come_first_within_room() {
        // Two sites of 2170 and 2176 bytes (2176-byte blocks, 5.6% in 2304), each too
        // small alone; 1090 bytes (1104 in 1152, 4.2%) with more bytes.
        let p = profile(&[(2170, 2, 0, 0, 1), (2176, 2, 0, 0, 1), (1090, 40, 0, 0, 1)]);
        assert_eq!(sizes(&p), [1104, 2176]);
        let best = exact_sizes(&p, &Learned::default(), 1);
        assert_eq!(best.len(), 1);
        assert_eq!((best[0].size, best[0].samples), (1104, 40));
        // Varying sizes and aligned requests have no exact fit.
        let mut varying = profile(&[(4360, 128, 0, 0, 1)]);
        varying.sites[0].size_max = 4400;
        varying.sites[0].bytes = 4380 * 128;
        assert!(sizes(&varying).is_empty());
        let mut aligned = profile(&[(4360, 128, 0, 0, 1)]);
        aligned.sites[0].align = 64;
        assert!(sizes(&aligned).is_empty());
        // More runs, the same samples: less per run.
        let mut runs = profile(&[(4360, 3, 0, 0, 1)]);
        runs.runs = 2;
        assert!(sizes(&runs).is_empty());
    }

    #[test]
    fn a_site_of_one_size_but_for_a_few_samples_counts_as_that_size() {
        // 10000 samples of 4368 bytes and one of 640: the mean (0.37 under 4368) shows
        // at least 97% of them in the 4368-byte block.
        let mut p = profile(&[(4368, 10001, 0, 0, 1)]);
        p.sites[0].size_min = 640;
        p.sites[0].bytes = 4368 * 10000 + 640;
        assert_eq!(sizes(&p), [4368]);
        let share = dominant_size(&p.sites[0]).unwrap();
        assert_eq!(share.0, 4368);
        assert!(share.1 > 0.97 && share.1 < 0.98, "{share:?}");
        // The same at the smallest end: 1090 bytes and one of 8000.
        let mut p = profile(&[(1090, 10001, 0, 0, 1)]);
        p.sites[0].size_max = 8000;
        p.sites[0].bytes = 1090 * 10000 + 8000;
        assert_eq!(sizes(&p), [1104]);
        // The mean cannot tell one far sample among 128 from many near ones.
        let mut p = profile(&[(4368, 129, 0, 0, 1)]);
        p.sites[0].size_min = 640;
        p.sites[0].bytes = 4368 * 128 + 640;
        assert!(sizes(&p).is_empty());
        // A fifth of them elsewhere: no size dominates.
        let mut p = profile(&[(4360, 100, 0, 0, 1)]);
        p.sites[0].size_min = 640;
        p.sites[0].bytes = 4360 * 80 + 640 * 20;
        assert!(sizes(&p).is_empty());
    }
}
