//! Training: the backward pass of [`LoraLayer`] and a plain SGD step.

use ndarray::{Array2, ArrayView2};
use num_traits::{One, Zero};

use crate::check::{check_finite, check_input_width, check_learning_rate, check_shape};
#[cfg(doc)]
use crate::error::LoraError;
use crate::error::Result;
use crate::float::LoraFloat;
use crate::layer::LoraLayer;
use crate::matmul::{blas_operand, gemm};

/// Gradients of a scalar loss L returned by [`LoraLayer::backward`].
///
/// Shapes follow the parameters they belong to: ∂L/∂A is r×k like A, ∂L/∂B is d×r like B,
/// ∂L/∂X is n×k like the input.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraGrads<A> {
    /// ∂L/∂A = s·(G B)ᵀ X  (r×k).
    pub grad_a: Array2<A>,
    /// ∂L/∂B = s·Gᵀ (X Aᵀ)  (d×r).
    pub grad_b: Array2<A>,
    /// ∂L/∂X = G W + s·(G B) A  (n×k); G W alone while merged.
    pub grad_x: Array2<A>,
}

impl<A: LoraFloat> LoraLayer<A> {
    /// The backward pass of Y = X Wᵀ + s·(X Aᵀ) Bᵀ: given the input X (n×k) and
    /// G = ∂L/∂Y (n×d), returns ∂L/∂A, ∂L/∂B and ∂L/∂X. With H = X Aᵀ (n×r):
    ///
    /// * ∂L/∂B = s·Gᵀ H  (d×r)
    /// * ∂L/∂A = s·(G B)ᵀ X  (r×k)
    /// * ∂L/∂X = G W + s·(G B) A  (n×k)
    ///
    /// Six gemms, all through the crate's BLAS entry point; besides the results it allocates
    /// only the two n×r products H and G B. W stays frozen (no ∂L/∂W). No dropout: this is the
    /// gradient of [`forward`](Self::forward).
    ///
    /// While merged, W already holds W₀ + s·B A and Y = X Wᵀ, so ∂L/∂X = G W; ∂L/∂A and ∂L/∂B
    /// are the same formulas (the gradient of the same function with respect to the factors).
    ///
    /// Errors ([`LoraError::ShapeMismatch`]): `x` is not n×k, or `grad_output` is not n×d.
    /// n may be 0 (the factor gradients are then 0).
    ///
    /// ```
    /// use ndarray::Array2;
    /// use ndlora::{LoraConfig, LoraLayer};
    ///
    /// let layer = LoraLayer::from_parts(
    ///     Array2::<f64>::eye(3),
    ///     Array2::ones((1, 3)),
    ///     Array2::ones((3, 1)),
    ///     LoraConfig { rank: 1, alpha: 1.0, ..Default::default() },
    /// )?;
    /// let x = Array2::from_elem((2, 3), 1.0);
    /// let g = Array2::from_elem((2, 3), 1.0); // L = Σ Y
    /// let grads = layer.backward(x.view(), g.view())?;
    /// // ∂L/∂B = s·Gᵀ (X Aᵀ): every row of X Aᵀ is 3, summed over 2 rows.
    /// assert_eq!(grads.grad_b, Array2::from_elem((3, 1), 6.0));
    /// // ∂L/∂X = G W + s·(G B) A = 1 + 3.
    /// assert_eq!(grads.grad_x, Array2::from_elem((2, 3), 4.0));
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn backward(
        &self,
        x: ArrayView2<'_, A>,
        grad_output: ArrayView2<'_, A>,
    ) -> Result<LoraGrads<A::Factor>> {
        let (d, k, r) = (self.out_features(), self.in_features(), self.rank());
        check_input_width(x, k)?;
        let n = x.nrows();
        check_shape("grad_output", grad_output.shape(), &[n, d])?;
        // Everything runs in the factor type (X, G and W widened first for the half types).
        // X and G each feed several products: a layout BLAS cannot read is copied once.
        let (x, grad_output, w) = (
            A::widen(x),
            A::widen(grad_output),
            A::widen(self.base_weight()),
        );
        let (x, grad_output) = (blas_operand(x.view()), blas_operand(grad_output.view()));
        let (x, grad_output) = (x.view(), grad_output.view());
        let (a, b) = (self.weight_a(), self.weight_b());
        let s = <A::Factor as LoraFloat>::from_f64_lossy(self.scaling());
        let (zero, one) = (A::Factor::zero(), A::Factor::one());

        let mut h = Array2::zeros((n, r)); // X Aᵀ
        gemm(one, x, a.t(), zero, h.view_mut());
        let mut gb = Array2::zeros((n, r)); // G B
        gemm(one, grad_output, b, zero, gb.view_mut());

        let mut grad_b = Array2::zeros((d, r));
        gemm(s, grad_output.t(), h.view(), zero, grad_b.view_mut());
        let mut grad_a = Array2::zeros((r, k));
        gemm(s, gb.t(), x, zero, grad_a.view_mut());
        let mut grad_x = Array2::zeros((n, k));
        gemm(one, grad_output, w.view(), zero, grad_x.view_mut());
        if !self.is_merged() {
            gemm(s, gb.view(), a, one, grad_x.view_mut());
        }
        Ok(LoraGrads {
            grad_a,
            grad_b,
            grad_x,
        })
    }

    /// One plain SGD step on the factors: A ← A − lr·∂L/∂A, B ← B − lr·∂L/∂B
    /// (`grads.grad_x` is not used).
    ///
    /// Transactional: errors leave the layer unchanged. Errors: merged
    /// ([`LoraError::MergeState`]); `lr` not finite ([`LoraError::InvalidValue`]); gradient
    /// shapes not r×k and d×r ([`LoraError::ShapeMismatch`]); a non-finite gradient, or new
    /// factors that would be non-finite ([`LoraError::NonFinite`]).
    ///
    /// ```
    /// use ndarray::Array2;
    /// use ndlora::{LoraConfig, LoraLayer};
    ///
    /// let mut layer = LoraLayer::new(Array2::<f32>::eye(4), LoraConfig { rank: 2, ..Default::default() })?;
    /// let x = Array2::from_elem((3, 4), 1.0);
    /// let y = layer.forward(x.view())?;
    /// let grads = layer.backward(x.view(), (&y - &x).view())?; // L = ½‖Y − X‖² (= 0 here)
    /// layer.sgd_step(&grads, 0.1)?;
    /// assert_eq!(layer.weight_b(), Array2::<f32>::zeros((4, 2)));
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn sgd_step(&mut self, grads: &LoraGrads<A::Factor>, lr: A::Factor) -> Result<()> {
        self.require_unmerged("sgd_step")?;
        check_learning_rate(lr)?;
        let (d, k, r) = (self.out_features(), self.in_features(), self.rank());
        check_shape("grad_a", grads.grad_a.shape(), &[r, k])?;
        check_shape("grad_b", grads.grad_b.shape(), &[d, r])?;
        check_finite("grad_a", grads.grad_a.view())?;
        check_finite("grad_b", grads.grad_b.view())?;
        let step = |p: ArrayView2<'_, A::Factor>, g: &Array2<A::Factor>| {
            let mut new = p.to_owned();
            new.scaled_add(-lr, g);
            new
        };
        let new_a = step(self.weight_a(), &grads.grad_a);
        let new_b = step(self.weight_b(), &grads.grad_b);
        check_finite("weight_a after sgd_step", new_a.view())?;
        check_finite("weight_b after sgd_step", new_b.view())?;
        self.weight_a_mut()?.assign(&new_a);
        self.weight_b_mut()?.assign(&new_b);
        Ok(())
    }
}
