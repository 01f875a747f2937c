//! x86-64 kernels: AVX2+FMA with `core::arch` intrinsics (`__m256`, `__m256d`), AVX-512F
//! with the portable 16-lane (8 for f64) vector (see [`Portable`]). Each instantiates the
//! MicroLora forward ([`lanes::forward`]) and the merge update ([`rank_update::update`]).

use std::arch::x86_64::{
    __m256, __m256d, _mm256_add_ps, _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_fmadd_pd,
    _mm256_fmadd_ps, _mm256_loadu_pd, _mm256_loadu_ps, _mm256_set1_pd, _mm256_set1_ps,
    _mm256_setzero_pd, _mm256_setzero_ps, _mm256_storeu_pd, _mm256_storeu_ps, _mm_add_ps,
    _mm_add_ss, _mm_cvtss_f32, _mm_movehl_ps, _mm_shuffle_ps,
};

use super::lanes::{self, Lanes};
use super::rank_update::{self, Operands};
use super::vector::{Portable, Vector};
use super::Adapter;

/// Eight f32 lanes in one `ymm` register. Methods need AVX2 and FMA (the [`Lanes`] contract).
#[derive(Clone, Copy)]
struct Avx2(__m256);

impl Vector for Avx2 {
    type Elem = f32;
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the CPU has AVX (implied by AVX2), per the trait contract.
        Self(unsafe { _mm256_setzero_ps() })
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        // SAFETY: the CPU has AVX, per the trait contract.
        Self(unsafe { _mm256_set1_ps(v) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: AVX present; 8 readable floats at `p`; `loadu` needs no alignment.
        Self(unsafe { _mm256_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: AVX present; 8 writable floats at `p`; `storeu` needs no alignment.
        unsafe { _mm256_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, a: Self, b: Self) -> Self {
        // SAFETY: the CPU has FMA, per the trait contract.
        Self(unsafe { _mm256_fmadd_ps(a.0, b.0, self.0) })
    }
}

impl Lanes for Avx2 {
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        // SAFETY: AVX present.
        Self(unsafe { _mm256_add_ps(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: AVX present (SSE is part of the x86-64 baseline).
        unsafe {
            let v = _mm_add_ps(
                _mm256_castps256_ps128(self.0),
                _mm256_extractf128_ps::<1>(self.0),
            );
            let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            let v = _mm_add_ss(v, _mm_shuffle_ps::<0b01>(v, v));
            _mm_cvtss_f32(v)
        }
    }
}

/// AVX2+FMA kernel.
///
/// # Safety
/// The CPU supports AVX2 and FMA, and the lengths satisfy the `KernelFn` contract in
/// [`super`] (rank 1 or 2, `down`/`up` of `rank·n`, `y` of `n`).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn forward_avx2_fma(a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
    // SAFETY: AVX2+FMA enabled here and present by our contract; lengths forwarded.
    unsafe { lanes::forward::<Avx2>(a, x, y) }
}

/// AVX-512F kernel: 16-lane vectors (`zmm` registers).
///
/// # Safety
/// The CPU supports AVX-512F, and the lengths satisfy the `KernelFn` contract in [`super`].
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn forward_avx512f(a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
    // SAFETY: `Portable` needs no particular CPU feature; lengths forwarded.
    unsafe { lanes::forward::<Portable<f32, 16>>(a, x, y) }
}

/// Test-only: the AVX-512 kernel's 16-lane body compiled for AVX2+FMA, so hosts without
/// AVX-512 still run its block and tail logic.
///
/// # Safety
/// As [`forward_avx2_fma`].
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn forward_width16_on_avx2(a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
    // SAFETY: lengths forwarded; `Portable` needs no particular CPU feature.
    unsafe { lanes::forward::<Portable<f32, 16>>(a, x, y) }
}

/// Four f64 lanes in one `ymm` register. Methods need AVX2 and FMA (the [`Vector`] contract).
#[derive(Clone, Copy)]
struct Avx2F64(__m256d);

impl Vector for Avx2F64 {
    type Elem = f64;
    const LANES: usize = 4;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the CPU has AVX, per the trait contract.
        Self(unsafe { _mm256_setzero_pd() })
    }
    #[inline(always)]
    unsafe fn splat(v: f64) -> Self {
        // SAFETY: the CPU has AVX, per the trait contract.
        Self(unsafe { _mm256_set1_pd(v) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        // SAFETY: AVX present; 4 readable doubles at `p`; `loadu` needs no alignment.
        Self(unsafe { _mm256_loadu_pd(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        // SAFETY: AVX present; 4 writable doubles at `p`; `storeu` needs no alignment.
        unsafe { _mm256_storeu_pd(p, self.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, a: Self, b: Self) -> Self {
        // SAFETY: the CPU has FMA, per the trait contract.
        Self(unsafe { _mm256_fmadd_pd(a.0, b.0, self.0) })
    }
}

/// Merge update, f32, AVX2+FMA.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `o` satisfies the [`rank_update::UpdateFn`] contract.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn update_avx2_f32(o: &Operands<f32>) {
    // SAFETY: AVX2+FMA enabled here and present by our contract; operands forwarded.
    unsafe { rank_update::update::<Avx2>(o) }
}

/// Merge update, f64, AVX2+FMA.
///
/// # Safety
/// As [`update_avx2_f32`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn update_avx2_f64(o: &Operands<f64>) {
    // SAFETY: AVX2+FMA enabled here and present by our contract; operands forwarded.
    unsafe { rank_update::update::<Avx2F64>(o) }
}

/// Merge update, f32, AVX-512F (16-lane portable vectors in `zmm` registers).
///
/// # Safety
/// The CPU supports AVX-512F; `o` satisfies the [`rank_update::UpdateFn`] contract.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn update_avx512_f32(o: &Operands<f32>) {
    // SAFETY: `Portable` needs no particular CPU feature; operands forwarded.
    unsafe { rank_update::update::<Portable<f32, 16>>(o) }
}

/// Merge update, f64, AVX-512F (8-lane portable vectors in `zmm` registers).
///
/// # Safety
/// As [`update_avx512_f32`].
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn update_avx512_f64(o: &Operands<f64>) {
    // SAFETY: `Portable` needs no particular CPU feature; operands forwarded.
    unsafe { rank_update::update::<Portable<f64, 8>>(o) }
}

/// Test-only: the AVX-512 f32 update body (16 lanes) compiled for AVX2+FMA, so hosts without
/// AVX-512 still run its tile and tail logic.
///
/// # Safety
/// As [`update_avx2_f32`].
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn update_width16_on_avx2_f32(o: &Operands<f32>) {
    // SAFETY: `Portable` needs no particular CPU feature; operands forwarded.
    unsafe { rank_update::update::<Portable<f32, 16>>(o) }
}

/// Test-only: the AVX-512 f64 update body (8 lanes) compiled for AVX2+FMA.
///
/// # Safety
/// As [`update_avx2_f64`].
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn update_width8_on_avx2_f64(o: &Operands<f64>) {
    // SAFETY: `Portable` needs no particular CPU feature; operands forwarded.
    unsafe { rank_update::update::<Portable<f64, 8>>(o) }
}
