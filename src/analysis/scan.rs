//! The byte scan: finds, without decoding, every place in the code that may be a
//! `call`/`jmp rel32` (`E8`/`E9`, and the short `jmp` `EB`) to a target or a `call`/`jmp [rip+X]` (`FF 15`/`FF 25`)
//! through a target slot.
//!
//! A hit is only a candidate (the bytes may sit inside another instruction); the
//! decoder confirms it. Only the functions holding hits are decoded, which is what makes
//! the analysis several times faster than disassembling everything.
//!
//! The first scan also remembers every candidate whose destination lies in the code
//! ([`Candidates`]): the later passes, whose targets are the wrappers just found, filter
//! that list instead of reading the whole code again.

use super::elf::{CodeRange, Elf};
use super::targets::Targets;

/// Candidate transfers of the whole code, recorded by the first scan.
#[derive(Default)]
pub(crate) struct Candidates {
    /// Lowest code address; `rel` offsets are relative to it.
    base: u64,
    /// One past the highest code address.
    limit: u64,
    /// `(site, destination)` of `E8`/`E9`/`EB` candidates landing in `base..limit`.
    rel: Vec<(u32, u32)>,
    /// `(site, slot)` of `FF 15`/`FF 25` candidates.
    slots: Vec<(u64, u64)>,
    /// The list covers the code (its span fits the 32-bit offsets).
    complete: bool,
}

impl Candidates {
    fn prepare(&mut self, elf: &Elf) {
        self.rel.clear();
        self.slots.clear();
        self.base = elf.code.iter().map(|r| r.start).min().unwrap_or(0);
        self.limit = elf.code.iter().map(|r| r.end).max().unwrap_or(0);
        self.complete = self.limit.saturating_sub(self.base) <= u64::from(u32::MAX);
    }

    /// Whether every code target of `targets` can be found in the list.
    fn covers(&self, targets: &Targets) -> bool {
        self.complete
            && targets
                .code
                .bounds()
                .is_none_or(|(lo, hi)| lo >= self.base && hi < self.limit)
    }

    #[inline]
    fn record_rel(&mut self, here: u64, dest: u64) {
        if self.complete && dest >= self.base && dest < self.limit {
            self.rel
                .push(((here - self.base) as u32, (dest - self.base) as u32));
        }
    }
}

const LO7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const E8S: u64 = 0xe8e8_e8e8_e8e8_e8e8;
const FE: u64 = 0xfefe_fefe_fefe_fefe;
const EBS: u64 = 0xebeb_ebeb_ebeb_ebeb;
const X30: u64 = 0x3030_3030_3030_3030;
const X35: u64 = 0x3535_3535_3535_3535;

/// Bit 7 of each byte of the result is set exactly where that byte of `v` is zero.
#[inline]
fn zero_bytes(v: u64) -> u64 {
    !(((v & LO7).wrapping_add(LO7)) | v | LO7)
}

/// Bytes of `w` that may start a candidate: `E8`, `E9`, `EB`, or `FF` followed (in `next`,
/// the word one byte further) by a ModRM of the form `x5` with x in 0..=3, which
/// covers `15` and `25`. `FF` alone is far too common (immediates, displacements).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
#[inline]
fn candidates(w: u64, next: u64) -> u64 {
    zero_bytes((w ^ E8S) & FE)
        | zero_bytes(w ^ EBS)
        | (zero_bytes(!w) & zero_bytes((next | X30) ^ X35))
}

/// Appends the address of every hit (the opcode byte) to `out`, in address order, and
/// records all candidates in `cands` for [`rescan`].
pub(crate) fn scan(elf: &Elf, targets: &Targets, out: &mut Vec<u64>, cands: &mut Candidates) {
    cands.prepare(elf);
    for range in &elf.code {
        scan_range(elf, range, targets, out, cands);
    }
}

