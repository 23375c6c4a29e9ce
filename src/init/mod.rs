//! `lca init`: draft a model spec (`model.toml`) from one checkpoint, and optionally the
//! training set.
//!
//! A `state_dict` stores parameters, not the forward pass. The draft therefore recognises
//! what the tensors tell (PyTorch's module patterns: `X.weight` 2-D → `nn.Linear`, 4-D →
//! `nn.Conv2d`, BatchNorm's `weight/bias/running_mean/running_var/num_batches_tracked`, a 1-D
//! `weight`/`bias` pair → LayerNorm, embedding names, attention layouts), orders the layers,
//! chains their sizes, and writes everything it had to guess — activations, pooling, strides
//! and padding, residual wiring, the loss, preprocessing — as lines starting with
//! `# TODO(lca init):` with the most likely choice filled in. A layer type this build of `lca`
//! cannot evaluate is written as a commented-out block, so the file always parses. The whole
//! procedure is described in `docs/init.md`.
//!
//! ```
//! use lca::init::{Source, draft_from};
//! let tensors = vec![
//!     ("fc1.weight".to_string(), "F32".to_string(), vec![32, 64]),
//!     ("fc1.bias".to_string(), "F32".to_string(), vec![32]),
//!     ("fc2.weight".to_string(), "F32".to_string(), vec![10, 32]),
//!     ("fc2.bias".to_string(), "F32".to_string(), vec![10]),
//! ];
//! let src = Source { checkpoint: "ckpt_0.safetensors".into(), tensors, order: None, aliases: vec![] };
//! let d = draft_from(&src, None, std::path::Path::new("model.toml")).unwrap();
//! assert!(d.text.contains("in_features = 64"));
//! assert!(d.text.contains("type = \"relu\""));
//! lca::spec::Spec::parse(&d.text, std::path::Path::new("model.toml")).unwrap();
//! ```

use crate::checkpoint;
use crate::data::{Dataset, Targets};
use crate::error::{LcaError, Result};
use crate::files::Mode;
use crate::net::embedding::{embedding_like, positional_like};
use crate::net::registry::{
    DRAFTERS, DraftIn, Drafter, Flow, Lead, ModuleTensors, Recognised, Role, dims,
};
use crate::net::{LossKind, Model};
use crate::spec::{BnMode, EvalSection, GeluApprox, LayerKind, LossSpec, Spec};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The marker that starts every line of the draft that needs a human decision.
pub const TODO: &str = "# TODO(lca init):";

/// What to draft from and where to write.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// A checkpoint file, or a directory of checkpoints (its first checkpoint is used).
    pub ckpt: PathBuf,
    /// The training set, to infer the input shape, preprocessing, loss and classes.
    pub data: Option<PathBuf>,
    /// The spec file to write.
    pub out: PathBuf,
    /// Replace an existing file.
    pub force: bool,
}

/// The tensors of one checkpoint: `(name, dtype, shape)` as in the safetensors header, and
/// the `state_dict` order when the file's metadata records one.
#[derive(Debug, Clone)]
pub struct Source {
    pub checkpoint: PathBuf,
    pub tensors: Vec<(String, String, Vec<usize>)>,
    pub order: Option<Vec<String>>,
    /// Names of one shared (tied) tensor, `(name, other name)`: a name that
    /// `safetensors.torch.save_model` left out and recorded in the metadata with the name it
    /// kept, or two stored tensors with identical bytes that look like an embedding and a
    /// head.
    pub aliases: Vec<(String, String)>,
}

/// A drafted spec.
#[derive(Debug, Clone)]
pub struct Draft {
    /// The checkpoint the draft was made from.
    pub checkpoint: PathBuf,
    /// The TOML text.
    pub text: String,
    /// 1-based line and text of every `TODO(lca init)` note.
    pub todos: Vec<(usize, String)>,
    /// Layers with parameters written as real layers: (name, short description).
    pub layers: Vec<(String, String)>,
    /// Modules written as commented-out blocks (unsupported or unrecognised).
    pub skipped: Vec<String>,
    /// With data: whether the draft builds a model that fits the data (`Err` holds the first
    /// problem, as `lca inspect` would report it).
    pub builds: Option<std::result::Result<(), String>>,
}

/// Metadata keys that may hold the `state_dict` order (a JSON array of names, or names
/// separated by commas or newlines).
pub const ORDER_KEYS: [&str; 3] = ["order", "state_dict_order", "keys"];

mod draft;
mod emitting;
mod planning;
mod recognise;
mod source;
#[cfg(test)]
mod tests;

pub use draft::draft_from;
use emitting::*;
use planning::*;
use recognise::*;
use source::*;
pub use source::{DataFacts, read_source};

/// Draft a spec and write it atomically to `opts.out` (refusing to replace an existing file
/// unless `opts.force`).
pub fn init(opts: &InitOptions) -> Result<Draft> {
    if opts.out.is_dir() {
        return Err(LcaError::Output {
            path: opts.out.clone(),
            msg: "is a directory; -o names the spec file to write".into(),
        });
    }
    if opts.out.exists() && !opts.force {
        return Err(LcaError::Output {
            path: opts.out.clone(),
            msg: "exists; lca init never replaces a file unless --force is given".into(),
        });
    }
    let src = read_source(&opts.ckpt)?;
    let data = match &opts.data {
        Some(p) => Some(DataFacts::read(p)?),
        None => None,
    };
    let draft = draft_from(&src, data.as_ref(), &opts.out)?;
    let mode = if opts.force {
        Mode::Replace
    } else {
        Mode::CreateNew
    };
    crate::files::write_atomic(&opts.out, draft.text.as_bytes(), mode)?;
    Ok(draft)
}

/// What `lca init` prints after writing the draft: the layers, every TODO line with its line
/// number, and whether the draft builds for the data.
pub fn draft_notice(d: &Draft, out: &Path) -> String {
    let mut s = format!(
        "wrote {}: {} layer(s) with parameters{}\n",
        out.display(),
        d.layers.len(),
        if d.layers.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                d.layers
                    .iter()
                    .map(|(n, w)| one_line(format!("{n}: {w}")))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    if !d.skipped.is_empty() {
        s.push_str(&format!(
            "left out (written as comments): {}\n",
            one_line(d.skipped.join(", "))
        ));
    }
    s.push_str(&format!(
        "{} TODO(lca init) note(s) to review:\n",
        d.todos.len()
    ));
    for (line, text) in &d.todos {
        let mut t: String = text.chars().take(100).collect();
        if t.len() < text.len() {
            t.push('…');
        }
        s.push_str(&format!("  {}:{line}: {t}\n", out.display()));
    }
    let dir = match d.checkpoint.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let next = format!("lca inspect {} --spec {}", dir.display(), out.display());
    match &d.builds {
        Some(Ok(())) => s.push_str(&format!(
            "the draft builds a model that fits the data; next: review the TODO lines, then {next}\n"
        )),
        Some(Err(e)) => s.push_str(&format!(
            "the draft does not fit the data yet (resolve the TODO lines, then {next}):\n  {e}\n"
        )),
        None => s.push_str(&format!(
            "without --data the draft was not checked against a training set; next: review the TODO lines, then {next}\n"
        )),
    }
    s
}
