//! Whole safetensors checkpoints: fold a PEFT LoRA adapter into a base model's weights (or
//! take it out again), streaming tensor by tensor, with PEFT's numbers.
//!
//! [`merge`] reads a base checkpoint — one `.safetensors` file, or a directory with
//! `model.safetensors.index.json` and its shards (or `model.safetensors`) — and a PEFT adapter
//! directory, and writes to a new directory what PEFT's
//! `PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(out)` would
//! hold, with the base's layout:
//!
//! * the same shard files, with the same tensors (names, dtypes, shapes) in the same order of
//!   data, and the base's index file; safetensors metadata `{"format": "pt"}`;
//! * every module the adapter's keys name (`base_model.model.<module>.lora_A.weight`, …) merged
//!   into the base tensor `<module>.weight`, with the module's own r and α (`rank_pattern`,
//!   `alpha_pattern`) and rsLoRA: W ← W + s·B A for `nn.Linear`, W ← W + s·(B A)ᵀ for
//!   embeddings (`lora_embedding_A/B`) and with `fan_in_fan_out` (GPT-2's `Conv1D`, weights
//!   stored in×out) — the transposed ones as the same rank-r update with the factors' roles
//!   swapped, no d×k temporary ([`ModuleKind`]);
//! * whole tensors in the adapter (`modules_to_save`) in place of the base's, converted to the
//!   base dtype as PyTorch's `copy_` does;
//! * every other tensor copied byte for byte, and the directory's other files (config,
//!   tokenizer, …) copied; files in subdirectories and weight files that are not part of the
//!   checkpoint (`*.bin`, `*.pt`, …, a stray `.safetensors`) are left out and listed in the
//!   [`MergeSummary`].
//!
//! Before a byte is written, [`plan()`] checks the whole job: every module's base tensor exists
//! with the right shape and a float dtype, every factor is finite in the float type it is used
//! in, and the adapter asks for nothing ndlora does not implement (DoRA, LoRA biases, other
//! `peft_type`s, … are refused as by [`PeftAdapter::load`](crate::peft::PeftAdapter::load)).
//!
//! ## Numbers
//!
//! As PEFT on a CPU: ΔW is formed in f32 (the factors are f32 in PEFT, also for BF16 and F16
//! weights; f64 for F64 weights) and added to the weight with one rounding into its dtype —
//! except for embeddings, where PEFT rounds ΔW to the weight's dtype first and the sum again
//! (`weight.data += delta_weight.to(orig_dtype)`), and so does ndlora.
//! ndlora's update is `merge::update_weight`, the one [`LoraLayer::merge`](crate::LoraLayer::merge)
//! runs: it refuses an update that would overflow a weight to ±∞ (naming the tensor) rather
//! than write it. [`Operation::Unmerge`] subtracts the same ΔW (W ← W − s·B A); in half
//! precision that does not give back the base bit for bit, since W + ΔW was rounded to 8 (BF16)
//! or 11 (F16) significant bits: expect differences of an ulp of |W + ΔW| where ΔW is not
//! small against W. An adapter with `modules_to_save` tensors cannot be unmerged (the base's
//! tensors they replaced are gone) and is refused.
//!
//! ## Streaming and memory
//!
//! Each output file is created at its full size (reserved on disk with `fallocate` where the
//! file system can, so a full disk fails before the work) and filled in blocks, shard by
//! shard, by [`set_blas_threads`](crate::set_blas_threads) worker threads taking the blocks in
//! order: a tensor the adapter does not touch is copied file to file in ranges of 64 MiB (by
//! the kernel, `copy_file_range`, on Linux); a merged tensor is done a band of rows at a time
//! (about 1 MiB): the update reads the band from the base file's map (or, with
//! [`MergeOptions::map_inputs`] off or where maps are not used, from a copy read with
//! `pread`), writes the result into the worker's own buffer, checks it finite there while it
//! is in the core's cache, and the buffer is written at its final offset with `pwrite`. Each
//! byte is read once and written once, and nothing is allocated per tensor: peak memory is the
//! adapter's file plus about 1 MiB per thread (a replaced tensor, from `modules_to_save`, is
//! held whole), whatever the checkpoint's size. The bytes written do not depend on the thread
//! count.

