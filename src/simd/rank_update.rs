//! The fused rank-r update W ← W + α·B A that merge and unmerge run (W d×k, B d×r, A r×k).
//!
//! Why not BLAS: with a short K = r a `?gemm` spends its time packing and in a micro-kernel
//! built for long K, and runs well below the FMA peak (OpenBLAS: 30–60 GFLOP/s single-thread
//! for r = 16 on a 92 GFLOP/s sgemm machine), so merge cost 2.3× one read-write pass of W.
//! This kernel is the same gemm update, register-tiled for short K and streaming W once:
//!
//! * a tile of `MR` rows × `NR` vectors of W is accumulated in registers as
//!   acc = Σₚ Bᵢₚ·Aₚⱼ (one FMA per term, p = 0..r in order), then written once as
//!   Wᵢⱼ ← Wᵢⱼ + α·accᵢⱼ (one more FMA). Per p the tile costs `NR` loads of A, `MR`
//!   broadcasts of B and `MR·NR` FMAs, so the loop is FMA-bound, not load-bound;
//! * A is copied once per column block ([`A_BLOCK_BYTES`]) into a packed buffer, tile by
//!   tile, so a tile reads its r rows of A sequentially rather than r rows a large
//!   power-of-two stride apart (which map to one L1 set); W is prefetched a few tiles ahead;
//! * the vector tail and the scalar tail run the same tile code with narrower vectors
//!   (one lane at the end), so **every element is computed by the same formula** in the
//!   same order: the result does not depend on the SIMD width or on where an element falls
//!   in a tile. The checked merge relies on that (see `update.rs`).
//!
//! Like a gemm with β = 1 it makes no d×k temporary. It is used for r ≤ [`MAX_FUSED_RANK`]
//! and on CPUs with AVX2+FMA, AVX-512F or NEON; otherwise merge calls BLAS `?gemm`.

use ndarray::{ArrayView2, ArrayViewMut2, Axis};

use super::parallel::{row_bands, run_parts};
use super::vector::{Element, Portable, Stored, WideLoad};
use super::SimdLevel;

/// Rows of W per register tile.
const MR: usize = 6;
/// Vectors of W per tile row (MR·NR = 12 accumulators: with `NR` vectors of A and one
/// broadcast, 16 registers on AVX2).
const NR: usize = 2;
/// How far ahead along a row of W a tile prefetches, in elements: a few tiles, so that W
/// streams in from memory while the FMAs of the tiles before it run.
const PREFETCH_AHEAD: usize = 128;
/// Multiply-adds (d·k·r) from which an update is split over threads: below it the spawn
/// cost (tens of µs) is not worth it.
const PARALLEL_MIN_WORK: usize = 1 << 24;
/// Bytes per cache line (64 on every x86-64 and most aarch64 cores).
const CACHE_LINE: usize = 64;
/// The part of A one column block packs, in bytes. Large on purpose: measured on 4096²
/// (r = 8–64, Zen 3), walking each row of W in one long run matters more than keeping the
/// packed A in L2; 128 KiB blocks were 5–10 % slower and 16–48 KiB blocks 20–50 % slower.
const A_BLOCK_BYTES: usize = 2048 * 1024;

/// The largest rank the fused kernel takes; above it merge uses BLAS `?gemm`. Measured
/// (4096², one thread, Zen 3): the fused kernel runs at 86–91 GFLOP/s for r = 64–256, level
/// with OpenBLAS there and well ahead of it below (README, *Performance*); the bound only
/// keeps its per-row-block stack buffer of B small.
///
/// Which path a merge took shows in [`gemm_counters`](crate::gemm_counters):
///
/// ```
/// use ndarray::Array2;
/// use ndlora::{LoraConfig, LoraLayer, SimdLevel};
///
/// let w = Array2::<f32>::from_shape_fn((64, 96), |(i, j)| (i as f32 - j as f32) / 100.0);
/// let mut layer = LoraLayer::new(w, LoraConfig { rank: 8, ..Default::default() })?;
/// layer.weight_b_mut()?.fill(0.01);
/// ndlora::reset_gemm_counters();
/// layer.merge()?;
/// let fused = ndlora::gemm_counters().fused_updates == 1;
/// assert_eq!(fused, 8 <= ndlora::MAX_FUSED_RANK && ndlora::simd_level() != SimdLevel::Scalar);
/// assert_eq!(layer.base_weight(), layer.effective_weight()); // merged: W itself
/// # Ok::<(), ndlora::LoraError>(())
/// ```
pub const MAX_FUSED_RANK: usize = 256;

/// Raw operands of W ← W₀ + α·B A, where W₀ is W itself (in place) or another matrix of
/// W's shape (`src`: the update reads W₀ there and writes the sum into W, so a caller that
/// holds the base in memory it cannot write, e.g. a mapped file, does not copy it first).
/// W, W₀ and A have unit column stride; B any strides. W is stored as `W`: the compute type
/// `T` itself, or a half type (`bf16`, `f16` with f32 factors) that the kernel widens as it
/// loads and rounds once as it stores.
#[derive(Clone, Copy)]
pub struct Operands<T, W = T> {
    w: *mut W,
    w_row: isize,
    src: *const W,
    src_row: isize,
    a: *const T,
    a_row: isize,
    b: *const T,
    b_row: isize,
    b_col: isize,
    d: usize,
    k: usize,
    r: usize,
    alpha: T,
}

