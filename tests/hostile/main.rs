//! The hostile-input catalogue: every public `Result` API of ndlora called with wrong shapes,
//! zero sizes, NaN/±∞ in weights, inputs, gradients and learning rates, bad ranks, sizes whose
//! products overflow `usize`, corrupt serde documents, truncated and bit-flipped safetensors
//! files and contradictory PEFT configs. One module per subject: `layer`, `model`, `micro`,
//! `peft`, `checkpoint` (whole-checkpoint merges: corrupt shards and indexes, mismatched
//! adapters, output paths), `files` (adapter paths that are not regular files, oversized or
//! overflowing headers, unbounded patterns, layers the writer must refuse) and `half` (what
//! only bf16 and f16 meet: f16's range, subnormals, NaN/∞ bit patterns in documents, BF16/F16
//! and F32 PEFT tensors in half adapters). The `layer` and `model` categories run for f32,
//! f64, bf16 and f16, each type as its own test.
//!
//! Each case asserts the specific error variant (with its key fields) and that the value the
//! method was called on is unchanged bit for bit (`common::State`: serialised state plus the
//! raw bits of every array, since NaN ≠ NaN). Cases are counted per category; the counts are
//! asserted so that the number quoted in the README is the number that ran. The truncation and
//! bit-flip sweeps are counted separately (they are generated, one case per prefix / per
//! flipped bit).
//!
//! Plain tests at the end of `layer.rs` check LoraLayer's error paths one subject at a time,
//! and the focused test files (`tests/micro.rs`, `tests/peft.rs`) some of the others; this is
//! the systematic catalogue.

#[path = "../common/mod.rs"]
mod common;

mod checkpoint;
mod files;
mod half;
mod layer;
mod micro;
mod model;
mod peft;

use std::fmt::Debug;

use common::{expect_error, fails_unchanged, State};
use ndlora::{LoraConfig, LoraError, LoraFloat};

// ---------------------------------------------------------------------------------------------
// Counting.

/// Expected number of cases per category (asserted by each category's test).
const LAYER_CONSTRUCT: usize = 48; // × 4 float types, counted once per type
const LAYER_METHODS: usize = 77;
const LAYER_SERDE: usize = 27;
const MODEL: usize = 86;
const MICRO: usize = 47;
const MICRO_SERDE: usize = 13;
const PEFT_CONFIG: usize = 32;
const PEFT_TENSORS_AND_LAYERS: usize = 21;
/// f16 only: results beyond its range in merge, unmerge, forward and backward.
const HALF_F16_RANGE: usize = 13;
/// Per half type: subnormals, NaN/∞ bit patterns in documents, PEFT files into half adapters.
const HALF_SUBNORMALS: usize = 7;
const HALF_SERDE: usize = 20;
const HALF_PEFT: usize = 32;
/// Hand-written cases in the catalogue.
const TOTAL: usize = LAYER_CONSTRUCT
    + LAYER_METHODS
    + LAYER_SERDE
    + MODEL
    + MICRO
    + MICRO_SERDE
    + PEFT_CONFIG
    + PEFT_TENSORS_AND_LAYERS
    + HALF_F16_RANGE
    + HALF_SUBNORMALS
    + HALF_SERDE
    + HALF_PEFT
    + files::CASES
    + checkpoint::CASES;

/// A boxed check on an error, for tables of cases.
type Check = Box<dyn Fn(&LoraError) -> bool>;

/// Counts the cases of one category.
#[derive(Default)]
struct Tally {
    cases: usize,
}

impl Tally {
    /// Asserts that `result` is an error matching `expected` (`common::expect_error`).
    #[track_caller]
    fn err<T: Debug>(
        &mut self,
        name: &str,
        result: Result<T, LoraError>,
        expected: impl Fn(&LoraError) -> bool,
    ) {
        self.cases += 1;
        expect_error(name, result, expected);
    }

    /// Runs `op` on a clone of `original`, asserts the error, and that the clone did not
    /// change (`common::fails_unchanged`).
    #[track_caller]
    fn unchanged<V: State, T: Debug>(
        &mut self,
        name: &str,
        original: &V,
        op: impl FnOnce(&mut V) -> Result<T, LoraError>,
        expected: impl Fn(&LoraError) -> bool,
    ) {
        self.cases += 1;
        fails_unchanged(name, original, op, expected);
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs shared by the subjects.

fn cfg(rank: usize) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 3.0,
        ..Default::default()
    }
}

fn nonfinite<A: LoraFloat>() -> [A; 3] {
    [A::nan(), A::infinity(), A::neg_infinity()]
}

/// Whether `A`'s factors (and so its scaling and learning rates) are f32: true for f32 and
/// the half types.
fn factor_is_f32<A: LoraFloat>() -> bool {
    <A::Factor as LoraFloat>::NAME == "f32"
}

#[test]
fn catalogue_size() {
    println!("hostile catalogue: {TOTAL} hand-written cases (×4 float types for LoraLayer and LoraModel)");
    assert_eq!(TOTAL, 351 + 72 + 52 + 33);
}
