//! LoraLayer: construction and LoraConfig, methods on a live layer, serde documents (the
//! counted catalogue), then focused tests of the same error paths.

use half::{bf16, f16};
use ndarray::{Array1, Array2, ShapeBuilder};
use ndlora::{LoraConfig, LoraError, LoraFloat, LoraGrads, LoraLayer, LoraScratch};
use num_traits::{Float, One, Zero};
use serde_json::{json, Value};

use super::{cfg, factor_is_f32, nonfinite, Tally, LAYER_CONSTRUCT, LAYER_METHODS, LAYER_SERDE};
use crate::common::{fails_unchanged, random, random_layer, rng, State};

fn layer_construction<A: LoraFloat>() -> usize {
    let mut t = Tally::default();
    let w = Array2::<A>::ones((4, 6));
    let is_rank = |got: usize, max: usize| {
        move |e: &LoraError| *e == LoraError::InvalidRank { got, min: 1, max }
    };
    let base = |e: &LoraError| {
        matches!(
            e,
            LoraError::ShapeMismatch {
                what: "base_weight",
                ..
            }
        )
    };
    t.err(
        "new d = 0",
        LoraLayer::new(Array2::<A>::zeros((0, 6)), cfg(1)),
        base,
    );
    t.err(
        "new k = 0",
        LoraLayer::new(Array2::<A>::zeros((4, 0)), cfg(1)),
        base,
    );
    t.err(
        "new 0×0",
        LoraLayer::new(Array2::<A>::zeros((0, 0)), cfg(1)),
        base,
    );
    t.err("rank 0", LoraLayer::new(w.clone(), cfg(0)), is_rank(0, 4));
    t.err(
        "rank > min(d, k)",
        LoraLayer::new(w.clone(), cfg(5)),
        is_rank(5, 4),
    );
    t.err(
        "rank usize::MAX",
        LoraLayer::new(w.clone(), cfg(usize::MAX)),
        is_rank(usize::MAX, 4),
    );
    t.err(
        "rank 2 on a 1×6",
        LoraLayer::new(Array2::<A>::ones((1, 6)), cfg(2)),
        is_rank(2, 1),
    );
    for alpha in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        t.err(
            "alpha non-finite",
            LoraLayer::new(w.clone(), LoraConfig { alpha, ..cfg(2) }),
            |e| matches!(e, LoraError::InvalidValue { what: "alpha", .. }),
        );
    }
    for dropout in [f64::NAN, f64::INFINITY, -1e-300, 1.0, 2.0] {
        t.err(
            "dropout out of [0, 1)",
            LoraLayer::new(w.clone(), LoraConfig { dropout, ..cfg(2) }),
            |e| {
                matches!(
                    e,
                    LoraError::InvalidValue {
                        what: "dropout",
                        ..
                    }
                )
            },
        );
    }
    // α/r finite in f64 but not in the factor type (only f32 can overflow here: α finite
    // and r ≥ 1; the half types scale in f32).
    let huge = if factor_is_f32::<A>() {
        1e300
    } else {
        f64::MAX
    };
    let r = LoraLayer::new(
        w.clone(),
        LoraConfig {
            alpha: huge,
            rank: 1,
            ..cfg(1)
        },
    );
    if factor_is_f32::<A>() {
        t.err("scaling overflows f32", r, |e| {
            matches!(
                e,
                LoraError::InvalidValue {
                    what: "scaling",
                    ..
                }
            )
        });
    } else {
        t.cases += 1; // f64::MAX / 1 is representable: accepted
        assert!(r.is_ok());
    }
    for (v, fv) in nonfinite::<A>().into_iter().zip(nonfinite::<A::Factor>()) {
        let mut bad = w.clone();
        bad[[3, 5]] = v;
        t.err("W non-finite", LoraLayer::new(bad.clone(), cfg(2)), |e| {
            matches!(
                e,
                LoraError::NonFinite {
                    what: "base_weight",
                    index: (3, 5),
                    ..
                }
            )
        });
        t.err(
            "from_parts W non-finite",
            LoraLayer::from_parts(bad, Array2::zeros((2, 6)), Array2::zeros((4, 2)), cfg(2)),
            |e| {
                matches!(
                    e,
                    LoraError::NonFinite {
                        what: "base_weight",
                        ..
                    }
                )
            },
        );
        let mut a = Array2::<A::Factor>::zeros((2, 6));
        a[[1, 0]] = fv;
        t.err(
            "from_parts A non-finite",
            LoraLayer::from_parts(w.clone(), a, Array2::zeros((4, 2)), cfg(2)),
            |e| {
                matches!(
                    e,
                    LoraError::NonFinite {
                        what: "weight_a",
                        index: (1, 0),
                        ..
                    }
                )
            },
        );
        let mut b = Array2::<A::Factor>::zeros((4, 2));
        b[[0, 1]] = fv;
        t.err(
            "from_parts B non-finite",
            LoraLayer::from_parts(w.clone(), Array2::zeros((2, 6)), b, cfg(2)),
            |e| {
                matches!(
                    e,
                    LoraError::NonFinite {
                        what: "weight_b",
                        index: (0, 1),
                        ..
                    }
                )
            },
        );
        t.err(
            "with_bias non-finite",
            LoraLayer::new(w.clone(), cfg(2))
                .unwrap()
                .with_bias(Array1::from_elem(4, v)),
            |e| {
                matches!(
                    e,
                    LoraError::NonFinite {
                        what: "bias",
                        index: (0, 0),
                        ..
                    }
                )
            },
        );
    }
    let shape = |what: &'static str| move |e: &LoraError| matches!(e, LoraError::ShapeMismatch { what: w, .. } if *w == what);
    for (a, b, what) in [
        ((3, 6), (4, 2), "weight_a"),
        ((2, 7), (4, 2), "weight_a"),
        ((6, 2), (4, 2), "weight_a"),
        ((0, 6), (4, 2), "weight_a"),
        ((2, 6), (4, 3), "weight_b"),
        ((2, 6), (2, 4), "weight_b"),
        ((2, 6), (5, 2), "weight_b"),
        ((2, 6), (4, 0), "weight_b"),
    ] {
        t.err(
            "from_parts factor shape",
            LoraLayer::from_parts(
                w.clone(),
                Array2::<A::Factor>::zeros(a),
                Array2::<A::Factor>::zeros(b),
                cfg(2),
            ),
            shape(what),
        );
    }
    t.err(
        "from_parts d = 0",
        LoraLayer::from_parts(
            Array2::<A>::zeros((0, 6)),
            Array2::zeros((2, 6)),
            Array2::zeros((0, 2)),
            cfg(2),
        ),
        base,
    );
    t.err(
        "from_parts rank 0 with empty factors",
        LoraLayer::from_parts(
            w.clone(),
            Array2::<A::Factor>::zeros((0, 6)),
            Array2::zeros((4, 0)),
            cfg(0),
        ),
        is_rank(0, 4),
    );
    for len in [0, 3, 5] {
        t.err(
            "with_bias length",
            LoraLayer::new(w.clone(), cfg(2))
                .unwrap()
                .with_bias(Array1::zeros(len)),
            shape("bias"),
        );
    }
    // LoraConfig::validate directly, with dims at the extremes.
    t.err("validate 0×0", cfg(1).validate(0, 0), is_rank(1, 0));
    t.err(
        "validate rank 0 on huge dims",
        cfg(0).validate(usize::MAX, usize::MAX),
        is_rank(0, usize::MAX),
    );
    t.err(
        "validate rank > k",
        cfg(3).validate(usize::MAX, 2),
        is_rank(3, 2),
    );
    t.err(
        "validate NaN alpha on huge dims",
        LoraConfig {
            alpha: f64::NAN,
            ..cfg(1)
        }
        .validate(usize::MAX, usize::MAX),
        |e| matches!(e, LoraError::InvalidValue { what: "alpha", .. }),
    );
    t.cases
}

