//! `adapter_model.safetensors`: tensor keys, decoding F32/F64/F16/BF16 into the float type,
//! encoding it back, the header check every file goes through before the `safetensors` crate
//! sees it, and reading and writing the file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::Path;

use ndarray::{Array2, ArrayView2};
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors, View};
use serde::de::{Deserializer, MapAccess, Visitor};

use super::stored::{dtype_of, keeps_own, Stored};
use super::{open_regular, KEY_PREFIX, WEIGHTS_FILE};
use crate::error::{shape_str, LoraError, Result};
use crate::float::LoraFloat;

/// The largest JSON header of a safetensors file accepted, in bytes: the format's own limit
/// (the `safetensors` crate's), so that every file it reads is read here. The header is read,
/// and checked against the file's size, before any tensor data is.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// A [`LoraError::Parse`] about the safetensors file `path`.
pub(crate) fn parse_error(path: &str, message: String) -> LoraError {
    LoraError::Parse {
        path: path.to_owned(),
        format: "safetensors",
        message,
    }
}

/// The JSON header's length n from a safetensors file's first 8 bytes (little-endian u64),
/// checked: at most [`MAX_HEADER_SIZE`], and 8 + n within the file's `file_len` bytes.
pub(crate) fn header_len(first: [u8; 8], file_len: u64, path: &str) -> Result<usize> {
    let n = u64::from_le_bytes(first);
    if n > MAX_HEADER_SIZE {
        return Err(parse_error(
            path,
            format!("header length {n} is over the {MAX_HEADER_SIZE}-byte limit"),
        ));
    }
    if n > file_len.saturating_sub(8) {
        return Err(parse_error(
            path,
            format!("header length {n} runs past the end of the {file_len}-byte file"),
        ));
    }
    // n ≤ MAX_HEADER_SIZE fits any usize of 32 bits or more.
    usize::try_from(n).map_err(|_| parse_error(path, format!("header length {n} too large")))
}

/// Checks the header of a safetensors file of `file_len` bytes whose 8-byte length prefix said
/// `header.len()` — everything the `safetensors` crate relies on, with checked arithmetic so
/// that no file can make it (or this) overflow: UTF-8 JSON object; `__metadata__` (optional,
/// once) a map of strings; each tensor once, with a known dtype, a shape whose element count
/// and byte size fit `usize` and are whole bytes, `data_offsets` [begin, end] with
/// end − begin = that size; the tensors' data contiguous from 0, without gaps or overlaps;
/// and 8 + header + data exactly the file's length. `path` names the file in errors
/// ([`LoraError::Parse`], format `"safetensors"`).
///
/// Nothing is allocated in proportion to what the header claims, only to the header itself.
/// Once this passes, `safetensors::SafeTensors::deserialize` accepts the file without reaching
/// its own unchecked arithmetic.
pub(crate) fn check_header(header: &[u8], file_len: u64, path: &str) -> Result<()> {
    parse_header(header, file_len, path).map(drop)
}

/// [`check_header`], returning the header's tensors sorted by their data offsets (the order
/// of their data in the file), each as (name, dtype, shape, data_offsets). The offsets are
/// relative to the end of the header, as in the file.
pub(crate) fn parse_header(
    header: &[u8],
    file_len: u64,
    path: &str,
) -> Result<Vec<(String, TensorInfo)>> {
    let err = |message: String| parse_error(path, message);
    let text = std::str::from_utf8(header).map_err(|e| err(format!("header is not UTF-8: {e}")))?;
    let mut json = serde_json::Deserializer::from_str(text);
    let entries = json
        .deserialize_map(EntriesVisitor)
        .and_then(|entries| json.end().map(|()| entries))
        .map_err(|e| err(format!("header: {e}")))?;
    let mut spans = Vec::with_capacity(entries.len());
    for (name, info) in entries {
        let elements = info
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| err(format!("tensor `{name}`: shape {:?} overflows", info.shape)))?;
        let bits = elements.checked_mul(info.dtype.bitsize()).ok_or_else(|| {
            err(format!(
                "tensor `{name}`: {elements} elements of {:?} overflow",
                info.dtype
            ))
        })?;
        if bits % 8 != 0 {
            return Err(err(format!(
                "tensor `{name}`: {elements} elements of {:?} are not a whole number of bytes",
                info.dtype
            )));
        }
        let (begin, end) = info.data_offsets;
        if end < begin || end - begin != bits / 8 {
            return Err(err(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] do not span the {} bytes of \
                 shape {:?} × {:?}",
                bits / 8,
                info.shape,
                info.dtype
            )));
        }
        spans.push((begin, end, name, info));
    }
    spans.sort_unstable_by(|x, y| (x.0, x.1, &x.2).cmp(&(y.0, y.1, &y.2)));
    let mut covered = 0usize;
    for (begin, end, name, _) in &spans {
        if *begin != covered {
            return Err(err(format!(
                "tensor `{name}`: data starts at byte {begin}, expected {covered} (a gap or an \
                 overlap)"
            )));
        }
        covered = *end;
    }
    let data_start = 8 + header.len();
    let total = u64::try_from(covered)
        .ok()
        .and_then(|c| c.checked_add(data_start as u64));
    if total != Some(file_len) {
        return Err(err(format!(
            "the header describes {data_start} + {covered} bytes, the file has {file_len}"
        )));
    }
    Ok(spans
        .into_iter()
        .map(|(_, _, name, info)| (name, info))
        .collect())
}

