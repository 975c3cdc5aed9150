//! Confidence of one site's size, and the predicted sizes aggregated from all sites.
//! The rules are documented in the module docs of [`crate::analysis`].

use super::dataflow::{ARITH, CALL, JOIN};
use super::{CallSite, PredictedSize};

/// A literal on a straight-line path to a direct allocator call.
pub(crate) const LITERAL: f32 = 0.95;
/// Constant folded through arithmetic, or kept in a callee-saved register across a call.
pub(crate) const DERIVED: f32 = 0.9;
/// Constant proven equal on every path into a join.
pub(crate) const JOINED: f32 = 0.85;
/// Factor for a call to a wrapper, per wrapper level (capped at three levels).
pub(crate) const WRAPPER_LEVEL: f32 = 0.9;
/// Extra factor when the wrapper replaces some sizes (`if (n == 0) n = 1`).
pub(crate) const ADJUSTED: f32 = 0.95;
/// A size class is never certain.
pub(crate) const CLASS_CAP: f32 = 0.99;

/// Confidence of a constant derived with `flags`, reaching a callee `depth` wrappers
/// away from the allocator.
pub(crate) fn site_confidence(flags: u8, depth: u8, adjusted: bool) -> f32 {
    let mut c = LITERAL;
    if flags & (ARITH | CALL) != 0 {
        c = c.min(DERIVED);
    }
    if flags & JOIN != 0 {
        c = c.min(JOINED);
    }
    let levels = i32::from(depth.min(3));
    // 0.95 * 0.9 = 0.855 for a literal passed to xmalloc.
    c *= WRAPPER_LEVEL.powi(levels);
    if adjusted {
        c *= ADJUSTED;
    }
    c
}

/// Groups sites with a predicted size: per size, the number of sites and
/// `1 - prod(1 - c_i)` (the chance that at least one site's prediction holds), capped.
pub(crate) fn predicted_sizes(sites: &[CallSite]) -> Vec<PredictedSize> {
    group(
        sites
            .iter()
            .filter_map(|s| {
                Some(PredictedSize {
                    size: s.size?,
                    sites: 1,
                    confidence: s.confidence,
                })
            })
            .collect(),
    )
}

/// Several files' predicted sizes as one (a program and its shared objects): a size
/// predicted in more than one combines as sites do.
pub(crate) fn merge(sizes: Vec<PredictedSize>) -> Vec<PredictedSize> {
    group(sizes)
}

/// Per size: the sites added up and the confidences combined, ascending by size.
fn group(mut items: Vec<PredictedSize>) -> Vec<PredictedSize> {
    items.sort_unstable_by_key(|p| p.size);
    let mut out: Vec<PredictedSize> = Vec::new();
    let mut miss = 1.0f32;
    for p in items {
        match out.last_mut() {
            Some(last) if last.size == p.size => last.sites += p.sites,
            _ => {
                miss = 1.0;
                out.push(PredictedSize {
                    confidence: 0.0,
                    ..p
                });
            }
        }
        miss *= 1.0 - p.confidence.clamp(0.0, 1.0);
        if let Some(last) = out.last_mut() {
            last.confidence = (1.0 - miss).min(CLASS_CAP);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidences_are_ordered() {
        let lit = site_confidence(0, 0, false);
        let arith = site_confidence(ARITH, 0, false);
        let join = site_confidence(JOIN, 0, false);
        let wrapped = site_confidence(0, 1, false);
        assert!(lit > arith && arith > join);
        assert!(lit > wrapped && wrapped > site_confidence(0, 2, false));
        assert!((0.0..=1.0).contains(&site_confidence(ARITH | JOIN | CALL, 9, true)));
    }

    #[test]
    fn classes_combine_sites() {
        let site = |size, confidence| CallSite {
            site: 0,
            len: 5,
            tail: false,
            callee: 0,
            size,
            confidence,
            via_wrapper: false,
            in_wrapper: false,
        };
        let sites = [
            site(Some(32), 0.5),
            site(None, 0.0),
            site(Some(32), 0.5),
            site(Some(8), 0.9),
        ];
        let sizes = predicted_sizes(&sites);
        assert_eq!(sizes.len(), 2);
        assert_eq!((sizes[0].size, sizes[0].sites), (8, 1));
        assert_eq!((sizes[1].size, sizes[1].sites), (32, 2));
        assert!((sizes[1].confidence - 0.75).abs() < 1e-6);
    }

    #[test]
    fn predicted_sizes_of_several_files_merge_by_size() {
        let planned = |size, sites, confidence| PredictedSize {
            size,
            sites,
            confidence,
        };
        let merged = merge(vec![
            planned(32, 1, 0.5),
            planned(8, 1, 0.9),
            planned(32, 2, 0.5),
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!((merged[0].size, merged[0].sites), (8, 1));
        assert_eq!((merged[1].size, merged[1].sites), (32, 3));
        assert!((merged[1].confidence - 0.75).abs() < 1e-6);
    }
}
