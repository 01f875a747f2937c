//! LoraLayer::backward against central finite differences and an f64 reference; sgd_step.

mod common;

use common::{
    assert_close, fails_unchanged, matmul_t, random, random_layer, rng, to_f64, Laid, Ref, LAYOUTS,
};
use ndarray::Array2;
use ndlora::{LoraError, LoraFloat, LoraGrads, LoraLayer};

/// Rounding bound factor, as in tests/layer.rs: |error| ≤ TOL·ε·(the sum over magnitudes).
const TOL: f64 = 8.0;

/// L = Σ Y ⊙ R, so ∂L/∂Y = R.
fn loss(layer: &LoraLayer<f64>, x: &Array2<f64>, r: &Array2<f64>) -> f64 {
    (layer.forward(x.view()).unwrap() * r).sum()
}

/// Central difference of `f` with respect to each element of `m`, perturbed via `set`.
fn central_diff(
    shape: (usize, usize),
    mut f: impl FnMut((usize, usize), f64) -> f64,
) -> Array2<f64> {
    /// L is linear in each single parameter, so the step only trades rounding error.
    const H: f64 = 1e-4;
    Array2::from_shape_fn(shape, |idx| (f(idx, H) - f(idx, -H)) / (2.0 * H))
}

#[track_caller]
fn assert_fd(got: &Array2<f64>, fd: &Array2<f64>, what: &str) {
    assert_eq!(got.dim(), fd.dim(), "{what}: shape");
    for ((idx, g), e) in got.indexed_iter().zip(fd.iter()) {
        assert!(
            (g - e).abs() <= 1e-7 * (1.0 + e.abs()),
            "{what} at {idx:?}: backward {g:e}, finite difference {e:e}"
        );
    }
}

#[test]
fn backward_matches_finite_differences() {
    // (n, d, k, r): odd shapes, n = 1, r = 1, r = min(d, k).
    let shapes = [
        (1, 1, 1, 1),
        (1, 3, 5, 1),
        (7, 5, 3, 2),
        (4, 9, 6, 3),
        (3, 2, 7, 2),
        (5, 4, 4, 4),
    ];
    for (case, &(n, d, k, r)) in shapes.iter().enumerate() {
        let layer = random_layer::<f64>(d, k, r, 100 + case as u64);
        let mut g = rng(200 + case as u64);
        let x: Array2<f64> = random(&mut g, n, k);
        let rr: Array2<f64> = random(&mut g, n, d);
        let grads = layer.backward(x.view(), rr.view()).unwrap();
        let ctx = |what| format!("{what} n={n} d={d} k={k} r={r}");

        let fd_a = central_diff((r, k), |idx, h| {
            let mut l = layer.clone();
            l.weight_a_mut().unwrap()[idx] += h;
            loss(&l, &x, &rr)
        });
        assert_fd(&grads.grad_a, &fd_a, &ctx("grad_a"));
        let fd_b = central_diff((d, r), |idx, h| {
            let mut l = layer.clone();
            l.weight_b_mut().unwrap()[idx] += h;
            loss(&l, &x, &rr)
        });
        assert_fd(&grads.grad_b, &fd_b, &ctx("grad_b"));
        let fd_x = central_diff((n, k), |idx, h| {
            let mut xp = x.clone();
            xp[idx] += h;
            loss(&layer, &xp, &rr)
        });
        assert_fd(&grads.grad_x, &fd_x, &ctx("grad_x"));

        // Merged: the same function of X, so the same ∂L/∂X (W now holds s·B A).
        let mut merged = layer.clone();
        merged.merge().unwrap();
        let mg = merged.backward(x.view(), rr.view()).unwrap();
        assert_fd(&mg.grad_x, &fd_x, &ctx("merged grad_x"));
        assert_eq!(mg.grad_a, grads.grad_a, "{}", ctx("merged grad_a"));
        assert_eq!(mg.grad_b, grads.grad_b, "{}", ctx("merged grad_b"));
    }
}

