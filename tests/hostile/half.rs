//! What only the half types (`bf16`, `f16`) can meet: results beyond f16's range (65504) in
//! merge, unmerge and forward; subnormals; NaN/∞ bit patterns in serde documents (a half
//! element is serialised as its bits, so a document can hold any of them); and PEFT files
//! whose tensors are BF16/F16, or F32 with values no half type holds.

use half::{bf16, f16};
use ndarray::{Array1, Array2};
use ndlora::peft::PeftAdapter;
use ndlora::{LoraConfig, LoraError, LoraLayer, LoraModel};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::{Tally, HALF_F16_RANGE, HALF_PEFT, HALF_SERDE, HALF_SUBNORMALS};
use crate::common::{bits, Half, State};

/// Rank 1, α = 1: s = 1, so ΔW = B A exactly (in f32).
fn one() -> LoraConfig {
    LoraConfig {
        rank: 1,
        alpha: 1.0,
        ..Default::default()
    }
}

/// A d×k layer with every W element `w` and ΔW = `delta` everywhere (A = 1, B = `delta`).
fn flat<H: Half>(d: usize, k: usize, w: f32, delta: f32) -> LoraLayer<H> {
    LoraLayer::from_parts(
        Array2::from_elem((d, k), H::from_factor(w)),
        Array2::ones((1, k)),
        Array2::from_elem((d, 1), delta),
        one(),
    )
    .unwrap()
}

/// A merged copy of `layer`, as a document written while merged would load (W is taken as
/// the merged weight, nothing is added).
fn as_merged<H: Half>(layer: &LoraLayer<H>) -> LoraLayer<H> {
    let mut doc = serde_json::to_value(layer).unwrap();
    doc["merged"] = json!(true);
    serde_json::from_value(doc).unwrap()
}

fn f16_of(v: f32) -> f16 {
    f16::from_f32(v)
}

// ---------------------------------------------------------------------------------------------
// f16's range: 65504 is its largest finite value, and sums from 65520 up round to ∞.

