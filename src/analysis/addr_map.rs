//! A small sorted address -> callee map with a bitmap pre-filter.
//!
//! The byte scan asks "is this address a target?" for every `E8`/`E9`/`FF 15`/`FF 25`
//! byte of the code, millions of times, and almost always the answer is no: the 4096-bit
//! bloom filter rejects most queries before the binary search.

const BLOOM_WORDS: usize = 64;

pub(crate) struct AddrMap {
    entries: Vec<(u64, u32)>,
    bloom: [u64; BLOOM_WORDS],
    min: u64,
    max: u64,
}

fn bloom_bit(addr: u64) -> usize {
    (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52) as usize
}

impl Default for AddrMap {
    fn default() -> Self {
        AddrMap {
            entries: Vec::new(),
            bloom: [0; BLOOM_WORDS],
            min: u64::MAX,
            max: 0,
        }
    }
}

impl AddrMap {
    pub fn clear(&mut self) {
        self.entries.clear();
        self.bloom = [0; BLOOM_WORDS];
        self.min = u64::MAX;
        self.max = 0;
    }

    /// Adds `addr -> value`; call [`AddrMap::finish`] before lookups.
    pub fn insert(&mut self, addr: u64, value: u32) {
        self.entries.push((addr, value));
    }

    /// Sorts, removes duplicate addresses (first value wins) and builds the filter.
    pub fn finish(&mut self) {
        self.entries.sort_by_key(|e| e.0);
        self.entries.dedup_by_key(|e| e.0);
        self.bloom = [0; BLOOM_WORDS];
        for &(a, _) in &self.entries {
            let b = bloom_bit(a);
            if let Some(w) = self.bloom.get_mut(b / 64) {
                *w |= 1 << (b % 64);
            }
        }
        self.min = self.entries.first().map_or(u64::MAX, |e| e.0);
        self.max = self.entries.last().map_or(0, |e| e.0);
    }

    #[inline]
    pub fn get(&self, addr: u64) -> Option<u32> {
        if addr < self.min || addr > self.max {
            return None;
        }
        let b = bloom_bit(addr);
        if self
            .bloom
            .get(b / 64)
            .is_none_or(|w| w & (1 << (b % 64)) == 0)
        {
            return None;
        }
        self.entries
            .binary_search_by_key(&addr, |e| e.0)
            .ok()
            .and_then(|i| self.entries.get(i))
            .map(|e| e.1)
    }

    /// The lowest and highest address, when not empty.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        Some((self.entries.first()?.0, self.entries.last()?.0))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
