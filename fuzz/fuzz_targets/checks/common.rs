// Helpers shared by the fuzz checks. `include!`d (with the check files) into a module by the
// fuzz targets and by the main crate's `tests/fuzz_replay.rs`, so no inner attributes here.

use ndarray::{Array2, ArrayView2};
use ndlora::{LoraError, LoraFloat, LoraLayer, MicroLora};

/// Largest magnitude for which the checks demand finite results: a bound M on the exact
/// result's size below this means the computed result cannot overflow either. For an
/// element type whose range is smaller (f16: 65504) the limit is a quarter of its largest
/// value ([`bounded_in`]).
const FINITE_LIMIT: f64 = 1e30;

/// Bitwise equality of two float arrays (`==` is IEEE, and NaN ≠ NaN).
fn same_bits<A: LoraFloat>(a: ArrayView2<'_, A>, b: ArrayView2<'_, A>) -> bool {
    a.dim() == b.dim()
        && a.iter()
            .zip(b.iter())
            .all(|(x, y)| x.into_f64().to_bits() == y.into_f64().to_bits())
}

/// Whether a magnitude bound (possibly ∞ or NaN in f64) is small enough to make claims.
fn bounded(m: f64) -> bool {
    m < FINITE_LIMIT
}

/// The same for a result stored in `A`: also well inside `A`'s range.
fn bounded_in<A: LoraFloat>(m: f64) -> bool {
    bounded(m) && m < A::max_value().into_f64() / 4.0
}

/// A deterministic n×k input in [-4, 4) from `seed` bytes (cycled; zeros when empty).
fn input_from<A: LoraFloat>(n: usize, k: usize, seed: &[u8]) -> Array2<A> {
    let mut i = 0_usize;
    Array2::from_shape_simple_fn((n, k), || {
        let b = if seed.is_empty() {
            0
        } else {
            seed[i % seed.len()]
        };
        i += 1;
        A::from_f64_lossy(f64::from(b as i8) / 32.0)
    })
}

fn abs_f64<A: LoraFloat>(m: ArrayView2<'_, A>) -> Array2<f64> {
    m.map(|v| v.into_f64().abs())
}

/// Per element of Y = X Wᵀ + b + s·(X Aᵀ) Bᵀ: M = |X| (|W| + 2|s|·|B||A|)ᵀ + |b|, computed in
/// f64 from the layer's current state (merged or not; the factor 2 covers W ± s·B A). Any
/// summation order of the products gives an error below γₙ·M with n the number of terms.
/// Rows whose intermediate X Aᵀ may overflow get M = ∞ (no claim).
fn layer_magnitude<A: LoraFloat>(layer: &LoraLayer<A>, x: ArrayView2<'_, A>) -> Array2<f64> {
    let s = A::Factor::from_f64_lossy(layer.scaling()).into_f64().abs();
    let ba = abs_f64(layer.weight_b()).dot(&abs_f64(layer.weight_a()));
    let w = abs_f64(layer.base_weight()) + ba * (2.0 * s);
    let mut m = abs_f64(x).dot(&w.t());
    if let Some(b) = layer.bias() {
        let b = b.map(|v| v.into_f64().abs());
        m += &b;
    }
    // The LoRA branch goes through the n×r intermediate X Aᵀ: where that can overflow, the
    // row may legitimately come out NaN (∞·0) even though the exact result is small.
    // Likewise (X Aᵀ) Bᵀ before the scaling s (a gemm may scale last).
    let xa = abs_f64(x).dot(&abs_f64(layer.weight_a()).t());
    let xab = xa.dot(&abs_f64(layer.weight_b()).t());
    for ((mut row, xa_row), xab_row) in m.rows_mut().into_iter().zip(xa.rows()).zip(xab.rows()) {
        if xa_row.iter().chain(xab_row.iter()).any(|v| !bounded(*v)) {
            row.fill(f64::INFINITY);
        }
    }
    m
}

