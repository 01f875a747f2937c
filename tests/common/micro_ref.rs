//! A slow, obviously correct f64 model of `MicroLora` (forward, objective, gradient), f32
//! data helpers (seed them with [`super::rng`]), and the tolerance check against the model.

use ndarray::Array2;
use ndlora::MicroLora;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// `len` values uniform in [-1, 1).
pub fn random_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// rows×cols uniform in [-scale, scale).
pub fn random_mat(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || scale * rng.random_range(-1.0..1.0))
}

/// The adapter's parameters in f64.
#[derive(Debug, Clone)]
pub struct RefLora {
    pub down: Array2<f64>,
    pub up: Array2<f64>,
    pub scale: f64,
}

impl RefLora {
    pub fn of(lora: &MicroLora) -> Self {
        let (down, up) = lora.get_weights();
        Self {
            down: down.mapv(f64::from),
            up: up.mapv(f64::from),
            scale: f64::from(lora.scale()),
        }
    }

    pub fn rank(&self) -> usize {
        self.down.nrows()
    }

    /// h = D x.
    pub fn hidden(&self, x: &[f32]) -> Vec<f64> {
        (0..self.rank())
            .map(|j| {
                let mut acc = 0.0;
                for (k, &xk) in x.iter().enumerate() {
                    acc += self.down[[j, k]] * f64::from(xk);
                }
                acc
            })
            .collect()
    }

    /// (y₀ + s·Uᵀ D x, a bound on the sum of |terms|) per output element: the bound scales the
    /// tolerance for an f32 result.
    pub fn forward(&self, x: &[f32], y0: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let h = self.hidden(x);
        let h_abs: Vec<f64> = (0..self.rank())
            .map(|j| {
                x.iter()
                    .enumerate()
                    .map(|(k, &xk)| (self.down[[j, k]] * f64::from(xk)).abs())
                    .sum()
            })
            .collect();
        let mut y = Vec::with_capacity(y0.len());
        let mut bound = Vec::with_capacity(y0.len());
        for (i, &y0) in y0.iter().enumerate() {
            let mut acc = f64::from(y0);
            let mut abs = f64::from(y0).abs();
            for j in 0..self.rank() {
                acc += self.scale * self.up[[j, i]] * h[j];
                abs += (self.scale * self.up[[j, i]]).abs() * h_abs[j];
            }
            y.push(acc);
            bound.push(abs);
        }
        (y, bound)
    }

    /// J = q·⟨g, s·Uᵀ D x⟩.
    pub fn objective(&self, x: &[f32], g: &[f32], q: f32) -> f64 {
        let (y, _) = self.forward(x, &vec![0.0; x.len()]);
        f64::from(q) * y.iter().zip(g).map(|(y, &g)| y * f64::from(g)).sum::<f64>()
    }

    /// (∂J/∂D, ∂J/∂U) by central finite differences (exact up to rounding: J is linear in
    /// each single parameter).
    pub fn finite_difference_gradient(
        &self,
        x: &[f32],
        g: &[f32],
        q: f32,
    ) -> (Array2<f64>, Array2<f64>) {
        let eps = 1e-3;
        let mut g_down = Array2::zeros(self.down.raw_dim());
        let mut g_up = Array2::zeros(self.up.raw_dim());
        for ((j, i), out) in g_down.indexed_iter_mut() {
            let (mut plus, mut minus) = (self.clone(), self.clone());
            plus.down[[j, i]] += eps;
            minus.down[[j, i]] -= eps;
            *out = (plus.objective(x, g, q) - minus.objective(x, g, q)) / (2.0 * eps);
        }
        for ((j, i), out) in g_up.indexed_iter_mut() {
            let (mut plus, mut minus) = (self.clone(), self.clone());
            plus.up[[j, i]] += eps;
            minus.up[[j, i]] -= eps;
            *out = (plus.objective(x, g, q) - minus.objective(x, g, q)) / (2.0 * eps);
        }
        (g_down, g_up)
    }
}

/// Asserts |got − want| ≤ tol·(1 + bound) element-wise, printing the first failure.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], bound: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (f64::from(g) - w).abs();
        assert!(
            err <= tol * (1.0 + b),
            "{what}: element {i}: got {g}, expected {w} (error {err:e}, allowed {:e})",
            tol * (1.0 + b)
        );
    }
}
