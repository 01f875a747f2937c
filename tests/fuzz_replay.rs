//! Replays the fuzz seed corpus (`fuzz/seeds/<target>/`) through the same checks the
//! cargo-fuzz targets run (`fuzz/fuzz_targets/checks/*.rs`, included here verbatim), so every
//! `cargo test` re-checks every input the fuzzers kept, including past crashes.
//!
//! The long fuzz runs are separate (nightly, cargo-fuzz); see the README's Fuzzing section.

use std::path::{Path, PathBuf};

#[allow(dead_code)]
mod checks {
    const FIXTURE_CONFIG: &str = include_str!("fixtures/peft/f32_r8/adapter/adapter_config.json");
    include!("../fuzz/fuzz_targets/checks/common.rs");
    include!("../fuzz/fuzz_targets/checks/load.rs");
    include!("../fuzz/fuzz_targets/checks/layer_serde.rs");
    include!("../fuzz/fuzz_targets/checks/micro_serde.rs");
    include!("../fuzz/fuzz_targets/checks/ops.rs");
    include!("../fuzz/fuzz_targets/checks/checkpoint.rs");
}

/// Every file in `fuzz/seeds/<target>/`, sorted so failures reproduce in order.
fn seeds(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
}

/// Runs `check` on every seed of `target`, naming the file that fails.
fn replay(target: &str, check: fn(&[u8])) {
    for path in seeds(target) {
        let data = std::fs::read(&path).expect("readable seed");
        let result = std::panic::catch_unwind(|| check(&data));
        assert!(result.is_ok(), "{target}: seed {} failed", path.display());
    }
}

#[test]
fn replay_load() {
    replay("load", checks::check_load);
}

#[test]
fn replay_checkpoint() {
    replay("checkpoint", checks::check_checkpoint);
}

#[test]
fn replay_layer_serde() {
    replay("layer_serde", checks::check_layer_serde);
}

#[test]
fn replay_micro_serde() {
    replay("micro_serde", checks::check_micro_serde);
}

#[test]
fn replay_ops() {
    replay("ops", checks::check_ops);
}

/// Found by the `ops` fuzzer: s ≈ 1e-13, A ≈ -2.8e14, B ≈ 4.7e27, so s·B A ≈ -1.4e29 is finite
/// in f32 but B A ≈ -1.3e42 is not. The old bound only looked at s·B A, so merge ran and the
/// gemm (which forms B A before scaling) wrote -∞ into W; unmerge then wrote NaN. Now merge
/// either gives a finite W or fails with `WouldOverflow` leaving layer and model unchanged.
/// Small and BLAS-sized shapes.
#[test]
fn merge_whose_unscaled_product_overflows_never_writes_inf() {
    use ndarray::Array2;
    use ndlora::{LoraConfig, LoraError, LoraLayer, LoraModel};
    for (d, k) in [(1, 2), (9, 9), (40, 70)] {
        let w = Array2::from_shape_fn((d, k), |(i, j)| (i as f32) - 0.5 * j as f32);
        let a = Array2::from_elem((1, k), -2.84243e14_f32);
        let b = Array2::from_elem((d, 1), 4.7358518e27_f32);
        let config = LoraConfig {
            rank: 1,
            alpha: 1.0387856e-13,
            ..Default::default()
        };
        let mut layer =
            LoraLayer::from_parts(w.clone(), a.clone(), b.clone(), config.clone()).unwrap();
        let before = layer.clone();
        match layer.merge() {
            Ok(()) => {
                assert!(layer.base_weight().iter().all(|v| v.is_finite()), "{d}×{k}");
                layer.unmerge().unwrap();
                assert!(layer.base_weight().iter().all(|v| v.is_finite()), "{d}×{k}");
            }
            Err(LoraError::WouldOverflow { .. }) => assert!(layer == before, "{d}×{k}"),
            Err(e) => panic!("{d}×{k}: {e:?}"),
        }
        let mut model = LoraModel::new(w.clone()).unwrap();
        model.add_adapter_from_parts("a", a, b, config).unwrap();
        model.set_active(&["a"]).unwrap();
        match model.merge_active() {
            Ok(()) => assert!(model.base_weight().iter().all(|v| v.is_finite()), "{d}×{k}"),
            Err(LoraError::WouldOverflow { .. }) => assert_eq!(model.base_weight(), w),
            Err(e) => panic!("{d}×{k}: {e:?}"),
        }
    }
}

