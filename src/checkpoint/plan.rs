//! [`plan`]: which base tensors an adapter changes and how, checked against the base before
//! anything is written; the replacement of a base tensor by an adapter tensor.

use std::collections::HashMap;

use safetensors::Dtype;

use super::adapter::{AdapterModule, AdapterTensor, CheckpointAdapter, ModuleKind};
use super::element::{copy_le_bytes, is_float, Element};
use super::reader::{Checkpoint, Entry, Shard};
use crate::error::{shape_str, LoraError, Result};
use crate::peft::tensors::for_each_float;

/// What happens to one base tensor.
#[derive(Debug, Clone)]
pub(crate) struct TensorAction {
    /// The adapter module merged into it (index into [`CheckpointAdapter::modules`]).
    pub(crate) module: Option<usize>,
    /// The adapter tensor that replaces it (before the module's update, if both).
    pub(crate) replacement: Option<AdapterTensor>,
}

/// One change an adapter makes to a checkpoint: a module merged into its base tensor, or a
/// base tensor replaced, and whether it can be done.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanEntry {
    /// The adapter's module path, or the key of the replacing tensor.
    pub source: String,
    /// The base tensor it changes.
    pub tensor: String,
    /// `"merge"` (W ± s·B A), `"merge transposed"` (W ± s·(B A)ᵀ: embeddings,
    /// `fan_in_fan_out`) or `"replace"` (`modules_to_save`).
    pub action: &'static str,
    /// Why it cannot be done, if it cannot (a missing base tensor, a shape mismatch naming
    /// both shapes, a dtype that cannot be merged into, a non-finite factor).
    pub problem: Option<LoraError>,
}

/// What [`plan`] found: one [`PlanEntry`] per module and per replaced tensor, in the
/// adapter's order (modules, then replacements).
#[derive(Debug, Clone)]
pub struct Plan {
    entries: Vec<PlanEntry>,
    actions: HashMap<String, TensorAction>,
}

impl Plan {
    /// Every change, with its problem if it has one.
    pub fn entries(&self) -> &[PlanEntry] {
        &self.entries
    }

