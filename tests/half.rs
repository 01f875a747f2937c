//! Half-precision layers (`bf16`, `f16`): against what PEFT 0.21.2 / torch computed itself
//! (`tests/fixtures/peft/bf16_r8`, a copy of `shared/fixtures/peft/bf16_r8`) and against an
//! f64 reference that rounds as PEFT does, over odd shapes and input layouts; merge,
//! unmerge, overflow, serde, backward, models and buffer sizes.

mod common;

use std::path::{Path, PathBuf};

use common::{random, rng, temp_dir, ulp_stats, Half, Laid, LAYOUTS};
use half::{bf16, f16};
use ndarray::{Array1, Array2, ArrayView2, Axis};
use ndlora::peft::PeftAdapter;
use ndlora::{LoraConfig, LoraError, LoraLayer, LoraModel};
use safetensors::{Dtype, SafeTensors};

fn fixture_dir(case: &str) -> PathBuf {
    common::fixtures::fixture_path(&format!("peft/{case}"))
}

/// The tensors of one fixture file, by name.
struct Tensors(Vec<u8>);

impl Tensors {
    fn open(path: &Path) -> Self {
        Self(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn get<H: Half>(&self, name: &str) -> Array2<H> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), H::DTYPE, "{name}");
        let v: Vec<H> = t
            .data()
            .chunks_exact(2)
            .map(|c| H::from_le([c[0], c[1]]))
            .collect();
        let shape = t.shape();
        let (r, c) = if shape.len() == 1 {
            (1, shape[0])
        } else {
            (shape[0], shape[1])
        };
        Array2::from_shape_vec((r, c), v).unwrap()
    }

    fn get_f32(&self, name: &str) -> Array2<f32> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Array2::from_shape_vec((t.shape()[0], t.shape()[1]), v).unwrap()
    }

    fn has(&self, name: &str) -> bool {
        SafeTensors::deserialize(&self.0)
            .unwrap()
            .names()
            .contains(&name)
    }
}

/// Every check against one PEFT fixture of half type `H`: load, ΔW, base, unmerged, merged
/// weight and merged forward. Returns how many modules were checked.
fn check_peft_fixture<H: Half>(case: &str) -> usize {
    let dir = fixture_dir(case);
    let adapter = PeftAdapter::<H>::load(dir.join("adapter")).unwrap();
    let base = Tensors::open(&dir.join("base_weights.safetensors"));
    let inputs = Tensors::open(&dir.join("inputs.safetensors"));
    let outputs = Tensors::open(&dir.join("outputs.safetensors"));
    let mut checked = 0;
    for module in adapter.module_names() {
        let w: Array2<H> = base.get(&format!("{module}.weight"));
        let bias_name = format!("{module}.bias");
        let bias: Option<Array1<H>> = base
            .has(&bias_name)
            .then(|| base.get::<H>(&bias_name).row(0).to_owned());
        let x: Array2<H> = inputs.get(&module);
        let mut layer = adapter.to_layer(&module, w.clone(), bias.clone()).unwrap();

        // ΔW = s·(B A) in f32: the loader kept PEFT's f32 factors exactly.
        let (a, b) = adapter.factors(&module).unwrap();
        let s = adapter.scaling(&module).unwrap() as f32;
        let delta = b.dot(&a) * s;
        let want_delta = outputs.get_f32(&format!("{module}.delta_weight"));
        let worst = (&delta - &want_delta)
            .iter()
            .zip(want_delta.iter())
            .map(|(e, w)| e.abs() / (1e-6 + w.abs()))
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-5,
            "{case} {module}: ΔW off by {worst} (relative)"
        );

        // The base output (B = 0: the LoRA term adds exactly 0).
        let zero_b = Array2::zeros(b.dim());
        let cfg = layer.config().clone();
        let mut base_layer = LoraLayer::from_parts(w.clone(), a.to_owned(), zero_b, cfg).unwrap();
        if let Some(bias) = bias.clone() {
            base_layer = base_layer.with_bias(bias).unwrap();
        }
        let y_base = base_layer.forward(x.view()).unwrap();
        let want: Array2<H> = outputs.get(&format!("{module}.y_base"));
        let (max, _) = ulp_stats(y_base.view(), want.view());
        assert!(
            max <= 1,
            "{case} {module}: base output {max} ulps from PEFT's"
        );

        let y = layer.forward(x.view()).unwrap();
        let want: Array2<H> = outputs.get(&format!("{module}.y_unmerged"));
        let (max, _) = ulp_stats(y.view(), want.view());
        assert!(
            max <= 1,
            "{case} {module}: unmerged forward {max} ulps from PEFT's"
        );

        layer.merge().unwrap();
        let want: Array2<H> = outputs.get(&format!("{module}.w_merged"));
        let (max, equal) = ulp_stats(layer.base_weight(), want.view());
        assert!(
            max <= 1 && equal >= 0.9999,
            "{case} {module}: merged W {max} ulps, {equal} bit-equal vs PEFT's merge_and_unload"
        );

        let y = layer.forward(x.view()).unwrap();
        let want: Array2<H> = outputs.get(&format!("{module}.y_merged"));
        let (max, _) = ulp_stats(y.view(), want.view());
        assert!(
            max <= 1,
            "{case} {module}: merged forward {max} ulps from PEFT's"
        );
        checked += 1;
    }
    checked
}

