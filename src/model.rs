//! [`LoraModel`]: several named adapters on one frozen weight, with per-row mixed batches.

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};

use crate::aligned::AlignedMatrix;
use crate::check::{check_finite, check_input_width, check_weight_dims, max_abs};
use crate::config::LoraConfig;
use crate::error::{shape_str, LoraError, Result};
use crate::factors::Factors;
use crate::float::LoraFloat;
use crate::layer::LoraLayer;
use crate::matmul::blas_operand;
use crate::merge::{magnitude_limit, update_magnitude_bound, update_weight};

/// One named adapter: its factors A (r×k), B (d×r), config and scaling s.
#[derive(Debug, Clone, PartialEq)]
struct Adapter<A: LoraFloat> {
    name: String,
    factors: Factors<A::Factor>,
}

/// Several named LoRA adapters sharing one frozen weight W (d×k).
///
/// Each adapter j has its own rank rⱼ, factors Aⱼ (rⱼ×k), Bⱼ (d×rⱼ) and scaling sⱼ. Adapters
/// are addressed by name, and by a numeric id (returned by `add_adapter*`, looked up with
/// [`adapter_id`](Self::adapter_id)) in [`forward_mixed`](Self::forward_mixed). Ids are
/// stable: a removed adapter's id is never reused.
///
/// * [`forward`](Self::forward): Y = X Wᵀ + Σ_{j active, unmerged} sⱼ·(X Aⱼᵀ) Bⱼᵀ
/// * [`forward_mixed`](Self::forward_mixed): row i uses its own adapter (or none):
///   yᵢ = xᵢ Wᵀ + s_{j(i)}·(xᵢ A_{j(i)}ᵀ) B_{j(i)}ᵀ, with one shared base gemm
/// * [`merge`](Self::merge): W ← W + sⱼ·Bⱼ Aⱼ; [`unmerge_all`](Self::unmerge_all) undoes the
///   merges in reverse order
///
/// Every fallible method validates first: an error leaves the model unchanged.
///
/// ```
/// use ndarray::Array2;
/// use ndlora::{LoraConfig, LoraModel};
///
/// let (d, k) = (6, 5);
/// let mut model = LoraModel::new(Array2::<f64>::eye(6).slice_move(ndarray::s![.., ..k]))?;
/// let cfg = |rank| LoraConfig { rank, alpha: 2.0, ..Default::default() };
/// let en = model.add_adapter_from_parts("en", Array2::ones((1, k)), Array2::ones((d, 1)), cfg(1))?;
/// let de = model.add_adapter("de", cfg(2))?; // B = 0: changes nothing yet
///
/// let x = Array2::from_elem((3, k), 1.0);
/// let y = model.forward_mixed(x.view(), &[Some(en), None, Some(de)])?;
/// // row 0: x Wᵀ + 2·(x Aᵀ) Bᵀ = 1 + 2·5; rows 1 and 2: just x Wᵀ.
/// assert_eq!(y[[0, 0]], 11.0);
/// assert_eq!(y[[1, 0]], 1.0);
/// assert_eq!(y[[2, 0]], 1.0);
///
/// model.set_active(&["en"])?;
/// assert_eq!(model.forward(x.view())?.row(0), y.row(0));
/// model.merge_active()?;
/// assert!(model.is_merged("en")?);
/// model.unmerge_all()?;
/// # Ok::<(), ndlora::LoraError>(())
/// ```
#[derive(Debug, Clone)]
pub struct LoraModel<A: LoraFloat> {
    /// W, on a 64-byte boundary (see [`AlignedMatrix`]).
    base_weight: AlignedMatrix<A>,
    /// An upper bound on max |Wᵢⱼ| (a cache, see `update::update_weight`).
    w_abs_bound: f64,
    /// Indexed by id; `None` once removed.
    slots: Vec<Option<Adapter<A>>>,
    /// Active ids, in the order given to `set_active`.
    active: Vec<usize>,
    /// Merged ids, in merge order.
    merged: Vec<usize>,
}

