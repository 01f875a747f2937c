//! A merge whose worker threads cannot start (here: an address-space limit leaves no room for
//! a thread's stack, as a pid or memory limit would in production) still completes, on the
//! calling thread, with the same bits as a one-thread merge — never a panic, never a
//! half-merged W. The test re-runs itself in a child process, since the limit is per process.

mod common;

use common::random_layer;

/// The child's exit code when the limit did not stop a probe thread from starting.
#[cfg(target_os = "linux")]
const INCONCLUSIVE: i32 = 3;

#[cfg(target_os = "linux")]
fn vm_size_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize line");
    kb * 1024
}

#[test]
#[cfg(target_os = "linux")]
fn merge_completes_when_threads_cannot_start() {
    if std::env::var_os("NDLORA_THREAD_LIMIT_CHILD").is_none() {
        // A child whose probe thread could still start (glibc can reuse a cached stack) is
        // inconclusive and says so with exit code 3; retry, and require one conclusive run.
        for attempt in 1..=8 {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "merge_completes_when_threads_cannot_start",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("NDLORA_THREAD_LIMIT_CHILD", "1")
                .status()
                .unwrap();
            if status.code() == Some(INCONCLUSIVE) {
                println!("attempt {attempt}: a thread could still start; retrying");
                continue;
            }
            assert!(status.success(), "child failed: {status}");
            return;
        }
        panic!("no attempt could stop a thread from starting");
    }
    // d·k·r = 2²⁴ multiply-adds: large enough that merge splits W's rows over threads.
    let layer = random_layer::<f32>(1024, 1024, 16, 7);
    let mut one_thread = layer.clone();
    ndlora::set_blas_threads(1);
    one_thread.merge().unwrap();
    // (Returns whether the BLAS's own count could be set: false without OpenBLAS.)
    ndlora::set_blas_threads(2);
    let mut limited = layer.clone();
    // No thread has run a merge band yet, so glibc has no cached thread stack to reuse. Limit
    // the address space to what is mapped now: no new mapping (a thread's stack) fits, while
    // the merge's small buffer comes from heap memory the one-thread merge already freed.
    let limit = vm_size_bytes();
    let rlim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to an initialised struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rlim) }, 0);
    let spawned = std::thread::Builder::new().spawn(|| ());
    let could_spawn = spawned.is_ok();
    if let Ok(handle) = spawned {
        handle.join().unwrap();
    }
    let result = limited.merge();
    // Lift the limit before asserting, so that a failure can be reported.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &unlimited) }, 0);
    if could_spawn {
        std::process::exit(INCONCLUSIVE);
    }
    result.expect("merge under the limit");
    assert!(limited.is_merged());
    assert_eq!(
        limited, one_thread,
        "not bit-identical to a one-thread merge"
    );
}

/// A thread count above `max_threads` is refused and changes nothing (OpenBLAS would grow its
/// pool to any count it is given).
#[test]
fn thread_counts_above_the_maximum_are_refused() {
    let max = ndlora::max_threads();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    assert!((1..=4 * cores).contains(&max), "max_threads {max}");
    let before = ndlora::backend().threads;
    for huge in [max + 1, 1 << 20, usize::MAX] {
        assert!(!ndlora::set_blas_threads(huge), "{huge} accepted");
        assert_eq!(
            ndlora::backend().threads,
            before,
            "{huge} changed the BLAS threads"
        );
    }
}