#[test]
fn bf16_matches_peft_fixture() {
    assert_eq!(check_peft_fixture::<bf16>("bf16_r8"), 4);
}

#[test]
fn f16_matches_peft_fixture() {
    if !fixture_dir("f16_r8").exists() {
        panic!("tests/fixtures/peft/f16_r8 is missing");
    }
    assert_eq!(check_peft_fixture::<f16>("f16_r8"), 4);
}

#[test]
fn bf16_fixture_copy_matches_shared() {
    let compared = common::fixtures::compare_with_shared("peft/bf16_r8");
    assert!(compared == 0 || compared == 6, "{compared} files");
}

/// The f64 reference of a half layer, rounding as PEFT does: base output rounded to H, the
/// LoRA term added, rounded again. Inputs are the layer's own (already in H / f32).
struct HalfRef {
    w: Array2<f64>,
    a: Array2<f64>,
    b: Array2<f64>,
    bias: Option<Array1<f64>>,
    s: f64,
}

impl HalfRef {
    fn new<H: Half>(layer: &LoraLayer<H>) -> Self {
        Self {
            w: layer.base_weight().mapv(|v| v.into_f64()),
            a: layer.weight_a().mapv(f64::from),
            b: layer.weight_b().mapv(f64::from),
            bias: layer.bias().map(|b| b.mapv(|v| v.into_f64())),
            s: layer.scaling(),
        }
    }

    /// (Y, and per element the slack beyond 1 ulp of Y that f32 accumulation may add: one
    /// ulp of the rounded base output, whose rounding may tip the other way, and the f32
    /// error bound 1e-6·Σ|terms|).
    fn forward<H: Half>(&self, x: &Array2<f64>) -> (Array2<H>, Array2<f64>) {
        let mut base = x.dot(&self.w.t());
        let mut mag = x.mapv(f64::abs).dot(&self.w.t().mapv(f64::abs));
        if let Some(b) = &self.bias {
            base += b;
            mag += &b.mapv(f64::abs);
        }
        let h = x.dot(&self.a.t());
        let lora = h.dot(&self.b.t()) * self.s;
        mag += &(x
            .mapv(f64::abs)
            .dot(&self.a.t().mapv(f64::abs))
            .dot(&self.b.t().mapv(f64::abs))
            * self.s.abs());
        let y = ndarray::Zip::from(&base)
            .and(&lora)
            .map_collect(|&b, &l| H::from_f64_lossy(H::from_f64_lossy(b).into_f64() + l));
        let slack = ndarray::Zip::from(&base)
            .and(&mag)
            .map_collect(|&b, &m| ulp_at::<H>(b) + 1e-6 * m);
        (y, slack)
    }
}

/// The distance from |v| (rounded to H) to the next larger value of H.
fn ulp_at<H: Half>(v: f64) -> f64 {
    let h = H::from_f64_lossy(v.abs());
    let next = H::from_bits(h.bits() + 1);
    next.into_f64() - h.into_f64()
}

