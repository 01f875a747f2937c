//! A base checkpoint truncated by another process while ndlora merges it: the merge fails
//! with an error naming the file, leaves no output, and the process lives on — with the base
//! read through a guarded map (the default, where a plain map would raise `SIGBUS` and end
//! the process) and with `pread`. Its own test binary, so that the one-thread setting (which
//! makes the order of the work, and so the failing read, deterministic) is not changed by
//! other tests meanwhile.

mod common;

use common::checkpoint::{random_tensor, safetensors_bytes, write_adapter};
use common::temp_dir;
use ndlora::checkpoint::{merge, MergeOptions};
use safetensors::Dtype;
use serde_json::json;

#[test]
fn a_base_truncated_during_the_merge_fails_with_its_name_and_leaves_no_output() {
    ndlora::set_blas_threads(1);
    let dir = temp_dir("truncated");
    let adapter = dir.join("adapter");
    // Two merged tensors of several bands each (1 MiB bands: 1400 BF16 rows of 2 KiB are
    // three); the first is done when the progress callback truncates the file.
    let first = random_tensor("a.weight", Dtype::BF16, &[64, 1024], 1);
    let second = random_tensor("b.weight", Dtype::BF16, &[1400, 1024], 2);
    let mut factors = Vec::new();
    for (module, d, seed) in [("a", 64, 3), ("b", 1400, 5)] {
        factors.push(random_tensor(
            &format!("base_model.model.{module}.lora_A.weight"),
            Dtype::F32,
            &[4, 1024],
            seed,
        ));
        factors.push(random_tensor(
            &format!("base_model.model.{module}.lora_B.weight"),
            Dtype::F32,
            &[d, 4],
            seed + 1,
        ));
    }
    write_adapter(&adapter, json!({ "r": 4, "lora_alpha": 8 }), &factors);
    let bytes = safetensors_bytes(&[first, second]);

    for map_inputs in [true, false] {
        let base = dir.join(format!("base-{map_inputs}.safetensors"));
        std::fs::write(&base, &bytes).unwrap();
        let out = dir.join(format!("out-{map_inputs}"));
        let options = MergeOptions {
            sync: false,
            map_inputs,
            ..MergeOptions::default()
        };
        let mut truncated = false;
        let result = merge(&base, &adapter, &out, &options, &mut |p| {
            if !truncated {
                assert_eq!(p.tensor, "a.weight");
                let file = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
                // Past the header and a.weight, short of b.weight's first band.
                file.set_len(200_000).unwrap();
                truncated = true;
            }
        });
        let error = result
            .expect_err("a truncated base must fail the merge")
            .to_string();
        assert!(truncated);
        assert!(
            error.contains(&*base.to_string_lossy()) && error.contains("b.weight"),
            "map {map_inputs}: {error}"
        );
        if map_inputs {
            assert!(error.contains("truncated while it was read"), "{error}");
        }
        assert!(!out.exists(), "map {map_inputs}: an output was left");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".ndlora-"))
            .collect();
        assert!(leftovers.is_empty(), "a temporary directory was left");
        println!("map {map_inputs}: {error}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// ndlora's `SIGBUS` guard (installed by the first mapped merge) catches only faults in its
/// own maps: a truncated file mapped by anyone else still ends the process with `SIGBUS`, as
/// without ndlora. Run in a child (this test binary, re-run), which the parent expects to die
/// of it.
#[cfg(target_os = "linux")]
#[test]
fn a_fault_outside_ndloras_maps_still_ends_the_process() {
    use std::os::unix::process::ExitStatusExt;
    const CHILD: &str = "NDLORA_SIGBUS_CHILD";
    if let Some(dir) = std::env::var_os(CHILD) {
        let dir = std::path::PathBuf::from(dir);
        // A merge that maps its base, so the guard is in place.
        let adapter = dir.join("adapter");
        let base = dir.join("base.safetensors");
        write_adapter(
            &adapter,
            json!({ "r": 2, "lora_alpha": 2 }),
            &[
                random_tensor("base_model.model.a.lora_A.weight", Dtype::F32, &[2, 64], 1),
                random_tensor("base_model.model.a.lora_B.weight", Dtype::F32, &[64, 2], 2),
            ],
        );
        let bytes = safetensors_bytes(&[random_tensor("a.weight", Dtype::BF16, &[64, 64], 3)]);
        std::fs::write(&base, bytes).unwrap();
        let options = MergeOptions {
            sync: false,
            ..MergeOptions::default()
        };
        merge(&base, &adapter, dir.join("out"), &options, &mut |_| {}).unwrap();

        let path = dir.join("plain");
        std::fs::write(&path, vec![1u8; 1 << 16]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a private map of a file this test owns, truncated below on purpose.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        println!("child: reading past the end");
        // SAFETY: reads a mapped byte whose page is gone: SIGBUS, by design.
        let v = unsafe { std::ptr::read_volatile(map.as_ptr().add(40_000)) };
        println!("child survived, read {v}");
        std::process::exit(0);
    }
    let dir = temp_dir("sigbus-child");
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_fault_outside_ndloras_maps_still_ends_the_process",
            "--nocapture",
        ])
        .env(CHILD, &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("child: reading past the end"),
        "child did not run: {stdout}"
    );
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGBUS),
        "child: {:?}\n{stdout}",
        output.status
    );
    std::fs::remove_dir_all(&dir).ok();
}
