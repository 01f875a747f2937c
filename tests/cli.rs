//! The `ndlora` binary: `merge` on PEFT's fixture writes the checkpoint the library writes,
//! `inspect` lists modules and problems, and every failure is one line on stderr naming the
//! file and tensor, with a non-zero exit code.
#![cfg(feature = "cli")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::temp_dir;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint/llama_bf16_r8")
}

fn ndlora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ndlora"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One line on stderr, starting with `ndlora: error:`, and exit code 1.
fn one_line_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("ndlora: error: "), "{err}");
    err
}

#[test]
fn merge_then_unmerge_on_the_fixture() {
    let dir = temp_dir("merge");
    let out = dir.join("merged");
    let (base, adapter) = (fixture().join("base"), fixture().join("adapter"));
    let args = |cmd: &'static str, base: &Path, out: &Path| -> Vec<String> {
        vec![
            cmd.into(),
            "--base".into(),
            base.display().to_string(),
            "--adapter".into(),
            adapter.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--threads".into(),
            "1".into(),
            "--no-sync".into(),
        ]
    };
    let run = |a: Vec<String>| ndlora(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let merged = run(args("merge", &base, &out));
    assert!(merged.status.success(), "{}", text(&merged.stderr));
    let summary = text(&merged.stdout);
    assert!(
        summary.contains("14 tensors merged, 0 replaced, 7 copied"),
        "{summary}"
    );
    assert!(summary.contains("peak resident memory"), "{summary}");
    // The same bytes as the library writes (tests/checkpoint.rs checks those against PEFT),
    // and with --no-mmap (the base read with pread).
    let lib = dir.join("lib");
    let options = ndlora::checkpoint::MergeOptions {
        sync: false,
        ..Default::default()
    };
    ndlora::checkpoint::merge(&base, &adapter, &lib, &options, &mut |_| {}).unwrap();
    let pread = dir.join("pread");
    let merged = run(args("merge", &base, &pread)
        .into_iter()
        .chain(["--no-mmap".to_owned()])
        .collect());
    assert!(merged.status.success(), "{}", text(&merged.stderr));
    for file in ndlora::checkpoint::Checkpoint::open(&lib).unwrap().files() {
        let expected = std::fs::read(lib.join(file)).unwrap();
        assert_eq!(std::fs::read(out.join(file)).unwrap(), expected);
        assert_eq!(std::fs::read(pread.join(file)).unwrap(), expected);
    }
    // A second merge into the same output is refused, in one line naming it.
    let err = one_line_error(&run(args("merge", &base, &out)));
    assert!(
        err.contains(&out.display().to_string()) && err.contains("exists"),
        "{err}"
    );
    // Unmerge with --quiet prints nothing.
    let back = run(args("unmerge", &out, &dir.join("back"))
        .into_iter()
        .chain(["--quiet".to_owned()])
        .collect());
    assert!(back.status.success(), "{}", text(&back.stderr));
    assert!(back.stdout.is_empty() && back.stderr.is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn errors_name_the_file_and_the_tensor() {
    let dir = temp_dir("errors");
    // A base whose q_proj has another shape: copy the fixture's base and swap one shard for
    // a file that declares the adapter's tensor with a wrong shape.
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for e in std::fs::read_dir(fixture().join("base")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, base.join(p.file_name().unwrap())).unwrap();
    }
    let shard = base.join("model-00001-of-00005.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    let needle = br#""model.layers.0.self_attn.q_proj.weight":{"dtype":"BF16","shape":[64,64]"#;
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    let mut bad = bytes.clone();
    // [64,64] → [8,512]: the same byte count, another shape.
    bad[at + needle.len() - 7..at + needle.len()].copy_from_slice(b"[8,512]");
    std::fs::write(&shard, &bad).unwrap();
    let adapter = fixture().join("adapter");
    let out = dir.join("out");
    let err = one_line_error(&ndlora(&[
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(
        err.contains("model-00001-of-00005.safetensors")
            && err.contains("model.layers.0.self_attn.q_proj.weight")
            && err.contains("[64, 64]")
            && err.contains("[8, 512]"),
        "{err}"
    );
    assert!(!out.exists());
    // inspect lists the problem and exits 1; the checkpoint alone inspects fine.
    let inspect = ndlora(&[
        "inspect",
        adapter.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
    ]);
    assert_eq!(inspect.status.code(), Some(1));
    let report = text(&inspect.stdout);
    assert!(
        report.contains("PROBLEM") && report.contains("1 problems"),
        "{report}"
    );
    let listing = ndlora(&["inspect", base.to_str().unwrap(), "--tensors"]);
    assert!(listing.status.success());
    assert!(text(&listing.stdout).contains("21 tensors in 5 files"));
    // A bad --threads and a missing adapter.
    let err = one_line_error(&ndlora(&[
        "merge",
        "--base",
        "x",
        "--adapter",
        "y",
        "--out",
        "z",
        "--threads",
        "0",
    ]));
    assert!(err.contains("--threads"), "{err}");
    let err = one_line_error(&ndlora(&[
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        dir.join("nope").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(err.contains("adapter_config.json"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
