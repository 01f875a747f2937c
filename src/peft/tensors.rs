//! `adapter_model.safetensors`: tensor keys, decoding F32/F64/F16/BF16 into the float type,
//! encoding it back, and reading and writing the file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::{Array2, ArrayView2};
use safetensors::{Dtype, SafeTensors, View};

use super::{KEY_PREFIX, WEIGHTS_FILE};
use crate::error::{shape_str, LoraError, Result};
use crate::float::LoraFloat;
use crate::check::check_finite;

/// A module's (A, B) while a file is read: either may be missing so far.
pub(super) type Halves<A> = (Option<Array2<A>>, Option<Array2<A>>);

/// Which factor a tensor key holds.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Factor {
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
pub(super) fn valid_module_name(module: &str) -> bool {
    !module.is_empty() && module.split('.').all(|c| !c.is_empty())
}

pub(super) fn key_of(module: &str, factor: Factor) -> String {
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

/// Every tensor of the safetensors file `bytes` (`path` names it in errors), decoded into `A`
/// and sorted into (A, B) per module. Each must be a `lora_A` / `lora_B` weight of some module,
/// 2-D, non-empty, finite after conversion, and there only once.
pub(super) fn read_halves<A: LoraFloat>(
    bytes: &[u8],
    path: &str,
) -> Result<BTreeMap<String, Halves<A>>> {
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| LoraError::Parse {
        path: path.to_owned(),
        format: "safetensors",
        message: e.to_string(),
    })?;
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
    Ok(halves)
}

/// Writes `path` as a safetensors file: per module (A, B), the keys
/// `base_model.model.<module>.lora_{A,B}.weight` in `A`'s own dtype, metadata
/// `{"format": "pt"}`.
pub(super) fn write_safetensors<'a, A: LoraFloat>(
    path: &Path,
    modules: impl Iterator<Item = (&'a str, ArrayView2<'a, A>, ArrayView2<'a, A>)>,
) -> Result<()> {
    let mut tensors: Vec<(String, OutTensor)> = Vec::new();
    for (name, a, b) in modules {
        tensors.push((key_of(name, Factor::A), encode(a)));
        tensors.push((key_of(name, Factor::B), encode(b)));
    }
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, t)| (k.as_str(), t)),
        Some(metadata),
        path,
    )
    .map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => LoraError::io(path, &io),
        other => LoraError::Parse {
            path: path.display().to_string(),
            format: "safetensors",
            message: other.to_string(),
        },
    })
}