/// W ← W₀ + α·B A over `o`.
///
/// # Safety
/// `o` describes valid memory: Wᵢⱼ at `w + i·w_row + j` (writable, aliasing nothing else
/// read here but W₀ᵢⱼ) and W₀ᵢⱼ at `src + i·src_row + j` (readable; the same element as Wᵢⱼ
/// or one no Wᵢ'ⱼ' overlaps) for i < d, j < k; Aₚⱼ at `a + p·a_row + j` and Bᵢₚ at `b + i·b_row + p·b_col`
/// readable for p < r. The CPU supports the kernel's instructions.
pub type UpdateFn<T, W = T> = unsafe fn(o: &Operands<T, W>);

/// The element types with a fused kernel computing in their own type. Sealed (lives in a
/// private module); a supertrait of [`LoraFloat`](crate::LoraFloat).
pub trait UpdateElement: Element + UpdateWeight<Self> {}

/// The types W can be stored as in an update computing in `T`, and which kernel runs at
/// each SIMD level: `T` itself (W ← W + α·acc, one FMA), and for `T = f32` the half types
/// (W ← H(f32(W) + fl(α·acc)), see [`Stored::add_scaled`]). Sealed.
pub trait UpdateWeight<T: Element>: Stored<T> {
    /// The kernel for `level`, if this build has one and (beyond the level's own features,
    /// which the caller checks) this CPU has what it needs.
    fn kernel(level: SimdLevel) -> Option<UpdateFn<T, Self>>;
}

macro_rules! impl_update_weight {
    ($t:ty, $w:ty, $avx2:expr, $avx512:ident, $neon:expr) => {
        impl UpdateWeight<$t> for $w {
            fn kernel(level: SimdLevel) -> Option<UpdateFn<$t, $w>> {
                kernel_for_level!(level, update_scalar::<$t, $w>, $avx2, $avx512, $neon)
            }
        }
    };
}
impl_update_weight!(
    f32,
    f32,
    Some(super::x86::update_avx2_f32),
    update_avx512_f32,
    Some(super::aarch64::update_neon_f32)
);
impl_update_weight!(
    f64,
    f64,
    Some(super::x86::update_avx2_f64),
    update_avx512_f64,
    Some(super::aarch64::update_neon_f64)
);
// bf16 W on AVX-512 CPUs that also convert to bf16 in hardware takes a kernel that rounds
// with `vcvtneps2bf16` (the same bits, fewer instructions).
impl UpdateWeight<f32> for half::bf16 {
    fn kernel(level: SimdLevel) -> Option<UpdateFn<f32, Self>> {
        #[cfg(target_arch = "x86_64")]
        if level == SimdLevel::Avx512F && super::x86::has_avx512_bf16() {
            return Some(super::x86::update_avx512bf16_bf16);
        }
        kernel_for_level!(
            level,
            update_scalar::<f32, half::bf16>,
            Some(super::x86::update_avx2_bf16),
            update_avx512_bf16,
            Some(super::aarch64::update_neon_bf16)
        )
    }
}
// F16C (`vcvtph2ps`, `vcvtps2ph`) is not implied by AVX2+FMA: without it AVX2 declines f16.
impl_update_weight!(
    f32,
    half::f16,
    is_x86_feature_detected!("f16c")
        .then_some(super::x86::update_avx2_f16 as UpdateFn<f32, half::f16>),
    update_avx512_f16,
    None
);
impl UpdateElement for f32 {}
impl UpdateElement for f64 {}

/// The portable one-lane kernel: the same formula as the SIMD ones, element by element. Too
/// slow to use for merge (`mul_add` is a libm call without FMA); it is the tests' reference
/// for bit-identical results.
///
/// # Safety
/// As [`UpdateFn`]; `Portable` needs no CPU feature.
unsafe fn update_scalar<T: Element, W: Stored<T>>(o: &Operands<T, W>) {
    // SAFETY: forwarded.
    unsafe { update::<Portable<T, 1>, W>(o) }
}

/// Runs W ← W + α·B A with the fused kernel at `level`, if it applies: the level runs on
/// this CPU, r ≤ [`MAX_FUSED_RANK`] and W has a unit stride on one axis. Returns `false`
/// (W untouched) otherwise, and the caller uses a gemm. Copies A (or B, for a column-major
/// W) only when it lacks a unit stride along k (d): r·k (r·d) elements, never d×k. Large
/// updates split W's rows over up to `threads` threads; the result is the same for any count.
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn fused_rank_update<T: UpdateElement, W: UpdateWeight<T>>(
    level: SimdLevel,
    alpha: T,
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    w: ArrayViewMut2<'_, W>,
    threads: usize,
) -> bool {
    fused(level, alpha, b, a, None, w, threads)
}

/// [`fused_rank_update`] out of place: W ← W₀ + α·B A, reading W₀ from `src` (W's shape)
/// and writing only W, with the same bits as the update in place would leave. Returns
/// `false` (W untouched) where the in-place one would, or when `src` lacks a unit stride
/// along the axis W has one.
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn fused_rank_update_from<T: UpdateElement, W: UpdateWeight<T>>(
    level: SimdLevel,
    alpha: T,
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    src: ArrayView2<'_, W>,
    w: ArrayViewMut2<'_, W>,
    threads: usize,
) -> bool {
    assert_eq!(
        src.dim(),
        w.dim(),
        "rank update source and target differ in shape"
    );
    fused(level, alpha, b, a, Some(src), w, threads)
}

/// The two above: W ← W₀ + α·B A with W₀ = `src`, or W itself when `None`.
#[track_caller]
fn fused<T: UpdateElement, W: UpdateWeight<T>>(
    level: SimdLevel,
    alpha: T,
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    src: Option<ArrayView2<'_, W>>,
    w: ArrayViewMut2<'_, W>,
    threads: usize,
) -> bool {
    let ((d, r), (r2, k)) = (b.dim(), a.dim());
    assert!(
        r == r2 && w.dim() == (d, k),
        "rank update shapes do not chain: {:?} · {:?} → {:?}",
        b.dim(),
        a.dim(),
        w.dim()
    );
    if r > MAX_FUSED_RANK || !level.is_available() {
        return false;
    }
    let threads = if d.saturating_mul(k).saturating_mul(r) >= PARALLEL_MIN_WORK {
        threads
    } else {
        1
    };
    match W::kernel(level) {
        // SAFETY: `level` runs on this CPU (checked above), r ≤ MAX_FUSED_RANK.
        Some(kernel) => unsafe { apply(kernel, alpha, b, a, src, w, threads) },
        None => false,
    }
}

