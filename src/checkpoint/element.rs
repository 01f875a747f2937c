//! The element types of checkpoint tensors ndlora computes on (F32, F64, BF16, F16): reading
//! a tensor's little-endian bytes into an owned, aligned `Vec`, viewing it back as bytes, the
//! conversions PyTorch makes when it copies a tensor into another dtype, and the merge of one
//! weight in its own element type.

use std::fs::File;
use std::path::Path;

use ndarray::{ArrayView2, ArrayViewMut2};
use num_traits::Float;
use safetensors::Dtype;

use crate::check::all_finite;
use crate::error::{LoraError, Result};
use crate::float::LoraFloat;
use crate::merge::{update_weight_into, update_weight_within};

/// A plain float type stored little-endian in safetensors files.
///
/// # Safety
/// Implementors must be plain old data: `Copy`, no padding, no invalid bit patterns, and
/// `size_of::<Self>()` equal to the dtype's size in bytes, so that a `[Self]` may be viewed
/// and written as bytes.
pub(crate) unsafe trait Element: Copy + Default + Send + Sync + 'static {
    /// The safetensors dtype.
    const DTYPE: Dtype;
    /// The value with its bytes reversed (for big-endian hosts).
    fn swap_bytes(self) -> Self;
    /// The value PyTorch's `copy_` stores for the f64 `v` (exactly representable values of
    /// the source dtypes F32, F16, BF16 and F64 go through f64 unchanged): round to nearest
    /// even; to the half types through f32 first, as `c10::BFloat16(float)` and
    /// `c10::Half(float)` do.
    fn from_f64_torch(v: f64) -> Self;
}

// SAFETY: f32 is 4 bytes of plain data; every bit pattern is a value.
unsafe impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn swap_bytes(self) -> Self {
        f32::from_bits(self.to_bits().swap_bytes())
    }
    fn from_f64_torch(v: f64) -> Self {
        v as f32
    }
}

// SAFETY: f64 is 8 bytes of plain data; every bit pattern is a value.
unsafe impl Element for f64 {
    const DTYPE: Dtype = Dtype::F64;
    fn swap_bytes(self) -> Self {
        f64::from_bits(self.to_bits().swap_bytes())
    }
    fn from_f64_torch(v: f64) -> Self {
        v
    }
}

// SAFETY: bf16 is a `#[repr(transparent)]` u16; every bit pattern is a value.
unsafe impl Element for half::bf16 {
    const DTYPE: Dtype = Dtype::BF16;
    fn swap_bytes(self) -> Self {
        half::bf16::from_bits(self.to_bits().swap_bytes())
    }
    fn from_f64_torch(v: f64) -> Self {
        half::bf16::from_f32(v as f32)
    }
}

// SAFETY: f16 is a `#[repr(transparent)]` u16; every bit pattern is a value.
unsafe impl Element for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn swap_bytes(self) -> Self {
        half::f16::from_bits(self.to_bits().swap_bytes())
    }
    fn from_f64_torch(v: f64) -> Self {
        half::f16::from_f32(v as f32)
    }
}

/// Whether `dtype` is one of the [`Element`] types (the dtypes ndlora merges into and
/// converts between).
pub(crate) fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16)
}

/// The first `len` elements of `buffer` seen as `A`s, the buffer grown (never shrunk) to hold
/// them; its old contents are left in place. A buffer that cannot grow gives
/// [`LoraError::Io`] with kind `OutOfMemory` naming `path`.
pub(crate) fn elements_mut<'b, A: Element>(
    buffer: &'b mut Vec<u64>,
    len: usize,
    path: &Path,
) -> Result<&'b mut [A]> {
    const { assert!(std::mem::align_of::<A>() <= std::mem::align_of::<u64>()) };
    let too_large = |message: String| LoraError::Io {
        path: path.display().to_string(),
        kind: std::io::ErrorKind::OutOfMemory,
        message,
    };
    let words = len
        .checked_mul(std::mem::size_of::<A>())
        .map(|bytes| bytes.div_ceil(8))
        .ok_or_else(|| too_large(format!("cannot allocate {len} elements")))?;
    if buffer.len() < words {
        buffer
            .try_reserve_exact(words - buffer.len())
            .map_err(|e| too_large(format!("cannot allocate {len} elements: {e}")))?;
        buffer.resize(words, 0);
    }
    // SAFETY: `buffer` holds at least `len · size_of::<A>()` initialised bytes (`words` u64s),
    // aligned for `A` (the assertion above); `A` is plain data for which every bit pattern is
    // a value (the `Element` contract); the slice borrows `buffer` mutably for its lifetime.
    Ok(unsafe { std::slice::from_raw_parts_mut(buffer.as_mut_ptr().cast::<A>(), len) })
}

