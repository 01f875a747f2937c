//! [`MicroLora`]: a rank-1/2 per-request adapter with a hand-vectorised forward and online
//! learning from [`LearningSignal`]s.

use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::aligned::aligned_standard;
use crate::check::{
    check_finite, check_finite_slice, check_learning_rate, check_len, check_shape, check_width,
};
use crate::error::{LoraError, Result};
use crate::matmul::gemm;
use crate::simd::{add_term_wide, needs_wide_term, Adapter, Kernel, SimdLevel};

/// One piece of feedback for [`MicroLora::accumulate_gradient`]: for the input
/// x = `query_embedding`, the adapter's output y(x) should move along g = `gradient_estimate`,
/// weighted by q = `quality_score`.
///
/// ```
/// use ndlora::LearningSignal;
/// let s = LearningSignal::with_gradient(vec![1.0, 0.0], vec![0.0, 1.0], 0.5);
/// assert_eq!(s.quality_score, 0.5);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearningSignal {
    /// The input x (length `hidden_dim`).
    pub query_embedding: Vec<f32>,
    /// The direction g in which the output should move (length `hidden_dim`).
    pub gradient_estimate: Vec<f32>,
    /// The weight q of this signal (negative values push the output away from g).
    pub quality_score: f32,
}

impl LearningSignal {
    /// A signal for input `embedding`, output direction `gradient`, weight `quality`.
    ///
    /// ```
    /// use ndlora::LearningSignal;
    /// let s = LearningSignal::with_gradient(vec![0.1; 4], vec![-0.2; 4], 1.0);
    /// assert_eq!(s.gradient_estimate.len(), 4);
    /// ```
    pub fn with_gradient(embedding: Vec<f32>, gradient: Vec<f32>, quality: f32) -> Self {
        Self {
            query_embedding: embedding,
            gradient_estimate: gradient,
            quality_score: quality,
        }
    }
}

/// A square rank-1 or rank-2 adapter on vectors of length H = `hidden_dim`, meant to run on
/// every request of a serving loop and to learn online.
///
/// Weights (row-major `Array2<f32>`, each rank row contiguous): `down` D (r×H) and `up`
/// U (r×H). The forward **adds** into the output:
///
/// **y ← y + s·Uᵀ (D x)**,  with s = 1/√r by default.
///
/// A new adapter has U = 0 (so it changes nothing until it learns) and D from a fixed
/// pattern, so two new adapters with the same H and r are identical.
///
/// Learning: a [`LearningSignal`] (x, g, q) asks for gradient **ascent** on q·⟨g, y(x)⟩.
/// With h = D x, ∂/∂U = s·q·h gᵀ and ∂/∂D = s·q·(U g) xᵀ; [`accumulate_gradient`] sums them,
/// [`apply_accumulated`] takes one step with the mean. Since ∂/∂D is zero while U = 0, D
/// starts moving after the first step has made U non-zero.
///
/// ```
/// use ndlora::{LearningSignal, MicroLora};
///
/// let h = 64;
/// let mut lora = MicroLora::new(h, 2);
/// let x: Vec<f32> = (0..h).map(|i| (i as f32 * 0.1).sin()).collect();
/// let g: Vec<f32> = (0..h).map(|i| (i as f32 * 0.3).cos()).collect();
///
/// let mut y = vec![1.0; h];
/// lora.forward(&x, &mut y);
/// assert!(y.iter().all(|&v| v == 1.0)); // U = 0: no change yet
///
/// lora.accumulate_gradient(&LearningSignal::with_gradient(x.clone(), g.clone(), 1.0))?;
/// lora.apply_accumulated(0.5);
///
/// let mut y = vec![0.0; h];
/// lora.forward(&x, &mut y);
/// let along_g: f32 = y.iter().zip(&g).map(|(y, g)| y * g).sum();
/// assert!(along_g > 0.0); // the output moved along g
/// # Ok::<(), ndlora::LoraError>(())
/// ```
///
/// [`accumulate_gradient`]: MicroLora::accumulate_gradient
/// [`apply_accumulated`]: MicroLora::apply_accumulated
#[derive(Debug, PartialEq)]
pub struct MicroLora {
    /// D (r×H), standard layout, on a cache-line boundary (`aligned_standard`).
    down: Array2<f32>,
    /// U (r×H), standard layout, on a cache-line boundary.
    up: Array2<f32>,
    scale: f32,
    /// Σ ∂/∂D over pending signals (r×H).
    grad_down: Array2<f32>,
    /// Σ ∂/∂U over pending signals (r×H).
    grad_up: Array2<f32>,
    pending: usize,
}

