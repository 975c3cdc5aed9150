//! The one lock type lgmalloc uses, only off the fast path (page supply, heap
//! creation, abandonment). A pthread mutex: it never allocates, sleeps instead of
//! spinning when contended, and can be held across `fork` by the atfork handlers.

use core::cell::UnsafeCell;

pub struct Mutex {
    raw: UnsafeCell<libc::pthread_mutex_t>,
}

// SAFETY: the pthread mutex serialises all access to what it guards.
unsafe impl Sync for Mutex {}

impl Mutex {
    pub const fn new() -> Self {
        Mutex {
            raw: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER),
        }
    }

    #[inline]
    pub fn lock(&self) {
        // SAFETY: the mutex is statically initialised and never moved (it lives in a
        // static).
        unsafe { libc::pthread_mutex_lock(self.raw.get()) };
    }

    #[inline]
    pub fn unlock(&self) {
        // SAFETY: as in `lock`; called by the holder.
        unsafe { libc::pthread_mutex_unlock(self.raw.get()) };
    }

    /// Runs `f` with the lock held.
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        self.lock();
        let r = f();
        self.unlock();
        r
    }

    /// After `fork`, the child has one thread: make the lock usable again whatever its
    /// state was in the parent.
    pub fn reset_in_child(&self) {
        // SAFETY: only the forking thread exists in the child; nobody else can hold
        // or wait on the mutex.
        unsafe { *self.raw.get() = libc::PTHREAD_MUTEX_INITIALIZER };
    }
}
