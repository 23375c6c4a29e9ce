//! The model spec (`model.toml`): architecture, loss, training set and evaluation settings.
//!
//! The architecture is a list of named layers (`[[layers]]`) whose names are PyTorch module
//! names, so that a layer named `fc1` of type `linear` owns the parameters `fc1.weight` and
//! `fc1.bias` of a `state_dict`. By default each layer reads the output of the layer before it
//! (a sequential model); a layer may instead name its input(s) with `input = "name"` or
//! `input = ["a", "b"]`, which is how residual (add) connections are written.
//!
//! Unknown keys are errors that name the key and the line. Every key is documented in
//! `docs/spec.md`.
//!
//! ```
//! let src = r#"
//! [[layers]]
//! name = "fc1"
//! type = "linear"
//! in_features = 4
//! out_features = 3
//!
//! [loss]
//! type = "cross_entropy"
//!
//! [data]
//! train = "train.safetensors"
//! "#;
//! let spec = lca::spec::Spec::parse(src, std::path::Path::new("model.toml")).unwrap();
//! assert_eq!(spec.layers.len(), 1);
//! assert_eq!(spec.eval.chunk_size, 256);
//! ```

use crate::error::{LcaError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A parsed and validated model spec.
#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    /// Path of the spec file as given.
    pub path: PathBuf,
    #[serde(skip)]
    /// Full text of the spec file (kept for error lines and hashing).
    pub source: String,
    pub model: ModelSection,
    pub layers: Vec<LayerSpec>,
    pub loss: LossSpec,
    pub data: DataSpec,
    pub eval: EvalSection,
    pub regularization: Option<Regularization>,
}

/// `[regularization]`: an explicit L2 term λ‖θ‖² in the objective. Its LCA has the closed
/// form λ(θ_{t+1}² − θ_t²) per parameter and is reported in its own column, so either the data
/// loss or the full objective can be decomposed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Regularization {
    /// λ in λ‖θ‖² (PyTorch's SGD `weight_decay = wd` corresponds to λ = wd / 2).
    pub l2: f64,
    /// Parameter tensors (full `state_dict` names) the term applies to; default: all.
    #[serde(default)]
    pub tensors: Option<Vec<String>>,
}

/// `[model]`: global settings of the architecture.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Prepended to every parameter name (e.g. `"module."` for DataParallel checkpoints).
    #[serde(default)]
    pub prefix: String,
    /// Per-sample input shape after preprocessing; defaults to the data's per-sample shape.
    /// When given and different from the data's shape with the same number of elements, the
    /// data is reshaped (e.g. `[1, 8, 8]` for `[N, 64]` pixels).
    #[serde(default)]
    pub input_shape: Option<Vec<usize>>,
    /// How batch norm layers normalise: `"batch-stats"` or `"running-stats"`. Required when
    /// the model has batch norm layers; recorded in every output.
    #[serde(default)]
    pub batch_norm: Option<BnMode>,
}

/// Which statistics normalise a batch norm layer's input (`[model] batch_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BnMode {
    /// The mean and biased variance of each evaluation chunk (the LCA study's choice).
    BatchStats,
    /// The checkpoints' `running_mean` / `running_var` buffers (PyTorch's `model.eval()`).
    RunningStats,
}

/// One `[[layers]]` entry.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSpec {
    /// Module name (parameter prefix); generated as `<type>_<index>` when absent.
    pub name: String,
    /// Whether the name was written in the spec.
    pub named: bool,
    /// Names of the layers this one reads; empty = the previous layer (or the input).
    pub input: Vec<String>,
    /// The layer type and its settings.
    pub kind: LayerKind,
    /// 1-based line of the `[[layers]]` header in the spec file.
    pub line: usize,
    /// `tied = { weight = "transformer.wte.weight" }`: parameters (by suffix) that are another
    /// `state_dict` name (without `model.prefix`). Two layers naming the same tensor share one
    /// parameter (weight tying); the layer's own name for it is accepted in checkpoints too.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tied: Vec<(String, String)>,
}

fn default_true() -> bool {
    true
}

fn default_leaky_slope() -> f32 {
    0.01
}

fn default_start_dim() -> i64 {
    1
}

fn default_end_dim() -> i64 {
    -1
}

