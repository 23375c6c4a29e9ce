//! Engines other than this crate's [`crate::eval::Evaluator`], behind the same
//! [`crate::eval::Engine`] boundary: [`torch`], the PyTorch worker process
//! (`python -m lca.engine.worker`, docs/engines.md), spoken to over [`protocol`].

pub mod protocol;
pub mod torch;

pub use torch::{Hello, TorchEngine, WorkerConfig};
