//! Invariants over random shapes and values (proptest, deterministic seed per case).

mod common;

use common::{random, random_layer_with, rng, to_f64, Ref};
use ndarray::Array2;
use ndlora::{LoraConfig, LoraLayer};
use proptest::prelude::*;

/// (d, k, r, n, alpha, seed) with 1 ≤ r ≤ min(d, k).
fn shapes() -> impl Strategy<Value = (usize, usize, usize, usize, f64, u64)> {
    (
        1usize..40,
        1usize..40,
        0usize..40,
        -4.0f64..4.0,
        any::<u64>(),
    )
        .prop_flat_map(|(d, k, n, alpha, seed)| {
            (
                Just(d),
                Just(k),
                1..=d.min(k),
                Just(n),
                Just(alpha),
                Just(seed),
            )
        })
}

fn layer(d: usize, k: usize, r: usize, alpha: f64, seed: u64) -> LoraLayer<f64> {
    let cfg = LoraConfig {
        rank: r,
        alpha,
        ..Default::default()
    };
    random_layer_with(d, k, cfg, seed)
}

/// max |x − y| / (ε·magnitude): how many ε the two differ by, relative to the error scale.
fn eps_distance(x: &Array2<f64>, y: &Array2<f64>, magnitude: &Array2<f64>) -> f64 {
    x.iter()
        .zip(y.iter())
        .zip(magnitude.iter())
        .map(|((a, b), m)| (a - b).abs() / (f64::EPSILON * m + 1e-300))
        .fold(0.0, f64::max)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn merged_forward_equals_unmerged_forward((d, k, r, n, alpha, seed) in shapes()) {
        let mut l = layer(d, k, r, alpha, seed);
        let x: Array2<f64> = random(&mut rng(seed ^ 1), n, k);
        let y = l.forward(x.view()).unwrap();
        let mag = Ref::new(&l).forward_magnitude(&x);
        l.merge().unwrap();
        let y_merged = l.forward(x.view()).unwrap();
        prop_assert!(eps_distance(&y, &y_merged, &mag) <= 16.0);
    }

    #[test]
    fn unmerge_undoes_merge((d, k, r, _n, alpha, seed) in shapes()) {
        let mut l = layer(d, k, r, alpha, seed);
        let reference = Ref::new(&l);
        let mag = reference.w.mapv(f64::abs) + reference.delta_magnitude();
        l.merge().unwrap();
        l.unmerge().unwrap();
        prop_assert!(eps_distance(&to_f64(l.base_weight()), &reference.w, &mag) <= 2.0);
        prop_assert!(!l.is_merged());
    }

    #[test]
    fn zero_b_gives_the_frozen_output((d, k, r, n, alpha, seed) in shapes()) {
        let mut l = layer(d, k, r, alpha, seed);
        l.weight_b_mut().unwrap().fill(0.0);
        let x: Array2<f64> = random(&mut rng(seed ^ 2), n, k);
        let y = l.forward(x.view()).unwrap();
        let mut frozen = l.clone();
        frozen.merge().unwrap(); // W + s·0·A = W exactly
        prop_assert_eq!(frozen.base_weight(), l.base_weight());
        prop_assert_eq!(y, frozen.forward(x.view()).unwrap());
    }

    #[test]
    fn serde_round_trip_is_exact((d, k, r, _n, alpha, seed) in shapes(), merged in any::<bool>()) {
        let mut l = layer(d, k, r, alpha, seed);
        if merged {
            l.merge().unwrap();
        }
        let back: LoraLayer<f64> = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        prop_assert!(back == l);
    }

    #[test]
    fn forward_is_linear_in_x((d, k, r, n, alpha, seed) in shapes()) {
        // Y(X₁ + X₂) − X_sum·0 = Y(X₁) + Y(X₂): checks no hidden bias or state.
        let l = layer(d, k, r, alpha, seed);
        let x1: Array2<f64> = random(&mut rng(seed ^ 3), n, k);
        let x2: Array2<f64> = random(&mut rng(seed ^ 4), n, k);
        let sum = &x1 + &x2;
        let y = l.forward(sum.view()).unwrap();
        let y12 = l.forward(x1.view()).unwrap() + l.forward(x2.view()).unwrap();
        let reference = Ref::new(&l);
        let mag = reference.forward_magnitude(&x1.mapv(f64::abs)) + reference.forward_magnitude(&x2.mapv(f64::abs));
        prop_assert!(eps_distance(&y, &y12, &mag) <= 32.0);
    }
}
