//! Merge and unmerge: the checked rank-r update W ← W + α·B A shared by
//! [`LoraLayer`](crate::LoraLayer) and [`LoraModel`](crate::LoraModel). It proves the result
//! finite before writing (so it never writes a NaN or ∞ into W), then runs the update the
//! element type's way (`update` for f32/f64, `widened` for the half types).

use ndarray::{s, ArrayView2, ArrayViewMut2};

use crate::check::{all_finite, check_finite, max_abs};
use crate::error::{LoraError, Result};
use crate::float::LoraFloat;

/// Rows of W per block when a merge must be checked exactly for overflow (rare path).
const OVERFLOW_CHECK_ROWS: usize = 64;

/// W ← W + α·B A after proving the result finite. `w_abs_bound` is an upper bound on max|W|
/// (a cache); it is updated to a bound on the new W. On error W is unchanged (the bound may
/// have been tightened, which keeps it a valid bound).
pub(crate) fn update_weight<A: LoraFloat>(
    mut base_weight: ArrayViewMut2<'_, A>,
    w_abs_bound: &mut f64,
    weight_a: ArrayView2<'_, A::Factor>,
    weight_b: ArrayView2<'_, A::Factor>,
    alpha: A::Factor,
    operation: &'static str,
) -> Result<()> {
    check_finite("weight_a", weight_a)?;
    check_finite("weight_b", weight_b)?;
    let delta = update_magnitude_bound(weight_a, weight_b, alpha);
    update_weight_within(
        base_weight.view_mut(),
        w_abs_bound,
        weight_a,
        weight_b,
        alpha,
        delta,
        operation,
    )
}

/// [`update_weight`] for factors already checked finite, with `delta` an upper bound on the
/// update's magnitude ([`update_magnitude_bound`] of these factors, or of factors they are a
/// part of, e.g. all of B when `weight_b` is a band of its rows): the checks of the factors
/// are not repeated, so a caller that updates W a band at a time pays them once.
pub(crate) fn update_weight_within<A: LoraFloat>(
    mut base_weight: ArrayViewMut2<'_, A>,
    w_abs_bound: &mut f64,
    weight_a: ArrayView2<'_, A::Factor>,
    weight_b: ArrayView2<'_, A::Factor>,
    alpha: A::Factor,
    delta: f64,
    operation: &'static str,
) -> Result<()> {
    let new_bound = checked_update_bound(
        base_weight.view(),
        w_abs_bound,
        weight_a,
        weight_b,
        alpha,
        delta,
        operation,
    )?;
    A::rank_update(alpha, weight_b, weight_a, base_weight.view_mut());
    *w_abs_bound = new_bound;
    Ok(())
}

/// [`update_weight_within`] out of place, for a `target` the caller discards on error:
/// `target` ← W + α·B A with W read from `base_weight` (`target`'s shape, not written),
/// refused with [`LoraError::WouldOverflow`] when an element of the result is not finite.
/// That is the criterion of `checked_update_bound`'s exact check (the update computed, every
/// element finite); its fast path only proves it without computing. Checking the result
/// after the fact reads W once, in the update, rather than once more before it: the bound's
/// pass over W costs as much as the update's own reading when W comes from memory.
pub(crate) fn update_weight_into<A: LoraFloat>(
    base_weight: ArrayView2<'_, A>,
    mut target: ArrayViewMut2<'_, A>,
    weight_a: ArrayView2<'_, A::Factor>,
    weight_b: ArrayView2<'_, A::Factor>,
    alpha: A::Factor,
    operation: &'static str,
) -> Result<()> {
    A::rank_update_from(alpha, weight_b, weight_a, base_weight, target.view_mut());
    if !all_finite(target.view()) {
        return Err(LoraError::WouldOverflow { operation });
    }
    Ok(())
}

/// A bound, in O(r·(d + k)), on max|α·B A| ≤ |α|·r·max|B|·max|A| and on every
/// intermediate a gemm may form on the way: the unscaled B A (BLAS and matrixmultiply scale
/// by α last), α·B or α·A. Proving only the final |α·B A| finite is not enough: with
/// α ≈ 1e-13 and B A ≈ 1e42 (∞ in f32), α·B A ≈ 1e29 is finite but a gemm that forms B A
/// first writes ∞ into W, and the unmerge after it NaN (found by the `ops` fuzzer). The bound
/// takes two vectorised passes (max|A|, max|B|); near overflow, where its looseness (≤ r)
/// could matter, the exact block check in `checked_update_bound` decides.
pub(crate) fn update_magnitude_bound<F: LoraFloat>(
    weight_a: ArrayView2<'_, F>,
    weight_b: ArrayView2<'_, F>,
    alpha: F,
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
/// magnitude (`delta`: a bound on |α·B A| and its intermediates, [`update_magnitude_bound`]).
/// Fast path: |W + αBA|ᵢⱼ ≤ max|W| + |α|·maxᵢ Σₗ|Bᵢₗ|·max|A|, with a factor-2
/// margin for rounding; only near overflow is the update evaluated block by block.
fn checked_update_bound<A: LoraFloat>(
    base_weight: ArrayView2<'_, A>,
    w_abs_bound: &mut f64,
    weight_a: ArrayView2<'_, A::Factor>,
    weight_b: ArrayView2<'_, A::Factor>,
    alpha: A::Factor,
    delta: f64,
    operation: &'static str,
) -> Result<f64> {
    let limit = magnitude_limit::<A>();
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
        A::rank_update(alpha, weight_b.slice(rows), weight_a, block.view_mut());
        if block.iter().any(|v| !v.is_finite()) {
            return Err(LoraError::WouldOverflow { operation });
        }
        bound = bound.max(max_abs(block.view()));
    }
    Ok(bound)
}