#[test]
fn f16_range() {
    let mut t = Tally::default();
    let over =
        |op: &'static str| move |e: &LoraError| *e == LoraError::WouldOverflow { operation: op };

    let l = flat::<f16>(4, 8, 65000.0, 1000.0);
    t.unchanged("merge beyond 65504", &l, |l| l.merge(), over("merge"));
    t.unchanged(
        "merge_exact beyond 65504",
        &l,
        |l| l.merge_exact(),
        over("merge"),
    );
    // 65504 + 16 = 65520 is the midpoint to the next binade: rounds (to even) to ∞.
    let edge = flat::<f16>(3, 5, 65504.0, 16.0);
    t.unchanged("merge rounds to ∞", &edge, |l| l.merge(), over("merge"));
    // 65504 + 15 = 65519 rounds back to 65504: finite, so accepted (W unchanged bit for bit).
    t.cases += 1;
    let mut below = flat::<f16>(3, 5, 65504.0, 15.0);
    below.merge().unwrap();
    assert!(below.base_weight().iter().all(|&v| v == f16::MAX));
    // ΔW beyond f16's range (in f32) with a sum inside it: accepted both ways.
    t.cases += 1;
    let mut wide = flat::<f16>(3, 5, -64992.0, 65992.0);
    wide.merge().unwrap();
    assert!(wide.base_weight().iter().all(|&v| v == f16_of(1000.0)));
    t.cases += 1;
    wide.unmerge().unwrap();
    assert!(wide.base_weight().iter().all(|&v| v == f16_of(-64992.0)));
    // Unmerge leaving the range: W = −65000 merged, W − ΔW = −66000.
    let merged = as_merged(&flat::<f16>(4, 8, -65000.0, 1000.0));
    t.unchanged(
        "unmerge beyond −65504",
        &merged,
        |l| l.unmerge(),
        over("unmerge"),
    );

    // The same through a LoraModel: fine alone, beyond the range together.
    let mut m = LoraModel::new(Array2::from_elem((4, 8), f16_of(65000.0))).unwrap();
    for name in ["p", "q"] {
        m.add_adapter_from_parts(
            name,
            Array2::ones((1, 8)),
            Array2::from_elem((4, 1), 300.0),
            one(),
        )
        .unwrap();
    }
    m.set_active(&["p", "q"]).unwrap();
    t.unchanged(
        "model merge_active beyond 65504",
        &m,
        |m| m.merge_active(),
        over("merge"),
    );
    let mut p = m.clone();
    p.merge("p").unwrap();
    t.unchanged(
        "model merge after a merge beyond 65504",
        &p,
        |m| m.merge("q"),
        over("merge"),
    );

    // Forward is not refused: an output beyond the range is ±∞ (as PyTorch gives), only in
    // the entries that overflow, and the layer is unchanged. Row 0: X Wᵀ = 255 + 7·255²
    // overflows.
    // Row 1: X Wᵀ = 65504 and the LoRA term +20 make 65524 → ∞. Row 2: X Wᵀ overflows and the
    // LoRA term would bring it back, but PEFT rounds the base output to f16 first: ∞.
    // Row 3: an ordinary row.
    // Every input row is x = (1, 255, …, 255), so Σx = 1786 and s·(x Aᵀ) = 1786 (A = 1).
    let mut w = Array2::from_elem((4, 8), f16::ZERO);
    w.row_mut(0).fill(f16_of(255.0));
    w[[1, 0]] = f16::MAX;
    w.row_mut(2).fill(f16_of(-255.0));
    w[[3, 7]] = f16_of(0.5);
    let mut b = Array2::zeros((4, 1));
    b[[1, 0]] = 20.0 / 1786.0; // 65504 + 20 ≥ 65520
    b[[2, 0]] = 255.0; // 1786·255 = −(X Wᵀ)₂ exactly
    let l = LoraLayer::from_parts(w, Array2::ones((1, 8)), b, one()).unwrap();
    let before = l.state();
    for rows in [1, 5, 40] {
        t.cases += 1;
        let mut x = Array2::from_elem((rows, 8), f16_of(255.0));
        x.column_mut(0).fill(f16::ONE);
        let y = l.forward(x.view()).unwrap();
        let mut y_into = Array2::from_elem((rows, 4), f16::NAN);
        l.forward_into(x.view(), y_into.view_mut()).unwrap();
        assert_eq!(
            bits(y.view()),
            bits(y_into.view()),
            "forward_into, n = {rows}"
        );
        for i in 0..rows {
            assert_eq!(
                y[[i, 0]],
                f16::INFINITY,
                "row {i} of n = {rows}: {:?}",
                y.row(i)
            );
            assert_eq!(
                y[[i, 1]],
                f16::INFINITY,
                "row {i} of n = {rows}: {:?}",
                y.row(i)
            );
            assert_eq!(
                y[[i, 2]],
                f16::NEG_INFINITY,
                "row {i} of n = {rows}: {:?}",
                y.row(i)
            );
            assert_eq!(
                y[[i, 3]],
                f16_of(127.5),
                "row {i} of n = {rows}: {:?}",
                y.row(i)
            );
        }
    }
    assert_eq!(l.state(), before, "forward changed the layer");

    // Gradients are f32: inputs and output gradients at f16's limit give finite gradients
    // (in f16 their products would overflow), and the step they give is accepted.
    t.cases += 1;
    let l = flat::<f16>(3, 4, 1.0, 0.5);
    let x = Array2::from_elem((2, 4), f16::MAX);
    let g = Array2::from_elem((2, 3), f16::MAX);
    let grads = l.backward(x.view(), g.view()).unwrap();
    assert!(grads
        .grad_a
        .iter()
        .chain(grads.grad_b.iter())
        .all(|v| v.is_finite()));
    let mut stepped = l.clone();
    stepped.sgd_step(&grads, 1e-12).unwrap();
    assert_ne!(stepped, l);

    println!("f16 range: {} cases", t.cases);
    assert_eq!(t.cases, HALF_F16_RANGE);
}

// ---------------------------------------------------------------------------------------------
// Subnormals: kept, merged and multiplied exactly, never flushed to zero.

