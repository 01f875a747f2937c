//! LoraModel::forward_mixed against what a user would otherwise run for a batch whose rows use
//! different adapters: the naive per-row loop (each row through its own adapter's layer) and
//! per-adapter full forwards (the whole batch through each adapter, keeping its rows).
//!
//! 8 adapters of rank 16 on one 2048×2048 f32 weight, n = 256 rows assigned at random (fixed
//! seed) with about 1/8 of them base-only. Single-threaded (the BLAS is set to one thread).
//! Throughput counts FLOPs of the base product (2·n·d·k) so the rates compare directly.
//! `cargo bench --bench model -- --warm-up-time 1 --measurement-time 3`, then
//! `python3 benches/report.py model` prints the ratios against "naive".

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{s, Array2};
use ndlora::{LoraConfig, LoraLayer, LoraModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;

const ADAPTERS: usize = 8;

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-1.0..1.0))
}

/// Each row through its own adapter's layer (or the base alone), one 1×k forward per row.
fn naive(
    layers: &[LoraLayer<f32>],
    base: &LoraModel<f32>,
    x: &Array2<f32>,
    rows: &[Option<usize>],
) -> Array2<f32> {
    let mut y = Array2::zeros((x.nrows(), base.out_features()));
    for (i, id) in rows.iter().enumerate() {
        let xi = x.slice(s![i..i + 1, ..]);
        let yi = match id {
            Some(j) => layers[*j].forward(xi),
            None => base.forward(xi), // no active adapter: X Wᵀ
        }
        .expect("valid shapes");
        y.slice_mut(s![i..i + 1, ..]).assign(&yi);
    }
    y
}

/// The whole batch through each adapter used (and the base when some row has none), keeping
/// the rows that belong to it.
fn per_adapter(
    layers: &[LoraLayer<f32>],
    base: &LoraModel<f32>,
    x: &Array2<f32>,
    rows: &[Option<usize>],
) -> Array2<f32> {
    let mut y = Array2::zeros((x.nrows(), base.out_features()));
    let mut run = |id: Option<usize>| {
        if !rows.contains(&id) {
            return;
        }
        let full = match id {
            Some(j) => layers[j].forward(x.view()),
            None => base.forward(x.view()),
        }
        .expect("valid shapes");
        for (i, _) in rows.iter().enumerate().filter(|(_, r)| **r == id) {
            y.row_mut(i).assign(&full.row(i));
        }
    };
    run(None);
    for j in 0..layers.len() {
        run(Some(j));
    }
    y
}

fn forward_mixed(c: &mut Criterion) {
    ndlora::set_blas_threads(1);
    // SAFETY: criterion runs benches one after another on this thread; no BLAS call is live.
    if let Some(core) = unsafe { ndlora::use_native_openblas_kernel() } {
        eprintln!("switched OpenBLAS to its {core} kernel");
    }
    eprintln!("backend: {}", ndlora::backend());
    let (n, d, k, r) = (256, 2048, 2048, 16);
    let mut g = ChaCha8Rng::seed_from_u64(11);
    let mut model = LoraModel::new(random(&mut g, d, k)).expect("finite");
    let config = LoraConfig {
        rank: r,
        alpha: 2.0 * r as f64,
        ..Default::default()
    };
    for j in 0..ADAPTERS {
        let (a, b) = (random(&mut g, r, k), random(&mut g, d, r));
        model
            .add_adapter_from_parts(&format!("task{j}"), a, b, config.clone())
            .expect("valid adapter");
    }
    let layers: Vec<LoraLayer<f32>> = model
        .adapter_names()
        .iter()
        .map(|name| model.to_layer(name).expect("unmerged"))
        .collect();
    // Round-robin-ish: a random adapter per row, about 1/8 of the rows base-only.
    let rows: Vec<Option<usize>> = (0..n)
        .map(|_| (!g.random_ratio(1, 8)).then(|| g.random_range(0..ADAPTERS)))
        .collect();
    let x = random(&mut g, n, k);
    let expected = naive(&layers, &model, &x, &rows);
    for got in [
        model.forward_mixed(x.view(), &rows).expect("valid"),
        per_adapter(&layers, &model, &x, &rows),
    ] {
        assert!(got.abs_diff_eq(&expected, 1e-2), "the three agree");
    }

    let mut group = c.benchmark_group(format!("model_forward_mixed_a{ADAPTERS}_d{d}_k{k}_r{r}"));
    group.sample_size(10);
    group.throughput(Throughput::Elements((2 * n * d * k) as u64));
    group.bench_with_input(BenchmarkId::new("naive", n), &x, |bch, x| {
        bch.iter(|| naive(&layers, &model, black_box(x), &rows))
    });
    group.bench_with_input(BenchmarkId::new("per-adapter", n), &x, |bch, x| {
        bch.iter(|| per_adapter(&layers, &model, black_box(x), &rows))
    });
    group.bench_with_input(BenchmarkId::new("mixed", n), &x, |bch, x| {
        bch.iter(|| model.forward_mixed(black_box(x.view()), &rows))
    });
    group.finish();
}

criterion_group!(benches, forward_mixed);
criterion_main!(benches);
