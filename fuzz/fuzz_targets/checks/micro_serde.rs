// micro_serde: bytes → `serde_json::from_slice::<MicroLora>`. Loading must never panic;
// whatever loads must round-trip, forward without panicking (all kernels agreeing, outputs
// finite for finite inputs unless the magnitudes allow overflow), and still learn:
// accumulate_gradient then try_apply_accumulated either work or fail leaving it unchanged.

/// The check run by the fuzz target and by the corpus replay in `tests/fuzz_replay.rs`.
pub fn check_micro_serde(data: &[u8]) {
    let Ok(lora) = serde_json::from_slice::<MicroLora>(data) else {
        return;
    };
    assert_micro_round_trip(&lora);
    let h = lora.hidden_dim();
    if h > 1 << 14 {
        return;
    }
    let x = input_from::<f32>(1, h, data).into_raw_vec_and_offset().0;
    let y0 = input_from::<f32>(1, h, &data[data.len() / 3..])
        .into_raw_vec_and_offset()
        .0;
    check_micro_forward(&lora, &x, &y0);

    let g = input_from::<f32>(1, h, &data[data.len() / 2..])
        .into_raw_vec_and_offset()
        .0;
    let mut learner = lora.clone();
    let signal = ndlora::LearningSignal::with_gradient(x.clone(), g, 1.0);
    if let Err(e) = learner.accumulate_gradient(&signal) {
        assert!(matches!(e, LoraError::NonFinite { .. }), "{e:?}");
        assert_eq!(
            learner, lora,
            "failed accumulate_gradient changed the adapter"
        );
        return;
    }
    assert_eq!(learner.pending_updates(), 1);
    let accumulated = learner.clone();
    match learner.try_apply_accumulated(0.1) {
        Ok(()) => {
            assert_eq!(learner.pending_updates(), 0);
            let (down, up) = learner.get_weights();
            assert!(down.iter().chain(up.iter()).all(|v| v.is_finite()));
            check_micro_forward(&learner, &x, &y0);
            assert_micro_round_trip(&learner);
        }
        Err(e) => {
            assert!(matches!(e, LoraError::WouldOverflow { .. }), "{e:?}");
            assert_eq!(
                learner, accumulated,
                "failed try_apply_accumulated changed the adapter"
            );
        }
    }
}
