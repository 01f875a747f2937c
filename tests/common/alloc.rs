//! A counting global allocator. Its counter is thread-local, so allocations by the test
//! harness' other threads do not interfere.
//!
//! A `#[global_allocator]` must be declared in the test binary's crate root, so a binary that
//! counts installs it with the line
//!
//!     #[global_allocator]
//!     static GLOBAL: common::alloc::Counting = common::alloc::Counting;
//!
//! and measures with [`allocations`]. Without it [`allocations`] panics rather than report 0.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Forwards to [`System`] and counts every allocation and reallocation on the calling thread.
pub struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn bump() {
    // `try_with`: the thread-local may already be gone while a thread shuts down.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards every call to `System` unchanged; the counter is a const-initialised
// thread-local `Cell` without destructor, so touching it never allocates or re-enters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn count() -> usize {
    ALLOCATIONS.with(Cell::get)
}

/// Allocations made on this thread while `f` runs.
///
/// # Panics
/// If [`Counting`] is not this binary's global allocator (an allocation went uncounted).
pub fn allocations(f: impl FnOnce()) -> usize {
    let probe = count();
    drop(std::hint::black_box(Box::new(0_u8)));
    assert_eq!(
        count(),
        probe + 1,
        "common::alloc::Counting is not installed as the global allocator"
    );
    let before = count();
    f();
    count() - before
}
