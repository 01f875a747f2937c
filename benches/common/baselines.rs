//! What a user would otherwise run, shared by the benches and `examples/paths.rs`
//! (`#[path]`-included): a bare BLAS gemm (f32 or f64) and gemv (f32) of X Wᵀ, and one
//! streaming read of W (the memory floor of a one-row forward). Row-major.

#![allow(dead_code)]

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut1};

/// `cblas_sgemm` / `cblas_dgemm` for [`bare_gemm`].
pub trait BareGemm: ndarray::LinalgScalar {
    /// Row-major C (m×n) = A (m×k) · Bᵀ (B n×k), leading dimensions k, k, n.
    ///
    /// # Safety
    /// BLAS's own contract: the pointers hold row-major operands of those shapes; `c` aliases
    /// neither input.
    #[cfg(ndlora_blas)]
    unsafe fn gemm_nt(m: i32, n: i32, k: i32, a: *const Self, b: *const Self, c: *mut Self);
}

macro_rules! bare_gemm_impl {
    ($t:ty, $f:ident) => {
        impl BareGemm for $t {
            #[cfg(ndlora_blas)]
            unsafe fn gemm_nt(
                m: i32,
                n: i32,
                k: i32,
                a: *const Self,
                b: *const Self,
                c: *mut Self,
            ) {
                use cblas_sys::{CblasNoTrans, CblasRowMajor, CblasTrans};
                // SAFETY: forwarded from this function's contract.
                unsafe {
                    cblas_sys::$f(
                        CblasRowMajor,
                        CblasNoTrans,
                        CblasTrans,
                        m,
                        n,
                        k,
                        1.0,
                        a,
                        k,
                        b,
                        k,
                        0.0,
                        c,
                        n,
                    )
                }
            }
        }
    };
}
bare_gemm_impl!(f32, cblas_sgemm);
bare_gemm_impl!(f64, cblas_dgemm);

/// Y = X Wᵀ with nothing around it: the cost floor of any forward (`cblas_?gemm`, or
/// ndarray's pure-Rust gemm without BLAS).
pub fn bare_gemm<T: BareGemm>(x: &Array2<T>, w: &Array2<T>, y: &mut Array2<T>) {
    #[cfg(ndlora_blas)]
    {
        let (n, k) = x.dim();
        let d = w.nrows();
        assert!(x.is_standard_layout() && w.is_standard_layout() && y.is_standard_layout());
        assert_eq!(y.dim(), (n, d));
        let i = |v: usize| i32::try_from(v).expect("fits BLAS int");
        // SAFETY: all three arrays are standard (row-major) layout with the asserted shapes,
        // so the leading dimensions k, k, d describe them; y is borrowed mutably, no alias.
        unsafe { T::gemm_nt(i(n), i(d), i(k), x.as_ptr(), w.as_ptr(), y.as_mut_ptr()) };
    }
    #[cfg(not(ndlora_blas))]
    ndarray::linalg::general_mat_mul(T::one(), x, &w.t(), T::zero(), y);
}

/// y = W x for one row x (`cblas_sgemv`, or ndarray's pure-Rust product without BLAS).
pub fn bare_gemv(w: ArrayView2<'_, f32>, x: ArrayView1<'_, f32>, mut y: ArrayViewMut1<'_, f32>) {
    #[cfg(ndlora_blas)]
    {
        use cblas_sys::{cblas_sgemv, CblasNoTrans, CblasRowMajor};
        let (d, k) = w.dim();
        assert!(w.is_standard_layout() && x.len() == k && y.len() == d);
        assert!(x.as_slice().is_some() && y.as_slice().is_some());
        let i = |v: usize| i32::try_from(v).expect("fits BLAS int");
        // SAFETY: W is row-major d×k with leading dimension k; x and y are contiguous of the
        // asserted lengths; y is borrowed mutably, so it aliases neither input.
        unsafe {
            cblas_sgemv(
                CblasRowMajor,
                CblasNoTrans,
                i(d),
                i(k),
                1.0,
                w.as_ptr(),
                i(k),
                x.as_ptr(),
                1,
                0.0,
                y.as_mut_ptr(),
                1,
            );
        }
    }
    #[cfg(not(ndlora_blas))]
    y.assign(&w.dot(&x));
}

/// One streaming read of `w`: the sum of its elements in 16 independent lanes (which the
/// compiler vectorises), so the time is that of reading W once from wherever it lives.
pub fn stream_read(w: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = w.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}
