//! `ndlora::checkpoint` and the `ndlora` binary: whole-checkpoint merges against an f64
//! reference (linear, embedding, fan_in_fan_out, rank/alpha patterns, rsLoRA,
//! modules_to_save; F32 and F64 weights), the output's layout (shards, order, index, metadata,
//! other files, untouched tensors byte for byte), unmerge, the output directory's handling,
//! and the PEFT-written fixture (`tests/fixtures/checkpoint/llama_bf16_r8`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::checkpoint::{
    layout, random_tensor, read_checkpoint, write_adapter, write_sharded, Raw,
};
use common::temp_dir;
use ndlora::checkpoint::{merge, plan, Checkpoint, CheckpointAdapter, MergeOptions, Operation};
use ndlora::LoraError;
use safetensors::Dtype;
use serde_json::{json, Value};

const V: usize = 37; // vocabulary
const D: usize = 24; // hidden size
const F: usize = 40; // MLP size

fn options() -> MergeOptions {
    MergeOptions {
        sync: false,
        ..MergeOptions::default()
    }
}

fn no_progress() -> impl FnMut(&ndlora::checkpoint::Progress) {
    |_| {}
}

/// A toy base model in `dtype`, two shards (the second with an I64 buffer and a 1-D norm).
fn toy_base(dir: &Path, dtype: Dtype) {
    let t = |name: &str, shape: &[usize], seed| random_tensor(name, dtype, shape, seed);
    let ids = Raw {
        name: "model.position_ids".into(),
        dtype: Dtype::I64,
        shape: vec![5],
        data: (0..5i64).flat_map(i64::to_le_bytes).collect(),
    };
    write_sharded(
        dir,
        &[
            (
                "model-00001-of-00002.safetensors",
                vec![
                    t("model.embed_tokens.weight", &[V, D], 1),
                    t("model.layers.0.self_attn.q_proj.weight", &[D, D], 2),
                    t("model.layers.0.self_attn.k_proj.weight", &[16, D], 3),
                ],
            ),
            (
                "model-00002-of-00002.safetensors",
                vec![
                    t("model.layers.0.mlp.down_proj.weight", &[D, F], 4),
                    t("model.norm.weight", &[D], 5),
                    t("lm_head.weight", &[V, D], 6),
                    ids,
                ],
            ),
        ],
    );
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), "stale weights").unwrap();
    std::fs::create_dir_all(dir.join("original")).unwrap();
}

/// `base_model.model.<module>.lora_{A,B}.weight` with A r×k, B d×r (F32, B ≠ 0).
fn lora(module: &str, r: usize, d: usize, k: usize, seed: u64) -> Vec<Raw> {
    vec![
        random_tensor(
            &format!("base_model.model.{module}.lora_A.weight"),
            Dtype::F32,
            &[r, k],
            seed,
        ),
        random_tensor(
            &format!("base_model.model.{module}.lora_B.weight"),
            Dtype::F32,
            &[d, r],
            seed + 1,
        ),
    ]
}

/// An adapter on q_proj (r 4), k_proj (r 2 by rank_pattern), down_proj (α 3 by
/// alpha_pattern), the embedding (r 4), with rsLoRA, and lm_head in modules_to_save (BF16,
/// converted to the base dtype).
fn toy_adapter(dir: &Path) {
    let mut tensors = Vec::new();
    tensors.extend(lora("model.layers.0.self_attn.q_proj", 4, D, D, 10));
    tensors.extend(lora("model.layers.0.self_attn.k_proj", 2, 16, D, 12));
    tensors.extend(lora("model.layers.0.mlp.down_proj", 4, D, F, 14));
    tensors.push(random_tensor(
        "base_model.model.model.embed_tokens.lora_embedding_A",
        Dtype::F32,
        &[4, V],
        16,
    ));
    tensors.push(random_tensor(
        "base_model.model.model.embed_tokens.lora_embedding_B",
        Dtype::F32,
        &[D, 4],
        17,
    ));
    tensors.push(random_tensor(
        "base_model.model.lm_head.weight",
        Dtype::BF16,
        &[V, D],
        18,
    ));
    let config = json!({
        "r": 4, "lora_alpha": 8, "use_rslora": true,
        "rank_pattern": { "k_proj": 2 }, "alpha_pattern": { "down_proj": 3 },
        "modules_to_save": ["lm_head"],
        "target_modules": ["q_proj", "k_proj", "down_proj", "embed_tokens"]
    });
    write_adapter(dir, config, &tensors);
}

