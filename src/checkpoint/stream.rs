//! The merge's engine: each output shard is cut into blocks — byte ranges of tensors copied
//! unchanged, bands of rows of a merged tensor, whole replaced tensors — which worker threads
//! take in order. A worker computes a band (about [`BAND_BYTES`], small enough to stay in the
//! core's cache) into a buffer it keeps — the update reading the base from the shard's map
//! (`mapped.rs`), or from the buffer itself after a `pread` — and writes it at its final
//! offset with `pwrite`: each byte of the base is read once from the page cache and written
//! once into the output's, whatever the checkpoint's size, and no memory is allocated per
//! tensor.

use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::sync::Mutex;

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2};
use safetensors::Dtype;

use super::adapter::{AdapterModule, AdapterTensor, CheckpointAdapter, ModuleKind};
use super::element::{self, bytes_of, elements_mut, read_elements, to_little_endian, Weight};
use super::io::{copy_range_at, start_writeback, write_all_at};
use super::mapped::MappedFile;
use super::plan::{self, Plan};
use super::reader::{Checkpoint, Entry, Shard};
use super::{writer, MergeOptions, MergeSummary, Operation, Progress};
use crate::backend::{kernel_threads, with_one_kernel_thread};
use crate::error::{LoraError, Result};
use crate::float::LoraFloat;
use crate::merge::update_magnitude_bound;

/// Bytes of a band of rows a worker updates at a time: read, updated and written while it
/// is in the core's cache (a 4096-wide BF16 weight: 128 rows).
const BAND_BYTES: usize = 1 << 20;

/// Bytes of an unchanged range copied per block.
const COPY_BYTES: u64 = 64 << 20;

/// What happens to one tensor.
enum Work<'a> {
    /// Copied unchanged.
    Copy,
    /// Replaced by the adapter's bytes as they are (a dtype ndlora does not compute in).
    Raw(&'a [u8]),
    /// Computed in blocks: the base's elements or the replacement's, then the update if any.
    New {
        replacement: Option<&'a AdapterTensor>,
        update: Option<Update>,
    },
}

/// A module's update arranged as W ← W + α·B A over W's rows, in the float type PEFT forms
/// ΔW in (f32, or f64 for F64 weights).
enum Update {
    F32(Factors<f32>),
    F64(Factors<f64>),
}

/// The factors of an update over W's rows: row i of W takes α·(row i of `b`)·`a`.
struct Factors<F> {
    a: Array2<F>,
    b: Array2<F>,
    alpha: F,
    /// A bound on |α·B A| (`merge::update_magnitude_bound`), for every band.
    delta: f64,
    /// PEFT's embedding merge: ΔW rounded to W's dtype before the sum.
    rounded_first: bool,
}

/// A part of one tensor's work.
enum Part {
    /// A byte range, from the tensor's start, copied unchanged.
    Bytes(Range<u64>),
    /// A band of rows of a 2-D tensor.
    Rows(Range<usize>),
    /// The whole tensor at once.
    Whole,
}

/// One block: a part of the tensor `entry` (an index into the shard's entries).
struct Block {
    entry: usize,
    part: Part,
}

