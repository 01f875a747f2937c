//! The skinny product Y = X Wᵀ + b + Σ s·H Bᵀ for a few rows of X (n ≤ a few dozen, n = 1
//! in particular: one token of a decoder), streaming W once.
//!
//! Shapes: W d×k (row-major: unit column stride, any row stride), X n×k (unit column
//! stride), Y n×d (any strides), bias b of length d, and per LoRA branch H = X Aᵀ (n×r,
//! computed by the caller with this same kernel on A's rows), B d×r and a scale s.
//!
//! Why not BLAS: a `?gemm` with M = n small packs and runs a micro-kernel built for large M,
//! and spends 3–5× a single pass over W (OpenBLAS 0.3.21: `sgemm` with M = 1 takes 3× its
//! own `sgemv` on a 4096² W). The product is memory-bound at n = 1 and compute-light up to
//! n of a few dozen, so the floor is one read of W. This kernel:
//!
//! * walks W in blocks of `MR` rows; each block is read once per group of `NX` rows of X,
//!   i.e. once for n ≤ `NX`, and from L1/L2 for the later groups (the caller copies X to a
//!   unit column stride if it lacks one). Per vector step a tile loads `MR` vectors of W and
//!   `NX` vectors of X and runs `MR·NX` independent FMA chains;
//! * forms each output element by **one formula, whatever its place in a tile**: one vector
//!   accumulator over the k/L full vectors in order, a fixed pairwise sum of its lanes,
//!   scalar FMAs over the k mod L tail, then + bᵢ, then per branch one FMA
//!   y ← y + s·(Σₚ Bᵢₚ·Hₘₚ) with the r-term sum in order p = 0..r. So splitting W's rows over
//!   threads (any bands) gives bit-identical results for any thread count, and the tail rows
//!   of W and of X run the same arithmetic as full tiles;
//! * writes each element of Y once (the epilogue adds the bias and the LoRA branch there).
//!
//! The scale s multiplies the finished r-term sum (as a BLAS `?gemm` applies α), never H
//! itself, so a huge s with a zero in B cannot make ∞·0 = NaN.

use ndarray::{ArrayView1, ArrayView2, ArrayViewMut2, Axis};

use super::vector::{Element, Portable, Vector};
use super::SimdLevel;

/// The widest vector (in lanes) the kernel body takes; sizes its lane-sum buffer.
const MAX_LANES: usize = 16;

/// One LoRA branch of a product: the term s·H Bᵀ, with H = X Aᵀ (n×r) and B (d×r), any
/// strides.
#[derive(Clone, Copy)]
pub(crate) struct Branch<'a, T> {
    /// B, d×r.
    pub b: ArrayView2<'a, T>,
    /// H = X Aᵀ, n×r.
    pub h: ArrayView2<'a, T>,
    /// s.
    pub scale: T,
}

/// The inputs of one product: X (n×k) and W (d×k), each with unit column stride (or
/// k ≤ 1), the optional bias (length d) and the branches.
#[derive(Clone, Copy)]
pub(crate) struct Operands<'a, 'b, T> {
    x: ArrayView2<'a, T>,
    w: ArrayView2<'a, T>,
    bias: Option<ArrayView1<'a, T>>,
    branches: &'b [Branch<'a, T>],
}

