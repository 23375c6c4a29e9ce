//! `lca analyze`: load the spec, data and checkpoints, integrate every step, stream the
//! results to the exporters, and write the summary.
//!
//! At most three checkpoints' parameters (θ_t, θ_{t+1} and the current integration point) and
//! a handful of gradient-sized buffers are held at any time, whatever the number of steps.

use crate::checkpoint::{self, CheckpointFile};
use crate::data::Dataset;
use crate::error::{LcaError, Result};
use crate::eval::{Evaluator, LossGrad};
use crate::lca::{Integration, integrate_step};
use crate::net::{LossKind, Model};
use crate::progress::Progress;
use crate::report::{
    CheckpointRef, DataInfo, Exporter, FileRef, GroupStep, GroupTotal, IntegrationInfo, ModelInfo,
    OutDir, ParamRef, ParamTotals, RunTotals, SCHEMA_VERSION, Spacing, StepOutput, StepRecord,
    Summary, Tool, csv::CsvExporter, json::JsonExporter, tensors::StoreDtype,
    tensors::TensorExporter,
};
use crate::spec::Spec;
use std::path::PathBuf;

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
    /// Hide the progress bar.
    pub quiet: bool,
}

/// Everything loaded before the first gradient: spec, data, model and checkpoint list.
pub struct Prepared {
    pub spec: Spec,
    pub spec_sha256: String,
    pub data: Dataset,
    pub model: Model<f32>,
    pub files: Vec<CheckpointFile>,
}

