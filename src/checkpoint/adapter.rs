//! [`CheckpointAdapter`]: a PEFT LoRA adapter as a whole-checkpoint merge reads it — the
//! loader's config and file checks, plus the keys a merge implements beyond
//! [`PeftAdapter`](crate::peft::PeftAdapter): embeddings (`lora_embedding_A/B`),
//! `fan_in_fan_out` and `modules_to_save` tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use safetensors::Dtype;

use super::element::is_float;
use super::reader::dtype_name;
use crate::error::{shape_str, LoraError, Result};
use crate::float::LoraFloat;
use crate::peft::tensors::{
    decode, key_of, parse_error, parse_header, parse_merge_key, read_file, Factor, MergeKey,
};
use crate::peft::{check_module, check_ranks, read_config, PeftConfig, WEIGHTS_FILE};

/// How a module's update ΔW = s·B A lands in its base tensor W.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModuleKind {
    /// `nn.Linear`: W is out×in, W ← W + s·B A.
    Linear,
    /// `fan_in_fan_out` (GPT-2's `Conv1D`): W is stored in×out, W ← W + s·(B A)ᵀ.
    FanInFanOut,
    /// `nn.Embedding` (`lora_embedding_A` r×vocab, `lora_embedding_B` dim×r): W is vocab×dim,
    /// W ← W + s·(B A)ᵀ.
    Embedding,
}

impl ModuleKind {
    /// Whether ΔW lands transposed: (B A)ᵀ = Aᵀ Bᵀ, the same rank-r update with the factors'
    /// roles swapped.
    pub fn is_transposed(self) -> bool {
        !matches!(self, Self::Linear)
    }

    /// `"linear"`, `"fan_in_fan_out"` or `"embedding"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::FanInFanOut => "fan_in_fan_out",
            Self::Embedding => "embedding",
        }
    }
}

/// One tensor of the adapter file: its key, dtype and shape, where its data lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterTensor {
    /// The key in `adapter_model.safetensors`.
    pub key: String,
    /// The dtype's safetensors name (`"F32"`, …).
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
    pub(crate) raw_dtype: Dtype,
    /// Byte range of the data within the file.
    pub(crate) range: (usize, usize),
}

/// One adapted module of a [`CheckpointAdapter`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterModule {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// How its update lands in the base tensor.
    pub kind: ModuleKind,
    /// Its rank r (`rank_pattern` or `r`).
    pub rank: usize,
    /// Its α (`alpha_pattern` or `lora_alpha`).
    pub alpha: f64,
    /// Its scaling s = α/r, or α/√r with `use_rslora`.
    pub scaling: f64,
    /// `lora_A` (r×in; `lora_embedding_A` r×vocab).
    pub a: AdapterTensor,
    /// `lora_B` (out×r; `lora_embedding_B` dim×r).
    pub b: AdapterTensor,
}

impl AdapterModule {
    /// The base tensor the module changes: `<module>.weight`.
    pub fn base_tensor(&self) -> String {
        format!("{}.weight", self.name)
    }

    /// The shape the base tensor must have: [out, in] for [`ModuleKind::Linear`], [in, out]
    /// (or [vocab, dim]) for the transposed kinds.
    pub fn base_shape(&self) -> [usize; 2] {
        let (rows_b, cols_a) = (self.b.shape[0], self.a.shape[1]);
        if self.kind.is_transposed() {
            [cols_a, rows_b]
        } else {
            [rows_b, cols_a]
        }
    }

    /// Trainable parameters: r·(in + out).
    pub fn parameters(&self) -> usize {
        self.a.shape.iter().product::<usize>() + self.b.shape.iter().product::<usize>()
    }
}

