//! The one place that talks to BLAS.
//!
//! [`gemm`] computes C ← α·A·B + β·C for any strides. Views whose memory is a row- or
//! column-major matrix (unit stride on one axis, leading dimension ≥ the other extent) go
//! straight to `cblas_?gemm` with the matching transpose flag; only views with no such layout
//! (negative or doubly-strided) are copied first. Without BLAS (`NDLORA_BLAS=none`, or none
//! found) the same entry point runs ndarray's pure-Rust `general_mat_mul`.

use std::cell::Cell;

use ndarray::{
    linalg::general_mat_mul, s, Array2, ArrayView2, ArrayViewMut2, Axis, CowArray, Ix2,
    LinalgScalar, Zip,
};

use crate::simd::rank_update::{fused_rank_update, UpdateElement};
use crate::simd::{simd_level, SimdLevel};

thread_local! {
    static COUNTERS: Cell<GemmCounters> = const { Cell::new(GemmCounters::ZERO) };
}

/// How this thread's matrix products were executed (see [`gemm_counters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GemmCounters {
    /// Calls that reached BLAS `?gemm`.
    pub blas_calls: u64,
    /// Calls computed by the pure-Rust fallback.
    pub fallback_calls: u64,
    /// Operands copied because their strides had no BLAS-compatible layout.
    pub layout_copies: u64,
    /// Merge/unmerge updates W ← W ± s·B A run by the fused SIMD kernel instead of a gemm
    /// (see [`LoraLayer::merge`](crate::LoraLayer::merge)).
    pub fused_updates: u64,
}

impl GemmCounters {
    const ZERO: Self = Self {
        blas_calls: 0,
        fallback_calls: 0,
        layout_copies: 0,
        fused_updates: 0,
    };
}

/// The counts of matrix products run on the calling thread since it started (or since
/// [`reset_gemm_counters`]). Lets you check that your array layouts reach BLAS without copies.
///
/// ```
/// use ndarray::Array2;
/// use ndlora::{LoraConfig, LoraLayer};
///
/// let layer = LoraLayer::new(Array2::<f32>::ones((8, 16)), LoraConfig { rank: 2, ..Default::default() })?;
/// ndlora::reset_gemm_counters();
/// layer.forward(Array2::<f32>::ones((4, 16)).view())?;
/// let c = ndlora::gemm_counters();
/// assert_eq!(c.blas_calls + c.fallback_calls, 3); // X Wᵀ, X Aᵀ, (X Aᵀ) Bᵀ
/// assert_eq!(c.layout_copies, 0);
/// # Ok::<(), ndlora::LoraError>(())
/// ```
pub fn gemm_counters() -> GemmCounters {
    COUNTERS.with(Cell::get)
}

/// Sets this thread's [`gemm_counters`] back to zero.
pub fn reset_gemm_counters() {
    COUNTERS.with(|c| c.set(GemmCounters::ZERO));
}

fn count(f: impl FnOnce(&mut GemmCounters)) {
    COUNTERS.with(|c| {
        let mut v = c.get();
        f(&mut v);
        c.set(v);
    });
}

/// Scalars the gemm module can multiply: `f32` and `f64`. Sealed (lives in a private module).
pub trait GemmScalar: LinalgScalar + PartialEq {
    /// `cblas_sgemm` or `cblas_dgemm`, row-major.
    ///
    /// # Safety
    /// The pointers and leading dimensions must describe valid row-major operands of the
    /// given sizes (BLAS's own contract); `c` must not alias `a` or `b`.
    #[cfg(ndlora_blas)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn cblas_gemm(
        ta: bool,
        tb: bool,
        dims: [i32; 3],
        alpha: Self,
        a: (*const Self, i32),
        b: (*const Self, i32),
        beta: Self,
        c: (*mut Self, i32),
    );
}

macro_rules! impl_gemm_scalar {
    ($t:ty, $f:ident) => {
        impl GemmScalar for $t {
            #[cfg(ndlora_blas)]
            unsafe fn cblas_gemm(
                ta: bool,
                tb: bool,
                [m, n, k]: [i32; 3],
                alpha: Self,
                (a, lda): (*const Self, i32),
                (b, ldb): (*const Self, i32),
                beta: Self,
                (c, ldc): (*mut Self, i32),
            ) {
                use cblas_sys::{CblasNoTrans, CblasRowMajor, CblasTrans};
                let t = |yes: bool| if yes { CblasTrans } else { CblasNoTrans };
                // SAFETY: forwarded from this function's contract.
                unsafe {
                    cblas_sys::$f(
                        CblasRowMajor,
                        t(ta),
                        t(tb),
                        m,
                        n,
                        k,
                        alpha,
                        a,
                        lda,
                        b,
                        ldb,
                        beta,
                        c,
                        ldc,
                    )
                }
            }
        }
    };
}
impl_gemm_scalar!(f32, cblas_sgemm);
impl_gemm_scalar!(f64, cblas_dgemm);

