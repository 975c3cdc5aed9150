//! Intrusive doubly linked lists: records that carry their own `next`/`prev` links
//! (page records, segments, heap records) threaded without any allocation. One record
//! is on at most one list of a kind at a time; whoever owns the list (a thread for its
//! heap's lists, the lock holder for the region's and the pool's) serialises access.
//!
//! Two shapes:
//! * plain lists, null-terminated both ways (free-span bins, abandoned pages, full
//!   pages, segments, live heaps);
//! * tailed lists, whose head's `prev` points at the tail so that appending needs no
//!   tail pointer, and whose empty value is a sentinel rather than null (a heap's class
//!   lists: an empty class points at the static empty page, so the allocation fast path
//!   needs no null test).

use core::ptr;

/// A record with its own list links.
///
/// # Safety
/// `next` and `prev` return pointers to two distinct link fields of the live record
/// `this`, and nothing else writes those fields while the record is on a list.
pub unsafe trait Linked: Sized {
    /// # Safety
    /// `this` is a live record.
    unsafe fn next(this: *mut Self) -> *mut *mut Self;
    /// # Safety
    /// `this` is a live record.
    unsafe fn prev(this: *mut Self) -> *mut *mut Self;
}

/// Puts `item` first on the plain list `head`.
///
/// # Safety
/// `head` is a plain list of live records and `item` a live record on no list; the
/// caller has exclusive access to all of them.
pub unsafe fn push_front<T: Linked>(head: &mut *mut T, item: *mut T) {
    // SAFETY: per the contract every record reached is live and ours to write.
    unsafe {
        *T::prev(item) = ptr::null_mut();
        *T::next(item) = *head;
        if !head.is_null() {
            *T::prev(*head) = item;
        }
    }
    *head = item;
}

/// Takes `item` off the plain list `head` and clears its links.
///
/// # Safety
/// `item` is on the plain list `head`; exclusive access as for [`push_front`].
pub unsafe fn remove<T: Linked>(head: &mut *mut T, item: *mut T) {
    // SAFETY: per the contract `item` and its neighbours are live records of the list.
    unsafe {
        let (prev, next) = (*T::prev(item), *T::next(item));
        if prev.is_null() {
            *head = next;
        } else {
            *T::next(prev) = next;
        }
        if !next.is_null() {
            *T::prev(next) = prev;
        }
        *T::next(item) = ptr::null_mut();
        *T::prev(item) = ptr::null_mut();
    }
}

/// Puts `item` first on the tailed list `head`, whose empty value is `empty`.
///
/// # Safety
/// `head` is a tailed list of live records (or `empty`) and `item` a live record on no
/// list; exclusive access as for [`push_front`].
pub unsafe fn tailed_push_front<T: Linked>(head: &mut *mut T, empty: *mut T, item: *mut T) {
    // SAFETY: per the contract.
    unsafe {
        if *head == empty {
            *T::next(item) = ptr::null_mut();
            *T::prev(item) = item;
        } else {
            *T::next(item) = *head;
            *T::prev(item) = *T::prev(*head);
            *T::prev(*head) = item;
        }
    }
    *head = item;
}

/// Appends `item` to the tailed list `head`.
///
/// # Safety
/// As for [`tailed_push_front`].
pub unsafe fn tailed_push_back<T: Linked>(head: &mut *mut T, empty: *mut T, item: *mut T) {
    if *head == empty {
        // SAFETY: forwarded contract.
        unsafe { tailed_push_front(head, empty, item) };
        return;
    }
    // SAFETY: per the contract; the head's `prev` is the tail.
    unsafe {
        let tail = *T::prev(*head);
        *T::next(tail) = item;
        *T::prev(item) = tail;
        *T::next(item) = ptr::null_mut();
        *T::prev(*head) = item;
    }
}

