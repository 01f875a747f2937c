//! PEFT LoRA adapter files in and out.
//!
//! Hugging Face PEFT saves a LoRA adapter as a directory with two files:
//!
//! * `adapter_config.json`: `peft_type: "LORA"`, the rank `r`, `lora_alpha`, `use_rslora`,
//!   per-module overrides `rank_pattern` / `alpha_pattern`, `target_modules`, … ([`PeftConfig`]);
//! * `adapter_model.safetensors`: for each adapted `nn.Linear` at module path `M`, the tensors
//!   `base_model.model.M.lora_A.weight` (r×in) and `base_model.model.M.lora_B.weight` (out×r).
//!
//! [`PeftAdapter::load`] reads such a directory (tensors in F32, F64, F16 or BF16, converted to
//! the float type `A`); [`PeftAdapter::to_layer`] joins one module's factors with the base
//! weight (and bias) you supply into a [`LoraLayer`] that computes what PEFT computes:
//!
//! * scaling s = α/r, or α/√r with `use_rslora`, where r and α are the module's own
//!   (`rank_pattern` / `alpha_pattern` override the global `r` / `lora_alpha` for module paths
//!   that match a key as the regex `(.*\.)?KEY$`, first matching key in file order wins);
//! * Y = X Wᵀ + b + s·(X Aᵀ) Bᵀ; merged, W ← W + s·B A (b unchanged).
//!
//! The other way, [`PeftAdapter::from_layers`] collects trained layers and
//! [`PeftAdapter::save`] writes the two files with PEFT's key names and config fields (format of
//! PEFT [`PEFT_FORMAT_VERSION`]), so `PeftModel.from_pretrained(base, dir)` loads them.
//!
//! Features that would change the math and that ndlora does not implement are refused with
//! [`LoraError::PeftUnsupported`] rather than silently ignored: `peft_type` other than `LORA`,
//! `bias` other than `"none"`, and any of [`UNSUPPORTED_FIELDS`] set (DoRA, LoRA bias, QALoRA,
//! layer replication, aLoRA, Arrow, BD-LoRA, target parameters, trainable tokens,
//! modules to save, MonteCLoRA, VeLoRA, KaSA). Init-only options (`init_lora_weights`, LoftQ,
//! EVA, CorDA, LoRA-GA configs) do not change a trained adapter's forward and are accepted.
//!
//! ## Example
//!
//! ```
//! use ndarray::Array2;
//! use ndlora::peft::PeftAdapter;
//! use ndlora::{LoraConfig, LoraLayer};
//!
//! // A "trained" layer: W (6×4) with rank-2 factors and s = 16/2 = 8.
//! let w = Array2::<f32>::from_shape_fn((6, 4), |(i, j)| (i as f32 - j as f32) * 0.1);
//! let a = Array2::from_shape_fn((2, 4), |(i, j)| ((i + j) as f32 * 0.3).sin());
//! let b = Array2::from_shape_fn((6, 2), |(i, j)| ((i * 2 + j) as f32 * 0.2).cos());
//! let config = LoraConfig { rank: 2, alpha: 16.0, ..Default::default() };
//! let layer = LoraLayer::from_parts(w.clone(), a, b, config)?;
//!
//! // Save it as a PEFT adapter for module `layers.0.q_proj`…
//! let dir = std::env::temp_dir().join(format!("ndlora-peft-doc-{}", std::process::id()));
//! PeftAdapter::from_layers([("layers.0.q_proj", &layer)])?.save(&dir)?;
//!
//! // …and load it back, as PEFT (or ndlora) would.
//! let adapter = PeftAdapter::<f32>::load(&dir)?;
//! assert_eq!(adapter.module_names(), ["layers.0.q_proj"]);
//! assert_eq!(adapter.rank("layers.0.q_proj")?, 2);
//! assert_eq!(adapter.scaling("layers.0.q_proj")?, 8.0);
//! let loaded = adapter.to_layer("layers.0.q_proj", w, None)?;
//! let x = Array2::<f32>::ones((3, 4));
//! assert_eq!(loaded.forward(x.view())?, layer.forward(x.view())?);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), ndlora::LoraError>(())
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::{Array1, Array2, ArrayView2};
use regex::Regex;
use safetensors::{Dtype, SafeTensors, View};
use serde_json::{Map, Value};

use crate::check::check_finite;
use crate::config::{LoraConfig, LoraInit};
use crate::error::{shape_str, LoraError, Result};
use crate::float::LoraFloat;
use crate::layer::LoraLayer;

/// The config file's name in an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The tensor file's name in an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The prefix PEFT puts before every module path in a tensor key (`PeftModel.base_model.model`).
pub const KEY_PREFIX: &str = "base_model.model.";

/// The PEFT version whose file format [`PeftAdapter::save`] writes, recorded as `peft_version`.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// Config fields that change what a LoRA adapter computes and that ndlora does not implement.
/// A config in which one of them holds anything but `null`, `false`, `[]` or `{}` is refused
/// with [`LoraError::PeftUnsupported`].
pub const UNSUPPORTED_FIELDS: &[&str] = &[
    "use_dora",
    "lora_bias",
    "use_qalora",
    "layer_replication",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "target_parameters",
    "trainable_token_indices",
    "modules_to_save",
    "monteclora_config",
    "velora_config",
    "kasa_config",
];

