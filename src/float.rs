//! The float types ndlora computes in.

use std::fmt::{Debug, Display};

use ndarray::ScalarOperand;
use serde::{de::DeserializeOwned, Serialize};

use crate::blas::GemmScalar;
use crate::simd::decode::DecodeElement;
use crate::simd::rank_update::UpdateElement;

/// `f32` or `f64`: the element types [`LoraLayer`](crate::LoraLayer) is generic over.
///
/// Sealed: its supertrait lives in a private module, so no other type can implement it.
pub trait LoraFloat:
    GemmScalar
    + UpdateElement
    + DecodeElement
    + num_traits::Float
    + ScalarOperand
    + Debug
    + Display
    + Default
    + Send
    + Sync
    + Serialize
    + DeserializeOwned
    + 'static
{
    /// `"f32"` or `"f64"`.
    const NAME: &'static str;

    /// Rounds an `f64` to this type (to ±∞ when out of range).
    fn from_f64_lossy(v: f64) -> Self;

    /// Widens to `f64` (exact).
    fn into_f64(self) -> f64;
}

impl LoraFloat for f32 {
    const NAME: &'static str = "f32";
    #[inline]
    fn from_f64_lossy(v: f64) -> Self {
        v as f32
    }
    #[inline]
    fn into_f64(self) -> f64 {
        f64::from(self)
    }
}

impl LoraFloat for f64 {
    const NAME: &'static str = "f64";
    #[inline]
    fn from_f64_lossy(v: f64) -> Self {
        v
    }
    #[inline]
    fn into_f64(self) -> f64 {
        self
    }
}
