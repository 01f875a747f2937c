//! Decode-shaped forwards: a handful of rows (n = 1: one token) through a large W, where a
//! forward should cost one read of W. `LoraLayer::forward_into_with_scratch` (unmerged,
//! d = k = 4096, r = 16, f32; ndlora's skinny kernel for n ≤ `N_SKINNY`, the gemms above)
//! against what a user would otherwise run: `blas-gemv` (one `cblas_sgemv` per row, n ≤ 8),
//! `blas-gemm` (one bare `cblas_sgemm` of X Wᵀ, no LoRA branch) and `stream-read` (one
//! streaming read of W: the memory floor). One group per n.
//!
//! In the groups for n ∈ {1, 8, 32, 256}, the same forward of the layer with W (and X, Y)
//! in `bf16` and `f16` (factors f32): `ndlora-bf16`, `ndlora-f16`, beside `ndlora` (f32).
//!
//! Then f64, d = k = 512, r = 8, n ∈ {8, 32, 64}: the forward against a bare `cblas_dgemm`.
//!
//! One thread (`ndlora::set_blas_threads(1)`). Throughput: bytes of W for the f32 groups
//! (so criterion prints the rate at which each reads W), FLOPs of the base product
//! (2·n·d·k) for the f64 groups. `python3 benches/report.py decode` prints the ratios.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use ndarray::Array2;
use ndlora::LoraScratch;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;

#[path = "common/baselines.rs"]
mod baselines;
#[path = "common/inputs.rs"]
mod inputs;
use baselines::{bare_gemm, bare_gemv, stream_read};
use inputs::{half_layer, random, to_half, trained_layer};

fn setup() {
    ndlora::set_blas_threads(1);
    // SAFETY: criterion runs benches one after another on this thread; no BLAS call is live.
    if let Some(core) = unsafe { ndlora::use_native_openblas_kernel() } {
        eprintln!("switched OpenBLAS to its {core} kernel");
    }
    eprintln!(
        "backend: {}; simd: {}; N_SKINNY = {}",
        ndlora::backend(),
        ndlora::simd_level(),
        ndlora::N_SKINNY
    );
}

fn decode_f32(c: &mut Criterion) {
    setup();
    let (dk, r) = (4096, 16);
    let layer = trained_layer::<f32>(dk, dk, r);
    let w = layer.base_weight().to_owned();
    let w_slice = w.as_slice().expect("standard layout");
    let (layer_bf16, layer_f16) = (half_layer::<bf16>(&layer), half_layer::<f16>(&layer));
    let mut scratch = LoraScratch::with_capacity(256, r);
    for n in [1, 2, 4, 8, 16, 32, 48, 64, 256] {
        let x = random::<f32>(&mut ChaCha8Rng::seed_from_u64(n as u64), n, dk);
        let mut y = Array2::zeros((n, dk));
        let mut group = c.benchmark_group(format!("decode_n{n}"));
        group.sample_size(10);
        group.throughput(Throughput::Bytes((dk * dk * 4) as u64));
        group.bench_function(BenchmarkId::new("ndlora", n), |bch| {
            bch.iter(|| {
                layer
                    .forward_into_with_scratch(black_box(x.view()), y.view_mut(), &mut scratch)
                    .expect("shapes match")
            })
        });
        if [1, 8, 32, 48, 64, 256].contains(&n) {
            let (x_bf16, x_f16) = (to_half::<bf16>(&x), to_half::<f16>(&x));
            let mut y_bf16 = Array2::<bf16>::zeros((n, dk));
            let mut y_f16 = Array2::<f16>::zeros((n, dk));
            group.bench_function(BenchmarkId::new("ndlora-bf16", n), |bch| {
                bch.iter(|| {
                    layer_bf16
                        .forward_into(black_box(x_bf16.view()), y_bf16.view_mut())
                        .expect("shapes match")
                })
            });
            group.bench_function(BenchmarkId::new("ndlora-f16", n), |bch| {
                bch.iter(|| {
                    layer_f16
                        .forward_into(black_box(x_f16.view()), y_f16.view_mut())
                        .expect("shapes match")
                })
            });
        }
        if n <= 8 {
            group.bench_function(BenchmarkId::new("blas-gemv", n), |bch| {
                bch.iter(|| {
                    for (x, y) in x.rows().into_iter().zip(y.rows_mut()) {
                        bare_gemv(w.view(), black_box(x), y);
                    }
                })
            });
        }
        group.bench_function(BenchmarkId::new("blas-gemm", n), |bch| {
            bch.iter(|| bare_gemm(black_box(&x), &w, &mut y))
        });
        group.bench_function(BenchmarkId::new("stream-read", n), |bch| {
            bch.iter(|| stream_read(black_box(w_slice)))
        });
        group.finish();
    }
}

fn decode_f64(c: &mut Criterion) {
    setup();
    let (dk, r) = (512, 8);
    let layer = trained_layer::<f64>(dk, dk, r);
    let w = layer.base_weight().to_owned();
    let mut scratch = LoraScratch::with_capacity(64, r);
    let mut group = c.benchmark_group(format!("decode_f64_d{dk}_r{r}"));
    group.sample_size(20);
    for n in [8, 32, 64] {
        let x = random::<f64>(&mut ChaCha8Rng::seed_from_u64(n as u64), n, dk);
        let mut y = Array2::zeros((n, dk));
        group.throughput(Throughput::Elements((2 * n * dk * dk) as u64));
        group.bench_function(BenchmarkId::new("ndlora", n), |bch| {
            bch.iter(|| {
                layer
                    .forward_into_with_scratch(black_box(x.view()), y.view_mut(), &mut scratch)
                    .expect("shapes match")
            })
        });
        group.bench_function(BenchmarkId::new("blas-gemm", n), |bch| {
            bch.iter(|| bare_gemm(black_box(&x), &w, &mut y))
        });
    }
    group.finish();
}

criterion_group!(benches, decode_f32, decode_f64);
criterion_main!(benches);