/// [`fused`] with a given kernel on up to `threads` threads: picks the orientation in which
/// W (and W₀) has unit column stride, or returns `false` when there is none.
///
/// # Safety
/// The CPU supports `kernel`'s instructions; r ≤ [`MAX_FUSED_RANK`]; shapes chain; `src`,
/// if any, has W's shape.
unsafe fn apply<T: Element, W: Stored<T>>(
    kernel: UpdateFn<T, W>,
    alpha: T,
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    src: Option<ArrayView2<'_, W>>,
    w: ArrayViewMut2<'_, W>,
    threads: usize,
) -> bool {
    let (d, k) = w.dim();
    let unit = |extent: usize, stride: isize| extent <= 1 || stride == 1;
    let unit_both = |axis: usize, extent: usize| {
        unit(extent, w.strides()[axis])
            && src.as_ref().is_none_or(|s| unit(extent, s.strides()[axis]))
    };
    if unit_both(1, k) {
        // SAFETY: forwarded.
        unsafe { run(kernel, alpha, b, a, src, w, threads) };
        true
    } else if unit_both(0, d) {
        // Column-major W: Wᵀ (k×d, unit column stride) ← Wᵀ + α·Aᵀ Bᵀ. Every element is
        // still the FMA chain Σₚ Bᵢₚ·Aₚⱼ in order p = 0..r (products commute exactly).
        // SAFETY: forwarded.
        unsafe {
            run(
                kernel,
                alpha,
                a.reversed_axes(),
                b.reversed_axes(),
                src.map(|s| s.reversed_axes()),
                w.reversed_axes(),
                threads,
            )
        };
        true
    } else {
        false
    }
}

/// W ← W₀ + α·B A with W (and W₀) of unit column stride, its rows split over up to
/// `threads` threads (each takes a band of whole `MR`-row blocks, so every element is still
/// computed by the same formula; a band whose thread cannot start runs on the calling
/// thread).
///
/// # Safety
/// As [`apply`], and W and `src` have unit column stride (or k ≤ 1).
unsafe fn run<T: Element, W: Stored<T>>(
    kernel: UpdateFn<T, W>,
    alpha: T,
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    src: Option<ArrayView2<'_, W>>,
    w: ArrayViewMut2<'_, W>,
    threads: usize,
) {
    let (d, k) = w.dim();
    let r = a.nrows();
    if d == 0 || k == 0 || r == 0 {
        return;
    }
    let a_owned;
    let a = if k <= 1 || a.strides()[1] == 1 {
        a
    } else {
        a_owned = a.as_standard_layout().into_owned();
        a_owned.view()
    };
    let mut parts = Vec::new();
    let (mut w, mut b, mut src) = (w, b, src);
    for (_, len) in row_bands(d, threads, MR) {
        let (w_band, w_rest) = w.split_at(Axis(0), len);
        let (b_band, b_rest) = b.split_at(Axis(0), len);
        let (src_band, src_rest) = match src {
            Some(s) => {
                let (band, rest) = s.split_at(Axis(0), len);
                (Some(band), Some(rest))
            }
            None => (None, None),
        };
        parts.push((w_band, b_band, src_band));
        (w, b, src) = (w_rest, b_rest, src_rest);
    }
    // SAFETY: forwarded for each band of rows, which no other part touches; A now has unit
    // column stride.
    run_parts(parts, |(w, b, src)| unsafe {
        run_rows(kernel, alpha, b, a, src, w)
    });
}

/// W ← W₀ + α·B A on the calling thread.
///
/// # Safety
/// As [`apply`], W, `src` and A have unit column stride (or k ≤ 1), and d, k, r ≥ 1.
unsafe fn run_rows<T: Element, W: Stored<T>>(
    kernel: UpdateFn<T, W>,
    alpha: T,
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    src: Option<ArrayView2<'_, W>>,
    mut w: ArrayViewMut2<'_, W>,
) {
    let (d, k) = w.dim();
    let w_ptr = w.as_mut_ptr();
    let (src, src_row) = match src {
        Some(s) => (s.as_ptr(), s.strides()[0]),
        None => (w_ptr.cast_const(), w.strides()[0]),
    };
    let o = Operands {
        w: w_ptr,
        w_row: w.strides()[0],
        src,
        src_row,
        a: a.as_ptr(),
        a_row: a.strides()[0],
        b: b.as_ptr(),
        b_row: b.strides()[0],
        b_col: b.strides()[1],
        d,
        k,
        r: a.nrows(),
        alpha,
    };
    // SAFETY: the pointers and strides are those of live views of the stated shapes (for an
    // axis of extent 1 the stride is never multiplied by a non-zero index); W's and A's
    // column strides are 1 (or k = 1); `w` is a unique borrow, so W aliases neither A nor
    // B, nor a separate `src` (a shared view, which a unique borrow cannot overlap). The CPU supports `kernel` and r ≤ MAX_FUSED_RANK, by this function's contract.
    unsafe { kernel(&o) }
}

