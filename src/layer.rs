//! [`LoraLayer`]: a frozen weight with a trainable low-rank update.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::aligned::AlignedMatrix;
use crate::check::{
    check_bias, check_finite, check_input_width, check_shape, check_weight_dims, max_abs,
};
use crate::config::LoraConfig;
use crate::error::{LoraError, Result};
use crate::factors::Factors;
use crate::float::LoraFloat;
use crate::merge::update_weight;
use crate::scratch::LoraScratch;

/// A linear layer with a frozen weight W (d×k), an optional frozen bias b (d), and a low-rank
/// update s·B A.
///
/// Shapes follow PyTorch/PEFT: W is out×in = d×k, A is r×k, B is d×r, b has length d, inputs X
/// are n×k.
///
/// * forward: Y = X Wᵀ + b + s·(X Aᵀ) Bᵀ  (n×d, b added to every row; b = 0 when the layer has
///   no bias); when merged, Y = X Wᵀ + b
/// * merge: W ← W + s·B A;  unmerge: W ← W − s·B A (b is never touched)
///
/// ```
/// use ndarray::{array, Array2};
/// use ndlora::{LoraConfig, LoraLayer};
///
/// let w = Array2::<f64>::eye(4);
/// let mut layer = LoraLayer::new(w, LoraConfig { rank: 2, alpha: 4.0, ..Default::default() })?;
/// layer.weight_b_mut()?.fill(0.5); // pretend we trained B
/// let x = array![[1.0, 2.0, 3.0, 4.0]];
/// let y = layer.forward(x.view())?;
/// layer.merge()?;
/// let y_merged = layer.forward(x.view())?;
/// assert!(y.abs_diff_eq(&y_merged, 1e-12));
/// # Ok::<(), ndlora::LoraError>(())
/// ```
///
/// # Memory
/// The layer keeps W in standard layout with its first element on a 64-byte (cache-line)
/// boundary, so that its own kernels' vector loads never straddle two lines. An array that
/// is not (a large allocation from the system allocator usually starts 16 bytes past one,
/// and a column-major one is not standard) is copied once when the layer is built and
/// yours is freed: construction briefly holds W twice. Measured on an AMD EPYC Zen 4, one
/// thread, unmerged f32 forwards, before and after alternating (2026-12-02): n×d×k =
/// 1×256×256 11–13 % faster, 8×256×256 4–5 %, 1×1024×1024 3–6 %, 32×4096×4096 2–5 %;
/// 8×4096×4096 within the noise.
///
/// # Serialization
/// `Serialize`/`Deserialize` keep the whole state (W, A, B, config, scaling, merge flag and
/// the dropout generator's position, and the copy of W that [`merge_exact`](Self::merge_exact)
/// keeps). Loading validates like [`from_parts`](Self::from_parts):
/// a document with inconsistent shapes, a bad config or non-finite values is an error. For
/// bit-exact round trips through JSON, enable serde_json's `float_roundtrip` feature (its
/// default float parser may be off by one ulp).
///
/// # Threads
/// `LoraLayer` is `Send + Sync`. `forward`, `forward_into`, `forward_into_with_scratch` (with
/// one [`LoraScratch`] per thread), `backward` and `effective_weight` take `&self`: share one
/// layer between threads (e.g. in an `Arc`); they give bit-identical results on every thread.
/// `forward_train` (advances the dropout generator), `merge`, `merge_exact`, `unmerge`,
/// `sgd_step`, `set_scaling`, `set_bias` and the `_mut` accessors need `&mut self`.
#[derive(Debug, Clone)]
pub struct LoraLayer<A: LoraFloat> {
    /// W, on a 64-byte boundary (see [`AlignedMatrix`]).
    base_weight: AlignedMatrix<A>,
    /// The base layer's bias b (length d), if it has one; see [`LoraLayer::with_bias`].
    bias: Option<Array1<A>>,
    /// A, B, the config and the scaling.
    factors: Factors<A::Factor>,
    merged: bool,
    dropout_rng: ChaCha8Rng,
    /// An upper bound on max |Wᵢⱼ| (f64, so it cannot overflow), kept so that merge can prove
    /// its result finite without reading W. A cache: not part of the value.
    w_abs_bound: f64,
    /// The pre-merge W, kept by [`LoraLayer::merge_exact`] so that `unmerge` restores it
    /// bit for bit. `Some` only while merged that way. Part of the value (serde, `==`).
    unmerge_weight: Option<AlignedMatrix<A>>,
}