/// How a view's memory reads as a row-major BLAS operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(ndlora_blas), allow(dead_code))]
struct BlasLayout {
    /// The memory is the row-major transpose of the view (the view is column-major).
    transposed: bool,
    /// Leading dimension, in elements.
    ld: usize,
}

/// The row-major BLAS description of `rows × cols` memory with `strides`, if there is one.
/// Axes of extent ≤ 1 may have any stride, since it is never used.
#[cfg_attr(not(ndlora_blas), allow(dead_code))]
fn blas_layout(rows: usize, cols: usize, strides: &[isize]) -> Option<BlasLayout> {
    let (s0, s1) = (strides[0], strides[1]);
    let unit = |extent: usize, s: isize| extent <= 1 || s == 1;
    let lead = |extent: usize, s: isize, other: usize| {
        if extent <= 1 {
            Some(other.max(1))
        } else {
            usize::try_from(s).ok().filter(|&s| s >= other.max(1))
        }
    };
    if unit(cols, s1) {
        if let Some(ld) = lead(rows, s0, cols) {
            return Some(BlasLayout {
                transposed: false,
                ld,
            });
        }
    }
    if unit(rows, s0) {
        if let Some(ld) = lead(cols, s1, rows) {
            return Some(BlasLayout {
                transposed: true,
                ld,
            });
        }
    }
    None
}

