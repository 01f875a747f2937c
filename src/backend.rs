//! Which BLAS this build links, as the library itself reports it; OpenBLAS administration
//! (its kernel choice and thread count, through OpenBLAS's own non-BLAS entry points); and
//! the thread count of ndlora's own kernels.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A description of the linked gemm backend, from [`backend`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backend {
    /// `"openblas"`, `"blis"`, `"netlib"`, `"intel-mkl"`, `"accelerate"`, or `"pure-rust"`.
    pub name: &'static str,
    /// How build.rs chose it, e.g. `openblas (system, pkg-config 0.3.21)`.
    pub build: &'static str,
    /// The library's own configuration string, when it tells (OpenBLAS does).
    pub config: Option<String>,
    /// The compute kernel the library picked for this CPU, when it tells (OpenBLAS's core name).
    pub core: Option<String>,
    /// The library's thread count, when it tells.
    pub threads: Option<usize>,
    /// Set when the backend runs a kernel older than this CPU supports (e.g. OpenBLAS picking
    /// `Prescott` on an AVX-512 machine), with the fix.
    pub warning: Option<String>,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.build)?;
        if let Some(core) = &self.core {
            write!(f, ", core {core}")?;
        }
        if let Some(t) = self.threads {
            write!(f, ", {t} thread{}", if t == 1 { "" } else { "s" })?;
        }
        if let Some(w) = &self.warning {
            write!(f, "\nwarning: {w}")?;
        }
        Ok(())
    }
}

/// Describes the gemm backend this build links, and warns about a slow kernel choice.
///
/// ```
/// let b = ndlora::backend();
/// println!("{b}");
/// assert!(!b.name.is_empty());
/// ```
pub fn backend() -> Backend {
    let build = env!("NDLORA_BACKEND_DETAIL");
    if !HAS_BLAS {
        return Backend {
            name: "pure-rust",
            build,
            config: None,
            core: None,
            threads: None,
            warning: None,
        };
    }
    #[cfg(ndlora_backend = "openblas")]
    if let Some((config, core, threads)) = openblas_info() {
        let warning = openblas_core_warning(&core);
        return Backend {
            name: "openblas",
            build,
            config: Some(config),
            core: Some(core),
            threads: Some(threads),
            warning,
        };
    }
    Backend {
        name: build.split_whitespace().next().unwrap_or("blas"),
        build,
        config: None,
        core: None,
        threads: None,
        warning: None,
    }
}

/// Sets how many threads ndlora's matrix work uses: the BLAS library's thread count
/// (OpenBLAS only; the return value says whether that could be set) and the thread count of
/// ndlora's own kernels (the fused merge/unmerge kernel; always). Benchmarks use it to
/// measure one thread. Until it is called, ndlora's kernels follow OpenBLAS's count (so
/// `OPENBLAS_NUM_THREADS` applies to both), or use every core with another backend. 0 means 1.
///
/// A count above [`max_threads`] is refused: nothing changes and it returns `false`. (An
/// unbounded count would make OpenBLAS grow its thread pool without limit.)
///
/// ```
/// assert!(!ndlora::set_blas_threads(ndlora::max_threads() + 1)); // refused, nothing changed
/// ndlora::set_blas_threads(1); // one thread for BLAS and ndlora's kernels
/// ```
pub fn set_blas_threads(threads: usize) -> bool {
    if threads > max_threads() {
        return false;
    }
    KERNEL_THREADS.store(threads.max(1), Ordering::Relaxed);
    set_threads(threads)
}

/// The largest count [`set_blas_threads`] accepts: 4 threads per core this process may use
/// (`std::thread::available_parallelism`; more only adds switching), and no more than the
/// `MAX_THREADS` the linked OpenBLAS was built for, when it reports one.
///
/// ```
/// assert!(ndlora::max_threads() >= 1);
/// ```
pub fn max_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let ours = cores.saturating_mul(THREADS_PER_CORE);
    openblas_max_threads().map_or(ours, |blas| ours.min(blas).max(1))
}

/// Threads per core ndlora's kernels can put to use at most (see [`max_threads`]).
const THREADS_PER_CORE: usize = 4;

/// The thread count set by [`set_blas_threads`]; 0 until then.
static KERNEL_THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// A thread count for ndlora's kernels on this thread only (0: none), set by
    /// [`with_one_kernel_thread`].
    static KERNEL_THREADS_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs `f` with ndlora's own kernels limited to one thread on this thread: for callers that
/// already split their work over threads (the checkpoint merge's workers).
pub(crate) fn with_one_kernel_thread<R>(f: impl FnOnce() -> R) -> R {
    let before = KERNEL_THREADS_HERE.with(|c| c.replace(1));
    let result = f();
    KERNEL_THREADS_HERE.with(|c| c.set(before));
    result
}

