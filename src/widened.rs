//! The half-precision paths (`bf16`, `f16` layers): W, X and Y are half, the factors f32, and
//! every product accumulates in f32. The rounding follows PyTorch + PEFT on CPU:
//!
//! * forward: Y = H( f32(H(X Wᵀ + b)) + Σ s·(f32(X) Aᵀ) Bᵀ ) — the base output is rounded to
//!   the half type H first, the LoRA terms are added in f32, and the sum is rounded again;
//! * merge update: W ← H( f32(W) + α·(B A) ), ΔW formed in f32, one rounding into H.
//!
//! Up to [`N_SKINNY_HALF`](crate::N_SKINNY_HALF) rows the base product runs ndlora's skinny
//! kernel, which reads the half W directly and widens it in registers, and the LoRA terms
//! the f32 skinny kernel. Above it the base product widens W one panel of rows at a time
//! into an f32 buffer and multiplies it with BLAS `sgemm` (there is no half gemm in the BLAS
//! ndlora links), so no d×k f32 copy of W is ever made. The merge update runs the fused
//! kernel on the half W in place (`simd::rank_update`), else a banded gemm.

use ndarray::{s, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, ShapeBuilder, Zip};

use std::cell::RefCell;

use half::{bf16, f16};

use crate::matmul::{
    add_terms_same, gemm, skinny_add_terms, skinny_base, unaliased_stride, LoraTerm,
};
use crate::scratch::{grown, LoraScratch};
use crate::simd::convert::{round_slice, widen_slice, ConvertWeight};
use crate::simd::decode::ProductWeight;
use crate::simd::rank_update::UpdateWeight;
use crate::update::{rank_update_with, rank_update_with_from};

/// f32 elements per cache line.
const LINE_ELEMENTS: usize = 16;

/// f32 elements of W widened per panel of the base product (4 MiB): small enough to stay
/// in the outer caches between its widening and the `sgemm` that packs it. Measured
/// (4096², n = 256, bf16): 256-column panels (4 MiB) 1.07×, 384 (6 MiB) 1.08–1.09×,
/// 512 (8 MiB) 1.11× the f32 forward.
const PANEL_ELEMENTS: usize = 1 << 20;

/// Rows of W per block of the base product: a panel is these rows × as many columns as
/// fit [`PANEL_ELEMENTS`]. Each `sgemm` call packs the part of X its columns take, so
/// across a block every element of X is packed once; the rows are bounded so that a panel
/// keeps at least [`PANEL_MIN_COLUMNS`] columns even for a tall W (an embedding-sized
/// output layer).
const PANEL_ROWS: usize = 4096;

/// The fewest columns of W per panel: shorter sums per `sgemm` call leave its kernel
/// little to do per packed block.
const PANEL_MIN_COLUMNS: usize = 256;

/// `bf16` or `f16`: a half type with its exact widening to f32 and rounding from it
/// ([`Stored`](crate::simd::vector::Stored)) and the kernels that read it (skinny product,
/// merge update, conversions).
pub trait HalfElement: ProductWeight<f32> + UpdateWeight<f32> + ConvertWeight {}

impl HalfElement for bf16 {}
impl HalfElement for f16 {}

/// `x` widened to f32, in standard layout.
pub(crate) fn widen<H: HalfElement>(x: ArrayView2<'_, H>) -> Array2<f32> {
    let mut wide = Array2::zeros(x.dim());
    widen_into(x, wide.view_mut());
    wide
}

/// dst ← f32(src), row by row: the conversion kernel on rows with unit stride, else
/// element by element.
fn widen_into<H: HalfElement>(src: ArrayView2<'_, H>, mut dst: ArrayViewMut2<'_, f32>) {
    for (s, mut d) in src.rows().into_iter().zip(dst.rows_mut()) {
        match (s.as_slice(), d.as_slice_mut()) {
            (Some(s), Some(d)) => widen_slice(s, d),
            _ => Zip::from(d).and(s).for_each(|o, &v| *o = v.widen()),
        }
    }
}

/// out ← H(`acc`), row by row as [`widen_into`] (out in any layout).
fn round_into<H: HalfElement>(acc: ArrayView2<'_, f32>, mut out: ArrayViewMut2<'_, H>) {
    for (s, mut d) in acc.rows().into_iter().zip(out.rows_mut()) {
        match (s.as_slice(), d.as_slice_mut()) {
            (Some(s), Some(d)) => round_slice(s, d),
            _ => Zip::from(d).and(s).for_each(|o, &v| *o = H::narrow(v)),
        }
    }
}

