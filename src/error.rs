//! Typed errors of the library. Every variant names the thing that failed:
//! the file, the tensor, the spec key and line, or the sample.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = LcaError> = std::result::Result<T, E>;

/// What went wrong, with the culprit named.
#[derive(Debug, thiserror::Error)]
pub enum LcaError {
    /// The model spec (model.toml) is invalid.
    #[error("{}{}: {msg}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Spec {
        path: PathBuf,
        line: Option<usize>,
        msg: String,
    },
    /// A checkpoint file or directory is unusable.
    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    /// The training (or validation) set is unusable.
    #[error("{}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },
    /// A layer's shapes do not chain.
    #[error("model: {0}")]
    Model(String),
    /// Evaluation produced a non-finite value.
    #[error("{0}")]
    Numeric(String),
    /// An output directory or file is unusable.
    #[error("{}: {msg}", path.display())]
    Output { path: PathBuf, msg: String },
    /// A figure could not be drawn or written.
    #[error("{}: cannot draw the figure: {msg}", path.display())]
    Plot { path: PathBuf, msg: String },
    /// I/O failure on a named path. (The I/O error is part of the message, not a separate
    /// `source`, so that `{:#}` does not print it twice.)
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// lca's loss at θ_0 disagrees with the one PyTorch recorded (the spec or data do not
    /// describe the trained model).
    #[error("{0}")]
    LossMismatch(String),
    /// A foreign evaluation engine (the PyTorch worker) failed: it could not load the model,
    /// ran out of memory, or died; the message names the cause.
    #[error("{0}")]
    Engine(String),
    /// Invalid command-line usage detected by the library.
    #[error("{0}")]
    Usage(String),
    /// The run was stopped by a signal (Ctrl-C, SIGTERM); the kind says whether work was kept.
    #[error("{0}")]
    Interrupted(Interruption),
    /// A run failed after finishing some steps, which are kept for `--resume`.
    #[error("{error}\n{kept}")]
    Stopped { error: Box<LcaError>, kept: String },
}

/// How far an interrupted run got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interruption {
    /// A stop was requested (the kind the run sees before it decides what to keep).
    Requested,
    /// Interrupted before the first step finished; the journal was removed.
    NothingKept,
    /// Interrupted after some steps; `kept` says how many and where (`--resume` continues).
    Kept(String),
}

impl Interruption {
    /// Whether finished steps were kept for `--resume`.
    pub fn kept_work(&self) -> bool {
        matches!(self, Interruption::Kept(_))
    }
}

impl std::fmt::Display for Interruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Interruption::Requested => f.write_str("interrupted"),
            Interruption::NothingKept => {
                f.write_str("interrupted before the first step finished; nothing was kept")
            }
            Interruption::Kept(kept) => write!(
                f,
                "interrupted; {kept}: run the same command with --resume to continue"
            ),
        }
    }
}

impl LcaError {
    /// Whether the run kept finished steps that `--resume` can continue from.
    pub fn resumable(&self) -> bool {
        match self {
            LcaError::Interrupted(i) => i.kept_work(),
            LcaError::Stopped { .. } => true,
            _ => false,
        }
    }

    /// Wrap an I/O error with the path that failed.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LcaError::Io {
            path: path.into(),
            error: source,
        }
    }
}
