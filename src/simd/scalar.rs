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
        if needs_wide_term(a.scale, h, c) {
            add_term_wide(a.scale, h, &a.up[row], y.iter_mut());
            continue;
        }
        for (y, u) in y.iter_mut().zip(&a.up[row]) {
            *y += c * u;
        }
    }
}

/// Whether c = fl(s·h) has left the type's normal range although the exact product has not: it
/// overflowed (s, h finite) or fell below the smallest normal (s, h non-zero), where it
/// keeps fewer significant bits than the type's, or none. Either way a term c·uᵢ with a large uᵢ
/// would come out wrong by far more than a rounding, so the caller forms it in f64
/// ([`add_term_wide`]) instead.
/// Generic over the float type: the skinny forward asks the same of its f32/f64 s·(X Aᵀ).
#[inline(always)]
pub(crate) fn needs_wide_term<T: num_traits::Float>(scale: T, h: T, c: T) -> bool {
    let zero = T::zero();
    (!c.is_finite() && h.is_finite())
        || (c.abs() < T::min_positive_value() && h != zero && scale != zero)
}

/// y ← y + s·h·u with each product formed in f64 (s·h exactly): the path for s·h leaving
/// f32's normal range although s and h are finite ([`needs_wide_term`]). Then uᵢ = 0 still
/// adds exactly 0 (not ∞·0 = NaN), a small uᵢ can still give a finite result and a large one
/// a full-precision one; an element that truly overflows becomes ±∞.
pub(crate) fn add_term_wide<'y, 'u>(
    scale: f32,
    h: f32,
    u: impl IntoIterator<Item = &'u f32>,
    y: impl IntoIterator<Item = &'y mut f32>,
) {
    let c = f64::from(scale) * f64::from(h);
    for (y, &u) in y.into_iter().zip(u) {
        *y = (f64::from(*y) + c * f64::from(u)) as f32;
    }
}
