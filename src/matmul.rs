//! How a matrix product runs, decided by shape and layout: views whose memory BLAS can
//! describe go straight to `cblas_?gemm` with the matching transpose flag, a column-major
//! output is handled as Cᵀ = Bᵀ·Aᵀ, and only views with no such layout (negative or
//! doubly-strided) are copied first. Without BLAS (`NDLORA_BLAS=none`, or none found) the
//! same entry point runs the pure-Rust fallback.

use ndarray::{ArrayView2, ArrayViewMut2, CowArray, Ix2};

#[cfg(ndlora_blas)]
use crate::blas::{blas_layout, count, BlasLayout};
use crate::blas::{fallback, GemmScalar};

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
    let c_layout = blas_layout(m, n, c.strides());
    let dims_fit = [m, n, k].into_iter().all(fits);
    match c_layout {
        // A column-major C is the row-major Cᵀ = Bᵀ·Aᵀ.
        Some(l) if l.transposed && dims_fit && fits(l.ld) => {
            gemm_nonempty(alpha, b.t(), a.t(), beta, c.reversed_axes())
        }
        Some(l) if dims_fit && fits(l.ld) => {
            let (a, a_layout) = blas_view(a);
            let (b, b_layout) = blas_view(b);
            count(|c| c.blas_calls += 1);
            // Checked by `fits` above.
            let as_i32 = |v: usize| v as i32;
            // SAFETY: every operand is described by `blas_layout` of its own shape and
            // strides: unit stride on one axis, a positive leading dimension ≥ the other
            // extent, and the view keeps the memory alive for the call. All sizes fit in i32.
            // `c` is a unique borrow, so it aliases neither `a` nor `b`.
            unsafe {
                T::cblas_gemm(
                    a_layout.transposed,
                    b_layout.transposed,
                    [as_i32(m), as_i32(n), as_i32(k)],
                    alpha,
                    (a.as_ptr(), as_i32(a_layout.ld)),
                    (b.as_ptr(), as_i32(b_layout.ld)),
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

/// Whether a size fits BLAS's `int`.
#[cfg(ndlora_blas)]
fn fits(v: usize) -> bool {
    i32::try_from(v).is_ok()
}

/// `v` with its BLAS layout, or a standard-layout copy of it (counted) when it has no layout
/// BLAS can describe with an `int` leading dimension.
#[cfg(ndlora_blas)]
fn blas_view<T: GemmScalar>(v: ArrayView2<'_, T>) -> (CowArray<'_, T, Ix2>, BlasLayout) {
    let (rows, cols) = v.dim();
    match blas_layout(rows, cols, v.strides()) {
        Some(l) if fits(l.ld) => (CowArray::from(v), l),
        _ => {
            count(|c| c.layout_copies += 1);
            let owned = v.as_standard_layout().into_owned();
            let l = blas_layout(rows, cols, owned.strides()).expect("standard layout");
            (CowArray::from(owned), l)
        }
    }
}
