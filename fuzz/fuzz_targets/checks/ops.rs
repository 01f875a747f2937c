// ops: a structured fuzzer. `arbitrary` decodes the bytes into a small LoraLayer (d, k in
// 1..=9, rank ≤ min(d, k); the same input is run as LoraLayer<f32>, <f64>, <bf16> and <f16>
// in turn, the raw bit patterns rounded to each type), a MicroLora (H in 0..40, rank 1 or 2) and a sequence of
// operations on them, some with bounded values (bytes mapped to [-4, 4)) and some with raw
// f32/f64 bit patterns (NaN, ±∞, huge) to probe the Result APIs. After every operation:
// * Result APIs returned instead of panicking, and an Err left the value exactly as it was
//   (serialised state and `==` compared before/after);
// * the layer is consistent (merged ≈ unmerged forward within a bound computed from the
//   magnitudes, merge∘unmerge restores W, forward finite unless the magnitudes allow
//   overflow, serde round trip is the identity);
// * the MicroLora's kernels agree and are finite likewise, and it round-trips through serde.

use arbitrary::{Arbitrary, Unstructured};
use ndlora::{LearningSignal, LoraConfig, LoraModel};

/// The decoded input.
#[derive(Arbitrary, Debug)]
pub struct OpsInput {
    d: u8,
    k: u8,
    rank: u8,
    alpha: i8,
    rslora: bool,
    dropout: u8,
    seed: u8,
    w: Vec<i8>,
    bias: Option<Vec<i8>>,
    micro_h: u8,
    micro_rank2: bool,
    probe: Vec<i8>,
    ops: Vec<Op>,
}

/// One operation. `i8` values map to v/32 ∈ [-4, 4); `u32`/`u64` are raw float bits.
#[derive(Arbitrary, Debug)]
pub enum Op {
    Forward {
        rows: u8,
        x: Vec<i8>,
    },
    ForwardTrain {
        rows: u8,
        x: Vec<i8>,
    },
    ForwardWrongWidth {
        rows: u8,
    },
    Merge,
    Unmerge,
    SetScaling(i8),
    SetScalingRaw(u64),
    WriteB {
        i: u8,
        j: u8,
        v: i8,
    },
    WriteA {
        i: u8,
        j: u8,
        v: i8,
    },
    SetBias(Option<Vec<i8>>),
    SetBiasRaw(u32),
    BackwardSgd {
        rows: u8,
        x: Vec<i8>,
        g: Vec<i8>,
        lr: i8,
    },
    SgdRaw {
        lr: u32,
        grad: u32,
    },
    LayerSerde,
    Model {
        merge: bool,
    },
    MicroForward {
        x: Vec<i8>,
        y0: Vec<i8>,
    },
    MicroAccumulate {
        x: Vec<i8>,
        g: Vec<i8>,
        q: i8,
    },
    MicroAccumulateRaw {
        x: u32,
        at: u8,
        q: u32,
    },
    MicroAccumulateBatch {
        rows: u8,
        x: Vec<i8>,
        g: Vec<i8>,
        q: Vec<i8>,
    },
    MicroApply(i8),
    MicroApplyRaw(u32),
    MicroSetWeights {
        down: Vec<i8>,
        up: Vec<i8>,
        wrong_shape: bool,
    },
    MicroSetWeightsRaw {
        v: u32,
        at: u8,
    },
    MicroSetScale(i8),
    MicroSerde,
    MicroReset,
}

fn small(v: i8) -> f32 {
    f32::from(v) / 32.0
}

fn vec_from(n: usize, v: &[i8]) -> Vec<f32> {
    (0..n)
        .map(|i| {
            if v.is_empty() {
                0.0
            } else {
                small(v[i % v.len()])
            }
        })
        .collect()
}

/// `v` (an f32) rounded to `T`.
fn to<T: LoraFloat>(v: f32) -> T {
    T::from_f64_lossy(f64::from(v))
}

fn mat_from<T: LoraFloat>(r: usize, c: usize, v: &[i8]) -> Array2<T> {
    Array2::from_shape_vec((r, c), vec_from(r * c, v).into_iter().map(to).collect()).expect("r×c")
}

fn bias_from<T: LoraFloat>(d: usize, v: &[i8]) -> ndarray::Array1<T> {
    vec_from(d, v).into_iter().map(to).collect()
}

/// The check run by the fuzz target and by the corpus replay in `tests/fuzz_replay.rs`.
pub fn check_ops(data: &[u8]) {
    let Ok(input) = OpsInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    run_ops::<f32>(input);
    for run in [run_ops::<f64>, run_ops::<half::bf16>, run_ops::<half::f16>] {
        if let Ok(input) = OpsInput::arbitrary_take_rest(Unstructured::new(data)) {
            run(input);
        }
    }
}

