//! # ndlora — low-rank adaptation (LoRA) of linear layers on ndarray + BLAS
//!
//! Wrap a frozen weight matrix with a trainable low-rank update, run batched forwards through
//! BLAS gemm, merge and unmerge, in `f32`, `f64`, `half::bf16` and `half::f16`.
//!
//! ## Shapes and math (PyTorch / PEFT conventions, used everywhere)
//!
//! | symbol | shape | meaning |
//! |---|---|---|
//! | W | d×k (out×in) | frozen base weight |
//! | A | r×k | down-projection factor |
//! | B | d×r | up-projection factor (starts at 0) |
//! | X | n×k | a batch of n input rows |
//! | Y | n×d | output |
//!
//! * forward: **Y = X Wᵀ + s·(X Aᵀ) Bᵀ**, with s = α/r (or α/√r with rsLoRA)
//! * merge: **W ← W + s·B A**, unmerge: **W ← W − s·B A**; while merged, Y = X Wᵀ
//! * with the base layer's bias b (length d, [`LoraLayer::with_bias`]): Y = X Wᵀ + b + s·(X Aᵀ) Bᵀ,
//!   b added to every row; merge and unmerge leave b alone
//! * [`peft`]: Hugging Face PEFT adapter directories (`adapter_config.json` +
//!   `adapter_model.safetensors`) in and out, with PEFT's numbers
//!
//! ## Half precision
//!
//! `LoraLayer<bf16>` and `LoraLayer<f16>` (and [`LoraModel`]) hold W, the bias, X and Y in
//! the half type and the factors A, B in `f32` ([`LoraFloat::Factor`]), as PEFT does on a
//! bf16/f16 model (`autocast_adapter_dtype=True`). A 4096² bf16 layer holds 32 MiB of W.
//! Every product accumulates in f32, and the rounding is PyTorch + PEFT's on CPU:
//!
//! * forward: Y = H( f32(H(X Wᵀ + b)) + s·(f32(X) Aᵀ) Bᵀ ) — the base output rounded to the
//!   half type H first, the LoRA term added in f32, rounded again (PEFT's fixtures agree to
//!   ≤ 1 ulp of H, `tests/half.rs`);
//! * merge: W ← H( f32(W) + s·(B A) ), ΔW in f32, one rounding (PEFT's `merge_and_unload`
//!   agrees bit for bit on its fixtures); unmerge the same with −ΔW. A merge → unmerge round
//!   trip moves each element by at most 2 ulps of H at max(|W|, |W + ΔW|) (two roundings at
//!   8 or 11 bits), far more than in f32: [`LoraLayer::merge_exact`] keeps its bit-exact
//!   promise by keeping the copy;
//! * gradients ([`LoraLayer::backward`]) are f32, of the layer with W and X widened exactly.
//!
//! ```
//! use half::bf16;
//! use ndarray::Array2;
//! use ndlora::{LoraConfig, LoraLayer};
//!
//! let w = Array2::from_elem((64, 128), bf16::from_f32(0.5));
//! let mut layer = LoraLayer::new(w, LoraConfig { rank: 4, ..Default::default() })?;
//! layer.weight_b_mut()?.fill(0.01); // f32 factors
//! let y = layer.forward(Array2::from_elem((2, 128), bf16::ONE).view())?; // 2×64, bf16
//! assert_eq!(y.dim(), (2, 64));
//! layer.merge()?;
//! # Ok::<(), ndlora::LoraError>(())
//! ```
//!
//! ## Design
//!
//! * How a matrix product runs is decided in one place (`src/matmul.rs`), by shape. A
//!   forward of at most [`N_SKINNY`] rows (n = 1: one token of a decoder) runs ndlora's own
//!   skinny kernel (`src/simd/decode.rs`): it reads W once for the whole batch, folds the bias
//!   and the LoRA branch into the same pass (C = s·X Aᵀ, n×r, is formed first with the same
//!   kernel) and writes Y once, where a BLAS gemm with M = n packs and runs a micro-kernel
//!   built for large M (for n = 1, 3× a read of W). Its bands of W's rows split over
//!   [`set_blas_threads`] threads with the same bits for any count. Larger batches go to
//!   `cblas_?gemm`: any row- or column-major view (including sub-views with a leading
//!   dimension) with the right transpose flag, and only views BLAS cannot describe (negative
//!   or doubly-strided ones) are copied, once per forward. That unmerged forward is X Wᵀ, then
//!   X Aᵀ (n×r) and a β = 1 update s·(X Aᵀ) Bᵀ into Y, so it costs the base product plus
//!   O(n·r·(d + k)). [`LoraLayer`] and each adapter of a [`LoraModel`] share that LoRA
//!   branch.
//! * Merge is one rank-r update W ← W + s·B A into W, with no d×k temporary. For
//!   r ≤ [`MAX_FUSED_RANK`] on a CPU with AVX2+FMA, AVX-512F or NEON it runs a fused,
//!   register-tiled SIMD kernel (`src/simd/rank_update.rs`) that streams W once, because a
//!   BLAS gemm with K = r runs far below its peak (the README's *Performance* section has the
//!   measured ratios, per CPU). Otherwise merge runs BLAS gemm into a band-sized temporary and
//!   adds it, so that the rounding bound holds whatever the BLAS. Large updates split W's rows
//!   over [`set_blas_threads`] threads; a thread that cannot be started leaves its rows to the
//!   calling thread, so a merge always completes, with the same bits.
//! * Merge never writes a non-finite value into W: a cached bound on max|W| proves the result
//!   finite in O(r·(d + k)); only near overflow is the update evaluated block by block first.
//! * Fallible operations validate everything before they mutate, so an error leaves the
//!   value as it was (`tests/hostile/` checks this bit for bit over a catalogue of hostile
//!   inputs).
//! * [`LoraLayer::backward`] returns ∂L/∂A, ∂L/∂B and ∂L/∂X in six gemms. [`LoraModel`] keeps
//!   several named adapters on one W; its mixed-batch forward runs one base gemm for the whole
//!   batch plus one thin gemm pair per adapter over that adapter's rows (strided views, no copy,
//!   when the rows are evenly spaced).
//!
//! ## Per-request micro-adapters
//!
//! [`MicroLora`] is a square rank-1 or rank-2 adapter on vectors of length H, for serving
//! loops: `forward` adds s·Uᵀ (D x) into an output slice with a hand-vectorised kernel
//! (AVX-512F, AVX2+FMA or NEON, picked once at run time; [`simd_level`] says which), without
//! allocating, and learns online from [`LearningSignal`]s (gradient ascent on q·⟨g, y(x)⟩,
//! both factors trained). `forward_batch` runs many vectors through the gemm entry point.
//!
//! ## Threads
//!
//! [`LoraLayer`], [`LoraModel`], [`MicroLora`] and [`peft::PeftAdapter`] are `Send + Sync`,
//! and everything that computes an output takes `&self`, so one value can serve many threads
//! (e.g. behind an `Arc`) with results bit-identical to a single-threaded run
//! (`tests/concurrency.rs`):
//!
//! * `&self`: `LoraLayer::{forward, forward_into, forward_into_with_scratch, backward,
//!   effective_weight}` (the scratch is `&mut`, so keep one [`LoraScratch`] per thread),
//!   `LoraModel::{forward, forward_mixed, to_layer}`, `MicroLora::{forward, forward_with,
//!   forward_batch}`, `PeftAdapter::{to_layer, factors, save}`;
//! * `&mut self` (wrap in a lock to share): `LoraLayer::{forward_train, merge, merge_exact,
//!   unmerge, sgd_step, set_scaling, set_bias, weight_a_mut, weight_b_mut}`,
//!   `LoraModel::{add_adapter*, remove_adapter, set_active, merge*, unmerge*, weight_*_mut}`,
//!   `MicroLora::{accumulate_gradient*, apply_accumulated, try_apply_accumulated,
//!   set_weights, set_scale, reset}`.
//!
//! ## Allocation
//!
//! [`MicroLora::forward`] and [`LoraLayer::forward_into_with_scratch`] (given a
//! [`LoraScratch`] that is large enough, and inputs/outputs in a row- or column-major layout)
//! never allocate with a BLAS backend; `tests/alloc.rs` proves it with a counting global
//! allocator. (The pure-Rust fallback's matrixmultiply allocates a packing buffer per product;
//! ndlora itself adds none.) The other methods allocate their results and small temporaries.
//!
//! ## Backends
//!
//! `build.rs` picks the BLAS: one of the cargo features `openblas`, `openblas-static`, `blis`,
//! `netlib`, `intel-mkl`, `accelerate`; else a system OpenBLAS if one is installed; else a
//! pure-Rust fallback (ndarray's `general_mat_mul`). `NDLORA_BLAS=none|openblas|…` forces a
//! choice. [`backend()`] reports what was linked and warns when OpenBLAS runs a generic
//! kernel on a CPU with AVX2/AVX-512.
//!
//! ## Example
//!
//! ```
//! use ndarray::Array2;
//! use ndlora::{LoraConfig, LoraLayer};
//!
//! let (d, k, n) = (32, 48, 5);
//! let w = Array2::<f32>::from_shape_fn((d, k), |(i, j)| ((i * k + j) as f32 * 0.37).sin());
//! let mut layer = LoraLayer::new(w, LoraConfig { rank: 4, alpha: 8.0, ..Default::default() })?;
//! layer.weight_b_mut()?.fill(0.01); // stands in for training
//!
//! let x = Array2::<f32>::from_shape_fn((n, k), |(i, j)| (i + j) as f32 / 10.0);
//! let y = layer.forward(x.view())?;
//! assert_eq!(y.dim(), (n, d));
//!
//! layer.merge()?;
//! let y_merged = layer.forward(x.view())?;
//! assert!(y.abs_diff_eq(&y_merged, 1e-4));
//! layer.unmerge()?;
//! # Ok::<(), ndlora::LoraError>(())
//! ```
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod checkpoint;
pub mod peft;

