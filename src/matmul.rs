//! How a matrix product runs, decided by shape and layout.
//!
//! * A forward Y = X Wᵀ + b + Σ sⱼ·(X Aⱼᵀ) Bⱼᵀ with 1 ≤ n ≤ [`N_SKINNY`] rows of X runs
//!   [`skinny_forward`]: ndlora's own kernel (`simd::decode`), which reads W once and writes
//!   Y once, with the bias and the LoRA branches folded in.
//! * Every other product goes to [`gemm`]: views whose memory BLAS can describe go straight
//!   to `cblas_?gemm` with the matching transpose flag, a column-major output is handled as
//!   Cᵀ = Bᵀ·Aᵀ, and only views with no such layout (negative or doubly-strided) are copied
//!   first. Without BLAS (`NDLORA_BLAS=none`, or none found) the same entry point runs the
//!   pure-Rust fallback.

use ndarray::{ArrayView1, ArrayView2, ArrayViewMut2, CowArray, Ix2, ShapeBuilder};

use crate::backend::kernel_threads;
#[cfg(ndlora_blas)]
use crate::blas::{blas_layout, BlasLayout};
use crate::blas::{count, fallback, GemmScalar};
use crate::scratch::{buffer_of, grown, LoraScratch};
use crate::simd::decode::{skinny_product, DecodeElement, ProductWeight, Segment};
use crate::simd::{needs_wide_term, simd_level, SimdLevel};

/// The largest batch (rows n of X) whose forward runs ndlora's own skinny kernel instead of
/// BLAS `?gemm`; larger batches use the gemm, whose packing pays off there.
///
/// A forward with n ≤ `N_SKINNY` rows is memory-bound or close to it: the kernel reads W
/// once for the whole batch and writes Y once, with the bias and the LoRA branch in the same
/// pass, where a BLAS gemm with M = n packs and runs a micro-kernel built for large M (for
/// n = 1, OpenBLAS 0.3.21 spends 3× a read of W). Measured on a 4096² f32 layer, one thread
/// (README, *Performance*): the kernel is ahead of OpenBLAS `sgemm` up to n = 32 and behind
/// at n = 64. It applies when this CPU has a SIMD level (AVX2+FMA, AVX-512F or NEON), W, X
/// and the factors have unit column stride (row-major, any row stride) and at most
/// [`MAX_SKINNY_ADAPTERS`] adapters are active; otherwise the forward uses the gemm.
/// [`gemm_counters`](crate::gemm_counters) counts such forwards as `skinny_products`.
///
/// ```
/// use ndarray::Array2;
/// use ndlora::{LoraConfig, LoraLayer, SimdLevel};
///
/// let layer = LoraLayer::new(Array2::<f32>::ones((64, 96)), LoraConfig { rank: 4, ..Default::default() })?;
/// for n in [1, ndlora::N_SKINNY, ndlora::N_SKINNY + 1] {
///     ndlora::reset_gemm_counters();
///     layer.forward(Array2::<f32>::ones((n, 96)).view())?;
///     let own = ndlora::gemm_counters().skinny_products == 1;
///     assert_eq!(own, n <= ndlora::N_SKINNY && ndlora::simd_level() != SimdLevel::Scalar);
/// }
/// # Ok::<(), ndlora::LoraError>(())
/// ```
pub const N_SKINNY: usize = 32;

/// The largest batch whose forward of a half-precision layer (`bf16`, `f16` W) runs the
/// skinny kernel that widens W in registers; larger batches widen W one panel at a time
/// into f32 and multiply it with BLAS `sgemm`.
///
/// Higher than [`N_SKINNY`] because the gemm path of a half layer pays for widening W (and
/// X) on every call. Measured on a 4096² layer, r = 16, one thread, Intel Xeon (AVX-512,
/// shared and noisy), criterion `decode` bench: at n = 48 the bf16 kernel took 20.9 ms and
/// the panel-widening gemm 37.0 ms (the f32 gemm 22.9–29.3 ms); at n = 64 the kernel
/// 45.1 ms, the widening gemm 41.6 ms. On a CPU without a kernel for the type (f16 needs
/// F16C on AVX2; no f16 kernel on NEON) every half forward takes the gemm path.
///
/// ```
/// use half::bf16;
/// use ndarray::Array2;
/// use ndlora::{LoraConfig, LoraLayer, SimdLevel};
///
/// let w = Array2::<bf16>::from_elem((64, 96), bf16::from_f32(0.5));
/// let layer = LoraLayer::new(w, LoraConfig { rank: 4, ..Default::default() })?;
/// for n in [1, ndlora::N_SKINNY_HALF, ndlora::N_SKINNY_HALF + 1] {
///     ndlora::reset_gemm_counters();
///     layer.forward(Array2::<bf16>::from_elem((n, 96), bf16::ONE).view())?;
///     let own = ndlora::gemm_counters().skinny_products == 1;
///     assert_eq!(own, n <= ndlora::N_SKINNY_HALF && ndlora::simd_level() != SimdLevel::Scalar);
/// }
/// # Ok::<(), ndlora::LoraError>(())
/// ```
pub const N_SKINNY_HALF: usize = 48;

