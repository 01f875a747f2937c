//! The skinny product Y = X Wᵀ + b for a few rows of X (n up to a few dozen, n = 1 in
//! particular: one token of a decoder), streaming W once, with the LoRA branch folded in.
//!
//! Shapes: W d×k, X n×k, Y n×d (any strides), bias b of length d. The product is a list of
//! *segments* (W₀, X₀), (W₁, X₁), …: Y = Σₛ Xₛ Wₛᵀ + b, every Wₛ with d rows and every Xₛ
//! with n rows, each with a unit column stride (any row stride). A LoRA layer's forward is
//! the two segments (W, X) and (B, C) with C = s·X Aᵀ (n×r), itself this product with the
//! one segment (A, X); a model with several adapters adds one segment per adapter.
//!
//! Why not BLAS: a `?gemm` with M = n small packs its operands and runs a micro-kernel built
//! for large M, and costs 3–5× a single pass over W (OpenBLAS 0.3.21: `sgemm` with M = 1
//! takes 3× its own `sgemv` on a 4096² W). The product is memory-bound at n = 1 and
//! compute-light up to n of a few dozen, so the floor is one read of W. This kernel:
//!
//! * walks W in blocks of `MR` rows and, along k, in chunks of [`CHUNK_BYTES`] per row: the
//!   block's chunk stays in L1 while every group of `NX` rows of X (a *panel* of up to
//!   [`PANEL_GROUPS`] groups) runs over it, so W is read from memory once per panel. Per
//!   vector step a register tile loads `MR` vectors of W and `NX` of X and runs `MR·NX`
//!   independent FMA chains; its accumulators wait in a stack buffer between chunks;
//! * prefetches W ahead of the arithmetic, spread over the groups, so that the stream from
//!   memory overlaps it: on Intel and on AMD without AVX-512 the block's next chunk into
//!   L1 (after its last chunk, the next block's first), elsewhere 16 chunks ahead into L2
//!   for panels of up to 16 rows ([`WPrefetch`]); and each row of X a few lines ahead
//!   (from L2);
//! * forms each output element by **one formula, whatever its place in a tile**: one vector
//!   accumulator over the whole vectors of every segment in order (chunking only pauses
//!   it), a fixed pairwise sum of its lanes, scalar FMAs over each segment's tail (kₛ mod
//!   L elements) in order, then + bᵢ. So bands of W's rows on different threads give
//!   bit-identical results for any thread count, and the edge rows of W and X run the same
//!   arithmetic as full tiles;
//! * writes each element of Y once;
//! * reads W in its stored type: the compute type itself, or (for a half layer, sums in f32)
//!   `bf16`/`f16`, widened in registers as each vector is loaded — at n = 1 the product is
//!   memory-bound, so streaming 2-byte W takes about half the time of f32 W.

use std::mem::MaybeUninit;
use std::ops::Range;

use ndarray::{ArrayView1, ArrayView2, ArrayViewMut2, Axis};

use super::parallel::{row_bands, run_parts};
use super::vector::{Element, Portable, Stored, Vector, WideLoad};
use super::SimdLevel;

/// Bytes per cache line (64 on every x86-64 and most aarch64 cores).
const CACHE_LINE: usize = 64;

/// The widest vector (in lanes) the kernel body takes; sizes its lane-sum buffer.
const MAX_LANES: usize = 16;

/// Groups of `NX` rows of X per panel: the accumulators of a block of W's rows against
/// one panel wait in a stack buffer between column chunks (`PANEL_GROUPS·MR·NX` vectors).
pub(super) const PANEL_GROUPS: usize = 16;

/// Bytes of each row of a W block per column chunk. Measured (4096², f32, n = 8–64, one
/// AVX-512 thread): 2–4 KiB per row is best; 256 B is 20 % slower, 16 KiB 15 % slower.
pub(super) const CHUNK_BYTES: usize = 2048;

/// How the tiles prefetch W ahead of the arithmetic, per CPU class. A panel of fewer than
/// `min_rows` rows of X (`min_rows_narrow` when W is stored narrower than the compute
/// type: bf16/f16 in an f32 product) does not; one of up to `far_max_rows` rows prefetches
/// each row of the block `far_chunks` column chunks on into L2 (past a row's last chunk,
/// into the next block's rows); a larger one the next chunk into L1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct WPrefetch {
    pub(super) min_rows: usize,
    pub(super) min_rows_narrow: usize,
    pub(super) far_max_rows: usize,
    pub(super) far_chunks: usize,
}

impl WPrefetch {
    /// For a panel of `rows` rows of X and W narrow or not: how many chunks ahead, and
    /// whether into L1.
    fn for_panel(self, rows: usize, narrow: bool) -> Option<(usize, bool)> {
        let min_rows = if narrow {
            self.min_rows_narrow
        } else {
            self.min_rows
        };
        if rows < min_rows {
            None
        } else if rows <= self.far_max_rows {
            Some((self.far_chunks, false))
        } else {
            Some((1, true))
        }
    }
}

/// Intel: one chunk ahead into L1, from the first row. Measured (4096², one AVX-512
/// thread, Intel Xeon family 6 model 207, W flushed from the caches before each call, best
/// of 40 alternating calls): with the prefetch f32 took 0–4 % less at n = 1–4, bf16 and f16
/// 3–8 % less (at n = 1 the half forwards went from 0.55–0.56× the f32 one to 0.53–0.54×);
/// with W in the 300 MiB last-level cache the same or better. The far L2 prefetch below is
/// not measured there.
pub(super) const W_PREFETCH_INTEL: WPrefetch = WPrefetch {
    min_rows: 1,
    min_rows_narrow: 1,
    far_max_rows: 0,
    far_chunks: 0,
};

