//! On-disk cache of analysis results, so a program's repeat starts skip the analysis.
//!
//! Location: see [`CacheDir::location`]. One file per analysed binary, named after its GNU build-id
//! and size (`b-<hex>-<size>`), or after device, inode, size and mtime when it has no
//! build-id (`i-...`).
//!
//! Format (little-endian): magic `LGMACACH`, format version (u32), payload length
//! (u64), checksum of the payload (u64, word-wise FNV-1a), payload. An entry with another
//! version, a bad checksum or any inconsistency is ignored (and later overwritten).
//! Entries are written to a temporary file and renamed, so readers never see half an
//! entry. Bump [`FORMAT_VERSION`] whenever the analysis changes its results.
//!
//! The file is untrusted: [`decode_checked`] bounds every count before allocating and
//! validates every value (tags, addresses, instruction lengths, confidences, callee
//! references); an entry that fails is ignored with one `LGMALLOC_VERBOSE` line and
//! overwritten by the next analysis. Files go through [`CacheDir`] (ownership, modes,
//! no symbolic links, size bound, LRU eviction).

use core::fmt::Write;
use std::path::{Path, PathBuf};

use super::alloc_fn::{AllocFn, ArgReg, SizeArg};
use super::cache_dir::CacheDir;
use super::elf::quick_build_id;
use super::mmap::FileId;
use super::{Analysis, CallSite, Callee, confidence};

const MAGIC: &[u8; 8] = b"LGMACACH";
pub(crate) const FORMAT_VERSION: u32 = 4;
const HEADER: usize = 8 + 4 + 8 + 8;

/// The cache entry path for this file, or `None` when there is no usable cache
/// directory (see [`CacheDir::open`]) or the file is not an ELF (the analysis will
/// report why).
pub(crate) fn key(bytes: &[u8], id: &FileId) -> Option<PathBuf> {
    // Opened and checked here, not only at load and store: callers keep their own files
    // beside the entry (plans, observations), and a refused directory must give them
    // no path either.
    let dir = CacheDir::open()?.path().to_path_buf();
    let name = match quick_build_id(bytes).ok()? {
        Some(b) => {
            // By hand: a `format!` per byte cost every start-up about 10k instructions
            // per module.
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            let mut name = String::with_capacity(2 + 2 * b.len() + 24);
            name.push_str("b-");
            for &x in b {
                name.push(char::from(DIGITS[usize::from(x >> 4)]));
                name.push(char::from(DIGITS[usize::from(x & 15)]));
            }
            let _ = write!(name, "-{}", id.size);
            name
        }
        None => format!(
            "i-{}-{}-{}-{}.{}",
            id.dev, id.ino, id.size, id.mtime, id.mtime_nsec
        ),
    };
    Some(dir.join(name))
}

/// The cached analysis at `path`, if present and valid (see [`decode_checked`]).
pub(crate) fn load(path: &Path) -> Option<Analysis> {
    let (dir, name) = CacheDir::open_for(path)?;
    dir.load_analysis(&name)
}

/// Stores `a` at `path` (through the cache directory: 0600, renamed into place, LRU
/// eviction after); failures (read-only or refused directory, full disk) are ignored.
pub(crate) fn store(path: &Path, a: &Analysis) {
    if let Some((dir, name)) = CacheDir::open_for(path) {
        dir.store_analysis(&name, a);
    }
}