/// Layer types and their settings, with PyTorch's argument names.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerKind {
    /// `nn.Linear`: weight `[out_features, in_features]`, bias `[out_features]`.
    Linear {
        in_features: usize,
        out_features: usize,
        #[serde(default = "default_true")]
        bias: bool,
    },
    /// `nn.ReLU`.
    Relu {},
    /// `nn.LeakyReLU`.
    LeakyRelu {
        #[serde(default = "default_leaky_slope")]
        negative_slope: f32,
    },
    /// `nn.Tanh`.
    Tanh {},
    /// `nn.Sigmoid`.
    Sigmoid {},
    /// `nn.GELU`, `approximate = "none"` (exact, erf) or `"tanh"`.
    Gelu {
        #[serde(default)]
        approximate: GeluApprox,
    },
    /// `nn.Identity`.
    Identity {},
    /// `nn.Flatten(start_dim, end_dim)` in C order; dims count the batch axis as 0.
    Flatten {
        #[serde(default = "default_start_dim")]
        start_dim: i64,
        #[serde(default = "default_end_dim")]
        end_dim: i64,
    },
    /// `nn.Dropout`: identity, because evaluation is deterministic.
    Dropout {
        #[serde(default)]
        p: f32,
    },
    /// Element-wise sum of the layers named in `input` (a residual join).
    Add {},
    /// `nn.BatchNorm1d` over axis 1 of `[N, C]` or `[N, C, L]`.
    BatchNorm1d(BatchNormSpec),
    /// `nn.BatchNorm2d` over axis 1 of `[N, C, H, W]`.
    BatchNorm2d(BatchNormSpec),
    /// `nn.Conv2d` on `[channels, height, width]` samples: weight
    /// `[out_channels, in_channels / groups, kh, kw]`, bias `[out_channels]`.
    Conv2d {
        in_channels: usize,
        out_channels: usize,
        kernel_size: Pair,
        #[serde(default = "Pair::one")]
        stride: Pair,
        #[serde(default)]
        padding: Padding,
        #[serde(default = "Pair::one")]
        dilation: Pair,
        #[serde(default = "default_one")]
        groups: usize,
        #[serde(default = "default_true")]
        bias: bool,
    },
    /// `nn.MaxPool2d`: padding counts as −∞; `stride` defaults to `kernel_size`.
    MaxPool2d {
        kernel_size: Pair,
        #[serde(default)]
        stride: Option<Pair>,
        #[serde(default)]
        padding: Pair,
        #[serde(default = "Pair::one")]
        dilation: Pair,
        /// Only `false` (PyTorch's default) is supported.
        #[serde(default)]
        ceil_mode: bool,
    },
    /// `nn.AvgPool2d`: `stride` defaults to `kernel_size`.
    AvgPool2d {
        kernel_size: Pair,
        #[serde(default)]
        stride: Option<Pair>,
        #[serde(default)]
        padding: Pair,
        /// Only `false` (PyTorch's default) is supported.
        #[serde(default)]
        ceil_mode: bool,
        #[serde(default = "default_true")]
        count_include_pad: bool,
        #[serde(default)]
        divisor_override: Option<usize>,
    },
    /// `nn.AdaptiveAvgPool2d(output_size)`: `[C, H, W]` → `[C, oh, ow]`.
    AdaptiveAvgPool2d { output_size: Pair },
    /// Mean over the two spatial axes: `[C, H, W]` → `[C]` (`AdaptiveAvgPool2d(1)` followed by
    /// `Flatten()`).
    GlobalAvgPool {},
    /// `nn.Embedding`: weight `[num_embeddings, embedding_dim]`; its input holds integer ids.
    Embedding {
        num_embeddings: usize,
        embedding_dim: usize,
        #[serde(default)]
        padding_idx: Option<i64>,
    },
    /// A learned positional embedding (nanoGPT's `wpe`): an `nn.Embedding(block_size, C)`
    /// looked up at positions `0..T`, where T is axis 1 of its input; output `[T, C]` per sample.
    PositionalEmbedding {
        num_embeddings: usize,
        embedding_dim: usize,
    },
    /// `nn.LayerNorm(normalized_shape)` over the last axis.
    LayerNorm {
        normalized_shape: usize,
        #[serde(default = "default_ln_eps")]
        eps: f64,
        #[serde(default = "default_true")]
        elementwise_affine: bool,
        #[serde(default = "default_true")]
        bias: bool,
    },
    /// nanoGPT's `CausalSelfAttention`: `c_attn` (q, k, v) and `c_proj`, causal mask.
    CausalSelfAttention {
        n_embd: usize,
        n_head: usize,
        #[serde(default = "default_true")]
        bias: bool,
        /// Accepted for compatibility; dropout is the identity in evaluation.
        #[serde(default)]
        dropout: f32,
    },
    /// `nn.MultiheadAttention(embed_dim, num_heads)` used as self-attention (query = key =
    /// value = the input), with a causal mask unless `causal = false`.
    MultiheadAttention {
        embed_dim: usize,
        num_heads: usize,
        #[serde(default = "default_true")]
        causal: bool,
        #[serde(default = "default_true")]
        bias: bool,
        /// Accepted for compatibility; dropout is the identity in evaluation.
        #[serde(default)]
        dropout: f32,
        /// Accepted for compatibility; the evaluator's activations are always `[N, T, C]`.
        #[serde(default)]
        batch_first: Option<bool>,
    },
}

fn default_one() -> usize {
    1
}

/// A size that PyTorch accepts as one integer or a pair (height, width): `3` or `[3, 5]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pair(pub [usize; 2]);

impl Pair {
    /// `(1, 1)`.
    pub fn one() -> Pair {
        Pair([1, 1])
    }
}

impl std::fmt::Display for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0[0] == self.0[1] {
            write!(f, "{}", self.0[0])
        } else {
            write!(f, "[{}, {}]", self.0[0], self.0[1])
        }
    }
}

/// As written: one integer when height and width agree, else the pair.
impl Serialize for Pair {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.0[0] == self.0[1] {
            self.0[0].serialize(s)
        } else {
            self.0.serialize(s)
        }
    }
}

/// Visitor for [`Pair`] and the numeric forms of [`Padding`].
struct PairVisitor {
    /// Whether the strings `"same"` and `"valid"` are accepted (padding only).
    padding: bool,
}