/// `v` itself when BLAS can read it in place, else one standard-layout copy (counted), so a
/// caller that uses an operand in several products copies it at most once.
pub(crate) fn blas_operand<T: GemmScalar>(v: ArrayView2<'_, T>) -> CowArray<'_, T, Ix2> {
    #[cfg(ndlora_blas)]
    if blas_layout(v.nrows(), v.ncols(), v.strides()).is_none() {
        count(|c| c.layout_copies += 1);
        return CowArray::from(v.as_standard_layout().into_owned());
    }
    CowArray::from(v)
}

/// C ← α·A·B + β·C. With β = 0, C's old contents (even NaN) are ignored.
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn gemm<T: GemmScalar>(
    alpha: T,
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    beta: T,
    mut c: ArrayViewMut2<'_, T>,
) {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert!(
        k == k2 && c.dim() == (m, n),
        "gemm shapes do not chain: {:?} · {:?} → {:?}",
        a.dim(),
        b.dim(),
        c.dim()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if beta == T::zero() {
            c.fill(T::zero());
        } else {
            c.map_inplace(|v| *v = *v * beta);
        }
        return;
    }
    gemm_nonempty(alpha, a, b, beta, c);
}

#[cfg(ndlora_blas)]
fn gemm_nonempty<T: GemmScalar>(
    alpha: T,
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    beta: T,
    mut c: ArrayViewMut2<'_, T>,
) {
    let (m, k) = a.dim();
    let n = b.dim().1;
    let fits = |v: usize| i32::try_from(v).is_ok();
    let c_layout = blas_layout(m, n, c.strides());
    let dims_fit = [m, n, k].into_iter().all(fits);
    match c_layout {
        // A column-major C is the row-major Cᵀ = Bᵀ·Aᵀ.
        Some(l) if l.transposed && dims_fit && fits(l.ld) => {
            gemm_nonempty(alpha, b.t(), a.t(), beta, c.reversed_axes())
        }
        Some(l) if dims_fit && fits(l.ld) => {
            let a_owned;
            let a = match blas_layout(m, k, a.strides()) {
                Some(l) if fits(l.ld) => (a, l),
                _ => {
                    count(|c| c.layout_copies += 1);
                    a_owned = a.as_standard_layout().into_owned();
                    (
                        a_owned.view(),
                        blas_layout(m, k, a_owned.strides()).expect("standard layout"),
                    )
                }
            };
            let b_owned;
            let b = match blas_layout(k, n, b.strides()) {
                Some(l) if fits(l.ld) => (b, l),
                _ => {
                    count(|c| c.layout_copies += 1);
                    b_owned = b.as_standard_layout().into_owned();
                    (
                        b_owned.view(),
                        blas_layout(k, n, b_owned.strides()).expect("standard layout"),
                    )
                }
            };
            count(|c| c.blas_calls += 1);
            let as_i32 = |v: usize| v as i32; // checked by `fits` above
                                              // SAFETY: every operand is described by `blas_layout` of its own shape and strides:
                                              // unit stride on one axis, a positive leading dimension ≥ the other extent, and
                                              // the view keeps the memory alive for the call. All sizes fit in i32. `c` is a
                                              // unique borrow, so it aliases neither `a` nor `b`.
            unsafe {
                T::cblas_gemm(
                    a.1.transposed,
                    b.1.transposed,
                    [as_i32(m), as_i32(n), as_i32(k)],
                    alpha,
                    (a.0.as_ptr(), as_i32(a.1.ld)),
                    (b.0.as_ptr(), as_i32(b.1.ld)),
                    beta,
                    (c.as_mut_ptr(), as_i32(l.ld)),
                );
            }
        }
        Some(_) => fallback(alpha, a, b, beta, c),
        None => {
            // No BLAS layout for C: compute into a standard-layout copy, then write back.
            count(|c| c.layout_copies += 1);
            let mut tmp = c.as_standard_layout().into_owned();
            gemm_nonempty(alpha, a, b, beta, tmp.view_mut());
            c.assign(&tmp);
        }
    }
}

#[cfg(not(ndlora_blas))]
fn gemm_nonempty<T: GemmScalar>(
    alpha: T,
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    beta: T,
    c: ArrayViewMut2<'_, T>,
) {
    fallback(alpha, a, b, beta, c)
}

fn fallback<T: GemmScalar>(
    alpha: T,
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    beta: T,
    mut c: ArrayViewMut2<'_, T>,
) {
    count(|c| c.fallback_calls += 1);
    general_mat_mul(alpha, &a, &b, beta, &mut c);
}

/// W ← W + α·B A (B d×r, A r×k, W d×k): the merge update. Runs the fused SIMD kernel
/// (`simd::rank_update`) when it applies — a SIMD CPU, r ≤ `MAX_FUSED_RANK`, W with a unit
/// stride — and otherwise one gemm per band of rows into a small temporary, added to W.
/// Either way no d×k temporary is made.
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn rank_update<T: GemmScalar + UpdateElement>(
    alpha: T,
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    mut w: ArrayViewMut2<'_, T>,
) {
    let level = simd_level();
    if level != SimdLevel::Scalar
        && fused_rank_update(
            level,
            alpha,
            b,
            a,
            w.view_mut(),
            crate::backend::kernel_threads(),
        )
    {
        count(|c| c.fused_updates += 1);
        return;
    }
    // Not `gemm(α, B, A, 1, W)`: how a BLAS adds into C with β = 1 is its own choice, and
    // reference BLAS adds each of the r terms into W separately (r roundings at |W|'s scale,
    // not one). A band of rows at a time, T = α·B A is formed with β = 0 and then added, so
    // every element is the correctly rounded sum of Wᵢⱼ and Tᵢⱼ with any BLAS.
    let (d, k) = w.dim();
    if d == 0 || k == 0 {
        return;
    }
    let band = (UPDATE_BAND_ELEMENTS / k).max(UPDATE_BAND_MIN_ROWS).min(d);
    let mut t = Array2::zeros((band, k));
    for (w, b) in w
        .axis_chunks_iter_mut(Axis(0), band)
        .zip(b.axis_chunks_iter(Axis(0), band))
    {
        let mut t = t.slice_mut(s![..w.nrows(), ..]);
        gemm(alpha, b, a, T::zero(), t.view_mut());
        Zip::from(w).and(&t).for_each(|w, &t| *w = *w + t);
    }
}

/// Elements of the temporary per band in [`rank_update`]'s gemm path (4 MiB of f32)...
const UPDATE_BAND_ELEMENTS: usize = 1 << 20;
/// ...but at least this many rows: thinner bands make the gemm itself inefficient.
const UPDATE_BAND_MIN_ROWS: usize = 64;

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
    // SAFETY (for the block): the caller guarantees no concurrent BLAS call or environment
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
pub(crate) fn set_threads(n: usize) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let l = |r, c, s: [isize; 2]| blas_layout(r, c, &s);
        let row = |ld| {
            Some(BlasLayout {
                transposed: false,
                ld,
            })
        };
        let col = |ld| {
            Some(BlasLayout {
                transposed: true,
                ld,
            })
        };
        assert_eq!(l(3, 4, [4, 1]), row(4));
        assert_eq!(l(3, 4, [8, 1]), row(8)); // sub-view with a leading dimension
        assert_eq!(l(3, 4, [1, 3]), col(3));
        assert_eq!(l(3, 4, [2, 1]), None); // overlapping rows
        assert_eq!(l(3, 4, [8, 2]), None); // doubly strided
        assert_eq!(l(3, 4, [-4, 1]), None); // negative
        assert_eq!(l(1, 4, [0, 1]), row(4)); // one row: its stride is never used
        assert_eq!(l(3, 1, [5, 0]), row(5)); // one column
        assert_eq!(l(1, 1, [7, 9]), row(1));
    }
}