/// Threads ndlora's own kernels may use (see [`set_blas_threads`]).
pub(crate) fn kernel_threads() -> usize {
    let here = KERNEL_THREADS_HERE.with(std::cell::Cell::get);
    if here != 0 {
        return here;
    }
    match KERNEL_THREADS.load(Ordering::Relaxed) {
        0 => blas_threads()
            .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
            .unwrap_or(1),
        n => n,
    }
}

/// Switches OpenBLAS to the kernel this CPU supports when it runs a generic one (the case
/// [`Backend::warning`] reports), by re-running the library's own kernel selection with
/// `OPENBLAS_CORETYPE` set to `SkylakeX` (AVX-512) or `Haswell` (AVX2). Returns the core now
/// in use, or `None` when there was nothing to fix or this build cannot (not OpenBLAS, or an
/// OpenBLAS built without DYNAMIC_ARCH). Setting `OPENBLAS_CORETYPE` before the program
/// starts does the same without `unsafe`.
///
/// # Safety
/// Call it at start-up, before any other thread exists that may call BLAS or read or write
/// the environment: it replaces OpenBLAS's global kernel table and briefly sets an
/// environment variable.
///
/// ```
/// // SAFETY: a single-threaded start of the program; nothing else uses BLAS yet.
/// let switched = unsafe { ndlora::use_native_openblas_kernel() };
/// if let Some(core) = &switched {
///     println!("OpenBLAS now runs its {core} kernel");
/// }
/// assert!(ndlora::backend().warning.is_none() || switched.is_none());
/// ```
pub unsafe fn use_native_openblas_kernel() -> Option<String> {
    #[cfg(all(ndlora_backend = "openblas", unix))]
    {
        let b = backend();
        let core = b.core.as_deref()?;
        b.warning.as_ref()?;
        let wanted = wanted_core(cpu_vector_level())?;
        if core.eq_ignore_ascii_case(wanted) {
            return None;
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { openblas_reselect_core(wanted) }
    }
    #[cfg(not(all(ndlora_backend = "openblas", unix)))]
    None
}

/// The OpenBLAS core name to ask for on a CPU with (AVX2+FMA, AVX-512F).
#[cfg_attr(not(ndlora_backend = "openblas"), allow(dead_code))]
fn wanted_core((avx2, avx512): (bool, bool)) -> Option<&'static str> {
    if avx512 {
        Some("SkylakeX")
    } else if avx2 {
        Some("Haswell")
    } else {
        None
    }
}

/// OpenBLAS kernels that use neither AVX2 nor AVX-512.
#[cfg_attr(not(ndlora_backend = "openblas"), allow(dead_code))]
const PRE_AVX2_CORES: [&str; 20] = [
    "prescott",
    "katmai",
    "coppermine",
    "northwood",
    "banias",
    "core2",
    "penryn",
    "dunnington",
    "nehalem",
    "sandybridge",
    "atom",
    "athlon",
    "opteron",
    "opteron_sse3",
    "barcelona",
    "bobcat",
    "bulldozer",
    "piledriver",
    "steamroller",
    "nano",
];

/// The warning for an OpenBLAS core that underuses this CPU, if any.
#[cfg_attr(not(ndlora_backend = "openblas"), allow(dead_code))]
fn openblas_core_warning(core: &str) -> Option<String> {
    let (avx2, avx512) = cpu_vector_level();
    let core_lc = core.to_ascii_lowercase();
    let generic = PRE_AVX2_CORES.contains(&core_lc.as_str());
    let wanted = wanted_core((avx2, avx512))?;
    let only_avx2 = matches!(core_lc.as_str(), "haswell" | "zen" | "excavator");
    if generic || (avx512 && only_avx2 && !core_lc.starts_with("zen")) {
        Some(format!(
            "OpenBLAS runs its {core} kernel although this CPU has {}; sgemm is several times \
             slower than it could be. Start the program with OPENBLAS_CORETYPE={wanted} \
             (it is read when the library loads), call ndlora::use_native_openblas_kernel() \
             at start-up, or link a newer OpenBLAS.",
            if avx512 { "AVX-512" } else { "AVX2" }
        ))
    } else {
        None
    }
}

/// (AVX2+FMA, AVX-512F) on this CPU.
fn cpu_vector_level() -> (bool, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        (
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            is_x86_feature_detected!("avx512f"),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (false, false)
    }
}

/// Whether this build calls a BLAS library.
pub(crate) const HAS_BLAS: bool = cfg!(ndlora_blas);

/// OpenBLAS's own account of itself: (config string, core name, threads).
#[cfg(ndlora_backend = "openblas")]
pub(crate) fn openblas_info() -> Option<(String, String, usize)> {
    use std::ffi::{c_char, CStr};
    extern "C" {
        fn openblas_get_config() -> *const c_char;
        fn openblas_get_corename() -> *const c_char;
    }
    let read = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: OpenBLAS returns a pointer to a static NUL-terminated string.
            unsafe { CStr::from_ptr(p) }
                .to_string_lossy()
                .trim()
                .to_owned()
        }
    };
    // SAFETY: these OpenBLAS functions take no arguments and only read global state.
    let (config, core) = unsafe { (read(openblas_get_config()), read(openblas_get_corename())) };
    Some((config, core, blas_threads().unwrap_or(0)))
}

