//! The `micro_serde` fuzz target; the check itself is `checks/micro_serde.rs`, shared with the corpus
//! replay in the main crate's `tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
mod checks {
    include!("checks/common.rs");
    include!("checks/micro_serde.rs");
}

fuzz_target!(|data: &[u8]| checks::check_micro_serde(data));
