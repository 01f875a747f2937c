//! MicroLora: every SIMD variant against scalar and an f64 reference, the batch path, learning
//! (ascent direction, both factors, rank 2, an online loop, finite differences), transactional
//! errors and serde. That `forward` does not allocate is checked in `tests/alloc.rs`.

mod common;

use common::micro_ref::{assert_close, random_mat, random_vec, RefLora};
use common::{fails_unchanged, rng};
use ndarray::{s, Array2, ShapeBuilder};
use ndlora::{LearningSignal, LoraError, MicroLora, SimdLevel};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Helpers.

/// An adapter with random weights (so U ≠ 0) and a non-default scale.
fn trained(h: usize, rank: usize, seed: u64) -> MicroLora {
    let mut r = rng(seed);
    let mut lora = MicroLora::new(h, rank);
    let down = random_mat(&mut r, rank, h, 1.0);
    let up = random_mat(&mut r, rank, h, 1.0);
    lora.set_weights(down.view(), up.view()).unwrap();
    lora.set_scale(0.8);
    lora
}

/// The variants this host can run, printed so the log says which ran.
fn available_levels() -> Vec<SimdLevel> {
    let levels: Vec<_> = SimdLevel::ALL
        .into_iter()
        .filter(|l| l.is_available())
        .collect();
    println!(
        "available kernels: {:?}; forward dispatches to {}",
        levels.iter().map(|l| l.as_str()).collect::<Vec<_>>(),
        ndlora::simd_level()
    );
    levels
}

/// Lengths 0..=70 and 4099.
fn lengths() -> impl Iterator<Item = usize> {
    (0..=70).chain([4099])
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum()
}

// ---------------------------------------------------------------------------------------
// Forward.

#[test]
fn new_adapter_state() {
    for rank in 1..=2 {
        let lora = MicroLora::new(37, rank);
        assert_eq!(lora, MicroLora::new(37, rank));
        assert_eq!((lora.rank(), lora.hidden_dim()), (rank, 37));
        assert_eq!(lora.param_count(), 2 * 37 * rank);
        assert_eq!(lora.scale(), 1.0 / (rank as f32).sqrt());
        assert_eq!(lora.pending_updates(), 0);
        let (down, up) = lora.get_weights();
        assert!(up.iter().all(|&u| u == 0.0));
        for (i, &d) in down.iter().enumerate() {
            let x = (i as f32 * 0.618034) % 1.0;
            assert_eq!(d, (x - 0.5) * 0.02, "seed pattern at flat index {i}");
        }
        // U = 0: forward adds exactly nothing.
        let x = random_vec(&mut rng(1), 37);
        let mut y = random_vec(&mut rng(2), 37);
        let before = y.clone();
        lora.forward(&x, &mut y);
        assert_eq!(y, before);
    }
    assert_eq!(MicroLora::MAX_RANK, 2);
}

