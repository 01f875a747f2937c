// layer_serde: bytes → `serde_json::from_slice::<LoraLayer<f32 | f64 | bf16 | f16>>`. Loading must never
// panic; whatever loads must be a consistent layer: serialise → deserialise is the identity,
// forward on a width-k input works and is finite where it cannot overflow, merged and
// unmerged forwards agree within the rounding bound, merge∘unmerge restores W, and a
// training forward, backward and SGD step run without panicking.

/// The check run by the fuzz target and by the corpus replay in `tests/fuzz_replay.rs`.
pub fn check_layer_serde(data: &[u8]) {
    check_layer_doc::<f32>(data);
    check_layer_doc::<f64>(data);
    check_layer_doc::<half::bf16>(data);
    check_layer_doc::<half::f16>(data);
}

fn check_layer_doc<A: LoraFloat>(data: &[u8]) {
    let Ok(layer) = serde_json::from_slice::<LoraLayer<A>>(data) else {
        return;
    };
    assert_layer_round_trip(&layer);
    let k = layer.in_features();
    // The document held d·k numbers, so this is small; still, keep the fuzzer fast.
    if layer.out_features().saturating_mul(k) > 1 << 14 {
        return;
    }
    let x = input_from::<A>(3, k, data);
    check_layer_consistent(&layer, &x);

    let mut trained = layer.clone();
    let y = trained
        .forward_train(x.view())
        .expect("forward_train on a width-k input");
    assert_eq!(y.dim(), (3, layer.out_features()));
    let g = input_from::<A>(3, layer.out_features(), &data[data.len() / 2..]);
    let grads = layer
        .backward(x.view(), g.view())
        .expect("backward with matching shapes");
    let before = layer_state(&trained);
    if let Err(e) = trained.sgd_step(&grads, A::Factor::from_f64_lossy(1e-3)) {
        assert!(
            matches!(
                e,
                LoraError::MergeState { .. } | LoraError::NonFinite { .. }
            ),
            "{e:?}"
        );
        assert_eq!(
            layer_state(&trained),
            before,
            "failed sgd_step changed the layer"
        );
    }
}
