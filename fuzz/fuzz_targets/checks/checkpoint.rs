// checkpoint: feeds arbitrary bytes to the checkpoint reader and merge: `merge` must return
// `Ok` or `Err`, never panic, leave no output on error, and what it writes must open again as
// a checkpoint with the base's tensors. The merge runs twice, reading the base through a map
// (the default) and with `pread`: both must succeed with the same bytes, or both fail.
//
// Input: the first byte's low bit sets `fan_in_fan_out`; the next two bytes give a length L;
// the following L bytes are the base checkpoint (`model.safetensors`) and the rest the
// adapter's `adapter_model.safetensors`, with config r = 2, lora_alpha = 4.

use ndlora::checkpoint::{merge, Checkpoint, MergeOptions};

/// The check run by the fuzz target and by the corpus replay in `tests/fuzz_replay.rs`.
pub fn check_checkpoint(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if rest.len() < 2 {
        return;
    }
    let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
    let (base_bytes, adapter_bytes) = rest[2..].split_at(len);
    let dir = std::env::temp_dir().join(format!(
        "ndlora-fuzz-checkpoint-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("adapter")).expect("temp dir");
    let base = dir.join("model.safetensors");
    std::fs::write(&base, base_bytes).expect("write base");
    let config = format!(
        r#"{{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "fan_in_fan_out": {}}}"#,
        mode & 1 == 1
    );
    std::fs::write(dir.join("adapter/adapter_config.json"), config).expect("write config");
    std::fs::write(dir.join("adapter/adapter_model.safetensors"), adapter_bytes)
        .expect("write adapter");
    let out = dir.join("out");
    let read_out = dir.join("out-pread");
    let options = MergeOptions {
        sync: false,
        ..MergeOptions::default()
    };
    let pread = MergeOptions {
        map_inputs: false,
        ..options.clone()
    };
    let mapped = merge(&base, dir.join("adapter"), &out, &options, &mut |_| {});
    let read = merge(&base, dir.join("adapter"), &read_out, &pread, &mut |_| {});
    match (&mapped, &read) {
        (Ok(_), Ok(_)) => assert!(
            same_files(&out, &read_out),
            "the mapped and the pread merge wrote different outputs"
        ),
        (Err(_), Err(_)) => {}
        _ => panic!("mapped merge {mapped:?}, pread merge {read:?}"),
    }
    match mapped {
        Ok(_) => {
            let before = Checkpoint::open(&base).expect("the base opened for the merge");
            let after = Checkpoint::open(&out).expect("the output opens");
            let names = |c: &Checkpoint| {
                c.tensors()
                    .into_iter()
                    .map(|t| (t.name, t.dtype, t.shape))
                    .collect::<Vec<_>>()
            };
            assert_eq!(names(&before), names(&after));
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(!out.exists(), "output left after {e}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether two outputs (a file, or a directory of files) hold the same names and bytes.
fn same_files(a: &std::path::Path, b: &std::path::Path) -> bool {
    if a.is_file() || b.is_file() {
        return std::fs::read(a).ok() == std::fs::read(b).ok();
    }
    let names = |d: &std::path::Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .map(|it| it.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let (na, nb) = (names(a), names(b));
    na == nb && na.iter().all(|n| same_files(&a.join(n), &b.join(n)))
}
