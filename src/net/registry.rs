//! The layer registry: the one place that maps a spec layer type ([`LayerKind`], whose
//! serde tag is the `type` string of a `[[layers]]` table) to the layer that evaluates it
//! ([`build_layer`]), and to the [`Drafter`] through which `lca init` recognises it in a
//! checkpoint and drafts it ([`DRAFTERS`]).
//!
//! A new layer type joins here with one match arm (and one line of [`DRAFTERS`] if `init`
//! should recognise it); its settings live in [`crate::spec::LayerKind`] (the lower layer owns
//! the configuration), its forward, backward, shape rule, finite-difference test and drafter
//! in its own file of `src/net/`. `lca init` writes it by serialising the same `LayerKind`
//! (see `docs/adding-a-layer.md`).

use super::*;
use std::collections::BTreeMap;

/// The layer types `lca init` recognises, in the order they are tried: the first drafter
/// whose [`Drafter::recognise`] answers claims the module. Attention layers own submodules
/// (`out_proj`, `c_attn`) and come first; batch norm claims a 1-D `weight` named like one
/// before layer norm takes any other; an embedding is a 2-D `weight` named like one, before
/// the linear layer takes any other.
pub static DRAFTERS: &[&Drafter] = &[
    &attention::DRAFTER,
    &batch_norm::DRAFTER,
    &layer_norm::DRAFTER,
    &embedding::DRAFTER,
    &linear::DRAFTER,
    &conv::DRAFTER,
];

// ---------------------------------------------------------------------------------------
// What a layer file provides to `lca init`

/// A checkpoint module as `lca init` sees it: its path (the layer's name, without the
/// checkpoint's prefix) and the shapes of its float tensors by suffix (`weight`,
/// `c_attn.bias`), the `num_batches_tracked` counter left out.
#[derive(Debug, Clone)]
pub struct ModuleTensors<'a> {
    pub path: &'a str,
    pub shapes: BTreeMap<&'a str, &'a [usize]>,
}

impl ModuleTensors<'_> {
    /// The shape of the tensor with this suffix.
    pub fn shape(&self, suffix: &str) -> Option<&[usize]> {
        self.shapes.get(suffix).copied()
    }

    /// Whether the module has a tensor with this suffix.
    pub fn has(&self, suffix: &str) -> bool {
        self.shapes.contains_key(suffix)
    }

    /// Whether every tensor of the module has one of these suffixes.
    pub fn only(&self, allowed: &[&str]) -> bool {
        self.shapes.keys().all(|k| allowed.contains(k))
    }

    /// The last component of the module's path (`features.0.bn1` → `bn1`).
    pub fn last_component(&self) -> &str {
        self.path.rsplit('.').next().unwrap_or(self.path)
    }

    /// A `weight` with this number of axes and at most a `bias` beside it, whose shape is
    /// `[weight.shape[0]]`: the tensors of most layers with parameters.
    pub fn weight_and_bias(&self, axes: usize) -> Option<&[usize]> {
        let w = self.shape("weight")?;
        let bias_ok = self.shape("bias").is_none_or(|b| b == [w[0]]);
        (w.len() == axes && self.only(&["weight", "bias"]) && bias_ok).then_some(w)
    }
}

/// What a drafter says about a module.
#[derive(Debug, Clone, PartialEq)]
pub enum Recognised {
    /// The spec layer its tensors tell: the settings they store, and the most likely value
    /// (its default) of every setting they do not.
    Layer(LayerKind),
    /// A layer type lca knows by its tensors but cannot evaluate: what it is.
    Unsupported(String),
}

/// The part a layer type plays in a model, for the draft's guesses about order and wiring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A linear map between hidden states (linear, convolution): an activation follows it.
    Weighted,
    /// A normalisation: it follows the weighted layer of the same number (`bn1` after `conv1`).
    Norm,
    /// A lookup table of token ids or positions: a language model's input.
    Embedding,
    /// Self-attention: a transformer block.
    Attention,
}

