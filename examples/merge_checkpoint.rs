//! How fast a whole-checkpoint merge runs against copying the checkpoint, and how much memory
//! it takes.
//!
//! Writes a synthetic BF16 checkpoint shaped like TinyLlama-1.1B (hidden 2048, MLP 5632,
//! 22 layers, 4 KV heads, vocabulary 32000: 2.2 GB in 5 shards) and an r = 16 adapter on all
//! seven projections (F32, B ≠ 0) into a temporary directory, warms the page cache with a
//! read of the base and one untimed copy of it, then times, once per round (3 rounds unless
//! `--rounds N`), each job in the same order and each ratio within its round:
//!
//! * `cp -r base copy` (what a user would otherwise run to get a checkpoint in place), and
//!   `cp -r` followed by `sync`;
//! * `ndlora::checkpoint::merge` with 1 and 2 threads, without and with syncing the output,
//!   each in a child process so that its peak resident memory (`VmHWM`) is the merge's.
//!
//! On a VM guest with free page reporting it also prints how much freed memory went back
//! to the host meanwhile: writing an output into such memory costs a host fault per page,
//! for `cp` and the merge alike, and is the largest source of noise seen here.
//!
//! ```text
//! cargo run --release --example merge_checkpoint [-- --dir /path/with/7GB/free] [--rounds N]
//! ```
//! Nothing is kept: the directory is removed at the end (unless `--keep`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ndlora::checkpoint::{merge, MergeOptions};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

const HIDDEN: usize = 2048;
const MLP: usize = 5632;
const LAYERS: usize = 22;
const KV: usize = 256;
const VOCAB: usize = 32000;
const RANK: usize = 16;
/// Layers per shard (5 shards).
const LAYERS_PER_SHARD: usize = 5;

/// Cheap deterministic values in [−0.05, 0.05).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
    }
}

fn bf16_bytes(g: &mut Gen, n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|_| half::bf16::from_f32(g.next()).to_le_bytes())
        .collect()
}

fn f32_bytes(g: &mut Gen, n: usize) -> Vec<u8> {
    (0..n).flat_map(|_| g.next().to_le_bytes()).collect()
}

/// (name, out, in) of one layer's projections.
fn projections(layer: usize) -> Vec<(String, usize, usize)> {
    let p = |m: &str| format!("model.layers.{layer}.{m}");
    vec![
        (p("self_attn.q_proj"), HIDDEN, HIDDEN),
        (p("self_attn.k_proj"), KV, HIDDEN),
        (p("self_attn.v_proj"), KV, HIDDEN),
        (p("self_attn.o_proj"), HIDDEN, HIDDEN),
        (p("mlp.gate_proj"), MLP, HIDDEN),
        (p("mlp.up_proj"), MLP, HIDDEN),
        (p("mlp.down_proj"), HIDDEN, MLP),
    ]
}

fn write_file(path: &Path, tensors: Vec<(String, Vec<usize>, Vec<u8>)>, dtype: Dtype) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), TensorView::new(dtype, s.clone(), d).unwrap()))
        .collect();
    let metadata = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(views, Some(metadata), path).unwrap();
}

fn write_base(dir: &Path) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let shards = LAYERS.div_ceil(LAYERS_PER_SHARD);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for s in 0..shards {
        let name = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let mut tensors = Vec::new();
        if s == 0 {
            tensors.push((
                "model.embed_tokens.weight".to_owned(),
                vec![VOCAB, HIDDEN],
                bf16_bytes(&mut g, VOCAB * HIDDEN),
            ));
        }
        for layer in s * LAYERS_PER_SHARD..((s + 1) * LAYERS_PER_SHARD).min(LAYERS) {
            for (m, out, inp) in projections(layer) {
                tensors.push((
                    format!("{m}.weight"),
                    vec![out, inp],
                    bf16_bytes(&mut g, out * inp),
                ));
            }
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                tensors.push((
                    format!("model.layers.{layer}.{norm}.weight"),
                    vec![HIDDEN],
                    bf16_bytes(&mut g, HIDDEN),
                ));
            }
        }
        if s == shards - 1 {
            tensors.push((
                "model.norm.weight".to_owned(),
                vec![HIDDEN],
                bf16_bytes(&mut g, HIDDEN),
            ));
            tensors.push((
                "lm_head.weight".to_owned(),
                vec![VOCAB, HIDDEN],
                bf16_bytes(&mut g, VOCAB * HIDDEN),
            ));
        }
        for (t, _, d) in &tensors {
            weight_map.insert(t.clone(), json!(name));
            total += d.len() as u64;
        }
        write_file(&dir.join(&name), tensors, Dtype::BF16);
    }
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\"}").unwrap();
    total
}

