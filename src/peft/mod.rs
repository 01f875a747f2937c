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
//! the factor type `A::Factor` — f32 for `f32`, `bf16` and `f16` adapters, f64 for `f64` —
//! except that a `bf16` / `f16` adapter keeps tensors of its own dtype as they are);
//! [`PeftAdapter::to_layer`] joins one module's factors with the base
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
//! ## Hostile files
//!
//! Adapter directories come from elsewhere, so reading one costs time and memory bounded by
//! the files' real sizes and these limits, and every refusal is a typed [`LoraError`] naming
//! the file, field or tensor:
//!
//! * each path must be a regular file after following symbolic links ([`LoraError::NotAFile`]
//!   for a directory, FIFO, device or socket, refused unread; a FIFO cannot block the open);
//! * `adapter_config.json` at most [`MAX_CONFIG_SIZE`] bytes ([`LoraError::FileTooLarge`]);
//! * `rank_pattern` / `alpha_pattern` keys that are regexes: at most [`PATTERN_MAX_LEN`]
//!   bytes of source and [`PATTERN_SIZE_LIMIT`] bytes compiled each, a lazy-DFA cache of
//!   [`PATTERN_DFA_SIZE_LIMIT`], and [`PATTERN_BUDGET`] for all of them together
//!   ([`LoraError::PeftPatternTooLarge`]); matching is linear in the module path's length.
//!   Keys with no regex syntax but `.` (module paths) are matched without a regex;
//! * the safetensors header at most [`MAX_HEADER_SIZE`] bytes, checked with overflow-checked
//!   arithmetic against the file's size (offsets, element counts × dtype sizes, contiguous
//!   coverage of the data) before the data is allocated or the `safetensors` crate sees it.
//!
//! The writer refuses what the reader would: [`PeftAdapter::from_layers`] and
//! [`PeftAdapter::save`] check the same things before anything is written, and `save` renames
//! complete, synced temporary files into place.
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

mod config;
mod stored;
pub(crate) mod tensors;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, FileType};
use std::io::{Read, Write};
use std::path::Path;

use ndarray::{Array1, Array2, ArrayView2};
use serde_json::{Map, Value};

pub use config::{
    PeftConfig, TargetModules, MAX_CONFIG_SIZE, PATTERN_BUDGET, PATTERN_DFA_SIZE_LIMIT,
    PATTERN_MAX_LEN, PATTERN_SIZE_LIMIT, UNSUPPORTED_FIELDS,
};
pub use tensors::MAX_HEADER_SIZE;

use crate::check::check_finite;
use crate::config::{LoraConfig, LoraInit};
use crate::error::{shape_str, LoraError, Result};
use crate::float::LoraFloat;
use crate::layer::LoraLayer;
use config::{alpha_json, check_config_size, peft_config_json, scaling_of};
use stored::Stored;
use tensors::{key_of, read_file, read_halves, serialize, valid_module_name, Factor};

/// The config file's name in an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The tensor file's name in an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The prefix PEFT puts before every module path in a tensor key (`PeftModel.base_model.model`).
pub const KEY_PREFIX: &str = "base_model.model.";

/// The PEFT version whose file format [`PeftAdapter::save`] writes, recorded as `peft_version`.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// Opens `path` for reading (following symbolic links) and returns it with its size, refusing
/// anything but a regular file with [`LoraError::NotAFile`] before a byte is read: a FIFO
/// could block the reader forever, a device such as `/dev/zero` never ends. The path is
/// checked before it is opened (opening a device can have effects of its own) and the opened
/// handle again (the path may have changed in between). On Unix the open is non-blocking, so
/// that even a FIFO swapped in between cannot block it (the flag means nothing for a regular
/// file, which is all that is then read), and cannot make a terminal the controlling one.
pub(crate) fn open_regular(path: &Path) -> Result<(File, u64)> {
    let refuse = |kind| LoraError::NotAFile {
        path: path.display().to_string(),
        kind,
    };
    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.is_file() {
            return Err(refuse(file_kind(meta.file_type())));
        }
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path).map_err(|e| LoraError::io(path, &e))?;
    let meta = file.metadata().map_err(|e| LoraError::io(path, &e))?;
    if !meta.is_file() {
        return Err(refuse(file_kind(meta.file_type())));
    }
    Ok((file, meta.len()))
}