impl<A: LoraFloat> PartialEq for LoraLayer<A> {
    fn eq(&self, other: &Self) -> bool {
        self.base_weight == other.base_weight
            && self.bias == other.bias
            && self.factors == other.factors
            && self.merged == other.merged
            && self.dropout_rng == other.dropout_rng
            && self.unmerge_weight == other.unmerge_weight
    }
}

impl<A: LoraFloat> LoraLayer<A> {
    /// Wraps `base_weight` (d×k) with a new adapter: A initialised per `config.init` from
    /// `config.seed`, B = 0, so the layer starts out computing exactly X Wᵀ.
    ///
    /// Errors: d or k is 0, rank outside 1..=min(d, k), α not finite, dropout outside [0, 1),
    /// scaling not representable in `A`, or a non-finite weight.
    pub fn new(base_weight: Array2<A>, config: LoraConfig) -> Result<Self> {
        let (d, k) = base_weight.dim();
        check_weight_dims(d, k)?;
        let factors = Factors::new(d, k, config)?;
        check_finite("base_weight", base_weight.view())?;
        Ok(Self::assemble(base_weight, factors, false))
    }

    /// Builds a layer from trained factors: A (r×k) and B (d×r) with r = `config.rank`.
    /// Shapes, the config and finiteness of all three matrices are checked.
    ///
    /// ```
    /// use ndarray::Array2;
    /// use ndlora::{LoraConfig, LoraLayer};
    /// let layer = LoraLayer::from_parts(
    ///     Array2::<f32>::zeros((6, 5)),
    ///     Array2::ones((2, 5)),
    ///     Array2::ones((6, 2)),
    ///     LoraConfig { rank: 2, alpha: 2.0, ..Default::default() },
    /// )?;
    /// assert_eq!(layer.effective_weight()[[0, 0]], 2.0); // s·(B A)₀₀ = 1·2
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn from_parts(
        base_weight: Array2<A>,
        weight_a: Array2<A::Factor>,
        weight_b: Array2<A::Factor>,
        config: LoraConfig,
    ) -> Result<Self> {
        let scaling = config.scaling();
        Self::from_state(base_weight, weight_a, weight_b, config, scaling, false)
    }

    /// Validates a complete state (used by `from_parts` and deserialisation).
    fn from_state(
        base_weight: Array2<A>,
        weight_a: Array2<A::Factor>,
        weight_b: Array2<A::Factor>,
        config: LoraConfig,
        scaling: f64,
        merged: bool,
    ) -> Result<Self> {
        let (d, k) = base_weight.dim();
        check_weight_dims(d, k)?;
        let base = || check_finite("base_weight", base_weight.view());
        let factors = Factors::from_parts((d, k), weight_a, weight_b, config, scaling, base)?;
        Ok(Self::assemble(base_weight, factors, merged))
    }

    fn assemble(base_weight: Array2<A>, factors: Factors<A::Factor>, merged: bool) -> Self {
        let mut dropout_rng = ChaCha8Rng::seed_from_u64(factors.config().seed);
        dropout_rng.set_stream(1); // independent of the init stream
        let w_abs_bound = max_abs(base_weight.view());
        Self {
            base_weight: AlignedMatrix::new(base_weight),
            bias: None,
            factors,
            merged,
            dropout_rng,
            w_abs_bound,
            unmerge_weight: None,
        }
    }