/// Writes every shard of `checkpoint` into `dir`, merging as `plan` says, with the thread
/// count ndlora's kernels use; counts what it does in `summary`.
pub(super) fn write_shards(
    checkpoint: &Checkpoint,
    adapter: &CheckpointAdapter,
    plan: &Plan,
    dir: &Path,
    options: &MergeOptions,
    summary: &mut MergeSummary,
    progress: &mut dyn FnMut(&Progress),
) -> Result<()> {
    let entries = || checkpoint.shards.iter().flat_map(|s| s.entries.iter());
    let mut state = Progress {
        tensors_done: 0,
        tensors_total: entries().count(),
        bytes_done: 0,
        bytes_total: entries().map(|e| e.end - e.begin).sum(),
        tensor: String::new(),
    };
    let mut written = Vec::with_capacity(checkpoint.shards.len());
    let mut buffer = Vec::new();
    for shard in &checkpoint.shards {
        let (works, blocks) = prepare(shard, adapter, plan, options.operation, summary)?;
        let path = dir.join(&shard.name);
        let (file, data_start) = writer::create(shard, &path)?;
        summary.bytes += data_start;
        let out = Output {
            file: &file,
            path: &path,
            data_start,
        };
        let mut remaining = vec![0usize; shard.entries.len()];
        blocks.iter().for_each(|b| remaining[b.entry] += 1);
        let mapped = map_for_updates(shard, &works, options);
        let job = Job {
            shard,
            adapter,
            operation: options.operation,
            works: &works,
            blocks: &blocks,
            out,
            mapped: mapped.as_ref(),
        };
        run(&job, kernel_threads(), &mut buffer, &mut |entry| {
            remaining[entry] -= 1;
            if remaining[entry] == 0 {
                let e = &shard.entries[entry];
                summary.bytes += e.end - e.begin;
                state.tensors_done += 1;
                state.bytes_done += e.end - e.begin;
                state.tensor.clone_from(&e.name);
                progress(&state);
            }
        })?;
        if options.sync {
            start_writeback(&file);
        }
        written.push((path, file));
    }
    if options.sync {
        for (path, file) in &written {
            file.sync_all().map_err(|e| LoraError::io(path, &e))?;
        }
    }
    Ok(())
}

/// What each tensor of `shard` needs and the blocks it is cut into, in the order of the data;
/// every tensor has at least one block. Decodes the factors of the modules merged here.
fn prepare<'a>(
    shard: &Shard,
    adapter: &'a CheckpointAdapter,
    plan: &'a Plan,
    operation: Operation,
    summary: &mut MergeSummary,
) -> Result<(Vec<Work<'a>>, Vec<Block>)> {
    let mut works = Vec::with_capacity(shard.entries.len());
    let mut blocks = Vec::new();
    for (index, entry) in shard.entries.iter().enumerate() {
        let in_tensor = |e: LoraError| e.in_tensor(&shard.shown(), &entry.name);
        let work = match plan.action(&entry.name) {
            None => {
                summary.copied += 1;
                Work::Copy
            }
            Some(action) => {
                let update = match action.module {
                    Some(m) => {
                        let module = &adapter.modules()[m];
                        Some(update_for(entry, adapter, module, operation).map_err(in_tensor)?)
                    }
                    None => None,
                };
                summary.merged += usize::from(update.is_some());
                summary.replaced += usize::from(action.replacement.is_some());
                match (&action.replacement, update) {
                    (Some(t), None) if !element::is_float(entry.dtype) => {
                        Work::Raw(adapter.data(t))
                    }
                    (replacement, update) => Work::New {
                        replacement: replacement.as_ref(),
                        update,
                    },
                }
            }
        };
        let len = entry.end - entry.begin;
        let mut add = |part| blocks.push(Block { entry: index, part });
        match &work {
            Work::Copy => {
                add(Part::Bytes(0..len.min(COPY_BYTES)));
                let mut start = COPY_BYTES;
                while start < len {
                    add(Part::Bytes(start..len.min(start + COPY_BYTES)));
                    start += COPY_BYTES;
                }
            }
            Work::New {
                replacement: None,
                update: Some(_),
            } if entry.shape.len() == 2 && entry.shape[0] > 0 => {
                let (rows, cols) = (entry.shape[0], entry.shape[1]);
                let row_bytes = cols.saturating_mul(entry.dtype.bitsize() / 8).max(1);
                let band = (BAND_BYTES / row_bytes).max(1);
                let mut start = 0;
                while start < rows {
                    let end = rows.min(start + band);
                    add(Part::Rows(start..end));
                    start = end;
                }
            }
            _ => add(Part::Whole),
        }
        works.push(work);
    }
    Ok((works, blocks))
}