/// Other CPUs (AMD with AVX-512, aarch64): none for one or two rows of X when W is f32/f64
/// (from the first row when it is bf16/f16); 16 chunks (32 KiB of each row) ahead into L2
/// up to 16 rows; the next chunk into L1 above. Measured on AMD Zen 4 (4096², f32, one
/// AVX-512 thread, 2026-12-02, best of 100 calls, alternating processes) against the
/// earlier policy (none below 5 rows, the next chunk into L1 from 5): n = 4 3.4–4.4 ms
/// against 4.1–4.9, n = 8 4.7–5.1 against 5.8–6.2, n = 16 7.1–7.4 against 7.6–8.4, n = 32
/// unchanged. At n = 4–16 the arithmetic on a chunk takes about as long as reading it, so a
/// one-chunk lead left the FMAs waiting on memory. At n = 1–2 the far prefetch measured the
/// same as none or up to 7 % slower (the CPU's own stream prefetcher keeps up with the
/// FMAs there), a one-chunk L1 prefetch 25 % slower; at n = 32 the far one was 6–9 % slower
/// (the panel's 512 KiB of X, read again for every block, shares the 1 MiB L2 with it).
/// With bf16 W the far prefetch took n = 1 from 1.35–1.45 to 1.11–1.28 ms and n = 2 from
/// 1.46–1.69 to 1.19–1.49 ms (widening costs each line of W twice the instructions of an
/// f32 line, and the CPU's prefetcher alone fell behind).
pub(super) const W_PREFETCH_OTHER: WPrefetch = WPrefetch {
    min_rows: 3,
    min_rows_narrow: 1,
    far_max_rows: 16,
    far_chunks: 16,
};

/// x86-64 CPUs that are not Intel's and lack AVX-512 (AMD Zen 3, where the AVX2 kernel's
/// 4×3 tiles run): none for one or two rows of X, the next chunk into L1 from three. Measured
/// on AMD EPYC Zen 3 (4096², one thread, 2026-12-02, policies alternating call by call,
/// median of 15–20 per-round ratios) against [`W_PREFETCH_OTHER`]: f32 n = 4 0.86–0.89×,
/// n = 8 0.86–0.88×, n = 16 0.85–0.89×, n = 32 0.98–0.99×, n = 1–3 the same within noise;
/// bf16 / f16 n = 8 0.95 / 0.97×, n = 1 no prefetch 0.97 / 0.90× the far one. The far L2
/// prefetch that suits Zen 4 (1 MiB L2, AVX-512 tiles) only competed with the stream here;
/// chunks of 1 KiB or 512 B were 3–25 % slower than 2 KiB, 4 KiB the same.
pub(super) const W_PREFETCH_AMD_AVX2: WPrefetch = WPrefetch {
    min_rows: 3,
    min_rows_narrow: 3,
    far_max_rows: 0,
    far_chunks: 0,
};

/// The W prefetch for this CPU (looked up once).
fn w_prefetch() -> WPrefetch {
    static POLICY: std::sync::OnceLock<WPrefetch> = std::sync::OnceLock::new();
    *POLICY.get_or_init(|| {
        if super::cpu_is_intel() {
            W_PREFETCH_INTEL
        } else if cfg!(target_arch = "x86_64") && !SimdLevel::Avx512F.is_available() {
            W_PREFETCH_AMD_AVX2
        } else {
            W_PREFETCH_OTHER
        }
    })
}

/// How far ahead (elements) a tile prefetches each of its rows of X. Measured (4096², f32,
/// n = 32, AVX-512): 4 lines ahead is 4 % faster than none, farther is slower.
const X_PREFETCH_AHEAD: usize = 64;

/// One term Xₛ Wₛᵀ of a product: W-like d×kₛ and X-like n×kₛ, each with a unit column
/// stride (or kₛ ≤ 1). W is stored as `W`: the compute type `T` itself, or a half type
/// that the kernel widens in registers as it loads it (a half layer's W, with X widened
/// to f32 once beforehand).
#[derive(Clone, Copy)]
pub struct Segment<'a, T, W = T> {
    /// d×kₛ.
    pub w: ArrayView2<'a, W>,
    /// n×kₛ.
    pub x: ArrayView2<'a, T>,
}

/// The inputs of one product: its segments and the optional bias (length d, stored as W).
#[derive(Clone, Copy)]
pub struct Operands<'a, 'b, T, W = T> {
    segments: &'b [Segment<'a, T, W>],
    bias: Option<ArrayView1<'a, W>>,
}

