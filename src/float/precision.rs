//! [`Precision`]: what differs between the element types of a layer — how a forward, a
//! merge update and a widening run — as hooks of the sealed [`LoraFloat`] trait.
//!
//! * `f32`, `f64`: every operand is in the one type; the hooks are the f32/f64 paths of
//!   `matmul` (skinny kernel or BLAS gemm) and `merge` (fused kernel or banded gemm).
//! * `bf16`, `f16`: W, X, Y are half, the factors f32; the hooks are `widened`'s paths,
//!   which read half and accumulate in f32 with PEFT's rounding order.

use half::{bf16, f16};
use ndarray::{ArrayView1, ArrayView2, ArrayViewMut2, CowArray, Ix2};

use super::LoraFloat;
use crate::matmul::{add_terms_same, forward_same, LoraTerm};
use crate::scratch::LoraScratch;
use crate::simd::vector::Element;
use crate::update::{rank_update_same, rank_update_with_from};
use crate::widened;

/// The factor type of `A`.
type F<A> = <A as LoraFloat>::Factor;

/// The per-type hooks of [`LoraFloat`]. Public in a private module: sealed.
pub trait Precision: Sized + Copy {
    /// The bit pattern of +∞ (see [`max_abs_bits`](Self::max_abs_bits)).
    const INFINITY_BITS: u64;

    /// The largest |v| over `values` as the bit pattern of a non-negative float (0 when
    /// empty; above `INFINITY_BITS` when a value is NaN), in one integer pass.
    fn max_abs_bits(values: &[Self]) -> u64;

    /// The non-negative value whose bit pattern is `bits`, widened to f64.
    fn from_abs_bits(bits: u64) -> f64;

    /// X in the factor type: `x` itself for f32/f64, a widened copy for the half types.
    fn widen(x: ArrayView2<'_, Self>) -> CowArray<'_, F<Self>, Ix2>
    where
        Self: LoraFloat;

    /// out ← X Wᵀ + b + Σ s·(X Aᵀ) Bᵀ (out n×d in any layout, overwritten).
    fn forward(
        x: ArrayView2<'_, Self>,
        w: ArrayView2<'_, Self>,
        bias: Option<ArrayView1<'_, Self>>,
        terms: &[LoraTerm<'_, F<Self>>],
        out: ArrayViewMut2<'_, Self>,
        scratch: Option<&mut LoraScratch<F<Self>>>,
    ) where
        Self: LoraFloat;

    /// out ← out + Σ s·(X Aᵀ) Bᵀ with X already in the factor type.
    fn add_terms(
        x: ArrayView2<'_, F<Self>>,
        terms: &[LoraTerm<'_, F<Self>>],
        out: ArrayViewMut2<'_, Self>,
        scratch: Option<&mut LoraScratch<F<Self>>>,
    ) where
        Self: LoraFloat;

    /// W ← W + α·B A (no overflow check: `merge::update_weight` does that first).
    fn rank_update(
        alpha: F<Self>,
        b: ArrayView2<'_, F<Self>>,
        a: ArrayView2<'_, F<Self>>,
        w: ArrayViewMut2<'_, Self>,
    ) where
        Self: LoraFloat;

    /// W ← W₀ + α·B A with W₀ read from `src` (W's shape): [`rank_update`](Self::rank_update)
    /// of a copy of W₀, with the same bits, without the copy where the fused kernel runs.
    fn rank_update_from(
        alpha: F<Self>,
        b: ArrayView2<'_, F<Self>>,
        a: ArrayView2<'_, F<Self>>,
        src: ArrayView2<'_, Self>,
        w: ArrayViewMut2<'_, Self>,
    ) where
        Self: LoraFloat;
}

macro_rules! impl_same_precision {
    ($t:ty) => {
        impl Precision for $t {
            const INFINITY_BITS: u64 = <$t as Element>::INFINITY_BITS;
            fn max_abs_bits(values: &[Self]) -> u64 {
                <$t as Element>::max_abs_bits(values)
            }
            fn from_abs_bits(bits: u64) -> f64 {
                <$t as Element>::from_abs_bits(bits)
            }
            fn widen(x: ArrayView2<'_, $t>) -> CowArray<'_, $t, Ix2> {
                CowArray::from(x)
            }
            fn forward(
                x: ArrayView2<'_, $t>,
                w: ArrayView2<'_, $t>,
                bias: Option<ArrayView1<'_, $t>>,
                terms: &[LoraTerm<'_, $t>],
                out: ArrayViewMut2<'_, $t>,
                scratch: Option<&mut LoraScratch<$t>>,
            ) {
                forward_same(x, w, bias, terms, out, scratch)
            }
            fn add_terms(
                x: ArrayView2<'_, $t>,
                terms: &[LoraTerm<'_, $t>],
                out: ArrayViewMut2<'_, $t>,
                scratch: Option<&mut LoraScratch<$t>>,
            ) {
                add_terms_same(x, terms, out, scratch)
            }
            fn rank_update(
                alpha: $t,
                b: ArrayView2<'_, $t>,
                a: ArrayView2<'_, $t>,
                w: ArrayViewMut2<'_, $t>,
            ) {
                rank_update_same(alpha, b, a, w)
            }
            fn rank_update_from(
                alpha: $t,
                b: ArrayView2<'_, $t>,
                a: ArrayView2<'_, $t>,
                src: ArrayView2<'_, $t>,
                w: ArrayViewMut2<'_, $t>,
            ) {
                rank_update_with_from(alpha, b, a, src, w, |w, t| w + t)
            }
        }
    };
}
impl_same_precision!(f32);
impl_same_precision!(f64);

macro_rules! impl_half_precision {
    ($t:ty) => {
        impl Precision for $t {
            const INFINITY_BITS: u64 = <$t>::INFINITY.to_bits() as u64;
            fn max_abs_bits(values: &[Self]) -> u64 {
                use half::slice::HalfFloatSliceExt;
                u64::from(crate::simd::max_abs_bits_u16(values.reinterpret_cast()))
            }
            fn from_abs_bits(bits: u64) -> f64 {
                <$t>::from_bits(bits as u16).to_f64()
            }
            fn widen(x: ArrayView2<'_, $t>) -> CowArray<'_, f32, Ix2> {
                CowArray::from(widened::widen(x))
            }
            fn forward(
                x: ArrayView2<'_, $t>,
                w: ArrayView2<'_, $t>,
                bias: Option<ArrayView1<'_, $t>>,
                terms: &[LoraTerm<'_, f32>],
                out: ArrayViewMut2<'_, $t>,
                scratch: Option<&mut LoraScratch<f32>>,
            ) {
                widened::forward(x, w, bias, terms, out, scratch)
            }
            fn add_terms(
                x: ArrayView2<'_, f32>,
                terms: &[LoraTerm<'_, f32>],
                out: ArrayViewMut2<'_, $t>,
                scratch: Option<&mut LoraScratch<f32>>,
            ) {
                widened::add_terms(x, terms, out, scratch)
            }
            fn rank_update(
                alpha: f32,
                b: ArrayView2<'_, f32>,
                a: ArrayView2<'_, f32>,
                w: ArrayViewMut2<'_, $t>,
            ) {
                widened::rank_update(alpha, b, a, w)
            }
            fn rank_update_from(
                alpha: f32,
                b: ArrayView2<'_, f32>,
                a: ArrayView2<'_, f32>,
                src: ArrayView2<'_, $t>,
                w: ArrayViewMut2<'_, $t>,
            ) {
                widened::rank_update_from(alpha, b, a, src, w)
            }
        }
    };
}
impl_half_precision!(bf16);
impl_half_precision!(f16);