/// Which modules a PEFT config targets (`target_modules`). It decides where PEFT injects
/// adapters into a base model; ndlora loads the modules that have tensors in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// `null`: PEFT picks defaults for known architectures.
    Unspecified,
    /// A list of names: a module is targeted when its path equals a name or ends with
    /// `"." + name`.
    List(Vec<String>),
    /// A string: a regular expression the whole module path must match (Python
    /// `re.fullmatch`), or PEFT's shorthand `"all-linear"`.
    Regex(String),
}

impl TargetModules {
    /// Whether PEFT would inject an adapter into `module` (a path like `layers.0.q_proj`).
    /// [`Unspecified`](Self::Unspecified) and `"all-linear"` depend on the model and answer
    /// `true`.
    ///
    /// Errors if the regex is not one the `regex` crate accepts (e.g. look-around).
    pub fn matches(&self, module: &str) -> Result<bool> {
        Ok(match self {
            Self::Unspecified => true,
            Self::List(names) => names.iter().any(|t| suffix_match(t, module)),
            Self::Regex(re) if re.eq_ignore_ascii_case("all-linear") => true,
            Self::Regex(re) => {
                compile_regex("target_modules", &format!("^(?:{re})$"))?.is_match(module)
            }
        })
    }
}

/// `module == key` or `module` ends with `"." + key`.
fn suffix_match(key: &str, module: &str) -> bool {
    module == key
        || (module.len() > key.len()
            && module.ends_with(key)
            && module.as_bytes()[module.len() - key.len() - 1] == b'.')
}

fn compile_regex(field: &str, pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|_| LoraError::PeftConfigField {
        field: field.to_owned(),
        expected: "a regular expression in the syntax the regex crate supports",
        got: Value::from(pattern).to_string(),
    })
}

/// One `rank_pattern` / `alpha_pattern` key and how to match it.
#[derive(Debug, Clone)]
struct Pattern<T> {
    key: String,
    value: T,
    /// `None` when the key is a plain identifier: then `(.*\.)?KEY$` is the suffix rule.
    regex: Option<Regex>,
}

impl<T> Pattern<T> {
    fn new(field: &str, key: String, value: T) -> Result<Self> {
        let plain = !key.is_empty() && key.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
        let regex = if plain {
            None
        } else {
            Some(compile_regex(
                &format!("{field}.{key}"),
                &format!(r"^(?:.*\.)?(?:{key})$"),
            )?)
        };
        Ok(Self { key, value, regex })
    }

    /// PEFT's `re.match(rf"(.*\.)?({key})$", module)`.
    fn matches(&self, module: &str) -> bool {
        match &self.regex {
            None => suffix_match(&self.key, module),
            Some(re) => re.is_match(module),
        }
    }
}

/// The first pattern (in file order) that matches `module`, as PEFT's `get_pattern_key`.
fn resolve<T: Copy>(patterns: &[Pattern<T>], module: &str) -> Option<T> {
    patterns.iter().find(|p| p.matches(module)).map(|p| p.value)
}

/// A parsed and validated `adapter_config.json`. Immutable: the typed accessors and the raw
/// JSON ([`raw`](Self::raw), written back by [`PeftAdapter::save`]) always agree.
#[derive(Debug, Clone)]
pub struct PeftConfig {
    raw: Map<String, Value>,
    r: usize,
    lora_alpha: f64,
    use_rslora: bool,
    fan_in_fan_out: bool,
    lora_dropout: f64,
    target_modules: TargetModules,
    rank_pattern: Vec<Pattern<usize>>,
    alpha_pattern: Vec<Pattern<f64>>,
}

