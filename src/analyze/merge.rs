//! `lca merge`: check the parts of a sharded analysis and replay their steps through the
//! exporter set and summary builder of a single run, so that every output is what one
//! unsharded run writes.

use super::exporters::{ExportPlan, Exporters, Start};
use super::resume::Writer;
use super::shard::{FILE, Shard, ShardInfo};
use super::summary::{Header, L2Ends, Outcome, build};
use super::tallies::{Layout, StepValues, accumulate, step_groups};
use crate::error::{LcaError, Result};
use crate::output::{ParamTotals, StepRecord, Summary, tensors::StepReader};
use std::path::{Path, PathBuf};

/// One part given to `merge`.
struct Part {
    dir: PathBuf,
    info: ShardInfo,
    summary: Summary,
}

fn usage(msg: String) -> LcaError {
    LcaError::Usage(msg)
}

/// Check that `parts` come from the same inputs and options and cover every step exactly
/// once; returns them in step order.
fn validate(mut parts: Vec<Part>) -> Result<Vec<Part>> {
    let base = &parts[0];
    for p in &parts[1..] {
        if p.info.count != base.info.count {
            return Err(usage(format!(
                "{} is shard {}/{} but {} is shard {}/{}: all parts must come from the same --shard N",
                p.dir.display(),
                p.info.index,
                p.info.count,
                base.dir.display(),
                base.info.index,
                base.info.count
            )));
        }
        let mut diffs = base.info.inputs.differences(&p.info.inputs);
        if p.info.chunk_size != base.info.chunk_size {
            diffs.push(format!(
                "eval.chunk_size was {}, now {}",
                base.info.chunk_size, p.info.chunk_size
            ));
        }
        if !diffs.is_empty() {
            return Err(usage(format!(
                "{} and {} were made from different inputs or options (\"was\" is {}, \"now\" is {}): {}",
                base.dir.display(),
                p.dir.display(),
                base.dir.display(),
                p.dir.display(),
                diffs.join("; ")
            )));
        }
    }
    parts.sort_by_key(|p| p.info.index);
    for w in parts.windows(2) {
        if w[0].info.index == w[1].info.index {
            return Err(usage(format!(
                "{} and {} are both shard {}/{} (a part given twice): give each shard once",
                w[0].dir.display(),
                w[1].dir.display(),
                w[0].info.index,
                w[0].info.count
            )));
        }
    }
    let count = parts[0].info.count;
    let total = parts[0].info.total_steps;
    let ckpts = &parts[0].info.inputs.checkpoints;
    if total + 1 != ckpts.len() {
        return Err(usage(format!(
            "{}: {FILE} is inconsistent ({} steps over {} checkpoints)",
            parts[0].dir.display(),
            total,
            ckpts.len()
        )));
    }
    for p in &parts {
        let want = Shard {
            index: p.info.index,
            count,
        }
        .range(total)
        .map_err(|e| LcaError::Output {
            path: p.dir.join(FILE),
            msg: format!("{e}: the part is damaged; run the shard again"),
        })?;
        if (p.info.first_step_index, p.info.end_step_index) != want
            || p.summary.steps.len() != p.info.steps
            || p.info.steps != want.1 - want.0
            || p.info.checkpoint_sha256.len() != p.info.steps + 1
        {
            return Err(usage(format!(
                "{} claims to be shard {}/{} but does not hold its steps (step indices {}–{} expected): was it modified?",
                p.dir.display(),
                p.info.index,
                count,
                want.0,
                want.1
            )));
        }
    }
    for p in &parts {
        model_matches_manifest(p)?;
    }
    let present: Vec<usize> = parts.iter().map(|p| p.info.index).collect();
    let missing: Vec<String> = (0..count)
        .filter(|k| !present.contains(k))
        .map(|k| {
            let (a, b) = Shard { index: k, count }
                .range(total)
                .expect("count ≤ total was checked");
            format!(
                "shard {k}/{count} (steps {}→{}, checkpoints {a}–{b})",
                ckpts[a].step, ckpts[b].step
            )
        })
        .collect();
    if !missing.is_empty() {
        return Err(usage(format!(
            "the parts given ({}) do not cover every step: missing {}",
            parts
                .iter()
                .map(|p| p.dir.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            missing.join(", ")
        )));
    }
    for w in parts.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if a.info.checkpoint_sha256.last() != b.info.checkpoint_sha256.first() {
            let c = &ckpts[b.info.first_step_index];
            return Err(usage(format!(
                "{} and {} read different contents for their shared checkpoint {} (step {}): it changed between the shards' runs",
                a.dir.display(),
                b.dir.display(),
                c.file,
                c.step
            )));
        }
    }
    Ok(parts)
}

