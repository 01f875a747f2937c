//! Reference implementation (f64 accumulation), random data with fixed seeds, array layouts,
//! and tolerance checks shared by the integration tests.
#![allow(dead_code)]

use ndarray::{s, Array2, ArrayView2, ShapeBuilder};
use ndlora::LoraFloat;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A deterministic generator for test data.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// rows×cols uniform in [-1, 1).
pub fn random<A: LoraFloat>(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<A> {
    Array2::from_shape_simple_fn((rows, cols), || {
        A::from_f64_lossy(rng.random_range(-1.0..1.0))
    })
}

pub fn to_f64<A: LoraFloat>(m: ArrayView2<'_, A>) -> Array2<f64> {
    m.mapv(|v| v.into_f64())
}

/// a·bᵀ with f64 accumulation, by plain loops.
pub fn matmul_t(a: &Array2<f64>, b: &Array2<f64>) -> Array2<f64> {
    assert_eq!(a.ncols(), b.ncols());
    let mut c = Array2::zeros((a.nrows(), b.nrows()));
    for i in 0..a.nrows() {
        for j in 0..b.nrows() {
            let mut acc = 0.0;
            for l in 0..a.ncols() {
                acc += a[[i, l]] * b[[j, l]];
            }
            c[[i, j]] = acc;
        }
    }
    c
}

/// The LoRA parts in f64.
pub struct Ref {
    pub w: Array2<f64>,
    pub a: Array2<f64>,
    pub b: Array2<f64>,
    pub s: f64,
}

impl Ref {
    pub fn new<A: LoraFloat>(layer: &ndlora::LoraLayer<A>) -> Self {
        Self {
            w: to_f64(layer.base_weight()),
            a: to_f64(layer.weight_a()),
            b: to_f64(layer.weight_b()),
            s: layer.scaling(),
        }
    }

    /// Y = X Wᵀ + s·(X Aᵀ) Bᵀ.
    pub fn forward(&self, x: &Array2<f64>) -> Array2<f64> {
        let xa = matmul_t(x, &self.a);
        matmul_t(x, &self.w) + self.s * matmul_t(&xa, &self.b)
    }

    /// The same with every entry replaced by its magnitude: the scale of the rounding error.
    pub fn forward_magnitude(&self, x: &Array2<f64>) -> Array2<f64> {
        let abs = |m: &Array2<f64>| m.mapv(f64::abs);
        let xa = matmul_t(&abs(x), &abs(&self.a));
        matmul_t(&abs(x), &abs(&self.w)) + self.s.abs() * matmul_t(&xa, &abs(&self.b))
    }

    /// s·B A.
    pub fn delta(&self) -> Array2<f64> {
        self.s * matmul_t(&self.b, &self.a.t().to_owned())
    }

    /// |s|·|B| |A|.
    pub fn delta_magnitude(&self) -> Array2<f64> {
        self.s.abs() * matmul_t(&self.b.mapv(f64::abs), &self.a.t().mapv(f64::abs))
    }
}

/// Asserts |got − expected| ≤ tol_factor·ε·magnitude + tiny elementwise, naming the first miss.
#[track_caller]
pub fn assert_close<A: LoraFloat>(
    got: ArrayView2<'_, A>,
    expected: &Array2<f64>,
    magnitude: &Array2<f64>,
    tol_factor: f64,
    context: &str,
) {
    assert_eq!(got.dim(), expected.dim(), "{context}: shape");
    let eps = A::epsilon().into_f64();
    for ((idx, g), (e, m)) in got
        .indexed_iter()
        .zip(expected.iter().zip(magnitude.iter()))
    {
        let g = g.into_f64();
        let tol = tol_factor * eps * m + 1e-30;
        assert!(
            (g - e).abs() <= tol,
            "{context}: at {idx:?} got {g:e}, expected {e:e} (|diff| {:e} > tol {tol:e})",
            (g - e).abs()
        );
    }
}

/// Input layouts every forward must accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    C,
    F,
    /// Every other row of a larger C array: leading dimension > width.
    RowStrided,
    /// Every other column: no BLAS layout, must be copied.
    ColStrided,
    /// Rows in reverse order: negative stride.
    Reversed,
}

pub const LAYOUTS: [Layout; 5] = [
    Layout::C,
    Layout::F,
    Layout::RowStrided,
    Layout::ColStrided,
    Layout::Reversed,
];

/// Stores `m` in `layout`; the returned view has the same values as `m`.
pub struct Laid<A> {
    storage: Array2<A>,
    layout: Layout,
}

impl<A: LoraFloat> Laid<A> {
    pub fn new(m: &Array2<A>, layout: Layout) -> Self {
        let (r, c) = m.dim();
        let storage = match layout {
            Layout::C => m.as_standard_layout().into_owned(),
            Layout::F => {
                let mut f = Array2::zeros((r, c).f());
                f.assign(m);
                f
            }
            Layout::RowStrided => {
                let mut big = Array2::from_elem((2 * r, c + 3), A::nan());
                big.slice_mut(s![..;2, 1..c + 1]).assign(m);
                big
            }
            Layout::ColStrided => {
                let mut big = Array2::from_elem((r, 2 * c), A::nan());
                big.slice_mut(s![.., ..;2]).assign(m);
                big
            }
            Layout::Reversed => {
                let mut rev = m.to_owned();
                rev.invert_axis(ndarray::Axis(0));
                rev.as_standard_layout().into_owned()
            }
        };
        Self { storage, layout }
    }

    pub fn view(&self) -> ArrayView2<'_, A> {
        let c = self.storage.ncols();
        match self.layout {
            Layout::C | Layout::F => self.storage.view(),
            Layout::RowStrided => self.storage.slice(s![..;2, 1..c - 2]),
            Layout::ColStrided => self.storage.slice(s![.., ..;2]),
            Layout::Reversed => self.storage.slice(s![..;-1, ..]),
        }
    }
}

/// A layer with random W, A, B (B ≠ 0) and α = 3 ≠ r, so scaling must touch only the LoRA
/// branch.
pub fn random_layer<A: LoraFloat>(d: usize, k: usize, r: usize, seed: u64) -> ndlora::LoraLayer<A> {
    let mut g = rng(seed);
    let config = ndlora::LoraConfig {
        rank: r,
        alpha: 3.0,
        ..Default::default()
    };
    ndlora::LoraLayer::from_parts(
        random(&mut g, d, k),
        random(&mut g, r, k),
        random(&mut g, d, r),
        config,
    )
    .unwrap()
}
