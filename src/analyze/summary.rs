//! The summary of a run: one builder for `analyze` and `merge`.
//!
//! The [`Header`] describes the inputs (the same in every shard of a run); the [`Outcome`]
//! holds what the steps produced. [`build`] derives every total from the outcome, so that a
//! merged run and a single run compute them with the same code, bit for bit.

use super::tallies::{Layout, ResidualRow, capped_warning, group_totals, residual_report};
use crate::output::{
    CheckpointRef, DataInfo, FileRef, IntegrationInfo, L2Report, ModelInfo, ParamTotals, RunTotals,
    Spacing, StepRecord, Summary, Tool,
};

/// The part of the summary that describes the inputs and settings.
pub(crate) struct Header {
    pub schema_version: u32,
    pub tool: Tool,
    pub spec: FileRef,
    pub data: DataInfo,
    pub model: ModelInfo,
    pub integration: IntegrationInfo,
    pub step_spacing: Spacing,
    pub ignored_tensors: Vec<String>,
    pub loss_check: Option<crate::output::LossCheck>,
}

impl Header {
    /// The header of an existing summary (the first part's, in `merge`).
    pub fn of(s: &Summary) -> Header {
        Header {
            schema_version: s.schema_version,
            tool: s.tool.clone(),
            spec: s.spec.clone(),
            data: s.data.clone(),
            model: s.model.clone(),
            integration: s.integration.clone(),
            step_spacing: s.step_spacing.clone(),
            ignored_tensors: s.ignored_tensors.clone(),
            loss_check: s.loss_check.clone(),
        }
    }
}

/// The L2 term's ends: λ, its tensors and the penalty at the first and last checkpoint.
pub(crate) struct L2Ends {
    pub lambda: f64,
    pub tensors: Vec<String>,
    pub penalty_first: f64,
    pub penalty_last: f64,
}

/// What the steps of a run produced.
pub(crate) struct Outcome<'a> {
    pub layout: &'a Layout,
    pub checkpoints: Vec<CheckpointRef>,
    pub records: Vec<StepRecord>,
    pub totals: &'a ParamTotals,
    pub loss_first: f64,
    pub val_first: Option<f64>,
    pub l2: Option<L2Ends>,
    pub max_splits: usize,
    /// Warnings known before the steps (they come first).
    pub leading_warnings: Vec<String>,
    /// Warnings found at the end (after the capped-steps warning).
    pub closing_warnings: Vec<String>,
    pub files: Vec<String>,
}

fn rows(records: &[StepRecord]) -> (Vec<ResidualRow>, Vec<ResidualRow>) {
    let train = records
        .iter()
        .map(|r| ResidualRow {
            loss_after: r.loss_after,
            lca_sum: r.lca_sum,
            residual: r.residual,
        })
        .collect();
    let val = records
        .iter()
        .filter_map(|r| {
            Some(ResidualRow {
                loss_after: r.val_loss_after?,
                lca_sum: r.val_lca_sum?,
                residual: r.val_residual?,
            })
        })
        .collect();
    (train, val)
}

use crate::output::LARGE_RESIDUAL;

/// The warning when the run's LCA does not add up to its loss change (Σ|r|/|ΔL| above
/// [`LARGE_RESIDUAL`], or undefined because the loss did not change), saying what to do.
fn large_residual_warning(r: &crate::output::ResidualReport, steps: usize) -> Option<String> {
    let v = r.rel_abs_residual;
    if steps == 0 || (v.is_finite() && v <= LARGE_RESIDUAL) {
        return None;
    }
    let what = if v.is_finite() {
        format!(
            "Σ|r|/|ΔL| = {:.3} % exceeds {} %",
            100.0 * v,
            100.0 * LARGE_RESIDUAL
        )
    } else {
        format!(
            "Σ|r|/|ΔL| is undefined (the loss did not change; Σ|r| = {:.3e})",
            r.residual_abs_sum
        )
    };
    Some(format!(
        "{what}: the LCA does not add up to the loss change (per-step residuals in steps.csv; \
         `lca check` fails on this run). Use the default --policy budget, a larger \
         --max-evals-factor or --max-splits, denser checkpoints, or --precision f64 when |ΔL| \
         is tiny against the per-step loss changes (docs/integration.md)"
    ))
}

/// The summary of a run; `note` receives the warnings found here and at the end.
pub(crate) fn build(h: Header, o: Outcome, note: &mut dyn FnMut(&str)) -> Summary {
    let records = o.records;
    let (train_rows, val_rows) = rows(&records);
    let train = residual_report(o.loss_first, &train_rows);
    let capped_steps: Vec<u64> = records
        .iter()
        .filter(|r| r.capped)
        .map(|r| r.step)
        .collect();
    let mut warnings = o.leading_warnings;
    let closing = capped_warning(&capped_steps, o.max_splits)
        .into_iter()
        .chain(large_residual_warning(&train, records.len()))
        .chain(o.closing_warnings);
    for w in closing {
        note(&format!("warning: {w}"));
        warnings.push(w);
    }
    let totals = group_totals(o.layout, o.totals);
    let l2 = o.l2.map(|e| L2Report {
        lambda: e.lambda,
        tensors: e.tensors,
        penalty_first: e.penalty_first,
        penalty_last: e.penalty_last,
        lca_sum: records.iter().filter_map(|x| x.l2_lca).sum(),
        objective_delta: train.delta_loss + (e.penalty_last - e.penalty_first),
    });
    let run = RunTotals {
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
        validation: o.val_first.map(|f| residual_report(f, &val_rows)),
        l2,
    };
    Summary {
        schema_version: h.schema_version,
        tool: h.tool,
        spec: h.spec,
        data: h.data,
        model: h.model,
        integration: h.integration,
        checkpoints: o.checkpoints,
        step_spacing: h.step_spacing,
        steps: records,
        run,
        tensors: totals.tensors,
        layers: totals.layers,
        ignored_tensors: h.ignored_tensors,
        warnings,
        files: o.files,
        loss_check: h.loss_check,
    }
}
