//! PEFT adapter files: against the adapter and outputs PEFT 0.21.2 wrote itself
//! (`tests/fixtures/peft/f32_r8`, a copy of `shared/fixtures/peft/f32_r8`), round trips, adapters
//! built here in every dtype and config variant, and malformed or hostile files.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{random_layer_with, rng, temp_dir, to_f64};
use ndarray::{Array1, Array2, Axis};
use ndlora::peft::{PeftAdapter, TargetModules, CONFIG_FILE, WEIGHTS_FILE};
use ndlora::{LoraConfig, LoraError, LoraFloat, LoraLayer};
use rand::Rng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

const MODULES: [&str; 4] = [
    "layers.0.k_proj",
    "layers.0.o_proj",
    "layers.0.q_proj",
    "layers.0.v_proj",
];

/// |got − want| ≤ TOL·(1 + |want|): PEFT computed in f32 with another summation order.
const TOL: f64 = 1e-5;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/f32_r8")
}

/// Every tensor of a safetensors file as f64 (1-D tensors as 1×n).
fn read_tensors(path: &Path) -> HashMap<String, Array2<f64>> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let values: Vec<f64> = view
                .data()
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
                .collect();
            let shape = match view.shape() {
                &[n] => (1, n),
                &[r, c] => (r, c),
                other => panic!("{name}: shape {other:?}"),
            };
            (name, Array2::from_shape_vec(shape, values).unwrap())
        })
        .collect()
}

fn cast<A: LoraFloat<Factor = A>>(m: &Array2<f64>) -> Array2<A> {
    m.mapv(A::from_f64_lossy)
}

/// Largest |got − want| / (1 + |want|); panics naming `what` when above `tol`.
fn check_close(what: &str, got: &Array2<f64>, want: &Array2<f64>, tol: f64) -> f64 {
    assert_eq!(got.dim(), want.dim(), "{what}: shape");
    let mut worst = (0.0, (0, 0));
    for ((idx, g), w) in got.indexed_iter().zip(want.iter()) {
        let err = (g - w).abs() / (1.0 + w.abs());
        assert!(err.is_finite(), "{what} at {idx:?}: got {g}, expected {w}");
        if err > worst.0 {
            worst = (err, idx);
        }
    }
    let (err, idx) = worst;
    assert!(
        err <= tol,
        "{what}: error {err:e} at {idx:?} (got {}, expected {}) above {tol:e}",
        got[idx],
        want[idx]
    );
    err
}

/// Loads the fixture as `A` and checks every module against PEFT's outputs; returns the worst
/// error per quantity.
fn check_fixture<A: LoraFloat<Factor = A>>() -> Vec<(&'static str, f64)> {
    let dir = fixture_dir();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    let base = read_tensors(&dir.join("base_weights.safetensors"));
    let inputs = read_tensors(&dir.join("inputs.safetensors"));
    let outputs = read_tensors(&dir.join("outputs.safetensors"));
    let raw = read_tensors(&dir.join("adapter").join(WEIGHTS_FILE));

    let adapter = PeftAdapter::<A>::load(dir.join("adapter")).unwrap();
    assert_eq!(adapter.module_names(), MODULES);
    assert!(!adapter.contains("head"));
    assert!(matches!(
        adapter.rank("head"),
        Err(LoraError::UnknownModule { .. })
    ));

    let mut worst: HashMap<&'static str, f64> = HashMap::new();
    let mut note = |what: &'static str, err: f64| {
        let e = worst.entry(what).or_default();
        *e = e.max(err);
    };
    for module in MODULES {
        let m = &meta["modules"][module];
        let r = m["r"].as_u64().unwrap() as usize;
        assert_eq!(adapter.rank(module).unwrap(), r);
        assert_eq!(
            adapter.alpha(module).unwrap(),
            m["lora_alpha"].as_f64().unwrap()
        );
        assert_eq!(
            adapter.scaling(module).unwrap(),
            m["scaling"].as_f64().unwrap()
        );
        let (a, b) = adapter.factors(module).unwrap();
        let shape = |v: &Value| -> Vec<usize> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect()
        };
        assert_eq!(a.shape(), shape(&m["lora_A_shape"]));
        assert_eq!(b.shape(), shape(&m["lora_B_shape"]));
        // f32 → A is exact for f32 and f64.
        assert_eq!(
            to_f64(a),
            raw[&format!("base_model.model.{module}.lora_A.weight")]
        );
        assert_eq!(
            to_f64(b),
            raw[&format!("base_model.model.{module}.lora_B.weight")]
        );

        let w = &base[&format!("{module}.weight")];
        let bias = base
            .get(&format!("{module}.bias"))
            .map(|b| cast::<A>(b).index_axis(Axis(0), 0).to_owned());
        assert_eq!(bias.is_some(), m["bias"].as_bool().unwrap());
        let x: Array2<A> = cast(&inputs[module]);
        let out = |name: &str| &outputs[&format!("{module}.{name}")];

        let mut layer = adapter.to_layer(module, cast(w), bias).unwrap();
        let y = to_f64(layer.forward(x.view()).unwrap().view());
        note(
            "y_unmerged",
            check_close(module, &y, out("y_unmerged"), TOL),
        );

        let delta = to_f64(layer.effective_weight().view()) - w;
        note(
            "delta_weight",
            check_close(module, &delta, out("delta_weight"), TOL),
        );

        let mut base_only = layer.clone();
        base_only.set_scaling(0.0).unwrap();
        let y_base = to_f64(base_only.forward(x.view()).unwrap().view());
        note("y_base", check_close(module, &y_base, out("y_base"), TOL));
        check_close(module, &y_base, out("y_disabled"), TOL);

        layer.merge().unwrap();
        let w_merged = to_f64(layer.base_weight());
        note(
            "w_merged",
            check_close(module, &w_merged, out("w_merged"), TOL),
        );
        let y_merged = to_f64(layer.forward(x.view()).unwrap().view());
        note(
            "y_merged",
            check_close(module, &y_merged, out("y_merged"), TOL),
        );
    }
    let mut worst: Vec<_> = worst.into_iter().collect();
    worst.sort_by(|x, y| x.0.cmp(y.0));
    worst
}

