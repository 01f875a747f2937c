//! Forwards of at most `N_SKINNY` rows (ndlora's own kernel, one pass over W): the same bits
//! for any thread count, every adapter of a model folded in (and the gemm beyond
//! `MAX_SKINNY_ADAPTERS`), and a scaling so large that s·(X Aᵀ) overflows, or so small that
//! it underflows, left to the gemm.
//! One test function: it changes the process-wide thread count.

mod common;

use common::{assert_close, bits, matmul_t, random, random_layer, rng, to_f64, Ref};
use ndarray::{Array1, Array2};
use ndlora::{LoraConfig, LoraFloat, LoraModel, SimdLevel};

/// Rounding bound factor, as in tests/layer.rs: |error| ≤ TOL·ε·(the sum over magnitudes).
const TOL: f64 = 8.0;

/// Runs `f`, returning its value and whether the skinny kernel ran it.
fn skinny<T>(f: impl FnOnce() -> T) -> (T, bool) {
    ndlora::reset_gemm_counters();
    let v = f();
    (v, ndlora::gemm_counters().skinny_products > 0)
}

/// n·d·k above the kernel's threading threshold: W's rows are split over the threads, and
/// every count gives the bits of one thread (and the reference's value).
fn thread_counts<A: LoraFloat<Factor = A>>() {
    let simd = ndlora::simd_level() != SimdLevel::Scalar;
    let (d, k) = (1030, 777);
    let layer = random_layer::<A>(d, k, 16, 5)
        .with_bias(Array1::from_shape_fn(d, |i| {
            A::from_f64_lossy(i as f64 / 500.0)
        }))
        .unwrap();
    let reference = Ref::new(&layer);
    for n in [1, 6, ndlora::N_SKINNY] {
        let x: Array2<A> = random(&mut rng(n as u64), n, k);
        let x64 = to_f64(x.view());
        let bias = to_f64(layer.bias().unwrap().insert_axis(ndarray::Axis(0)));
        let expected = reference.forward(&x64) + &bias;
        let magnitude = reference.forward_magnitude(&x64) + bias.mapv(f64::abs);
        let mut one = None;
        for threads in [1, 2, 3, 5] {
            ndlora::set_blas_threads(threads);
            let (y, own) = skinny(|| layer.forward(x.view()).unwrap());
            let ctx = format!("{} n {n} threads {threads}", A::NAME);
            assert_eq!(own, simd, "{ctx}");
            assert_close(y.view(), &expected, &magnitude, TOL, &ctx);
            match &one {
                None => one = Some(bits(y.view())),
                Some(b) => assert_eq!(&bits(y.view()), b, "{ctx}: bits differ from one thread"),
            }
        }
    }
    ndlora::set_blas_threads(1);
}