/// Load the spec and data, build the model and check every selected checkpoint's header
/// against it, so that bad input is reported before any computation.
pub fn prepare(
    ckpt_dir: &std::path::Path,
    spec_path: &std::path::Path,
    first: Option<u64>,
    last: Option<u64>,
    every: usize,
) -> Result<Prepared> {
    let spec = Spec::load(spec_path)?;
    let spec_sha256 = crate::tensors::sha256_hex(spec.source.as_bytes());
    let loss = match spec.loss {
        crate::spec::LossSpec::CrossEntropy {} => LossKind::CrossEntropy,
        crate::spec::LossSpec::Mse {} => LossKind::Mse,
    };
    let data = Dataset::load(
        &spec.train_path(),
        &spec.data,
        spec.model.input_shape.as_deref(),
        loss,
    )?;
    let model = Model::<f32>::build(&spec, data.sample_shape())?;
    data.check_targets(model.output_shape(), model.loss)?;
    let files = checkpoint::select(checkpoint::scan(ckpt_dir)?, first, last, every)?;
    if files.len() < 2 {
        return Err(LcaError::Checkpoint {
            path: ckpt_dir.to_path_buf(),
            msg: format!(
                "{} checkpoint(s) selected; LCA needs at least two (one step)",
                files.len()
            ),
        });
    }
    for f in &files {
        for p in &model.params {
            match f.tensors.iter().find(|t| t.name == p.name) {
                None => {
                    let hint = f
                        .tensors
                        .iter()
                        .find(|t| t.name.ends_with(&p.name) || p.name.ends_with(&t.name))
                        .map(|t| format!(" (the file has '{}': check `model.prefix`)", t.name))
                        .unwrap_or_default();
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
    }
    Ok(Prepared {
        spec,
        spec_sha256,
        data,
        model,
        files,
    })
}

fn counts(v: &[f64]) -> (u64, u64, u64) {
    let (mut h, mut z, mut u) = (0, 0, 0);
    for &x in v {
        if x < 0.0 {
            h += 1;
        } else if x > 0.0 {
            u += 1;
        } else {
            z += 1;
        }
    }
    (h, z, u)
}

fn fraction(a: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { a as f64 / n as f64 }
}

/// Run the analysis; `note` receives human-readable notes and warnings (for stderr).
pub fn analyze(opts: &AnalyzeOptions, note: &mut dyn FnMut(&str)) -> Result<Summary> {
    let p = prepare(
        &opts.ckpt_dir,
        &opts.spec,
        opts.first,
        opts.last,
        opts.every,
    )?;
    let model = &p.model;
    let files = &p.files;
    let nsteps = files.len() - 1;
    let eval = Evaluator {
        model,
        data: &p.data,
        chunk_size: p.spec.eval.chunk_size,
    };

    let mut warnings = Vec::new();
    let spacing = {
        let gaps: Vec<u64> = files.windows(2).map(|w| w[1].step - w[0].step).collect();
        let min = *gaps.iter().min().expect("≥ 1 step");
        let max = *gaps.iter().max().expect("≥ 1 step");
        Spacing {
            min,
            max,
            sparse: max > 1,
        }
    };
    if spacing.sparse {
        let w = format!(
            "checkpoints are {}{} training steps apart: each step's total LCA is exact, but its split over parameters follows the straight chord between checkpoints, not the optimiser's path",
            spacing.min,
            if spacing.max != spacing.min {
                format!("–{}", spacing.max)
            } else {
                String::new()
            }
        );
        note(&format!("warning: {w}"));
        warnings.push(w);
    }

    let mut out = OutDir::prepare(&opts.out)?;
    let mut exporters: Vec<Box<dyn Exporter>> = Vec::new();
    let csv_paths = [
        out.partial("steps.csv"),
        out.partial("layers.csv"),
        out.partial("tensors.csv"),
        out.partial("params.csv"),
    ];
    exporters.push(Box::new(CsvExporter::new(csv_paths)?));
    if let Some(dtype) = opts.store {
        let path = out.partial("lca.safetensors");
        let params: Vec<(String, Vec<usize>)> = model
            .params
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect();
        let steps: Vec<(u64, u64)> = files.windows(2).map(|w| (w[0].step, w[1].step)).collect();
        exporters.push(Box::new(TensorExporter::new(path, &params, &steps, dtype)?));
    }
    let json_path = out.partial(crate::report::SUMMARY_FILE);
    exporters.push(Box::new(JsonExporter { path: json_path }));

    // Layers with parameters, in order; each tensor's layer index.
    let mut layers: Vec<String> = Vec::new();
    for prm in &model.params {
        if !layers.contains(&prm.layer) {
            layers.push(prm.layer.clone());
        }
    }
    let layer_of: Vec<usize> = model
        .params
        .iter()
        .map(|prm| layers.iter().position(|l| *l == prm.layer).expect("listed"))
        .collect();

    let progress = Progress::new((1 + 2 * nsteps) as u64, opts.quiet);
    let mut evaluations = 0usize;
    let mut grad_at = |theta: &[Vec<f32>]| -> Result<LossGrad> {
        let r = eval.loss_and_grad(theta);
        progress.inc();
        r
    };

    let first = checkpoint::load(&files[0], &model.params)?;
    if !first.unused.is_empty() {
        note(&format!(
            "note: ignoring {} tensor(s) the spec does not use: {}",
            first.unused.len(),
            first.unused.join(", ")
        ));
    }
    let mut ckpt_refs = vec![CheckpointRef {
        path: files[0].path.display().to_string(),
        step: files[0].step,
        step_source: files[0].step_source,
        sha256: first.sha256.clone(),
    }];
    let mut theta0 = first.theta;
    let mut start = grad_at(&theta0).map_err(|e| at_checkpoint(e, &files[0]))?;
    evaluations += 1;
    let loss_first = start.loss;

    let mut totals = ParamTotals {
        lca: model.params.iter().map(|q| vec![0.0; q.numel()]).collect(),
        helped_steps: model.params.iter().map(|q| vec![0; q.numel()]).collect(),
        hurt_steps: model.params.iter().map(|q| vec![0; q.numel()]).collect(),
    };
    let mut records = Vec::with_capacity(nsteps);
    let mut cum = loss_first;
    for w in files.windows(2) {
        let next = checkpoint::load(&w[1], &model.params)?;
        ckpt_refs.push(CheckpointRef {
            path: w[1].path.display().to_string(),
            step: w[1].step,
            step_source: w[1].step_source,
            sha256: next.sha256.clone(),
        });
        let (s, end) = integrate_step(
            &theta0,
            &next.theta,
            &start,
            &opts.integration,
            &mut grad_at,
        )
        .map_err(|e| at_step(e, &w[0], &w[1]))?;
        evaluations += s.evaluations;
        progress.add_length((s.evaluations as u64).saturating_sub(2));

        let mut tensors = Vec::with_capacity(model.params.len());
        let mut layer_steps: Vec<GroupStep> = layers
            .iter()
            .map(|l| GroupStep {
                name: l.clone(),
                layer: l.clone(),
                lca: 0.0,
                helped: 0,
                zero: 0,
                hurt: 0,
            })
            .collect();
        let (mut h, mut z, mut u) = (0, 0, 0);
        for (pi, v) in s.lca.iter().enumerate() {
            let (th, tz, tu) = counts(v);
            let sum: f64 = v.iter().sum();
            h += th;
            z += tz;
            u += tu;
            let ls = &mut layer_steps[layer_of[pi]];
            ls.lca += sum;
            ls.helped += th;
            ls.zero += tz;
            ls.hurt += tu;
            tensors.push(GroupStep {
                name: model.params[pi].name.clone(),
                layer: model.params[pi].layer.clone(),
                lca: sum,
                helped: th,
                zero: tz,
                hurt: tu,
            });
            for (k, &x) in v.iter().enumerate() {
                totals.lca[pi][k] += x;
                if x < 0.0 {
                    totals.helped_steps[pi][k] += 1;
                } else if x > 0.0 {
                    totals.hurt_steps[pi][k] += 1;
                }
            }
        }
        cum += s.lca_sum;
        let rec = StepRecord {
            step: w[0].step,
            next_step: w[1].step,
            loss_before: s.loss_before,
            loss_after: s.loss_after,
            delta_loss: s.loss_after - s.loss_before,
            lca_sum: s.lca_sum,
            residual: s.residual,
            reconstructed_loss: cum,
            splits: s.splits,
            capped: s.capped,
            evaluations: s.evaluations,
            helped: h,
            zero: z,
            hurt: u,
            helped_fraction: fraction(h, h + z + u),
        };
        progress.message(&format!(
            "step {}→{}  ΔL {:+.3e}  r {:+.1e}{}",
            rec.step,
            rec.next_step,
            rec.delta_loss,
            rec.residual,
            if rec.splits > 2 {
                format!("  ({} splits)", rec.splits)
            } else {
                String::new()
            }
        ));
        let so = StepOutput {
            record: &rec,
            tensors: &tensors,
            layers: &layer_steps,
            lca: &s.lca,
        };
        for e in exporters.iter_mut() {
            e.step(&so)?;
        }
        records.push(rec);
        theta0 = next.theta;
        start = end;
    }
    progress.finish();

    let loss_last = start.loss;
    let delta = loss_last - loss_first;
    let residual_sum: f64 = records.iter().map(|r| r.residual).sum();
    let residual_abs_sum: f64 = records.iter().map(|r| r.residual.abs()).sum();
    let capped_steps: Vec<u64> = records
        .iter()
        .filter(|r| r.capped)
        .map(|r| r.step)
        .collect();
    if !capped_steps.is_empty() {
        let w = format!(
            "{} step(s) kept a residual above the bound at {} splits: {}",
            capped_steps.len(),
            opts.integration.max_splits,
            capped_steps
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        note(&format!("warning: {w}"));
        warnings.push(w);
    }
    let group_total = |name: &str, layer: &str, vals: &mut dyn Iterator<Item = f64>| {
        let (mut n, mut lca, mut h, mut z, mut u) = (0usize, 0.0, 0, 0, 0);
        for v in vals {
            n += 1;
            lca += v;
            if v < 0.0 {
                h += 1
            } else if v > 0.0 {
                u += 1
            } else {
                z += 1
            }
        }
        GroupTotal {
            name: name.to_string(),
            layer: layer.to_string(),
            params: n,
            lca,
            helped: h,
            zero: z,
            hurt: u,
            helped_fraction: fraction(h, n as u64),
        }
    };
    let tensor_totals: Vec<GroupTotal> = model
        .params
        .iter()
        .enumerate()
        .map(|(pi, q)| group_total(&q.name, &q.layer, &mut totals.lca[pi].iter().copied()))
        .collect();
    let layer_totals: Vec<GroupTotal> = layers
        .iter()
        .enumerate()
        .map(|(li, l)| {
            let mut it = (0..model.params.len())
                .filter(|&pi| layer_of[pi] == li)
                .flat_map(|pi| totals.lca[pi].iter().copied());
            group_total(l, l, &mut it)
        })
        .collect();
    let mut file_names = vec![
        "summary.json".to_string(),
        "steps.csv".into(),
        "layers.csv".into(),
        "tensors.csv".into(),
        "params.csv".into(),
    ];
    if opts.store.is_some() {
        file_names.push("lca.safetensors".into());
    }
    let rel = |x: f64| {
        if delta != 0.0 {
            x / delta.abs()
        } else {
            f64::NAN
        }
    };
    let summary = Summary {
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
            chunk_size: eval.chunk_size,
            chunks: eval.num_chunks(),
        },
        model: ModelInfo {
            loss: match model.loss {
                LossKind::CrossEntropy => "cross_entropy".into(),
                LossKind::Mse => "mse".into(),
            },
            num_params: model.num_params(),
            input_shape: model.input_shape.clone(),
            output_shape: model.output_shape().to_vec(),
            layers: layers.clone(),
            params: model
                .params
                .iter()
                .map(|q| ParamRef {
                    name: q.name.clone(),
                    layer: q.layer.clone(),
                    role: q.role.clone(),
                    shape: q.shape.clone(),
                    numel: q.numel(),
                })
                .collect(),
        },
        integration: IntegrationInfo {
            settings: opts.integration,
            precision: "f32 compute, f64 accumulation".into(),
        },
        checkpoints: ckpt_refs,
        step_spacing: spacing,
        run: RunTotals {
            steps: records.len(),
            loss_first,
            loss_last,
            delta_loss: delta,
            lca_sum: records.iter().map(|r| r.lca_sum).sum(),
            residual_sum,
            residual_abs_sum,
            max_abs_residual: records.iter().map(|r| r.residual.abs()).fold(0.0, f64::max),
            rel_residual: rel(residual_sum.abs()),
            rel_abs_residual: rel(residual_abs_sum),
            evaluations,
            capped_steps,
        },
        steps: records,
        tensors: tensor_totals,
        layers: layer_totals,
        ignored_tensors: first.unused,
        warnings,
        files: file_names,
    };
    for e in exporters.iter_mut() {
        e.finish(&summary, &totals)?;
    }
    drop(exporters);
    out.commit()?;
    Ok(summary)
}

fn at_checkpoint(e: LcaError, f: &CheckpointFile) -> LcaError {
    match e {
        LcaError::Numeric(m) => {
            LcaError::Numeric(format!("{} (step {}): {m}", f.path.display(), f.step))
        }
        other => other,
    }
}

fn at_step(e: LcaError, a: &CheckpointFile, b: &CheckpointFile) -> LcaError {
    match e {
        LcaError::Numeric(m) => LcaError::Numeric(format!(
            "between {} (step {}) and {} (step {}): {m}",
            a.path.display(),
            a.step,
            b.path.display(),
            b.step
        )),
        other => other,
    }
}