/// |got − want| ≤ 1 ulp of H at |want| + `slack`, element-wise.
fn assert_half_close<H: Half>(
    what: &str,
    got: ArrayView2<'_, H>,
    want: &Array2<H>,
    slack: &Array2<f64>,
) {
    assert_eq!(got.dim(), want.dim(), "{what}");
    for ((idx, &g), (&w, &e)) in got.indexed_iter().zip(want.iter().zip(slack.iter())) {
        let (g, w) = (g.into_f64(), w.into_f64());
        let tol = ulp_at::<H>(w) + e;
        assert!(
            (g - w).abs() <= tol,
            "{what} at {idx:?}: got {g}, want {w} (tol {tol})"
        );
    }
}

fn half_layer<H: Half>(d: usize, k: usize, r: usize, seed: u64) -> LoraLayer<H> {
    let mut g = rng(seed);
    let w: Array2<H> = random(&mut g, d, k);
    let a: Array2<f32> = random(&mut g, r, k);
    let b: Array2<f32> = random(&mut g, d, r);
    let bias: Array2<H> = random(&mut g, 1, d);
    let cfg = LoraConfig {
        rank: r,
        alpha: 3.0,
        ..Default::default()
    };
    LoraLayer::from_parts(w, a, b, cfg)
        .unwrap()
        .with_bias(bias.row(0).to_owned())
        .unwrap()
}

/// Every batch size around the skinny crossovers (f32's and the half types' own), odd
/// shapes, every input layout.
fn forward_against_reference<H: Half>() {
    for &(d, k, r) in &[
        (1, 1, 1),
        (7, 33, 3),
        (33, 7, 5),
        (257, 65, 8),
        (48, 1030, 16),
        // Rows of X 4 KiB apart once widened: a padded f32 copy.
        (20, 1024, 4),
        // Above the crossover, W widened in panels: two blocks of rows (4096 + 4), each in
        // two slices of columns (256 + 44).
        (4100, 300, 4),
    ] {
        let layer = half_layer::<H>(d, k, r, (d * 1000 + k) as u64);
        let reference = HalfRef::new(&layer);
        let crossover = ndlora::N_SKINNY_HALF;
        for n in [0, 1, 2, 7, 32, 33, crossover, crossover + 1, 70] {
            let x: Array2<H> = random(&mut rng(n as u64 + 7), n, k);
            let (want, slack) = reference.forward::<H>(&x.mapv(|v| v.into_f64()));
            for layout in LAYOUTS {
                let laid = Laid::new(&x, layout);
                let y = layer.forward(laid.view()).unwrap();
                let what = format!("{} forward d={d} k={k} r={r} n={n} {layout:?}", H::NAME);
                assert_half_close(&what, y.view(), &want, &slack);
                // forward_into an F-order output gives the same bits.
                let mut out = Array2::from_elem((n, d).f(), H::nan());
                layer.forward_into(laid.view(), out.view_mut()).unwrap();
                assert_eq!(out, y, "{what} forward_into");
            }
        }
    }
}

use ndarray::ShapeBuilder;

#[test]
fn bf16_forward_matches_reference() {
    forward_against_reference::<bf16>();
}

#[test]
fn f16_forward_matches_reference() {
    forward_against_reference::<f16>();
}