/// |a − b| ≤ 4·n·ε·M + n·(smallest normal), element-wise, with n = k + r + 6 roundings in the
/// longest chain (k products in X Wᵀ, r in the LoRA branch, merge, bias). Skipped where M
/// is too large for the bound to mean anything (overflow is then legitimate).
#[track_caller]
fn assert_close_layer<A: LoraFloat>(
    what: &str,
    a: ArrayView2<'_, A>,
    b: ArrayView2<'_, A>,
    m: &Array2<f64>,
    terms: usize,
) {
    let eps = A::epsilon().into_f64();
    let tiny = A::min_positive_value().into_f64();
    let n = terms as f64;
    for ((idx, &x), (&y, &mag)) in a.indexed_iter().zip(b.iter().zip(m.iter())) {
        if !bounded_in::<A>(mag) {
            continue;
        }
        let (x, y) = (x.into_f64(), y.into_f64());
        let tol = 4.0 * n * eps * mag + n * tiny;
        assert!(
            (x - y).abs() <= tol,
            "{what}: element {idx:?}: {x:e} vs {y:e} (|diff| {:e} > tol {tol:e}, M {mag:e})",
            (x - y).abs()
        );
    }
}

/// Forward outputs must be finite wherever the magnitude bound says they cannot overflow.
#[track_caller]
fn assert_finite_where_bounded<A: LoraFloat>(what: &str, y: ArrayView2<'_, A>, m: &Array2<f64>) {
    for ((idx, v), &mag) in y.indexed_iter().zip(m.iter()) {
        if bounded_in::<A>(mag) {
            assert!(
                v.is_finite(),
                "{what}: non-finite {idx:?} = {:e} with M = {mag:e}",
                v.into_f64()
            );
        }
    }
}

/// The layer's state as JSON (everything the value holds).
fn layer_state<A: LoraFloat>(layer: &LoraLayer<A>) -> Vec<u8> {
    serde_json::to_vec(layer).expect("a layer always serialises")
}

/// Serialise → deserialise gives an equal layer, and the same bytes again.
#[track_caller]
fn assert_layer_round_trip<A: LoraFloat>(layer: &LoraLayer<A>) {
    let bytes = layer_state(layer);
    let back: LoraLayer<A> = match serde_json::from_slice(&bytes) {
        Ok(l) => l,
        Err(e) => panic!(
            "a serialised layer must load again: {e}\n{}",
            String::from_utf8_lossy(&bytes)
        ),
    };
    assert!(back == *layer, "round trip changed the layer");
    assert_eq!(layer_state(&back), bytes, "round trip changed the document");
}

/// Forward works on a width-k input; its output is finite where bounded; merged and unmerged
/// forwards agree within the bound; merge∘unmerge (or unmerge∘merge) restores W within the
/// bound; a failed merge/unmerge leaves the layer unchanged. A layer merged by `merge_exact`
/// unmerges to the W it kept, which a document may give as any finite weight (it need not be
/// W − s·B A), so for it only the operations themselves are checked.
fn check_layer_consistent<A: LoraFloat>(layer: &LoraLayer<A>, x: &Array2<A>) {
    let (k, r) = (layer.in_features(), layer.rank());
    let y = layer.forward(x.view()).expect("forward on a width-k input");
    assert_eq!(y.dim(), (x.nrows(), layer.out_features()));
    let m = layer_magnitude(layer, x.view());
    assert_finite_where_bounded("forward", y.view(), &m);

    let mut other = layer.clone();
    let before = layer_state(layer);
    let toggled = if layer.is_merged() {
        other.unmerge()
    } else {
        other.merge()
    };
    match toggled {
        Ok(()) if layer.is_merged_exact() => {
            assert!(!other.is_merged() && !other.is_merged_exact());
            let _ = other.forward(x.view()).expect("forward after unmerge");
            if let Err(e) = other.merge() {
                assert!(matches!(e, LoraError::WouldOverflow { .. }), "{e:?}");
            }
        }
        Ok(()) => {
            let y2 = other
                .forward(x.view())
                .expect("forward after merge/unmerge");
            assert_close_layer(
                "merged vs unmerged forward",
                y.view(),
                y2.view(),
                &m,
                k + r + 6,
            );
            // And back: W must return to where it was, within the merge bound.
            let back = if other.is_merged() {
                other.unmerge()
            } else {
                other.merge()
            };
            match back {
                Ok(()) => {
                    let s = A::Factor::from_f64_lossy(layer.scaling()).into_f64().abs();
                    let mw = abs_f64(layer.base_weight())
                        + abs_f64(layer.weight_b()).dot(&abs_f64(layer.weight_a())) * (2.0 * s);
                    assert_close_layer(
                        "W after merge round trip",
                        layer.base_weight(),
                        other.base_weight(),
                        &mw,
                        r + 6,
                    );
                }
                Err(e) => assert!(matches!(e, LoraError::WouldOverflow { .. }), "{e:?}"),
            }
        }
        Err(e) => {
            assert!(
                matches!(e, LoraError::WouldOverflow { .. }),
                "unexpected error {e:?}"
            );
            assert_eq!(
                layer_state(&other),
                before,
                "failed merge/unmerge changed the layer"
            );
        }
    }
}