/// FNV-1a over 64-bit words (then the tail bytes): detects corruption, eight times
/// faster than byte-wise FNV on the large entries of big programs.
fn checksum(data: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut words = data.chunks_exact(8);
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in &mut words {
        let v = w.try_into().map_or(0, u64::from_le_bytes);
        h = (h ^ v).wrapping_mul(PRIME).rotate_left(23);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    h ^ data.len() as u64
}

pub(crate) fn encode(a: &Analysis) -> Vec<u8> {
    let mut p = Vec::with_capacity(64 + a.callees.len() * 32 + a.call_sites.len() * 32);
    match &a.build_id {
        Some(b) => {
            p.push(1);
            put_bytes(&mut p, b);
        }
        None => p.push(0),
    }
    p.extend_from_slice(&a.text_bytes.to_le_bytes());
    p.push(u8::from(a.pie));
    p.extend_from_slice(&(a.callees.len() as u32).to_le_bytes());
    for c in &a.callees {
        put_callee(&mut p, c);
    }
    p.extend_from_slice(&(a.call_sites.len() as u32).to_le_bytes());
    for s in &a.call_sites {
        put_site(&mut p, s);
    }
    let mut out = Vec::with_capacity(HEADER + p.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(p.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(&p).to_le_bytes());
    out.extend_from_slice(&p);
    out
}

fn put_bytes(p: &mut Vec<u8>, b: &[u8]) {
    p.extend_from_slice(&(b.len() as u32).to_le_bytes());
    p.extend_from_slice(b);
}

fn put_callee(p: &mut Vec<u8>, c: &Callee) {
    put_bytes(p, c.name.as_bytes());
    p.extend_from_slice(&c.addr.to_le_bytes());
    p.push(c.func.code());
    match c.arg {
        SizeArg::Reg(r) => p.extend_from_slice(&[0, r.index(), 0]),
        SizeArg::Product(x, y) => p.extend_from_slice(&[1, x.index(), y.index()]),
    }
    p.push(u8::from(c.wraps.is_some()));
    p.extend_from_slice(&c.wraps.unwrap_or(0).to_le_bytes());
    p.push(c.depth);
    p.push(u8::from(c.zero_to.is_some()));
    p.push(c.zero_to.unwrap_or(0));
}

fn put_site(p: &mut Vec<u8>, s: &CallSite) {
    p.extend_from_slice(&s.site.to_le_bytes());
    p.push(s.len);
    p.push(
        u8::from(s.tail)
            | u8::from(s.via_wrapper) << 1
            | u8::from(s.size.is_some()) << 2
            | u8::from(s.in_wrapper) << 3,
    );
    p.extend_from_slice(&s.callee.to_le_bytes());
    p.extend_from_slice(&s.size.unwrap_or(0).to_le_bytes());
    p.extend_from_slice(&s.confidence.to_bits().to_le_bytes());
}

/// Limits of a valid entry. The counts are also bounded by the bytes left (each element
/// has a minimum encoded size), so nothing is allocated before the data is known to be
/// there; these bounds reject values no analysis produces.
const MAX_BUILD_ID: usize = 64;
const MAX_NAME: usize = 1 << 16;
const MAX_CALLEES: usize = 1 << 20;
const MAX_SITES: usize = 1 << 24;
/// Link-time addresses and code sizes stay within the x86-64 user address space, so
/// adding a load bias to them cannot overflow.
const MAX_ADDR: u64 = 1 << 47;
/// The longest x86-64 instruction.
const MAX_INSN_LEN: u8 = 15;

/// [`decode_checked`] without the reason.
#[cfg(test)]
pub(crate) fn decode(data: &[u8]) -> Option<Analysis> {
    decode_checked(data).ok()
}

/// Under the fuzzer (`--cfg fuzzing`) the checksum is not compared, so mutated payloads
/// reach the validation below instead of all stopping here.
#[allow(unexpected_cfgs)]
fn checksum_ok(payload: &[u8], sum: u64) -> bool {
    cfg!(fuzzing) || checksum(payload) == sum
}

/// Decodes an entry and validates every value: `Err` names the first problem. The file
/// is untrusted input (a planted or corrupted entry must not steer the allocator).
pub(crate) fn decode_checked(data: &[u8]) -> Result<Analysis, &'static str> {
    let mut r = Reader { data, pos: 0 };
    if r.take(8).ok_or("truncated header")? != MAGIC {
        return Err("not an lgmalloc cache entry");
    }
    if r.u32().ok_or("truncated header")? != FORMAT_VERSION {
        return Err("another format version");
    }
    let len = r.u64().and_then(|n| usize::try_from(n).ok());
    let sum = r.u64().ok_or("truncated header")?;
    let payload = len
        .and_then(|n| r.take(n))
        .ok_or("payload shorter than its length")?;
    if r.pos != data.len() {
        return Err("bytes after the payload");
    }
    if !checksum_ok(payload, sum) {
        return Err("checksum mismatch");
    }
    let mut r = Reader {
        data: payload,
        pos: 0,
    };
    let bad = "truncated or malformed payload";
    let build_id = match r.u8().ok_or(bad)? {
        0 => None,
        1 => {
            let b = r.bytes().ok_or(bad)?;
            if b.is_empty() || b.len() > MAX_BUILD_ID {
                return Err("build-id length out of range");
            }
            Some(b.to_vec())
        }
        _ => return Err("bad build-id tag"),
    };
    let text_bytes = r.u64().ok_or(bad)?;
    if text_bytes > MAX_ADDR {
        return Err("code size out of range");
    }
    let pie = r.flag().ok_or(bad)?;
    let n = r
        .count(20, MAX_CALLEES)
        .ok_or("callee count out of range")?;
    let mut callees = Vec::new();
    callees.try_reserve_exact(n).map_err(|_| bad)?;
    for _ in 0..n {
        let c = r.callee()?;
        check_callee(&c, &callees)?;
        callees.push(c);
    }
    let n = r
        .count(26, MAX_SITES)
        .ok_or("call site count out of range")?;
    let mut call_sites: Vec<CallSite> = Vec::new();
    call_sites.try_reserve_exact(n).map_err(|_| bad)?;
    for _ in 0..n {
        let s = r.site()?;
        let callee = callees
            .get(s.callee as usize)
            .ok_or("call site refers to no callee")?;
        if s.via_wrapper != (callee.depth > 0) {
            return Err("call site's wrapper flag disagrees with its callee");
        }
        if call_sites.last().is_some_and(|p| p.site > s.site) {
            return Err("call sites out of order");
        }
        call_sites.push(s);
    }
    if r.pos != payload.len() {
        return Err("bytes after the call sites");
    }
    let size_classes = confidence::predicted_sizes(&call_sites);
    Ok(Analysis {
        build_id,
        text_bytes,
        pie,
        callees,
        call_sites,
        size_classes,
        from_cache: true,
    })
}

/// A callee is consistent with the ones before it: a wrapper wraps an earlier callee
/// (as the analysis builds them; this also rules out cycles), one level deeper and
/// with the same allocation function; only wrappers replace a zero size.
fn check_callee(c: &Callee, before: &[Callee]) -> Result<(), &'static str> {
    if c.name.is_empty() {
        return Err("callee without a name");
    }
    if c.addr >= MAX_ADDR {
        return Err("callee address out of range");
    }
    match c.wraps {
        None if c.depth != 0 || c.zero_to.is_some() => {
            Err("allocator with a wrapper's depth or zero size")
        }
        None => Ok(()),
        Some(w) => {
            let inner = before
                .get(w as usize)
                .ok_or("wrapper of a later or missing callee")?;
            if c.depth != inner.depth.saturating_add(1) || c.func != inner.func {
                return Err("wrapper inconsistent with the callee it wraps");
            }
            Ok(())
        }
    }
}

