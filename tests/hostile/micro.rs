//! MicroLora: construction, forwards, learning signals, learning rates, weights, serde.

use ndarray::Array2;
use ndlora::{LearningSignal, LoraError, MicroLora, SimdLevel};
use serde_json::{json, Value};

use super::{Tally, MICRO, MICRO_SERDE};

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
        |m| m.accumulate_gradient(&sig(vec![0.5; 15], ok.clone(), 1.0)),
        shape("signal.query_embedding"),
    );
    t.unchanged(
        "accumulate long g",
        &m,
        |m| m.accumulate_gradient(&sig(ok.clone(), vec![0.5; 17], 1.0)),
        shape("signal.gradient_estimate"),
    );
    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut bad = ok.clone();
        bad[7] = v;
        t.unchanged(
            "accumulate x non-finite",
            &m,
            |m| m.accumulate_gradient(&sig(bad.clone(), ok.clone(), 1.0)),
            nf("signal.query_embedding"),
        );
        t.unchanged(
            "accumulate g non-finite",
            &m,
            |m| m.accumulate_gradient(&sig(ok.clone(), bad.clone(), 1.0)),
            nf("signal.gradient_estimate"),
        );
        t.unchanged(
            "accumulate q non-finite",
            &m,
            |m| m.accumulate_gradient(&sig(ok.clone(), ok.clone(), v)),
            nf("signal.quality_score"),
        );
    }
    let huge = vec![1e30_f32; 16];
    t.unchanged(
        "accumulate overflows",
        &m,
        |m| m.accumulate_gradient(&sig(huge.clone(), huge.clone(), 1e30)),
        |e| matches!(e, LoraError::NonFinite { what, .. } if what.starts_with("gradient sum")),
    );
    // accumulate_gradient_batch
    let q = [1.0_f32, 0.5];
    let xs = Array2::<f32>::ones((2, 16));
    t.unchanged(
        "batch queries shape",
        &m,
        |m| m.accumulate_gradient_batch(Array2::ones((2, 15)).view(), xs.view(), &q),
        shape("queries"),
    );
    t.unchanged(
        "batch gradients shape",
        &m,
        |m| m.accumulate_gradient_batch(xs.view(), Array2::ones((3, 16)).view(), &q),
        shape("gradients"),
    );
    t.unchanged(
        "batch quality length",
        &m,
        |m| m.accumulate_gradient_batch(xs.view(), xs.view(), &[1.0]),
        shape("queries"),
    );
    let mut bad = xs.clone();
    bad[[1, 3]] = f32::NAN;
    t.unchanged(
        "batch queries NaN",
        &m,
        |m| m.accumulate_gradient_batch(bad.view(), xs.view(), &q),
        nf("queries"),
    );
    t.unchanged(
        "batch gradients NaN",
        &m,
        |m| m.accumulate_gradient_batch(xs.view(), bad.view(), &q),
        nf("gradients"),
    );
    t.unchanged(
        "batch quality ∞",
        &m,
        |m| m.accumulate_gradient_batch(xs.view(), xs.view(), &[1.0, f32::INFINITY]),
        nf("quality"),
    );
    let h2 = Array2::<f32>::from_elem((2, 16), 1e30);
    t.unchanged(
        "batch overflows",
        &m,
        |m| m.accumulate_gradient_batch(h2.view(), h2.view(), &[1e30, 1e30]),
        |e| matches!(e, LoraError::NonFinite { what, .. } if what.starts_with("gradient sum")),
    );

    // try_apply_accumulated
    for lr in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        t.unchanged(
            "apply lr non-finite",
            &m,
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
            |m| m.set_weights(Array2::zeros(d).view(), Array2::zeros(u).view()),
            shape(what),
        );
    }
    let mut bad = good.clone();
    bad[[1, 15]] = f32::NEG_INFINITY;
    t.unchanged(
        "set_weights down ∞",
        &m,
        |m| m.set_weights(bad.view(), good.view()),
        nf("down"),
    );
    t.unchanged(
        "set_weights up -∞",
        &m,
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