#[test]
fn layer_construction_f32() {
    let n = layer_construction::<f32>();
    println!("LoraLayer<f32> construction: {n} cases");
    assert_eq!(n, LAYER_CONSTRUCT);
}

#[test]
fn layer_construction_f64() {
    assert_eq!(layer_construction::<f64>(), LAYER_CONSTRUCT);
}

#[test]
fn layer_construction_bf16() {
    assert_eq!(layer_construction::<bf16>(), LAYER_CONSTRUCT);
}

#[test]
fn layer_construction_f16() {
    assert_eq!(layer_construction::<f16>(), LAYER_CONSTRUCT);
}

/// Parameter counts cannot overflow: a layer holds W (d·k elements of at least 4 bytes, so
/// d·k ≤ isize::MAX / 4), and 1 ≤ r ≤ min(d, k) gives r·(d + k) ≤ 2·d·k, so
/// d·k + r·(d + k) ≤ 3·d·k < usize::MAX. The largest layer we can build here shows the
/// arithmetic is exact.
#[test]
fn param_counts_cannot_overflow() {
    let l = LoraLayer::new(Array2::<f32>::zeros((1, 1 << 20)), cfg(1)).unwrap();
    assert_eq!(l.trainable_params(), (1 << 20) + 1);
    assert_eq!(l.total_params(), (1 << 20) + (1 << 20) + 1);
    let l = LoraLayer::new(Array2::<f32>::zeros((512, 512)), cfg(512)).unwrap();
    assert_eq!(l.trainable_params(), 512 * 1024);
    assert_eq!(l.total_params(), 512 * 512 + 512 * 1024);
    assert!(l.total_params() <= 3 * 512 * 512);
}

