//! The only file that calls BLAS: the `cblas_?gemm` declarations (through `cblas-sys`), how
//! a view's memory reads as a BLAS operand, the pure-Rust fallback (ndarray's
//! `general_mat_mul`) for builds without BLAS, and the per-thread counters that show which
//! of them ran. *Which* product runs for a given shape is decided in `matmul.rs`.

use std::cell::Cell;

use ndarray::{linalg::general_mat_mul, ArrayView2, ArrayViewMut2, LinalgScalar};

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
    /// Forwards of at most [`N_SKINNY`](crate::N_SKINNY) rows run by ndlora's own skinny
    /// kernel (one pass over W, bias and LoRA branch included) instead of BLAS.
    pub skinny_products: u64,
}

impl GemmCounters {
    const ZERO: Self = Self {
        blas_calls: 0,
        fallback_calls: 0,
        layout_copies: 0,
        fused_updates: 0,
        skinny_products: 0,
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
/// layer.forward(Array2::<f32>::ones((ndlora::N_SKINNY + 1, 16)).view())?;
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

pub(crate) fn count(f: impl FnOnce(&mut GemmCounters)) {
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
pub(crate) struct BlasLayout {
    /// The memory is the row-major transpose of the view (the view is column-major).
    pub(crate) transposed: bool,
    /// Leading dimension, in elements.
    pub(crate) ld: usize,
}

/// The row-major BLAS description of `rows × cols` memory with `strides`, if there is one.
/// Axes of extent ≤ 1 may have any stride, since it is never used.
#[cfg_attr(not(ndlora_blas), allow(dead_code))]
pub(crate) fn blas_layout(rows: usize, cols: usize, strides: &[isize]) -> Option<BlasLayout> {
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

/// C ← α·A·B + β·C by the pure-Rust fallback (counted).
pub(crate) fn fallback<T: GemmScalar>(
    alpha: T,
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    beta: T,
    mut c: ArrayViewMut2<'_, T>,
) {
    count(|c| c.fallback_calls += 1);
    general_mat_mul(alpha, &a, &b, beta, &mut c);
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