/// acc ← f32(H(acc)) (acc in standard layout): PEFT's rounding of the base output.
fn round_in_place<H: HalfElement>(mut acc: ArrayViewMut2<'_, f32>) {
    // Through a small buffer on the stack: no allocation.
    let mut rounded = [H::narrow(0.0); 256];
    for mut a in acc.rows_mut() {
        for a in a
            .as_slice_mut()
            .expect("standard layout")
            .chunks_mut(rounded.len())
        {
            let rounded = &mut rounded[..a.len()];
            round_slice(a, rounded);
            widen_slice(rounded, a);
        }
    }
}

/// Elements (f32) of working memory a thread keeps between half-precision forwards called
/// without a scratch (16 MiB: X, accumulator and a panel for n = 256 at d = k = 4096); a
/// forward that needed more frees it afterwards.
const RETAINED_WORKSPACE: usize = 1 << 22;

thread_local! {
    /// The working memory of half-precision forwards called without a scratch: fresh
    /// multi-MiB buffers on every call cost page faults (measured: ~5 % of a 256-row forward
    /// at d = k = 4096).
    static WORKSPACE: RefCell<LoraScratch<f32>> = RefCell::new(LoraScratch::new());
}

/// out ← H( f32(H(X Wᵀ + b)) + Σ s·(X Aᵀ) Bᵀ ), the f32 working memory taken from
/// `scratch`, else from this thread's [`WORKSPACE`].
pub(crate) fn forward<H: HalfElement>(
    x: ArrayView2<'_, H>,
    w: ArrayView2<'_, H>,
    bias: Option<ArrayView1<'_, H>>,
    terms: &[LoraTerm<'_, f32>],
    out: ArrayViewMut2<'_, H>,
    scratch: Option<&mut LoraScratch<f32>>,
) {
    if out.is_empty() {
        return;
    }
    if let Some(scratch) = scratch {
        return forward_in(x, w, bias, terms, out, scratch);
    }
    WORKSPACE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut workspace) => {
            forward_in(x, w, bias, terms, out, &mut workspace);
            if workspace.retained() > RETAINED_WORKSPACE {
                *workspace = LoraScratch::new();
            }
        }
        // In use further up this thread's stack (not a path ndlora takes): fresh memory.
        Err(_) => forward_in(x, w, bias, terms, out, &mut LoraScratch::new()),
    });
}

