//! How a rank-r update W ← W + α·B A runs for f32/f64: ndlora's fused SIMD kernel
//! (`simd::rank_update`) where it applies, else BLAS gemm one band of rows at a time. (The
//! checks before it are `merge`'s; the half types' update is `widened`'s.)

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis, Zip};

use crate::backend::kernel_threads;
use crate::blas::{count, GemmScalar};
use crate::matmul::gemm;
use crate::simd::rank_update::{fused_rank_update, UpdateElement};
use crate::simd::{simd_level, SimdLevel};

/// W ← W + α·B A (B d×r, A r×k, W d×k) for f32/f64: the merge update. Runs the fused SIMD kernel
/// (`simd::rank_update`) when it applies — a SIMD CPU, r ≤ `MAX_FUSED_RANK`, W with a unit
/// stride — and otherwise one gemm per band of rows into a small temporary, added to W.
/// Either way no d×k temporary is made.
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn rank_update_same<T: GemmScalar + UpdateElement + num_traits::Float>(
    alpha: T,
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    mut w: ArrayViewMut2<'_, T>,
) {
    let level = simd_level();
    if level != SimdLevel::Scalar
        && fused_rank_update(level, alpha, b, a, w.view_mut(), kernel_threads())
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
pub(crate) const UPDATE_BAND_ELEMENTS: usize = 1 << 20;
/// ...but at least this many rows: thinner bands make the gemm itself inefficient.
pub(crate) const UPDATE_BAND_MIN_ROWS: usize = 64;
