//! Conversions between f32 and a half type over rows, in vectors: widening (exact) and
//! rounding (to nearest even, as `half`'s `from_f32`). The half layers' paths that hand f32
//! to BLAS run them on X, on W one panel at a time, and on the output; a scalar loop there
//! would cost more than the gemm's own overhead (for f16, `half` converts each element
//! through a run-time CPU check).

use super::vector::{Stored, WideLoad};
use super::SimdLevel;

/// dst ← f32(src), equal lengths.
///
/// # Safety
/// `src.len() == dst.len()`; the CPU supports the kernel's instructions.
pub type WidenFn<W> = unsafe fn(src: &[W], dst: &mut [f32]);

/// dst ← H(src), equal lengths.
///
/// # Safety
/// As [`WidenFn`].
pub type RoundFn<W> = unsafe fn(src: &[f32], dst: &mut [W]);

/// The half types with conversion kernels, and which run at each SIMD level. Sealed.
pub trait ConvertWeight: Stored<f32> {
    /// The widening and rounding kernels for `level`, if this build has them and (beyond
    /// the level's own features, which the caller checks) this CPU has what they need.
    fn converters(level: SimdLevel) -> Option<(WidenFn<Self>, RoundFn<Self>)>;
}

macro_rules! impl_convert_weight {
    ($w:ty, $avx2:expr, $avx512:expr, $neon:expr) => {
        impl ConvertWeight for $w {
            fn converters(level: SimdLevel) -> Option<(WidenFn<Self>, RoundFn<Self>)> {
                match level {
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx2Fma => $avx2,
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx512F => $avx512,
                    #[cfg(target_arch = "aarch64")]
                    SimdLevel::Neon => $neon,
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
        }
    };
}
impl_convert_weight!(
    half::bf16,
    Some((super::x86::widen_avx2_bf16, super::x86::round_avx2_bf16)),
    Some((super::x86::widen_avx512_bf16, super::x86::round_avx512_bf16)),
    Some((
        super::aarch64::widen_neon_bf16,
        super::aarch64::round_neon_bf16
    ))
);
impl_convert_weight!(
    half::f16,
    is_x86_feature_detected!("f16c").then_some((
        super::x86::widen_avx2_f16 as WidenFn<half::f16>,
        super::x86::round_avx2_f16 as RoundFn<half::f16>
    )),
    Some((super::x86::widen_avx512_f16, super::x86::round_avx512_f16)),
    None
);

/// The kernels of the widest level this CPU runs for `W`, else the scalar loops.
fn best<W: ConvertWeight>() -> (WidenFn<W>, RoundFn<W>) {
    let level = super::simd_level();
    if level.is_available() {
        if let Some(k) = W::converters(level) {
            return k;
        }
    }
    (
        widen::<super::vector::Portable<f32, 1>, W>,
        round::<super::vector::Portable<f32, 1>, W>,
    )
}

/// dst ← f32(src) with the widest kernel this CPU runs.
///
/// # Panics
/// If the lengths differ.
#[track_caller]
pub(crate) fn widen_slice<W: ConvertWeight>(src: &[W], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen: lengths differ");
    // SAFETY: equal lengths (asserted); `best` returns only kernels this CPU runs.
    unsafe { (best::<W>().0)(src, dst) }
}

/// dst ← H(src) with the widest kernel this CPU runs.
///
/// # Panics
/// If the lengths differ.
#[track_caller]
pub(crate) fn round_slice<W: ConvertWeight>(src: &[f32], dst: &mut [W]) {
    assert_eq!(src.len(), dst.len(), "round: lengths differ");
    // SAFETY: equal lengths (asserted); `best` returns only kernels this CPU runs.
    unsafe { (best::<W>().1)(src, dst) }
}

/// The widening body: whole vectors, then one lane at a time.
///
/// # Safety
/// As [`WidenFn`], with the CPU supporting `V`'s instructions for `W`.
#[inline(always)]
pub(super) unsafe fn widen<V: WideLoad<W, Elem = f32>, W: Stored<f32>>(src: &[W], dst: &mut [f32]) {
    let (n, l) = (src.len(), V::LANES);
    let mut i = 0;
    while i + l <= n {
        // SAFETY: i + l ≤ n = src.len() = dst.len(); CPU support by the contract.
        unsafe { V::load_wide(src.as_ptr().add(i)).store(dst.as_mut_ptr().add(i)) };
        i += l;
    }
    for (d, s) in dst[i..].iter_mut().zip(&src[i..]) {
        *d = s.widen();
    }
}

/// The rounding body: whole vectors, then one lane at a time.
///
/// # Safety
/// As [`widen`].
#[inline(always)]
pub(super) unsafe fn round<V: WideLoad<W, Elem = f32>, W: Stored<f32>>(src: &[f32], dst: &mut [W]) {
    let (n, l) = (src.len(), V::LANES);
    let mut i = 0;
    while i + l <= n {
        // SAFETY: i + l ≤ n = src.len() = dst.len(); CPU support by the contract.
        unsafe { V::load(src.as_ptr().add(i)).store_narrow(dst.as_mut_ptr().add(i)) };
        i += l;
    }
    for (d, s) in dst[i..].iter_mut().zip(&src[i..]) {
        *d = W::narrow(*s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::vector::tests::FromF32;

    /// Every level's kernels against the scalar conversions, over lengths around the vector
    /// widths and values that round up, down, to even, overflow, underflow and are NaN.
    fn check<W: ConvertWeight + FromF32 + std::fmt::Debug>() {
        let specials = [
            0.0,
            -0.0,
            1.0,
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-9),
            65504.0,
            65520.0,
            70000.0,
            3.4e38,
            f32::MAX,
            f32::INFINITY,
            -f32::INFINITY,
            f32::NAN,
            1e-8,
            6e-8,
            1e-40,
            -2.5e-5,
        ];
        for level in SimdLevel::ALL.into_iter().filter(|l| l.is_available()) {
            let Some((widen_k, round_k)) = W::converters(level) else {
                continue;
            };
            for n in [0, 1, 7, 8, 15, 16, 17, 33, 257] {
                let src: Vec<f32> = (0..n)
                    .map(|i| {
                        specials
                            .get(i)
                            .copied()
                            .unwrap_or((i as f32 * 0.754_877_7).fract() * 9.0 - 4.0)
                    })
                    .collect();
                let mut got = vec![W::from_f32(0.0); n];
                // SAFETY: equal lengths; the level runs on this CPU (filtered above).
                unsafe { round_k(&src, &mut got) };
                let want: Vec<W> = src.iter().map(|&v| W::from_f32(v)).collect();
                let same = |a: &W, b: &W| {
                    Into::<f64>::into(*a).to_bits() == Into::<f64>::into(*b).to_bits()
                };
                assert!(
                    got.iter().zip(&want).all(|(a, b)| same(a, b)),
                    "{level} round n{n}: {got:?} vs {want:?}"
                );
                let mut wide = vec![f32::NAN; n];
                // SAFETY: as above.
                unsafe { widen_k(&want, &mut wide) };
                for (w, h) in wide.iter().zip(&want) {
                    let h: f64 = (*h).into();
                    assert!(
                        f64::from(*w).to_bits() == h.to_bits() || (h.is_nan() && w.is_nan()),
                        "{level} widen n{n}"
                    );
                }
            }
        }
    }

    #[test]
    fn conversions_match_the_scalar_ones_bf16() {
        check::<half::bf16>();
    }

    #[test]
    fn conversions_match_the_scalar_ones_f16() {
        check::<half::f16>();
    }
}
