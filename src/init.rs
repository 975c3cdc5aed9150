//! Process and thread set-up: lazy, re-entrant initialisation, thread exit, fork.
//!
//! Initialisation happens on the first call that needs it (any entry point, from any
//! thread, possibly before any constructor ran). While the initialising thread runs
//! steps that may call malloc again (`pthread_key_create`, `pthread_atfork`,
//! `pthread_setspecific`), the core is already usable, so those nested calls are served
//! normally; other threads wait.

use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use crate::heap::{self, Heap};
use crate::{diag, large, options, secret, segment, size_class};

const UNINIT: u8 = 0;
const CORE_READY: u8 = 1;
const READY: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);
static INIT_THREAD: AtomicUsize = AtomicUsize::new(0);
/// `pthread_key_t + 1` once the thread-exit key exists (0 before).
static EXIT_KEY: AtomicUsize = AtomicUsize::new(0);

/// True once the allocator can serve requests. Cheap after the first call.
#[inline]
pub fn ensure_initialized() -> bool {
    if STATE.load(Ordering::Acquire) == READY {
        return true;
    }
    initialize()
}

#[cold]
#[inline(never)]
fn initialize() -> bool {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as usize;
    match INIT_THREAD.compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            init_core();
            STATE.store(CORE_READY, Ordering::Release);
            init_process_hooks();
            STATE.store(READY, Ordering::Release);
            true
        }
        Err(owner) if owner == me => STATE.load(Ordering::Acquire) >= CORE_READY,
        Err(_) => {
            while STATE.load(Ordering::Acquire) != READY {
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
            }
            true
        }
    }
}

/// Steps that never call back into malloc.
fn init_core() {
    size_class::init();
    secret::init();
    options::init();
    // Each of these writes at exit: statistics, verify mode's summary, verbose lines
    // about what learning stored.
    if options::show_stats() || options::verify() || options::verbose() {
        diag::keep_stderr_copy();
    }
}

/// Steps that may allocate (served by the already usable core).
fn init_process_hooks() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `thread_exit` has the destructor signature; `key` is writable.
    if unsafe { libc::pthread_key_create(&mut key, Some(thread_exit)) } == 0 {
        EXIT_KEY.store(key as usize + 1, Ordering::Release);
    }
    // SAFETY: the handlers are plain functions valid for the whole process.
    unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
    // The initialising thread may already have a heap (its first malloc got us here).
    let heap = heap::thread_heap();
    if heap != heap::empty_heap() {
        register_thread_heap(heap);
    }
}

/// Arranges for `heap` to be abandoned when the calling thread exits.
pub fn register_thread_heap(heap: *mut Heap) {
    let k = EXIT_KEY.load(Ordering::Acquire);
    if k != 0 {
        // SAFETY: the key exists; the value is our heap.
        unsafe { libc::pthread_setspecific((k - 1) as libc::pthread_key_t, heap.cast()) };
    }
}

extern "C" fn thread_exit(value: *mut libc::c_void) {
    let heap = value.cast::<Heap>();
    if heap.is_null() || (heap != heap::thread_heap() && heap != heap::verify_heap()) {
        return;
    }
    // SAFETY: the value is the exiting thread's own live heap.
    unsafe { heap::abandon(heap) };
    large::cache_decay_now();
}

// The locks are taken in the order the allocator nests them (heap pool, then region)
// and released in reverse; the large-object cache nests with neither.
extern "C" fn fork_prepare() {
    heap::lock_for_fork();
    segment::lock_for_fork();
    large::lock_for_fork();
}

extern "C" fn fork_parent() {
    large::unlock_after_fork(false);
    segment::unlock_after_fork(false);
    heap::unlock_after_fork(false);
}

extern "C" fn fork_child() {
    large::unlock_after_fork(true);
    segment::unlock_after_fork(true);
    heap::unlock_after_fork(true);
    heap::settle_heaps_in_fork_child();
}
