//! LoraModel: mixed batches against per-row layers and the f64 reference, several active
//! adapters, merge/unmerge, stable ids, and errors that leave the model unchanged.

mod common;

use common::{assert_close, fails_unchanged, matmul_t, random, rng, to_f64, Laid, Ref, LAYOUTS};
use ndarray::{s, Array2};
use ndlora::{LoraConfig, LoraError, LoraFloat, LoraInit, LoraLayer, LoraModel};
use rand::Rng;

/// Rounding bound factor, as in tests/layer.rs: |error| ≤ TOL·ε·(the sum over magnitudes).
const TOL: f64 = 8.0;
const D: usize = 9;
const K: usize = 13;
/// (name, rank, alpha): different ranks and scalings.
const ADAPTERS: [(&str, usize, f64); 4] = [
    ("r1", 1, 3.0),
    ("r3", 3, 1.5),
    ("r8", 8, 16.0),
    ("r2", 2, -2.0),
];

fn model<A: LoraFloat<Factor = A>>(seed: u64) -> LoraModel<A> {
    let mut g = rng(seed);
    let mut m = LoraModel::new(random(&mut g, D, K)).unwrap();
    for (name, rank, alpha) in ADAPTERS {
        let config = LoraConfig {
            rank,
            alpha,
            ..Default::default()
        };
        m.add_adapter_from_parts(
            name,
            random(&mut g, rank, K),
            random(&mut g, D, rank),
            config,
        )
        .unwrap();
    }
    m
}

/// Row patterns: (label, adapter of each row) for a batch of n rows over ids 0..4.
fn patterns(n: usize) -> Vec<(&'static str, Vec<Option<usize>>)> {
    let mut g = rng(n as u64 + 99);
    vec![
        ("all base", vec![None; n]),
        ("all one adapter", vec![Some(2); n]),
        (
            "contiguous blocks",
            (0..n)
                .map(|i| [Some(0), Some(1), None, Some(3)][4 * i / n.max(1)])
                .collect(),
        ),
        (
            "round robin",
            (0..n)
                .map(|i| [Some(0), Some(1), Some(2), Some(3), None][i % 5])
                .collect(),
        ),
        (
            "scattered",
            (0..n)
                .map(|_| match g.random_range(0..6) {
                    5 => None,
                    j => Some(j % 4),
                })
                .collect(),
        ),
    ]
}