/// The kernel body: column blocks (A's block packed tile by tile), then row blocks of `MR`
/// (and single rows, B's rows packed), then tiles.
///
/// # Safety
/// As [`UpdateFn`], with the CPU supporting `V`'s instructions, and r ≤ [`MAX_FUSED_RANK`].
#[inline(always)]
pub(super) unsafe fn update<V: WideLoad<W>, W: Stored<V::Elem>>(o: &Operands<V::Elem, W>) {
    let tile_width = NR * V::LANES;
    let per_column = std::mem::size_of::<V::Elem>() * o.r.max(1);
    let block = ((A_BLOCK_BYTES / per_column) / tile_width).max(1) * tile_width;
    let align = CACHE_LINE / std::mem::size_of::<V::Elem>();
    let mut packed = Vec::with_capacity(o.r * block.min(o.k) + align);
    // B's rows of a row block, transposed (`pack_b`): allocated once per call, as a
    // zeroed stack array of MAX_FUSED_RANK entries per row block cost a 6 KiB memset each.
    let zero = <V::Elem as Element>::ZERO;
    let (mut b_block, mut b_row) = (vec![[zero; MR]; o.r], vec![[zero; 1]; o.r]);
    let mut j0 = 0;
    while j0 < o.k {
        let j1 = (j0 + block).min(o.k);
        // SAFETY: columns j0..j1 ≤ k; the rest is forwarded.
        let start = unsafe { pack_a::<V, W>(o, j0, (j1 - j0) / tile_width, &mut packed) };
        let packed = &packed[start..];
        let mut i = 0;
        while i + MR <= o.d {
            // SAFETY: rows i..i + MR ≤ d, columns j0..j1 ≤ k; `packed` holds this block;
            // `b_block` has r entries.
            unsafe { row_block::<V, W, MR>(o, packed, &mut b_block, i, j0, j1) };
            i += MR;
        }
        while i < o.d {
            // SAFETY: row i < d, columns j0..j1 ≤ k; `packed` holds this block; `b_row`
            // has r entries.
            unsafe { row_block::<V, W, 1>(o, packed, &mut b_row, i, j0, j1) };
            i += 1;
        }
        j0 = j1;
    }
}

/// Copies A's columns j0..j0 + tiles·width (width = `NR·LANES`, one tile) into `packed`,
/// tile after tile, each tile as r contiguous rows of `width`: the tile loop then reads A
/// sequentially instead of r rows a large power-of-two stride apart, which would all map to
/// one L1 set. For a vector type whose pairs are deinterleaved
/// ([`WideLoad::PAIRS_DEINTERLEAVED`]) each run of 2·LANES columns is copied as its even
/// columns, then its odd ones. The copy starts at the returned index, the first cache-line
/// boundary, so no vector load splits a line.
///
/// It runs once per column block and call — in a checkpoint merge once per band of about
/// 256 rows — so its copies have sizes fixed at compile time (the width is `V`'s) and the
/// deinterleaving is `V`'s own shuffles: with a run-time width each row's copy was a
/// `memmove` call, and a deinterleaving loop compiled to scalar moves (3 % of a one-thread
/// checkpoint merge, as much as the faster store saved).
///
/// # Safety
/// j0 + tiles·width ≤ k; A as in [`UpdateFn`]; the CPU supports `V`.
#[inline(always)]
unsafe fn pack_a<V: WideLoad<W>, W: Stored<V::Elem>>(
    o: &Operands<V::Elem, W>,
    j0: usize,
    tiles: usize,
    packed: &mut Vec<V::Elem>,
) -> usize {
    const { assert!(!V::PAIRS_DEINTERLEAVED || (2 * V::LANES <= MAX_PAIR && NR.is_multiple_of(2))) };
    let width = NR * V::LANES;
    let zero = <V::Elem as Element>::ZERO;
    packed.clear();
    let size = std::mem::size_of::<V::Elem>();
    let misaligned = (packed.as_ptr() as usize % CACHE_LINE) / size;
    let start = if misaligned == 0 {
        0
    } else {
        CACHE_LINE / size - misaligned
    };
    packed.resize(start, zero);
    packed.reserve(tiles * o.r * width);
    for t in 0..tiles {
        for p in 0..o.r {
            // SAFETY: row p < r of A, columns j0 + t·width .. + width ≤ k, readable by the
            // contract; the slice lives only for this copy, while nothing writes A.
            let row = unsafe {
                std::slice::from_raw_parts(
                    o.a.offset(p as isize * o.a_row).add(j0 + t * width),
                    width,
                )
            };
            if V::PAIRS_DEINTERLEAVED {
                let mut buf = [zero; MAX_PAIR];
                for run in row.chunks_exact(2 * V::LANES) {
                    // SAFETY: `run` holds 2·LANES elements, `buf` MAX_PAIR ≥ 2·LANES
                    // (asserted above); the CPU supports `V` (this function's contract).
                    unsafe { V::deinterleave_pair(run.as_ptr(), buf.as_mut_ptr()) };
                    packed.extend_from_slice(&buf[..2 * V::LANES]);
                }
            } else {
                packed.extend_from_slice(row);
            }
        }
    }
    start
}

/// The widest pair of vectors whose columns [`pack_a`] deinterleaves (2 × 16 lanes).
const MAX_PAIR: usize = 32;

/// Where a tile reads A: row p's vectors start at `ptr + p·stride`.
#[derive(Clone, Copy)]
struct ASource<T> {
    ptr: *const T,
    stride: isize,
}