/// [`header_len`] and [`check_header`] on a whole file in memory.
pub(crate) fn check_safetensors(bytes: &[u8], path: &str) -> Result<()> {
    let Some(first) = bytes.first_chunk::<8>() else {
        return Err(parse_error(
            path,
            format!(
                "{} bytes, shorter than the 8-byte header length",
                bytes.len()
            ),
        ));
    };
    let n = header_len(*first, bytes.len() as u64, path)?;
    check_header(&bytes[8..8 + n], bytes.len() as u64, path)
}

/// The header's entries in file order: `__metadata__` checked (a map of strings, once) and
/// dropped, every other key a tensor, each key once.
struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Vec<(String, TensorInfo)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of tensors")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        use serde::de::Error;
        let mut seen = HashSet::new();
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(M::Error::custom(format!("key `{key}` appears twice")));
            }
            if key == "__metadata__" {
                map.next_value::<HashMap<String, String>>()?;
            } else {
                entries.push((key, map.next_value::<TensorInfo>()?));
            }
        }
        Ok(entries)
    }
}

/// Reads the safetensors file at `path`: opened once and refused unless a regular file
/// ([`open_regular`]); its length prefix and header are read and checked against the file's
/// size ([`header_len`], [`check_header`]) before the data is allocated, and then exactly the
/// bytes the header accounts for are read. Allocation failure is an error
/// ([`LoraError::Io`] with kind `OutOfMemory`), not an abort.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    let shown = path.display().to_string();
    let (file, size) = open_regular(path)?;
    let io = |e: std::io::Error| LoraError::io(path, &e);
    let mut file = file.take(size);
    if size < 8 {
        return Err(parse_error(
            &shown,
            format!("{size} bytes, shorter than the 8-byte header length"),
        ));
    }
    let mut first = [0u8; 8];
    file.read_exact(&mut first).map_err(io)?;
    let n = header_len(first, size, &shown)?;
    let mut bytes = Vec::new();
    reserve(&mut bytes, 8 + n, path)?;
    bytes.extend_from_slice(&first);
    (&mut file)
        .take(n as u64)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() != 8 + n {
        return Err(parse_error(
            &shown,
            "the file shrank while it was read".into(),
        ));
    }
    check_header(&bytes[8..], size, &shown)?;
    // The header accounts for every byte of the file: read the rest, no more.
    let total = usize::try_from(size)
        .map_err(|_| parse_error(&shown, format!("{size} bytes do not fit in memory")))?;
    let rest = total - bytes.len();
    reserve(&mut bytes, rest, path)?;
    advise_huge_pages(&bytes);
    file.read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() != total {
        return Err(parse_error(
            &shown,
            "the file shrank while it was read".into(),
        ));
    }
    Ok(bytes)
}

/// Reserves `extra` bytes or fails with an error instead of aborting.
fn reserve(bytes: &mut Vec<u8>, extra: usize, path: &Path) -> Result<()> {
    bytes.try_reserve_exact(extra).map_err(|e| LoraError::Io {
        path: path.display().to_string(),
        kind: std::io::ErrorKind::OutOfMemory,
        message: format!("cannot allocate {extra} bytes: {e}"),
    })
}

