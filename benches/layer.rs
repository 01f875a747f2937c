//! LoraLayer forward, merge and unmerge against the plain operations a user would otherwise
//! run: one bare BLAS gemm X Wᵀ; one pass that reads and writes W (the memory floor of a
//! merge) and the same update as one bare BLAS gemm W ← W + α·B A (what merge ran before the
//! fused kernel, and still runs above `MAX_FUSED_RANK`).
//!
//! Single-threaded (the BLAS is set to one thread), except the `merge2t_*` groups, which run
//! merge, the BLAS update and the read-write pass on two threads. Throughput counts FLOPs of the base
//! product (2·n·d·k) for forwards and elements of W for merge/unmerge, so criterion's
//! rates compare directly within a group. `python3 benches/report.py` prints the ratios.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use ndarray::{Array2, Axis};
use ndlora::{LoraFloat, LoraLayer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;
use std::time::{Duration, Instant};

#[path = "common/baselines.rs"]
mod baselines;
#[path = "common/inputs.rs"]
mod inputs;
use baselines::bare_gemm;
use inputs::{half_layer, random, trained_layer};

fn forward(c: &mut Criterion) {
    ndlora::set_blas_threads(1);
    // SAFETY: criterion runs benches one after another on this thread; no BLAS call is live.
    if let Some(core) = unsafe { ndlora::use_native_openblas_kernel() } {
        eprintln!("switched OpenBLAS to its {core} kernel");
    }
    eprintln!("backend: {}", ndlora::backend());
    for dk in [1024, 4096] {
        for r in [8, 16, 64, 128] {
            let layer = trained_layer::<f32>(dk, dk, r);
            let mut merged = layer.clone();
            merged.merge().expect("finite");
            let w = layer.base_weight().to_owned();
            let mut group = c.benchmark_group(format!("forward_d{dk}_k{dk}_r{r}"));
            group.sample_size(10);
            for n in [1, 32, 256] {
                let x = random(&mut ChaCha8Rng::seed_from_u64(n as u64), n, dk);
                let mut y = Array2::zeros((n, dk));
                group.throughput(Throughput::Elements((2 * n * dk * dk) as u64));
                group.bench_with_input(BenchmarkId::new("bare-gemm", n), &x, |bch, x| {
                    bch.iter(|| bare_gemm(black_box(x), &w, &mut y))
                });
                group.bench_with_input(BenchmarkId::new("unmerged", n), &x, |bch, x| {
                    bch.iter(|| layer.forward_into(black_box(x.view()), y.view_mut()))
                });
                group.bench_with_input(BenchmarkId::new("unmerged-alloc", n), &x, |bch, x| {
                    bch.iter(|| layer.forward(black_box(x.view())))
                });
                group.bench_with_input(BenchmarkId::new("merged", n), &x, |bch, x| {
                    bch.iter(|| merged.forward_into(black_box(x.view()), y.view_mut()))
                });
            }
            group.finish();
        }
    }
}

/// W ← W + α·B A as one bare BLAS gemm with β = 1: what merge cost before the fused kernel.
fn bare_update(alpha: f32, b: &Array2<f32>, a: &Array2<f32>, w: &mut Array2<f32>) {
    #[cfg(ndlora_blas)]
    {
        use cblas_sys::{cblas_sgemm, CblasNoTrans, CblasRowMajor};
        let ((d, r), k) = (b.dim(), a.ncols());
        assert!(a.is_standard_layout() && b.is_standard_layout() && w.is_standard_layout());
        assert_eq!((a.nrows(), w.dim()), (r, (d, k)));
        let i = |v: usize| i32::try_from(v).expect("fits BLAS int");
        // SAFETY: all three arrays are standard (row-major) layout with the asserted shapes,
        // so the leading dimensions r, k, k describe them; w is borrowed mutably, no alias.
        unsafe {
            cblas_sgemm(
                CblasRowMajor,
                CblasNoTrans,
                CblasNoTrans,
                i(d),
                i(k),
                i(r),
                alpha,
                b.as_ptr(),
                i(r),
                a.as_ptr(),
                i(k),
                1.0,
                w.as_mut_ptr(),
                i(k),
            );
        }
    }
    #[cfg(not(ndlora_blas))]
    ndarray::linalg::general_mat_mul(alpha, b, a, 1.0, w);
}

/// Times `timed` only, running `restore` after it outside the clock, so every iteration
/// starts from the same state without cloning W (a 64 MB clone right before a merge would
/// leave dirty cache lines for the merge to write back).
fn time_only<A: LoraFloat>(
    layer: &mut LoraLayer<A>,
    iters: u64,
    timed: fn(&mut LoraLayer<A>) -> ndlora::Result<()>,
    restore: fn(&mut LoraLayer<A>) -> ndlora::Result<()>,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        black_box(timed(layer)).expect("finite");
        total += start.elapsed();
        restore(layer).expect("finite");
    }
    total
}