/// Writes the band Y[.., i0..i0 + y.ncols()] of the product `o`, where `y` is that band.
///
/// # Safety
/// Every segment's views have unit column stride (or kₛ ≤ 1); the shapes chain (every
/// segment's W d×kₛ and X n×kₛ, bias d); `y` is n×c with i0 + c ≤ d; the CPU supports
/// the kernel's instructions.
pub type ProductFn<T, W = T> =
    unsafe fn(o: &Operands<'_, '_, T, W>, i0: usize, y: ArrayViewMut2<'_, T>);

/// The element types with a skinny-product kernel computing in their own type. Sealed
/// (lives in a private module); a supertrait of [`LoraFloat`](crate::LoraFloat).
pub trait DecodeElement: Element + std::ops::Add<Output = Self> + ProductWeight<Self> {}

/// The types W can be stored as in a product computing in `T`, and which kernel runs at
/// each SIMD level: `T` itself, and for `T = f32` the half types `bf16` and `f16`. Sealed.
pub trait ProductWeight<T: Element>: Stored<T> {
    /// The kernel for `level`, if this build has one and (beyond the level's own features,
    /// which the caller checks) this CPU has what it needs.
    fn product_kernel(level: SimdLevel) -> Option<ProductFn<T, Self>>;
}

macro_rules! impl_product_weight {
    ($t:ty, $w:ty, $avx2:expr, $avx512:ident, $neon:expr) => {
        impl ProductWeight<$t> for $w {
            fn product_kernel(level: SimdLevel) -> Option<ProductFn<$t, $w>> {
                kernel_for_level!(level, product_scalar::<$t, $w>, $avx2, $avx512, $neon)
            }
        }
    };
}
impl_product_weight!(
    f32,
    f32,
    Some(super::x86::product_avx2_f32),
    product_avx512_f32,
    Some(super::aarch64::product_neon_f32)
);
impl_product_weight!(
    f64,
    f64,
    Some(super::x86::product_avx2_f64),
    product_avx512_f64,
    Some(super::aarch64::product_neon_f64)
);
impl_product_weight!(
    f32,
    half::bf16,
    Some(super::x86::product_avx2_bf16),
    product_avx512_bf16,
    Some(super::aarch64::product_neon_bf16)
);
// F16C (`vcvtph2ps`) is not implied by AVX2+FMA: without it the AVX2 level declines f16.
impl_product_weight!(
    f32,
    half::f16,
    is_x86_feature_detected!("f16c")
        .then_some(super::x86::product_avx2_f16 as ProductFn<f32, half::f16>),
    product_avx512_f16,
    super::aarch64::PRODUCT_NEON_F16
);
impl DecodeElement for f32 {}
impl DecodeElement for f64 {}

/// The portable one-lane kernel: the same formula element by element. Slow without FMA
/// (`mul_add` is then a libm call), so callers prefer BLAS at this level; the tests use it.
///
/// # Safety
/// As [`ProductFn`]; `Portable` needs no CPU feature.
unsafe fn product_scalar<T: DecodeElement, W: Stored<T>>(
    o: &Operands<'_, '_, T, W>,
    i0: usize,
    y: ArrayViewMut2<'_, T>,
) {
    // SAFETY: forwarded.
    unsafe { product::<Portable<T, 1>, W, 4, 4>(o, i0, y) }
}

/// Y = Σₛ Xₛ Wₛᵀ + b with the kernel at `level`, W's rows split into bands over up to
/// `threads` threads (bit-identical results for any count). Returns `false`, Y untouched,
/// when the kernel does not apply: the level does not run on this CPU, or a segment's W or
/// X lacks a unit column stride.
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn skinny_product<'a, T: DecodeElement, W: ProductWeight<T>>(
    level: SimdLevel,
    segments: &[Segment<'a, T, W>],
    bias: Option<ArrayView1<'a, W>>,
    y: ArrayViewMut2<'_, T>,
    threads: usize,
) -> bool {
    let (n, d) = y.dim();
    assert!(
        segments
            .iter()
            .all(|s| s.w.nrows() == d && s.x.nrows() == n && s.w.ncols() == s.x.ncols())
            && bias.is_none_or(|b| b.len() == d),
        "skinny product shapes do not chain into Y {:?}",
        y.dim()
    );
    let unit = |cols: usize, strides: &[isize]| cols <= 1 || strides[1] == 1;
    let units = |s: &Segment<'_, T, W>| {
        unit(s.w.ncols(), s.w.strides()) && unit(s.x.ncols(), s.x.strides())
    };
    if !segments.iter().all(units) || !level.is_available() {
        return false;
    }
    let Some(kernel) = W::product_kernel(level) else {
        return false;
    };
    if n == 0 || d == 0 {
        return true;
    }
    let o = Operands { segments, bias };
    let bands = if threads > 1 && d > BAND_ROWS {
        row_bands(d, threads, BAND_ROWS)
    } else {
        // One band: no thread, and no allocation (a serving loop relies on that).
        // SAFETY: checked above: unit column strides, chaining shapes, a level this CPU
        // runs; the band is all of Y.
        unsafe { kernel(&o, 0, y) };
        return true;
    };
    let mut parts = Vec::new();
    let mut y = y;
    // Bands of whole row blocks (a multiple of every kernel's MR).
    for (start, len) in bands {
        let (band, rest) = y.split_at(Axis(1), len);
        parts.push((start, band));
        y = rest;
    }
    // SAFETY: checked above: unit column strides, chaining shapes, a level this CPU runs;
    // each part is the band of Y's columns start..start + len, which no other part touches.
    run_parts(parts, |(start, band)| unsafe { kernel(&o, start, band) });
    true
}

/// Rows of W per thread band: a multiple of every kernel's `MR` (see [`SMALL_PANEL`]).
const BAND_ROWS: usize = 24;

/// The kernel body at `MR` rows of W × `NX` rows of X per register tile.
///
/// # Safety
/// As [`ProductFn`], with the CPU supporting `V`'s instructions, `V::LANES ≤ MAX_LANES` and
/// `NX ≤ 8`.
#[inline(always)]
pub(super) unsafe fn product<V, W, const MR: usize, const NX: usize>(
    o: &Operands<'_, '_, V::Elem, W>,
    i0: usize,
    mut y: ArrayViewMut2<'_, V::Elem>,
) where
    V: WideLoad<W>,
    W: Stored<V::Elem>,
    V::Elem: DecodeElement,
{
    let out = Out {
        ptr: y.as_mut_ptr(),
        row: y.strides()[0],
        col: y.strides()[1],
        i0,
    };
    let (n, c) = y.dim();
    let mut m0 = 0;
    while m0 < n {
        // A panel of X's rows; W streams once per panel.
        let m1 = n.min(m0 + PANEL_GROUPS * NX);
        let mut i = i0;
        while i + MR <= i0 + c {
            // SAFETY: rows i..i + MR ≤ i0 + c ≤ d, X rows m0..m1 ≤ n; the rest forwarded.
            unsafe { rows::<V, W, MR, NX>(o, out, i, m0..m1) };
            i += MR;
        }
        while i < i0 + c {
            // SAFETY: row i < d; the rest forwarded.
            unsafe { rows::<V, W, 1, NX>(o, out, i, m0..m1) };
            i += 1;
        }
        m0 = m1;
    }
}