/// Asks Linux to back the whole 2 MiB pages of `bytes`' spare capacity with huge pages
/// (`MADV_HUGEPAGE`; a hint, failures ignored) before `read` first touches them: one fault a
/// 2 MiB page instead of 512. Measured (Intel Xeon, KVM, a 50 MB adapter,
/// `ndlora inspect --base`, ten alternated runs): 49–64 ms → 31–45 ms, most of it the faults
/// of the buffer read into. Elsewhere, or where the spare capacity spans no whole huge page,
/// it does nothing; with `transparent_hugepage` off the kernel ignores it, and where memory
/// is fragmented it may first compact some (its `defrag` setting) or fall back to 4 KiB
/// pages.
fn advise_huge_pages(bytes: &Vec<u8>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = bytes.as_ptr() as usize + bytes.len();
        let end = bytes.as_ptr() as usize + bytes.capacity();
        let first = start.next_multiple_of(HUGE);
        let last = end & !(HUGE - 1);
        if last > first {
            // SAFETY: first..last lies inside the capacity `bytes` owns (allocated, not yet
            // written); the advice changes how the kernel backs those pages, not their
            // contents or the mapping's access, and no pointer is dereferenced.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

/// A module's (A, B) while a file is read: either may be missing so far.
pub(super) type Halves<A> = (Option<Stored<A>>, Option<Stored<A>>);

/// Which factor a tensor key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Factor {
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

/// What one key of an adapter file holds, for a merge into a whole checkpoint
/// ([`crate::checkpoint`]), which takes more of PEFT's keys than [`PeftAdapter`](super::PeftAdapter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MergeKey<'a> {
    /// `<module>.lora_{A,B}[.default].weight`: a factor of an `nn.Linear` (or GPT-2 `Conv1D`).
    Linear(&'a str, Factor),
    /// `<module>.lora_embedding_{A,B}[.default]`: a factor of an `nn.Embedding`.
    Embedding(&'a str, Factor),
    /// Any other key `base_model.model.<name>`: a whole tensor that replaces the base tensor
    /// `<name>` (`modules_to_save`, or an embedding PEFT saved with the adapter); a
    /// `base_layer` component (a module wrapped by a LoRA layer) is dropped from the name.
    Replacement(String),
}

/// Classifies an adapter key for a checkpoint merge; `None` for keys without PEFT's prefix or
/// with an empty path component.
pub(crate) fn parse_merge_key(name: &str) -> Option<MergeKey<'_>> {
    if let Some((module, factor)) = parse_key(name) {
        return Some(MergeKey::Linear(module, factor));
    }
    let rest = name.strip_prefix(KEY_PREFIX)?;
    for (suffix, factor) in [
        (".lora_embedding_A", Factor::A),
        (".lora_embedding_B", Factor::B),
        (".lora_embedding_A.default", Factor::A),
        (".lora_embedding_B.default", Factor::B),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            if valid_module_name(module) {
                return Some(MergeKey::Embedding(module, factor));
            }
        }
    }
    if !valid_module_name(rest) {
        return None;
    }
    let base: Vec<&str> = rest.split('.').filter(|&c| c != "base_layer").collect();
    Some(MergeKey::Replacement(base.join(".")))
}

/// Non-empty, dot-separated, no empty component.
pub(super) fn valid_module_name(module: &str) -> bool {
    !module.is_empty() && module.split('.').all(|c| !c.is_empty())
}

pub(crate) fn key_of(module: &str, factor: Factor) -> String {
    let f = match factor {
        Factor::A => "lora_A",
        Factor::B => "lora_B",
    };
    format!("{KEY_PREFIX}{module}.{f}.weight")
}

/// Decodes a 2-D tensor of dtype F32, F64, F16 or BF16 into `A` (rounding to nearest).
pub(crate) fn decode<A: LoraFloat>(
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
    let mut values: Vec<A> = Vec::with_capacity(rows * cols);
    if dtype == Dtype::F32 {
        // PEFT's own dtype, and most of a merge's adapter: one pass the compiler vectorises
        // (the general path below pushes one element at a time; 2–3 % of a whole merge).
        values.extend(
            data.chunks_exact(4).map(|c| {
                A::from_f64_lossy(f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            }),
        );
    } else if !for_each_float(dtype, data, |v| values.push(A::from_f64_lossy(v))) {
        return Err(LoraError::PeftTensor {
            name: name.to_owned(),
            expected: "dtype F32, F64, F16 or BF16",
            got: format!("{dtype:?}"),
        });
    }
    // safetensors has checked that the byte length matches shape × dtype size.
    Array2::from_shape_vec((rows, cols), values).map_err(|_| LoraError::PeftTensor {
        name: name.to_owned(),
        expected: "data whose length matches the shape",
        got: format!("{} bytes", data.len()),
    })
}

/// Calls `f` with each element of the little-endian `data` of dtype F32, F64, F16 or BF16,
/// widened to f64 (exactly); returns `false` (without a call) for any other dtype.
pub(crate) fn for_each_float(dtype: Dtype, data: &[u8], f: impl FnMut(f64)) -> bool {
    fn each<const N: usize>(data: &[u8], to_f64: impl Fn([u8; N]) -> f64, f: impl FnMut(f64)) {
        data.chunks_exact(N)
            .map(|c| {
                let mut buf = [0u8; N];
                buf.copy_from_slice(c);
                to_f64(buf)
            })
            .for_each(f);
    }
    match dtype {
        Dtype::F32 => each(data, |b| f64::from(f32::from_le_bytes(b)), f),
        Dtype::F64 => each(data, f64::from_le_bytes, f),
        Dtype::F16 => each(data, |b| half::f16::from_le_bytes(b).to_f64(), f),
        Dtype::BF16 => each(data, |b| half::bf16::from_le_bytes(b).to_f64(), f),
        _ => return false,
    }
    true
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

/// `m` as little-endian bytes of `T`'s own dtype (row-major).
fn encode<T: LoraFloat>(m: ArrayView2<'_, T>) -> OutTensor {
    let dtype = dtype_of::<T>();
    let mut data = Vec::with_capacity(m.len() * (dtype.bitsize() / 8));
    for &v in m.iter() {
        // `into_f64` is exact, and so is each narrowing back to the type `v` came from.
        let v = v.into_f64();
        match dtype {
            Dtype::F32 => data.extend_from_slice(&(v as f32).to_le_bytes()),
            Dtype::F64 => data.extend_from_slice(&v.to_le_bytes()),
            Dtype::BF16 => data.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            _ => data.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
        }
    }
    OutTensor {
        dtype,
        shape: m.shape().to_vec(),
        data,
    }
}

/// A held factor tensor as bytes of the dtype it is held in.
fn encode_stored<A: LoraFloat>(m: &Stored<A>) -> OutTensor {
    match m {
        Stored::Factor(m) => encode(m.view()),
        Stored::Own { values, .. } => encode(values.view()),
    }
}

/// Every tensor of the safetensors file `bytes` (`path` names it in errors; its header is
/// checked first, [`check_safetensors`]), decoded and sorted into (A, B) per module: a tensor
/// of a half `A`'s own dtype is kept in it, every other one is decoded into `A::Factor`.
/// Each must be a `lora_A` / `lora_B` weight of some module, 2-D, non-empty, in F32, F64, F16
/// or BF16, and there only once.
pub(super) fn read_halves<A: LoraFloat>(
    bytes: &[u8],
    path: &str,
) -> Result<BTreeMap<String, Halves<A>>> {
    check_safetensors(bytes, path)?;
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| parse_error(path, e.to_string()))?;
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
        let m = if keeps_own::<A>(view.dtype()) {
            Stored::own(decode::<A>(name, view.dtype(), view.shape(), view.data())?)
        } else {
            Stored::Factor(decode::<A::Factor>(
                name,
                view.dtype(),
                view.shape(),
                view.data(),
            )?)
        };
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
    Ok(halves)
}

/// A safetensors file's bytes: per module (A, B), the keys
/// `base_model.model.<module>.lora_{A,B}.weight` in the dtype each is held in, metadata
/// `{"format": "pt"}`. Errors (a header over [`MAX_HEADER_SIZE`]) name `path`.
pub(super) fn serialize<'a, A: LoraFloat>(
    modules: impl Iterator<Item = (&'a str, &'a Stored<A>, &'a Stored<A>)>,
    path: &str,
) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, OutTensor)> = Vec::new();
    for (name, a, b) in modules {
        tensors.push((key_of(name, Factor::A), encode_stored(a)));
        tensors.push((key_of(name, Factor::B), encode_stored(b)));
    }
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
        .map_err(|e| parse_error(path, e.to_string()))
}
