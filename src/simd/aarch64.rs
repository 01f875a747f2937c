//! aarch64 instantiation of the [`lanes`](super::lanes) kernel body.

use super::{lanes, Adapter};

/// NEON kernel: 4-lane blocks (one `q` register each).
///
/// # Safety
/// The CPU supports NEON (every aarch64 Linux/macOS CPU does), and the lengths satisfy the
/// `KernelFn` contract in [`super`] (rank 1 or 2, `down`/`up` of `rank·n`, `y` of `n`).
#[target_feature(enable = "neon")]
pub(super) unsafe fn forward_neon(a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
    // SAFETY: the length contract is forwarded from this function's own.
    unsafe { lanes::forward::<4>(a, x, y) }
}
