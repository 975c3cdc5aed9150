//! The one lock type lgmalloc uses, only off the fast path (page supply, heap
//! creation, abandonment, the large-object cache). A pthread mutex: it never allocates,
//! sleeps instead of spinning when contended, and can be held across `fork` by the
//! atfork handlers. [`Locked`] pairs it with the state it guards.

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

/// State that is only touched with its mutex held.
pub struct Locked<T> {
    lock: Mutex,
    inner: UnsafeCell<T>,
}

// SAFETY: `inner` is only reached through `with`, which holds the lock; the guarded
// state is the allocator's own bookkeeping (raw pointers into its metadata), shared by
// all threads on purpose.
unsafe impl<T> Sync for Locked<T> {}

impl<T> Locked<T> {
    pub const fn new(state: T) -> Self {
        Locked {
            lock: Mutex::new(),
            inner: UnsafeCell::new(state),
        }
    }

    /// Runs `f` on the state with the lock held.
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.lock.with(|| {
            // SAFETY: the lock is held, so this is the only reference to the state.
            f(unsafe { &mut *self.inner.get() })
        })
    }

    /// `fork` prepare handler: hold the lock so the child inherits a consistent state.
    pub fn lock_for_fork(&self) {
        self.lock.lock();
    }

    /// `fork` parent and child handlers.
    pub fn unlock_after_fork(&self, child: bool) {
        if child {
            self.lock.reset_in_child();
        } else {
            self.lock.unlock();
        }
    }
}
