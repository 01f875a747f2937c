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

/// `v` rounded to f32 toward zero, with the last bit set when that was inexact ("round to
/// odd"): rounding this f32 to nearest even in a type of ≤ 22 significant bits gives the
/// correctly rounded value of `v` itself, where rounding through a nearest-even f32 could
/// round twice the wrong way (and `half`'s own `from_f64` truncates the low bits first).
fn f32_round_to_odd(v: f64) -> f32 {
    let mut t = v as f32;
    if v.is_nan() || f64::from(t) == v {
        return t;
    }
    if f64::from(t).abs() > v.abs() {
        // Rounded away from zero (possibly to ±∞): one step back toward zero.
        t = f32::from_bits(t.to_bits() - 1);
    }
    f32::from_bits(t.to_bits() | 1)
}

macro_rules! impl_half_float {
    ($t:ty, $name:literal) => {
        impl LoraFloat for $t {
            type Factor = f32;
            const NAME: &'static str = $name;
            #[inline]
            fn from_f64_lossy(v: f64) -> Self {
                <$t>::from_f32(f32_round_to_odd(v))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The correctly rounded half value of `v`, by brute force over the neighbours of the
    /// nearest-even f32 rounding.
    fn nearest<H: LoraFloat + Copy>(
        v: f64,
        from_bits: impl Fn(u16) -> H,
        to_bits: impl Fn(H) -> u16,
    ) -> H {
        let guess = to_bits(H::from_f64_lossy(v));
        let mut best = H::from_f64_lossy(v);
        for b in [guess.wrapping_sub(1), guess, guess.wrapping_add(1)] {
            let c = from_bits(b);
            let (dc, db) = ((c.into_f64() - v).abs(), (best.into_f64() - v).abs());
            if c.is_finite() && (dc < db || (dc == db && b & 1 == 0)) {
                best = c;
            }
        }
        best
    }

    #[test]
    fn half_from_f64_is_correctly_rounded() {
        // Values just beside a tie of bf16 / f16 that a nearest-even f32 rounding would turn
        // into an exact tie (and then round to even, the wrong way).
        let tie_bf16 = 1.0 + 2f64.powi(-8); // halfway between bf16 1.0 and 1.0 + 2^-7
        let above = tie_bf16 + 2f64.powi(-40);
        assert_eq!(bf16::from_f64_lossy(above), bf16::from_bits(0x3f81));
        assert_eq!(bf16::from_f64_lossy(tie_bf16), bf16::ONE);
        let below = tie_bf16 - 2f64.powi(-40);
        assert_eq!(bf16::from_f64_lossy(below), bf16::ONE);
        let tie_f16 = 1.0 + 2f64.powi(-11);
        assert_eq!(
            f16::from_f64_lossy(tie_f16 + 2f64.powi(-40)),
            f16::from_bits(0x3c01)
        );
        assert_eq!(f16::from_f64_lossy(tie_f16), f16::ONE);
        assert_eq!(bf16::from_f64_lossy(1e300), bf16::INFINITY);
        assert_eq!(f16::from_f64_lossy(-1e10), f16::NEG_INFINITY);
        assert!(bf16::from_f64_lossy(f64::NAN).is_nan());
        // A sweep of random values against the brute-force nearest value.
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits((x & 0x800f_ffff_ffff_ffff) | (0x3f0u64 + (x >> 60)) << 52);
            assert_eq!(
                bf16::from_f64_lossy(v),
                nearest(v, bf16::from_bits, bf16::to_bits),
                "{v}"
            );
            assert_eq!(
                f16::from_f64_lossy(v),
                nearest(v, f16::from_bits, f16::to_bits),
                "{v}"
            );
        }
    }
}
