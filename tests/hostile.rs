//! The hostile-input catalogue: every public `Result` API of ndlora called with wrong shapes,
//! zero sizes, NaN/±∞ in weights, inputs, gradients and learning rates, bad ranks, sizes whose
//! products overflow `usize`, corrupt serde documents, truncated and bit-flipped safetensors
//! files and contradictory PEFT configs.
//!
//! Each case asserts the specific error variant (with its key fields) and that the value the
//! method was called on is unchanged bit for bit (serialised state plus the raw bits of every
//! array, since NaN ≠ NaN). Cases are counted per category; the counts are asserted so that
//! the number quoted in the README is the number that ran. The truncation and bit-flip sweeps
//! are counted separately (they are generated, one case per prefix / per flipped bit).
//!
//! Some of these paths are also covered by the focused test files (`layer_errors.rs`,
//! `micro.rs`, `peft.rs`); this file is the systematic catalogue.

mod common;

use std::fmt::Debug;

use common::{random, rng};
use ndarray::{Array1, Array2, ArrayView2, ShapeBuilder};
use ndlora::peft::PeftAdapter;
use ndlora::{
    LearningSignal, LoraConfig, LoraError, LoraFloat, LoraGrads, LoraLayer, LoraModel, LoraScratch,
    MicroLora, SimdLevel,
};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Counting and the "unchanged" check.

/// Expected number of cases per category (asserted by each category's test).
const LAYER_CONSTRUCT: usize = 48; // × 2 float types, counted once per type
const LAYER_METHODS: usize = 77;
const LAYER_SERDE: usize = 27;
const MODEL: usize = 86;
const MICRO: usize = 47;
const MICRO_SERDE: usize = 13;
const PEFT_CONFIG: usize = 32;
const PEFT_TENSORS_AND_LAYERS: usize = 21;
/// Hand-written cases in the catalogue.
const TOTAL: usize = LAYER_CONSTRUCT
    + LAYER_METHODS
    + LAYER_SERDE
    + MODEL
    + MICRO
    + MICRO_SERDE
    + PEFT_CONFIG
    + PEFT_TENSORS_AND_LAYERS;

/// A boxed check on an error, for tables of cases.
type Check = Box<dyn Fn(&LoraError) -> bool>;

#[derive(Default)]
struct Tally {
    cases: usize,
}

impl Tally {
    /// Asserts that `result` is an error matching `expected`.
    #[track_caller]
    fn err<T: Debug>(
        &mut self,
        name: &str,
        result: Result<T, LoraError>,
        expected: impl Fn(&LoraError) -> bool,
    ) {
        self.cases += 1;
        match result {
            Ok(v) => panic!("{name}: expected an error, got Ok({v:?})"),
            Err(e) => {
                assert!(expected(&e), "{name}: unexpected error {e:?} ({e})");
                assert!(!e.to_string().is_empty());
            }
        }
    }

    /// Runs `op` on a clone of `original`, asserts the error, and that the clone's state (as
    /// `state` renders it, bitwise) did not change.
    #[track_caller]
    fn unchanged<V: Clone, T: Debug>(
        &mut self,
        name: &str,
        original: &V,
        state: impl Fn(&V) -> String,
        op: impl FnOnce(&mut V) -> Result<T, LoraError>,
        expected: impl Fn(&LoraError) -> bool,
    ) {
        let mut v = original.clone();
        let before = state(&v);
        let result = op(&mut v);
        self.err(name, result, expected);
        assert_eq!(state(&v), before, "{name}: the value changed on error");
    }
}

fn bits<A: LoraFloat>(m: ArrayView2<'_, A>) -> String {
    let v: Vec<String> = m
        .iter()
        .map(|x| format!("{:x}", x.into_f64().to_bits()))
        .collect();
    format!("{:?}:{}", m.shape(), v.join(","))
}

/// Everything observable about a layer, bitwise: the serialised document (config, scaling,
/// merge flag, RNG position, kept unmerge weight) and the raw bits of W, A, B, b.
fn layer_state<A: LoraFloat>(l: &LoraLayer<A>) -> String {
    let bias = l.bias().map(|b| bits(b.insert_axis(ndarray::Axis(0))));
    format!(
        "{}|{}|{}|{}|{:?}|{}|{}",
        serde_json::to_string(l).unwrap(),
        bits(l.base_weight()),
        bits(l.weight_a()),
        bits(l.weight_b()),
        bias,
        l.scaling().to_bits(),
        l.is_merged_exact()
    )
}

fn model_state<A: LoraFloat>(m: &LoraModel<A>) -> String {
    let mut s = format!("{}|{:?}|", bits(m.base_weight()), m.active_adapters());
    for name in m.adapter_names() {
        s += &format!(
            "{name}:{:?}:{}:{}:{:?}:{}:{};",
            m.adapter_id(name),
            bits(m.weight_a(name).unwrap()),
            bits(m.weight_b(name).unwrap()),
            m.config(name).unwrap(),
            m.scaling(name).unwrap().to_bits(),
            m.is_merged(name).unwrap()
        );
    }
    s
}

fn micro_state(m: &MicroLora) -> String {
    let (gd, gu) = m.pending_gradients();
    let (d, u) = m.get_weights();
    format!(
        "{}|{}|{}|{}|{}|{}|{}",
        serde_json::to_string(m).unwrap(),
        bits(d),
        bits(u),
        bits(gd),
        bits(gu),
        m.pending_updates(),
        m.scale().to_bits()
    )
}

fn cfg(rank: usize) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 3.0,
        ..Default::default()
    }
}

fn nonfinite<A: LoraFloat>() -> [A; 3] {
    [A::nan(), A::infinity(), A::neg_infinity()]
}