/// What a file that is not a regular file is, for [`LoraError::NotAFile`].
fn file_kind(ft: FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Reads and validates `dir/adapter_config.json` (a regular file of at most
/// [`MAX_CONFIG_SIZE`] bytes); the fields in `allowed` are accepted although they are in
/// [`UNSUPPORTED_FIELDS`]. Parse errors name the file.
pub(crate) fn read_config(dir: &Path, allowed: &[&str]) -> Result<PeftConfig> {
    let config_path = dir.join(CONFIG_FILE);
    let shown = config_path.display().to_string();
    let (file, size) = open_regular(&config_path)?;
    check_config_size(&shown, size)?;
    let mut text = String::new();
    file.take(size)
        .read_to_string(&mut text)
        .map_err(|e| LoraError::io(&config_path, &e))?;
    let raw = match serde_json::from_str(&text) {
        Ok(Value::Object(raw)) => raw,
        Ok(_) => return PeftConfig::from_json_str(&text),
        Err(e) => {
            return Err(LoraError::Parse {
                path: shown,
                format: "JSON",
                message: e.to_string(),
            })
        }
    };
    PeftConfig::from_map(raw, allowed)
}

/// What the reader requires of one module's factors, checked by the writer too: A (r×in) and
/// B (out×r) finite, with r the module's rank in the config.
pub(crate) fn check_module<A: LoraFloat>(
    module: &str,
    a: ArrayView2<'_, A>,
    b: ArrayView2<'_, A>,
    r: usize,
) -> Result<()> {
    check_finite("lora_A", a)
        .and_then(|()| check_finite("lora_B", b))
        .map_err(|e| e.in_module(module))?;
    check_ranks(module, a.shape(), b.shape(), r)
}

/// [`check_module`] on factors as an adapter holds them.
fn check_stored<A: LoraFloat>(module: &str, a: &Stored<A>, b: &Stored<A>, r: usize) -> Result<()> {
    a.check_finite("lora_A")
        .and_then(|()| b.check_finite("lora_B"))
        .map_err(|e| e.in_module(module))?;
    let (a, b) = (a.dim(), b.dim());
    check_ranks(module, &[a.0, a.1], &[b.0, b.1], r)
}

/// A of shape `a` (r×in) and B of shape `b` (out×r), r the module's rank in the config.
pub(crate) fn check_ranks(module: &str, a: &[usize], b: &[usize], r: usize) -> Result<()> {
    let mismatch = match (a.first() == Some(&r), b.get(1) == Some(&r)) {
        (true, true) => return Ok(()),
        (false, _) => ("lora_A (rank from the config)", a, format!("[{r}, _]")),
        (_, false) => ("lora_B (rank from the config)", b, format!("[_, {r}]")),
    };
    Err(LoraError::ShapeMismatch {
        what: mismatch.0,
        expected: mismatch.2,
        got: shape_str(mismatch.1),
    }
    .in_module(module))
}

/// Writes `bytes` to a new temporary file in `dir` (deleted again if anything fails), synced
/// to disk, to be renamed over `path` once every file of the adapter is ready.
fn write_temp(dir: &Path, path: &Path, bytes: &[u8]) -> Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(".ndlora-").suffix(".tmp");
    // Like `std::fs::write`: read-write for everyone the umask allows, not only the owner.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut temp = builder
        .tempfile_in(dir)
        .map_err(|e| LoraError::io(dir, &e))?;
    temp.write_all(bytes)
        .and_then(|()| temp.as_file().sync_all())
        .map_err(|e| LoraError::io(path, &e))?;
    Ok(temp)
}
/// The (A, B) views [`PeftAdapter::factors`] returns.
pub type FactorViews<'a, F> = (ArrayView2<'a, F>, ArrayView2<'a, F>);

/// One adapted module's factors (its r and α are the config's).
#[derive(Debug, Clone, PartialEq)]
struct Module<A: LoraFloat> {
    a: Stored<A>,
    b: Stored<A>,
}

/// A PEFT LoRA adapter: a [`PeftConfig`] and, per adapted module, the factors A (r×in) and
/// B (out×r) in the factor type [`A::Factor`](LoraFloat::Factor). See the
/// [module docs](self) for the file format and an example.
///
/// # Half-precision models
/// A `PeftAdapter<bf16>` / `<f16>` computes with f32 factors, as PEFT does on a half model,
/// and holds each tensor as the file gave it where it can: a tensor in the adapter's own
/// dtype (BF16 in a `PeftAdapter<bf16>`, F16 in `<f16>`) stays in it, at half the bytes, and
/// is saved back in it; the F32 tensors PEFT writes by default stay F32 (rounding them to
/// the half type would change PEFT's numbers); any other dtype is converted to f32 (F16 and
/// BF16 exactly). [`stored_dtypes`](Self::stored_dtypes) tells which.
/// [`to_layer`](Self::to_layer) takes the half base weight and gives the layer f32 factors
/// (widened exactly); an adapter made by [`from_layers`](Self::from_layers) holds, and
/// [`save`](Self::save) writes, F32 factors, as PEFT's `save_pretrained` does for such a
/// model.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapter<A: LoraFloat> {
    config: PeftConfig,
    modules: BTreeMap<String, Module<A>>,
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

impl<A: LoraFloat> PeftAdapter<A> {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    ///
    /// Every tensor must be a `lora_A` / `lora_B` weight of some module (keys with or without
    /// the adapter name `default`), 2-D, non-empty, finite after conversion to `A::Factor`, in F32,
    /// F64, F16 or BF16; each module needs both, with A r×in and B out×r where r is the
    /// module's rank from the config. Errors name the file, field, tensor or module at fault;
    /// corrupt, truncated or hostile files are errors, never panics.
    ///
    /// Bounded by the files' sizes and the stated limits, whatever the files hold: each path is
    /// opened once and must be a regular file after following symbolic links
    /// ([`LoraError::NotAFile`] for a directory, FIFO, device or socket, which are not read);
    /// the config may be at most [`MAX_CONFIG_SIZE`] bytes ([`LoraError::FileTooLarge`]) and
    /// its patterns compile within [`PATTERN_BUDGET`]; the safetensors length prefix and header
    /// (at most [`MAX_HEADER_SIZE`] bytes) are read and checked against the file's size with
    /// overflow-checked arithmetic before the tensor data is allocated, and no more than the
    /// size the file had when opened is read.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = read_config(dir, &[])?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes = read_file(&weights_path)?;
        Self::from_config_and_bytes(config, &bytes, &weights_path.display().to_string())
    }

    /// Like [`load`](Self::load), from the two files' contents already in memory: the text of
    /// `adapter_config.json` and the bytes of `adapter_model.safetensors`.
    pub fn from_bytes(config_json: &str, safetensors: &[u8]) -> Result<Self> {
        let config = PeftConfig::from_json_str(config_json)?;
        Self::from_config_and_bytes(config, safetensors, WEIGHTS_FILE)
    }

    fn from_config_and_bytes(config: PeftConfig, bytes: &[u8], path: &str) -> Result<Self> {
        let halves = read_halves::<A>(bytes, path)?;
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
            check_stored(&module, &a, &b, config.rank_for(&module))?;
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
        Ok(self.module(module)?.a.dim().0)
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
    /// (`lora_B.weight`), in the factor type. A factor held in its half dtype (see
    /// [`stored_dtypes`](Self::stored_dtypes)) is widened exactly on the first call and the
    /// f32 copy kept beside it, so that the views can be borrowed.
    pub fn factors(&self, module: &str) -> Result<FactorViews<'_, A::Factor>> {
        let m = self.module(module)?;
        Ok((m.a.view(), m.b.view()))
    }

    /// The safetensors dtypes (`"F32"`, `"F64"`, `"BF16"` or `"F16"`) in which `module`'s
    /// (A, B) are held, and in which [`save`](Self::save) writes them: the factor type's, or,
    /// in a `PeftAdapter<bf16>` / `<f16>`, the file's own BF16 / F16 where it matched.
    ///
    /// ```
    /// use half::bf16;
    /// use ndlora::peft::PeftAdapter;
    /// let config = r#"{"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["fc"]}"#;
    /// let one = bf16::ONE.to_le_bytes();
    /// let tensors = [
    ///     ("base_model.model.fc.lora_A.weight", vec![1, 2]),
    ///     ("base_model.model.fc.lora_B.weight", vec![2, 1]),
    /// ];
    /// let data = [one, one].concat();
    /// let views = tensors.iter().map(|(name, shape)| {
    ///     let view = safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), &data);
    ///     (*name, view.unwrap())
    /// });
    /// let bytes = safetensors::serialize(views, None).unwrap();
    /// let adapter = PeftAdapter::<bf16>::from_bytes(config, &bytes)?;
    /// assert_eq!(adapter.stored_dtypes("fc")?, ("BF16", "BF16"));
    /// assert_eq!(adapter.factors("fc")?.0[[0, 1]], 1.0_f32);
    /// let wide = PeftAdapter::<f32>::from_bytes(config, &bytes)?;
    /// assert_eq!(wide.stored_dtypes("fc")?, ("F32", "F32"));
    /// # Ok::<(), ndlora::LoraError>(())
    /// ```
    pub fn stored_dtypes(&self, module: &str) -> Result<(&'static str, &'static str)> {
        let m = self.module(module)?;
        Ok((m.a.dtype_name(), m.b.dtype_name()))
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
        let (d, k) = (m.b.dim().0, m.a.dim().1);
        let expected = if self.config.fan_in_fan_out() {
            [k, d]
        } else {
            [d, k]
        };
        if base_weight.shape() != expected {
            return Err(LoraError::ShapeMismatch {
                what: if self.config.fan_in_fan_out() {
                    "base_weight (in×out, fan_in_fan_out)"
                } else {
                    "base_weight (out×in)"
                },
                expected: shape_str(&expected),
                got: shape_str(base_weight.shape()),
            }
            .in_module(module));
        }
        let w = if self.config.fan_in_fan_out() {
            base_weight
                .reversed_axes()
                .as_standard_layout()
                .into_owned()
        } else {
            base_weight
        };
        let config = LoraConfig {
            rank: m.a.dim().0,
            alpha: self.config.alpha_for(module),
            dropout: self.config.lora_dropout(),
            use_rslora: self.config.use_rslora(),
            init: LoraInit::KaimingUniform,
            ..LoraConfig::default()
        };
        let layer = LoraLayer::from_parts(w, m.a.to_factor(), m.b.to_factor(), config)
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
    /// PEFT user would load them onto: unmerge it first), a NaN or ±∞ in A or B
    /// ([`LoraError::NonFinite`], which [`load`](Self::load) would refuse), or a scaling that
    /// no α reproduces exactly as PEFT computes α/r (or α/√r). Every finite scaling that an α
    /// reproduces, −0.0 included, reads back bit for bit. A config that
    /// [`load`](Self::load) would refuse is refused here: one over [`MAX_CONFIG_SIZE`], or
    /// with module paths whose pattern keys exceed [`PATTERN_BUDGET`].
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
            // What `load` refuses is refused here (the factors are public through
            // `weight_a_mut` / `weight_b_mut`, which do not check finiteness).
            check_module(name, layer.weight_a(), layer.weight_b(), layer.rank())?;
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
            PeftConfig::from_map(
                peft_config_json(
                    r,
                    lora_alpha,
                    use_rslora,
                    dropout,
                    rank_pattern,
                    alpha_pattern,
                    targets,
                ),
                &[],
            )
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
        // From here on, the config as `load` will see it: its JSON text read back (α are
        // written so that they read back bit for bit, −0.0 included), within MAX_CONFIG_SIZE.
        let text = config.to_json_string();
        check_config_size(CONFIG_FILE, text.len() as u64)?;
        let config = PeftConfig::from_json_str(&text)?;
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
                    a: Stored::Factor(layer.weight_a().to_owned()),
                    b: Stored::Factor(layer.weight_b().to_owned()),
                },
            );
        }
        Ok(Self { config, modules })
    }

    /// Writes `dir/adapter_config.json` (the config's JSON, keys as PEFT writes them) and
    /// `dir/adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight` /
    /// `.lora_B.weight` without adapter name, each in the dtype it is held in
    /// ([`stored_dtypes`](Self::stored_dtypes): F32 or F64 as `A::Factor`, or a half
    /// adapter's own BF16 / F16 as loaded), metadata
    /// `{"format": "pt"}`), creating `dir` if needed.
    ///
    /// Writes only what [`load`](Self::load) reads back: finite factors whose shapes agree
    /// with the config, a config within [`MAX_CONFIG_SIZE`] and a header within
    /// [`MAX_HEADER_SIZE`], all checked before anything is written. Each file is written to a
    /// temporary file in `dir` and synced; only when both are complete are they renamed over
    /// the two names, so a failure never leaves a partly written file under either name (and
    /// a name that is taken by a directory or other non-file is refused up front with
    /// [`LoraError::NotAFile`]).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        for (name, m) in &self.modules {
            check_stored(name, &m.a, &m.b, self.config.rank_for(name))?;
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let config_path = dir.join(CONFIG_FILE);
        let config = self.config.to_json_string().into_bytes();
        check_config_size(&config_path.display().to_string(), config.len() as u64)?;
        let weights = serialize(
            self.modules
                .iter()
                .map(|(name, m)| (name.as_str(), &m.a, &m.b)),
            &weights_path.display().to_string(),
        )?;
        std::fs::create_dir_all(dir).map_err(|e| LoraError::io(dir, &e))?;
        let files = [(weights_path, weights), (config_path, config)];
        for (path, _) in &files {
            // A rename can replace a file or a symbolic link, not a directory.
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.is_file() && !meta.file_type().is_symlink() {
                    return Err(LoraError::NotAFile {
                        path: path.display().to_string(),
                        kind: file_kind(meta.file_type()),
                    });
                }
            }
        }
        let temps = files
            .iter()
            .map(|(path, bytes)| write_temp(dir, path, bytes))
            .collect::<Result<Vec<_>>>()?;
        for (temp, (path, _)) in temps.into_iter().zip(&files) {
            temp.persist(path)
                .map_err(|e| LoraError::io(path, &e.error))?;
        }
        Ok(())
    }
}