impl PartialEq for PeftConfig {
    /// Two configs are equal when their JSON documents are (everything else derives from it).
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl PeftConfig {
    /// Parses and validates the text of an `adapter_config.json`. Fields that are missing take
    /// PEFT's defaults (`r` 8, `lora_alpha` 8, `use_rslora` false, …) except `peft_type`, which
    /// is required and must be `"LORA"`. Unsupported features are refused (see the
    /// [module docs](self)).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| LoraError::Parse {
            path: CONFIG_FILE.to_owned(),
            format: "JSON",
            message: e.to_string(),
        })?;
        match value {
            Value::Object(raw) => Self::from_map(raw),
            other => Err(field_err("(root)", "a JSON object", &other)),
        }
    }

    fn from_map(raw: Map<String, Value>) -> Result<Self> {
        match raw.get("peft_type") {
            Some(Value::String(t)) if t == "LORA" => {}
            Some(other) => {
                return Err(LoraError::PeftUnsupported {
                    field: "peft_type".into(),
                    got: other.to_string(),
                    supported: "only \"LORA\"",
                })
            }
            None => {
                return Err(LoraError::PeftConfigField {
                    field: "peft_type".into(),
                    expected: "\"LORA\"",
                    got: "missing".into(),
                })
            }
        }
        match raw.get("bias") {
            None | Some(Value::Null) => {}
            Some(Value::String(b)) if b == "none" => {}
            Some(other) => {
                return Err(LoraError::PeftUnsupported {
                    field: "bias".into(),
                    got: other.to_string(),
                    supported: "only \"none\" (biases are not part of the adapter)",
                })
            }
        }
        for &field in UNSUPPORTED_FIELDS {
            if let Some(v) = raw.get(field) {
                let unset = match v {
                    Value::Null | Value::Bool(false) => true,
                    Value::Array(a) => a.is_empty(),
                    Value::Object(o) => o.is_empty(),
                    _ => false,
                };
                if !unset {
                    return Err(LoraError::PeftUnsupported {
                        field: field.into(),
                        got: v.to_string(),
                        supported: "null or false (plain LoRA)",
                    });
                }
            }
        }

        let r = get_rank(&raw, "r")?.unwrap_or(8);
        let lora_alpha = get_alpha(raw.get("lora_alpha"), "lora_alpha")?.unwrap_or(8.0);
        let use_rslora = get_bool(&raw, "use_rslora")?;
        let fan_in_fan_out = get_bool(&raw, "fan_in_fan_out")?;
        let lora_dropout = match raw.get("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(v) => match v.as_f64() {
                Some(p) if (0.0..=1.0).contains(&p) => p,
                _ => return Err(field_err("lora_dropout", "a number in [0, 1]", v)),
            },
        };
        let target_modules = match raw.get("target_modules") {
            None | Some(Value::Null) => TargetModules::Unspecified,
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(items)) => TargetModules::List(
                items
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => Ok(s.clone()),
                        other => Err(field_err("target_modules", "a list of strings", other)),
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(other) => {
                return Err(field_err(
                    "target_modules",
                    "null, a string or a list of strings",
                    other,
                ))
            }
        };
        let rank_pattern = get_patterns(&raw, "rank_pattern", get_rank_value)?;
        let alpha_pattern = get_patterns(&raw, "alpha_pattern", |field, v| {
            get_alpha(Some(v), field).map(|a| a.unwrap_or(lora_alpha))
        })?;
        Ok(Self {
            raw,
            r,
            lora_alpha,
            use_rslora,
            fan_in_fan_out,
            lora_dropout,
            target_modules,
            rank_pattern,
            alpha_pattern,
        })
    }

    /// The config as pretty-printed JSON, as written to `adapter_config.json`.
    pub fn to_json_string(&self) -> String {
        let mut text = serde_json::to_string_pretty(&self.raw).expect("a JSON map serialises");
        text.push('\n');
        text
    }

    /// The whole JSON document, including the fields ndlora does not interpret.
    pub fn raw(&self) -> &Map<String, Value> {
        &self.raw
    }

    /// The global rank `r`.
    pub fn r(&self) -> usize {
        self.r
    }

    /// The global `lora_alpha`.
    pub fn lora_alpha(&self) -> f64 {
        self.lora_alpha
    }

    /// `use_rslora`: s = α/√r instead of α/r.
    pub fn use_rslora(&self) -> bool {
        self.use_rslora
    }

    /// `fan_in_fan_out`: the base model stores its weights transposed, in×out (GPT-2's
    /// `Conv1D`); the LoRA factors keep their shapes. See [`PeftAdapter::to_layer`].
    pub fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }

    /// `lora_dropout` (training only).
    pub fn lora_dropout(&self) -> f64 {
        self.lora_dropout
    }

    /// `target_modules`.
    pub fn target_modules(&self) -> &TargetModules {
        &self.target_modules
    }

    /// `peft_version`, the PEFT version that wrote the file, if recorded.
    pub fn peft_version(&self) -> Option<&str> {
        self.raw.get("peft_version").and_then(Value::as_str)
    }

    /// `rank_pattern` in file order: (key, rank).
    pub fn rank_pattern(&self) -> Vec<(&str, usize)> {
        self.rank_pattern
            .iter()
            .map(|p| (p.key.as_str(), p.value))
            .collect()
    }

    /// `alpha_pattern` in file order: (key, alpha).
    pub fn alpha_pattern(&self) -> Vec<(&str, f64)> {
        self.alpha_pattern
            .iter()
            .map(|p| (p.key.as_str(), p.value))
            .collect()
    }

    /// The rank PEFT gives `module`: the first `rank_pattern` key matching it, else `r`.
    pub fn rank_for(&self, module: &str) -> usize {
        resolve(&self.rank_pattern, module).unwrap_or(self.r)
    }

    /// The alpha PEFT gives `module`: the first `alpha_pattern` key matching it, else
    /// `lora_alpha`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        resolve(&self.alpha_pattern, module).unwrap_or(self.lora_alpha)
    }

    /// The scaling PEFT gives `module`: α/r, or α/√r with `use_rslora` (each per module).
    pub fn scaling_for(&self, module: &str) -> f64 {
        scaling_of(
            self.alpha_for(module),
            self.rank_for(module),
            self.use_rslora,
        )
    }
}

/// PEFT's `lora_alpha / r` or `lora_alpha / math.sqrt(r)` (Python floats are f64, and both
/// `/` and `sqrt` are correctly rounded there as here).
fn scaling_of(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    let r = r as f64;
    if use_rslora {
        alpha / r.sqrt()
    } else {
        alpha / r
    }
}