/// The unit round-off of the factor type PEFT uses for weights of `dtype`.
fn eps_of(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F64 => f64::EPSILON,
        _ => f64::from(f32::EPSILON),
    }
}

/// W ± s·B A (or its transpose) in f64, and the bound on |got − exact| this test allows:
/// one rounding of the result plus r roundings of the f32/f64 products at the scale of
/// s·Σ|B A| (ndlora sums the r terms with FMAs in the factor type).
fn reference(
    w: &[f64],
    a: &Raw,
    b: &Raw,
    s: f64,
    transposed: bool,
    sign: f64,
    eps: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (r, k) = (a.shape[0], a.shape[1]);
    let d = b.shape[0];
    let (av, bv) = (a.values(), b.values());
    let mut exact = w.to_vec();
    let mut slack = vec![0.0; w.len()];
    for i in 0..d {
        for j in 0..k {
            let (mut sum, mut abs) = (0.0, 0.0);
            for l in 0..r {
                sum += bv[i * r + l] * av[l * k + j];
                abs += (bv[i * r + l] * av[l * k + j]).abs();
            }
            let at = if transposed { j * d + i } else { i * k + j };
            exact[at] += sign * s * sum;
            slack[at] = (r as f64 + 2.0) * eps * s * abs;
        }
    }
    (exact, slack)
}

/// Checks `got` (in `dtype`) against exact values: within one ulp of the result plus slack.
fn check_close(name: &str, got: &Raw, exact: &[f64], slack: &[f64]) {
    let ulp = match got.dtype {
        Dtype::F32 => f64::from(f32::EPSILON),
        Dtype::F64 => f64::EPSILON,
        other => panic!("{other:?}"),
    };
    let values = got.values();
    assert_eq!(values.len(), exact.len(), "{name}");
    for (i, ((&g, &e), &sl)) in values.iter().zip(exact).zip(slack).enumerate() {
        let tol = ulp * e.abs() + sl;
        assert!(
            (g - e).abs() <= tol,
            "{name}[{i}]: got {g}, exact {e}, tol {tol}"
        );
    }
}

fn raw<'a>(all: &'a BTreeMap<String, (String, Raw)>, name: &str) -> &'a Raw {
    &all[name].1
}

