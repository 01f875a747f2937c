//! Test data with fixed seeds: the generator, uniform matrices and random layers.

use ndarray::Array2;
use ndlora::{LoraConfig, LoraFloat, LoraLayer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A deterministic generator for test data.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// rows×cols uniform in [-1, 1).
pub fn random<A: LoraFloat>(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<A> {
    Array2::from_shape_simple_fn((rows, cols), || {
        A::from_f64_lossy(rng.random_range(-1.0..1.0))
    })
}

/// A layer with random W, A, B (B ≠ 0) and α = 3 ≠ r, so scaling must touch only the LoRA
/// branch.
pub fn random_layer<A: LoraFloat>(d: usize, k: usize, r: usize, seed: u64) -> LoraLayer<A> {
    let config = LoraConfig {
        rank: r,
        alpha: 3.0,
        ..Default::default()
    };
    random_layer_with(d, k, config, seed)
}

/// A layer with `config` (r = `config.rank`) and random W (d×k), A (r×k), B (d×r), drawn in
/// that order from `rng(seed)`.
pub fn random_layer_with<A: LoraFloat>(
    d: usize,
    k: usize,
    config: LoraConfig,
    seed: u64,
) -> LoraLayer<A> {
    let mut g = rng(seed);
    let r = config.rank;
    LoraLayer::from_parts(
        random(&mut g, d, k),
        random(&mut g, r, k),
        random(&mut g, d, r),
        config,
    )
    .unwrap()
}