// ---------------------------------------------------------------------------------------------
// LoraLayer methods on a live layer: every error leaves it bit-for-bit unchanged.

fn layer_methods<A: LoraFloat>() -> usize {
    let mut t = Tally::default();
    let l = random_layer::<A>(5, 7, 2, 1)
        .with_bias(Array1::from_elem(5, A::from_f64_lossy(0.25)))
        .unwrap();
    let mut merged = l.clone();
    merged.merge().unwrap();
    let mut merged_exact = l.clone();
    merged_exact.merge_exact().unwrap();
    let mut dropout = LoraLayer::from_parts(
        l.base_weight().to_owned(),
        l.weight_a().to_owned(),
        l.weight_b().to_owned(),
        LoraConfig {
            dropout: 0.5,
            ..cfg(2)
        },
    )
    .unwrap();
    dropout.forward_train(Array2::ones((2, 7)).view()).unwrap(); // RNG off its start
    let shape = |what: &'static str| move |e: &LoraError| matches!(e, LoraError::ShapeMismatch { what: w, .. } if *w == what);
    let state_of = |is_merged: bool, op: &'static str| {
        move |e: &LoraError| {
            *e == LoraError::MergeState {
                operation: op,
                expected: is_merged,
            }
        }
    };

    // forward, forward_into, forward_into_with_scratch, forward_train, backward: wrong widths.
    for cols in [0, 6, 8, 5 * 7] {
        for target in [&l, &merged] {
            let x = Array2::<A>::ones((3, cols));
            t.unchanged(
                "forward width",
                target,
                |l| l.forward(x.view()),
                shape("input x"),
            );
            let mut out = Array2::<A>::from_elem((3, 5), A::from_f64_lossy(-7.5));
            t.unchanged(
                "forward_into width",
                target,
                |l| l.forward_into(x.view(), out.view_mut()),
                shape("input x"),
            );
            assert!(
                out.iter().all(|&v| v == A::from_f64_lossy(-7.5)),
                "out was written"
            );
        }
        let x = Array2::<A>::ones((3, cols));
        t.unchanged(
            "forward_train width",
            &dropout,
            |l| l.forward_train(x.view()),
            shape("input x"),
        );
        let g = Array2::<A>::ones((3, 5));
        t.unchanged(
            "backward width",
            &l,
            |l| l.backward(x.view(), g.view()),
            shape("input x"),
        );
    }
    let x = Array2::<A>::ones((3, 7));
    for out_shape in [(2, 5), (4, 5), (3, 4), (3, 6), (0, 5), (5, 3)] {
        let mut out = Array2::<A>::from_elem(out_shape, A::from_f64_lossy(-7.5));
        t.unchanged(
            "forward_into out shape",
            &l,
            |l| l.forward_into(x.view(), out.view_mut()),
            shape("out"),
        );
        let mut scratch = LoraScratch::<A::Factor>::with_capacity(1, 1);
        t.unchanged(
            "forward_into_with_scratch out shape",
            &l,
            |l| l.forward_into_with_scratch(x.view(), out.view_mut(), &mut scratch),
            shape("out"),
        );
        assert_eq!(scratch.capacity(), 1, "scratch grew on error");
        assert!(
            out.iter().all(|&v| v == A::from_f64_lossy(-7.5)),
            "out was written"
        );
        if out_shape.0 != 3 {
            let g = Array2::<A>::ones(out_shape);
            t.unchanged(
                "backward grad shape",
                &l,
                |l| l.backward(x.view(), g.view()),
                shape("grad_output"),
            );
        }
    }
    let g = Array2::<A>::ones((3, 4));
    t.unchanged(
        "backward grad cols",
        &l,
        |l| l.backward(x.view(), g.view()),
        shape("grad_output"),
    );

    // sgd_step: learning rates, gradient shapes, non-finite gradients, overflow, merged.
    let grads = l.backward(x.view(), Array2::ones((3, 5)).view()).unwrap();
    for lr in nonfinite::<A::Factor>() {
        t.unchanged(
            "sgd lr non-finite",
            &l,
            |l| l.sgd_step(&grads, lr),
            |e| {
                matches!(
                    e,
                    LoraError::InvalidValue {
                        what: "learning rate",
                        ..
                    }
                )
            },
        );
    }
    for (ga, gb, what) in [
        ((2, 6), (5, 2), "grad_a"),
        ((7, 2), (5, 2), "grad_a"),
        ((2, 7), (2, 5), "grad_b"),
        ((2, 7), (5, 3), "grad_b"),
    ] {
        let bad = LoraGrads {
            grad_a: Array2::<A::Factor>::zeros(ga),
            grad_b: Array2::zeros(gb),
            grad_x: Array2::zeros((0, 0)),
        };
        t.unchanged(
            "sgd grad shape",
            &l,
            |l| l.sgd_step(&bad, A::Factor::one()),
            shape(what),
        );
    }
    for v in nonfinite::<A::Factor>() {
        let mut bad = grads.clone();
        bad.grad_a[[1, 6]] = v;
        t.unchanged(
            "sgd grad_a non-finite",
            &l,
            |l| l.sgd_step(&bad, A::Factor::zero()),
            |e| {
                matches!(
                    e,
                    LoraError::NonFinite {
                        what: "grad_a",
                        index: (1, 6),
                        ..
                    }
                )
            },
        );
        let mut bad = grads.clone();
        bad.grad_b[[4, 0]] = v;
        t.unchanged(
            "sgd grad_b non-finite",
            &l,
            |l| l.sgd_step(&bad, A::Factor::zero()),
            |e| {
                matches!(
                    e,
                    LoraError::NonFinite {
                        what: "grad_b",
                        index: (4, 0),
                        ..
                    }
                )
            },
        );
    }
    // A finite step that overflows: lr = MAX on O(1) gradients (B's overflow only: grad_a = 0).
    let mut big = grads.clone();
    big.grad_a.fill(A::Factor::zero());
    big.grad_b.fill(A::Factor::from_f64_lossy(-4.0));
    t.unchanged(
        "sgd step overflows",
        &l,
        |l| l.sgd_step(&big, A::Factor::max_value()),
        |e| {
            matches!(
                e,
                LoraError::NonFinite {
                    what: "weight_b after sgd_step",
                    ..
                }
            )
        },
    );
    t.unchanged(
        "sgd while merged",
        &merged,
        |l| l.sgd_step(&grads, A::Factor::one()),
        state_of(false, "sgd_step"),
    );

    // Merge state machine.
    t.unchanged(
        "merge twice",
        &merged,
        |l| l.merge(),
        state_of(false, "merge"),
    );
    t.unchanged(
        "merge after merge_exact",
        &merged_exact,
        |l| l.merge(),
        state_of(false, "merge"),
    );
    t.unchanged(
        "merge_exact twice",
        &merged_exact,
        |l| l.merge_exact(),
        state_of(false, "merge_exact"),
    );
    t.unchanged(
        "merge_exact after merge",
        &merged,
        |l| l.merge_exact(),
        state_of(false, "merge_exact"),
    );
    t.unchanged(
        "unmerge unmerged",
        &l,
        |l| l.unmerge(),
        state_of(true, "unmerge"),
    );
    t.unchanged(
        "set_scaling merged",
        &merged,
        |l| l.set_scaling(1.0),
        state_of(false, "set_scaling"),
    );
    t.unchanged(
        "weight_a_mut merged",
        &merged_exact,
        |l| l.weight_a_mut().map(|_| ()),
        state_of(false, "weight_a_mut"),
    );
    t.unchanged(
        "weight_b_mut merged",
        &merged,
        |l| l.weight_b_mut().map(|_| ()),
        state_of(false, "weight_b_mut"),
    );

    // Merges whose result would overflow: W near MAX/2 and a large update.
    let max = A::max_value().into_f64();
    let near = LoraLayer::from_parts(
        Array2::from_elem((5, 7), A::from_f64_lossy(0.45 * max)),
        Array2::from_elem((2, 7), A::Factor::from_f64_lossy(max.sqrt())),
        Array2::from_elem((5, 2), A::Factor::from_f64_lossy(max.sqrt())),
        cfg(2),
    )
    .unwrap();
    let over =
        |op: &'static str| move |e: &LoraError| *e == LoraError::WouldOverflow { operation: op };
    t.unchanged("merge overflows", &near, |l| l.merge(), over("merge"));
    t.unchanged(
        "merge_exact overflows",
        &near,
        |l| l.merge_exact(),
        over("merge"),
    );
    // Unmerge overflow: a merged layer (from a document) whose W − s·B A leaves the range.
    let mut doc = serde_json::to_value(&near).unwrap();
    doc["merged"] = json!(true);
    doc["scaling"] = json!(-1.5);
    let merged_near: LoraLayer<A> = serde_json::from_value(doc).unwrap();
    t.unchanged(
        "unmerge overflows",
        &merged_near,
        |l| l.unmerge(),
        over("unmerge"),
    );

    // set_scaling and set_bias.
    for s in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        t.unchanged(
            "set_scaling non-finite",
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
    let s = if factor_is_f32::<A>() { 1e39 } else { f64::NAN };
    t.unchanged(
        "set_scaling not finite in A",
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
    for len in [0, 4, 6] {
        t.unchanged(
            "set_bias length",
            &l,
            |l| l.set_bias(Some(Array1::zeros(len))),
            shape("bias"),
        );
    }
    for v in nonfinite::<A>() {
        let mut b = Array1::<A>::zeros(5);
        b[2] = v;
        t.unchanged(
            "set_bias non-finite",
            &l,
            |l| l.set_bias(Some(b)),
            |e| {
                matches!(
                    e,
                    LoraError::NonFinite {
                        what: "bias",
                        index: (0, 2),
                        ..
                    }
                )
            },
        );
    }
    t.cases
}

#[test]
fn layer_methods_f32() {
    let n = layer_methods::<f32>();
    println!("LoraLayer<f32> methods: {n} cases");
    assert_eq!(n, LAYER_METHODS);
}

#[test]
fn layer_methods_f64() {
    assert_eq!(layer_methods::<f64>(), LAYER_METHODS);
}

#[test]
fn layer_methods_bf16() {
    assert_eq!(layer_methods::<bf16>(), LAYER_METHODS);
}

#[test]
fn layer_methods_f16() {
    assert_eq!(layer_methods::<f16>(), LAYER_METHODS);
}

/// NaN in a forward input is not an error: it propagates to exactly the rows it is in, in
/// every forward flavour, merged or not, and the layer stays as it was. Each flavour is
/// compared bit for bit with the same flavour on the clean input: a BLAS may sum in a
/// different order for a column-major operand (BLIS does), so flavours can differ by an ulp.
#[test]
fn nan_input_poisons_only_its_rows() {
    fn check<A: LoraFloat>() {
        let mut g = rng(9);
        let l = random_layer::<A>(5, 7, 2, 3)
            .with_bias(Array1::from_elem(5, A::one()))
            .unwrap();
        let mut merged = l.clone();
        merged.merge().unwrap();
        let before = l.state();
        let clean: Array2<A> = random(&mut g, 6, 7);
        // Every forward flavour of `target` on `x`: row-major, column-major (so the strided
        // BLAS path sees it) and into a caller's buffer.
        let flavours = |target: &LoraLayer<A>, x: &Array2<A>| {
            let mut xf = Array2::<A>::zeros((6, 7).f());
            xf.assign(x);
            let mut scratch = LoraScratch::new();
            let mut y = Array2::<A>::zeros((6, 5));
            target
                .forward_into_with_scratch(x.view(), y.view_mut(), &mut scratch)
                .unwrap();
            [
                target.forward(x.view()).unwrap(),
                target.forward(xf.view()).unwrap(),
                y,
            ]
        };
        for (bad_row, v) in [(0, A::nan()), (3, A::infinity()), (5, A::neg_infinity())] {
            let mut x = clean.clone();
            x[[bad_row, 4]] = v;
            for target in [&l, &merged] {
                for (y, reference) in flavours(target, &x)
                    .into_iter()
                    .zip(flavours(target, &clean))
                {
                    for i in 0..6 {
                        if i == bad_row {
                            assert!(
                                y.row(i).iter().all(|v| !v.is_finite()),
                                "row {i} not poisoned: {:?}",
                                y.row(i)
                            );
                        } else {
                            assert_eq!(
                                y.row(i),
                                reference.row(i),
                                "row {i} changed by a NaN in row {bad_row}"
                            );
                        }
                    }
                }
            }
            assert_eq!(l.state(), before);
            // Backward with a NaN gradient row: NaN in the factor gradients, refused by sgd_step.
            let mut gr = Array2::<A>::ones((6, 5));
            gr[[bad_row, 0]] = A::nan();
            let grads = l.backward(clean.view(), gr.view()).unwrap();
            assert!(grads
                .grad_x
                .row(bad_row)
                .iter()
                .all(|v| v.into_f64().is_nan()));
            let mut l2 = l.clone();
            assert!(matches!(
                l2.sgd_step(&grads, A::Factor::one()),
                Err(LoraError::NonFinite { what: "grad_a", .. })
            ));
            assert_eq!(l2.state(), before);
        }
    }
    check::<f32>();
    check::<f64>();
    check::<bf16>();
    check::<f16>();
}

// ---------------------------------------------------------------------------------------------
// LoraLayer serde documents.

/// Deserialises `doc` as a layer and asserts a data error whose message contains `needle`.
#[track_caller]
fn bad_doc<A: LoraFloat>(t: &mut Tally, name: &str, doc: &Value, needle: &str) {
    t.cases += 1;
    let text = doc.to_string();
    match serde_json::from_str::<LoraLayer<A>>(&text) {
        Ok(_) => panic!("{name}: accepted"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "{name}: {msg:?} does not contain {needle:?}"
            );
        }
    }
}