impl<'de> serde::de::Visitor<'de> for PairVisitor {
    type Value = Padding;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        if self.padding {
            f.write_str("a non-negative integer, an array of two, \"same\" or \"valid\"")
        } else {
            f.write_str("a non-negative integer or an array of two")
        }
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Padding, E> {
        let v = usize::try_from(v).map_err(|_| E::custom(format!("{v} is too large")))?;
        Ok(Padding::Explicit(Pair([v, v])))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Padding, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self)),
        }
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Padding, E> {
        match v {
            "same" if self.padding => Ok(Padding::Same),
            "valid" if self.padding => Ok(Padding::Valid),
            _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
        }
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Padding, A::Error> {
        use serde::de::Error;
        let mut v = Vec::with_capacity(2);
        while let Some(x) = seq.next_element::<i64>()? {
            v.push(x);
        }
        match v[..] {
            [a, b] if a >= 0 && b >= 0 => Ok(Padding::Explicit(Pair([a as usize, b as usize]))),
            _ => Err(A::Error::invalid_value(
                serde::de::Unexpected::Other(&format!("{v:?}")),
                &self,
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Pair {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Pair, D::Error> {
        match d.deserialize_any(PairVisitor { padding: false })? {
            Padding::Explicit(p) => Ok(p),
            Padding::Same | Padding::Valid => unreachable!("strings are refused without padding"),
        }
    }
}

/// `nn.Conv2d`'s `padding`: an integer, a pair (height, width), `"same"` or `"valid"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Explicit(Pair),
    /// Output size = input size (stride 1 only). The total padding `dilation·(kernel − 1)` is
    /// split as PyTorch does: half (rounded down) before, the rest after (bottom / right).
    Same,
    /// No padding.
    Valid,
}

impl Default for Padding {
    fn default() -> Self {
        Padding::Explicit(Pair([0, 0]))
    }
}

impl Serialize for Padding {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Padding::Explicit(p) => p.serialize(s),
            Padding::Same => s.serialize_str("same"),
            Padding::Valid => s.serialize_str("valid"),
        }
    }
}

impl<'de> Deserialize<'de> for Padding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Padding, D::Error> {
        d.deserialize_any(PairVisitor { padding: true })
    }
}

fn default_ln_eps() -> f64 {
    1e-5
}

/// Settings of a batch norm layer, with PyTorch's argument names.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchNormSpec {
    pub num_features: usize,
    #[serde(default = "default_bn_eps")]
    pub eps: f64,
    /// Accepted for compatibility with PyTorch's signature; has no effect on evaluation.
    #[serde(default)]
    pub momentum: Option<f64>,
    #[serde(default = "default_true")]
    pub affine: bool,
    /// When false, PyTorch normalises with batch statistics even in eval mode; so does lca.
    #[serde(default = "default_true")]
    pub track_running_stats: bool,
}

fn default_bn_eps() -> f64 {
    1e-5
}

/// GELU variant, as PyTorch's `approximate` argument.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GeluApprox {
    #[default]
    None,
    Tanh,
}

