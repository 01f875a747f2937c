//! Which gemm backend this build runs, as the library itself reports it.

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
    if !crate::gemm::HAS_BLAS {
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
    if let Some((config, core, threads)) = crate::gemm::openblas_info() {
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
/// ndlora's own fused merge/unmerge kernel (always). Benchmarks use it to measure one thread.
/// Until it is called, the fused kernel follows OpenBLAS's count (so `OPENBLAS_NUM_THREADS`
/// applies to both), or uses every core with another backend.
pub fn set_blas_threads(threads: usize) -> bool {
    KERNEL_THREADS.store(threads.max(1), Ordering::Relaxed);
    crate::gemm::set_threads(threads)
}

/// The thread count set by [`set_blas_threads`]; 0 until then.
static KERNEL_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Threads the fused merge kernel may use (see [`set_blas_threads`]).
pub(crate) fn kernel_threads() -> usize {
    match KERNEL_THREADS.load(Ordering::Relaxed) {
        0 => crate::gemm::blas_threads()
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
        unsafe { crate::gemm::openblas_reselect_core(wanted) }
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
}
