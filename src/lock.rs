//! The one lock type lgmalloc uses, only off the fast path (page supply, heap
//! creation, abandonment, the large-object cache). A pthread mutex: it never allocates,
//! sleeps instead of spinning when contended, and can be held across `fork` by the
//! atfork handlers. [`Locked`] pairs it with the state it guards.
//!
//! Each lock counts its acquisitions and the contended ones (the lock was held when
//! asked for), for `lg_stats`: the price of the central page supply, measured.
//!
//! A holder may leave work for after the release ([`Locked::with_then`]: the system
//! calls that give memory back). `fork` waits for that work as well as for the lock,
//! or the child would inherit, unreferenced, what a thread it does not have was about
//! to give back.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Retries of a contended lock before the waiter sleeps, and pause instructions
/// between them: a few microseconds in all (a pause is tens to a hundred and more
/// cycles, depending on the core).
const LOCK_SPIN_TRIES: usize = 25;
const LOCK_SPIN_PAUSES: usize = 8;

pub struct Mutex {
    raw: UnsafeCell<libc::pthread_mutex_t>,
    /// Acquisitions, and those that found the lock held (counted by the holder, so the
    /// counters share the lock's cache line and add no traffic of their own).
    acquired: AtomicU64,
    contended: AtomicU64,
}

// SAFETY: the pthread mutex serialises all access to what it guards.
unsafe impl Sync for Mutex {}

