//! Everything observable about an ndlora value, bit for bit, and the check that a failed
//! operation returns the expected error and leaves its value exactly as it was.

use std::any::Any;
use std::fmt::Debug;

use half::{bf16, f16};

use ndarray::{ArrayView2, Axis};
use ndlora::{LoraError, LoraFloat, LoraLayer, LoraModel, MicroLora};

/// The raw bits of one element in its own type (a half NaN's payload and quiet bit too,
/// which widening to f64 would not keep).
pub fn raw_bits<A: LoraFloat>(x: A) -> u64 {
    let any: &dyn Any = &x;
    if let Some(h) = any.downcast_ref::<bf16>() {
        u64::from(h.to_bits())
    } else if let Some(h) = any.downcast_ref::<f16>() {
        u64::from(h.to_bits())
    } else if let Some(v) = any.downcast_ref::<f32>() {
        u64::from(v.to_bits())
    } else {
        x.into_f64().to_bits()
    }
}

/// The shape and the raw bits of every element (`==` is IEEE: NaN ≠ NaN and 0 = −0).
pub fn bits<A: LoraFloat>(m: ArrayView2<'_, A>) -> String {
    let v: Vec<String> = m.iter().map(|&x| format!("{:x}", raw_bits(x))).collect();
    format!("{:?}:{}", m.shape(), v.join(","))
}

/// A value whose whole observable state can be rendered bitwise.
pub trait State: Clone + PartialEq {
    fn state(&self) -> String;
}

impl<A: LoraFloat> State for LoraLayer<A> {
    /// The serialised document (config, scaling, merge flag, RNG position, kept unmerge
    /// weight) and the raw bits of W, A, B, b.
    fn state(&self) -> String {
        let bias = self.bias().map(|b| bits(b.insert_axis(Axis(0))));
        format!(
            "{}|{}|{}|{}|{:?}|{}|{}",
            serde_json::to_string(self).unwrap(),
            bits(self.base_weight()),
            bits(self.weight_a()),
            bits(self.weight_b()),
            bias,
            self.scaling().to_bits(),
            self.is_merged_exact()
        )
    }
}

impl<A: LoraFloat> State for LoraModel<A> {
    /// W, the active list, and every adapter's id, factors, config, scaling and merge flag.
    fn state(&self) -> String {
        let mut s = format!("{}|{:?}|", bits(self.base_weight()), self.active_adapters());
        for name in self.adapter_names() {
            s += &format!(
                "{name}:{:?}:{}:{}:{:?}:{}:{};",
                self.adapter_id(name),
                bits(self.weight_a(name).unwrap()),
                bits(self.weight_b(name).unwrap()),
                self.config(name).unwrap(),
                self.scaling(name).unwrap().to_bits(),
                self.is_merged(name).unwrap()
            );
        }
        s
    }
}

impl State for MicroLora {
    /// The serialised document, the weights, the pending sums and count, and the scale.
    fn state(&self) -> String {
        let (gd, gu) = self.pending_gradients();
        let (d, u) = self.get_weights();
        format!(
            "{}|{}|{}|{}|{}|{}|{}",
            serde_json::to_string(self).unwrap(),
            bits(d),
            bits(u),
            bits(gd),
            bits(gu),
            self.pending_updates(),
            self.scale().to_bits()
        )
    }
}

/// Asserts that `result` is an error matching `expected`, with a message, and returns it.
#[track_caller]
pub fn expect_error<T: Debug>(
    name: &str,
    result: Result<T, LoraError>,
    expected: impl Fn(&LoraError) -> bool,
) -> LoraError {
    match result {
        Ok(v) => panic!("{name}: expected an error, got Ok({v:?})"),
        Err(e) => {
            assert!(expected(&e), "{name}: unexpected error {e:?} ({e})");
            assert!(!e.to_string().is_empty(), "{name}: no message for {e:?}");
            e
        }
    }
}

/// Runs `op` on a clone of `original`, asserts that it fails with an error matching
/// `expected` (see [`expect_error`]) and that the clone is still `original`: the same
/// [`State`] bit for bit, and `==` as well unless `original` is not equal to itself (a NaN
/// in its weights). Returns the error.
#[track_caller]
pub fn fails_unchanged<V: State, T: Debug>(
    name: &str,
    original: &V,
    op: impl FnOnce(&mut V) -> Result<T, LoraError>,
    expected: impl Fn(&LoraError) -> bool,
) -> LoraError {
    let mut v = original.clone();
    let result = op(&mut v);
    let e = expect_error(name, result, expected);
    assert_eq!(
        v.state(),
        original.state(),
        "{name}: the value changed on {e:?}"
    );
    let comparable = original.clone() == *original;
    assert!(
        !comparable || v == *original,
        "{name}: the value is no longer == on {e:?}"
    );
    e
}
