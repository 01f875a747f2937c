//! Invariants over random shapes and values (proptest, deterministic seed per case), in f64
//! and in bf16 (f32 factors, bounds derived in units of bf16's ε below).

mod common;

use common::{random, random_layer_with, rng, to_f64, Ref};
use half::bf16;
use ndarray::Array2;
use ndlora::{LoraConfig, LoraFloat, LoraLayer};
use num_traits::Zero;
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

fn layer<A: LoraFloat>(d: usize, k: usize, r: usize, alpha: f64, seed: u64) -> LoraLayer<A> {
    let cfg = LoraConfig {
        rank: r,
        alpha,
        ..Default::default()
    };
    random_layer_with(d, k, cfg, seed)
}

/// max |x − y| / (ε·magnitude), ε that of `A`: how many ε the two differ by, relative to the
/// error scale.
fn eps_distance<A: LoraFloat>(x: &Array2<f64>, y: &Array2<f64>, magnitude: &Array2<f64>) -> f64 {
    let eps = A::epsilon().into_f64();
    x.iter()
        .zip(y.iter())
        .zip(magnitude.iter())
        .map(|((a, b), m)| (a - b).abs() / (eps * m + 1e-300))
        .fold(0.0, f64::max)
}

/// Merged and unmerged forwards of a random layer, in ε of `A` relative to the magnitude.
fn merged_vs_unmerged<A: LoraFloat>(
    d: usize,
    k: usize,
    r: usize,
    n: usize,
    alpha: f64,
    seed: u64,
) -> f64 {
    let mut l: LoraLayer<A> = layer(d, k, r, alpha, seed);
    let x: Array2<A> = random(&mut rng(seed ^ 1), n, k);
    let y = to_f64(l.forward(x.view()).unwrap().view());
    let mag = Ref::new(&l).forward_magnitude(&to_f64(x.view()));
    l.merge().unwrap();
    let y_merged = to_f64(l.forward(x.view()).unwrap().view());
    eps_distance::<A>(&y, &y_merged, &mag)
}

/// With B = 0, merge leaves W bit for bit and the forward is the frozen one.
fn zero_b_is_frozen<A: LoraFloat>(
    d: usize,
    k: usize,
    r: usize,
    n: usize,
    alpha: f64,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut l: LoraLayer<A> = layer(d, k, r, alpha, seed);
    l.weight_b_mut().unwrap().fill(A::Factor::zero());
    let x: Array2<A> = random(&mut rng(seed ^ 2), n, k);
    let y = l.forward(x.view()).unwrap();
    let mut frozen = l.clone();
    frozen.merge().unwrap(); // W + s·0·A = W exactly
    prop_assert_eq!(frozen.base_weight(), l.base_weight());
    prop_assert_eq!(y, frozen.forward(x.view()).unwrap());
    Ok(())
}

/// A random layer, merged (by `merge_exact` if `exact`) or not, survives serde unchanged.
fn serde_is_exact<A: LoraFloat>(
    (d, k, r, alpha, seed): (usize, usize, usize, f64, u64),
    merged: bool,
    exact: bool,
) -> Result<(), TestCaseError> {
    let mut l: LoraLayer<A> = layer(d, k, r, alpha, seed);
    match (merged, exact) {
        (true, true) => l.merge_exact().unwrap(),
        (true, false) => l.merge().unwrap(),
        _ => {}
    }
    let back: LoraLayer<A> = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
    prop_assert!(back == l);
    Ok(())
}

/// Y(H(X₁ + X₂)) against Y(X₁) + Y(X₂) (the sum of inputs formed in f64 and rounded to `A`),
/// in ε of `A` relative to M₁ + M₂.
fn nonlinearity_in_x<A: LoraFloat>(
    d: usize,
    k: usize,
    r: usize,
    n: usize,
    alpha: f64,
    seed: u64,
) -> f64 {
    let l: LoraLayer<A> = layer(d, k, r, alpha, seed);
    let x1: Array2<A> = random(&mut rng(seed ^ 3), n, k);
    let x2: Array2<A> = random(&mut rng(seed ^ 4), n, k);
    let (x1f, x2f) = (to_f64(x1.view()), to_f64(x2.view()));
    let sum = (&x1f + &x2f).mapv(A::from_f64_lossy);
    let y = to_f64(l.forward(sum.view()).unwrap().view());
    let y12 =
        to_f64(l.forward(x1.view()).unwrap().view()) + to_f64(l.forward(x2.view()).unwrap().view());
    let reference = Ref::new(&l);
    let mag = reference.forward_magnitude(&x1f.mapv(f64::abs))
        + reference.forward_magnitude(&x2f.mapv(f64::abs));
    eps_distance::<A>(&y, &y12, &mag)
}