/// The hits for new `targets` among the candidates of the first [`scan`] (the same as
/// scanning again), appended to `out` in no particular order.
pub(crate) fn rescan(elf: &Elf, targets: &Targets, out: &mut Vec<u64>, cands: &mut Candidates) {
    if targets.is_empty() {
        return;
    }
    if !cands.covers(targets) {
        return scan(elf, targets, out, cands);
    }
    let base = cands.base;
    for &(site, dest) in &cands.rel {
        if targets.code.get(base + u64::from(dest)).is_some() {
            out.push(base + u64::from(site));
        }
    }
    for &(site, slot) in &cands.slots {
        if targets.slot_callee(elf, slot).is_some() {
            out.push(site);
        }
    }
}

#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn word(bytes: &[u8], at: usize) -> Option<u64> {
    let s = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

fn scan_range(
    elf: &Elf,
    range: &CodeRange,
    targets: &Targets,
    out: &mut Vec<u64>,
    cands: &mut Candidates,
) {
    let bytes = elf.range_bytes(range);
    let mut scan = Check {
        elf,
        bytes,
        base: range.start,
        targets,
        out,
        cands,
    };
    let done = blocks(bytes, |p| scan.check(p));
    for j in done..bytes.len() {
        if matches!(bytes.get(j), Some(0xe8 | 0xe9 | 0xeb | 0xff)) {
            scan.check(j);
        }
    }
}

