//! What the costliest `adapter_config.json` that ndlora accepts costs to parse, and what its
//! `rank_pattern` keys cost per module path resolved: wall time and peak memory (max RSS of a
//! process that does nothing else), per scenario. Each scenario runs in a child process of its
//! own so that the peak memory is that scenario's.
//!
//! `cargo run --release --example peft_limits`

use std::process::Command;
use std::time::Instant;

use ndlora::peft::{
    PeftConfig, MAX_CONFIG_SIZE, PATTERN_BUDGET, PATTERN_MAX_LEN, PATTERN_SIZE_LIMIT,
};
use ndlora::LoraError;
use serde_json::{json, Map, Value};

/// Module paths resolved against the patterns, as a loader resolves the modules of a file.
const MODULES: usize = 1000;

/// Long module paths resolved, and their length in bytes.
const LONG_PATHS: usize = 10;
const LONG_PATH_LEN: usize = 16 << 10;

/// A config with `rank_pattern` = `keys` and an unknown field `padding` = `padding`.
fn config(keys: &[String], padding: Value) -> String {
    let patterns: Map<String, Value> = keys.iter().map(|k| (k.clone(), json!(4))).collect();
    json!({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": patterns,
        "target_modules": ["q_proj"], "padding": padding
    })
    .to_string()
}

/// As many keys `make(i)` as fit in `MAX_CONFIG_SIZE` bytes of config.
fn fill(make: impl Fn(usize) -> String) -> Vec<String> {
    let mut keys = Vec::new();
    let mut bytes = 200;
    loop {
        let key = make(keys.len());
        bytes += key.len() + 5;
        if bytes as u64 > MAX_CONFIG_SIZE {
            return keys;
        }
        keys.push(key);
    }
}

/// The largest n ≥ `lo` with `holds(n)`, for a `holds` that is true up to some n and false
/// after (`holds(lo)` must be true): doubling, then bisection.
fn largest(mut lo: usize, holds: impl Fn(usize) -> bool) -> usize {
    let mut hi = lo.max(1) * 2;
    while holds(hi) {
        lo = hi;
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if holds(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The most keys `make(0..n)` the pattern budget accepts (the config is otherwise valid).
fn most_accepted(make: &dyn Fn(usize) -> String) -> usize {
    largest(0, |n| {
        let keys: Vec<String> = (0..n).map(make).collect();
        match PeftConfig::from_json_str(&config(&keys, Value::Null)) {
            Ok(_) => true,
            Err(LoraError::PeftPatternTooLarge { .. }) => false,
            Err(e) => panic!("{e}"),
        }
    })
}

/// The largest k for which the key `unit{k}` compiles within `PATTERN_SIZE_LIMIT`.
fn largest_repetition(unit: &str) -> usize {
    largest(1, |k| {
        PeftConfig::from_json_str(&config(&[format!("{unit}{{{k}}}")], Value::Null)).is_ok()
    })
}

/// The key `i` of a scenario.
fn key(scenario: &str, param: usize, i: usize) -> String {
    match scenario {
        // Module paths: matched without a regex, not charged to the budget.
        "literal" => format!("layers.{i}.q_proj"),
        "regex-small" => format!(r"^layers\.{i}\.q_proj$"),
        "regex-large" => format!(r"\w{{{param}}}{i}"),
        // PATTERN_MAX_LEN bytes of empty-class intersections: slow to parse (each class is a
        // Unicode table), tiny once compiled.
        "regex-slow-parse" => {
            let unit = r"[\w&&\W]";
            let mut k = format!("{i}");
            while k.len() + unit.len() <= PATTERN_MAX_LEN {
                k.push_str(unit);
            }
            k
        }
        _ => unreachable!(),
    }
}

/// Peak resident memory of this process so far, in KiB: Linux's `VmHWM` (getrusage's
/// `ru_maxrss` would include the parent's peak, which survives fork and exec), else
/// getrusage, else -1.
fn max_rss_kib() -> i64 {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
            return line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1);
        }
    }
    #[cfg(unix)]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `usage` is a writable rusage; getrusage fills it and only reads `who`.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
        if rc == 0 {
            // SAFETY: getrusage succeeded, so it initialised `usage` (zeroed before anyway).
            return unsafe { usage.assume_init() }.ru_maxrss;
        }
    }
    -1
}

