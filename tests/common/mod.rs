//! What the integration tests share, one copy each: the f64 references, random data and
//! layers with fixed seeds, input layouts, tolerance checks, the bitwise "fails and leaves it
//! unchanged" check and the counting allocator.
//!
//! Every test binary uses a different part of it, so unused items are not warnings here (and
//! unused re-exports below neither; imports inside the submodules are still checked).
#![allow(dead_code)]

pub mod alloc;
pub mod checkpoint;
pub mod dirs;
pub mod fixtures;
pub mod half;
pub mod layout;
pub mod micro_ref;
pub mod random;
pub mod reference;
pub mod state;

#[allow(unused_imports)]
pub use self::{
    dirs::temp_dir,
    half::{ulp_stats, ulps, Half},
    layout::{Laid, Layout, LAYOUTS},
    random::{random, random_layer, random_layer_with, rng},
    reference::{assert_close, matmul_t, to_f64, Ref},
    state::{bits, expect_error, fails_unchanged, State},
};