/// Bounds-checked reads of the cache payload.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.data.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn flag(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// An element count, rejected above `max` or if the rest cannot hold `min_size`
    /// bytes per element (checked before anything is allocated for them).
    fn count(&mut self, min_size: usize, max: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        let left = self.data.len().checked_sub(self.pos)?;
        (n <= max && n.checked_mul(min_size)? <= left).then_some(n)
    }

    fn reg(&mut self) -> Option<ArgReg> {
        ArgReg::from_index(self.u8()?)
    }

    fn callee(&mut self) -> Result<Callee, &'static str> {
        let bad = "truncated or malformed callee";
        let name = self.bytes().ok_or(bad)?;
        if name.len() > MAX_NAME {
            return Err("callee name too long");
        }
        let name = String::from_utf8(name.to_vec()).map_err(|_| "callee name not UTF-8")?;
        let addr = self.u64().ok_or(bad)?;
        let func =
            AllocFn::from_code(self.u8().ok_or(bad)?).ok_or("unknown allocation function")?;
        let arg = match self.u8().ok_or(bad)? {
            0 => {
                let r = self.reg().ok_or("unknown register")?;
                if self.u8().ok_or(bad)? != 0 {
                    return Err("bad padding in a size argument");
                }
                SizeArg::Reg(r)
            }
            1 => SizeArg::Product(
                self.reg().ok_or("unknown register")?,
                self.reg().ok_or("unknown register")?,
            ),
            _ => return Err("unknown size argument kind"),
        };
        let has_wraps = self.flag().ok_or(bad)?;
        let wraps = self.u32().ok_or(bad)?;
        let depth = self.u8().ok_or(bad)?;
        let has_zero = self.flag().ok_or(bad)?;
        let zero = self.u8().ok_or(bad)?;
        Ok(Callee {
            name,
            addr,
            func,
            arg,
            wraps: has_wraps.then_some(wraps),
            depth,
            zero_to: has_zero.then_some(zero),
        })
    }

    fn site(&mut self) -> Result<CallSite, &'static str> {
        let bad = "truncated call site";
        let site = self.u64().ok_or(bad)?;
        let len = self.u8().ok_or(bad)?;
        let bits = self.u8().ok_or(bad)?;
        let callee = self.u32().ok_or(bad)?;
        let size = self.u64().ok_or(bad)?;
        let confidence = f32::from_bits(self.u32().ok_or(bad)?);
        if bits > 15 {
            return Err("unknown call site flags");
        }
        if site >= MAX_ADDR || len == 0 || len > MAX_INSN_LEN {
            return Err("call site address or length out of range");
        }
        let has_size = bits & 4 != 0;
        // A NaN fails the range test too. Without a size the confidence is 0 (and a
        // stored size field is 0), as the analysis writes them.
        let in_range = (0.0..=1.0).contains(&confidence);
        if !in_range || (!has_size && (confidence != 0.0 || size != 0)) {
            return Err("confidence out of range");
        }
        Ok(CallSite {
            site,
            len,
            tail: bits & 1 != 0,
            callee,
            size: has_size.then_some(size),
            confidence,
            via_wrapper: bits & 2 != 0,
            in_wrapper: bits & 8 != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Analysis {
        let callees = vec![
            Callee {
                name: "calloc".into(),
                addr: 0x1030,
                func: AllocFn::Calloc,
                arg: SizeArg::Product(ArgReg::Rdi, ArgReg::Rsi),
                wraps: None,
                depth: 0,
                zero_to: None,
            },
            Callee {
                name: "xcalloc".into(),
                addr: 0x2000,
                func: AllocFn::Calloc,
                arg: SizeArg::Product(ArgReg::Rdi, ArgReg::Rsi),
                wraps: Some(0),
                depth: 1,
                zero_to: Some(1),
            },
        ];
        let call_sites = vec![
            CallSite {
                site: 0x1100,
                len: 5,
                tail: false,
                callee: 0,
                size: Some(72),
                confidence: 0.95,
                via_wrapper: false,
                in_wrapper: true,
            },
            CallSite {
                site: 0x1200,
                len: 6,
                tail: true,
                callee: 1,
                size: None,
                confidence: 0.0,
                via_wrapper: true,
                in_wrapper: false,
            },
        ];
        let size_classes = confidence::predicted_sizes(&call_sites);
        Analysis {
            build_id: Some(vec![1, 2, 3]),
            text_bytes: 4096,
            pie: true,
            callees,
            call_sites,
            size_classes,
            from_cache: true,
        }
    }

    #[test]
    fn round_trip() {
        let a = sample();
        assert_eq!(decode(&encode(&a)), Some(a));
    }

    #[test]
    fn corruption_is_rejected() {
        let data = encode(&sample());
        for i in 0..data.len() {
            let mut d = data.clone();
            d[i] ^= 0x41;
            assert_eq!(decode(&d), None, "flip at {i}");
        }
        for n in 0..data.len() {
            assert_eq!(decode(&data[..n]), None);
        }
    }
    /// The entry of `payload` with a correct header (as `encode` frames one).
    fn seal(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&checksum(payload).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let cases: [fn(&mut Analysis); 18] = [
            |a| a.call_sites[0].confidence = 1.5,
            |a| a.call_sites[0].confidence = f32::NAN,
            |a| a.call_sites[0].confidence = f32::INFINITY,
            |a| a.call_sites[0].confidence = -0.1,
            |a| a.call_sites[1].confidence = 0.5,
            |a| a.call_sites[0].callee = 7,
            |a| a.call_sites[0].len = 0,
            |a| a.call_sites[0].len = 16,
            |a| a.call_sites[0].site = 1 << 60,
            |a| a.call_sites.swap(0, 1),
            |a| a.call_sites[1].via_wrapper = false,
            |a| a.callees[1].wraps = Some(1),
            |a| a.callees[1].wraps = Some(5),
            |a| a.callees[1].depth = 3,
            |a| a.callees[0].zero_to = Some(1),
            |a| a.callees[0].addr = u64::MAX,
            |a| a.build_id = Some(vec![0; 65]),
            |a| a.text_bytes = u64::MAX,
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut a = sample();
            f(&mut a);
            assert!(decode_checked(&encode(&a)).is_err(), "case {i}");
        }
        // Enum tags: the first callee's function (byte 39 of the payload), size argument
        // kind (40) and registers (41, 42); and a count larger than the data.
        let payload = encode(&sample()).split_off(HEADER);
        assert!(decode_checked(&seal(&payload)).is_ok());
        for (at, value) in [(39, 200u8), (40, 5), (41, 99), (42, 99), (20, 0xff)] {
            let mut p = payload.clone();
            p[at] = value;
            assert!(decode_checked(&seal(&p)).is_err(), "byte {at} = {value}");
        }
    }
}