impl Mutex {
    pub const fn new() -> Self {
        Mutex {
            raw: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER),
            acquired: AtomicU64::new(0),
            contended: AtomicU64::new(0),
        }
    }

    #[inline]
    pub fn lock(&self) {
        // SAFETY: the mutex is statically initialised and never moved (it lives in a
        // static).
        let contended = unsafe { libc::pthread_mutex_trylock(self.raw.get()) } != 0;
        if contended && !self.spin_for() {
            // SAFETY: as above.
            unsafe { libc::pthread_mutex_lock(self.raw.get()) };
        }
        self.count_acquired(contended);
    }

    /// Counts one acquisition, and whether it found the lock held. Called with the lock
    /// held, so no other thread writes the counters now (readers only read): a plain
    /// load and store, no atomic read-modify-write.
    #[inline]
    fn count_acquired(&self, contended: bool) {
        self.acquired
            .store(self.acquired.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        if contended {
            self.contended.store(
                self.contended.load(Ordering::Relaxed) + 1,
                Ordering::Relaxed,
            );
        }
    }

    /// A held lock is usually released soon (the sections are short: list and bin
    /// updates; system calls run outside them), so a waiter first retries for a few
    /// microseconds before it sleeps: a sleep costs two system calls
    /// (the waiter's wait and the holder's wake) and a trip through the scheduler. As
    /// glibc's adaptive mutexes do, bounded, so a waiter whose holder was preempted
    /// soon sleeps instead of burning its time slice. True when the lock was taken.
    #[cold]
    fn spin_for(&self) -> bool {
        for _ in 0..LOCK_SPIN_TRIES {
            for _ in 0..LOCK_SPIN_PAUSES {
                core::hint::spin_loop();
            }
            // SAFETY: as in `lock`.
            if unsafe { libc::pthread_mutex_trylock(self.raw.get()) } == 0 {
                return true;
            }
        }
        false
    }

    /// Acquisitions so far, and how many of them found the lock held.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.acquired.load(Ordering::Relaxed),
            self.contended.load(Ordering::Relaxed),
        )
    }

    /// Takes the lock if nobody holds it; true when taken (counted as an uncontended
    /// acquisition). For work that is worth doing only when it costs no wait.
    #[inline]
    pub fn try_lock(&self) -> bool {
        // SAFETY: as in `lock`.
        if unsafe { libc::pthread_mutex_trylock(self.raw.get()) } != 0 {
            return false;
        }
        self.count_acquired(false);
        true
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

/// How long `fork`'s prepare handler waits for work left after a release before it
/// forks anyway (the child then keeps, unreferenced, what that work would have given
/// back). Such work is a few system calls that need no lock, done in microseconds;
/// the bound is for a thread that cannot finish it, such as one interrupted by a signal
/// handler that forks.
const FORK_WAIT_MS: u64 = 1000;

/// State that is only touched with its mutex held.
pub struct Locked<T> {
    lock: Mutex,
    inner: UnsafeCell<T>,
    /// Calls of [`Locked::with_then`] whose work after the release is under way.
    /// Raised only with the lock held, so once `fork`'s handler holds it, the count can
    /// only fall.
    after_release: AtomicUsize,
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
            after_release: AtomicUsize::new(0),
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

    /// Runs `f` on the state with the lock held; when it returns work (`Some(w)`), runs
    /// `after(w)` once the lock is released. A `fork` in between waits for `after`.
    #[inline]
    pub fn with_then<R, W>(
        &self,
        f: impl FnOnce(&mut T) -> (R, Option<W>),
        after: impl FnOnce(W),
    ) -> R {
        let (result, work) = self.with(|state| {
            let (result, work) = f(state);
            if work.is_some() {
                self.after_release.fetch_add(1, Ordering::Relaxed);
            }
            (result, work)
        });
        if let Some(w) = work {
            after(w);
            // Release: a fork that sees the count fall sees the work done.
            self.after_release.fetch_sub(1, Ordering::Release);
        }
        result
    }

    /// Runs `f` on the state if the lock is free now; `None` (and `f` not run) when
    /// another thread holds it.
    #[inline]
    pub fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        if !self.lock.try_lock() {
            return None;
        }
        // SAFETY: the lock is held, so this is the only reference to the state.
        let r = f(unsafe { &mut *self.inner.get() });
        self.lock.unlock();
        Some(r)
    }

    /// Acquisitions of the lock so far, and the contended ones.
    pub fn lock_counts(&self) -> (u64, u64) {
        self.lock.counts()
    }

    /// `fork` prepare handler: hold the lock so the child inherits a consistent state,
    /// then wait (a bounded while, see [`FORK_WAIT_MS`]) for the work other threads left
    /// after releasing it. True when none is left.
    pub fn lock_for_fork(&self) -> bool {
        self.lock.lock();
        self.wait_after_release(FORK_WAIT_MS)
    }

    /// Waits until no [`Locked::with_then`] has work under way, or `limit_ms` passed.
    /// With the lock held none can begin, so a count seen at zero stays there.
    fn wait_after_release(&self, limit_ms: u64) -> bool {
        let mut deadline = 0;
        loop {
            // Acquire: pairs with the release in `with_then`.
            if self.after_release.load(Ordering::Acquire) == 0 {
                return true;
            }
            let now = crate::os::now_ms();
            if deadline == 0 {
                deadline = now + limit_ms;
            } else if now > deadline {
                return false;
            }
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }

    /// `fork` parent and child handlers.
    pub fn unlock_after_fork(&self, child: bool) {
        if child {
            // Work the parent's other threads left after a release (if the wait gave
            // up) will never be done here: nothing is under way in the child.
            self.after_release.store(0, Ordering::Relaxed);
            self.lock.reset_in_child();
        } else {
            self.lock.unlock();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicI32;

    #[test]
    #[cfg_attr(
        miri,
        ignore = "reads /proc to see the waiter asleep: file access is isolated under Miri"
    )]
    fn acquisitions_and_contention_are_counted() {
        let m = Arc::new(Mutex::new());
        m.with(|| ());
        m.with(|| ());
        assert_eq!(m.counts(), (2, 0));
        // A second thread asks while this one holds the lock: one contended acquisition.
        // It has asked once it sleeps (its failed `trylock` comes before the wait).
        let tid = Arc::new(AtomicI32::new(0));
        m.lock();
        let waiter = {
            let (m, tid) = (Arc::clone(&m), Arc::clone(&tid));
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                m.with(|| ());
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            let t = tid.load(Ordering::SeqCst);
            let stat = std::fs::read_to_string(format!("/proc/self/task/{t}/stat"));
            // The state is the field after the parenthesised command name.
            let sleeping = t != 0
                && stat.is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('S')));
            if sleeping {
                break;
            }
            std::thread::yield_now();
        }
        m.unlock();
        waiter.join().unwrap();
        assert_eq!(m.counts(), (4, 1));
    }

    /// `fork`'s prepare handler waits for work another thread left after releasing the
    /// lock; a wait for work that does not end gives up at its bound.
    #[test]
    fn fork_waits_for_work_left_after_a_release() {
        use std::sync::atomic::AtomicBool;
        use std::sync::mpsc::channel;
        let state = Arc::new(Locked::new(0u32));
        let done = Arc::new(AtomicBool::new(false));
        let (started_tx, started) = channel();
        let (go, go_rx) = channel::<()>();
        let worker = {
            let (state, done) = (Arc::clone(&state), Arc::clone(&done));
            std::thread::spawn(move || {
                state.with_then(
                    |n| {
                        *n += 1;
                        ((), Some(()))
                    },
                    |()| {
                        started_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        done.store(true, Ordering::SeqCst);
                    },
                )
            })
        };
        started.recv().unwrap();
        // Work under way that will not end by itself: the bounded wait gives up.
        state.lock.lock();
        assert!(
            !state.wait_after_release(30),
            "the wait returned while the work was under way"
        );
        state.lock.unlock();
        // Work under way that ends: the prepare handler returns after it, not before.
        go.send(()).unwrap();
        assert!(state.lock_for_fork(), "the wait gave up");
        assert!(done.load(Ordering::SeqCst), "forked before the work ended");
        state.unlock_after_fork(false);
        worker.join().unwrap();
        assert_eq!(state.with(|n| *n), 1);
    }
}
