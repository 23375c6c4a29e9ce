//! `summary.json`: everything about a run in one document — inputs with checksums, the
//! integration settings, per-step figures, the residual report, and per-tensor and per-layer
//! totals. Written by `analyze`, read back by `summarize` and the other commands.

use crate::checkpoint::StepSource;
use crate::lca::Integration;
use serde::{Deserialize, Serialize};

/// Version of the output layout; bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub schema_version: u32,
    pub tool: Tool,
    pub spec: FileRef,
    pub data: DataInfo,
    pub model: ModelInfo,
    pub integration: IntegrationInfo,
    pub checkpoints: Vec<CheckpointRef>,
    pub step_spacing: Spacing,
    pub steps: Vec<StepRecord>,
    pub run: RunTotals,
    pub tensors: Vec<GroupTotal>,
    pub layers: Vec<GroupTotal>,
    pub ignored_tensors: Vec<String>,
    pub warnings: Vec<String>,
    pub files: Vec<String>,
    /// lca's loss at the first checkpoint compared with PyTorch's, when the checkpoint
    /// carries it (`lca.torch_loss`, written by the Python Recorder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_check: Option<LossCheck>,
}

/// lca's loss at a checkpoint compared with the one PyTorch computed (docs/python.md,
/// "Verification").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossCheck {
    /// The checkpoint compared (the run's first).
    pub checkpoint: String,
    pub step: u64,
    /// PyTorch's loss, from the checkpoint's metadata `lca.torch_loss`.
    pub torch_loss: f64,
    /// The dtype of the model output PyTorch's loss was computed from.
    pub torch_dtype: String,
    /// The batch-norm mode PyTorch's loss was computed in (`lca.batch_norm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_batch_norm: Option<String>,
    pub lca_loss: f64,
    /// lca's loss minus PyTorch's.
    pub difference: f64,
    /// The largest difference float rounding explains.
    pub tolerance: f64,
    /// |difference| ≤ tolerance.
    pub agree: bool,
    /// Whether a disagreement stops the run (false with `--no-verify-loss`).
    pub enforced: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRef {
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataInfo {
    pub path: String,
    pub sha256: String,
    pub samples: usize,
    pub sample_shape: Vec<usize>,
    pub chunk_size: usize,
    pub chunks: usize,
    /// The order the rows were evaluated in: `shuffled` (chunks drawn by the permutation of
    /// `seed`) or `file`; always `file` unless batch norm uses batch statistics (docs/spec.md).
    /// Summaries written before the option existed read as `file`.
    #[serde(default = "file_order")]
    pub order: String,
    /// The permutation's seed, with `order = "shuffled"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The held-out set whose loss is allocated along the same path, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<FileInfo>,
}

fn file_order() -> String {
    "file".into()
}

impl DataInfo {
    /// The recorded row order (`None`: a name this lca does not know).
    pub fn data_order(&self) -> Option<crate::data::DataOrder> {
        crate::data::DataOrder::from_parts(Some(&self.order), self.seed)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileInfo {
    pub path: String,
    pub sha256: String,
    pub samples: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParamRef {
    pub name: String,
    /// The layer (or `buffers` for buffers) the tensor is reported under.
    pub layer: String,
    pub role: String,
    pub shape: Vec<usize>,
    pub numel: usize,
    /// True for buffers (batch norm running statistics), which are not trained.
    #[serde(default)]
    pub buffer: bool,
    /// Other `state_dict` names of the same tensor (weight tying), accepted in checkpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub loss: String,
    /// Batch norm mode (`batch-stats` or `running-stats`), when the model has batch norm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_norm: Option<crate::net::batch_norm::BnMode>,
    /// Trained parameter values.
    pub num_params: usize,
    /// Buffer values (running statistics) whose LCA is reported in the `buffers` group.
    #[serde(default)]
    pub num_buffers: usize,
    pub input_shape: Vec<usize>,
    pub output_shape: Vec<usize>,
    /// Layers with parameters, in model order.
    pub layers: Vec<String>,
    pub params: Vec<ParamRef>,
    /// Attention layers, for `summarize --by head`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention: Vec<AttentionInfo>,
}

impl ModelInfo {
    /// The length of the last axis of parameter `name` (1 when it has none or is unknown):
    /// the columns of a weight, whose entries are stored row by row.
    pub fn last_axis(&self, name: &str) -> usize {
        self.params
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.shape.last().copied())
            .unwrap_or(1)
    }
}

/// An attention layer: its head count and projection tensors. Head h owns rows
/// `[h·head_dim, (h+1)·head_dim)` of each of q, k and v in the in-projection (weight rows and
/// bias entries) and the same columns of the output-projection weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionInfo {
    pub layer: String,
    /// Layer type (`causal_self_attention`, `multihead_attention`).
    pub kind: String,
    pub heads: usize,
    pub head_dim: usize,
    /// `[3·C, C]`: q, k, v rows.
    pub in_proj_weight: String,
    /// `[3·C]`.
    pub in_proj_bias: Option<String>,
    /// `[C, C]`: the heads' columns.
    pub out_proj_weight: String,
    /// `[C]`: shared by the heads.
    pub out_proj_bias: Option<String>,
}

impl From<crate::net::attention::AttentionLayer> for AttentionInfo {
    fn from(a: crate::net::attention::AttentionLayer) -> AttentionInfo {
        AttentionInfo {
            layer: a.layer,
            kind: a.kind,
            heads: a.heads,
            head_dim: a.head_dim,
            in_proj_weight: a.in_proj_weight,
            in_proj_bias: a.in_proj_bias,
            out_proj_weight: a.out_proj_weight,
            out_proj_bias: a.out_proj_bias,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IntegrationInfo {
    #[serde(flatten)]
    pub settings: Integration,
    /// Arithmetic of the evaluator.
    pub precision: String,
    /// Whether Simpson steps shared the first layer's work between their points (see
    /// docs/performance.md); absent in summaries of older versions.
    #[serde(default)]
    pub shared_first_layer: bool,
    /// The budget policy's outcome (`--policy budget`); absent with the tolerance policy and
    /// in summaries of older versions. In a merged run: the first shard's (each shard has its
    /// own budget, docs/scale-out.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetInfo>,
    /// The engine that evaluated, when it is not the built-in one (`--engine torch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineInfo>,
}

/// Σ|r|/|ΔL| above which analyze warns and `lca check` fails by default (0.1 %).
pub const LARGE_RESIDUAL: f64 = 1e-3;

/// What the budget policy did (docs/integration.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetInfo {
    /// The target Σ|r|/|ΔL|.
    pub target: f64,
    /// The fraction of the target refinement aimed at.
    pub safety: f64,
    /// B = safety · target · |L_T − L_0| (loss units).
    pub bound: f64,
    pub max_evals_factor: f64,
    /// How refinement ended: `met`, `evaluation-cap` or `narrowest`.
    pub ending: crate::lca::budget::Ending,
    /// Distinct points of the run's rule (plain Simpson: 1 + 2S).
    pub evaluations: usize,
    pub plain_evaluations: usize,
    /// Steps with more than one panel.
    pub refined_steps: usize,
    /// What `--converge-layers` did (its evaluations are included in `evaluations`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<LayerConvergence>,
}

/// `--converge-layers REL` in `summary.json` (`integration.budget.layers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerConvergence {
    /// REL: each layer's run-total estimate ≤ REL · max(|layer LCA|, floor · |ΔL|).
    pub rel: f64,
    pub floor: f64,
    /// `met`, or `narrowest` (layers still above their tolerance had nothing left to split).
    pub ending: crate::lca::budget::Ending,
    /// Evaluations the layer refinement added.
    pub evaluations: usize,
    /// The largest estimate ÷ tolerance over the layers, before and after (as planned).
    pub worst_before: f64,
    pub worst_after: f64,
}

/// A foreign evaluation engine as recorded in `summary.json` and the resume journal: a
/// resumed run or a shard must use the same one (the bits depend on it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineInfo {
    /// `torch`.
    pub name: String,
    /// The device it computed on (`cpu`, `cuda:0`, `mps`).
    pub device: String,
    /// `f32` (TF32 off) or `f64`.
    pub precision: String,
    /// The PyTorch version.
    pub torch: String,
    /// Samples per evaluation chunk.
    pub chunk_size: usize,
    /// The model reference the worker loaded.
    pub model: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointRef {
    pub path: String,
    pub step: u64,
    pub step_source: StepSource,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spacing {
    pub min: u64,
    pub max: u64,
    /// True when consecutive analysed checkpoints are more than one training step apart: the
    /// split over parameters then follows the straight chord between them.
    pub sparse: bool,
}

/// One analysed step θ_t → θ_{t+1} (a row of `steps.csv`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub next_step: u64,
    pub loss_before: f64,
    pub loss_after: f64,
    pub delta_loss: f64,
    pub lca_sum: f64,
    pub residual: f64,
    /// L_0 + cumulative ΣLCA up to and including this step (compare with `loss_after`).
    pub reconstructed_loss: f64,
    pub splits: usize,
    pub capped: bool,
    pub evaluations: usize,
    pub helped: u64,
    pub zero: u64,
    pub hurt: u64,
    pub helped_fraction: f64,
    /// Held-out loss along the same path (when a validation set is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss_before: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss_after: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_lca_sum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_residual: Option<f64>,
    /// Change of the L2 term λ‖θ‖² over the step (= its LCA, exactly), when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2_lca: Option<f64>,
}

/// Whole-run figures and the residual report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunTotals {
    pub steps: usize,
    pub loss_first: f64,
    pub loss_last: f64,
    pub delta_loss: f64,
    pub lca_sum: f64,
    pub residual_sum: f64,
    pub residual_abs_sum: f64,
    pub max_abs_residual: f64,
    /// |Σ_t r_t| / |L_T − L_0| (NaN, written as `null`, when L_T = L_0).
    #[serde(deserialize_with = "nan_if_null")]
    pub rel_residual: f64,
    /// Σ_t |r_t| / |L_T − L_0| (per-step errors do not cancel here; NaN, written as `null`,
    /// when L_T = L_0).
    #[serde(deserialize_with = "nan_if_null")]
    pub rel_abs_residual: f64,
    pub evaluations: usize,
    /// Steps whose residual stayed above the bound at the maximum number of splits.
    pub capped_steps: Vec<u64>,
    /// The same figures for the held-out loss, when a validation set is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ResidualReport>,
    /// The L2 term, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2: Option<L2Report>,
}

/// Loss change and residuals of one objective over the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResidualReport {
    pub loss_first: f64,
    pub loss_last: f64,
    pub delta_loss: f64,
    pub lca_sum: f64,
    pub residual_sum: f64,
    pub residual_abs_sum: f64,
    pub max_abs_residual: f64,
    pub rel_residual: f64,
    pub rel_abs_residual: f64,
}

/// The explicit L2 term λ‖θ‖² over the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct L2Report {
    pub lambda: f64,
    pub tensors: Vec<String>,
    pub penalty_first: f64,
    pub penalty_last: f64,
    /// Σ of the L2 column = penalty_last − penalty_first.
    pub lca_sum: f64,
    /// Change of data loss + L2 term.
    pub objective_delta: f64,
}

/// Totals over the run for one tensor or layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupTotal {
    pub name: String,
    pub layer: String,
    pub params: usize,
    pub lca: f64,
    /// Parameters whose LCA summed over the run is negative / zero / positive.
    pub helped: u64,
    pub zero: u64,
    pub hurt: u64,
    pub helped_fraction: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_lca: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2_lca: Option<f64>,
    /// Error estimate of `lca` over the run: √(Σ_t est_t²) (docs/integration.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lca_err: Option<f64>,
}

/// JSON has no NaN: serde_json writes it as `null`; read `null` back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}
