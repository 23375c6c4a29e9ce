//! `lca analyze`: load the spec, data and checkpoints, integrate every step, stream the
//! results to the exporters, and write the summary.
//!
//! At most three checkpoints' parameters (θ_t, θ_{t+1} and the current integration point) and
//! a handful of gradient-sized buffers are held at any time, whatever the number of steps.
//!
//! The stages, one module each:
//! - [`prepare`]: load and check the inputs;
//! - [`plan`]: the checkpoints of this run (all, or a shard's range), warnings known in
//!   advance, the manifest;
//! - [`resume`]: the output directory and the journal (fresh, continued, or already finished);
//! - [`exporters`]: the exporter set, built in one place for `analyze` and `merge`;
//! - [`step`]: the run in progress (start or restore, one step at a time, finish, one stop
//!   path);
//! - [`tallies`]: the pure per-step and per-run tallies;
//! - [`summary`]: the summary builder shared with `merge`;
//! - [`shard`] and [`merge`]: scale-out (`--shard K/N`, `lca merge`).

pub mod budget;
pub mod exporters;
pub mod merge;
pub mod plan;
pub mod prepare;
pub mod resume;
pub mod shard;
pub mod step;
pub mod summary;
pub mod tallies;
pub mod torch;
pub mod verify;

pub use prepare::{Prepared, prepare, prepare_as};
pub use tallies::l2_step;
pub use torch::TorchOptions;

use crate::checkpoint::{self, CheckpointFile};
use crate::error::Result;
use crate::eval::{Engine, Evaluator};
use crate::journal::RunState;
use crate::lca::Integration;
use crate::net::{LossKind, Real};
use crate::output::{
    DataInfo, FileInfo, FileRef, IntegrationInfo, ModelInfo, SCHEMA_VERSION, Summary, Tool,
    tensors::StoreDtype,
};
use plan::Plan;
use resume::Opened;
use std::path::PathBuf;
use summary::Header;
use tallies::Layout;

/// Options of one analysis.
#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    pub ckpt_dir: PathBuf,
    pub spec: PathBuf,
    pub out: PathBuf,
    /// Only checkpoints with step ≥ first.
    pub first: Option<u64>,
    /// Only checkpoints with step ≤ last.
    pub last: Option<u64>,
    /// Take every k-th checkpoint of those.
    pub every: usize,
    pub integration: Integration,
    /// Element type of `lca.safetensors`, or `None` not to write it.
    pub store: Option<StoreDtype>,
    /// Also write `params.csv` (one row per parameter; large for large models).
    pub params_csv: bool,
    /// Hide the progress bar.
    pub quiet: bool,
    /// Continue the interrupted run whose journal is in `out` (see `docs/reliability.md`).
    pub resume: bool,
    /// Arithmetic of the evaluator.
    pub precision: Precision,
    /// Analyse only this shard of the steps and write a part for `lca merge`
    /// (see `docs/scale-out.md`).
    pub shard: Option<shard::Shard>,
    /// When to share the first layer between Simpson's points
    /// ([`crate::eval::Evaluator::simpson_sharing_first`]): by default when the engine's cost
    /// model says it pays; `Never` evaluates every point in full.
    pub share_first_layer: crate::eval::FirstLayerSharing,
    /// Refuse to run when lca's loss at the first checkpoint disagrees with the one PyTorch
    /// recorded in it ([`verify`]); `false` (`--no-verify-loss`) only warns.
    pub verify_loss: bool,
    /// Evaluate with the PyTorch worker (`--engine torch`) instead of the built-in engine.
    pub torch: Option<TorchOptions>,
    /// The row order of the evaluation chunks (`--data-order`, `--data-seed`); applied only
    /// where the loss depends on it (batch norm with batch statistics).
    pub data_order: crate::data::DataOrder,
}

/// Arithmetic of the evaluator.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 compute (as training), f64 accumulation: the default.
    F32,
    /// f64 throughout: slower; removes f32 rounding, e.g. where a ReLU sits at its kink.
    F64,
}

