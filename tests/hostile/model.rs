//! LoraModel: construction, adapters, name- and id-addressed methods, merge state, overflow.

use half::{bf16, f16};
use ndarray::Array2;
use ndlora::{LoraConfig, LoraError, LoraFloat, LoraModel};

use super::{cfg, factor_is_f32, nonfinite, Tally, MODEL};
use crate::common::{random, rng};

fn model<A: LoraFloat>() -> LoraModel<A> {
    let mut g = rng(11);
    let mut m = LoraModel::new(random(&mut g, 5, 7)).unwrap();
    m.add_adapter_from_parts("en", random(&mut g, 2, 7), random(&mut g, 5, 2), cfg(2))
        .unwrap();
    m.add_adapter_from_parts("de", random(&mut g, 1, 7), random(&mut g, 5, 1), cfg(1))
        .unwrap();
    m.add_adapter("gone", cfg(1)).unwrap();
    m.remove_adapter("gone").unwrap(); // id 2 is now dead
    m.set_active(&["en", "de"]).unwrap();
    m
}

fn model_cases<A: LoraFloat>() -> usize {
    let mut t = Tally::default();
    let m = model::<A>();
    let mut merged = m.clone();
    merged.merge("en").unwrap();
    let shape = |what: &'static str| move |e: &LoraError| matches!(e, LoraError::ShapeMismatch { what: w, .. } if *w == what);
    let state_of = |is_merged: bool, op: &'static str| {
        move |e: &LoraError| {
            *e == LoraError::MergeState {
                operation: op,
                expected: is_merged,
            }
        }
    };

    // new
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
        LoraModel::new(Array2::<A>::zeros((0, 3))),
        base,
    );
    t.err(
        "new k = 0",
        LoraModel::new(Array2::<A>::zeros((3, 0))),
        base,
    );
    for v in nonfinite::<A>() {
        let mut w = Array2::<A>::zeros((3, 3));
        w[[2, 1]] = v;
        t.err("new non-finite", LoraModel::new(w), |e| {
            matches!(
                e,
                LoraError::NonFinite {
                    what: "base_weight",
                    index: (2, 1),
                    ..
                }
            )
        });
    }

    // add_adapter / add_adapter_from_parts
    let dup = |e: &LoraError| *e == LoraError::DuplicateAdapter { name: "en".into() };
    t.unchanged("add duplicate", &m, |m| m.add_adapter("en", cfg(1)), dup);
    t.unchanged(
        "add_from_parts duplicate",
        &m,
        |m| m.add_adapter_from_parts("en", Array2::zeros((1, 7)), Array2::zeros((5, 1)), cfg(1)),
        dup,
    );
    for (rank, max) in [(0, 5), (6, 5), (usize::MAX, 5)] {
        t.unchanged(
            "add bad rank",
            &m,
            |m| m.add_adapter("x", cfg(rank)),
            move |e| {
                *e == LoraError::InvalidRank {
                    got: rank,
                    min: 1,
                    max,
                }
            },
        );
    }
    for alpha in [f64::NAN, f64::INFINITY] {
        t.unchanged(
            "add alpha",
            &m,
            |m| m.add_adapter("x", LoraConfig { alpha, ..cfg(1) }),
            |e| matches!(e, LoraError::InvalidValue { what: "alpha", .. }),
        );
    }
    t.unchanged(
        "add dropout 1",
        &m,
        |m| {
            m.add_adapter(
                "x",
                LoraConfig {
                    dropout: 1.0,
                    ..cfg(1)
                },
            )
        },
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
    if factor_is_f32::<A>() {
        t.unchanged(
            "add scaling overflows f32",
            &m,
            |m| {
                m.add_adapter(
                    "x",
                    LoraConfig {
                        alpha: 1e300,
                        ..cfg(1)
                    },
                )
            },
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
        t.unchanged(
            "add_from_parts scaling overflows f32",
            &m,
            |m| {
                m.add_adapter_from_parts(
                    "x",
                    Array2::zeros((1, 7)),
                    Array2::zeros((5, 1)),
                    LoraConfig {
                        alpha: 1e300,
                        ..cfg(1)
                    },
                )
            },
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
    } else {
        t.cases += 2; // α finite ⇒ α/r finite in f64: nothing to refuse
    }
    for (a, b, what) in [
        ((2, 7), (5, 1), "weight_a"),
        ((1, 6), (5, 1), "weight_a"),
        ((1, 7), (4, 1), "weight_b"),
        ((7, 1), (5, 1), "weight_a"),
        ((1, 7), (1, 5), "weight_b"),
    ] {
        t.unchanged(
            "add_from_parts shape",
            &m,
            |m| {
                m.add_adapter_from_parts(
                    "x",
                    Array2::<A::Factor>::zeros(a),
                    Array2::zeros(b),
                    cfg(1),
                )
            },
            shape(what),
        );
    }
    for v in nonfinite::<A::Factor>() {
        let mut a = Array2::<A::Factor>::zeros((1, 7));
        a[[0, 6]] = v;
        t.unchanged(
            "add_from_parts A non-finite",
            &m,
            |m| m.add_adapter_from_parts("x", a, Array2::zeros((5, 1)), cfg(1)),
            |e| {
                matches!(
                    e,
                    LoraError::NonFinite {
                        what: "weight_a",
                        index: (0, 6),
                        ..
                    }
                )
            },
        );
        let mut b = Array2::<A::Factor>::zeros((5, 1));
        b[[4, 0]] = v;
        t.unchanged(
            "add_from_parts B non-finite",
            &m,
            |m| m.add_adapter_from_parts("x", Array2::zeros((1, 7)), b, cfg(1)),
            |e| {
                matches!(
                    e,
                    LoraError::NonFinite {
                        what: "weight_b",
                        index: (4, 0),
                        ..
                    }
                )
            },
        );
    }

    // Name-addressed methods with unknown names (including the removed one).
    for name in ["nope", "gone", ""] {
        let u = move |e: &LoraError| *e == LoraError::UnknownAdapter { name: name.into() };
        t.unchanged("remove unknown", &m, |m| m.remove_adapter(name), u);
        t.unchanged("merge unknown", &m, |m| m.merge(name), u);
        t.unchanged("unmerge unknown", &m, |m| m.unmerge(name), u);
        t.unchanged("set_active unknown", &m, |m| m.set_active(&["en", name]), u);
        t.unchanged(
            "weight_a_mut unknown",
            &m,
            |m| m.weight_a_mut(name).map(|_| ()),
            u,
        );
        t.unchanged(
            "weight_b_mut unknown",
            &m,
            |m| m.weight_b_mut(name).map(|_| ()),
            u,
        );
        t.err("is_merged unknown", m.is_merged(name), u);
        t.err("weight_a unknown", m.weight_a(name).map(|_| ()), u);
        t.err("weight_b unknown", m.weight_b(name).map(|_| ()), u);
        t.err("config unknown", m.config(name).map(|_| ()), u);
        t.err("scaling unknown", m.scaling(name), u);
        t.err("to_layer unknown", m.to_layer(name), u);
    }
    t.unchanged(
        "set_active duplicate",
        &m,
        |m| m.set_active(&["de", "en", "de"]),
        |e| *e == LoraError::DuplicateAdapter { name: "de".into() },
    );

    // forward / forward_mixed
    for cols in [0, 6, 8] {
        let x = Array2::<A>::ones((2, cols));
        t.err("forward width", m.forward(x.view()), shape("input x"));
        t.err(
            "forward_mixed width",
            m.forward_mixed(x.view(), &[None, None]),
            shape("input x"),
        );
    }
    let x = Array2::<A>::ones((3, 7));
    for rows in [&[Some(0)][..], &[None, None, None, None], &[]] {
        t.err(
            "forward_mixed row list length",
            m.forward_mixed(x.view(), rows),
            shape("adapter_of_row"),
        );
    }
    for id in [2, 3, usize::MAX] {
        t.err(
            "forward_mixed unknown id",
            m.forward_mixed(x.view(), &[Some(0), Some(id), None]),
            move |e| *e == LoraError::UnknownAdapterId { id },
        );
    }
    t.err(
        "forward_mixed merged",
        merged.forward_mixed(x.view(), &[None, None, None]),
        state_of(false, "forward_mixed"),
    );

    // Merge state.
    t.unchanged(
        "merge twice",
        &merged,
        |m| m.merge("en"),
        state_of(false, "merge"),
    );
    t.unchanged(
        "unmerge not merged",
        &merged,
        |m| m.unmerge("de"),
        state_of(true, "unmerge"),
    );
    t.unchanged(
        "remove merged",
        &merged,
        |m| m.remove_adapter("en"),
        state_of(false, "remove_adapter"),
    );
    t.unchanged(
        "weight_a_mut merged",
        &merged,
        |m| m.weight_a_mut("en").map(|_| ()),
        state_of(false, "weight_a_mut"),
    );
    t.unchanged(
        "weight_b_mut merged",
        &merged,
        |m| m.weight_b_mut("en").map(|_| ()),
        state_of(false, "weight_b_mut"),
    );
    t.err(
        "to_layer while merged",
        merged.to_layer("de"),
        state_of(false, "to_layer"),
    );

    // Overflow: one adapter alone, and two that are fine alone but not together.
    let max = A::max_value().into_f64();
    let mut big = LoraModel::new(Array2::from_elem((5, 7), A::from_f64_lossy(0.4 * max))).unwrap();
    let f = |v: f64| A::Factor::from_f64_lossy(v);
    let factor = |rows, cols, v: f64| Array2::from_elem((rows, cols), f(v.sqrt()));
    let one = LoraConfig {
        alpha: 1.0,
        ..cfg(1)
    };
    big.add_adapter_from_parts("huge", factor(1, 7, max), factor(5, 1, max), one.clone())
        .unwrap();
    big.add_adapter_from_parts(
        "p",
        factor(1, 7, 0.35 * max),
        factor(5, 1, 0.35 * max),
        one.clone(),
    )
    .unwrap();
    big.add_adapter_from_parts("q", factor(1, 7, 0.35 * max), factor(5, 1, 0.35 * max), one)
        .unwrap();
    let over = |e: &LoraError| *e == LoraError::WouldOverflow { operation: "merge" };
    t.unchanged("merge overflows", &big, |m| m.merge("huge"), over);
    // W = 0.4·MAX; p and q each add 0.35·MAX: fine alone, 1.1·MAX together.
    let mut pq = big.clone();
    pq.set_active(&["p", "q"]).unwrap();
    t.unchanged("merge_active overflows", &pq, |m| m.merge_active(), over);
    let mut p_alone = pq.clone();
    p_alone.merge("p").unwrap();
    t.unchanged(
        "merge after a merge overflows",
        &p_alone,
        |m| m.merge("q"),
        over,
    );
    t.unchanged(
        "merge_active after a merge overflows",
        &p_alone,
        |m| m.merge_active(),
        over,
    );
    t.cases
}

#[test]
fn model_f32() {
    let n = model_cases::<f32>();
    println!("LoraModel<f32>: {n} cases");
    assert_eq!(n, MODEL);
}

#[test]
fn model_f64() {
    assert_eq!(model_cases::<f64>(), MODEL);
}

#[test]
fn model_bf16() {
    assert_eq!(model_cases::<bf16>(), MODEL);
}

#[test]
fn model_f16() {
    assert_eq!(model_cases::<f16>(), MODEL);
}
