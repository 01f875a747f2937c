//! Small safetensors checkpoints and PEFT adapters written from Rust, for the checkpoint
//! tests: tensors of any dtype, single-file and sharded checkpoints (with an index), adapter
//! directories, and reading a written checkpoint back by tensor name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::Rng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use super::rng;

/// One tensor to write: name, dtype, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Raw {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Raw {
    /// The elements widened to f64 (F32, F64, F16, BF16).
    pub fn values(&self) -> Vec<f64> {
        let n = self.dtype.bitsize() / 8;
        self.data
            .chunks_exact(n)
            .map(|c| match self.dtype {
                Dtype::F32 => f64::from(f32::from_le_bytes(c.try_into().unwrap())),
                Dtype::F64 => f64::from_le_bytes(c.try_into().unwrap()),
                Dtype::BF16 => half::bf16::from_le_bytes(c.try_into().unwrap()).to_f64(),
                Dtype::F16 => half::f16::from_le_bytes(c.try_into().unwrap()).to_f64(),
                other => panic!("{}: no float values in {other:?}", self.name),
            })
            .collect()
    }
}

/// `values` encoded in `dtype` (rounded to nearest).
pub fn encode(dtype: Dtype, values: impl IntoIterator<Item = f64>) -> Vec<u8> {
    values
        .into_iter()
        .flat_map(|v| match dtype {
            Dtype::F32 => (v as f32).to_le_bytes().to_vec(),
            Dtype::F64 => v.to_le_bytes().to_vec(),
            Dtype::BF16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
            Dtype::F16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
            other => panic!("cannot encode {other:?}"),
        })
        .collect()
}

/// A tensor of uniform random values in [−1, 1) (seeded by `seed`).
pub fn random_tensor(name: &str, dtype: Dtype, shape: &[usize], seed: u64) -> Raw {
    let mut g = rng(seed);
    let n: usize = shape.iter().product();
    Raw {
        name: name.to_owned(),
        dtype,
        shape: shape.to_vec(),
        data: encode(dtype, (0..n).map(|_| g.random_range(-1.0..1.0))),
    }
}

/// The bytes of a safetensors file holding `tensors`, metadata `{"format": "pt"}`.
pub fn safetensors_bytes(tensors: &[Raw]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap();
            (t.name.clone(), view)
        })
        .collect();
    let metadata = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize(views, Some(metadata)).unwrap()
}

/// Writes a sharded checkpoint into `dir`: each shard's file, `model.safetensors.index.json`
/// and a `config.json`.
pub fn write_sharded(dir: &Path, shards: &[(&str, Vec<Raw>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0;
    for (file, tensors) in shards {
        std::fs::write(dir.join(file), safetensors_bytes(tensors)).unwrap();
        for t in tensors {
            weight_map.insert(t.name.clone(), json!(file));
            total += t.data.len();
        }
    }
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"toy\"}\n").unwrap();
}

/// Writes a PEFT adapter directory: `config` (fields over a plain LoRA config) and tensors.
pub fn write_adapter(dir: &Path, config: Value, tensors: &[Raw]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut c = json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": false,
        "rank_pattern": {}, "alpha_pattern": {}, "target_modules": null,
        "fan_in_fan_out": false, "bias": "none", "lora_dropout": 0.0, "use_dora": false
    });
    for (k, v) in config.as_object().unwrap() {
        c[k] = v.clone();
    }
    std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors_bytes(tensors),
    )
    .unwrap();
}

/// Every tensor of a checkpoint (a `.safetensors` file, or every `.safetensors` file of a
/// directory) by name, with the file it is in.
pub fn read_checkpoint(path: &Path) -> BTreeMap<String, (String, Raw)> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    let mut all = BTreeMap::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (tensor, view) in st.tensors() {
            let raw = Raw {
                name: tensor.clone(),
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            };
            assert!(all.insert(tensor, (name.clone(), raw)).is_none());
        }
    }
    all
}

/// The tensor names of a safetensors file in the order of their data, and its metadata.
pub fn layout(file: &Path) -> (Vec<String>, Option<BTreeMap<String, String>>) {
    let bytes = std::fs::read(file).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut names: Vec<(usize, String)> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (info.data_offsets.0, name))
        .collect();
    names.sort();
    let meta = metadata
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    (names.into_iter().map(|(_, n)| n).collect(), meta)
}