fn merged_matches_reference(dtype: Dtype) {
    let dir = temp_dir(&format!("toy-{dtype:?}"));
    let (base, adapter, out) = (dir.join("base"), dir.join("adapter"), dir.join("out"));
    toy_base(&base, dtype);
    toy_adapter(&adapter);
    let summary = merge(&base, &adapter, &out, &options(), &mut no_progress()).unwrap();
    assert_eq!(
        (summary.merged, summary.replaced, summary.copied),
        (4, 1, 2)
    );
    assert_eq!(
        summary.files,
        [
            "model.safetensors.index.json",
            "config.json",
            "tokenizer.json"
        ]
    );
    assert_eq!(summary.skipped, ["original", "pytorch_model.bin"]);

    let (b, a, o) = (
        read_checkpoint(&base),
        read_checkpoint(&adapter),
        read_checkpoint(&out),
    );
    // Same tensors in the same files with the same dtypes and shapes.
    assert_eq!(b.keys().collect::<Vec<_>>(), o.keys().collect::<Vec<_>>());
    for (name, (file, t)) in &b {
        assert_eq!(&o[name].0, file, "{name}");
        assert_eq!(
            (o[name].1.dtype, &o[name].1.shape),
            (t.dtype, &t.shape),
            "{name}"
        );
    }
    // Untouched tensors byte for byte.
    for name in ["model.norm.weight", "model.position_ids"] {
        assert_eq!(raw(&o, name).data, raw(&b, name).data, "{name}");
    }
    // modules_to_save: the BF16 values, exactly (they are representable in F32 and F64).
    assert_eq!(
        raw(&o, "lm_head.weight").values(),
        raw(&a, "base_model.model.lm_head.weight").values()
    );
    // Merged: s = α/√r (rsLoRA) with the module's own r and α.
    let cases = [
        ("model.layers.0.self_attn.q_proj", 4.0, 8.0, false),
        ("model.layers.0.self_attn.k_proj", 2.0, 8.0, false),
        ("model.layers.0.mlp.down_proj", 4.0, 3.0, false),
    ];
    for (module, r, alpha, transposed) in cases {
        let name = format!("{module}.weight");
        let s = alpha / f64::sqrt(r);
        let (exact, slack) = reference(
            &raw(&b, &name).values(),
            raw(&a, &format!("base_model.model.{module}.lora_A.weight")),
            raw(&a, &format!("base_model.model.{module}.lora_B.weight")),
            s,
            transposed,
            1.0,
            eps_of(dtype),
        );
        check_close(&name, raw(&o, &name), &exact, &slack);
    }
    let (exact, slack) = reference(
        &raw(&b, "model.embed_tokens.weight").values(),
        raw(&a, "base_model.model.model.embed_tokens.lora_embedding_A"),
        raw(&a, "base_model.model.model.embed_tokens.lora_embedding_B"),
        8.0 / 2.0,
        true,
        1.0,
        eps_of(dtype),
    );
    check_close(
        "embedding",
        raw(&o, "model.embed_tokens.weight"),
        &exact,
        &slack,
    );

    // Layout: each shard's tensors in the base's order, metadata {"format": "pt"}; the index
    // and the other files copied.
    for file in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        let (names, _) = layout(&base.join(file));
        let (out_names, meta) = layout(&out.join(file));
        assert_eq!(names, out_names, "{file}");
        assert_eq!(meta, Some(BTreeMap::from([("format".into(), "pt".into())])));
    }
    for file in [
        "model.safetensors.index.json",
        "config.json",
        "tokenizer.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(base.join(file)).unwrap(),
            "{file}"
        );
    }
    assert!(!out.join("pytorch_model.bin").exists() && !out.join("original").exists());
    // Nothing left beside the output.
    let siblings: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(siblings.len(), 3, "{siblings:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn f32_checkpoint_merges_as_the_reference() {
    merged_matches_reference(Dtype::F32);
}

#[test]
fn f64_checkpoint_merges_as_the_reference() {
    merged_matches_reference(Dtype::F64);
}