/// Takes `item` off the tailed list `head` (leaving `empty` when it was the only one)
/// and clears its links.
///
/// # Safety
/// `item` is on the tailed list `head`; exclusive access as for [`push_front`].
pub unsafe fn tailed_remove<T: Linked>(head: &mut *mut T, empty: *mut T, item: *mut T) {
    // SAFETY: per the contract `item` and its neighbours are live records of the list.
    unsafe {
        let next = *T::next(item);
        if item == *head {
            if next.is_null() {
                *head = empty;
            } else {
                // The tail stays the tail (or `next` becomes its own tail).
                *T::prev(next) = if *T::prev(item) == next {
                    next
                } else {
                    *T::prev(item)
                };
                *head = next;
            }
        } else {
            let prev = *T::prev(item);
            *T::next(prev) = next;
            if next.is_null() {
                *T::prev(*head) = prev;
            } else {
                *T::prev(next) = prev;
            }
        }
        *T::next(item) = ptr::null_mut();
        *T::prev(item) = ptr::null_mut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Node {
        next: *mut Node,
        prev: *mut Node,
        id: u32,
    }

    // SAFETY: the two fields are distinct links of the node.
    unsafe impl Linked for Node {
        unsafe fn next(this: *mut Self) -> *mut *mut Self {
            // SAFETY: `this` is live per the contract.
            unsafe { &raw mut (*this).next }
        }
        unsafe fn prev(this: *mut Self) -> *mut *mut Self {
            // SAFETY: `this` is live per the contract.
            unsafe { &raw mut (*this).prev }
        }
    }

    fn nodes(n: u32) -> Vec<Node> {
        (0..n)
            .map(|id| Node {
                next: ptr::null_mut(),
                prev: ptr::null_mut(),
                id,
            })
            .collect()
    }

    /// The ids from the head on, checking that each `prev` mirrors `next` (the head's
    /// `prev` is null for plain lists, the tail for tailed ones).
    fn ids(head: *mut Node, empty: *mut Node, tailed: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if head == empty {
            return out;
        }
        let (mut p, mut last) = (head, ptr::null_mut());
        // SAFETY: the test's nodes are live for the whole test.
        unsafe {
            while !p.is_null() {
                if p != head {
                    assert_eq!((*p).prev, last, "prev link of {}", (*p).id);
                }
                out.push((*p).id);
                last = p;
                p = (*p).next;
            }
            let want = if tailed { last } else { ptr::null_mut() };
            assert_eq!((*head).prev, want, "head's prev");
        }
        out
    }

    #[test]
    fn plain_list_keeps_links_consistent() {
        let mut v = nodes(4);
        let p: Vec<*mut Node> = v.iter_mut().map(|n| n as *mut Node).collect();
        let mut head = ptr::null_mut();
        // SAFETY: live test nodes, each on at most one list.
        unsafe {
            for &n in &p {
                push_front(&mut head, n);
            }
            assert_eq!(ids(head, ptr::null_mut(), false), [3, 2, 1, 0]);
            remove(&mut head, p[2]);
            assert_eq!(ids(head, ptr::null_mut(), false), [3, 1, 0]);
            remove(&mut head, p[3]);
            remove(&mut head, p[0]);
            assert_eq!(ids(head, ptr::null_mut(), false), [1]);
            remove(&mut head, p[1]);
            assert!(head.is_null());
            assert!((*p[2]).next.is_null() && (*p[2]).prev.is_null());
        }
    }

    #[test]
    fn tailed_list_keeps_its_tail() {
        let mut v = nodes(5);
        let p: Vec<*mut Node> = v.iter_mut().map(|n| n as *mut Node).collect();
        let mut sentinel = nodes(1);
        let empty: *mut Node = &mut sentinel[0];
        let mut head = empty;
        // SAFETY: live test nodes, each on at most one list.
        unsafe {
            tailed_push_back(&mut head, empty, p[0]);
            tailed_push_front(&mut head, empty, p[1]);
            tailed_push_back(&mut head, empty, p[2]);
            tailed_push_front(&mut head, empty, p[3]);
            assert_eq!(ids(head, empty, true), [3, 1, 0, 2]);
            tailed_remove(&mut head, empty, p[2]); // the tail
            assert_eq!(ids(head, empty, true), [3, 1, 0]);
            tailed_remove(&mut head, empty, p[3]); // the head
            assert_eq!(ids(head, empty, true), [1, 0]);
            tailed_remove(&mut head, empty, p[1]); // head of two: the next is its own tail
            assert_eq!(ids(head, empty, true), [0]);
            tailed_push_back(&mut head, empty, p[4]);
            assert_eq!(ids(head, empty, true), [0, 4]);
            tailed_remove(&mut head, empty, p[0]);
            tailed_remove(&mut head, empty, p[4]);
            assert_eq!(head, empty);
        }
    }
}