fn layer_serde<A: LoraFloat>() -> usize {
    let mut t = Tally::default();
    let l = random_layer::<A>(5, 7, 2, 4)
        .with_bias(Array1::from_elem(5, A::one()))
        .unwrap();
    let good = serde_json::to_value(&l).unwrap();
    assert_eq!(
        serde_json::from_value::<LoraLayer<A>>(good.clone()).unwrap(),
        l
    );
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut d = good.clone();
        f(&mut d);
        d
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "missing scaling",
            edit(&|d| {
                d.as_object_mut().unwrap().remove("scaling");
            }),
            "missing field `scaling`",
        ),
        (
            "missing config",
            edit(&|d| {
                d.as_object_mut().unwrap().remove("config");
            }),
            "missing field `config`",
        ),
        (
            "missing weight_a",
            edit(&|d| {
                d.as_object_mut().unwrap().remove("weight_a");
            }),
            "missing field `weight_a`",
        ),
        (
            "missing dropout_rng",
            edit(&|d| {
                d.as_object_mut().unwrap().remove("dropout_rng");
            }),
            "missing field `dropout_rng`",
        ),
        (
            "extra field",
            edit(&|d| d["extra"] = json!(1)),
            "unknown field `extra`",
        ),
        (
            "extra config field",
            edit(&|d| d["config"]["lr"] = json!(0.1)),
            "unknown field `lr`",
        ),
        (
            "NaN as a string in W",
            edit(&|d| d["base_weight"]["data"][0] = json!("NaN")),
            "invalid type: string \"NaN\"",
        ),
        (
            "null in A",
            edit(&|d| d["weight_a"]["data"][3] = Value::Null),
            "invalid type: null",
        ),
        (
            "scaling as a string",
            edit(&|d| d["scaling"] = json!("NaN")),
            "invalid type: string \"NaN\"",
        ),
        (
            "merged as a string",
            edit(&|d| d["merged"] = json!("true")),
            "invalid type: string",
        ),
        (
            "data shorter than dim",
            edit(&|d| {
                d["weight_a"]["data"].as_array_mut().unwrap().pop();
            }),
            "dimension",
        ),
        (
            "data longer than dim",
            edit(&|d| {
                d["weight_b"]["data"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!(0.0));
            }),
            "dimension",
        ),
        (
            "A transposed",
            edit(&|d| d["weight_a"]["dim"] = json!([7, 2])),
            "shape mismatch for weight_a",
        ),
        (
            "B with rank 1",
            edit(&|d| {
                d["weight_b"]["dim"] = json!([5, 1]);
                d["weight_b"]["data"] = json!([0, 0, 0, 0, 0]);
            }),
            "shape mismatch for weight_b",
        ),
        (
            "dims whose product overflows",
            edit(&|d| d["base_weight"]["dim"] = json!([usize::MAX, 2])),
            "data and dimension must match",
        ),
        (
            "negative dim",
            edit(&|d| d["base_weight"]["dim"] = json!([-5, 7])),
            "invalid value: integer `-5`",
        ),
        (
            "3-D weight",
            edit(&|d| d["base_weight"]["dim"] = json!([5, 7, 1])),
            "trailing characters",
        ),
        (
            "config rank 0",
            edit(&|d| d["config"]["rank"] = json!(0)),
            "invalid rank 0",
        ),
        (
            "config rank 6",
            edit(&|d| d["config"]["rank"] = json!(6)),
            "invalid rank 6",
        ),
        (
            "config rank -1",
            edit(&|d| d["config"]["rank"] = json!(-1)),
            "invalid value: integer `-1`",
        ),
        (
            "config dropout 1",
            edit(&|d| d["config"]["dropout"] = json!(1.0)),
            "invalid dropout",
        ),
        (
            "config init unknown",
            edit(&|d| d["config"]["init"] = json!("Zeros")),
            "unknown variant `Zeros`",
        ),
        (
            "bias wrong length",
            edit(&|d| {
                d["bias"]["dim"] = json!([4]);
                d["bias"]["data"].as_array_mut().unwrap().pop();
            }),
            "shape mismatch for bias",
        ),
        (
            "unmerge_weight while unmerged",
            edit(&|d| d["unmerge_weight"] = d["base_weight"].clone()),
            "invalid unmerge_weight",
        ),
        (
            "unmerge_weight wrong shape",
            edit(&|d| {
                d["merged"] = json!(true);
                d["unmerge_weight"] = d["base_weight"].clone();
                d["unmerge_weight"]["dim"] = json!([7, 5]);
            }),
            "shape mismatch for unmerge_weight",
        ),
    ];
    for (name, doc, needle) in cases {
        bad_doc::<A>(&mut t, name, &doc, needle);
    }
    // A number beyond f64: serde_json refuses it while parsing.
    t.cases += 1;
    let text = good
        .to_string()
        .replacen("\"scaling\":", "\"scaling\":1e999,\"x\":", 1);
    let e = serde_json::from_str::<LoraLayer<A>>(&text).unwrap_err();
    assert!(e.to_string().contains("number out of range"), "{e}");
    // A value finite in f64 that overflows A: refused by serde for f32; a half element is
    // its bit pattern (a u16), so any float there is the wrong type.
    let doc = edit(&|d| d["base_weight"]["data"][5] = json!(1e39));
    match A::NAME {
        "f32" => bad_doc::<A>(&mut t, "1e39 in an f32 W", &doc, "number out of range"),
        "f64" => {
            t.cases += 1;
            assert!(serde_json::from_value::<LoraLayer<A>>(doc).is_ok());
        }
        _ => bad_doc::<A>(
            &mut t,
            "1e39 in a half W",
            &doc,
            "invalid type: floating point",
        ),
    }
    t.cases
}

