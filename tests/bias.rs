//! The base layer's bias: Y = X Wᵀ + b + s·(X Aᵀ) Bᵀ, untouched by merge/unmerge.

mod common;

use common::{random_layer, Ref};
use ndarray::{Array1, Array2};
use ndlora::{LoraConfig, LoraError, LoraLayer};

/// Y = X Wᵀ + b + s·(X Aᵀ) Bᵀ: the f64 reference plus the bias.
fn reference(l: &LoraLayer<f64>, x: &Array2<f64>) -> Array2<f64> {
    Ref::new(l).forward(x) + l.bias().unwrap()
}

fn assert_close(got: &Array2<f64>, want: &Array2<f64>, tol: f64) {
    assert_eq!(got.dim(), want.dim());
    for ((idx, g), w) in got.indexed_iter().zip(want.iter()) {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "at {idx:?}: got {g}, expected {w}"
        );
    }
}

#[test]
fn forward_with_bias_matches_reference() {
    for (d, k, r, n) in [(1, 1, 1, 1), (7, 5, 2, 3), (33, 17, 4, 0), (16, 40, 8, 9)] {
        let bias = Array1::from_shape_fn(d, |i| i as f64 * 0.5 - 1.0);
        let l = random_layer::<f64>(d, k, r, 1)
            .with_bias(bias.clone())
            .unwrap();
        assert_eq!(l.bias().unwrap(), bias.view());
        let x = Array2::from_shape_fn((n, k), |(i, j)| ((i * k + j) as f64 * 0.11).cos());
        let want = reference(&l, &x);
        assert_close(&l.forward(x.view()).unwrap(), &want, 1e-12);

        // forward_into overwrites a NaN-filled output, in C and F order.
        for f_order in [false, true] {
            let mut out = if f_order {
                Array2::from_elem((d, n), f64::NAN).reversed_axes()
            } else {
                Array2::from_elem((n, d), f64::NAN)
            };
            l.forward_into(x.view(), out.view_mut()).unwrap();
            assert_close(&out, &want, 1e-12);
        }

        // forward_train without dropout is forward.
        let mut lt = l.clone();
        assert_close(&lt.forward_train(x.view()).unwrap(), &want, 1e-12);
    }
}

#[test]
fn forward_train_with_dropout_adds_bias_once() {
    let d = 6;
    let bias = Array1::from_elem(d, 100.0);
    let mut l = LoraLayer::<f64>::new(
        Array2::zeros((d, 4)),
        LoraConfig {
            rank: 2,
            dropout: 0.5,
            ..Default::default()
        },
    )
    .unwrap()
    .with_bias(bias)
    .unwrap();
    // W = 0 and B = 0: the output is exactly b whatever the dropout mask.
    let y = l.forward_train(Array2::ones((3, 4)).view()).unwrap();
    assert!(y.iter().all(|&v| v == 100.0), "{y}");
}

#[test]
fn merge_and_unmerge_leave_bias_alone() {
    let bias = Array1::from_shape_fn(9, |i| i as f64);
    let mut l = random_layer::<f64>(9, 6, 3, 1)
        .with_bias(bias.clone())
        .unwrap();
    let x = Array2::from_shape_fn((4, 6), |(i, j)| (i as f64 - j as f64) * 0.3);
    let y = l.forward(x.view()).unwrap();
    let w_eff = l.effective_weight();
    l.merge().unwrap();
    assert_eq!(l.bias().unwrap(), bias.view());
    assert_close(&l.base_weight().to_owned(), &w_eff, 1e-14);
    assert_close(&l.forward(x.view()).unwrap(), &y, 1e-12);
    l.unmerge().unwrap();
    assert_eq!(l.bias().unwrap(), bias.view());
    assert_close(&l.forward(x.view()).unwrap(), &y, 1e-12);
}

#[test]
fn effective_weight_excludes_bias() {
    let plain = random_layer::<f64>(5, 4, 2, 1);
    let biased = plain.clone().with_bias(Array1::ones(5)).unwrap();
    assert_eq!(plain.effective_weight(), biased.effective_weight());
    assert!(plain.bias().is_none());
    assert_ne!(plain, biased);
}

#[test]
fn bad_bias_is_an_error() {
    let err = random_layer::<f64>(5, 4, 2, 1)
        .with_bias(Array1::zeros(4))
        .unwrap_err();
    assert!(
        matches!(err, LoraError::ShapeMismatch { what: "bias", .. }),
        "{err}"
    );
    let mut b = Array1::zeros(5);
    b[3] = f64::NAN;
    let err = random_layer::<f64>(5, 4, 2, 1).with_bias(b).unwrap_err();
    assert!(
        matches!(
            err,
            LoraError::NonFinite {
                what: "bias",
                index: (0, 3),
                ..
            }
        ),
        "{err}"
    );
    let mut b = Array1::zeros(5);
    b[0] = f64::NEG_INFINITY;
    assert!(random_layer::<f64>(5, 4, 2, 1)
        .with_bias(b.clone())
        .is_err());

    // set_bias leaves the layer as it was on error, and can remove the bias.
    let mut l = random_layer::<f64>(5, 4, 2, 1)
        .with_bias(Array1::ones(5))
        .unwrap();
    let before = l.clone();
    assert!(l.set_bias(Some(b)).is_err());
    assert!(l.set_bias(Some(Array1::zeros(6))).is_err());
    assert_eq!(l, before);
    l.set_bias(None).unwrap();
    assert!(l.bias().is_none());
    l.set_bias(Some(Array1::zeros(5))).unwrap();
    assert_eq!(l.bias().unwrap(), Array1::<f64>::zeros(5));
}

#[test]
fn serde_round_trips_bias_and_accepts_old_documents() {
    let l = random_layer::<f64>(5, 4, 2, 1)
        .with_bias(Array1::from_elem(5, 0.25))
        .unwrap();
    let json = serde_json::to_string(&l).unwrap();
    let back: LoraLayer<f64> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, l);

    // Without a bias the document has no `bias` field, as before biases existed.
    let plain = random_layer::<f64>(5, 4, 2, 1);
    let json = serde_json::to_string(&plain).unwrap();
    assert!(!json.contains("\"bias\""));
    let back: LoraLayer<f64> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, plain);

    // A wrong-length bias in a document is refused (JSON cannot hold a non-finite one).
    let mut v: serde_json::Value = serde_json::to_value(&l).unwrap();
    v["bias"]["dim"] = serde_json::json!([4]);
    v["bias"]["data"] = serde_json::json!([0.0, 0.0, 0.0, 0.0]);
    let err = serde_json::from_value::<LoraLayer<f64>>(v).unwrap_err();
    assert!(err.to_string().contains("bias"), "{err}");
}
