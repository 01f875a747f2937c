//! The forward kernel body, written once over a vector type with `L` lanes ([`Lanes`]).
//!
//! Pass 1, h = D x: independent accumulators (8 for rank 1, 4 per row for rank 2, so eight
//! FMA chains are in flight either way), over a body of `ACC·L` elements per step, then
//! single vectors, then a scalar tail of fewer than `L` elements. Pass 2, y ← y + Σⱼ cⱼ·Uⱼ
//! with cⱼ = s·hⱼ: both rank rows fused into one read-modify-write of y per vector, then a
//! scalar tail. All loads and stores are unaligned.

use super::vector::{Portable, Vector};

/// The extra operations the MicroLora forward needs on an f32 [`Vector`] (its reductions).
pub(super) trait Lanes: Vector<Elem = f32> {
    /// self + o, lane-wise.
    ///
    /// # Safety
    /// The CPU supports the implementing type's instructions.
    unsafe fn add(self, o: Self) -> Self;
    /// The sum of the lanes.
    ///
    /// # Safety
    /// As [`add`](Lanes::add).
    unsafe fn sum(self) -> f32;
}

impl<const L: usize> Lanes for Portable<f32, L> {
    #[inline(always)]
    unsafe fn add(mut self, o: Self) -> Self {
        for (s, o) in self.0.iter_mut().zip(o.0) {
            *s += o;
        }
        self
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        let mut v = self.0;
        let mut width = L;
        while width > 1 {
            width /= 2;
            for l in 0..width {
                v[l] += v[l + width];
            }
        }
        v[0]
    }
}

/// y ← y + s·Uᵀ (D x) for rank 1 or 2, in vectors of `V::LANES` lanes.
///
/// # Safety
/// `a.rank` is 1 or 2, `a.down.len() == a.up.len() == a.rank * x.len()`,
/// `y.len() == x.len()`, and the CPU supports `V`'s instructions.
#[inline(always)]
pub(super) unsafe fn forward<V: Lanes>(a: super::Adapter<'_>, x: &[f32], y: &mut [f32]) {
    debug_assert!(a.down.len() == a.rank * x.len() && a.up.len() == a.down.len());
    debug_assert_eq!(x.len(), y.len());
    if a.rank == 1 {
        // SAFETY: rank 1; lengths and CPU support are forwarded from this function's contract.
        unsafe { forward_rank::<V, 1, 8>(a, x, y) }
    } else {
        // SAFETY: rank 2 (the contract allows only 1 or 2); the rest is forwarded.
        unsafe { forward_rank::<V, 2, 4>(a, x, y) }
    }
}

/// The body for a fixed rank `R` with `ACC` accumulators per rank row (a power of two).
///
/// # Safety
/// `R == a.rank`, `a.down.len() == a.up.len() == R * x.len()`, `y.len() == x.len()`, and the
/// CPU supports `V`'s instructions.
#[inline(always)]
unsafe fn forward_rank<V: Lanes, const R: usize, const ACC: usize>(
    a: super::Adapter<'_>,
    x: &[f32],
    y: &mut [f32],
) {
    let n = x.len();
    let l = V::LANES;
    let xp = x.as_ptr();
    let dp = a.down.as_ptr();
    let up = a.up.as_ptr();
    let yp = y.as_mut_ptr();

    // Pass 1: h = D x.
    // SAFETY: (all `V::` calls in this function) the CPU supports `V` (this function's
    // contract); pointer ranges are justified where they are formed.
    let mut acc = [[unsafe { V::zero() }; ACC]; R];
    let mut i = 0;
    while i + ACC * l <= n {
        for k in 0..ACC {
            let o = i + k * l;
            // SAFETY: o + l ≤ i + ACC·l ≤ n = x.len().
            let xv = unsafe { V::load(xp.add(o)) };
            for (j, acc) in acc.iter_mut().enumerate() {
                // SAFETY: j < R and o + l ≤ n, so j·n + o + l ≤ R·n = down.len().
                acc[k] = unsafe { acc[k].mul_add(V::load(dp.add(j * n + o)), xv) };
            }
        }
        i += ACC * l;
    }
    while i + l <= n {
        // SAFETY: i + l ≤ n.
        let xv = unsafe { V::load(xp.add(i)) };
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: j < R, i + l ≤ n.
            acc[0] = unsafe { acc[0].mul_add(V::load(dp.add(j * n + i)), xv) };
        }
        i += l;
    }
    let mut h = [0.0_f32; R];
    for (h, acc) in h.iter_mut().zip(&mut acc) {
        // Pairwise tree over the accumulators, then across lanes.
        let mut width = ACC;
        while width > 1 {
            width /= 2;
            for k in 0..width {
                // SAFETY: CPU support, as above.
                acc[k] = unsafe { acc[k].add(acc[k + width]) };
            }
        }
        // SAFETY: CPU support, as above.
        *h = unsafe { acc[0].sum() };
    }
    while i < n {
        // SAFETY: i < n.
        let xi = unsafe { *xp.add(i) };
        for (j, h) in h.iter_mut().enumerate() {
            // SAFETY: j < R, i < n.
            let di = unsafe { *dp.add(j * n + i) };
            *h = di.mul_add(xi, *h);
        }
        i += 1;
    }

    // Pass 2: y ← y + Σⱼ (s·hⱼ)·Uⱼ.
    let c = h.map(|h| a.scale * h);
    if c.iter()
        .zip(&h)
        .any(|(c, h)| !c.is_finite() && h.is_finite())
    {
        // s·hⱼ overflows f32 (a huge scale): form the terms in f64 instead (rare, slow path).
        for (j, &h) in h.iter().enumerate() {
            super::scalar::add_term_wide(a.scale, h, &a.up[j * n..(j + 1) * n], y.iter_mut());
        }
        return;
    }
    // SAFETY: CPU support, as above.
    let cv = c.map(|c| unsafe { V::splat(c) });
    let mut i = 0;
    while i + l <= n {
        // SAFETY: i + l ≤ n = y.len(); `y` is borrowed mutably, so nothing else aliases it.
        let mut yv = unsafe { V::load(yp.add(i)) };
        for (j, cv) in cv.iter().enumerate() {
            // SAFETY: j < R, i + l ≤ n, so j·n + i + l ≤ R·n = up.len().
            yv = unsafe { yv.mul_add(*cv, V::load(up.add(j * n + i))) };
        }
        // SAFETY: as for the load from `yp` above.
        unsafe { yv.store(yp.add(i)) };
        i += l;
    }
    while i < n {
        // SAFETY: i < n = y.len().
        let mut yi = unsafe { *yp.add(i) };
        for (j, c) in c.iter().enumerate() {
            // SAFETY: j < R, i < n.
            let ui = unsafe { *up.add(j * n + i) };
            yi = c.mul_add(ui, yi);
        }
        // SAFETY: i < n = y.len().
        unsafe { *yp.add(i) = yi };
        i += 1;
    }
}