fn run_ops<A: LoraFloat>(input: OpsInput) {
    let d = 1 + usize::from(input.d) % 9;
    let k = 1 + usize::from(input.k) % 9;
    let config = LoraConfig {
        rank: 1 + usize::from(input.rank) % d.min(k),
        alpha: f64::from(input.alpha) / 8.0,
        dropout: f64::from(input.dropout % 4) * 0.25,
        use_rslora: input.rslora,
        seed: u64::from(input.seed),
        ..Default::default()
    };
    let mut layer =
        LoraLayer::<A>::new(mat_from(d, k, &input.w), config.clone()).expect("valid config");
    if let Some(b) = &input.bias {
        layer = layer.with_bias(bias_from(d, b)).expect("finite bias");
    }
    let h = usize::from(input.micro_h) % 40;
    let mut micro = MicroLora::try_new(h, 1 + usize::from(input.micro_rank2)).expect("rank 1 or 2");
    let probe = mat_from::<A>(2, k, &input.probe);
    let probe_h = vec_from(h, &input.probe);

    for op in input.ops.iter().take(64) {
        let layer_before = layer.clone();
        let layer_bytes = layer_state(&layer);
        let micro_before = micro.clone();
        // Ok(true): the op may have changed the layer or adapter; Err: it failed and must not have.
        let result: std::result::Result<(), LoraError> = match op {
            Op::Forward { rows, x } => {
                let x = mat_from::<A>(usize::from(*rows % 5), k, x);
                let y = layer.forward(x.view()).expect("width-k forward");
                let m = layer_magnitude(&layer, x.view());
                assert_finite_where_bounded("forward", y.view(), &m);
                let mut out = Array2::from_elem(y.dim(), A::nan());
                layer
                    .forward_into(x.view(), out.view_mut())
                    .expect("forward_into");
                assert!(
                    same_bits(out.view(), y.view()),
                    "forward_into differs from forward"
                );
                Ok(())
            }
            Op::ForwardTrain { rows, x } => {
                let x = mat_from::<A>(usize::from(*rows % 5), k, x);
                let y = layer
                    .forward_train(x.view())
                    .expect("width-k forward_train");
                let p = layer.config().dropout;
                if p == 0.0 || layer.is_merged() {
                    let plain = layer.forward(x.view()).expect("forward");
                    assert!(same_bits(y.view(), plain.view()), "forward_train ≠ forward");
                }
                let m = layer_magnitude(&layer, x.view()).mapv(|v| v / (1.0 - p));
                assert_finite_where_bounded("forward_train", y.view(), &m);
                Ok(())
            }
            Op::ForwardWrongWidth { rows } => {
                let x = Array2::<A>::zeros((usize::from(*rows % 3), k + 1));
                let e = layer.forward(x.view()).expect_err("wrong width must fail");
                assert!(matches!(e, LoraError::ShapeMismatch { .. }));
                Err(e)
            }
            Op::Merge => layer.merge(),
            Op::Unmerge => layer.unmerge(),
            Op::SetScaling(v) => layer.set_scaling(f64::from(*v) / 8.0),
            Op::SetScalingRaw(bits) => layer.set_scaling(f64::from_bits(*bits)),
            Op::WriteB { i, j, v } => layer.weight_b_mut().map(|mut b| {
                let (r, c) = b.dim();
                b[[usize::from(*i) % r, usize::from(*j) % c]] = to(small(*v));
            }),
            Op::WriteA { i, j, v } => layer.weight_a_mut().map(|mut a| {
                let (r, c) = a.dim();
                a[[usize::from(*i) % r, usize::from(*j) % c]] = to(small(*v));
            }),
            Op::SetBias(b) => layer.set_bias(b.as_ref().map(|b| bias_from(d, b))),
            Op::SetBiasRaw(bits) => {
                let mut b = ndarray::Array1::<A>::zeros(d);
                b[0] = to(f32::from_bits(*bits));
                layer.set_bias(Some(b))
            }
            Op::BackwardSgd { rows, x, g, lr } => {
                let n = usize::from(*rows % 5);
                let x = mat_from::<A>(n, k, x);
                let grads = layer
                    .backward(x.view(), mat_from::<A>(n, d, g).view())
                    .expect("backward");
                layer.sgd_step(&grads, to(f32::from(*lr) / 64.0))
            }
            Op::SgdRaw { lr, grad } => {
                let x = mat_from::<A>(1, k, &[32]);
                let mut grads = layer
                    .backward(x.view(), mat_from::<A>(1, d, &[32]).view())
                    .expect("backward");
                grads.grad_b[[0, 0]] = to(f32::from_bits(*grad));
                layer.sgd_step(&grads, to(f32::from_bits(*lr)))
            }
            Op::LayerSerde => {
                assert_layer_round_trip(&layer);
                let back: LoraLayer<A> = serde_json::from_slice(&layer_bytes).expect("loads");
                layer = back;
                Ok(())
            }
            Op::Model { merge } => {
                check_model(&layer, &probe, *merge);
                Ok(())
            }
            Op::MicroForward { x, y0 } => {
                check_micro_forward(&micro, &vec_from(h, x), &vec_from(h, y0));
                Ok(())
            }
            Op::MicroAccumulate { x, g, q } => micro.accumulate_gradient(
                &LearningSignal::with_gradient(vec_from(h, x), vec_from(h, g), small(*q)),
            ),
            Op::MicroAccumulateRaw { x, at, q } => {
                let mut xs = probe_h.clone();
                if h > 0 {
                    xs[usize::from(*at) % h] = f32::from_bits(*x);
                }
                micro.accumulate_gradient(&LearningSignal::with_gradient(
                    xs,
                    probe_h.clone(),
                    f32::from_bits(*q),
                ))
            }
            Op::MicroAccumulateBatch { rows, x, g, q } => {
                let n = usize::from(*rows % 4);
                micro.accumulate_gradient_batch(
                    mat_from(n, h, x).view(),
                    mat_from(n, h, g).view(),
                    &vec_from(n, q),
                )
            }
            Op::MicroApply(lr) => {
                let pending = micro.pending_updates();
                let r = micro.try_apply_accumulated(small(*lr));
                if r.is_ok() {
                    assert_eq!(micro.pending_updates(), 0);
                    if pending == 0 {
                        assert_eq!(
                            micro, micro_before,
                            "apply with nothing pending changed weights"
                        );
                    }
                }
                r
            }
            Op::MicroApplyRaw(bits) => micro.try_apply_accumulated(f32::from_bits(*bits)),
            Op::MicroSetWeights {
                down,
                up,
                wrong_shape,
            } => {
                let r = micro.rank() + usize::from(*wrong_shape);
                micro.set_weights(
                    mat_from(r, h, down).view(),
                    mat_from(micro.rank(), h, up).view(),
                )
            }
            Op::MicroSetWeightsRaw { v, at } => {
                let (down, up) = micro.get_weights();
                let (mut down, up) = (down.to_owned(), up.to_owned());
                if h > 0 {
                    down[[0, usize::from(*at) % h]] = f32::from_bits(*v);
                }
                micro.set_weights(down.view(), up.view())
            }
            Op::MicroSetScale(v) => {
                micro.set_scale(small(*v));
                Ok(())
            }
            Op::MicroSerde => {
                assert_micro_round_trip(&micro);
                let bytes = serde_json::to_vec(&micro).expect("serialises");
                micro = serde_json::from_slice(&bytes).expect("loads");
                Ok(())
            }
            Op::MicroReset => {
                micro.reset();
                assert_eq!(micro.pending_updates(), 0);
                Ok(())
            }
        };
        if result.is_err() {
            assert_eq!(
                layer_state(&layer),
                layer_bytes,
                "failed {op:?} changed the layer"
            );
            assert!(layer == layer_before, "failed {op:?} changed the layer");
            assert_eq!(micro, micro_before, "failed {op:?} changed the MicroLora");
        }
        check_layer_consistent(&layer, &probe);
        assert_layer_round_trip(&layer);
        check_micro_forward(&micro, &probe_h, &probe_h);
        assert_micro_round_trip(&micro);
    }
}

