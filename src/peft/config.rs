//! `adapter_config.json`: [`PeftConfig`] (parsing, validation, the per-module rank and α that
//! `rank_pattern` / `alpha_pattern` give), [`TargetModules`], the features ndlora refuses
//! ([`UNSUPPORTED_FIELDS`]) and the document [`PeftAdapter::save`](super::PeftAdapter::save)
//! writes.

use regex_automata::util::syntax;
use regex_automata::{meta, MatchKind};
use serde_json::{Map, Value};

use super::{CONFIG_FILE, PEFT_FORMAT_VERSION};
use crate::error::{LoraError, Result};

/// The largest `adapter_config.json` accepted, in bytes (4 MiB). PEFT's own configs are a few
/// KiB; one that lists a `rank_pattern` entry for each of thousands of modules stays far below
/// this. The limit bounds what parsing a hostile config can cost (the JSON tree of a 4 MiB
/// document takes at most ~0.2 GB; see the README's *Hardening* section for measurements).
/// [`PeftAdapter::load`](super::PeftAdapter::load) refuses a larger file before reading it,
/// [`PeftConfig::from_json_str`] a longer text, and
/// [`PeftAdapter::from_layers`](super::PeftAdapter::from_layers) a config it would write
/// larger, all with [`LoraError::FileTooLarge`].
pub const MAX_CONFIG_SIZE: u64 = 4 << 20;

/// The longest `rank_pattern` / `alpha_pattern` key (or `target_modules` string) compiled as a
/// regular expression, in bytes. Parsing a pattern costs time and memory before its compiled
/// size can be checked (a Unicode class such as `\w` expands to hundreds of ranges), so the
/// source is bounded too. Keys with no regex syntax but `.` (module paths such as
/// `layers.0.q_proj`, as [`PeftAdapter::from_layers`](super::PeftAdapter::from_layers) writes
/// them: printable ASCII without `\ + * ? ( ) | [ ] { } ^ $`) are matched without a regex,
/// exactly as the regex would match, and are not subject to this limit nor to
/// [`PATTERN_BUDGET`].
pub const PATTERN_MAX_LEN: usize = 512;

/// The largest compiled form of one pattern, in bytes (the regex engine's
/// `RegexBuilder::size_limit`, which bounds its NFA and one-pass DFA; 1 MiB). Compilation
/// stops as soon as it is exceeded.
pub const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// The largest cache of the lazy DFA each pattern uses when matching, in bytes (the regex
/// engine's `RegexBuilder::dfa_size_limit`; 16 KiB, for each search direction). A pattern that
/// needs more falls back to the engine's NFA simulation, still linear in the module path's
/// length.
pub const PATTERN_DFA_SIZE_LIMIT: usize = 16 << 10;

