//! The hot paths do not allocate: `MicroLora::forward`, and `LoraLayer::forward_into_with_scratch`
//! given a large-enough `LoraScratch`. Proven with the counting global allocator of
//! `common::alloc`, whose counter is thread-local, so allocations by the test harness' other
//! threads do not interfere.
//!
//! What it counts: every allocation through Rust's global allocator on this thread. A C BLAS
//! library's internal buffers (OpenBLAS allocates its work areas once, at start-up, with its own
//! allocator) are not Rust allocations; a warm-up call runs before counting anyway.

mod common;

use common::alloc::allocations;
use common::{random, random_layer, rng};
use ndarray::{s, Array2, Axis, ShapeBuilder};
use ndlora::{LoraFloat, LoraLayer, LoraScratch, MicroLora};

#[global_allocator]
static GLOBAL: common::alloc::Counting = common::alloc::Counting;

/// Allocations ndlora itself makes while `f` runs. With a BLAS backend that is every Rust
/// allocation. The pure-Rust fallback (`NDLORA_BLAS=none`) runs each product through
/// matrixmultiply, which allocates its own packing buffer (at most one per gemm call, counted
/// by `ndlora::gemm_counters`): those are subtracted, so the guarantee checked there is that
/// ndlora adds nothing of its own. The allocation-free guarantee is for BLAS builds.
fn own_allocations(f: impl FnOnce()) -> usize {
    own_allocations_and_fallback(f).0
}

/// [`own_allocations`], and whether the fallback's packing buffers were subtracted (then a
/// count of 1 may show as 0).
fn own_allocations_and_fallback(f: impl FnOnce()) -> (usize, bool) {
    let fallback = ndlora::backend().name == "pure-rust";
    ndlora::reset_gemm_counters();
    let n = allocations(f);
    if fallback {
        (
            n.saturating_sub(ndlora::gemm_counters().fallback_calls as usize),
            true,
        )
    } else {
        (n, false)
    }
}

/// Asserts that ndlora made exactly `expected` allocations (at most, on the fallback).
#[track_caller]
fn assert_own(counted: (usize, bool), expected: usize, what: &str) {
    match counted {
        (n, true) => assert!(n <= expected, "{what}: {n} > {expected}"),
        (n, false) => assert_eq!(n, expected, "{what}"),
    }
}

#[test]
fn counter_counts() {
    assert_eq!(allocations(|| drop(std::hint::black_box(vec![1u8; 10]))), 1);
    assert_eq!(allocations(|| {}), 0);
}

