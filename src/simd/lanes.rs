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

    /// Whether pass 2 realigns U to y when y is off a vector boundary (see
    /// [`forward_rank`]): set where [`shifted`](Lanes::shifted) is one instruction (AVX-512's
    /// two-source permute), and on the portable vectors, so that tests run that path at
    /// every width.
    const SHIFTS: bool = false;

    /// Lanes `shift..shift + LANES` of `lo` and `hi` laid end to end (`shift < LANES`).
    /// This default goes through memory; it is correct for any vector, and fast for none.
    ///
    /// # Safety
    /// As [`add`](Lanes::add); `shift < LANES ≤ 16`.
    #[inline(always)]
    unsafe fn shifted(lo: Self, hi: Self, shift: usize) -> Self {
        let mut both = [0.0_f32; 32];
        debug_assert!(Self::LANES <= 16 && shift < Self::LANES);
        // SAFETY: 2·LANES ≤ 32 elements are written and LANES read from `shift`, within
        // `both`; the CPU supports the type, per the contract.
        unsafe {
            lo.store(both.as_mut_ptr());
            hi.store(both.as_mut_ptr().add(Self::LANES));
            Self::load(both.as_ptr().add(shift))
        }
    }
}

/// From this H on, pass 2 realigns U to a misaligned y on vectors with
/// [`SHIFTS`](Lanes::SHIFTS). Measured (AVX-512, Intel Xeon, y 16–48 bytes off a line):
/// 14–18 % faster at H = 4096, where D, U, x and y (24·H bytes) wait on L2, and 15–20 %
/// slower at H = 1024, where they fit L1 and the permutes compete with the FMAs.
pub(super) const REALIGN_MIN_LEN: usize = 2048;

impl<const L: usize> Lanes for Portable<f32, L> {
    const SHIFTS: bool = true;
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
    // SAFETY: forwarded.
    unsafe { forward_realigning::<V>(a, x, y, V::SHIFTS) }
}

/// [`forward`], realigning U to y in pass 2 where it applies if `realign` (the tests compare
/// both ways; the results are the same bits).
///
/// # Safety
/// As [`forward`].
#[inline(always)]
pub(super) unsafe fn forward_realigning<V: Lanes>(
    a: super::Adapter<'_>,
    x: &[f32],
    y: &mut [f32],
    realign: bool,
) {
    debug_assert!(a.down.len() == a.rank * x.len() && a.up.len() == a.down.len());
    debug_assert_eq!(x.len(), y.len());
    if a.rank == 1 {
        // SAFETY: rank 1; lengths and CPU support are forwarded from this function's contract.
        unsafe { forward_rank::<V, 1, 8>(a, x, y, realign) }
    } else {
        // SAFETY: rank 2 (the contract allows only 1 or 2); the rest is forwarded.
        unsafe { forward_rank::<V, 2, 4>(a, x, y, realign) }
    }
}