/// The three gradient formulas in f64 with plain loops, and the same over magnitudes.
fn reference_grads(re: &Ref, x: &Array2<f64>, g: &Array2<f64>) -> [(Array2<f64>, Array2<f64>); 3] {
    let grads = |re: &Ref, x: &Array2<f64>, g: &Array2<f64>| {
        let h = matmul_t(x, &re.a); // X Aᵀ
        let gb = matmul_t(g, &re.b.t().to_owned()); // G B
        let grad_b = re.s * matmul_t(&g.t().to_owned(), &h.t().to_owned());
        let grad_a = re.s * matmul_t(&gb.t().to_owned(), &x.t().to_owned());
        let grad_x = matmul_t(g, &re.w.t().to_owned()) + re.s * matmul_t(&gb, &re.a.t().to_owned());
        [grad_a, grad_b, grad_x]
    };
    let abs = |m: &Array2<f64>| m.mapv(f64::abs);
    let re_abs = Ref {
        w: abs(&re.w),
        a: abs(&re.a),
        b: abs(&re.b),
        s: re.s.abs(),
    };
    let [a, b, xg] = grads(re, x, g);
    let [ma, mb, mx] = grads(&re_abs, &abs(x), &abs(g));
    [(a, ma), (b, mb), (xg, mx)]
}

