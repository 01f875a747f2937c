//! `ndlora`: fold a PEFT LoRA adapter into a safetensors checkpoint (`merge`), take it out
//! again (`unmerge`), or look at an adapter or a checkpoint and check one against the other
//! (`inspect`). A thin shell over [`ndlora::checkpoint`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ndlora::checkpoint::{
    merge, plan, Checkpoint, CheckpointAdapter, MergeOptions, MergeSummary, Operation,
};
use ndlora::peft::CONFIG_FILE;
use ndlora::LoraError;

/// `println!` that ignores a closed stdout (`ndlora inspect … | head`) instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(
    name = "ndlora",
    version,
    about = "LoRA adapters and safetensors checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge a PEFT LoRA adapter into a checkpoint: W ← W + s·B A, as PEFT's merge_and_unload.
    Merge(MergeArgs),
    /// Take a merged adapter out again: W ← W − s·B A (half precision keeps round-off).
    Unmerge(MergeArgs),
    /// Show an adapter (modules, r, α, scaling, dtypes, parameters) or a checkpoint; with
    /// --base, what merging the adapter into that base would change, and any mismatch.
    Inspect(InspectArgs),
}

#[derive(Args)]
struct MergeArgs {
    /// The base checkpoint: a directory (model.safetensors.index.json + shards, or
    /// model.safetensors) or a .safetensors file.
    #[arg(long)]
    base: PathBuf,
    /// The PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// The output directory (must not exist, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Threads for the matrix work (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Replace an existing output directory (once the new one is complete).
    #[arg(long)]
    force: bool,
    /// Do not sync the output to disk before renaming it into place.
    #[arg(long)]
    no_sync: bool,
    /// Read the base with pread instead of through a memory map (same output; a map is
    /// faster and guarded against the base being truncated meanwhile).
    #[arg(long)]
    no_mmap: bool,
    /// No progress bar and no summary.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// An adapter directory, or a checkpoint (directory or .safetensors file).
    path: PathBuf,
    /// A base checkpoint to check the adapter against.
    #[arg(long)]
    base: Option<PathBuf>,
    /// List every tensor of a checkpoint.
    #[arg(long)]
    tensors: bool,
}

