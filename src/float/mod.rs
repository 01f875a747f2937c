//! The float types ndlora computes in.

use std::fmt::{Debug, Display};

use half::{bf16, f16};
use ndarray::ScalarOperand;
use serde::{de::DeserializeOwned, Serialize};

mod precision;

use crate::blas::GemmScalar;
use crate::simd::decode::DecodeElement;
use crate::simd::rank_update::UpdateElement;
use precision::Precision;

/// The element types of [`LoraLayer`](crate::LoraLayer) and [`LoraModel`](crate::LoraModel):
/// `f32`, `f64`, and the half types `half::bf16` and `half::f16`.
///
/// W, the bias, X and Y are in this type. The factors A and B, every product's
/// accumulation and the gradients are in [`Factor`](Self::Factor): the type itself for `f32`
/// and `f64`, and `f32` for the half types — what PEFT does on a bf16/f16 model, whose LoRA
/// weights it keeps in float32 by default (`autocast_adapter_dtype=True`).
///
/// Sealed: its supertrait lives in a private module, so no other type can implement it.
///
/// ```
/// use ndlora::LoraFloat;
/// fn factor_name<A: LoraFloat>() -> &'static str {
///     <A::Factor as LoraFloat>::NAME
/// }
/// assert_eq!(factor_name::<half::bf16>(), "f32");
/// assert_eq!(factor_name::<f64>(), "f64");
/// ```
pub trait LoraFloat:
    Precision
    + num_traits::Float
    + Debug
    + Display
    + Default
    + Send
    + Sync
    + Serialize
    + DeserializeOwned
    + 'static
{
    /// The type of the factors A, B, of the accumulations and of the gradients: `f32` for
    /// `f32`, `bf16` and `f16`; `f64` for `f64`.
    type Factor: LoraFloat<Factor = Self::Factor>
        + GemmScalar
        + UpdateElement
        + DecodeElement
        + ScalarOperand;

    /// `"f32"`, `"f64"`, `"bf16"` or `"f16"`.
    const NAME: &'static str;

    /// Rounds an `f64` to this type (to nearest even; to ±∞ when out of range).
    fn from_f64_lossy(v: f64) -> Self;

    /// Widens to `f64` (exact).
    fn into_f64(self) -> f64;

    /// Widens to the factor type (exact).
    fn to_factor(self) -> Self::Factor;

    /// Rounds a factor-type value to this type (to nearest even; ±∞ when out of range).
    fn from_factor(v: Self::Factor) -> Self;
}

impl LoraFloat for f32 {
    type Factor = f32;
    const NAME: &'static str = "f32";
    #[inline]
    fn from_f64_lossy(v: f64) -> Self {
        v as f32
    }
    #[inline]
    fn into_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn to_factor(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_factor(v: f32) -> Self {
        v
    }
}

impl LoraFloat for f64 {
    type Factor = f64;
    const NAME: &'static str = "f64";
    #[inline]
    fn from_f64_lossy(v: f64) -> Self {
        v
    }
    #[inline]
    fn into_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn to_factor(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_factor(v: f64) -> Self {
        v
    }
}

macro_rules! impl_half_float {
    ($t:ty, $name:literal) => {
        impl LoraFloat for $t {
            type Factor = f32;
            const NAME: &'static str = $name;
            #[inline]
            fn from_f64_lossy(v: f64) -> Self {
                <$t>::from_f64(v)
            }
            #[inline]
            fn into_f64(self) -> f64 {
                self.to_f64()
            }
            #[inline(always)]
            fn to_factor(self) -> f32 {
                self.to_f32()
            }
            #[inline(always)]
            fn from_factor(v: f32) -> Self {
                <$t>::from_f32(v)
            }
        }
    };
}
impl_half_float!(bf16, "bf16");
impl_half_float!(f16, "f16");