/// The per-sample shape flowing between the layers of a draft, as far as it is known.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Flow {
    pub shape: Option<Vec<usize>>,
    /// Whether the last layer with parameters written is a convolution.
    pub after_conv: bool,
    /// Channels (features) of the last layer with parameters written.
    pub channels: Option<usize>,
}

impl Flow {
    /// The channels arriving at a layer: axis 0 of a `[C, H, W]` shape, else the last layer's.
    pub fn image_channels(&self) -> Option<usize> {
        match &self.shape {
            Some(s) if s.len() == 3 => Some(s[0]),
            _ => self.channels,
        }
    }
}

/// What a drafter is told about the place of the layer it drafts.
#[derive(Debug, Clone)]
pub struct DraftIn<'a> {
    /// The module's path, for the notes.
    pub path: &'a str,
    /// What arrives at the layer.
    pub flow: Flow,
    /// The stride the planned block gives this layer (1 outside a down-sampling block).
    pub stride: usize,
}

/// One piece of a draft written before a layer's own table.
#[derive(Debug, Clone, PartialEq)]
pub enum Lead {
    /// A `# TODO(lca init):` note for the reader.
    Todo(String),
    /// A parameter-free layer the draft adds (a flatten, a pooling).
    Table(LayerKind),
}

/// A drafted layer.
#[derive(Debug, Clone)]
pub struct Drafted {
    /// Notes and parameter-free layers written before the layer's table, in order.
    pub lead: Vec<Lead>,
    /// The layer, with the settings the draft guessed.
    pub kind: LayerKind,
    /// Settings written even at their default: guesses the reader must see.
    pub explicit: &'static [&'static str],
    /// A short description for the summary (`linear 64→32`).
    pub what: String,
    /// What leaves the layer.
    pub flow: Flow,
}

/// How `lca init` recognises a layer type in a checkpoint and drafts it: one per layer file
/// (`linear::DRAFTER`), listed in [`DRAFTERS`].
#[derive(Debug)]
pub struct Drafter {
    /// The spec layer a module's tensors are, or `None` when they are not this type's.
    pub recognise: fn(&ModuleTensors) -> Option<Recognised>,
    /// The part the layer type plays in a model.
    pub role: Role,
    /// The layer as the draft writes it where it stands: the settings its tensors cannot
    /// tell decided from what arrives, the notes about them, and what leaves it. Called only
    /// with a `LayerKind` that this drafter's `recognise` returned.
    pub draft: fn(LayerKind, DraftIn) -> Drafted,
}

/// A shape as `3×32×32`.
pub fn dims(s: &[usize]) -> String {
    s.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("×")
}

/// A pair of sizes as `3`, or `[3, 5]` when they differ.
pub fn pair(p: [usize; 2]) -> String {
    if p[0] == p[1] {
        p[0].to_string()
    } else {
        format!("[{}, {}]", p[0], p[1])
    }
}