fn write_adapter(dir: &Path) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let mut g = Gen(0xD1B5_4A32_D192_ED03);
    let mut tensors = Vec::new();
    for layer in 0..LAYERS {
        for (m, out, inp) in projections(layer) {
            let key = format!("base_model.model.{m}");
            tensors.push((
                format!("{key}.lora_A.weight"),
                vec![RANK, inp],
                f32_bytes(&mut g, RANK * inp),
            ));
            tensors.push((
                format!("{key}.lora_B.weight"),
                vec![out, RANK],
                f32_bytes(&mut g, out * RANK),
            ));
        }
    }
    let bytes = tensors.iter().map(|t| t.2.len() as u64).sum();
    write_file(&dir.join("adapter_model.safetensors"), tensors, Dtype::F32);
    let config = json!({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 32, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    bytes
}

/// The process's peak resident memory in MB: `VmHWM` of `/proc/self/status` (Linux). Not
/// `getrusage`'s `ru_maxrss`, which a child keeps from before its `exec` (the parent's
/// memory at `fork`, here the generator's).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// In the child: one merge, then "seconds peak_rss_mb" on stdout.
fn child(args: &[String]) {
    let (base, adapter, out) = (&args[2], &args[3], &args[4]);
    let threads: usize = args[5].parse().unwrap();
    let sync = args[6] == "sync";
    assert!(ndlora::set_blas_threads(threads));
    let options = MergeOptions {
        sync,
        ..MergeOptions::default()
    };
    let start = Instant::now();
    let summary = merge(base, adapter, out, &options, &mut |_| {}).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(summary.merged, LAYERS * 7);
    println!("{seconds} {}", peak_rss_mb());
}

/// KiB of freed memory this VM guest has handed back to its host so far (Linux free page
/// reporting), if the kernel reports it.
fn reported_kib() -> Option<u64> {
    std::fs::read_to_string("/sys/module/page_reporting/parameters/reported_kib")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        return child(&args);
    }
    let root: PathBuf = match args.iter().position(|a| a == "--dir") {
        Some(i) => PathBuf::from(&args[i + 1]),
        None => std::env::temp_dir(),
    }
    .join(format!("ndlora-merge-bench-{}", std::process::id()));
    let (base, adapter) = (root.join("base"), root.join("adapter"));
    println!(
        "writing a synthetic BF16 checkpoint and an r = {RANK} adapter into {}",
        root.display()
    );
    let base_bytes = write_base(&base);
    let adapter_bytes = write_adapter(&adapter);
    let largest = (VOCAB * HIDDEN * 2) as f64 / 1e6;
    let largest_merged = (MLP * HIDDEN * 2) as f64 / 1e6;
    println!(
        "base {:.2} GB (largest tensor {largest:.0} MB, largest merged tensor {largest_merged:.0} MB), adapter {:.1} MB",
        base_bytes as f64 / 1e9,
        adapter_bytes as f64 / 1e6
    );
    // Warm the page cache: read the base once.
    for entry in std::fs::read_dir(&base).unwrap() {
        let mut f = std::fs::File::open(entry.unwrap().path()).unwrap();
        std::io::copy(&mut f, &mut std::io::sink()).unwrap();
    }
    let sync_all = || assert!(Command::new("sync").status().unwrap().success());
    let cp = |to: &Path| {
        assert!(Command::new("cp")
            .arg("-r")
            .arg(&base)
            .arg(to)
            .status()
            .unwrap()
            .success());
    };
    sync_all();
    let copy = root.join("copy");
    // One untimed copy first: the first 2.2 GB written after boot lands in page-cache memory
    // the kernel has not used yet, which on a VM that hands freed memory back to its host
    // costs more than the copy itself (seen: 3.2-5.1 s for the first `cp -r`, 1.4-2.2 s for
    // the next `cp -r && sync`), and would flatter whatever ran second.
    cp(&copy);
    std::fs::remove_dir_all(&copy).unwrap();
    sync_all();

    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .map_or(3, |i| args[i + 1].parse().expect("--rounds N"));
    let reported_before = reported_kib();
    let exe = std::env::current_exe().unwrap();
    // Every job once per round, in the same order, each ratio taken within its round: the
    // host's load and the guest's memory state drift over minutes, so jobs a minute apart
    // are not comparable, and single runs vary by up to 2×.
    // (threads, sync): 0 threads is `cp -r`.
    let jobs: [(usize, bool); 6] = [
        (0, false),
        (0, true),
        (1, false),
        (2, false),
        (1, true),
        (2, true),
    ];
    let mut times = vec![Vec::new(); jobs.len()];
    let mut rss = vec![0.0_f64; jobs.len()];
    for _ in 0..rounds {
        for (j, &(threads, sync)) in jobs.iter().enumerate() {
            let secs = if threads == 0 {
                let start = Instant::now();
                cp(&copy);
                if sync {
                    sync_all();
                }
                let secs = start.elapsed().as_secs_f64();
                std::fs::remove_dir_all(&copy).unwrap();
                secs
            } else {
                let out = root.join("out");
                let output = Command::new(&exe)
                    .args(["--child"])
                    .arg(&base)
                    .arg(&adapter)
                    .arg(&out)
                    .args([
                        threads.to_string(),
                        if sync { "sync" } else { "no-sync" }.to_owned(),
                    ])
                    .output()
                    .unwrap();
                assert!(
                    output.status.success(),
                    "{}",
                    String::from_utf8_lossy(&output.stderr)
                );
                let text = String::from_utf8(output.stdout).unwrap();
                let mut parts = text.split_whitespace().map(|v| v.parse::<f64>().unwrap());
                let secs = parts.next().unwrap();
                rss[j] = rss[j].max(parts.next().unwrap());
                std::fs::remove_dir_all(&out).unwrap();
                secs
            };
            times[j].push(secs);
            sync_all();
        }
    }
    println!("{rounds} rounds; seconds as min / median / max over the rounds; ratios to the copy of the same round");
    let spread = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2], v[v.len() - 1])
    };
    let budget = largest + adapter_bytes as f64 / 1e6;
    for (j, &(threads, sync)) in jobs.iter().enumerate() {
        let (lo, mid, hi) = spread(&times[j]);
        let name = match threads {
            0 if sync => "cp -r base copy && sync".to_owned(),
            0 => "cp -r base copy".to_owned(),
            t => format!(
                "ndlora merge, {t} thread(s), {}",
                if sync { "sync" } else { "no-sync" }
            ),
        };
        print!("{name:<36} {lo:5.2} / {mid:5.2} / {hi:5.2} s");
        if threads > 0 {
            // The copy of the same kind (jobs 0 and 1) in the same round.
            let against = usize::from(sync);
            let ratios: Vec<f64> = times[j]
                .iter()
                .zip(&times[against])
                .map(|(m, c)| m / c)
                .collect();
            let (rlo, rmid, rhi) = spread(&ratios);
            print!(
                "  = {rlo:.2} / {rmid:.2} / {rhi:.2}× {}, peak RSS {:.0} MB ({:.2}× largest tensor + adapter)",
                if sync { "cp + sync" } else { "cp" },
                rss[j],
                rss[j] / budget
            );
        }
        println!();
        std::io::stdout().flush().unwrap();
    }
    if let (Some(before), Some(after)) = (reported_before, reported_kib()) {
        println!(
            "free page reporting: the guest handed {:.0} MB of freed memory back to its host during the runs \
             (memory it must fault in again to write the next output)",
            (after - before) as f64 / 1024.0
        );
    }
    if args.iter().any(|a| a == "--keep") {
        println!("kept {}", root.display());
    } else {
        std::fs::remove_dir_all(&root).unwrap();
    }
}