fn subnormals<H: Half>() -> usize {
    let mut t = Tally::default();
    let sub = H::subnormals();
    let mut w = Array2::from_elem((3, 9), H::zero());
    for (j, &v) in sub.iter().enumerate() {
        w[[j, 2 * j + 1]] = v;
    }

    // Construction and serde keep their bits.
    t.cases += 1;
    let l = LoraLayer::from_parts(
        w.clone(),
        Array2::ones((1, 9)),
        Array2::zeros((3, 1)),
        one(),
    )
    .unwrap();
    assert_eq!(bits(l.base_weight()), bits(w.view()));
    t.cases += 1;
    let back: LoraLayer<H> = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
    assert_eq!(back.state(), l.state());

    // Merge and unmerge with ΔW = 0 leave every subnormal as it was.
    t.cases += 1;
    let mut m = l.clone();
    m.merge().unwrap();
    assert_eq!(bits(m.base_weight()), bits(w.view()), "merge with B = 0");
    m.unmerge().unwrap();
    assert_eq!(bits(m.base_weight()), bits(w.view()), "unmerge with B = 0");

    // A ΔW of 3 smallest subnormals lands on exactly that subnormal; unmerge returns to 0.
    t.cases += 1;
    let tiny = sub[0].to_factor();
    let mut m = LoraLayer::from_parts(
        Array2::from_elem((2, 3), H::zero()),
        Array2::ones((1, 3)),
        Array2::from_elem((2, 1), 3.0 * tiny),
        one(),
    )
    .unwrap();
    m.merge().unwrap();
    assert!(
        m.base_weight().iter().all(|v| v.bits() == 3),
        "{:?}",
        m.base_weight()
    );
    m.unmerge().unwrap();
    assert!(m.base_weight().iter().all(|v| v.to_factor() == 0.0));

    // Forward: a subnormal weight times 1, and 1 times subnormal inputs, are those
    // subnormals, on the skinny and the panel path.
    for n in [1, 3, 64] {
        t.cases += 1;
        let x = Array2::from_elem((n, 9), H::one());
        let y = l.forward(x.view()).unwrap();
        for i in 0..n {
            for (j, want) in sub.iter().enumerate() {
                assert_eq!(y[[i, j]].bits(), want.bits(), "n = {n}: y[{i}, {j}]");
            }
        }
        let ones = LoraLayer::from_parts(
            Array2::from_elem((2, 9), H::one()),
            Array2::ones((1, 9)),
            Array2::zeros((2, 1)),
            one(),
        )
        .unwrap();
        let x = Array2::from_elem((n, 9), sub[0]);
        let y = ones.forward(x.view()).unwrap();
        assert!(y.iter().all(|v| v.bits() == 9), "n = {n}: {y:?}");
    }
    t.cases
}

#[test]
fn subnormals_bf16() {
    assert_eq!(subnormals::<bf16>(), HALF_SUBNORMALS);
}

#[test]
fn subnormals_f16() {
    assert_eq!(subnormals::<f16>(), HALF_SUBNORMALS);
}

// ---------------------------------------------------------------------------------------------
// Serde documents: a half element is written as its bits (a u16), so a document can carry
// NaN and ∞ patterns JSON numbers cannot.

/// Asserts that `doc` does not load as a `LoraLayer<H>`, with a message containing `needle`.
#[track_caller]
fn refused<H: Half>(t: &mut Tally, name: &str, doc: &Value, needle: &str) {
    t.cases += 1;
    match serde_json::from_str::<LoraLayer<H>>(&doc.to_string()) {
        Ok(_) => panic!("{} {name}: accepted", H::NAME),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "{} {name}: {msg:?} lacks {needle:?}",
                H::NAME
            );
        }
    }
}

