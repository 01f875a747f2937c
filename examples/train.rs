//! Trains a LoRA adapter by plain SGD to learn a low-rank change of a frozen layer.
//!
//! The teacher is W + ΔW with ΔW of rank r; the student is a fresh `LoraLayer` on W (B = 0).
//! Each step draws a random batch X, takes the mean squared error between the student's and
//! the teacher's outputs, and steps A and B along −∇ with `backward` + `sgd_step`.
//!
//! `cargo run --release --example train`

use ndarray::Array2;
use ndlora::{LoraConfig, LoraInit, LoraLayer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The final loss must be below this fraction of the first one.
const TARGET_FRACTION: f64 = 0.01;

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || scale * rng.random_range(-1.0..1.0))
}

fn main() -> ndlora::Result<()> {
    let (d, k, r, n) = (64, 48, 4, 128);
    let (steps, lr) = (1000, 2.0_f32);
    let mut rng = ChaCha8Rng::seed_from_u64(7);

    let w = random(&mut rng, d, k, 0.5);
    // ΔW = B* A*, rank r, entries of order 0.1.
    let delta = random(&mut rng, d, r, 0.4).dot(&random(&mut rng, r, k, 0.4));
    let teacher = &w + &delta;

    let config = LoraConfig {
        rank: r,
        alpha: r as f64, // s = 1
        init: LoraInit::Gaussian,
        ..Default::default()
    };
    let mut student = LoraLayer::new(w, config)?;
    println!("teacher W + ΔW (rank {r}), student LoRA rank {r}, W {d}×{k}, batch {n}, lr {lr}");

    let mut first = None;
    let mut last = 0.0;
    for step in 0..=steps {
        let x = random(&mut rng, n, k, 1.0);
        let target = x.dot(&teacher.t());
        let y = student.forward(x.view())?;
        let diff = &y - &target;
        // L = mean((Y − T)²) over all n·d entries; ∂L/∂Y = 2(Y − T)/(n·d).
        let loss = diff.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / (n * d) as f64;
        let grad_y = diff * (2.0 / (n * d) as f32);
        let grads = student.backward(x.view(), grad_y.view())?;
        student.sgd_step(&grads, lr)?;
        first.get_or_insert(loss);
        last = loss;
        if step % 100 == 0 {
            println!("step {step:4}  loss {loss:.3e}");
        }
    }
    let first = first.expect("at least one step");
    let fraction = last / first;
    println!("final loss {last:.3e} = {fraction:.2e} × initial (target < {TARGET_FRACTION})");
    assert!(
        fraction < TARGET_FRACTION,
        "training did not converge: {fraction:e} ≥ {TARGET_FRACTION}"
    );
    Ok(())
}
