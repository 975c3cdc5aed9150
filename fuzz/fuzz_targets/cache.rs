//! The analysis cache format on mutated entries: `decode_analysis` returns `Ok` or
//! `Err` for any input and never panics or allocates more than the input justifies, and
//! whatever it accepts is well formed and survives a round trip unchanged. The library
//! is built with `--cfg fuzzing`, under which the payload checksum is not compared, so
//! mutations reach the validation. Seeds: entries of small real programs
//! (`fuzz/seeds/cache`).
#![no_main]

use lgmalloc::analysis::cache_dir::{decode_analysis, encode_analysis};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(a) = decode_analysis(data) else { return };
    for s in &a.call_sites {
        assert!(
            (0.0..=1.0).contains(&s.confidence),
            "confidence {}",
            s.confidence
        );
        assert!(s.size.is_some() || s.confidence == 0.0);
        assert!(a.callee(s).is_some(), "site refers to no callee");
        assert!((1..=15).contains(&s.len));
    }
    for (i, c) in a.callees.iter().enumerate() {
        // Wrappers point backwards, so following them always ends.
        assert!(c.wraps.is_none_or(|w| (w as usize) < i));
    }
    for p in a.predicted_sizes() {
        assert!((0.0..=1.0).contains(&p.confidence));
    }
    let again = decode_analysis(&encode_analysis(&a));
    assert_eq!(again.as_ref(), Ok(&a), "round trip changed the entry");
});