impl MicroLora {
    /// The largest supported rank (ranks are 1 ..= `MAX_RANK`).
    pub const MAX_RANK: usize = 2;

    /// A new adapter on `hidden_dim` with rank 1 or 2: U = 0, D from the fixed pattern
    /// Dᵢ = ((i·0.618034) mod 1 − 0.5)·0.02 over the flat index i of D, s = 1/√r.
    ///
    /// # Panics
    /// If `rank` is not 1 or 2, with the message `"MicroLoRA rank must be 1-2, got {rank}"`,
    /// or if [`try_new`](Self::try_new) refuses the size; `try_new` returns these as errors.
    ///
    /// ```
    /// let lora = ndlora::MicroLora::new(256, 2);
    /// assert_eq!(lora.param_count(), 2 * 256 * 2);
    /// assert_eq!(lora.scale(), 1.0 / 2f32.sqrt());
    /// ```
    #[track_caller]
    pub fn new(hidden_dim: usize, rank: usize) -> Self {
        if !(1..=Self::MAX_RANK).contains(&rank) {
            panic!("MicroLoRA rank must be 1-2, got {rank}");
        }
        match Self::try_new(hidden_dim, rank) {
            Ok(lora) => lora,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`new`](Self::new), returning [`LoraError::InvalidRank`] for a rank outside
    /// 1 ..= 2 and [`LoraError::SizeOverflow`] if 2·r·H does not fit in `usize` or an r×H
    /// matrix of `f32` would exceed `isize::MAX` bytes (Rust's limit for one allocation).
    /// Sizes below that limit that the system cannot provide abort on allocation failure, as
    /// with any `Vec`.
    ///
    /// ```
    /// use ndlora::{LoraError, MicroLora};
    /// assert!(MicroLora::try_new(16, 1).is_ok());
    /// assert!(matches!(MicroLora::try_new(16, 3), Err(LoraError::InvalidRank { got: 3, .. })));
    /// ```
    pub fn try_new(hidden_dim: usize, rank: usize) -> Result<Self> {
        check_rank(rank)?;
        let len = hidden_dim
            .checked_mul(rank)
            .and_then(|l| l.checked_mul(2))
            .ok_or_else(|| LoraError::SizeOverflow {
                what: "MicroLora parameters 2·r·H",
                dims: vec![2, rank, hidden_dim],
            })?;
        debug_assert_eq!(len, 2 * rank * hidden_dim);
        // Each r×H matrix must fit in isize::MAX bytes (Rust's limit for one allocation);
        // past it `Vec` would panic with "capacity overflow" instead of returning this error.
        let bytes = (rank * hidden_dim).checked_mul(std::mem::size_of::<f32>());
        if bytes.is_none_or(|b| isize::try_from(b).is_err()) {
            return Err(LoraError::SizeOverflow {
                what: "MicroLora matrix bytes r·H·4 (limit isize::MAX)",
                dims: vec![rank, hidden_dim, std::mem::size_of::<f32>()],
            });
        }
        Ok(Self::assemble(
            initial_down(rank, hidden_dim),
            Array2::zeros((rank, hidden_dim)),
            1.0 / (rank as f32).sqrt(),
        ))
    }

    fn assemble(down: Array2<f32>, up: Array2<f32>, scale: f32) -> Self {
        let dim = down.raw_dim();
        Self {
            down: aligned_standard(down),
            up: aligned_standard(up),
            scale,
            grad_down: Array2::zeros(dim),
            grad_up: Array2::zeros(dim),
            pending: 0,
        }
    }

    /// output ← output + s·Uᵀ (D·input), with the widest SIMD kernel this CPU supports
    /// (AVX-512F, AVX2+FMA, NEON, else scalar; see [`simd_level`](crate::simd_level)),
    /// detected once and cached. Does not allocate.
    ///
    /// # Panics
    /// If `input.len()` or `output.len()` is not `hidden_dim`.
    ///
    /// ```
    /// let lora = ndlora::MicroLora::new(8, 1);
    /// let mut out = [2.0_f32; 8];
    /// lora.forward(&[1.0; 8], &mut out);
    /// assert_eq!(out, [2.0; 8]); // U starts at 0, and forward adds
    /// ```
    #[track_caller]
    #[inline]
    pub fn forward(&self, input: &[f32], output: &mut [f32]) {
        self.assert_lengths("forward", input, output);
        Kernel::best().run(self.adapter(), input, output);
    }

    /// [`forward`](Self::forward) with the portable scalar loop (the reference the SIMD
    /// kernels are tested against).
    ///
    /// # Panics
    /// If `input.len()` or `output.len()` is not `hidden_dim`.
    ///
    /// ```
    /// let lora = ndlora::MicroLora::new(8, 2);
    /// let mut a = [0.5_f32; 8];
    /// let mut b = a;
    /// lora.forward_scalar(&[1.0; 8], &mut a);
    /// lora.forward(&[1.0; 8], &mut b);
    /// assert_eq!(a, b);
    /// ```
    #[track_caller]
    pub fn forward_scalar(&self, input: &[f32], output: &mut [f32]) {
        self.assert_lengths("forward_scalar", input, output);
        Kernel::scalar().run(self.adapter(), input, output);
    }

    /// [`forward`](Self::forward) with a chosen kernel variant, to compare or benchmark them.
    ///
    /// Errors (output untouched): [`LoraError::InvalidValue`] if this build or CPU cannot run
    /// `level` (see [`SimdLevel::is_available`]); [`LoraError::ShapeMismatch`] if a length is
    /// not `hidden_dim`.
    ///
    /// ```
    /// use ndlora::{MicroLora, SimdLevel};
    /// let lora = MicroLora::new(16, 2);
    /// let mut out = [0.0_f32; 16];
    /// for level in SimdLevel::ALL {
    ///     assert_eq!(lora.forward_with(level, &[1.0; 16], &mut out).is_ok(), level.is_available());
    /// }
    /// ```
    pub fn forward_with(&self, level: SimdLevel, input: &[f32], output: &mut [f32]) -> Result<()> {
        let kernel = Kernel::for_level(level).ok_or_else(|| LoraError::InvalidValue {
            what: "SIMD level",
            expected: "a level this build and CPU support (SimdLevel::is_available)",
            got: level.to_string(),
        })?;
        check_len("input", input.len(), self.hidden_dim())?;
        check_len("output", output.len(), self.hidden_dim())?;
        kernel.run(self.adapter(), input, output);
        Ok(())
    }

    /// Many vectors at once: output ← output + s·(input Dᵀ) U for `input` n×H (one vector
    /// per row) and `output` n×H, any layout, through two thin gemms (n×r temporary). Gives
    /// the same numbers as [`forward`](Self::forward) on each row, up to rounding.
    ///
    /// Errors with [`LoraError::ShapeMismatch`] (output untouched) unless both are n×H.
    ///
    /// ```
    /// use ndarray::Array2;
    /// let lora = ndlora::MicroLora::new(32, 2);
    /// let x = Array2::<f32>::ones((4, 32));
    /// let mut y = Array2::<f32>::zeros((4, 32));
    /// lora.forward_batch(x.view(), y.view_mut())?;
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn forward_batch(
        &self,
        input: ArrayView2<'_, f32>,
        mut output: ArrayViewMut2<'_, f32>,
    ) -> Result<()> {
        let h = self.hidden_dim();
        check_width("input", input, h)?;
        check_shape("output", output.shape(), &[input.nrows(), h])?;
        let mut hidden = Array2::zeros((input.nrows(), self.rank()));
        gemm(1.0, input, self.down.t(), 0.0, hidden.view_mut());
        // Form s·h here, as `forward` does, instead of passing s as gemm's alpha: where a BLAS
        // applies alpha is its own choice (OpenBLAS scales the product, BLIS the packed
        // operand h), and with a huge s the latter gives s·h = ∞ and then ∞·0 = NaN.
        let s = self.scale;
        for (mut h, mut y) in hidden.rows_mut().into_iter().zip(output.rows_mut()) {
            if h.iter().any(|&h| needs_wide_term(s, h, s * h)) {
                // s·hⱼ overflows or underflows f32: add this row's terms in f64, as `forward`
                // does (rare, slow path), and leave the gemm nothing to add for it.
                for (&hj, u) in h.iter().zip(self.up.rows()) {
                    add_term_wide(s, hj, u, y.iter_mut());
                }
                h.fill(0.0);
            } else {
                h.mapv_inplace(|h| s * h);
            }
        }
        gemm(1.0, hidden.view(), self.up.view(), 1.0, output);
        Ok(())
    }

    /// Adds the gradient of q·⟨g, y(x)⟩ for one signal to the pending sums:
    /// ∂/∂U = s·q·h gᵀ and ∂/∂D = s·q·(U g) xᵀ with h = D x (two rank-1 updates).
    ///
    /// Errors, leaving the adapter unchanged: [`LoraError::ShapeMismatch`] if a vector's length
    /// is not `hidden_dim`; [`LoraError::NonFinite`] if the signal holds NaN/∞ or the sums
    /// would overflow.
    ///
    /// ```
    /// use ndlora::{LearningSignal, MicroLora};
    /// let mut lora = MicroLora::new(4, 1);
    /// lora.accumulate_gradient(&LearningSignal::with_gradient(vec![1.0; 4], vec![1.0; 4], 1.0))?;
    /// assert_eq!(lora.pending_updates(), 1);
    /// assert!(lora.accumulate_gradient(&LearningSignal::with_gradient(vec![1.0; 3], vec![1.0; 4], 1.0)).is_err());
    /// assert_eq!(lora.pending_updates(), 1);
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn accumulate_gradient(&mut self, signal: &LearningSignal) -> Result<()> {
        let hd = self.hidden_dim();
        let x = signal.query_embedding.as_slice();
        let g = signal.gradient_estimate.as_slice();
        check_len("signal.query_embedding", x.len(), hd)?;
        check_len("signal.gradient_estimate", g.len(), hd)?;
        check_finite_slice("signal.query_embedding", x)?;
        check_finite_slice("signal.gradient_estimate", g)?;
        check_finite_slice("signal.quality_score", &[signal.quality_score])?;
        let sq = self.scale * signal.quality_score;
        let rank = self.rank();
        // Coefficients of the two rank-1 updates, per rank row j:
        // ΔUⱼ = (s·q·hⱼ)·g and ΔDⱼ = (s·q·⟨Uⱼ, g⟩)·x.
        let mut c_up = [0.0_f32; Self::MAX_RANK];
        let mut c_down = [0.0_f32; Self::MAX_RANK];
        for j in 0..rank {
            c_up[j] = sq * dot(self.down.row(j).as_slice().expect("standard layout"), x);
            c_down[j] = sq * dot(self.up.row(j).as_slice().expect("standard layout"), g);
        }
        // Validate every new value before writing any.
        for j in 0..rank {
            check_axpy_finite("gradient sum for up", &self.grad_up, j, c_up[j], g)?;
            check_axpy_finite("gradient sum for down", &self.grad_down, j, c_down[j], x)?;
        }
        for j in 0..rank {
            axpy(&mut self.grad_up, j, c_up[j], g);
            axpy(&mut self.grad_down, j, c_down[j], x);
        }
        self.pending += 1;
        Ok(())
    }

    /// [`accumulate_gradient`](Self::accumulate_gradient) for n signals at once, as four thin
    /// gemms: row i of `queries` (n×H), `gradients` (n×H) and `quality[i]` form one signal.
    /// Counts n pending updates; the sums equal n single calls up to rounding.
    ///
    /// Errors, leaving the adapter unchanged, as `accumulate_gradient` does.
    ///
    /// ```
    /// use ndarray::Array2;
    /// let mut lora = ndlora::MicroLora::new(8, 2);
    /// let x = Array2::<f32>::ones((3, 8));
    /// let g = Array2::<f32>::ones((3, 8));
    /// lora.accumulate_gradient_batch(x.view(), g.view(), &[1.0, 0.5, 0.25])?;
    /// assert_eq!(lora.pending_updates(), 3);
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn accumulate_gradient_batch(
        &mut self,
        queries: ArrayView2<'_, f32>,
        gradients: ArrayView2<'_, f32>,
        quality: &[f32],
    ) -> Result<()> {
        let (n, hd) = (quality.len(), self.hidden_dim());
        check_shape("queries", queries.shape(), &[n, hd])?;
        check_shape("gradients", gradients.shape(), &[n, hd])?;
        check_finite("queries", queries)?;
        check_finite("gradients", gradients)?;
        check_finite_slice("quality", quality)?;
        // Hq = diag(s·q)·(X Dᵀ) and Gq = diag(s·q)·(G Uᵀ), both n×r.
        let mut hq = Array2::zeros((n, self.rank()));
        gemm(1.0, queries, self.down.t(), 0.0, hq.view_mut());
        let mut gq = Array2::zeros((n, self.rank()));
        gemm(1.0, gradients, self.up.t(), 0.0, gq.view_mut());
        for ((mut hrow, mut grow), &q) in hq
            .axis_iter_mut(Axis(0))
            .zip(gq.axis_iter_mut(Axis(0)))
            .zip(quality)
        {
            hrow *= self.scale * q;
            grow *= self.scale * q;
        }
        // ΣΔU = Hqᵀ G, ΣΔD = Gqᵀ X, into copies, committed only when finite.
        let mut grad_up = self.grad_up.clone();
        gemm(1.0, hq.t(), gradients, 1.0, grad_up.view_mut());
        let mut grad_down = self.grad_down.clone();
        gemm(1.0, gq.t(), queries, 1.0, grad_down.view_mut());
        check_finite("gradient sum for up", grad_up.view())?;
        check_finite("gradient sum for down", grad_down.view())?;
        self.grad_up = grad_up;
        self.grad_down = grad_down;
        self.pending += n;
        Ok(())
    }

    /// One ascent step with the mean pending gradient: U ← U + (lr / pending)·ΣΔU,
    /// D ← D + (lr / pending)·ΣΔD, then clears the sums. Does nothing when nothing is pending.
    /// A negative `lr` descends. The fallible form is
    /// [`try_apply_accumulated`](Self::try_apply_accumulated).
    ///
    /// # Panics
    /// If `lr` is not finite or the step would make a weight NaN/∞ (the weights are not
    /// changed before the panic). Serving loops that take `lr` from outside should call
    /// `try_apply_accumulated`.
    ///
    /// ```
    /// use ndlora::{LearningSignal, MicroLora};
    /// let mut lora = MicroLora::new(4, 1);
    /// lora.accumulate_gradient(&LearningSignal::with_gradient(vec![1.0; 4], vec![1.0; 4], 1.0))?;
    /// lora.apply_accumulated(0.1);
    /// assert_eq!(lora.pending_updates(), 0);
    /// assert!(lora.get_weights().1.iter().any(|&u| u != 0.0));
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    #[track_caller]
    pub fn apply_accumulated(&mut self, lr: f32) {
        if let Err(e) = self.try_apply_accumulated(lr) {
            panic!("MicroLora::apply_accumulated: {e}");
        }
    }

    /// One ascent step with the mean pending gradient: U ← U + (lr / pending)·ΣΔU,
    /// D ← D + (lr / pending)·ΣΔD, then clears the sums. Does nothing when nothing is pending.
    /// A negative `lr` descends.
    ///
    /// [`apply_accumulated`](Self::apply_accumulated) as a `Result`, so that bad input cannot
    /// corrupt the weights. Errors, leaving the adapter unchanged: [`LoraError::InvalidValue`] if `lr` is
    /// not finite; [`LoraError::WouldOverflow`] if a weight would become NaN/∞.
    ///
    /// ```
    /// use ndlora::{LearningSignal, MicroLora};
    /// let mut lora = MicroLora::new(4, 1);
    /// lora.accumulate_gradient(&LearningSignal::with_gradient(vec![1.0; 4], vec![1.0; 4], 1.0))?;
    /// assert!(lora.try_apply_accumulated(f32::NAN).is_err());
    /// assert_eq!(lora.pending_updates(), 1);
    /// lora.try_apply_accumulated(0.1)?;
    /// assert_eq!(lora.pending_updates(), 0);
    /// assert!(lora.get_weights().1.iter().any(|&u| u != 0.0));
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn try_apply_accumulated(&mut self, lr: f32) -> Result<()> {
        check_learning_rate(lr)?;
        if self.pending == 0 {
            return Ok(());
        }
        let step = lr / self.pending as f32;
        let finite = |w: &Array2<f32>, g: &Array2<f32>| {
            w.iter()
                .zip(g)
                .all(|(w, g)| step.mul_add(*g, *w).is_finite())
        };
        if !(finite(&self.up, &self.grad_up) && finite(&self.down, &self.grad_down)) {
            return Err(LoraError::WouldOverflow {
                operation: "apply_accumulated",
            });
        }
        self.up
            .zip_mut_with(&self.grad_up, |w, g| *w = step.mul_add(*g, *w));
        self.down
            .zip_mut_with(&self.grad_down, |w, g| *w = step.mul_add(*g, *w));
        self.clear_gradients();
        Ok(())
    }

    /// Back to the state [`new`](Self::new) gives (D from the pattern, U = 0, nothing
    /// pending), keeping the scale, which is configuration rather than learned state.
    ///
    /// ```
    /// use ndlora::MicroLora;
    /// let mut lora = MicroLora::new(8, 2);
    /// lora.set_weights(ndarray::Array2::ones((2, 8)).view(), ndarray::Array2::ones((2, 8)).view())?;
    /// lora.reset();
    /// assert_eq!(lora, MicroLora::new(8, 2));
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn reset(&mut self) {
        let initial = initial_down(self.rank(), self.hidden_dim());
        self.down.assign(&initial);
        self.up.fill(0.0);
        self.clear_gradients();
    }

    fn clear_gradients(&mut self) {
        self.grad_up.fill(0.0);
        self.grad_down.fill(0.0);
        self.pending = 0;
    }

    /// Rank r (1 or 2).
    pub fn rank(&self) -> usize {
        self.down.nrows()
    }

    /// H, the length of input and output vectors.
    pub fn hidden_dim(&self) -> usize {
        self.down.ncols()
    }

    /// Trainable parameters: 2·H·r.
    pub fn param_count(&self) -> usize {
        self.down.len() + self.up.len()
    }

    /// The scale s (1/√r unless set).
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Sets the scale s.
    ///
    /// # Panics
    /// If `scale` is NaN or ±∞.
    ///
    /// ```
    /// let mut lora = ndlora::MicroLora::new(8, 1);
    /// lora.set_scale(0.5);
    /// assert_eq!(lora.scale(), 0.5);
    /// ```
    #[track_caller]
    pub fn set_scale(&mut self, scale: f32) {
        assert!(
            scale.is_finite(),
            "MicroLora::set_scale: scale must be finite, got {scale}"
        );
        self.scale = scale;
    }

    /// Signals accumulated since the last [`apply_accumulated`](Self::apply_accumulated).
    pub fn pending_updates(&self) -> usize {
        self.pending
    }

    /// The weights (down D, up U), both r×H.
    ///
    /// ```
    /// let lora = ndlora::MicroLora::new(8, 2);
    /// let (down, up) = lora.get_weights();
    /// assert_eq!((down.dim(), up.dim()), ((2, 8), (2, 8)));
    /// assert!(up.iter().all(|&u| u == 0.0));
    /// ```
    pub fn get_weights(&self) -> (ArrayView2<'_, f32>, ArrayView2<'_, f32>) {
        (self.down.view(), self.up.view())
    }

    /// The pending gradient sums (ΣΔD, ΣΔU), both r×H; see
    /// [`accumulate_gradient`](Self::accumulate_gradient).
    ///
    /// ```
    /// let lora = ndlora::MicroLora::new(8, 1);
    /// assert!(lora.pending_gradients().0.iter().all(|&g| g == 0.0));
    /// ```
    pub fn pending_gradients(&self) -> (ArrayView2<'_, f32>, ArrayView2<'_, f32>) {
        (self.grad_down.view(), self.grad_up.view())
    }

    /// Replaces the weights with copies of `down` and `up` (any layout), both r×H.
    ///
    /// Errors, leaving the adapter unchanged (both shapes and all values are checked before
    /// anything is written): [`LoraError::ShapeMismatch`] or [`LoraError::NonFinite`].
    /// Pending gradients are kept.
    ///
    /// ```
    /// use ndarray::Array2;
    /// let mut lora = ndlora::MicroLora::new(4, 1);
    /// lora.set_weights(Array2::ones((1, 4)).view(), Array2::ones((1, 4)).view())?;
    /// let mut y = [0.0_f32; 4];
    /// lora.forward(&[1.0; 4], &mut y);
    /// assert_eq!(y, [4.0; 4]);
    /// assert!(lora.set_weights(Array2::ones((2, 4)).view(), Array2::ones((1, 4)).view()).is_err());
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn set_weights(
        &mut self,
        down: ArrayView2<'_, f32>,
        up: ArrayView2<'_, f32>,
    ) -> Result<()> {
        let shape = [self.rank(), self.hidden_dim()];
        check_shape("down", down.shape(), &shape)?;
        check_shape("up", up.shape(), &shape)?;
        check_finite("down", down)?;
        check_finite("up", up)?;
        self.down.assign(&down);
        self.up.assign(&up);
        Ok(())
    }

    /// Validates a complete state (deserialisation).
    fn from_state(
        hidden_dim: usize,
        rank: usize,
        scale: f32,
        down: Array2<f32>,
        up: Array2<f32>,
    ) -> Result<Self> {
        check_rank(rank)?;
        check_shape("down", down.shape(), &[rank, hidden_dim])?;
        check_shape("up", up.shape(), &[rank, hidden_dim])?;
        check_finite_slice("scale", &[scale])?;
        check_finite("down", down.view())?;
        check_finite("up", up.view())?;
        Ok(Self::assemble(down, up, scale))
    }

    // Inlined, with `Kernel::best`: as calls they were ~2 ns of a 44 ns `forward` (AMD Zen 3).
    #[inline]
    fn adapter(&self) -> Adapter<'_> {
        Adapter {
            down: self.down.as_slice().expect("standard layout"),
            up: self.up.as_slice().expect("standard layout"),
            rank: self.rank(),
            scale: self.scale,
        }
    }

