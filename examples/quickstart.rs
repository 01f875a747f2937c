//! The README's main command: build a LoRA layer, run a batched forward, merge, check that
//! the merged forward matches, and time the operations against a bare gemm.
//!
//! `cargo run --release --example quickstart`

use std::time::{Duration, Instant};

use ndarray::Array2;
use ndlora::{LearningSignal, LoraConfig, LoraInit, LoraLayer, MicroLora};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-1.0..1.0))
}

/// Median wall time of `runs` calls.
fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn main() -> ndlora::Result<()> {
    let (d, k, r, n) = (2048, 2048, 16, 128);
    println!("ndlora quickstart: W {d}×{k}, rank {r}, batch X {n}×{k}, f32");
    println!("backend: {}", ndlora::backend());
    if std::env::var_os("NDLORA_KEEP_OPENBLAS_KERNEL").is_none() {
        // SAFETY: start of a single-threaded program; nothing else calls BLAS yet.
        if let Some(core) = unsafe { ndlora::use_native_openblas_kernel() } {
            println!("switched OpenBLAS to its {core} kernel (NDLORA_KEEP_OPENBLAS_KERNEL=1 keeps the old one)");
        }
    }

    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let config = LoraConfig {
        rank: r,
        alpha: 32.0,
        init: LoraInit::KaimingUniform,
        ..Default::default()
    };
    let mut layer = LoraLayer::new(random(&mut rng, d, k), config)?;
    // A fresh adapter has B = 0; give it trained-looking values so the update matters.
    layer
        .weight_b_mut()?
        .assign(&(random(&mut rng, d, r) * 0.05));
    println!(
        "trainable params {} of {} ({:.2}%), scaling s = {}",
        layer.trainable_params(),
        layer.total_params(),
        100.0 * layer.compression_ratio(),
        layer.scaling()
    );

    let x = random(&mut rng, n, k);
    let y = layer.forward(x.view())?;
    let frozen = x.dot(&layer.base_weight().t());
    let update_norm = (&y - &frozen).mapv(|v| v * v).sum().sqrt();

    let mut merged = layer.clone();
    merged.merge()?;
    let y_merged = merged.forward(x.view())?;
    let max_diff = (&y - &y_merged).iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let max_y = y.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    println!("‖Y − X Wᵀ‖ = {update_norm:.3} (the adapter's contribution)");
    println!("merged vs unmerged forward: max |diff| = {max_diff:.2e} (max |Y| = {max_y:.1})");
    assert!(
        max_diff <= 1e-4 * max_y,
        "merged forward disagrees with unmerged forward"
    );
    merged.unmerge()?;
    let w_err = (&merged.base_weight() - &layer.base_weight())
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    println!("merge → unmerge restores W to within {w_err:.2e}");

    let runs = 15;
    let mut out = Array2::zeros((n, d));
    let bare = time(runs, || x.dot(&layer.base_weight().t()));
    let unmerged = time(runs, || layer.forward_into(x.view(), out.view_mut()));
    let mut cycle = layer.clone();
    let merge_unmerge = time(runs, || {
        cycle.merge()?;
        cycle.unmerge()
    });
    merged.merge()?;
    let merged_forward = time(runs, || merged.forward_into(x.view(), out.view_mut()));

    let ms = |t: Duration| t.as_secs_f64() * 1e3;
    println!(
        "\n{:<34} {:>10} {:>8}",
        "operation (median of 15)", "ms", "ratio"
    );
    println!(
        "{:<34} {:>10.3} {:>8}",
        "X Wᵀ via ndarray dot (reference)",
        ms(bare),
        "1.00"
    );
    for (name, t) in [
        ("unmerged forward_into", unmerged),
        ("merged forward_into", merged_forward),
        ("merge + unmerge (one cycle)", merge_unmerge),
    ] {
        println!("{:<34} {:>10.3} {:>8.2}", name, ms(t), ms(t) / ms(bare));
    }
    println!("(ndarray's dot here is its pure-Rust gemm; `cargo bench` compares against BLAS)");

    micro_adapter()
}

/// A per-request rank-2 adapter: SIMD forward, one online learning step.
fn micro_adapter() -> ndlora::Result<()> {
    let h = 1024;
    let mut micro = MicroLora::new(h, 2);
    let x: Vec<f32> = (0..h).map(|i| (i as f32 * 0.01).sin()).collect();
    let g: Vec<f32> = (0..h).map(|i| (i as f32 * 0.03).cos()).collect();
    let along_g = |m: &MicroLora| {
        let mut y = vec![0.0f32; h];
        m.forward(&x, &mut y);
        y.iter().zip(&g).map(|(y, g)| y * g).sum::<f32>()
    };
    let before = along_g(&micro);
    micro.accumulate_gradient(&LearningSignal::with_gradient(x.clone(), g.clone(), 1.0))?;
    micro.apply_accumulated(0.05);
    let after = along_g(&micro);
    assert!(
        after > before,
        "one learning step must move the output along g"
    );

    let mut y = vec![0.0f32; h];
    let reps = 20_000;
    let start = Instant::now();
    for _ in 0..reps {
        micro.forward(std::hint::black_box(&x), &mut y);
    }
    let simd = start.elapsed().as_secs_f64() * 1e9 / reps as f64;
    let start = Instant::now();
    for _ in 0..reps {
        micro.forward_scalar(std::hint::black_box(&x), &mut y);
    }
    let scalar = start.elapsed().as_secs_f64() * 1e9 / reps as f64;
    std::hint::black_box(&y);
    println!(
        "\nMicroLora H = {h}, rank 2, kernel {}: ⟨g, y(x)⟩ {before:.3e} → {after:.3e} after one step",
        ndlora::simd_level()
    );
    println!("per-vector forward: {simd:.0} ns SIMD vs {scalar:.0} ns scalar");
    Ok(())
}