//! ## Files from elsewhere
//!
//! Inputs are untrusted, as for adapter files ([`peft`](crate::peft)'s *Hostile files*): regular
//! files only, each safetensors header checked against its file's size with overflow-checked
//! arithmetic before any tensor data is read or any memory sized by it is allocated, index files
//! bounded ([`MAX_INDEX_SIZE`]) and their shard names plain file names. Every failure is a
//! [`LoraError`] naming the file and, where there is one, the tensor
//! ([`LoraError::InTensor`]); no input makes it panic.
//!
//! A base file that another process truncates while it is read gives an I/O error naming it,
//! and the process lives on. Read with `pread`, that is the short read; read through a map
//! (the default on Linux) it would be a `SIGBUS`, which ends a plain mmap reader: ndlora
//! registers its maps with a `SIGBUS` handler it installs once per process, which maps zeros
//! over the vanished pages and marks the map, and the band is refused before it is written
//! ("the file was truncated while it was read"). Faults outside ndlora's maps go to the
//! handler installed before it, as if it were not there. A program that replaces the
//! `SIGBUS` handler after ndlora's without chaining to it takes the guard away; it should set
//! [`MergeOptions::map_inputs`] to `false`. A file that is rewritten in place (not truncated)
//! while it is read may give a mix of old and new bytes, as with any reader. The adapter and
//! the tensors copied unchanged are never mapped.
//!
//! ## Output
//!
//! Everything is written into a new temporary directory beside `out` (`.ndlora-*`), synced to
//! disk ([`MergeOptions::sync`]), and renamed to `out` at the end, so a failure (a bad adapter,
//! a full disk, an error in the middle) leaves no `out` that looks complete: the temporary
//! directory is removed on error. (A process killed outright, e.g. by `SIGKILL` or an unhandled
//! Ctrl-C, leaves the hidden `.ndlora-*` directory, never `out`.) An existing `out` is refused
//! unless [`MergeOptions::force`]; then it is replaced only once the new one is complete, and
//! never when it contains the base or the adapter.
//!
//! ## Example
//!
//! ```
//! use ndlora::checkpoint::{merge, MergeOptions, Operation};
//!
//! let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/checkpoint/llama_bf16_r8");
//! let out = std::env::temp_dir().join(format!("ndlora-ckpt-doc-{}", std::process::id()));
//! let options = MergeOptions { sync: false, ..MergeOptions::default() };
//! let summary = merge(
//!     format!("{fixture}/base"),
//!     format!("{fixture}/adapter"),
//!     &out,
//!     &options,
//!     &mut |_progress| {},
//! )?;
//! assert_eq!((summary.merged, summary.replaced, summary.copied), (14, 0, 7));
//! assert!(out.join("model.safetensors.index.json").exists());
//! # std::fs::remove_dir_all(&out).ok();
//! # Ok::<(), ndlora::LoraError>(())
//! ```

mod adapter;
mod element;
mod io;
#[cfg(target_os = "linux")]
mod mapped;
mod plan;
mod reader;
mod stream;
mod writer;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use adapter::{AdapterModule, AdapterTensor, CheckpointAdapter, ModuleKind};
pub use plan::{plan, Plan, PlanEntry};
pub use reader::{Checkpoint, TensorInfo, INDEX_FILE, MAX_INDEX_SIZE, SINGLE_FILE};

use crate::error::{LoraError, Result};
use crate::peft::open_regular;

/// Where maps are not used: every read is a `pread`.
#[cfg(not(target_os = "linux"))]
mod mapped {
    /// Never made: [`open`](MappedFile::open) declines.
    pub(crate) struct MappedFile(std::convert::Infallible);

    impl MappedFile {
        pub(crate) fn open(_: &std::fs::File, _: u64) -> Option<Self> {
            None
        }
        pub(crate) fn bytes(&self) -> &[u8] {
            match self.0 {}
        }
        pub(crate) fn check(&self) -> std::io::Result<()> {
            match self.0 {}
        }
    }
}

/// Whether [`merge`] adds the adapter's update to the base or subtracts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Operation {
    /// W ← W + s·B A (PEFT's `merge_and_unload`).
    #[default]
    Merge,
    /// W ← W − s·B A: a merged checkpoint back to (nearly) its base; see the module docs for
    /// the round-off this leaves in half precision.
    Unmerge,
}

impl Operation {
    /// `"merge"` or `"unmerge"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Merge => "merge",
            Self::Unmerge => "unmerge",
        }
    }
}

