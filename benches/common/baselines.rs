//! What a user would otherwise run, shared by the benches and `examples/paths.rs`
//! (`#[path]`-included): a bare BLAS gemm (f32 or f64) and gemv (f32) of X Wᵀ, and one
//! streaming read of W (the memory floor of a one-row forward, 8 streams side by side).
//! Row-major.

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

/// Streams read side by side by [`stream_read`]: one sequential stream is held back by how
/// many lines a core keeps in flight (on the Intel Xeon it read a 64 MiB W from memory at
/// half the rate 8 streams did: 7.0 against 3.1 ms); more than 8 gained nothing.
const READ_STREAMS: usize = 8;

/// One streaming read of `w`, the memory floor of a one-row forward: `w` cut into
/// [`READ_STREAMS`] contiguous parts summed side by side, with the widest vectors this CPU
/// has (AVX-512F, AVX2; else one plain loop, which the compiler vectorises for the baseline
/// ISA), so the time is that of reading W once from wherever it lives as fast as one core
/// can.
pub fn stream_read(w: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F detected.
            return unsafe { stream_read_avx512(w) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 detected.
            return unsafe { stream_read_avx2(w) };
        }
    }
    stream_read_plain(w)
}

/// The sum of `w` in 16 independent lanes (which the compiler vectorises).
fn stream_read_plain(w: &[f32]) -> f32 {
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

/// [`stream_read`] with `L`-lane vectors: `load` reads one vector from a slice of L floats,
/// `add` and `sum` as named.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn stream_read_with<V: Copy, const L: usize>(
    w: &[f32],
    zero: V,
    load: impl Fn(&[f32]) -> V,
    add: impl Fn(V, V) -> V,
    sum: impl Fn(V) -> f32,
) -> f32 {
    let part = w.len() / READ_STREAMS / L * L;
    let mut acc = [zero; READ_STREAMS];
    let mut i = 0;
    while i < part {
        for (s, acc) in acc.iter_mut().enumerate() {
            let at = s * part + i;
            *acc = add(*acc, load(&w[at..at + L]));
        }
        i += L;
    }
    acc.into_iter().map(sum).sum::<f32>() + stream_read_plain(&w[READ_STREAMS * part..])
}

/// # Safety
/// The CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn stream_read_avx512(w: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    stream_read_with::<__m512, 16>(
        w,
        _mm512_setzero_ps(),
        // SAFETY: AVX-512F is enabled here; the slice holds the 16 floats read.
        |v| unsafe { _mm512_loadu_ps(v.as_ptr()) },
        |a, b| _mm512_add_ps(a, b),
        |a| _mm512_reduce_add_ps(a),
    )
}

/// # Safety
/// The CPU supports AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_read_avx2(w: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    stream_read_with::<__m256, 8>(
        w,
        _mm256_setzero_ps(),
        // SAFETY: AVX2 is enabled here; the slice holds the 8 floats read.
        |v| unsafe { _mm256_loadu_ps(v.as_ptr()) },
        |a, b| _mm256_add_ps(a, b),
        |a| {
            let mut lanes = [0.0f32; 8];
            // SAFETY: AVX2 is enabled here; `lanes` holds the 8 floats written.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), a) };
            lanes.iter().sum()
        },
    )
}