/// Per output element of y ← y₀ + s·Uᵀ(D x): M = |y₀| + |s|·Σⱼ |Uⱼ|·(|Dⱼ|·|x|).
fn micro_magnitude(lora: &MicroLora, x: &[f32], y0: &[f32]) -> Vec<f64> {
    let (down, up) = lora.get_weights();
    let s = f64::from(lora.scale()).abs();
    let mut m: Vec<f64> = y0.iter().map(|v| f64::from(*v).abs()).collect();
    for j in 0..lora.rank() {
        let h: f64 = down
            .row(j)
            .iter()
            .zip(x)
            .map(|(d, x)| f64::from(d.abs()) * f64::from(x.abs()))
            .sum();
        if !bounded(h) {
            // The intermediate h = D x can overflow (then ∞·0 = NaN) though y is small.
            m.fill(f64::INFINITY);
            return m;
        }
        for (mi, u) in m.iter_mut().zip(up.row(j)) {
            *mi += s * f64::from(u.abs()) * h;
        }
    }
    m
}

/// forward, forward_scalar, every available SIMD level and forward_batch agree within the
/// bound and are finite where it is small.
fn check_micro_forward(lora: &MicroLora, x: &[f32], y0: &[f32]) {
    let h = lora.hidden_dim();
    let m = micro_magnitude(lora, x, y0);
    let terms = (h + 6) as f64;
    let mut reference = y0.to_vec();
    lora.forward_scalar(x, &mut reference);
    let check = |what: &str, y: &[f32]| {
        for (i, ((&a, &b), &mag)) in y.iter().zip(&reference).zip(&m).enumerate() {
            if bounded(mag) {
                assert!(a.is_finite(), "{what}: y[{i}] = {a:e} with M = {mag:e}");
                let tol = 4.0 * terms * f64::from(f32::EPSILON) * mag
                    + terms * f64::from(f32::MIN_POSITIVE);
                let diff = (f64::from(a) - f64::from(b)).abs();
                assert!(
                    diff <= tol,
                    "{what}: y[{i}] {a:e} vs scalar {b:e}: {diff:e} > {tol:e}"
                );
            }
        }
    };
    check("forward_scalar", &reference.clone());
    let mut y = y0.to_vec();
    lora.forward(x, &mut y);
    check("forward", &y);
    for level in ndlora::SimdLevel::ALL {
        let mut y = y0.to_vec();
        let r = lora.forward_with(level, x, &mut y);
        assert_eq!(r.is_ok(), level.is_available());
        if r.is_ok() {
            check("forward_with", &y);
        } else {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(y0), "a failed forward_with wrote its output");
        }
    }
    let xb = ndarray::Array2::from_shape_vec((1, h), x.to_vec()).expect("1×H");
    let mut yb = ndarray::Array2::from_shape_vec((1, h), y0.to_vec()).expect("1×H");
    lora.forward_batch(xb.view(), yb.view_mut())
        .expect("forward_batch on 1×H");
    check("forward_batch", yb.as_slice().expect("standard layout"));
}

/// Serialise → deserialise keeps the weights and scale (pending gradients are not saved).
#[track_caller]
fn assert_micro_round_trip(lora: &MicroLora) {
    let bytes = serde_json::to_vec(lora).expect("a MicroLora always serialises");
    let back: MicroLora = match serde_json::from_slice(&bytes) {
        Ok(l) => l,
        Err(e) => panic!("a serialised MicroLora must load again: {e}"),
    };
    assert_eq!(back.get_weights(), lora.get_weights());
    assert_eq!(back.scale().to_bits(), lora.scale().to_bits());
    assert_eq!(back.pending_updates(), 0);
    assert_eq!(serde_json::to_vec(&back).expect("serialises"), bytes);
}