/// B's rows i..i + M into `b`, transposed so that a tile reads its M values for one p
/// contiguously. Out of line on purpose, so that it is compiled for the x86-64 baseline
/// rather than the kernel's target features: its r·M reads have run-time strides, which
/// LLVM vectorises into gathers under AVX-512 (`tests/codegen.rs` rejects gathers in a
/// kernel). It runs once per row block and column block, next to M·k·r FMAs.
///
/// # Safety
/// i + M ≤ d; B as in [`UpdateFn`]; `b.len() == r`.
#[inline(never)]
unsafe fn pack_b<T: Element, W, const M: usize>(o: &Operands<T, W>, i: usize, b: &mut [[T; M]]) {
    for (p, b) in b.iter_mut().enumerate() {
        for (m, b) in b.iter_mut().enumerate() {
            // SAFETY: row i + m < d, column p < r of B, readable by the contract.
            *b = unsafe {
                *o.b.offset((i + m) as isize * o.b_row + p as isize * o.b_col)
            };
        }
    }
}

/// Rows i..i + M, columns j0..j1: whole tiles (from `packed`), then single vectors, then
/// single elements (both from A itself).
///
/// # Safety
/// i + M ≤ d, j1 ≤ k, `packed` is `pack_a` of columns j0.., `b.len() == r`; as [`update`].
#[inline(always)]
unsafe fn row_block<V: WideLoad<W>, W: Stored<V::Elem>, const M: usize>(
    o: &Operands<V::Elem, W>,
    packed: &[V::Elem],
    b: &mut [[V::Elem; M]],
    i: usize,
    j0: usize,
    j1: usize,
) {
    let l = V::LANES;
    // SAFETY: i + M ≤ d; B as the contract states; `b` has r entries.
    unsafe { pack_b(o, i, b) };
    let b = &*b;
    let unpacked = |j: usize| ASource {
        // SAFETY: column j < k of A's row 0 (r ≥ 1 here).
        ptr: unsafe { o.a.add(j) },
        stride: o.a_row,
    };
    let mut j = j0;
    let mut tile_start = 0;
    while j + NR * l <= j1 {
        let a = ASource {
            ptr: packed[tile_start..].as_ptr(),
            stride: (NR * l) as isize,
        };
        // SAFETY: columns j..j + NR·l ≤ j1 ≤ k; `a` is this tile's packed r × NR·l block.
        unsafe { tile::<V, W, M, NR>(o, a, b, i, j) };
        j += NR * l;
        tile_start += o.r * NR * l;
    }
    while j + l <= j1 {
        // SAFETY: columns j..j + l ≤ k, read from A itself.
        unsafe { tile::<V, W, M, 1>(o, unpacked(j), b, i, j) };
        j += l;
    }
    while j < j1 {
        // SAFETY: column j < k; `Portable` needs no CPU feature.
        unsafe { tile::<Portable<V::Elem, 1>, W, M, 1>(o, unpacked(j), b, i, j) };
        j += 1;
    }
}

