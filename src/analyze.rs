//! `lca analyze`: load the spec, data and checkpoints, integrate every step, stream the
//! results to the exporters, and write the summary.
//!
//! At most three checkpoints' parameters (θ_t, θ_{t+1} and the current integration point) and
//! a handful of gradient-sized buffers are held at any time, whatever the number of steps.

use crate::checkpoint::{self, CheckpointFile};
use crate::data::Dataset;
use crate::error::{LcaError, Result};
use crate::eval::{Evaluator, LossGrad};
use crate::journal::{Journal, Manifest, ManifestCheckpoint, RunState};
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
    /// Continue the interrupted run whose journal is in `out` (see `docs/reliability.md`).
    pub resume: bool,
    /// Arithmetic of the evaluator.
    pub precision: Precision,
    /// Analyse only this shard of the steps and write a part for `lca merge`
    /// (see `docs/scale-out.md`).
    pub shard: Option<crate::shard::Shard>,
    /// Share the first layer between Simpson's points when the model allows it
    /// ([`crate::eval::Evaluator::simpson_sharing_first`]); `false` evaluates every point in full.
    pub share_first_layer: bool,
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

/// Everything loaded before the first gradient: spec, data, model and checkpoint list.
pub struct Prepared {
    pub spec: Spec,
    pub spec_sha256: String,
    pub data: Dataset,
    /// The held-out set, when the spec names one.
    pub validation: Option<Dataset>,
    pub model: Model<f32>,
    pub files: Vec<CheckpointFile>,
    /// Every checkpoint file found (selected or not) and its size when listed.
    pub listed: Vec<(PathBuf, u64)>,
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
            None => vec![true; model.params.len()],
            Some(names) => {
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
                model
                    .params
                    .iter()
                    .map(|p| names.contains(&p.name))
                    .collect()
            }
        },
    };
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
    for f in &files {
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
    }
    Ok(Prepared {
        spec,
        spec_sha256,
        data,
        validation,
        model,
        files,
        listed,
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

pub(crate) fn fraction(a: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { a as f64 / n as f64 }
}

/// The warning about steps whose residual stayed above the bound at the split cap.
pub(crate) fn capped_warning(capped_steps: &[u64], max_splits: usize) -> Option<String> {
    (!capped_steps.is_empty()).then(|| {
        format!(
            "{} step(s) kept a residual above the bound at {} splits: {}",
            capped_steps.len(),
            max_splits,
            crate::report::step_list(capped_steps)
        )
    })
}

/// Run totals per tensor and per layer from the per-parameter totals.
pub(crate) fn group_totals(
    params: &[ParamRef],
    layers: &[String],
    totals: &ParamTotals,
) -> (Vec<GroupTotal>, Vec<GroupTotal>) {
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
    let tensors = params
        .iter()
        .enumerate()
        .map(|(pi, q)| group_total(&q.name, &q.layer, &[pi]))
        .collect();
    let layer_totals = layers
        .iter()
        .map(|l| {
            let ids: Vec<usize> = (0..params.len())
                .filter(|&pi| params[pi].layer == *l)
                .collect();
            group_total(l, l, &ids)
        })
        .collect();
    (tensors, layer_totals)
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

pub(crate) fn residual_report(first: f64, records: &[(f64, f64, f64)]) -> ResidualReport {
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

/// Per-step figures of a tensor or layer, before they go to the exporters.
pub(crate) fn step_groups(
    params: &[ParamRef],
    layers: &[String],
    layer_of: &[usize],
    lca: &[Vec<f64>],
    val: Option<&[Vec<f64>]>,
    l2: Option<&[Vec<f64>]>,
) -> (Vec<GroupStep>, Vec<GroupStep>, (u64, u64, u64)) {
    let mut tensors = Vec::with_capacity(params.len());
    let mut layer_steps: Vec<GroupStep> = layers
        .iter()
        .map(|l| GroupStep {
            name: l.clone(),
            layer: l.clone(),
            lca: 0.0,
            helped: 0,
            zero: 0,
            hurt: 0,
            val_lca: val.map(|_| 0.0),
            l2_lca: l2.map(|_| 0.0),
        })
        .collect();
    let (mut h, mut z, mut u) = (0, 0, 0);
    for (pi, v) in lca.iter().enumerate() {
        let (th, tz, tu) = counts(v);
        let sum: f64 = v.iter().sum();
        let vsum = val.map(|x| x[pi].iter().sum::<f64>());
        let lsum = l2.map(|x| x[pi].iter().sum::<f64>());
        if !params[pi].buffer {
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
            name: params[pi].name.clone(),
            layer: params[pi].layer.clone(),
            lca: sum,
            helped: th,
            zero: tz,
            hurt: tu,
            val_lca: vsum,
            l2_lca: lsum,
        });
    }
    (tensors, layer_steps, (h, z, u))
}

/// Add one step's per-parameter values to the run's totals.
pub(crate) fn accumulate(
    totals: &mut ParamTotals,
    lca: &[Vec<f64>],
    val: Option<&[Vec<f64>]>,
    l2: Option<&[Vec<f64>]>,
) {
    for (pi, v) in lca.iter().enumerate() {
        for (k, &x) in v.iter().enumerate() {
            totals.lca[pi][k] += x;
            if x < 0.0 {
                totals.helped_steps[pi][k] += 1;
            } else if x > 0.0 {
                totals.hurt_steps[pi][k] += 1;
            }
        }
    }
    if let (Some(acc), Some(v)) = (totals.val_lca.as_mut(), val) {
        add_to(acc, v);
    }
    if let (Some(acc), Some(v)) = (totals.l2_lca.as_mut(), l2) {
        add_to(acc, v);
    }
}

/// Flush the exporters to disk and save the run's state in the journal.
fn save_journal(
    journal: &mut Journal,
    state: &RunState,
    exporters: &mut [Box<dyn Exporter>],
    out: &mut OutDir,
) -> Result<()> {
    let mut files = Vec::new();
    for e in exporters.iter_mut() {
        for (p, len) in e.sync()? {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            files.push((name, len));
        }
    }
    journal.save(state, &files)?;
    out.keep_partials();
    Ok(())
}

/// The run stopped with `e`: keep what the journal holds (saving the last finished step
/// first) and say how to continue, or, when no step was saved, clean up.
fn stop(
    e: LcaError,
    nsteps: usize,
    state: Option<&RunState>,
    journal: &mut Journal,
    exporters: &mut [Box<dyn Exporter>],
    out: &mut OutDir,
    note: &mut dyn FnMut(&str),
) -> LcaError {
    if let Some(state) = state
        && state.finished() > journal.saved()
        && let Err(se) = save_journal(journal, state, exporters, out)
    {
        note(&format!(
            "warning: could not update the resume journal: {se}"
        ));
    }
    if journal.saved() == 0 {
        let _ = std::fs::remove_dir_all(journal.dir());
        return match e {
            LcaError::Interrupted(_) => LcaError::Interrupted(
                "interrupted before the first step finished; nothing was kept".into(),
            ),
            other => other,
        };
    }
    out.keep_partials();
    let kept = format!(
        "{} of {nsteps} steps are finished and kept in {}",
        journal.saved(),
        journal.dir().display()
    );
    match e {
        LcaError::Interrupted(_) => LcaError::Interrupted(format!(
            "interrupted; {kept}: run the same command with --resume to continue"
        )),
        other => LcaError::Stopped {
            error: Box::new(other),
            kept: format!(
                "{kept}: once the problem is fixed, run the same command with --resume to continue"
            ),
        },
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
        match std::fs::metadata(&f.path) {
            Err(_) => out.push(format!(
                "{} was removed during the run, after it had been read",
                f.path.display()
            )),
            Ok(m) if m.len() != f.len => out.push(format!(
                "{} changed during the run ({} bytes when read, {} now); the results use the content that was read",
                f.path.display(),
                f.len,
                m.len()
            )),
            Ok(_) => {}
        }
    }
    out
}

/// Sleep `LCA_TEST_STEP_DELAY_MS` milliseconds after each step: a hook for the tests that
/// interrupt a run. Returns early on an interrupt.
fn test_delay() {
    let ms: u64 = match std::env::var("LCA_TEST_STEP_DELAY_MS") {
        Ok(v) => v.parse().unwrap_or(0),
        Err(_) => return,
    };
    let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    while std::time::Instant::now() < until && !crate::interrupt::requested() {
        std::thread::sleep(std::time::Duration::from_millis(5));
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

fn run<T: Real>(opts: &AnalyzeOptions, p: Prepared, note: &mut dyn FnMut(&str)) -> Result<Summary> {
    let model_t = Model::<T>::build(&p.spec, p.data.sample_shape())?;
    let model = &model_t;
    // The whole selection, and the checkpoints this run analyses: all of them, or the
    // shard's range (its first checkpoint is also the previous shard's last).
    let all = &p.files;
    let (lo, hi) = match opts.shard {
        Some(s) => s.range(all.len() - 1)?,
        None => (0, all.len() - 1),
    };
    let files = &all[lo..=hi];
    if let Some(s) = opts.shard {
        note(&format!(
            "note: shard {s}: steps {}→{} (checkpoints {lo}–{hi} of 0–{}, {} of {} steps)",
            files[0].step,
            files[files.len() - 1].step,
            all.len() - 1,
            hi - lo,
            all.len() - 1
        ));
    }
    // Parts of a sharded run always store f64 per-step values, so that `lca merge` can
    // reproduce the single run's sums and its lca.safetensors in any dtype bit for bit.
    let store = if opts.shard.is_some() {
        Some(StoreDtype::F64)
    } else {
        opts.store
    };
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
    // Plain Simpson steps share the first layer's work between their points when it allows.
    let shared = opts.share_first_layer
        && opts.integration.method == crate::lca::Method::Simpson
        && eval.shares_first_layer();

    let mut warnings = Vec::new();
    let spacing = {
        // Over the whole selection, so that every shard reports what a single run would.
        let gaps: Vec<u64> = all.windows(2).map(|w| w[1].step - w[0].step).collect();
        // prepare() guarantees at least two checkpoints, so at least one gap.
        let min = gaps.iter().copied().min().unwrap_or(0);
        let max = gaps.iter().copied().max().unwrap_or(0);
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

    // The output directory and the resume journal.
    let manifest_of = |sel: &[CheckpointFile]| {
        Manifest::new(
            &p.spec_sha256,
            &p.data.sha256,
            p.validation.as_ref().map(|v| v.sha256.as_str()),
            opts.integration,
            match opts.precision {
                Precision::F32 => "f32",
                Precision::F64 => "f64",
            },
            shared,
            opts.store,
            sel.iter()
                .map(|f| ManifestCheckpoint {
                    file: f
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default(),
                    step: f.step,
                })
                .collect(),
            model
                .params
                .iter()
                .map(|q| (q.name.clone(), q.shape.clone()))
                .collect(),
        )
    };
    let manifest = manifest_of(files);
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
    // Warnings known before any step (the same in every shard).
    let leading_warnings = warnings.clone();

    let (mut out, found) = OutDir::prepare(&opts.out)?;
    let jdir = Journal::dir_of(&opts.out);
    let mut resume_from: Option<(RunState, Vec<(String, u64)>)> = None;
    match Journal::read(&opts.out)? {
        Some(j) => {
            let kept = j.state.as_ref().map_or(0, |(s, _)| s.finished());
            if !opts.resume {
                if kept > 0 {
                    return Err(LcaError::Output {
                        path: opts.out.clone(),
                        msg: format!(
                            "holds an interrupted analysis ({kept} of {} steps finished, journal in {}): add --resume to continue it, or delete {} to start over",
                            j.manifest.checkpoints.len().saturating_sub(1),
                            jdir.display(),
                            jdir.display()
                        ),
                    });
                }
            } else if kept == 0 {
                note("note: the interrupted run had not finished a step; starting from the first");
            } else {
                let diffs = j.manifest.differences(&manifest);
                if !diffs.is_empty() {
                    return Err(LcaError::Output {
                        path: opts.out.clone(),
                        msg: format!(
                            "cannot resume the interrupted analysis: {}. Run with the inputs and options it was started with, or delete {} to start over",
                            diffs.join("; "),
                            jdir.display()
                        ),
                    });
                }
                resume_from = j.state;
            }
        }
        None if opts.resume => {
            if found.completed_commit
                && let Ok(s) = crate::report::json::read_summary(&opts.out)
                && s.spec.sha256 == p.spec_sha256
                && s.data.sha256 == p.data.sha256
                && s.checkpoints.len() == files.len()
            {
                note("note: the interrupted run had finished; its outputs are now in place");
                return Ok(s);
            }
            if found.finished_output {
                return Err(LcaError::Output {
                    path: opts.out.clone(),
                    msg: "holds a finished analysis and no interrupted run: nothing to resume (run without --resume to analyse again)".into(),
                });
            }
            note("note: no interrupted run to resume; starting from the first step");
        }
        None => {}
    }
    let mut journal = match &resume_from {
        Some((s, _)) => {
            out.keep_partials();
            Journal::resume(&opts.out, s.finished())
        }
        None => {
            out.remove_partials()?;
            Journal::create(&opts.out, &manifest)?
        }
    };
    let done = resume_from.as_ref().map_or(0, |(s, _)| s.finished());

    let mut exporters: Vec<Box<dyn Exporter>> = Vec::new();
    let setup = (|| -> Result<()> {
        let csv_paths = [
            out.partial("steps.csv"),
            out.partial("layers.csv"),
            out.partial("tensors.csv"),
            out.partial("params.csv"),
        ];
        exporters.push(Box::new(match &resume_from {
            None => CsvExporter::new(csv_paths)?,
            Some((_, lengths)) => {
                let len = |name: &str| -> Result<u64> {
                    let want = crate::report::partial_name(name);
                    lengths
                        .iter()
                        .find(|(n, _)| *n == want)
                        .map(|(_, l)| *l)
                        .ok_or_else(|| LcaError::Output {
                            path: jdir.clone(),
                            msg: format!(
                                "the resume journal does not record the length of {want}; delete it to start over"
                            ),
                        })
                };
                CsvExporter::resume(
                    csv_paths,
                    [len("steps.csv")?, len("layers.csv")?, len("tensors.csv")?],
                )?
            }
        }));
        if let Some(dtype) = store {
            let params: Vec<(String, Vec<usize>)> = model
                .params
                .iter()
                .map(|p| (p.name.clone(), p.shape.clone()))
                .collect();
            let steps: Vec<(u64, u64)> = files.windows(2).map(|w| (w[0].step, w[1].step)).collect();
            let mut names = vec![("lca.safetensors", TensorSource::Train)];
            if val_eval.is_some() {
                names.push(("lca_validation.safetensors", TensorSource::Validation));
            }
            if opts.shard.is_some() && l2.is_some() {
                names.push(("lca_l2.safetensors", TensorSource::L2));
            }
            for (name, source) in names {
                let path = out.partial(name);
                let mut e = if resume_from.is_some() {
                    TensorExporter::resume(path, &params, &steps, dtype, done)?
                } else {
                    TensorExporter::new(path, &params, &steps, dtype)?
                };
                e.source = source;
                exporters.push(Box::new(e));
            }
        }
        exporters.push(Box::new(JsonExporter {
            path: out.partial(crate::report::SUMMARY_FILE),
        }));
        Ok(())
    })();
    if let Err(e) = setup {
        return Err(stop(
            e,
            nsteps,
            None,
            &mut journal,
            &mut exporters,
            &mut out,
            note,
        ));
    }
    let file_names: Vec<String> = std::iter::once(crate::report::SUMMARY_FILE.to_string())
        .chain(
            out.pending_names()
                .into_iter()
                .filter(|n| n != crate::report::SUMMARY_FILE),
        )
        .collect();

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
        .map(|prm| layers.iter().position(|l| l == prm.group()).unwrap_or(0))
        .collect();
    let param_refs: Vec<ParamRef> = model
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
        .collect();

    let progress = Progress::new((1 + 2 * nsteps) as u64, opts.quiet);
    let eval_all = |theta: &[Vec<T>]| -> Result<Vec<LossGrad>> {
        if crate::interrupt::requested() {
            return Err(LcaError::Interrupted("interrupted".into()));
        }
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

    // Shared-first-layer Simpson steps of every objective; `carries` holds each objective's
    // first-layer outputs at the current θ_t.
    let mut carries: Vec<Option<crate::eval::FirstOutputs<T>>> = vec![None, None];
    let shared_all = |t0: &[Vec<T>],
                      mid: &[Vec<T>],
                      t1: &[Vec<T>],
                      carries: &mut Vec<Option<crate::eval::FirstOutputs<T>>>|
     -> Result<Vec<crate::eval::SharedSimpson>> {
        if crate::interrupt::requested() {
            return Err(LcaError::Interrupted("interrupted".into()));
        }
        let mut r = vec![eval.simpson_sharing_first(t0, mid, t1, &mut carries[0])?];
        if let Some(v) = &val_eval {
            r.push(
                v.simpson_sharing_first(t0, mid, t1, &mut carries[1])
                    .map_err(|e| match e {
                        LcaError::Numeric(m) => LcaError::Numeric(format!("validation set: {m}")),
                        other => other,
                    })?,
            );
        }
        progress.inc();
        progress.inc();
        Ok(r)
    };

    // The state at the first step to compute: θ_t, its evaluations, and the totals so far.
    let init = (|| -> Result<(RunState, Vec<Vec<f32>>, Vec<LossGrad>)> {
        match resume_from.take() {
            None => {
                let first = checkpoint::load(&files[0], &model.params)?;
                if !first.unused.is_empty() {
                    note(&format!(
                        "note: ignoring {} tensor(s) the spec does not use: {}",
                        first.unused.len(),
                        first.unused.join(", ")
                    ));
                }
                let start =
                    eval_all(&widen::<T>(&first.theta)).map_err(|e| at_checkpoint(e, &files[0]))?;
                let zeros = || -> Vec<Vec<f64>> {
                    model.params.iter().map(|q| vec![0.0; q.numel()]).collect()
                };
                let state = RunState {
                    records: Vec::with_capacity(nsteps),
                    checkpoint_sha256: vec![first.sha256],
                    loss_first: start[0].loss,
                    val_first: start.get(1).map(|v| v.loss),
                    l2_first: l2.map(|lam| l2_penalty(lam, &first.theta, &p.l2_mask)),
                    ignored: first.unused,
                    totals: ParamTotals {
                        lca: zeros(),
                        helped_steps: model.params.iter().map(|q| vec![0; q.numel()]).collect(),
                        hurt_steps: model.params.iter().map(|q| vec![0; q.numel()]).collect(),
                        val_lca: val_eval.as_ref().map(|_| zeros()),
                        l2_lca: l2.map(|_| zeros()),
                    },
                };
                Ok((state, first.theta, start))
            }
            Some((state, _)) => {
                let k = state.finished();
                if k > nsteps
                    || state.checkpoint_sha256.len() != k + 1
                    || state.totals.lca.len() != model.params.len()
                {
                    return Err(LcaError::Output {
                        path: jdir.clone(),
                        msg: "the resume state does not fit this run; delete it to start over"
                            .into(),
                    });
                }
                let changed = |f: &CheckpointFile, then: &str, now: &str| LcaError::Checkpoint {
                    path: f.path.clone(),
                    msg: format!(
                        "changed since the interrupted run read it (sha256 {}… then, {}… now): cannot resume; restore it, or delete {} to start over",
                        &then[..then.len().min(12)],
                        &now[..now.len().min(12)],
                        jdir.display()
                    ),
                };
                for (f, then) in files.iter().zip(&state.checkpoint_sha256).take(k) {
                    let now = crate::tensors::sha256_file(&f.path)
                        .map_err(|e| LcaError::io(&f.path, e))?;
                    if now != *then {
                        return Err(changed(f, then, &now));
                    }
                }
                let cur = checkpoint::load(&files[k], &model.params)?;
                if cur.sha256 != state.checkpoint_sha256[k] {
                    return Err(changed(&files[k], &state.checkpoint_sha256[k], &cur.sha256));
                }
                let evals: usize = state.records.iter().map(|r| r.evaluations).sum();
                let extra: usize = state
                    .records
                    .iter()
                    .map(|r| r.evaluations.saturating_sub(2))
                    .sum();
                progress.add_length(extra as u64);
                progress.advance(1 + evals as u64);
                note(&format!(
                    "note: resuming after step {} ({k} of {nsteps} steps were finished)",
                    files[k].step
                ));
                // The gradient at θ_k is evaluated again (deterministic: the same bits as the
                // interrupted run's end-point evaluation); it is not counted twice.
                let start = if k < nsteps {
                    eval_all(&widen::<T>(&cur.theta)).map_err(|e| at_checkpoint(e, &files[k]))?
                } else {
                    Vec::new()
                };
                Ok((state, cur.theta, start))
            }
        }
    })();
    let (mut state, mut theta0, mut start) = match init {
        Ok(x) => x,
        Err(e) => {
            return Err(stop(
                e,
                nsteps,
                None,
                &mut journal,
                &mut exporters,
                &mut out,
                note,
            ));
        }
    };

    // Set while a step is being handed to the exporters: if that fails, the streamed files
    // may hold part of the step, so the journal keeps its last saved state.
    let mut exporting = false;
    let steps = (|| -> Result<()> {
        for i in state.finished()..nsteps {
            if crate::interrupt::requested() {
                return Err(LcaError::Interrupted("interrupted".into()));
            }
            let (a, b) = (&files[i], &files[i + 1]);
            let next = checkpoint::load(b, &model.params)?;
            let delta = difference(&theta0, &next.theta);
            let plain = |start: &[LossGrad]| {
                integrate_step(&delta, start, &opts.integration, &mut |s| {
                    eval_all(&point::<T>(&theta0, &delta, s))
                })
            };
            let (mut objs, end) = if shared {
                let shared_steps = shared_all(
                    &point::<T>(&theta0, &delta, 0.0),
                    &point::<T>(&theta0, &delta, 0.5),
                    &point::<T>(&theta0, &delta, 1.0),
                    &mut carries,
                )
                .map_err(|e| at_step(e, a, b))?;
                match crate::lca::finish_shared_step(&delta, &shared_steps, &opts.integration) {
                    Some(objs) => (objs, Vec::new()),
                    None => {
                        // Refinement: integrate the step again with full evaluations, from θ_t.
                        let start = eval_all(&point::<T>(&theta0, &delta, 0.0))
                            .map_err(|e| at_step(e, a, b))?;
                        let (mut objs, end) = plain(&start).map_err(|e| at_step(e, a, b))?;
                        for o in &mut objs {
                            o.evaluations += 3;
                        }
                        (objs, end)
                    }
                }
            } else {
                plain(&start).map_err(|e| at_step(e, a, b))?
            };
            let val = if objs.len() > 1 { objs.pop() } else { None };
            let s = objs.pop().ok_or_else(|| {
                LcaError::Numeric("internal: no training objective in the step".into())
            })?;
            // Project the total from the evaluations per step so far, so that the ETA accounts
            // for adaptive refinement.
            let done = state.records.len() + 1;
            let evals =
                1 + s.evaluations + state.records.iter().map(|r| r.evaluations).sum::<usize>();
            let per_step = (evals - 1) as f64 / done as f64;
            progress.set_length(evals as u64 + ((nsteps - done) as f64 * per_step).ceil() as u64);
            let l2_lca = l2.map(|lam| l2_step(lam, &theta0, &next.theta, &p.l2_mask));
            let (tensors, layer_steps, (h, z, u)) = step_groups(
                &param_refs,
                &layers,
                &layer_of,
                &s.lca,
                val.as_ref().map(|v| v.lca.as_slice()),
                l2_lca.as_deref(),
            );
            let cum = state
                .records
                .last()
                .map_or(state.loss_first, |r| r.reconstructed_loss)
                + s.lca_sum;
            let rec = StepRecord {
                step: a.step,
                next_step: b.step,
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
            let max_abs_r = state
                .records
                .iter()
                .map(|r| r.residual.abs())
                .fold(rec.residual.abs(), f64::max);
            progress.message(&format!(
                "step {}→{} r {:+.1e} (max |r| {:.1e}) ΔL {:+.2e}{}",
                rec.step,
                rec.next_step,
                rec.residual,
                max_abs_r,
                rec.delta_loss,
                if rec.splits > 2 {
                    format!(" [{} splits]", rec.splits)
                } else {
                    String::new()
                },
            ));
            let so = StepOutput {
                record: &rec,
                tensors: &tensors,
                layers: &layer_steps,
                lca: &s.lca,
                val_lca: val.as_ref().map(|v| v.lca.as_slice()),
                l2_lca: l2_lca.as_deref(),
            };
            exporting = true;
            for e in exporters.iter_mut() {
                e.step(&so)?;
            }
            exporting = false;
            // The step is written: only now does it count as finished.
            accumulate(
                &mut state.totals,
                &s.lca,
                val.as_ref().map(|v| v.lca.as_slice()),
                l2_lca.as_deref(),
            );
            state.records.push(rec);
            state.checkpoint_sha256.push(next.sha256);
            theta0 = next.theta;
            start = end;
            if i + 1 < nsteps && journal.due() {
                save_journal(&mut journal, &state, &mut exporters, &mut out)?;
            }
            test_delay();
        }
        Ok(())
    })();
    if let Err(e) = steps {
        return Err(stop(
            e,
            nsteps,
            (!exporting).then_some(&state),
            &mut journal,
            &mut exporters,
            &mut out,
            note,
        ));
    }
    progress.finish();
    drop(start);

    let finished = (|| -> Result<Summary> {
        let records = &state.records;
        let totals = &state.totals;
        let train = residual_report(
            state.loss_first,
            &records
                .iter()
                .map(|r| (r.loss_after, r.lca_sum, r.residual))
                .collect::<Vec<_>>(),
        );
        let val_records: Vec<(f64, f64, f64)> = records
            .iter()
            .filter_map(|r| Some((r.val_loss_after?, r.val_lca_sum?, r.val_residual?)))
            .collect();
        let capped_steps: Vec<u64> = records
            .iter()
            .filter(|r| r.capped)
            .map(|r| r.step)
            .collect();
        if let Some(w) = capped_warning(&capped_steps, opts.integration.max_splits) {
            note(&format!("warning: {w}"));
            warnings.push(w);
        }
        let dir_warnings =
            directory_changes(&opts.ckpt_dir, &p.listed, files, opts.first, opts.last);
        for w in &dir_warnings {
            note(&format!("warning: {w}"));
            warnings.push(w.clone());
        }
        let (tensor_totals, layer_totals) = group_totals(&param_refs, &layers, totals);
        let l2_report = match (&p.spec.regularization, state.l2_first) {
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
        let ckpt_refs = files
            .iter()
            .zip(&state.checkpoint_sha256)
            .map(|(f, sha)| CheckpointRef {
                path: f.path.display().to_string(),
                step: f.step,
                step_source: f.step_source,
                sha256: sha.clone(),
            })
            .collect();
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
                num_buffers: model.num_buffer_values(),
                input_shape: model.input_shape.clone(),
                output_shape: model.output_shape().to_vec(),
                layers: layers.clone(),
                params: param_refs.clone(),
                attention: crate::net::attention::describe(&p.spec, model),
            },
            integration: IntegrationInfo {
                settings: opts.integration,
                precision: match opts.precision {
                    Precision::F32 => "f32 compute, f64 accumulation".into(),
                    Precision::F64 => "f64".into(),
                },
                shared_first_layer: shared,
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
                evaluations: 1 + records.iter().map(|r| r.evaluations).sum::<usize>(),
                capped_steps,
                validation: state.val_first.map(|f| residual_report(f, &val_records)),
                l2: l2_report,
            },
            steps: records.clone(),
            tensors: tensor_totals,
            layers: layer_totals,
            ignored_tensors: state.ignored.clone(),
            warnings: warnings.clone(),
            files: file_names.clone(),
        };
        for e in exporters.iter_mut() {
            e.finish(&summary, totals)?;
        }
        if let Some(s) = opts.shard {
            let info = crate::shard::ShardInfo {
                format: crate::shard::FORMAT,
                index: s.index,
                count: s.count,
                indexing: "0-based".into(),
                first_step_index: lo,
                end_step_index: hi,
                steps: hi - lo,
                total_steps: all.len() - 1,
                first_step: files[0].step,
                last_step: files[files.len() - 1].step,
                chunk_size,
                inputs: manifest_of(all),
                checkpoint_sha256: state.checkpoint_sha256.clone(),
                leading_warnings: leading_warnings.clone(),
                directory_warnings: dir_warnings.clone(),
            };
            info.write(&out.partial(crate::shard::FILE))?;
        }
        Ok(summary)
    })();
    let summary = match finished {
        Ok(s) => s,
        Err(e) => {
            return Err(stop(
                e,
                nsteps,
                Some(&state),
                &mut journal,
                &mut exporters,
                &mut out,
                note,
            ));
        }
    };
    drop(exporters);
    out.commit()?;
    Ok(summary)
}

/// Checkpoint values (f32) in the evaluator's precision.
fn widen<T: Real>(theta: &[Vec<f32>]) -> Vec<Vec<T>> {
    theta
        .iter()
        .map(|t| t.iter().map(|&v| T::of(v as f64)).collect())
        .collect()
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
