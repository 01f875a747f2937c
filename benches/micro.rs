//! MicroLora per-vector forward: every SIMD kernel this CPU runs (`forward_with`, one
//! benchmark id per [`SimdLevel`], e.g. `avx512f` and `avx2+fma` side by side) vs the scalar
//! loop vs the BLAS batch path (`forward_batch`), for H ∈ {256, 1024, 4096} and r ∈ {1, 2}.
//! `MicroLora::forward` dispatches to the level printed at the start.
//!
//! Throughput counts **vectors** (Elements = vectors per iteration: 1 for simd/scalar, the
//! batch size for blas), so criterion's "elem/s" reads as vectors per second and time per
//! element is the per-vector cost in every row.
//!
//! Run: `cargo bench --bench micro -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::Array2;
use ndlora::{MicroLora, SimdLevel};

const DIMS: [usize; 3] = [256, 1024, 4096];
const BATCHES: [usize; 4] = [1, 8, 32, 128];

/// An adapter with non-zero, deterministic weights.
fn adapter(h: usize, rank: usize) -> MicroLora {
    let mut lora = MicroLora::new(h, rank);
    let up = Array2::from_shape_fn((rank, h), |(j, i)| ((i * 7 + j * 3) % 11) as f32 * 0.01);
    let down = lora.get_weights().0.to_owned();
    lora.set_weights(down.view(), up.view()).unwrap();
    lora
}

fn input(n: usize, h: usize) -> Array2<f32> {
    Array2::from_shape_fn((n, h), |(r, i)| {
        ((r * 31 + i * 17) % 101) as f32 / 101.0 - 0.5
    })
}

fn forward(c: &mut Criterion) {
    ndlora::set_blas_threads(1);
    // SAFETY: criterion runs benches one after another on this thread; no BLAS call is live.
    if let Some(core) = unsafe { ndlora::use_native_openblas_kernel() } {
        eprintln!("switched OpenBLAS to its {core} kernel");
    }
    eprintln!(
        "micro bench: simd = {}, backend = {}",
        ndlora::simd_level(),
        ndlora::backend()
    );
    for rank in [1, 2] {
        let mut group = c.benchmark_group(format!("micro_forward_r{rank}"));
        for h in DIMS {
            let lora = adapter(h, rank);
            let x = input(1, h).into_raw_vec_and_offset().0;
            let mut y = vec![0.0_f32; h];
            group.throughput(Throughput::Elements(1));
            let simd_levels = SimdLevel::ALL
                .into_iter()
                .filter(|&l| l != SimdLevel::Scalar && l.is_available());
            for level in simd_levels {
                group.bench_with_input(BenchmarkId::new(level.as_str(), h), &h, |b, _| {
                    b.iter(|| {
                        lora.forward_with(black_box(level), black_box(&x), black_box(&mut y))
                            .unwrap()
                    })
                });
            }
            group.bench_with_input(BenchmarkId::new("scalar", h), &h, |b, _| {
                b.iter(|| lora.forward_scalar(black_box(&x), black_box(&mut y)))
            });
            for n in BATCHES {
                let xs = input(n, h);
                let mut ys = Array2::<f32>::zeros((n, h));
                group.throughput(Throughput::Elements(n as u64));
                group.bench_with_input(
                    BenchmarkId::new("blas", format!("{h}/batch{n}")),
                    &n,
                    |b, _| {
                        b.iter(|| {
                            lora.forward_batch(black_box(xs.view()), black_box(ys.view_mut()))
                                .unwrap()
                        })
                    },
                );
            }
        }
        group.finish();
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
