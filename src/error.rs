//! The crate's one error type.

use thiserror::Error;

/// Everything that can go wrong in ndlora. Each variant names what was expected and what came.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum LoraError {
    /// An array or slice had the wrong shape or length.
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// Which argument or part.
        what: &'static str,
        /// The shape that was required, e.g. `[7, 33]` or `[_, 33]` (`_` = any).
        expected: String,
        /// The shape that came.
        got: String,
    },
    /// A rank outside the allowed range.
    #[error("invalid rank {got}: expected {min} ≤ rank ≤ {max}")]
    InvalidRank {
        /// The rank that came.
        got: usize,
        /// Smallest allowed rank.
        min: usize,
        /// Largest allowed rank (e.g. min(d, k)).
        max: usize,
    },
    /// A configuration value out of its domain (alpha not finite, dropout outside [0, 1), …).
    #[error("invalid {what}: expected {expected}, got {got}")]
    InvalidValue {
        /// Which value.
        what: &'static str,
        /// The domain it must lie in.
        expected: &'static str,
        /// The value that came, formatted.
        got: String,
    },
    /// An input or weight held a NaN or an infinity where finite values are required.
    #[error("non-finite value in {what} at index {index:?}: {value}")]
    NonFinite {
        /// Which array.
        what: &'static str,
        /// Index of the first offending element (row, column; or (0, i) for vectors).
        index: (usize, usize),
        /// The offending value (as f64).
        value: f64,
    },
    /// A merge or unmerge would have written a NaN or ∞ into the weight; nothing was changed.
    #[error(
        "{operation} would overflow the weight to a non-finite value; the weight is unchanged"
    )]
    WouldOverflow {
        /// `"merge"` or `"unmerge"`.
        operation: &'static str,
    },
    /// The operation needs the adapter merged (`true`) or unmerged (`false`), and it was not.
    #[error("{operation} requires merged = {expected}, but merged = {}", !expected)]
    MergeState {
        /// The refused operation.
        operation: &'static str,
        /// The merged state it requires.
        expected: bool,
    },
    /// No adapter with this name (never added, or removed).
    #[error("no adapter named {name:?}")]
    UnknownAdapter {
        /// The name that was asked for.
        name: String,
    },
    /// No adapter with this id (never added, or removed; ids are never reused).
    #[error("no adapter with id {id}")]
    UnknownAdapterId {
        /// The id that was asked for.
        id: usize,
    },
    /// An adapter name given twice: already present in the model, or repeated in a list.
    #[error("adapter name {name:?} is already taken")]
    DuplicateAdapter {
        /// The repeated name.
        name: String,
    },
    /// A size whose product overflows `usize`.
    #[error("size overflow: {what} = {dims:?} does not fit in usize")]
    SizeOverflow {
        /// Which size.
        what: &'static str,
        /// The dimensions whose product overflowed.
        dims: Vec<usize>,
    },
    /// Reading or writing a file failed. (`std::io::Error` is neither `Clone` nor `PartialEq`,
    /// so its kind and message are kept.)
    #[error("I/O error on {path}: {message}")]
    Io {
        /// The file or directory.
        path: String,
        /// The I/O error's kind.
        kind: std::io::ErrorKind,
        /// The I/O error's message.
        message: String,
    },
    /// A file's contents could not be parsed: invalid JSON, or a corrupt, truncated or hostile
    /// safetensors file (bad header length, offsets that do not cover the data, unknown dtype
    /// name, …).
    #[error("cannot parse {path} as {format}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// `"JSON"` or `"safetensors"`.
        format: &'static str,
        /// The parser's message.
        message: String,
    },
    /// A path that must name a regular file names something else (after following symbolic
    /// links): a directory, a FIFO, a character or block device, or a socket. It was not read:
    /// a FIFO can block a reader forever and a device such as `/dev/zero` never ends.
    #[error("{path} is {kind}, not a regular file")]
    NotAFile {
        /// The path as given (a symbolic link is named, not its target).
        path: String,
        /// What it is, e.g. `"a directory"`, `"a FIFO"`, `"a character device"`.
        kind: &'static str,
    },
    /// A file (or a document about to be written as one) larger than ndlora accepts for its
    /// role, e.g. an `adapter_config.json` over
    /// [`peft::MAX_CONFIG_SIZE`](crate::peft::MAX_CONFIG_SIZE). It was not read (or written).
    #[error("{path} is {size} bytes, over the {limit}-byte limit for {what}")]
    FileTooLarge {
        /// The file.
        path: String,
        /// Its role, e.g. `"a PEFT adapter config"`.
        what: &'static str,
        /// Its size in bytes.
        size: u64,
        /// The largest size accepted.
        limit: u64,
    },
    /// A regular expression in a PEFT config (a `rank_pattern` / `alpha_pattern` key, or
    /// `target_modules`) whose compiled form would exceed a size limit: its own
    /// ([`peft::PATTERN_SIZE_LIMIT`](crate::peft::PATTERN_SIZE_LIMIT)) or, with the keys
    /// before it, the budget for the whole config
    /// ([`peft::PATTERN_BUDGET`](crate::peft::PATTERN_BUDGET)). Compilation stops at the
    /// limit, so such a config costs bounded time and memory.
    #[error(
        "PEFT config field `{field}`: the compiled pattern would exceed {limit} bytes ({scope})"
    )]
    PeftPatternTooLarge {
        /// The field and key, e.g. `rank_pattern.layers\.\d+\.q_proj`.
        field: String,
        /// The limit in bytes that would be exceeded.
        limit: usize,
        /// `"the limit for one pattern"` or `"the budget for all patterns of the config"`.
        scope: &'static str,
    },
    /// A field of a PEFT `adapter_config.json` is missing or has a value of the wrong type or
    /// out of its domain.
    #[error("PEFT config field `{field}`: expected {expected}, got {got}")]
    PeftConfigField {
        /// The field, e.g. `r` or `rank_pattern.q_proj`.
        field: String,
        /// What the field must hold.
        expected: &'static str,
        /// What it held (JSON), or `missing`.
        got: String,
    },
    /// The PEFT config asks for a feature ndlora does not implement (it would change what the
    /// adapter computes), e.g. `use_dora: true`; see
    /// [`peft::UNSUPPORTED_FIELDS`](crate::peft::UNSUPPORTED_FIELDS).
    #[error("unsupported PEFT feature: `{field}` = {got} ({supported})")]
    PeftUnsupported {
        /// The config field.
        field: String,
        /// Its value (JSON).
        got: String,
        /// What ndlora supports instead.
        supported: &'static str,
    },
    /// A tensor in a PEFT adapter file that ndlora cannot use: an unexpected key, a dtype other
    /// than F32/F64/F16/BF16, a tensor that is not 2-D or is empty, or a duplicate.
    #[error("adapter tensor `{name}`: expected {expected}, got {got}")]
    PeftTensor {
        /// The tensor's key in the safetensors file.
        name: String,
        /// What was required.
        expected: &'static str,
        /// What came.
        got: String,
    },
    /// A tensor the adapter needs is not in the file (e.g. a `lora_A` without its `lora_B`).
    #[error("adapter tensor `{name}` is missing")]
    MissingTensor {
        /// The key that was looked for.
        name: String,
    },
    /// A module path the adapter does not hold.
    #[error("the adapter has no module `{module}`")]
    UnknownModule {
        /// The module path that was asked for.
        module: String,
    },
    /// An error about one module of a PEFT adapter: says which module, then what.
    #[error("module `{module}`: {source}")]
    InModule {
        /// The module path, e.g. `layers.0.q_proj`.
        module: String,
        /// What went wrong.
        #[source]
        source: Box<LoraError>,
    },
    /// An error about one tensor of a safetensors checkpoint (see [`checkpoint`](crate::checkpoint)):
    /// says which file and tensor, then what.
    #[error("{path}: tensor `{tensor}`: {source}")]
    InTensor {
        /// The file holding the tensor (a shard of the checkpoint, or the adapter's file).
        path: String,
        /// The tensor's name in that file.
        tensor: String,
        /// What went wrong.
        #[source]
        source: Box<LoraError>,
    },
    /// A checkpoint tensor the adapter changes has a dtype or rank ndlora cannot merge into
    /// (e.g. an `I8` weight, or a 1-D tensor named like a module's weight); always wrapped in
    /// [`InTensor`](Self::InTensor).
    #[error("expected {expected}, got {got}")]
    TensorKind {
        /// What was required, e.g. `"a 2-D tensor of dtype BF16, F16, F32 or F64"`.
        expected: &'static str,
        /// What came, e.g. `"I8 [64, 64]"`.
        got: String,
    },
    /// An adapter module (or a `modules_to_save` tensor) whose tensor is not in the base
    /// checkpoint: PEFT would not find the module to adapt.
    #[error("the adapter's `{key}` needs the tensor `{tensor}`, which the base checkpoint {base} does not hold")]
    NotInBase {
        /// The adapter's key (module path, or the replacement tensor's key).
        key: String,
        /// The base tensor name that was looked for, e.g. `model.layers.0.self_attn.q_proj.weight`.
        tensor: String,
        /// The base checkpoint (file or directory).
        base: String,
    },
    /// The output path of a checkpoint merge exists and overwriting was not asked for, or it
    /// cannot be overwritten (it holds the inputs).
    #[error("{path} {reason}")]
    OutputExists {
        /// The output path.
        path: String,
        /// Why it was refused, e.g. `"exists (pass --force / MergeOptions::force to replace it)"`.
        reason: &'static str,
    },
}

impl LoraError {
    /// An [`Io`](Self::Io) error for `path`.
    pub(crate) fn io(path: &std::path::Path, err: &std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            kind: err.kind(),
            message: err.to_string(),
        }
    }

    /// Wraps `self` in [`InTensor`](Self::InTensor).
    pub(crate) fn in_tensor(self, path: &str, tensor: &str) -> Self {
        Self::InTensor {
            path: path.to_owned(),
            tensor: tensor.to_owned(),
            source: Box::new(self),
        }
    }

    /// Wraps `self` in [`InModule`](Self::InModule).
    pub(crate) fn in_module(self, module: &str) -> Self {
        Self::InModule {
            module: module.to_owned(),
            source: Box::new(self),
        }
    }
}

/// `Result` with [`LoraError`].
pub type Result<T, E = LoraError> = std::result::Result<T, E>;

/// Formats a shape as `[a, b]`.
pub(crate) fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}
