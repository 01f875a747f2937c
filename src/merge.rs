//! Merge and unmerge: the checked rank-r update W ← W + α·B A shared by
//! [`LoraLayer`](crate::LoraLayer) and [`LoraModel`](crate::LoraModel). It proves the result
//! finite before writing (so it never writes a NaN or ∞ into W), then picks how the update
//! runs: ndlora's fused SIMD kernel (`simd::rank_update`) where it applies, else BLAS gemm
//! one band of rows at a time.

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis, Zip};

use crate::backend::kernel_threads;
use crate::blas::count;
use crate::check::{check_finite, max_abs};
use crate::error::{LoraError, Result};
use crate::float::LoraFloat;
use crate::matmul::gemm;
use crate::simd::rank_update::fused_rank_update;
use crate::simd::{simd_level, SimdLevel};

/// Rows of W per block when a merge must be checked exactly for overflow (rare path).
const OVERFLOW_CHECK_ROWS: usize = 64;

/// W ← W + α·B A after proving the result finite. `w_abs_bound` is an upper bound on max|W|
/// (a cache); it is updated to a bound on the new W. On error W is unchanged (the bound may
/// have been tightened, which keeps it a valid bound).
pub(crate) fn update_weight<A: LoraFloat>(
    mut base_weight: ArrayViewMut2<'_, A>,
    w_abs_bound: &mut f64,
    weight_a: ArrayView2<'_, A>,
    weight_b: ArrayView2<'_, A>,
    alpha: A,
    operation: &'static str,
) -> Result<()> {
    check_finite("weight_a", weight_a)?;
    check_finite("weight_b", weight_b)?;
    let new_bound = checked_update_bound(
        base_weight.view(),
        w_abs_bound,
        weight_a,
        weight_b,
        alpha,
        operation,
    )?;
    rank_update(alpha, weight_b, weight_a, base_weight.view_mut());
    *w_abs_bound = new_bound;
    Ok(())
}

/// A bound, in O(r·(d + k)), on max|α·B A| ≤ |α|·r·max|B|·max|A| and on every
/// intermediate a gemm may form on the way: the unscaled B A (BLAS and matrixmultiply scale
/// by α last), α·B or α·A. Proving only the final |α·B A| finite is not enough: with
/// α ≈ 1e-13 and B A ≈ 1e42 (∞ in f32), α·B A ≈ 1e29 is finite but a gemm that forms B A
/// first writes ∞ into W, and the unmerge after it NaN (found by the `ops` fuzzer). The bound
/// takes two vectorised passes (max|A|, max|B|); near overflow, where its looseness (≤ r)
/// could matter, the exact block check in `checked_update_bound` decides.
pub(crate) fn update_magnitude_bound<A: LoraFloat>(
    weight_a: ArrayView2<'_, A>,
    weight_b: ArrayView2<'_, A>,
    alpha: A,
) -> f64 {
    let (max_a, max_b) = (max_abs(weight_a), max_abs(weight_b));
    let alpha = alpha.into_f64().abs();
    let unscaled = weight_a.nrows() as f64 * max_b * max_a;
    (alpha * unscaled)
        .max(unscaled)
        .max(alpha * max_b)
        .max(alpha * max_a)
}

/// The largest magnitude `|W|` may reach and still be safe: half of `A::MAX`, a factor-2
/// margin for rounding in the bound.
pub(crate) fn magnitude_limit<A: LoraFloat>() -> f64 {
    A::max_value().into_f64() / 2.0
}

/// Proves that W + α·B A is finite without writing W and returns a bound on its largest
/// magnitude. Fast path: |W + αBA|ᵢⱼ ≤ max|W| + |α|·maxᵢ Σₗ|Bᵢₗ|·max|A|, with a factor-2
/// margin for rounding; only near overflow is the update evaluated block by block.
fn checked_update_bound<A: LoraFloat>(
    base_weight: ArrayView2<'_, A>,
    w_abs_bound: &mut f64,
    weight_a: ArrayView2<'_, A>,
    weight_b: ArrayView2<'_, A>,
    alpha: A,
    operation: &'static str,
) -> Result<f64> {
    let limit = magnitude_limit::<A>();
    let delta = update_magnitude_bound(weight_a, weight_b, alpha);
    if *w_abs_bound + delta < limit {
        return Ok(*w_abs_bound + delta);
    }
    // The cached bound may have grown loose over many merges: tighten it, then retry.
    *w_abs_bound = max_abs(base_weight);
    if *w_abs_bound + delta < limit {
        return Ok(*w_abs_bound + delta);
    }
    let mut bound = 0.0_f64;
    let d = base_weight.nrows();
    for start in (0..d).step_by(OVERFLOW_CHECK_ROWS) {
        let rows = s![start..(start + OVERFLOW_CHECK_ROWS).min(d), ..];
        let mut block = base_weight.slice(rows).to_owned();
        rank_update(alpha, weight_b.slice(rows), weight_a, block.view_mut());
        if block.iter().any(|v| !v.is_finite()) {
            return Err(LoraError::WouldOverflow { operation });
        }
        bound = bound.max(max_abs(block.view()));
    }
    Ok(bound)
}

/// W ← W + α·B A (B d×r, A r×k, W d×k): the merge update. Runs the fused SIMD kernel
/// (`simd::rank_update`) when it applies — a SIMD CPU, r ≤ `MAX_FUSED_RANK`, W with a unit
/// stride — and otherwise one gemm per band of rows into a small temporary, added to W.
/// Either way no d×k temporary is made.
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn rank_update<T: LoraFloat>(
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
const UPDATE_BAND_ELEMENTS: usize = 1 << 20;
/// ...but at least this many rows: thinner bands make the gemm itself inefficient.
const UPDATE_BAND_MIN_ROWS: usize = 64;
