//! The fused merge kernel's promises at the layer level: merge equals `effective_weight` bit
//! for bit whatever W's memory order, and the thread count does not change a single bit.
//! (Its own unit tests in `src/simd/rank_update.rs` check every SIMD width against an f64
//! reference.) A separate test binary, because it changes the process-wide thread count.

mod common;

use std::sync::{Mutex, MutexGuard};

use common::random_layer_with;
use ndarray::{Array2, ShapeBuilder};
use ndlora::{LoraConfig, LoraFloat, LoraLayer, SimdLevel};

/// Serialises the tests that set the process-wide thread count with those that need it to
/// stay put: a merge and its unmerge through BLAS must split the sums alike to round-trip
/// within the bound.
fn thread_count_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn fused() -> bool {
    let level = ndlora::simd_level();
    println!("merge kernel level: {level}");
    level != SimdLevel::Scalar
}

/// `common::random_layer_with` (α = 1.5·r), with W stored column-major when `f_order`.
fn layer<A: LoraFloat<Factor = A>>(
    d: usize,
    k: usize,
    r: usize,
    f_order: bool,
    seed: u64,
) -> LoraLayer<A> {
    let cfg = LoraConfig {
        rank: r,
        alpha: 1.5 * r as f64,
        ..Default::default()
    };
    let l = random_layer_with(d, k, cfg, seed);
    if !f_order {
        return l;
    }
    let mut w = Array2::zeros((d, k).f());
    w.assign(&l.base_weight());
    LoraLayer::from_parts(
        w,
        l.weight_a().to_owned(),
        l.weight_b().to_owned(),
        l.config().clone(),
    )
    .unwrap()
}

fn merged_equals_effective_weight<A: LoraFloat<Factor = A>>() {
    for (d, k) in [(33, 130), (130, 33), (257, 7), (64, 64)] {
        for r in [1, 2, 7, ndlora::MAX_FUSED_RANK.min(d).min(k)] {
            for f_order in [false, true] {
                let mut l = layer::<A>(d, k, r, f_order, (d * k + r) as u64);
                let want = l.effective_weight();
                ndlora::reset_gemm_counters();
                l.merge().unwrap();
                assert_eq!(ndlora::gemm_counters().fused_updates, 1);
                assert!(
                    l.base_weight() == want,
                    "{} d{d} k{k} r{r} f_order {f_order}: merge ≠ effective_weight",
                    A::NAME
                );
            }
        }
    }
}

#[test]
fn merge_equals_effective_weight_bit_for_bit() {
    if !fused() {
        return;
    }
    merged_equals_effective_weight::<f32>();
    merged_equals_effective_weight::<f64>();
}

#[test]
fn thread_count_does_not_change_a_bit() {
    if !fused() {
        return;
    }
    let _lock = thread_count_lock();
    // 1024·1024·16 = 2^24 multiply-adds: large enough to be split over threads.
    let base = layer::<f32>(1024, 1024, 16, false, 5);
    let merged_with = |threads: usize| {
        ndlora::set_blas_threads(threads);
        let mut l = base.clone();
        l.merge().unwrap();
        l.unmerge().unwrap();
        l.merge().unwrap();
        l.base_weight().to_owned()
    };
    let one = merged_with(1);
    for threads in [2, 3, 8] {
        assert!(
            merged_with(threads) == one,
            "{threads} threads differ from one"
        );
    }
    assert!(one != base.base_weight(), "the merge changed W");
}

/// Above `MAX_FUSED_RANK` merge goes through BLAS in bands; the documented round-trip bound
/// (each element moves by at most 2·ε·(|W| + |s·B A|)) must hold there too, whatever the
/// BLAS (reference BLAS adds each of the r terms into C separately with β = 1).
fn gemm_path_round_trip<A: LoraFloat<Factor = A>>() {
    let r = ndlora::MAX_FUSED_RANK + 1;
    let (d, k) = (r + 9, r + 4);
    let mut l = layer::<A>(d, k, r, false, 11);
    let w0 = l.base_weight().to_owned();
    let update = &l.effective_weight() - &w0;
    ndlora::reset_gemm_counters();
    l.merge().unwrap();
    assert_eq!(ndlora::gemm_counters().fused_updates, 0);
    l.unmerge().unwrap();
    let eps = A::epsilon().into_f64();
    for ((idx, w), (w0, u)) in l.base_weight().indexed_iter().zip(w0.iter().zip(&update)) {
        let bound = 2.0 * eps * (w0.into_f64().abs() + u.into_f64().abs()) * 1.01;
        let moved = (w.into_f64() - w0.into_f64()).abs();
        assert!(
            moved <= bound,
            "{} {idx:?}: moved {moved:e} > {bound:e}",
            A::NAME
        );
    }
}

#[test]
fn gemm_path_keeps_the_round_trip_bound() {
    let _lock = thread_count_lock();
    gemm_path_round_trip::<f32>();
    gemm_path_round_trip::<f64>();
}
