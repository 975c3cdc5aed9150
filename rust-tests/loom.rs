//! loom models of lgmalloc's lock-free protocols: every interleaving (and every weak
//! memory outcome loom models) of a few threads is run and checked.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom` (see
//! `docs/RELIABILITY.md`); without `--cfg loom` this target is empty.
//!
//! What runs is lgmalloc's own code for the page protocol: `push_remote`,
//! `collect_remote`, `try_watch`, `end_notification` and `unwatch` from `src/page.rs`,
//! called on a boxed `Page` whose two atomic words are loom's (the protocol functions are
//! generic over them). The heap's `delayed_free` hand-off lives in private functions of
//! `src/heap.rs` (`free_remote`, `drain_delayed`) that take a real heap: [`delayed_push`]
//! and [`delayed_take`] below repeat their atomic steps, with the same orderings, on a loom
//! `AtomicPtr` (keep them in step with `heap.rs`).
//!
//! Blocks are boxed 16-byte aligned records; each carries a loom cell written by the
//! freeing thread before it gives the block up and read by the owner as soon as the block
//! reaches it, so a missing happens-before edge in a hand-off is reported by loom as a
//! causality violation (loom does not track the plain `next` words themselves, which
//! travel along the same edges).
#![cfg(all(loom, not(feature = "hardened")))]

use std::collections::BTreeSet;
use std::ptr;

use lgmalloc::loom_api::{
    Block, IN_FULL_FLAG, Owner, Page, RemoteWord, STATE_NONE, Watcher, collect_remote,
    drop_remote_if_all_freed, encode_link, end_notification, free_head, link_key, push_remote,
    try_watch, unwatch,
};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use loom::thread;

const STATE_MASK: usize = 3;

/// `Page::remote_free` as a loom atomic.
struct Word(AtomicUsize);

impl RemoteWord for Word {
    fn load(&self, order: Ordering) -> usize {
        self.0.load(order)
    }
    fn fetch_and(&self, val: usize, order: Ordering) -> usize {
        self.0.fetch_and(val, order)
    }
    fn compare_exchange(
        &self,
        current: usize,
        new: usize,
        success: Ordering,
        failure: Ordering,
    ) -> Result<usize, usize> {
        self.0.compare_exchange(current, new, success, failure)
    }
    fn compare_exchange_weak(
        &self,
        current: usize,
        new: usize,
        success: Ordering,
        failure: Ordering,
    ) -> Result<usize, usize> {
        self.0.compare_exchange_weak(current, new, success, failure)
    }
    fn pause(&self) {
        // A busy wait must let the other threads run, or loom explores it forever.
        thread::yield_now();
    }
}

/// `Page::owner` as a loom atomic (the protocol never reads it; abandoning clears it).
type LoomPage = Page<AtomicPtr<Owner>, Word>;

/// A block as the allocator hands it out: 16-byte aligned (the low bits of
/// `remote_free` carry the state), its first two words the free-list `Block`.
#[repr(C, align(16))]
struct Slot {
    block: Block,
    /// The user's data: written before the block is freed, read by the owner.
    payload: UnsafeCell<usize>,
}

/// The owning thread's id, as the page records it.
fn owner_thread() -> *mut Owner {
    ptr::without_provenance_mut(0x7000)
}

/// The owner's heap as the protocol sees it: an address the watched page's word carries
/// to the freer that notifies, never read (aligned as a heap record is).
fn owner_heap() -> *mut Watcher {
    ptr::without_provenance_mut(0x1_0000)
}

/// One page with its blocks, the owner heap's `delayed_free` word, and bookkeeping.
struct World {
    page: *mut LoomPage,
    slots: Vec<*mut Slot>,
    /// The owner heap's `delayed_free` list.
    delayed: AtomicPtr<Block>,
    /// Remote freers between receiving the owner heap from `push_remote` and calling
    /// `end_notification`.
    notifying: AtomicUsize,
    /// Notifications started (`push_remote` returned the owner heap).
    notified: AtomicUsize,
    /// Set by the owner once `unwatch` returned and it drained `delayed`.
    closed: AtomicBool,
}