/// The most LoRA branches one skinny forward folds in (active, unmerged adapters of a
/// [`LoraModel`](crate::LoraModel)); with more, the forward uses the gemm.
pub const MAX_SKINNY_ADAPTERS: usize = 8;

/// Multiply-adds (n·d·k) from which a skinny forward splits W's rows over
/// [`kernel_threads`] threads: below it a thread start (tens of µs) costs more than it saves.
const SKINNY_PARALLEL_MIN_WORK: usize = 1 << 22;

/// One LoRA branch s·(X Aᵀ) Bᵀ of a forward: A (r×k), B (d×r), s. (Public in a private
/// module: it appears in the sealed `Precision` (`float/precision.rs`) hooks.)
#[derive(Clone, Copy)]
pub struct LoraTerm<'a, T> {
    /// A, r×k.
    pub a: ArrayView2<'a, T>,
    /// B, d×r.
    pub b: ArrayView2<'a, T>,
    /// s.
    pub scale: T,
}

/// out ← X Wᵀ + b + Σ s·(X Aᵀ) Bᵀ over `terms` (X n×k, W d×k, b of length d, out n×d in any
/// layout) with ndlora's skinny kernel, if it applies (see [`N_SKINNY`]); returns `false`,
/// with `out` untouched, if not, and the caller runs the gemms. `buffer(len)` supplies the
/// len = n·Σr elements that hold C = s·X Aᵀ per term; it is called only when the kernel
/// runs.
///
/// Each C is this same kernel on A's rows, then scaled by s; a C whose scaling leaves T's
/// normal range (s·h = ±∞ from a finite h: a huge s; or s·h below the smallest normal from
/// non-zero s and h: a tiny s, which keeps few significant bits that a large B would then
/// scale up) declines the kernel, so that the gemm applies s to the finished product.
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn skinny_forward<'b, T>(
    x: ArrayView2<'_, T>,
    w: ArrayView2<'_, T>,
    bias: Option<ArrayView1<'_, T>>,
    terms: &[LoraTerm<'_, T>],
    out: ArrayViewMut2<'_, T>,
    buffer: impl FnOnce(usize) -> &'b mut [T],
) -> bool
where
    T: GemmScalar + DecodeElement + num_traits::Float + 'b,
{
    let ((n, k), d) = (x.dim(), w.nrows());
    let level = simd_level();
    if !skinny_applies(n, N_SKINNY, &x, &w, terms) {
        return false;
    }
    let stride = unaliased_stride::<T>(n, x.strides()[0], k);
    let c_len = buf_len(n, terms);
    // The copy's rows start on cache-line boundaries: one line of slack to align its start.
    let buf = buffer(c_len + stride.map_or(0, |s| n * s + LINE_BYTES / size_of::<T>()));
    let (buf, x_copy) = buf.split_at_mut(c_len);
    let x = match stride {
        Some(s) => copy_rows(x, s, x_copy),
        None => x,
    };
    let base = Segment { w, x };
    let mut segments = [base; 1 + MAX_SKINNY_ADAPTERS];
    if !lora_segments(level, x, terms, buf, &mut segments[1..]) {
        return false;
    }
    let segments = &segments[..1 + terms.len()];
    assert!(skinny_product(
        level,
        segments,
        bias,
        out,
        skinny_threads(n, d, k)
    ));
    count(|c| c.skinny_products += 1);
    true
}