/// The first of `sizes` that is 0, as (key, message): a size of 0 makes empty tensors.
fn nonzero(sizes: &[(&'static str, usize)]) -> std::result::Result<(), (&'static str, String)> {
    match sizes.iter().find(|(_, v)| *v == 0) {
        Some((key, _)) => Err((key, format!("`{key}` must be at least 1"))),
        None => Ok(()),
    }
}

impl LayerKind {
    /// The `type` string of this layer.
    pub fn type_name(&self) -> &'static str {
        match self {
            LayerKind::Linear { .. } => "linear",
            LayerKind::Relu {} => "relu",
            LayerKind::LeakyRelu { .. } => "leaky_relu",
            LayerKind::Tanh {} => "tanh",
            LayerKind::Sigmoid {} => "sigmoid",
            LayerKind::Gelu { .. } => "gelu",
            LayerKind::Identity {} => "identity",
            LayerKind::Flatten { .. } => "flatten",
            LayerKind::Dropout { .. } => "dropout",
            LayerKind::Add {} => "add",
            LayerKind::BatchNorm1d(_) => "batch_norm1d",
            LayerKind::BatchNorm2d(_) => "batch_norm2d",
            LayerKind::Conv2d { .. } => "conv2d",
            LayerKind::MaxPool2d { .. } => "max_pool2d",
            LayerKind::AvgPool2d { .. } => "avg_pool2d",
            LayerKind::AdaptiveAvgPool2d { .. } => "adaptive_avg_pool2d",
            LayerKind::GlobalAvgPool {} => "global_avg_pool",
            LayerKind::Embedding { .. } => "embedding",
            LayerKind::PositionalEmbedding { .. } => "positional_embedding",
            LayerKind::LayerNorm { .. } => "layer_norm",
            LayerKind::CausalSelfAttention { .. } => "causal_self_attention",
            LayerKind::MultiheadAttention { .. } => "multihead_attention",
        }
    }

    /// Sizes of 0, which make empty tensors that no layer computes with (found by the `model`
    /// fuzz target: a linear layer with `out_features = 0` reached a matrix product), as
    /// (key, message).
    fn check_sizes(&self) -> std::result::Result<(), (&'static str, String)> {
        match self {
            LayerKind::Linear {
                in_features,
                out_features,
                ..
            } => nonzero(&[
                ("in_features", *in_features),
                ("out_features", *out_features),
            ]),
            LayerKind::Embedding {
                num_embeddings,
                embedding_dim,
                ..
            }
            | LayerKind::PositionalEmbedding {
                num_embeddings,
                embedding_dim,
                ..
            } => nonzero(&[
                ("num_embeddings", *num_embeddings),
                ("embedding_dim", *embedding_dim),
            ]),
            LayerKind::LayerNorm {
                normalized_shape, ..
            } => nonzero(&[("normalized_shape", *normalized_shape)]),
            LayerKind::BatchNorm1d(b) | LayerKind::BatchNorm2d(b) => {
                nonzero(&[("num_features", b.num_features)])
            }
            LayerKind::CausalSelfAttention { n_embd, n_head, .. } => {
                nonzero(&[("n_embd", *n_embd), ("n_head", *n_head)])
            }
            LayerKind::MultiheadAttention {
                embed_dim,
                num_heads,
                ..
            } => nonzero(&[("embed_dim", *embed_dim), ("num_heads", *num_heads)]),
            _ => Ok(()),
        }
    }

    /// Settings that PyTorch would refuse, as (key, message). Shapes are checked later, when
    /// the model is built for the data's input shape.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        self.check_sizes()?;
        let at_least_one = |key: &'static str, p: Pair| {
            if p.0.contains(&0) {
                Err((key, format!("`{key}` must be at least 1, got {p}")))
            } else {
                Ok(())
            }
        };
        // The dilated kernel's extent, dilation·(kernel − 1) + 1, unless it overflows.
        let span_of = |kernel: Pair, dilation: Pair| {
            let span = [0, 1].map(|a| {
                dilation.0[a]
                    .checked_mul(kernel.0[a] - 1)
                    .and_then(|v| v.checked_add(1))
            });
            match span {
                [Some(h), Some(w)] => Ok([h, w]),
                _ => Err((
                    "kernel_size",
                    format!("`kernel_size` = {kernel} with `dilation` = {dilation} is too large"),
                )),
            }
        };
        // PyTorch's pools: "pad should be at most half of (effective) kernel size".
        let half_kernel = |padding: Pair, kernel: Pair, dilation: Pair| {
            let span = span_of(kernel, dilation)?;
            match (0..2).find(|&a| padding.0[a] > span[a] / 2) {
                Some(a) => Err((
                    "padding",
                    format!(
                        "`padding` = {padding} must be at most half of the {}kernel size {} (PyTorch's rule)",
                        if dilation == Pair::one() {
                            ""
                        } else {
                            "effective "
                        },
                        span[a]
                    ),
                )),
                None => Ok(()),
            }
        };
        let no_ceil = |ceil_mode: bool| {
            if ceil_mode {
                Err((
                    "ceil_mode",
                    "`ceil_mode = true` is not supported; only PyTorch's default `false` is"
                        .to_string(),
                ))
            } else {
                Ok(())
            }
        };
        // Numbers the evaluator uses as they are: refused here, at their key, rather than
        // met later as a NaN gradient blamed on a checkpoint.
        match self {
            LayerKind::LayerNorm { eps, .. }
            | LayerKind::BatchNorm1d(BatchNormSpec { eps, .. })
            | LayerKind::BatchNorm2d(BatchNormSpec { eps, .. })
                if !(eps.is_finite() && *eps > 0.0) =>
            {
                return Err((
                    "eps",
                    format!("`eps` must be a finite number > 0, got {eps}"),
                ));
            }
            LayerKind::LeakyRelu { negative_slope } if !negative_slope.is_finite() => {
                return Err((
                    "negative_slope",
                    format!("`negative_slope` must be a finite number, got {negative_slope}"),
                ));
            }
            LayerKind::Dropout { p: v }
            | LayerKind::CausalSelfAttention { dropout: v, .. }
            | LayerKind::MultiheadAttention { dropout: v, .. }
                if !(0.0..=1.0).contains(v) =>
            {
                let key = if matches!(self, LayerKind::Dropout { .. }) {
                    "p"
                } else {
                    "dropout"
                };
                return Err((
                    key,
                    format!("`{key}` must be a probability in [0, 1], got {v}"),
                ));
            }
            _ => {}
        }
        match self {
            LayerKind::Conv2d {
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation,
                groups,
                ..
            } => {
                at_least_one("kernel_size", *kernel_size)?;
                at_least_one("stride", *stride)?;
                at_least_one("dilation", *dilation)?;
                span_of(*kernel_size, *dilation)?;
                nonzero(&[
                    ("in_channels", *in_channels),
                    ("out_channels", *out_channels),
                    ("groups", *groups),
                ])?;
                for (key, v) in [
                    ("in_channels", *in_channels),
                    ("out_channels", *out_channels),
                ] {
                    if v % groups != 0 {
                        return Err((
                            "groups",
                            format!("`{key}` = {v} must be divisible by `groups` = {groups}"),
                        ));
                    }
                }
                if *padding == Padding::Same && *stride != Pair::one() {
                    return Err((
                        "padding",
                        format!(
                            "`padding = \"same\"` needs stride 1 (PyTorch refuses it for strided convolutions), got stride {stride}"
                        ),
                    ));
                }
                Ok(())
            }
            LayerKind::MaxPool2d {
                kernel_size,
                stride,
                padding,
                dilation,
                ceil_mode,
            } => {
                at_least_one("kernel_size", *kernel_size)?;
                if let Some(s) = stride {
                    at_least_one("stride", *s)?;
                }
                at_least_one("dilation", *dilation)?;
                half_kernel(*padding, *kernel_size, *dilation)?;
                no_ceil(*ceil_mode)
            }
            LayerKind::AvgPool2d {
                kernel_size,
                stride,
                padding,
                ceil_mode,
                divisor_override,
                ..
            } => {
                at_least_one("kernel_size", *kernel_size)?;
                if let Some(s) = stride {
                    at_least_one("stride", *s)?;
                }
                half_kernel(*padding, *kernel_size, Pair::one())?;
                if *divisor_override == Some(0) {
                    return Err((
                        "divisor_override",
                        "`divisor_override` must not be 0".into(),
                    ));
                }
                no_ceil(*ceil_mode)
            }
            LayerKind::AdaptiveAvgPool2d { output_size } => {
                at_least_one("output_size", *output_size)
            }
            _ => Ok(()),
        }
    }
}