#[test]
fn layer_serde_f32() {
    let n = layer_serde::<f32>();
    println!("LoraLayer<f32> serde: {n} cases");
    assert_eq!(n, LAYER_SERDE);
}

#[test]
fn layer_serde_f64() {
    assert_eq!(layer_serde::<f64>(), LAYER_SERDE);
}

#[test]
fn layer_serde_bf16() {
    assert_eq!(layer_serde::<bf16>(), LAYER_SERDE);
}

#[test]
fn layer_serde_f16() {
    assert_eq!(layer_serde::<f16>(), LAYER_SERDE);
}

// ---------------------------------------------------------------------------------------------
// Plain tests, one subject each: every error path of LoraLayer returns the right variant and
// leaves the layer as it was.

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
    let l = random_layer::<f64>(5, 7, 2, 1);
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
            "forward_train width",
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
    let l = random_layer::<f64>(5, 7, 2, 1);
    fails_unchanged(
        "unmerge unmerged",
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
        "merge twice",
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
        "weight_a_mut merged",
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
        "weight_b_mut merged",
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
        "set_scaling merged",
        &merged,
        |l| l.set_scaling(2.0),
        |e| matches!(e, LoraError::MergeState { .. }),
    );
}

#[test]
fn set_scaling_rejects_non_finite() {
    let l = random_layer::<f64>(5, 7, 2, 1);
    for s in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        fails_unchanged(
            "set_scaling non-finite",
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
    let l = random_layer::<f64>(5, 7, 2, 1);
    for (which, bad) in [("weight_a", f64::NAN), ("weight_b", f64::INFINITY)] {
        let mut poisoned = l.clone();
        if which == "weight_a" {
            poisoned.weight_a_mut().unwrap()[[1, 3]] = bad;
        } else {
            poisoned.weight_b_mut().unwrap()[[1, 1]] = bad;
        }
        fails_unchanged(
            "merge non-finite factor",
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
        "merge overflows",
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
    let l = random_layer::<f64>(5, 7, 2, 1);
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
