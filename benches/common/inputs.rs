//! Inputs shared by the benches (`#[path]`-included): random matrices and a trained layer.

#![allow(dead_code)]

use ndarray::Array2;
use ndlora::{LoraConfig, LoraFloat, LoraLayer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A rows×cols matrix of uniform values in [−1, 1).
pub fn random<A: LoraFloat<Factor = A>>(
    rng: &mut ChaCha8Rng,
    rows: usize,
    cols: usize,
) -> Array2<A> {
    Array2::from_shape_simple_fn((rows, cols), || {
        A::from_f64_lossy(rng.random_range(-1.0..1.0))
    })
}

/// A layer with random W, A and B (B ≠ 0, as after training).
pub fn trained_layer<A: LoraFloat<Factor = A>>(d: usize, k: usize, r: usize) -> LoraLayer<A> {
    let mut g = ChaCha8Rng::seed_from_u64(7);
    let config = LoraConfig {
        rank: r,
        alpha: 2.0 * r as f64,
        ..Default::default()
    };
    let (w, a, b) = (
        random(&mut g, d, k),
        random(&mut g, r, k),
        random(&mut g, d, r),
    );
    LoraLayer::from_parts(w, a, b, config).expect("valid layer")
}

/// `layer`'s W (and bias) rounded to the half type `H`, with the same f32 factors and
/// configuration: the half layer a user with an `H` model holds.
pub fn half_layer<H: LoraFloat<Factor = f32>>(layer: &LoraLayer<f32>) -> LoraLayer<H> {
    let w = layer
        .base_weight()
        .mapv(|v| H::from_f64_lossy(f64::from(v)));
    let (a, b) = (layer.weight_a().to_owned(), layer.weight_b().to_owned());
    LoraLayer::from_parts(w, a, b, layer.config().clone()).expect("valid layer")
}

/// `x` rounded to the half type `H`.
pub fn to_half<H: LoraFloat>(x: &Array2<f32>) -> Array2<H> {
    x.mapv(|v| H::from_f64_lossy(f64::from(v)))
}