/// A trained-looking layer: d×k = 5×7, r = 2, random W, A, B.
fn layer<A: LoraFloat>(seed: u64) -> LoraLayer<A> {
    let mut g = rng(seed);
    LoraLayer::from_parts(
        random(&mut g, 5, 7),
        random(&mut g, 2, 7),
        random(&mut g, 5, 2),
        cfg(2),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// LoraLayer construction and LoraConfig.

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
    // α/r finite in f64 but not in A (only f32 can overflow here: α finite and r ≥ 1).
    let huge = if A::NAME == "f32" { 1e300 } else { f64::MAX };
    let r = LoraLayer::new(
        w.clone(),
        LoraConfig {
            alpha: huge,
            rank: 1,
            ..cfg(1)
        },
    );
    if A::NAME == "f32" {
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
    for v in nonfinite::<A>() {
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
        let mut a = Array2::<A>::zeros((2, 6));
        a[[1, 0]] = v;
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
        let mut b = Array2::<A>::zeros((4, 2));
        b[[0, 1]] = v;
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
                Array2::<A>::zeros(a),
                Array2::<A>::zeros(b),
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
            Array2::<A>::zeros((0, 6)),
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
    let l = layer::<A>(1)
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
    let st = layer_state::<A>;
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
                st,
                |l| l.forward(x.view()),
                shape("input x"),
            );
            let mut out = Array2::<A>::from_elem((3, 5), A::from_f64_lossy(-7.5));
            t.unchanged(
                "forward_into width",
                target,
                st,
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
            st,
            |l| l.forward_train(x.view()),
            shape("input x"),
        );
        let g = Array2::<A>::ones((3, 5));
        t.unchanged(
            "backward width",
            &l,
            st,
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
            st,
            |l| l.forward_into(x.view(), out.view_mut()),
            shape("out"),
        );
        let mut scratch = LoraScratch::<A>::with_capacity(1, 1);
        t.unchanged(
            "forward_into_with_scratch out shape",
            &l,
            st,
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
                st,
                |l| l.backward(x.view(), g.view()),
                shape("grad_output"),
            );
        }
    }
    let g = Array2::<A>::ones((3, 4));
    t.unchanged(
        "backward grad cols",
        &l,
        st,
        |l| l.backward(x.view(), g.view()),
        shape("grad_output"),
    );

    // sgd_step: learning rates, gradient shapes, non-finite gradients, overflow, merged.
    let grads = l.backward(x.view(), Array2::ones((3, 5)).view()).unwrap();
    for lr in nonfinite::<A>() {
        t.unchanged(
            "sgd lr non-finite",
            &l,
            st,
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
            grad_a: Array2::<A>::zeros(ga),
            grad_b: Array2::zeros(gb),
            grad_x: Array2::zeros((0, 0)),
        };
        t.unchanged(
            "sgd grad shape",
            &l,
            st,
            |l| l.sgd_step(&bad, A::one()),
            shape(what),
        );
    }
    for v in nonfinite::<A>() {
        let mut bad = grads.clone();
        bad.grad_a[[1, 6]] = v;
        t.unchanged(
            "sgd grad_a non-finite",
            &l,
            st,
            |l| l.sgd_step(&bad, A::zero()),
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
            st,
            |l| l.sgd_step(&bad, A::zero()),
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
    big.grad_a.fill(A::zero());
    big.grad_b.fill(A::from_f64_lossy(-4.0));
    t.unchanged(
        "sgd step overflows",
        &l,
        st,
        |l| l.sgd_step(&big, A::max_value()),
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
        st,
        |l| l.sgd_step(&grads, A::one()),
        state_of(false, "sgd_step"),
    );

    // Merge state machine.
    t.unchanged(
        "merge twice",
        &merged,
        st,
        |l| l.merge(),
        state_of(false, "merge"),
    );
    t.unchanged(
        "merge after merge_exact",
        &merged_exact,
        st,
        |l| l.merge(),
        state_of(false, "merge"),
    );
    t.unchanged(
        "merge_exact twice",
        &merged_exact,
        st,
        |l| l.merge_exact(),
        state_of(false, "merge_exact"),
    );
    t.unchanged(
        "merge_exact after merge",
        &merged,
        st,
        |l| l.merge_exact(),
        state_of(false, "merge_exact"),
    );
    t.unchanged(
        "unmerge unmerged",
        &l,
        st,
        |l| l.unmerge(),
        state_of(true, "unmerge"),
    );
    t.unchanged(
        "set_scaling merged",
        &merged,
        st,
        |l| l.set_scaling(1.0),
        state_of(false, "set_scaling"),
    );
    t.unchanged(
        "weight_a_mut merged",
        &merged_exact,
        st,
        |l| l.weight_a_mut().map(|_| ()),
        state_of(false, "weight_a_mut"),
    );
    t.unchanged(
        "weight_b_mut merged",
        &merged,
        st,
        |l| l.weight_b_mut().map(|_| ()),
        state_of(false, "weight_b_mut"),
    );

    // Merges whose result would overflow: W near MAX/2 and a large update.
    let max = A::max_value().into_f64();
    let near = LoraLayer::from_parts(
        Array2::from_elem((5, 7), A::from_f64_lossy(0.45 * max)),
        Array2::from_elem((2, 7), A::from_f64_lossy(max.sqrt())),
        Array2::from_elem((5, 2), A::from_f64_lossy(max.sqrt())),
        cfg(2),
    )
    .unwrap();
    let over =
        |op: &'static str| move |e: &LoraError| *e == LoraError::WouldOverflow { operation: op };
    t.unchanged("merge overflows", &near, st, |l| l.merge(), over("merge"));
    t.unchanged(
        "merge_exact overflows",
        &near,
        st,
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
        st,
        |l| l.unmerge(),
        over("unmerge"),
    );

    // set_scaling and set_bias.
    for s in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        t.unchanged(
            "set_scaling non-finite",
            &l,
            st,
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
    let s = if A::NAME == "f32" { 1e39 } else { f64::NAN };
    t.unchanged(
        "set_scaling not finite in A",
        &l,
        st,
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
            st,
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
            st,
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

/// NaN in a forward input is not an error: it propagates to exactly the rows it is in, in
/// every forward flavour, merged or not, and the layer stays as it was. Each flavour is
/// compared bit for bit with the same flavour on the clean input: a BLAS may sum in a
/// different order for a column-major operand (BLIS does), so flavours can differ by an ulp.
#[test]
fn nan_input_poisons_only_its_rows() {
    fn check<A: LoraFloat>() {
        let mut g = rng(9);
        let l = layer::<A>(3)
            .with_bias(Array1::from_elem(5, A::one()))
            .unwrap();
        let mut merged = l.clone();
        merged.merge().unwrap();
        let before = layer_state(&l);
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
            assert_eq!(layer_state(&l), before);
            // Backward with a NaN gradient row: NaN in the factor gradients, refused by sgd_step.
            let mut gr = Array2::<A>::ones((6, 5));
            gr[[bad_row, 0]] = A::nan();
            let grads = l.backward(clean.view(), gr.view()).unwrap();
            assert!(grads.grad_x.row(bad_row).iter().all(|v| v.is_nan()));
            let mut l2 = l.clone();
            assert!(matches!(
                l2.sgd_step(&grads, A::one()),
                Err(LoraError::NonFinite { what: "grad_a", .. })
            ));
            assert_eq!(layer_state(&l2), before);
        }
    }
    check::<f32>();
    check::<f64>();
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
    let l = layer::<A>(4)
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
                d["unmerge_weight"] = d["weight_a"].clone();
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
    // A value finite in f64 that overflows A (f32 only) is a NonFinite after loading.
    let doc = edit(&|d| d["base_weight"]["data"][5] = json!(1e39));
    if A::NAME == "f32" {
        bad_doc::<A>(&mut t, "1e39 in an f32 W", &doc, "number out of range");
    } else {
        t.cases += 1;
        assert!(serde_json::from_value::<LoraLayer<A>>(doc).is_ok());
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

// ---------------------------------------------------------------------------------------------
// LoraModel.

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
    let st = model_state::<A>;
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
    t.unchanged(
        "add duplicate",
        &m,
        st,
        |m| m.add_adapter("en", cfg(1)),
        dup,
    );
    t.unchanged(
        "add_from_parts duplicate",
        &m,
        st,
        |m| m.add_adapter_from_parts("en", Array2::zeros((1, 7)), Array2::zeros((5, 1)), cfg(1)),
        dup,
    );
    for (rank, max) in [(0, 5), (6, 5), (usize::MAX, 5)] {
        t.unchanged(
            "add bad rank",
            &m,
            st,
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
            st,
            |m| m.add_adapter("x", LoraConfig { alpha, ..cfg(1) }),
            |e| matches!(e, LoraError::InvalidValue { what: "alpha", .. }),
        );
    }
    t.unchanged(
        "add dropout 1",
        &m,
        st,
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
    if A::NAME == "f32" {
        t.unchanged(
            "add scaling overflows f32",
            &m,
            st,
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
            st,
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
            st,
            |m| m.add_adapter_from_parts("x", Array2::<A>::zeros(a), Array2::zeros(b), cfg(1)),
            shape(what),
        );
    }
    for v in nonfinite::<A>() {
        let mut a = Array2::<A>::zeros((1, 7));
        a[[0, 6]] = v;
        t.unchanged(
            "add_from_parts A non-finite",
            &m,
            st,
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
        let mut b = Array2::<A>::zeros((5, 1));
        b[[4, 0]] = v;
        t.unchanged(
            "add_from_parts B non-finite",
            &m,
            st,
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
        t.unchanged("remove unknown", &m, st, |m| m.remove_adapter(name), u);
        t.unchanged("merge unknown", &m, st, |m| m.merge(name), u);
        t.unchanged("unmerge unknown", &m, st, |m| m.unmerge(name), u);
        t.unchanged(
            "set_active unknown",
            &m,
            st,
            |m| m.set_active(&["en", name]),
            u,
        );
        t.unchanged(
            "weight_a_mut unknown",
            &m,
            st,
            |m| m.weight_a_mut(name).map(|_| ()),
            u,
        );
        t.unchanged(
            "weight_b_mut unknown",
            &m,
            st,
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
        st,
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
        st,
        |m| m.merge("en"),
        state_of(false, "merge"),
    );
    t.unchanged(
        "unmerge not merged",
        &merged,
        st,
        |m| m.unmerge("de"),
        state_of(true, "unmerge"),
    );
    t.unchanged(
        "remove merged",
        &merged,
        st,
        |m| m.remove_adapter("en"),
        state_of(false, "remove_adapter"),
    );
    t.unchanged(
        "weight_a_mut merged",
        &merged,
        st,
        |m| m.weight_a_mut("en").map(|_| ()),
        state_of(false, "weight_a_mut"),
    );
    t.unchanged(
        "weight_b_mut merged",
        &merged,
        st,
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
    let f = |v: f64| A::from_f64_lossy(v);
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
    t.unchanged(
        "merge overflows",
        &big,
        model_state::<A>,
        |m| m.merge("huge"),
        over,
    );
    // W = 0.4·MAX; p and q each add 0.35·MAX: fine alone, 1.1·MAX together.
    let mut pq = big.clone();
    pq.set_active(&["p", "q"]).unwrap();
    t.unchanged(
        "merge_active overflows",
        &pq,
        model_state::<A>,
        |m| m.merge_active(),
        over,
    );
    let mut p_alone = pq.clone();
    p_alone.merge("p").unwrap();
    t.unchanged(
        "merge after a merge overflows",
        &p_alone,
        model_state::<A>,
        |m| m.merge("q"),
        over,
    );
    t.unchanged(
        "merge_active after a merge overflows",
        &p_alone,
        model_state::<A>,
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

// ---------------------------------------------------------------------------------------------
// MicroLora.

fn trained_micro() -> MicroLora {
    let mut m = MicroLora::new(16, 2);
    let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.3).sin()).collect();
    let g: Vec<f32> = (0..16).map(|i| (i as f32 * 0.7).cos()).collect();
    m.accumulate_gradient(&LearningSignal::with_gradient(x.clone(), g.clone(), 1.0))
        .unwrap();
    m.apply_accumulated(0.5);
    m.accumulate_gradient(&LearningSignal::with_gradient(x, g, 0.5))
        .unwrap(); // one pending
    m
}

#[test]
fn micro() {
    let mut t = Tally::default();
    let m = trained_micro();
    let st = micro_state;
    let shape = |what: &'static str| move |e: &LoraError| matches!(e, LoraError::ShapeMismatch { what: w, .. } if *w == what);
    let nf = |what: &'static str| move |e: &LoraError| matches!(e, LoraError::NonFinite { what: w, .. } if *w == what);

    // Construction: ranks and sizes whose products overflow usize or isize bytes.
    for rank in [0, 3, usize::MAX] {
        t.err("try_new rank", MicroLora::try_new(16, rank), move |e| {
            *e == LoraError::InvalidRank {
                got: rank,
                min: 1,
                max: 2,
            }
        });
    }
    for (h, r) in [
        (usize::MAX, 2),
        (usize::MAX, 1),
        (usize::MAX / 2, 2),
        (usize::MAX / 2, 1),
        (1 << 62, 1),
        (isize::MAX as usize / 4 + 1, 1),
    ] {
        t.err("try_new size overflow", MicroLora::try_new(h, r), |e| {
            matches!(e, LoraError::SizeOverflow { .. })
        });
    }

    // forward_with / forward_batch: output untouched.
    let x = vec![1.0_f32; 16];
    for (ilen, olen, what) in [
        (15, 16, "input"),
        (17, 16, "input"),
        (0, 16, "input"),
        (16, 15, "output"),
        (16, 0, "output"),
    ] {
        let mut out = vec![-3.5_f32; olen];
        t.err(
            "forward_with length",
            m.forward_with(SimdLevel::Scalar, &vec![1.0; ilen], &mut out),
            shape(what),
        );
        assert!(out.iter().all(|&v| v == -3.5));
    }
    if let Some(level) = SimdLevel::ALL.into_iter().find(|l| !l.is_available()) {
        let mut out = vec![-3.5_f32; 16];
        t.err(
            "forward_with unavailable level",
            m.forward_with(level, &x, &mut out),
            |e| {
                matches!(
                    e,
                    LoraError::InvalidValue {
                        what: "SIMD level",
                        ..
                    }
                )
            },
        );
        assert!(out.iter().all(|&v| v == -3.5));
    } else {
        t.cases += 1; // every level available (cannot happen on one architecture)
    }
    for (xs, ys, what) in [
        ((2, 15), (2, 16), "input"),
        ((2, 16), (3, 16), "output"),
        ((2, 16), (2, 15), "output"),
    ] {
        let mut out = Array2::<f32>::from_elem(ys, -3.5);
        t.err(
            "forward_batch shape",
            m.forward_batch(Array2::ones(xs).view(), out.view_mut()),
            shape(what),
        );
        assert!(out.iter().all(|&v| v == -3.5));
    }

    // accumulate_gradient: lengths, non-finite signals, overflowing sums.
    let sig = |x: Vec<f32>, g: Vec<f32>, q: f32| LearningSignal::with_gradient(x, g, q);
    let ok = vec![0.5_f32; 16];
    t.unchanged(
        "accumulate short x",
        &m,
        st,
        |m| m.accumulate_gradient(&sig(vec![0.5; 15], ok.clone(), 1.0)),
        shape("signal.query_embedding"),
    );
    t.unchanged(
        "accumulate long g",
        &m,
        st,
        |m| m.accumulate_gradient(&sig(ok.clone(), vec![0.5; 17], 1.0)),
        shape("signal.gradient_estimate"),
    );
    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut bad = ok.clone();
        bad[7] = v;
        t.unchanged(
            "accumulate x non-finite",
            &m,
            st,
            |m| m.accumulate_gradient(&sig(bad.clone(), ok.clone(), 1.0)),
            nf("signal.query_embedding"),
        );
        t.unchanged(
            "accumulate g non-finite",
            &m,
            st,
            |m| m.accumulate_gradient(&sig(ok.clone(), bad.clone(), 1.0)),
            nf("signal.gradient_estimate"),
        );
        t.unchanged(
            "accumulate q non-finite",
            &m,
            st,
            |m| m.accumulate_gradient(&sig(ok.clone(), ok.clone(), v)),
            nf("signal.quality_score"),
        );
    }
    let huge = vec![1e30_f32; 16];
    t.unchanged(
        "accumulate overflows",
        &m,
        st,
        |m| m.accumulate_gradient(&sig(huge.clone(), huge.clone(), 1e30)),
        |e| matches!(e, LoraError::NonFinite { what, .. } if what.starts_with("gradient sum")),
    );
    // accumulate_gradient_batch
    let q = [1.0_f32, 0.5];
    let xs = Array2::<f32>::ones((2, 16));
    t.unchanged(
        "batch queries shape",
        &m,
        st,
        |m| m.accumulate_gradient_batch(Array2::ones((2, 15)).view(), xs.view(), &q),
        shape("queries"),
    );
    t.unchanged(
        "batch gradients shape",
        &m,
        st,
        |m| m.accumulate_gradient_batch(xs.view(), Array2::ones((3, 16)).view(), &q),
        shape("gradients"),
    );
    t.unchanged(
        "batch quality length",
        &m,
        st,
        |m| m.accumulate_gradient_batch(xs.view(), xs.view(), &[1.0]),
        shape("queries"),
    );
    let mut bad = xs.clone();
    bad[[1, 3]] = f32::NAN;
    t.unchanged(
        "batch queries NaN",
        &m,
        st,
        |m| m.accumulate_gradient_batch(bad.view(), xs.view(), &q),
        nf("queries"),
    );
    t.unchanged(
        "batch gradients NaN",
        &m,
        st,
        |m| m.accumulate_gradient_batch(xs.view(), bad.view(), &q),
        nf("gradients"),
    );
    t.unchanged(
        "batch quality ∞",
        &m,
        st,
        |m| m.accumulate_gradient_batch(xs.view(), xs.view(), &[1.0, f32::INFINITY]),
        nf("quality"),
    );
    let h2 = Array2::<f32>::from_elem((2, 16), 1e30);
    t.unchanged(
        "batch overflows",
        &m,
        st,
        |m| m.accumulate_gradient_batch(h2.view(), h2.view(), &[1e30, 1e30]),
        |e| matches!(e, LoraError::NonFinite { what, .. } if what.starts_with("gradient sum")),
    );

    // try_apply_accumulated
    for lr in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        t.unchanged(
            "apply lr non-finite",
            &m,
            st,
            |m| m.try_apply_accumulated(lr),
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
    let mut big = m.clone();
    big.accumulate_gradient(&sig(vec![100.0; 16], vec![100.0; 16], 100.0))
        .unwrap();
    t.unchanged(
        "apply overflows",
        &big,
        st,
        |m| m.try_apply_accumulated(f32::MAX),
        |e| {
            *e == LoraError::WouldOverflow {
                operation: "apply_accumulated",
            }
        },
    );
    t.unchanged(
        "apply overflows descending",
        &big,
        st,
        |m| m.try_apply_accumulated(-f32::MAX),
        |e| {
            *e == LoraError::WouldOverflow {
                operation: "apply_accumulated",
            }
        },
    );

    // set_weights
    let good = Array2::<f32>::ones((2, 16));
    for (d, u, what) in [
        ((1, 16), (2, 16), "down"),
        ((2, 16), (2, 15), "up"),
        ((16, 2), (2, 16), "down"),
    ] {
        t.unchanged(
            "set_weights shape",
            &m,
            st,
            |m| m.set_weights(Array2::zeros(d).view(), Array2::zeros(u).view()),
            shape(what),
        );
    }
    let mut bad = good.clone();
    bad[[1, 15]] = f32::NEG_INFINITY;
    t.unchanged(
        "set_weights down ∞",
        &m,
        st,
        |m| m.set_weights(bad.view(), good.view()),
        nf("down"),
    );
    t.unchanged(
        "set_weights up -∞",
        &m,
        st,
        |m| m.set_weights(good.view(), bad.view()),
        nf("up"),
    );

    println!("MicroLora: {} cases", t.cases);
    assert_eq!(t.cases, MICRO);
}

#[test]
fn micro_serde() {
    let mut t = Tally::default();
    let m = trained_micro();
    let good = serde_json::to_value(&m).unwrap();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut d = good.clone();
        f(&mut d);
        d
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "missing rank",
            edit(&|d| {
                d.as_object_mut().unwrap().remove("rank");
            }),
            "missing field `rank`",
        ),
        (
            "missing up",
            edit(&|d| {
                d.as_object_mut().unwrap().remove("up");
            }),
            "missing field `up`",
        ),
        (
            "extra field",
            edit(&|d| d["pending"] = json!(3)),
            "unknown field `pending`",
        ),
        ("rank 3", edit(&|d| d["rank"] = json!(3)), "invalid rank 3"),
        ("rank 0", edit(&|d| d["rank"] = json!(0)), "invalid rank 0"),
        (
            "hidden_dim disagrees",
            edit(&|d| d["hidden_dim"] = json!(15)),
            "shape mismatch for down",
        ),
        (
            "hidden_dim usize::MAX",
            edit(&|d| d["hidden_dim"] = json!(usize::MAX)),
            "shape mismatch for down",
        ),
        (
            "up with the wrong rank",
            edit(&|d| {
                d["up"]["dim"] = json!([1, 16]);
                d["up"]["data"] = json!(vec![0.0; 16]);
            }),
            "shape mismatch for up",
        ),
        (
            "NaN as a string",
            edit(&|d| d["down"]["data"][0] = json!("NaN")),
            "invalid type: string \"NaN\"",
        ),
        (
            "scale as a string",
            edit(&|d| d["scale"] = json!("inf")),
            "invalid type: string \"inf\"",
        ),
        (
            "scale 1e39 → ∞ in f32",
            edit(&|d| d["scale"] = json!(1e39)),
            "non-finite value in scale",
        ),
        (
            "1e39 in up",
            edit(&|d| d["up"]["data"][4] = json!(1e39)),
            "non-finite value in up",
        ),
        (
            "data length",
            edit(&|d| {
                d["down"]["data"].as_array_mut().unwrap().pop();
            }),
            "dimension",
        ),
    ];
    for (name, doc, needle) in cases {
        t.cases += 1;
        let e = serde_json::from_value::<MicroLora>(doc).expect_err(name);
        assert!(e.to_string().contains(needle), "{name}: {e}");
    }
    println!("MicroLora serde: {} cases", t.cases);
    assert_eq!(t.cases, MICRO_SERDE);
}

// ---------------------------------------------------------------------------------------------
// PEFT configs, tensors and layers.

fn peft_config(extra: Value) -> String {
    let mut c = json!({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": false,
        "rank_pattern": {}, "alpha_pattern": {}, "target_modules": ["proj"],
        "fan_in_fan_out": false, "bias": "none", "lora_dropout": 0.0
    });
    for (k, v) in extra.as_object().unwrap() {
        if v == &json!("<remove>") {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c.to_string()
}

/// A valid safetensors file with one module `m.proj`: A r×4, B 3×r, F32.
fn peft_tensors(r: usize) -> Vec<u8> {
    let a: Vec<u8> = (0..r * 4)
        .flat_map(|i| (i as f32 * 0.25 - 0.5).to_le_bytes())
        .collect();
    let b: Vec<u8> = (0..3 * r)
        .flat_map(|i| (i as f32 * 0.5 - 1.0).to_le_bytes())
        .collect();
    let views = vec![
        (
            "base_model.model.m.proj.lora_A.weight".to_owned(),
            TensorView::new(Dtype::F32, vec![r, 4], &a).unwrap(),
        ),
        (
            "base_model.model.m.proj.lora_B.weight".to_owned(),
            TensorView::new(Dtype::F32, vec![3, r], &b).unwrap(),
        ),
    ];
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn peft_configs() {
    let mut t = Tally::default();
    let st = peft_tensors(2);
    assert!(PeftAdapter::<f32>::from_bytes(&peft_config(json!({})), &st).is_ok());
    let field = |f: &'static str| move |e: &LoraError| matches!(e, LoraError::PeftConfigField { field, .. } if field == f);
    let unsupported = |f: &'static str| move |e: &LoraError| matches!(e, LoraError::PeftUnsupported { field, .. } if field == f);
    let rank_mismatch = |e: &LoraError| {
        matches!(e, LoraError::InModule { module, source } if module == "m.proj"
            && matches!(**source, LoraError::ShapeMismatch { what: "lora_A (rank from the config)", .. }))
    };
    let cases: Vec<(&str, String, Check)> = vec![
        (
            "not JSON",
            "{\"peft_type\": \"LORA\",".into(),
            Box::new(|e| matches!(e, LoraError::Parse { format: "JSON", .. })),
        ),
        (
            "empty text",
            String::new(),
            Box::new(|e| matches!(e, LoraError::Parse { format: "JSON", .. })),
        ),
        (
            "root is an array",
            "[1, 2]".into(),
            Box::new(field("(root)")),
        ),
        (
            "peft_type missing",
            peft_config(json!({"peft_type": "<remove>"})),
            Box::new(field("peft_type")),
        ),
        (
            "peft_type IA3",
            peft_config(json!({"peft_type": "IA3"})),
            Box::new(unsupported("peft_type")),
        ),
        (
            "peft_type lower case",
            peft_config(json!({"peft_type": "lora"})),
            Box::new(unsupported("peft_type")),
        ),
        (
            "r negative",
            peft_config(json!({"r": -2})),
            Box::new(field("r")),
        ),
        ("r zero", peft_config(json!({"r": 0})), Box::new(field("r"))),
        (
            "r fractional",
            peft_config(json!({"r": 2.5})),
            Box::new(field("r")),
        ),
        (
            "r as a string",
            peft_config(json!({"r": "2"})),
            Box::new(field("r")),
        ),
        (
            "r beyond u64",
            "{\"peft_type\":\"LORA\",\"r\":1e30}".to_string(),
            Box::new(field("r")),
        ),
        (
            "lora_alpha as a string",
            peft_config(json!({"lora_alpha": "16"})),
            Box::new(field("lora_alpha")),
        ),
        (
            "lora_alpha NaN string",
            peft_config(json!({"lora_alpha": "NaN"})),
            Box::new(field("lora_alpha")),
        ),
        (
            "lora_alpha out of range",
            peft_config(json!({})).replace("\"lora_alpha\":4", "\"lora_alpha\":1e999"),
            Box::new(|e| matches!(e, LoraError::Parse { format: "JSON", .. })),
        ),
        (
            "use_rslora as a string",
            peft_config(json!({"use_rslora": "true"})),
            Box::new(field("use_rslora")),
        ),
        (
            "use_rslora as 1",
            peft_config(json!({"use_rslora": 1})),
            Box::new(field("use_rslora")),
        ),
        (
            "fan_in_fan_out as a string",
            peft_config(json!({"fan_in_fan_out": "no"})),
            Box::new(field("fan_in_fan_out")),
        ),
        (
            "lora_dropout 1.5",
            peft_config(json!({"lora_dropout": 1.5})),
            Box::new(field("lora_dropout")),
        ),
        (
            "lora_dropout negative",
            peft_config(json!({"lora_dropout": -0.1})),
            Box::new(field("lora_dropout")),
        ),
        (
            "target_modules a number",
            peft_config(json!({"target_modules": 5})),
            Box::new(field("target_modules")),
        ),
        (
            "target_modules mixed list",
            peft_config(json!({"target_modules": ["proj", 3]})),
            Box::new(field("target_modules")),
        ),
        (
            "rank_pattern a list",
            peft_config(json!({"rank_pattern": [4]})),
            Box::new(field("rank_pattern")),
        ),
        (
            "rank_pattern rank 0",
            peft_config(json!({"rank_pattern": {"proj": 0}})),
            Box::new(field("rank_pattern.proj")),
        ),
        (
            "rank_pattern bad regex",
            peft_config(json!({"rank_pattern": {"pro(j": 4}})),
            Box::new(field("rank_pattern.pro(j")),
        ),
        (
            "alpha_pattern string",
            peft_config(json!({"alpha_pattern": {"proj": "8"}})),
            Box::new(field("alpha_pattern.proj")),
        ),
        (
            "bias all",
            peft_config(json!({"bias": "all"})),
            Box::new(unsupported("bias")),
        ),
        (
            "use_dora",
            peft_config(json!({"use_dora": true})),
            Box::new(unsupported("use_dora")),
        ),
        (
            "modules_to_save",
            peft_config(json!({"modules_to_save": ["lm_head"]})),
            Box::new(unsupported("modules_to_save")),
        ),
        // Contradictions between config and tensors.
        (
            "r disagrees with the tensors",
            peft_config(json!({"r": 3})),
            Box::new(rank_mismatch),
        ),
        (
            "rank_pattern disagrees with the tensors",
            peft_config(json!({"rank_pattern": {"proj": 1}})),
            Box::new(rank_mismatch),
        ),
        (
            "rank_pattern regex disagrees",
            peft_config(json!({"rank_pattern": {"m\\.pr.*": 4}})),
            Box::new(rank_mismatch),
        ),
    ];
    for (name, config, check) in cases {
        t.err(name, PeftAdapter::<f32>::from_bytes(&config, &st), |e| {
            check(e)
        });
    }
    // Unknown fields are not errors: PEFT adds fields every release, and a config that would
    // change the math is caught by UNSUPPORTED_FIELDS. They are kept and written back.
    t.cases += 1;
    let a =
        PeftAdapter::<f32>::from_bytes(&peft_config(json!({"future_field": {"x": [1, 2]}})), &st)
            .unwrap();
    assert_eq!(a.config().raw()["future_field"], json!({"x": [1, 2]}));
    println!("PEFT configs: {} cases", t.cases);
    assert_eq!(t.cases, PEFT_CONFIG);
}

#[test]
fn peft_tensors_and_layers() {
    let mut t = Tally::default();
    let cfg_text = peft_config(json!({}));
    let raw = |tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>| {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(k, d, s, data)| (k.to_string(), TensorView::new(*d, s.clone(), data).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    };
    let f32s = |n: usize, v: f32| -> Vec<u8> { (0..n).flat_map(|_| v.to_le_bytes()).collect() };
    const KA: &str = "base_model.model.m.proj.lora_A.weight";
    const KB: &str = "base_model.model.m.proj.lora_B.weight";
    let (ka, kb) = (KA, KB);
    let tensor = |e: &LoraError| matches!(e, LoraError::PeftTensor { .. });
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        (
            "no tensors",
            raw(vec![]),
            Box::new(|e| matches!(e, LoraError::MissingTensor { .. })),
        ),
        (
            "A without B",
            raw(vec![(ka, Dtype::F32, vec![2, 4], f32s(8, 1.0))]),
            Box::new(|e| matches!(e, LoraError::MissingTensor { name } if name == KB)),
        ),
        (
            "B without A",
            raw(vec![(kb, Dtype::F32, vec![3, 2], f32s(6, 1.0))]),
            Box::new(|e| matches!(e, LoraError::MissingTensor { name } if name == KA)),
        ),
        (
            "foreign key",
            raw(vec![(
                "model.embed.weight",
                Dtype::F32,
                vec![1, 1],
                f32s(1, 1.0),
            )]),
            Box::new(tensor),
        ),
        (
            "1-D A",
            raw(vec![
                (ka, Dtype::F32, vec![8], f32s(8, 1.0)),
                (kb, Dtype::F32, vec![3, 2], f32s(6, 1.0)),
            ]),
            Box::new(tensor),
        ),
        (
            "empty A",
            raw(vec![
                (ka, Dtype::F32, vec![0, 4], vec![]),
                (kb, Dtype::F32, vec![3, 2], f32s(6, 1.0)),
            ]),
            Box::new(tensor),
        ),
        (
            "I32 dtype",
            raw(vec![
                (ka, Dtype::I32, vec![2, 4], f32s(8, 1.0)),
                (kb, Dtype::F32, vec![3, 2], f32s(6, 1.0)),
            ]),
            Box::new(tensor),
        ),
        (
            "NaN in A",
            raw(vec![
                (ka, Dtype::F32, vec![2, 4], f32s(8, f32::NAN)),
                (kb, Dtype::F32, vec![3, 2], f32s(6, 1.0)),
            ]),
            Box::new(
                |e| matches!(e, LoraError::InModule { source, .. } if matches!(**source, LoraError::NonFinite { what: "lora_A", .. })),
            ),
        ),
        (
            "∞ in B",
            raw(vec![
                (ka, Dtype::F32, vec![2, 4], f32s(8, 1.0)),
                (kb, Dtype::F32, vec![3, 2], f32s(6, f32::INFINITY)),
            ]),
            Box::new(
                |e| matches!(e, LoraError::InModule { source, .. } if matches!(**source, LoraError::NonFinite { what: "lora_B", .. })),
            ),
        ),
        (
            "F64 1e300 overflows f32",
            raw(vec![
                (
                    ka,
                    Dtype::F64,
                    vec![2, 4],
                    (0..8).flat_map(|_| 1e300_f64.to_le_bytes()).collect(),
                ),
                (kb, Dtype::F32, vec![3, 2], f32s(6, 1.0)),
            ]),
            Box::new(
                |e| matches!(e, LoraError::InModule { source, .. } if matches!(**source, LoraError::NonFinite { what: "lora_A", .. })),
            ),
        ),
        (
            "B's rank disagrees with A",
            raw(vec![
                (ka, Dtype::F32, vec![2, 4], f32s(8, 1.0)),
                (kb, Dtype::F32, vec![3, 1], f32s(3, 1.0)),
            ]),
            Box::new(
                |e| matches!(e, LoraError::InModule { source, .. } if matches!(**source, LoraError::ShapeMismatch { what: "lora_B (rank from the config)", .. })),
            ),
        ),
        (
            "A twice (with default)",
            raw(vec![
                (ka, Dtype::F32, vec![2, 4], f32s(8, 1.0)),
                (
                    "base_model.model.m.proj.lora_A.default.weight",
                    Dtype::F32,
                    vec![2, 4],
                    f32s(8, 1.0),
                ),
                (kb, Dtype::F32, vec![3, 2], f32s(6, 1.0)),
            ]),
            Box::new(tensor),
        ),
    ];
    for (name, bytes, check) in cases {
        t.err(
            name,
            PeftAdapter::<f32>::from_bytes(&cfg_text, &bytes),
            |e| check(e),
        );
    }
    // to_layer with hostile bases and biases.
    let a = PeftAdapter::<f32>::from_bytes(&cfg_text, &peft_tensors(2)).unwrap();
    let in_mod = |f: fn(&LoraError) -> bool| move |e: &LoraError| matches!(e, LoraError::InModule { source, .. } if f(source));
    t.err(
        "to_layer unknown module",
        a.to_layer("m.nope", Array2::zeros((3, 4)), None),
        |e| matches!(e, LoraError::UnknownModule { .. }),
    );
    t.err(
        "to_layer base transposed",
        a.to_layer("m.proj", Array2::zeros((4, 3)), None),
        in_mod(|e| matches!(e, LoraError::ShapeMismatch { .. })),
    );
    let mut w = Array2::<f32>::zeros((3, 4));
    w[[2, 3]] = f32::NAN;
    t.err(
        "to_layer NaN base",
        a.to_layer("m.proj", w, None),
        in_mod(|e| {
            matches!(
                e,
                LoraError::NonFinite {
                    what: "base_weight",
                    ..
                }
            )
        }),
    );
    t.err(
        "to_layer bias length",
        a.to_layer("m.proj", Array2::zeros((3, 4)), Some(Array1::zeros(4))),
        in_mod(|e| matches!(e, LoraError::ShapeMismatch { what: "bias", .. })),
    );
    let a1 = PeftAdapter::<f32>::from_bytes(
        &peft_config(json!({"lora_dropout": 1.0})),
        &peft_tensors(2),
    )
    .unwrap();
    t.err(
        "to_layer lora_dropout 1",
        a1.to_layer("m.proj", Array2::zeros((3, 4)), None),
        in_mod(|e| {
            matches!(
                e,
                LoraError::InvalidValue {
                    what: "dropout",
                    ..
                }
            )
        }),
    );
    // Rank 4 > min(3, 4): PEFT allows it, LoraLayer does not.
    let a4 =
        PeftAdapter::<f32>::from_bytes(&peft_config(json!({"r": 4})), &peft_tensors(4)).unwrap();
    t.err(
        "to_layer rank above min(d, k)",
        a4.to_layer("m.proj", Array2::zeros((3, 4)), None),
        in_mod(|e| matches!(e, LoraError::InvalidRank { got: 4, .. })),
    );
    // fan_in_fan_out contradicting the base weight's orientation.
    let af = PeftAdapter::<f32>::from_bytes(
        &peft_config(json!({"fan_in_fan_out": true})),
        &peft_tensors(2),
    )
    .unwrap();
    t.err(
        "to_layer fan_in_fan_out with out×in base",
        af.to_layer("m.proj", Array2::zeros((3, 4)), None),
        in_mod(|e| matches!(e, LoraError::ShapeMismatch { .. })),
    );
    // from_layers: nothing, a bad path.
    let l = LoraLayer::new(Array2::<f32>::eye(4), cfg(2)).unwrap();
    t.err(
        "from_layers empty",
        PeftAdapter::<f32>::from_layers(std::iter::empty()),
        |e| matches!(e, LoraError::InvalidValue { what: "layers", .. }),
    );
    t.err(
        "from_layers bad path",
        PeftAdapter::from_layers([("a..b", &l)]),
        |e| {
            matches!(
                e,
                LoraError::InvalidValue {
                    what: "module path",
                    ..
                }
            )
        },
    );
    println!("PEFT tensors and layers: {} cases", t.cases);
    assert_eq!(t.cases, PEFT_TENSORS_AND_LAYERS);
}

/// Every prefix of a valid file and every single-bit flip of it: an error of a file-level
/// variant or (a flip in the data, or in a value the loader ignores) a valid adapter. Never a
/// panic.
#[test]
fn safetensors_truncations_and_bit_flips() {
    let cfg_text = peft_config(json!({}));
    let good = peft_tensors(2);
    let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let file_level = |e: &LoraError| {
        matches!(
            e,
            LoraError::Parse {
                format: "safetensors",
                ..
            } | LoraError::PeftTensor { .. }
                | LoraError::MissingTensor { .. }
                | LoraError::InModule { .. }
        )
    };
    let mut truncations = 0;
    for len in 0..good.len() {
        let r = PeftAdapter::<f32>::from_bytes(&cfg_text, &good[..len]);
        let e = r.expect_err("a strict prefix must not load");
        assert!(
            matches!(
                e,
                LoraError::Parse {
                    format: "safetensors",
                    ..
                }
            ),
            "prefix {len}: {e}"
        );
        truncations += 1;
    }
    let (mut flips, mut loaded_data, mut loaded_header) = (0, 0, 0);
    for byte in 0..good.len() {
        for bit in 0..8 {
            let mut bad = good.clone();
            bad[byte] ^= 1 << bit;
            let r = std::panic::catch_unwind(|| PeftAdapter::<f32>::from_bytes(&cfg_text, &bad))
                .unwrap_or_else(|_| panic!("panic at byte {byte} bit {bit}"));
            match r {
                Err(e) => assert!(file_level(&e), "byte {byte} bit {bit}: {e:?}"),
                Ok(a) => {
                    // A loaded adapter must still be usable and finite.
                    let layer = a.to_layer("m.proj", Array2::zeros((3, 4)), None);
                    if byte >= header_end {
                        loaded_data += 1;
                        assert!(layer.is_ok(), "byte {byte} bit {bit}");
                    } else {
                        loaded_header += 1;
                    }
                }
            }
            flips += 1;
        }
    }
    println!(
        "safetensors: {truncations} truncations, {flips} bit flips ({loaded_data} in data and \
         {loaded_header} in the header still load)"
    );
    assert_eq!(truncations, good.len());
    assert_eq!(flips, 8 * good.len());
    assert!(loaded_data > 0);
}

#[test]
fn catalogue_size() {
    println!("hostile catalogue: {TOTAL} hand-written cases (×2 float types for LoraLayer and LoraModel)");
    assert_eq!(TOTAL, 351);
}
