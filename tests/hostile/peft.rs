//! PEFT configs, tensors and layers, and the safetensors truncation and bit-flip sweeps.

use ndarray::{Array1, Array2};
use ndlora::peft::PeftAdapter;
use ndlora::{LoraError, LoraLayer};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::{cfg, Check, Tally, PEFT_CONFIG, PEFT_TENSORS_AND_LAYERS};

fn peft_config(extra: Value) -> String {
    let mut c = json!({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": false,
        "rank_pattern": {}, "alpha_pattern": {}, "target_modules": ["proj"],
        "fan_in_fan_out": false, "bias": "none", "lora_dropout": 0.0
    });
    for (k, v) in extra.as_object().unwrap() {
        if v == &json!("<remove>") {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c.to_string()
}

/// A valid safetensors file with one module `m.proj`: A r×4, B 3×r, F32.
fn peft_tensors(r: usize) -> Vec<u8> {
    let a: Vec<u8> = (0..r * 4)
        .flat_map(|i| (i as f32 * 0.25 - 0.5).to_le_bytes())
        .collect();
    let b: Vec<u8> = (0..3 * r)
        .flat_map(|i| (i as f32 * 0.5 - 1.0).to_le_bytes())
        .collect();
    let views = vec![
        (
            "base_model.model.m.proj.lora_A.weight".to_owned(),
            TensorView::new(Dtype::F32, vec![r, 4], &a).unwrap(),
        ),
        (
            "base_model.model.m.proj.lora_B.weight".to_owned(),
            TensorView::new(Dtype::F32, vec![3, r], &b).unwrap(),
        ),
    ];
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn peft_configs() {
    let mut t = Tally::default();
    let st = peft_tensors(2);
    assert!(PeftAdapter::<f32>::from_bytes(&peft_config(json!({})), &st).is_ok());
    let field = |f: &'static str| move |e: &LoraError| matches!(e, LoraError::PeftConfigField { field, .. } if field == f);
    let unsupported = |f: &'static str| move |e: &LoraError| matches!(e, LoraError::PeftUnsupported { field, .. } if field == f);
    let rank_mismatch = |e: &LoraError| {
        matches!(e, LoraError::InModule { module, source } if module == "m.proj"
            && matches!(**source, LoraError::ShapeMismatch { what: "lora_A (rank from the config)", .. }))
    };
    let cases: Vec<(&str, String, Check)> = vec![
        (
            "not JSON",
            "{\"peft_type\": \"LORA\",".into(),
            Box::new(|e| matches!(e, LoraError::Parse { format: "JSON", .. })),
        ),
        (
            "empty text",
            String::new(),
            Box::new(|e| matches!(e, LoraError::Parse { format: "JSON", .. })),
        ),
        (
            "root is an array",
            "[1, 2]".into(),
            Box::new(field("(root)")),
        ),
        (
            "peft_type missing",
            peft_config(json!({"peft_type": "<remove>"})),
            Box::new(field("peft_type")),
        ),
        (
            "peft_type IA3",
            peft_config(json!({"peft_type": "IA3"})),
            Box::new(unsupported("peft_type")),
        ),
        (
            "peft_type lower case",
            peft_config(json!({"peft_type": "lora"})),
            Box::new(unsupported("peft_type")),
        ),
        (
            "r negative",
            peft_config(json!({"r": -2})),
            Box::new(field("r")),
        ),
        ("r zero", peft_config(json!({"r": 0})), Box::new(field("r"))),
        (
            "r fractional",
            peft_config(json!({"r": 2.5})),
            Box::new(field("r")),
        ),
        (
            "r as a string",
            peft_config(json!({"r": "2"})),
            Box::new(field("r")),
        ),
        (
            "r beyond u64",
            "{\"peft_type\":\"LORA\",\"r\":1e30}".to_string(),
            Box::new(field("r")),
        ),
        (
            "lora_alpha as a string",
            peft_config(json!({"lora_alpha": "16"})),
            Box::new(field("lora_alpha")),
        ),
        (
            "lora_alpha NaN string",
            peft_config(json!({"lora_alpha": "NaN"})),
            Box::new(field("lora_alpha")),
        ),
        (
            "lora_alpha out of range",
            peft_config(json!({})).replace("\"lora_alpha\":4", "\"lora_alpha\":1e999"),
            Box::new(|e| matches!(e, LoraError::Parse { format: "JSON", .. })),
        ),
        (
            "use_rslora as a string",
            peft_config(json!({"use_rslora": "true"})),
            Box::new(field("use_rslora")),
        ),
        (
            "use_rslora as 1",
            peft_config(json!({"use_rslora": 1})),
            Box::new(field("use_rslora")),
        ),
        (
            "fan_in_fan_out as a string",
            peft_config(json!({"fan_in_fan_out": "no"})),
            Box::new(field("fan_in_fan_out")),
        ),
        (
            "lora_dropout 1.5",
            peft_config(json!({"lora_dropout": 1.5})),
            Box::new(field("lora_dropout")),
        ),
        (
            "lora_dropout negative",
            peft_config(json!({"lora_dropout": -0.1})),
            Box::new(field("lora_dropout")),
        ),
        (
            "target_modules a number",
            peft_config(json!({"target_modules": 5})),
            Box::new(field("target_modules")),
        ),
        (
            "target_modules mixed list",
            peft_config(json!({"target_modules": ["proj", 3]})),
            Box::new(field("target_modules")),
        ),
        (
            "rank_pattern a list",
            peft_config(json!({"rank_pattern": [4]})),
            Box::new(field("rank_pattern")),
        ),
        (
            "rank_pattern rank 0",
            peft_config(json!({"rank_pattern": {"proj": 0}})),
            Box::new(field("rank_pattern.proj")),
        ),
        (
            "rank_pattern bad regex",
            peft_config(json!({"rank_pattern": {"pro(j": 4}})),
            Box::new(field("rank_pattern.pro(j")),
        ),
        (
            "alpha_pattern string",
            peft_config(json!({"alpha_pattern": {"proj": "8"}})),
            Box::new(field("alpha_pattern.proj")),
        ),
        (
            "bias all",
            peft_config(json!({"bias": "all"})),
            Box::new(unsupported("bias")),
        ),
        (
            "use_dora",
            peft_config(json!({"use_dora": true})),
            Box::new(unsupported("use_dora")),
        ),
        (
            "modules_to_save",
            peft_config(json!({"modules_to_save": ["lm_head"]})),
            Box::new(unsupported("modules_to_save")),
        ),
        // Contradictions between config and tensors.
        (
            "r disagrees with the tensors",
            peft_config(json!({"r": 3})),
            Box::new(rank_mismatch),
        ),
        (
            "rank_pattern disagrees with the tensors",
            peft_config(json!({"rank_pattern": {"proj": 1}})),
            Box::new(rank_mismatch),
        ),
        (
            "rank_pattern regex disagrees",
            peft_config(json!({"rank_pattern": {"m\\.pr.*": 4}})),
            Box::new(rank_mismatch),
        ),
    ];
    for (name, config, check) in cases {
        t.err(name, PeftAdapter::<f32>::from_bytes(&config, &st), |e| {
            check(e)
        });
    }
    // Unknown fields are not errors: PEFT adds fields every release, and a config that would
    // change the math is caught by UNSUPPORTED_FIELDS. They are kept and written back.
    t.cases += 1;
    let a =
        PeftAdapter::<f32>::from_bytes(&peft_config(json!({"future_field": {"x": [1, 2]}})), &st)
            .unwrap();
    assert_eq!(a.config().raw()["future_field"], json!({"x": [1, 2]}));
    println!("PEFT configs: {} cases", t.cases);
    assert_eq!(t.cases, PEFT_CONFIG);
}

#[test]
fn peft_tensors_and_layers() {
    let mut t = Tally::default();
    let cfg_text = peft_config(json!({}));
    let raw = |tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>| {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(k, d, s, data)| (k.to_string(), TensorView::new(*d, s.clone(), data).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    };
    let f32s = |n: usize, v: f32| -> Vec<u8> { (0..n).flat_map(|_| v.to_le_bytes()).collect() };
    const KA: &str = "base_model.model.m.proj.lora_A.weight";
    const KB: &str = "base_model.model.m.proj.lora_B.weight";
    let (ka, kb) = (KA, KB);
    let tensor = |e: &LoraError| matches!(e, LoraError::PeftTensor { .. });
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        (
            "no tensors",
            raw(vec![]),
            Box::new(|e| matches!(e, LoraError::MissingTensor { .. })),
        ),
        (
            "A without B",
            raw(vec![(ka, Dtype::F32, vec![2, 4], f32s(8, 1.0))]),
            Box::new(|e| matches!(e, LoraError::MissingTensor { name } if name == KB)),
        ),
        (
            "B without A",
            raw(vec![(kb, Dtype::F32, vec![3, 2], f32s(6, 1.0))]),
            Box::new(|e| matches!(e, LoraError::MissingTensor { name } if name == KA)),
        ),
        (
            "foreign key",
            raw(vec![(
                "model.embed.weight",
                Dtype::F32,
                vec![1, 1],
                f32s(1, 1.0),
            )]),
            Box::new(tensor),
        ),
        (
            "1-D A",
            raw(vec![
                (ka, Dtype::F32, vec![8], f32s(8, 1.0)),
                (kb, Dtype::F32, vec![3, 2], f32s(6, 1.0)),
            ]),
            Box::new(tensor),
        ),
        (
            "empty A",
            raw(vec![
                (ka, Dtype::F32, vec![0, 4], vec![]),
                (kb, Dtype::F32, vec![3, 2], f32s(6, 1.0)),
            ]),
            Box::new(tensor),
        ),
        (
            "I32 dtype",
            raw(vec![
                (ka, Dtype::I32, vec![2, 4], f32s(8, 1.0)),
                (kb, Dtype::F32, vec![3, 2], f32s(6, 1.0)),
            ]),
            Box::new(tensor),
        ),
        (
            "NaN in A",
            raw(vec![
                (ka, Dtype::F32, vec![2, 4], f32s(8, f32::NAN)),
                (kb, Dtype::F32, vec![3, 2], f32s(6, 1.0)),
            ]),
            Box::new(
                |e| matches!(e, LoraError::InModule { source, .. } if matches!(**source, LoraError::NonFinite { what: "lora_A", .. })),
            ),
        ),
        (
            "∞ in B",
            raw(vec![
                (ka, Dtype::F32, vec![2, 4], f32s(8, 1.0)),
                (kb, Dtype::F32, vec![3, 2], f32s(6, f32::INFINITY)),
            ]),
            Box::new(
                |e| matches!(e, LoraError::InModule { source, .. } if matches!(**source, LoraError::NonFinite { what: "lora_B", .. })),
            ),
        ),
        (
            "F64 1e300 overflows f32",
            raw(vec![
                (
                    ka,
                    Dtype::F64,
                    vec![2, 4],
                    (0..8).flat_map(|_| 1e300_f64.to_le_bytes()).collect(),
                ),
                (kb, Dtype::F32, vec![3, 2], f32s(6, 1.0)),
            ]),
            Box::new(
                |e| matches!(e, LoraError::InModule { source, .. } if matches!(**source, LoraError::NonFinite { what: "lora_A", .. })),
            ),
        ),
        (
            "B's rank disagrees with A",
            raw(vec![
                (ka, Dtype::F32, vec![2, 4], f32s(8, 1.0)),
                (kb, Dtype::F32, vec![3, 1], f32s(3, 1.0)),
            ]),
            Box::new(
                |e| matches!(e, LoraError::InModule { source, .. } if matches!(**source, LoraError::ShapeMismatch { what: "lora_B (rank from the config)", .. })),
            ),
        ),
        (
            "A twice (with default)",
            raw(vec![
                (ka, Dtype::F32, vec![2, 4], f32s(8, 1.0)),
                (
                    "base_model.model.m.proj.lora_A.default.weight",
                    Dtype::F32,
                    vec![2, 4],
                    f32s(8, 1.0),
                ),
                (kb, Dtype::F32, vec![3, 2], f32s(6, 1.0)),
            ]),
            Box::new(tensor),
        ),
    ];
    for (name, bytes, check) in cases {
        t.err(
            name,
            PeftAdapter::<f32>::from_bytes(&cfg_text, &bytes),
            |e| check(e),
        );
    }
    // to_layer with hostile bases and biases.
    let a = PeftAdapter::<f32>::from_bytes(&cfg_text, &peft_tensors(2)).unwrap();
    let in_mod = |f: fn(&LoraError) -> bool| move |e: &LoraError| matches!(e, LoraError::InModule { source, .. } if f(source));
    t.err(
        "to_layer unknown module",
        a.to_layer("m.nope", Array2::zeros((3, 4)), None),
        |e| matches!(e, LoraError::UnknownModule { .. }),
    );
    t.err(
        "to_layer base transposed",
        a.to_layer("m.proj", Array2::zeros((4, 3)), None),
        in_mod(|e| matches!(e, LoraError::ShapeMismatch { .. })),
    );
    let mut w = Array2::<f32>::zeros((3, 4));
    w[[2, 3]] = f32::NAN;
    t.err(
        "to_layer NaN base",
        a.to_layer("m.proj", w, None),
        in_mod(|e| {
            matches!(
                e,
                LoraError::NonFinite {
                    what: "base_weight",
                    ..
                }
            )
        }),
    );
    t.err(
        "to_layer bias length",
        a.to_layer("m.proj", Array2::zeros((3, 4)), Some(Array1::zeros(4))),
        in_mod(|e| matches!(e, LoraError::ShapeMismatch { what: "bias", .. })),
    );
    let a1 = PeftAdapter::<f32>::from_bytes(
        &peft_config(json!({"lora_dropout": 1.0})),
        &peft_tensors(2),
    )
    .unwrap();
    t.err(
        "to_layer lora_dropout 1",
        a1.to_layer("m.proj", Array2::zeros((3, 4)), None),
        in_mod(|e| {
            matches!(
                e,
                LoraError::InvalidValue {
                    what: "dropout",
                    ..
                }
            )
        }),
    );
    // Rank 4 > min(3, 4): PEFT allows it, LoraLayer does not.
    let a4 =
        PeftAdapter::<f32>::from_bytes(&peft_config(json!({"r": 4})), &peft_tensors(4)).unwrap();
    t.err(
        "to_layer rank above min(d, k)",
        a4.to_layer("m.proj", Array2::zeros((3, 4)), None),
        in_mod(|e| matches!(e, LoraError::InvalidRank { got: 4, .. })),
    );
    // fan_in_fan_out contradicting the base weight's orientation.
    let af = PeftAdapter::<f32>::from_bytes(
        &peft_config(json!({"fan_in_fan_out": true})),
        &peft_tensors(2),
    )
    .unwrap();
    t.err(
        "to_layer fan_in_fan_out with out×in base",
        af.to_layer("m.proj", Array2::zeros((3, 4)), None),
        in_mod(|e| matches!(e, LoraError::ShapeMismatch { .. })),
    );
    // from_layers: nothing, a bad path.
    let l = LoraLayer::new(Array2::<f32>::eye(4), cfg(2)).unwrap();
    t.err(
        "from_layers empty",
        PeftAdapter::<f32>::from_layers(std::iter::empty()),
        |e| matches!(e, LoraError::InvalidValue { what: "layers", .. }),
    );
    t.err(
        "from_layers bad path",
        PeftAdapter::from_layers([("a..b", &l)]),
        |e| {
            matches!(
                e,
                LoraError::InvalidValue {
                    what: "module path",
                    ..
                }
            )
        },
    );
    println!("PEFT tensors and layers: {} cases", t.cases);
    assert_eq!(t.cases, PEFT_TENSORS_AND_LAYERS);
}

/// Every prefix of a valid file and every single-bit flip of it: an error of a file-level
/// variant or (a flip in the data, or in a value the loader ignores) a valid adapter. Never a
/// panic.
#[test]
fn safetensors_truncations_and_bit_flips() {
    let cfg_text = peft_config(json!({}));
    let good = peft_tensors(2);
    let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let file_level = |e: &LoraError| {
        matches!(
            e,
            LoraError::Parse {
                format: "safetensors",
                ..
            } | LoraError::PeftTensor { .. }
                | LoraError::MissingTensor { .. }
                | LoraError::InModule { .. }
        )
    };
    let mut truncations = 0;
    for len in 0..good.len() {
        let r = PeftAdapter::<f32>::from_bytes(&cfg_text, &good[..len]);
        let e = r.expect_err("a strict prefix must not load");
        assert!(
            matches!(
                e,
                LoraError::Parse {
                    format: "safetensors",
                    ..
                }
            ),
            "prefix {len}: {e}"
        );
        truncations += 1;
    }
    let (mut flips, mut loaded_data, mut loaded_header) = (0, 0, 0);
    for byte in 0..good.len() {
        for bit in 0..8 {
            let mut bad = good.clone();
            bad[byte] ^= 1 << bit;
            let r = std::panic::catch_unwind(|| PeftAdapter::<f32>::from_bytes(&cfg_text, &bad))
                .unwrap_or_else(|_| panic!("panic at byte {byte} bit {bit}"));
            match r {
                Err(e) => assert!(file_level(&e), "byte {byte} bit {bit}: {e:?}"),
                Ok(a) => {
                    // A loaded adapter must still be usable and finite.
                    let layer = a.to_layer("m.proj", Array2::zeros((3, 4)), None);
                    if byte >= header_end {
                        loaded_data += 1;
                        assert!(layer.is_ok(), "byte {byte} bit {bit}");
                    } else {
                        loaded_header += 1;
                    }
                }
            }
            flips += 1;
        }
    }
    println!(
        "safetensors: {truncations} truncations, {flips} bit flips ({loaded_data} in data and \
         {loaded_header} in the header still load)"
    );
    assert_eq!(truncations, good.len());
    assert_eq!(flips, 8 * good.len());
    assert!(loaded_data > 0);
}