/// `module`'s update for the weight `entry`, W ← W ± s·B A (or ± s·(B A)ᵀ), as an update over
/// W's rows: the transposed kinds take B' = Aᵀ and A' = Bᵀ (no d×k temporary).
fn update_for(
    entry: &Entry,
    adapter: &CheckpointAdapter,
    module: &AdapterModule,
    operation: Operation,
) -> Result<Update> {
    fn factors<F: LoraFloat>(
        adapter: &CheckpointAdapter,
        module: &AdapterModule,
        operation: Operation,
    ) -> Result<Factors<F>> {
        let (a, b) = adapter.factors::<F>(module)?;
        let sign = match operation {
            Operation::Merge => 1.0,
            Operation::Unmerge => -1.0,
        };
        let alpha = F::from_f64_lossy(sign * module.scaling);
        let delta = update_magnitude_bound(a.view(), b.view(), alpha);
        Ok(if module.kind.is_transposed() {
            Factors {
                a: b.t().as_standard_layout().into_owned(),
                b: a.t().as_standard_layout().into_owned(),
                alpha,
                delta,
                rounded_first: module.kind == ModuleKind::Embedding,
            }
        } else {
            Factors {
                a,
                b,
                alpha,
                delta,
                rounded_first: false,
            }
        })
    }
    match entry.dtype {
        Dtype::F32 | Dtype::BF16 | Dtype::F16 => {
            Ok(Update::F32(factors(adapter, module, operation)?))
        }
        Dtype::F64 => Ok(Update::F64(factors(adapter, module, operation)?)),
        other => Err(plan::unsupported_weight(other, &entry.shape)),
    }
}

/// `shard`'s file mapped for reading its merged tensors, where `options` want maps, the
/// host is little-endian (the data is used as it lies) and some tensor is updated.
fn map_for_updates(
    shard: &Shard,
    works: &[Work<'_>],
    options: &MergeOptions,
) -> Option<MappedFile> {
    let updates = works.iter().any(|w| {
        matches!(
            w,
            Work::New {
                replacement: None,
                update: Some(_)
            }
        )
    });
    if !(options.map_inputs && updates && cfg!(target_endian = "little")) {
        return None;
    }
    let end = shard.entries.iter().map(|e| e.end).max().unwrap_or(0);
    MappedFile::open(&shard.file, shard.data_start.checked_add(end)?)
}

/// An output shard being written.
struct Output<'a> {
    file: &'a File,
    path: &'a Path,
    /// Where its data section starts.
    data_start: u64,
}

/// One shard's blocks and what they need.
struct Job<'a> {
    shard: &'a Shard,
    adapter: &'a CheckpointAdapter,
    operation: Operation,
    works: &'a [Work<'a>],
    blocks: &'a [Block],
    out: Output<'a>,
    /// The shard's file, mapped ([`map_for_updates`]).
    mapped: Option<&'a MappedFile>,
}