/// Merge: W ← H(W + s·B A) within 1 ulp of the f64 reference; merged forward consistent;
/// unmerge within the stated round-trip bound; merge_exact restores bit for bit.
fn merge_against_reference<H: Half>() {
    for &(d, k, r) in &[(1, 1, 1), (7, 33, 3), (257, 65, 8), (64, 4096 + 7, 16)] {
        let mut layer = half_layer::<H>(d, k, r, 99 + d as u64);
        let w0 = layer.base_weight().to_owned();
        let reference = HalfRef::new(&layer);
        let delta = reference.b.dot(&reference.a) * reference.s;
        let want = ndarray::Zip::from(&reference.w)
            .and(&delta)
            .map_collect(|&w, &dw| H::from_f64_lossy(w + dw));
        let effective = layer.effective_weight();
        layer.merge().unwrap();
        // Within 1 ulp of H, plus the f32 error of ΔW where W + ΔW cancels.
        let mag = reference.w.mapv(f64::abs)
            + reference.b.mapv(f64::abs).dot(&reference.a.mapv(f64::abs)) * reference.s.abs();
        let merged = layer.base_weight().to_owned();
        let slack = mag * 1e-6;
        assert_half_close(
            &format!("{} merge d={d} k={k}", H::NAME),
            merged.view(),
            &want,
            &slack,
        );
        let (_, equal) = ulp_stats(merged.view(), want.view());
        assert!(
            equal > 0.99,
            "{} merge d={d} k={k}: only {equal} bit-equal",
            H::NAME
        );
        assert_eq!(
            layer.base_weight(),
            effective,
            "effective_weight = merged W"
        );
        layer.unmerge().unwrap();
        // Round trip: each element moves by at most 1 ulp of H at max(|W|, |W + ΔW|) per
        // rounding, two roundings.
        let bound_ok = layer
            .base_weight()
            .iter()
            .zip(w0.iter())
            .zip(want.iter())
            .all(|((&u, &w), &m)| {
                let (u, w, m) = (u.into_f64(), w.into_f64(), m.into_f64());
                (u - w).abs() <= 2.0 * H::epsilon().into_f64() * (w.abs().max(m.abs()))
            });
        assert!(
            bound_ok,
            "{} unmerge d={d} k={k}: outside 2·ε·max(|W|, |W + ΔW|)",
            H::NAME
        );
        let before = layer.base_weight().to_owned();
        layer.merge_exact().unwrap();
        assert_eq!(layer.base_weight(), effective_of(&before, &layer));
        layer.unmerge().unwrap();
        assert_eq!(
            layer.base_weight(),
            before,
            "merge_exact + unmerge restores W"
        );
    }
}

/// The merge of `layer`'s factors onto `w`.
fn effective_of<H: Half>(w: &Array2<H>, layer: &LoraLayer<H>) -> Array2<H> {
    let mut l = LoraLayer::from_parts(
        w.clone(),
        layer.weight_a().to_owned(),
        layer.weight_b().to_owned(),
        layer.config().clone(),
    )
    .unwrap();
    l.merge().unwrap();
    l.base_weight().to_owned()
}

#[test]
fn bf16_merge_matches_reference() {
    merge_against_reference::<bf16>();
}

#[test]
fn f16_merge_matches_reference() {
    merge_against_reference::<f16>();
}

#[test]
fn merge_exact_restores_half_bits() {
    let mut layer = half_layer::<bf16>(33, 65, 4, 5);
    let w0 = layer.base_weight().to_owned();
    for _ in 0..10 {
        layer.merge_exact().unwrap();
        assert_ne!(layer.base_weight(), w0);
        layer.unmerge().unwrap();
    }
    assert_eq!(layer.base_weight(), w0);
}

#[test]
fn overflowing_merge_is_refused_unchanged() {
    // f16 max = 65504: W near it plus a positive ΔW overflows.
    let w = Array2::from_elem((4, 8), f16::from_f32(65000.0));
    let cfg = LoraConfig {
        rank: 1,
        alpha: 1.0,
        ..Default::default()
    };
    let mut layer = LoraLayer::from_parts(
        w.clone(),
        Array2::ones((1, 8)),
        Array2::from_elem((4, 1), 1000.0),
        cfg,
    )
    .unwrap();
    let err = layer.merge().unwrap_err();
    assert!(matches!(err, LoraError::WouldOverflow { .. }), "{err}");
    assert_eq!(layer.base_weight(), w);
    assert!(!layer.is_merged());
    // bf16 has f32's range: the same merge is fine there.
    let wb = w.mapv(|v| bf16::from_f32(v.to_f32()));
    let cfg = layer.config().clone();
    let mut lb = LoraLayer::from_parts(
        wb,
        Array2::ones((1, 8)),
        Array2::from_elem((4, 1), 1000.0),
        cfg,
    )
    .unwrap();
    lb.merge().unwrap();
    assert_eq!(lb.base_weight()[[0, 0]], bf16::from_f32(66000.0));
}

