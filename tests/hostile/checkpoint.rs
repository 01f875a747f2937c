//! Hostile checkpoints and adapters for `ndlora::checkpoint::merge`: truncated and corrupt
//! shards, indexes that lie or point outside the directory, tensors missing or of the wrong
//! shape or dtype, factors that are not finite or would overflow a weight, features that are
//! not implemented, output paths that exist or hold the inputs, inputs that are not regular
//! files. Each case asserts the error variant, that no output (nor a temporary directory
//! beside it) is left, and that the inputs are unchanged. Then every truncation of a
//! single-file checkpoint and every bit flip of its header: an error or a valid merge, never
//! a panic.

use std::path::{Path, PathBuf};

use crate::common::checkpoint::{
    random_tensor, safetensors_bytes, write_adapter, write_sharded, Raw,
};
use crate::common::temp_dir;
use crate::Tally;
use ndlora::checkpoint::{merge, MergeOptions, Operation};
use ndlora::LoraError;
use safetensors::Dtype;
use serde_json::{json, Value};

/// Expected number of cases (asserted).
#[cfg(unix)]
pub(crate) const CASES: usize = 33;
#[cfg(not(unix))]
pub(crate) const CASES: usize = 32;

fn options() -> MergeOptions {
    MergeOptions {
        sync: false,
        ..MergeOptions::default()
    }
}

/// The base: q (8×6) and an I8 tensor in shard 1, norm (6) and lm_head (5×6) in shard 2, F16.
fn base_tensors() -> [Vec<Raw>; 2] {
    let int8 = Raw {
        name: "model.quant".into(),
        dtype: Dtype::I8,
        shape: vec![8, 6],
        data: vec![1; 48],
    };
    [
        vec![
            random_tensor("model.q_proj.weight", Dtype::F16, &[8, 6], 1),
            int8,
        ],
        vec![
            random_tensor("model.norm.weight", Dtype::F16, &[6], 2),
            random_tensor("lm_head.weight", Dtype::F16, &[5, 6], 3),
        ],
    ]
}

const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

fn write_base(dir: &Path) {
    let [one, two] = base_tensors();
    write_sharded(dir, &[(SHARDS[0], one), (SHARDS[1], two)]);
}

/// A rank-2 adapter on `module` with A r×k, B d×r.
fn pair(module: &str, d: usize, k: usize) -> Vec<Raw> {
    vec![
        random_tensor(
            &format!("base_model.model.{module}.lora_A.weight"),
            Dtype::F32,
            &[2, k],
            10,
        ),
        random_tensor(
            &format!("base_model.model.{module}.lora_B.weight"),
            Dtype::F32,
            &[d, 2],
            11,
        ),
    ]
}

fn adapter_config() -> Value {
    json!({ "r": 2, "lora_alpha": 4 })
}

/// A fresh case directory with a valid base and adapter (which merge).
struct Case {
    dir: PathBuf,
}

impl Case {
    fn new(name: &str) -> Self {
        let dir = temp_dir(name);
        write_base(&dir.join("base"));
        write_adapter(
            &dir.join("adapter"),
            adapter_config(),
            &pair("model.q_proj", 8, 6),
        );
        Self { dir }
    }
    fn base(&self) -> PathBuf {
        self.dir.join("base")
    }
    fn adapter(&self) -> PathBuf {
        self.dir.join("adapter")
    }
    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }
    /// Every file under the case's directory with its bytes, except `out`.
    fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut all = Vec::new();
        for sub in ["base", "adapter"] {
            let mut entries: Vec<_> = std::fs::read_dir(self.dir.join(sub))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for p in entries {
                if std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
                    all.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
        all
    }
    /// Runs the merge, asserts the error, that the inputs did not change, that no output
    /// appeared where none was, and that nothing was left beside it.
    fn fails(
        &self,
        t: &mut Tally,
        name: &str,
        options: &MergeOptions,
        expected: impl Fn(&LoraError) -> bool,
    ) {
        let before = self.snapshot();
        let out_existed = self.out().exists();
        let result = merge(
            self.base(),
            self.adapter(),
            self.out(),
            options,
            &mut |_| {},
        );
        t.err(name, result, expected);
        assert_eq!(self.snapshot(), before, "{name}: an input changed");
        assert_eq!(self.out().exists(), out_existed, "{name}: the output");
        let strays: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".ndlora"))
            .collect();
        assert!(strays.is_empty(), "{name}: left {strays:?}");
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn parse(format: &'static str, needle: &'static str) -> impl Fn(&LoraError) -> bool {
    move |e| matches!(e, LoraError::Parse { format: f, message, .. } if *f == format && message.contains(needle))
}