/// Runs `job`'s blocks on `threads` workers — the calling thread, with `buffer` as its
/// memory, and `threads − 1` more — each taking the next block in order; calls `done` (on the
/// calling thread) with a block's tensor index as each block finishes. The first failing block
/// (in the order of the blocks) gives the error; no block is started after a failure.
fn run(
    job: &Job<'_>,
    threads: usize,
    buffer: &mut Vec<u64>,
    done: &mut dyn FnMut(usize),
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None::<(usize, LoraError)>);
    let fail = |index: usize, error: LoraError| {
        failed.store(true, Ordering::Relaxed);
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(|(i, _)| index < *i) {
            *slot = Some((index, error));
        }
    };
    let work = |buffer: &mut Vec<u64>, finished: &mut dyn FnMut(usize)| {
        with_one_kernel_thread(|| {
            while !failed.load(Ordering::Relaxed) {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(block) = job.blocks.get(index) else {
                    break;
                };
                match run_block(job, block, buffer) {
                    Ok(()) => finished(block.entry),
                    Err(e) => fail(index, e),
                }
            }
        });
    };
    let (finished, finishes) = channel::<usize>();
    std::thread::scope(|scope| {
        for _ in 1..threads.clamp(1, job.blocks.len().max(1)) {
            let finished = finished.clone();
            let work = &work;
            let spawned = std::thread::Builder::new()
                .name("ndlora-merge".into())
                .spawn_scoped(scope, move || {
                    work(&mut Vec::new(), &mut |entry| {
                        finished.send(entry).ok();
                    });
                });
            if let Err(e) = spawned {
                fail(0, LoraError::io(job.out.path, &e));
                break;
            }
        }
        drop(finished);
        work(buffer, &mut |entry| {
            done(entry);
            finishes.try_iter().for_each(&mut *done);
        });
        // The other workers' last blocks.
        finishes.iter().for_each(&mut *done);
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some((_, error)) => Err(error),
        None => Ok(()),
    }
}

/// Does one block, with `buffer` as its memory.
fn run_block(job: &Job<'_>, block: &Block, buffer: &mut Vec<u64>) -> Result<()> {
    let (shard, out) = (job.shard, &job.out);
    let entry = &shard.entries[block.entry];
    let in_tensor = |e: LoraError| e.in_tensor(&shard.shown(), &entry.name);
    let to_out = |e: std::io::Error| in_tensor(LoraError::io(out.path, &e));
    match (&job.works[block.entry], &block.part) {
        (Work::Copy, Part::Bytes(range)) => copy_range_at(
            &shard.file,
            shard.data_start + entry.begin + range.start,
            out.file,
            out.data_start + entry.begin + range.start,
            range.end - range.start,
        )
        .map_err(to_out),
        (Work::Raw(bytes), _) => {
            write_all_at(out.file, bytes, out.data_start + entry.begin).map_err(to_out)
        }
        (
            Work::New {
                replacement,
                update,
            },
            part,
        ) => {
            let rows = match part {
                Part::Rows(rows) => Some(rows.clone()),
                _ => None,
            };
            let block = NewBlock {
                job,
                entry,
                rows,
                replacement: *replacement,
            };
            let op = job.operation.name();
            match (entry.dtype, update) {
                (Dtype::F32, None) => block.run::<f32>(None, op, buffer),
                (Dtype::F32, Some(Update::F32(f))) => block.run::<f32>(Some(f), op, buffer),
                (Dtype::BF16, None) => block.run::<half::bf16>(None, op, buffer),
                (Dtype::BF16, Some(Update::F32(f))) => block.run::<half::bf16>(Some(f), op, buffer),
                (Dtype::F16, None) => block.run::<half::f16>(None, op, buffer),
                (Dtype::F16, Some(Update::F32(f))) => block.run::<half::f16>(Some(f), op, buffer),
                (Dtype::F64, None) => block.run::<f64>(None, op, buffer),
                (Dtype::F64, Some(Update::F64(f))) => block.run::<f64>(Some(f), op, buffer),
                (other, _) => Err(plan::unsupported_weight(other, &entry.shape)),
            }
            .map_err(in_tensor)
        }
        (Work::Copy, _) => Err(in_tensor(LoraError::InvalidValue {
            what: "checkpoint block",
            expected: "a byte range for a copied tensor",
            got: "rows".into(),
        })),
    }
}

/// A block of a tensor with new elements: `rows` of it (all when `None`).
struct NewBlock<'a> {
    job: &'a Job<'a>,
    entry: &'a Entry,
    rows: Option<Range<usize>>,
    replacement: Option<&'a AdapterTensor>,
}