/// Run the analysis; `note` receives human-readable notes and warnings (for stderr).
pub fn analyze(opts: &AnalyzeOptions, note: &mut dyn FnMut(&str)) -> Result<Summary> {
    if let Some(t) = &opts.torch {
        return match opts.precision {
            Precision::F32 => torch::analyze_torch::<f32>(opts, t, note),
            Precision::F64 => torch::analyze_torch::<f64>(opts, t, note),
        };
    }
    match opts.precision {
        Precision::F32 => analyze_in::<f32>(opts, note),
        Precision::F64 => analyze_in::<f64>(opts, note),
    }
}

/// The analysis with this crate's evaluator in `T`.
fn analyze_in<T: Real>(opts: &AnalyzeOptions, note: &mut dyn FnMut(&str)) -> Result<Summary> {
    let mut p = prepare_as::<T>(
        &opts.ckpt_dir,
        &opts.spec,
        opts.first,
        opts.last,
        opts.every,
    )?;
    p.order_rows(opts.data_order);
    let chunk_size = p.spec.eval.chunk_size;
    let train = Evaluator {
        model: &p.model,
        data: &p.data,
        chunk_size,
    };
    let val = p.validation.as_ref().map(|data| Evaluator {
        model: &p.model,
        data,
        chunk_size,
    });
    run(opts, &p, &train, val.as_ref(), note)
}

/// The pipeline, one line per stage, with any [`Engine`] for the training set and (when the
/// spec names one) the validation set.
pub fn run<E: Engine>(
    opts: &AnalyzeOptions,
    p: &Prepared<E::Real>,
    train: &E,
    val: Option<&E>,
    note: &mut dyn FnMut(&str),
) -> Result<Summary> {
    let plan = Plan::new(opts, p, opts.share_first_layer.decide(train), note)?;
    let (out, journal, saved) = match resume::open(opts, p, &plan, note)? {
        Opened::Finished(summary) => return Ok(summary),
        Opened::Run {
            out,
            journal,
            saved,
        } => (out, journal, saved),
    };
    // The step loop checks for a stop at every gradient evaluation: from here on the first
    // signal stops it tidily (before, it exits at once: src/interrupt.rs).
    crate::interrupt::set_graceful(true);
    step::Run::new(opts, p, &plan, train, val, out, journal).execute(saved, note)
}

