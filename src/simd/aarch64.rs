//! aarch64 kernels: NEON intrinsics (`float32x4_t`) instantiating the MicroLora forward
//! ([`lanes::forward`]) and the f32 merge update ([`rank_update::update`]); the f64 update
//! uses the portable 2-lane vector, which NEON (baseline on aarch64) holds in one register.

use std::arch::aarch64::{
    float32x4_t, uint32x4_t, vaddq_f32, vaddq_u32, vaddvq_f32, vandq_u32, vbslq_u32, vcgtq_u32,
    vdupq_n_f32, vdupq_n_u32, vfmaq_f32, vld1_u16, vld1q_f32, vmovn_u32, vmulq_f32, vorrq_u32,
    vreinterpretq_f32_u32, vreinterpretq_u32_f32, vshll_n_u16, vshrq_n_u32, vst1_u16, vst1q_f32,
};

use half::{bf16, f16};

use ndarray::ArrayViewMut2;

use super::convert;
use super::decode;
use super::lanes::{self, Lanes};
use super::rank_update::{self, Operands};
use super::vector::{Portable, Vector, WideLoad};
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

impl WideLoad<f32> for Neon {
    #[inline(always)]
    unsafe fn load_wide(p: *const f32) -> Self {
        // SAFETY: forwarded (the contract of `load`).
        unsafe { Self::load(p) }
    }
    #[inline(always)]
    unsafe fn store_narrow(self, p: *mut f32) {
        // SAFETY: forwarded (the contract of `store`).
        unsafe { self.store(p) }
    }
    #[inline(always)]
    unsafe fn add_scaled(src: *const f32, dst: *mut f32, alpha: Self, acc: Self) {
        // SAFETY: forwarded: 4 readable floats at `src`, 4 writable at `dst`.
        unsafe { Self::load(src).mul_add(alpha, acc).store(dst) }
    }
}

impl WideLoad<bf16> for Neon {
    #[inline(always)]
    unsafe fn load_wide(p: *const bf16) -> Self {
        // SAFETY: NEON present; 4 readable halves at `p` (2-byte aligned, from a slice).
        // Widening shift left by 16 (`ushll`): each bf16 becomes the upper half of an f32.
        Self(unsafe { vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p.cast::<u16>()))) })
    }
    #[inline(always)]
    unsafe fn add_scaled(src: *const bf16, dst: *mut bf16, alpha: Self, acc: Self) {
        // SAFETY: NEON present; 4 readable halves at `src`, 4 writable at `dst`.
        unsafe {
            let v = vaddq_f32(Self::load_wide(src).0, vmulq_f32(alpha.0, acc.0));
            Self(v).store_narrow(dst)
        }
    }
    #[inline(always)]
    unsafe fn store_narrow(self, p: *mut bf16) {
        // SAFETY: NEON present; 4 writable halves at `p`. The rounding is
        // `half::bf16::from_f32`'s: to nearest even, NaN kept quiet.
        unsafe {
            let bits = vreinterpretq_u32_f32(self.0);
            let high = vshrq_n_u32::<16>(bits);
            let lsb = vandq_u32(high, vdupq_n_u32(1));
            let rounded: uint32x4_t =
                vshrq_n_u32::<16>(vaddq_u32(bits, vaddq_u32(lsb, vdupq_n_u32(0x7fff))));
            let quiet = vorrq_u32(high, vdupq_n_u32(0x40));
            let abs = vandq_u32(bits, vdupq_n_u32(0x7fff_ffff));
            let nan = vcgtq_u32(abs, vdupq_n_u32(0x7f80_0000));
            vst1_u16(p.cast::<u16>(), vmovn_u32(vbslq_u32(nan, quiet, rounded)));
        }
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
    unsafe { rank_update::update::<Neon, f32>(o) }
}

/// Merge update, f64, NEON (2-lane portable vectors).
///
/// # Safety
/// As [`update_neon_f32`].
#[target_feature(enable = "neon")]
pub(super) unsafe fn update_neon_f64(o: &Operands<f64>) {
    // SAFETY: `Portable` needs no particular CPU feature; operands forwarded.
    unsafe { rank_update::update::<Portable<f64, 2>, f64>(o) }
}

/// Merge update of a bf16 W (f32 factors), NEON: each vector of W widened as it is loaded,
/// W ← bf16(f32(W) + fl(α·acc)) rounded to nearest even in integer lanes. (No f16 kernel:
/// see [`PRODUCT_NEON_F16`]; an f16 merge at this level uses the banded gemm.)
///
/// # Safety
/// As [`update_neon_f32`].
#[target_feature(enable = "neon")]
pub(super) unsafe fn update_neon_bf16(o: &Operands<f32, bf16>) {
    // SAFETY: NEON enabled here and present by our contract; operands forwarded.
    unsafe { rank_update::update::<Neon, bf16>(o) }
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
    unsafe { decode::product::<Neon, f32, 6, 4>(o, i0, y) }
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
    unsafe { decode::product::<Portable<f64, 2>, f64, 6, 4>(o, i0, y) }
}

/// Skinny product with W stored as bf16 (X, Y and the sums in f32), NEON: each vector of W
/// widened as it is loaded (`ushll` by 16); tiles as [`product_neon_f32`].
///
/// # Safety
/// As [`product_neon_f32`].
#[target_feature(enable = "neon")]
pub(super) unsafe fn product_neon_bf16(
    o: &decode::Operands<'_, '_, f32, bf16>,
    i0: usize,
    y: ArrayViewMut2<'_, f32>,
) {
    // SAFETY: NEON enabled here and present by our contract; arguments forwarded.
    unsafe { decode::product::<Neon, bf16, 6, 4>(o, i0, y) }
}

/// No NEON skinny product for f16 W: widening f16 needs `fcvtl`, whose intrinsic
/// (`vcvt_f32_f16`) is not stable Rust; an f16 layer's forward at this level widens W in
/// panels for BLAS instead.
pub(super) const PRODUCT_NEON_F16: Option<decode::ProductFn<f32, f16>> = None;

/// Widens bf16 to f32 over a row (see [`convert`]), NEON.
///
/// # Safety
/// The CPU supports NEON; the arguments satisfy [`convert::WidenFn`].
#[target_feature(enable = "neon")]
pub(super) unsafe fn widen_neon_bf16(src: &[bf16], dst: &mut [f32]) {
    // SAFETY: NEON enabled here and present by our contract; forwarded.
    unsafe { convert::widen::<Neon, bf16>(src, dst) }
}

/// Rounds f32 to bf16 over a row (see [`convert`]), NEON.
///
/// # Safety
/// As [`widen_neon_bf16`], with [`convert::RoundFn`].
#[target_feature(enable = "neon")]
pub(super) unsafe fn round_neon_bf16(src: &[f32], dst: &mut [bf16]) {
    // SAFETY: NEON enabled here and present by our contract; forwarded.
    unsafe { convert::round::<Neon, bf16>(src, dst) }
}