/// Allocations of `run` (`MicroLora::forward` or `forward_scalar`), both ranks, lengths 1 to
/// 4099, after a warm-up call to `forward` (which detects and caches the SIMD kernel).
fn micro_allocations(run: fn(&MicroLora, &[f32], &mut [f32]), what: &str) {
    for rank in 1..=2 {
        for h in [1, 7, 16, 33, 257, 4099] {
            let mut lora = MicroLora::new(h, rank);
            let up = Array2::from_shape_fn((rank, h), |(i, j)| ((i * h + j) as f32 * 0.37).sin());
            let down = lora.get_weights().0.to_owned();
            lora.set_weights(down.view(), up.view()).unwrap();
            lora.set_scale(0.8);
            let x: Vec<f32> = (0..h).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut y = vec![0.0_f32; h];
            lora.forward(&x, &mut y); // warm-up
            let n = allocations(|| {
                for _ in 0..100 {
                    run(
                        &lora,
                        std::hint::black_box(&x),
                        std::hint::black_box(&mut y),
                    );
                }
            });
            assert_eq!(n, 0, "{what} allocated (rank {rank}, H {h})");
            assert!(y.iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn micro_forward_does_not_allocate() {
    micro_allocations(MicroLora::forward, "MicroLora::forward");
}

#[test]
fn micro_forward_scalar_does_not_allocate() {
    micro_allocations(MicroLora::forward_scalar, "MicroLora::forward_scalar");
}

/// `common::random_layer`, with a random bias when `bias`.
fn layer<A: LoraFloat>(d: usize, k: usize, r: usize, bias: bool) -> LoraLayer<A> {
    let l = random_layer(d, k, r, (d * k + r) as u64);
    if bias {
        l.with_bias(random(&mut rng(d as u64), 1, d).remove_axis(Axis(0)))
            .unwrap()
    } else {
        l
    }
}

fn scratch_forward<A: LoraFloat>() {
    for (d, k, r, n) in [
        (1, 1, 1, 1),
        (33, 65, 8, 17),
        (130, 64, 16, 130),
        (64, 33, 4, 0),
        // Rows of X 4 KiB apart: the skinny kernel reads a padded copy of X from the scratch.
        (9, 1024, 4, 5),
    ] {
        for bias in [false, true] {
            for merged in [false, true] {
                let mut l = layer::<A>(d, k, r, bias);
                if merged {
                    l.merge().unwrap();
                }
                let mut scratch = LoraScratch::with_capacity(n, r);
                // Row-major, column-major and a sub-view with a leading dimension, for X and Y.
                let x_c = Array2::from_shape_fn((n, k), |(i, j)| {
                    A::from_f64_lossy((i + j) as f64 * 0.01)
                });
                let mut x_f = Array2::zeros((n, k).f());
                x_f.assign(&x_c);
                let mut x_big = Array2::zeros((n + 3, k + 5));
                x_big.slice_mut(s![1..n + 1, 2..k + 2]).assign(&x_c);
                let expected = l.forward(x_c.view()).unwrap();
                let mut y_c = Array2::<A>::zeros((n, d));
                let mut y_f = Array2::<A>::zeros((n, d).f());
                let mut y_big = Array2::<A>::zeros((n + 2, d + 3));
                // Warm-up (BLAS initialisation, lazily-initialised statics).
                l.forward_into_with_scratch(x_c.view(), y_c.view_mut(), &mut scratch)
                    .unwrap();
                let count = own_allocations(|| {
                    for x in [x_c.view(), x_f.view(), x_big.slice(s![1..n + 1, 2..k + 2])] {
                        l.forward_into_with_scratch(x, y_c.view_mut(), &mut scratch)
                            .unwrap();
                        l.forward_into_with_scratch(x, y_f.view_mut(), &mut scratch)
                            .unwrap();
                        l.forward_into_with_scratch(
                            x,
                            y_big.slice_mut(s![..n, 1..d + 1]),
                            &mut scratch,
                        )
                        .unwrap();
                    }
                });
                let ctx = format!(
                    "{} d={d} k={k} r={r} n={n} bias={bias} merged={merged}",
                    A::NAME
                );
                assert_eq!(count, 0, "forward_into_with_scratch allocated: {ctx}");
                // The layouts take different BLAS paths, so compare up to rounding.
                let scale = expected
                    .iter()
                    .fold(1.0_f64, |m, v| m.max(v.into_f64().abs()));
                let tol = 64.0 * (k + r) as f64 * A::epsilon().into_f64() * scale;
                for y in [y_c.view(), y_f.view(), y_big.slice(s![..n, 1..d + 1])] {
                    let worst = y
                        .iter()
                        .zip(&expected)
                        .map(|(a, b)| (a.into_f64() - b.into_f64()).abs())
                        .fold(0.0, f64::max);
                    assert!(worst <= tol, "{ctx}: off by {worst}");
                }
            }
        }
    }
}

#[test]
fn layer_forward_into_with_scratch_does_not_allocate() {
    scratch_forward::<f32>();
    scratch_forward::<f64>();
}

/// Half-precision layers keep their f32 working copies (X widened, the accumulator, a panel
/// of W) in the scratch too: on both sides of the skinny crossover.
#[test]
fn half_forward_into_with_scratch_does_not_allocate() {
    scratch_forward::<ndlora::half::bf16>();
    scratch_forward::<ndlora::half::f16>();
}

#[test]
fn scratch_grows_once_then_is_reused() {
    let l = layer::<f32>(20, 30, 4, false);
    let mut scratch = LoraScratch::new();
    let x = Array2::<f32>::ones((50, 30));
    let mut y = Array2::<f32>::zeros((50, 20));
    l.forward_into_with_scratch(x.view(), y.view_mut(), &mut scratch)
        .unwrap(); // warm-up, grows
    assert_eq!(scratch.capacity(), 50 * 4);
    let n = own_allocations(|| {
        for rows in [50, 1, 10, 50] {
            l.forward_into_with_scratch(
                x.slice(s![..rows, ..]),
                y.slice_mut(s![..rows, ..]),
                &mut scratch,
            )
            .unwrap();
        }
    });
    assert_eq!(n, 0);
    // A bigger batch grows it once (one reallocation), after which it is free again.
    let x = Array2::<f32>::ones((80, 30));
    let mut y = Array2::<f32>::zeros((80, 20));
    assert_own(
        own_allocations_and_fallback(|| {
            l.forward_into_with_scratch(x.view(), y.view_mut(), &mut scratch)
                .unwrap()
        }),
        1,
        "growing the scratch",
    );
    assert_eq!(
        own_allocations(|| l
            .forward_into_with_scratch(x.view(), y.view_mut(), &mut scratch)
            .unwrap()),
        0
    );
}

/// The documented costs of the other paths: `forward_into` allocates its n×r temporary (one
/// allocation); a negative-stride input is copied once for BLAS, and read in place by the
/// skinny kernel (at most `N_SKINNY` rows, a SIMD CPU).
#[test]
fn forward_into_allocates_only_its_temporary() {
    let l = layer::<f64>(20, 30, 4, true);
    for n in [10, ndlora::N_SKINNY + 1] {
        let x = Array2::<f64>::ones((n, 30));
        let mut y = Array2::<f64>::zeros((n, 20));
        l.forward_into(x.view(), y.view_mut()).unwrap();
        assert_own(
            own_allocations_and_fallback(|| l.forward_into(x.view(), y.view_mut()).unwrap()),
            1,
            "forward_into",
        );
        let mut scratch = LoraScratch::with_capacity(n, 4);
        let reversed = x.slice(s![..;-1, ..]);
        let count = own_allocations(|| {
            l.forward_into_with_scratch(reversed, y.view_mut(), &mut scratch)
                .unwrap()
        });
        let skinny = n <= ndlora::N_SKINNY && ndlora::simd_level() != ndlora::SimdLevel::Scalar;
        if ndlora::backend().name == "pure-rust" || skinny {
            assert_eq!(count, 0, "n = {n}: X read in place");
        } else {
            assert_eq!(count, 1, "a BLAS build copies a negative-stride X once");
        }
    }
}
