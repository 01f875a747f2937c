//! Every validator the public types share: shapes, widths, lengths, finiteness, scaling, and
//! the vectorised magnitude scans behind the finiteness checks. Each returns the typed
//! [`LoraError`] naming what was expected and what was found.

use ndarray::{ArrayView1, ArrayView2, Axis};

use crate::error::{shape_str, LoraError, Result};
use crate::float::LoraFloat;

/// A weight W must be d×k with d, k > 0.
pub(crate) fn check_weight_dims(d: usize, k: usize) -> Result<()> {
    if d == 0 || k == 0 {
        return Err(LoraError::ShapeMismatch {
            what: "base_weight",
            expected: "[d, k] with d > 0 and k > 0".into(),
            got: shape_str(&[d, k]),
        });
    }
    Ok(())
}

/// An input batch X must be n×k for this k (any n).
pub(crate) fn check_input_width<A>(x: ArrayView2<'_, A>, in_features: usize) -> Result<()> {
    check_width("input x", x, in_features)
}

/// A batch `m` must have `width` columns (any number of rows).
pub(crate) fn check_width<A>(what: &'static str, m: ArrayView2<'_, A>, width: usize) -> Result<()> {
    if m.ncols() != width {
        return Err(LoraError::ShapeMismatch {
            what,
            expected: format!("[_, {width}]"),
            got: shape_str(m.shape()),
        });
    }
    Ok(())
}

/// `got` must equal `expected`.
pub(crate) fn check_shape(what: &'static str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got != expected {
        return Err(LoraError::ShapeMismatch {
            what,
            expected: shape_str(expected),
            got: shape_str(got),
        });
    }
    Ok(())
}

/// A vector's length must be `expected`.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    check_shape(what, &[got], &[expected])
}

/// The scaling, if it is finite both as f64 and in `A`.
pub(crate) fn check_scaling<A: LoraFloat>(scaling: f64) -> Result<f64> {
    if !scaling.is_finite() || !A::from_f64_lossy(scaling).is_finite() {
        return Err(LoraError::InvalidValue {
            what: "scaling",
            expected: "finite in the float type",
            got: scaling.to_string(),
        });
    }
    Ok(scaling)
}

/// Every element of `m` must be finite; the error names the first one that is not.
pub(crate) fn check_finite<A: LoraFloat>(what: &'static str, m: ArrayView2<'_, A>) -> Result<()> {
    if all_finite(m) {
        return Ok(());
    }
    match m.indexed_iter().find(|(_, v)| !v.is_finite()) {
        None => Ok(()),
        Some((index, v)) => Err(LoraError::NonFinite {
            what,
            index,
            value: v.into_f64(),
        }),
    }
}

/// [`check_finite`] for a vector (reported as row 0).
pub(crate) fn check_finite_vector<A: LoraFloat>(
    what: &'static str,
    v: ArrayView1<'_, A>,
) -> Result<()> {
    check_finite(what, v.insert_axis(Axis(0)))
}

/// [`check_finite`] for a slice (reported as row 0).
pub(crate) fn check_finite_slice<A: LoraFloat>(what: &'static str, v: &[A]) -> Result<()> {
    check_finite_vector(what, ArrayView1::from(v))
}

/// A learning rate must be finite.
pub(crate) fn check_learning_rate<A: LoraFloat>(lr: A) -> Result<()> {
    if !lr.is_finite() {
        return Err(LoraError::InvalidValue {
            what: "learning rate",
            expected: "finite",
            got: lr.to_string(),
        });
    }
    Ok(())
}

/// A bias must have length d and finite elements.
pub(crate) fn check_bias<A: LoraFloat>(bias: ArrayView1<'_, A>, d: usize) -> Result<()> {
    check_shape("bias", bias.shape(), &[d])?;
    check_finite_vector("bias", bias)
}

/// max |mᵢⱼ| in f64 (0 for an empty matrix; ∞ when an element is NaN or ∞).
pub(crate) fn max_abs<A: LoraFloat>(m: ArrayView2<'_, A>) -> f64 {
    match max_abs_bits(m) {
        bits if bits > A::INFINITY_BITS => f64::INFINITY,
        bits => A::from_abs_bits(bits),
    }
}

/// Whether every element of `m` is finite, in one vectorised pass.
pub(crate) fn all_finite<A: LoraFloat>(m: ArrayView2<'_, A>) -> bool {
    max_abs_bits(m) < A::INFINITY_BITS
}

/// `Element::max_abs_bits` over a matrix, a contiguous slice at a time: the whole array
/// when its memory is contiguous, else each lane along the unit-stride axis.
fn max_abs_bits<A: LoraFloat>(m: ArrayView2<'_, A>) -> u64 {
    if let Some(all) = m.as_slice_memory_order() {
        return A::max_abs_bits(all);
    }
    let axis = if m.strides()[0] == 1 {
        Axis(0)
    } else {
        Axis(1)
    };
    m.lanes(axis)
        .into_iter()
        .map(|lane| match lane.as_slice() {
            Some(s) => A::max_abs_bits(s),
            None => A::max_abs_bits(&lane.to_vec()),
        })
        .max()
        .unwrap_or(0)
}
