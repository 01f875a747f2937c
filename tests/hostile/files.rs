//! Hostile PEFT adapter files, directories and layers: paths that are not regular files
//! (devices, FIFOs, directories, sockets, behind symbolic links), files larger or smaller
//! than they claim, `rank_pattern` / `alpha_pattern` / `target_modules` regexes whose
//! compiled size is unbounded, safetensors headers whose offsets overflow, and layers the
//! writer must refuse because the reader would.
//!
//! The catalogue's discipline: each case asserts the specific
//! `LoraError` variant and its key fields, cases are counted per category and the counts are
//! asserted. The positive checks (the pattern matcher against the `regex` crate, a −0.0
//! scaling read back bit for bit, atomic saves) are separate tests.

use std::path::{Path, PathBuf};

use crate::common::{random, rng, temp_dir};
use crate::Tally;
use half::{bf16, f16};
use ndarray::Array2;
use ndlora::peft::{
    PeftAdapter, PeftConfig, TargetModules, CONFIG_FILE, MAX_CONFIG_SIZE, MAX_HEADER_SIZE,
    PATTERN_BUDGET, PATTERN_MAX_LEN, PATTERN_SIZE_LIMIT, WEIGHTS_FILE,
};
use ndlora::{LoraConfig, LoraError, LoraFloat, LoraLayer};
use num_traits::Float;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Counting.

/// Expected number of cases per category (asserted by each category's test).
#[cfg(unix)]
const FILES: usize = 13;
#[cfg(not(unix))]
const FILES: usize = 0;
const PATTERNS: usize = 11;
const WRITER: usize = 16;
const HEADERS: usize = 12;
/// This module's cases in the catalogue.
pub(crate) const CASES: usize = FILES + PATTERNS + WRITER + HEADERS;

// ---------------------------------------------------------------------------------------------
// Shared inputs.

