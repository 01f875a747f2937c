// load: feeds arbitrary bytes to the PEFT adapter loader: it must return `Ok` or `Err`, never
// panic, and whatever it accepts must be usable (layers build, save round-trips).
//
// Input: first byte < 128 → the bytes after it are `adapter_model.safetensors` with PEFT's
// config from the fixture (`FIXTURE_CONFIG`, defined by the includer); otherwise the next two
// bytes give a length L, the following L bytes are `adapter_config.json` (lossy UTF-8) and
// the rest the safetensors file.

use ndlora::peft::PeftAdapter;

/// The check run by the fuzz target and by the corpus replay in `tests/fuzz_replay.rs`.
pub fn check_load(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (config, weights) = if mode < 128 {
        (std::borrow::Cow::Borrowed(FIXTURE_CONFIG), rest)
    } else {
        if rest.len() < 2 {
            return;
        }
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (config, weights) = rest[2..].split_at(len);
        (String::from_utf8_lossy(config), weights)
    };
    exercise::<f32>(&config, weights);
    exercise::<f64>(&config, weights);
    exercise::<half::bf16>(&config, weights);
    exercise::<half::f16>(&config, weights);
}

fn exercise<A: LoraFloat>(config: &str, weights: &[u8]) {
    let Ok(adapter) = PeftAdapter::<A>::from_bytes(config, weights) else {
        return;
    };
    let mut layers = Vec::new();
    for name in adapter.module_names() {
        let (a, b) = adapter.factors(&name).expect("listed module");
        let (d, k) = (b.nrows(), a.ncols());
        // Only small layers: the fuzzer must not spend its time allocating.
        if d.saturating_mul(k) > 1 << 16 {
            continue;
        }
        let shape = if adapter.config().fan_in_fan_out() {
            (k, d)
        } else {
            (d, k)
        };
        if let Ok(layer) = adapter.to_layer(&name, Array2::zeros(shape), None) {
            let _ = layer.forward(Array2::zeros((1, k)).view());
            layers.push((name, layer));
        }
    }
    let _ = PeftAdapter::from_layers(layers.iter().map(|(n, l)| (n.as_str(), l)));
}