    /// Adds the base layer's bias b (length d = `out_features`), so that
    /// Y = X Wᵀ + b + s·(X Aᵀ) Bᵀ is one call. Replaces any bias the layer had. The bias is
    /// frozen like W and separate from it: merge, unmerge and
    /// [`effective_weight`](Self::effective_weight) leave it out.
    ///
    /// Errors (the layer is consumed either way; [`set_bias`](Self::set_bias) keeps it): length
    /// ≠ d, or a non-finite element.
    ///
    /// ```
    /// use ndarray::{array, Array2};
    /// use ndlora::{LoraConfig, LoraLayer};
    ///
    /// let layer = LoraLayer::<f64>::new(Array2::eye(2), LoraConfig { rank: 1, ..Default::default() })?
    ///     .with_bias(array![10.0, 20.0])?;
    /// let y = layer.forward(array![[1.0, 2.0]].view())?; // B = 0: just X Wᵀ + b
    /// assert_eq!(y, array![[11.0, 22.0]]);
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn with_bias(mut self, bias: Array1<A>) -> Result<Self> {
        check_bias(bias.view(), self.out_features())?;
        self.bias = Some(bias);
        Ok(self)
    }

    /// Sets (`Some`) or removes (`None`) the bias in place; errors as
    /// [`with_bias`](Self::with_bias) and then leaves the layer unchanged.
    pub fn set_bias(&mut self, bias: Option<Array1<A>>) -> Result<()> {
        if let Some(b) = &bias {
            check_bias(b.view(), self.out_features())?;
        }
        self.bias = bias;
        Ok(())
    }

