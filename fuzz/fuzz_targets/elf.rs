//! The ELF call-site analyzer on mutated executables: `analyze_elf` returns `Ok` or
//! `Err` for any input and never panics, loops forever or reads out of bounds (the
//! fuzzer runs it under AddressSanitizer). Seeds: small real ELF files that
//! `scripts/reliability` compiles (or copies) into `corpus/elf` before a run.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = lgmalloc::analysis::analyze_elf(data) {
        // Touch the results: a plan built from garbage must still be well formed.
        std::hint::black_box((a.call_sites.len(), a.size_classes.len(), a.callees.len()));
    }
});