#[test]
fn non_finite_half_inputs_are_refused() {
    let mut w = Array2::from_elem((3, 4), bf16::ONE);
    w[[1, 2]] = bf16::NAN;
    let cfg = LoraConfig {
        rank: 1,
        ..Default::default()
    };
    let err = LoraLayer::new(w, cfg.clone()).unwrap_err();
    assert!(
        matches!(err, LoraError::NonFinite { index: (1, 2), .. }),
        "{err}"
    );
    let w = Array2::from_elem((3, 4), f16::ONE);
    let mut a = Array2::<f32>::ones((1, 4));
    a[[0, 3]] = f32::INFINITY;
    let err = LoraLayer::from_parts(w, a, Array2::ones((3, 1)), cfg).unwrap_err();
    assert!(
        matches!(
            err,
            LoraError::NonFinite {
                what: "weight_a",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn half_layer_memory_is_half_of_f32() {
    // A 4096² bf16 layer holds 32 MiB of W (its buffer, not the process's RSS).
    let d = 4096;
    let layer = LoraLayer::new(
        Array2::<bf16>::zeros((d, d)),
        LoraConfig {
            rank: 16,
            ..Default::default()
        },
    )
    .unwrap();
    let w = layer.base_weight();
    assert_eq!(std::mem::size_of_val(w.as_slice().unwrap()), 32 << 20);
    let factors = layer.weight_a().len() + layer.weight_b().len();
    assert_eq!(factors * std::mem::size_of::<f32>(), 2 * 16 * 4096 * 4);
}

#[test]
fn serde_round_trips_half_layers_bit_for_bit() {
    let mut layer = half_layer::<f16>(7, 9, 2, 3);
    layer.merge_exact().unwrap();
    let json = serde_json::to_string(&layer).unwrap();
    let back: LoraLayer<f16> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, layer);
    // A bf16 document does not load as f16's NaN-free check would pass on garbage: a NaN
    // bit pattern in W is refused.
    let nan_bits = f16::NAN.to_bits();
    let bad = json.replacen(
        &format!("\"data\":[{}", layer.base_weight()[[0, 0]].to_bits()),
        &format!("\"data\":[{nan_bits}"),
        1,
    );
    assert_ne!(bad, json);
    assert!(serde_json::from_str::<LoraLayer<f16>>(&bad).is_err());
}

#[test]
fn half_backward_gives_f32_gradients_of_the_widened_layer() {
    let layer = half_layer::<bf16>(9, 13, 3, 8);
    let x: Array2<bf16> = random(&mut rng(1), 5, 13);
    let g: Array2<bf16> = random(&mut rng(2), 5, 9);
    let grads = layer.backward(x.view(), g.view()).unwrap();
    // The same layer in f32 (W, X, G widened exactly) has the same gradients.
    let wide = LoraLayer::<f32>::from_parts(
        layer.base_weight().mapv(|v| v.to_f32()),
        layer.weight_a().to_owned(),
        layer.weight_b().to_owned(),
        layer.config().clone(),
    )
    .unwrap();
    let want = wide
        .backward(x.mapv(|v| v.to_f32()).view(), g.mapv(|v| v.to_f32()).view())
        .unwrap();
    assert_eq!(grads, want);
}

#[test]
fn half_model_matches_its_layers() {
    let layer1 = half_layer::<bf16>(33, 17, 3, 11);
    let layer2 = half_layer::<bf16>(33, 17, 5, 12);
    let w = layer1.base_weight().to_owned();
    let mut model = LoraModel::new(w.clone()).unwrap();
    let id1 = model
        .add_adapter_from_parts(
            "one",
            layer1.weight_a().to_owned(),
            layer1.weight_b().to_owned(),
            layer1.config().clone(),
        )
        .unwrap();
    let id2 = model
        .add_adapter_from_parts(
            "two",
            layer2.weight_a().to_owned(),
            layer2.weight_b().to_owned(),
            layer2.config().clone(),
        )
        .unwrap();
    // Layers without bias, on the model's W.
    let as_layer = |l: &LoraLayer<bf16>| {
        LoraLayer::from_parts(
            w.clone(),
            l.weight_a().to_owned(),
            l.weight_b().to_owned(),
            l.config().clone(),
        )
        .unwrap()
    };
    let (l1, l2) = (as_layer(&layer1), as_layer(&layer2));
    for n in [1, 5, 40] {
        let x: Array2<bf16> = random(&mut rng(n), n as usize, 17);
        let rows: Vec<Option<usize>> = (0..n as usize)
            .map(|i| [Some(id1), Some(id2), None][i % 3])
            .collect();
        let y = model.forward_mixed(x.view(), &rows).unwrap();
        let (y1, y2) = (l1.forward(x.view()).unwrap(), l2.forward(x.view()).unwrap());
        for (i, row) in y.axis_iter(Axis(0)).enumerate() {
            let want = match rows[i] {
                Some(id) if id == id1 => y1.row(i).to_owned(),
                Some(_) => y2.row(i).to_owned(),
                None => {
                    let mut base = l1.clone();
                    base.weight_b_mut().unwrap().fill(0.0);
                    base.forward(x.view()).unwrap().row(i).to_owned()
                }
            };
            let (max, _) = ulp_stats(row.insert_axis(Axis(0)), want.view().insert_axis(Axis(0)));
            assert!(max <= 1, "mixed row {i} n={n}: {max} ulps");
        }
        model.set_active(&["one"]).unwrap();
        assert_eq!(
            model.forward(x.view()).unwrap(),
            y1,
            "one active adapter n={n}"
        );
    }
    model.merge("one").unwrap();
    let mut merged = l1.clone();
    merged.merge().unwrap();
    assert_eq!(model.base_weight(), merged.base_weight());
}

/// A fresh, empty directory under the system temp dir.

#[test]
fn half_layers_save_f32_factors_and_round_trip() {
    let layer = half_layer::<bf16>(12, 10, 3, 21);
    let adapter = PeftAdapter::from_layers([("layers.0.q_proj", &layer)]).unwrap();
    let dir = temp_dir("save");
    adapter.save(&dir).unwrap();
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for name in st.names() {
        assert_eq!(
            st.tensor(name).unwrap().dtype(),
            Dtype::F32,
            "{name}: PEFT writes F32"
        );
    }
    let back = PeftAdapter::<bf16>::load(&dir).unwrap();
    let bias = layer.bias().map(|b| b.to_owned());
    let again = back
        .to_layer("layers.0.q_proj", layer.base_weight().to_owned(), bias)
        .unwrap();
    assert_eq!(again.weight_a(), layer.weight_a());
    assert_eq!(again.weight_b(), layer.weight_b());
    assert_eq!(again.scaling().to_bits(), layer.scaling().to_bits());
    let x: Array2<bf16> = random(&mut rng(3), 4, 10);
    assert_eq!(
        again.forward(x.view()).unwrap(),
        layer.forward(x.view()).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A safetensors file with one module `fc`: A (2×6) and B (5×2) as given.
fn adapter_file(a: (Dtype, Vec<u8>), b: (Dtype, Vec<u8>)) -> Vec<u8> {
    let views = [
        (
            "base_model.model.fc.lora_A.weight",
            safetensors::tensor::TensorView::new(a.0, vec![2, 6], &a.1).unwrap(),
        ),
        (
            "base_model.model.fc.lora_B.weight",
            safetensors::tensor::TensorView::new(b.0, vec![5, 2], &b.1).unwrap(),
        ),
    ];
    safetensors::serialize(views, None).unwrap()
}

const FC_CONFIG: &str =
    r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc"]}"#;

/// The dtype and bytes of every tensor of a safetensors file, by name.
fn tensors_of(bytes: &[u8]) -> std::collections::BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| (name, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect()
}

#[test]
fn half_adapter_tensors_load_exactly() {
    // An adapter file with BF16 factors: loaded as PeftAdapter<bf16> they stay BF16 and
    // read as the exact widening of each value (as PEFT widens them to its f32 LoRA
    // weights); loaded as PeftAdapter<f16> or <f32> they are converted to f32, exactly.
    let mut g = rng(4);
    let a: Array2<bf16> = random(&mut g, 2, 6);
    let b: Array2<bf16> = random(&mut g, 5, 2);
    let le = |m: &Array2<bf16>| m.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let bytes = adapter_file((Dtype::BF16, le(&a)), (Dtype::BF16, le(&b)));
    let adapter = PeftAdapter::<bf16>::from_bytes(FC_CONFIG, &bytes).unwrap();
    assert_eq!(adapter.stored_dtypes("fc").unwrap(), ("BF16", "BF16"));
    let fresh = adapter.clone();
    let (fa, fb) = adapter.factors("fc").unwrap();
    assert_eq!(fa, a.mapv(|v| v.to_f32()));
    assert_eq!(fb, b.mapv(|v| v.to_f32()));
    // Borrowing the widened factors changes nothing an adapter compares or saves.
    assert_eq!(adapter, fresh);
    assert_eq!(adapter.stored_dtypes("fc").unwrap(), ("BF16", "BF16"));
    let f16_adapter = PeftAdapter::<f16>::from_bytes(FC_CONFIG, &bytes).unwrap();
    assert_eq!(f16_adapter.stored_dtypes("fc").unwrap(), ("F32", "F32"));
    assert_eq!(f16_adapter.factors("fc").unwrap().0, a.mapv(|v| v.to_f32()));
    let f32_adapter = PeftAdapter::<f32>::from_bytes(FC_CONFIG, &bytes).unwrap();
    assert_eq!(f32_adapter.stored_dtypes("fc").unwrap(), ("F32", "F32"));
    assert_eq!(f32_adapter.factors("fc").unwrap().1, b.mapv(|v| v.to_f32()));

    // The layer gets the exact f32 factors, whether or not they were borrowed before.
    let base = Array2::from_elem((5, 6), bf16::from_f32(0.5));
    for adapter in [&fresh, &adapter] {
        let layer = adapter.to_layer("fc", base.clone(), None).unwrap();
        assert_eq!(layer.weight_a(), a.mapv(|v| v.to_f32()));
        assert_eq!(layer.weight_b(), b.mapv(|v| v.to_f32()));
    }
}

#[test]
fn half_adapter_saves_its_own_dtype_back() {
    // What a half adapter loaded in its own dtype saves is the file it read: same dtypes,
    // same bytes per tensor (subnormals and signed zeros included).
    let mut g = rng(5);
    let a: Array2<f16> = random(&mut g, 2, 6);
    let mut b: Array2<f16> = random(&mut g, 5, 2);
    b[[0, 0]] = f16::from_bits(1);
    b[[1, 1]] = f16::NEG_ZERO;
    let le = |m: &Array2<f16>| m.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let bytes = adapter_file((Dtype::F16, le(&a)), (Dtype::F16, le(&b)));
    let adapter = PeftAdapter::<f16>::from_bytes(FC_CONFIG, &bytes).unwrap();
    assert_eq!(adapter.stored_dtypes("fc").unwrap(), ("F16", "F16"));
    let dir = temp_dir("own-dtype");
    adapter.save(&dir).unwrap();
    let saved = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(tensors_of(&saved), tensors_of(&bytes));
    let back = PeftAdapter::<f16>::load(&dir).unwrap();
    assert_eq!(back, adapter);

    // Mixed: an F16 A and an F32 B in a bf16 adapter are both f32; saved as F32.
    let b32: Vec<u8> = b.iter().flat_map(|v| v.to_f32().to_le_bytes()).collect();
    let mixed = adapter_file((Dtype::F16, le(&a)), (Dtype::F32, b32.clone()));
    let adapter = PeftAdapter::<bf16>::from_bytes(FC_CONFIG, &mixed).unwrap();
    assert_eq!(adapter.stored_dtypes("fc").unwrap(), ("F32", "F32"));
    adapter.save(&dir).unwrap();
    let saved = tensors_of(&std::fs::read(dir.join("adapter_model.safetensors")).unwrap());
    let a32: Vec<u8> = a.iter().flat_map(|v| v.to_f32().to_le_bytes()).collect();
    assert_eq!(
        saved["base_model.model.fc.lora_A.weight"],
        (Dtype::F32, vec![2, 6], a32)
    );
    assert_eq!(
        saved["base_model.model.fc.lora_B.weight"],
        (Dtype::F32, vec![5, 2], b32.clone())
    );
    // One BF16 tensor in a bf16 adapter stays BF16 beside an F32 one.
    let a16: Vec<u8> = a
        .iter()
        .flat_map(|v| bf16::from_f32(v.to_f32()).to_le_bytes())
        .collect();
    let bytes = adapter_file((Dtype::BF16, a16), (Dtype::F32, b32));
    let adapter = PeftAdapter::<bf16>::from_bytes(FC_CONFIG, &bytes).unwrap();
    assert_eq!(adapter.stored_dtypes("fc").unwrap(), ("BF16", "F32"));
    adapter.save(&dir).unwrap();
    let saved = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(tensors_of(&saved), tensors_of(&bytes));
    std::fs::remove_dir_all(&dir).unwrap();
}