fn serde_bits<H: Half>() -> usize {
    let mut t = Tally::default();
    let mut l = flat::<H>(3, 4, 0.75, 0.125)
        .with_bias(Array1::from_elem(3, H::one()))
        .unwrap();
    let doc = serde_json::to_value(&l).unwrap();
    l.merge_exact().unwrap();
    let merged_doc = serde_json::to_value(&l).unwrap();
    assert!(merged_doc["unmerge_weight"].is_object());
    for pattern in H::nonfinite_bits() {
        let with = |doc: &Value, field: &str, at: usize| {
            let mut d = doc.clone();
            d[field]["data"][at] = json!(pattern);
            d
        };
        let name = format!("{pattern:#06x}");
        refused::<H>(
            &mut t,
            &format!("{name} in W"),
            &with(&doc, "base_weight", 5),
            "non-finite value in base_weight at index (1, 1)",
        );
        refused::<H>(
            &mut t,
            &format!("{name} in the bias"),
            &with(&doc, "bias", 2),
            "non-finite value in bias at index (0, 2)",
        );
        refused::<H>(
            &mut t,
            &format!("{name} in the kept unmerge weight"),
            &with(&merged_doc, "unmerge_weight", 11),
            "non-finite value in unmerge_weight at index (2, 3)",
        );
    }
    let with = |v: Value| {
        let mut d = doc.clone();
        d["base_weight"]["data"][0] = v;
        d
    };
    refused::<H>(&mut t, "65536 in W", &with(json!(65536)), "invalid value");
    refused::<H>(&mut t, "−1 in W", &with(json!(-1)), "invalid value");
    refused::<H>(&mut t, "0.5 in W", &with(json!(0.5)), "invalid type");
    // −0 and the largest finite value are values like any other.
    for (what, pattern) in [("−0", 0x8000), ("MAX", H::max_value().bits())] {
        t.cases += 1;
        let d = with(json!(pattern));
        let back: LoraLayer<H> = serde_json::from_value(d.clone()).unwrap();
        assert_eq!(back.base_weight()[[0, 0]].bits(), pattern, "{what}");
        assert_eq!(serde_json::to_value(&back).unwrap(), d, "{what}");
    }
    t.cases
}

#[test]
fn serde_bits_bf16() {
    assert_eq!(serde_bits::<bf16>(), HALF_SERDE);
}

#[test]
fn serde_bits_f16() {
    assert_eq!(serde_bits::<f16>(), HALF_SERDE);
}

// ---------------------------------------------------------------------------------------------
// PEFT files into half adapters.

const KA: &str = "base_model.model.m.proj.lora_A.weight";
const KB: &str = "base_model.model.m.proj.lora_B.weight";

fn peft_config() -> String {
    json!({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["proj"],
        "lora_dropout": 0.0
    })
    .to_string()
}

/// A safetensors file with A (2×4) and B (3×2) of the given dtypes and little-endian bytes.
fn file(a: (Dtype, Vec<u8>), b: (Dtype, Vec<u8>)) -> Vec<u8> {
    let views = vec![
        (
            KA.to_owned(),
            TensorView::new(a.0, vec![2, 4], &a.1).unwrap(),
        ),
        (
            KB.to_owned(),
            TensorView::new(b.0, vec![3, 2], &b.1).unwrap(),
        ),
    ];
    safetensors::serialize(views, None).unwrap()
}

