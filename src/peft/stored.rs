//! How an adapter holds one factor tensor: in the factor type, or — for a BF16 tensor in a
//! `PeftAdapter<bf16>` (F16 in `<f16>`) — in the half dtype the file gave it, widened on
//! first use.

use std::sync::OnceLock;

use ndarray::{Array2, ArrayView2};
use safetensors::Dtype;

use crate::check::check_finite;
use crate::error::Result;
use crate::float::LoraFloat;

/// The safetensors dtype of `T`'s values (F32, F64, BF16 or F16) and its name.
fn dtype_and_name<T: LoraFloat>() -> (Dtype, &'static str) {
    match T::NAME {
        "f32" => (Dtype::F32, "F32"),
        "f64" => (Dtype::F64, "F64"),
        "bf16" => (Dtype::BF16, "BF16"),
        _ => (Dtype::F16, "F16"),
    }
}

/// The safetensors dtype of `T`'s values (F32, F64, BF16 or F16).
pub(super) fn dtype_of<T: LoraFloat>() -> Dtype {
    dtype_and_name::<T>().0
}

/// Whether a tensor of `dtype` is held as it is in a `PeftAdapter<A>` (only a half `A`'s own
/// dtype is; everything else is converted to the factor type).
pub(super) fn keeps_own<A: LoraFloat>(dtype: Dtype) -> bool {
    A::NAME != <A::Factor as LoraFloat>::NAME && dtype == dtype_of::<A>()
}

/// One factor tensor of an adapter.
#[derive(Debug, Clone)]
pub(super) enum Stored<A: LoraFloat> {
    /// In the factor type `A::Factor` (F32/F64 tensors, and half tensors of another dtype).
    Factor(Array2<A::Factor>),
    /// In `A`'s own half dtype, as the file held it: half the bytes of f32 at rest. `wide`
    /// is its exact widening to `A::Factor`, made the first time a caller borrows the
    /// factors ([`PeftAdapter::factors`](super::PeftAdapter::factors) returns views).
    Own {
        values: Array2<A>,
        wide: OnceLock<Array2<A::Factor>>,
    },
}

/// Equal when held in the same dtype with the same values (whether `wide` was made yet does
/// not matter).
impl<A: LoraFloat> PartialEq for Stored<A> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Factor(a), Self::Factor(b)) => a == b,
            (Self::Own { values: a, .. }, Self::Own { values: b, .. }) => a == b,
            _ => false,
        }
    }
}

fn widen<A: LoraFloat>(values: &Array2<A>) -> Array2<A::Factor> {
    // Exact: every bf16 / f16 value is an f32.
    values.mapv(A::to_factor)
}

impl<A: LoraFloat> Stored<A> {
    /// Holds `values` in its own dtype.
    pub(super) fn own(values: Array2<A>) -> Self {
        Self::Own {
            values,
            wide: OnceLock::new(),
        }
    }

    /// The tensor's shape, rows × columns.
    pub(super) fn dim(&self) -> (usize, usize) {
        match self {
            Self::Factor(m) => m.dim(),
            Self::Own { values, .. } => values.dim(),
        }
    }

    /// The values in the factor type, borrowed (widening a half tensor once).
    pub(super) fn view(&self) -> ArrayView2<'_, A::Factor> {
        match self {
            Self::Factor(m) => m.view(),
            Self::Own { values, wide } => wide.get_or_init(|| widen(values)).view(),
        }
    }

    /// The values in the factor type, owned (without keeping a widened copy here).
    pub(super) fn to_factor(&self) -> Array2<A::Factor> {
        match self {
            Self::Factor(m) => m.clone(),
            Self::Own { values, wide } => wide.get().cloned().unwrap_or_else(|| widen(values)),
        }
    }

    /// [`check_finite`] on the values as held (a half tensor is
    /// checked without widening it).
    pub(super) fn check_finite(&self, what: &'static str) -> Result<()> {
        match self {
            Self::Factor(m) => check_finite(what, m.view()),
            Self::Own { values, .. } => check_finite(what, values.view()),
        }
    }

    /// The safetensors name of the dtype the tensor is held in, and written in by `save`.
    pub(super) fn dtype_name(&self) -> &'static str {
        match self {
            Self::Factor(_) => dtype_and_name::<A::Factor>().1,
            Self::Own { .. } => dtype_and_name::<A>().1,
        }
    }
}