/// A LoraModel with the layer's W and factors as one active adapter computes what the layer
/// computes (without its bias, which models do not have), merged or not.
fn check_model<A: LoraFloat>(layer: &LoraLayer<A>, x: &Array2<A>, merge: bool) {
    if layer.is_merged() || layer.scaling() != layer.config().scaling() {
        return; // the model would start from a different W or s
    }
    let mut plain = layer.clone();
    plain.set_bias(None).expect("removing a bias");
    let mut model = LoraModel::new(layer.base_weight().to_owned()).expect("finite W");
    model
        .add_adapter_from_parts(
            "a",
            layer.weight_a().to_owned(),
            layer.weight_b().to_owned(),
            layer.config().clone(),
        )
        .expect("the layer's parts are valid");
    model.set_active(&["a"]).expect("known adapter");
    let m = layer_magnitude(&plain, x.view());
    let terms = layer.in_features() + layer.rank() + 6;
    let y = plain.forward(x.view()).expect("forward");
    let ym = model.forward(x.view()).expect("model forward");
    assert_close_layer("model vs layer forward", y.view(), ym.view(), &m, terms);
    if merge && model.merge("a").is_ok() {
        let ym = model.forward(x.view()).expect("merged model forward");
        assert_close_layer(
            "merged model vs layer forward",
            y.view(),
            ym.view(),
            &m,
            terms,
        );
        if let Err(e) = model.unmerge_all() {
            assert!(matches!(e, LoraError::WouldOverflow { .. }), "{e:?}");
        }
    }
}
