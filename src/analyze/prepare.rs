//! Preparing a run's inputs: load the spec and data, build the model and check every
//! selected checkpoint's header against it, so that bad input is reported before any
//! computation.

use crate::checkpoint::{self, CheckpointFile};
use crate::data::{DataOrder, Dataset};
use crate::error::{LcaError, Result};
use crate::net::batch_norm::BnMode;
use crate::net::{LossKind, Model, Real};
use crate::spec::{LayerKind, Spec};
use std::path::{Path, PathBuf};

/// Everything loaded before the first gradient: spec, data, model and checkpoint list.
pub struct Prepared<T: Real = f32> {
    pub spec: Spec,
    pub spec_sha256: String,
    pub data: Dataset,
    /// The held-out set, when the spec names one.
    pub validation: Option<Dataset>,
    pub model: Model<T>,
    pub files: Vec<CheckpointFile>,
    /// Every checkpoint file found (selected or not) and its size when listed.
    pub listed: Vec<(PathBuf, u64)>,
    /// Per parameter tensor: whether the L2 term applies to it (empty without one).
    pub l2_mask: Vec<bool>,
    /// The batch norm mode, when the model has batch norm layers.
    pub batch_norm: Option<BnMode>,
    /// The foreign engine that evaluates (`--engine torch`); `None`: the built-in one.
    pub engine: Option<crate::output::EngineInfo>,
    /// The row order the sets are evaluated in ([`Prepared::order_rows`]): file order unless
    /// batch norm uses batch statistics (the only mode whose loss depends on it).
    pub order: DataOrder,
}

impl<T: Real> Prepared<T> {
    /// Whether the loss depends on the order of the rows: batch norm in batch-stats mode.
    pub fn order_matters(&self) -> bool {
        self.batch_norm == Some(BnMode::BatchStats)
    }

    /// Put the training (and validation) rows in the `requested` order when the loss depends
    /// on it; otherwise keep file order (the results then do not depend on the order, apart
    /// from the rounding of f64 sums) and record file order.
    pub fn order_rows(&mut self, requested: DataOrder) {
        self.order = if self.order_matters() {
            requested
        } else {
            DataOrder::File
        };
        self.data.reorder(self.order);
        if let Some(v) = &mut self.validation {
            v.reorder(self.order);
        }
    }

    /// The warning for batch statistics evaluated in file order when the file's labels are
    /// sorted or in long single-class runs (each chunk then sees few classes, and the loss is
    /// not the one training's shuffled batches saw). Only in file order, where the rows are
    /// still the file's.
    pub fn order_warning(&self) -> Option<String> {
        if !self.order_matters() || self.order != DataOrder::File {
            return None;
        }
        let r = self.data.label_runs()?;
        r.clustered().then(|| {
            format!(
                "batch norm uses batch statistics, the rows are evaluated in file order (--data-order file) and the labels in {} are {} ({:.0} % of neighbouring rows share a label, {:.0} % would in a random order; the longest run of one label is {} rows, chunk_size {}): each evaluation chunk sees few classes, so its statistics and the loss differ from training's; drop --data-order file to evaluate chunks drawn by a seeded permutation",
                self.data.path.display(),
                if r.sorted { "sorted" } else { "in long single-class runs" },
                100.0 * r.same_neighbours,
                100.0 * r.expected,
                r.longest_run,
                self.spec.eval.chunk_size
            )
        })
    }
}

/// [`prepare_as`] with the model in f32.
pub fn prepare(
    ckpt_dir: &Path,
    spec_path: &Path,
    first: Option<u64>,
    last: Option<u64>,
    every: usize,
) -> Result<Prepared> {
    prepare_as::<f32>(ckpt_dir, spec_path, first, last, every)
}