/// Panels of at most this many rows of X run the kernels' small-panel tile: more rows of W
/// per tile (more independent streams from memory, fewer accumulators per row). Only the
/// x86-64 kernels split so far.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) const SMALL_PANEL: usize = 2;

/// [`product`] with the `MR`×`NX` tile, or when Y has at most [`SMALL_PANEL`] rows, the
/// `MR_SMALL`×`SMALL_PANEL` one. Both compute every element by the same formula, so results
/// do not depend on the choice.
///
/// # Safety
/// As [`product`] for both tiles.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) unsafe fn product_small_split<
    V,
    W,
    const MR: usize,
    const NX: usize,
    const MR_SMALL: usize,
>(
    o: &Operands<'_, '_, V::Elem, W>,
    i0: usize,
    y: ArrayViewMut2<'_, V::Elem>,
) where
    V: WideLoad<W>,
    W: Stored<V::Elem>,
    V::Elem: DecodeElement,
{
    // SAFETY: forwarded.
    unsafe {
        if y.nrows() <= SMALL_PANEL {
            product::<V, W, MR_SMALL, SMALL_PANEL>(o, i0, y)
        } else {
            product::<V, W, MR, NX>(o, i0, y)
        }
    }
}

/// Where Y's band lives: Y[m, i] at `ptr + m·row + (i − i0)·col`.
#[derive(Clone, Copy)]
struct Out<T> {
    ptr: *mut T,
    row: isize,
    col: isize,
    i0: usize,
}

/// Rows i..i + M of W against X's rows `panel`: segment by segment and column chunk by
/// column chunk, every group of `NX` rows of X (the last one may be smaller) continues its
/// accumulators in its slot of the buffer; then each element is finished and written.
///
/// # Safety
/// i + M ≤ d and i ≥ out.i0 inside the band, `panel` inside 0..n and at most
/// `PANEL_GROUPS·NX` long; as [`product`].
#[inline(always)]
unsafe fn rows<V, W, const M: usize, const NX: usize>(
    o: &Operands<'_, '_, V::Elem, W>,
    out: Out<V::Elem>,
    i: usize,
    panel: Range<usize>,
) where
    V: WideLoad<W>,
    W: Stored<V::Elem>,
    V::Elem: DecodeElement,
{
    let l = V::LANES;
    let chunk = (CHUNK_BYTES / std::mem::size_of::<W>()).next_multiple_of(l);
    let groups = panel.len().div_ceil(NX);
    let mut acc = [[[MaybeUninit::<V>::uninit(); NX]; M]; PANEL_GROUPS];
    let mut started = false;
    let narrow = std::mem::size_of::<W>() < std::mem::size_of::<V::Elem>();
    let prefetch = w_prefetch().for_panel(panel.len(), narrow);
    let (lead, into_l1) = prefetch.unwrap_or((0, true));
    for seg in o.segments {
        let k = seg.x.ncols();
        let body = k - k % l;
        let mut j0 = 0;
        while j0 < body {
            let cols = j0..body.min(j0 + chunk);
            for (g, slot) in acc.iter_mut().take(groups).enumerate() {
                let m = panel.start + g * NX;
                let tile = Tile {
                    seg,
                    i,
                    m,
                    cols: cols.clone(),
                    start: !started,
                    // Group g prefetches its share of the block's rows, `lead` chunks
                    // on: in these rows, or past their last chunk, in the next block's
                    // rows.
                    prefetch: if prefetch.is_some() {
                        g * M / groups..(g + 1) * M / groups
                    } else {
                        0..0
                    },
                    ahead: prefetch_offset(
                        cols.start,
                        lead * chunk,
                        body.next_multiple_of(chunk),
                        M as isize * seg.w.strides()[0],
                    ),
                    into_l1,
                };
                // SAFETY: (each arm) X rows m..m + that many ≤ panel.end (only the last
                // group is smaller than NX); columns within the segment's body; the
                // slot's entries are initialised unless `start`. The rest forwarded.
                unsafe {
                    match (panel.end - m).min(NX) {
                        c if c == NX => accumulate::<V, W, M, NX, NX>(&tile, slot),
                        1 => accumulate::<V, W, M, 1, NX>(&tile, slot),
                        2 => accumulate::<V, W, M, 2, NX>(&tile, slot),
                        3 => accumulate::<V, W, M, 3, NX>(&tile, slot),
                        4 => accumulate::<V, W, M, 4, NX>(&tile, slot),
                        5 => accumulate::<V, W, M, 5, NX>(&tile, slot),
                        6 => accumulate::<V, W, M, 6, NX>(&tile, slot),
                        _ => accumulate::<V, W, M, 7, NX>(&tile, slot),
                    }
                }
            }
            started = true;
            j0 = cols.end;
        }
    }
    for (g, slot) in acc.iter().take(groups).enumerate() {
        let m = panel.start + g * NX;
        for (a, slot) in slot.iter().enumerate() {
            for (q, acc) in slot.iter().take(panel.end - m).enumerate() {
                // SAFETY: `accumulate` initialised this slot if `started`; row i + a < d
                // of every W and row m + q < n of every X, tail columns inside them;
                // Y[m + q, i + a] is inside the band. CPU support by the contract.
                unsafe {
                    let mut s = if started {
                        lane_sum(acc.assume_init())
                    } else {
                        <V::Elem as Element>::ZERO
                    };
                    for seg in o.segments {
                        let k = seg.x.ncols();
                        let w = seg.w.as_ptr().offset((i + a) as isize * seg.w.strides()[0]);
                        let x = seg.x.as_ptr().offset((m + q) as isize * seg.x.strides()[0]);
                        for j in k - k % l..k {
                            s = s.fused_add((*w.add(j)).widen(), *x.add(j));
                        }
                    }
                    if let Some(b) = &o.bias {
                        s = s + b.uget(i + a).widen();
                    }
                    let at = (m + q) as isize * out.row + (i + a - out.i0) as isize * out.col;
                    *out.ptr.offset(at) = s;
                }
            }
        }
    }
}

