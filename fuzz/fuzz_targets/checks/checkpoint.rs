// checkpoint: feeds arbitrary bytes to the checkpoint reader and merge: `merge` must return
// `Ok` or `Err`, never panic, leave no output on error, and what it writes must open again as
// a checkpoint with the base's tensors.
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
    let options = MergeOptions { sync: false, ..MergeOptions::default() };
    match merge(&base, dir.join("adapter"), &out, &options, &mut |_| {}) {
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