/// A valid config for one module `m.proj` of rank 2, with `extra` fields set.
fn config(extra: Value) -> String {
    let mut c = json!({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": false,
        "rank_pattern": {}, "alpha_pattern": {}, "target_modules": ["proj"],
        "fan_in_fan_out": false, "bias": "none", "lora_dropout": 0.0
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c.to_string()
}

/// A valid safetensors file with one module `m.proj`: A 2×4, B 3×2, F32.
fn tensors() -> Vec<u8> {
    let a: Vec<u8> = (0..8)
        .flat_map(|i| (i as f32 * 0.25).to_le_bytes())
        .collect();
    let b: Vec<u8> = (0..6)
        .flat_map(|i| (i as f32 - 2.0).to_le_bytes())
        .collect();
    safetensors::serialize(
        [
            (
                "base_model.model.m.proj.lora_A.weight",
                TensorView::new(Dtype::F32, vec![2, 4], &a).unwrap(),
            ),
            (
                "base_model.model.m.proj.lora_B.weight",
                TensorView::new(Dtype::F32, vec![3, 2], &b).unwrap(),
            ),
        ],
        None,
    )
    .unwrap()
}

/// A safetensors file from a header written by hand and `data`.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// A header of `count` tensors of `dtype` and shape `[len]` whose data follow each other, as
/// a crafted file has them: their byte sizes sum to (nearly) 2⁶⁴, and adding the header's
/// length overflowed in the `safetensors` crate (a panic in debug builds).
fn chained_header(dtype: &str, len: u64, bytes_each: u64, count: u64) -> String {
    let entries: Vec<String> = (0..count)
        .map(|i| {
            format!(
                r#""t{i}":{{"dtype":"{dtype}","shape":[{len}],"data_offsets":[{},{}]}}"#,
                i * bytes_each,
                (i + 1) * bytes_each
            )
        })
        .collect();
    format!("{{{}}}", entries.join(","))
}

/// A valid adapter directory (config and tensors as above).
fn adapter_dir(name: &str) -> PathBuf {
    let dir = temp_dir(name);
    std::fs::write(dir.join(CONFIG_FILE), config(json!({}))).unwrap();
    std::fs::write(dir.join(WEIGHTS_FILE), tensors()).unwrap();
    assert!(PeftAdapter::<f32>::load(&dir).is_ok());
    dir
}

/// `load` on another thread, failing instead of hanging if it blocks (as it did on a FIFO).
fn load_within(dir: &Path, secs: u64) -> Result<PeftAdapter<f32>, LoraError> {
    let (send, recv) = std::sync::mpsc::channel();
    let dir = dir.to_owned();
    std::thread::spawn(move || {
        let _ = send.send(PeftAdapter::<f32>::load(&dir));
    });
    recv.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("PeftAdapter::load blocked for {secs} s"))
}

fn not_a_file(file: &'static str, kind: &'static str) -> impl Fn(&LoraError) -> bool {
    move |e| matches!(e, LoraError::NotAFile { path, kind: k } if path.ends_with(file) && *k == kind)
}

fn safetensors_error(needle: &'static str) -> impl Fn(&LoraError) -> bool {
    move |e| {
        matches!(e, LoraError::Parse { format: "safetensors", message, .. }
            if message.contains(needle))
    }
}

fn too_large(field_prefix: &'static str, limit: usize) -> impl Fn(&LoraError) -> bool {
    move |e| {
        matches!(e, LoraError::PeftPatternTooLarge { field, limit: l, .. }
            if field.starts_with(field_prefix) && *l == limit)
    }
}

fn in_module(module: &'static str, f: fn(&LoraError) -> bool) -> impl Fn(&LoraError) -> bool {
    move |e| matches!(e, LoraError::InModule { module: m, source } if m == module && f(source))
}

// ---------------------------------------------------------------------------------------------
// 1. What a path names.

/// Each of the two files replaced by something that is not a regular file: refused with
/// `NotAFile` naming the path and what it is, without reading (no endless read of
/// `/dev/zero`, no wait on a FIFO without a writer). Then sizes: a config over the limit, and
/// a tensor file larger or smaller than its header accounts for, refused before the data is
/// allocated.
#[cfg(unix)]
#[test]
fn paths_that_are_not_regular_files() {
    use std::os::unix::fs::symlink;
    let mut t = Tally::default();
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        let dir = adapter_dir("kinds");
        let path = dir.join(file);
        std::fs::remove_file(&path).unwrap();
        symlink("/dev/zero", &path).unwrap();
        t.err(
            &format!("{file} → /dev/zero"),
            load_within(&dir, 20),
            not_a_file(file, "a character device"),
        );
        std::fs::remove_file(&path).unwrap();

        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: `c_path` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        t.err(
            &format!("{file} a FIFO without a writer"),
            load_within(&dir, 20),
            not_a_file(file, "a FIFO"),
        );
        std::fs::remove_file(&path).unwrap();

        let fifo = dir.join("elsewhere.fifo");
        // SAFETY: as above.
        let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
        symlink(&fifo, &path).unwrap();
        t.err(
            &format!("{file} → a FIFO"),
            load_within(&dir, 20),
            not_a_file(file, "a FIFO"),
        );
        std::fs::remove_file(&path).unwrap();

        std::fs::create_dir(&path).unwrap();
        t.err(
            &format!("{file} a directory"),
            load_within(&dir, 20),
            not_a_file(file, "a directory"),
        );
        std::fs::remove_dir(&path).unwrap();

        let _socket = std::os::unix::net::UnixListener::bind(&path).unwrap();
        t.err(
            &format!("{file} a socket"),
            load_within(&dir, 20),
            not_a_file(file, "a socket"),
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // Sizes. A sparse config one byte over the limit.
    let dir = adapter_dir("sizes");
    let file = std::fs::File::create(dir.join(CONFIG_FILE)).unwrap();
    file.set_len(MAX_CONFIG_SIZE + 1).unwrap();
    t.err(
        "config over MAX_CONFIG_SIZE",
        load_within(&dir, 20),
        |e| matches!(e, LoraError::FileTooLarge { path, size, limit, .. }
            if path.ends_with(CONFIG_FILE) && *size == MAX_CONFIG_SIZE + 1 && *limit == MAX_CONFIG_SIZE),
    );
    std::fs::write(dir.join(CONFIG_FILE), config(json!({}))).unwrap();
    // A valid tensor file extended (sparsely) to 1 TiB: reading it whole used to try to
    // allocate 1 TiB; the header accounts for a few dozen bytes, so it is refused unread.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(WEIGHTS_FILE))
        .unwrap();
    file.set_len(1 << 40).unwrap();
    t.err(
        "tensor file 1 TiB, header accounts for less",
        load_within(&dir, 20),
        safetensors_error("the file has 1099511627776"),
    );
    // A header claiming more data than the file has: refused before the data is allocated.
    let good = tensors();
    let claims = raw_file(
        r#"{"base_model.model.m.proj.lora_A.weight":{"dtype":"F32","shape":[65536,65536],"data_offsets":[0,17179869184]}}"#,
        &good[..64],
    );
    std::fs::write(dir.join(WEIGHTS_FILE), claims).unwrap();
    t.err(
        "tensor file shorter than its header says",
        load_within(&dir, 20),
        safetensors_error("the file has"),
    );
    std::fs::remove_dir_all(&dir).unwrap();
    println!("paths and sizes: {} cases", t.cases);
    assert_eq!(t.cases, FILES);
}

// ---------------------------------------------------------------------------------------------
// 2. Pattern keys and target_modules regexes.

#[test]
fn patterns_over_their_limits() {
    let mut t = Tally::default();
    let st = tensors();
    let load = |extra: Value| PeftAdapter::<f32>::from_bytes(&config(extra), &st);
    let keys = |n: usize, f: &dyn Fn(usize) -> String| -> serde_json::Map<String, Value> {
        (0..n).map(|i| (f(i), json!(2))).collect()
    };
    let compiled = "the compiled-size limit for one pattern";
    let budget = "the budget for all patterns of the config";
    let source = "the source length limit for one pattern";
    let scope = |s: &'static str| move |e: &LoraError| matches!(e, LoraError::PeftPatternTooLarge { scope, .. } if *scope == s);

    // The reported input: 20 keys `\w{200}N` (368 bytes) took over 1 s and ~250 MB.
    let reported = keys(20, &|i| format!(r"\w{{200}}{i}"));
    t.err(
        "rank_pattern: 20 × \\w{200}N",
        load(json!({ "rank_pattern": reported })),
        |e| too_large(r"rank_pattern.\w{200}0", PATTERN_SIZE_LIMIT)(e) && scope(compiled)(e),
    );
    t.err(
        "alpha_pattern: 20 × \\w{200}N",
        load(json!({ "alpha_pattern": keys(20, &|i| format!(r"\w{{200}}{i}")) })),
        |e| too_large(r"alpha_pattern.\w{200}0", PATTERN_SIZE_LIMIT)(e) && scope(compiled)(e),
    );
    t.err(
        "one key a bounded repetition of a Unicode class",
        load(json!({ "rank_pattern": { r"(?:\pL|\d){60}": 2 } })),
        |e| too_large("rank_pattern.", PATTERN_SIZE_LIMIT)(e) && scope(compiled)(e),
    );
    // Keys each within the per-key limit that together exceed the budget (charged per key:
    // compiled size plus the two lazy-DFA caches).
    t.err(
        "rank_pattern: 40 keys \\w{10}, each allowed",
        load(json!({ "rank_pattern": keys(40, &|i| format!(r"\w{{10}}k{i}")) })),
        |e| too_large("rank_pattern.", PATTERN_BUDGET)(e) && scope(budget)(e),
    );
    // One budget for both fields: the keys of rank_pattern leave too little for alpha_pattern.
    t.err(
        "rank_pattern and alpha_pattern share the budget",
        load(json!({
            "rank_pattern": keys(12, &|i| format!(r"\w{{10}}k{i}")),
            "alpha_pattern": keys(12, &|i| format!(r"\w{{10}}a{i}")),
        })),
        |e| too_large("alpha_pattern.", PATTERN_BUDGET)(e) && scope(budget)(e),
    );
    // Many small regex keys: each is charged at least the lazy-DFA caches.
    t.err(
        "rank_pattern: 1000 small regex keys",
        load(json!({ "rank_pattern": keys(1000, &|i| format!(r"^m\.p{i}$")) })),
        |e| too_large("rank_pattern.", PATTERN_BUDGET)(e) && scope(budget)(e),
    );
    // A long key is refused before it is parsed (parsing a Unicode class costs ~6 KB each).
    let long = format!("(?:{})", vec![r"\w"; 300].join("|"));
    assert!(long.len() > PATTERN_MAX_LEN);
    t.err(
        "rank_pattern: a key over PATTERN_MAX_LEN",
        load(json!({ "rank_pattern": { long.clone(): 2 } })),
        |e| too_large("rank_pattern.", PATTERN_MAX_LEN)(e) && scope(source)(e),
    );
    // target_modules compiles when asked.
    t.err(
        "target_modules \\w{100}",
        TargetModules::Regex(r"\w{100}".into()).matches("m.proj"),
        |e| too_large("target_modules", PATTERN_SIZE_LIMIT)(e) && scope(compiled)(e),
    );
    t.err(
        "target_modules over PATTERN_MAX_LEN",
        TargetModules::Regex(long).matches("m.proj"),
        |e| too_large("target_modules", PATTERN_MAX_LEN)(e) && scope(source)(e),
    );
    // The writer builds its config the same way: a module path that is a costly regex.
    let l1 = LoraLayer::new(Array2::<f32>::eye(4), lora(1, 2.0)).unwrap();
    let l2 = LoraLayer::new(Array2::<f32>::eye(4), lora(2, 2.0)).unwrap();
    t.err(
        "from_layers: a module path \\w{100} with its own rank",
        PeftAdapter::from_layers([("a.x", &l1), ("b.x", &l1), (r"m.\w{100}", &l2)]),
        |e| too_large(r"rank_pattern.m.\w{100}", PATTERN_SIZE_LIMIT)(e),
    );
    // The config text itself.
    let padded = config(json!({ "padding": "x".repeat(MAX_CONFIG_SIZE as usize) }));
    t.err(
        "config text over MAX_CONFIG_SIZE",
        PeftConfig::from_json_str(&padded),
        |e| {
            matches!(e, LoraError::FileTooLarge { path, size, limit, .. }
            if path == CONFIG_FILE && *size == padded.len() as u64 && *limit == MAX_CONFIG_SIZE)
        },
    );
    println!("patterns: {} cases", t.cases);
    assert_eq!(t.cases, PATTERNS);
}

/// Keys with no regex syntax but `.` are matched without a regex; every key must match
/// exactly what PEFT's regex `(.*\.)?(KEY)$` matches, here the `regex` crate's reading of it
/// (`.` is any character but `\n`, `$` the end). Module paths with multi-byte characters,
/// newlines and dots in odd places; literal keys of any length (they are not regexes, so not
/// subject to the pattern limits).
#[test]
fn pattern_keys_match_as_the_regex_does() {
    let long = ["layer"; 400].join(".");
    let keys: Vec<String> = [
        "proj",
        "q_proj",
        "layers.0.q_proj",
        "0.q_proj",
        "q.proj",
        "a.b",
        "x",
        "layers..q",
        "._",
        ".",
        "..",
        "_",
        "9",
        "q-proj",
        "a/b.c",
        "m:n#1",
        "a&b~c",
        "@",
        "%.=",
        // Regex keys, for comparison.
        "q_pr.j",
        "^layers",
        r"layers\.\d+\.q_proj",
        "(?i)Q_PROJ",
        r"\w+",
        "",
        "a|b",
        long.as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let modules = [
        "layers.0.q_proj",
        "model.layers.0.q_proj",
        "layersX0Xq_proj",
        "layers\n0.q_proj",
        "a\nb.q_proj",
        "a\nb.proj",
        "q_proj",
        "xq_proj",
        ".q_proj",
        "é.q_proj",
        "layers.0.qéproj",
        "layers.0.q\nproj",
        "q_proj\n",
        "a.b",
        "x.a.b",
        "ab",
        "a..b",
        "m.x",
        "x",
        "ä",
        "m._",
        "m.9",
        "m.a",
        "x.q-proj",
        "xq-proj",
        "x.a/b.c",
        "a/bXc",
        "m:n#1",
        "z.m:n#1",
        "a&b~c",
        "y.@",
        "@",
        "%x=",
        "p.%.=",
        "b",
        &long,
        &format!("m.{long}"),
        &format!("m{long}"),
    ];
    let mut compared = 0;
    for key in &keys {
        let text = config(json!({ "r": 8, "rank_pattern": { key.clone(): 3 } }));
        let cfg = PeftConfig::from_json_str(&text).unwrap();
        let reference = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).unwrap();
        for module in modules {
            let want = if reference.is_match(module) { 3 } else { 8 };
            assert_eq!(cfg.rank_for(module), want, "key {key:?}, module {module:?}");
            compared += 1;
        }
    }
    assert_eq!(compared, keys.len() * modules.len());
}

// ---------------------------------------------------------------------------------------------
// 5. The writer refuses what the reader refuses.

fn lora(rank: usize, alpha: f64) -> LoraConfig {
    LoraConfig {
        rank,
        alpha,
        ..Default::default()
    }
}

fn trained<A: LoraFloat>(seed: u64) -> LoraLayer<A> {
    let mut g = rng(seed);
    LoraLayer::from_parts(
        random(&mut g, 5, 7),
        random(&mut g, 2, 7),
        random(&mut g, 5, 2),
        lora(2, 4.0),
    )
    .unwrap()
}

/// A copy of `layer` with `value` written into A (`factor` 'A') or B at `at`.
fn poisoned<A: LoraFloat>(
    layer: &LoraLayer<A>,
    factor: char,
    at: (usize, usize),
    value: A::Factor,
) -> LoraLayer<A> {
    let mut l = layer.clone();
    let mut m = if factor == 'A' {
        l.weight_a_mut().unwrap()
    } else {
        l.weight_b_mut().unwrap()
    };
    m[at] = value;
    l
}

fn writer_cases<A: LoraFloat>(t: &mut Tally) {
    let good = trained::<A>(1);
    let nan_b = poisoned(&good, 'B', (4, 1), A::Factor::nan());
    t.err(
        "from_layers: NaN in B",
        PeftAdapter::from_layers([("m.ok", &good), ("m.bad", &nan_b)]),
        in_module("m.bad", |e| {
            matches!(
                e,
                LoraError::NonFinite {
                    what: "lora_B",
                    index: (4, 1),
                    ..
                }
            )
        }),
    );
    let inf_a = poisoned(&good, 'A', (1, 6), A::Factor::infinity());
    t.err(
        "from_layers: +∞ in A",
        PeftAdapter::from_layers([("m.bad", &inf_a)]),
        in_module("m.bad", |e| {
            matches!(
                e,
                LoraError::NonFinite {
                    what: "lora_A",
                    index: (1, 6),
                    ..
                }
            )
        }),
    );
    let ninf_b = poisoned(&good, 'B', (0, 0), A::Factor::neg_infinity());
    t.err(
        "from_layers: −∞ in B",
        PeftAdapter::from_layers([("z", &ninf_b)]),
        in_module("z", |e| {
            matches!(
                e,
                LoraError::NonFinite {
                    what: "lora_B",
                    index: (0, 0),
                    ..
                }
            )
        }),
    );
}

#[test]
fn writer_refuses_what_the_reader_refuses() {
    let mut t = Tally::default();
    writer_cases::<f32>(&mut t);
    writer_cases::<f64>(&mut t);
    writer_cases::<bf16>(&mut t);
    writer_cases::<f16>(&mut t);

    // A config over MAX_CONFIG_SIZE (here through one very long module path).
    let layer = trained::<f32>(2);
    let long = "p".repeat(MAX_CONFIG_SIZE as usize);
    t.err(
        "from_layers: config over MAX_CONFIG_SIZE",
        PeftAdapter::from_layers([(long.as_str(), &layer)]),
        |e| {
            matches!(e, LoraError::FileTooLarge { path, limit, .. }
            if path == CONFIG_FILE && *limit == MAX_CONFIG_SIZE)
        },
    );

    // save: a name taken by a directory is refused before anything is written.
    let adapter = PeftAdapter::from_layers([("m.proj", &layer)]).unwrap();
    for (taken, other) in [(CONFIG_FILE, WEIGHTS_FILE), (WEIGHTS_FILE, CONFIG_FILE)] {
        let dir = temp_dir("taken");
        std::fs::create_dir(dir.join(taken)).unwrap();
        t.err(
            &format!("save: {taken} is a directory"),
            adapter.save(&dir),
            not_a_file(taken, "a directory"),
        );
        assert!(!dir.join(other).exists(), "{other} was written");
        assert_eq!(entries(&dir), [taken.to_owned()], "files left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // save into a path that is a file.
    let dir = temp_dir("file-as-dir");
    let not_dir = dir.join("plain");
    std::fs::write(&not_dir, b"x").unwrap();
    t.err(
        "save: dir is a file",
        adapter.save(&not_dir),
        |e| matches!(e, LoraError::Io { path, .. } if path.ends_with("plain")),
    );
    assert_eq!(std::fs::read(&not_dir).unwrap(), b"x");
    std::fs::remove_dir_all(&dir).unwrap();
    println!("writer: {} cases", t.cases);
    assert_eq!(t.cases, WRITER);
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `save` over an existing adapter replaces both files completely, leaves no temporary file,
/// and creates files readable as `std::fs::write` would (the umask decides, not 0600).
#[test]
fn save_replaces_both_files_and_leaves_nothing_else() {
    let dir = temp_dir("replace");
    let first = PeftAdapter::from_layers([("m.proj", &trained::<f32>(3))]).unwrap();
    let second = PeftAdapter::from_layers([("m.proj", &trained::<f32>(4))]).unwrap();
    first.save(&dir).unwrap();
    second.save(&dir).unwrap();
    assert_eq!(entries(&dir), [CONFIG_FILE, WEIGHTS_FILE]);
    assert_eq!(PeftAdapter::<f32>::load(&dir).unwrap(), second);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let probe = dir.join("probe");
        std::fs::write(&probe, b"").unwrap();
        let want = std::fs::metadata(&probe).unwrap().permissions().mode();
        std::fs::remove_file(&probe).unwrap();
        for file in [CONFIG_FILE, WEIGHTS_FILE] {
            let mode = std::fs::metadata(dir.join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(
                mode, want,
                "{file}: mode {mode:o}, std::fs::write gives {want:o}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 6. Scalings read back bit for bit.

/// A scaling of −0.0 used to make `from_layers` fail with an error about pattern keys (its α
/// was written as the integer 0). It is kept: the reader accepts any finite α, and s = −0.0
/// changes the sign of zero outputs, so dropping the sign would change results.
#[test]
fn negative_zero_scaling_reads_back_bit_for_bit() {
    let mut layer = trained::<f64>(5);
    layer.set_scaling(-0.0).unwrap();
    let other = trained::<f64>(6);
    for layers in [
        vec![("m.a", &layer)],
        vec![("m.a", &layer), ("m.b", &other)],
    ] {
        let adapter = PeftAdapter::from_layers(layers).unwrap();
        let dir = temp_dir("negzero");
        adapter.save(&dir).unwrap();
        let back = PeftAdapter::<f64>::load(&dir).unwrap();
        assert_eq!(back.scaling("m.a").unwrap().to_bits(), (-0.0f64).to_bits());
        assert_eq!(back, adapter);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Every scaling `from_layers` accepts reads back bit for bit through the files, for a sweep
/// of values (signed zeros, subnormals, extremes, random bit patterns) and ranks, with and
/// without rsLoRA; the only refusal is the scaling error, never one about pattern keys.
#[test]
fn scalings_round_trip_or_are_refused_as_scalings() {
    use rand::Rng;
    let mut g = rng(7);
    let mut values = vec![
        0.0,
        -0.0,
        f64::MIN_POSITIVE,
        -f64::MIN_POSITIVE,
        5e-324,
        -5e-324,
        f64::MAX,
        f64::MIN,
        1.0 / 3.0,
        9.0e15,
        -9.0e15 - 2.0,
        1e300,
    ];
    values.extend((0..40).map(|_| {
        let v = f64::from_bits(g.random());
        if v.is_finite() {
            v
        } else {
            1.5
        }
    }));
    let (mut kept, mut refused) = (0, 0);
    let base = trained::<f64>(8);
    for (i, &s) in values.iter().enumerate() {
        let mut layer = LoraLayer::from_parts(
            base.base_weight().to_owned(),
            base.weight_a().to_owned(),
            base.weight_b().to_owned(),
            LoraConfig {
                use_rslora: i % 2 == 1,
                ..lora(2, 4.0)
            },
        )
        .unwrap();
        layer.set_scaling(s).unwrap();
        match PeftAdapter::from_layers([("m.a", &layer), ("m.b", &base)]) {
            Ok(adapter) => {
                let text = adapter.config().to_json_string();
                let back = PeftAdapter::<f64>::from_bytes(&text, &save_bytes(&adapter)).unwrap();
                assert_eq!(back.scaling("m.a").unwrap().to_bits(), s.to_bits(), "{s:e}");
                kept += 1;
            }
            Err(LoraError::InModule { module, source }) => {
                assert_eq!(module, "m.a");
                assert!(
                    matches!(
                        *source,
                        LoraError::InvalidValue {
                            what: "scaling",
                            ..
                        }
                    ),
                    "{s:e}: {source}"
                );
                refused += 1;
            }
            Err(e) => panic!("{s:e}: {e}"),
        }
    }
    println!("scalings: {kept} read back exactly, {refused} refused as scalings");
    assert!(kept > values.len() / 2);
}

/// The tensor file `save` writes, as bytes.
fn save_bytes(adapter: &PeftAdapter<f64>) -> Vec<u8> {
    let dir = temp_dir("bytes");
    adapter.save(&dir).unwrap();
    let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    bytes
}

// ---------------------------------------------------------------------------------------------
// 7. safetensors headers.

#[test]
fn safetensors_headers() {
    let mut t = Tally::default();
    let cfg = config(json!({}));
    let load = |bytes: &[u8]| PeftAdapter::<f32>::from_bytes(&cfg, bytes);
    // The crafted file: eight U8 tensors of 2⁶¹ − 1 bytes chained, and variants of the class
    // (other element sizes, sub-byte elements).
    let overflow = "the header describes";
    let crafted = raw_file(&chained_header("U8", (1 << 61) - 1, (1 << 61) - 1, 8), &[]);
    t.err(
        "8 × U8 [2⁶¹−1] chained",
        load(&crafted),
        safetensors_error(overflow),
    );
    let u64s = raw_file(
        &chained_header("U64", (1 << 58) - 1, ((1 << 58) - 1) * 8, 8),
        &[],
    );
    t.err(
        "8 × U64 [2⁵⁸−1] chained",
        load(&u64s),
        safetensors_error(overflow),
    );
    let f4s = raw_file(
        &chained_header("F4", (1 << 62) - 2, (1 << 61) - 1, 8),
        &[0; 16],
    );
    t.err(
        "8 × F4 [2⁶²−2] chained",
        load(&f4s),
        safetensors_error(overflow),
    );
    let one = raw_file(&chained_header("U8", u64::MAX - 7, u64::MAX - 7, 1), &[]);
    t.err(
        "one U8 tensor of 2⁶⁴−8 bytes",
        load(&one),
        safetensors_error("overflow"),
    );
    // Each key once: with a duplicate, which one counts depends on the reader.
    let a = r#""base_model.model.m.proj.lora_A.weight":{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]}"#;
    let b = r#""base_model.model.m.proj.lora_B.weight":{"dtype":"F32","shape":[3,2],"data_offsets":[32,56]}"#;
    let data = &tensors()[tensors().len() - 56..];
    assert!(load(&raw_file(&format!("{{{a},{b}}}"), data)).is_ok());
    t.err(
        "a tensor key twice",
        load(&raw_file(&format!("{{{a},{a},{b}}}"), data)),
        safetensors_error("appears twice"),
    );
    t.err(
        "__metadata__ twice",
        load(&raw_file(
            &format!(r#"{{"__metadata__":{{}},{a},"__metadata__":{{"x":"y"}},{b}}}"#),
            data,
        )),
        safetensors_error("appears twice"),
    );
    t.err(
        "__metadata__ not strings",
        load(&raw_file(
            &format!(r#"{{"__metadata__":{{"x":1}},{a},{b}}}"#),
            data,
        )),
        safetensors_error("header"),
    );
    t.err(
        "overlapping tensors",
        load(&raw_file(
            &format!("{{{a},{}}}", b.replace("[32,56]", "[8,32]")),
            data,
        )),
        safetensors_error("gap or an overlap"),
    );
    t.err(
        "a gap between tensors",
        load(&raw_file(
            &format!("{{{a},{}}}", b.replace("[32,56]", "[36,60]")),
            &[data, &[0; 4]].concat(),
        )),
        safetensors_error("gap or an overlap"),
    );
    t.err(
        "F4 [3]: not whole bytes",
        load(&raw_file(
            r#"{"t":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
            &[0; 2],
        )),
        safetensors_error("whole number of bytes"),
    );
    let mut huge = (MAX_HEADER_SIZE + 1).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    t.err(
        "header length over MAX_HEADER_SIZE",
        load(&huge),
        safetensors_error("limit"),
    );
    // The crafted file through `load` (the header is read from the file first).
    let dir = adapter_dir("crafted");
    std::fs::write(dir.join(WEIGHTS_FILE), &crafted).unwrap();
    t.err(
        "load: 8 × U8 [2⁶¹−1] chained",
        PeftAdapter::<f32>::load(&dir),
        |e| {
            safetensors_error(overflow)(e)
                && matches!(e, LoraError::Parse { path, .. } if path.ends_with(WEIGHTS_FILE))
        },
    );
    std::fs::remove_dir_all(&dir).unwrap();
    println!("safetensors headers: {} cases", t.cases);
    assert_eq!(t.cases, HEADERS);
}

#[test]
fn catalogue_size() {
    #[cfg(unix)]
    let files = FILES;
    #[cfg(not(unix))]
    let files = 0;
    let total = files + PATTERNS + WRITER + HEADERS;
    println!("hostile PEFT files: {total} cases");
    #[cfg(unix)]
    assert_eq!(total, 52);
}
