//! One shared value, many threads: the `&self` forwards are thread-safe and give bit-identical
//! results to a single-threaded run.

mod common;

use common::{bits, random, random_layer_with, rng};
use half::{bf16, f16};
use ndarray::{Array2, Axis};
use ndlora::peft::PeftAdapter;
use ndlora::{LoraConfig, LoraFloat, LoraLayer, LoraModel, LoraScratch, MicroLora};
use rayon::prelude::*;

/// Compile-time: the public types can be shared between and moved across threads.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<LoraLayer<f32>>();
    send_sync::<LoraLayer<f64>>();
    send_sync::<LoraModel<f32>>();
    send_sync::<LoraModel<f64>>();
    send_sync::<LoraLayer<bf16>>();
    send_sync::<LoraLayer<f16>>();
    send_sync::<LoraModel<bf16>>();
    send_sync::<LoraModel<f16>>();
    send_sync::<PeftAdapter<bf16>>();
    send_sync::<PeftAdapter<f16>>();
    send_sync::<MicroLora>();
    send_sync::<PeftAdapter<f32>>();
    send_sync::<PeftAdapter<f64>>();
    send_sync::<LoraScratch<f32>>();
    send_sync::<ndlora::LoraError>();
};

const THREADS: usize = 8;
const ROUNDS: usize = 64;

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build()
        .unwrap()
}

/// The BLAS library is pinned to one thread for these tests. A multi-threaded OpenBLAS splits
/// a product between its own threads by the size of the problem only, so results would still
/// be identical; but several callers at once make it queue on its thread server and it may
/// then run a call on the caller's thread alone, which the documented guarantee should not
/// have to depend on. With one BLAS thread each call runs the same kernel sequence whichever
/// Rust thread makes it.
fn single_blas_thread() {
    ndlora::set_blas_threads(1);
}

fn layer_forward<A: LoraFloat>() {
    let (d, k, r) = (65, 130, 8);
    let config = LoraConfig {
        rank: r,
        alpha: 5.0,
        ..Default::default()
    };
    let layer = random_layer_with::<A>(d, k, config, 21);
    let mut g = rng(24);
    let mut merged = layer.clone();
    merged.merge().unwrap();
    // Inputs of several batch sizes, one per task: every fourth above `N_SKINNY`, so the
    // gemm path (for the half types, W widened panel by panel) is shared too.
    let inputs: Vec<Array2<A>> = (0..ROUNDS)
        .map(|i| {
            let n = if i % 4 == 3 {
                ndlora::N_SKINNY + 1 + i
            } else {
                1 + i % 17
            };
            random(&mut g, n, k)
        })
        .collect();
    for l in [&layer, &merged] {
        let expected: Vec<String> = inputs
            .iter()
            .map(|x| bits(l.forward(x.view()).unwrap().view()))
            .collect();
        let got: Vec<(String, String)> = pool().install(|| {
            inputs
                .par_iter()
                .map_init(LoraScratch::new, |scratch, x| {
                    let y = l.forward(x.view()).unwrap();
                    let mut y2 = Array2::zeros((x.nrows(), d));
                    l.forward_into_with_scratch(x.view(), y2.view_mut(), scratch)
                        .unwrap();
                    (bits(y.view()), bits(y2.view()))
                })
                .collect()
        });
        for (i, (y, y2)) in got.iter().enumerate() {
            assert_eq!(y, &expected[i], "{} forward, input {i}", A::NAME);
            assert_eq!(
                y2,
                &expected[i],
                "{} forward_into_with_scratch, input {i}",
                A::NAME
            );
        }
    }
}

#[test]
fn layer_forward_is_bit_identical_across_threads_f32() {
    single_blas_thread();
    layer_forward::<f32>();
}

#[test]
fn layer_forward_is_bit_identical_across_threads_f64() {
    single_blas_thread();
    layer_forward::<f64>();
}

#[test]
fn layer_forward_is_bit_identical_across_threads_bf16() {
    single_blas_thread();
    layer_forward::<bf16>();
}

#[test]
fn layer_forward_is_bit_identical_across_threads_f16() {
    single_blas_thread();
    layer_forward::<f16>();
}

fn model_forward_mixed<A: LoraFloat>() {
    let mut g = rng(22);
    let (d, k) = (40, 33);
    let mut model = LoraModel::<A>::new(random(&mut g, d, k)).unwrap();
    let cfg = |rank| LoraConfig {
        rank,
        alpha: 3.0,
        ..Default::default()
    };
    let ids: Vec<usize> = (0..3)
        .map(|j| {
            let r = 1 + 3 * j;
            model
                .add_adapter_from_parts(
                    &format!("a{j}"),
                    random(&mut g, r, k),
                    random(&mut g, d, r),
                    cfg(r),
                )
                .unwrap()
        })
        .collect();
    let batches: Vec<(Array2<A>, Vec<Option<usize>>)> = (0..ROUNDS)
        .map(|i| {
            let n = 1 + i % 23;
            let rows = (0..n)
                .map(|row| {
                    if (row + i) % 4 == 3 {
                        None
                    } else {
                        Some(ids[(row * 7 + i) % 3])
                    }
                })
                .collect();
            (random(&mut g, n, k), rows)
        })
        .collect();
    let forward_bits = |(x, rows): &(Array2<A>, Vec<Option<usize>>)| {
        bits(model.forward_mixed(x.view(), rows).unwrap().view())
    };
    let expected: Vec<String> = batches.iter().map(forward_bits).collect();
    let got: Vec<String> = pool().install(|| batches.par_iter().map(forward_bits).collect());
    assert_eq!(got, expected, "{}", A::NAME);
}

#[test]
fn model_forward_mixed_is_bit_identical_across_threads_f32() {
    single_blas_thread();
    model_forward_mixed::<f32>();
}

#[test]
fn model_forward_mixed_is_bit_identical_across_threads_bf16() {
    single_blas_thread();
    model_forward_mixed::<bf16>();
}

#[test]
fn micro_forward_is_bit_identical_across_threads() {
    let h = 257;
    let mut lora = MicroLora::new(h, 2);
    let mut g = rng(23);
    let (down, up) = (random::<f32>(&mut g, 2, h), random::<f32>(&mut g, 2, h));
    lora.set_weights(down.view(), up.view()).unwrap();
    let inputs = random::<f32>(&mut g, ROUNDS, h);
    let run = |x: ndarray::ArrayView1<'_, f32>| {
        let mut y = vec![0.5_f32; h];
        lora.forward(x.as_slice().unwrap(), &mut y);
        y.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    };
    let expected: Vec<Vec<u32>> = inputs.axis_iter(Axis(0)).map(run).collect();
    let rows: Vec<_> = inputs.axis_iter(Axis(0)).collect();
    for _ in 0..4 {
        let got: Vec<Vec<u32>> = pool().install(|| rows.par_iter().map(|x| run(*x)).collect());
        assert_eq!(got, expected);
    }
}