impl NewBlock<'_> {
    /// Reads the block's elements (or the replacement's), applies the update and writes them.
    fn run<W: Weight>(
        &self,
        factors: Option<&Factors<W::Factor>>,
        operation: &'static str,
        buffer: &mut Vec<u64>,
    ) -> Result<()> {
        let (shard, out, entry) = (self.job.shard, &self.job.out, self.entry);
        let cols = entry.shape.get(1).copied().unwrap_or(0);
        let (first, count) = match &self.rows {
            Some(rows) => (rows.start * cols, rows.len() * cols),
            None => (0, entry.shape.iter().product()),
        };
        let data: &mut [W] = elements_mut(buffer, count, &shard.path)?;
        let offset = entry.begin + (first * std::mem::size_of::<W>()) as u64;
        let source = match (self.replacement, factors) {
            (None, Some(f)) if !f.rounded_first => self.mapped::<W>(offset, count),
            _ => None,
        };
        if let (Some((map, source, range)), Some(f)) = (source, factors) {
            // The band is read from the map by the update itself and written into `data`.
            let rows = self.rows.clone().unwrap_or(0..entry.shape[0]);
            let shape = (rows.len(), cols);
            let bad_shape = |_| plan::unsupported_weight(entry.dtype, &entry.shape);
            let w = ArrayView2::from_shape(shape, source).map_err(bad_shape)?;
            let target = ArrayViewMut2::from_shape(shape, &mut *data).map_err(bad_shape)?;
            let b = f.b.slice(s![rows, ..]);
            element::update_into::<W>(w, target, f.a.view(), b, f.alpha, operation)?;
            map.check().map_err(|e| LoraError::io(&shard.path, &e))?;
            map.release(range);
            return write_all_at(out.file, bytes_of(data), out.data_start + offset)
                .map_err(|e| LoraError::io(out.path, &e));
        }
        match self.replacement {
            Some(t) => {
                data.fill(W::default());
                plan::replacement_into(self.job.adapter, t, data);
            }
            None => read_elements(&shard.file, shard.data_start + offset, data)
                .map_err(|e| LoraError::io(&shard.path, &e))?,
        }
        if let Some(f) = factors {
            let &[all_rows, _] = &entry.shape[..] else {
                return Err(plan::unsupported_weight(entry.dtype, &entry.shape));
            };
            let rows = self.rows.clone().unwrap_or(0..all_rows);
            let w = ArrayViewMut2::from_shape((rows.len(), cols), &mut *data)
                .map_err(|_| plan::unsupported_weight(entry.dtype, &entry.shape))?;
            let b = f.b.slice(s![rows, ..]);
            if f.rounded_first {
                element::update_delta_rounded_first::<W>(w, f.a.view(), b, f.alpha, operation)?;
            } else {
                element::update::<W>(w, f.a.view(), b, f.alpha, f.delta, operation)?;
            }
        }
        to_little_endian(data);
        write_all_at(out.file, bytes_of(data), out.data_start + offset)
            .map_err(|e| LoraError::io(out.path, &e))
    }

    /// The `count` elements at `offset` in the tensor data, in the shard's map, if it has one
    /// that holds them with W's alignment (a file may place a tensor anywhere; such a
    /// tensor is read with `pread`).
    /// Also returns the elements' byte range in the map.
    fn mapped<W: Weight>(
        &self,
        offset: u64,
        count: usize,
    ) -> Option<(&MappedFile, &[W], Range<usize>)> {
        let map = self.job.mapped?;
        let start = usize::try_from(self.job.shard.data_start.checked_add(offset)?).ok()?;
        let range = start..start.checked_add(count.checked_mul(std::mem::size_of::<W>())?)?;
        let bytes = map.bytes().get(range.clone())?;
        if !bytes.as_ptr().cast::<W>().is_aligned() {
            return None;
        }
        // SAFETY: `bytes` holds `count` elements' bytes, aligned for W, borrowed from the map
        // for as long as the result; every bit pattern is a valid W (`Element`'s contract).
        // The map is read-only and ndlora never writes the file.
        let elements = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<W>(), count) };
        Some((map, elements, range))
    }
}