/// One pass that reads and writes every element of W (the memory-traffic floor of a merge),
/// split into `threads` row bands on scoped threads.
fn rw_pass(w: &mut Array2<f32>, threads: usize) {
    let band = w.nrows().div_ceil(threads);
    std::thread::scope(|scope| {
        for mut rows in w.axis_chunks_iter_mut(Axis(0), band) {
            scope.spawn(move || rows.mapv_inplace(|v| -v));
        }
    });
}

fn merge(c: &mut Criterion) {
    for (threads, sizes, ranks) in [
        (1, &[1024, 4096][..], &[8, 16, 64, 128][..]),
        (2, &[4096][..], &[8, 16][..]),
    ] {
        ndlora::set_blas_threads(threads);
        for &dk in sizes {
            for &r in ranks {
                let mut layer = trained_layer::<f32>(dk, dk, r);
                let name = match threads {
                    1 => format!("merge_d{dk}_k{dk}_r{r}"),
                    t => format!("merge{t}t_d{dk}_k{dk}_r{r}"),
                };
                let mut group = c.benchmark_group(name);
                group.sample_size(10);
                group.throughput(Throughput::Elements((dk * dk) as u64));
                let mut w = layer.base_weight().to_owned();
                group.bench_function("rw-pass", |bch| match threads {
                    1 => bch.iter(|| w.mapv_inplace(|v| -v)),
                    t => bch.iter(|| rw_pass(&mut w, t)),
                });
                // The same update as one BLAS gemm (alternating sign keeps W bounded).
                let (a, b) = (layer.weight_a().to_owned(), layer.weight_b().to_owned());
                let mut sign = 1.0;
                group.bench_function("blas-gemm", |bch| {
                    bch.iter(|| {
                        sign = -sign;
                        bare_update(sign * 2.0, &b, &a, &mut w)
                    })
                });
                group.bench_function("merge", |bch| {
                    bch.iter_custom(|iters| {
                        time_only(&mut layer, iters, LoraLayer::merge, LoraLayer::unmerge)
                    })
                });
                layer.merge().expect("finite");
                group.bench_function("unmerge", |bch| {
                    bch.iter_custom(|iters| {
                        time_only(&mut layer, iters, LoraLayer::unmerge, LoraLayer::merge)
                    })
                });
                group.finish();
            }
        }
    }
}

/// Merge of a 4096² layer, r = 16, one thread, with W in f32, bf16 and f16 (f32 factors):
/// what the half types' fused update costs against the f32 one.
fn merge_half(c: &mut Criterion) {
    ndlora::set_blas_threads(1);
    let (dk, r) = (4096, 16);
    let mut layer = trained_layer::<f32>(dk, dk, r);
    let mut group = c.benchmark_group(format!("merge_half_d{dk}_k{dk}_r{r}"));
    group.sample_size(10);
    group.throughput(Throughput::Elements((dk * dk) as u64));
    let (mut lb, mut lf) = (half_layer::<bf16>(&layer), half_layer::<f16>(&layer));
    group.bench_function("f32", |bch| {
        bch.iter_custom(|iters| time_only(&mut layer, iters, LoraLayer::merge, LoraLayer::unmerge))
    });
    group.bench_function("bf16", |bch| {
        bch.iter_custom(|iters| time_only(&mut lb, iters, LoraLayer::merge, LoraLayer::unmerge))
    });
    group.bench_function("f16", |bch| {
        bch.iter_custom(|iters| time_only(&mut lf, iters, LoraLayer::merge, LoraLayer::unmerge))
    });
    group.finish();
}

criterion_group!(benches, forward, merge, merge_half);
criterion_main!(benches);