/// How [`merge`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeOptions {
    /// Add or subtract the update.
    pub operation: Operation,
    /// Replace an existing output path (only once the new output is complete, and never one
    /// that contains the base or the adapter). Default `false`: an existing path is refused.
    pub force: bool,
    /// Sync every output file and the directory to disk before the output is renamed into
    /// place (default `true`), so that a complete-looking output is complete after a power
    /// failure too.
    pub sync: bool,
    /// Read the base's merged tensors through a memory map (default `true`; Linux on a
    /// little-endian CPU, elsewhere always `pread`): the update reads the page cache itself
    /// instead of a copy of it, and a base file truncated meanwhile is caught (see *Files
    /// from elsewhere*). `false` reads them with `pread`; the output is the same.
    pub map_inputs: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self {
            operation: Operation::Merge,
            force: false,
            sync: true,
            map_inputs: true,
        }
    }
}

/// How far a [`merge`] has come, reported after each tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Tensors written so far.
    pub tensors_done: usize,
    /// Tensors in the checkpoint.
    pub tensors_total: usize,
    /// Tensor bytes written so far.
    pub bytes_done: u64,
    /// Tensor bytes in the checkpoint.
    pub bytes_total: u64,
    /// The tensor just done.
    pub tensor: String,
}

/// What a [`merge`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSummary {
    /// Tensors the adapter's update was merged into (or taken out of).
    pub merged: usize,
    /// Tensors replaced by the adapter's (`modules_to_save`).
    pub replaced: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Bytes written: tensor data and headers of the safetensors files.
    pub bytes: u64,
    /// The other files copied (config, tokenizer, index, …).
    pub files: Vec<String>,
    /// Entries of the base directory left out: subdirectories, files that are not regular and
    /// weight files that are not part of the checkpoint.
    pub skipped: Vec<String>,
    /// Wall time, in seconds.
    pub seconds: f64,
}

/// File extensions of weights in other formats (or of stray safetensors files): not copied,
/// since the merge does not change them and an unmerged copy beside the merged checkpoint
/// would be taken for part of it.
const WEIGHT_EXTENSIONS: &[&str] = &[
    "safetensors",
    "bin",
    "pt",
    "pth",
    "ckpt",
    "gguf",
    "h5",
    "msgpack",
    "onnx",
    "npz",
];

/// Merges the PEFT adapter in the directory `adapter` into the checkpoint `base` (a
/// `.safetensors` file or a checkpoint directory) and writes the result to the new directory
/// `out` (see the [module docs](self)). `progress` is called after each tensor.
///
/// Errors (each naming the file and tensor at fault; `out` is left as it was): anything
/// [`Checkpoint::open`], [`CheckpointAdapter::open`] or [`Plan::check`] refuses;
/// [`LoraError::OutputExists`] for an existing `out` without [`MergeOptions::force`], or one
/// that contains an input; [`LoraError::WouldOverflow`] (in an [`LoraError::InTensor`]) for an
/// update that would make a weight infinite; [`LoraError::PeftUnsupported`] for an unmerge of
/// an adapter with `modules_to_save` tensors; [`LoraError::Io`] for a failed read or write
/// (a full disk, an input truncated meanwhile, …).
pub fn merge(
    base: impl AsRef<Path>,
    adapter: impl AsRef<Path>,
    out: impl AsRef<Path>,
    options: &MergeOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MergeSummary> {
    let start = Instant::now();
    let (base, adapter, out) = (base.as_ref(), adapter.as_ref(), out.as_ref());
    check_out(out, &[base, adapter], options.force)?;
    let checkpoint = Checkpoint::open(base)?;
    let adapter = CheckpointAdapter::open(adapter)?;
    let plan = plan(&checkpoint, &adapter);
    plan.check()?;
    if options.operation == Operation::Unmerge {
        if let Some((tensor, t)) = adapter.replacements().iter().next() {
            return Err(LoraError::PeftUnsupported {
                field: "modules_to_save".into(),
                got: format!("`{}` replaces `{tensor}`", t.key),
                supported: "merge only: an unmerge cannot restore the base tensors the \
                            adapter replaced",
            });
        }
    }

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| LoraError::io(&parent, &e))?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(".ndlora-");
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o777));
    let temp = builder
        .tempdir_in(&parent)
        .map_err(|e| LoraError::io(&parent, &e))?;

    let mut summary = MergeSummary {
        merged: 0,
        replaced: 0,
        copied: 0,
        bytes: 0,
        files: Vec::new(),
        skipped: Vec::new(),
        seconds: 0.0,
    };
    stream::write_shards(
        &checkpoint,
        &adapter,
        &plan,
        temp.path(),
        options,
        &mut summary,
        progress,
    )?;
    copy_other_files(&checkpoint, temp.path(), options.sync, &mut summary)?;
    if options.sync {
        sync_dir(temp.path())?;
    }
    replace_out(temp, out, options.force, &parent)?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Refuses an existing `out` unless `force`, and always one that contains an input.