// SAFETY: the raw pointers are shared on purpose: remote threads only use the page's
// atomics and the blocks they own, as in the allocator.
unsafe impl Send for World {}
unsafe impl Sync for World {}

impl World {
    /// A page of `blocks` blocks, all handed out, with `used` as the owner keeps it
    /// (plus `IN_FULL_FLAG` when the page is on the full list rather than its class list).
    fn new(blocks: usize, on_full_list: bool) -> Arc<World> {
        let mut page = Box::new(Page::with_atomics(
            AtomicPtr::new(owner_thread()),
            Word(AtomicUsize::new(STATE_NONE)),
        ));
        page.used = blocks as u32 | if on_full_list { IN_FULL_FLAG } else { 0 };
        let slots = (0..blocks)
            .map(|_| {
                Box::into_raw(Box::new(Slot {
                    block: Block {
                        next: ptr::null_mut(),
                        freed_mark: 0,
                    },
                    payload: UnsafeCell::new(0),
                }))
            })
            .collect();
        Arc::new(World {
            page: Box::into_raw(page),
            slots,
            delayed: AtomicPtr::new(ptr::null_mut()),
            notifying: AtomicUsize::new(0),
            notified: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        })
    }

    fn page(&self) -> &LoomPage {
        // SAFETY: the page lives until `World` is dropped.
        unsafe { &*self.page }
    }

    /// The owner's exclusive view of its page's owner-only fields.
    ///
    /// # Safety
    /// Only the owner thread calls it (as the allocator, it keeps `&mut` while remote
    /// threads read the atomics through `&`).
    #[allow(clippy::mut_from_ref)]
    unsafe fn page_mut(&self) -> &mut LoomPage {
        // SAFETY: per the contract.
        unsafe { &mut *self.page }
    }

    fn index_of(&self, b: *mut Block) -> usize {
        self.slots
            .iter()
            .position(|&s| s.cast::<Block>() == b)
            .expect("a pointer that is no block of this page turned up")
    }

    /// A remote thread frees block `i`: `heap::free_remote` with the model's heap.
    fn free_remote(&self, i: usize) {
        let slot = self.slots[i];
        // SAFETY: this thread owns the block until it pushes it.
        unsafe { (*slot).payload.with_mut(|p| *p = 1000 + i) };
        let block = slot.cast::<Block>();
        // SAFETY: a live block of the page, given up here.
        let owner = unsafe { push_remote(self.page, block) };
        if !owner.is_null() {
            assert_eq!(owner, owner_heap(), "a notification reached another heap");
            assert!(
                !self.closed.load(Ordering::SeqCst),
                "a notification started after the owner's unwatch returned"
            );
            self.notified.fetch_add(1, Ordering::SeqCst);
            self.notifying.fetch_add(1, Ordering::SeqCst);
            delayed_push(&self.delayed, block);
            self.notifying.fetch_sub(1, Ordering::SeqCst);
            // SAFETY: the page lives until `World` is dropped; this thread began the
            // notification.
            unsafe { end_notification(self.page) };
        }
    }

    /// Owner: reads the payload of every block on the page's free list, which is where
    /// loom checks the freer's write happened before.
    ///
    /// # Safety
    /// Owner thread only.
    unsafe fn touch_free_list(&self) -> Vec<usize> {
        let mut seen = Vec::new();
        // SAFETY: owner access to its free list.
        let mut b = unsafe { free_head(self.page_mut()) };
        while !b.is_null() {
            let i = self.index_of(b);
            // SAFETY: a block on the owner's free list is the owner's.
            let v = unsafe { (*self.slots[i]).payload.with(|p| *p) };
            assert_eq!(
                v,
                1000 + i,
                "block {i} reached the owner without its contents"
            );
            seen.push(i);
            // SAFETY: as above.
            b = unsafe { encode_link(link_key(), (*b).next) };
        }
        seen
    }

    /// Owner: `heap::drain_delayed` for this page (minus the page-list moves).
    ///
    /// # Safety
    /// Owner thread only.
    unsafe fn drain_delayed(&self) -> usize {
        let mut b = delayed_take(&self.delayed);
        let mut n = 0;
        // SAFETY: owner access; delayed blocks belong to this page.
        unsafe {
            let page = self.page_mut();
            while !b.is_null() {
                let next = (*b).next;
                (*b).next = page.free;
                page.free = encode_link(link_key(), b);
                page.used -= 1;
                n += 1;
                b = next;
            }
        }
        n
    }

