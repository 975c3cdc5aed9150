//! The stored plan, observation and profile files on mutated input: each parser returns `Ok` or
//! `Err` for any bytes and never panics, and what it accepts is stable: writing it out
//! and parsing that again gives the same text. Seeds: a plan and an observations file of
//! a real run (`fuzz/seeds/plan`).
#![no_main]

use lgmalloc::fuzzing::{MAX_FILE_BYTES, reparse_learned, reparse_plan, reparse_profile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The runtime never reads more than this of either file.
    let data = &data[..data.len().min(MAX_FILE_BYTES)];
    for reparse in [reparse_plan, reparse_learned, reparse_profile] {
        if let Ok(text) = reparse(data) {
            assert_eq!(
                reparse(text.as_bytes()).as_deref(),
                Ok(text.as_str()),
                "an accepted file does not survive being written and read again"
            );
        }
    }
});