/// A PEFT LoRA adapter directory, read for merging into a whole checkpoint
/// ([`merge`](super::merge)).
///
/// Reading follows [`PeftAdapter::load`](crate::peft::PeftAdapter::load): the same checks of
/// `adapter_config.json` (every feature that changes the math and is not implemented is
/// refused, except `modules_to_save`, which a merge implements) and of the safetensors file
/// (regular file, header checked against the size before anything else is read), the same
/// `rank_pattern` / `alpha_pattern` / rsLoRA resolution. Beyond the loader it takes
/// `lora_embedding_A/B` (embeddings), `fan_in_fan_out` and whole tensors that replace base
/// tensors (`base_model.model.<name>`: `modules_to_save`). The file's bytes are kept; each
/// module's factors are decoded when a merge needs them, into the float type PEFT uses for the
/// base weight's dtype.
///
/// ```
/// use ndlora::checkpoint::{CheckpointAdapter, ModuleKind};
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/checkpoint/llama_bf16_r8/adapter");
/// let adapter = CheckpointAdapter::open(dir)?;
/// let q = &adapter.modules()[0];
/// assert_eq!((q.kind, q.rank, q.alpha, q.scaling), (ModuleKind::Linear, 8, 16.0, 2.0));
/// assert_eq!(adapter.modules().len(), 14);
/// # Ok::<(), ndlora::LoraError>(())
/// ```
#[derive(Debug)]
pub struct CheckpointAdapter {
    dir: PathBuf,
    config: PeftConfig,
    bytes: Vec<u8>,
    /// Where the data section starts in `bytes`.
    data_start: usize,
    modules: Vec<AdapterModule>,
    /// Base tensor name → the adapter tensor that replaces it.
    replacements: BTreeMap<String, AdapterTensor>,
}