fn check_out(out: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    if std::fs::symlink_metadata(out).is_err() {
        return Ok(());
    }
    if !force {
        return Err(LoraError::OutputExists {
            path: out.display().to_string(),
            reason: "exists (pass --force / MergeOptions::force to replace it)",
        });
    }
    let out_real = std::fs::canonicalize(out).map_err(|e| LoraError::io(out, &e))?;
    for input in inputs {
        if let Ok(real) = std::fs::canonicalize(input) {
            if real.starts_with(&out_real) {
                return Err(LoraError::OutputExists {
                    path: out.display().to_string(),
                    reason: "contains an input of the merge (the base or the adapter) and \
                             cannot be replaced by its output",
                });
            }
        }
    }
    Ok(())
}

/// Renames the finished `temp` to `out`; an existing `out` (with `force`) is first moved into
/// another temporary directory, removed once the new one is in place.
fn replace_out(temp: tempfile::TempDir, out: &Path, force: bool, parent: &Path) -> Result<()> {
    let trash = if force && std::fs::symlink_metadata(out).is_ok() {
        let trash = tempfile::Builder::new()
            .prefix(".ndlora-old-")
            .tempdir_in(parent)
            .map_err(|e| LoraError::io(parent, &e))?;
        std::fs::rename(out, trash.path().join("old")).map_err(|e| LoraError::io(out, &e))?;
        Some(trash)
    } else {
        None
    };
    let path = temp.keep();
    if let Err(e) = std::fs::rename(&path, out) {
        std::fs::remove_dir_all(&path).ok();
        if let Some(trash) = &trash {
            // Put the old output back.
            std::fs::rename(trash.path().join("old"), out).ok();
        }
        return Err(LoraError::io(out, &e));
    }
    drop(trash);
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LoraError::io(dir, &e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Copies the base directory's other files into `dir` (the index from the bytes read at
/// open); records what was copied and what was left out.
fn copy_other_files(
    checkpoint: &Checkpoint,
    dir: &Path,
    sync: bool,
    summary: &mut MergeSummary,
) -> Result<()> {
    let Some(base_dir) = &checkpoint.dir else {
        return Ok(());
    };
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| LoraError::io(&path, &e))
    };
    if let Some(index) = &checkpoint.index {
        write(INDEX_FILE, index)?;
        summary.files.push(INDEX_FILE.to_owned());
    }
    let shards: BTreeSet<&str> = checkpoint.files().into_iter().collect();
    let listing = std::fs::read_dir(base_dir).map_err(|e| LoraError::io(base_dir, &e))?;
    let mut names = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| LoraError::io(base_dir, &e))?;
        names.push(entry.file_name());
    }
    names.sort();
    for name in names {
        let shown = name.to_string_lossy().into_owned();
        let Some(name) = name.to_str() else {
            summary.skipped.push(shown);
            continue;
        };
        if shards.contains(name) || name == INDEX_FILE {
            continue;
        }
        let path = base_dir.join(name);
        let is_file = std::fs::metadata(&path).is_ok_and(|m| m.is_file());
        let extension = Path::new(name)
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let weights = extension.is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e.as_str()));
        if !is_file || weights {
            summary.skipped.push(shown);
            continue;
        }
        let (mut src, _) = open_regular(&path)?;
        let target = dir.join(name);
        let mut dst = std::fs::File::create(&target).map_err(|e| LoraError::io(&target, &e))?;
        std::io::copy(&mut src, &mut dst).map_err(|e| LoraError::io(&target, &e))?;
        if sync {
            dst.sync_all().map_err(|e| LoraError::io(&target, &e))?;
        }
        summary.files.push(shown);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::element::Element;

    #[test]
    fn torch_conversions_round_through_f32_into_half_types() {
        // 1 + 2⁻⁸ + 2⁻³⁰: to nearest in bf16 directly is 1 + 2⁻⁷; through f32 (ties to even
        // at 1 + 2⁻⁸) it is 1.0, which is what PyTorch stores.
        let v = 1.0 + 2f64.powi(-8) + 2f64.powi(-30);
        assert_eq!(half::bf16::from_f64_torch(v), half::bf16::from_f32(1.0));
        // (The nearest bf16 to v itself is 1 + 2⁻⁷: v is past the midpoint.)
        assert!(v - 1.0 > 1.0 + 2f64.powi(-7) - v);
        assert_eq!(f32::from_f64_torch(v), v as f32);
    }
}
