//! The layer registry: the one place that maps a spec layer type ([`LayerKind`], whose
//! serde tag is the `type` string of a `[[layers]]` table) to the layer that evaluates it.
//!
//! A new layer type joins here with one match arm; its settings live in
//! [`crate::spec::LayerKind`] (the lower layer owns the configuration), its forward, backward,
//! shape rule and finite-difference test in its own file of `src/net/`, and `lca init` writes
//! it by serialising the same `LayerKind` (see `docs/adding-a-layer.md`).

use super::*;

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
