//! x86-64 instantiations of the [`lanes`](super::lanes) kernel body.

use super::{lanes, Adapter};

/// AVX2+FMA kernel: 8-lane blocks (one `ymm` register each).
///
/// # Safety
/// The CPU supports AVX2 and FMA, and the lengths satisfy the `KernelFn` contract in
/// [`super`] (rank 1 or 2, `down`/`up` of `rank·n`, `y` of `n`).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn forward_avx2_fma(a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
    // SAFETY: the length contract is forwarded from this function's own.
    unsafe { lanes::forward::<8>(a, x, y) }
}

/// AVX-512F kernel: 16-lane blocks (one `zmm` register each).
///
/// # Safety
/// The CPU supports AVX-512F, and the lengths satisfy the `KernelFn` contract in [`super`].
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn forward_avx512f(a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
    // SAFETY: the length contract is forwarded from this function's own.
    unsafe { lanes::forward::<16>(a, x, y) }
}

/// Test-only: the AVX-512 kernel's 16-lane body, compiled for AVX2+FMA, so hosts without
/// AVX-512 still test its block and tail logic.
///
/// # Safety
/// As [`forward_avx2_fma`].
#[cfg(test)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn forward_width16_on_avx2(a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
    // SAFETY: the length contract is forwarded from this function's own.
    unsafe { lanes::forward::<16>(a, x, y) }
}
