//! `lca analyze`: load the spec, data and checkpoints, integrate every step, stream the
//! results to the exporters, and write the summary.
//!
//! At most three checkpoints' parameters (θ_t, θ_{t+1} and the current integration point) and
//! a handful of gradient-sized buffers are held at any time, whatever the number of steps.

use crate::checkpoint::{self, CheckpointFile};
use crate::data::Dataset;
use crate::error::{LcaError, Result};
use crate::eval::{Evaluator, LossGrad};
use crate::lca::{Integration, difference, integrate_step, point};
use crate::net::{LossKind, Model, Real};
use crate::progress::Progress;
use crate::report::{
    CheckpointRef, DataInfo, Exporter, FileInfo, FileRef, GroupStep, GroupTotal, IntegrationInfo,
    L2Report, ModelInfo, OutDir, ParamRef, ParamTotals, ResidualReport, RunTotals, SCHEMA_VERSION,
    Spacing, StepOutput, StepRecord, Summary, Tool,
    csv::CsvExporter,
    json::JsonExporter,
    tensors::{StoreDtype, TensorExporter, TensorSource},
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
    /// Arithmetic of the evaluator.
    pub precision: Precision,
}

/// Everything loaded before the first gradient: spec, data, model and checkpoint list.
pub struct Prepared {
    pub spec: Spec,
    pub spec_sha256: String,
    pub data: Dataset,
    /// The held-out set, when the spec names one.
    pub validation: Option<Dataset>,
    pub model: Model<f32>,
    pub files: Vec<CheckpointFile>,
    /// Per parameter tensor: whether the L2 term applies to it (empty without one).
    pub l2_mask: Vec<bool>,
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
    let input_shape = spec.model.input_shape.as_deref();
    let data = Dataset::load(&spec.train_path(), &spec.data, input_shape, loss)?;
    let model = Model::<f32>::build(&spec, data.sample_shape())?;
    data.check_inputs(&model)?;
    data.check_targets(model.output_shape(), model.loss)?;
    let validation = match spec.validation_path() {
        None => None,
        Some(path) => {
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
            v.check_inputs(&model)?;
            v.check_targets(model.output_shape(), model.loss)?;
            Some(v)
        }
    };
    let l2_mask = match &spec.regularization {
        None => Vec::new(),
        Some(r) => match &r.tensors {
            None => model.params.iter().map(|p| !p.buffer).collect(),
            Some(names) => {
                for n in names {
                    if !model.params.iter().any(|p| &p.name == n && !p.buffer) {
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
                model
                    .params
                    .iter()
                    .map(|p| names.contains(&p.name))
                    .collect()
            }
        },
    };
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
            match f.tensors.iter().find(|t| p.answers_to(&t.name)) {
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
        validation,
        model,
        files,
        l2_mask,
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

/// λ(θ₁² − θ₀²) per parameter: the exact LCA of λ‖θ‖² over a step (Simpson integrates the
/// linear gradient 2λθ exactly, so this closed form is what any rule would give).
pub fn l2_step(
    lambda: f64,
    theta0: &[Vec<f32>],
    theta1: &[Vec<f32>],
    mask: &[bool],
) -> Vec<Vec<f64>> {
    theta0
        .iter()
        .zip(theta1)
        .zip(mask)
        .map(|((a, b), &on)| {
            a.iter()
                .zip(b)
                .map(|(&a, &b)| {
                    if on {
                        let (a, b) = (a as f64, b as f64);
                        lambda * (b * b - a * a)
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

/// λ‖θ‖² over the masked tensors.
fn l2_penalty(lambda: f64, theta: &[Vec<f32>], mask: &[bool]) -> f64 {
    theta
        .iter()
        .zip(mask)
        .filter(|(_, on)| **on)
        .map(|(t, _)| t.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .sum::<f64>()
        * lambda
}

fn add_to(acc: &mut [Vec<f64>], v: &[Vec<f64>]) {
    for (a, b) in acc.iter_mut().zip(v) {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    }
}

fn residual_report(first: f64, records: &[(f64, f64, f64)]) -> ResidualReport {
    // records: (loss_after, lca_sum, residual)
    let last = records.last().map_or(first, |r| r.0);
    let delta = last - first;
    let rs: f64 = records.iter().map(|r| r.2).sum();
    let ra: f64 = records.iter().map(|r| r.2.abs()).sum();
    let rel = |x: f64| {
        if delta != 0.0 {
            x / delta.abs()
        } else {
            f64::NAN
        }
    };
    ResidualReport {
        loss_first: first,
        loss_last: last,
        delta_loss: delta,
        lca_sum: records.iter().map(|r| r.1).sum(),
        residual_sum: rs,
        residual_abs_sum: ra,
        max_abs_residual: records.iter().map(|r| r.2.abs()).fold(0.0, f64::max),
        rel_residual: rel(rs.abs()),
        rel_abs_residual: rel(ra),
    }
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
    match opts.precision {
        Precision::F32 => run::<f32>(opts, p, note),
        Precision::F64 => run::<f64>(opts, p, note),
    }
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

fn run<T: Real>(opts: &AnalyzeOptions, p: Prepared, note: &mut dyn FnMut(&str)) -> Result<Summary> {
    let model_t = Model::<T>::build(&p.spec, p.data.sample_shape())?;
    let model = &model_t;
    let files = &p.files;
    let nsteps = files.len() - 1;
    let chunk_size = p.spec.eval.chunk_size;
    let eval = Evaluator {
        model,
        data: &p.data,
        chunk_size,
    };
    let val_eval = p.validation.as_ref().map(|data| Evaluator {
        model,
        data,
        chunk_size,
    });
    let l2 = p.spec.regularization.as_ref().map(|r| r.l2);

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

    let remainder = p.data.len() % chunk_size;
    let batch_stats = p.spec.model.batch_norm == Some(crate::net::batch_norm::BnMode::BatchStats)
        && model
            .nodes
            .iter()
            .any(|n| n.type_name.starts_with("batch_norm"));
    if batch_stats && remainder > 0 && (remainder < 8 || remainder * 4 < chunk_size) {
        let w = format!(
            "batch norm uses batch statistics and the last evaluation chunk has {remainder} samples ({} in all, chunk_size {chunk_size}): its statistics are noisy and can make the loss jump along a step; choose a chunk_size that divides the set or leaves a larger remainder",
            p.data.len()
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
    let mut file_names: Vec<String> = [
        "summary.json",
        "steps.csv",
        "layers.csv",
        "tensors.csv",
        "params.csv",
    ]
    .map(String::from)
    .to_vec();
    if let Some(dtype) = opts.store {
        let params: Vec<(String, Vec<usize>)> = model
            .params
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect();
        let steps: Vec<(u64, u64)> = files.windows(2).map(|w| (w[0].step, w[1].step)).collect();
        let path = out.partial("lca.safetensors");
        exporters.push(Box::new(TensorExporter::new(path, &params, &steps, dtype)?));
        file_names.push("lca.safetensors".into());
        if val_eval.is_some() {
            let path = out.partial("lca_validation.safetensors");
            let mut e = TensorExporter::new(path, &params, &steps, dtype)?;
            e.source = TensorSource::Validation;
            exporters.push(Box::new(e));
            file_names.push("lca_validation.safetensors".into());
        }
    }
    let json_path = out.partial(crate::report::SUMMARY_FILE);
    exporters.push(Box::new(JsonExporter { path: json_path }));

    // Layers with parameters, in order; each tensor's layer index.
    // Buffers (if any) come last, as one group.
    let mut layers: Vec<String> = Vec::new();
    for prm in model.params.iter().filter(|p| !p.buffer) {
        if !layers.contains(&prm.layer) {
            layers.push(prm.layer.clone());
        }
    }
    if model.params.iter().any(|p| p.buffer) {
        layers.push("buffers".into());
    }
    let layer_of: Vec<usize> = model
        .params
        .iter()
        .map(|prm| {
            layers
                .iter()
                .position(|l| l == prm.group())
                .expect("listed")
        })
        .collect();

    let progress = Progress::new((1 + 2 * nsteps) as u64, opts.quiet);
    let mut evaluations = 0usize;
    let eval_all = |theta: &[Vec<T>]| -> Result<Vec<LossGrad>> {
        let mut r = vec![eval.loss_and_grad(theta)?];
        if let Some(v) = &val_eval {
            r.push(v.loss_and_grad(theta).map_err(|e| match e {
                LcaError::Numeric(m) => LcaError::Numeric(format!("validation set: {m}")),
                other => other,
            })?);
        }
        progress.inc();
        Ok(r)
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
    let widened: Vec<Vec<T>> = theta0
        .iter()
        .map(|t| t.iter().map(|&v| T::of(v as f64)).collect())
        .collect();
    let mut start = eval_all(&widened).map_err(|e| at_checkpoint(e, &files[0]))?;
    evaluations += 1;
    let loss_first = start[0].loss;
    let val_first = start.get(1).map(|v| v.loss);
    let l2_first = l2.map(|lam| l2_penalty(lam, &theta0, &p.l2_mask));

    let zeros = || -> Vec<Vec<f64>> { model.params.iter().map(|q| vec![0.0; q.numel()]).collect() };
    let mut totals = ParamTotals {
        lca: zeros(),
        helped_steps: model.params.iter().map(|q| vec![0; q.numel()]).collect(),
        hurt_steps: model.params.iter().map(|q| vec![0; q.numel()]).collect(),
        val_lca: val_eval.as_ref().map(|_| zeros()),
        l2_lca: l2.map(|_| zeros()),
    };
    let mut records = Vec::with_capacity(nsteps);
    let mut val_records = Vec::new();
    let mut cum = loss_first;
    for w in files.windows(2) {
        let next = checkpoint::load(&w[1], &model.params)?;
        ckpt_refs.push(CheckpointRef {
            path: w[1].path.display().to_string(),
            step: w[1].step,
            step_source: w[1].step_source,
            sha256: next.sha256.clone(),
        });
        let delta = difference(&theta0, &next.theta);
        let (mut objs, end) = integrate_step(&delta, &start, &opts.integration, &mut |s| {
            eval_all(&point::<T>(&theta0, &delta, s))
        })
        .map_err(|e| at_step(e, &w[0], &w[1]))?;
        let val = if objs.len() > 1 { objs.pop() } else { None };
        let s = objs.pop().expect("training objective");
        evaluations += s.evaluations;
        progress.add_length((s.evaluations as u64).saturating_sub(2));
        let l2_lca = l2.map(|lam| l2_step(lam, &theta0, &next.theta, &p.l2_mask));

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
                val_lca: val.as_ref().map(|_| 0.0),
                l2_lca: l2_lca.as_ref().map(|_| 0.0),
            })
            .collect();
        let (mut h, mut z, mut u) = (0, 0, 0);
        for (pi, v) in s.lca.iter().enumerate() {
            let (th, tz, tu) = counts(v);
            let sum: f64 = v.iter().sum();
            let vsum = val.as_ref().map(|x| x.lca[pi].iter().sum::<f64>());
            let lsum = l2_lca.as_ref().map(|x| x[pi].iter().sum::<f64>());
            if !model.params[pi].buffer {
                // Helped/zero/hurt fractions are over trained parameters only.
                h += th;
                z += tz;
                u += tu;
            }
            let ls = &mut layer_steps[layer_of[pi]];
            ls.lca += sum;
            ls.helped += th;
            ls.zero += tz;
            ls.hurt += tu;
            if let (Some(a), Some(b)) = (ls.val_lca.as_mut(), vsum) {
                *a += b;
            }
            if let (Some(a), Some(b)) = (ls.l2_lca.as_mut(), lsum) {
                *a += b;
            }
            tensors.push(GroupStep {
                name: model.params[pi].name.clone(),
                layer: model.params[pi].group().to_string(),
                lca: sum,
                helped: th,
                zero: tz,
                hurt: tu,
                val_lca: vsum,
                l2_lca: lsum,
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
        if let (Some(acc), Some(v)) = (totals.val_lca.as_mut(), val.as_ref()) {
            add_to(acc, &v.lca);
        }
        if let (Some(acc), Some(v)) = (totals.l2_lca.as_mut(), l2_lca.as_ref()) {
            add_to(acc, v);
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
            val_loss_before: val.as_ref().map(|v| v.loss_before),
            val_loss_after: val.as_ref().map(|v| v.loss_after),
            val_lca_sum: val.as_ref().map(|v| v.lca_sum),
            val_residual: val.as_ref().map(|v| v.residual),
            l2_lca: tensors.iter().map(|t| t.l2_lca).sum(),
        };
        if let Some(v) = &val {
            val_records.push((v.loss_after, v.lca_sum, v.residual));
        }
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
            val_lca: val.as_ref().map(|v| v.lca.as_slice()),
        };
        for e in exporters.iter_mut() {
            e.step(&so)?;
        }
        records.push(rec);
        theta0 = next.theta;
        start = end;
    }
    progress.finish();

    let train = residual_report(
        loss_first,
        &records
            .iter()
            .map(|r| (r.loss_after, r.lca_sum, r.residual))
            .collect::<Vec<_>>(),
    );
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
    let group_total = |name: &str, layer: &str, ids: &[usize]| {
        let (mut n, mut lca, mut h, mut z, mut u) = (0usize, 0.0, 0, 0, 0);
        for &pi in ids {
            for &v in &totals.lca[pi] {
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
        }
        let sum_of = |t: &Option<Vec<Vec<f64>>>| {
            t.as_ref()
                .map(|t| ids.iter().map(|&pi| t[pi].iter().sum::<f64>()).sum())
        };
        GroupTotal {
            name: name.to_string(),
            layer: layer.to_string(),
            params: n,
            lca,
            helped: h,
            zero: z,
            hurt: u,
            helped_fraction: fraction(h, n as u64),
            val_lca: sum_of(&totals.val_lca),
            l2_lca: sum_of(&totals.l2_lca),
        }
    };
    let tensor_totals: Vec<GroupTotal> = model
        .params
        .iter()
        .enumerate()
        .map(|(pi, q)| group_total(&q.name, q.group(), &[pi]))
        .collect();
    let layer_totals: Vec<GroupTotal> = layers
        .iter()
        .enumerate()
        .map(|(li, l)| {
            let ids: Vec<usize> = (0..model.params.len())
                .filter(|&pi| layer_of[pi] == li)
                .collect();
            group_total(l, l, &ids)
        })
        .collect();
    let l2_report = match (&p.spec.regularization, l2_first) {
        (Some(r), Some(first_pen)) => {
            let last_pen = l2_penalty(r.l2, &theta0, &p.l2_mask);
            let lca_sum: f64 = records.iter().filter_map(|x| x.l2_lca).sum();
            Some(L2Report {
                lambda: r.l2,
                tensors: model
                    .params
                    .iter()
                    .zip(&p.l2_mask)
                    .filter(|(_, on)| **on)
                    .map(|(q, _)| q.name.clone())
                    .collect(),
                penalty_first: first_pen,
                penalty_last: last_pen,
                lca_sum,
                objective_delta: train.delta_loss + (last_pen - first_pen),
            })
        }
        _ => None,
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
            chunk_size,
            chunks: eval.num_chunks(),
            validation: p.validation.as_ref().map(|v| FileInfo {
                path: v.path.display().to_string(),
                sha256: v.sha256.clone(),
                samples: v.len(),
            }),
        },
        model: ModelInfo {
            batch_norm: model
                .nodes
                .iter()
                .any(|n| n.type_name.starts_with("batch_norm"))
                .then_some(p.spec.model.batch_norm)
                .flatten(),
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
                    layer: q.group().to_string(),
                    buffer: q.buffer,
                    role: q.role.clone(),
                    shape: q.shape.clone(),
                    numel: q.numel(),
                    aliases: q.aliases.clone(),
                })
                .collect(),
            attention: crate::net::attention::describe(&p.spec, model),
        },
        integration: IntegrationInfo {
            settings: opts.integration,
            precision: match opts.precision {
                Precision::F32 => "f32 compute, f64 accumulation".into(),
                Precision::F64 => "f64".into(),
            },
        },
        checkpoints: ckpt_refs,
        step_spacing: spacing,
        run: RunTotals {
            steps: records.len(),
            loss_first: train.loss_first,
            loss_last: train.loss_last,
            delta_loss: train.delta_loss,
            lca_sum: train.lca_sum,
            residual_sum: train.residual_sum,
            residual_abs_sum: train.residual_abs_sum,
            max_abs_residual: train.max_abs_residual,
            rel_residual: train.rel_residual,
            rel_abs_residual: train.rel_abs_residual,
            evaluations,
            capped_steps,
            validation: val_first.map(|f| residual_report(f, &val_records)),
            l2: l2_report,
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