/// Tensors larger than a worker's band (1 MiB) and than a copy block (64 MiB) are cut into
/// blocks that several threads write at their offsets: the output must match the reference and
/// be the same bytes for any thread count.
#[test]
fn banded_tensors_and_copy_blocks_give_the_same_bytes_on_any_thread_count_mapped_or_not() {
    let dir = temp_dir("bands");
    let (base, adapter) = (dir.join("base.safetensors"), dir.join("adapter"));
    // 700 rows of 2400 bytes: bands of 436 rows; 1500 rows of 1400 bytes (BF16): 748 rows.
    let w = random_tensor("a.weight", Dtype::F32, &[700, 600], 40);
    let h = random_tensor("b.weight", Dtype::BF16, &[1500, 700], 41);
    let copied = Raw {
        name: "c.weight".into(),
        dtype: Dtype::U8,
        shape: vec![(64 << 20) + 3],
        data: (0..(64u32 << 20) + 3).map(|i| (i % 251) as u8).collect(),
    };
    std::fs::write(
        &base,
        common::checkpoint::safetensors_bytes(&[w.clone(), h.clone(), copied.clone()]),
    )
    .unwrap();
    let mut tensors = lora("a", 8, 700, 600, 42);
    tensors.extend(lora("b", 3, 1500, 700, 44));
    write_adapter(
        &adapter,
        json!({ "r": 8, "lora_alpha": 16, "rank_pattern": { "b": 3 } }),
        &tensors,
    );

    let mut outputs = Vec::new();
    for threads in [1, 2, 3] {
        // Merged bands read through a map (the default) and with `pread`.
        for map_inputs in [true, false] {
            // (The return value says whether a BLAS library took the count too; ndlora's
            // own workers always do.)
            ndlora::set_blas_threads(threads.min(ndlora::max_threads()));
            let out = dir.join(format!("out{threads}{}", if map_inputs { "" } else { "p" }));
            let options = MergeOptions {
                map_inputs,
                ..options()
            };
            let summary = merge(&base, &adapter, &out, &options, &mut no_progress()).unwrap();
            assert_eq!((summary.merged, summary.copied), (2, 1));
            outputs.push(std::fs::read(out.join("base.safetensors")).unwrap());
        }
    }
    ndlora::set_blas_threads(1);
    assert!(
        outputs.iter().all(|o| *o == outputs[0]),
        "thread counts or read methods differ"
    );

    let o = read_checkpoint(&dir.join("out1").join("base.safetensors"));
    let (exact, slack) = reference(
        &w.values(),
        &tensors[0],
        &tensors[1],
        2.0,
        false,
        1.0,
        eps_of(Dtype::F32),
    );
    check_close("a.weight", raw(&o, "a.weight"), &exact, &slack);
    assert_eq!(raw(&o, "c.weight").data, copied.data);
    // The BF16 weight: every row changed by its update (B ≠ 0), none left as read.
    let (before, after) = (h.values(), raw(&o, "b.weight").values());
    for (i, (x, y)) in before.chunks(700).zip(after.chunks(700)).enumerate() {
        assert!(x != y, "row {i} of b.weight was not updated");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fan_in_fan_out_merges_the_transposed_update_into_a_single_file() {
    let dir = temp_dir("fifo");
    let (adapter, out) = (dir.join("adapter"), dir.join("out"));
    let base = dir.join("gpt2.safetensors");
    let w = random_tensor("h.0.attn.c_attn.weight", Dtype::F32, &[D, 3 * D], 30);
    let bias = random_tensor("h.0.attn.c_attn.bias", Dtype::F32, &[3 * D], 31);
    std::fs::write(
        &base,
        common::checkpoint::safetensors_bytes(&[w.clone(), bias.clone()]),
    )
    .unwrap();
    // PEFT keeps the factors out×r / r×in; the weight is stored in×out.
    let tensors = lora("h.0.attn.c_attn", 4, 3 * D, D, 32);
    write_adapter(
        &adapter,
        json!({ "fan_in_fan_out": true, "lora_alpha": 6 }),
        &tensors,
    );
    let summary = merge(&base, &adapter, &out, &options(), &mut no_progress()).unwrap();
    assert_eq!((summary.merged, summary.copied), (1, 1));
    assert!(summary.files.is_empty());
    let o = read_checkpoint(&out.join("gpt2.safetensors"));
    let (exact, slack) = reference(
        &w.values(),
        &tensors[0],
        &tensors[1],
        1.5,
        true,
        1.0,
        eps_of(Dtype::F32),
    );
    check_close("c_attn", raw(&o, "h.0.attn.c_attn.weight"), &exact, &slack);
    assert_eq!(raw(&o, "h.0.attn.c_attn.bias").data, bias.data);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unmerge_takes_the_update_out_again() {
    let dir = temp_dir("unmerge");
    let (base, adapter, merged, back) = (
        dir.join("base"),
        dir.join("adapter"),
        dir.join("merged"),
        dir.join("back"),
    );
    toy_base(&base, Dtype::F32);
    // Without modules_to_save: an unmerge cannot restore replaced tensors.
    let mut tensors = lora("model.layers.0.self_attn.q_proj", 4, D, D, 40);
    tensors.extend(lora("model.layers.0.mlp.down_proj", 4, D, F, 42));
    write_adapter(&adapter, json!({}), &tensors);
    merge(&base, &adapter, &merged, &options(), &mut no_progress()).unwrap();
    let unmerge = MergeOptions {
        operation: Operation::Unmerge,
        ..options()
    };
    let summary = merge(&merged, &adapter, &back, &unmerge, &mut no_progress()).unwrap();
    assert_eq!(summary.merged, 2);
    let (b, m, o) = (
        read_checkpoint(&base),
        read_checkpoint(&merged),
        read_checkpoint(&back),
    );
    for (module, seed) in [
        ("model.layers.0.self_attn.q_proj", 40),
        ("model.layers.0.mlp.down_proj", 42),
    ] {
        let name = format!("{module}.weight");
        let _ = seed;
        let a = tensors
            .iter()
            .find(|t| t.name == format!("base_model.model.{module}.lora_A.weight"))
            .unwrap();
        let bb = tensors
            .iter()
            .find(|t| t.name == format!("base_model.model.{module}.lora_B.weight"))
            .unwrap();
        // W'' = W' − s·B A against the merged W' (one rounding), and close to the base.
        let (exact, slack) = reference(
            &raw(&m, &name).values(),
            a,
            bb,
            2.0,
            false,
            -1.0,
            eps_of(Dtype::F32),
        );
        check_close(&name, raw(&o, &name), &exact, &slack);
        let diff = raw(&o, &name)
            .values()
            .iter()
            .zip(raw(&b, &name).values())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-5, "{name}: {diff}");
    }
    // modules_to_save cannot be unmerged.
    let with_mts = dir.join("adapter-mts");
    toy_adapter(&with_mts);
    let err = merge(
        &merged,
        &with_mts,
        dir.join("never"),
        &unmerge,
        &mut no_progress(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, LoraError::PeftUnsupported { field, .. } if field == "modules_to_save"),
        "{err}"
    );
    assert!(!dir.join("never").exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn output_directory_is_refused_replaced_or_protected() {
    let dir = temp_dir("out");
    let (base, adapter, out) = (dir.join("base"), dir.join("adapter"), dir.join("out"));
    toy_base(&base, Dtype::F32);
    toy_adapter(&adapter);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("old"), "x").unwrap();
    let err = merge(&base, &adapter, &out, &options(), &mut no_progress()).unwrap_err();
    assert!(matches!(err, LoraError::OutputExists { .. }), "{err}");
    assert!(out.join("old").exists());
    // --force replaces it once the new output is complete.
    let force = MergeOptions {
        force: true,
        ..options()
    };
    let mut calls = 0;
    let summary = merge(&base, &adapter, &out, &force, &mut |p| {
        calls += 1;
        assert!(p.tensors_done <= p.tensors_total && p.bytes_done <= p.bytes_total);
    })
    .unwrap();
    assert_eq!(calls, summary.merged + summary.replaced + summary.copied);
    assert!(!out.join("old").exists() && out.join("config.json").exists());
    // Never over an input.
    let err = merge(&base, &adapter, &dir, &force, &mut no_progress()).unwrap_err();
    assert!(matches!(err, LoraError::OutputExists { .. }), "{err}");
    assert!(base.join("config.json").exists());
    // A failed merge leaves no output and nothing beside it.
    std::fs::remove_dir_all(&out).unwrap();
    write_adapter(
        &adapter,
        json!({}),
        &lora("model.layers.0.self_attn.q_proj", 4, D + 1, D, 50),
    );
    let err = merge(&base, &adapter, &out, &options(), &mut no_progress()).unwrap_err();
    assert!(
        matches!(&err, LoraError::InTensor { source, .. } if matches!(**source, LoraError::ShapeMismatch { .. })),
        "{err}"
    );
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn plan_lists_every_change_and_every_problem() {
    let dir = temp_dir("plan");
    let (base, adapter) = (dir.join("base"), dir.join("adapter"));
    toy_base(&base, Dtype::F32);
    let mut tensors = lora("model.layers.0.self_attn.q_proj", 4, D, D, 60);
    tensors.extend(lora("model.layers.9.self_attn.q_proj", 4, D, D, 62)); // not in the base
    tensors.extend(lora("model.layers.0.mlp.down_proj", 4, D + 2, F, 64)); // wrong shape
    tensors.extend(lora("model.norm", 4, D, 1, 66)); // 1-D base tensor
    write_adapter(&adapter, json!({}), &tensors);
    let checkpoint = Checkpoint::open(&base).unwrap();
    let adapter = CheckpointAdapter::open(&adapter).unwrap();
    let plan = plan(&checkpoint, &adapter);
    let problems: Vec<(&str, bool)> = plan
        .entries()
        .iter()
        .map(|e| (e.source.as_str(), e.problem.is_some()))
        .collect();
    assert_eq!(
        problems,
        [
            ("model.layers.0.mlp.down_proj", true),
            ("model.layers.0.self_attn.q_proj", false),
            ("model.layers.9.self_attn.q_proj", true),
            ("model.norm", true),
        ]
    );
    let shape = plan.entries()[0].problem.as_ref().unwrap().to_string();
    assert!(
        shape.contains("[24, 40]") && shape.contains("[26, 40]"),
        "{shape}"
    );
    assert!(matches!(
        plan.entries()[2].problem,
        Some(LoraError::NotInBase { .. })
    ));
    assert!(plan.check().is_err());
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------------
// The checkpoint PEFT wrote.

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint/llama_bf16_r8")
}

#[test]
fn fixture_copy_matches_shared() {
    let compared = common::fixtures::compare_with_shared("checkpoint/llama_bf16_r8");
    assert!(compared == 0 || compared == 1 + 8 + 2 + 8, "{compared}");
}

#[test]
fn fixture_adapter_and_base_are_read() {
    let base = Checkpoint::open(fixture().join("base")).unwrap();
    assert_eq!(base.files().len(), 5);
    assert_eq!(base.tensors().len(), 21);
    let adapter = CheckpointAdapter::open(fixture().join("adapter")).unwrap();
    assert_eq!(adapter.modules().len(), 14);
    assert!(adapter
        .modules()
        .iter()
        .all(|m| m.rank == 8 && m.scaling == 2.0));
    let meta: Value =
        serde_json::from_slice(&std::fs::read(fixture().join("meta.json")).unwrap()).unwrap();
    for (name, info) in meta["base_tensors"].as_object().unwrap() {
        let t = base.tensor(name).unwrap();
        assert_eq!(json!([t.file, t.dtype, t.shape]), *info, "{name}");
    }
}

/// Merges `case` and compares with what PEFT wrote, by tensor name: half-precision weights bit
/// for bit in ≥ 99.99 % of the changed elements and within one ulp everywhere; F32 within
/// 8ε·(1 + |W′|) (PEFT's f32 product sums in another order); every other tensor byte for byte;
/// ndlora keeps the base's shard layout, index, metadata `{"format": "pt"}` and other files.
/// Returns (merged, replaced, copied) and (bit-exact, changed) element counts.
fn check_case(case: &str) -> ((usize, usize, usize), (usize, usize)) {
    let dir = fixture().parent().unwrap().join(case);
    let out = temp_dir(&format!("fixture-{case}")).join("out");
    let s = merge(
        dir.join("base"),
        dir.join("adapter"),
        &out,
        &options(),
        &mut no_progress(),
    )
    .unwrap();
    let base = read_checkpoint(&dir.join("base"));
    let peft = read_checkpoint(&dir.join("merged"));
    let ours = read_checkpoint(&out);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        base.keys().collect::<Vec<_>>(),
        "{case}"
    );
    let (mut changed, mut exact) = (0usize, 0usize);
    for (name, (file, t)) in &ours {
        assert_eq!(file, &base[name].0, "{case} {name}: the base's layout");
        let Some((_, p)) = peft.get(name) else {
            // A tied weight PEFT's save leaves out; untouched here.
            assert_eq!(t.data, base[name].1.data, "{case} {name}");
            continue;
        };
        assert_eq!((t.dtype, &t.shape), (p.dtype, &p.shape), "{case} {name}");
        if t.data == p.data {
            if p.data != base[name].1.data {
                changed += t.shape.iter().product::<usize>();
                exact += t.shape.iter().product::<usize>();
            }
            continue;
        }
        assert_ne!(
            p.data, base[name].1.data,
            "{case} {name}: PEFT did not change it, ndlora did"
        );
        let width = t.dtype.bitsize() / 8;
        for (x, y) in t.data.chunks_exact(width).zip(p.data.chunks_exact(width)) {
            changed += 1;
            if x == y {
                exact += 1;
                continue;
            }
            match t.dtype {
                Dtype::BF16 | Dtype::F16 => {
                    let (x, y) = (
                        u16::from_le_bytes([x[0], x[1]]),
                        u16::from_le_bytes([y[0], y[1]]),
                    );
                    assert!(
                        x.abs_diff(y) <= 1 && (x ^ y) & 0x8000 == 0,
                        "{case} {name}: {x:#06x} vs {y:#06x}"
                    );
                }
                Dtype::F32 => {
                    let (x, y) = (
                        f64::from(f32::from_le_bytes(x.try_into().unwrap())),
                        f64::from(f32::from_le_bytes(y.try_into().unwrap())),
                    );
                    let tol = 8.0 * f64::from(f32::EPSILON) * (1.0 + y.abs());
                    assert!((x - y).abs() <= tol, "{case} {name}: {x} vs {y}");
                }
                other => panic!("{case} {name}: {other:?}"),
            }
        }
    }
    if Checkpoint::open(&out).unwrap().is_sharded() {
        assert_eq!(
            std::fs::read(out.join("model.safetensors.index.json")).unwrap(),
            std::fs::read(dir.join("base/model.safetensors.index.json")).unwrap()
        );
    }
    for file in Checkpoint::open(&out).unwrap().files() {
        let (_, meta) = layout(&out.join(file));
        assert_eq!(meta, Some(BTreeMap::from([("format".into(), "pt".into())])));
    }
    assert!(out.join("config.json").exists());
    std::fs::remove_dir_all(out.parent().unwrap()).ok();
    println!("{case}: {exact} of {changed} changed elements bit-exact with PEFT");
    ((s.merged, s.replaced, s.copied), (exact, changed))
}

#[test]
fn fixtures_merge_as_peft_did() {
    for (case, counts) in [
        ("llama_bf16_r8", (14, 0, 7)),
        ("llama_f16_r8", (14, 0, 7)),
        ("llama_f32_r8", (14, 0, 7)),
        ("llama_bf16_rslora_patterns", (14, 0, 7)),
        ("llama_bf16_modules_to_save", (8, 2, 11)),
        ("llama_bf16_embedding", (7, 1, 14)),
        ("gpt2_bf16_fan_in_fan_out", (8, 0, 20)),
    ] {
        let (got, (exact, changed)) = check_case(case);
        println!("{case}: merged, replaced, copied = {got:?}");
        assert_eq!(got, counts, "{case}");
        assert!(changed > 0, "{case}");
        if !case.contains("f32") {
            assert!(
                exact as f64 >= 0.9999 * changed as f64,
                "{case}: {exact} of {changed}"
            );
        }
    }
}
