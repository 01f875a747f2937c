//! [`Checkpoint`]: a safetensors checkpoint opened for reading — one file, or the shards a
//! `model.safetensors.index.json` lists — with every header checked before any tensor data is
//! read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::Value;

use super::io::read_exact_at;
use crate::error::{LoraError, Result};
use crate::peft::open_regular;
use crate::peft::tensors::{header_len, parse_error, parse_header};

/// The index file of a sharded checkpoint, as transformers writes it.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The file of a checkpoint in one file, as transformers writes it.
pub const SINGLE_FILE: &str = "model.safetensors";

/// The largest `model.safetensors.index.json` accepted, in bytes (64 MiB; a 405B-parameter
/// model's index is about 100 KiB).
pub const MAX_INDEX_SIZE: u64 = 64 << 20;

/// One tensor of a checkpoint, as its file's header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// The dtype's safetensors name, e.g. `"BF16"`.
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// The file that holds it (its name within the checkpoint's directory).
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// A tensor's place in its shard.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    /// Byte range in the file's data section (after the 8-byte length and the header).
    pub(crate) begin: u64,
    pub(crate) end: u64,
}

/// One safetensors file of a checkpoint, open for positioned reads.
#[derive(Debug)]
pub(crate) struct Shard {
    /// The file's name (the output keeps it).
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    /// Where the data section starts: 8 + the header's length.
    pub(crate) data_start: u64,
    /// The tensors in the order of their data.
    pub(crate) entries: Vec<Entry>,
}

impl Shard {
    /// Opens `path` (a regular file), reads and checks its header against its size.
    fn open(path: &Path, name: String) -> Result<Self> {
        let shown = path.display().to_string();
        let (file, size) = open_regular(path)?;
        if size < 8 {
            return Err(parse_error(
                &shown,
                format!("{size} bytes, shorter than the 8-byte header length"),
            ));
        }
        let mut first = [0u8; 8];
        read_exact_at(&file, &mut first, 0).map_err(|e| LoraError::io(path, &e))?;
        let n = header_len(first, size, &shown)?;
        let mut header = Vec::new();
        header.try_reserve_exact(n).map_err(|e| LoraError::Io {
            path: shown.clone(),
            kind: std::io::ErrorKind::OutOfMemory,
            message: format!("cannot allocate {n} bytes: {e}"),
        })?;
        header.resize(n, 0);
        read_exact_at(&file, &mut header, 8).map_err(|e| LoraError::io(path, &e))?;
        let entries = parse_header(&header, size, &shown)?
            .into_iter()
            .map(|(name, info)| Entry {
                name,
                dtype: info.dtype,
                shape: info.shape,
                begin: info.data_offsets.0 as u64,
                end: info.data_offsets.1 as u64,
            })
            .collect();
        Ok(Self {
            name,
            path: path.to_owned(),
            file,
            data_start: 8 + n as u64,
            entries,
        })
    }

    pub(crate) fn shown(&self) -> String {
        self.path.display().to_string()
    }
}

/// A safetensors checkpoint opened for reading: a single `.safetensors` file, or a directory
/// with `model.safetensors.index.json` (the shards it lists) or `model.safetensors`.
///
/// Opening reads and checks every file's header (regular files only; header sizes, offsets and
/// the files' sizes checked with overflow-checked arithmetic, as for adapter files), and for a
/// sharded checkpoint that the index and the shards agree: every tensor in exactly one shard,
/// the shard the index names. Shard names must be plain file names in the directory (no path
/// separators, no `..`). No tensor data is read.
///
/// ```
/// use ndlora::checkpoint::Checkpoint;
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/checkpoint/llama_bf16_r8/base");
/// let base = Checkpoint::open(dir)?;
/// assert_eq!(base.files().len(), 5);
/// let q = base.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
/// assert_eq!((q.dtype.as_str(), q.shape.as_slice()), ("BF16", &[64, 64][..]));
/// # Ok::<(), ndlora::LoraError>(())
/// ```
#[derive(Debug)]
pub struct Checkpoint {
    /// The path as given.
    pub(crate) path: PathBuf,
    /// The directory the files are in (`None` for a single file given directly).
    pub(crate) dir: Option<PathBuf>,
    /// The index file's bytes (copied to the output unchanged), for a sharded checkpoint.
    pub(crate) index: Option<Vec<u8>>,
    pub(crate) shards: Vec<Shard>,
    /// Tensor name → (shard, entry).
    lookup: HashMap<String, (usize, usize)>,
}