/// Y(X) of `l` with B replaced by `b`, in f64.
fn forward_with_b<A: LoraFloat>(
    l: &LoraLayer<A>,
    b: &Array2<A::Factor>,
    x: &Array2<A>,
) -> Array2<f64> {
    let mut l = l.clone();
    l.weight_b_mut().unwrap().assign(b);
    to_f64(l.forward(x.view()).unwrap().view())
}

/// Y(B₁ + B₂) + Y(0) − Y(B₁) − Y(B₂) (each forward in `A`, the sums in f64; zero in exact
/// arithmetic, since Y is affine in B), in ε of `A` relative to the sum of the four
/// forwards' magnitudes. B₂ is random, B₁ the layer's own.
fn nonlinearity_in_b<A: LoraFloat>(
    d: usize,
    k: usize,
    r: usize,
    n: usize,
    alpha: f64,
    seed: u64,
) -> f64 {
    let l: LoraLayer<A> = layer(d, k, r, alpha, seed);
    let x: Array2<A> = random(&mut rng(seed ^ 5), n, k);
    let b2: Array2<A::Factor> = random(&mut rng(seed ^ 6), d, r);
    let b1 = l.weight_b().to_owned();
    let sum = &b1 + &b2;
    let zero = Array2::zeros(b1.dim());
    let y = |b: &Array2<A::Factor>| forward_with_b(&l, b, &x);
    let lhs = y(&sum) + y(&zero);
    let rhs = y(&b1) + y(&b2);
    let xf = to_f64(x.view());
    let magnitude = |b: &Array2<A::Factor>| {
        let mut m = Ref::new(&l);
        m.b = to_f64(b.view());
        m.forward_magnitude(&xf)
    };
    let scale = magnitude(&sum) + magnitude(&zero) + magnitude(&b1) + magnitude(&b2);
    eps_distance::<A>(&lhs, &rhs, &scale)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn merged_forward_equals_unmerged_forward((d, k, r, n, alpha, seed) in shapes()) {
        prop_assert!(merged_vs_unmerged::<f64>(d, k, r, n, alpha, seed) <= 16.0);
    }

    #[test]
    fn unmerge_undoes_merge((d, k, r, _n, alpha, seed) in shapes()) {
        let mut l: LoraLayer<f64> = layer(d, k, r, alpha, seed);
        let reference = Ref::new(&l);
        let mag = reference.w.mapv(f64::abs) + reference.delta_magnitude();
        l.merge().unwrap();
        l.unmerge().unwrap();
        prop_assert!(eps_distance::<f64>(&to_f64(l.base_weight()), &reference.w, &mag) <= 2.0);
        prop_assert!(!l.is_merged());
    }

    #[test]
    fn zero_b_gives_the_frozen_output((d, k, r, n, alpha, seed) in shapes()) {
        zero_b_is_frozen::<f64>(d, k, r, n, alpha, seed)?;
    }

    #[test]
    fn serde_round_trip_is_exact((d, k, r, _n, alpha, seed) in shapes(), merged in any::<bool>()) {
        serde_is_exact::<f64>((d, k, r, alpha, seed), merged, false)?;
    }

    #[test]
    fn forward_is_affine_in_b((d, k, r, n, alpha, seed) in shapes()) {
        // Each f64 forward is within 8·ε·magnitude of exact (as above, 16 ε apart for two).
        prop_assert!(nonlinearity_in_b::<f64>(d, k, r, n, alpha, seed) <= 8.0);
    }

    #[test]
    fn forward_is_linear_in_x((d, k, r, n, alpha, seed) in shapes()) {
        // Y(X₁ + X₂) = Y(X₁) + Y(X₂): checks no hidden bias or state.
        prop_assert!(nonlinearity_in_x::<f64>(d, k, r, n, alpha, seed) <= 32.0);
    }
}

