//! The fixtures PEFT/torch wrote, copied under `tests/fixtures/` from `shared/fixtures/`.

use std::path::{Path, PathBuf};

/// `tests/fixtures/<rel>`.
pub fn fixture_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Every file under `tests/fixtures/<rel>` equals its original in `../shared/fixtures/<rel>`
/// (CI clones the repo with shared/ beside it; the copy must not drift) and every original
/// has its copy. Returns how many files were compared (0 when shared/ is not there).
pub fn compare_with_shared(rel: &str) -> usize {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(rel);
    if !shared.exists() {
        println!("{} not present; skipped", shared.display());
        return 0;
    }
    let copy = fixture_path(rel);
    let mut compared = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(shared.join(&dir)).unwrap() {
            let entry = entry.unwrap();
            let rel_file = dir.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                stack.push(rel_file);
                continue;
            }
            let original = std::fs::read(shared.join(&rel_file)).unwrap();
            let ours = std::fs::read(copy.join(&rel_file))
                .unwrap_or_else(|e| panic!("{}: {e}", copy.join(&rel_file).display()));
            assert!(
                original == ours,
                "{rel}/{} differs from shared",
                rel_file.display()
            );
            compared += 1;
        }
    }
    compared
}
