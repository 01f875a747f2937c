//! The forward kernel body, written once over blocks of `L` lanes.
//!
//! A block is a `[f32; L]` read with an unaligned load; lane-wise loops over a block have a
//! constant trip count, so after inlining into a `#[target_feature]` wrapper LLVM keeps each
//! block in one vector register and turns each lane-wise `mul_add` into one FMA instruction.
//!
//! Pass 1, h = D x: four independent accumulator blocks per rank row (so consecutive FMAs do
//! not wait on each other), over a body of `4·L` elements per step, then single `L`-blocks,
//! then a scalar tail of fewer than `L` elements. Pass 2, y ← y + Σⱼ cⱼ·Uⱼ with cⱼ = s·hⱼ:
//! both rank rows fused into one read-modify-write of y per block, then a scalar tail.

/// Accumulator blocks per rank row in the dot-product pass.
const ACCS: usize = 4;

/// y ← y + s·Uᵀ (D x) for rank 1 or 2, in `L`-lane blocks (`L` a power of two).
///
/// # Safety
/// `a.rank` is 1 or 2, `a.down.len() == a.up.len() == a.rank * x.len()` and
/// `y.len() == x.len()`. (Any CPU can run the body; callers compiled with wider target
/// features add the requirement that the CPU has them.)
#[inline(always)]
pub(super) unsafe fn forward<const L: usize>(a: super::Adapter<'_>, x: &[f32], y: &mut [f32]) {
    debug_assert!(a.down.len() == a.rank * x.len() && a.up.len() == a.down.len());
    debug_assert_eq!(x.len(), y.len());
    if a.rank == 1 {
        // SAFETY: rank 1 and the lengths are forwarded from this function's contract.
        unsafe { forward_rank::<L, 1>(a, x, y) }
    } else {
        // SAFETY: rank 2 (the contract allows only 1 or 2) and the lengths are forwarded.
        unsafe { forward_rank::<L, 2>(a, x, y) }
    }
}

/// Reads `L` floats from `p` (any alignment).
///
/// # Safety
/// `p..p + L` is readable.
#[inline(always)]
unsafe fn load<const L: usize>(p: *const f32) -> [f32; L] {
    // SAFETY: readable by the caller's contract; `read_unaligned` needs no alignment.
    unsafe { p.cast::<[f32; L]>().read_unaligned() }
}

/// Writes `L` floats to `p` (any alignment).
///
/// # Safety
/// `p..p + L` is writable.
#[inline(always)]
unsafe fn store<const L: usize>(p: *mut f32, v: [f32; L]) {
    // SAFETY: writable by the caller's contract; `write_unaligned` needs no alignment.
    unsafe { p.cast::<[f32; L]>().write_unaligned(v) }
}

/// acc ← a·b + acc, lane-wise (fused).
#[inline(always)]
fn fma<const L: usize>(acc: &mut [f32; L], a: &[f32; L], b: &[f32; L]) {
    for ((acc, a), b) in acc.iter_mut().zip(a).zip(b) {
        *acc = a.mul_add(*b, *acc);
    }
}

/// The sum of all lanes of all accumulators, as a tree (lane count halves each step).
#[inline(always)]
fn reduce<const L: usize>(accs: &[[f32; L]; ACCS]) -> f32 {
    let mut v = [0.0_f32; L];
    for (l, v) in v.iter_mut().enumerate() {
        *v = (accs[0][l] + accs[1][l]) + (accs[2][l] + accs[3][l]);
    }
    let mut width = L;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            v[l] += v[l + width];
        }
    }
    v[0]
}

/// The body for a fixed rank `R`.
///
/// # Safety
/// `R == a.rank`, `a.down.len() == a.up.len() == R * x.len()` and `y.len() == x.len()`.
#[inline(always)]
unsafe fn forward_rank<const L: usize, const R: usize>(
    a: super::Adapter<'_>,
    x: &[f32],
    y: &mut [f32],
) {
    let n = x.len();
    let xp = x.as_ptr();
    let dp = a.down.as_ptr();
    let up = a.up.as_ptr();
    let yp = y.as_mut_ptr();

    // Pass 1: h = D x.
    let mut acc = [[[0.0_f32; L]; ACCS]; R];
    let mut i = 0;
    while i + ACCS * L <= n {
        for k in 0..ACCS {
            let o = i + k * L;
            // SAFETY: o + L ≤ i + ACCS·L ≤ n = x.len().
            let xv = unsafe { load::<L>(xp.add(o)) };
            for (j, acc) in acc.iter_mut().enumerate() {
                // SAFETY: j < R and o + L ≤ n, so j·n + o + L ≤ R·n = down.len().
                let dv = unsafe { load::<L>(dp.add(j * n + o)) };
                fma(&mut acc[k], &dv, &xv);
            }
        }
        i += ACCS * L;
    }
    while i + L <= n {
        // SAFETY: i + L ≤ n.
        let xv = unsafe { load::<L>(xp.add(i)) };
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: j < R, i + L ≤ n.
            let dv = unsafe { load::<L>(dp.add(j * n + i)) };
            fma(&mut acc[0], &dv, &xv);
        }
        i += L;
    }
    let mut h = [0.0_f32; R];
    for (h, acc) in h.iter_mut().zip(&acc) {
        *h = reduce(acc);
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
    let cv = c.map(|c| [c; L]);
    let mut i = 0;
    while i + L <= n {
        // SAFETY: i + L ≤ n = y.len(); `y` is borrowed mutably, so nothing else aliases it.
        let mut yv = unsafe { load::<L>(yp.add(i)) };
        for (j, cv) in cv.iter().enumerate() {
            // SAFETY: j < R, i + L ≤ n, so j·n + i + L ≤ R·n = up.len().
            let uv = unsafe { load::<L>(up.add(j * n + i)) };
            fma(&mut yv, cv, &uv);
        }
        // SAFETY: as for the load from `yp` above.
        unsafe { store::<L>(yp.add(i), yv) };
        i += L;
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