/// The layer that evaluates a spec layer; `bn_mode` is `[model] batch_norm`.
pub(crate) fn build_layer<T: Real>(kind: &LayerKind, bn_mode: Option<BnMode>) -> Box<dyn Layer<T>> {
    match kind {
        LayerKind::Linear {
            in_features,
            out_features,
            bias,
        } => Box::new(linear::Linear {
            in_features: *in_features,
            out_features: *out_features,
            bias: *bias,
        }),
        LayerKind::Relu {} => Box::new(activation::Activation::Relu),
        LayerKind::LeakyRelu { negative_slope } => {
            Box::new(activation::Activation::LeakyRelu(*negative_slope as f64))
        }
        LayerKind::Tanh {} => Box::new(activation::Activation::Tanh),
        LayerKind::Sigmoid {} => Box::new(activation::Activation::Sigmoid),
        LayerKind::Gelu { approximate } => Box::new(match approximate {
            crate::spec::GeluApprox::None => activation::Activation::Gelu,
            crate::spec::GeluApprox::Tanh => activation::Activation::GeluTanh,
        }),
        LayerKind::Identity {} | LayerKind::Dropout { .. } => Box::new(reshape::Identity),
        LayerKind::Flatten { start_dim, end_dim } => Box::new(reshape::Flatten {
            start_dim: *start_dim,
            end_dim: *end_dim,
        }),
        LayerKind::Add {} => Box::new(add::Add),
        LayerKind::BatchNorm1d(b) | LayerKind::BatchNorm2d(b) => Box::new(batch_norm::BatchNorm {
            num_features: b.num_features,
            eps: b.eps,
            affine: b.affine,
            mode: if b.track_running_stats {
                bn_mode.unwrap_or(BnMode::BatchStats)
            } else {
                BnMode::BatchStats
            },
        }),
        LayerKind::Conv2d {
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
        } => Box::new(conv::Conv2d {
            in_channels: *in_channels,
            out_channels: *out_channels,
            groups: *groups,
            bias: *bias,
            window: conv::Window2d::conv(*kernel_size, *stride, *dilation, *padding),
        }),
        LayerKind::MaxPool2d {
            kernel_size,
            stride,
            padding,
            dilation,
            ceil_mode: _,
        } => Box::new(pool::MaxPool2d {
            window: conv::Window2d::symmetric(
                *kernel_size,
                stride.unwrap_or(*kernel_size),
                *dilation,
                *padding,
            ),
        }),
        LayerKind::AvgPool2d {
            kernel_size,
            stride,
            padding,
            ceil_mode: _,
            count_include_pad,
            divisor_override,
        } => Box::new(pool::AvgPool2d {
            window: conv::Window2d::symmetric(
                *kernel_size,
                stride.unwrap_or(*kernel_size),
                crate::spec::Pair::one(),
                *padding,
            ),
            count_include_pad: *count_include_pad,
            divisor_override: *divisor_override,
        }),
        LayerKind::AdaptiveAvgPool2d { output_size } => Box::new(pool::AdaptiveAvgPool2d {
            output_size: output_size.0,
            flatten: false,
        }),
        LayerKind::GlobalAvgPool {} => Box::new(pool::AdaptiveAvgPool2d {
            output_size: [1, 1],
            flatten: true,
        }),
        LayerKind::Embedding {
            num_embeddings,
            embedding_dim,
            padding_idx,
        } => Box::new(embedding::Embedding {
            num_embeddings: *num_embeddings,
            embedding_dim: *embedding_dim,
            padding_idx: padding_idx.map(|p| {
                if p < 0 {
                    (p + *num_embeddings as i64) as usize
                } else {
                    p as usize
                }
            }),
        }),
        LayerKind::PositionalEmbedding {
            num_embeddings,
            embedding_dim,
        } => Box::new(embedding::PositionalEmbedding {
            num_embeddings: *num_embeddings,
            embedding_dim: *embedding_dim,
        }),
        LayerKind::LayerNorm {
            normalized_shape,
            eps,
            elementwise_affine,
            bias,
        } => Box::new(layer_norm::LayerNorm {
            normalized_shape: *normalized_shape,
            eps: *eps,
            weight: *elementwise_affine,
            bias: *elementwise_affine && *bias,
        }),
        LayerKind::CausalSelfAttention {
            n_embd,
            n_head,
            bias,
            ..
        } => Box::new(attention::Attention {
            embed_dim: *n_embd,
            num_heads: *n_head,
            bias: *bias,
            causal: true,
            layout: attention::Layout::NanoGpt,
        }),
        LayerKind::MultiheadAttention {
            embed_dim,
            num_heads,
            bias,
            causal,
            ..
        } => Box::new(attention::Attention {
            embed_dim: *embed_dim,
            num_heads: *num_heads,
            bias: *bias,
            causal: *causal,
            layout: attention::Layout::Multihead,
        }),
    }
}

impl Drafted {
    /// The layer as recognised, with no notes, leaving the flow as it was.
    pub fn as_recognised(kind: LayerKind, at: DraftIn) -> Drafted {
        Drafted {
            lead: Vec::new(),
            what: kind.type_name().to_string(),
            kind,
            explicit: &[],
            flow: at.flow,
        }
    }
}
