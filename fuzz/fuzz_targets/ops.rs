//! The `ops` fuzz target; the check itself is `checks/ops.rs`, shared with the corpus
//! replay in the main crate's `tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
mod checks {
    include!("checks/common.rs");
    include!("checks/ops.rs");
}

fuzz_target!(|data: &[u8]| checks::check_ops(data));