/// How far (elements) a tile at column `start` of a block's rows prefetches: `lead`
/// columns on in the same row, or when that passes the row's chunks (`span` columns, the
/// body rounded up to whole chunks), as far into the next block's rows, which start
/// `next_block` elements after these.
fn prefetch_offset(start: usize, lead: usize, span: usize, next_block: isize) -> isize {
    let target = start + lead;
    if target < span {
        lead as isize
    } else {
        next_block + (target - span) as isize - start as isize
    }
}

/// What one register tile runs over: rows i.. of the segment's W and m.. of its X, the
/// columns `cols` (whole vectors); `start`: begin at 0 rather than the slot's values;
/// `prefetch`: the rows of the block it prefetches `ahead` elements on from each column
/// (further along these rows, or from the last chunks into the next block's rows), into L1
/// if `into_l1`, else into L2.
struct Tile<'s, 'a, T, W> {
    seg: &'s Segment<'a, T, W>,
    i: usize,
    m: usize,
    cols: Range<usize>,
    start: bool,
    prefetch: Range<usize>,
    ahead: isize,
    into_l1: bool,
}

/// One register tile: rows t.i..t.i + M of W × rows t.m..t.m + N of X over `t.cols`,
/// continuing the accumulators in `slot`.
///
/// # Safety
/// t.i + M ≤ d, t.m + N ≤ n, N ≤ NX, `t.cols` within the segment's columns in whole
/// vectors, `t.prefetch` within 0..M; `slot`'s first N entries per row are initialised
/// unless `t.start`; as [`product`].
#[inline(always)]
unsafe fn accumulate<V, W, const M: usize, const N: usize, const NX: usize>(
    t: &Tile<'_, '_, V::Elem, W>,
    slot: &mut [[MaybeUninit<V>; NX]; M],
) where
    V: WideLoad<W>,
    W: Stored<V::Elem>,
    V::Elem: DecodeElement,
{
    let l = V::LANES;
    let (sw, sx) = (&t.seg.w, &t.seg.x);
    // SAFETY: (the block) rows t.i + a < d of W and t.m + q < n of X exist, so these
    // offsets stay inside the views; columns are read with unit stride (the contract), and
    // every vector load covers j..j + l ≤ t.cols.end ≤ kₛ. Prefetches never fault. The CPU
    // supports `V` (the contract). `slot` is read only where initialised (the contract).
    unsafe {
        let w: [*const W; M] =
            std::array::from_fn(|a| sw.as_ptr().offset((t.i + a) as isize * sw.strides()[0]));
        let x: [*const V::Elem; N] =
            std::array::from_fn(|q| sx.as_ptr().offset((t.m + q) as isize * sx.strides()[0]));
        let mut acc: [[V; N]; M] = if t.start {
            [[V::zero(); N]; M]
        } else {
            std::array::from_fn(|a| std::array::from_fn(|q| slot[a][q].assume_init()))
        };
        // Where a cache line of W or X spans several vector steps (AVX2 and NEON; a half
        // W), prefetch it on the first of them only: the AVX2 4×3 tile issued up to 6
        // prefetches and their address arithmetic per 12 FMAs. Measured on AMD Zen 3 (n = 8,
        // merged, one thread, processes alternated): 48×1024 W 14.6–15.4 µs against
        // 17.2–19.4, 96×1024 26.8–30.8 against 31.5–36.2; 4096² within the noise.
        let w_line = CACHE_LINE / std::mem::size_of::<W>();
        let x_line = CACHE_LINE / std::mem::size_of::<V::Elem>();
        let mut j = t.cols.start;
        while j < t.cols.end {
            if j % w_line < l {
                for a in t.prefetch.clone() {
                    let p = w[a].wrapping_offset(j as isize + t.ahead).cast();
                    if t.into_l1 {
                        V::prefetch(p);
                    } else {
                        V::prefetch_l2(p);
                    }
                }
            }
            if j % x_line < l {
                for x in &x {
                    V::prefetch(x.wrapping_add(j + X_PREFETCH_AHEAD));
                }
            }
            let xv: [V; N] = std::array::from_fn(|q| V::load(x[q].add(j)));
            for (acc, w) in acc.iter_mut().zip(&w) {
                let wv = V::load_wide(w.add(j));
                for (acc, xv) in acc.iter_mut().zip(&xv) {
                    *acc = acc.mul_add(wv, *xv);
                }
            }
            j += l;
        }
        for (slot, acc) in slot.iter_mut().zip(&acc) {
            for (slot, acc) in slot.iter_mut().zip(acc) {
                *slot = MaybeUninit::new(*acc);
            }
        }
    }
}

/// The sum of `v`'s lanes, pairwise: lanes l and l + L/2, then halves again.
///
/// # Safety
/// The CPU supports `V`; `V::LANES ≤ MAX_LANES` and a power of two.
#[inline(always)]
unsafe fn lane_sum<V: Vector>(v: V) -> V::Elem
where
    V::Elem: DecodeElement,
{
    const { assert!(V::LANES <= MAX_LANES) };
    let mut buf = [<V::Elem as Element>::ZERO; MAX_LANES];
    // SAFETY: `buf` holds MAX_LANES ≥ LANES elements; CPU support by the contract.
    unsafe { v.store(buf.as_mut_ptr()) };
    let mut width = V::LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            buf[l] = buf[l] + buf[l + width];
        }
    }
    buf[0]
}