impl<A: LoraFloat> PartialEq for LoraModel<A> {
    /// Equal weights, adapters (with ids), active set and merge order; ignores the cached bound.
    fn eq(&self, other: &Self) -> bool {
        self.base_weight == other.base_weight
            && self.slots == other.slots
            && self.active == other.active
            && self.merged == other.merged
    }
}

impl<A: LoraFloat> LoraModel<A> {
    /// A model with the frozen weight W (d×k) and no adapters. W is kept on a 64-byte
    /// boundary as a [`LoraLayer`] keeps it (see its *Memory* section): an array that is not
    /// is copied once.
    ///
    /// Errors: d or k is 0 ([`LoraError::ShapeMismatch`]); a non-finite weight
    /// ([`LoraError::NonFinite`]).
    ///
    /// ```
    /// let model = ndlora::LoraModel::new(ndarray::Array2::<f32>::zeros((4, 3)))?;
    /// assert_eq!((model.out_features(), model.in_features()), (4, 3));
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn new(base_weight: Array2<A>) -> Result<Self> {
        let (d, k) = base_weight.dim();
        check_weight_dims(d, k)?;
        check_finite("base_weight", base_weight.view())?;
        let w_abs_bound = max_abs(base_weight.view());
        Ok(Self {
            base_weight: AlignedMatrix::new(base_weight),
            w_abs_bound,
            slots: Vec::new(),
            active: Vec::new(),
            merged: Vec::new(),
        })
    }

