//! The per-process secret: a random word chosen once at initialisation, used to encode
//! free-list links (`hardened`) and the check words of large-object headers, so a stray
//! or malicious write cannot forge either without knowing it.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::os;

static SECRET: AtomicU64 = AtomicU64::new(0);

/// Draws the secret (initialisation, before any thread allocates).
pub fn init() {
    SECRET.store(os::random_u64(), Ordering::Relaxed);
}

/// The secret; non-zero once initialised.
#[inline]
pub fn get() -> usize {
    SECRET.load(Ordering::Relaxed) as usize
}