/// The elements' memory as bytes.
pub(crate) fn bytes_of<A: Element>(v: &[A]) -> &[u8] {
    // SAFETY: `Element` types are plain data without padding (the trait's contract); the
    // slice covers exactly the `size_of_val(v)` bytes of `v`, borrowed for `v`'s lifetime.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The elements' memory as writable bytes.
fn bytes_of_mut<A: Element>(v: &mut [A]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`; in addition every bit pattern is a valid `A` (the trait's
    // contract), so any bytes written through the view leave valid elements.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Reads `v.len()` little-endian elements from `file` at byte `offset` into `v` (with
/// `pread`, so the file's position is not used and the file is never mapped).
pub(crate) fn read_elements<A: Element>(
    file: &File,
    offset: u64,
    v: &mut [A],
) -> std::io::Result<()> {
    super::io::read_exact_at(file, bytes_of_mut(v), offset)?;
    if cfg!(target_endian = "big") {
        v.iter_mut().for_each(|x| *x = x.swap_bytes());
    }
    Ok(())
}

/// Fills `out` from little-endian `bytes` of `W`s (as many as both hold).
pub(crate) fn copy_le_bytes<A: Element>(bytes: &[u8], out: &mut [A]) {
    let dst = bytes_of_mut(out);
    let n = dst.len().min(bytes.len());
    dst[..n].copy_from_slice(&bytes[..n]);
    if cfg!(target_endian = "big") {
        out.iter_mut().for_each(|x| *x = x.swap_bytes());
    }
}

/// Puts `v` in little-endian byte order (a no-op on little-endian hosts), for writing.
pub(crate) fn to_little_endian<A: Element>(v: &mut [A]) {
    if cfg!(target_endian = "big") {
        v.iter_mut().for_each(|x| *x = x.swap_bytes());
    }
}

/// A weight type a LoRA update can be merged into: a checkpoint element type that is also a
/// [`LoraFloat`], with the float type PEFT forms ΔW in as its `Factor` (f32 for F32, BF16 and
/// F16 weights, f64 for F64 ones).
pub(crate) trait Weight: Element + LoraFloat {}

impl<T: Element + LoraFloat> Weight for T {}

/// W ← W + α·B A with PEFT's rounding (ΔW in `W::Factor`, one rounding into `W`), checked
/// (`merge::update_weight_within`): an update that would overflow W is refused and W is
/// unchanged. The factors must be finite and `delta` bound the update
/// (`merge::update_magnitude_bound` of the whole factors, computed once per tensor when W is
/// updated a band of rows at a time).
pub(crate) fn update<W: Weight>(
    w: ArrayViewMut2<'_, W>,
    a: ArrayView2<'_, W::Factor>,
    b: ArrayView2<'_, W::Factor>,
    alpha: W::Factor,
    delta: f64,
    operation: &'static str,
) -> Result<()> {
    // An infinite bound makes the update measure max|W| itself (one read of W).
    let mut bound = f64::INFINITY;
    update_weight_within(w, &mut bound, a, b, alpha, delta, operation)
}

/// [`update`] out of place, for a `target` the caller discards on error: `target` ← W +
/// α·B A with W read from `w` (`target`'s shape, not written), the same bits;
/// an update that would leave a weight not finite is refused after the fact
/// (`merge::update_weight_into`).
pub(crate) fn update_into<W: Weight>(
    w: ArrayView2<'_, W>,
    target: ArrayViewMut2<'_, W>,
    a: ArrayView2<'_, W::Factor>,
    b: ArrayView2<'_, W::Factor>,
    alpha: W::Factor,
    operation: &'static str,
) -> Result<()> {
    update_weight_into(w, target, a, b, alpha, operation)
}

/// W ← W + dtype(α·B A): PEFT's embedding merge (`weight.data += delta_weight.to(orig_dtype)`),
/// which rounds ΔW to W's type first and the sum again — unlike its `nn.Linear` merge
/// ([`update`], one rounding). Each ΔWᵢⱼ is the in-order chain of fused multiply-adds over
/// l = 0…r−1 that PyTorch's product computes on the CPU, times α, so that the first rounding
/// sees the same value; one row at a time, no d×k temporary. W must be a buffer the caller
/// discards on error: an update that would leave a non-finite weight is refused after the fact.
pub(crate) fn update_delta_rounded_first<W: Weight>(
    mut w: ArrayViewMut2<'_, W>,
    a: ArrayView2<'_, W::Factor>,
    b: ArrayView2<'_, W::Factor>,
    alpha: W::Factor,
    operation: &'static str,
) -> Result<()> {
    let zero = <W::Factor as num_traits::Zero>::zero();
    let mut acc = vec![zero; w.ncols()];
    for (mut w_row, b_row) in w.rows_mut().into_iter().zip(b.rows()) {
        acc.fill(zero);
        for (&b_il, a_row) in b_row.iter().zip(a.rows()) {
            for (acc, &a_lj) in acc.iter_mut().zip(a_row.iter()) {
                *acc = b_il.mul_add(a_lj, *acc);
            }
        }
        for (w, &sum) in w_row.iter_mut().zip(&acc) {
            let delta = W::from_factor(sum * alpha);
            *w = W::from_factor(w.to_factor() + delta.to_factor());
        }
    }
    if !all_finite(w.view()) {
        return Err(LoraError::WouldOverflow { operation });
    }
    Ok(())
}