#[cfg(test)]
mod tests {
    use ndarray::{s, Array1, Array2, ShapeBuilder};

    use super::*;
    use crate::simd::parallel::tests::with_spawn_failing;
    use crate::simd::vector::tests::FromF32;

    #[test]
    fn prefetch_offsets_run_along_the_row_then_into_the_next_block() {
        // Rows of 10 chunks of 4 columns (body 37 → span 40), the next block 3 rows of 50 on.
        let (chunk, span, next) = (4, 40, 150);
        // One chunk ahead: the next chunk, and from the last, the next block's first.
        assert_eq!(prefetch_offset(0, chunk, span, next), 4);
        assert_eq!(prefetch_offset(32, chunk, span, next), 4);
        assert_eq!(prefetch_offset(36, chunk, span, next), 150 - 36);
        // Three chunks ahead: the same row while it lasts, then as far into the next block.
        assert_eq!(prefetch_offset(24, 3 * chunk, span, next), 12);
        assert_eq!(prefetch_offset(28, 3 * chunk, span, next), 150 - 28);
        assert_eq!(prefetch_offset(36, 3 * chunk, span, next), 150 + 8 - 36);
        // Whatever the lead, column c prefetches column c of the chunk `lead` further on in
        // the stream "this block's row, then the next block's".
        for lead in [chunk, 5 * chunk, 16 * chunk] {
            for start in (0..span).step_by(chunk) {
                let at = start as isize + prefetch_offset(start, lead, span, next);
                let stream = start + lead;
                let want = if stream < span {
                    stream as isize
                } else {
                    next + (stream - span) as isize
                };
                assert_eq!(at, want, "lead {lead}, start {start}");
            }
        }
    }