/// `n` half values from bit patterns, as little-endian bytes.
fn half_bytes(patterns: &[u16]) -> Vec<u8> {
    patterns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn peft_half<H: Half>() -> usize {
    let mut t = Tally::default();
    let cfg = peft_config();
    let in_module = |what: &'static str| {
        move |e: &LoraError| {
            matches!(e, LoraError::InModule { module, source } if module == "m.proj"
                && matches!(**source, LoraError::NonFinite { what: w, .. } if w == what))
        }
    };

    // BF16 and F16 tensors load into a half adapter as their exact f32 values (subnormals
    // included), whichever half type the adapter is for.
    for dtype in [Dtype::BF16, Dtype::F16] {
        t.cases += 1;
        let widen = |p: u16| match dtype {
            Dtype::BF16 => bf16::from_bits(p).to_f32(),
            _ => f16::from_bits(p).to_f32(),
        };
        let a_bits: Vec<u16> = (0..8).map(|i| 0x3c00 + 37 * i).collect();
        let mut b_bits: Vec<u16> = (0..6).map(|i| 0xb800 + 101 * i).collect();
        b_bits[5] = 1; // the smallest subnormal
        let bytes = file((dtype, half_bytes(&a_bits)), (dtype, half_bytes(&b_bits)));
        let adapter = PeftAdapter::<H>::from_bytes(&cfg, &bytes).unwrap();
        let f = adapter.factors("m.proj").unwrap();
        let want_a: Vec<f32> = a_bits.iter().map(|&p| widen(p)).collect();
        let want_b: Vec<f32> = b_bits.iter().map(|&p| widen(p)).collect();
        let got =
            |m: ndarray::ArrayView2<'_, f32>| m.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            got(f.0),
            want_a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{dtype:?} A"
        );
        assert_eq!(
            got(f.1),
            want_b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{dtype:?} B"
        );
    }

    // NaN and ∞ patterns in BF16 / F16 tensors: refused, naming the tensor.
    let ok_a = |dtype| (dtype, half_bytes(&[0x3c00; 8]));
    let ok_b = |dtype| (dtype, half_bytes(&[0x3c00; 6]));
    for (dtype, exponent) in [(Dtype::BF16, 0x7f80u16), (Dtype::F16, 0x7c00)] {
        for pattern in [exponent, 0x8000 | exponent, exponent | 1, 0xffff] {
            let mut a = vec![0x3c00u16; 8];
            a[6] = pattern;
            t.err(
                &format!("{dtype:?} {pattern:#06x} in A"),
                PeftAdapter::<H>::from_bytes(&cfg, &file((dtype, half_bytes(&a)), ok_b(dtype))),
                in_module("lora_A"),
            );
            let mut b = vec![0x3c00u16; 6];
            b[1] = pattern;
            t.err(
                &format!("{dtype:?} {pattern:#06x} in B"),
                PeftAdapter::<H>::from_bytes(&cfg, &file(ok_a(dtype), (dtype, half_bytes(&b)))),
                in_module("lora_B"),
            );
        }
    }

    // F32 tensors keep their f32 values exactly: more precision than H, beyond f16's range,
    // below its subnormals.
    t.cases += 1;
    let a = [
        1.0 + f32::EPSILON,
        -3.0e-30,
        1.0e6,
        0.1,
        -0.2,
        7.0,
        f32::MIN_POSITIVE,
        1.0,
    ];
    let b = [1.0e6, 1.0 / 3.0, -1.0e-20, 65520.0, 2.0, -1.5];
    let bytes = file((Dtype::F32, f32_bytes(&a)), (Dtype::F32, f32_bytes(&b)));
    let adapter = PeftAdapter::<H>::from_bytes(&cfg, &bytes).unwrap();
    let f = adapter.factors("m.proj").unwrap();
    assert_eq!(f.0.iter().copied().collect::<Vec<f32>>(), a);
    assert_eq!(f.1.iter().copied().collect::<Vec<f32>>(), b);
    // ... and the layer made from them too, on a base of H.
    t.cases += 1;
    let base = Array2::from_elem((3, 4), H::one());
    let layer = adapter.to_layer("m.proj", base.clone(), None).unwrap();
    assert_eq!(layer.weight_a().iter().copied().collect::<Vec<f32>>(), a);
    assert_eq!(layer.weight_b().iter().copied().collect::<Vec<f32>>(), b);
    // Merging that adapter: ΔW ≈ 2·1e12 is beyond f16 and finite in bf16.
    let mut merged = layer.clone();
    if H::NAME == "f16" {
        t.unchanged(
            "merge of an F32 adapter beyond f16",
            &layer,
            |l| l.merge(),
            |e| *e == LoraError::WouldOverflow { operation: "merge" },
        );
    } else {
        t.cases += 1;
        merged.merge().unwrap();
        assert!(merged.base_weight().iter().all(|v| v.is_finite()));
    }
    // An F64 value beyond f32 is refused for a half adapter as for an f32 one.
    let big: Vec<u8> = (0..8).flat_map(|_| 1e300_f64.to_le_bytes()).collect();
    t.err(
        "F64 1e300 in A",
        PeftAdapter::<H>::from_bytes(&cfg, &file((Dtype::F64, big), ok_b(Dtype::BF16))),
        in_module("lora_A"),
    );

    // to_layer with a hostile half base or bias.
    for pattern in H::nonfinite_bits() {
        let mut w = base.clone();
        w[[2, 1]] = H::from_bits(pattern);
        t.err(
            &format!("to_layer {pattern:#06x} in the base"),
            adapter.to_layer("m.proj", w, None),
            in_module("base_weight"),
        );
        t.err(
            &format!("to_layer {pattern:#06x} in the bias"),
            adapter.to_layer(
                "m.proj",
                base.clone(),
                Some(Array1::from_elem(3, H::from_bits(pattern))),
            ),
            in_module("bias"),
        );
    }
    t.cases
}

#[test]
fn peft_half_bf16() {
    assert_eq!(peft_half::<bf16>(), HALF_PEFT);
}

#[test]
fn peft_half_f16() {
    assert_eq!(peft_half::<f16>(), HALF_PEFT);
}