fn mixed_sweep<A: LoraFloat<Factor = A>>() {
    let m = model::<A>(5);
    let names: Vec<&str> = m.adapter_names();
    let layers: Vec<LoraLayer<A>> = names.iter().map(|n| m.to_layer(n).unwrap()).collect();
    let refs: Vec<Ref> = layers.iter().map(Ref::new).collect();
    let w = to_f64(m.base_weight());
    let base_ref = Ref {
        w: w.clone(),
        a: Array2::zeros((1, K)),
        b: Array2::zeros((D, 1)),
        s: 0.0,
    };
    let mut cases = 0;
    for n in [0, 1, 2, 7, 33] {
        let x: Array2<A> = random(&mut rng(n as u64), n, K);
        let x64 = to_f64(x.view());
        for (label, rows) in patterns(n) {
            // Expected, row by row: its own adapter's reference (or the base alone).
            let mut expected = Array2::zeros((n, D));
            let mut magnitude = Array2::zeros((n, D));
            let mut per_layer = Array2::zeros((n, D));
            for (i, id) in rows.iter().enumerate() {
                let xi = x64.slice(s![i..i + 1, ..]).to_owned();
                let re = id.map_or(&base_ref, |j| &refs[j]);
                expected.row_mut(i).assign(&re.forward(&xi).row(0));
                magnitude
                    .row_mut(i)
                    .assign(&re.forward_magnitude(&xi).row(0));
                let xr = x.slice(s![i..i + 1, ..]);
                let yi = match id {
                    Some(j) => layers[*j].forward(xr).unwrap(),
                    None => m.forward(xr).unwrap(), // no active adapter: X Wᵀ
                };
                per_layer.row_mut(i).assign(&to_f64(yi.view()).row(0));
            }
            for layout in LAYOUTS {
                let laid = Laid::new(&x, layout);
                let ctx = format!("{} n={n} {label} {layout:?}", A::NAME);
                let y = m.forward_mixed(laid.view(), &rows).unwrap();
                assert_close(y.view(), &expected, &magnitude, TOL, &ctx);
                let ctx = format!("{ctx} vs per-row layers");
                assert_close(y.view(), &per_layer, &magnitude, 2.0 * TOL, &ctx);
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 5 * 5 * 5, "every (n, pattern, layout) ran");
}

#[test]
fn forward_mixed_matches_per_row_layers_f32() {
    mixed_sweep::<f32>();
}

#[test]
fn forward_mixed_matches_per_row_layers_f64() {
    mixed_sweep::<f64>();
}

#[test]
fn forward_mixed_runs_one_base_gemm_and_one_pair_per_adapter() {
    let m = model::<f32>(6);
    let x: Array2<f32> = random(&mut rng(1), 40, K);
    for (label, rows) in patterns(40) {
        let used = (0..4).filter(|j| rows.contains(&Some(*j))).count() as u64;
        ndlora::reset_gemm_counters();
        m.forward_mixed(x.view(), &rows).unwrap();
        let c = ndlora::gemm_counters();
        assert_eq!(c.blas_calls + c.fallback_calls, 1 + 2 * used, "{label}");
        assert_eq!(
            c.layout_copies, 0,
            "{label}: row groups reach BLAS without copies"
        );
    }
}

#[test]
fn forward_sums_the_active_adapters() {
    let mut m = model::<f64>(7);
    let x: Array2<f64> = random(&mut rng(2), 6, K);
    let base = matmul_t(&x, &to_f64(m.base_weight()));
    assert_eq!(m.active_adapters(), Vec::<&str>::new());
    assert!(m.forward(x.view()).unwrap().abs_diff_eq(&base, 1e-12));
    m.set_active(&["r8", "r1", "r2"]).unwrap();
    assert_eq!(m.active_adapters(), ["r8", "r1", "r2"]);
    let mut expected = base.clone();
    let mut magnitude = matmul_t(&x.mapv(f64::abs), &m.base_weight().mapv(f64::abs));
    for name in ["r8", "r1", "r2"] {
        let re = Ref::new(&m.to_layer(name).unwrap());
        expected = expected + re.forward(&x) - &base;
        magnitude = magnitude + re.forward_magnitude(&x);
    }
    let y = m.forward(x.view()).unwrap();
    assert_close(
        y.view(),
        &expected,
        &magnitude,
        TOL,
        "three active adapters",
    );
}

#[test]
fn merge_and_unmerge_all_restore_w() {
    let mut m = model::<f32>(8);
    let w0 = to_f64(m.base_weight());
    let x: Array2<f32> = random(&mut rng(3), 5, K);
    m.set_active(&["r3", "r8"]).unwrap();
    let y_unmerged = m.forward(x.view()).unwrap();
    m.merge("r1").unwrap(); // not active: merged anyway, and in W from now on
    m.merge_active().unwrap();
    for (name, merged) in [("r1", true), ("r3", true), ("r8", true), ("r2", false)] {
        assert_eq!(m.is_merged(name).unwrap(), merged, "{name}");
    }
    // |W + Σ s B A| bounds the size of every rounding step.
    let mut magnitude = w0.mapv(f64::abs);
    for name in ["r1", "r3", "r8"] {
        let l = model::<f32>(8).to_layer(name).unwrap();
        magnitude = magnitude + Ref::new(&l).delta_magnitude();
    }
    let r1 = Ref::new(&model::<f32>(8).to_layer("r1").unwrap());
    let y_merged = m.forward(x.view()).unwrap();
    let expected = to_f64(y_unmerged.view()) + matmul_t(&to_f64(x.view()), &r1.delta());
    let xm = matmul_t(&to_f64(x.view()).mapv(f64::abs), &magnitude);
    assert_close(y_merged.view(), &expected, &xm, 4.0 * TOL, "merged forward");

    m.unmerge("r3").unwrap(); // out of order: merges commute
    assert!(!m.is_merged("r3").unwrap());
    m.unmerge_all().unwrap();
    for name in m.adapter_names() {
        assert!(!m.is_merged(name).unwrap());
    }
    assert_close(
        m.base_weight(),
        &w0,
        &magnitude,
        4.0 * TOL,
        "W after unmerge_all",
    );
    // Back to the base: mixed batches work again.
    m.forward_mixed(x.view(), &[Some(0), None, Some(2), Some(3), None])
        .unwrap();
}

#[test]
fn ids_are_stable_and_never_reused() {
    let mut m = model::<f64>(9);
    assert_eq!(m.adapter_names(), ["r1", "r3", "r8", "r2"]);
    assert_eq!(m.adapter_id("r8"), Some(2));
    m.set_active(&["r3", "r8"]).unwrap();
    m.remove_adapter("r3").unwrap();
    assert_eq!(m.active_adapters(), ["r8"]);
    assert_eq!(m.adapter_id("r3"), None);
    assert_eq!(m.adapter_id("r8"), Some(2));
    let id = m
        .add_adapter(
            "r3",
            LoraConfig {
                rank: 2,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        id, 4,
        "a new adapter gets a fresh id, even under an old name"
    );
    assert_eq!(m.adapter_names(), ["r1", "r8", "r2", "r3"]);
    let x = Array2::<f64>::ones((1, K));
    for bad in [1, 5, usize::MAX] {
        assert_eq!(
            m.forward_mixed(x.view(), &[Some(bad)]).unwrap_err(),
            LoraError::UnknownAdapterId { id: bad }
        );
    }
    // The re-added adapter starts with B = 0: its rows equal the base rows.
    let y = m.forward_mixed(x.view(), &[Some(4)]).unwrap();
    assert_eq!(y, m.forward_mixed(x.view(), &[None]).unwrap());
}

#[test]
fn add_adapter_initialises_like_layer_new() {
    let w: Array2<f32> = random(&mut rng(10), D, K);
    let mut m = LoraModel::new(w.clone()).unwrap();
    for (i, init) in [LoraInit::Gaussian, LoraInit::KaimingUniform]
        .into_iter()
        .enumerate()
    {
        let config = LoraConfig {
            rank: 4,
            alpha: 5.0,
            use_rslora: i == 1,
            init,
            seed: 77 + i as u64,
            ..Default::default()
        };
        let name = format!("a{i}");
        m.add_adapter(&name, config.clone()).unwrap();
        let layer = LoraLayer::new(w.clone(), config.clone()).unwrap();
        assert_eq!(m.weight_a(&name).unwrap(), layer.weight_a());
        assert_eq!(m.weight_b(&name).unwrap(), layer.weight_b());
        assert_eq!(m.scaling(&name).unwrap(), layer.scaling());
        assert_eq!(m.config(&name).unwrap(), &config);
        assert_eq!(m.to_layer(&name).unwrap(), layer);
    }
}

#[test]
fn errors_leave_the_model_unchanged() {
    use LoraError::*;
    assert!(matches!(
        LoraModel::<f32>::new(Array2::zeros((0, 3))),
        Err(ShapeMismatch { .. })
    ));
    let mut nan = Array2::<f32>::zeros((2, 3));
    nan[[1, 2]] = f32::NAN;
    assert!(matches!(
        LoraModel::new(nan),
        Err(NonFinite { index: (1, 2), .. })
    ));

    let mut m = model::<f32>(11);
    m.set_active(&["r1"]).unwrap();
    let cfg = |rank| LoraConfig {
        rank,
        ..Default::default()
    };
    let dup = |e: &LoraError| matches!(e, DuplicateAdapter { name } if name == "r3");
    let unknown = |e: &LoraError| matches!(e, UnknownAdapter { name } if name == "nope");
    fails_unchanged(
        "add_adapter duplicate",
        &m,
        |m| m.add_adapter("r3", cfg(1)),
        dup,
    );
    fails_unchanged(
        "add_adapter rank 10",
        &m,
        |m| m.add_adapter("new", cfg(10)),
        |e| matches!(e, InvalidRank { .. }),
    );
    fails_unchanged(
        "add_adapter_from_parts duplicate",
        &m,
        |m| m.add_adapter_from_parts("r3", Array2::zeros((1, K)), Array2::zeros((D, 1)), cfg(1)),
        dup,
    );
    fails_unchanged(
        "add_adapter_from_parts A width",
        &m,
        |m| {
            m.add_adapter_from_parts(
                "new",
                Array2::zeros((1, K + 1)),
                Array2::zeros((D, 1)),
                cfg(1),
            )
        },
        |e| {
            matches!(
                e,
                ShapeMismatch {
                    what: "weight_a",
                    ..
                }
            )
        },
    );
    fails_unchanged(
        "add_adapter_from_parts B rank",
        &m,
        |m| m.add_adapter_from_parts("new", Array2::zeros((1, K)), Array2::zeros((D, 2)), cfg(1)),
        |e| {
            matches!(
                e,
                ShapeMismatch {
                    what: "weight_b",
                    ..
                }
            )
        },
    );
    fails_unchanged(
        "add_adapter_from_parts B ∞",
        &m,
        |m| {
            let b = Array2::from_elem((D, 1), f32::INFINITY);
            m.add_adapter_from_parts("new", Array2::zeros((1, K)), b, cfg(1))
        },
        |e| {
            matches!(
                e,
                NonFinite {
                    what: "weight_b",
                    ..
                }
            )
        },
    );
    fails_unchanged(
        "set_active unknown",
        &m,
        |m| m.set_active(&["r2", "nope"]),
        unknown,
    );
    fails_unchanged(
        "set_active duplicate",
        &m,
        |m| m.set_active(&["r2", "r3", "r2"]),
        |e| matches!(e, DuplicateAdapter { name } if name == "r2"),
    );
    fails_unchanged(
        "remove_adapter unknown",
        &m,
        |m| m.remove_adapter("nope"),
        unknown,
    );
    fails_unchanged("merge unknown", &m, |m| m.merge("nope"), unknown);
    fails_unchanged("is_merged unknown", &m, |m| m.is_merged("nope"), unknown);
    fails_unchanged(
        "weight_a unknown",
        &m,
        |m| m.weight_a("nope").map(|_| ()),
        unknown,
    );
    fails_unchanged(
        "unmerge not merged",
        &m,
        |m| m.unmerge("r1"),
        |e| {
            matches!(
                e,
                MergeState {
                    operation: "unmerge",
                    expected: true
                }
            )
        },
    );
    let x = Array2::<f32>::ones((3, K));
    fails_unchanged(
        "forward_mixed row list length",
        &m,
        |m| m.forward_mixed(x.view(), &[None, Some(0)]),
        |e| {
            matches!(
                e,
                ShapeMismatch {
                    what: "adapter_of_row",
                    ..
                }
            )
        },
    );
    fails_unchanged(
        "forward_mixed width",
        &m,
        |m| m.forward_mixed(x.slice(s![.., 1..]), &[None; 3]),
        |e| {
            matches!(
                e,
                ShapeMismatch {
                    what: "input x",
                    ..
                }
            )
        },
    );
    fails_unchanged(
        "forward width",
        &m,
        |m| m.forward(x.slice(s![.., 1..])),
        |e| {
            matches!(
                e,
                ShapeMismatch {
                    what: "input x",
                    ..
                }
            )
        },
    );

    // Merged states.
    m.merge("r2").unwrap();
    let merged = |op: &'static str| move |e: &LoraError| matches!(e, MergeState { operation, expected: false } if *operation == op);
    fails_unchanged("merge merged", &m, |m| m.merge("r2"), merged("merge"));
    fails_unchanged(
        "remove_adapter merged",
        &m,
        |m| m.remove_adapter("r2"),
        merged("remove_adapter"),
    );
    fails_unchanged(
        "weight_b_mut merged",
        &m,
        |m| m.weight_b_mut("r2").map(|_| ()),
        merged("weight_b_mut"),
    );
    fails_unchanged(
        "to_layer merged",
        &m,
        |m| m.to_layer("r1"),
        merged("to_layer"),
    );
    fails_unchanged(
        "forward_mixed merged",
        &m,
        |m| m.forward_mixed(x.view(), &[None; 3]),
        merged("forward_mixed"),
    );
}

#[test]
fn merges_that_would_overflow_are_refused_whole() {
    let big = f32::MAX / 3.0;
    let mut m = LoraModel::new(Array2::<f32>::from_elem((2, 2), big)).unwrap();
    let cfg = LoraConfig {
        rank: 1,
        alpha: 1.0,
        ..Default::default()
    };
    let half = Array2::from_elem((2, 1), big * 1.2); // 0.4·MAX
    m.add_adapter_from_parts("a", Array2::ones((1, 2)), half.clone(), cfg.clone())
        .unwrap();
    m.add_adapter_from_parts("b", Array2::ones((1, 2)), half, cfg.clone())
        .unwrap();
    m.add_adapter_from_parts(
        "huge",
        Array2::ones((1, 2)),
        Array2::from_elem((2, 1), f32::MAX),
        cfg,
    )
    .unwrap();
    let overflow = |e: &LoraError| matches!(e, WouldOverflow { operation: "merge" });
    use LoraError::WouldOverflow;
    fails_unchanged("merge overflows", &m, |m| m.merge("huge"), overflow);
    // Each of a and b alone is fine (MAX/3 + 0.4·MAX < MAX), together they overflow.
    m.set_active(&["a", "b"]).unwrap();
    fails_unchanged("merge_active overflows", &m, |m| m.merge_active(), overflow);
    m.merge("a").unwrap();
    fails_unchanged(
        "merge after a merge overflows",
        &m,
        |m| m.merge("b"),
        overflow,
    );
    m.unmerge_all().unwrap();
}