    /// The weight W (d×k); holds W + Σ sⱼ·Bⱼ Aⱼ over the merged adapters.
    pub fn base_weight(&self) -> ArrayView2<'_, A> {
        self.base_weight.view()
    }

    /// k, the input width.
    pub fn in_features(&self) -> usize {
        self.base_weight.ncols()
    }

    /// d, the output width.
    pub fn out_features(&self) -> usize {
        self.base_weight.nrows()
    }

    /// Adds a new adapter initialised exactly as [`LoraLayer::new`] would (A from
    /// `config.init` and `config.seed`, B = 0, so it changes nothing yet) and returns its id.
    ///
    /// Errors: the name is taken ([`LoraError::DuplicateAdapter`]); the config is invalid
    /// for W (as in `LoraLayer::new`).
    ///
    /// ```
    /// use ndarray::Array2;
    /// use ndlora::{LoraConfig, LoraLayer, LoraModel};
    /// let w = Array2::<f32>::ones((8, 6));
    /// let cfg = LoraConfig { rank: 3, ..Default::default() };
    /// let mut model = LoraModel::new(w.clone())?;
    /// let id = model.add_adapter("a", cfg.clone())?;
    /// assert_eq!(model.weight_a("a")?, LoraLayer::new(w, cfg)?.weight_a());
    /// assert_eq!(model.adapter_id("a"), Some(id));
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn add_adapter(&mut self, name: &str, config: LoraConfig) -> Result<usize> {
        self.require_new_name(name)?;
        let (d, k) = self.base_weight.dim();
        let factors = Factors::new(d, k, config)?;
        Ok(self.push(name, factors))
    }

    /// Adds an adapter with trained factors A (r×k) and B (d×r), r = `config.rank`, and
    /// returns its id. The scaling is `config.scaling()`.
    ///
    /// Errors: the name is taken; an invalid config; wrong shapes; non-finite factors; a
    /// scaling not finite in `A`.
    pub fn add_adapter_from_parts(
        &mut self,
        name: &str,
        weight_a: Array2<A::Factor>,
        weight_b: Array2<A::Factor>,
        config: LoraConfig,
    ) -> Result<usize> {
        self.require_new_name(name)?;
        let scaling = config.scaling();
        let dims = self.base_weight.dim();
        let factors = Factors::from_parts(dims, weight_a, weight_b, config, scaling, || Ok(()))?;
        Ok(self.push(name, factors))
    }

    /// Removes an adapter (and deactivates it). Its id is never given out again.
    ///
    /// Errors: unknown name; the adapter is merged ([`LoraError::MergeState`]): unmerge first.
    ///
    /// ```
    /// use ndarray::Array2;
    /// use ndlora::{LoraConfig, LoraModel};
    /// let mut model = LoraModel::new(Array2::<f32>::ones((4, 4)))?;
    /// let cfg = LoraConfig { rank: 1, ..Default::default() };
    /// model.add_adapter("old", cfg.clone())?;
    /// model.remove_adapter("old")?;
    /// assert_eq!(model.add_adapter("new", cfg)?, 1); // id 0 is never reused
    /// assert_eq!(model.adapter_names(), ["new"]);
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        let id = self.id_of(name)?;
        self.require_unmerged(id, "remove_adapter")?;
        self.slots[id] = None;
        self.active.retain(|&a| a != id);
        Ok(())
    }

    /// The id of the adapter called `name`, if there is one.
    pub fn adapter_id(&self, name: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|a| a.name == name))
    }

    /// The names of all adapters, in id order.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.slots
            .iter()
            .flatten()
            .map(|a| a.name.as_str())
            .collect()
    }

    /// Makes exactly these adapters active (an empty list: none). [`forward`](Self::forward)
    /// adds every active, unmerged adapter; [`merge_active`](Self::merge_active) merges them.
    ///
    /// Errors: an unknown name; a name listed twice ([`LoraError::DuplicateAdapter`]).
    ///
    /// ```
    /// use ndarray::Array2;
    /// use ndlora::{LoraConfig, LoraModel};
    /// let mut model = LoraModel::new(Array2::<f64>::zeros((2, 2)))?;
    /// let cfg = LoraConfig { rank: 1, alpha: 1.0, ..Default::default() };
    /// model.add_adapter_from_parts("a", Array2::ones((1, 2)), Array2::ones((2, 1)), cfg.clone())?;
    /// model.add_adapter_from_parts("b", Array2::ones((1, 2)), Array2::ones((2, 1)), cfg)?;
    /// model.set_active(&["a", "b"])?;
    /// let y = model.forward(Array2::ones((1, 2)).view())?;
    /// assert_eq!(y, ndarray::array![[4.0, 4.0]]); // 0 + 2 + 2
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        let mut ids = Vec::with_capacity(names.len());
        for name in names {
            let id = self.id_of(name)?;
            if ids.contains(&id) {
                return Err(LoraError::DuplicateAdapter {
                    name: (*name).to_owned(),
                });
            }
            ids.push(id);
        }
        self.active = ids;
        Ok(())
    }

    /// The active adapters' names, in the order given to [`set_active`](Self::set_active).
    pub fn active_adapters(&self) -> Vec<&str> {
        self.active
            .iter()
            .map(|&id| self.adapter(id).name.as_str())
            .collect()
    }

    /// Y = X Wᵀ + Σ_{j active, unmerged} sⱼ·(X Aⱼᵀ) Bⱼᵀ for X of shape n×k (any layout;
    /// n may be 0). Merged adapters are in W already, active or not.
    ///
    /// Errors: `x` is not n×k.
    pub fn forward(&self, x: ArrayView2<'_, A>) -> Result<Array2<A>> {
        self.check_input(x)?;
        let mut y = Array2::zeros((x.nrows(), self.out_features()));
        let unmerged = || {
            self.active
                .iter()
                .filter(|id| !self.merged.contains(id))
                .map(|&id| &self.adapter(id).factors)
        };
        let terms: Vec<_> = unmerged().map(|f| f.term()).collect();
        A::forward(x, self.base_weight.view(), None, &terms, y.view_mut(), None);
        Ok(y)
    }

    /// A mixed batch: row i of X goes through adapter `adapter_of_row[i]` (`None`: the base
    /// weight only), as if each row ran through its own [`LoraLayer`]. The active set plays
    /// no part.
    ///
    /// Cost: one base product Y = X Wᵀ for the whole batch (ndlora's skinny kernel for up to
    /// [`N_SKINNY`](crate::N_SKINNY) rows, else a gemm), then per adapter used one gemm pair
    /// for its rows, at its own rank (no padding). Rows evenly spaced in the batch (contiguous
    /// ones in particular) are handled as one strided view of X and of Y, with the update
    /// written straight into Y (β = 1, no copy); other row sets are gathered, and their
    /// update is added back row by row.
    ///
    /// Errors: `adapter_of_row.len()` ≠ n or `x` not n×k ([`LoraError::ShapeMismatch`]); an
    /// unknown id ([`LoraError::UnknownAdapterId`]); any adapter merged
    /// ([`LoraError::MergeState`]): W would no longer be the base.
    ///
    /// ```
    /// use ndarray::Array2;
    /// use ndlora::{LoraConfig, LoraModel};
    /// let mut model = LoraModel::new(Array2::<f32>::zeros((2, 2)))?;
    /// let cfg = LoraConfig { rank: 1, alpha: 1.0, ..Default::default() };
    /// let a = model.add_adapter_from_parts("a", Array2::ones((1, 2)), Array2::ones((2, 1)), cfg.clone())?;
    /// let b = model.add_adapter_from_parts("b", Array2::ones((1, 2)), -Array2::ones((2, 1)), cfg)?;
    /// let x = Array2::ones((3, 2));
    /// let y = model.forward_mixed(x.view(), &[Some(a), Some(b), None])?;
    /// assert_eq!(y, ndarray::array![[2.0, 2.0], [-2.0, -2.0], [0.0, 0.0]]);
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn forward_mixed(
        &self,
        x: ArrayView2<'_, A>,
        adapter_of_row: &[Option<usize>],
    ) -> Result<Array2<A>> {
        self.check_input(x)?;
        let n = x.nrows();
        if adapter_of_row.len() != n {
            return Err(LoraError::ShapeMismatch {
                what: "adapter_of_row",
                expected: shape_str(&[n]),
                got: shape_str(&[adapter_of_row.len()]),
            });
        }
        if !self.merged.is_empty() {
            return Err(LoraError::MergeState {
                operation: "forward_mixed",
                expected: false,
            });
        }
        let mut rows_of: Vec<Vec<usize>> = vec![Vec::new(); self.slots.len()];
        for (i, &id) in adapter_of_row.iter().enumerate() {
            if let Some(id) = id {
                self.require_id(id)?;
                rows_of[id].push(i);
            }
        }
        let mut y = Array2::zeros((n, self.out_features()));
        A::forward(x, self.base_weight.view(), None, &[], y.view_mut(), None);
        // The branches read X in the factor type (a copy only for the half types).
        let x = A::widen(x);
        let x = blas_operand(x.view());
        let x = x.view();
        for (id, rows) in rows_of.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            let term = [self.adapter(id).factors.term()];
            if let Some(step) = even_step(rows) {
                let (first, last) = (rows[0], rows[rows.len() - 1]);
                let sl = s![first..last + 1;step as isize, ..];
                A::add_terms(x.slice(sl), &term, y.slice_mut(sl), None);
            } else {
                let xj = x.select(Axis(0), rows);
                let mut yj = y.select(Axis(0), rows);
                A::add_terms(xj.view(), &term, yj.view_mut(), None);
                for (u, &i) in yj.rows().into_iter().zip(rows) {
                    y.row_mut(i).assign(&u);
                }
            }
        }
        Ok(y)
    }

    /// W ← W + s·B A for one adapter (a rank-r update into W, as [`LoraLayer::merge`]).
    ///
    /// Errors, leaving the model unchanged: unknown name; already merged; a non-finite factor;
    /// a result that would hold NaN/∞ ([`LoraError::WouldOverflow`]).
    ///
    /// ```
    /// use ndarray::Array2;
    /// use ndlora::{LoraConfig, LoraModel};
    /// let mut model = LoraModel::new(Array2::<f64>::zeros((2, 2)))?;
    /// let cfg = LoraConfig { rank: 1, alpha: 1.0, ..Default::default() };
    /// model.add_adapter_from_parts("a", Array2::ones((1, 2)), Array2::ones((2, 1)), cfg)?;
    /// model.merge("a")?;
    /// assert_eq!(model.base_weight(), Array2::<f64>::ones((2, 2)));
    /// model.unmerge("a")?;
    /// assert_eq!(model.base_weight(), Array2::<f64>::zeros((2, 2)));
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn merge(&mut self, name: &str) -> Result<()> {
        let id = self.id_of(name)?;
        self.require_unmerged(id, "merge")?;
        self.update_many(&[id], 1.0, "merge")?;
        self.merged.push(id);
        Ok(())
    }

    /// Merges every active adapter that is not merged yet, in active order. All or nothing:
    /// on error W is exactly as before (errors as [`merge`](Self::merge)).
    pub fn merge_active(&mut self) -> Result<()> {
        let ids: Vec<usize> = (self.active.iter().copied())
            .filter(|id| !self.merged.contains(id))
            .collect();
        self.update_many(&ids, 1.0, "merge")?;
        self.merged.extend(ids);
        Ok(())
    }

    /// W ← W − s·B A for one merged adapter: the inverse of [`merge`](Self::merge) up to
    /// rounding. Merges commute, so any merged adapter may be unmerged.
    ///
    /// Errors: unknown name; not merged; as `merge` otherwise.
    pub fn unmerge(&mut self, name: &str) -> Result<()> {
        let id = self.id_of(name)?;
        if !self.merged.contains(&id) {
            return Err(LoraError::MergeState {
                operation: "unmerge",
                expected: true,
            });
        }
        self.update_many(&[id], -1.0, "unmerge")?;
        self.merged.retain(|&m| m != id);
        Ok(())
    }

    /// Unmerges every merged adapter, the last merged first. All or nothing, like
    /// [`merge_active`](Self::merge_active). Afterwards W is the base weight again, up to
    /// rounding: each element moves by at most a few ulps of |W| + Σⱼ|sⱼ·Bⱼ Aⱼ|.
    pub fn unmerge_all(&mut self) -> Result<()> {
        let ids: Vec<usize> = self.merged.iter().rev().copied().collect();
        self.update_many(&ids, -1.0, "unmerge")?;
        self.merged.clear();
        Ok(())
    }

    /// Whether the adapter's s·B A is folded into W. Errors: unknown name.
    pub fn is_merged(&self, name: &str) -> Result<bool> {
        Ok(self.merged.contains(&self.id_of(name)?))
    }

    /// The adapter's factor A (r×k). Errors: unknown name.
    pub fn weight_a(&self, name: &str) -> Result<ArrayView2<'_, A::Factor>> {
        Ok(self.adapter(self.id_of(name)?).factors.a())
    }

    /// The adapter's factor B (d×r). Errors: unknown name.
    pub fn weight_b(&self, name: &str) -> Result<ArrayView2<'_, A::Factor>> {
        Ok(self.adapter(self.id_of(name)?).factors.b())
    }

    /// A mutable view of the adapter's A, to train it. Errors: unknown name; merged.
    pub fn weight_a_mut(&mut self, name: &str) -> Result<ArrayViewMut2<'_, A::Factor>> {
        let id = self.id_of(name)?;
        self.require_unmerged(id, "weight_a_mut")?;
        Ok(self.adapter_mut(id).factors.a_mut())
    }

    /// A mutable view of the adapter's B, to train it. Errors: unknown name; merged.
    pub fn weight_b_mut(&mut self, name: &str) -> Result<ArrayViewMut2<'_, A::Factor>> {
        let id = self.id_of(name)?;
        self.require_unmerged(id, "weight_b_mut")?;
        Ok(self.adapter_mut(id).factors.b_mut())
    }

    /// The adapter's configuration. Errors: unknown name.
    pub fn config(&self, name: &str) -> Result<&LoraConfig> {
        Ok(self.adapter(self.id_of(name)?).factors.config())
    }

    /// The adapter's scaling s. Errors: unknown name.
    pub fn scaling(&self, name: &str) -> Result<f64> {
        Ok(self.adapter(self.id_of(name)?).factors.scaling())
    }

    /// The adapter as a standalone [`LoraLayer`] on a copy of W (unmerged).
    ///
    /// Errors: unknown name; any adapter merged ([`LoraError::MergeState`]): W is then not
    /// the base weight.
    ///
    /// ```
    /// use ndarray::Array2;
    /// use ndlora::{LoraConfig, LoraModel};
    /// let mut model = LoraModel::new(Array2::<f32>::eye(3))?;
    /// let id = model.add_adapter("a", LoraConfig { rank: 2, ..Default::default() })?;
    /// model.weight_b_mut("a")?.fill(0.1);
    /// let layer = model.to_layer("a")?;
    /// let x = Array2::ones((2, 3));
    /// // Equal up to rounding: below `N_SKINNY` rows the layer's one-pass kernel and the
    /// // mixed batch's per-adapter products add the terms in different orders.
    /// let (y_layer, y_mixed) = (layer.forward(x.view())?, model.forward_mixed(x.view(), &[Some(id); 2])?);
    /// assert!(y_layer.abs_diff_eq(&y_mixed, 1e-6));
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn to_layer(&self, name: &str) -> Result<LoraLayer<A>> {
        let id = self.id_of(name)?;
        if !self.merged.is_empty() {
            return Err(LoraError::MergeState {
                operation: "to_layer",
                expected: false,
            });
        }
        let f = &self.adapter(id).factors;
        let mut layer = LoraLayer::from_parts(
            self.base_weight.clone().into_inner(),
            f.a().to_owned(),
            f.b().to_owned(),
            f.config().clone(),
        )?;
        layer.set_scaling(f.scaling())?;
        Ok(layer)
    }

    /// W ← W + sign·Σ sⱼ·Bⱼ Aⱼ over `ids` in order, all or nothing. When the cheap bound
    /// proves every partial sum finite, no step can fail; otherwise W is backed up first.
    fn update_many(&mut self, ids: &[usize], sign: f64, operation: &'static str) -> Result<()> {
        let mut total = 0.0;
        for &id in ids {
            let f = &self.adapter(id).factors;
            f.check_finite()?;
            total += update_magnitude_bound(f.a(), f.b(), f.alpha(sign));
        }
        let backup = (ids.len() > 1 && self.w_abs_bound + total >= magnitude_limit::<A>())
            .then(|| (self.base_weight.clone(), self.w_abs_bound));
        for &id in ids {
            let f = &self.slots[id].as_ref().expect("ids are validated").factors;
            if let Err(e) = update_weight(
                self.base_weight.view_mut(),
                &mut self.w_abs_bound,
                f.a(),
                f.b(),
                f.alpha(sign),
                operation,
            ) {
                // Only a single update (which leaves W unchanged itself) or a backed-up batch
                // can fail: the bound above proves the other batches finite.
                if let Some((w, bound)) = backup {
                    self.base_weight = w;
                    self.w_abs_bound = bound;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn push(&mut self, name: &str, factors: Factors<A::Factor>) -> usize {
        self.slots.push(Some(Adapter {
            name: name.to_owned(),
            factors,
        }));
        self.slots.len() - 1
    }

    fn require_new_name(&self, name: &str) -> Result<()> {
        if self.adapter_id(name).is_some() {
            return Err(LoraError::DuplicateAdapter {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn id_of(&self, name: &str) -> Result<usize> {
        self.adapter_id(name)
            .ok_or_else(|| LoraError::UnknownAdapter {
                name: name.to_owned(),
            })
    }

    fn require_id(&self, id: usize) -> Result<()> {
        match self.slots.get(id) {
            Some(Some(_)) => Ok(()),
            _ => Err(LoraError::UnknownAdapterId { id }),
        }
    }

    /// The adapter with a validated id.
    fn adapter(&self, id: usize) -> &Adapter<A> {
        self.slots[id].as_ref().expect("ids are validated")
    }

    fn adapter_mut(&mut self, id: usize) -> &mut Adapter<A> {
        self.slots[id].as_mut().expect("ids are validated")
    }

    fn require_unmerged(&self, id: usize, operation: &'static str) -> Result<()> {
        if self.merged.contains(&id) {
            return Err(LoraError::MergeState {
                operation,
                expected: false,
            });
        }
        Ok(())
    }

    fn check_input(&self, x: ArrayView2<'_, A>) -> Result<()> {
        check_input_width(x, self.in_features())
    }
}

/// The common difference of increasing `rows` if they are evenly spaced (1 = contiguous).
fn even_step(rows: &[usize]) -> Option<usize> {
    match rows {
        [] => None,
        [_] => Some(1),
        [a, b, ..] => {
            let step = b - a;
            rows.windows(2).all(|w| w[1] - w[0] == step).then_some(step)
        }
    }
}