/// The summary's description of the inputs and settings of this run.
fn header<T: Real>(
    opts: &AnalyzeOptions,
    p: &Prepared<T>,
    plan: &Plan,
    layout: &Layout,
    state: &RunState,
) -> Header {
    let model = &p.model;
    let chunk_size = p.spec.eval.chunk_size;
    Header {
        schema_version: SCHEMA_VERSION,
        tool: Tool {
            name: "lca".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        spec: FileRef {
            path: opts.spec.display().to_string(),
            sha256: p.spec_sha256.clone(),
        },
        data: DataInfo {
            path: p.data.path.display().to_string(),
            sha256: p.data.sha256.clone(),
            samples: p.data.len(),
            sample_shape: p.data.sample_shape().to_vec(),
            chunk_size,
            chunks: p.data.len().div_ceil(chunk_size),
            order: p.order.name().into(),
            seed: p.order.seed(),
            validation: p.validation.as_ref().map(|v| FileInfo {
                path: v.path.display().to_string(),
                sha256: v.sha256.clone(),
                samples: v.len(),
            }),
        },
        model: ModelInfo {
            batch_norm: p.batch_norm,
            loss: match model.loss {
                LossKind::CrossEntropy => "cross_entropy".into(),
                LossKind::Mse => "mse".into(),
            },
            num_params: model.num_params(),
            num_buffers: model.num_buffer_values(),
            input_shape: model.input_shape.clone(),
            output_shape: model.output_shape().to_vec(),
            layers: layout.layers.clone(),
            params: layout.params.clone(),
            attention: crate::net::attention::describe(&p.spec, model)
                .into_iter()
                .map(Into::into)
                .collect(),
        },
        integration: IntegrationInfo {
            settings: opts.integration,
            precision: match opts.precision {
                Precision::F32 => "f32 compute, f64 accumulation".into(),
                Precision::F64 => "f64".into(),
            },
            shared_first_layer: plan.shared,
            budget: None,
            engine: p.engine.clone(),
        },
        step_spacing: plan.spacing.clone(),
        ignored_tensors: state.ignored.clone(),
        loss_check: plan.files(p).first().and_then(|f| {
            let torch = verify::recorded(f).ok().flatten()?;
            torch.comparable(p.batch_norm, p.order).ok()?;
            Some(verify::compare(
                f,
                &torch,
                state.loss_first,
                opts.verify_loss,
            ))
        }),
    }
}

/// Files of the checkpoint directory that appeared or changed while the run went on.
fn directory_changes(
    dir: &std::path::Path,
    listed: &[(PathBuf, u64)],
    selected: &[CheckpointFile],
    first: Option<u64>,
    last: Option<u64>,
) -> Vec<String> {
    let now = match checkpoint::list(dir) {
        Ok(v) => v,
        Err(e) => {
            return vec![format!(
                "could not list the checkpoints again at the end: {e}"
            )];
        }
    };

    let mut out = Vec::new();
    for p in now.iter().filter(|p| !listed.iter().any(|(q, _)| q == *p)) {
        let step = checkpoint::describe(p).ok().map(|f| f.step).or_else(|| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(checkpoint::last_integer)
        });
        let in_range =
            step.is_none_or(|s| first.is_none_or(|a| s >= a) && last.is_none_or(|b| s <= b));
        if in_range {
            out.push(format!(
                "{} appeared after the checkpoints were listed and was not analysed (run again to include it)",
                p.display()
            ));
        }
    }
    for f in selected {
        match checkpoint::source_len(&f.path) {
            Err(_) => out.push(format!(
                "{} was removed during the run, after it had been read",
                f.path.display()
            )),
            Ok(len) if len != f.len => out.push(format!(
                "{} changed during the run ({} bytes when read, {} now); the results use the content that was read",
                f.path.display(),
                f.len,
                len
            )),
            Ok(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::LossGrad;

    /// A foreign engine: only "loss and gradient over the training set", no capabilities.
    struct Plain<'a>(Evaluator<'a, f32>);

    impl Engine for Plain<'_> {
        type Real = f32;
        type Carry = ();
        fn loss_and_grad(&self, theta: &[Vec<f32>]) -> Result<LossGrad> {
            self.0.loss_and_grad(theta)
        }
    }

    #[test]
    fn a_second_engine_plugs_into_the_pipeline_and_gives_the_same_summary() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mlp");
        let tmp = std::env::temp_dir().join(format!("lca-engine-{}", std::process::id()));
        let opts = |out: &str| AnalyzeOptions {
            ckpt_dir: dir.join("ckpts"),
            spec: dir.join("model.toml"),
            out: tmp.join(out),
            first: None,
            last: None,
            every: 1,
            integration: Integration::default(),
            store: None,
            params_csv: false,
            quiet: true,
            resume: false,
            precision: Precision::F32,
            shard: None,
            share_first_layer: crate::eval::FirstLayerSharing::Never,
            verify_loss: true,
            torch: None,
            data_order: crate::data::DataOrder::default(),
        };
        let native = analyze(&opts("native"), &mut |_| {}).unwrap();
        let o = opts("plain");
        let p = prepare(&o.ckpt_dir, &o.spec, None, None, 1).unwrap();
        let engine = Plain(Evaluator {
            model: &p.model,
            data: &p.data,
            chunk_size: p.spec.eval.chunk_size,
        });
        let plain = run(&o, &p, &engine, None, &mut |_| {}).unwrap();
        let json = |s: &Summary| {
            let mut v = serde_json::to_value(s).unwrap();
            v["files"] = serde_json::Value::Null;
            v.to_string()
        };
        assert_eq!(json(&native), json(&plain));
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
