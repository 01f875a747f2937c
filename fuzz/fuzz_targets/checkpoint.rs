//! The `checkpoint` fuzz target (checkpoint reader and merge); the check itself is
//! `checks/checkpoint.rs`, shared with the corpus replay in the main crate's
//! `tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
mod checks {
    include!("checks/checkpoint.rs");
}

fuzz_target!(|data: &[u8]| checks::check_checkpoint(data));
