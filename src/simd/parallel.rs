//! Splitting a kernel's work over threads without ever failing to finish it.
//!
//! [`run_parts`] runs disjoint parts of one job (bands of W's rows, say) on scoped threads
//! started with [`std::thread::Builder`]. A thread that cannot be started (a pid or memory
//! limit) is not an error: its part runs on the calling thread instead. So a kernel that
//! splits its work always completes it, and — since every part is computed by the same code
//! whatever thread runs it — gives the same bits as a one-thread run.

use std::sync::Mutex;
use std::thread;

/// Runs `f` once on each part: one part on the calling thread, the others on scoped threads
/// where they can be started, on the calling thread where they cannot. Returns when every
/// part is done.
///
/// # Panics
/// If `f` panics (on any thread), after every started thread has finished.
pub(crate) fn run_parts<P: Send>(parts: Vec<P>, f: impl Fn(P) + Sync) {
    if parts.len() <= 1 {
        parts.into_iter().for_each(f);
        return;
    }
    // Each part waits in a slot until a thread takes it. A thread whose start fails drops
    // its closure unrun, so its part is still in the slot for the calling thread to take.
    let slots: Vec<Mutex<Option<P>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let take = |slot: &Mutex<Option<P>>| slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    let (f, take) = (&f, &take);
    thread::scope(|scope| {
        let mut leftover = Vec::new();
        for (i, slot) in slots.iter().enumerate().skip(1) {
            let started = spawn(scope, move || {
                if let Some(p) = take(slot) {
                    f(p);
                }
            });
            if !started {
                leftover.push(i);
            }
        }
        for i in std::iter::once(0).chain(leftover) {
            if let Some(p) = take(&slots[i]) {
                f(p);
            }
        }
    });
}

/// Starts `job` on a new scoped thread; `false` when the thread could not be started.
fn spawn<'scope>(
    scope: &'scope thread::Scope<'scope, '_>,
    job: impl FnOnce() + Send + 'scope,
) -> bool {
    #[cfg(test)]
    if tests::SPAWN_FAILS.with(|fails| fails.get()) {
        return false;
    }
    thread::Builder::new().spawn_scoped(scope, job).is_ok()
}

/// Splits `rows` into at most `threads` contiguous bands whose lengths (but the last) are
/// multiples of `granule`, and not shorter than `granule`: `(start, len)` pairs in order.
pub(crate) fn row_bands(rows: usize, threads: usize, granule: usize) -> Vec<(usize, usize)> {
    let granule = granule.max(1);
    let band = rows
        .div_ceil(threads.clamp(1, rows.div_ceil(granule).max(1)))
        .next_multiple_of(granule)
        .max(granule);
    (0..rows)
        .step_by(band)
        .map(|start| (start, band.min(rows - start)))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    thread_local! {
        /// Test hook: while set on a thread, every spawn it attempts fails.
        pub(crate) static SPAWN_FAILS: Cell<bool> = const { Cell::new(false) };
    }

    /// Runs `f` with every thread start on this thread failing.
    pub(crate) fn with_spawn_failing<R>(f: impl FnOnce() -> R) -> R {
        SPAWN_FAILS.with(|s| s.set(true));
        let r = f();
        SPAWN_FAILS.with(|s| s.set(false));
        r
    }

    #[test]
    fn every_part_runs_once_whether_or_not_threads_start() {
        for failing in [false, true] {
            for n in [0, 1, 2, 5] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                let caller = thread::current().id();
                let on_caller = AtomicUsize::new(0);
                let job = || {
                    run_parts((0..n).collect(), |i: usize| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                        if thread::current().id() == caller {
                            on_caller.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                };
                if failing {
                    with_spawn_failing(job);
                } else {
                    job();
                }
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                let expected_on_caller = if failing { n } else { n.min(1) };
                assert_eq!(on_caller.load(Ordering::Relaxed), expected_on_caller);
            }
        }
    }

    #[test]
    fn bands_cover_the_rows_in_granules() {
        for rows in [0, 1, 5, 6, 7, 100, 4096] {
            for threads in [0, 1, 2, 3, 64] {
                for granule in [1, 4, 6] {
                    let bands = row_bands(rows, threads, granule);
                    assert!(bands.len() <= threads.max(1), "{rows} {threads} {granule}");
                    let mut next = 0;
                    for (i, &(start, len)) in bands.iter().enumerate() {
                        assert_eq!(start, next);
                        assert!(len > 0);
                        if i + 1 < bands.len() {
                            assert_eq!(len % granule, 0);
                        }
                        next += len;
                    }
                    assert_eq!(next, rows);
                }
            }
        }
    }
}