    #[track_caller]
    #[inline]
    fn assert_lengths(&self, op: &str, input: &[f32], output: &[f32]) {
        let h = self.hidden_dim();
        if input.len() != h || output.len() != h {
            panic!(
                "MicroLora::{op}: input and output must have length hidden_dim = {h}, got {} and {}",
                input.len(),
                output.len()
            );
        }
    }
}

impl Clone for MicroLora {
    /// A copy with its factors on a cache-line boundary again (a derived clone would copy
    /// them to wherever the allocator puts them).
    fn clone(&self) -> Self {
        Self {
            down: aligned_standard(self.down.clone()),
            up: aligned_standard(self.up.clone()),
            scale: self.scale,
            grad_down: self.grad_down.clone(),
            grad_up: self.grad_up.clone(),
            pending: self.pending,
        }
    }
}

fn check_rank(rank: usize) -> Result<()> {
    if !(1..=MicroLora::MAX_RANK).contains(&rank) {
        return Err(LoraError::InvalidRank {
            got: rank,
            min: 1,
            max: MicroLora::MAX_RANK,
        });
    }
    Ok(())
}

/// The seed's deterministic D: x = (i·0.618034) mod 1, Dᵢ = (x − 0.5)·0.02 (all f32).
fn initial_down(rank: usize, hidden_dim: usize) -> Array2<f32> {
    let mut i = 0_usize;
    Array2::from_shape_simple_fn((rank, hidden_dim), || {
        let x = (i as f32 * 0.618034) % 1.0;
        i += 1;
        (x - 0.5) * 0.02
    })
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// Checks that row `j` of `m` plus c·v would stay finite.
fn check_axpy_finite(
    what: &'static str,
    m: &Array2<f32>,
    j: usize,
    c: f32,
    v: &[f32],
) -> Result<()> {
    match m
        .row(j)
        .iter()
        .zip(v)
        .position(|(m, v)| !c.mul_add(*v, *m).is_finite())
    {
        None => Ok(()),
        Some(i) => Err(LoraError::NonFinite {
            what,
            index: (j, i),
            value: f64::from(c.mul_add(v[i], m[[j, i]])),
        }),
    }
}

/// Row `j` of `m` += c·v.
fn axpy(m: &mut Array2<f32>, j: usize, c: f32, v: &[f32]) {
    for (m, v) in m.row_mut(j).iter_mut().zip(v) {
        *m = c.mul_add(*v, *m);
    }
}

/// The serialised form: the weights and scale. Pending gradients are not saved; a loaded
/// adapter starts with none.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MicroRepr<W> {
    hidden_dim: usize,
    rank: usize,
    scale: f32,
    down: W,
    up: W,
}

impl Serialize for MicroLora {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        MicroRepr {
            hidden_dim: self.hidden_dim(),
            rank: self.rank(),
            scale: self.scale,
            down: &self.down,
            up: &self.up,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for MicroLora {
    /// Validates the rank, both shapes (r×H) and that the scale and weights are finite;
    /// rebuilds empty gradient sums (pending gradients are not serialised).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let r = MicroRepr::<Array2<f32>>::deserialize(deserializer)?;
        Self::from_state(r.hidden_dim, r.rank, r.scale, r.down, r.up)
            .map_err(serde::de::Error::custom)
    }
}