/// Re-runs OpenBLAS's kernel selection with `OPENBLAS_CORETYPE=core`, as the library does
/// when it loads. Returns the new core name, or `None` when this OpenBLAS cannot do it (not
/// a DYNAMIC_ARCH build: the symbols are looked up at run time, so nothing breaks the link).
///
/// # Safety
/// No other thread may be inside a BLAS call or reading or writing the environment.
#[cfg(all(ndlora_backend = "openblas", unix))]
pub(crate) unsafe fn openblas_reselect_core(core: &str) -> Option<String> {
    use std::ffi::{c_void, CString};
    let sym = |name: &str| {
        let name = CString::new(name).expect("no NUL");
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only reads the symbol
        // tables of the loaded objects.
        unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
    };
    let (table, init) = (sym("gotoblas"), sym("gotoblas_dynamic_init"));
    if table.is_null() || init.is_null() {
        return None;
    }
    // SAFETY: `gotoblas_dynamic_init` is `void (void)` in every DYNAMIC_ARCH OpenBLAS.
    let init: unsafe extern "C" fn() = unsafe { std::mem::transmute::<*mut c_void, _>(init) };
    let previous = std::env::var_os("OPENBLAS_CORETYPE");
    // SAFETY: (for the block) the caller guarantees no concurrent BLAS call or environment
    // access. `gotoblas` is OpenBLAS's pointer to the active kernel table; clearing it makes
    // `gotoblas_dynamic_init` select and initialise a table again, reading
    // OPENBLAS_CORETYPE exactly as at load time.
    unsafe {
        std::env::set_var("OPENBLAS_CORETYPE", core);
        *(table as *mut *mut c_void) = std::ptr::null_mut();
        init();
        match previous {
            Some(v) => std::env::set_var("OPENBLAS_CORETYPE", v),
            None => std::env::remove_var("OPENBLAS_CORETYPE"),
        }
    }
    openblas_info().map(|(_, core, _)| core)
}

/// OpenBLAS's current thread count; `None` with another backend.
pub(crate) fn blas_threads() -> Option<usize> {
    #[cfg(ndlora_backend = "openblas")]
    {
        extern "C" {
            fn openblas_get_num_threads() -> std::ffi::c_int;
        }
        // SAFETY: plain getter of OpenBLAS's global thread pool size.
        let n = unsafe { openblas_get_num_threads() };
        usize::try_from(n).ok().filter(|&n| n > 0)
    }
    #[cfg(not(ndlora_backend = "openblas"))]
    None
}

/// Sets OpenBLAS's thread count; `false` when the backend offers no such call.
fn set_threads(n: usize) -> bool {
    #[cfg(ndlora_backend = "openblas")]
    {
        extern "C" {
            fn openblas_set_num_threads(n: std::ffi::c_int);
        }
        let n = std::ffi::c_int::try_from(n.max(1)).unwrap_or(std::ffi::c_int::MAX);
        // SAFETY: plain setter on OpenBLAS's global thread pool size; any n ≥ 1 is valid.
        unsafe { openblas_set_num_threads(n) };
        true
    }
    #[cfg(not(ndlora_backend = "openblas"))]
    {
        let _ = n;
        false
    }
}

/// The `MAX_THREADS=n` in OpenBLAS's configuration string: the most threads it was built for.
fn openblas_max_threads() -> Option<usize> {
    #[cfg(ndlora_backend = "openblas")]
    {
        let (config, _, _) = openblas_info()?;
        config_max_threads(&config)
    }
    #[cfg(not(ndlora_backend = "openblas"))]
    None
}

/// `n` from the `MAX_THREADS=n` word of an OpenBLAS configuration string.
#[cfg_attr(not(ndlora_backend = "openblas"), allow(dead_code))]
fn config_max_threads(config: &str) -> Option<usize> {
    config
        .split_whitespace()
        .find_map(|w| w.strip_prefix("MAX_THREADS="))
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_kernel_on_a_vector_cpu_warns() {
        let (avx2, _) = cpu_vector_level();
        assert_eq!(openblas_core_warning("Prescott").is_some(), avx2);
        assert!(openblas_core_warning("SkylakeX").is_none());
        if let Some(w) = openblas_core_warning("Prescott") {
            assert!(w.contains("OPENBLAS_CORETYPE="), "{w}");
        }
    }

    #[test]
    fn max_threads_from_the_config_string() {
        let config = "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Prescott MAX_THREADS=64";
        assert_eq!(config_max_threads(config), Some(64));
        assert_eq!(config_max_threads("OpenBLAS 0.3.21 Haswell"), None);
        assert_eq!(config_max_threads("MAX_THREADS=0"), None);
        assert_eq!(config_max_threads("MAX_THREADS=x"), None);
    }
}