/// The row stride (elements) for a copy of X that the skinny kernel reads without L1 set
/// conflicts, or `None` when X's own rows serve. Rows whose starts lie within one cache line
/// of a multiple of 4 KiB apart (k = 1024, 2048, 4096 … in f32) fall into the same sets of a
/// 4 KiB-way L1; the kernel keeps every row of X's panel and several of W's in L1 at the
/// same column, which is more lines per set than the L1 has ways. The copy is padded to
/// whole cache lines plus one, and starts on a line. Measured (4096², f32, AVX-512, AMD
/// Zen 4, medians of 100 forwards, processes alternated): n = 8 6.9 ms against 7.7 ms and
/// n = 32 17.4 ms against 22.9 ms; it costs one pass over X (n·k elements, ≤ 1 % of the pass
/// over W). Putting W itself on a 64-byte boundary measured within noise (n = 1, 8, 32), so
/// the layer keeps W where the caller allocated it.
pub(crate) fn unaliased_stride<T>(n: usize, row_stride: isize, k: usize) -> Option<usize> {
    const WAY_BYTES: usize = 4096;
    let size = std::mem::size_of::<T>();
    let offset = (row_stride.unsigned_abs() * size) % WAY_BYTES;
    if n < 2 || offset.min(WAY_BYTES - offset) >= LINE_BYTES {
        return None;
    }
    let line = LINE_BYTES / size;
    let stride = k.next_multiple_of(line);
    Some(if (stride * size).is_multiple_of(WAY_BYTES) {
        stride + line
    } else {
        stride
    })
}

/// Bytes per cache line.
const LINE_BYTES: usize = 64;

/// X copied into `buf` with row stride `stride` (≥ X's width, a whole number of cache lines),
/// its first row on a cache-line boundary (so every row is: a vector load never straddles
/// two lines): the view of the copy.
///
/// # Panics
/// If `buf` holds fewer than n·stride elements plus one cache line (an internal bug).
fn copy_rows<'b, T: Copy>(
    x: ArrayView2<'_, T>,
    stride: usize,
    buf: &'b mut [T],
) -> ArrayView2<'b, T> {
    let (n, k) = x.dim();
    let line = LINE_BYTES / size_of::<T>();
    let start = buf.as_ptr().align_offset(LINE_BYTES).min(line);
    let buf = &mut buf[start..];
    for (row, dst) in x.rows().into_iter().zip(buf.chunks_exact_mut(stride)) {
        // A contiguous row is one memcpy; element by element through the iterator cost
        // ~3 cycles an element (22 % of a 96×1024, n = 8 forward on AMD Zen 3).
        match row.as_slice() {
            Some(row) => dst[..k].copy_from_slice(row),
            None => {
                for (d, &v) in dst[..k].iter_mut().zip(row) {
                    *d = v;
                }
            }
        }
    }
    ArrayView2::from_shape((n, k).strides((stride, 1)), &buf[..n * stride])
        .expect("n·stride elements")
}