/// The body for a fixed rank `R` with `ACC` accumulators per rank row (a power of two).
///
/// Pass 2 with `realign`, H ≥ [`REALIGN_MIN_LEN`] and y off a vector boundary: y is read
/// and written on vector boundaries, and each rank row of U is read on boundaries too and
/// shifted into place ([`Lanes::shifted`]), because loads and stores that straddle cache
/// lines cost twice when the vectors wait on L2 (measured with AVX-512 at H = 4096, y 16
/// bytes off a line: 25–35 % of the call, whichever operand straddles). The first vector
/// y[0..L) is formed before the loop and stored after it (the loop forms y[head..L) again,
/// with the same formula and inputs). Every element has one formula, y + c₀·U₀ + c₁·U₁ in
/// that order, in every path: the result does not depend on where y is.
///
/// # Safety
/// `R == a.rank`, `a.down.len() == a.up.len() == R * x.len()`, `y.len() == x.len()`, and the
/// CPU supports `V`'s instructions.
#[inline(always)]
unsafe fn forward_rank<V: Lanes, const R: usize, const ACC: usize>(
    a: super::Adapter<'_>,
    x: &[f32],
    y: &mut [f32],
    realign: bool,
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
        .any(|(&c, &h)| super::scalar::needs_wide_term(a.scale, h, c))
    {
        // s·hⱼ overflows f32 (a huge scale) or underflows it (a tiny one): form the terms in
        // f64 instead (rare, slow path).
        for (j, &h) in h.iter().enumerate() {
            super::scalar::add_term_wide(a.scale, h, &a.up[j * n..(j + 1) * n], y.iter_mut());
        }
        return;
    }
    // SAFETY: CPU support, as above.
    let cv = c.map(|c| unsafe { V::splat(c) });
    let mut i = 0;
    if realign && n >= REALIGN_MIN_LEN {
        // SAFETY: the slices' lengths are as `realigned` requires (this function's contract).
        if let Some(next) = unsafe { realigned::<V, R>(yp, up, n, &cv) } {
            i = next;
        }
    }
    while i + l <= n {
        // SAFETY: i + l ≤ n; `y` is borrowed mutably, so nothing else aliases it.
        unsafe { updated::<V, R>(yp, up, n, &cv, i).store(yp.add(i)) };
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

/// yᵢ + Σⱼ cⱼ·Uⱼᵢ for the `V::LANES` elements from `i` (y and the rank rows of U, each of
/// length `n`, at `yp` and `up`), read but not stored.
///
/// # Safety
/// i + `V::LANES` ≤ n, `yp` valid for n reads and `up` for R·n, and the CPU supports `V`.
#[inline(always)]
unsafe fn updated<V: Lanes, const R: usize>(
    yp: *const f32,
    up: *const f32,
    n: usize,
    cv: &[V; R],
    i: usize,
) -> V {
    // SAFETY: i + LANES ≤ n, by the contract.
    let mut yv = unsafe { V::load(yp.add(i)) };
    for (j, cv) in cv.iter().enumerate() {
        // SAFETY: j < R and i + LANES ≤ n, so j·n + i + LANES ≤ R·n.
        yv = unsafe { yv.mul_add(*cv, V::load(up.add(j * n + i))) };
    }
    yv
}

/// Pass 2's vectors with y read and written on vector boundaries and U shifted into place
/// (see [`forward_rank`]), for as long as the next boundary of U lies within its row; returns
/// the first element not yet stored (the caller goes on from there as usual). Returns `None`,
/// having written nothing, where it does not apply: y already on a boundary, n < 3·LANES
/// (which leaves the loop at least one vector, so y[head..L) is stored before the held first
/// vector), or a row of U whose boundary before it would lie before U's start.
///
/// # Safety
/// `yp` valid for n reads and writes (aliasing nothing read here), `up` for R·n reads, and
/// the CPU supports `V`.
#[inline(always)]
pub(super) unsafe fn realigned<V: Lanes, const R: usize>(
    yp: *mut f32,
    up: *const f32,
    n: usize,
    cv: &[V; R],
) -> Option<usize> {
    let l = V::LANES;
    let size = std::mem::size_of::<f32>();
    let bytes = l * size;
    let misalign = (yp as usize) % bytes;
    if misalign == 0 || n < 3 * l {
        return None;
    }
    // y + head is on a boundary (`yp` is an f32 pointer: `misalign` is a multiple of 4).
    let head = l - misalign / size;
    // Row j from element `head` starts `shift[j]` elements past the boundary `base[j]`
    // (counted in elements from `up`).
    let mut base = [0usize; R];
    let mut shift = [0usize; R];
    for j in 0..R {
        let at = up as usize + (j * n + head) * size;
        let below = at % bytes;
        if below > at - up as usize {
            return None;
        }
        shift[j] = below / size;
        base[j] = j * n + head - shift[j];
    }
    // SAFETY: l ≤ n.
    let first = unsafe { updated::<V, R>(yp, up, n, cv, 0) };
    // SAFETY: base[j] + l ≤ j·n + head + l ≤ j·n + n (head < l, 2·l ≤ n): within row j.
    let mut lo = base.map(|b| unsafe { V::load(up.add(b)) });
    let mut i = head;
    while i + 2 * l <= n {
        // SAFETY: i + l ≤ n.
        let mut yv = unsafe { V::load(yp.add(i)) };
        for j in 0..R {
            // Elements base[j] + (i − head) + l .. + 2·l, which end at or before
            // j·n + i + 2·l ≤ j·n + n (base[j] ≤ j·n + head).
            // SAFETY: within row j of U, as just shown; CPU support by the contract.
            let hi = unsafe { V::load(up.add(base[j] + (i - head) + l)) };
            // lo, hi hold elements base[j] + (i − head) .. + 2·l, so lanes shift[j].. are
            // U row j's elements i..i + l.
            // SAFETY: shift[j] < l ≤ 16; CPU support.
            yv = unsafe { yv.mul_add(cv[j], V::shifted(lo[j], hi, shift[j])) };
            lo[j] = hi;
        }
        // SAFETY: i + l ≤ n; `y` aliases nothing read here.
        unsafe { yv.store(yp.add(i)) };
        i += l;
    }
    // SAFETY: l ≤ n; the loop above ran from i = head (head + 2·l ≤ 3·l ≤ n), so it stored
    // y[head..l) with the same values.
    unsafe { first.store(yp) };
    Some(i)
}