    /// After all threads joined: every block is on the free list exactly once, the page
    /// counts none in use, the owner was told of every block exactly once (`returned`
    /// blocks before, the rest now), and no state bit or remote block is left.
    fn check_final(&self, returned: usize) {
        // SAFETY: every thread joined; this is the only thread left.
        unsafe {
            let drained = self.drain_delayed();
            let collected = collect_remote(self.page) as usize;
            let seen = self.touch_free_list();
            let set: BTreeSet<usize> = seen.iter().copied().collect();
            assert_eq!(
                set.len(),
                seen.len(),
                "a block is on the free list twice: {seen:?}"
            );
            assert_eq!(set.len(), self.slots.len(), "blocks lost: {seen:?}");
            let used = self.page().used();
            assert_eq!(used, 0, "used is {used} with every block back");
            assert_eq!(
                returned + drained + collected,
                self.slots.len(),
                "blocks counted"
            );
            assert_eq!(self.page().remote_free.load(Ordering::SeqCst), STATE_NONE);
            assert!(self.delayed.load(Ordering::SeqCst).is_null());
            assert_eq!(self.notifying.load(Ordering::SeqCst), 0);
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // SAFETY: all threads are done; these came from Box::into_raw.
        unsafe {
            drop(Box::from_raw(self.page));
            for &s in &self.slots {
                drop(Box::from_raw(s));
            }
        }
    }
}

/// The push of `heap::free_remote` onto the owner heap's `delayed_free`.
fn delayed_push(list: &AtomicPtr<Block>, block: *mut Block) {
    let mut head = list.load(Ordering::Relaxed);
    loop {
        // SAFETY: the block was handed to this thread by `push_remote`.
        unsafe { (*block).next = head };
        match list.compare_exchange_weak(head, block, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => break,
            Err(now) => head = now,
        }
    }
}

/// The take of `heap::drain_delayed`: a relaxed look, then a swap with acquire.
fn delayed_take(list: &AtomicPtr<Block>) -> *mut Block {
    if list.load(Ordering::Relaxed).is_null() {
        return ptr::null_mut();
    }
    list.swap(ptr::null_mut(), Ordering::Acquire)
}

/// A point where the owner lets the other threads run first. loom's partial-order
/// reduction only compares an operation with the *last* access to the same atomic, so a
/// relaxed look (such as the one `collect_remote` starts with) that finds nothing is
/// never revisited with a remote push before it; without these points the owner's steps
/// would only ever be explored before the remote threads start (checked: the owner then
/// never collects a block while they run, and dropping the `Release` of `push_remote`
/// goes unnoticed). Yielding does not take interleavings away: loom still preempts at
/// every atomic operation within its bounds.
fn let_others_run() {
    thread::yield_now();
}

/// Runs `f` under loom and reports how many executions it explored. `LOOM_MAX_PREEMPTIONS`
/// (and loom's other variables) apply when set; otherwise the model runs with
/// `default_bound` (`None`: exhaustive).
fn model(name: &str, default_bound: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize as Count, Ordering::Relaxed};
    let runs = std::sync::Arc::new(Count::new(0));
    let counter = runs.clone();
    let start = std::time::Instant::now();
    let mut builder = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        builder.preemption_bound = default_bound;
    }
    let bound = builder.preemption_bound;
    builder.check(move || {
        counter.fetch_add(1, Relaxed);
        f()
    });
    eprintln!(
        "loom: {name}: {} executions in {:.1} s ({})",
        runs.load(Relaxed),
        start.elapsed().as_secs_f64(),
        bound.map_or("exhaustive".to_string(), |b| format!(
            "at most {b} preemptions"
        ))
    );
}

/// Preemptions explored in the notification models by default: `unwatch` waits for a
/// remote thread, which makes their unbounded search run for hours.
const NOTIFICATION_BOUND: Option<usize> = Some(3);