    /// The base layer's bias b (length d), if it has one.
    pub fn bias(&self) -> Option<ArrayView1<'_, A>> {
        self.bias.as_ref().map(|b| b.view())
    }

    /// The frozen weight W (d×k); holds W + s·B A while merged.
    pub fn base_weight(&self) -> ArrayView2<'_, A> {
        self.base_weight.view()
    }

    /// Factor A (r×k).
    pub fn weight_a(&self) -> ArrayView2<'_, A::Factor> {
        self.factors.a()
    }

    /// Factor B (d×r).
    pub fn weight_b(&self) -> ArrayView2<'_, A::Factor> {
        self.factors.b()
    }

    /// A mutable view of A, to train its values (its shape cannot change).
    ///
    /// Errors with [`LoraError::MergeState`] while merged: W holds s·B A, and a changed factor
    /// would make `unmerge` subtract something else.
    pub fn weight_a_mut(&mut self) -> Result<ArrayViewMut2<'_, A::Factor>> {
        self.require_unmerged("weight_a_mut")?;
        Ok(self.factors.a_mut())
    }

    /// A mutable view of B; see [`weight_a_mut`](Self::weight_a_mut).
    pub fn weight_b_mut(&mut self) -> Result<ArrayViewMut2<'_, A::Factor>> {
        self.require_unmerged("weight_b_mut")?;
        Ok(self.factors.b_mut())
    }

    /// The configuration the layer was built with.
    pub fn config(&self) -> &LoraConfig {
        self.factors.config()
    }

    /// Rank r.
    pub fn rank(&self) -> usize {
        self.factors.rank()
    }

    /// k, the input width.
    pub fn in_features(&self) -> usize {
        self.base_weight.ncols()
    }

    /// d, the output width.
    pub fn out_features(&self) -> usize {
        self.base_weight.nrows()
    }

    /// The scaling s applied to B A (initially `config.scaling()`).
    pub fn scaling(&self) -> f64 {
        self.factors.scaling()
    }

    /// Sets the scaling s. Errors if it is not finite in `A`, or while merged (W holds the
    /// old s·B A, which unmerge must subtract).
    pub fn set_scaling(&mut self, scaling: f64) -> Result<()> {
        self.require_unmerged("set_scaling")?;
        self.factors.set_scaling(scaling)
    }

    /// Whether s·B A is currently folded into W.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// Trainable parameters r(d + k).
    pub fn trainable_params(&self) -> usize {
        self.rank() * (self.out_features() + self.in_features())
    }

    /// All parameters d·k + r(d + k).
    pub fn total_params(&self) -> usize {
        self.out_features() * self.in_features() + self.trainable_params()
    }

    /// trainable / total.
    pub fn compression_ratio(&self) -> f64 {
        self.trainable_params() as f64 / self.total_params() as f64
    }

    /// Y = X Wᵀ + b + s·(X Aᵀ) Bᵀ for X of shape n×k (any layout; n may be 0); Y is n×d, and b
    /// (if the layer has a bias) is added to every row. Merged: Y = X Wᵀ + b. No dropout.
    ///
    /// A batch of at most [`N_SKINNY`](crate::N_SKINNY) rows (one token: n = 1) runs
    /// ndlora's skinny kernel, which reads W once and adds the bias and the branch in the same
    /// pass; larger batches run BLAS gemms (the crate docs, *Design*, say when and why).
    ///
    /// # NaN and ∞ in the input
    /// Not an error (checking every input would cost a pass over X): a NaN or ∞ in row i of X
    /// propagates through the products into row i of Y, and only there. Other rows are
    /// computed as if it were absent (each output row depends only on its own input row), and
    /// the layer itself is never touched by a forward. Check `x` yourself, or Y afterwards, if
    /// that matters.
    ///
    /// Errors: [`LoraError::ShapeMismatch`] if X does not have k columns.
    pub fn forward(&self, x: ArrayView2<'_, A>) -> Result<Array2<A>> {
        self.check_input(x)?;
        let mut y = Array2::zeros((x.nrows(), self.out_features()));
        self.forward_unchecked(x, y.view_mut(), None);
        Ok(y)
    }

    /// [`forward`](Self::forward) into `out` (n×d, any layout), which is overwritten.
    ///
    /// Allocates one n×r temporary for X Aᵀ per call (and a copy of X or `out` only when it
    /// has a layout BLAS cannot describe: negative or doubly-strided views; a forward of at
    /// most [`N_SKINNY`](crate::N_SKINNY) rows reads any X with unit column stride and
    /// writes any `out` in place). For a serving loop that must not allocate, keep a
    /// [`LoraScratch`] and call [`forward_into_with_scratch`](Self::forward_into_with_scratch).
    ///
    /// Errors (`out` untouched): [`LoraError::ShapeMismatch`] if X is not n×k or `out` not n×d.
    pub fn forward_into(&self, x: ArrayView2<'_, A>, out: ArrayViewMut2<'_, A>) -> Result<()> {
        self.check_input(x)?;
        check_shape("out", out.shape(), &[x.nrows(), self.out_features()])?;
        self.forward_unchecked(x, out, None);
        Ok(())
    }

    /// [`forward_into`](Self::forward_into) with the n×r temporary X Aᵀ taken from `scratch`,
    /// which grows to the largest n·r it has seen and is then reused.
    ///
    /// **Allocation-free** once `scratch` is large enough (build it with
    /// [`LoraScratch::with_capacity`] or warm it up with one call), provided X and `out` each
    /// have a row- or column-major layout (unit stride on one axis; sub-views with a leading
    /// dimension are fine). A negative- or doubly-strided X or `out` is copied once, as in
    /// `forward_into`. (`tests/alloc.rs` proves this with a counting global allocator; the
    /// BLAS library's own internal buffers are outside Rust's allocator.) This holds with a
    /// BLAS backend; the pure-Rust fallback (`NDLORA_BLAS=none`) multiplies through
    /// matrixmultiply, which allocates a packing buffer per product itself (ndlora adds none).
    ///
    /// Errors (`out` and `scratch` untouched): as [`forward_into`](Self::forward_into).
    ///
    /// ```
    /// use ndarray::Array2;
    /// use ndlora::{LoraConfig, LoraLayer, LoraScratch};
    ///
    /// let layer = LoraLayer::new(Array2::<f32>::eye(8), LoraConfig { rank: 2, ..Default::default() })?;
    /// let mut scratch = LoraScratch::with_capacity(16, layer.rank());
    /// let x = Array2::<f32>::ones((16, 8));
    /// let mut y = Array2::<f32>::zeros((16, 8));
    /// layer.forward_into_with_scratch(x.view(), y.view_mut(), &mut scratch)?; // no allocation
    /// assert_eq!(y, layer.forward(x.view())?);
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn forward_into_with_scratch(
        &self,
        x: ArrayView2<'_, A>,
        out: ArrayViewMut2<'_, A>,
        scratch: &mut LoraScratch<A::Factor>,
    ) -> Result<()> {
        self.check_input(x)?;
        check_shape("out", out.shape(), &[x.nrows(), self.out_features()])?;
        self.forward_unchecked(x, out, Some(scratch));
        Ok(())
    }

    /// Training forward: like [`forward`](Self::forward), with inverted dropout (keep with
    /// probability 1 − p, scale kept inputs by 1/(1 − p)) on the LoRA branch's input only,
    /// as PEFT places it (b is added as in `forward`). Masks come from a generator seeded by
    /// `config.seed`, so a run reproduces; each call draws a new mask. Identical to `forward` when p = 0 or merged.
    pub fn forward_train(&mut self, x: ArrayView2<'_, A>) -> Result<Array2<A>> {
        let p = self.config().dropout;
        if p == 0.0 || self.merged {
            return self.forward(x);
        }
        self.check_input(x)?;
        let keep = 1.0 - p;
        // Dropout acts on the branch's input in the factor type (PEFT casts X to the LoRA
        // weights' dtype first).
        let scale = <A::Factor as LoraFloat>::from_f64_lossy(1.0 / keep);
        let rng = &mut self.dropout_rng;
        let dropped = A::widen(x).map(|&v| {
            if rng.random_bool(keep) {
                v * scale
            } else {
                num_traits::Zero::zero()
            }
        });
        let mut y = Array2::zeros((x.nrows(), self.out_features()));
        let bias = self.bias.as_ref().map(|b| b.view());
        A::forward(x, self.base_weight.view(), bias, &[], y.view_mut(), None);
        A::add_terms(dropped.view(), &[self.factors.term()], y.view_mut(), None);
        Ok(y)
    }

    /// W + s·B A as a new d×k matrix (just W while merged). The bias is not part of it.
    pub fn effective_weight(&self) -> Array2<A> {
        let mut w = self.base_weight.view().to_owned();
        if !self.merged {
            let f = &self.factors;
            A::rank_update(f.alpha(1.0), f.b(), f.a(), w.view_mut());
        }
        w
    }

    /// W ← W + s·B A, as one rank-r update into W (no d×k temporary).
    ///
    /// For r ≤ [`MAX_FUSED_RANK`](crate::MAX_FUSED_RANK) on a SIMD CPU this runs ndlora's
    /// fused kernel, which streams W once (the
    /// [`gemm_counters`](crate::gemm_counters) count it as `fused_updates`); otherwise BLAS
    /// gemm forms s·B A one band of rows at a time into a small temporary, which is added to
    /// W (so the rounding below holds with any BLAS). Large updates use
    /// [`set_blas_threads`](crate::set_blas_threads) threads.
    ///
    /// Errors, leaving the layer unchanged: already merged; a non-finite factor; or a result
    /// that would hold NaN/∞ ([`LoraError::WouldOverflow`]).
    ///
    /// # Accuracy
    /// Each merged element is the correctly rounded sum of Wᵢⱼ and s·(B A)ᵢⱼ as computed
    /// (the fused kernel forms Wᵢⱼ + s·accᵢⱼ with one FMA, acc being the r-term dot product,
    /// whose own error is the usual r-term bound). The fused kernel computes every element by
    /// the same FMA sequence, so the merged W equals [`effective_weight`](Self::effective_weight)
    /// bit for bit, whatever the layout and thread count. A merge → unmerge
    /// round trip therefore moves each element of W by at most 2·ε·(|W| + |s·B A|)ᵢⱼ
    /// (ε = `A::EPSILON`), and N cycles by at most N times that. Measured (`tests/layer.rs`,
    /// d×k = 33×65, r = 8, OpenBLAS and the pure-Rust fallback): 0.52·ε·(|W| + |s·B A|) in f32
    /// and 0.45·ε in f64 after one cycle, and the same after 10⁴ cycles: once rounded, W is a
    /// fixed point of merge∘unmerge, so the drift does not grow (the test allows 1·ε).
    /// [`merge_exact`](Self::merge_exact) makes the round trip exact.
    pub fn merge(&mut self) -> Result<()> {
        self.require_unmerged("merge")?;
        self.update_weight(1.0, "merge")?;
        self.merged = true;
        Ok(())
    }

    /// [`merge`](Self::merge), keeping a copy of the pre-merge W so that the next
    /// [`unmerge`](Self::unmerge) restores it **bit for bit** (no rounding drift, however
    /// many cycles). Costs a d×k copy of W, held until that unmerge.
    ///
    /// The copy is part of the value: it is compared by `==`, cloned, and serialised (field
    /// `unmerge_weight`), so a layer saved while merged this way still unmerges exactly after
    /// loading. [`is_merged_exact`](Self::is_merged_exact) tells which kind of merge is in
    /// effect.
    ///
    /// Errors as `merge` does, leaving the layer unchanged.
    ///
    /// ```
    /// use ndarray::Array2;
    /// use ndlora::{LoraConfig, LoraLayer};
    ///
    /// let w = Array2::<f32>::from_shape_fn((5, 7), |(i, j)| ((i * 7 + j) as f32).sin());
    /// let mut layer = LoraLayer::new(w.clone(), LoraConfig { rank: 2, ..Default::default() })?;
    /// layer.weight_b_mut()?.fill(0.3);
    /// for _ in 0..100 {
    ///     layer.merge_exact()?;
    ///     layer.unmerge()?;
    /// }
    /// assert_eq!(layer.base_weight(), w); // bit for bit
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn merge_exact(&mut self) -> Result<()> {
        self.require_unmerged("merge_exact")?;
        let saved = self.base_weight.clone();
        self.update_weight(1.0, "merge")?;
        self.unmerge_weight = Some(saved);
        self.merged = true;
        Ok(())
    }

    /// Whether the layer is merged by [`merge_exact`](Self::merge_exact) (so `unmerge` will
    /// restore the kept copy of W exactly).
    pub fn is_merged_exact(&self) -> bool {
        self.unmerge_weight.is_some()
    }

    /// W ← W − s·B A; the inverse of [`merge`](Self::merge) up to rounding (see its
    /// *Accuracy* section). After [`merge_exact`](Self::merge_exact) it restores the kept W
    /// exactly instead, and frees the copy. Errors as `merge` does, or when not merged,
    /// leaving the layer unchanged.
    pub fn unmerge(&mut self) -> Result<()> {
        self.require_merged("unmerge")?;
        if let Some(saved) = self.unmerge_weight.take() {
            self.w_abs_bound = max_abs(saved.view());
            self.base_weight = saved;
        } else {
            self.update_weight(-1.0, "unmerge")?;
        }
        self.merged = false;
        Ok(())
    }

    /// W ← W + sign·s·B A after proving the result finite.
    fn update_weight(&mut self, sign: f64, operation: &'static str) -> Result<()> {
        let f = &self.factors;
        update_weight(
            self.base_weight.view_mut(),
            &mut self.w_abs_bound,
            f.a(),
            f.b(),
            f.alpha(sign),
            operation,
        )
    }

    fn forward_unchecked(
        &self,
        x: ArrayView2<'_, A>,
        out: ArrayViewMut2<'_, A>,
        scratch: Option<&mut LoraScratch<A::Factor>>,
    ) {
        let term = self.factors.term();
        let terms = if self.merged {
            &[][..]
        } else {
            std::slice::from_ref(&term)
        };
        let bias = self.bias.as_ref().map(|b| b.view());
        A::forward(x, self.base_weight.view(), bias, terms, out, scratch);
    }

    fn check_input(&self, x: ArrayView2<'_, A>) -> Result<()> {
        check_input_width(x, self.in_features())
    }

    /// A loaded `unmerge_weight` must belong to a merged layer, be d×k and finite. (That it
    /// is the pre-merge W cannot be checked exactly; it is trusted like the rest of W.)
    fn check_unmerge_weight(&self, saved: &Array2<A>) -> Result<()> {
        if !self.merged {
            return Err(LoraError::InvalidValue {
                what: "unmerge_weight",
                expected: "present only in a merged layer (written by merge_exact)",
                got: "a weight in an unmerged layer".into(),
            });
        }
        check_shape(
            "unmerge_weight",
            saved.shape(),
            &[self.out_features(), self.in_features()],
        )?;
        check_finite("unmerge_weight", saved.view())
    }

    pub(crate) fn require_unmerged(&self, operation: &'static str) -> Result<()> {
        if self.merged {
            return Err(LoraError::MergeState {
                operation,
                expected: false,
            });
        }
        Ok(())
    }

    fn require_merged(&self, operation: &'static str) -> Result<()> {
        if !self.merged {
            return Err(LoraError::MergeState {
                operation,
                expected: true,
            });
        }
        Ok(())
    }
}