/// Writes the band Y[.., i0..i0 + y.ncols()] of the product `o`, where `y` is that band.
///
/// # Safety
/// `o`'s X and W have unit column stride or k ≤ 1; the shapes chain (X n×k, W d×k, bias d,
/// each branch's B d×r and H n×r for a common r per branch); `y` is n×c with
/// i0 + c ≤ d; the CPU supports the kernel's instructions.
pub(crate) type ProductFn<T> =
    unsafe fn(o: &Operands<'_, '_, T>, i0: usize, y: ArrayViewMut2<'_, T>);

/// The element types with a skinny-product kernel, and which one runs at each SIMD level.
/// Sealed (lives in a private module); a supertrait of [`LoraFloat`](crate::LoraFloat).
pub trait DecodeElement: Element + std::ops::Add<Output = Self> {
    /// The kernel for `level`, if this build has one (the CPU check is the caller's).
    fn product_kernel(level: SimdLevel) -> Option<ProductFn<Self>>;
}

macro_rules! impl_decode_element {
    ($t:ty, $avx2:ident, $avx512:ident, $neon:ident) => {
        impl DecodeElement for $t {
            fn product_kernel(level: SimdLevel) -> Option<ProductFn<Self>> {
                match level {
                    SimdLevel::Scalar => Some(product_scalar::<$t>),
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx2Fma => Some(super::x86::$avx2),
                    #[cfg(target_arch = "x86_64")]
                    SimdLevel::Avx512F => Some(super::x86::$avx512),
                    #[cfg(target_arch = "aarch64")]
                    SimdLevel::Neon => Some(super::aarch64::$neon),
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
        }
    };
}
impl_decode_element!(f32, product_avx2_f32, product_avx512_f32, product_neon_f32);
impl_decode_element!(f64, product_avx2_f64, product_avx512_f64, product_neon_f64);

/// The portable one-lane kernel: the same formula element by element. Slow without FMA
/// (`mul_add` is then a libm call), so callers prefer BLAS at this level; the tests use it.
///
/// # Safety
/// As [`ProductFn`]; `Portable` needs no CPU feature.
unsafe fn product_scalar<T: DecodeElement>(
    o: &Operands<'_, '_, T>,
    i0: usize,
    y: ArrayViewMut2<'_, T>,
) {
    // SAFETY: forwarded.
    unsafe { product::<Portable<T, 1>, 4, 4>(o, i0, y) }
}

/// Y = X Wᵀ + b + Σ s·H Bᵀ with the kernel at `level`, W's rows split into bands over up
/// to `threads` threads (bit-identical results for any count). Returns `false`, Y
/// untouched, when the kernel does not apply: the level does not run on this CPU, or X or
/// W lacks a unit column stride (a caller copies X, or uses a gemm).
///
/// # Panics
/// If the shapes do not chain (an internal bug: callers validate first).
#[track_caller]
pub(crate) fn skinny_product<'a, T: DecodeElement>(
    level: SimdLevel,
    x: ArrayView2<'a, T>,
    w: ArrayView2<'a, T>,
    bias: Option<ArrayView1<'a, T>>,
    branches: &[Branch<'a, T>],
    y: ArrayViewMut2<'_, T>,
    threads: usize,
) -> bool {
    let ((n, k), d) = (x.dim(), w.nrows());
    assert!(
        w.ncols() == k
            && y.dim() == (n, d)
            && bias.is_none_or(|b| b.len() == d)
            && branches
                .iter()
                .all(|br| br.b.nrows() == d && br.h.nrows() == n && br.b.ncols() == br.h.ncols()),
        "skinny product shapes do not chain: X {:?}, W {:?}, Y {:?}",
        x.dim(),
        w.dim(),
        y.dim()
    );
    let unit = |m: &ArrayView2<'_, T>| m.ncols() <= 1 || m.strides()[1] == 1;
    if !unit(&x) || !unit(&w) || !level.is_available() {
        return false;
    }
    let Some(kernel) = T::product_kernel(level) else {
        return false;
    };
    let o = Operands {
        x,
        w,
        bias,
        branches,
    };
    if n == 0 || d == 0 {
        return true;
    }
    // Bands of whole row blocks (a multiple of every kernel's MR).
    const BAND_ALIGN: usize = 8;
    let band = d
        .div_ceil(threads.clamp(1, d.div_ceil(BAND_ALIGN)))
        .next_multiple_of(BAND_ALIGN);
    if band >= d {
        // SAFETY: checked above: unit column strides, chaining shapes, a level this CPU
        // runs; the band is all of Y (i0 = 0, c = d).
        unsafe { kernel(&o, 0, y) };
        return true;
    }
    std::thread::scope(|scope| {
        let o = &o;
        let (mut y, mut i0) = (y, 0);
        while y.ncols() > band {
            let (part, rest) = y.split_at(Axis(1), band);
            // SAFETY: as above, for columns i0..i0 + band of Y, which no other thread touches.
            scope.spawn(move || unsafe { kernel(o, i0, part) });
            (y, i0) = (rest, i0 + band);
        }
        // SAFETY: as above, for the last band.
        unsafe { kernel(o, i0, y) };
    });
    true
}

/// The kernel body at `MR` rows of W × `NX` rows of X per register tile.
///
/// # Safety
/// As [`ProductFn`], with the CPU supporting `V`'s instructions, `V::LANES ≤ MAX_LANES` and
/// `NX ≤ 8`.
#[inline(always)]
pub(super) unsafe fn product<V: Vector, const MR: usize, const NX: usize>(
    o: &Operands<'_, '_, V::Elem>,
    i0: usize,
    mut y: ArrayViewMut2<'_, V::Elem>,
) where
    V::Elem: DecodeElement,
{
    let out = Out {
        ptr: y.as_mut_ptr(),
        row: y.strides()[0],
        col: y.strides()[1],
        i0,
    };
    let (n, c) = y.dim();
    let mut i = i0;
    while i + MR <= i0 + c {
        // SAFETY: rows i..i + MR ≤ i0 + c ≤ d; the rest forwarded.
        unsafe { rows::<V, MR, NX>(o, out, i, n) };
        i += MR;
    }
    while i < i0 + c {
        // SAFETY: row i < d; the rest forwarded.
        unsafe { rows::<V, 1, NX>(o, out, i, n) };
        i += 1;
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

/// Rows i..i + M of W against all n rows of X: groups of `NX`, then one smaller group.
///
/// # Safety
/// i + M ≤ d and i ≥ out.i0 inside the band; as [`product`].
#[inline(always)]
unsafe fn rows<V: Vector, const M: usize, const NX: usize>(
    o: &Operands<'_, '_, V::Elem>,
    out: Out<V::Elem>,
    i: usize,
    n: usize,
) where
    V::Elem: DecodeElement,
{
    let mut m = 0;
    while m + NX <= n {
        // SAFETY: X rows m..m + NX ≤ n; the rest forwarded.
        unsafe { tile::<V, M, NX>(o, out, i, m) };
        m += NX;
    }
    // SAFETY (each arm): X rows m..n, that many (< NX ≤ 8); the rest forwarded.
    unsafe {
        match n - m {
            0 => {}
            1 => tile::<V, M, 1>(o, out, i, m),
            2 => tile::<V, M, 2>(o, out, i, m),
            3 => tile::<V, M, 3>(o, out, i, m),
            4 => tile::<V, M, 4>(o, out, i, m),
            5 => tile::<V, M, 5>(o, out, i, m),
            6 => tile::<V, M, 6>(o, out, i, m),
            _ => tile::<V, M, 7>(o, out, i, m),
        }
    }
}

/// One register tile: Y[m..m + N, i..i + M].
///
/// # Safety
/// i + M ≤ d inside the band, m + N ≤ n; as [`product`].
#[inline(always)]
unsafe fn tile<V: Vector, const M: usize, const N: usize>(
    o: &Operands<'_, '_, V::Elem>,
    out: Out<V::Elem>,
    i: usize,
    m: usize,
) where
    V::Elem: DecodeElement,
{
    let l = V::LANES;
    let k = o.x.ncols();
    let (w_row, x_row) = (o.w.strides()[0], o.x.strides()[0]);
    // SAFETY (the block): rows i + a < d of W and m + q < n of X exist, so these offsets
    // stay inside the views; columns j < k are read with unit stride (the contract), and
    // every vector load covers j..j + l ≤ k. The CPU supports `V` (the contract).
    unsafe {
        let w: [*const V::Elem; M] =
            std::array::from_fn(|a| o.w.as_ptr().offset((i + a) as isize * w_row));
        let x: [*const V::Elem; N] =
            std::array::from_fn(|q| o.x.as_ptr().offset((m + q) as isize * x_row));
        let mut acc = [[V::zero(); N]; M];
        let mut j = 0;
        while j + l <= k {
            let xv: [V; N] = std::array::from_fn(|q| V::load(x[q].add(j)));
            for (acc, w) in acc.iter_mut().zip(&w) {
                let wv = V::load(w.add(j));
                for (acc, xv) in acc.iter_mut().zip(&xv) {
                    *acc = acc.mul_add(wv, *xv);
                }
            }
            j += l;
        }
        for (a, (acc, w)) in acc.iter().zip(&w).enumerate() {
            for (q, (acc, x)) in acc.iter().zip(&x).enumerate() {
                let mut s = lane_sum(*acc);
                for j in j..k {
                    s = s.fused_add(*w.add(j), *x.add(j));
                }
                let v = epilogue(o, s, i + a, m + q);
                let at = (m + q) as isize * out.row + (i + a - out.i0) as isize * out.col;
                *out.ptr.offset(at) = v;
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

/// y = s + bᵢ, then per branch y ← y + s_br·(Σₚ Bᵢₚ·Hₘₚ).
///
/// # Safety
/// i < d, m < n (inside the views).
#[inline(always)]
unsafe fn epilogue<T: DecodeElement>(o: &Operands<'_, '_, T>, dot: T, i: usize, m: usize) -> T {
    let mut y = match &o.bias {
        // SAFETY: i < d = the bias length.
        Some(b) => dot + unsafe { *b.uget(i) },
        None => dot,
    };
    for br in o.branches {
        let (bp, hp) = (br.b.as_ptr(), br.h.as_ptr());
        let (b_row, b_col) = (br.b.strides()[0], br.b.strides()[1]);
        let h_col = br.h.strides()[1];
        // SAFETY: row i < d of B and row m < n of H exist; p < r columns of each.
        let (b_i, h_m) = unsafe {
            (
                bp.offset(i as isize * b_row),
                hp.offset(m as isize * br.h.strides()[0]),
            )
        };
        let r = br.b.ncols();
        let mut t = T::ZERO;
        for p in 0..r as isize {
            // SAFETY: p < r.
            t = t.fused_add(unsafe { *b_i.offset(p * b_col) }, unsafe {
                *h_m.offset(p * h_col)
            });
        }
        y = y.fused_add(br.scale, t);
    }
    y
}

#[cfg(test)]
mod tests {
    use ndarray::{s, Array1, Array2, ShapeBuilder};

    use super::*;

    fn pattern<T: From<f32>>(rows: usize, cols: usize, seed: f32) -> Array2<T> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            T::from((((i * cols + j) as f32 + seed) * 0.754_877_7).fract() - 0.5)
        })
    }

    /// One product's operands, owned, in standard layout.
    struct Case<T> {
        x: Array2<T>,
        w: Array2<T>,
        bias: Option<Array1<T>>,
        /// (B, H, s) per branch.
        branches: Vec<(Array2<T>, Array2<T>, T)>,
    }

    impl<T: DecodeElement + From<f32>> Case<T> {
        fn new(d: usize, k: usize, n: usize, bias: bool, ranks: &[usize]) -> Self {
            Case {
                x: pattern(n, k, 1.0),
                w: pattern(d, k, 2.0),
                bias: bias.then(|| pattern(1, d, 3.0).remove_axis(ndarray::Axis(0))),
                branches: ranks
                    .iter()
                    .enumerate()
                    .map(|(q, &r)| {
                        let seed = 4.0 + q as f32;
                        (
                            pattern(d, r, seed),
                            pattern(n, r, seed + 0.5),
                            T::from(-1.75),
                        )
                    })
                    .collect(),
            }
        }
    }

    /// The product in f64 and, per element, the sum of the magnitudes of its terms (which
    /// scales the rounding error bound).
    fn reference<T: Into<f64> + Copy>(c: &Case<T>) -> (Array2<f64>, Array2<f64>) {
        let f = |v: &T| -> f64 { (*v).into() };
        let (n, d) = (c.x.nrows(), c.w.nrows());
        let mut value = Array2::zeros((n, d));
        let mut size = Array2::zeros((n, d));
        for ((m, i), v) in value.indexed_iter_mut() {
            let mut mag = 0.0;
            let mut sum = 0.0;
            for (x, w) in c.x.row(m).iter().zip(c.w.row(i)) {
                sum += f(x) * f(w);
                mag += (f(x) * f(w)).abs();
            }
            if let Some(b) = &c.bias {
                sum += f(&b[i]);
                mag += f(&b[i]).abs();
            }
            for (b, h, s) in &c.branches {
                let t: f64 = b
                    .row(i)
                    .iter()
                    .zip(h.row(m))
                    .map(|(b, h)| f(b) * f(h))
                    .sum();
                let t_mag: f64 = b
                    .row(i)
                    .iter()
                    .zip(h.row(m))
                    .map(|(b, h)| (f(b) * f(h)).abs())
                    .sum();
                sum += f(s) * t;
                mag += f(s).abs() * t_mag;
            }
            *v = sum;
            size[[m, i]] = mag;
        }
        (value, size)
    }

    /// Memory layouts of the operands: X and W 0 standard, 1 a sub-view of a wider array
    /// (row stride > k), 2 rows reversed (negative row stride); Y 0 standard, 1 column-major,
    /// 2 a sub-view inside a NaN-filled array (the padding is checked untouched), 3 both axes
    /// reversed. `factors_f`: B and H column-major.
    #[derive(Clone, Copy, Debug)]
    struct Layout {
        x: usize,
        w: usize,
        y: usize,
        factors_f: bool,
    }

    fn place<T: Copy + From<f32>>(a: &Array2<T>, layout: usize) -> Array2<T> {
        // Returns the backing array; `view_of` finds the operand inside it.
        let (r, c) = a.dim();
        match layout {
            0 => a.clone(),
            1 => {
                let mut wide = Array2::from_elem((r, c + 3), T::from(f32::NAN));
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

    fn f_order<T: Copy + DecodeElement>(a: &Array2<T>) -> Array2<T> {
        let mut f = Array2::from_elem(a.dim().f(), T::ZERO);
        f.assign(a);
        f
    }

    /// Runs `kernel` directly on the bands of W's rows that start at `cuts` (and 0), with
    /// the operands laid out per `layout`; returns Y in standard layout.
    fn run<T: DecodeElement + From<f32> + Into<f64>>(
        kernel: ProductFn<T>,
        c: &Case<T>,
        layout: Layout,
        cuts: &[usize],
    ) -> Array2<T> {
        let ((n, k), d) = (c.x.dim(), c.w.nrows());
        let (xb, wb) = (place(&c.x, layout.x), place(&c.w, layout.w));
        let factors: Vec<_> = c
            .branches
            .iter()
            .map(|(b, h, s)| {
                if layout.factors_f {
                    (f_order(b), f_order(h), *s)
                } else {
                    (b.clone(), h.clone(), *s)
                }
            })
            .collect();
        let branches: Vec<_> = factors
            .iter()
            .map(|(b, h, s)| Branch {
                b: b.view(),
                h: h.view(),
                scale: *s,
            })
            .collect();
        let o = Operands {
            x: view_of(&xb, layout.x, k),
            w: view_of(&wb, layout.w, k),
            bias: c.bias.as_ref().map(|b| b.view()),
            branches: &branches,
        };
        let nan = T::from(f32::NAN);
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
                // SAFETY: the kernels passed here run on this host; unit column strides for
                // X and W (every layout above); shapes chain; the band lies inside Y.
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
    fn kernels<T: DecodeElement>(
        extra: &[(&'static str, ProductFn<T>)],
    ) -> Vec<(&'static str, ProductFn<T>)> {
        let mut out: Vec<_> = SimdLevel::ALL
            .into_iter()
            .filter(|l| l.is_available())
            .filter_map(|l| T::product_kernel(l).map(|k| (l.as_str(), k)))
            .collect();
        out.extend_from_slice(extra);
        out
    }

    /// The body at width `L` with tiles of `MR × NX`, needing no CPU feature.
    ///
    /// # Safety
    /// As [`ProductFn`].
    unsafe fn portable<T: DecodeElement, const L: usize, const MR: usize, const NX: usize>(
        o: &Operands<'_, '_, T>,
        i0: usize,
        y: ArrayViewMut2<'_, T>,
    ) {
        // SAFETY: forwarded; `Portable` needs no CPU feature.
        unsafe { product::<Portable<T, L>, MR, NX>(o, i0, y) }
    }

    fn check_all<T>(extra: &[(&'static str, ProductFn<T>)], same_formula: &[ProductFn<T>], eps: f64)
    where
        T: DecodeElement + From<f32> + Into<f64>,
    {
        let all = kernels::<T>(extra);
        let names: Vec<_> = all.iter().map(|k| k.0).collect();
        println!("kernels tested: {names:?}");
        let mut case_no = 0usize;
        for d in [1, 7, 33, 257] {
            for k in [0, 1, 7, 33, 257] {
                for n in (1..=10).chain([17, 33]) {
                    case_no += 1;
                    let bias = case_no % 2 == 0;
                    let ranks: &[usize] = match case_no % 3 {
                        0 => &[],
                        1 => &[3],
                        _ => &[1, 16],
                    };
                    let c = Case::<T>::new(d, k, n, bias, ranks);
                    let (want, size) = reference(&c);
                    let plain = Layout {
                        x: 0,
                        w: 0,
                        y: 0,
                        factors_f: false,
                    };
                    let r_sum: usize = ranks.iter().sum();
                    for &(name, kernel) in &all {
                        let base = run(kernel, &c, plain, &[]);
                        let ctx = format!("{name} d{d} k{k} n{n} bias {bias} ranks {ranks:?}");
                        for ((idx, g), (want, size)) in
                            base.indexed_iter().zip(want.iter().zip(&size))
                        {
                            let g: f64 = (*g).into();
                            let bound = eps * (k + r_sum + 2) as f64 * (size + f64::MIN_POSITIVE);
                            assert!((g - want).abs() <= bound, "{ctx} {idx:?}: {g} vs {want}");
                        }
                        // Other layouts and row splits: bit for bit the same.
                        let layout = Layout {
                            x: case_no % 3,
                            w: (case_no / 3) % 3,
                            y: case_no % 4,
                            factors_f: case_no % 5 < 2,
                        };
                        for cuts in [&[1, 5, 13][..], &[4, 8, 16, 32, 64], &[3, 200]] {
                            let got = run(kernel, &c, layout, cuts);
                            assert!(
                                got.iter().zip(&base).all(|(a, b)| bits(*a) == bits(*b)),
                                "{ctx} {layout:?} cuts {cuts:?}: not bit-identical to one band in standard layout"
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
        }
    }

    /// The bits of `v` widened to f64 (exact, so equal bits ⇔ equal bits in `T`).
    fn bits<T: Into<f64>>(v: T) -> u64 {
        v.into().to_bits()
    }

    #[cfg(target_arch = "x86_64")]
    fn wide_f32() -> Vec<(&'static str, ProductFn<f32>)> {
        if SimdLevel::Avx2Fma.is_available() {
            vec![(
                "width 16 on avx2",
                super::super::x86::product_width16_on_avx2_f32,
            )]
        } else {
            vec![("portable 16", portable::<f32, 16, 4, 4>)]
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
            vec![("portable 8", portable::<f64, 8, 4, 4>)]
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn wide_f32() -> Vec<(&'static str, ProductFn<f32>)> {
        vec![("portable 16", portable::<f32, 16, 4, 4>)]
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn wide_f64() -> Vec<(&'static str, ProductFn<f64>)> {
        vec![("portable 8", portable::<f64, 8, 4, 4>)]
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_and_is_split_invariant_f32() {
        let mut extra = wide_f32();
        extra.push(("portable 4", portable::<f32, 4, 4, 4>));
        check_all::<f32>(
            &extra,
            &[
                portable::<f32, 4, 4, 4>,
                portable::<f32, 4, 1, 1>,
                portable::<f32, 4, 3, 5>,
                portable::<f32, 4, 6, 8>,
            ],
            f32::EPSILON as f64,
        );
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_and_is_split_invariant_f64() {
        let mut extra = wide_f64();
        extra.push(("portable 2", portable::<f64, 2, 4, 4>));
        check_all::<f64>(
            &extra,
            &[
                portable::<f64, 2, 4, 4>,
                portable::<f64, 2, 1, 1>,
                portable::<f64, 2, 5, 3>,
            ],
            f64::EPSILON,
        );
    }
}
