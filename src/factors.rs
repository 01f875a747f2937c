//! The trainable half of a LoRA layer, shared by [`LoraLayer`](crate::LoraLayer) and each
//! adapter of a [`LoraModel`](crate::LoraModel): factors A (r×k) and B (d×r), the config
//! they were made with and the scaling s; their initialisation and validation. The factors
//! are in the layer's factor type ([`LoraFloat::Factor`]).

use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::check::{check_finite, check_scaling, check_shape};
use crate::config::{LoraConfig, LoraInit};
use crate::error::Result;
use crate::float::LoraFloat;
use crate::matmul::LoraTerm;

/// A (r×k), B (d×r), the config and the scaling s of one adapter. Every constructor
/// validates, so a `Factors` always has consistent shapes, finite values and a scaling that
/// is finite in `A`.
#[derive(Debug, Clone)]
pub(crate) struct Factors<A> {
    weight_a: Array2<A>,
    weight_b: Array2<A>,
    config: LoraConfig,
    scaling: f64,
}

impl<A: PartialEq> PartialEq for Factors<A> {
    /// Equal factors and config, and the same scaling bit for bit.
    fn eq(&self, other: &Self) -> bool {
        self.weight_a == other.weight_a
            && self.weight_b == other.weight_b
            && self.config == other.config
            && self.scaling.to_bits() == other.scaling.to_bits()
    }
}

impl<A: LoraFloat> Factors<A> {
    /// New factors for a d×k weight: A initialised per `config.init` from `config.seed`
    /// (sampled in f64, so f32 and f64 adapters with the same seed start from the same
    /// numbers; A depends only on r, k, init and seed), B = 0, s = `config.scaling()`.
    ///
    /// Errors: the config is invalid for d×k; the scaling is not finite in `A`.
    pub(crate) fn new(d: usize, k: usize, config: LoraConfig) -> Result<Self> {
        config.validate(d, k)?;
        let scaling = check_scaling::<A>(config.scaling())?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let r = config.rank;
        let weight_a = match config.init {
            LoraInit::Gaussian => {
                let normal = Normal::new(0.0, (1.0 / r as f64).sqrt()).expect("std > 0");
                Array2::from_shape_simple_fn((r, k), || A::from_f64_lossy(normal.sample(&mut rng)))
            }
            LoraInit::KaimingUniform => {
                let bound = 1.0 / (k as f64).sqrt();
                let uniform = Uniform::new(-bound, bound).expect("bound > 0");
                Array2::from_shape_simple_fn((r, k), || A::from_f64_lossy(uniform.sample(&mut rng)))
            }
        };
        Ok(Self {
            weight_a,
            weight_b: Array2::zeros((d, r)),
            config,
            scaling,
        })
    }

    /// Trained factors for a d×k weight, with r = `config.rank`.
    ///
    /// Errors, in this order: the config is invalid for d×k; A is not r×k or B not d×r; the
    /// scaling is not finite in `A`; `before_factors` (the caller's own check of its matrix,
    /// run here so that errors come in one order); a non-finite element of A or B.
    pub(crate) fn from_parts(
        (d, k): (usize, usize),
        weight_a: Array2<A>,
        weight_b: Array2<A>,
        config: LoraConfig,
        scaling: f64,
        before_factors: impl FnOnce() -> Result<()>,
    ) -> Result<Self> {
        config.validate(d, k)?;
        let r = config.rank;
        check_shape("weight_a", weight_a.shape(), &[r, k])?;
        check_shape("weight_b", weight_b.shape(), &[d, r])?;
        let scaling = check_scaling::<A>(scaling)?;
        before_factors()?;
        check_finite("weight_a", weight_a.view())?;
        check_finite("weight_b", weight_b.view())?;
        Ok(Self {
            weight_a,
            weight_b,
            config,
            scaling,
        })
    }

    /// Factor A (r×k).
    pub(crate) fn a(&self) -> ArrayView2<'_, A> {
        self.weight_a.view()
    }

    /// Factor B (d×r).
    pub(crate) fn b(&self) -> ArrayView2<'_, A> {
        self.weight_b.view()
    }

    /// A, writable in place (its shape cannot change). Values written here may be non-finite:
    /// every operation that needs finite factors checks them ([`check_finite`](Self::check_finite)).
    pub(crate) fn a_mut(&mut self) -> ArrayViewMut2<'_, A> {
        self.weight_a.view_mut()
    }

    /// B, writable in place; see [`a_mut`](Self::a_mut).
    pub(crate) fn b_mut(&mut self) -> ArrayViewMut2<'_, A> {
        self.weight_b.view_mut()
    }

    /// The config the factors were made with.
    pub(crate) fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// r.
    pub(crate) fn rank(&self) -> usize {
        self.config.rank
    }

    /// s.
    pub(crate) fn scaling(&self) -> f64 {
        self.scaling
    }

    /// Sets s. Errors (unchanged) if it is not finite in `A`.
    pub(crate) fn set_scaling(&mut self, scaling: f64) -> Result<()> {
        self.scaling = check_scaling::<A>(scaling)?;
        Ok(())
    }

    /// sign·s in `A`: the α of a merge (+1) or unmerge (−1) update W ← W + α·B A.
    pub(crate) fn alpha(&self, sign: f64) -> A {
        A::from_f64_lossy(sign * self.scaling)
    }

    /// Errors unless every element of A and B is finite (they can be written through
    /// [`a_mut`](Self::a_mut) and [`b_mut`](Self::b_mut)).
    pub(crate) fn check_finite(&self) -> Result<()> {
        check_finite("weight_a", self.a())?;
        check_finite("weight_b", self.b())
    }

    /// The branch as a term of a forward (`matmul::skinny_forward`).
    pub(crate) fn term(&self) -> LoraTerm<'_, A> {
        LoraTerm {
            a: self.a(),
            b: self.b(),
            scale: self.alpha(1.0),
        }
    }
}
