//! `lca`: Loss Change Allocation (Lan, Liu, Zhou, Yosinski, NeurIPS 2019) from saved training
//! checkpoints.
//!
//! The change of the full-training-set loss between consecutive checkpoints is split over
//! parameters as a path integral of the gradient along the straight segment between them.
//! Modules: [`spec`] (model.toml), [`checkpoint`] (safetensors directory), [`data`] (training
//! set), [`net`] (layers, forward and backward), [`eval`] (full-set loss and gradient),
//! [`lca`] (integration and allocation), [`analyze`] (the run), [`output`] (output writers),
//! [`summarize`] (coarser views), [`plot`] (figures), [`check`] (CI gates), [`inspect`]
//! (dry run and work estimate), [`init`] (draft a spec from a checkpoint), [`html`] (the
//! self-contained HTML report), [`shard`] (`analyze --shard` and `merge`), [`progress`],
//! [`cli`].

pub mod alloc;
pub mod analyze;
pub mod check;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod files;
pub mod html;
pub mod init;
pub mod inspect;
pub mod interrupt;
pub mod journal;
pub mod lca;
pub mod net;
pub mod output;
pub mod plot;
pub mod progress;
pub mod safetensors_header;
pub mod shard;
pub mod spec;
pub mod summarize;
pub mod tensors;

pub use error::{LcaError, Result};