fn in_tensor(tensor: &'static str, f: fn(&LoraError) -> bool) -> impl Fn(&LoraError) -> bool {
    move |e| matches!(e, LoraError::InTensor { tensor: t, source, .. } if t == tensor && f(source))
}

fn io(kind: std::io::ErrorKind) -> impl Fn(&LoraError) -> bool {
    move |e| matches!(e, LoraError::Io { kind: k, .. } if *k == kind)
}

fn index_path(c: &Case) -> PathBuf {
    c.base().join("model.safetensors.index.json")
}

fn edit_index(c: &Case, f: impl FnOnce(&mut Value)) {
    let mut index: Value = serde_json::from_slice(&std::fs::read(index_path(c)).unwrap()).unwrap();
    f(&mut index);
    std::fs::write(index_path(c), index.to_string()).unwrap();
}

#[test]
fn hostile_checkpoints() {
    let mut t = Tally::default();
    let opts = options();
    // The valid case merges.
    {
        let c = Case::new("valid");
        merge(c.base(), c.adapter(), c.out(), &opts, &mut |_| {}).unwrap();
    }

    // Shards: truncated, too short, a header that runs past the end, an unknown dtype.
    let c = Case::new("truncated");
    let shard = c.base().join(SHARDS[0]);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 3]).unwrap();
    c.fails(
        &mut t,
        "truncated shard",
        &opts,
        parse("safetensors", "the header describes"),
    );
    std::fs::write(&shard, &bytes[..5]).unwrap();
    c.fails(
        &mut t,
        "5-byte shard",
        &opts,
        parse("safetensors", "shorter than the 8-byte"),
    );
    let mut long = bytes.clone();
    long[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    std::fs::write(&shard, &long).unwrap();
    c.fails(
        &mut t,
        "header length past the end",
        &opts,
        parse("safetensors", "runs past the end"),
    );
    let mut q4 = bytes.clone();
    let at = q4.windows(4).position(|w| w == b"\"I8\"").unwrap();
    q4[at + 1..at + 3].copy_from_slice(b"Q4");
    std::fs::write(&shard, &q4).unwrap();
    c.fails(
        &mut t,
        "unknown dtype",
        &opts,
        parse("safetensors", "header"),
    );
    std::fs::remove_file(&shard).unwrap();
    c.fails(
        &mut t,
        "shard missing",
        &opts,
        io(std::io::ErrorKind::NotFound),
    );

    // The index: corrupt, no weight_map, shard names outside the directory, lies both ways,
    // a tensor in two shards.
    let c = Case::new("index");
    let good = std::fs::read(index_path(&c)).unwrap();
    std::fs::write(index_path(&c), b"{\"weight_map\": {").unwrap();
    c.fails(&mut t, "index not JSON", &opts, parse("JSON", ""));
    std::fs::write(index_path(&c), b"{\"metadata\": {}}").unwrap();
    c.fails(
        &mut t,
        "index without weight_map",
        &opts,
        parse("safetensors index", "weight_map"),
    );
    for (name, shard) in [
        ("../escape.safetensors", "parent"),
        ("/etc/passwd", "absolute"),
        ("sub/x.safetensors", "subdirectory"),
    ] {
        std::fs::write(index_path(&c), &good).unwrap();
        edit_index(&c, |i| i["weight_map"]["lm_head.weight"] = json!(name));
        let what = format!("index names a shard in a {shard} path");
        c.fails(
            &mut t,
            &what,
            &opts,
            parse("safetensors index", "plain file name"),
        );
    }
    std::fs::write(index_path(&c), &good).unwrap();
    edit_index(&c, |i| {
        i["weight_map"]["model.ghost.weight"] = json!(SHARDS[0])
    });
    c.fails(
        &mut t,
        "index lists a tensor its shard lacks",
        &opts,
        parse("safetensors index", "does not hold it"),
    );
    std::fs::write(index_path(&c), &good).unwrap();
    edit_index(&c, |i| {
        i["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove("model.norm.weight");
    });
    c.fails(
        &mut t,
        "a shard holds a tensor the index lacks",
        &opts,
        parse("safetensors index", "not listed"),
    );
    std::fs::write(index_path(&c), &good).unwrap();
    edit_index(&c, |i| i["weight_map"]["lm_head.weight"] = json!(SHARDS[0]));
    c.fails(
        &mut t,
        "index names the wrong shard",
        &opts,
        parse("safetensors index", "stored in"),
    );
    std::fs::write(index_path(&c), &good).unwrap();
    let [one, mut two] = base_tensors();
    two.push(one[0].clone());
    std::fs::write(c.base().join(SHARDS[1]), safetensors_bytes(&two)).unwrap();
    c.fails(
        &mut t,
        "a tensor in two shards",
        &opts,
        parse("safetensors", "is also in"),
    );
    std::fs::remove_dir_all(c.base()).unwrap();
    std::fs::create_dir_all(c.base()).unwrap();
    c.fails(
        &mut t,
        "a directory without index or model.safetensors",
        &opts,
        io(std::io::ErrorKind::NotFound),
    );

    // The adapter against the base.
    let c = Case::new("adapter");
    let write = |config: Value, tensors: &[Raw]| write_adapter(&c.adapter(), config, tensors);
    write(adapter_config(), &pair("model.k_proj", 8, 6));
    c.fails(
        &mut t,
        "module not in the base",
        &opts,
        |e| matches!(e, LoraError::NotInBase { tensor, .. } if tensor == "model.k_proj.weight"),
    );
    write(adapter_config(), &pair("model.q_proj", 8, 7));
    c.fails(&mut t, "shape mismatch", &opts, in_tensor("model.q_proj.weight", |e| {
        matches!(e, LoraError::ShapeMismatch { expected, got, .. } if expected == "[8, 7]" && got == "[8, 6]")
    }));
    let [mut one, two] = base_tensors();
    one[1].name = "model.quant.weight".into();
    write_sharded(&c.base(), &[(SHARDS[0], one), (SHARDS[1], two)]);
    write(adapter_config(), &pair("model.quant", 8, 6));
    c.fails(
        &mut t,
        "I8 weight",
        &opts,
        in_tensor("model.quant.weight", |e| {
            matches!(e, LoraError::TensorKind { .. })
        }),
    );
    write(adapter_config(), &pair("model.norm", 6, 1));
    c.fails(
        &mut t,
        "1-D weight",
        &opts,
        in_tensor("model.norm.weight", |e| {
            matches!(e, LoraError::TensorKind { .. })
        }),
    );
    let mut bad = pair("model.q_proj", 8, 6);
    bad.push(random_tensor(
        "base_model.model.lm_head.weight",
        Dtype::F32,
        &[6, 5],
        12,
    ));
    write(adapter_config(), &bad);
    c.fails(
        &mut t,
        "replacement of the wrong shape",
        &opts,
        in_tensor("base_model.model.lm_head.weight", |e| {
            matches!(e, LoraError::ShapeMismatch { .. })
        }),
    );
    let mut bad = pair("model.q_proj", 8, 6);
    bad.push(random_tensor(
        "base_model.model.model.quant.weight",
        Dtype::F32,
        &[8, 6],
        13,
    ));
    write(adapter_config(), &bad);
    c.fails(
        &mut t,
        "float replacement of an I8 tensor",
        &opts,
        in_tensor("base_model.model.model.quant.weight", |e| {
            matches!(e, LoraError::TensorKind { .. })
        }),
    );
    let mut bad = pair("model.q_proj", 8, 6);
    bad[1].data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    write(adapter_config(), &bad);
    c.fails(&mut t, "NaN in lora_B", &opts, |e| matches!(e, LoraError::InModule { source, .. } if matches!(**source, LoraError::NonFinite { .. })));
    let mut big = pair("model.q_proj", 8, 6);
    big[1].data = (0..16).flat_map(|_| 1e30f32.to_le_bytes()).collect();
    write(adapter_config(), &big);
    c.fails(
        &mut t,
        "an update that overflows F16",
        &opts,
        in_tensor("model.q_proj.weight", |e| {
            matches!(e, LoraError::WouldOverflow { .. })
        }),
    );
    write(
        json!({ "r": 3, "lora_alpha": 4 }),
        &pair("model.q_proj", 8, 6),
    );
    c.fails(&mut t, "rank other than the config's", &opts, |e| matches!(e, LoraError::InModule { source, .. } if matches!(**source, LoraError::ShapeMismatch { .. })));
    write(adapter_config(), &pair("model.q_proj", 8, 6)[..1]);
    c.fails(
        &mut t,
        "lora_A without lora_B",
        &opts,
        |e| matches!(e, LoraError::MissingTensor { name } if name.ends_with("lora_B.weight")),
    );
    write(
        json!({ "r": 2, "use_dora": true }),
        &pair("model.q_proj", 8, 6),
    );
    c.fails(
        &mut t,
        "DoRA",
        &opts,
        |e| matches!(e, LoraError::PeftUnsupported { field, .. } if field == "use_dora"),
    );
    let mut bad = pair("model.q_proj", 8, 6);
    bad[0].name = "model.q_proj.lora_A.weight".into();
    write(adapter_config(), &bad);
    c.fails(&mut t, "a key without base_model.model.", &opts, |e| {
        matches!(e, LoraError::PeftTensor { .. })
    });
    let mut mts = pair("model.q_proj", 8, 6);
    mts.push(random_tensor(
        "base_model.model.lm_head.weight",
        Dtype::F32,
        &[5, 6],
        14,
    ));
    write(adapter_config(), &mts);
    let unmerge = MergeOptions {
        operation: Operation::Unmerge,
        ..options()
    };
    c.fails(
        &mut t,
        "unmerge of modules_to_save",
        &unmerge,
        |e| matches!(e, LoraError::PeftUnsupported { field, .. } if field == "modules_to_save"),
    );
    std::fs::remove_file(c.adapter().join("adapter_config.json")).unwrap();
    c.fails(
        &mut t,
        "no adapter_config.json",
        &opts,
        io(std::io::ErrorKind::NotFound),
    );

    // The output.
    let c = Case::new("out");
    std::fs::create_dir_all(c.out()).unwrap();
    c.fails(&mut t, "output exists", &opts, |e| {
        matches!(e, LoraError::OutputExists { .. })
    });
    std::fs::remove_dir_all(c.out()).unwrap();
    std::fs::write(c.out(), b"a file").unwrap();
    c.fails(&mut t, "output exists as a file", &opts, |e| {
        matches!(e, LoraError::OutputExists { .. })
    });
    std::fs::remove_file(c.out()).unwrap();
    let force = MergeOptions {
        force: true,
        ..options()
    };
    let before = c.snapshot();
    t.err(
        "--force over the directory holding the inputs",
        merge(c.base(), c.adapter(), &c.dir, &force, &mut |_| {}),
        |e| matches!(e, LoraError::OutputExists { .. }),
    );
    assert_eq!(c.snapshot(), before);

    // Not regular files.
    #[cfg(unix)]
    {
        let c = Case::new("fifo");
        let shard = c.base().join(SHARDS[1]);
        std::fs::remove_file(&shard).unwrap();
        let path = std::ffi::CString::new(shard.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        c.fails(
            &mut t,
            "a shard that is a FIFO",
            &opts,
            |e| matches!(e, LoraError::NotAFile { kind, .. } if *kind == "a FIFO"),
        );
    }
    assert_eq!(t.cases, CASES);
}

#[test]
fn every_truncation_and_header_bit_flip_is_an_error_or_a_merge() {
    let dir = temp_dir("sweep");
    let (base, adapter) = (dir.join("model.safetensors"), dir.join("adapter"));
    let [mut one, two] = base_tensors();
    one.extend(two);
    let bytes = safetensors_bytes(&one);
    write_adapter(&adapter, adapter_config(), &pair("model.q_proj", 8, 6));
    let (mut errors, mut merges) = (0, 0);
    let mut run = |file: &[u8]| {
        std::fs::write(&base, file).unwrap();
        let out = dir.join("out");
        match merge(&base, &adapter, &out, &options(), &mut |_| {}) {
            Ok(_) => {
                merges += 1;
                std::fs::remove_dir_all(&out).unwrap();
            }
            Err(e) => {
                errors += 1;
                assert!(!out.exists(), "{e}");
            }
        }
    };
    for len in 0..bytes.len() {
        run(&bytes[..len]);
    }
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for bit in 0..header.min(400) * 8 {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        run(&flipped);
    }
    println!("checkpoint sweep: {errors} errors, {merges} merges");
    assert_eq!(errors + merges, bytes.len() + header.min(400) * 8);
    assert!(errors >= bytes.len());
    std::fs::remove_dir_all(&dir).ok();
}