/// (a) Two remote threads push three blocks while the owner collects twice: no block is
/// lost or seen twice, `used` ends at zero, every block's contents reach the owner.
#[test]
fn remote_free_list() {
    model("remote_free_list", None, || {
        let w = World::new(3, false);
        let t1 = {
            let w = w.clone();
            thread::spawn(move || {
                w.free_remote(0);
                w.free_remote(1);
            })
        };
        let t2 = {
            let w = w.clone();
            thread::spawn(move || w.free_remote(2))
        };
        let mut collected = 0;
        for _ in 0..2 {
            let_others_run();
            // SAFETY: this thread is the page's owner.
            unsafe {
                collected += collect_remote(w.page) as usize;
                w.touch_free_list();
            }
        }
        t1.join().unwrap();
        t2.join().unwrap();
        w.check_final(collected);
    });
}

/// (a') Two remote threads free a page's two blocks while the owner asks whether they
/// all came back (`drop_remote_if_all_freed`, as a thread exit or the sweep of abandoned
/// pages does before releasing a page): when it says so, both pushes happened before it
/// (the blocks' contents are visible, so the page's memory may be reused at once),
/// nothing is pushed after it, and the page counts no block in use; when it does not,
/// the page is unchanged and a collection finds both blocks.
#[test]
fn remote_frees_that_empty_the_page() {
    model("remote_frees_that_empty_the_page", None, || {
        let w = World::new(2, false);
        let freers: Vec<_> = (0..2)
            .map(|i| {
                let w = w.clone();
                thread::spawn(move || w.free_remote(i))
            })
            .collect();
        let_others_run();
        // SAFETY: this thread is the page's owner.
        let dropped = unsafe { drop_remote_if_all_freed(w.page) };
        if dropped {
            // Read before the joins, which would order the freers' writes anyway.
            for (i, &slot) in w.slots.iter().enumerate() {
                // SAFETY: the page was given up; its blocks are the owner's to reuse.
                let v = unsafe { (*slot).payload.with(|p| *p) };
                assert_eq!(v, 1000 + i, "block {i} dropped before its contents arrived");
            }
        }
        for t in freers {
            t.join().unwrap();
        }
        if dropped {
            let word = w.page().remote_free.load(Ordering::SeqCst);
            assert_eq!(word & !STATE_MASK, 0, "a block arrived after the drop");
            assert_eq!(w.page().used(), 0, "blocks still counted in use");
        } else {
            w.check_final(0);
        }
    });
}

/// (b) The notification protocol. The page is full; the owner tries to watch it while
/// two remote threads free its two blocks (the first to find `WATCH` hands its block to
/// the owner heap's `delayed_free`, while the other may push onto the page in state
/// `FREEING`). The owner drains `delayed_free` (a block that arrives there is how
/// `heap::drain_delayed` comes to call `free_local_slow`, which unwatches), then
/// unwatches. When `unwatch` returns the state is `NONE`, no notification is in flight,
/// and none starts later; everything that went through `delayed_free` is there for the
/// owner's next drain; every block ends up on the free list exactly once and `used` at
/// zero. With `abandon`, the owner then gives the page up as `heap::abandon` does
/// (unwatch, drain, collect, then `segment::abandon_page` clears `heap`), and the frees
/// that come later are collected by the next owner.
///
/// With one remote freer (two threads) the search is exhaustive; with two (three
/// threads) it is bounded by `NOTIFICATION_BOUND` preemptions.
fn notification(abandon: bool, freers: usize) {
    let name = match (abandon, freers) {
        (true, 1) => "notification_then_abandon_2_threads",
        (true, _) => "notification_then_abandon",
        (false, 1) => "notification_unwatch_2_threads",
        (false, _) => "notification_unwatch",
    };
    let bound = if freers == 1 {
        None
    } else {
        NOTIFICATION_BOUND
    };
    model(name, bound, move || {
        let w = World::new(freers, true);
        let freeing: Vec<_> = (0..freers)
            .map(|i| {
                let w = w.clone();
                thread::spawn(move || w.free_remote(i))
            })
            .collect();
        let mut returned = 0;
        // SAFETY: this thread is the page's owner throughout.
        unsafe {
            // heap::first_page_with_room: a full page is parked only if it can be watched;
            // otherwise remote frees are already waiting and get collected.
            let_others_run();
            if try_watch(w.page, owner_heap()) {
                // On the full list; a notification may come in.
                let_others_run();
                returned += w.drain_delayed();
                w.touch_free_list();
                let_others_run();
                unwatch(w.page);
                let state = w.page().remote_free.load(Ordering::SeqCst) & STATE_MASK;
                assert_eq!(state, STATE_NONE, "unwatch returned in state {state}");
                assert_eq!(
                    w.notifying.load(Ordering::SeqCst),
                    0,
                    "unwatch returned while a notification was in flight"
                );
            } else {
                returned += collect_remote(w.page) as usize;
            }
            returned += w.drain_delayed();
            w.closed.store(true, Ordering::SeqCst);
            let_others_run();
            returned += collect_remote(w.page) as usize;
            w.touch_free_list();
            if abandon {
                // segment::abandon_page: the page has no owner from now on.
                w.page().owner.store(ptr::null_mut(), Ordering::Release);
            }
        }
        for t in freeing {
            t.join().unwrap();
        }
        // Anything on `delayed` now arrived after the owner closed it.
        assert!(
            w.delayed.load(Ordering::SeqCst).is_null(),
            "a block reached delayed_free after unwatch and the drain"
        );
        w.check_final(returned);
    });
}

