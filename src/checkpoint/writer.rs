//! The output files of a checkpoint merge: each shard's header, and the file created at its
//! full size with the header in place, ready for its tensors to be written at their offsets.

use std::fs::File;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::io::{reserve, write_all_at};
use super::reader::{dtype_name, Shard};
use crate::error::{LoraError, Result};
use crate::peft::tensors::{parse_error, MAX_HEADER_SIZE};

/// Creates the output file `path` for `shard`: its header written, its full length reserved
/// on disk where the file system can (a full disk fails here, before the work). Returns the
/// file and where its data section starts.
pub(crate) fn create(shard: &Shard, path: &Path) -> Result<(File, u64)> {
    let header = header(shard, path)?;
    let data_len = shard.entries.iter().map(|e| e.end).max().unwrap_or(0);
    let total = (header.len() as u64).checked_add(data_len).ok_or_else(|| {
        parse_error(
            &path.display().to_string(),
            "the output is too large".into(),
        )
    })?;
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| LoraError::io(path, &e))?;
    reserve(&file, total).map_err(|e| LoraError::io(path, &e))?;
    write_all_at(&file, &header, 0).map_err(|e| LoraError::io(path, &e))?;
    Ok((file, header.len() as u64))
}

/// The first bytes of an output shard: the 8-byte length and a header that lists `shard`'s
/// tensors with the same names, dtypes, shapes and data offsets, in the order of their data,
/// and metadata `{"format": "pt"}`, padded with spaces to a multiple of 8 bytes (as the
/// `safetensors` crate writes it). `path` names the output in errors.
fn header(shard: &Shard, path: &Path) -> Result<Vec<u8>> {
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