fn field_err(field: &str, expected: &'static str, got: &Value) -> LoraError {
    LoraError::PeftConfigField {
        field: field.to_owned(),
        expected,
        got: got.to_string(),
    }
}

fn get_bool(raw: &Map<String, Value>, field: &str) -> Result<bool> {
    match raw.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(field_err(field, "true or false", other)),
    }
}

fn get_rank_value(field: &str, v: &Value) -> Result<usize> {
    v.as_u64()
        .filter(|&r| r > 0)
        .and_then(|r| usize::try_from(r).ok())
        .ok_or_else(|| field_err(field, "a positive integer", v))
}

fn get_rank(raw: &Map<String, Value>, field: &str) -> Result<Option<usize>> {
    match raw.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => get_rank_value(field, v).map(Some),
    }
}

fn get_alpha(v: Option<&Value>, field: &str) -> Result<Option<f64>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(a) if a.is_finite() => Ok(Some(a)),
            _ => Err(field_err(field, "a finite number", v)),
        },
    }
}

fn get_patterns<T>(
    raw: &Map<String, Value>,
    field: &str,
    parse: impl Fn(&str, &Value) -> Result<T>,
) -> Result<Vec<Pattern<T>>> {
    match raw.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(entries)) => entries
            .iter()
            .map(|(key, v)| {
                let name = format!("{field}.{key}");
                Pattern::new(field, key.clone(), parse(&name, v)?)
            })
            .collect(),
        Some(other) => Err(field_err(field, "an object of module patterns", other)),
    }
}

/// One adapted module: its factors and the r, α it was configured with.
#[derive(Debug, Clone, PartialEq)]
struct Module<A> {
    a: Array2<A>,
    b: Array2<A>,
}

/// A PEFT LoRA adapter: a [`PeftConfig`] and, per adapted module, the factors A (r×in) and
/// B (out×r) in float type `A`. See the [module docs](self) for the file format and an example.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapter<A: LoraFloat> {
    config: PeftConfig,
    modules: BTreeMap<String, Module<A>>,
}

/// A module's (A, B) while a file is read: either may be missing so far.
type Halves<A> = (Option<Array2<A>>, Option<Array2<A>>);

/// Which factor a tensor key holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Factor {
    A,
    B,
}

/// Splits `base_model.model.<module>.lora_{A,B}[.default].weight` into module and factor.
fn parse_key(name: &str) -> Option<(&str, Factor)> {
    let rest = name.strip_prefix(KEY_PREFIX)?;
    for (suffix, factor) in [
        (".lora_A.weight", Factor::A),
        (".lora_B.weight", Factor::B),
        (".lora_A.default.weight", Factor::A),
        (".lora_B.default.weight", Factor::B),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            if valid_module_name(module) {
                return Some((module, factor));
            }
        }
    }
    None
}

/// Non-empty, dot-separated, no empty component.
fn valid_module_name(module: &str) -> bool {
    !module.is_empty() && module.split('.').all(|c| !c.is_empty())
}

fn key_of(module: &str, factor: Factor) -> String {
    let f = match factor {
        Factor::A => "lora_A",
        Factor::B => "lora_B",
    };
    format!("{KEY_PREFIX}{module}.{f}.weight")
}

