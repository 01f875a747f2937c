//! LoraLayer against the f64 reference: forward, merge, unmerge, effective weight, dropout;
//! serde round trips.

mod common;

use common::{
    assert_close, bits, random, random_layer, random_layer_with, rng, to_f64, Laid, Ref, LAYOUTS,
};
use ndarray::{Array2, ShapeBuilder};
use ndlora::{LoraConfig, LoraFloat, LoraInit, LoraLayer};

const DIMS: [usize; 4] = [1, 7, 33, 130];
const RANKS: [usize; 3] = [1, 2, 8];
/// Error bound factor: |error| ≤ TOL·ε·(the same sum over magnitudes). A dot product of length
/// k has error ≤ k·ε·Σ|terms| in the worst case; BLAS blocking keeps it far below that.
const TOL: f64 = 8.0;

fn forward_sweep<A: LoraFloat<Factor = A>>() {
    let mut cases = 0;
    for (case, (&d, &k)) in DIMS
        .iter()
        .flat_map(|d| DIMS.iter().map(move |k| (d, k)))
        .enumerate()
    {
        for &r in RANKS.iter().filter(|&&r| r <= d.min(k)) {
            let layer = random_layer::<A>(d, k, r, case as u64 * 31 + r as u64);
            let reference = Ref::new(&layer);
            for n in [0, 1, 7, 33, 130] {
                let x: Array2<A> = random(&mut rng(n as u64 + 7), n, k);
                let x64 = to_f64(x.view());
                let expected = reference.forward(&x64);
                let magnitude = reference.forward_magnitude(&x64);
                for layout in LAYOUTS {
                    let laid = Laid::new(&x, layout);
                    let ctx = format!("{} d={d} k={k} r={r} n={n} {layout:?}", A::NAME);
                    let y = layer.forward(laid.view()).unwrap();
                    assert_close(y.view(), &expected, &magnitude, TOL, &ctx);

                    // forward_into, with an output pre-filled with NaN and laid out in F order.
                    let mut out = Array2::from_elem((n, d).f(), A::nan());
                    layer.forward_into(laid.view(), out.view_mut()).unwrap();
                    assert_close(out.view(), &expected, &magnitude, TOL, &ctx);
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 725, "every (d, k, r, n, layout) combination ran");
}

#[test]
fn forward_matches_reference_f32() {
    forward_sweep::<f32>();
}

#[test]
fn forward_matches_reference_f64() {
    forward_sweep::<f64>();
}

fn merge_sweep<A: LoraFloat<Factor = A>>() {
    for (case, (&d, &k)) in DIMS
        .iter()
        .flat_map(|d| DIMS.iter().map(move |k| (d, k)))
        .enumerate()
    {
        for &r in RANKS.iter().filter(|&&r| r <= d.min(k)) {
            let mut layer = random_layer::<A>(d, k, r, 1000 + case as u64 * 7 + r as u64);
            let reference = Ref::new(&layer);
            let ctx = format!("{} d={d} k={k} r={r}", A::NAME);
            let expected = &reference.w + &reference.delta();
            let magnitude = reference.w.mapv(f64::abs) + reference.delta_magnitude();

            assert_close(
                layer.effective_weight().view(),
                &expected,
                &magnitude,
                TOL,
                &ctx,
            );
            let x: Array2<A> = random(&mut rng(case as u64), 9, k);
            let y_unmerged = layer.forward(x.view()).unwrap();

            layer.merge().unwrap();
            assert!(layer.is_merged());
            assert_close(layer.base_weight(), &expected, &magnitude, TOL, &ctx);
            assert_close(
                layer.effective_weight().view(),
                &expected,
                &magnitude,
                TOL,
                &ctx,
            );
            // Merged forward ≈ unmerged forward (B ≠ 0, so the update matters).
            let x64 = to_f64(x.view());
            let y_merged = layer.forward(x.view()).unwrap();
            let mag = reference.forward_magnitude(&x64);
            assert_close(
                y_merged.view(),
                &to_f64(y_unmerged.view()),
                &mag,
                2.0 * TOL,
                &ctx,
            );
            assert_close(y_merged.view(), &reference.forward(&x64), &mag, TOL, &ctx);

            layer.unmerge().unwrap();
            assert!(!layer.is_merged());
            // One round trip: two roundings of |W| + |s·B A| per element at most.
            assert_close(layer.base_weight(), &reference.w, &magnitude, 2.0, &ctx);
        }
    }
}

#[test]
fn merge_unmerge_match_reference_f32() {
    merge_sweep::<f32>();
}

#[test]
fn merge_unmerge_match_reference_f64() {
    merge_sweep::<f64>();
}

/// N merge/unmerge cycles drift W by at most 2·N·ε·(|W| + |s·B A|) elementwise (each cycle
/// rounds twice; the documented bound on `LoraLayer::merge`); in practice the drift is a random
/// walk far below that. Returns the worst drift in units of ε·(|W| + |s·B A|).
fn drift<A: LoraFloat<Factor = A>>(cycles: usize) -> f64 {
    let (d, k, r) = (33, 65, 8);
    let mut layer = random_layer::<A>(d, k, r, 5);
    let reference = Ref::new(&layer);
    let magnitude = reference.w.mapv(f64::abs) + reference.delta_magnitude();
    let worst_now = |layer: &LoraLayer<A>| {
        layer
            .base_weight()
            .iter()
            .zip(reference.w.iter().zip(magnitude.iter()))
            .map(|(g, (w, m))| (g.into_f64() - w).abs() / (A::epsilon().into_f64() * m))
            .fold(0.0, f64::max)
    };
    layer.merge().unwrap();
    layer.unmerge().unwrap();
    let one = worst_now(&layer);
    assert!(one <= 2.0, "{}: one round trip drifted {one} ε", A::NAME);
    for _ in 1..cycles {
        layer.merge().unwrap();
        layer.unmerge().unwrap();
    }
    let ctx = format!("{} after {cycles} cycles", A::NAME);
    assert_close(
        layer.base_weight(),
        &reference.w,
        &magnitude,
        2.0 * cycles as f64,
        &ctx,
    );
    // And it must not be grossly looser than one cycle's worth times √cycles.
    let worst = worst_now(&layer);
    println!("{ctx}: one round trip {one:.2}, worst drift {worst:.2} ε·(|W| + |sBA|)");
    assert!(worst <= 4.0 * (cycles as f64).sqrt(), "drift {worst}");
    worst
}

#[test]
fn merge_cycles_drift_is_bounded_f32() {
    drift::<f32>(1000);
    // The documented measurement (LoraLayer::merge, README): ≤ 1 ε after 10⁴ cycles
    // (measured 0.52 ε in f32, 0.45 ε in f64: after the first cycle W is a fixed point of
    // merge∘unmerge here, so the drift does not accumulate).
    assert!(drift::<f32>(10_000) <= 1.0);
}

#[test]
fn merge_cycles_drift_is_bounded_f64() {
    drift::<f64>(1000);
    assert!(drift::<f64>(10_000) <= 1.0);
}

/// `merge_exact` → `unmerge` restores W bit for bit, over 10⁴ cycles, for f32 and f64, with a
/// bias, and the kept copy is part of clone, `==` and serde.
fn exact_cycles<A: LoraFloat<Factor = A>>() {
    let mut layer = random_layer::<A>(33, 65, 8, 6)
        .with_bias(ndarray::Array1::from_elem(33, A::one()))
        .unwrap();
    let original = layer.clone();
    let w_bits = |l: &LoraLayer<A>| bits(l.base_weight());
    let x = random::<A>(&mut rng(7), 4, 65);
    let y = layer.forward(x.view()).unwrap();
    for cycle in 0..10_000 {
        layer.merge_exact().unwrap();
        if cycle == 0 {
            assert!(layer.is_merged_exact());
            assert_ne!(layer, original);
            let y_merged = layer.forward(x.view()).unwrap();
            let worst = (&y_merged - &y)
                .iter()
                .fold(0.0_f64, |m, v| m.max(v.into_f64().abs()));
            assert!(worst < 1e-3, "merged forward off by {worst}");
            // Saved while merged exactly: the copy travels with the document.
            let text = serde_json::to_string(&layer).unwrap();
            assert!(text.contains("unmerge_weight"));
            let mut loaded: LoraLayer<A> = serde_json::from_str(&text).unwrap();
            assert_eq!(loaded, layer);
            loaded.unmerge().unwrap();
            assert_eq!(w_bits(&loaded), w_bits(&original));
            assert_eq!(loaded, original);
        }
        layer.unmerge().unwrap();
    }
    assert!(!layer.is_merged_exact());
    assert_eq!(w_bits(&layer), w_bits(&original));
    assert_eq!(layer, original);
    assert_eq!(
        serde_json::to_string(&layer).unwrap(),
        serde_json::to_string(&original).unwrap()
    );
    // Mixing: a plain merge after exact cycles is still a plain (rounding) merge.
    layer.merge().unwrap();
    assert!(!layer.is_merged_exact());
    layer.unmerge().unwrap();
}

#[test]
fn merge_exact_unmerge_is_bit_exact_f32() {
    exact_cycles::<f32>();
}

#[test]
fn merge_exact_unmerge_is_bit_exact_f64() {
    exact_cycles::<f64>();
}

#[test]
fn frozen_output_only_scales_the_lora_branch() {
    // W = I, A = B = 0 except one entry: Y = X + s·(x₀·a)·b. A peer implementation scales X Wᵀ
    // too; with α ≠ r that shows.
    let mut w = Array2::<f64>::eye(3);
    w[[0, 1]] = 2.0;
    let mut a = Array2::zeros((1, 3));
    a[[0, 0]] = 1.0;
    let mut b = Array2::zeros((3, 1));
    b[[2, 0]] = 1.0;
    let config = LoraConfig {
        rank: 1,
        alpha: 5.0,
        ..Default::default()
    };
    let layer = LoraLayer::from_parts(w, a, b, config).unwrap();
    let x = ndarray::array![[1.0, 10.0, 100.0]];
    let y = layer.forward(x.view()).unwrap();
    // X Wᵀ = [1 + 20, 10, 100]; LoRA: s = 5, (X Aᵀ) = 1, adds 5 to column 2.
    assert_eq!(y, ndarray::array![[21.0, 10.0, 105.0]]);
}

#[test]
fn new_layer_computes_exactly_the_frozen_output() {
    let w: Array2<f32> = random(&mut rng(3), 20, 30);
    let layer = LoraLayer::new(w.clone(), LoraConfig::default()).unwrap();
    assert!(layer.weight_b().iter().all(|&v| v == 0.0));
    let x: Array2<f32> = random(&mut rng(4), 6, 30);
    let y = layer.forward(x.view()).unwrap();
    let reference = Ref::new(&layer);
    let x64 = to_f64(x.view());
    assert_close(
        y.view(),
        &reference.forward(&x64),
        &reference.forward_magnitude(&x64),
        TOL,
        "B = 0",
    );
    // B = 0 adds exact zeros: the output is bit-identical to the merged (= frozen) forward.
    let mut merged = layer.clone();
    merged.merge().unwrap();
    assert_eq!(merged.base_weight(), w.view());
    assert_eq!(y, merged.forward(x.view()).unwrap());
}

#[test]
fn parameter_counts_match_the_seed() {
    let layer = LoraLayer::new(
        Array2::<f64>::zeros((64, 128)),
        LoraConfig {
            rank: 4,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(layer.trainable_params(), 768);
    assert_eq!(layer.total_params(), 8960);
    // The seed prints 15 significant digits; 768/8960 = 0.0857142857142857142…
    approx::assert_relative_eq!(
        layer.compression_ratio(),
        0.0857142857142857,
        max_relative = 1e-14
    );
    assert_eq!(layer.compression_ratio(), 768.0 / 8960.0);
    assert_eq!(
        (layer.out_features(), layer.in_features(), layer.rank()),
        (64, 128, 4)
    );
}

#[test]
fn scaling_rules() {
    let w = Array2::<f32>::zeros((16, 16));
    let plain = LoraLayer::new(
        w.clone(),
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..Default::default()
        },
    );
    assert_eq!(plain.unwrap().scaling(), 2.0);
    let rs = LoraConfig {
        rank: 4,
        alpha: 8.0,
        use_rslora: true,
        ..Default::default()
    };
    assert_eq!(LoraLayer::new(w, rs).unwrap().scaling(), 4.0);
}

#[test]
fn set_scaling_changes_the_lora_branch() {
    let mut layer = random_layer::<f64>(7, 9, 2, 11);
    layer.set_scaling(-0.25).unwrap();
    let x: Array2<f64> = random(&mut rng(12), 4, 9);
    let reference = Ref::new(&layer);
    assert_eq!(reference.s, -0.25);
    let y = layer.forward(x.view()).unwrap();
    assert_close(
        y.view(),
        &reference.forward(&x),
        &reference.forward_magnitude(&x),
        TOL,
        "s=-0.25",
    );
}

#[test]
fn init_is_deterministic_and_follows_the_rule() {
    let w = Array2::<f64>::zeros((256, 512));
    let make = |init, seed| {
        let config = LoraConfig {
            rank: 16,
            init,
            seed,
            ..Default::default()
        };
        LoraLayer::new(w.clone(), config).unwrap()
    };
    let g1 = make(LoraInit::Gaussian, 1);
    assert_eq!(g1.weight_a(), make(LoraInit::Gaussian, 1).weight_a());
    assert_ne!(g1.weight_a(), make(LoraInit::Gaussian, 2).weight_a());
    // A ~ N(0, 1/r): sample variance of 8192 draws within 5% of 1/16.
    let a = g1.weight_a();
    let mean = a.mean().unwrap();
    let var = a.mapv(|v| (v - mean).powi(2)).mean().unwrap();
    assert!(mean.abs() < 0.01, "mean {mean}");
    assert!((var - 1.0 / 16.0).abs() < 0.05 / 16.0, "var {var}");

    // Kaiming-uniform: within ±1/√k and spread over it (variance of U(−b, b) is b²/3).
    let ku = make(LoraInit::KaimingUniform, 1);
    let bound = 1.0 / (512f64).sqrt();
    assert!(ku.weight_a().iter().all(|v| v.abs() <= bound));
    let var = ku.weight_a().mapv(|v| v * v).mean().unwrap();
    assert!(
        (var - bound * bound / 3.0).abs() < 0.05 * bound * bound / 3.0,
        "var {var}"
    );

    // f32 and f64 layers with one seed start from the same numbers (up to rounding).
    let f32_layer = LoraLayer::new(Array2::<f32>::zeros((256, 512)), g1.config().clone()).unwrap();
    let diff = (&to_f64(f32_layer.weight_a()) - &g1.weight_a()).mapv(f64::abs);
    assert!(diff.iter().all(|&e| e < 1e-6));
}

#[test]
fn dropout_is_inverted_fresh_per_call_and_absent_from_forward() {
    let (d, k, r, n) = (4, 8, 2, 20_000);
    let config = LoraConfig {
        rank: r,
        alpha: 2.0,
        dropout: 0.5,
        ..Default::default()
    };
    let mut layer = random_layer_with::<f64>(d, k, config, 21);
    let w = layer.base_weight().to_owned();
    let row: Array2<f64> = random(&mut rng(22), 1, k);
    let x = row.broadcast((n, k)).unwrap().to_owned();

    let y_eval = layer.forward(x.view()).unwrap();
    assert_eq!(
        y_eval,
        layer.forward(x.view()).unwrap(),
        "forward must not drop out"
    );
    let y1 = layer.forward_train(x.view()).unwrap();
    let y2 = layer.forward_train(x.view()).unwrap();
    assert_ne!(y1, y2, "each call draws a new mask");
    // Rows differ within a call (different masks per row).
    assert_ne!(y1.row(0), y1.row(1));

    // Mean preserving: the average over n masked rows approaches the unmasked output.
    // The base part X Wᵀ is never dropped, so subtract it and compare the LoRA branch alone.
    let base = row.dot(&w.t());
    let lora_eval = &y_eval.row(0) - &base.row(0);
    let lora_mean = &y1.mean_axis(ndarray::Axis(0)).unwrap() - &base.row(0);
    let lora_var = (&y1 - &y1.mean_axis(ndarray::Axis(0)).unwrap())
        .mapv(|v| v * v)
        .mean_axis(ndarray::Axis(0))
        .unwrap();
    for j in 0..d {
        let se = (lora_var[j] / n as f64).sqrt();
        assert!(
            (lora_mean[j] - lora_eval[j]).abs() < 5.0 * se + 1e-12,
            "column {j}: mean {} vs {} (se {se})",
            lora_mean[j],
            lora_eval[j]
        );
    }
    // The frozen part is exact: with B = 0 training output equals eval output.
    let mut frozen = LoraLayer::new(w, layer.config().clone()).unwrap();
    assert_eq!(
        frozen.forward_train(x.view()).unwrap(),
        frozen.forward(x.view()).unwrap()
    );
}

#[test]
fn forward_train_without_dropout_or_merged_is_forward() {
    let mut layer = random_layer::<f32>(9, 13, 2, 77);
    let x: Array2<f32> = random(&mut rng(78), 5, 13);
    assert_eq!(
        layer.forward_train(x.view()).unwrap(),
        layer.forward(x.view()).unwrap()
    );

    let config = LoraConfig {
        rank: 2,
        dropout: 0.3,
        ..Default::default()
    };
    let mut layer = random_layer_with(9, 13, config, 79);
    layer.merge().unwrap();
    assert_eq!(
        layer.forward_train(x.view()).unwrap(),
        layer.forward(x.view()).unwrap()
    );
}

#[test]
fn dropout_masks_reproduce_from_the_seed() {
    let config = LoraConfig {
        rank: 2,
        dropout: 0.25,
        seed: 9,
        ..Default::default()
    };
    let make = || random_layer_with::<f32>(6, 10, config.clone(), 5);
    let (mut l1, mut l2) = (make(), make());
    let x: Array2<f32> = random(&mut rng(6), 8, 10);
    for _ in 0..3 {
        assert_eq!(
            l1.forward_train(x.view()).unwrap(),
            l2.forward_train(x.view()).unwrap()
        );
    }
}

#[test]
fn serde_round_trip_keeps_state_including_merge_and_rng() {
    let cfg = LoraConfig {
        rank: 3,
        alpha: 5.0,
        dropout: 0.2,
        ..Default::default()
    };
    let mut l = random_layer_with::<f32>(8, 9, cfg, 3);
    let x: Array2<f32> = random(&mut rng(4), 4, 9);
    l.forward_train(x.view()).unwrap(); // advance the dropout stream
    let mut copy: LoraLayer<f32> =
        serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
    assert!(copy == l);
    assert_eq!(
        copy.forward_train(x.view()).unwrap(),
        l.forward_train(x.view()).unwrap()
    );
    l.merge().unwrap();
    let mut copy: LoraLayer<f32> =
        serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
    assert!(copy.is_merged());
    copy.unmerge().unwrap();
    l.unmerge().unwrap();
    assert_eq!(copy.base_weight(), l.base_weight());
}

/// W's first element is on a 64-byte boundary and W is row-major, whatever array the layer
/// was built from (the kernels rely on it for speed, not for results).
fn assert_w_aligned(w: ndarray::ArrayView2<'_, f32>, what: &str) {
    assert!(w.is_standard_layout(), "{what}: W not row-major");
    assert_eq!(
        w.as_ptr() as usize % 64,
        0,
        "{what}: W off a 64-byte boundary"
    );
}

#[test]
fn layers_and_models_keep_w_on_a_cache_line_boundary() {
    let (d, k, r) = (33, 7, 2);
    let values: Array2<f32> = random(&mut rng(5), d, k);
    // A column-major W: not standard layout, and its start is wherever the allocator put it.
    let mut f = Array2::<f32>::zeros((d, k).f());
    f.assign(&values);
    let a: Array2<f32> = random(&mut rng(6), r, k);
    let b: Array2<f32> = random(&mut rng(7), d, r);
    let config = LoraConfig {
        rank: r,
        alpha: 4.0,
        ..Default::default()
    };
    let mut layer = LoraLayer::from_parts(f.clone(), a, b, config.clone()).unwrap();
    assert_w_aligned(layer.base_weight(), "from_parts");
    assert_eq!(layer.base_weight(), values);
    assert_w_aligned(
        LoraLayer::new(f.clone(), config).unwrap().base_weight(),
        "new",
    );
    assert_w_aligned(layer.clone().base_weight(), "clone");
    let text = serde_json::to_string(&layer).unwrap();
    let loaded: LoraLayer<f32> = serde_json::from_str(&text).unwrap();
    assert_w_aligned(loaded.base_weight(), "deserialised");
    layer.merge_exact().unwrap();
    assert_w_aligned(layer.base_weight(), "merged");
    layer.unmerge().unwrap();
    assert_w_aligned(layer.base_weight(), "restored by unmerge");
    assert_eq!(layer.base_weight(), values);
    let model = ndlora::LoraModel::new(f).unwrap();
    assert_w_aligned(model.base_weight(), "LoraModel::new");
    assert_w_aligned(model.clone().base_weight(), "LoraModel clone");
}