/// Every active adapter is a branch of the one pass; past `MAX_SKINNY_ADAPTERS` the gemms run.
fn model_adapters<A: LoraFloat<Factor = A>>() {
    let simd = ndlora::simd_level() != SimdLevel::Scalar;
    let (d, k, n) = (37, 50, 3);
    let mut g = rng(11);
    let mut m = LoraModel::new(random(&mut g, d, k)).unwrap();
    let count = ndlora::MAX_SKINNY_ADAPTERS + 1;
    let names: Vec<String> = (0..count).map(|i| format!("a{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let rank = 1 + i % 4;
        let config = LoraConfig {
            rank,
            alpha: 1.0 + i as f64,
            ..Default::default()
        };
        let (a, b) = (random(&mut g, rank, k), random(&mut g, d, rank));
        m.add_adapter_from_parts(name, a, b, config).unwrap();
    }
    let x: Array2<A> = random(&mut rng(3), n, k);
    let x64 = to_f64(x.view());
    let base = matmul_t(&x64, &to_f64(m.base_weight()));
    for active in [2, ndlora::MAX_SKINNY_ADAPTERS, count] {
        let names: Vec<&str> = names[..active].iter().map(String::as_str).collect();
        m.set_active(&names).unwrap();
        let mut expected = base.clone();
        let mut magnitude = matmul_t(&x64.mapv(f64::abs), &to_f64(m.base_weight()).mapv(f64::abs));
        for name in &names {
            let re = Ref::new(&m.to_layer(name).unwrap());
            expected = expected + re.forward(&x64) - &base;
            magnitude = magnitude + re.forward_magnitude(&x64);
        }
        let (y, own) = skinny(|| m.forward(x.view()).unwrap());
        let ctx = format!("{} {active} active adapters", A::NAME);
        assert_eq!(own, simd && active <= ndlora::MAX_SKINNY_ADAPTERS, "{ctx}");
        assert_close(y.view(), &expected, &magnitude, TOL, &ctx);
    }
}

/// s·(X Aᵀ) overflows although the result does not (B's row 0 is zero): the kernel declines,
/// and the gemm applies s to the finished product, so row 0 of the branch adds exactly 0.
fn huge_scaling() {
    let (d, k, r) = (5, 8, 2);
    let mut layer = random_layer::<f32>(d, k, r, 9);
    layer.weight_b_mut().unwrap().row_mut(0).fill(0.0);
    layer.set_scaling(3e38).unwrap();
    let x = Array2::<f32>::from_elem((2, k), 4.0);
    let (y, own) = skinny(|| layer.forward(x.view()).unwrap());
    assert!(!own, "the kernel must decline an overflowing s·(X Aᵀ)");
    let w0 = to_f64(layer.base_weight()).row(0).sum() * 4.0;
    for m in 0..2 {
        assert!(
            (f64::from(y[[m, 0]]) - w0).abs() <= 1e-4 * (1.0 + w0.abs()),
            "{y}"
        );
    }
}

/// s·(X Aᵀ) underflows to a few significant bits (a subnormal s) although the result, scaled
/// up by a huge B, is a normal number: the kernel declines, and the gemm applies s to the
/// finished product, so the branch keeps its precision. W is zero, so the branch is all of
/// Y; the reference forms s·((X Aᵀ) Bᵀ) in f64.
fn tiny_scaling<A: LoraFloat<Factor = A>>(scaling: f64, b_value: f64) {
    let (d, k, r) = (5, 8, 2);
    let mut layer = random_layer::<A>(d, k, r, 9);
    layer.set_scaling(scaling).unwrap();
    let s = A::from_f64_lossy(scaling).into_f64();
    assert!(
        s != 0.0 && s < A::min_positive_value().into_f64(),
        "s must be subnormal"
    );
    let zero = Array2::from_elem((d, k), A::from_f64_lossy(0.0));
    let mut layer = ndlora::LoraLayer::from_parts(
        zero,
        layer.weight_a().to_owned(),
        layer.weight_b().mapv(|_| A::from_f64_lossy(b_value)),
        layer.config().clone(),
    )
    .unwrap();
    layer.set_scaling(scaling).unwrap();
    let x = Array2::from_shape_fn((2, k), |(m, j)| {
        A::from_f64_lossy(1.0 + 0.37 * (m + j) as f64)
    });
    let (y, own) = skinny(|| layer.forward(x.view()).unwrap());
    assert!(!own, "the kernel must decline an underflowing s·(X Aᵀ)");
    let h = matmul_t(&to_f64(x.view()), &to_f64(layer.weight_a()));
    let expected = matmul_t(&h, &to_f64(layer.weight_b())) * s;
    for (got, want) in to_f64(y.view()).iter().zip(expected.iter()) {
        assert!(
            (got - want).abs() <= 1e-5 * want.abs() && want.abs() > 1e-30,
            "{got:e} vs {want:e}"
        );
    }
}

/// Rows of X a multiple of 4 KiB apart (f32 k = 1024 or 2048, f64 k = 512; C, every other
/// row, reversed): the kernel reads a padded copy of X. The result is the reference's and
/// bit for bit the result for the same X stored with a stride that needs no copy.
fn aliasing_row_strides<A: LoraFloat<Factor = A>>() {
    let simd = ndlora::simd_level() != SimdLevel::Scalar;
    let k_aliasing = 4096 / std::mem::size_of::<A>();
    for (k, every_other) in [
        (k_aliasing, false),
        (k_aliasing / 2, true),
        (2 * k_aliasing, false),
    ] {
        let d = 29;
        let layer = random_layer::<A>(d, k, 8, k as u64);
        let reference = Ref::new(&layer);
        for n in [2, 5, ndlora::N_SKINNY] {
            let x: Array2<A> = random(&mut rng(n as u64 + 3), n, k);
            let x64 = to_f64(x.view());
            let expected = reference.forward(&x64);
            let magnitude = reference.forward_magnitude(&x64);
            // The same values with a row stride of k + 1: no copy needed.
            let mut padded = Array2::<A>::zeros((n, k + 1));
            padded.slice_mut(ndarray::s![.., ..k]).assign(&x);
            let (want, own) = skinny(|| layer.forward(padded.slice(ndarray::s![.., ..k])).unwrap());
            let ctx = format!("{} k {k} n {n}", A::NAME);
            assert_eq!(own, simd, "{ctx}");
            assert_close(want.view(), &expected, &magnitude, TOL, &ctx);
            // Every other row of a 2n×(k/2·2) array: rows 2·(k/2) elements apart = 4 KiB.
            let mut doubled = Array2::<A>::zeros((2 * n, k));
            doubled.slice_mut(ndarray::s![..;2, ..]).assign(&x);
            let views = [
                ("C", x.view()),
                ("reversed", x.slice(ndarray::s![..;-1, ..])),
                ("every other row", doubled.slice(ndarray::s![..;2, ..])),
            ];
            for (name, view) in views {
                if every_other && name != "every other row" {
                    continue;
                }
                let (y, own) = skinny(|| layer.forward(view).unwrap());
                assert_eq!(own, simd, "{ctx} {name}");
                let y = if name == "reversed" {
                    y.slice(ndarray::s![..;-1, ..]).to_owned()
                } else {
                    y
                };
                assert_eq!(bits(y.view()), bits(want.view()), "{ctx} {name}");
            }
        }
    }
}

#[test]
fn skinny_forwards() {
    aliasing_row_strides::<f32>();
    aliasing_row_strides::<f64>();
    thread_counts::<f32>();
    thread_counts::<f64>();
    model_adapters::<f32>();
    model_adapters::<f64>();
    huge_scaling();
    tiny_scaling::<f32>(1e-44, 1e37);
    tiny_scaling::<f64>(1e-320, 1e300);
}