/// `[loss]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LossSpec {
    /// Mean softmax cross-entropy of the last layer's output (logits) against class indices.
    CrossEntropy {},
    /// Mean squared error over every element (PyTorch `MSELoss(reduction="mean")`).
    Mse {},
}

/// `[data]`: the training set and its preprocessing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Training set file (`.safetensors` or `.npz`), relative to the spec file's directory.
    pub train: PathBuf,
    /// Name of the input tensor in the file.
    #[serde(default = "default_x")]
    pub x: String,
    /// Name of the target tensor in the file.
    #[serde(default = "default_y")]
    pub y: String,
    /// Name of a `[N, T+1]` tensor of token ids, instead of `x` and `y`: the inputs are its
    /// first T columns and the targets its last T (next-token prediction).
    #[serde(default)]
    pub tokens: Option<String>,
    /// Multiply inputs by this first (e.g. `1/255`).
    #[serde(default)]
    pub scale: Option<f64>,
    /// Then subtract this: one value, or one per feature/channel (axis 1 of x).
    #[serde(default)]
    pub mean: Option<Vec<f64>>,
    /// Then divide by this: one value, or one per feature/channel.
    #[serde(default)]
    pub std: Option<Vec<f64>>,
    /// Optional held-out set (same tensor names and preprocessing): its loss is allocated
    /// along the same path, beside the training loss.
    #[serde(default)]
    pub validation: Option<PathBuf>,
}

fn default_x() -> String {
    "x".into()
}

fn default_y() -> String {
    "y".into()
}

/// `[eval]`: how the full-training-set loss is evaluated.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Samples per chunk. Chunks are evaluated in parallel and combined in a fixed order.
    #[serde(default = "default_chunk")]
    pub chunk_size: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            chunk_size: default_chunk(),
        }
    }
}

fn default_chunk() -> usize {
    256
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(default)]
    model: ModelSection,
    layers: Vec<toml::Spanned<toml::Table>>,
    loss: LossSpec,
    data: DataSpec,
    #[serde(default)]
    eval: EvalSection,
    #[serde(default)]
    regularization: Option<Regularization>,
}

/// Spec files larger than this are refused before they are read (a spec of 100,000 layers
/// is a few megabytes).
pub const MAX_SPEC_BYTES: u64 = 64 << 20;