// ---------------------------------------------------------------------------------------------
// bf16 layers: W, X, Y in bf16, A and B in f32, products accumulated in f32.
//
// The bounds, in units of ε = 2⁻⁷ (bf16's epsilon; the unit roundoff is u = ε/2): every
// rounding to bf16 moves a value v by at most u·|v|. The f32 accumulations add at most
// k·2⁻²⁴ relative (k < 40 here: below ε/400) and the f32 → bf16 double rounding 2⁻²⁴ more;
// the margins below (≤ 0.25 ε) cover them.
// * forward: Y = H(f32(H(X Wᵀ)) + s·(X Aᵀ) Bᵀ) is within 2u·M of the exact value, M the
//   magnitude |X||W| + |s|·|X||A|·|B| (the base output rounded once, the sum once);
// * merged forward: W' = H(W + ΔW) is within u·|W + ΔW| of W + ΔW, so H(X W'ᵀ) is within
//   2u·M of exact; merged and unmerged forwards are at most 4u·M = 2ε·M apart;
// * merge then unmerge: W₁ = (W + ΔW)(1 + δ₁), W₂ = (W₁ − ΔW)(1 + δ₂) with |δᵢ| ≤ u, so
//   |W₂ − W| ≤ u·|W + ΔW| + u·|W| (1 + u) ≤ ε·max(|W|, |W + ΔW|) — at most 2 ulps of bf16 at
//   max(|W|, |W + ΔW|), since ε·|v| ≤ 2·ulp(v). ΔW is the f32 product (the same in both
//   updates), off the exact one by at most r·2⁻²⁴·|s|·|B||A|, which the bound adds.

/// The spacing of bf16 at |v| (its ulp there; the subnormal spacing 2⁻¹³³ near 0).
fn bf16_ulp(v: f64) -> f64 {
    let v = v.abs();
    if v < f64::from(f32::MIN_POSITIVE) {
        return 2f64.powi(-133);
    }
    2f64.powi(v.log2().floor() as i32 - 7)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn bf16_merged_forward_equals_unmerged_forward((d, k, r, n, alpha, seed) in shapes()) {
        prop_assert!(merged_vs_unmerged::<bf16>(d, k, r, n, alpha, seed) <= 2.25);
    }

    #[test]
    fn bf16_unmerge_undoes_merge_within_two_ulps((d, k, r, _n, alpha, seed) in shapes()) {
        let mut l: LoraLayer<bf16> = layer(d, k, r, alpha, seed);
        let reference = Ref::new(&l);
        let w_delta = &reference.w + &reference.delta();
        let slack = reference.delta_magnitude() * (r as f64 * 2f64.powi(-24));
        l.merge().unwrap();
        l.unmerge().unwrap();
        prop_assert!(!l.is_merged());
        for (((&got, &w), &wd), &sl) in l
            .base_weight()
            .iter()
            .zip(&reference.w)
            .zip(&w_delta)
            .zip(&slack)
        {
            let bound = 2.0 * bf16_ulp(w.abs().max(wd.abs())) + sl;
            prop_assert!(
                (got.to_f64() - w).abs() <= bound,
                "W {w} came back as {got} (bound {bound:e})"
            );
        }
    }

    #[test]
    fn bf16_zero_b_gives_the_frozen_output((d, k, r, n, alpha, seed) in shapes()) {
        zero_b_is_frozen::<bf16>(d, k, r, n, alpha, seed)?;
    }

    #[test]
    fn bf16_serde_round_trip_is_exact((d, k, r, _n, alpha, seed) in shapes(), merged in any::<bool>()) {
        serde_is_exact::<bf16>((d, k, r, alpha, seed), merged, true)?;
    }

    #[test]
    fn bf16_forward_is_affine_in_b((d, k, r, n, alpha, seed) in shapes()) {
        // Four forwards, each within 2u·Mᵢ of exact: |Y(B₁+B₂) + Y(0) − Y(B₁) − Y(B₂)| ≤
        // 2u·ΣMᵢ = ε·ΣMᵢ (B₁ + B₂ is formed in f32: 2⁻²⁴ relative, in the margin).
        prop_assert!(nonlinearity_in_b::<bf16>(d, k, r, n, alpha, seed) <= 1.1);
    }

    #[test]
    fn bf16_forward_is_linear_in_x((d, k, r, n, alpha, seed) in shapes()) {
        // X₁ + X₂ rounded to bf16 (u·(M₁ + M₂)), then three forwards (2u each):
        // |Y(H(X₁ + X₂)) − Y(X₁) − Y(X₂)| ≤ 7u·(M₁ + M₂) = 3.5 ε·(M₁ + M₂).
        prop_assert!(nonlinearity_in_x::<bf16>(d, k, r, n, alpha, seed) <= 3.75);
    }
}