    /// `Ok` when every change can be made, else the first problem.
    pub fn check(&self) -> Result<()> {
        match self.entries.iter().find_map(|e| e.problem.clone()) {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// What happens to the base tensor `name` (`None`: copied unchanged).
    pub(crate) fn action(&self, name: &str) -> Option<&TensorAction> {
        self.actions.get(name)
    }
}

/// The dtypes a module's update can be merged into, for errors.
const WEIGHT_DTYPES: &str = "a 2-D tensor of dtype BF16, F16, F32 or F64";

/// The error for a base tensor a module's update cannot be merged into.
pub(crate) fn unsupported_weight(dtype: Dtype, shape: &[usize]) -> LoraError {
    LoraError::TensorKind {
        expected: WEIGHT_DTYPES,
        got: format!("{dtype:?} {}", shape_str(shape)),
    }
}

/// Checks `adapter` against `base`: for each module, that the base holds `<module>.weight`
/// as a 2-D float tensor of the shape the factors need, and that the factors are finite in
/// the float type PEFT uses for that dtype (f32, or f64 for F64); for each replacing tensor,
/// that the base holds it with the same shape and a dtype it converts to. Nothing is written.
///
/// ```
/// use ndlora::checkpoint::{plan, Checkpoint, CheckpointAdapter};
/// let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/checkpoint/llama_bf16_r8");
/// let base = Checkpoint::open(format!("{fixture}/base"))?;
/// let adapter = CheckpointAdapter::open(format!("{fixture}/adapter"))?;
/// let plan = plan(&base, &adapter);
/// plan.check()?;
/// assert_eq!(plan.entries()[0].tensor, "model.layers.0.mlp.down_proj.weight");
/// # Ok::<(), ndlora::LoraError>(())
/// ```
pub fn plan(base: &Checkpoint, adapter: &CheckpointAdapter) -> Plan {
    let mut entries = Vec::new();
    let mut actions: HashMap<String, TensorAction> = HashMap::new();
    for (i, module) in adapter.modules().iter().enumerate() {
        let tensor = module.base_tensor();
        let problem = check_module(base, adapter, module, &tensor).err();
        if problem.is_none() {
            actions
                .entry(tensor.clone())
                .or_insert(TensorAction {
                    module: None,
                    replacement: None,
                })
                .module = Some(i);
        }
        entries.push(PlanEntry {
            source: module.name.clone(),
            tensor,
            action: if module.kind.is_transposed() {
                "merge transposed"
            } else {
                "merge"
            },
            problem,
        });
    }
    for (tensor, t) in adapter.replacements() {
        let problem = check_replacement(base, adapter, tensor, t).err();
        if problem.is_none() {
            actions
                .entry(tensor.clone())
                .or_insert(TensorAction {
                    module: None,
                    replacement: None,
                })
                .replacement = Some(t.clone());
        }
        entries.push(PlanEntry {
            source: t.key.clone(),
            tensor: tensor.clone(),
            action: "replace",
            problem,
        });
    }
    Plan { entries, actions }
}

/// The base's shard and entry of `tensor`, or `NotInBase` naming the adapter `key` that
/// asked for it.
fn find_in_base<'b>(
    base: &'b Checkpoint,
    key: &str,
    tensor: &str,
) -> Result<(&'b Shard, &'b Entry)> {
    base.find(tensor).ok_or_else(|| LoraError::NotInBase {
        key: key.to_owned(),
        tensor: tensor.to_owned(),
        base: base.path().display().to_string(),
    })
}

fn check_module(
    base: &Checkpoint,
    adapter: &CheckpointAdapter,
    module: &AdapterModule,
    tensor: &str,
) -> Result<()> {
    let (shard, entry) = find_in_base(base, &module.name, tensor)?;
    let in_tensor = |e: LoraError| e.in_tensor(&shard.shown(), tensor);
    let expected = module.base_shape();
    if entry.shape.len() != 2 || !is_float(entry.dtype) {
        return Err(in_tensor(unsupported_weight(entry.dtype, &entry.shape)));
    }
    if entry.shape != expected {
        return Err(in_tensor(LoraError::ShapeMismatch {
            what: match module.kind {
                ModuleKind::Linear => "base weight (out×in) for the module's factors",
                ModuleKind::FanInFanOut => {
                    "base weight (in×out, fan_in_fan_out) for the module's factors"
                }
                ModuleKind::Embedding => "base embedding (vocab×dim) for the module's factors",
            },
            expected: shape_str(&expected),
            got: shape_str(&entry.shape),
        }));
    }
    // The factors in the float type the merge uses for this dtype: finite, of the rank.
    match entry.dtype {
        Dtype::F64 => adapter.factors::<f64>(module).map(drop),
        _ => adapter.factors::<f32>(module).map(drop),
    }
}

fn check_replacement(
    base: &Checkpoint,
    adapter: &CheckpointAdapter,
    tensor: &str,
    t: &AdapterTensor,
) -> Result<()> {
    let (_, entry) = find_in_base(base, &t.key, tensor)?;
    let in_tensor = |e: LoraError| e.in_tensor(&adapter.weights_path(), &t.key);
    if t.shape != entry.shape {
        return Err(in_tensor(LoraError::ShapeMismatch {
            what: "replacement tensor (modules_to_save) for the base tensor",
            expected: shape_str(&entry.shape),
            got: shape_str(&t.shape),
        }));
    }
    if t.raw_dtype != entry.dtype && !(is_float(t.raw_dtype) && is_float(entry.dtype)) {
        return Err(in_tensor(LoraError::TensorKind {
            expected: "the base tensor's dtype (or float dtypes on both sides)",
            got: format!("{} for a {:?} base tensor", t.dtype, entry.dtype),
        }));
    }
    Ok(())
}

/// Fills `out` with the adapter tensor `t`'s elements in `W`: the bytes when the dtypes
/// agree, else each value converted as PyTorch's `copy_` does. [`plan`] has checked the
/// shapes and dtypes.
pub(crate) fn replacement_into<W: Element>(
    adapter: &CheckpointAdapter,
    t: &AdapterTensor,
    out: &mut [W],
) {
    let data = adapter.data(t);
    if t.raw_dtype == W::DTYPE {
        copy_le_bytes(data, out);
    } else {
        let mut slots = out.iter_mut();
        for_each_float(t.raw_dtype, data, |v| {
            if let Some(slot) = slots.next() {
                *slot = W::from_f64_torch(v);
            }
        });
    }
}