/// One register tile: rows i..i + M, columns j..j + N·LANES.
///
/// # Safety
/// i + M ≤ d, j + N·LANES ≤ k, `a` readable for r rows of N·LANES, `b.len() == r`; as
/// [`update`].
#[inline(always)]
unsafe fn tile<V: WideLoad<W>, W: Stored<V::Elem>, const M: usize, const N: usize>(
    o: &Operands<V::Elem, W>,
    a: ASource<V::Elem>,
    b: &[[V::Elem; M]],
    i: usize,
    j: usize,
) {
    let l = V::LANES;
    // SAFETY: (every `V::` call below) the CPU supports `V`, by this function's contract.
    // Every address is W, A or the packed copy at an index inside the bounds the contract
    // states: rows i..i + M ≤ d, columns j..j + N·l ≤ k, p < r ≤ MAX_FUSED_RANK.
    unsafe {
        for m in 0..M {
            let ahead = (i + m) as isize * o.src_row + (j + PREFETCH_AHEAD) as isize;
            V::prefetch(o.src.wrapping_offset(ahead).cast());
        }
        let mut acc = [[V::zero(); N]; M];
        for p in 0..o.r {
            let a_row = a.ptr.offset(p as isize * a.stride);
            let av: [V; N] = std::array::from_fn(|n| V::load(a_row.add(n * l)));
            let b = b.get_unchecked(p);
            for (acc, &b) in acc.iter_mut().zip(b) {
                let bv = V::splat(b);
                for (acc, av) in acc.iter_mut().zip(&av) {
                    *acc = acc.mul_add(bv, *av);
                }
            }
        }
        let alpha = V::splat(o.alpha);
        for (m, acc) in acc.iter().enumerate() {
            let w_row = o.w.offset((i + m) as isize * o.w_row).add(j);
            let src_row = o.src.offset((i + m) as isize * o.src_row).add(j);
            // Adjacent vectors in pairs (one store for both where the type packs).
            let mut n = 0;
            while n + 2 <= N {
                let (src, dst) = (src_row.add(n * l), w_row.add(n * l));
                V::add_scaled_pair(src, dst, alpha, [acc[n], acc[n + 1]]);
                n += 2;
            }
            if n < N {
                V::add_scaled(src_row.add(n * l), w_row.add(n * l), alpha, acc[n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{s, Array2, ShapeBuilder};

    use super::*;
    use crate::simd::parallel::tests::with_spawn_failing;
    use crate::simd::vector::tests::FromF32;

    fn pattern<T: FromF32>(rows: usize, cols: usize, seed: f32) -> Array2<T> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            T::from_f32((((i * cols + j) as f32 + seed) * 0.754_877_7).fract() - 0.5)
        })
    }

    /// W + α·B A accumulated in f64.
    fn reference<T: Into<f64> + Copy, W: Into<f64> + Copy>(
        alpha: T,
        b: &Array2<T>,
        a: &Array2<T>,
        w: &Array2<W>,
    ) -> Array2<f64> {
        Array2::from_shape_fn(w.dim(), |(i, j)| {
            let dot: f64 = (0..a.nrows())
                .map(|p| b[[i, p]].into() * a[[p, j]].into())
                .sum();
            w[[i, j]].into() + alpha.into() * dot
        })
    }

    /// Every kernel this host can run, by name, for one element type.
    fn kernels<T: Element, W: UpdateWeight<T>>(
        extra: &[(&'static str, UpdateFn<T, W>)],
    ) -> Vec<(&'static str, UpdateFn<T, W>)> {
        let mut out: Vec<_> = SimdLevel::ALL
            .into_iter()
            .filter(|l| l.is_available())
            .filter_map(|l| W::kernel(l).map(|k| (l.as_str(), k)))
            .collect();
        out.extend_from_slice(extra);
        out
    }

    /// Runs `kernel` on W laid out as `w_layout` (0 C, 1 F, 2 sub-view of a wider array, 3
    /// rows reversed; 4 and 5 out of place: W₀ read from a sub-view of a wider array, or
    /// from an F-order array, the sum written into a fresh array of the same order) with B
    /// and A in C or F order; returns W as a standard array.
    #[allow(clippy::too_many_arguments)]
    fn run_layout<T: Element + FromF32, W: Stored<T> + FromF32>(
        kernel: UpdateFn<T, W>,
        alpha: T,
        b: &Array2<T>,
        a: &Array2<T>,
        w: &Array2<W>,
        w_layout: usize,
        f_order_factors: bool,
        threads: usize,
    ) -> Array2<W> {
        let (b, a) = if f_order_factors {
            let mut bf = Array2::from_elem(b.dim().f(), T::ZERO);
            bf.assign(b);
            let mut af = Array2::from_elem(a.dim().f(), T::ZERO);
            af.assign(a);
            (bf, af)
        } else {
            (b.clone(), a.clone())
        };
        let (d, k) = w.dim();
        // SAFETY (all `apply` calls): every kernel passed here runs on this host (checked
        // when the list was built), r ≤ MAX_FUSED_RANK in every case, shapes chain.
        let nan = || W::from_f32(f32::NAN);
        match w_layout {
            4 | 5 => {
                let mut wide = Array2::from_elem((d, k + 5), nan());
                wide.slice_mut(s![.., 2..k + 2]).assign(w);
                let mut wf = Array2::from_elem((d, k).f(), nan());
                wf.assign(w);
                let src = if w_layout == 4 {
                    wide.slice(s![.., 2..k + 2])
                } else {
                    wf.view()
                };
                let mut target = if w_layout == 4 {
                    Array2::from_elem((d, k), nan())
                } else {
                    Array2::from_elem((d, k).f(), nan())
                };
                // SAFETY: as stated above the match; `src` has W's shape.
                assert!(unsafe {
                    apply(
                        kernel,
                        alpha,
                        b.view(),
                        a.view(),
                        Some(src),
                        target.view_mut(),
                        threads,
                    )
                });
                let same = |x: &W, y: &W| {
                    Into::<f64>::into(*x).to_bits() == Into::<f64>::into(*y).to_bits()
                };
                assert!(
                    src.iter().zip(w.iter()).all(|(x, y)| same(x, y)),
                    "source written"
                );
                target.as_standard_layout().into_owned()
            }
            0 | 1 => {
                let mut wl = if w_layout == 0 {
                    w.clone()
                } else {
                    let mut wf = Array2::from_elem((d, k).f(), W::from_f32(0.0));
                    wf.assign(w);
                    wf
                };
                // SAFETY: as stated above the match.
                assert!(unsafe {
                    apply(
                        kernel,
                        alpha,
                        b.view(),
                        a.view(),
                        None,
                        wl.view_mut(),
                        threads,
                    )
                });
                wl.as_standard_layout().into_owned()
            }
            2 => {
                let mut wide = Array2::from_elem((d, k + 5), nan());
                wide.slice_mut(s![.., 2..k + 2]).assign(w);
                let view = wide.slice_mut(s![.., 2..k + 2]);
                // SAFETY: as stated above the match.
                assert!(unsafe { apply(kernel, alpha, b.view(), a.view(), None, view, threads) });
                let untouched = |v: &W| Into::<f64>::into(*v).is_nan();
                assert!(
                    wide.slice(s![.., ..2]).iter().all(untouched),
                    "left pad written"
                );
                assert!(
                    wide.slice(s![.., k + 2..]).iter().all(untouched),
                    "right pad written"
                );
                wide.slice(s![.., 2..k + 2]).to_owned()
            }
            _ => {
                // Memory holds W's rows in reverse; the view reads them in order (negative
                // row stride).
                let mut rev = w.slice(s![..;-1, ..]).to_owned();
                let view = rev.slice_mut(s![..;-1, ..]);
                // SAFETY: as stated above the match.
                assert!(unsafe { apply(kernel, alpha, b.view(), a.view(), None, view, threads) });
                rev.slice(s![..;-1, ..]).to_owned()
            }
        }
    }

    /// Every kernel on W stored as `W` against the f64 reference (error at most `eps_w` of
    /// the result, W's own rounding, plus `eps`·(r + 2) of its scale, the sums'), and bit for
    /// bit against the one-lane kernel, over sizes, ranks, layouts and row splits.
    fn check_all<T, W>(extra: &[(&'static str, UpdateFn<T, W>)], eps: f64, eps_w: f64)
    where
        T: Element + FromF32,
        W: UpdateWeight<T> + FromF32 + PartialEq + std::fmt::Debug,
    {
        let names: Vec<_> = kernels::<T, W>(extra).iter().map(|k| k.0).collect();
        println!("kernels tested: {names:?}");
        let alpha = T::from_f32(-0.625);
        for (d, k) in [
            (1, 1),
            (2, 3),
            (7, 5),
            (13, 33),
            (33, 130),
            (6, 97),
            (7, 600),
        ] {
            for r in [1, 2, 3, 8, 17, MAX_FUSED_RANK] {
                let (w, a, b) = (
                    pattern::<W>(d, k, 1.0),
                    pattern::<T>(r, k, 2.0),
                    pattern::<T>(d, r, 3.0),
                );
                let want = reference(alpha, &b, &a, &w);
                let scalar = run_layout(update_scalar::<T, W>, alpha, &b, &a, &w, 0, false, 1);
                for &(name, kernel) in &kernels::<T, W>(extra) {
                    for w_layout in 0..6 {
                        for f_order in [false, true] {
                            // Rows split over threads too (bands of whole tiles); for
                            // layout 3 no thread can start, so the calling thread runs every
                            // band.
                            let threads = 1 + 2 * (w_layout % 2);
                            let run = || {
                                run_layout(kernel, alpha, &b, &a, &w, w_layout, f_order, threads)
                            };
                            let got = if w_layout == 3 {
                                with_spawn_failing(run)
                            } else {
                                run()
                            };
                            for ((idx, g), want) in got.indexed_iter().zip(&want) {
                                let bound = eps_w * want.abs()
                                    + eps * (r as f64 + 2.0) * (want.abs() + 1.0);
                                let g: f64 = (*g).into();
                                assert!(
                                    (g - want).abs() <= bound,
                                    "{name} d{d} k{k} r{r} layout {w_layout}/{f_order} {idx:?}: {g} vs {want}"
                                );
                            }
                            assert!(
                                got == scalar,
                                "{name} d{d} k{k} r{r} layout {w_layout}/{f_order}: not bit-identical to the one-lane kernel"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The bodies the host's own levels do not cover: a narrow portable width, and the
    /// AVX-512 body (16 f32 / 8 f64 lanes), compiled for AVX2 on x86-64 (when the CPU has it)
    /// or portable elsewhere.
    fn extra<T: Element, W>(
        narrow: (&'static str, UpdateFn<T, W>),
        wide: (&'static str, UpdateFn<T, W>, bool),
    ) -> Vec<(&'static str, UpdateFn<T, W>)> {
        let mut v = vec![narrow];
        if wide.2 {
            v.push((wide.0, wide.1));
        }
        v
    }

    #[cfg(target_arch = "x86_64")]
    fn wide_f32() -> (&'static str, UpdateFn<f32>, bool) {
        let avx2 = SimdLevel::Avx2Fma.is_available();
        (
            "width 16 on avx2",
            super::super::x86::update_width16_on_avx2_f32,
            avx2,
        )
    }

    #[cfg(target_arch = "x86_64")]
    fn wide_f64() -> (&'static str, UpdateFn<f64>, bool) {
        let avx2 = SimdLevel::Avx2Fma.is_available();
        (
            "width 8 on avx2",
            super::super::x86::update_width8_on_avx2_f64,
            avx2,
        )
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn wide_f32() -> (&'static str, UpdateFn<f32>, bool) {
        ("portable 16", update_portable::<f32, f32, 16>, true)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn wide_f64() -> (&'static str, UpdateFn<f64>, bool) {
        ("portable 8", update_portable::<f64, f64, 8>, true)
    }

    /// The body at width `L` with no CPU feature (each `mul_add` a libm call; slow, exact).
    ///
    /// # Safety
    /// As [`UpdateFn`].
    unsafe fn update_portable<T: Element, W: Stored<T>, const L: usize>(o: &Operands<T, W>) {
        // SAFETY: forwarded; `Portable` needs no CPU feature.
        unsafe { update::<Portable<T, L>, W>(o) }
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_and_the_one_lane_kernel_f32() {
        check_all::<f32, f32>(
            &extra(("portable 4", update_portable::<f32, f32, 4>), wide_f32()),
            f32::EPSILON as f64,
            0.0,
        );
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_and_the_one_lane_kernel_f64() {
        check_all::<f64, f64>(
            &extra(("portable 2", update_portable::<f64, f64, 2>), wide_f64()),
            f64::EPSILON,
            0.0,
        );
    }

    /// A half W with f32 factors: the kernels (and the portable body at widths 4 and 16)
    /// within one rounding of W's type of the f64 reference, bit for bit equal to the
    /// one-lane kernel, and equal to the formula H(f32(w) + fl(α·acc)) with acc the f32 FMA
    /// chain over p = 0..r, evaluated here element by element.
    fn check_half<W: UpdateWeight<f32> + FromF32 + PartialEq + std::fmt::Debug>(
        eps_w: f64,
        more: &[(&'static str, UpdateFn<f32, W>)],
    ) {
        let mut extra: Vec<(&'static str, UpdateFn<f32, W>)> = vec![
            ("portable 4", update_portable::<f32, W, 4>),
            ("portable 16", update_portable::<f32, W, 16>),
        ];
        extra.extend_from_slice(more);
        check_all::<f32, W>(&extra, f32::EPSILON as f64, eps_w);
        let alpha = 0.375_f32;
        for (d, k, r) in [(7, 37, 3), (13, 130, 16)] {
            let (w, a, b) = (
                pattern::<W>(d, k, 1.0),
                pattern::<f32>(r, k, 2.0),
                pattern::<f32>(d, r, 3.0),
            );
            let want = Array2::from_shape_fn((d, k), |(i, j)| {
                let acc = (0..r).fold(0.0_f32, |acc, p| b[[i, p]].mul_add(a[[p, j]], acc));
                let wf = Into::<f64>::into(w[[i, j]]) as f32; // exact
                W::from_f32(wf + alpha * acc)
            });
            for (name, kernel) in kernels::<f32, W>(&extra) {
                let got = run_layout(kernel, alpha, &b, &a, &w, 0, false, 1);
                assert!(
                    got == want,
                    "{name} d{d} k{k} r{r}: not PEFT's rounding order"
                );
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_and_the_one_lane_kernel_bf16_w() {
        check_half::<half::bf16>(
            f64::from(half::bf16::EPSILON.to_f32()),
            &bf16_kernels_beside_the_level(),
        );
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_and_the_one_lane_kernel_f16_w() {
        check_half::<half::f16>(f64::from(half::f16::EPSILON.to_f32()), &[]);
    }

    /// The bf16 kernels `UpdateWeight::kernel` does not return on this host: the AVX-512F
    /// one with integer rounding where the CPU's AVX512_BF16 kernel takes its place.
    fn bf16_kernels_beside_the_level() -> Vec<(&'static str, UpdateFn<f32, half::bf16>)> {
        #[cfg(target_arch = "x86_64")]
        if SimdLevel::Avx512F.is_available() && super::super::x86::has_avx512_bf16() {
            return vec![(
                "avx512f, integer rounding",
                super::super::x86::update_avx512_bf16 as UpdateFn<f32, half::bf16>,
            )];
        }
        Vec::new()
    }

    /// Rounding into bf16 at its edges: subnormal sums (which AVX512_BF16's
    /// `vcvtneps2bf16` reads as zero: its kernel rounds those vectors in integer lanes),
    /// ties, overflow to ∞, NaN (whole rows, and single elements in one vector of a pair) and
    /// ±0, in tiles, single vectors and the scalar tail: every kernel gives
    /// `half::bf16::from_f32` of the f32 sum.
    #[test]
    fn every_bf16_kernel_rounds_subnormals_ties_overflow_and_nan_as_half_does() {
        use half::bf16;
        let specials = [
            1e-39_f32,
            -3e-39,
            1.003_906_3, // 1 + 2⁻⁸: a tie, to even (down)
            1.011_718_8, // 1 + 3·2⁻⁸: a tie, to even (up)
            3.0e38,
            -0.0,
            0.0,
            1.5,
        ];
        let (d, k) = (8, 70);
        // Columns 44 and 51 of A: a NaN whose payload fills the low half of its bits.
        // Rounding its f32 sums as finite values would carry into the sign (0x7fff_ffff →
        // −0.0), so the kernels must take their NaN path for it; a NaN widened from a bf16 W
        // (low half zero) rounds right either way. In AVX2 pairs of vectors (columns 32–47,
        // 48–63), 44 lies in the upper vector (40–47) in memory order and among the even
        // columns deinterleaved; 51 in the lower one (48–55) and among the odd columns: a
        // kernel that tests only one of its two vectors fails on one of them.
        const PAYLOAD_NAN_COLUMNS: [usize; 2] = [44, 51];
        let a = Array2::from_shape_fn((1, k), |(_, j)| {
            if PAYLOAD_NAN_COLUMNS.contains(&j) {
                f32::from_bits(0x7fbf_ffff)
            } else {
                specials[j % specials.len()]
            }
        });
        let b = Array2::<f32>::from_shape_fn((d, 1), |(i, _)| if i % 2 == 0 { 1.0 } else { -1.0 });
        let w = Array2::from_shape_fn((d, k), |(i, j)| match i {
            // Never NaN in both W and A: which operand's payload a sum of two NaNs keeps
            // is the compiler's choice.
            2 if !PAYLOAD_NAN_COLUMNS.contains(&j) => bf16::NAN,
            // NaN in one vector of a pair only: the lower one in memory order, the even
            // columns deinterleaved (AVX2 tiles: column 20 of 16–31), then the upper one,
            // the odd columns (column 45 of 32–47).
            5 if j == 20 || j == 45 => bf16::NAN,
            3 => bf16::MAX,
            4 => bf16::from_f32(-1e-39),
            _ => bf16::from_f32(if j % 3 == 0 { 0.0 } else { 1.0 }),
        });
        // r = 1 and α = 1: the sum is w + b·a, rounded once into bf16.
        let want = Array2::from_shape_fn((d, k), |(i, j)| {
            bf16::from_f32(w[[i, j]].to_f32() + b[[i, 0]].mul_add(a[[0, j]], 0.0))
        });
        let bits = |m: &Array2<bf16>| m.mapv(bf16::to_bits);
        let mut extra = bf16_kernels_beside_the_level();
        extra.push(("portable 16", update_portable::<f32, bf16, 16>));
        for (name, kernel) in kernels::<f32, bf16>(&extra) {
            let got = run_layout(kernel, 1.0, &b, &a, &w, 0, false, 1);
            assert_eq!(bits(&got), bits(&want), "{name}");
        }
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let level = crate::simd::simd_level();
        let (b, a) = (
            pattern::<f32>(4, MAX_FUSED_RANK + 1, 1.0),
            pattern::<f32>(MAX_FUSED_RANK + 1, 6, 2.0),
        );
        let mut w = pattern::<f32>(4, 6, 3.0);
        let before = w.clone();
        assert!(!fused_rank_update(
            level,
            1.0,
            b.view(),
            a.view(),
            w.view_mut(),
            1,
        ));
        let (b, a) = (pattern::<f32>(4, 2, 1.0), pattern::<f32>(2, 6, 2.0));
        let mut wide = pattern::<f32>(8, 12, 3.0);
        let doubly_strided = wide.slice_mut(s![..;2, ..;2]);
        assert!(!fused_rank_update(
            level,
            1.0,
            b.view(),
            a.view(),
            doubly_strided,
            1,
        ));
        assert_eq!(w, before);
        assert!(fused_rank_update(
            SimdLevel::Scalar,
            1.0,
            b.view(),
            a.view(),
            pattern::<f32>(4, 6, 3.0).view_mut(),
            1,
        ));
    }
}