/// CI on an AVX-512 host asserts both x86 kernels ran; on this AVX2 host, the AVX2 one.
#[test]
fn simd_variants_taken() {
    let levels = available_levels();
    let lora = trained(67, 2, 7);
    let x = random_vec(&mut rng(8), 67);
    let mut taken = Vec::new();
    for level in levels {
        let mut want = vec![0.25; 67];
        lora.forward_scalar(&x, &mut want);
        let mut got = vec![0.25; 67];
        lora.forward_with(level, &x, &mut got).unwrap();
        let (r, b) = RefLora::of(&lora).forward(&x, &[0.25; 67]);
        assert_close(level.as_str(), &got, &r, &b, 1e-5);
        taken.push(level);
    }
    println!("kernels exercised: {taken:?}");
    assert!(taken.contains(&SimdLevel::Scalar));
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            assert!(taken.contains(&SimdLevel::Avx512F));
            assert_eq!(ndlora::simd_level(), SimdLevel::Avx512F);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert!(taken.contains(&SimdLevel::Avx2Fma));
            if !is_x86_feature_detected!("avx512f") {
                assert_eq!(ndlora::simd_level(), SimdLevel::Avx2Fma);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("neon") {
        assert!(taken.contains(&SimdLevel::Neon));
        assert_eq!(ndlora::simd_level(), SimdLevel::Neon);
    }
}

/// Each variant vs scalar and vs the f64 reference: lengths 0..=70 and 4099, both ranks,
/// input and output sub-slices at offsets 1..=3 (unaligned), output pre-filled non-zero.
#[test]
fn every_variant_matches_scalar_and_reference() {
    for level in available_levels() {
        let mut checked = 0;
        for rank in 1..=2 {
            for n in lengths() {
                let lora = trained(n, rank, 100 + n as u64);
                let reference = RefLora::of(&lora);
                let mut r = rng(200 + n as u64);
                for offset in 1..=3 {
                    let xbuf = random_vec(&mut r, n + offset);
                    let x = &xbuf[offset..];
                    let y0 = random_vec(&mut r, n);
                    let mut ybuf = vec![f32::NAN; n + offset];
                    ybuf[offset..].copy_from_slice(&y0);
                    let y = &mut ybuf[offset..];
                    lora.forward_with(level, x, y).unwrap();

                    let mut scalar = y0.clone();
                    lora.forward_scalar(x, &mut scalar);
                    let (want, bound) = reference.forward(x, &y0);
                    let tol = 4.0 * f64::from(f32::EPSILON) * (8.0 + (n as f64).sqrt());
                    let what = format!("{level} rank {rank} n {n} offset {offset}");
                    assert_close(&what, y, &want, &bound, tol);
                    let scalar64: Vec<f64> = scalar.iter().map(|&v| f64::from(v)).collect();
                    assert_close(
                        &format!("{what} vs scalar"),
                        y,
                        &scalar64,
                        &bound,
                        2.0 * tol,
                    );
                    assert!(
                        ybuf[..offset].iter().all(|v| v.is_nan()),
                        "{what}: wrote before the slice"
                    );
                    checked += 1;
                }
            }
        }
        println!("{level}: {checked} cases match scalar and the f64 reference");
    }
}

#[test]
fn dispatched_forward_is_the_detected_kernel() {
    let lora = trained(1000, 2, 3);
    let x = random_vec(&mut rng(4), 1000);
    let mut a = vec![1.0; 1000];
    let mut b = a.clone();
    lora.forward(&x, &mut a);
    lora.forward_with(ndlora::simd_level(), &x, &mut b).unwrap();
    assert_eq!(a, b, "forward must run {}", ndlora::simd_level());
}

#[test]
#[should_panic(expected = "must have length hidden_dim = 8, got 7 and 8")]
fn forward_panics_on_input_length() {
    MicroLora::new(8, 1).forward(&[0.0; 7], &mut [0.0; 8]);
}

#[test]
#[should_panic(expected = "must have length hidden_dim = 8, got 8 and 9")]
fn forward_scalar_panics_on_output_length() {
    MicroLora::new(8, 2).forward_scalar(&[0.0; 8], &mut [0.0; 9]);
}

#[test]
#[should_panic(expected = "MicroLoRA rank must be 1-2, got 3")]
fn new_panics_on_rank_3() {
    let _ = MicroLora::new(8, 3);
}

#[test]
#[should_panic(expected = "MicroLoRA rank must be 1-2, got 0")]
fn new_panics_on_rank_0() {
    let _ = MicroLora::new(8, 0);
}

#[test]
fn forward_with_errors() {
    let lora = MicroLora::new(8, 1);
    let mut y = [0.0; 8];
    for level in SimdLevel::ALL.into_iter().filter(|l| !l.is_available()) {
        let err = lora.forward_with(level, &[0.0; 8], &mut y).unwrap_err();
        assert!(
            matches!(
                err,
                LoraError::InvalidValue {
                    what: "SIMD level",
                    ..
                }
            ),
            "{err}"
        );
    }
    assert!(matches!(
        lora.forward_with(SimdLevel::Scalar, &[0.0; 9], &mut y),
        Err(LoraError::ShapeMismatch { what: "input", .. })
    ));
}

/// forward_batch equals per-row forward for C, F, strided and negative-stride inputs, and
/// C/F outputs, with pre-filled outputs.
#[test]
fn forward_batch_matches_rows() {
    for rank in 1..=2 {
        for h in [1, 17, 64, 130] {
            for n in [0, 1, 5, 33] {
                let lora = trained(h, rank, (h * 10 + n) as u64);
                let mut r = rng((h + n) as u64);
                let big = random_mat(&mut r, 2 * n, 2 * h, 1.0);
                let c = random_mat(&mut r, n, h, 1.0);
                let f = c.t().as_standard_layout().into_owned().reversed_axes();
                let neg = big.slice(s![..n;-1, ..h]);
                let inputs = [
                    ("C", c.view()),
                    ("F", f.view()),
                    ("strided", big.slice(s![..;2, ..;2])),
                    ("negative", neg),
                ];
                let y0 = random_mat(&mut r, n, h, 1.0);
                for (name, x) in inputs {
                    let mut want = y0.clone();
                    for (xr, mut yr) in x.rows().into_iter().zip(want.rows_mut()) {
                        lora.forward(&xr.to_vec(), yr.as_slice_mut().unwrap());
                    }
                    let mut out_c = y0.clone();
                    ndlora::reset_gemm_counters();
                    lora.forward_batch(x, out_c.view_mut()).unwrap();
                    let calls = ndlora::gemm_counters();
                    if n > 0 {
                        // Two thin products through the gemm entry point: X Dᵀ, then (X Dᵀ) U.
                        assert_eq!(
                            calls.blas_calls + calls.fallback_calls,
                            2,
                            "{name}: {calls:?}"
                        );
                    }
                    let mut out_f = Array2::zeros((n, h).f());
                    out_f.assign(&y0);
                    lora.forward_batch(x, out_f.view_mut()).unwrap();
                    for out in [&out_c, &out_f] {
                        for (w, g) in want.iter().zip(out.iter()) {
                            let tol = 1e-5 * (1.0 + (h as f32).sqrt()) * (1.0 + w.abs());
                            assert!(
                                (w - g).abs() <= tol,
                                "rank {rank} h {h} n {n} {name}: batch {g} vs forward {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn forward_batch_shape_errors_leave_output() {
    let lora = MicroLora::new(8, 2);
    let mut out = Array2::from_elem((3, 8), 7.0_f32);
    let x_bad = Array2::<f32>::zeros((3, 9));
    assert!(matches!(
        lora.forward_batch(x_bad.view(), out.view_mut()),
        Err(LoraError::ShapeMismatch { what: "input", .. })
    ));
    let x = Array2::<f32>::zeros((4, 8));
    assert!(matches!(
        lora.forward_batch(x.view(), out.view_mut()),
        Err(LoraError::ShapeMismatch { what: "output", .. })
    ));
    assert!(out.iter().all(|&v| v == 7.0));
}

// ---------------------------------------------------------------------------------------
// Learning.

/// ⟨g, y(x)⟩ increases after one step, for both ranks, from new and from trained adapters.
#[test]
fn update_moves_output_along_gradient() {
    for rank in 1..=2 {
        for start in [MicroLora::new(48, rank), trained(48, rank, 11)] {
            let mut lora = start;
            let mut r = rng(12);
            let x = random_vec(&mut r, 48);
            let g = random_vec(&mut r, 48);
            let along = |l: &MicroLora| {
                let mut y = vec![0.0; 48];
                l.forward(&x, &mut y);
                dot(&g, &y)
            };
            let before = along(&lora);
            lora.accumulate_gradient(&LearningSignal::with_gradient(x.clone(), g.clone(), 1.0))
                .unwrap();
            lora.apply_accumulated(0.1);
            let after = along(&lora);
            assert!(
                after > before,
                "rank {rank}: ⟨g, y⟩ went {before} → {after}"
            );
            // A negative quality pushes the other way.
            lora.accumulate_gradient(&LearningSignal::with_gradient(x.clone(), g.clone(), -1.0))
                .unwrap();
            lora.apply_accumulated(0.1);
            assert!(along(&lora) < after);
        }
    }
}

/// D does not move while U = 0 (∂/∂D = s·q·(U g) xᵀ = 0), and moves once U is non-zero.
#[test]
fn down_trains_once_up_is_nonzero() {
    let mut lora = MicroLora::new(32, 2);
    let mut r = rng(13);
    let signal = LearningSignal::with_gradient(random_vec(&mut r, 32), random_vec(&mut r, 32), 1.0);
    let d0 = lora.get_weights().0.to_owned();
    lora.accumulate_gradient(&signal).unwrap();
    lora.apply_accumulated(0.5);
    assert_eq!(lora.get_weights().0, d0, "first step: U was 0, so D stays");
    assert!(lora.get_weights().1.iter().any(|&u| u != 0.0));
    lora.accumulate_gradient(&signal).unwrap();
    lora.apply_accumulated(0.5);
    let moved = (&lora.get_weights().0 - &d0)
        .iter()
        .map(|v| v.abs())
        .fold(0.0, f32::max);
    assert!(moved > 1e-6, "second step: D moved by {moved}");
}

/// Rank 2 does not collapse: after signals with different inputs and directions, the two rows
/// of U are not parallel and the rows of D differ.
#[test]
fn rank2_rows_stay_different() {
    let mut lora = MicroLora::new(40, 2);
    let mut r = rng(14);
    for _ in 0..20 {
        let s = LearningSignal::with_gradient(random_vec(&mut r, 40), random_vec(&mut r, 40), 1.0);
        lora.accumulate_gradient(&s).unwrap();
        lora.apply_accumulated(0.5);
    }
    let (down, up) = lora.get_weights();
    let cos = |a: &[f32], b: &[f32]| dot(a, b) / (dot(a, a) * dot(b, b)).sqrt();
    let (u0, u1) = (up.row(0).to_vec(), up.row(1).to_vec());
    let (d0, d1) = (down.row(0).to_vec(), down.row(1).to_vec());
    println!(
        "cos(U₀, U₁) = {:.3}, cos(D₀, D₁) = {:.3}",
        cos(&u0, &u1),
        cos(&d0, &d1)
    );
    assert!(cos(&u0, &u1).abs() < 0.95, "U rows nearly parallel");
    assert!(cos(&d0, &d1).abs() < 0.95, "D rows nearly parallel");
}

/// The accumulated sums equal the f64 finite-difference gradient of q·⟨g, y(x)⟩, summed over
/// three signals.
#[test]
fn gradient_matches_finite_differences() {
    for rank in 1..=2 {
        let mut lora = trained(13, rank, 15);
        let reference = RefLora::of(&lora);
        let mut r = rng(16);
        let mut want_d = Array2::<f64>::zeros((rank, 13));
        let mut want_u = Array2::<f64>::zeros((rank, 13));
        for q in [1.0, 0.5, -2.0] {
            let (x, g) = (random_vec(&mut r, 13), random_vec(&mut r, 13));
            let (gd, gu) = reference.finite_difference_gradient(&x, &g, q);
            want_d += &gd;
            want_u += &gu;
            lora.accumulate_gradient(&LearningSignal::with_gradient(x, g, q))
                .unwrap();
        }
        let (got_d, got_u) = lora.pending_gradients();
        for (name, got, want) in [("down", got_d, &want_d), ("up", got_u, &want_u)] {
            for (&g, &w) in got.iter().zip(want.iter()) {
                assert!(
                    (f64::from(g) - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "rank {rank} ∂/∂{name}: accumulated {g}, finite difference {w}"
                );
            }
        }
    }
}

/// One step applies lr / pending × the sums, then clears them.
#[test]
fn apply_uses_mean_and_clears() {
    let mut lora = trained(16, 2, 17);
    let mut r = rng(18);
    for _ in 0..4 {
        let s = LearningSignal::with_gradient(random_vec(&mut r, 16), random_vec(&mut r, 16), 1.0);
        lora.accumulate_gradient(&s).unwrap();
    }
    let (d0, u0) = (
        lora.get_weights().0.to_owned(),
        lora.get_weights().1.to_owned(),
    );
    let (gd, gu) = (
        lora.pending_gradients().0.to_owned(),
        lora.pending_gradients().1.to_owned(),
    );
    lora.apply_accumulated(0.2);
    let (d1, u1) = lora.get_weights();
    for (w1, (w0, g)) in d1
        .iter()
        .chain(u1.iter())
        .zip(d0.iter().chain(u0.iter()).zip(gd.iter().chain(gu.iter())))
    {
        assert!((w1 - (w0 + 0.05 * g)).abs() <= 1e-6 * (1.0 + w1.abs()));
    }
    assert_eq!(lora.pending_updates(), 0);
    assert!(lora
        .pending_gradients()
        .0
        .iter()
        .chain(lora.pending_gradients().1.iter())
        .all(|&g| g == 0.0));
    // Nothing pending: a no-op.
    let before = lora.clone();
    lora.apply_accumulated(1.0);
    assert_eq!(lora, before);
}

#[test]
fn batch_accumulate_equals_single_signals() {
    for rank in 1..=2 {
        let base = trained(24, rank, 19);
        let mut r = rng(20);
        let x = random_mat(&mut r, 6, 24, 1.0);
        let g = random_mat(&mut r, 6, 24, 1.0);
        let q = [1.0, -0.5, 2.0, 0.0, 0.25, 1.5];
        let mut single = base.clone();
        for ((xr, gr), &qi) in x.rows().into_iter().zip(g.rows()).zip(&q) {
            let s = LearningSignal::with_gradient(xr.to_vec(), gr.to_vec(), qi);
            single.accumulate_gradient(&s).unwrap();
        }
        let mut batch = base.clone();
        // Column-major gradients: the batch path takes any layout.
        let g_f = g.t().as_standard_layout().into_owned().reversed_axes();
        batch
            .accumulate_gradient_batch(x.view(), g_f.view(), &q)
            .unwrap();
        assert_eq!(batch.pending_updates(), 6);
        let (a, b) = (single.pending_gradients(), batch.pending_gradients());
        for (s, b) in
            a.0.iter()
                .chain(a.1.iter())
                .zip(b.0.iter().chain(b.1.iter()))
        {
            assert!(
                (s - b).abs() <= 1e-5 * (1.0 + s.abs()),
                "single {s} vs batch {b}"
            );
        }
    }
}

/// Mean squared error ‖t(x) − y(x)‖² / H over a fixed held-out set.
fn held_out_error(lora: &MicroLora, target: &Array2<f32>, xs: &Array2<f32>) -> f64 {
    let h = lora.hidden_dim();
    let mut total = 0.0;
    for x in xs.rows() {
        let x = x.to_vec();
        let t = target.dot(&ndarray::aview1(&x));
        let mut y = vec![0.0; h];
        lora.forward(&x, &mut y);
        total += t
            .iter()
            .zip(&y)
            .map(|(t, y)| f64::from(t - y).powi(2))
            .sum::<f64>();
    }
    total / (xs.nrows() * h) as f64
}

/// Online learning of a fixed rank-2 map t(x) = M x: each request sends g = t(x) − y(x)
/// (so ascent on ⟨g, y⟩ is descent on ½‖t − y‖²) and takes one step. Returns (initial
/// error, final error) on held-out inputs.
fn learn_target(rank: usize, steps: usize) -> (f64, f64) {
    let h = 32;
    let mut r = rng(21);
    let a = random_mat(&mut r, h, 2, 1.0);
    let b = random_mat(&mut r, 2, h, 1.0 / (h as f32).sqrt());
    let target = a.dot(&b);
    let held_out = random_mat(&mut r, 64, h, 1.0);
    let mut lora = MicroLora::new(h, rank);
    let e0 = held_out_error(&lora, &target, &held_out);
    for _ in 0..steps {
        let x = random_vec(&mut r, h);
        let t = target.dot(&ndarray::aview1(&x));
        let mut y = vec![0.0; h];
        lora.forward(&x, &mut y);
        let g: Vec<f32> = t.iter().zip(&y).map(|(t, y)| t - y).collect();
        lora.accumulate_gradient(&LearningSignal::with_gradient(x, g, 1.0))
            .unwrap();
        lora.apply_accumulated(0.05);
    }
    (e0, held_out_error(&lora, &target, &held_out))
}

#[test]
fn online_loop_learns_low_rank_map() {
    let (e0, e2) = learn_target(2, 3000);
    println!(
        "rank 2: held-out MSE {e0:.4} → {e2:.6} ({:.0}× lower)",
        e0 / e2
    );
    assert!(
        e2 < e0 / 100.0,
        "rank 2 must cut the error 100×: {e0} → {e2}"
    );
    // The target has rank 2: rank 1 can learn only part of it, so rank 2 must end far lower
    // (this fails if the two rank rows collapse into one).
    let (_, e1) = learn_target(1, 3000);
    println!("rank 1: held-out MSE {e0:.4} → {e1:.6}");
    assert!(e1 < e0, "rank 1 learns something");
    assert!(
        e2 < e1 / 10.0,
        "rank 2 ({e2}) must beat rank 1 ({e1}) by 10×"
    );
}

// ---------------------------------------------------------------------------------------
// Errors leave the adapter unchanged.

#[test]
fn try_new_rejects_bad_ranks() {
    for rank in [0, 3, 100] {
        assert_eq!(
            MicroLora::try_new(16, rank).unwrap_err(),
            LoraError::InvalidRank {
                got: rank,
                min: 1,
                max: 2
            }
        );
    }
    assert!(matches!(
        MicroLora::try_new(usize::MAX, 2),
        Err(LoraError::SizeOverflow { .. })
    ));
    assert_eq!(MicroLora::try_new(0, 1).unwrap().param_count(), 0);
}

/// An adapter with something pending, so "unchanged" covers the accumulators too.
fn busy() -> MicroLora {
    let mut lora = trained(10, 2, 22);
    let mut r = rng(23);
    let s = LearningSignal::with_gradient(random_vec(&mut r, 10), random_vec(&mut r, 10), 1.0);
    lora.accumulate_gradient(&s).unwrap();
    lora
}

#[test]
fn bad_signals_leave_adapter_unchanged() {
    let ok = |n| vec![0.5_f32; n];
    let mut nan_x = ok(10);
    nan_x[3] = f32::NAN;
    let mut inf_g = ok(10);
    inf_g[9] = f32::INFINITY;
    let cases = [
        (
            "short query",
            LearningSignal::with_gradient(ok(9), ok(10), 1.0),
        ),
        (
            "long gradient",
            LearningSignal::with_gradient(ok(10), ok(11), 1.0),
        ),
        (
            "NaN query",
            LearningSignal::with_gradient(nan_x, ok(10), 1.0),
        ),
        (
            "∞ gradient",
            LearningSignal::with_gradient(ok(10), inf_g, 1.0),
        ),
        (
            "NaN quality",
            LearningSignal::with_gradient(ok(10), ok(10), f32::NAN),
        ),
        // Finite, but the sums would overflow to ∞.
        (
            "overflow",
            LearningSignal::with_gradient(vec![3e38; 10], vec![3e38; 10], 3e38),
        ),
    ];
    for (name, signal) in cases {
        let err = fails_unchanged(name, &busy(), |l| l.accumulate_gradient(&signal), |_| true);
        println!("{name}: {err}");
    }
    let x = Array2::<f32>::from_elem((2, 10), 1.0);
    let mut g = x.clone();
    g[[1, 4]] = f32::NAN;
    fails_unchanged(
        "batch with a NaN gradient",
        &busy(),
        |l| l.accumulate_gradient_batch(x.view(), g.view(), &[1.0, 1.0]),
        |_| true,
    );
    fails_unchanged(
        "batch with one quality for two rows",
        &busy(),
        |l| l.accumulate_gradient_batch(x.view(), x.view(), &[1.0]),
        |_| true,
    );
}

#[test]
fn bad_learning_rates_leave_adapter_unchanged() {
    for lr in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        fails_unchanged(
            &format!("learning rate {lr}"),
            &busy(),
            |l| l.try_apply_accumulated(lr),
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
    fails_unchanged(
        "a step that overflows",
        &busy(),
        |l| l.try_apply_accumulated(3e38),
        |e| {
            *e == LoraError::WouldOverflow {
                operation: "apply_accumulated",
            }
        },
    );
}

#[test]
fn bad_weights_leave_adapter_unchanged() {
    let good = Array2::<f32>::ones((2, 10));
    let mut nan = good.clone();
    nan[[1, 7]] = f32::NAN;
    let mut inf = good.clone();
    inf[[0, 0]] = f32::INFINITY;
    let short = Array2::<f32>::ones((1, 10));
    let wide = Array2::<f32>::ones((2, 11));
    let cases = [
        ("down shape", short.view(), good.view()),
        ("up shape", good.view(), wide.view()),
        ("NaN in up (down fine)", good.view(), nan.view()),
        ("∞ in down", inf.view(), good.view()),
    ];
    for (name, down, up) in cases {
        let err = fails_unchanged(
            name,
            &busy(),
            |l| l.set_weights(down, up),
            |e| {
                matches!(
                    e,
                    LoraError::ShapeMismatch { .. } | LoraError::NonFinite { .. }
                )
            },
        );
        println!("{name}: {err}");
    }
    // Any layout is accepted and copied.
    let mut lora = busy();
    let f = Array2::from_shape_fn((2, 10).f(), |(i, j)| (i * 10 + j) as f32);
    lora.set_weights(f.view(), f.view()).unwrap();
    assert_eq!(lora.get_weights().1, f);
}

#[test]
#[should_panic(expected = "scale must be finite")]
fn set_scale_rejects_nan() {
    MicroLora::new(4, 1).set_scale(f32::NAN);
}

#[test]
fn reset_restores_new_but_keeps_scale() {
    let mut lora = busy();
    lora.apply_accumulated(0.1);
    lora.accumulate_gradient(&LearningSignal::with_gradient(
        vec![1.0; 10],
        vec![1.0; 10],
        1.0,
    ))
    .unwrap();
    lora.reset();
    let mut fresh = MicroLora::new(10, 2);
    fresh.set_scale(0.8);
    assert_eq!(lora, fresh);
}

// ---------------------------------------------------------------------------------------
// Serde.

#[test]
fn serde_round_trip_keeps_outputs_and_learning() {
    for rank in 1..=2 {
        let mut lora = trained(50, rank, 24);
        let mut r = rng(25);
        let signal =
            LearningSignal::with_gradient(random_vec(&mut r, 50), random_vec(&mut r, 50), 0.7);
        lora.accumulate_gradient(&signal).unwrap(); // pending sums are not saved
        let json = serde_json::to_string(&lora).unwrap();
        let mut back: MicroLora = serde_json::from_str(&json).unwrap();
        assert_eq!(back.get_weights(), lora.get_weights());
        assert_eq!(back.scale(), lora.scale());
        assert_eq!(back.pending_updates(), 0);

        let x = random_vec(&mut r, 50);
        let (mut y1, mut y2) = (vec![0.5; 50], vec![0.5; 50]);
        lora.forward(&x, &mut y1);
        back.forward(&x, &mut y2);
        assert_eq!(y1, y2);

        // Learning works after loading (the seed panicked here), and matches the original
        // adapter once its pending sums are dropped the same way.
        let mut original = lora.clone();
        original.apply_accumulated(0.0); // clears pending without moving weights
        for l in [&mut original, &mut back] {
            l.accumulate_gradient(&signal).unwrap();
            l.apply_accumulated(0.3);
        }
        assert_eq!(back, original);

        // The signal serialises too.
        let s: LearningSignal =
            serde_json::from_str(&serde_json::to_string(&signal).unwrap()).unwrap();
        assert_eq!(s, signal);
    }
}

/// A change to a serialised document.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
fn corrupt_documents_are_errors() {
    let lora = trained(3, 2, 26);
    let good: serde_json::Value = serde_json::to_value(&lora).unwrap();
    let edits: Vec<(&str, Edit)> = vec![
        ("rank 3", Box::new(|v| v["rank"] = 3.into())),
        ("rank 0", Box::new(|v| v["rank"] = 0.into())),
        (
            "hidden_dim disagrees with shapes",
            Box::new(|v| v["hidden_dim"] = 4.into()),
        ),
        (
            "up has wrong shape",
            Box::new(|v| {
                v["up"]["dim"] = serde_json::json!([1, 6]);
            }),
        ),
        (
            "data shorter than dim",
            Box::new(|v| {
                v["down"]["data"].as_array_mut().unwrap().pop();
            }),
        ),
        (
            "overflowing weight",
            Box::new(|v| v["down"]["data"][2] = serde_json::json!(1e39)),
        ),
        (
            "overflowing scale",
            Box::new(|v| v["scale"] = serde_json::json!(1e39)),
        ),
        (
            "null weight",
            Box::new(|v| v["up"]["data"][0] = serde_json::Value::Null),
        ),
        ("unknown field", Box::new(|v| v["extra"] = 1.into())),
        (
            "missing field",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("scale");
            }),
        ),
    ];
    assert!(serde_json::from_value::<MicroLora>(good.clone()).is_ok());
    for (name, edit) in edits {
        let mut doc = good.clone();
        edit(&mut doc);
        let res = serde_json::from_value::<MicroLora>(doc);
        println!(
            "{name}: {:?}",
            res.as_ref().map(|_| ()).map_err(|e| e.to_string())
        );
        assert!(res.is_err(), "{name} was accepted");
    }
}

// ---------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The dispatched kernel agrees with scalar for any length, values and offset.
    #[test]
    fn dispatched_matches_scalar(
        n in 0usize..300,
        rank in 1usize..=2,
        seed in any::<u64>(),
        offset in 0usize..4,
    ) {
        let lora = trained(n, rank, seed);
        let mut r = rng(seed ^ 0x5eed);
        let xbuf = random_vec(&mut r, n + offset);
        let y0 = random_vec(&mut r, n);
        let (mut a, mut b) = (y0.clone(), y0.clone());
        lora.forward(&xbuf[offset..], &mut a);
        lora.forward_scalar(&xbuf[offset..], &mut b);
        let (want, bound) = RefLora::of(&lora).forward(&xbuf[offset..], &y0);
        let tol = 4.0 * f64::from(f32::EPSILON) * (8.0 + (n as f64).sqrt());
        assert_close("dispatched", &a, &want, &bound, tol);
        assert_close("scalar", &b, &want, &bound, 4.0 * tol);
    }

    /// U = 0 ⇒ the forward leaves the output exactly as it was (whatever D and x are).
    #[test]
    fn zero_up_is_identity(n in 0usize..200, rank in 1usize..=2, seed in any::<u64>()) {
        let mut lora = trained(n, rank, seed);
        let down = lora.get_weights().0.to_owned();
        lora.set_weights(down.view(), Array2::zeros((rank, n)).view()).unwrap();
        let mut r = rng(seed);
        let x = random_vec(&mut r, n);
        let y0 = random_vec(&mut r, n);
        let mut y = y0.clone();
        lora.forward(&x, &mut y);
        prop_assert_eq!(y, y0);
    }

    /// One small ascent step never decreases q·⟨g, y(x)⟩ (to first order it rises by
    /// lr·‖∇‖², and the second-order term is tiny for a small step).
    #[test]
    fn small_step_ascends(n in 1usize..100, rank in 1usize..=2, seed in any::<u64>(), q in 0.1f32..2.0) {
        let mut lora = trained(n, rank, seed);
        let mut r = rng(!seed);
        let (x, g) = (random_vec(&mut r, n), random_vec(&mut r, n));
        let before = RefLora::of(&lora).objective(&x, &g, q);
        lora.accumulate_gradient(&LearningSignal::with_gradient(x.clone(), g.clone(), q)).unwrap();
        lora.apply_accumulated(1e-3);
        let after = RefLora::of(&lora).objective(&x, &g, q);
        prop_assert!(after >= before - 1e-9 * (1.0 + before.abs()), "{} → {}", before, after);
    }
}

#[test]
fn apply_accumulated_panics_on_bad_lr_before_touching_weights() {
    let mut lora = MicroLora::new(8, 2);
    lora.accumulate_gradient(&LearningSignal::with_gradient(
        vec![0.5; 8],
        vec![1.0; 8],
        1.0,
    ))
    .unwrap();
    let before = lora.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lora.apply_accumulated(f32::NAN)
    }));
    let message = *result.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("learning rate"), "{message}");
    assert_eq!(lora, before);
}

#[test]
fn tiny_scale_with_large_up_entries_keeps_precision() {
    // s·h underflows f32 into a subnormal of a few significant bits (s = 1e-44, h = 1.3)
    // while s·h·Uᵢ with Uᵢ = 1e37 is an ordinary number: every kernel and forward_batch must
    // give it to f32 precision (the f64 path), not off by the subnormal's rounding (~5 %).
    let h = 37;
    let mut lora = MicroLora::new(h, 1);
    let mut down = ndarray::Array2::<f32>::zeros((1, h));
    down[[0, 3]] = 1.3;
    let mut up = ndarray::Array2::<f32>::zeros((1, h));
    up[[0, 5]] = 1.0e37;
    up[[0, 6]] = -3.0e36;
    lora.set_weights(down.view(), up.view()).unwrap();
    lora.set_scale(1.0e-44);
    let s = f64::from(lora.scale());
    let x = vec![1.0f32; h];
    let expected = |i: usize| s * f64::from(1.3f32) * f64::from(up[[0, i]]);
    let check = |what: &str, y: &[f32]| {
        for (i, &v) in y.iter().enumerate() {
            let want = expected(i);
            assert!(
                (f64::from(v) - want).abs() <= 1e-6 * want.abs(),
                "{what}: y[{i}] = {v:e}, expected {want:e}"
            );
        }
    };
    for level in SimdLevel::ALL.into_iter().filter(|l| l.is_available()) {
        let mut y = vec![0.0f32; h];
        lora.forward_with(level, &x, &mut y).unwrap();
        check(level.as_str(), &y);
    }
    let xb = ndarray::Array2::<f32>::ones((2, h));
    let mut yb = ndarray::Array2::<f32>::zeros((2, h));
    lora.forward_batch(xb.view(), yb.view_mut()).unwrap();
    for row in yb.rows() {
        check("forward_batch", row.as_slice().unwrap());
    }
}

#[test]
fn huge_scale_with_zero_up_entries_adds_exactly_zero() {
    // s·h overflows f32 (s = 1e34, h ≈ 1e6) though every weight and input is finite; entries
    // with Uᵢ = 0 must stay exactly y₀ (not ∞·0 = NaN), small Uᵢ give finite values.
    let h = 37;
    let mut lora = MicroLora::new(h, 1);
    let mut down = ndarray::Array2::<f32>::zeros((1, h));
    down[[0, 3]] = 1.0e6;
    let mut up = ndarray::Array2::<f32>::zeros((1, h));
    up[[0, 5]] = 1.0e-30;
    lora.set_weights(down.view(), up.view()).unwrap();
    lora.set_scale(1.0e34);
    let x = vec![1.0f32; h];
    for level in SimdLevel::ALL.into_iter().filter(|l| l.is_available()) {
        let mut y = vec![2.0f32; h];
        lora.forward_with(level, &x, &mut y).unwrap();
        for (i, &v) in y.iter().enumerate() {
            let expected = if i == 5 { 2.0 + 1.0e10 } else { 2.0 };
            assert_eq!(v, expected, "{level}: y[{i}]");
        }
    }
    // forward_batch too, whichever operand the BLAS scales by alpha; a second row whose s·h
    // does not overflow (h = 0) shares the batch.
    let mut xb = ndarray::Array2::<f32>::zeros((2, h));
    xb.row_mut(0).fill(1.0);
    let mut yb = ndarray::Array2::<f32>::from_elem((2, h), 2.0);
    lora.forward_batch(xb.view(), yb.view_mut()).unwrap();
    for ((r, i), &v) in yb.indexed_iter() {
        let expected = if (r, i) == (0, 5) { 2.0 + 1.0e10 } else { 2.0 };
        assert_eq!(v, expected, "forward_batch: y[{r}, {i}]");
    }
}