/// Calls `found` for every candidate position of whole 16-byte blocks (SSE2), leaving
/// at least 16 bytes after the last block so that operands and the next byte are in
/// the slice; returns where the byte-wise tail starts.
#[cfg(target_arch = "x86_64")]
fn blocks(bytes: &[u8], found: impl FnMut(usize)) -> usize {
    // SAFETY: SSE2 is part of the x86-64 baseline, always available.
    unsafe { blocks_sse2(bytes, found) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn blocks_sse2(bytes: &[u8], mut found: impl FnMut(usize)) -> usize {
    use core::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    let fe = _mm_set1_epi8(0xfeu8 as i8);
    let e8 = _mm_set1_epi8(0xe8u8 as i8);
    let eb = _mm_set1_epi8(0xebu8 as i8);
    let ff = _mm_set1_epi8(-1);
    let x30 = _mm_set1_epi8(0x30);
    let x35 = _mm_set1_epi8(0x35);
    let mut i = 0usize;
    while i + 32 <= bytes.len() {
        let Some(block) = bytes.get(i..i + 17) else {
            break;
        };
        // SAFETY: `block` holds 17 bytes, so 16-byte unaligned loads at offsets 0 and 1
        // stay inside it.
        let (a, b) = unsafe {
            let p = block.as_ptr();
            (
                _mm_loadu_si128(p.cast::<__m128i>()),
                _mm_loadu_si128(p.add(1).cast::<__m128i>()),
            )
        };
        let call = _mm_or_si128(
            _mm_cmpeq_epi8(_mm_and_si128(a, fe), e8),
            _mm_cmpeq_epi8(a, eb),
        );
        let slot = _mm_and_si128(
            _mm_cmpeq_epi8(a, ff),
            _mm_cmpeq_epi8(_mm_or_si128(b, x30), x35),
        );
        let mut m = _mm_movemask_epi8(_mm_or_si128(call, slot)) as u32;
        while m != 0 {
            found(i + m.trailing_zeros() as usize);
            m &= m - 1;
        }
        i += 16;
    }
    i
}

/// Portable version of the block scan, eight bytes at a time.
#[cfg(not(target_arch = "x86_64"))]
fn blocks(bytes: &[u8], mut found: impl FnMut(usize)) -> usize {
    let mut i = 0usize;
    while i + 16 <= bytes.len() {
        let (Some(w), Some(next)) = (word(bytes, i), word(bytes, i + 1)) else {
            break;
        };
        let mut m = candidates(w, next);
        while m != 0 {
            found(i + (m.trailing_zeros() / 8) as usize);
            m &= m - 1;
        }
        i += 8;
    }
    i
}

#[inline]
fn rel32(bytes: &[u8], at: usize) -> Option<i64> {
    let s = bytes.get(at..at.checked_add(4)?)?;
    Some(i32::from_le_bytes(s.try_into().ok()?) as i64)
}

/// One code range being scanned.
struct Check<'s, 'a> {
    elf: &'s Elf<'a>,
    bytes: &'a [u8],
    base: u64,
    targets: &'s Targets,
    out: &'s mut Vec<u64>,
    cands: &'s mut Candidates,
}

impl Check<'_, '_> {
    #[inline]
    fn check(&mut self, p: usize) {
        let here = self.base + p as u64;
        let bytes = self.bytes;
        match bytes.get(p) {
            // A tail call to a neighbouring wrapper can be a short `jmp`.
            Some(0xeb) => {
                let Some(&rel) = bytes.get(p + 1) else {
                    return;
                };
                let dest = here.wrapping_add(2).wrapping_add(rel as i8 as i64 as u64);
                self.transfer(here, dest);
            }
            Some(0xe8 | 0xe9) => {
                let Some(rel) = rel32(bytes, p + 1) else {
                    return;
                };
                let dest = here.wrapping_add(5).wrapping_add(rel as u64);
                self.transfer(here, dest);
            }
            Some(0xff) if matches!(bytes.get(p + 1), Some(0x15 | 0x25)) => {
                let Some(rel) = rel32(bytes, p + 2) else {
                    return;
                };
                let slot = here.wrapping_add(6).wrapping_add(rel as u64);
                self.cands.slots.push((here, slot));
                if self.targets.slot_callee(self.elf, slot).is_some() {
                    self.out.push(here);
                }
            }
            _ => {}
        }
    }

    #[inline]
    fn transfer(&mut self, here: u64, dest: u64) {
        self.cands.record_rel(here, dest);
        if self.targets.code.get(dest).is_some() {
            self.out.push(here);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::candidates;

    #[test]
    fn candidate_mask_is_exact() {
        for b in 0..=255u8 {
            for modrm in [0x15u8, 0x25, 0x05, 0x35, 0x14, 0x90, 0xff] {
                for pos in 0..8 {
                    let mut bytes = [0x90u8; 9];
                    bytes[pos] = b;
                    bytes[pos + 1] = if b == 0xff { modrm } else { 0x90 };
                    let w = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                    let next = u64::from_le_bytes(bytes[1..].try_into().unwrap());
                    let want =
                        matches!(b, 0xe8 | 0xe9 | 0xeb) || (b == 0xff && modrm & 0xcf == 0x05);
                    let m = candidates(w, next);
                    assert_eq!(
                        m == 1u64 << (pos * 8 + 7),
                        want,
                        "byte {b:#x} {modrm:#x} at {pos}"
                    );
                    assert_eq!(m == 0, !want);
                }
            }
        }
    }
}

#[cfg(test)]
mod rescan_tests {
    use super::{Candidates, rescan, scan};
    use crate::analysis::elf::Elf;
    use crate::analysis::targets::Targets;

    /// For any code targets, filtering the first scan's candidates finds exactly what a
    /// full scan finds.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "reads a real executable: file access is isolated under Miri"
    )]
    fn rescan_equals_a_full_scan() {
        let bytes = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let elf = Elf::parse(&bytes).unwrap();
        let mut first = Targets::default();
        first.finish();
        let mut cands = Candidates::default();
        scan(&elf, &first, &mut Vec::new(), &mut cands);
        assert!(cands.complete && !cands.rel.is_empty());
        // Targets: a spread of destinations seen by the scan (real and false ones).
        let mut targets = Targets::default();
        for (i, &(_, dest)) in cands.rel.iter().step_by(97).enumerate() {
            targets.code.insert(cands.base + u64::from(dest), i as u32);
        }
        targets.finish();
        let mut full = Vec::new();
        scan(&elf, &targets, &mut full, &mut Candidates::default());
        let mut filtered = Vec::new();
        rescan(&elf, &targets, &mut filtered, &mut cands);
        full.sort_unstable();
        filtered.sort_unstable();
        assert!(!full.is_empty());
        assert_eq!(full, filtered);
    }
}
