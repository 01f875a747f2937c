//! Every error path of LoraLayer returns the right variant and leaves the layer as it was.

mod common;

use common::{random, rng};
use ndarray::{Array2, ShapeBuilder};
use ndlora::{LoraConfig, LoraError, LoraFloat, LoraLayer};

fn layer() -> LoraLayer<f64> {
    let mut g = rng(1);
    let config = LoraConfig {
        rank: 2,
        alpha: 3.0,
        ..Default::default()
    };
    LoraLayer::from_parts(
        random(&mut g, 5, 7),
        random(&mut g, 2, 7),
        random(&mut g, 5, 2),
        config,
    )
    .unwrap()
}

/// Bitwise equality of all state (`==` is IEEE: NaN ≠ NaN), via the arrays' bits and the
/// serialised document (which also holds the config, scaling, merge flag and RNG state).
fn identical<A: LoraFloat>(x: &LoraLayer<A>, y: &LoraLayer<A>) -> bool {
    let bits = |l: &LoraLayer<A>| {
        [l.base_weight(), l.weight_a(), l.weight_b()]
            .iter()
            .map(|m| m.iter().map(|v| v.into_f64().to_bits()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    bits(x) == bits(y) && serde_json::to_string(x).unwrap() == serde_json::to_string(y).unwrap()
}

/// Runs `op` on a clone and asserts it fails with an error matching `expected` and that the
/// clone is still equal to the original.
#[track_caller]
fn fails_unchanged<A: LoraFloat, T: std::fmt::Debug>(
    original: &LoraLayer<A>,
    op: impl FnOnce(&mut LoraLayer<A>) -> Result<T, LoraError>,
    expected: impl Fn(&LoraError) -> bool,
) {
    let mut l = original.clone();
    let err = op(&mut l).expect_err("operation should fail");
    assert!(expected(&err), "unexpected error: {err:?} ({err})");
    assert!(
        identical(&l, original),
        "the layer changed on error {err:?}"
    );
    assert!(!err.to_string().is_empty());
}

#[test]
fn construction_rejects_bad_shapes_ranks_and_values() {
    let w = Array2::<f32>::ones((4, 6));
    let cfg = |rank| LoraConfig {
        rank,
        ..Default::default()
    };
    let err = LoraLayer::new(Array2::<f32>::zeros((0, 6)), cfg(1)).unwrap_err();
    assert!(
        matches!(
            err,
            LoraError::ShapeMismatch {
                what: "base_weight",
                ..
            }
        ),
        "{err}"
    );
    let err = LoraLayer::new(Array2::<f32>::zeros((4, 0)), cfg(1)).unwrap_err();
    assert!(matches!(
        err,
        LoraError::ShapeMismatch {
            what: "base_weight",
            ..
        }
    ));
    assert_eq!(
        LoraLayer::new(w.clone(), cfg(0)).unwrap_err(),
        LoraError::InvalidRank {
            got: 0,
            min: 1,
            max: 4
        }
    );
    assert_eq!(
        LoraLayer::new(w.clone(), cfg(5)).unwrap_err(),
        LoraError::InvalidRank {
            got: 5,
            min: 1,
            max: 4
        }
    );
    for alpha in [f64::NAN, f64::INFINITY] {
        let err = LoraLayer::new(w.clone(), LoraConfig { alpha, ..cfg(2) }).unwrap_err();
        assert!(
            matches!(err, LoraError::InvalidValue { what: "alpha", .. }),
            "{err}"
        );
    }
    // Finite in f64 but not in f32.
    let err = LoraLayer::new(
        w.clone(),
        LoraConfig {
            alpha: 1e300,
            ..cfg(2)
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            LoraError::InvalidValue {
                what: "scaling",
                ..
            }
        ),
        "{err}"
    );
    for dropout in [-0.1, 1.0, 1.5, f64::NAN] {
        let err = LoraLayer::new(w.clone(), LoraConfig { dropout, ..cfg(2) }).unwrap_err();
        assert!(
            matches!(
                err,
                LoraError::InvalidValue {
                    what: "dropout",
                    ..
                }
            ),
            "{err}"
        );
    }
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut w = w.clone();
        w[[3, 2]] = bad;
        let err = LoraLayer::new(w, cfg(2)).unwrap_err();
        assert!(
            matches!(
                err,
                LoraError::NonFinite {
                    what: "base_weight",
                    index: (3, 2),
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn from_parts_checks_shapes_and_finiteness() {
    let (w, a, b) = (
        Array2::<f64>::ones((5, 7)),
        Array2::ones((2, 7)),
        Array2::ones((5, 2)),
    );
    let cfg = LoraConfig {
        rank: 2,
        ..Default::default()
    };
    let ok = LoraLayer::from_parts(w.clone(), a.clone(), b.clone(), cfg.clone());
    assert!(ok.is_ok());
    let shape_err = |w: Array2<f64>, a: Array2<f64>, b: Array2<f64>, what: &str| {
        let err = LoraLayer::from_parts(w, a, b, cfg.clone()).unwrap_err();
        assert!(
            matches!(&err, LoraError::ShapeMismatch { what: w, .. } if *w == what),
            "{err}"
        );
    };
    shape_err(w.clone(), Array2::ones((3, 7)), b.clone(), "weight_a");
    shape_err(w.clone(), Array2::ones((2, 6)), b.clone(), "weight_a");
    shape_err(w.clone(), a.clone(), Array2::ones((4, 2)), "weight_b");
    shape_err(w.clone(), a.clone(), Array2::ones((5, 3)), "weight_b");
    let mut bad_a = a.clone();
    bad_a[[1, 6]] = f64::NAN;
    let err = LoraLayer::from_parts(w.clone(), bad_a, b.clone(), cfg.clone()).unwrap_err();
    assert!(matches!(
        err,
        LoraError::NonFinite {
            what: "weight_a",
            index: (1, 6),
            ..
        }
    ));
    let mut bad_b = b.clone();
    bad_b[[4, 0]] = f64::NEG_INFINITY;
    let err = LoraLayer::from_parts(w, a, bad_b, cfg).unwrap_err();
    assert!(matches!(
        err,
        LoraError::NonFinite {
            what: "weight_b",
            index: (4, 0),
            ..
        }
    ));
}

#[test]
fn forward_rejects_the_wrong_input_width() {
    let l = layer();
    for width in [0, 6, 8] {
        let x = Array2::<f64>::ones((3, width));
        let err = l.forward(x.view()).unwrap_err();
        assert_eq!(
            err,
            LoraError::ShapeMismatch {
                what: "input x",
                expected: "[_, 7]".into(),
                got: format!("[3, {width}]"),
            }
        );
        fails_unchanged(
            &l,
            |l| l.forward_train(x.view()),
            |e| matches!(e, LoraError::ShapeMismatch { .. }),
        );
    }
    let x = Array2::<f64>::ones((3, 7));
    for out_shape in [(3, 4), (2, 5), (3, 6)] {
        let mut out = Array2::<f64>::from_elem(out_shape.f(), -1.0);
        let err = l.forward_into(x.view(), out.view_mut()).unwrap_err();
        assert!(
            matches!(err, LoraError::ShapeMismatch { what: "out", .. }),
            "{err}"
        );
        assert!(out.iter().all(|&v| v == -1.0), "output touched on error");
    }
    // With dropout the training path validates before drawing masks (RNG state unchanged).
    let mut dl = LoraLayer::new(
        Array2::<f64>::ones((5, 7)),
        LoraConfig {
            rank: 2,
            dropout: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    let before = dl.clone();
    assert!(dl
        .forward_train(Array2::<f64>::ones((2, 3)).view())
        .is_err());
    assert!(dl == before);
}

#[test]
fn merge_state_errors() {
    let l = layer();
    fails_unchanged(
        &l,
        |l| l.unmerge(),
        |e| {
            *e == LoraError::MergeState {
                operation: "unmerge",
                expected: true,
            }
        },
    );
    let mut merged = l.clone();
    merged.merge().unwrap();
    fails_unchanged(
        &merged,
        |l| l.merge(),
        |e| {
            *e == LoraError::MergeState {
                operation: "merge",
                expected: false,
            }
        },
    );
    fails_unchanged(
        &merged,
        |l| l.weight_a_mut().map(|_| ()),
        |e| {
            *e == LoraError::MergeState {
                operation: "weight_a_mut",
                expected: false,
            }
        },
    );
    fails_unchanged(
        &merged,
        |l| l.weight_b_mut().map(|_| ()),
        |e| {
            *e == LoraError::MergeState {
                operation: "weight_b_mut",
                expected: false,
            }
        },
    );
    fails_unchanged(
        &merged,
        |l| l.set_scaling(2.0),
        |e| matches!(e, LoraError::MergeState { .. }),
    );
}

#[test]
fn set_scaling_rejects_non_finite() {
    let l = layer();
    for s in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        fails_unchanged(
            &l,
            |l| l.set_scaling(s),
            |e| {
                matches!(
                    e,
                    LoraError::InvalidValue {
                        what: "scaling",
                        ..
                    }
                )
            },
        );
    }
    let l32 = LoraLayer::new(
        Array2::<f32>::ones((3, 3)),
        LoraConfig {
            rank: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let mut c = l32.clone();
    assert!(c.set_scaling(1e39).is_err());
    assert!(c == l32);
}

#[test]
fn merge_refuses_non_finite_factors() {
    let l = layer();
    for (which, bad) in [("weight_a", f64::NAN), ("weight_b", f64::INFINITY)] {
        let mut poisoned = l.clone();
        if which == "weight_a" {
            poisoned.weight_a_mut().unwrap()[[1, 3]] = bad;
        } else {
            poisoned.weight_b_mut().unwrap()[[1, 1]] = bad;
        }
        fails_unchanged(
            &poisoned,
            |l| l.merge(),
            |e| matches!(e, LoraError::NonFinite { what, .. } if *what == which),
        );
    }
}

#[test]
fn merge_refuses_to_overflow_and_leaves_w_alone() {
    // W near f32::MAX: adding s·B A overflows in some entries only.
    let mut w = Array2::<f32>::ones((6, 5));
    w[[4, 2]] = f32::MAX * 0.75;
    let a = Array2::from_elem((1, 5), 1.0e19f32);
    let b = Array2::from_elem((6, 1), 1.0e19f32);
    let cfg = LoraConfig {
        rank: 1,
        alpha: 1.0,
        ..Default::default()
    };
    let l = LoraLayer::from_parts(w, a, b, cfg).unwrap();
    fails_unchanged(
        &l,
        |l| l.merge(),
        |e| *e == LoraError::WouldOverflow { operation: "merge" },
    );

    // Large but safe values go through the exact check and merge.
    let mut w = Array2::<f32>::ones((130, 5));
    w[[100, 2]] = f32::MAX * 0.75;
    let a = Array2::from_elem((1, 5), 1.0e18f32);
    let b = Array2::from_elem((130, 1), -1.0e18f32);
    let cfg = LoraConfig {
        rank: 1,
        alpha: 1.0,
        ..Default::default()
    };
    let mut l = LoraLayer::from_parts(w, a, b, cfg).unwrap();
    l.merge().unwrap();
    assert!(l.base_weight().iter().all(|v| v.is_finite()));
    assert_eq!(l.base_weight()[[0, 0]], 1.0 - 1.0e36);

    // Unmerge goes through the same check and restores the large entry (the 1.0 entries were
    // absorbed by −1e36 in f32 and come back as 0: rounding, not a bug).
    l.unmerge().unwrap();
    assert_eq!(l.base_weight()[[100, 2]], f32::MAX * 0.75);
}

#[test]
fn corrupt_documents_are_errors_never_layers() {
    let l = layer();
    let good = serde_json::to_value(&l).unwrap();
    let back: LoraLayer<f64> = serde_json::from_value(good.clone()).unwrap();
    assert!(back == l);

    let corrupt = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        serde_json::from_value::<LoraLayer<f64>>(v)
    };
    // Array data of the wrong length for its dim.
    let err = corrupt(&|v| v["weight_a"]["data"].as_array_mut().unwrap().truncate(3)).unwrap_err();
    assert!(!err.to_string().is_empty());
    // Consistent arrays but the wrong rank for the config.
    assert!(corrupt(&|v| v["config"]["rank"] = 3.into())
        .unwrap_err()
        .to_string()
        .contains("weight_a"));
    // A factor of the wrong shape.
    let err = corrupt(&|v| {
        v["weight_b"]["dim"] = serde_json::json!([7, 2]);
        v["weight_b"]["data"] = serde_json::json!(vec![0.5; 14]);
    })
    .unwrap_err();
    assert!(err.to_string().contains("weight_b"), "{err}");
    // NaN cannot be written as JSON; null or a string in its place is refused.
    assert!(corrupt(&|v| v["base_weight"]["data"][0] = serde_json::Value::Null).is_err());
    assert!(corrupt(&|v| v["base_weight"]["data"][0] = "NaN".into()).is_err());
    // Out-of-range values that parse as infinity.
    let err = corrupt(&|v| {
        v["weight_a"]["data"][0] = serde_json::from_str("1e999").unwrap_or(1e308.into())
    })
    .map(|_| ())
    .err();
    let _ = err; // serde_json may reject 1e999 itself; either way no panic.
                 // Missing and extra fields.
    assert!(corrupt(&|v| {
        v.as_object_mut().unwrap().remove("merged");
    })
    .is_err());
    assert!(corrupt(&|v| v["surprise"] = 1.into()).is_err());
    assert!(corrupt(&|v| v["config"]["dropout"] = 1.5.into())
        .unwrap_err()
        .to_string()
        .contains("dropout"));
    assert!(
        corrupt(&|v| v["scaling"] = 1e300.into()).is_ok(),
        "finite f64 scaling is fine for f64"
    );
    // As f32 the same document's huge scaling is refused.
    let mut v32 = serde_json::to_value(
        LoraLayer::<f32>::new(
            Array2::ones((3, 3)),
            LoraConfig {
                rank: 1,
                ..Default::default()
            },
        )
        .unwrap(),
    )
    .unwrap();
    v32["scaling"] = 1e300.into();
    assert!(serde_json::from_value::<LoraLayer<f32>>(v32)
        .unwrap_err()
        .to_string()
        .contains("scaling"));
    // Truncated text.
    let text = serde_json::to_string(&l).unwrap();
    for cut in [0, 1, text.len() / 2, text.len() - 1] {
        assert!(serde_json::from_str::<LoraLayer<f64>>(&text[..cut]).is_err());
    }
}

#[test]
fn serde_round_trip_keeps_state_including_merge_and_rng() {
    let mut g = rng(3);
    let cfg = LoraConfig {
        rank: 3,
        alpha: 5.0,
        dropout: 0.2,
        ..Default::default()
    };
    let mut l = LoraLayer::from_parts(
        random::<f32>(&mut g, 8, 9),
        random(&mut g, 3, 9),
        random(&mut g, 8, 3),
        cfg,
    )
    .unwrap();
    let x: Array2<f32> = random(&mut g, 4, 9);
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