// A BLAS chosen by cargo feature comes through blas-src; naming the crate keeps it (and the
// library it links) in the final link, since nothing else refers to it by name.
#[cfg(any(
    feature = "openblas",
    feature = "openblas-static",
    feature = "blis",
    feature = "netlib",
    feature = "intel-mkl",
    feature = "accelerate"
))]
extern crate blas_src;

mod aligned;
mod backend;
mod blas;
mod check;
mod config;
mod error;
mod factors;
mod float;
mod layer;
mod matmul;
mod merge;
mod micro;
mod model;
mod scratch;
mod simd;
mod train;
mod update;
mod widened;

pub use backend::{backend, max_threads, set_blas_threads, use_native_openblas_kernel, Backend};
pub use blas::{gemm_counters, reset_gemm_counters, GemmCounters};
pub use config::{LoraConfig, LoraInit};
pub use error::{LoraError, Result};
pub use float::LoraFloat;
/// The `half` crate, whose `bf16` and `f16` are element types of [`LoraLayer`].
pub use half;
pub use layer::LoraLayer;
pub use matmul::{MAX_SKINNY_ADAPTERS, N_SKINNY, N_SKINNY_HALF};
pub use micro::{LearningSignal, MicroLora};
pub use model::LoraModel;
pub use scratch::LoraScratch;
pub use simd::rank_update::MAX_FUSED_RANK;
pub use simd::{simd_level, SimdLevel};
pub use train::LoraGrads;

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