fn main() -> ExitCode {
    // Merges of a rank above the fused kernel's go through BLAS gemm: on a CPU that Debian's
    // OpenBLAS 0.3.21 does not recognise, make it run its AVX2/AVX-512 kernel rather than the
    // generic one (README, "The OpenBLAS core trap").
    // SAFETY: the start of the program, on its only thread; nothing has called BLAS yet.
    unsafe { ndlora::use_native_openblas_kernel() };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Merge(args) => run_merge(args, Operation::Merge),
        Command::Unmerge(args) => run_merge(args, Operation::Unmerge),
        Command::Inspect(args) => run_inspect(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ndlora: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_merge(args: MergeArgs, operation: Operation) -> Result<ExitCode, LoraError> {
    if let Some(threads) = args.threads {
        if threads == 0 || threads > ndlora::max_threads() {
            return Err(LoraError::InvalidValue {
                what: "--threads",
                expected: "between 1 and ndlora::max_threads()",
                got: threads.to_string(),
            });
        }
        // `false` here only means no OpenBLAS took the count (another backend, or none):
        // ndlora's own kernels use it either way.
        ndlora::set_blas_threads(threads);
    }
    let options = MergeOptions {
        operation,
        force: args.force,
        sync: !args.no_sync,
        map_inputs: !args.no_mmap,
    };
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} \
                 ({binary_bytes_per_sec}) {msg}",
            )
            .expect("a valid template"),
        );
        bar
    };
    let summary = merge(&args.base, &args.adapter, &args.out, &options, &mut |p| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_message(format!("{}/{} tensors", p.tensors_done, p.tensors_total));
    });
    bar.finish_and_clear();
    let summary = summary?;
    if !args.quiet {
        print_summary(&summary, operation, &args.out);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(s: &MergeSummary, operation: Operation, out: &Path) {
    let verb = match operation {
        Operation::Merge => "merged",
        Operation::Unmerge => "unmerged",
    };
    outln!(
        "{}: {} tensors {verb}, {} replaced, {} copied; {:.1} MB in {:.2} s ({:.0} MB/s); \
         {} other files copied",
        out.display(),
        s.merged,
        s.replaced,
        s.copied,
        s.bytes as f64 / 1e6,
        s.seconds,
        s.bytes as f64 / 1e6 / s.seconds.max(1e-9),
        s.files.len(),
    );
    if !s.skipped.is_empty() {
        outln!("left out of the base directory: {}", s.skipped.join(", "));
    }
    if let Some(kb) = peak_rss_kb() {
        outln!("peak resident memory: {:.1} MB", kb as f64 / 1e3);
    }
}

/// The process's peak resident set size in KiB: `VmHWM` of `/proc/self/status` (Linux; unlike
/// `getrusage`'s `ru_maxrss` it does not count the parent's memory at `fork`), if known.
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

fn run_inspect(args: InspectArgs) -> Result<ExitCode, LoraError> {
    if args.path.join(CONFIG_FILE).is_file() {
        let adapter = CheckpointAdapter::open(&args.path)?;
        print_adapter(&adapter);
        if let Some(base) = &args.base {
            return check_against(&adapter, base);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let checkpoint = Checkpoint::open(&args.path)?;
    print_checkpoint(&checkpoint, args.tensors);
    Ok(ExitCode::SUCCESS)
}

fn print_adapter(adapter: &CheckpointAdapter) {
    let c = adapter.config();
    outln!(
        "adapter {}: r {}, lora_alpha {}, use_rslora {}, fan_in_fan_out {}, peft_version {}",
        adapter.dir().display(),
        c.r(),
        c.lora_alpha(),
        c.use_rslora(),
        c.fan_in_fan_out(),
        c.peft_version().unwrap_or("unknown"),
    );
    let modules = adapter.modules();
    let params: usize = modules.iter().map(|m| m.parameters()).sum();
    let replaced: usize = adapter
        .replacements()
        .values()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    outln!(
        "{} modules, {params} LoRA parameters; {} replacement tensors (modules_to_save), \
         {replaced} parameters",
        modules.len(),
        adapter.replacements().len()
    );
    for m in modules {
        outln!(
            "  {}  {}  r {}  alpha {}  scaling {}  A {} {:?}  B {} {:?}  {} params",
            m.name,
            m.kind.name(),
            m.rank,
            m.alpha,
            m.scaling,
            m.a.dtype,
            m.a.shape,
            m.b.dtype,
            m.b.shape,
            m.parameters()
        );
    }
    for (tensor, t) in adapter.replacements() {
        outln!(
            "  {tensor}  replaced by {}  {} {:?}",
            t.key,
            t.dtype,
            t.shape
        );
    }
}

fn check_against(adapter: &CheckpointAdapter, base: &Path) -> Result<ExitCode, LoraError> {
    let checkpoint = Checkpoint::open(base)?;
    let plan = plan(&checkpoint, adapter);
    outln!("against {}:", base.display());
    let mut problems = 0;
    for e in plan.entries() {
        let what = checkpoint
            .tensor(&e.tensor)
            .map(|t| format!("{} {:?} in {}", t.dtype, t.shape, t.file))
            .unwrap_or_else(|| "missing".into());
        match &e.problem {
            None => outln!("  {}  {} → {}  ({what})", e.action, e.source, e.tensor),
            Some(p) => {
                problems += 1;
                outln!("  PROBLEM  {} → {}: {p}", e.source, e.tensor);
            }
        }
    }
    let total = checkpoint.tensors().len();
    outln!(
        "{} of {total} base tensors would change; {problems} problems",
        plan.entries().len() - problems
    );
    Ok(if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_checkpoint(checkpoint: &Checkpoint, list: bool) {
    let tensors = checkpoint.tensors();
    let mut by_dtype: std::collections::BTreeMap<&str, (usize, u64, u64)> = Default::default();
    for t in &tensors {
        let slot = by_dtype.entry(t.dtype.as_str()).or_default();
        slot.0 += 1;
        slot.1 += t.shape.iter().product::<usize>() as u64;
        slot.2 += t.bytes;
    }
    outln!(
        "checkpoint {}: {} tensors in {} files{}",
        checkpoint.path().display(),
        tensors.len(),
        checkpoint.files().len(),
        if checkpoint.is_sharded() {
            " (sharded, with an index)"
        } else {
            ""
        }
    );
    for (dtype, (n, params, bytes)) in &by_dtype {
        outln!(
            "  {dtype}: {n} tensors, {params} parameters, {:.1} MB",
            *bytes as f64 / 1e6
        );
    }
    if list {
        for t in &tensors {
            outln!("  {}  {} {:?}  {}", t.name, t.dtype, t.shape, t.file);
        }
    }
}
