//! The portable kernel: the straightforward loop a user would write (and the reference the
//! SIMD kernels are tested against). Not hand-unrolled; see the crate README for what the
//! compiler makes of it.

use super::Adapter;

/// y ← y + s·Uᵀ (D x), scalar. A safe function (coerces to the `unsafe fn` kernel type).
///
/// # Panics
/// On inconsistent lengths (slice indexing).
pub(super) fn forward(a: Adapter<'_>, x: &[f32], y: &mut [f32]) {
    let n = x.len();
    for j in 0..a.rank {
        let row = j * n..(j + 1) * n;
        let h: f32 = a.down[row.clone()].iter().zip(x).map(|(d, x)| d * x).sum();
        let c = a.scale * h;
        for (y, u) in y.iter_mut().zip(&a.up[row]) {
            *y += c * u;
        }
    }
}