/// The budget for all regular-expression keys of one config (`rank_pattern` and
/// `alpha_pattern` together), in bytes (8 MiB). Each key is charged its compiled size as the
/// regex engine reports it plus twice [`PATTERN_DFA_SIZE_LIMIT`] for its match caches; the key
/// that would go over the budget is refused with [`LoraError::PeftPatternTooLarge`]. With the
/// other limits this bounds the time and memory a config's patterns can take, at load and at
/// every match.
pub const PATTERN_BUDGET: usize = 8 << 20;

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
    /// Errors if the regex is not one the `regex` crate accepts (e.g. look-around), or is
    /// longer than [`PATTERN_MAX_LEN`] or compiles to more than [`PATTERN_SIZE_LIMIT`]
    /// ([`LoraError::PeftPatternTooLarge`]).
    pub fn matches(&self, module: &str) -> Result<bool> {
        Ok(match self {
            Self::Unspecified => true,
            Self::List(names) => names.iter().any(|t| suffix_match(t, module)),
            Self::Regex(re) if re.eq_ignore_ascii_case("all-linear") => true,
            Self::Regex(re) => {
                compile_regex("target_modules", re, &format!("^(?:{re})$"))?.is_match(module)
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

/// A key of printable ASCII characters that stand for themselves in a regex (letters, digits,
/// `_`, `-`, `/`, `:`, … — none of `\ + * ? ( ) | [ ] { } ^ $`), and `.`: [`literal_match`]
/// decides it.
fn is_literal(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|c| c.is_ascii_graphic() && !br"\+*?()|[]{}^$".contains(&c))
}

/// PEFT's `re.match(rf"(.*\.)?({key})$", module)` for a key [`is_literal`] accepts, without a
/// regex: a `.` of the key is the regex `.` (any one character but `\n`), every other character
/// stands for itself. The key then matches exactly the last `key.len()` characters, and what
/// precedes them must be empty or a `.*\.` (ending with `.`, no `\n`).
fn literal_match(key: &str, module: &str) -> bool {
    let mut chars = module.char_indices().rev();
    let mut start = module.len();
    for k in key.bytes().rev() {
        match chars.next() {
            Some((i, c)) if c == char::from(k) || (k == b'.' && c != '\n') => start = i,
            _ => return false,
        }
    }
    let prefix = &module[..start];
    prefix.is_empty() || (prefix.ends_with('.') && !prefix.contains('\n'))
}

/// Compiles `pattern` (the user's `source`, wrapped) within [`PATTERN_MAX_LEN`],
/// [`PATTERN_SIZE_LIMIT`] and [`PATTERN_DFA_SIZE_LIMIT`], with the `regex` crate's semantics
/// (Unicode, UTF-8, leftmost-first). The bounded backtracker is off, so that a pattern's match
/// caches are the lazy DFA's (bounded) and the NFA simulation's (linear in the NFA).
fn compile_regex(field: &str, source: &str, pattern: &str) -> Result<meta::Regex> {
    let too_large = |limit, scope| LoraError::PeftPatternTooLarge {
        field: field.to_owned(),
        limit,
        scope,
    };
    if source.len() > PATTERN_MAX_LEN {
        return Err(too_large(
            PATTERN_MAX_LEN,
            "the source length limit for one pattern",
        ));
    }
    meta::Builder::new()
        .configure(
            meta::Config::new()
                .match_kind(MatchKind::LeftmostFirst)
                .utf8_empty(true)
                .nfa_size_limit(Some(PATTERN_SIZE_LIMIT))
                .onepass_size_limit(Some(PATTERN_SIZE_LIMIT))
                .hybrid_cache_capacity(PATTERN_DFA_SIZE_LIMIT)
                .backtrack(false),
        )
        .syntax(syntax::Config::new().utf8(true))
        .build(pattern)
        .map_err(|e| match e.size_limit() {
            Some(_) => too_large(
                PATTERN_SIZE_LIMIT,
                "the compiled-size limit for one pattern",
            ),
            None => LoraError::PeftConfigField {
                field: field.to_owned(),
                expected: "a regular expression in the syntax the regex crate supports",
                got: Value::from(pattern).to_string(),
            },
        })
}

/// What a `rank_pattern` / `alpha_pattern` key matches with.
#[derive(Debug, Clone)]
enum Matcher {
    /// [`literal_match`].
    Literal,
    /// `^(?:.*\.)?(?:KEY)$`.
    Regex(meta::Regex),
}

/// One `rank_pattern` / `alpha_pattern` key and how to match it.
#[derive(Debug, Clone)]
struct Pattern<T> {
    key: String,
    value: T,
    matcher: Matcher,
}

impl<T> Pattern<T> {
    /// `budget`: what is left of [`PATTERN_BUDGET`]; a regex key takes its share.
    fn new(field: &str, key: String, value: T, budget: &mut usize) -> Result<Self> {
        let matcher = if is_literal(&key) {
            Matcher::Literal
        } else {
            let name = format!("{field}.{key}");
            let re = compile_regex(&name, &key, &format!(r"^(?:.*\.)?(?:{key})$"))?;
            let cost = re.memory_usage() + 2 * PATTERN_DFA_SIZE_LIMIT;
            *budget = budget
                .checked_sub(cost)
                .ok_or(LoraError::PeftPatternTooLarge {
                    field: name,
                    limit: PATTERN_BUDGET,
                    scope: "the budget for all patterns of the config",
                })?;
            Matcher::Regex(re)
        };
        Ok(Self {
            key,
            value,
            matcher,
        })
    }

    /// PEFT's `re.match(rf"(.*\.)?({key})$", module)`.
    fn matches(&self, module: &str) -> bool {
        match &self.matcher {
            Matcher::Literal => literal_match(&self.key, module),
            Matcher::Regex(re) => re.is_match(module),
        }
    }
}

/// The first pattern (in file order) that matches `module`, as PEFT's `get_pattern_key`.
fn resolve<T: Copy>(patterns: &[Pattern<T>], module: &str) -> Option<T> {
    patterns.iter().find(|p| p.matches(module)).map(|p| p.value)
}

/// A parsed and validated `adapter_config.json`. Immutable: the typed accessors and the raw
/// JSON ([`raw`](Self::raw), written back by [`PeftAdapter::save`](super::PeftAdapter::save)) always agree.
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
    /// [module docs](super)).
    ///
    /// Bounded: a text longer than [`MAX_CONFIG_SIZE`] is refused with
    /// [`LoraError::FileTooLarge`] before it is parsed, and the `rank_pattern` /
    /// `alpha_pattern` keys compile within [`PATTERN_MAX_LEN`], [`PATTERN_SIZE_LIMIT`] and
    /// [`PATTERN_BUDGET`] (else [`LoraError::PeftPatternTooLarge`]).
    pub fn from_json_str(text: &str) -> Result<Self> {
        check_config_size(CONFIG_FILE, text.len() as u64)?;
        let value: Value = serde_json::from_str(text).map_err(|e| LoraError::Parse {
            path: CONFIG_FILE.to_owned(),
            format: "JSON",
            message: e.to_string(),
        })?;
        match value {
            Value::Object(raw) => Self::from_map(raw, &[]),
            other => Err(field_err("(root)", "a JSON object", &other)),
        }
    }

    /// Validates a config document; the fields in `allowed` are accepted although they are
    /// in [`UNSUPPORTED_FIELDS`] (a checkpoint merge implements `modules_to_save`).
    pub(crate) fn from_map(raw: Map<String, Value>, allowed: &[&str]) -> Result<Self> {
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
            if allowed.contains(&field) {
                continue;
            }
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
        let mut budget = PATTERN_BUDGET;
        let rank_pattern = get_patterns(&raw, "rank_pattern", &mut budget, get_rank_value)?;
        let alpha_pattern = get_patterns(&raw, "alpha_pattern", &mut budget, |field, v| {
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
    /// `Conv1D`); the LoRA factors keep their shapes. See [`PeftAdapter::to_layer`](super::PeftAdapter::to_layer).
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
pub(super) fn scaling_of(alpha: f64, r: usize, use_rslora: bool) -> f64 {
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
    budget: &mut usize,
    parse: impl Fn(&str, &Value) -> Result<T>,
) -> Result<Vec<Pattern<T>>> {
    match raw.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(entries)) => entries
            .iter()
            .map(|(key, v)| {
                let name = format!("{field}.{key}");
                Pattern::new(field, key.clone(), parse(&name, v)?, budget)
            })
            .collect(),
        Some(other) => Err(field_err(field, "an object of module patterns", other)),
    }
}

/// Refuses a config of `size` bytes over [`MAX_CONFIG_SIZE`] ([`LoraError::FileTooLarge`]
/// naming `path`).
pub(super) fn check_config_size(path: &str, size: u64) -> Result<()> {
    if size > MAX_CONFIG_SIZE {
        return Err(LoraError::FileTooLarge {
            path: path.to_owned(),
            what: "a PEFT adapter config",
            size,
            limit: MAX_CONFIG_SIZE,
        });
    }
    Ok(())
}

/// An alpha as JSON that reads back bit for bit: an integer when it is one (as PEFT configs
/// usually hold), else a float in its shortest round-trip form. −0.0 is written as the float
/// `-0.0`, since the integer 0 would lose its sign.
pub(super) fn alpha_json(alpha: f64) -> Value {
    if alpha.fract() == 0.0 && alpha.abs() < 9.0e15 && (alpha != 0.0 || alpha.is_sign_positive()) {
        Value::from(alpha as i64)
    } else {
        Value::from(alpha)
    }
}

/// A complete PEFT 0.21.2 `LoraConfig` document (every field `save_pretrained` writes, keys
/// sorted as PEFT writes them) for a plain LoRA adapter.
pub(super) fn peft_config_json(
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