fn layouts_sweep<A: LoraFloat<Factor = A>>() {
    let mut cases = 0;
    for (case, &(d, k)) in [(1, 1), (7, 33), (33, 7), (17, 17)].iter().enumerate() {
        for r in [1, 2, 5].into_iter().filter(|&r| r <= d.min(k)) {
            let layer = random_layer::<A>(d, k, r, case as u64 * 10 + r as u64);
            let re = Ref::new(&layer);
            for n in [0, 1, 7, 33] {
                let mut gen = rng(n as u64 + 1000);
                let x: Array2<A> = random(&mut gen, n, k);
                let g: Array2<A> = random(&mut gen, n, d);
                let [(ea, ma), (eb, mb), (ex, mx)] =
                    reference_grads(&re, &to_f64(x.view()), &to_f64(g.view()));
                for (i, lx) in LAYOUTS.into_iter().enumerate() {
                    let lg = LAYOUTS[(i + 2) % LAYOUTS.len()];
                    let (xl, gl) = (Laid::new(&x, lx), Laid::new(&g, lg));
                    let ctx = format!("{} d={d} k={k} r={r} n={n} x {lx:?} g {lg:?}", A::NAME);
                    let grads = layer.backward(xl.view(), gl.view()).unwrap();
                    assert_close(grads.grad_a.view(), &ea, &ma, TOL, &format!("grad_a {ctx}"));
                    assert_close(grads.grad_b.view(), &eb, &mb, TOL, &format!("grad_b {ctx}"));
                    assert_close(grads.grad_x.view(), &ex, &mx, TOL, &format!("grad_x {ctx}"));
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 4 * 5 * (1 + 3 + 3 + 3), "every combination ran");
}

#[test]
fn backward_matches_reference_in_every_layout_f32() {
    layouts_sweep::<f32>();
}

#[test]
fn backward_matches_reference_in_every_layout_f64() {
    layouts_sweep::<f64>();
}

#[test]
fn empty_batch_gives_zero_factor_gradients() {
    let layer = random_layer::<f32>(4, 6, 2, 1);
    let grads = layer
        .backward(Array2::zeros((0, 6)).view(), Array2::zeros((0, 4)).view())
        .unwrap();
    assert_eq!(grads.grad_a, Array2::<f32>::zeros((2, 6)));
    assert_eq!(grads.grad_b, Array2::<f32>::zeros((4, 2)));
    assert_eq!(grads.grad_x.dim(), (0, 6));
}

#[test]
fn backward_rejects_bad_shapes() {
    let layer = random_layer::<f64>(4, 6, 2, 1);
    let bad = |x: (usize, usize), g: (usize, usize), what: &str| {
        let err = layer
            .backward(Array2::zeros(x).view(), Array2::zeros(g).view())
            .unwrap_err();
        assert!(
            matches!(&err, LoraError::ShapeMismatch { what: w, .. } if *w == what),
            "{err:?}"
        );
    };
    bad((3, 5), (3, 4), "input x");
    bad((3, 6), (2, 4), "grad_output");
    bad((3, 6), (3, 5), "grad_output");
    bad((3, 6), (4, 3), "grad_output");
}

#[test]
fn sgd_step_moves_factors_against_the_gradient() {
    let mut layer = random_layer::<f64>(5, 7, 3, 2);
    let before = layer.clone();
    let mut g = rng(3);
    let (x, r): (Array2<f64>, Array2<f64>) = (random(&mut g, 4, 7), random(&mut g, 4, 5));
    let grads = layer.backward(x.view(), r.view()).unwrap();
    let lr = 0.05;
    layer.sgd_step(&grads, lr).unwrap();
    let tol = 1e-15;
    assert!(layer
        .weight_a()
        .abs_diff_eq(&(&before.weight_a() - &(&grads.grad_a * lr)), tol));
    assert!(layer
        .weight_b()
        .abs_diff_eq(&(&before.weight_b() - &(&grads.grad_b * lr)), tol));
    assert_eq!(layer.base_weight(), before.base_weight());
    // A small step along −∇ lowers L = Σ Y ⊙ R.
    assert!(loss(&layer, &x, &r) < loss(&before, &x, &r));
}

#[test]
fn sgd_step_errors_leave_the_layer_unchanged() {
    let layer = random_layer::<f32>(5, 7, 3, 4);
    let ok = LoraGrads {
        grad_a: Array2::<f32>::ones((3, 7)),
        grad_b: Array2::ones((5, 3)),
        grad_x: Array2::zeros((0, 7)),
    };
    let mut merged = layer.clone();
    merged.merge().unwrap();
    fails_unchanged(
        "sgd_step while merged",
        &merged,
        |l| l.sgd_step(&ok, 0.1),
        |e| {
            matches!(
                e,
                LoraError::MergeState {
                    operation: "sgd_step",
                    expected: false
                }
            )
        },
    );
    for lr in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        fails_unchanged(
            &format!("sgd_step lr {lr}"),
            &layer,
            |l| l.sgd_step(&ok, lr),
            |e| matches!(e, LoraError::InvalidValue { .. }),
        );
    }
    let mut bad_a = ok.clone();
    bad_a.grad_a = Array2::ones((3, 6));
    let mut bad_b = ok.clone();
    bad_b.grad_b = Array2::ones((3, 5));
    for (what, g) in [("grad_a", &bad_a), ("grad_b", &bad_b)] {
        fails_unchanged(
            &format!("{what} shape"),
            &layer,
            |l| l.sgd_step(g, 0.1),
            |e| matches!(e, LoraError::ShapeMismatch { what: w, .. } if *w == what),
        );
    }
    let mut g = ok.clone();
    g.grad_b[[4, 2]] = f32::NAN;
    fails_unchanged(
        "NaN in grad_b",
        &layer,
        |l| l.sgd_step(&g, 0.1),
        |e| {
            matches!(
                e,
                LoraError::NonFinite {
                    what: "grad_b",
                    index: (4, 2),
                    ..
                }
            )
        },
    );
    // A finite step that overflows: A − 3e38·10 = −∞ in f32. B is checked too, but A first.
    let mut g = ok.clone();
    g.grad_a.fill(10.0);
    fails_unchanged(
        "a step that overflows",
        &layer,
        |l| l.sgd_step(&g, 3e38),
        |e| matches!(e, LoraError::NonFinite { .. }),
    );
}