impl CheckpointAdapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    ///
    /// Errors: everything [`PeftAdapter::load`](crate::peft::PeftAdapter::load) refuses in
    /// the config or the file's header; a key that is not under `base_model.model.`; a module
    /// with one factor but not the other, or with factors that are not 2-D, non-empty, of a
    /// float dtype (F32, F64, F16, BF16) and of the module's rank. Finiteness of the factors
    /// is checked against the base they are merged into ([`plan()`](super::plan())).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = read_config(dir, &["modules_to_save"])?;
        let path = dir.join(WEIGHTS_FILE);
        let shown = path.display().to_string();
        let bytes = read_file(&path)?;
        // `read_file` has checked the length prefix and the header.
        let n = usize::try_from(u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")))
            .map_err(|_| parse_error(&shown, "header length does not fit usize".into()))?;
        let entries = parse_header(&bytes[8..8 + n], bytes.len() as u64, &shown)?;
        let mut halves: BTreeMap<String, (ModuleKind, [Option<AdapterTensor>; 2])> =
            BTreeMap::new();
        let mut replacements = BTreeMap::new();
        for (key, info) in entries {
            let tensor = AdapterTensor {
                dtype: dtype_name(info.dtype),
                shape: info.shape,
                raw_dtype: info.dtype,
                range: info.data_offsets,
                key,
            };
            let bad = |expected| LoraError::PeftTensor {
                name: tensor.key.clone(),
                expected,
                got: "another key".into(),
            };
            let (module, kind, factor) = match parse_merge_key(&tensor.key) {
                None => {
                    return Err(bad(
                        "a key base_model.model.<module>.lora_A.weight / .lora_B.weight, \
                         .lora_embedding_A / .lora_embedding_B, or base_model.model.<tensor>",
                    ))
                }
                Some(MergeKey::Replacement(base)) => {
                    if replacements.contains_key(&base) {
                        return Err(LoraError::PeftTensor {
                            name: tensor.key.clone(),
                            expected: "one replacement per base tensor",
                            got: format!("a second one for `{base}`"),
                        });
                    }
                    replacements.insert(base, tensor);
                    continue;
                }
                Some(MergeKey::Linear(m, f)) => {
                    let kind = if config.fan_in_fan_out() {
                        ModuleKind::FanInFanOut
                    } else {
                        ModuleKind::Linear
                    };
                    (m.to_owned(), kind, f)
                }
                Some(MergeKey::Embedding(m, f)) => (m.to_owned(), ModuleKind::Embedding, f),
            };
            let slot = halves.entry(module.clone()).or_insert((kind, [None, None]));
            if slot.0 != kind {
                return Err(LoraError::PeftTensor {
                    name: tensor.key.clone(),
                    expected:
                        "both factors of a module of one kind (lora_A/B or lora_embedding_A/B)",
                    got: "a mix".into(),
                });
            }
            let index = usize::from(factor == Factor::B);
            if slot.1[index].is_some() {
                return Err(LoraError::PeftTensor {
                    name: tensor.key.clone(),
                    expected: "one tensor per module and factor",
                    got: "a second one (with and without the adapter name `default`)".into(),
                });
            }
            slot.1[index] = Some(tensor);
        }
        if halves.is_empty() && replacements.is_empty() {
            return Err(LoraError::MissingTensor {
                name: key_of("<module>", Factor::A),
            });
        }
        let mut modules = Vec::with_capacity(halves.len());
        for (name, (kind, [a, b])) in halves {
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (None, _) => return Err(missing(&name, kind, Factor::A)),
                (_, None) => return Err(missing(&name, kind, Factor::B)),
            };
            let rank = config.rank_for(&name);
            for t in [&a, &b] {
                check_factor_kind(t)?;
            }
            check_ranks(&name, &a.shape, &b.shape, rank)?;
            modules.push(AdapterModule {
                alpha: config.alpha_for(&name),
                scaling: config.scaling_for(&name),
                name,
                kind,
                rank,
                a,
                b,
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
            config,
            data_start: 8 + n,
            bytes,
            modules,
            replacements,
        })
    }

    /// The adapter directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `adapter_config.json`.
    pub fn config(&self) -> &PeftConfig {
        &self.config
    }

    /// The adapted modules, sorted by path.
    pub fn modules(&self) -> &[AdapterModule] {
        &self.modules
    }

    /// The whole tensors that replace base tensors (`modules_to_save`), by base tensor name.
    pub fn replacements(&self) -> &BTreeMap<String, AdapterTensor> {
        &self.replacements
    }

    /// The path of the adapter's safetensors file, for errors.
    pub(crate) fn weights_path(&self) -> String {
        self.dir.join(WEIGHTS_FILE).display().to_string()
    }

    /// A tensor's bytes.
    pub(crate) fn data(&self, t: &AdapterTensor) -> &[u8] {
        &self.bytes[self.data_start + t.range.0..self.data_start + t.range.1]
    }

    /// `module`'s factors (A, B) decoded into `F` (rounded to nearest), checked finite and of
    /// the module's rank.
    pub(crate) fn factors<F: LoraFloat>(
        &self,
        module: &AdapterModule,
    ) -> Result<(Array2<F>, Array2<F>)> {
        let decode_one =
            |t: &AdapterTensor| decode::<F>(&t.key, t.raw_dtype, &t.shape, self.data(t));
        let (a, b) = (decode_one(&module.a)?, decode_one(&module.b)?);
        check_module(&module.name, a.view(), b.view(), module.rank)?;
        Ok((a, b))
    }
}

fn missing(module: &str, kind: ModuleKind, factor: Factor) -> LoraError {
    let name = match kind {
        ModuleKind::Embedding => format!(
            "{}{module}.lora_embedding_{}",
            crate::peft::KEY_PREFIX,
            if factor == Factor::A { "A" } else { "B" }
        ),
        _ => key_of(module, factor),
    };
    LoraError::MissingTensor { name }
}

/// A factor must be a non-empty 2-D tensor of a float dtype.
fn check_factor_kind(t: &AdapterTensor) -> Result<()> {
    if !is_float(t.raw_dtype) {
        return Err(LoraError::PeftTensor {
            name: t.key.clone(),
            expected: "dtype F32, F64, F16 or BF16",
            got: t.dtype.clone(),
        });
    }
    match t.shape[..] {
        [rows, cols] if rows > 0 && cols > 0 => Ok(()),
        [_, _] => Err(LoraError::PeftTensor {
            name: t.key.clone(),
            expected: "a non-empty tensor",
            got: shape_str(&t.shape),
        }),
        _ => Err(LoraError::PeftTensor {
            name: t.key.clone(),
            expected: "a 2-D tensor",
            got: shape_str(&t.shape),
        }),
    }
}