#[test]
fn fixture_f32_matches_peft() {
    println!("backend: {:?}", ndlora::backend());
    let worst = check_fixture::<f32>();
    println!("f32 vs PEFT, max |err|/(1+|want|): {worst:?}");
}

#[test]
fn fixture_f64_matches_peft() {
    let worst = check_fixture::<f64>();
    println!("f64 vs PEFT, max |err|/(1+|want|): {worst:?}");
}

#[test]
fn fixture_copy_matches_shared() {
    let compared = common::fixtures::compare_with_shared("peft/f32_r8");
    assert!(compared == 0 || compared == 6, "{compared} files");
}

#[test]
fn fixture_config_is_parsed() {
    let adapter = PeftAdapter::<f32>::load(fixture_dir().join("adapter")).unwrap();
    let c = adapter.config();
    assert_eq!(c.r(), 8);
    assert_eq!(c.lora_alpha(), 16.0);
    assert!(!c.use_rslora());
    assert!(!c.fan_in_fan_out());
    assert_eq!(c.lora_dropout(), 0.0);
    assert_eq!(c.peft_version(), Some("0.21.2"));
    assert!(c.rank_pattern().is_empty() && c.alpha_pattern().is_empty());
    assert_eq!(
        c.target_modules(),
        &TargetModules::List(vec![
            "k_proj".into(),
            "v_proj".into(),
            "o_proj".into(),
            "q_proj".into()
        ])
    );
    for module in MODULES {
        assert!(c.target_modules().matches(module).unwrap());
    }
    assert!(!c.target_modules().matches("head").unwrap());
    assert!(!c.target_modules().matches("layers.0.xq_proj").unwrap());
}

/// The fixture's modules as layers (base weights and biases from the fixture).
fn fixture_layers() -> Vec<(String, LoraLayer<f32>)> {
    let dir = fixture_dir();
    let base = read_tensors(&dir.join("base_weights.safetensors"));
    let adapter = PeftAdapter::<f32>::load(dir.join("adapter")).unwrap();
    MODULES
        .iter()
        .map(|&m| {
            let w = cast(&base[&format!("{m}.weight")]);
            (m.to_owned(), adapter.to_layer(m, w, None).unwrap())
        })
        .collect()
}