/// Elements of the buffer that holds every Cⱼ = sⱼ·X Aⱼᵀ: n·Σⱼ rⱼ.
fn buf_len<T>(n: usize, terms: &[LoraTerm<'_, T>]) -> usize {
    n * terms.iter().map(|t| t.a.nrows()).sum::<usize>()
}

/// The threads a skinny product of n×k by d×k runs on: [`kernel_threads`] from
/// `SKINNY_PARALLEL_MIN_WORK` multiply-adds on, else one.
fn skinny_threads(n: usize, d: usize, k: usize) -> usize {
    if n.saturating_mul(d).saturating_mul(k) >= SKINNY_PARALLEL_MIN_WORK {
        kernel_threads()
    } else {
        1
    }
}

/// The segments (Bⱼ, Cⱼ) of the LoRA branches, Cⱼ = sⱼ·X Aⱼᵀ (n×rⱼ) computed by the skinny
/// kernel into `buf` (n·Σr elements), written to the first `terms.len()` of `segments`.
/// Returns `false` when a scaling leaves T's normal range (overflow, or underflow from
/// non-zero s and h), so that the caller's gemm applies s to the finished product instead.
///
/// # Panics
/// If the shapes do not chain, `buf` or `segments` is too short or `level` does not run
/// here (internal bugs: callers check first).
fn lora_segments<'s, 't: 's, T>(
    level: SimdLevel,
    x: ArrayView2<'_, T>,
    terms: &[LoraTerm<'t, T>],
    buf: &'s mut [T],
    segments: &mut [Segment<'s, T>],
) -> bool
where
    T: DecodeElement + num_traits::Float,
{
    let n = x.nrows();
    let mut rest = buf;
    for (term, seg) in terms.iter().zip(segments) {
        let r = term.a.nrows();
        let (c, tail) = std::mem::take(&mut rest).split_at_mut(n * r);
        rest = tail;
        // H = X Aᵀ, then C = s·H.
        let h = ArrayViewMut2::from_shape((n, r), &mut *c).expect("n·r elements");
        assert!(skinny_product(
            level,
            &[Segment {
                w: term.a,
                x: x.view()
            }],
            None,
            h,
            1
        ));
        let s = term.scale;
        for h in c.iter_mut() {
            let v = s * *h;
            // Out of the normal range although the exact product is not (overflow, or an
            // underflow that keeps few or no significant bits, which Bᵀ could scale up).
            if needs_wide_term(s, *h, v) {
                return false;
            }
            *h = v;
        }
        let c: &[T] = c;
        *seg = Segment {
            w: term.b.reborrow(),
            x: ArrayView2::from_shape((n, r), c).expect("n·r elements"),
        };
    }
    true
}

/// Whether a forward of n rows takes the skinny kernel at all: 1 ≤ n ≤ `max_n`, a SIMD
/// level, at most [`MAX_SKINNY_ADAPTERS`] branches, unit column strides.
fn skinny_applies<T, W>(
    n: usize,
    max_n: usize,
    x: &ArrayView2<'_, T>,
    w: &ArrayView2<'_, W>,
    terms: &[LoraTerm<'_, T>],
) -> bool {
    let unit = |cols: usize, strides: &[isize]| cols <= 1 || strides[1] == 1;
    (1..=max_n).contains(&n)
        && simd_level() != SimdLevel::Scalar
        && terms.len() <= MAX_SKINNY_ADAPTERS
        && unit(x.ncols(), x.strides())
        && unit(w.ncols(), w.strides())
        && terms
            .iter()
            .all(|t| unit(t.a.ncols(), t.a.strides()) && unit(t.b.ncols(), t.b.strides()))
}

/// acc ← X f32(W)ᵀ + f32(b) for a half W (X n×k already in f32, acc n×d in any layout)
/// with the skinny kernel, which widens W in registers as it streams it, if it applies
/// (n ≤ [`N_SKINNY_HALF`], a SIMD level with a kernel for this half type, unit column
/// strides); returns `false`, `acc` untouched, if not.
pub(crate) fn skinny_base<W: ProductWeight<f32>>(
    x: ArrayView2<'_, f32>,
    w: ArrayView2<'_, W>,
    bias: Option<ArrayView1<'_, W>>,
    acc: ArrayViewMut2<'_, f32>,
) -> bool {
    let ((n, k), d) = (x.dim(), w.nrows());
    if !skinny_applies(n, N_SKINNY_HALF, &x, &w, &[]) {
        return false;
    }
    let segment = [Segment { w, x }];
    let threads = skinny_threads(n, d, k);
    let done = skinny_product(simd_level(), &segment, bias, acc, threads);
    if done {
        count(|c| c.skinny_products += 1);
    }
    done
}

/// acc ← acc + Σⱼ sⱼ·(X Aⱼᵀ) Bⱼᵀ (f32, X n×k, acc n×d) with the skinny kernel if it applies
/// (n ≤ [`N_SKINNY_HALF`], as [`skinny_base`]): the branches summed in one f32 accumulator
/// per element, then added to acc. Returns `false`, acc untouched, if not. Its working memory
/// (the n×Σr products X Aⱼᵀ and the n×d sum) is taken from `scratch` and `sum`, grown if
/// needed.
pub(crate) fn skinny_add_terms(
    x: ArrayView2<'_, f32>,
    terms: &[LoraTerm<'_, f32>],
    mut acc: ArrayViewMut2<'_, f32>,
    scratch: &mut LoraScratch<f32>,
    sum: &mut Vec<f32>,
) -> bool {
    let (n, d) = (x.nrows(), acc.ncols());
    let Some(first) = terms.first() else {
        return true;
    };
    if !skinny_applies(n, N_SKINNY_HALF, &x, &first.b, terms) {
        return false;
    }
    let level = simd_level();
    let buf = scratch.slice_mut(buf_len(n, terms));
    let mut segments = [Segment {
        w: first.b,
        x: first.b,
    }; MAX_SKINNY_ADAPTERS];
    if !lora_segments(level, x, terms, buf, &mut segments) {
        return false;
    }
    // Every element is written by the product (no bias: Y = Σ products).
    let mut sum = ArrayViewMut2::from_shape((n, d), grown(sum, n * d)).expect("n·d elements");
    let segments = &segments[..terms.len()];
    let r = buf_len(n, terms) / n;
    assert!(skinny_product(
        level,
        segments,
        None,
        sum.view_mut(),
        skinny_threads(n, d, r)
    ));
    acc += &sum;
    true
}

/// out ← X Wᵀ + b + Σ s·(X Aᵀ) Bᵀ for f32/f64 (every operand in one type): the skinny kernel
/// when it applies, else a gemm for X Wᵀ (accumulating onto b) and two thin gemms per term.
pub(crate) fn forward_same<T>(
    x: ArrayView2<'_, T>,
    w: ArrayView2<'_, T>,
    bias: Option<ArrayView1<'_, T>>,
    terms: &[LoraTerm<'_, T>],
    mut out: ArrayViewMut2<'_, T>,
    scratch: Option<&mut LoraScratch<T>>,
) where
    T: GemmScalar + DecodeElement + num_traits::Float,
{
    let (mut scratch, mut owned) = (scratch, Vec::new());
    let buffer = buffer_of(&mut scratch, &mut owned);
    if skinny_forward(x, w, bias, terms, out.view_mut(), buffer) {
        return;
    }
    // X feeds every product: a layout BLAS cannot read is copied once, not per product.
    let x = blas_operand(x);
    // With a bias, out is pre-filled with b and the gemm accumulates onto it (β = 1): the
    // bias costs one pass of writes and no temporary.
    let beta = match bias {
        Some(b) => {
            out.assign(&b);
            T::one()
        }
        None => T::zero(),
    };
    gemm(T::one(), x.view(), w.t(), beta, out.view_mut());
    add_terms_same(x.view(), terms, out, scratch);
}

/// out += Σ s·(X Aᵀ) Bᵀ for f32/f64: two thin gemms per term through an n×r temporary, taken
/// from `scratch` when given (no allocation once it is large enough), else allocated.
pub(crate) fn add_terms_same<T>(
    x: ArrayView2<'_, T>,
    terms: &[LoraTerm<'_, T>],
    mut out: ArrayViewMut2<'_, T>,
    mut scratch: Option<&mut LoraScratch<T>>,
) where
    T: GemmScalar + num_traits::Float,
{
    if terms.is_empty() {
        return;
    }
    let x = blas_operand(x);
    for term in terms {
        let (n, r) = (x.nrows(), term.a.nrows());
        let mut owned;
        let mut h = match scratch.as_deref_mut() {
            Some(scratch) => scratch.view_mut(n, r),
            None => {
                owned = ndarray::Array2::zeros((n, r));
                owned.view_mut()
            }
        };
        gemm(T::one(), x.view(), term.a.t(), T::zero(), h.view_mut());
        gemm(term.scale, h.view(), term.b.t(), T::one(), out.view_mut());
    }
}

/// `v` itself when BLAS can read it in place, else one standard-layout copy (counted), so a
/// caller that uses an operand in several products copies it at most once.
pub(crate) fn blas_operand<T: GemmScalar>(v: ArrayView2<'_, T>) -> CowArray<'_, T, Ix2> {
    #[cfg(ndlora_blas)]
    if blas_layout(v.nrows(), v.ncols(), v.strides()).is_none() {
        count(|c| c.layout_copies += 1);
        return CowArray::from(v.as_standard_layout().into_owned());
    }
    CowArray::from(v)
}

/// C ← α·A·B + β·C. With β = 0, C's old contents (even NaN) are ignored.
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn gemm<T: GemmScalar>(
    alpha: T,
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    beta: T,
    mut c: ArrayViewMut2<'_, T>,
) {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert!(
        k == k2 && c.dim() == (m, n),
        "gemm shapes do not chain: {:?} · {:?} → {:?}",
        a.dim(),
        b.dim(),
        c.dim()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if beta == T::zero() {
            c.fill(T::zero());
        } else {
            c.map_inplace(|v| *v = *v * beta);
        }
        return;
    }
    gemm_nonempty(alpha, a, b, beta, c);
}

#[cfg(ndlora_blas)]
fn gemm_nonempty<T: GemmScalar>(
    alpha: T,
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    beta: T,
    mut c: ArrayViewMut2<'_, T>,
) {
    let (m, k) = a.dim();
    let n = b.dim().1;
    let c_layout = blas_layout(m, n, c.strides());
    let dims_fit = [m, n, k].into_iter().all(fits);
    match c_layout {
        // A column-major C is the row-major Cᵀ = Bᵀ·Aᵀ.
        Some(l) if l.transposed && dims_fit && fits(l.ld) => {
            gemm_nonempty(alpha, b.t(), a.t(), beta, c.reversed_axes())
        }
        Some(l) if dims_fit && fits(l.ld) => {
            let (a, a_layout) = blas_view(a);
            let (b, b_layout) = blas_view(b);
            count(|c| c.blas_calls += 1);
            // Checked by `fits` above.
            let as_i32 = |v: usize| v as i32;
            // SAFETY: every operand is described by `blas_layout` of its own shape and
            // strides: unit stride on one axis, a positive leading dimension ≥ the other
            // extent, and the view keeps the memory alive for the call. All sizes fit in i32.
            // `c` is a unique borrow, so it aliases neither `a` nor `b`.
            unsafe {
                T::cblas_gemm(
                    a_layout.transposed,
                    b_layout.transposed,
                    [as_i32(m), as_i32(n), as_i32(k)],
                    alpha,
                    (a.as_ptr(), as_i32(a_layout.ld)),
                    (b.as_ptr(), as_i32(b_layout.ld)),
                    beta,
                    (c.as_mut_ptr(), as_i32(l.ld)),
                );
            }
        }
        Some(_) => fallback(alpha, a, b, beta, c),
        None => {
            // No BLAS layout for C: compute into a standard-layout copy, then write back.
            count(|c| c.layout_copies += 1);
            let mut tmp = c.as_standard_layout().into_owned();
            gemm_nonempty(alpha, a, b, beta, tmp.view_mut());
            c.assign(&tmp);
        }
    }
}

#[cfg(not(ndlora_blas))]
fn gemm_nonempty<T: GemmScalar>(
    alpha: T,
    a: ArrayView2<'_, T>,
    b: ArrayView2<'_, T>,
    beta: T,
    c: ArrayViewMut2<'_, T>,
) {
    fallback(alpha, a, b, beta, c)
}

/// Whether a size fits BLAS's `int`.
#[cfg(ndlora_blas)]
fn fits(v: usize) -> bool {
    i32::try_from(v).is_ok()
}

/// `v` with its BLAS layout, or a standard-layout copy of it (counted) when it has no layout
/// BLAS can describe with an `int` leading dimension.
#[cfg(ndlora_blas)]
fn blas_view<T: GemmScalar>(v: ArrayView2<'_, T>) -> (CowArray<'_, T, Ix2>, BlasLayout) {
    let (rows, cols) = v.dim();
    match blas_layout(rows, cols, v.strides()) {
        Some(l) if fits(l.ld) => (CowArray::from(v), l),
        _ => {
            count(|c| c.layout_copies += 1);
            let owned = v.as_standard_layout().into_owned();
            let l = blas_layout(rows, cols, owned.strides()).expect("standard layout");
            (CowArray::from(owned), l)
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{s, Array2};

    use super::*;

    #[test]
    fn aliasing_strides_get_a_padded_line_aligned_copy() {
        // f32 rows 4 KiB apart (or within a line of it) are copied; others are not; one row never.
        assert_eq!(unaliased_stride::<f32>(2, 1024, 1024), Some(1040));
        assert_eq!(unaliased_stride::<f32>(2, -2048, 2048), Some(2064));
        assert_eq!(unaliased_stride::<f32>(2, 1029, 1024), Some(1040));
        assert_eq!(unaliased_stride::<f64>(3, 512, 500), Some(504));
        assert_eq!(unaliased_stride::<f32>(2, 1040, 1024), None);
        assert_eq!(unaliased_stride::<f32>(2, 1000, 1000), None);
        assert_eq!(unaliased_stride::<f32>(1, 1024, 1024), None);

        let x = Array2::from_shape_fn((6, 1030), |(i, j)| (i * 1030 + j) as f32);
        for offset in 0..16 {
            let mut buf = vec![f32::NAN; offset + 6 * 1040 + 16];
            let view = copy_rows(x.slice(s![..;-1, ..]), 1040, &mut buf[offset..]);
            assert_eq!(view, x.slice(s![..;-1, ..]));
            for row in view.rows() {
                assert_eq!(row.as_ptr() as usize % LINE_BYTES, 0, "offset {offset}");
            }
        }
        // Rows that are not contiguous slices (every second column, reversed columns) are
        // copied element by element, to the same effect.
        for cols in [s![.., ..;2], s![.., ..;-1]] {
            let strided = x.slice(cols);
            let mut buf = vec![f32::NAN; 6 * 1040 + 16];
            assert_eq!(copy_rows(strided, 1040, &mut buf), strided);
        }
    }
}