impl Spec {
    /// Read and parse a spec file.
    pub fn load(path: &Path) -> Result<Spec> {
        if path.is_dir() {
            return Err(LcaError::Spec {
                path: path.to_path_buf(),
                line: None,
                msg: "is a directory, not a spec file (model.toml)".into(),
            });
        }
        let bytes = crate::files::read_regular(path, MAX_SPEC_BYTES, "a spec")?;
        let source = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let bytes = e.as_bytes();
            LcaError::Spec {
                path: path.to_path_buf(),
                line: Some(bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1),
                msg: format!(
                    "not UTF-8 text (byte 0x{:02x} at offset {at}): a spec is a TOML text file",
                    bytes.get(at).copied().unwrap_or(0)
                ),
            }
        })?;
        Spec::parse(&source, path)
    }

    /// Parse spec text; `path` is used in messages and to resolve relative data paths.
    pub fn parse(source: &str, path: &Path) -> Result<Spec> {
        let err = |line: Option<usize>, msg: String| LcaError::Spec {
            path: path.to_path_buf(),
            line,
            msg,
        };
        let raw: RawSpec = toml::from_str(source).map_err(|e| {
            let line = e.span().map(|s| line_of(source, s.start));
            let msg = e.message().trim().to_string();
            err(line, msg)
        })?;
        let mut layers = Vec::with_capacity(raw.layers.len());
        // Lines of layer offsets by binary search: counting newlines from the start for each
        // layer made parsing quadratic in the number of layers.
        let newlines: Vec<usize> = source
            .bytes()
            .enumerate()
            .filter(|&(_, b)| b == b'\n')
            .map(|(i, _)| i)
            .collect();
        let line_at = |offset: usize| newlines.partition_point(|&i| i < offset) + 1;
        for (index, spanned) in raw.layers.into_iter().enumerate() {
            let start = spanned.span().start;
            let line = line_at(start);
            let mut table = spanned.into_inner();
            let name = match table.remove("name") {
                None => None,
                Some(toml::Value::String(s)) if !s.is_empty() => Some(s),
                Some(_) => {
                    return Err(err(
                        key_line(source, start, "name").or(Some(line)),
                        format!("layer #{}: `name` must be a non-empty string", index + 1),
                    ));
                }
            };
            let label = match &name {
                Some(n) => format!("layer #{} '{n}'", index + 1),
                None => format!("layer #{}", index + 1),
            };
            let input = match table.remove("input") {
                None => vec![],
                Some(toml::Value::String(s)) => vec![s],
                Some(toml::Value::Array(a)) => {
                    let mut v = Vec::new();
                    for item in a {
                        match item {
                            toml::Value::String(s) => v.push(s),
                            _ => {
                                return Err(err(
                                    key_line(source, start, "input").or(Some(line)),
                                    format!(
                                        "{label}: `input` must be a layer name or a list of layer names"
                                    ),
                                ));
                            }
                        }
                    }
                    v
                }
                Some(_) => {
                    return Err(err(
                        key_line(source, start, "input").or(Some(line)),
                        format!("{label}: `input` must be a layer name or a list of layer names"),
                    ));
                }
            };
            let tied = match table.remove("tied") {
                None => vec![],
                Some(toml::Value::Table(t)) => {
                    let mut v = Vec::new();
                    for (suffix, target) in t {
                        match target {
                            toml::Value::String(s) if !s.is_empty() => v.push((suffix, s)),
                            _ => {
                                return Err(err(
                                    key_line(source, start, "tied").or(Some(line)),
                                    format!(
                                        "{label}: `tied.{suffix}` must be the state_dict name of a tensor, e.g. \"transformer.wte.weight\""
                                    ),
                                ));
                            }
                        }
                    }
                    v
                }
                Some(_) => {
                    return Err(err(
                        key_line(source, start, "tied").or(Some(line)),
                        format!(
                            "{label}: `tied` must be a table such as `tied = {{ weight = \"transformer.wte.weight\" }}`"
                        ),
                    ));
                }
            };
            if !table.contains_key("type") {
                return Err(err(Some(line), format!("{label}: missing key `type`")));
            }
            let kind: LayerKind = toml::Value::Table(table.clone()).try_into().map_err(|e| {
                let msg = e.message().trim().to_string();
                let culprit = if unknown_field(&msg).is_none() && !msg.contains("unknown variant") {
                    invalid_key(&table)
                } else {
                    None
                };
                let line = unknown_field(&msg)
                    .or(culprit.as_deref())
                    .and_then(|k| key_line(source, start, k))
                    .or_else(|| {
                        if msg.contains("unknown variant") {
                            key_line(source, start, "type")
                        } else {
                            None
                        }
                    })
                    .unwrap_or(line);
                match culprit {
                    Some(k) => err(Some(line), format!("{label}: `{k}`: {msg}")),
                    None => err(Some(line), format!("{label}: {msg}")),
                }
            })?;
            if let Err((key, msg)) = kind.check() {
                return Err(err(
                    key_line(source, start, key).or(Some(line)),
                    format!("{label}: {msg}"),
                ));
            }
            let named = name.is_some();
            let name = name.unwrap_or_else(|| format!("{}_{}", kind.type_name(), index));
            layers.push(LayerSpec {
                name,
                named,
                input,
                kind,
                line,
                tied,
            });
        }
        let spec = Spec {
            path: path.to_path_buf(),
            source: source.to_string(),
            model: raw.model,
            layers,
            loss: raw.loss,
            data: raw.data,
            eval: raw.eval,
            regularization: raw.regularization,
        };
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<()> {
        let err = |line: Option<usize>, msg: String| LcaError::Spec {
            path: self.path.clone(),
            line,
            msg,
        };
        if self.layers.is_empty() {
            return Err(err(
                None,
                "`layers` is empty: the model needs at least one layer".into(),
            ));
        }
        if self.eval.chunk_size == 0 {
            return Err(err(
                section_key_line(&self.source, "eval", "chunk_size"),
                "`eval.chunk_size` must be at least 1".into(),
            ));
        }
        let mut seen = std::collections::HashMap::new();
        for l in &self.layers {
            if let Some(prev) = seen.insert(l.name.as_str(), l.line) {
                return Err(err(
                    Some(l.line),
                    format!(
                        "layer name '{}' is used twice (also on line {prev})",
                        l.name
                    ),
                ));
            }
            if l.name == "input" {
                return Err(err(
                    Some(l.line),
                    "layer name 'input' is reserved for the model input".into(),
                ));
            }
        }
        if let Some(r) = &self.regularization
            && !(r.l2.is_finite() && r.l2 >= 0.0)
        {
            return Err(err(
                section_key_line(&self.source, "regularization", "l2"),
                format!(
                    "`regularization.l2` must be a finite number ≥ 0, got {}",
                    r.l2
                ),
            ));
        }
        if let Some(tok) = &self.data.tokens {
            for key in ["x", "y", "scale", "mean", "std"] {
                if let Some(line) = section_key_line(&self.source, "data", key) {
                    return Err(err(
                        Some(line),
                        format!(
                            "`data.{key}` cannot be combined with `data.tokens = \"{tok}\"`: the inputs are the first T token ids of each row and the targets the last T, used as they are"
                        ),
                    ));
                }
            }
        }
        for (key, v) in [
            ("scale", self.data.scale.map(|s| vec![s])),
            ("mean", self.data.mean.clone()),
            ("std", self.data.std.clone()),
        ] {
            if let Some(v) = v {
                if v.is_empty() || v.iter().any(|x| !x.is_finite()) {
                    return Err(err(
                        section_key_line(&self.source, "data", key),
                        format!("`data.{key}` must be finite numbers (one, or one per channel)"),
                    ));
                }
                if key == "std" && v.contains(&0.0) {
                    return Err(err(
                        section_key_line(&self.source, "data", key),
                        "`data.std` must not be 0".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Directory against which relative paths in the spec are resolved.
    pub fn base_dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// The training set path, resolved against the spec's directory.
    pub fn train_path(&self) -> PathBuf {
        self.base_dir().join(&self.data.train)
    }

    /// The validation set path, if any, resolved against the spec's directory.
    pub fn validation_path(&self) -> Option<PathBuf> {
        self.data
            .validation
            .as_ref()
            .map(|p| self.base_dir().join(p))
    }

    /// Line of `key` in `[section]`, for messages about values checked after parsing.
    pub fn line_of_key(&self, section: &str, key: &str) -> Option<usize> {
        section_key_line(&self.source, section, key)
    }

    /// The full `state_dict` name of a layer's parameter (`prefix` + `layer.suffix`).
    pub fn param_name(&self, layer: &str, suffix: &str) -> String {
        format!("{}{}.{}", self.model.prefix, layer, suffix)
    }
}

/// 1-based line number of a byte offset.
pub fn line_of(source: &str, offset: usize) -> usize {
    source[..offset.min(source.len())].matches('\n').count() + 1
}

/// Line of `key = ...` at or after `from`, within the same table (before the next header).
fn key_line(source: &str, from: usize, key: &str) -> Option<usize> {
    let first = line_of(source, from);
    for (i, l) in source.lines().enumerate().skip(first - 1) {
        let t = l.trim_start();
        if i + 1 > first && t.starts_with('[') {
            break;
        }
        if let Some(rest) = t.strip_prefix(key) {
            let rest = rest.trim_start();
            if rest.starts_with('=') {
                return Some(i + 1);
            }
        }
    }
    None
}

/// Line of `key = ...` inside the `[section]` table.
fn section_key_line(source: &str, section: &str, key: &str) -> Option<usize> {
    let header = format!("[{section}]");
    let mut offset = 0;
    for l in source.split_inclusive('\n') {
        if l.trim() == header {
            return key_line(source, offset, key);
        }
        offset += l.len();
    }
    None
}

/// The key of a layer table whose value fails to deserialize (serde's messages about a bad
/// value do not name the key): the first key whose removal makes the error go away or turn
/// into "missing field" for that key.
fn invalid_key(table: &toml::Table) -> Option<String> {
    table.keys().filter(|k| *k != "type").find_map(|k| {
        let mut t = table.clone();
        t.remove(k);
        match toml::Value::Table(t).try_into::<LayerKind>() {
            Ok(_) => Some(k.clone()),
            Err(e) if e.message().contains(&format!("missing field `{k}`")) => Some(k.clone()),
            Err(_) => None,
        }
    })
}

fn unknown_field(msg: &str) -> Option<&str> {
    let rest = msg.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
prefix = "module."

[[layers]]
name = "fc1"
type = "linear"
in_features = 4
out_features = 3

[[layers]]
type = "relu"

[[layers]]
name = "fc2"
type = "linear"
in_features = 3
out_features = 2
bias = false

[loss]
type = "cross_entropy"

[data]
train = "d/train.npz"
scale = 0.5
"#;

    #[test]
    fn parses_good_spec() {
        let s = Spec::parse(GOOD, Path::new("dir/model.toml")).unwrap();
        assert_eq!(s.layers.len(), 3);
        assert_eq!(s.layers[1].name, "relu_1");
        assert!(!s.layers[1].named);
        assert_eq!(s.layers[2].line, 14);
        assert_eq!(
            s.layers[2].kind,
            LayerKind::Linear {
                in_features: 3,
                out_features: 2,
                bias: false
            }
        );
        assert_eq!(s.param_name("fc1", "weight"), "module.fc1.weight");
        assert_eq!(s.train_path(), PathBuf::from("dir/d/train.npz"));
    }

    #[test]
    fn unknown_layer_key_names_key_and_line() {
        let src = GOOD.replace("bias = false", "bais = false");
        let e = Spec::parse(&src, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.toml:19"), "{e}");
        assert!(e.contains("bais"), "{e}");
        assert!(e.contains("'fc2'"), "{e}");
    }

    #[test]
    fn unknown_top_level_key_names_key_and_line() {
        let src = GOOD.replace("scale = 0.5", "scale = 0.5\nshuffle = true");
        let e = Spec::parse(&src, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("shuffle"), "{e}");
        assert!(e.contains("m.toml:27"), "{e}");
    }

    #[test]
    fn unknown_type_names_line() {
        let src = GOOD.replace("type = \"relu\"", "type = \"relu6\"");
        let e = Spec::parse(&src, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.toml:12"), "{e}");
        assert!(e.contains("relu6"), "{e}");
    }

    #[test]
    fn duplicate_names_rejected() {
        let src = GOOD.replace("name = \"fc2\"", "name = \"fc1\"");
        let e = Spec::parse(&src, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("used twice"), "{e}");
    }

    const CONV: &str = r#"
[model]
input_shape = [1, 28, 28]

[[layers]]
name = "conv1"
type = "conv2d"
in_channels = 1
out_channels = 20
kernel_size = 5
padding = "same"

[[layers]]
type = "max_pool2d"
kernel_size = 2

[[layers]]
name = "conv2"
type = "conv2d"
in_channels = 20
out_channels = 40
kernel_size = [5, 3]
stride = [2, 1]
padding = [2, 1]
dilation = 1
groups = 4
bias = false

[[layers]]
type = "avg_pool2d"
kernel_size = 3
stride = 1
padding = 1
count_include_pad = false

[[layers]]
type = "adaptive_avg_pool2d"
output_size = [2, 1]

[[layers]]
type = "global_avg_pool"

[loss]
type = "cross_entropy"

[data]
train = "x.safetensors"
"#;

    #[test]
    fn parses_conv_and_pool_layers() {
        let s = Spec::parse(CONV, Path::new("m.toml")).unwrap();
        assert_eq!(
            s.layers[0].kind,
            LayerKind::Conv2d {
                in_channels: 1,
                out_channels: 20,
                kernel_size: Pair([5, 5]),
                stride: Pair([1, 1]),
                padding: Padding::Same,
                dilation: Pair([1, 1]),
                groups: 1,
                bias: true
            }
        );
        assert_eq!(
            s.layers[1].kind,
            LayerKind::MaxPool2d {
                kernel_size: Pair([2, 2]),
                stride: None,
                padding: Pair([0, 0]),
                dilation: Pair([1, 1]),
                ceil_mode: false
            }
        );
        match &s.layers[2].kind {
            LayerKind::Conv2d {
                kernel_size,
                stride,
                padding,
                groups,
                bias,
                ..
            } => {
                assert_eq!(
                    (*kernel_size, *stride, *padding),
                    (Pair([5, 3]), Pair([2, 1]), Padding::Explicit(Pair([2, 1])))
                );
                assert_eq!((*groups, *bias), (4, false));
            }
            k => panic!("{k:?}"),
        }
        match &s.layers[3].kind {
            LayerKind::AvgPool2d {
                stride,
                count_include_pad,
                divisor_override,
                ..
            } => {
                assert_eq!(
                    (*stride, *count_include_pad, *divisor_override),
                    (Some(Pair([1, 1])), false, None)
                );
            }
            k => panic!("{k:?}"),
        }
        assert_eq!(
            s.layers[4].kind,
            LayerKind::AdaptiveAvgPool2d {
                output_size: Pair([2, 1])
            }
        );
        assert_eq!(s.layers[5].name, "global_avg_pool_5");
        assert_eq!(s.model.input_shape, Some(vec![1, 28, 28]));
        let valid = CONV.replace("padding = \"same\"", "padding = \"valid\"");
        match Spec::parse(&valid, Path::new("m.toml")).unwrap().layers[0].kind {
            LayerKind::Conv2d { padding, .. } => assert_eq!(padding, Padding::Valid),
            ref k => panic!("{k:?}"),
        }
    }

    #[test]
    fn bad_conv_and_pool_settings_name_key_and_line() {
        let cases = [
            (
                "padding = \"same\"",
                "padding = \"full\"",
                "m.toml:11",
                "\"same\" or \"valid\"",
            ),
            (
                "padding = \"same\"",
                "padding = -1",
                "m.toml:11",
                "non-negative integer",
            ),
            (
                "padding = \"same\"",
                "padding = [1, 2, 3]",
                "m.toml:11",
                "array of two",
            ),
            (
                "kernel_size = 5\n",
                "kernel_size = \"5\"\n",
                "m.toml:10",
                "integer or an array of two",
            ),
            (
                "kernel_size = 5\n",
                "kernel_size = 0\n",
                "m.toml:10",
                "`kernel_size` must be at least 1",
            ),
            (
                "groups = 4",
                "groups = 3",
                "m.toml:26",
                "`in_channels` = 20 must be divisible by `groups` = 3",
            ),
            (
                "stride = [2, 1]",
                "stride = [2, 0]",
                "m.toml:23",
                "`stride` must be at least 1",
            ),
            (
                "padding = \"same\"",
                "padding = \"same\"\nstride = 2",
                "m.toml:11",
                "stride 1",
            ),
            (
                "kernel_size = 2\n",
                "kernel_size = 2\nceil_mode = true\n",
                "m.toml:16",
                "ceil_mode",
            ),
            (
                "kernel_size = 2\n",
                "kernel_size = 2\npadding = 2\n",
                "m.toml:16",
                "at most half of the kernel size 2",
            ),
            (
                "count_include_pad = false",
                "count_include_pad = false\ndivisor_override = 0",
                "m.toml:35",
                "divisor_override",
            ),
            (
                "output_size = [2, 1]",
                "output_size = [0, 1]",
                "m.toml:38",
                "output_size",
            ),
            (
                "kernel_size = 5\n",
                "kernel_size = 5\ndilation = 4611686018427387904\n",
                "m.toml:10",
                "is too large",
            ),
            (
                "kernel_size = 2\n",
                "kernel_size = [2, 5]\ndilation = [1, 4611686018427387904]\n",
                "m.toml:15",
                "is too large",
            ),
            (
                "count_include_pad = false",
                "count_include_pad = false\ndilation = 2",
                "m.toml:35",
                "unknown field `dilation`",
            ),
        ];
        for (from, to, line, msg) in cases {
            assert!(CONV.contains(from), "{from}");
            let src = CONV.replacen(from, to, 1);
            let e = Spec::parse(&src, Path::new("m.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(line) && e.contains(msg), "{to}: {e}");
        }
    }

    /// Zero sizes are refused with the key and its line (found by the `model` fuzz target:
    /// `out_features = 0` reached a matrix product and panicked).
    #[test]
    fn zero_sizes_name_key_and_line() {
        for (from, to, line, key) in [
            (
                "out_features = 3",
                "out_features = 0",
                "m.toml:9",
                "out_features",
            ),
            (
                "in_features = 3",
                "in_features = 0",
                "m.toml:17",
                "in_features",
            ),
        ] {
            let src = GOOD.replacen(from, to, 1);
            let e = Spec::parse(&src, Path::new("m.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(line) && e.contains(&format!("`{key}` must be at least 1")),
                "{to}: {e}"
            );
        }
        let norm = "[[layers]]\nname = \"ln\"\ntype = \"layer_norm\"\nnormalized_shape = 0\n";
        let src = GOOD.replacen("[loss]", &format!("{norm}\n[loss]"), 1);
        let e = Spec::parse(&src, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`normalized_shape` must be at least 1"), "{e}");
    }

    #[test]
    fn zero_chunk_rejected() {
        let src = format!("{GOOD}\n[eval]\nchunk_size = 0\n");
        let e = Spec::parse(&src, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("chunk_size"), "{e}");
    }
}