/// The serialised form: all state, validated again on load.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerRepr<W, V, F> {
    base_weight: W,
    weight_a: F,
    weight_b: F,
    /// Absent in documents written before layers had a bias, hence the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bias: Option<V>,
    config: LoraConfig,
    scaling: f64,
    merged: bool,
    dropout_rng: ChaCha8Rng,
    /// The pre-merge W kept by `merge_exact`; absent otherwise (and in older documents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unmerge_weight: Option<W>,
}

impl<A: LoraFloat> Serialize for LoraLayer<A> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        LayerRepr {
            base_weight: self.base_weight.view(),
            weight_a: self.factors.a(),
            weight_b: self.factors.b(),
            bias: self.bias.as_ref(),
            config: self.config().clone(),
            scaling: self.scaling(),
            merged: self.merged,
            dropout_rng: self.dropout_rng.clone(),
            unmerge_weight: self.unmerge_weight.as_ref().map(|w| w.view()),
        }
        .serialize(serializer)
    }
}

impl<'de, A: LoraFloat> Deserialize<'de> for LoraLayer<A> {
    /// Validates like [`LoraLayer::from_parts`] and [`LoraLayer::with_bias`]: a document with
    /// inconsistent shapes, a bad config or non-finite values is an error. A document without
    /// a `bias` field loads as a layer without bias.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let r = LayerRepr::<Array2<A>, Array1<A>, Array2<A::Factor>>::deserialize(deserializer)?;
        let mut layer = Self::from_state(
            r.base_weight,
            r.weight_a,
            r.weight_b,
            r.config,
            r.scaling,
            r.merged,
        )
        .map_err(serde::de::Error::custom)?;
        if let Some(bias) = r.bias {
            layer = layer.with_bias(bias).map_err(serde::de::Error::custom)?;
        }
        if let Some(saved) = r.unmerge_weight {
            layer
                .check_unmerge_weight(&saved)
                .map_err(serde::de::Error::custom)?;
            layer.unmerge_weight = Some(AlignedMatrix::new(saved));
        }
        layer.dropout_rng = r.dropout_rng;
        Ok(layer)
    }
}