/// Decodes a 2-D tensor of dtype F32, F64, F16 or BF16 into `A` (rounding to nearest).
fn decode<A: LoraFloat>(
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    data: &[u8],
) -> Result<Array2<A>> {
    let &[rows, cols] = shape else {
        return Err(LoraError::PeftTensor {
            name: name.to_owned(),
            expected: "a 2-D tensor",
            got: shape_str(shape),
        });
    };
    if rows == 0 || cols == 0 {
        return Err(LoraError::PeftTensor {
            name: name.to_owned(),
            expected: "a non-empty tensor",
            got: shape_str(shape),
        });
    }
    fn each<const N: usize, A: LoraFloat>(data: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<A> {
        data.chunks_exact(N)
            .map(|c| {
                let mut buf = [0u8; N];
                buf.copy_from_slice(c);
                A::from_f64_lossy(f(buf))
            })
            .collect()
    }
    let values: Vec<A> = match dtype {
        Dtype::F32 => each(data, |b| f64::from(f32::from_le_bytes(b))),
        Dtype::F64 => each(data, f64::from_le_bytes),
        Dtype::F16 => each(data, |b| half::f16::from_le_bytes(b).to_f64()),
        Dtype::BF16 => each(data, |b| half::bf16::from_le_bytes(b).to_f64()),
        other => {
            return Err(LoraError::PeftTensor {
                name: name.to_owned(),
                expected: "dtype F32, F64, F16 or BF16",
                got: format!("{other:?}"),
            })
        }
    };
    // safetensors has checked that the byte length matches shape × dtype size.
    Array2::from_shape_vec((rows, cols), values).map_err(|_| LoraError::PeftTensor {
        name: name.to_owned(),
        expected: "data whose length matches the shape",
        got: format!("{} bytes", data.len()),
    })
}

/// A tensor to write, in the layout safetensors wants.
struct OutTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OutTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// `m` as little-endian bytes of `A`'s own dtype (row-major).
fn encode<A: LoraFloat>(m: ArrayView2<'_, A>) -> OutTensor {
    let (dtype, width) = if A::NAME == "f32" {
        (Dtype::F32, 4)
    } else {
        (Dtype::F64, 8)
    };
    let mut data = Vec::with_capacity(m.len() * width);
    for &v in m.iter() {
        if width == 4 {
            data.extend_from_slice(&(v.into_f64() as f32).to_le_bytes());
        } else {
            data.extend_from_slice(&v.into_f64().to_le_bytes());
        }
    }
    OutTensor {
        dtype,
        shape: m.shape().to_vec(),
        data,
    }
}

/// The most frequent value (ties: the first one seen) — used for the global r and α.
fn most_common<T: Copy, K: Eq + std::hash::Hash>(values: &[T], key: impl Fn(T) -> K) -> T {
    let mut counts: HashMap<K, usize> = HashMap::new();
    for &v in values {
        *counts.entry(key(v)).or_default() += 1;
    }
    let best = values.iter().map(|&v| counts[&key(v)]).max().unwrap_or(0);
    *values
        .iter()
        .find(|&&v| counts[&key(v)] == best)
        .expect("values is not empty")
}

/// An alpha as JSON: an integer when it is one (as PEFT configs usually hold), else a float.
fn alpha_json(alpha: f64) -> Value {
    if alpha.fract() == 0.0 && alpha.abs() < 9.0e15 {
        Value::from(alpha as i64)
    } else {
        Value::from(alpha)
    }
}

impl<A: LoraFloat> PeftAdapter<A> {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    ///
    /// Every tensor must be a `lora_A` / `lora_B` weight of some module (keys with or without
    /// the adapter name `default`), 2-D, non-empty, finite after conversion to `A`, in F32,
    /// F64, F16 or BF16; each module needs both, with A r×in and B out×r where r is the
    /// module's rank from the config. Errors name the file, field, tensor or module at fault;
    /// corrupt, truncated or hostile files are errors, never panics (the safetensors header is
    /// validated against the file's real length before any tensor is read).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join(CONFIG_FILE);
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| LoraError::io(&config_path, &e))?;
        let config = PeftConfig::from_json_str(&text).map_err(|e| match e {
            LoraError::Parse {
                format, message, ..
            } => LoraError::Parse {
                path: config_path.display().to_string(),
                format,
                message,
            },
            other => other,
        })?;

        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&weights_path).map_err(|e| LoraError::io(&weights_path, &e))?;
        Self::from_config_and_bytes(config, &bytes, &weights_path.display().to_string())
    }

    /// Like [`load`](Self::load), from the two files' contents already in memory: the text of
    /// `adapter_config.json` and the bytes of `adapter_model.safetensors`.
    pub fn from_bytes(config_json: &str, safetensors: &[u8]) -> Result<Self> {
        let config = PeftConfig::from_json_str(config_json)?;
        Self::from_config_and_bytes(config, safetensors, WEIGHTS_FILE)
    }

    fn from_config_and_bytes(config: PeftConfig, bytes: &[u8], path: &str) -> Result<Self> {
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| LoraError::Parse {
            path: path.to_owned(),
            format: "safetensors",
            message: e.to_string(),
        })?;
        Self::from_safetensors(config, &tensors)
    }

    fn from_safetensors(config: PeftConfig, tensors: &SafeTensors<'_>) -> Result<Self> {
        let mut halves: BTreeMap<String, Halves<A>> = BTreeMap::new();
        let mut names = tensors.names();
        names.sort_unstable();
        for name in names {
            let Some((module, factor)) = parse_key(name) else {
                return Err(LoraError::PeftTensor {
                    name: name.to_owned(),
                    expected: "a key base_model.model.<module>.lora_A.weight or .lora_B.weight",
                    got: "another key".into(),
                });
            };
            let view = tensors.tensor(name).map_err(|e| LoraError::Parse {
                path: WEIGHTS_FILE.into(),
                format: "safetensors",
                message: e.to_string(),
            })?;
            let m = decode::<A>(name, view.dtype(), view.shape(), view.data())?;
            let what = match factor {
                Factor::A => "lora_A",
                Factor::B => "lora_B",
            };
            check_finite(what, m.view()).map_err(|e| e.in_module(module))?;
            let slot = halves.entry(module.to_owned()).or_default();
            let slot = match factor {
                Factor::A => &mut slot.0,
                Factor::B => &mut slot.1,
            };
            if slot.is_some() {
                return Err(LoraError::PeftTensor {
                    name: name.to_owned(),
                    expected: "one tensor per module and factor",
                    got: "a second one (with and without the adapter name `default`)".into(),
                });
            }
            *slot = Some(m);
        }
        if halves.is_empty() {
            return Err(LoraError::MissingTensor {
                name: key_of("<module>", Factor::A),
            });
        }
        let mut modules = BTreeMap::new();
        for (module, pair) in halves {
            let (a, b) = match pair {
                (Some(a), Some(b)) => (a, b),
                (None, _) => {
                    return Err(LoraError::MissingTensor {
                        name: key_of(&module, Factor::A),
                    })
                }
                (_, None) => {
                    return Err(LoraError::MissingTensor {
                        name: key_of(&module, Factor::B),
                    })
                }
            };
            let r = config.rank_for(&module);
            let mismatch = match (a.nrows() == r, b.ncols() == r) {
                (true, true) => None,
                (false, _) => Some((
                    "lora_A (rank from the config)",
                    a.shape(),
                    format!("[{r}, _]"),
                )),
                (_, false) => Some((
                    "lora_B (rank from the config)",
                    b.shape(),
                    format!("[_, {r}]"),
                )),
            };
            if let Some((what, got, expected)) = mismatch {
                return Err(LoraError::ShapeMismatch {
                    what,
                    expected,
                    got: shape_str(got),
                }
                .in_module(&module));
            }
            modules.insert(module, Module { a, b });
        }
        Ok(Self { config, modules })
    }

    /// The adapted modules' paths without the `base_model.model.` prefix (e.g.
    /// `layers.0.q_proj`), sorted.
    pub fn module_names(&self) -> Vec<String> {
        self.modules.keys().cloned().collect()
    }

    /// Whether the adapter holds factors for `module`.
    pub fn contains(&self, module: &str) -> bool {
        self.modules.contains_key(module)
    }

    /// The parsed `adapter_config.json`.
    pub fn config(&self) -> &PeftConfig {
        &self.config
    }

    fn module(&self, module: &str) -> Result<&Module<A>> {
        self.modules
            .get(module)
            .ok_or_else(|| LoraError::UnknownModule {
                module: module.to_owned(),
            })
    }

    /// The rank r of `module` (`rank_pattern` or `r`).
    pub fn rank(&self, module: &str) -> Result<usize> {
        Ok(self.module(module)?.a.nrows())
    }

    /// The α of `module` (`alpha_pattern` or `lora_alpha`).
    pub fn alpha(&self, module: &str) -> Result<f64> {
        self.module(module)?;
        Ok(self.config.alpha_for(module))
    }

    /// The scaling s of `module`: α/r, or α/√r with `use_rslora`.
    pub fn scaling(&self, module: &str) -> Result<f64> {
        self.module(module)?;
        Ok(self.config.scaling_for(module))
    }

    /// The factors (A, B) of `module`: A is r×in (`lora_A.weight`), B is out×r
    /// (`lora_B.weight`).
    pub fn factors(&self, module: &str) -> Result<(ArrayView2<'_, A>, ArrayView2<'_, A>)> {
        let m = self.module(module)?;
        Ok((m.a.view(), m.b.view()))
    }

    /// A [`LoraLayer`] for `module`: your base weight and bias with this adapter's factors,
    /// rank, α and `use_rslora`; `dropout` = `lora_dropout`, unmerged. Its forward is PEFT's
    /// Y = X Wᵀ + b + s·(X Aᵀ) Bᵀ.
    ///
    /// `base_weight` is the base layer's weight as the model stores it: out×in
    /// (`nn.Linear`), or in×out when the config has `fan_in_fan_out` (GPT-2's `Conv1D`), in
    /// which case it is transposed here (the LoRA factors are stored out×r / r×in either way).
    /// `bias`, if given, has length out.
    ///
    /// Errors: unknown module, a base weight whose shape does not fit the factors, a bias of
    /// the wrong length, non-finite values, or a config `LoraLayer` does not support (rank
    /// above min(in, out), which PEFT allows, or `lora_dropout` = 1).
    pub fn to_layer(
        &self,
        module: &str,
        base_weight: Array2<A>,
        bias: Option<Array1<A>>,
    ) -> Result<LoraLayer<A>> {
        let m = self.module(module)?;
        let (d, k) = (m.b.nrows(), m.a.ncols());
        let expected = if self.config.fan_in_fan_out {
            [k, d]
        } else {
            [d, k]
        };
        if base_weight.shape() != expected {
            return Err(LoraError::ShapeMismatch {
                what: if self.config.fan_in_fan_out {
                    "base_weight (in×out, fan_in_fan_out)"
                } else {
                    "base_weight (out×in)"
                },
                expected: shape_str(&expected),
                got: shape_str(base_weight.shape()),
            }
            .in_module(module));
        }
        let w = if self.config.fan_in_fan_out {
            base_weight
                .reversed_axes()
                .as_standard_layout()
                .into_owned()
        } else {
            base_weight
        };
        let config = LoraConfig {
            rank: m.a.nrows(),
            alpha: self.config.alpha_for(module),
            dropout: self.config.lora_dropout,
            use_rslora: self.config.use_rslora,
            init: LoraInit::KaimingUniform,
            ..LoraConfig::default()
        };
        let layer = LoraLayer::from_parts(w, m.a.clone(), m.b.clone(), config)
            .map_err(|e| e.in_module(module))?;
        match bias {
            Some(b) => layer.with_bias(b).map_err(|e| e.in_module(module)),
            None => Ok(layer),
        }
    }

    /// An adapter from trained layers, keyed by module path (e.g. `layers.0.q_proj`, the
    /// path in the base model PEFT will see), ready to [`save`](Self::save).
    ///
    /// The config gets PEFT's fields: `r` and `lora_alpha` are the most common rank and α
    /// among the layers, and modules that differ get `rank_pattern` / `alpha_pattern` entries
    /// keyed by their path (longest first, so that a key cannot capture a longer path that
    /// ends with it); `use_rslora` is the most common setting, and a layer with the other
    /// setting is expressed through its α; `target_modules` lists the paths; `lora_dropout`
    /// is the largest layer dropout. A layer whose scaling was changed with
    /// [`LoraLayer::set_scaling`] is saved with the α that gives that scaling.
    ///
    /// Errors (naming the module): no layers, an invalid or duplicate path, a merged layer
    /// (its W already holds s·B A, so the factors no longer describe a change to the base a
    /// PEFT user would load them onto: unmerge it first), or a scaling that no α reproduces
    /// exactly as PEFT computes α/r (or α/√r).
    pub fn from_layers<'a, I>(layers: I) -> Result<Self>
    where
        I: IntoIterator<Item = (&'a str, &'a LoraLayer<A>)>,
    {
        let mut collected: BTreeMap<String, &LoraLayer<A>> = BTreeMap::new();
        for (name, layer) in layers {
            if !valid_module_name(name) {
                return Err(LoraError::InvalidValue {
                    what: "module path",
                    expected: "a non-empty dot-separated path without empty components",
                    got: format!("{name:?}"),
                });
            }
            if layer.is_merged() {
                return Err(LoraError::MergeState {
                    operation: "PeftAdapter::from_layers",
                    expected: false,
                }
                .in_module(name));
            }
            if collected.insert(name.to_owned(), layer).is_some() {
                return Err(LoraError::InvalidValue {
                    what: "module path",
                    expected: "each module once",
                    got: format!("{name:?} twice"),
                });
            }
        }
        if collected.is_empty() {
            return Err(LoraError::InvalidValue {
                what: "layers",
                expected: "at least one layer",
                got: "none".into(),
            });
        }
        let entries: Vec<(&str, &LoraLayer<A>)> =
            collected.iter().map(|(n, l)| (n.as_str(), *l)).collect();
        let flags: Vec<bool> = entries.iter().map(|(_, l)| l.config().use_rslora).collect();
        let use_rslora = most_common(&flags, |f| f);

        // Per module: rank and the α that gives its scaling under the global use_rslora.
        let mut specs: Vec<(usize, f64)> = Vec::with_capacity(entries.len());
        for &(name, layer) in &entries {
            let (r, s, config) = (layer.rank(), layer.scaling(), layer.config());
            let alpha =
                if config.use_rslora == use_rslora && config.scaling().to_bits() == s.to_bits() {
                    config.alpha
                } else if use_rslora {
                    s * (r as f64).sqrt()
                } else {
                    s * r as f64
                };
            if scaling_of(alpha, r, use_rslora).to_bits() != s.to_bits() {
                return Err(LoraError::InvalidValue {
                    what: "scaling",
                    expected: "α/r (or α/√r with rsLoRA) for some α, as PEFT computes it",
                    got: s.to_string(),
                }
                .in_module(name));
            }
            specs.push((r, alpha));
        }
        let ranks: Vec<usize> = specs.iter().map(|s| s.0).collect();
        let alphas: Vec<f64> = specs.iter().map(|s| s.1).collect();
        let r = most_common(&ranks, |r| r);
        let lora_alpha = most_common(&alphas, f64::to_bits);

        // Pattern entries for the modules that differ, then for any module a key captured by
        // mistake, until every module resolves to its own (r, α).
        let mut rank_keys: Vec<usize> = Vec::new();
        let mut alpha_keys: Vec<usize> = Vec::new();
        for (i, &(mr, ma)) in specs.iter().enumerate() {
            if mr != r {
                rank_keys.push(i);
            }
            if ma.to_bits() != lora_alpha.to_bits() {
                alpha_keys.push(i);
            }
        }
        let by_length = |keys: &mut Vec<usize>| {
            keys.sort_by(|&x, &y| {
                entries[y]
                    .0
                    .len()
                    .cmp(&entries[x].0.len())
                    .then(entries[x].0.cmp(entries[y].0))
            });
            keys.dedup();
        };
        let build = |rank_keys: &[usize], alpha_keys: &[usize]| -> Result<PeftConfig> {
            let rank_pattern: Map<String, Value> = rank_keys
                .iter()
                .map(|&i| (entries[i].0.to_owned(), Value::from(specs[i].0)))
                .collect();
            let alpha_pattern: Map<String, Value> = alpha_keys
                .iter()
                .map(|&i| (entries[i].0.to_owned(), alpha_json(specs[i].1)))
                .collect();
            let dropout = entries
                .iter()
                .map(|(_, l)| l.config().dropout)
                .fold(0.0, f64::max);
            let targets: Vec<Value> = entries.iter().map(|(n, _)| Value::from(*n)).collect();
            PeftConfig::from_map(peft_config_json(
                r,
                lora_alpha,
                use_rslora,
                dropout,
                rank_pattern,
                alpha_pattern,
                targets,
            ))
        };
        let mut config;
        loop {
            by_length(&mut rank_keys);
            by_length(&mut alpha_keys);
            config = build(&rank_keys, &alpha_keys)?;
            let mut changed = false;
            for (i, &(name, _)) in entries.iter().enumerate() {
                let (mr, ma) = specs[i];
                if config.rank_for(name) != mr && !rank_keys.contains(&i) {
                    rank_keys.push(i);
                    changed = true;
                }
                if config.alpha_for(name).to_bits() != ma.to_bits() && !alpha_keys.contains(&i) {
                    alpha_keys.push(i);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let mut modules = BTreeMap::new();
        for (i, &(name, layer)) in entries.iter().enumerate() {
            let (mr, ma) = specs[i];
            if config.rank_for(name) != mr || config.alpha_for(name).to_bits() != ma.to_bits() {
                return Err(LoraError::InvalidValue {
                    what: "module path",
                    expected: "a path no rank_pattern/alpha_pattern key of another module captures",
                    got: format!("{name:?}"),
                }
                .in_module(name));
            }
            modules.insert(
                name.to_owned(),
                Module {
                    a: layer.weight_a().to_owned(),
                    b: layer.weight_b().to_owned(),
                },
            );
        }
        Ok(Self { config, modules })
    }

    /// Writes `dir/adapter_config.json` (the config's JSON, keys as PEFT writes them) and
    /// `dir/adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight` /
    /// `.lora_B.weight` without adapter name, dtype F32 or F64 as `A`, metadata
    /// `{"format": "pt"}`), creating `dir` if needed. The tensor file is written to a
    /// temporary file and renamed into place.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| LoraError::io(dir, &e))?;
        let mut tensors: Vec<(String, OutTensor)> = Vec::with_capacity(2 * self.modules.len());
        for (name, m) in &self.modules {
            tensors.push((key_of(name, Factor::A), encode(m.a.view())));
            tensors.push((key_of(name, Factor::B), encode(m.b.view())));
        }
        let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let weights_path = dir.join(WEIGHTS_FILE);
        safetensors::serialize_to_file(
            tensors.iter().map(|(k, t)| (k.as_str(), t)),
            Some(metadata),
            &weights_path,
        )
        .map_err(|e| match e {
            safetensors::SafeTensorError::IoError(io) => LoraError::io(&weights_path, &io),
            other => LoraError::Parse {
                path: weights_path.display().to_string(),
                format: "safetensors",
                message: other.to_string(),
            },
        })?;
        let config_path = dir.join(CONFIG_FILE);
        std::fs::write(&config_path, self.config.to_json_string())
            .map_err(|e| LoraError::io(&config_path, &e))
    }
}

/// A complete PEFT 0.21.2 `LoraConfig` document (every field `save_pretrained` writes, keys
/// sorted as PEFT writes them) for a plain LoRA adapter.
fn peft_config_json(
    r: usize,
    lora_alpha: f64,
    use_rslora: bool,
    lora_dropout: f64,
    rank_pattern: Map<String, Value>,
    alpha_pattern: Map<String, Value>,
    target_modules: Vec<Value>,
) -> Map<String, Value> {
    let fields: Vec<(&str, Value)> = vec![
        ("alora_invocation_tokens", Value::Null),
        ("alpha_pattern", Value::Object(alpha_pattern)),
        ("arrow_config", Value::Null),
        ("auto_mapping", Value::Null),
        ("base_model_name_or_path", Value::Null),
        ("bias", Value::from("none")),
        ("corda_config", Value::Null),
        ("ensure_weight_tying", Value::Bool(false)),
        ("eva_config", Value::Null),
        ("exclude_modules", Value::Null),
        ("fan_in_fan_out", Value::Bool(false)),
        ("inference_mode", Value::Bool(true)),
        ("init_lora_weights", Value::Bool(true)),
        ("kasa_config", Value::Null),
        ("layer_replication", Value::Null),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("loftq_config", Value::Object(Map::new())),
        ("lora_alpha", alpha_json(lora_alpha)),
        ("lora_bias", Value::Bool(false)),
        ("lora_dropout", Value::from(lora_dropout)),
        ("lora_ga_config", Value::Null),
        ("megatron_config", Value::Null),
        ("megatron_core", Value::from("megatron.core")),
        ("modules_to_save", Value::Null),
        ("monteclora_config", Value::Null),
        ("peft_type", Value::from("LORA")),
        ("peft_version", Value::from(PEFT_FORMAT_VERSION)),
        ("qalora_group_size", Value::from(16)),
        ("r", Value::from(r)),
        ("rank_pattern", Value::Object(rank_pattern)),
        ("revision", Value::Null),
        ("target_modules", Value::Array(target_modules)),
        ("target_parameters", Value::Null),
        ("task_type", Value::Null),
        ("trainable_token_indices", Value::Null),
        ("use_bdlora", Value::Null),
        ("use_dora", Value::Bool(false)),
        ("use_qalora", Value::Bool(false)),
        ("use_rslora", Value::Bool(use_rslora)),
        ("velora_config", Value::Null),
    ];
    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}