/// [`forward`] with its working memory in `scratch`.
fn forward_in<H: HalfElement>(
    x: ArrayView2<'_, H>,
    w: ArrayView2<'_, H>,
    bias: Option<ArrayView1<'_, H>>,
    terms: &[LoraTerm<'_, f32>],
    out: ArrayViewMut2<'_, H>,
    scratch: &mut LoraScratch<f32>,
) {
    let ((n, k), d) = (x.dim(), out.ncols());
    let (mut wide, mut panel) = scratch.take_wide();
    {
        // X widened with rows that do not share L1 sets, from a cache line on (as the f32
        // skinny forward copies X): see `matmul::unaliased_stride`.
        let stride = unaliased_stride::<f32>(n, k as isize, k).unwrap_or(k);
        let x_len = n * stride + LINE_ELEMENTS;
        let (xs, accs) = grown(&mut wide, x_len + n * d).split_at_mut(x_len);
        let start = xs.as_ptr().align_offset(64).min(LINE_ELEMENTS);
        let xs = &mut xs[start..start + (n - 1) * stride + k];
        let mut xf = ArrayViewMut2::from_shape((n, k).strides((stride, 1)), xs)
            .expect("rows of k elements, stride apart");
        widen_into(x, xf.view_mut());
        let xf = xf.view();
        // Every element of acc is written by the base product (β = 0, or the bias first).
        let mut acc = ArrayViewMut2::from_shape((n, d), accs).expect("n·d elements");
        if !skinny_base(xf, w, bias, acc.view_mut()) {
            base_product(xf, w, bias, acc.view_mut(), &mut panel);
        }
        if !terms.is_empty() {
            // PEFT rounds the base layer's output to H before it adds the LoRA terms in f32.
            round_in_place::<H>(acc.view_mut());
            // The skinny branch sums into the panel's buffer: the base product is done with it.
            if !skinny_add_terms(xf, terms, acc.view_mut(), scratch, &mut panel) {
                add_terms_same(xf, terms, acc.view_mut(), Some(&mut *scratch));
            }
        }
        round_into(acc.view(), out);
    }
    scratch.put_wide((wide, panel));
}

/// out ← H( f32(out) + Σ s·(X Aᵀ) Bᵀ ), X already in f32.
pub(crate) fn add_terms<H: HalfElement>(
    x: ArrayView2<'_, f32>,
    terms: &[LoraTerm<'_, f32>],
    mut out: ArrayViewMut2<'_, H>,
    scratch: Option<&mut LoraScratch<f32>>,
) {
    if terms.is_empty() || out.is_empty() {
        return;
    }
    let mut acc = widen(out.view());
    add_terms_same(x, terms, acc.view_mut(), scratch);
    round_into(acc.view(), out.view_mut());
}

/// acc ← X f32(W)ᵀ + f32(b) in f32 (acc n×d, X n×k in f32, W d×k in H): W widened one panel
/// at a time — a block of up to [`PANEL_ROWS`] rows, a slice of its columns — each panel
/// one `sgemm` adding X's matching columns times it into the block's columns of acc.
/// Slicing along k rather than cutting W into panels of whole rows packs each element of X
/// once per block instead of once per panel. Measured (4096², bf16, one AVX-512 thread,
/// Intel Xeon; best of 20 calls, alternating): n = 256 took 1.07× the f32 forward, against
/// 1.14–1.15× with panels of 256 whole rows; n = 128, 512, 1024: 1.13, 1.03, 1.13× against
/// 1.17, 1.16, 1.25×; n = 64–96 the same either way.
fn base_product<H: HalfElement>(
    x: ArrayView2<'_, f32>,
    w: ArrayView2<'_, H>,
    bias: Option<ArrayView1<'_, H>>,
    mut acc: ArrayViewMut2<'_, f32>,
    panel: &mut Vec<f32>,
) {
    let (d, k) = w.dim();
    let first_beta = match bias {
        Some(b) => {
            Zip::from(acc.rows_mut())
                .for_each(|mut row| Zip::from(&mut row).and(&b).for_each(|o, &v| *o = v.widen()));
            1.0
        }
        None => 0.0,
    };
    if k == 0 {
        if bias.is_none() {
            acc.fill(0.0);
        }
        return;
    }
    let rows = d.clamp(1, PANEL_ROWS);
    let cols = (PANEL_ELEMENTS / rows)
        .max(PANEL_MIN_COLUMNS)
        .next_multiple_of(LINE_ELEMENTS)
        .min(k);
    let buffer = grown(panel, rows * cols);
    let mut start = 0;
    for w in w.axis_chunks_iter(Axis(0), rows) {
        let block = start..start + w.nrows();
        let mut beta = first_beta;
        let mut j = 0;
        while j < k {
            let end = (j + cols).min(k);
            let mut p = ArrayViewMut2::from_shape((w.nrows(), end - j), &mut buffer[..])
                .expect("a panel fits the buffer");
            widen_into(w.slice(s![.., j..end]), p.view_mut());
            gemm(
                1.0,
                x.slice(s![.., j..end]),
                p.t(),
                beta,
                acc.slice_mut(s![.., block.clone()]),
            );
            beta = 1.0;
            j = end;
        }
        start = block.end;
    }
}

/// W ← H( f32(W) + fl(α·B A) ): the fused kernel (`simd::rank_update`) where it applies,
/// which widens W in registers and rounds each element once as it stores it (no
/// temporary); otherwise α·B A formed in f32 by `sgemm`, one band of rows at a time into a
/// small temporary, then added to each element of W with one rounding into H. Either way
/// ΔW = fl(α·acc) is rounded to f32 before the sum, as PEFT forms it.
pub(crate) fn rank_update<H: HalfElement + UpdateWeight<f32>>(
    alpha: f32,
    b: ArrayView2<'_, f32>,
    a: ArrayView2<'_, f32>,
    w: ArrayViewMut2<'_, H>,
) {
    rank_update_with(alpha, b, a, w, |w, t| H::narrow(w.widen() + t))
}

/// [`rank_update`] out of place: W ← H( f32(W₀) + fl(α·B A) ) with W₀ read from `src`.
pub(crate) fn rank_update_from<H: HalfElement + UpdateWeight<f32>>(
    alpha: f32,
    b: ArrayView2<'_, f32>,
    a: ArrayView2<'_, f32>,
    src: ArrayView2<'_, H>,
    w: ArrayViewMut2<'_, H>,
) {
    rank_update_with_from(alpha, b, a, src, w, |w, t| H::narrow(w.widen() + t))
}
