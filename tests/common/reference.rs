//! The LoRA layer in f64 by plain loops, and the tolerance check against it.

use ndarray::{Array2, ArrayView2};
use ndlora::{LoraFloat, LoraLayer};

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
    pub fn new<A: LoraFloat>(layer: &LoraLayer<A>) -> Self {
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