    fn pattern<T: FromF32>(rows: usize, cols: usize, seed: f32) -> Array2<T> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            T::from_f32((((i * cols + j) as f32 + seed) * 0.754_877_7).fract() - 0.5)
        })
    }

    /// One product's operands, owned, in standard layout: (W-like, X-like) per segment.
    struct Case<T, W = T> {
        segments: Vec<(Array2<W>, Array2<T>)>,
        bias: Option<Array1<W>>,
    }

    impl<T: FromF32, W: FromF32> Case<T, W> {
        /// The segment (W d×k, X n×k), then one (B d×r, C n×r) per rank.
        fn new(d: usize, k: usize, n: usize, bias: bool, ranks: &[usize]) -> Self {
            let mut segments = vec![(pattern(d, k, 2.0), pattern(n, k, 1.0))];
            for (q, &r) in ranks.iter().enumerate() {
                let seed = 4.0 + q as f32;
                segments.push((pattern(d, r, seed), pattern(n, r, seed + 0.5)));
            }
            Case {
                segments,
                bias: bias.then(|| pattern(1, d, 3.0).remove_axis(ndarray::Axis(0))),
            }
        }

        fn dims(&self) -> (usize, usize) {
            (self.segments[0].1.nrows(), self.segments[0].0.nrows())
        }
    }

    /// The product in f64 and, per element, the sum of the magnitudes of its terms (which
    /// scales the rounding error bound).
    fn reference<T: FromF32, W: FromF32>(c: &Case<T, W>) -> (Array2<f64>, Array2<f64>) {
        let (n, d) = (c.segments[0].1.nrows(), c.segments[0].0.nrows());
        let mut value = Array2::zeros((n, d));
        let mut size = Array2::zeros((n, d));
        for ((m, i), v) in value.indexed_iter_mut() {
            let (mut sum, mut mag) = (0.0, 0.0);
            for (w, x) in &c.segments {
                for (&w, &x) in w.row(i).iter().zip(x.row(m)) {
                    let p = w.into() * x.into();
                    sum += p;
                    mag += p.abs();
                }
            }
            if let Some(b) = &c.bias {
                sum += b[i].into();
                mag += b[i].into().abs();
            }
            *v = sum;
            size[[m, i]] = mag;
        }
        (value, size)
    }

    /// Memory layouts: the operands 0 standard, 1 a sub-view of a wider array (row stride
    /// greater than kₛ), 2 rows reversed (negative row stride); Y 0 standard, 1
    /// column-major, 2 a sub-view inside a NaN-filled array (the padding is checked
    /// untouched), 3 both axes reversed.
    #[derive(Clone, Copy, Debug)]
    struct Layout {
        operands: usize,
        y: usize,
    }

    /// The backing array of `a` laid out per `layout`; [`view_of`] finds `a` inside it.
    fn place<T: FromF32>(a: &Array2<T>, layout: usize) -> Array2<T> {
        let (r, c) = a.dim();
        match layout {
            0 => a.clone(),
            1 => {
                let mut wide = Array2::from_elem((r, c + 3), T::from_f32(f32::NAN));
                wide.slice_mut(s![.., 1..c + 1]).assign(a);
                wide
            }
            _ => a.slice(s![..;-1, ..]).to_owned(),
        }
    }

    fn view_of<T>(backing: &Array2<T>, layout: usize, cols: usize) -> ArrayView2<'_, T> {
        match layout {
            0 => backing.view(),
            1 => backing.slice(s![.., 1..cols + 1]),
            _ => backing.slice(s![..;-1, ..]),
        }
    }

    /// Runs `kernel` directly on the bands of W's rows that start at `cuts` (and 0), with
    /// the operands laid out per `layout`; returns Y in standard layout.
    fn run<T: DecodeElement + FromF32, W: FromF32>(
        kernel: ProductFn<T, W>,
        c: &Case<T, W>,
        layout: Layout,
        cuts: &[usize],
    ) -> Array2<T> {
        let (n, d) = c.dims();
        let backing: Vec<_> = c
            .segments
            .iter()
            .map(|(w, x)| (place(w, layout.operands), place(x, layout.operands)))
            .collect();
        let segments: Vec<_> = backing
            .iter()
            .zip(&c.segments)
            .map(|((w, x), (w0, _))| Segment {
                w: view_of(w, layout.operands, w0.ncols()),
                x: view_of(x, layout.operands, w0.ncols()),
            })
            .collect();
        let o = Operands {
            segments: &segments,
            bias: c.bias.as_ref().map(|b| b.view()),
        };
        let nan = T::from_f32(f32::NAN);
        let mut yb = match layout.y {
            1 => Array2::from_elem((n, d).f(), nan),
            2 => Array2::from_elem((2 * n + 1, d + 4), nan),
            _ => Array2::from_elem((n, d), nan),
        };
        {
            let mut y = match layout.y {
                2 => yb.slice_mut(s![1..;2, 2..d + 2]),
                3 => yb.slice_mut(s![..;-1, ..;-1]),
                _ => yb.view_mut(),
            };
            let mut bounds: Vec<usize> = cuts.iter().copied().filter(|&c| c < d).collect();
            bounds.insert(0, 0);
            bounds.push(d);
            for band in bounds.windows(2) {
                let part = y.slice_mut(s![.., band[0]..band[1]]);
                // SAFETY: the kernels passed here run on this host; unit column strides
                // (every layout above); shapes chain; the band lies inside Y.
                unsafe { kernel(&o, band[0], part) };
            }
        }
        match layout.y {
            2 => {
                let untouched = |v: &T| Into::<f64>::into(*v).is_nan();
                let inner = yb.slice(s![1..;2, 2..d + 2]).to_owned();
                let mut pad = yb.clone();
                pad.slice_mut(s![1..;2, 2..d + 2]).fill(nan);
                assert!(pad.iter().all(untouched), "padding around Y written");
                inner
            }
            3 => yb.slice(s![..;-1, ..;-1]).to_owned(),
            _ => yb.as_standard_layout().into_owned(),
        }
    }

    /// Every kernel this host runs, by name, and `extra`.
    fn kernels<T: DecodeElement, W: ProductWeight<T>>(
        extra: &[(&'static str, ProductFn<T, W>)],
    ) -> Vec<(&'static str, ProductFn<T, W>)> {
        let mut out: Vec<_> = SimdLevel::ALL
            .into_iter()
            .filter(|l| l.is_available())
            .filter_map(|l| W::product_kernel(l).map(|k| (l.as_str(), k)))
            .collect();
        out.extend_from_slice(extra);
        out
    }

    /// The body at width `L` with tiles of `MR × NX`, needing no CPU feature.
    ///
    /// # Safety
    /// As [`ProductFn`].
    unsafe fn portable<T, W, const L: usize, const MR: usize, const NX: usize>(
        o: &Operands<'_, '_, T, W>,
        i0: usize,
        y: ArrayViewMut2<'_, T>,
    ) where
        T: DecodeElement,
        W: Stored<T>,
    {
        // SAFETY: forwarded; `Portable` needs no CPU feature.
        unsafe { product::<Portable<T, L>, W, MR, NX>(o, i0, y) }
    }

    /// The bits of `v` widened to f64 (exact, so equal bits ⇔ equal bits in `T`).
    fn bits<T: Into<f64>>(v: T) -> u64 {
        v.into().to_bits()
    }

    fn check_all<T, W>(
        extra: &[(&'static str, ProductFn<T, W>)],
        same_formula: &[ProductFn<T, W>],
        eps: f64,
    ) where
        T: DecodeElement + FromF32,
        W: ProductWeight<T> + FromF32,
    {
        let all = kernels::<T, W>(extra);
        let names: Vec<_> = all.iter().map(|k| k.0).collect();
        println!("kernels tested: {names:?}");
        let mut case_no = 0usize;
        // Odd sizes, plus rows of W longer than a column chunk (several chunks, f32 and
        // f64) and batches longer than a panel of X's rows.
        let sizes = [1, 7, 33, 257].into_iter().flat_map(|d| {
            [0, 1, 7, 33, 257]
                .into_iter()
                .flat_map(move |k| (1..=10).chain([17, 33]).map(move |n| (d, k, n)))
        });
        for (d, k, n) in sizes.chain([(9, 1100, 70), (13, 2053, 5), (5, 600, 131)]) {
            case_no += 1;
            let bias = case_no.is_multiple_of(2);
            let ranks: &[usize] = match case_no % 3 {
                0 => &[],
                1 => &[3],
                _ => &[1, 16],
            };
            let c = Case::<T, W>::new(d, k, n, bias, ranks);
            let (want, size) = reference(&c);
            let plain = Layout { operands: 0, y: 0 };
            let terms: usize = c.segments.iter().map(|s| s.0.ncols()).sum();
            for &(name, kernel) in &all {
                let base = run(kernel, &c, plain, &[]);
                let ctx = format!("{name} d{d} k{k} n{n} bias {bias} ranks {ranks:?}");
                for ((idx, g), (want, size)) in base.indexed_iter().zip(want.iter().zip(&size)) {
                    let g: f64 = (*g).into();
                    let bound = eps * (terms + 2) as f64 * size;
                    assert!((g - want).abs() <= bound, "{ctx} {idx:?}: {g} vs {want}");
                }
                // Other layouts and row splits: bit for bit the same.
                let layout = Layout {
                    operands: case_no % 3,
                    y: case_no % 4,
                };
                for cuts in [&[1, 5, 13][..], &[4, 8, 16, 32, 64], &[3, 200]] {
                    let got = run(kernel, &c, layout, cuts);
                    assert!(
                        got.iter().zip(&base).all(|(a, b)| bits(*a) == bits(*b)),
                        "{ctx} {layout:?} cuts {cuts:?}: not bit-identical to one band in \
                         standard layout"
                    );
                }
            }
            // Tile shapes only group the work: every shape gives the same bits.
            if let Some((&first, rest)) = same_formula.split_first() {
                let base = run(first, &c, plain, &[]);
                for &kernel in rest {
                    let got = run(kernel, &c, plain, &[2]);
                    assert!(
                        got.iter().zip(&base).all(|(a, b)| bits(*a) == bits(*b)),
                        "d{d} k{k} n{n}: tile shapes disagree"
                    );
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn wide_f32() -> Vec<(&'static str, ProductFn<f32>)> {
        if SimdLevel::Avx2Fma.is_available() {
            vec![(
                "width 16 on avx2",
                super::super::x86::product_width16_on_avx2_f32,
            )]
        } else {
            vec![("portable 16", portable::<f32, f32, 16, 6, 4>)]
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn wide_f64() -> Vec<(&'static str, ProductFn<f64>)> {
        if SimdLevel::Avx2Fma.is_available() {
            vec![(
                "width 8 on avx2",
                super::super::x86::product_width8_on_avx2_f64,
            )]
        } else {
            vec![("portable 8", portable::<f64, f64, 8, 6, 4>)]
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn wide_f32() -> Vec<(&'static str, ProductFn<f32>)> {
        vec![("portable 16", portable::<f32, f32, 16, 6, 4>)]
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn wide_f64() -> Vec<(&'static str, ProductFn<f64>)> {
        vec![("portable 8", portable::<f64, f64, 8, 6, 4>)]
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_and_is_split_invariant_f32() {
        let mut extra = wide_f32();
        extra.push(("portable 4", portable::<f32, f32, 4, 4, 4>));
        check_all::<f32, f32>(
            &extra,
            &[
                portable::<f32, f32, 4, 4, 4>,
                portable::<f32, f32, 4, 1, 1>,
                portable::<f32, f32, 4, 3, 5>,
                portable::<f32, f32, 4, 6, 8>,
                portable::<f32, f32, 4, 8, 2>,
            ],
            f32::EPSILON as f64,
        );
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_and_is_split_invariant_f64() {
        let mut extra = wide_f64();
        extra.push(("portable 2", portable::<f64, f64, 2, 4, 4>));
        check_all::<f64, f64>(
            &extra,
            &[
                portable::<f64, f64, 2, 4, 4>,
                portable::<f64, f64, 2, 1, 1>,
                portable::<f64, f64, 2, 5, 3>,
                portable::<f64, f64, 2, 8, 2>,
            ],
            f64::EPSILON,
        );
    }

    /// A half W (X, Y and the sums in f32): every level's kernel that this CPU runs, and the
    /// portable body at widths 4 and 16, against the f64 reference of the widened W, and
    /// bit-identical over layouts, row splits and tile shapes.
    fn check_half<W: ProductWeight<f32> + FromF32>() {
        let extra: [(&'static str, ProductFn<f32, W>); 2] = [
            ("portable 4", portable::<f32, W, 4, 4, 4>),
            ("portable 16", portable::<f32, W, 16, 6, 4>),
        ];
        check_all::<f32, W>(
            &extra,
            &[
                portable::<f32, W, 4, 4, 4>,
                portable::<f32, W, 4, 1, 1>,
                portable::<f32, W, 4, 3, 5>,
                portable::<f32, W, 4, 6, 2>,
            ],
            f32::EPSILON as f64,
        );
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_and_is_split_invariant_bf16_w() {
        check_half::<half::bf16>();
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_and_is_split_invariant_f16_w() {
        check_half::<half::f16>();
    }

    /// The safe entry: declines layouts it cannot read and levels this CPU lacks (Y
    /// untouched), and with threads gives the single-thread bits.
    #[test]
    fn safe_entry_declines_and_splits() {
        let c = Case::<f32>::new(70, 40, 3, true, &[4]);
        let segments: Vec<_> = c
            .segments
            .iter()
            .map(|(w, x)| Segment {
                w: w.view(),
                x: x.view(),
            })
            .collect();
        let bias = c.bias.as_ref().map(|b| b.view());
        let level = crate::simd::simd_level();
        let mut one = Array2::<f32>::from_elem((3, 70), f32::NAN);
        assert!(skinny_product(level, &segments, bias, one.view_mut(), 1));
        for (threads, failing) in [(2, false), (3, false), (7, false), (100, false), (4, true)] {
            let mut y = Array2::<f32>::from_elem((3, 70), f32::NAN);
            let mut run = || skinny_product(level, &segments, bias, y.view_mut(), threads);
            // With thread starts failing, the bands run on the calling thread.
            assert!(if failing {
                with_spawn_failing(run)
            } else {
                run()
            });
            assert!(
                y.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{threads} threads"
            );
        }
        // A column-major X (no unit column stride): declined.
        let xf = c.segments[0].1.t().as_standard_layout().into_owned();
        let mut strided = segments.clone();
        strided[0].x = xf.t();
        let mut y = Array2::<f32>::from_elem((3, 70), 7.0);
        assert!(!skinny_product(level, &strided, bias, y.view_mut(), 1));
        assert!(y.iter().all(|&v| v == 7.0));
        for l in SimdLevel::ALL.into_iter().filter(|l| !l.is_available()) {
            assert!(!skinny_product(l, &segments, bias, y.view_mut(), 1));
        }
        assert!(y.iter().all(|&v| v == 7.0));
        // n = 0 and d = 0 are done at once.
        let empty = [Segment {
            w: c.segments[0].0.view(),
            x: c.segments[0].1.slice(s![..0, ..]),
        }];
        assert!(skinny_product(
            level,
            &empty,
            bias,
            Array2::zeros((0, 70)).view_mut(),
            4
        ));
    }
}