/// (b) The other half of the notification protocol: a watched page tells its owner.
/// The owner watches its full page, then two remote threads free its two blocks: exactly
/// one of them hands its block to the owner heap (whichever finds `WATCH`), the other
/// queues on the page, and the state ends at `NONE`.
#[test]
fn watched_page_announces_one_remote_free() {
    model("watched_page_announces", NOTIFICATION_BOUND, || {
        let w = World::new(2, true);
        // SAFETY: this thread is the page's owner; the page lives as long as `w`.
        let watched = unsafe { try_watch(w.page, owner_heap()) };
        assert!(watched, "an idle full page could not be watched");
        let spawn_free = |i: usize| {
            let w = w.clone();
            thread::spawn(move || w.free_remote(i))
        };
        let t1 = spawn_free(0);
        let t2 = spawn_free(1);
        t1.join().unwrap();
        t2.join().unwrap();
        assert_eq!(w.notified.load(Ordering::SeqCst), 1, "notifications");
        let word = w.page().remote_free.load(Ordering::SeqCst);
        assert_eq!(
            word & STATE_MASK,
            STATE_NONE,
            "state after the notification"
        );
        assert!(
            word & !STATE_MASK != 0,
            "the second block is not on the page"
        );
        w.check_final(0);
    });
}

#[test]
fn watch_notification_unwatch() {
    notification(false, 2);
}

#[test]
fn watch_notification_then_abandon() {
    notification(true, 2);
}

#[test]
fn watch_notification_unwatch_2_threads() {
    notification(false, 1);
}

#[test]
fn watch_notification_then_abandon_2_threads() {
    notification(true, 1);
}

/// (c) The heap's `delayed_free` list on its own: two remote threads push (one of them
/// twice) while the owner takes the list; nothing is lost or taken twice, and each
/// block's contents reach the owner.
#[test]
fn delayed_free_handoff() {
    model("delayed_free_handoff", None, || {
        let w = World::new(3, true);
        let push = |w: &World, i: usize| {
            let slot = w.slots[i];
            // SAFETY: this thread owns the block until it pushes it.
            unsafe { (*slot).payload.with_mut(|p| *p = 1000 + i) };
            delayed_push(&w.delayed, slot.cast());
        };
        let t1 = {
            let w = w.clone();
            thread::spawn(move || {
                push(&w, 0);
                push(&w, 1);
            })
        };
        let t2 = {
            let w = w.clone();
            thread::spawn(move || push(&w, 2))
        };
        let mut taken = 0;
        for _ in 0..2 {
            let_others_run();
            // SAFETY: this thread is the owner.
            unsafe {
                taken += w.drain_delayed();
                w.touch_free_list();
            }
        }
        t1.join().unwrap();
        t2.join().unwrap();
        w.check_final(taken);
    });
}
