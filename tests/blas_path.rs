//! Contiguous and leading-dimension layouts reach BLAS without copies; only layouts BLAS
//! cannot describe are copied. Forwards of at most `N_SKINNY` rows run ndlora's own kernel
//! instead, for every layout it reads in place. Set NDLORA_EXPECT_BLAS=1 to also require a
//! BLAS backend.

mod common;

use common::{random, random_layer_with, rng, Laid, Layout};
use ndarray::{s, Array2, ShapeBuilder};
use ndlora::{gemm_counters, reset_gemm_counters, GemmCounters, LoraConfig};

fn blas() -> bool {
    ndlora::backend().name != "pure-rust"
}

/// Counters after running `f` on this thread.
fn counted(f: impl FnOnce()) -> GemmCounters {
    reset_gemm_counters();
    f();
    gemm_counters()
}

fn expect(calls: u64, copies: u64) -> GemmCounters {
    GemmCounters {
        blas_calls: if blas() { calls } else { 0 },
        fallback_calls: if blas() { 0 } else { calls },
        layout_copies: if blas() { copies } else { 0 },
        fused_updates: 0,
        skinny_products: 0,
    }
}

/// The counters of one merge-style update W ← W ± s·B A of rank ≤ `MAX_FUSED_RANK`: the
/// fused SIMD kernel on a SIMD CPU, else one gemm.
fn expect_update() -> GemmCounters {
    if ndlora::simd_level() == ndlora::SimdLevel::Scalar {
        expect(1, 0)
    } else {
        GemmCounters {
            fused_updates: 1,
            ..expect(0, 0)
        }
    }
}

#[test]
fn backend_is_what_ci_expects() {
    let b = ndlora::backend();
    println!("backend: {b}");
    if std::env::var("NDLORA_EXPECT_BLAS").as_deref() == Ok("1") {
        assert_ne!(
            b.name, "pure-rust",
            "this run was supposed to link BLAS: {b}"
        );
        if b.name == "openblas" {
            assert!(b.core.is_some() && b.threads.is_some(), "{b:?}");
        }
    } else if std::env::var("NDLORA_EXPECT_BLAS").as_deref() == Ok("0") {
        assert_eq!(b.name, "pure-rust");
    }
}

#[test]
fn forward_layouts_reach_blas() {
    let cfg = LoraConfig {
        rank: 4,
        ..Default::default()
    };
    let layer = random_layer_with::<f32>(24, 40, cfg, 1);
    let n = ndlora::N_SKINNY + 1;
    let x: Array2<f32> = random(&mut rng(4), n, 40);
    for (layout, copies) in [
        (Layout::C, 0),
        (Layout::F, 0),
        (Layout::RowStrided, 0),
        (Layout::ColStrided, 1),
        (Layout::Reversed, 1),
    ] {
        let laid = Laid::new(&x, layout);
        // X·Wᵀ, X·Aᵀ, (X·Aᵀ)·Bᵀ; a layout BLAS can't read is copied once for both uses.
        let c = counted(|| {
            layer.forward(laid.view()).unwrap();
        });
        assert_eq!(c, expect(3, copies), "{layout:?}");
    }
    // F-order and sub-view outputs are written in place.
    let mut out = Array2::<f32>::zeros((n, 24).f());
    let c = counted(|| layer.forward_into(x.view(), out.view_mut()).unwrap());
    assert_eq!(c, expect(3, 0));
    let mut big = Array2::<f32>::zeros((n + 3, 30));
    let c = counted(|| {
        layer
            .forward_into(x.view(), big.slice_mut(s![1..n + 1, 2..26]))
            .unwrap()
    });
    assert_eq!(c, expect(3, 0));
    // An output with no BLAS layout is computed in a copy (once per gemm writing it).
    let mut big = Array2::<f32>::zeros((n, 48));
    let c = counted(|| {
        layer
            .forward_into(x.view(), big.slice_mut(s![.., ..;2]))
            .unwrap()
    });
    assert_eq!(c, expect(3, 2));
}

/// A forward of at most `N_SKINNY` rows is one run of the skinny kernel (bias and branch
/// included) on a SIMD CPU, for X with unit column stride (any row stride, reversed rows
/// too) and any output layout; a column-major or doubly-strided X takes the gemms.
#[test]
fn few_rows_run_the_skinny_kernel() {
    let simd = ndlora::simd_level() != ndlora::SimdLevel::Scalar;
    let skinny = GemmCounters {
        skinny_products: 1,
        ..expect(0, 0)
    };
    let cfg = LoraConfig {
        rank: 4,
        ..Default::default()
    };
    let mut layer = random_layer_with::<f32>(24, 40, cfg, 1);
    for merged in [false, true] {
        if merged {
            layer.merge().unwrap();
        }
        let gemms = if merged { 1 } else { 3 };
        for n in [1, 5, ndlora::N_SKINNY] {
            let x: Array2<f32> = random(&mut rng(4), n, 40);
            for (layout, in_place) in [
                (Layout::C, true),
                (Layout::RowStrided, true),
                (Layout::Reversed, true),
                (Layout::F, false),
                (Layout::ColStrided, false),
            ] {
                let laid = Laid::new(&x, layout);
                let c = counted(|| {
                    layer.forward(laid.view()).unwrap();
                });
                let ctx = format!("{layout:?} n {n} merged {merged}");
                if simd && (in_place || (layout == Layout::F && n == 1)) {
                    assert_eq!(c, skinny, "{ctx}");
                } else {
                    let copies = u64::from(layout == Layout::ColStrided && n > 1);
                    assert_eq!(c, expect(gemms, copies), "{ctx}");
                }
            }
            let mut big = Array2::<f32>::zeros((n, 48));
            let c = counted(|| {
                layer
                    .forward_into(x.view(), big.slice_mut(s![.., ..;2]))
                    .unwrap()
            });
            if simd {
                assert_eq!(c, skinny, "doubly-strided out, n {n}");
            }
        }
    }
}

#[test]
fn merge_unmerge_are_one_update_each() {
    let cfg = LoraConfig {
        rank: 3,
        ..Default::default()
    };
    let mut layer = random_layer_with::<f64>(33, 17, cfg, 2);
    assert_eq!(counted(|| layer.merge().unwrap()), expect_update());
    assert_eq!(counted(|| layer.unmerge().unwrap()), expect_update());
    assert_eq!(
        counted(|| {
            layer.effective_weight();
        }),
        expect_update()
    );
}

#[test]
fn merge_above_the_fused_rank_is_one_gemm() {
    let r = ndlora::MAX_FUSED_RANK + 1;
    let cfg = LoraConfig {
        rank: r,
        ..Default::default()
    };
    let mut layer = random_layer_with::<f32>(r + 2, r + 5, cfg, 3);
    assert_eq!(counted(|| layer.merge().unwrap()), expect(1, 0));
}