/// The tensors a part's `summary.json` lists (what the merged tables are laid out by) must be
/// the ones its `shard.json` was made for — names, shapes and order —, each with the number of
/// values its shape holds and a layer the summary lists: a part whose summary disagrees is
/// refused before any of its values is read (found by the `merge` fuzz target: a `numel` of 1
/// for a [3] tensor made the totals shorter than the values).
fn model_matches_manifest(p: &Part) -> Result<()> {
    let damaged = |msg: String| LcaError::Output {
        path: p.dir.join("summary.json"),
        msg: format!("{msg}: the part is damaged; run the shard again"),
    };
    let (params, layers) = (&p.summary.model.params, &p.summary.model.layers);
    let want = &p.info.inputs.params;
    if params.len() != want.len()
        || params
            .iter()
            .zip(want)
            .any(|(q, (name, shape))| q.name != *name || q.shape != *shape)
    {
        return Err(damaged(format!(
            "its tensors ({}) are not the ones {FILE} records ({})",
            params
                .iter()
                .map(|q| format!("{} {:?}", q.name, q.shape))
                .collect::<Vec<_>>()
                .join(", "),
            want.iter()
                .map(|(n, s)| format!("{n} {s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for q in params {
        let numel = q.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(q.numel) {
            return Err(damaged(format!(
                "tensor '{}' of shape {:?} claims {} values",
                q.name, q.shape, q.numel
            )));
        }
        if !layers.contains(&q.layer) {
            return Err(damaged(format!(
                "tensor '{}' is reported under layer '{}', which the summary does not list",
                q.name, q.layer
            )));
        }
    }
    Ok(())
}

/// Merge the parts of a sharded analysis into `out`, with the outputs of a single run.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<Summary> {
    let parts = read_parts(dirs, out)?;
    let base = &parts[0].summary;
    let info = &parts[0].info;
    let layout = Layout::new(base.model.params.clone(), base.model.layers.clone());
    let has_val = base.run.validation.is_some();
    let has_l2 = base.run.l2.is_some();
    let plan = ExportPlan {
        shapes: layout.shapes(),
        steps: info
            .inputs
            .checkpoints
            .windows(2)
            .map(|w| (w[0].step, w[1].step))
            .collect(),
        store: info.inputs.lca_tensors,
        validation: has_val,
        l2: false,
        // The merged run writes params.csv when its parts were asked to.
        params_csv: parts[0].dir.join("params.csv").is_file(),
    };
    // The same check as `analyze`'s: an interrupted analysis in `out` is never replaced.
    let (mut od, _, _) = super::resume::prepare_out(out, Writer::Merge, &mut |_| {})?;
    od.remove_partials()?;
    let mut exporters = Exporters::open(&mut od, &plan, &Start::Fresh)?;
    // Error estimates (budget policy): carried when every part has them.
    let mut errors = Vec::with_capacity(parts.len());
    for p in &parts {
        errors.push(part_errors(p, &layout)?);
    }
    let errors: Option<Vec<Vec<Vec<f64>>>> = errors.into_iter().collect();
    let mut totals = layout.zero_totals(has_val, has_l2, errors.is_some());
    let loss_first = base.run.loss_first;
    let mut records: Vec<StepRecord> = Vec::with_capacity(plan.steps.len());
    let mut checkpoints = Vec::with_capacity(plan.steps.len() + 1);
    for (i, part) in parts.iter().enumerate() {
        let skip = usize::from(i > 0);
        checkpoints.extend(part.summary.checkpoints.iter().skip(skip).cloned());
        replay(
            part,
            errors.as_ref().map(|e| e[i].as_slice()),
            &layout,
            &mut exporters,
            &mut totals,
            &mut records,
            loss_first,
        )?;
    }
    let mut warnings = info.leading_warnings.clone();
    let mut closing: Vec<String> = Vec::new();
    for p in &parts {
        for w in &p.info.directory_warnings {
            if !warnings.contains(w) && !closing.contains(w) {
                closing.push(w.clone());
            }
        }
    }
    let last = &parts[parts.len() - 1].summary;
    let l2 = base.run.l2.as_ref().map(|b| L2Ends {
        lambda: b.lambda,
        tensors: b.tensors.clone(),
        penalty_first: b.penalty_first,
        penalty_last: last
            .run
            .l2
            .as_ref()
            .map_or(b.penalty_last, |l| l.penalty_last),
    });
    let outcome = Outcome {
        layout: &layout,
        checkpoints,
        records,
        totals: &totals,
        loss_first,
        val_first: base.run.validation.as_ref().map(|v| v.loss_first),
        l2,
        max_splits: base.integration.settings.max_splits,
        leading_warnings: std::mem::take(&mut warnings),
        closing_warnings: closing,
        files: exporters.files.clone(),
    };
    let summary = build(Header::of(base), outcome, &mut |_| {});
    exporters.finish(&summary, &totals)?;
    drop(exporters);
    od.commit()?;
    Ok(summary)
}

/// Read the parts in `dirs` and check them (`out` must not be one of them).
fn read_parts(dirs: &[PathBuf], out: &Path) -> Result<Vec<Part>> {
    if dirs.is_empty() {
        return Err(usage("lca merge needs at least one part directory".into()));
    }
    let mut parts = Vec::with_capacity(dirs.len());
    for d in dirs {
        let info = ShardInfo::read(d)?;
        info.verify_files(d)?;
        let summary = crate::output::json::read_summary(d)?;
        parts.push(Part {
            dir: d.clone(),
            info,
            summary,
        });
    }
    for p in &parts {
        if std::fs::canonicalize(&p.dir).ok() == std::fs::canonicalize(out).ok() {
            return Err(usage(format!(
                "the output directory {} is also one of the parts; choose another -o",
                out.display()
            )));
        }
    }
    validate(parts)
}

/// Refuse a non-finite per-parameter value of step `step` read from `path`, naming the
/// tensor, the step and the flat index (a part's files hold finite values only: NaN would
/// reach `summary.json` as `null`).
fn finite(path: &Path, shapes: &[(String, Vec<usize>)], v: &[Vec<f64>], step: u64) -> Result<()> {
    for ((name, _), t) in shapes.iter().zip(v) {
        if let Some((i, x)) = t.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(LcaError::Output {
                path: path.to_path_buf(),
                msg: format!(
                    "tensor '{name}' holds {x} at step {step} (flat index {i}): the part is damaged; run the shard again"
                ),
            });
        }
    }
    Ok(())
}

/// The per-step error estimates of each tensor's LCA in a part (`lca_err` of its
/// `tensors.csv`, written with round-trip precision), in its steps' order; `None` when the
/// part has none (the tolerance policy).
fn part_errors(part: &Part, layout: &Layout) -> Result<Option<Vec<Vec<f64>>>> {
    let path = part.dir.join("tensors.csv");
    let damaged = |msg: String| LcaError::Output {
        path: path.clone(),
        msg: format!("{msg}: the part is damaged; run the shard again"),
    };
    let mut r = csv::Reader::from_path(&path).map_err(|e| damaged(e.to_string()))?;
    let headers = r.headers().map_err(|e| damaged(e.to_string()))?.clone();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let Some(err_col) = col("lca_err") else {
        return Ok(None);
    };
    let (Some(step_col), Some(tensor_col)) = (col("step"), col("tensor")) else {
        return Err(damaged("no `step` or `tensor` column".into()));
    };
    let index: std::collections::HashMap<&str, usize> = layout
        .params
        .iter()
        .enumerate()
        .map(|(i, q)| (q.name.as_str(), i))
        .collect();
    let steps: Vec<u64> = part.summary.steps.iter().map(|s| s.step).collect();
    let mut out = vec![vec![f64::NAN; layout.params.len()]; steps.len()];
    for row in r.records() {
        let row = row.map_err(|e| damaged(e.to_string()))?;
        let field = |c: usize| row.get(c).unwrap_or("");
        let step: u64 = field(step_col)
            .parse()
            .map_err(|_| damaged(format!("step {:?} is not a number", field(step_col))))?;
        let t = steps
            .iter()
            .position(|&s| s == step)
            .ok_or_else(|| damaged(format!("step {step} is not one of the part's steps")))?;
        let k = *index
            .get(field(tensor_col))
            .ok_or_else(|| damaged(format!("tensor '{}' is not the model's", field(tensor_col))))?;
        let v: f64 = field(err_col).parse().map_err(|_| {
            damaged(format!(
                "lca_err {:?} of step {step} tensor '{}' is not a number",
                field(err_col),
                field(tensor_col)
            ))
        })?;
        if !(v.is_finite() && v >= 0.0) {
            return Err(damaged(format!("lca_err of step {step} is {v}")));
        }
        out[t][k] = v;
    }
    if out.iter().flatten().any(|v| v.is_nan()) {
        return Err(damaged("a (step, tensor) row has no lca_err".into()));
    }
    Ok(Some(out))
}

/// Replay one part's steps through the exporters and into the totals.
fn replay(
    part: &Part,
    errors: Option<&[Vec<f64>]>,
    layout: &Layout,
    exporters: &mut Exporters,
    totals: &mut ParamTotals,
    records: &mut Vec<StepRecord>,
    loss_first: f64,
) -> Result<()> {
    let shapes = layout.shapes();
    let open = |name: &str| -> Result<StepReader> {
        let r = StepReader::open(&part.dir.join(name), &shapes)?;
        if r.steps.len() != part.summary.steps.len()
            || r.steps
                .iter()
                .zip(&part.summary.steps)
                .any(|(s, rec)| *s != rec.step)
        {
            return Err(LcaError::Output {
                path: part.dir.join(name),
                msg: "its steps differ from those of summary.json in the same part".into(),
            });
        }
        Ok(r)
    };
    let mut lca_r = open("lca.safetensors")?;
    let mut val_r = totals
        .val_lca
        .is_some()
        .then(|| open("lca_validation.safetensors"))
        .transpose()?;
    let mut l2_r = totals
        .l2_lca
        .is_some()
        .then(|| open("lca_l2.safetensors"))
        .transpose()?;
    for (t, rec) in part.summary.steps.iter().enumerate() {
        let lca = lca_r.read(t)?;
        let val = val_r.as_mut().map(|r| r.read(t)).transpose()?;
        let l2 = l2_r.as_mut().map(|r| r.read(t)).transpose()?;
        let named = [
            ("lca.safetensors", Some(&lca)),
            ("lca_validation.safetensors", val.as_ref()),
            ("lca_l2.safetensors", l2.as_ref()),
        ];
        for (file, values) in named {
            if let Some(v) = values {
                finite(&part.dir.join(file), &shapes, v, rec.step)?;
            }
        }
        let values = StepValues {
            lca: &lca,
            val: val.as_deref(),
            l2: l2.as_deref(),
            err: errors.map(|e| e[t].as_slice()),
        };
        let groups = step_groups(layout, values);
        let mut rec = rec.clone();
        // The running reconstruction starts at the first part's L_0, as in a single run.
        rec.reconstructed_loss =
            records.last().map_or(loss_first, |r| r.reconstructed_loss) + rec.lca_sum;
        exporters.step(&groups.output(&rec, values))?;
        accumulate(totals, values, &groups);
        records.push(rec);
    }
    Ok(())
}