#[test]
fn round_trip_through_files_matches_peft_layout() {
    let layers = fixture_layers();
    let adapter = PeftAdapter::from_layers(layers.iter().map(|(n, l)| (n.as_str(), l))).unwrap();
    let dir = temp_dir("round-trip");
    adapter.save(&dir).unwrap();
    let back = PeftAdapter::<f32>::load(&dir).unwrap();
    assert_eq!(back, adapter);
    let original = PeftAdapter::<f32>::load(fixture_dir().join("adapter")).unwrap();
    for module in MODULES {
        assert_eq!(
            back.factors(module).unwrap(),
            original.factors(module).unwrap()
        );
        assert_eq!(back.rank(module).unwrap(), 8);
        assert_eq!(back.scaling(module).unwrap(), 2.0);
    }

    // The same config fields as PEFT 0.21.2 wrote, with PEFT's values where they matter.
    let ours: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    let peft: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("adapter").join(CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&ours), keys(&peft));
    for field in [
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "fan_in_fan_out",
        "bias",
        "lora_bias",
        "use_dora",
        "lora_dropout",
        "task_type",
        "base_model_name_or_path",
        "inference_mode",
        "peft_version",
        "layer_replication",
        "use_qalora",
        "modules_to_save",
    ] {
        assert_eq!(ours[field], peft[field], "{field}");
    }
    assert_eq!(ours["target_modules"], json!(MODULES));

    // The same tensor keys, dtype and shapes, and PEFT's metadata.
    let ours = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let peft = std::fs::read(fixture_dir().join("adapter").join(WEIGHTS_FILE)).unwrap();
    let (ours, peft) = (
        SafeTensors::deserialize(&ours).unwrap(),
        SafeTensors::deserialize(&peft).unwrap(),
    );
    let mut ours_names = ours.names();
    let mut peft_names = peft.names();
    ours_names.sort();
    peft_names.sort();
    assert_eq!(ours_names, peft_names);
    for name in peft_names {
        let (o, p) = (ours.tensor(name).unwrap(), peft.tensor(name).unwrap());
        assert_eq!((o.dtype(), o.shape()), (p.dtype(), p.shape()), "{name}");
        assert_eq!(o.data(), p.data(), "{name}");
    }
    let (_, meta) =
        SafeTensors::read_metadata(&std::fs::read(dir.join(WEIGHTS_FILE)).unwrap()).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loaded_adapter_saves_unchanged_and_as_f64() {
    let original = PeftAdapter::<f64>::load(fixture_dir().join("adapter")).unwrap();
    let dir = temp_dir("resave");
    original.save(&dir).unwrap();
    // The config is written back as loaded (every PEFT field kept, auto_mapping included).
    let peft: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("adapter").join(CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    let ours: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(ours, peft);
    let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensors().iter().all(|(_, t)| t.dtype() == Dtype::F64));
    let back = PeftAdapter::<f64>::load(&dir).unwrap();
    assert_eq!(back, original);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn cfg(rank: usize, alpha: f64, use_rslora: bool) -> LoraConfig {
    LoraConfig {
        rank,
        alpha,
        use_rslora,
        ..Default::default()
    }
}

#[test]
fn mixed_ranks_alphas_and_scalings_round_trip() {
    let mut scaled = random_layer_with::<f64>(12, 9, cfg(4, 8.0, false), 5);
    scaled.set_scaling(0.75).unwrap(); // saved as α = 3
    let layers: Vec<(&str, LoraLayer<f64>)> = vec![
        (
            "model.layers.0.self_attn.q_proj",
            random_layer_with::<f64>(16, 8, cfg(4, 8.0, false), 1),
        ),
        (
            "model.layers.0.self_attn.k_proj",
            random_layer_with::<f64>(16, 8, cfg(4, 8.0, false), 2),
        ),
        (
            "model.layers.0.self_attn.v_proj",
            random_layer_with::<f64>(16, 8, cfg(2, 8.0, false), 3),
        ),
        (
            "model.layers.0.mlp.up_proj",
            random_layer_with::<f64>(20, 8, cfg(4, 32.0, false), 4),
        ),
        ("model.layers.0.mlp.down_proj", scaled),
        // rsLoRA in a mostly plain adapter: expressed through α = s·r.
        (
            "model.layers.1.mlp.up_proj",
            random_layer_with::<f64>(20, 8, cfg(4, 6.0, true), 6),
        ),
        // A path that is a suffix of other paths.
        (
            "q_proj",
            random_layer_with::<f64>(6, 6, cfg(3, 8.0, false), 7),
        ),
    ];
    let adapter = PeftAdapter::from_layers(layers.iter().map(|(n, l)| (*n, l))).unwrap();
    let c = adapter.config();
    assert_eq!((c.r(), c.lora_alpha(), c.use_rslora()), (4, 8.0, false));
    let dir = temp_dir("mixed");
    adapter.save(&dir).unwrap();
    let back = PeftAdapter::<f64>::load(&dir).unwrap();
    assert_eq!(back, adapter);
    for (name, l) in &layers {
        assert_eq!(back.rank(name).unwrap(), l.rank(), "{name}");
        assert_eq!(back.scaling(name).unwrap(), l.scaling(), "{name}");
        let (a, b) = back.factors(name).unwrap();
        assert_eq!((a, b), (l.weight_a(), l.weight_b()));
        let rebuilt = back
            .to_layer(name, l.base_weight().to_owned(), None)
            .unwrap();
        let x = Array2::from_shape_fn((3, l.in_features()), |(i, j)| (i as f64 - j as f64) * 0.25);
        let (y0, y1) = (
            l.forward(x.view()).unwrap(),
            rebuilt.forward(x.view()).unwrap(),
        );
        check_close(name, &y1, &y0, 1e-13);
    }
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["rank_pattern"]["model.layers.0.self_attn.v_proj"],
        json!(2)
    );
    assert_eq!(v["rank_pattern"]["q_proj"], json!(3));
    assert_eq!(v["alpha_pattern"]["model.layers.0.mlp.up_proj"], json!(32));
    assert_eq!(v["alpha_pattern"]["model.layers.0.mlp.down_proj"], json!(3));
    assert_eq!(v["alpha_pattern"]["model.layers.1.mlp.up_proj"], json!(12));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn from_layers_refuses_what_peft_cannot_express() {
    let l = random_layer_with::<f64>(6, 5, cfg(2, 4.0, false), 1);
    let mut merged = l.clone();
    merged.merge().unwrap();
    let err = PeftAdapter::from_layers([("a", &l), ("b", &merged)]).unwrap_err();
    assert!(
        matches!(&err, LoraError::InModule { module, source }
            if module == "b" && matches!(**source, LoraError::MergeState { .. })),
        "{err}"
    );
    assert!(PeftAdapter::<f64>::from_layers([]).is_err());
    assert!(PeftAdapter::from_layers([("a", &l), ("a", &l)]).is_err());
    for bad in ["", ".a", "a.", "a..b"] {
        assert!(PeftAdapter::from_layers([(bad, &l)]).is_err(), "{bad:?}");
    }
    // A scaling s with (s·r)/r ≠ s in f64 has no α that PEFT would turn back into s.
    let mut found = 0;
    for i in 1..200 {
        let s = i as f64 * 0.037;
        let mut l3 = random_layer_with::<f64>(6, 5, cfg(3, 4.0, false), 2);
        l3.set_scaling(s).unwrap();
        let result = PeftAdapter::from_layers([("m", &l3)]);
        if (s * 3.0) / 3.0 == s {
            assert_eq!(result.unwrap().scaling("m").unwrap(), s);
        } else {
            found += 1;
            let err = result.unwrap_err();
            assert!(
                matches!(&err, LoraError::InModule { module, .. } if module == "m"),
                "{err}"
            );
        }
    }
    assert!(found > 0, "no unrepresentable scaling among the candidates");
}

/// A PEFT-style config for hand-built adapters.
fn config_json(extra: Value) -> Value {
    let mut c = json!({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": false,
        "rank_pattern": {}, "alpha_pattern": {}, "target_modules": ["proj"],
        "fan_in_fan_out": false, "bias": "none", "lora_bias": false, "use_dora": false,
        "lora_dropout": 0.0, "task_type": null, "peft_version": "0.21.2"
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// One tensor to write: key, dtype, shape, raw little-endian bytes.
type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32_tensor(key: &str, shape: [usize; 2], f: impl Fn(usize, usize) -> f32) -> Raw {
    let data = (0..shape[0] * shape[1])
        .flat_map(|i| f(i / shape[1], i % shape[1]).to_le_bytes())
        .collect();
    (key.into(), Dtype::F32, shape.to_vec(), data)
}

fn write_adapter(dir: &Path, config: &Value, tensors: &[Raw]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, d, s, data)| (k.clone(), TensorView::new(*d, s.clone(), data).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join(WEIGHTS_FILE), bytes).unwrap();
}

fn va(i: usize, j: usize) -> f64 {
    ((i * 5 + j) as f64 * 0.37).sin()
}

fn vb(i: usize, j: usize) -> f64 {
    ((i * 3 + j * 7) as f64 * 0.29).cos()
}

/// A (2×3) and B (4×2) of module `proj` in `dtype`, with values `va` / `vb` rounded to it.
fn typed_pair(dtype: Dtype, module: &str, adapter_name: &str) -> Vec<Raw> {
    let enc = |f: fn(usize, usize) -> f64, (r, c): (usize, usize)| -> Vec<u8> {
        let vals = (0..r * c).map(|i| f(i / c, i % c));
        match dtype {
            Dtype::F32 => vals.flat_map(|v| (v as f32).to_le_bytes()).collect(),
            Dtype::F64 => vals.flat_map(f64::to_le_bytes).collect(),
            Dtype::F16 => vals
                .flat_map(|v| half::f16::from_f64(v).to_le_bytes())
                .collect(),
            Dtype::BF16 => vals
                .flat_map(|v| half::bf16::from_f64(v).to_le_bytes())
                .collect(),
            _ => unreachable!(),
        }
    };
    vec![
        (
            format!("base_model.model.{module}.lora_A{adapter_name}.weight"),
            dtype,
            vec![2, 3],
            enc(va, (2, 3)),
        ),
        (
            format!("base_model.model.{module}.lora_B{adapter_name}.weight"),
            dtype,
            vec![4, 2],
            enc(vb, (4, 2)),
        ),
    ]
}

#[test]
fn every_float_dtype_converts() {
    type Rounding = fn(f64) -> f64;
    let round: [(Dtype, Rounding); 4] = [
        (Dtype::F32, |v| v as f32 as f64),
        (Dtype::F64, |v| v),
        (Dtype::F16, |v| half::f16::from_f64(v).to_f64()),
        (Dtype::BF16, |v| half::bf16::from_f64(v).to_f64()),
    ];
    for (dtype, rnd) in round {
        let dir = temp_dir(&format!("dtype-{dtype:?}"));
        write_adapter(
            &dir,
            &config_json(json!({})),
            &typed_pair(dtype, "proj", ""),
        );
        let a64 = PeftAdapter::<f64>::load(&dir).unwrap();
        let (a, b) = a64.factors("proj").unwrap();
        assert_eq!(
            a,
            Array2::from_shape_fn((2, 3), |(i, j)| rnd(va(i, j))),
            "{dtype:?}"
        );
        assert_eq!(
            b,
            Array2::from_shape_fn((4, 2), |(i, j)| rnd(vb(i, j))),
            "{dtype:?}"
        );
        let a32 = PeftAdapter::<f32>::load(&dir).unwrap();
        let (a, _) = a32.factors("proj").unwrap();
        assert_eq!(
            a,
            Array2::from_shape_fn((2, 3), |(i, j)| rnd(va(i, j)) as f32)
        );
        assert_eq!(a64.scaling("proj").unwrap(), 2.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn adapter_name_default_in_keys_is_accepted() {
    let dir = temp_dir("default-name");
    write_adapter(
        &dir,
        &config_json(json!({})),
        &typed_pair(Dtype::F32, "x.proj", ".default"),
    );
    let adapter = PeftAdapter::<f32>::load(&dir).unwrap();
    assert_eq!(adapter.module_names(), ["x.proj"]);
    // Both forms for the same module is ambiguous.
    let mut both = typed_pair(Dtype::F32, "x.proj", ".default");
    both.extend(typed_pair(Dtype::F32, "x.proj", ""));
    write_adapter(&dir, &config_json(json!({})), &both);
    let err = PeftAdapter::<f32>::load(&dir).unwrap_err();
    assert!(matches!(err, LoraError::PeftTensor { .. }), "{err}");
    // Another adapter name is not PEFT's saved layout.
    write_adapter(
        &dir,
        &config_json(json!({})),
        &typed_pair(Dtype::F32, "x.proj", ".other"),
    );
    let err = PeftAdapter::<f32>::load(&dir).unwrap_err();
    assert!(matches!(err, LoraError::PeftTensor { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A (r×3) and B (4×r) of `module`, F32.
fn pair(module: &str, r: usize) -> Vec<Raw> {
    vec![
        f32_tensor(
            &format!("base_model.model.{module}.lora_A.weight"),
            [r, 3],
            |i, j| va(i, j) as f32,
        ),
        f32_tensor(
            &format!("base_model.model.{module}.lora_B.weight"),
            [4, r],
            |i, j| vb(i, j) as f32,
        ),
    ]
}

#[test]
fn rank_and_alpha_patterns_follow_peft_matching() {
    let dir = temp_dir("patterns");
    let modules = [
        ("layers.0.q_proj", 4),  // "q_proj" suffix
        ("layers.0.xq_proj", 2), // not a suffix match of "q_proj": global r
        ("layers.1.k_proj", 3),  // regex key, listed before "k_proj"
        ("layers.2.k_proj", 5),  // "k_proj"
        ("q_proj", 4),           // equal to the key
        ("layers.0.v_proj", 2),  // nothing: global
    ];
    let mut tensors = Vec::new();
    for (m, r) in modules {
        tensors.extend(pair(m, r));
    }
    let config = config_json(json!({
        "rank_pattern": {"q_proj": 4, "layers\\.[01]\\.k_proj": 3, "k_proj": 5},
        "alpha_pattern": {"layers.0.q_proj": 10, "proj": 1.5},
        "lora_alpha": 4,
    }));
    write_adapter(&dir, &config, &tensors);
    let adapter = PeftAdapter::<f64>::load(&dir).unwrap();
    for (m, r) in modules {
        assert_eq!(adapter.rank(m).unwrap(), r, "{m}");
    }
    let c = adapter.config();
    assert_eq!(c.alpha_for("layers.0.q_proj"), 10.0);
    assert_eq!(c.alpha_for("q_proj"), 4.0); // "layers.0.q_proj" is not a suffix of "q_proj"
    assert_eq!(c.alpha_for("layers.0.xq_proj"), 4.0); // "proj" ≠ "xq_proj" component
    assert_eq!(adapter.scaling("layers.0.q_proj").unwrap(), 10.0 / 4.0);
    assert_eq!(adapter.scaling("layers.2.k_proj").unwrap(), 4.0 / 5.0);
    assert_eq!(
        c.rank_pattern(),
        [("q_proj", 4), ("layers\\.[01]\\.k_proj", 3), ("k_proj", 5)]
    );

    // rsLoRA: s = α/√r.
    write_adapter(
        &dir,
        &config_json(json!({"use_rslora": true, "r": 4, "lora_alpha": 6})),
        &pair("proj", 4),
    );
    assert_eq!(
        PeftAdapter::<f64>::load(&dir)
            .unwrap()
            .scaling("proj")
            .unwrap(),
        3.0
    );

    // A rank that disagrees with the config is an error naming the module.
    write_adapter(&dir, &config_json(json!({"r": 3})), &pair("proj", 2));
    let err = PeftAdapter::<f64>::load(&dir).unwrap_err();
    assert!(
        matches!(&err, LoraError::InModule { module, source }
            if module == "proj" && matches!(**source, LoraError::ShapeMismatch { .. })),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn target_modules_as_regex_or_null() {
    let dir = temp_dir("targets");
    write_adapter(
        &dir,
        &config_json(json!({"target_modules": r".*\.(q|v)_proj"})),
        &pair("layers.0.q_proj", 2),
    );
    let adapter = PeftAdapter::<f32>::load(&dir).unwrap();
    let t = adapter.config().target_modules();
    assert!(t.matches("layers.0.q_proj").unwrap());
    assert!(!t.matches("layers.0.k_proj").unwrap());
    assert!(!t.matches("q_proj").unwrap()); // full match needs the dot
    write_adapter(
        &dir,
        &config_json(json!({"target_modules": null})),
        &pair("a", 2),
    );
    let adapter = PeftAdapter::<f32>::load(&dir).unwrap();
    assert_eq!(
        adapter.config().target_modules(),
        &TargetModules::Unspecified
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fan_in_fan_out_takes_the_transposed_base_weight() {
    let dir = temp_dir("fan-in-fan-out");
    write_adapter(
        &dir,
        &config_json(json!({"fan_in_fan_out": true})),
        &pair("c_attn", 2),
    );
    let adapter = PeftAdapter::<f64>::load(&dir).unwrap();
    assert!(adapter.config().fan_in_fan_out());
    // Conv1D stores W as in×out = 3×4; the layer computes with its transpose (4×3).
    let w_conv = Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f64 * 0.1);
    let layer = adapter
        .to_layer("c_attn", w_conv.clone(), Some(Array1::ones(4)))
        .unwrap();
    assert_eq!(layer.base_weight(), w_conv.t());
    let x = Array2::from_shape_fn((2, 3), |(i, j)| (i + j) as f64);
    let (a, b) = adapter.factors("c_attn").unwrap();
    let want = x.dot(&w_conv) + 1.0 + x.dot(&a.t()).dot(&b.t()) * 2.0;
    check_close(
        "fan_in_fan_out",
        &layer.forward(x.view()).unwrap(),
        &want,
        1e-12,
    );
    // The out×in shape is refused: the config says the model stores in×out.
    let err = adapter
        .to_layer("c_attn", Array2::zeros((4, 3)), None)
        .unwrap_err();
    assert!(matches!(err, LoraError::InModule { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn load_err(config: &Value, tensors: &[Raw]) -> LoraError {
    let dir = temp_dir("err");
    write_adapter(&dir, config, tensors);
    let err = PeftAdapter::<f32>::load(&dir).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    err
}

#[test]
fn unsupported_features_are_refused() {
    for (field, value) in [
        ("use_dora", json!(true)),
        ("lora_bias", json!(true)),
        ("use_qalora", json!(true)),
        ("layer_replication", json!([[0, 2]])),
        ("alora_invocation_tokens", json!([1, 2])),
        ("modules_to_save", json!(["classifier"])),
        ("trainable_token_indices", json!([5])),
        ("target_parameters", json!(["experts.w1"])),
        ("peft_type", json!("LOHA")),
        ("bias", json!("all")),
    ] {
        let err = load_err(&config_json(json!({ field: value })), &pair("proj", 2));
        assert!(
            matches!(&err, LoraError::PeftUnsupported { field: f, .. } if f == field),
            "{field}: {err}"
        );
        assert!(err.to_string().contains(field), "{err}");
    }
    // Unset forms are fine.
    for (field, value) in [("use_dora", json!(false)), ("modules_to_save", json!(null))] {
        let dir = temp_dir("unset");
        write_adapter(
            &dir,
            &config_json(json!({ field: value })),
            &pair("proj", 2),
        );
        PeftAdapter::<f32>::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn malformed_configs_are_errors() {
    let mut no_type = config_json(json!({}));
    no_type.as_object_mut().unwrap().remove("peft_type");
    for (config, field) in [
        (no_type, "peft_type"),
        (config_json(json!({"r": 0})), "r"),
        (config_json(json!({"r": 2.5})), "r"),
        (config_json(json!({"r": "8"})), "r"),
        (config_json(json!({"lora_alpha": "x"})), "lora_alpha"),
        (config_json(json!({"use_rslora": 1})), "use_rslora"),
        (
            config_json(json!({"rank_pattern": {"proj": -1}})),
            "rank_pattern.proj",
        ),
        (config_json(json!({"rank_pattern": [1]})), "rank_pattern"),
        (
            config_json(json!({"alpha_pattern": {"p(": 2}})),
            "alpha_pattern.p(",
        ),
        (config_json(json!({"target_modules": 3})), "target_modules"),
        (config_json(json!({"lora_dropout": 2})), "lora_dropout"),
        (json!([1, 2]), "(root)"),
    ] {
        let err = load_err(&config, &pair("proj", 2));
        assert!(
            matches!(&err, LoraError::PeftConfigField { field: f, .. } if f == field),
            "{field}: {err}"
        );
    }
    let dir = temp_dir("bad-json");
    write_adapter(&dir, &config_json(json!({})), &pair("proj", 2));
    std::fs::write(dir.join(CONFIG_FILE), "{\"peft_type\": \"LORA\",").unwrap();
    let err = PeftAdapter::<f32>::load(&dir).unwrap_err();
    assert!(
        matches!(err, LoraError::Parse { format: "JSON", .. }),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_tensors_are_errors() {
    let c = config_json(json!({}));
    let a =
        |shape: [usize; 2]| f32_tensor("base_model.model.proj.lora_A.weight", shape, |_, _| 0.5);
    let b =
        |shape: [usize; 2]| f32_tensor("base_model.model.proj.lora_B.weight", shape, |_, _| 0.5);

    // A without B and B without A.
    let err = load_err(&c, &[a([2, 3])]);
    assert_eq!(
        err,
        LoraError::MissingTensor {
            name: "base_model.model.proj.lora_B.weight".into()
        }
    );
    let err = load_err(&c, &[b([4, 2])]);
    assert!(matches!(err, LoraError::MissingTensor { .. }), "{err}");
    // No tensors at all.
    assert!(matches!(load_err(&c, &[]), LoraError::MissingTensor { .. }));
    // Ranks of A and B disagree.
    let err = load_err(&c, &[a([2, 3]), b([4, 3])]);
    assert!(matches!(err, LoraError::InModule { .. }), "{err}");
    // Not 2-D, empty.
    let mut three_d = a([2, 3]);
    three_d.2 = vec![2, 3, 1];
    let err = load_err(&c, &[three_d, b([4, 2])]);
    assert!(
        matches!(
            err,
            LoraError::PeftTensor {
                expected: "a 2-D tensor",
                ..
            }
        ),
        "{err}"
    );
    let err = load_err(&c, &[a([2, 0]), b([4, 2])]);
    assert!(matches!(err, LoraError::PeftTensor { .. }), "{err}");
    // Non-finite values, also ones that overflow only in f32.
    let nan = f32_tensor("base_model.model.proj.lora_B.weight", [4, 2], |i, _| {
        if i == 3 {
            f32::NAN
        } else {
            0.0
        }
    });
    let err = load_err(&c, &[a([2, 3]), nan]);
    assert!(
        matches!(&err, LoraError::InModule { source, .. }
            if matches!(**source, LoraError::NonFinite { what: "lora_B", index: (3, 0), .. })),
        "{err}"
    );
    let big = (
        "base_model.model.proj.lora_A.weight".to_owned(),
        Dtype::F64,
        vec![2, 3],
        (0..6).flat_map(|_| 1e300_f64.to_le_bytes()).collect(),
    );
    let err = load_err(&c, &[big, b([4, 2])]);
    assert!(matches!(err, LoraError::InModule { .. }), "{err}");
    // Unsupported dtype, unknown keys (DoRA magnitude, embeddings, no prefix).
    let ints = (
        "base_model.model.proj.lora_A.weight".to_owned(),
        Dtype::I64,
        vec![2, 3],
        vec![0u8; 48],
    );
    let err = load_err(&c, &[ints, b([4, 2])]);
    assert!(
        matches!(&err, LoraError::PeftTensor { got, .. } if got == "I64"),
        "{err}"
    );
    for key in [
        "base_model.model.proj.lora_magnitude_vector",
        "base_model.model.emb.lora_embedding_A",
        "proj.lora_A.weight",
        "base_model.model..lora_A.weight",
        "base_model.model.proj.lora_B.bias",
    ] {
        let extra = f32_tensor(key, [1, 1], |_, _| 1.0);
        let err = load_err(&c, &[a([2, 3]), b([4, 2]), extra]);
        assert!(
            matches!(&err, LoraError::PeftTensor { name, .. } if name == key),
            "{key}: {err}"
        );
    }
}

#[test]
fn missing_truncated_and_corrupt_files_are_errors() {
    let dir = temp_dir("files");
    let err = PeftAdapter::<f32>::load(&dir).unwrap_err();
    assert!(
        matches!(&err, LoraError::Io { kind: std::io::ErrorKind::NotFound, path, .. }
            if path.ends_with(CONFIG_FILE)),
        "{err}"
    );
    std::fs::write(dir.join(CONFIG_FILE), config_json(json!({})).to_string()).unwrap();
    let err = PeftAdapter::<f32>::load(&dir).unwrap_err();
    assert!(
        matches!(&err, LoraError::Io { path, .. } if path.ends_with(WEIGHTS_FILE)),
        "{err}"
    );

    let good = std::fs::read(fixture_dir().join("adapter").join(WEIGHTS_FILE)).unwrap();
    std::fs::copy(
        fixture_dir().join("adapter").join(CONFIG_FILE),
        dir.join(CONFIG_FILE),
    )
    .unwrap();
    let load = |bytes: &[u8]| {
        std::fs::write(dir.join(WEIGHTS_FILE), bytes).unwrap();
        PeftAdapter::<f32>::load(&dir)
    };
    assert!(load(&good).is_ok());
    // Truncated anywhere: in the length, the header or the data.
    for len in [0, 4, 8, 100, good.len() / 2, good.len() - 1] {
        let err = load(&good[..len]).unwrap_err();
        assert!(
            matches!(
                err,
                LoraError::Parse {
                    format: "safetensors",
                    ..
                }
            ),
            "{len}: {err}"
        );
    }
    // Trailing garbage.
    let mut longer = good.clone();
    longer.push(0);
    assert!(load(&longer).is_err());
    // Hostile header lengths: huge, or past the end of the file.
    for n in [u64::MAX, 1 << 40, good.len() as u64] {
        let mut bad = good.clone();
        bad[..8].copy_from_slice(&n.to_le_bytes());
        assert!(matches!(load(&bad), Err(LoraError::Parse { .. })), "{n}");
    }
    // Hostile headers: sizes whose byte count overflows, offsets out of the file.
    for header in [
        r#"{"base_model.model.p.lora_A.weight":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,0]}}"#,
        r#"{"base_model.model.p.lora_A.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,18446744073709551615]}}"#,
        r#"{"base_model.model.p.lora_A.weight":{"dtype":"X99","shape":[1,1],"data_offsets":[0,4]}}"#,
        r#"{"base_model.model.p.lora_A.weight":{"dtype":"F32","shape":[1,1],"data_offsets":[4,0]}}"#,
    ] {
        let mut bad = (header.len() as u64).to_le_bytes().to_vec();
        bad.extend_from_slice(header.as_bytes());
        bad.extend_from_slice(&[0; 4]);
        assert!(
            matches!(load(&bad), Err(LoraError::Parse { .. })),
            "{header}"
        );
    }
    // Every single-bit flip in the length and header: an error or a valid load, never a panic.
    let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut outcomes = [0usize; 2];
    for pos in 0..header_end {
        let mut bad = good.clone();
        bad[pos] ^= 1 << (pos % 8);
        outcomes[usize::from(load(&bad).is_ok())] += 1;
    }
    println!(
        "header bit flips: {} errors, {} loads",
        outcomes[0], outcomes[1]
    );
    assert!(outcomes[0] > 0);
    // Random corruption anywhere (fixed seed), also of whole byte runs.
    let mut g = rng(4);
    for _ in 0..300 {
        let mut bad = good.clone();
        for _ in 0..g.random_range(1..8) {
            let pos = g.random_range(0..bad.len());
            bad[pos] = g.random();
        }
        let _ = load(&bad);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_modules_and_bad_bases_are_errors() {
    let adapter = PeftAdapter::<f32>::load(fixture_dir().join("adapter")).unwrap();
    let unknown = LoraError::UnknownModule {
        module: "q_proj".into(),
    };
    assert_eq!(adapter.rank("q_proj").unwrap_err(), unknown);
    assert_eq!(adapter.scaling("q_proj").unwrap_err(), unknown);
    assert_eq!(adapter.alpha("q_proj").unwrap_err(), unknown);
    assert_eq!(adapter.factors("q_proj").unwrap_err(), unknown);
    assert_eq!(
        adapter
            .to_layer("q_proj", Array2::zeros((48, 64)), None)
            .unwrap_err(),
        unknown
    );
    let m = "layers.0.q_proj";
    // q_proj is 48×64.
    for shape in [(64, 48), (48, 63), (47, 64)] {
        let err = adapter.to_layer(m, Array2::zeros(shape), None).unwrap_err();
        assert!(
            matches!(&err, LoraError::InModule { module, source }
                if module == m && matches!(**source, LoraError::ShapeMismatch { .. })),
            "{shape:?}: {err}"
        );
    }
    let err = adapter
        .to_layer(m, Array2::zeros((48, 64)), Some(Array1::zeros(64)))
        .unwrap_err();
    assert!(
        matches!(&err, LoraError::InModule { source, .. }
            if matches!(**source, LoraError::ShapeMismatch { what: "bias", .. })),
        "{err}"
    );
    let mut w = Array2::zeros((48, 64));
    w[[1, 2]] = f32::INFINITY;
    assert!(adapter.to_layer(m, w, None).is_err());
    let layer = adapter
        .to_layer(m, Array2::zeros((48, 64)), Some(Array1::ones(48)))
        .unwrap();
    assert_eq!(layer.bias().unwrap(), Array1::<f32>::ones(48));
}

#[test]
fn from_bytes_equals_load() {
    let dir = fixture_dir().join("adapter");
    let config = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    let weights = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let from_bytes = PeftAdapter::<f32>::from_bytes(&config, &weights).unwrap();
    assert_eq!(from_bytes, PeftAdapter::<f32>::load(&dir).unwrap());
    let err = PeftAdapter::<f32>::from_bytes(&config, &weights[..100]).unwrap_err();
    assert!(
        matches!(&err, LoraError::Parse { path, .. } if path == WEIGHTS_FILE),
        "{err}"
    );
}