/// Writes the hand-made starting seeds for `layer_serde` and `micro_serde` (valid documents
/// of several kinds, which the fuzzers then mutate). Run once with `--ignored`; the minimised
/// corpus in git grew from these.
#[test]
#[ignore]
fn write_starting_seeds() {
    use ndarray::{Array1, Array2};
    use ndlora::{LoraConfig, LoraLayer, MicroLora};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let write = |target: &str, name: &str, bytes: Vec<u8>| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("seed dir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    };
    let w = Array2::from_shape_fn((3, 4), |(i, j)| i as f32 - 0.5 * j as f32);
    let cfg = LoraConfig {
        rank: 2,
        alpha: 4.0,
        ..Default::default()
    };
    let mut layer = LoraLayer::new(w.clone(), cfg.clone()).unwrap();
    layer.weight_b_mut().unwrap().fill(0.25);
    write(
        "layer_serde",
        "f32-plain",
        serde_json::to_vec(&layer).unwrap(),
    );
    let biased = layer
        .clone()
        .with_bias(Array1::from(vec![1.0, -2.0, 0.5]))
        .unwrap();
    write(
        "layer_serde",
        "f32-bias",
        serde_json::to_vec(&biased).unwrap(),
    );
    let mut merged = layer.clone();
    merged.merge().unwrap();
    write(
        "layer_serde",
        "f32-merged",
        serde_json::to_vec(&merged).unwrap(),
    );
    let cfg64 = LoraConfig {
        rank: 1,
        alpha: 1.5,
        dropout: 0.25,
        use_rslora: true,
        ..cfg.clone()
    };
    let mut l64 = LoraLayer::new(w.mapv(f64::from), cfg64).unwrap();
    l64.weight_b_mut().unwrap().fill(-0.75);
    write(
        "layer_serde",
        "f64-dropout-rslora",
        serde_json::to_string_pretty(&l64).unwrap().into_bytes(),
    );

    // Half layers: elements are written as their bits, factors as f32.
    let mut lb = LoraLayer::new(w.mapv(half::bf16::from_f32), cfg.clone()).unwrap();
    lb.weight_b_mut().unwrap().fill(0.25);
    let lb = lb.with_bias(Array1::from_elem(3, half::bf16::ONE)).unwrap();
    write("layer_serde", "bf16-bias", serde_json::to_vec(&lb).unwrap());
    let mut lh = LoraLayer::new(w.mapv(half::f16::from_f32), cfg).unwrap();
    lh.weight_b_mut().unwrap().fill(-0.5);
    lh.merge_exact().unwrap();
    write(
        "layer_serde",
        "f16-merged-exact",
        serde_json::to_vec(&lh).unwrap(),
    );

    let mut micro = MicroLora::new(11, 2);
    micro
        .set_weights(
            Array2::from_elem((2, 11), 0.5).view(),
            Array2::from_elem((2, 11), -0.25).view(),
        )
        .unwrap();
    write("micro_serde", "h11-r2", serde_json::to_vec(&micro).unwrap());
    write(
        "micro_serde",
        "h33-r1-new",
        serde_json::to_vec(&MicroLora::new(33, 1)).unwrap(),
    );
    write(
        "micro_serde",
        "h0-r1",
        serde_json::to_vec(&MicroLora::try_new(0, 1).unwrap()).unwrap(),
    );
    for i in 0..4 {
        let bytes: Vec<u8> = (0..64 + 96 * i)
            .map(|j| (j * 37 + i * 101 + 7) as u8)
            .collect();
        write("ops", &format!("pattern-{i}"), bytes);
    }
}
