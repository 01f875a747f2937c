//! The `load` fuzz target (PEFT adapter loader); the check itself is `checks/load.rs`,
//! shared with the corpus replay in the main crate's `tests/fuzz_replay.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
mod checks {
    const FIXTURE_CONFIG: &str =
        include_str!("../../tests/fixtures/peft/f32_r8/adapter/adapter_config.json");
    include!("checks/common.rs");
    include!("checks/load.rs");
}

fuzz_target!(|data: &[u8]| checks::check_load(data));
