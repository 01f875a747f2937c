//! aarch64 kernels: NEON intrinsics (`float32x4_t`) instantiating the MicroLora forward
//! ([`lanes::forward`]) and the f32 merge update ([`rank_update::update`]); the f64 update
//! uses the portable 2-lane vector, which NEON (baseline on aarch64) holds in one register.

use std::arch::aarch64::{
    float32x4_t, vaddq_f32, vaddvq_f32, vdupq_n_f32, vfmaq_f32, vld1q_f32, vst1q_f32,
};

use ndarray::ArrayViewMut2;

use super::decode;
use super::lanes::{self, Lanes};
use super::rank_update::{self, Operands};
use super::vector::{Portable, Vector};
use super::Adapter;

/// Four f32 lanes in one `q` register. Methods need NEON (the [`Lanes`] contract).
#[derive(Clone, Copy)]
struct Neon(float32x4_t);

impl Vector for Neon {
    type Elem = f32;
    const LANES: usize = 4;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the CPU has NEON, per the trait contract.
        Self(unsafe { vdupq_n_f32(0.0) })
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        // SAFETY: NEON present.
        Self(unsafe { vdupq_n_f32(v) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: NEON present; 4 readable floats at `p`; `vld1q` needs only f32 alignment,
        // which every `*const f32` from a slice has.
        Self(unsafe { vld1q_f32(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: NEON present; 4 writable floats at `p` (f32-aligned, from a slice).
        unsafe { vst1q_f32(p, self.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, a: Self, b: Self) -> Self {
        // SAFETY: NEON present. vfmaq_f32(acc, a, b) = acc + a·b, fused.
        Self(unsafe { vfmaq_f32(self.0, a.0, b.0) })
    }
}

impl Lanes for Neon {
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        // SAFETY: NEON present.
        Self(unsafe { vaddq_f32(self.0, o.0) })
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: NEON present.
        unsafe { vaddvq_f32(self.0) }
    }
}

/// NEON kernel.
///
/// # Safety
/// The CPU supports NEON (every aarch64 Linux/macOS CPU does), and the lengths satisfy the
/// `KernelFn` contract in [`super`] (rank 1 or 2, `down`/`up` of `rank·n`, `y` of `n`).
#[target_feature(enable = "neon")]
pub(super) unsafe fn forward_neon(a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
    // SAFETY: NEON enabled here and present by our contract; lengths forwarded.
    unsafe { lanes::forward::<Neon>(a, x, y) }
}

/// Merge update, f32, NEON.
///
/// # Safety
/// The CPU supports NEON; `o` satisfies the [`rank_update::UpdateFn`] contract.
#[target_feature(enable = "neon")]
pub(super) unsafe fn update_neon_f32(o: &Operands<f32>) {
    // SAFETY: NEON enabled here and present by our contract; operands forwarded.
    unsafe { rank_update::update::<Neon>(o) }
}

/// Merge update, f64, NEON (2-lane portable vectors).
///
/// # Safety
/// As [`update_neon_f32`].
#[target_feature(enable = "neon")]
pub(super) unsafe fn update_neon_f64(o: &Operands<f64>) {
    // SAFETY: `Portable` needs no particular CPU feature; operands forwarded.
    unsafe { rank_update::update::<Portable<f64, 2>>(o) }
}

/// Skinny product (see [`decode`]), f32, NEON: 6 rows of W × 4 rows of X per tile (24
/// accumulators of the 32 `q` registers).
///
/// # Safety
/// The CPU supports NEON; the arguments satisfy the [`decode::ProductFn`] contract.
#[target_feature(enable = "neon")]
pub(super) unsafe fn product_neon_f32(
    o: &decode::Operands<'_, '_, f32>,
    i0: usize,
    y: ArrayViewMut2<'_, f32>,
) {
    // SAFETY: NEON enabled here and present by our contract; arguments forwarded.
    unsafe { decode::product::<Neon, 6, 4>(o, i0, y) }
}

/// Skinny product, f64, NEON (2-lane portable vectors; tiles as [`product_neon_f32`]).
///
/// # Safety
/// As [`product_neon_f32`].
#[target_feature(enable = "neon")]
pub(super) unsafe fn product_neon_f64(
    o: &decode::Operands<'_, '_, f64>,
    i0: usize,
    y: ArrayViewMut2<'_, f64>,
) {
    // SAFETY: `Portable` needs no particular CPU feature; arguments forwarded.
    unsafe { decode::product::<Portable<f64, 2>, 6, 4>(o, i0, y) }
}
