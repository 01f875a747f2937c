//! The output side of a checkpoint merge: a writer thread that appends, file by file, the
//! header, byte ranges copied from the base and the merged tensors the merging thread hands
//! it, through one buffered writer per file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;

use serde_json::{json, Map, Value};

use super::element::{bytes_of, Element};
use super::io::copy_range;
use super::reader::{dtype_name, Shard};
use crate::error::{LoraError, Result};
use crate::peft::tensors::{parse_error, MAX_HEADER_SIZE};

/// Bytes of the writer's buffer.
const WRITE_BUFFER: usize = 1 << 20;

/// A tensor's bytes, owned, ready to be written.
pub(crate) trait TensorBytes: Send {
    /// The bytes, little-endian.
    fn bytes(&self) -> &[u8];
}

impl<A: Element> TensorBytes for Vec<A> {
    fn bytes(&self) -> &[u8] {
        bytes_of(self)
    }
}

impl TensorBytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// What the writer thread is asked to do, in order.
pub(crate) enum Job<'a> {
    /// Start the file `path` with these first bytes (length prefix and header).
    Create { path: PathBuf, header: Vec<u8> },
    /// Append `len` bytes of `src` from byte `offset` (a tensor copied unchanged).
    Copy {
        src: &'a Shard,
        offset: u64,
        len: u64,
        tensor: String,
    },
    /// Append a tensor's new bytes.
    Data {
        bytes: Box<dyn TensorBytes + 'a>,
        tensor: String,
    },
    /// Flush (and with `sync`, sync to disk) and close the current file.
    Finish,
}

/// Runs the jobs until the channel closes; the first error ends it (which closes the channel
/// for the sender too).
pub(crate) fn run(jobs: Receiver<Job<'_>>, sync: bool) -> Result<()> {
    let mut current: Option<(PathBuf, BufWriter<File>)> = None;
    for job in jobs {
        match job {
            Job::Create { path, header } => {
                let file = File::create(&path).map_err(|e| LoraError::io(&path, &e))?;
                let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
                out.write_all(&header)
                    .map_err(|e| LoraError::io(&path, &e))?;
                current = Some((path, out));
            }
            Job::Copy {
                src,
                offset,
                len,
                tensor,
            } => {
                let (path, out) = open(&mut current)?;
                copy_range(&src.file, src.data_start + offset, len, out)
                    .map_err(|e| LoraError::io(path, &e).in_tensor(&src.shown(), &tensor))?;
            }
            Job::Data { bytes, tensor } => {
                let (path, out) = open(&mut current)?;
                out.write_all(bytes.bytes()).map_err(|e| {
                    LoraError::io(path, &e).in_tensor(&path.display().to_string(), &tensor)
                })?;
            }
            Job::Finish => {
                if let Some((path, out)) = current.take() {
                    let file = out
                        .into_inner()
                        .map_err(|e| LoraError::io(&path, e.error()))?;
                    if sync {
                        file.sync_all().map_err(|e| LoraError::io(&path, &e))?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn open(current: &mut Option<(PathBuf, BufWriter<File>)>) -> Result<(&Path, &mut BufWriter<File>)> {
    match current {
        Some((path, out)) => Ok((path, out)),
        None => Err(LoraError::InvalidValue {
            what: "writer job",
            expected: "a file created first",
            got: "none".into(),
        }),
    }
}

/// The first bytes of an output shard: the 8-byte length and a header that lists `shard`'s
/// tensors with the same names, dtypes, shapes and data offsets, in the order of their data,
/// and metadata `{"format": "pt"}`, padded with spaces to a multiple of 8 bytes (as the
/// `safetensors` crate writes it). `path` names the output in errors.
pub(crate) fn header(shard: &Shard, path: &Path) -> Result<Vec<u8>> {
    let mut map = Map::new();
    map.insert("__metadata__".into(), json!({ "format": "pt" }));
    for e in &shard.entries {
        map.insert(
            e.name.clone(),
            json!({
                "dtype": dtype_name(e.dtype),
                "shape": e.shape,
                "data_offsets": [e.begin, e.end],
            }),
        );
    }
    let mut text = serde_json::to_vec(&Value::Object(map)).map_err(|e| {
        parse_error(
            &path.display().to_string(),
            format!("cannot write the header: {e}"),
        )
    })?;
    text.resize(text.len().next_multiple_of(8), b' ');
    if text.len() as u64 > MAX_HEADER_SIZE {
        return Err(parse_error(
            &path.display().to_string(),
            format!(
                "the header would be {} bytes, over the {MAX_HEADER_SIZE}-byte limit",
                text.len()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(8 + text.len());
    bytes.extend_from_slice(&(text.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&text);
    Ok(bytes)
}