/// The scenario's config text.
fn scenario_config(scenario: &str, param: usize, count: usize) -> String {
    let (keys, padding) = match scenario {
        "baseline" => (Vec::new(), Value::Null),
        // An unknown field (kept, as PEFT adds fields every release) holding the most JSON
        // values that fit: the costliest document for serde_json's tree.
        "json-array" => {
            let n = (MAX_CONFIG_SIZE as usize - 300) / 2;
            (Vec::new(), Value::Array(vec![json!(0); n]))
        }
        "literal" => (fill(|i| key("literal", 0, i)), Value::Null),
        _ => (
            (0..count).map(|i| key(scenario, param, i)).collect(),
            Value::Null,
        ),
    };
    let text = config(&keys, padding);
    assert!(text.len() as u64 <= MAX_CONFIG_SIZE, "{}", text.len());
    text
}

/// Child process: parses the config in `path`, resolves MODULES paths, prints a table row.
fn run(scenario: &str, path: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let rss_before = max_rss_kib();
    let start = Instant::now();
    let parsed = PeftConfig::from_json_str(&text).expect("accepted");
    let parse = start.elapsed();
    let paths: Vec<String> = (0..MODULES)
        .map(|i| format!("base_model.model.model.layers.{i}.self_attn.q_proj"))
        .collect();
    let start = Instant::now();
    let ranks: usize = paths.iter().map(|p| parsed.rank_for(p)).sum();
    let resolve = start.elapsed();
    std::hint::black_box(ranks);
    // Long paths: word characters with a dot every 7, the shape `\w` keys work hardest on.
    let long: Vec<String> = (0..LONG_PATHS)
        .map(|i| {
            let mut p: String = (0..LONG_PATH_LEN)
                .map(|j| {
                    if j % 7 == 6 {
                        '.'
                    } else {
                        char::from(b'a' + ((i + j) % 26) as u8)
                    }
                })
                .collect();
            p.push_str(".q_proj");
            p
        })
        .collect();
    let start = Instant::now();
    let ranks: usize = long.iter().map(|p| parsed.rank_for(p)).sum();
    let resolve_long = start.elapsed();
    std::hint::black_box(ranks);
    println!(
        "| {scenario} | {} | {} | {:.0} | {:.1} | {:.0} | {} → {} |",
        text.len(),
        parsed.rank_pattern().len(),
        parse.as_secs_f64() * 1e3,
        resolve.as_secs_f64() * 1e6 / MODULES as f64,
        resolve_long.as_secs_f64() * 1e6 / LONG_PATHS as f64,
        rss_before / 1024,
        max_rss_kib() / 1024,
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 {
        run(&args[1], &args[2]);
        return;
    }
    println!(
        "limits: config {MAX_CONFIG_SIZE} B, pattern {PATTERN_MAX_LEN} B source / \
         {PATTERN_SIZE_LIMIT} B compiled, budget {PATTERN_BUDGET} B"
    );
    let large = largest_repetition(r"\w");
    println!("largest accepted \\w{{k}}: k = {large}");
    let mut scenarios = vec![("baseline", 0, 0), ("json-array", 0, 0), ("literal", 0, 0)];
    for (name, param) in [
        ("regex-small", 0),
        ("regex-large", large),
        ("regex-slow-parse", 0),
    ] {
        let count = most_accepted(&|i| key(name, param, i));
        scenarios.push((name, param, count));
    }
    println!(
        "| scenario | config bytes | rank_pattern keys | parse ms | resolve µs/module | \
         resolve µs/module of {LONG_PATH_LEN} B | peak RSS MiB (text read → parsed and resolved) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let exe = std::env::current_exe().unwrap();
    for (name, param, count) in scenarios {
        let path = std::env::temp_dir().join(format!(
            "ndlora-peft-limits-{}-{name}.json",
            std::process::id()
        ));
        std::fs::write(&path, scenario_config(name, param, count)).unwrap();
        let status = Command::new(&exe)
            .args([name, path.to_str().unwrap()])
            .status()
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(status.success(), "{name}");
    }
}
