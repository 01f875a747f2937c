//! Adapter hyper-parameters and the scaling rule.

use serde::{Deserialize, Serialize};

use crate::error::{LoraError, Result};

/// How factor A is initialised (B always starts at zero, so a new adapter changes nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum LoraInit {
    /// A ~ N(0, 1/r).
    #[default]
    Gaussian,
    /// A ~ U(−1/√k, 1/√k): PEFT's default (`nn.Linear`'s Kaiming-uniform with a = √5).
    KaimingUniform,
}

/// LoRA hyper-parameters. Fields are public; start from `Default` and change what you need:
///
/// ```
/// use ndlora::LoraConfig;
/// let config = LoraConfig { rank: 4, alpha: 8.0, ..Default::default() };
/// assert_eq!(config.scaling(), 2.0);
/// let rs = LoraConfig { rank: 4, alpha: 8.0, use_rslora: true, ..Default::default() };
/// assert_eq!(rs.scaling(), 4.0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r of the update, 1 ≤ r ≤ min(d, k).
    pub rank: usize,
    /// α in the scaling s = α/r (or α/√r with `use_rslora`). Must be finite.
    pub alpha: f64,
    /// Dropout probability on the LoRA branch's input in training forwards, 0 ≤ p < 1.
    pub dropout: f64,
    /// Rank-stabilised scaling s = α/√r.
    pub use_rslora: bool,
    /// Initialisation of A.
    pub init: LoraInit,
    /// Seed for the initialisation and the dropout masks.
    pub seed: u64,
}

impl Default for LoraConfig {
    /// rank 8, α 8, no dropout, plain scaling, Gaussian init, seed 42.
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            init: LoraInit::Gaussian,
            seed: 42,
        }
    }
}

impl LoraConfig {
    /// s = α/r, or α/√r with `use_rslora`.
    pub fn scaling(&self) -> f64 {
        let r = self.rank as f64;
        if self.use_rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }

    /// Checks the config for a d×k weight: 1 ≤ rank ≤ min(d, k), α finite, 0 ≤ dropout < 1.
    pub fn validate(&self, out_features: usize, in_features: usize) -> Result<()> {
        let max = out_features.min(in_features);
        if self.rank == 0 || self.rank > max {
            return Err(LoraError::InvalidRank {
                got: self.rank,
                min: 1,
                max,
            });
        }
        if !self.alpha.is_finite() {
            return Err(LoraError::InvalidValue {
                what: "alpha",
                expected: "a finite number",
                got: self.alpha.to_string(),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::InvalidValue {
                what: "dropout",
                expected: "0 ≤ dropout < 1",
                got: self.dropout.to_string(),
            });
        }
        Ok(())
    }
}
