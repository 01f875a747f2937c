//! How a rank-r update W ← W + α·B A runs for f32/f64: ndlora's fused SIMD kernel
//! (`simd::rank_update`) where it applies, else BLAS gemm one band of rows at a time. (The
//! checks before it are `merge`'s; the half types' update is `widened`'s.)

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis, Zip};

use crate::backend::kernel_threads;
use crate::blas::{count, GemmScalar};
use crate::matmul::gemm;
use crate::simd::rank_update::{
    fused_rank_update, fused_rank_update_from, UpdateElement, UpdateWeight,
};
use crate::simd::{simd_level, SimdLevel};

/// W ← W + α·B A (B d×r, A r×k, W d×k) for f32/f64: the merge update. Runs the fused SIMD kernel
/// (`simd::rank_update`) when it applies — a SIMD CPU, r ≤ `MAX_FUSED_RANK`, W with a unit
/// stride — and otherwise one gemm per band of rows into a small temporary, added to W.
/// Either way no d×k temporary is made.
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn rank_update_same<
    T: GemmScalar + UpdateElement + UpdateWeight<T> + num_traits::Float,
>(
    alpha: T,
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    w: ArrayViewMut2<'_, T>,
) {
    rank_update_with(alpha, b, a, w, |w, t| w + t)
}

/// W ← W + α·B A for W stored as `W` and the factors in `T`: the fused kernel where it
/// applies, else a band of rows at a time T = α·B A formed by a gemm with β = 0, then each
/// element combined by `add(w, t)` — not `gemm(α, B, A, 1, W)`: how a BLAS adds into C with
/// β = 1 is its own choice (reference BLAS adds each of the r terms separately: r roundings
/// at |W|'s scale, not one), so forming T first keeps one rounding per element with any BLAS.
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn rank_update_with<T, W>(
    alpha: T,
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    mut w: ArrayViewMut2<'_, W>,
    add: impl Fn(W, T) -> W,
) where
    T: GemmScalar + UpdateElement + num_traits::Float,
    W: UpdateWeight<T> + Copy,
{
    let level = simd_level();
    if level != SimdLevel::Scalar
        && fused_rank_update(level, alpha, b, a, w.view_mut(), kernel_threads())
    {
        count(|c| c.fused_updates += 1);
        return;
    }
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
        Zip::from(w).and(&t).for_each(|w, &t| *w = add(*w, t));
    }
}

/// [`rank_update_with`] out of place: W ← W₀ + α·B A with W₀ read from `src` (W's shape),
/// the same bits as copying W₀ into W and updating it there. The fused kernel reads W₀ as it
/// goes (W₀ is read once, W written once); elsewhere W₀ is copied into W first.
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn rank_update_with_from<T, W>(
    alpha: T,
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    src: ArrayView2<'_, W>,
    mut w: ArrayViewMut2<'_, W>,
    add: impl Fn(W, T) -> W,
) where
    T: GemmScalar + UpdateElement + num_traits::Float,
    W: UpdateWeight<T> + Copy,
{
    let level = simd_level();
    if level != SimdLevel::Scalar
        && fused_rank_update_from(level, alpha, b, a, src, w.view_mut(), kernel_threads())
    {
        count(|c| c.fused_updates += 1);
        return;
    }
    w.assign(&src);
    rank_update_with(alpha, b, a, w, add)
}

/// Elements of the temporary per band in [`rank_update_with`]'s gemm path (4 MiB of f32)...
const UPDATE_BAND_ELEMENTS: usize = 1 << 20;
/// ...but at least this many rows: thinner bands make the gemm itself inefficient.
const UPDATE_BAND_MIN_ROWS: usize = 64;