impl Checkpoint {
    /// Opens a checkpoint: a `.safetensors` file, or a directory holding
    /// [`INDEX_FILE`] (sharded) or [`SINGLE_FILE`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| LoraError::io(path, &e))?;
        if !meta.is_dir() {
            let name = file_name(path)?;
            let shard = Shard::open(path, name)?;
            return Self::assemble(path, None, None, vec![shard]);
        }
        let index_path = path.join(INDEX_FILE);
        if !index_path.exists() {
            let single = path.join(SINGLE_FILE);
            let shard = Shard::open(&single, SINGLE_FILE.to_owned())?;
            return Self::assemble(path, Some(path.to_owned()), None, vec![shard]);
        }
        let (bytes, weight_map) = read_index(&index_path)?;
        let shown = index_path.display().to_string();
        let names: BTreeSet<&str> = weight_map.values().map(String::as_str).collect();
        let mut shards = Vec::with_capacity(names.len());
        for &name in &names {
            if !plain_file_name(name) {
                return Err(index_error(
                    &shown,
                    format!("shard name {name:?} is not a plain file name"),
                ));
            }
            shards.push(Shard::open(&path.join(name), name.to_owned())?);
        }
        let checkpoint = Self::assemble(path, Some(path.to_owned()), Some(bytes), shards)?;
        // The index and the shards must agree, both ways.
        for (tensor, shard) in &weight_map {
            match checkpoint.lookup.get(tensor) {
                Some(&(s, _)) if checkpoint.shards[s].name == *shard => {}
                Some(&(s, _)) => {
                    return Err(index_error(
                        &shown,
                        format!(
                            "tensor `{tensor}` is listed in {shard} but stored in {}",
                            checkpoint.shards[s].name
                        ),
                    ))
                }
                None => {
                    return Err(index_error(
                        &shown,
                        format!("tensor `{tensor}` is listed in {shard}, which does not hold it"),
                    ))
                }
            }
        }
        if let Some(extra) = checkpoint
            .lookup
            .keys()
            .find(|t| !weight_map.contains_key(*t))
        {
            let (s, _) = checkpoint.lookup[extra];
            return Err(index_error(
                &shown,
                format!(
                    "tensor `{extra}` of {} is not listed in the index",
                    checkpoint.shards[s].name
                ),
            ));
        }
        Ok(checkpoint)
    }

    fn assemble(
        path: &Path,
        dir: Option<PathBuf>,
        index: Option<Vec<u8>>,
        shards: Vec<Shard>,
    ) -> Result<Self> {
        let mut lookup = HashMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for (e, entry) in shard.entries.iter().enumerate() {
                if let Some((other, _)) = lookup.insert(entry.name.clone(), (s, e)) {
                    return Err(parse_error(
                        &shard.shown(),
                        format!("tensor `{}` is also in {}", entry.name, shards[other].name),
                    ));
                }
            }
        }
        Ok(Self {
            path: path.to_owned(),
            dir,
            index,
            shards,
            lookup,
        })
    }

    /// The checkpoint's path as given to [`open`](Self::open).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it is sharded (has an index file).
    pub fn is_sharded(&self) -> bool {
        self.index.is_some()
    }

    /// The safetensors files' names, sorted.
    pub fn files(&self) -> Vec<&str> {
        self.shards.iter().map(|s| s.name.as_str()).collect()
    }

    /// Every tensor, file by file in the order of [`files`](Self::files), and within a file in
    /// the order of the data.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        self.shards
            .iter()
            .flat_map(|s| s.entries.iter().map(|e| info(s, e)))
            .collect()
    }

    /// The tensor called `name`, if the checkpoint holds it.
    pub fn tensor(&self, name: &str) -> Option<TensorInfo> {
        self.find(name).map(|(s, e)| info(s, e))
    }

    pub(crate) fn find(&self, name: &str) -> Option<(&Shard, &Entry)> {
        let &(s, e) = self.lookup.get(name)?;
        Some((&self.shards[s], &self.shards[s].entries[e]))
    }
}

fn info(shard: &Shard, entry: &Entry) -> TensorInfo {
    TensorInfo {
        name: entry.name.clone(),
        dtype: dtype_name(entry.dtype),
        shape: entry.shape.clone(),
        file: shard.name.clone(),
        bytes: entry.end - entry.begin,
    }
}

/// A dtype's name as safetensors writes it (`"BF16"`).
pub(crate) fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

/// A file name that names a file in the same directory: one component, not `.` or `..`.
fn plain_file_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    matches!(
        (components.next(), components.next()),
        (Some(std::path::Component::Normal(c)), None) if c == std::ffi::OsStr::new(name)
    )
}

/// The last component of `path`, as a string.
fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| parse_error(&path.display().to_string(), "not a file name".into()))
}

fn index_error(path: &str, message: String) -> LoraError {
    LoraError::Parse {
        path: path.to_owned(),
        format: "safetensors index",
        message,
    }
}

/// Reads `model.safetensors.index.json` (a regular file of at most [`MAX_INDEX_SIZE`]
/// bytes): its bytes and its `weight_map` (tensor → file).
fn read_index(path: &Path) -> Result<(Vec<u8>, BTreeMap<String, String>)> {
    let shown = path.display().to_string();
    let (file, size) = open_regular(path)?;
    if size > MAX_INDEX_SIZE {
        return Err(LoraError::FileTooLarge {
            path: shown,
            what: "a safetensors index",
            size,
            limit: MAX_INDEX_SIZE,
        });
    }
    let mut bytes = Vec::new();
    file.take(size)
        .read_to_end(&mut bytes)
        .map_err(|e| LoraError::io(path, &e))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| LoraError::Parse {
        path: shown.clone(),
        format: "JSON",
        message: e.to_string(),
    })?;
    let Some(Value::Object(map)) = value.get("weight_map") else {
        return Err(index_error(
            &shown,
            "no `weight_map` object (tensor name → file name)".into(),
        ));
    };
    let mut weight_map = BTreeMap::new();
    for (tensor, file) in map {
        let Value::String(file) = file else {
            return Err(index_error(
                &shown,
                format!("`weight_map.{tensor}` is {file}, not a file name"),
            ));
        };
        weight_map.insert(tensor.clone(), file.clone());
    }
    if weight_map.is_empty() {
        return Err(index_error(&shown, "`weight_map` is empty".into()));
    }
    Ok((bytes, weight_map))
}