/// Load the spec and data, build the model (in `T`) and check every selected checkpoint's
/// header against it.
pub fn prepare_as<T: Real>(
    ckpt_dir: &Path,
    spec_path: &Path,
    first: Option<u64>,
    last: Option<u64>,
    every: usize,
) -> Result<Prepared<T>> {
    // Test hook: `LCA_TEST_PREPARE_DELAY_MS` stands for a slow input read (it does not look
    // at the interrupt flag, as a blocked read cannot), so that the tests can check that the
    // first signal ends the run at once while the inputs are read.
    if let Some(ms) = std::env::var("LCA_TEST_PREPARE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let spec = Spec::load(spec_path)?;
    let spec_sha256 = crate::tensors::sha256_hex(spec.source.as_bytes());
    let loss = match spec.loss {
        crate::spec::LossSpec::CrossEntropy {} => LossKind::CrossEntropy,
        crate::spec::LossSpec::Mse {} => LossKind::Mse,
    };
    let input_shape = spec.model.input_shape.as_deref();
    let data = Dataset::load(&spec.train_path(), &spec.data, input_shape, loss)?;
    let model = Model::<T>::build(&spec, data.sample_shape())?;
    data.check_inputs(&model)?;
    data.check_targets(model.output_shape(), model.loss)?;
    let validation = load_validation(&spec, &data, &model, loss)?;
    let l2_mask = l2_mask(&spec, &model)?;
    let scanned = checkpoint::scan(ckpt_dir)?;
    let listed = scanned.iter().map(|f| (f.path.clone(), f.len)).collect();
    let files = checkpoint::select(scanned, first, last, every)?;
    if files.len() < 2 {
        return Err(LcaError::Checkpoint {
            path: ckpt_dir.to_path_buf(),
            msg: format!(
                "{} checkpoint(s) selected; LCA needs at least two (one step)",
                files.len()
            ),
        });
    }
    check_external_tied(&spec, &model, &files[0])?;
    for f in &files {
        check_header(f, &model)?;
    }
    let has_bn = spec.layers.iter().any(|l| {
        matches!(
            l.kind,
            LayerKind::BatchNorm1d(_) | LayerKind::BatchNorm2d(_)
        )
    });
    let batch_norm = spec.model.batch_norm.filter(|_| has_bn);
    Ok(Prepared {
        spec,
        spec_sha256,
        data,
        validation,
        model,
        files,
        listed,
        l2_mask,
        batch_norm,
        engine: None,
        order: DataOrder::File,
    })
}

fn load_validation<T: Real>(
    spec: &Spec,
    data: &Dataset,
    model: &Model<T>,
    loss: LossKind,
) -> Result<Option<Dataset>> {
    let Some(path) = spec.validation_path() else {
        return Ok(None);
    };
    let input_shape = spec.model.input_shape.as_deref();
    let v = Dataset::load(&path, &spec.data, input_shape, loss)?;
    if v.sample_shape() != data.sample_shape() {
        return Err(LcaError::Data {
            path,
            msg: format!(
                "validation samples have shape {:?} but training samples have {:?}",
                v.sample_shape(),
                data.sample_shape()
            ),
        });
    }
    v.check_inputs(model)?;
    v.check_targets(model.output_shape(), model.loss)?;
    Ok(Some(v))
}

fn l2_mask<T: Real>(spec: &Spec, model: &Model<T>) -> Result<Vec<bool>> {
    let Some(r) = &spec.regularization else {
        return Ok(Vec::new());
    };
    let Some(names) = &r.tensors else {
        return Ok(vec![true; model.params.len()]);
    };
    for n in names {
        if !model.params.iter().any(|p| &p.name == n) {
            return Err(LcaError::Spec {
                path: spec.path.clone(),
                line: spec.line_of_key("regularization", "tensors"),
                msg: format!(
                    "`regularization.tensors` names '{n}', which is not a parameter of the model (it has: {})",
                    model
                        .params
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
    }
    Ok(model
        .params
        .iter()
        .map(|p| names.contains(&p.name))
        .collect())
}

/// Every parameter of the model is in `f`, with its shape and a float dtype.
pub(crate) fn check_header<T: Real>(f: &CheckpointFile, model: &Model<T>) -> Result<()> {
    for p in &model.params {
        match f.tensors.iter().find(|t| p.answers_to(&t.name)) {
            None => {
                let hint =
                    checkpoint::prefix_hint(&p.name, f.tensors.iter().map(|t| t.name.as_str()));
                return Err(LcaError::Checkpoint {
                    path: f.path.clone(),
                    msg: format!(
                        "missing tensor '{}' (expected shape {:?}){hint}",
                        p.name, p.shape
                    ),
                });
            }
            Some(t) if t.shape != p.shape => {
                return Err(LcaError::Checkpoint {
                    path: f.path.clone(),
                    msg: format!(
                        "tensor '{}' has shape {:?} but the spec expects {:?}",
                        p.name, t.shape, p.shape
                    ),
                });
            }
            Some(t) if !matches!(t.dtype.as_str(), "F32" | "F64" | "F16" | "BF16") => {
                return Err(LcaError::Checkpoint {
                    path: f.path.clone(),
                    msg: format!(
                        "tensor '{}' has dtype {}; parameters must be F32, F64, F16 or BF16",
                        p.name, t.dtype
                    ),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Every tensor a `tied` table names that no layer owns must be stored in the checkpoints:
/// a typo would otherwise silently untie the weight (the layer's own stored copy is used).
fn check_external_tied<T: Real>(
    spec: &Spec,
    model: &Model<T>,
    first: &checkpoint::CheckpointFile,
) -> Result<()> {
    for t in &model.external_tied {
        if first.tensors.iter().any(|h| h.name == t.name) {
            continue;
        }
        // Some names the layers do own, for the message.
        let mut owned: Vec<&str> = model
            .params
            .iter()
            .map(|p| p.name.as_str())
            .filter(|n| model.external_tied.iter().all(|e| e.name != *n))
            .collect();
        owned.sort_unstable();
        owned.truncate(12);
        return Err(LcaError::Spec {
            path: spec.path.clone(),
            line: t.line,
            msg: format!(
                "layer '{}': `tied.{}` names '{}', which is not a parameter of any layer nor a \
                 tensor of {} (parameters include: {})",
                t.layer,
                t.role,
                t.name,
                first.path.display(),
                owned.join(", ")
            ),
        });
    }
    Ok(())
}
