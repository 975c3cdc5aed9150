//! On-disk cache of analysis results, so a program's repeat starts skip the analysis.
//!
//! Location: `$LGMALLOC_CACHE_DIR`, else `$XDG_CACHE_HOME/lgmalloc`, else
//! `$HOME/.cache/lgmalloc`. One file per analysed binary, named after its GNU build-id
//! and size (`b-<hex>-<size>`), or after device, inode, size and mtime when it has no
//! build-id (`i-...`).
//!
//! Format (little-endian): magic `LGMACACH`, format version (u32), payload length
//! (u64), checksum of the payload (u64, word-wise FNV-1a), payload. An entry with another
//! version, a bad checksum or any inconsistency is ignored (and later overwritten).
//! Entries are written to a temporary file and renamed, so readers never see half an
//! entry. Bump [`FORMAT_VERSION`] whenever the analysis changes its results.

use std::path::PathBuf;

use super::alloc_fn::{AllocFn, ArgReg, SizeArg};
use super::elf::quick_build_id;
use super::mmap::FileId;
use super::{Analysis, CallSite, Callee, confidence};

const MAGIC: &[u8; 8] = b"LGMACACH";
pub(crate) const FORMAT_VERSION: u32 = 2;
const HEADER: usize = 8 + 4 + 8 + 8;

fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("LGMALLOC_CACHE_DIR") {
        return Some(d);
    }
    if let Some(d) = var("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return Some(d.join("lgmalloc"));
    }
    var("HOME").map(|h| h.join(".cache").join("lgmalloc"))
}

/// The cache entry path for this file, or `None` when there is no cache directory or
/// the file is not an ELF (the analysis will report why).
pub(crate) fn key(bytes: &[u8], id: &FileId) -> Option<PathBuf> {
    let dir = cache_dir()?;
    let name = match quick_build_id(bytes).ok()? {
        Some(b) => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("b-{hex}-{}", id.size)
        }
        None => format!(
            "i-{}-{}-{}-{}.{}",
            id.dev, id.ino, id.size, id.mtime, id.mtime_nsec
        ),
    };
    Some(dir.join(name))
}

/// The cached analysis at `path`, if present and intact.
pub(crate) fn load(path: &PathBuf) -> Option<Analysis> {
    let data = std::fs::read(path).ok()?;
    let mut a = decode(&data)?;
    a.from_cache = true;
    Some(a)
}

/// Stores `a` at `path`; failures (read-only home, full disk) are ignored.
pub(crate) fn store(path: &PathBuf, a: &Analysis) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_extension(format!("tmp.{}.{nanos}", std::process::id()));
    if std::fs::write(&tmp, encode(a)).is_err() || std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
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
    p.push(u8::from(s.tail) | u8::from(s.via_wrapper) << 1 | u8::from(s.size.is_some()) << 2);
    p.extend_from_slice(&s.callee.to_le_bytes());
    p.extend_from_slice(&s.size.unwrap_or(0).to_le_bytes());
    p.extend_from_slice(&s.confidence.to_bits().to_le_bytes());
}

pub(crate) fn decode(data: &[u8]) -> Option<Analysis> {
    let mut r = Reader { data, pos: 0 };
    if r.take(8)? != MAGIC || r.u32()? != FORMAT_VERSION {
        return None;
    }
    let len = usize::try_from(r.u64()?).ok()?;
    let sum = r.u64()?;
    let payload = r.take(len)?;
    if r.pos != data.len() || checksum(payload) != sum {
        return None;
    }
    let mut r = Reader {
        data: payload,
        pos: 0,
    };
    let build_id = match r.u8()? {
        0 => None,
        1 => Some(r.bytes()?.to_vec()),
        _ => return None,
    };
    let text_bytes = r.u64()?;
    let pie = r.flag()?;
    let n = r.count(20)?;
    let callees = (0..n).map(|_| r.callee()).collect::<Option<Vec<_>>>()?;
    let n = r.count(26)?;
    let call_sites = (0..n).map(|_| r.site()).collect::<Option<Vec<_>>>()?;
    let valid = |i: u32| (i as usize) < callees.len();
    if r.pos != payload.len()
        || !call_sites.iter().all(|s| valid(s.callee))
        || !callees.iter().all(|c| c.wraps.is_none_or(valid))
    {
        return None;
    }
    let size_classes = confidence::predicted_sizes(&call_sites);
    Some(Analysis {
        build_id,
        text_bytes,
        pie,
        callees,
        call_sites,
        size_classes,
        from_cache: true,
    })
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

    /// An element count, rejected if the rest cannot hold `min_size` bytes per element.
    fn count(&mut self, min_size: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n.checked_mul(min_size)? <= self.data.len() - self.pos).then_some(n)
    }

    fn reg(&mut self) -> Option<ArgReg> {
        ArgReg::from_index(self.u8()?)
    }

    fn callee(&mut self) -> Option<Callee> {
        let name = String::from_utf8(self.bytes()?.to_vec()).ok()?;
        let addr = self.u64()?;
        let func = AllocFn::from_code(self.u8()?)?;
        let arg = match self.u8()? {
            0 => {
                let r = self.reg()?;
                self.u8()?;
                SizeArg::Reg(r)
            }
            1 => SizeArg::Product(self.reg()?, self.reg()?),
            _ => return None,
        };
        let has_wraps = self.flag()?;
        let wraps = self.u32()?;
        let depth = self.u8()?;
        let has_zero = self.flag()?;
        let zero = self.u8()?;
        Some(Callee {
            name,
            addr,
            func,
            arg,
            wraps: has_wraps.then_some(wraps),
            depth,
            zero_to: has_zero.then_some(zero),
        })
    }

    fn site(&mut self) -> Option<CallSite> {
        let site = self.u64()?;
        let len = self.u8()?;
        let bits = self.u8()?;
        let callee = self.u32()?;
        let size = self.u64()?;
        let confidence = f32::from_bits(self.u32()?);
        if bits > 7 || !(0.0..=1.0).contains(&confidence) {
            return None;
        }
        Some(CallSite {
            site,
            len,
            tail: bits & 1 != 0,
            callee,
            size: (bits & 4 != 0).then_some(size),
            confidence,
            via_wrapper: bits & 2 != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Analysis {
        let callees = vec![
            Callee {
                name: "malloc".into(),
                addr: 0x1030,
                func: AllocFn::Malloc,
                arg: SizeArg::Reg(ArgReg::Rdi),
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
            },
            CallSite {
                site: 0x1200,
                len: 6,
                tail: true,
                callee: 1,
                size: None,
                confidence: 0.0,
                via_wrapper: true,
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
}
