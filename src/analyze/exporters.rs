//! The exporter set of a run, built in one place for `analyze` (fresh or resumed) and
//! `merge`: the CSV tables, the per-parameter tensors and `summary.json`, each writing under
//! its temporary name in the [`OutDir`].

use crate::error::{LcaError, Result};
use crate::output::{
    Exporter, OutDir, ParamTotals, SUMMARY_FILE, StepOutput, Summary,
    csv::CsvExporter,
    json::JsonExporter,
    tensors::{StoreDtype, TensorExporter, TensorSource},
    totals::{TOTALS_FILE, TotalsExporter},
};
use std::path::Path;

/// What the run writes.
pub(crate) struct ExportPlan {
    /// Parameter tensors (name, shape), model order.
    pub shapes: Vec<(String, Vec<usize>)>,
    /// (step, next step) of every step the run writes.
    pub steps: Vec<(u64, u64)>,
    /// Element type of the per-parameter tensors, `None` not to write them.
    pub store: Option<StoreDtype>,
    /// Whether a validation set is allocated (`lca_validation.safetensors`).
    pub validation: bool,
    /// Whether to write `lca_l2.safetensors` (parts of a sharded run with an L2 term).
    pub l2: bool,
    /// Whether to write `params.csv` (`analyze --params-csv`).
    pub params_csv: bool,
}

/// Where the exporters start.
pub(crate) enum Start<'a> {
    /// New files.
    Fresh,
    /// Continue files the journal describes: the streamed files' lengths and the number
    /// of finished steps.
    Resume {
        journal_dir: &'a Path,
        lengths: &'a [(String, u64)],
        done: usize,
    },
}

/// The exporters of a run and the names of the files they write (`summary.json` first).
pub(crate) struct Exporters {
    list: Vec<Box<dyn Exporter>>,
    pub files: Vec<String>,
}

impl Exporters {
    /// Open every exporter of `plan` in `out`.
    pub fn open(out: &mut OutDir, plan: &ExportPlan, start: &Start) -> Result<Exporters> {
        let mut list: Vec<Box<dyn Exporter>> = vec![
            Box::new(csv(out, start, plan.params_csv)?),
            Box::new(TotalsExporter {
                path: out.partial(TOTALS_FILE),
            }),
        ];
        if let Some(dtype) = plan.store {
            let mut names = vec![("lca.safetensors", TensorSource::Train)];
            if plan.validation {
                names.push(("lca_validation.safetensors", TensorSource::Validation));
            }
            if plan.l2 {
                names.push(("lca_l2.safetensors", TensorSource::L2));
            }
            for (name, source) in names {
                let path = out.partial(name);
                let mut e = match start {
                    Start::Resume { done, .. } => {
                        TensorExporter::resume(path, &plan.shapes, &plan.steps, dtype, *done)?
                    }
                    Start::Fresh => TensorExporter::new(path, &plan.shapes, &plan.steps, dtype)?,
                };
                e.source = source;
                list.push(Box::new(e));
            }
        }
        list.push(Box::new(JsonExporter {
            path: out.partial(SUMMARY_FILE),
        }));
        let files = std::iter::once(SUMMARY_FILE.to_string())
            .chain(
                out.pending_names()
                    .into_iter()
                    .filter(|n| n != SUMMARY_FILE),
            )
            .collect();
        Ok(Exporters { list, files })
    }

    /// Hand one finished step to every exporter.
    pub fn step(&mut self, so: &StepOutput) -> Result<()> {
        for e in self.list.iter_mut() {
            e.step(so)?;
        }
        Ok(())
    }

    /// Write the summary and totals with every exporter.
    pub fn finish(&mut self, summary: &Summary, totals: &ParamTotals) -> Result<()> {
        for e in self.list.iter_mut() {
            e.finish(summary, totals)?;
        }
        Ok(())
    }

    /// Push every exporter's files to stable storage; the streamed files' names and lengths.
    pub fn sync(&mut self) -> Result<Vec<(String, u64)>> {
        let mut files = Vec::new();
        for e in self.list.iter_mut() {
            for (p, len) in e.sync()? {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                files.push((name, len));
            }
        }
        Ok(files)
    }
}

fn csv(out: &mut OutDir, start: &Start, params_csv: bool) -> Result<CsvExporter> {
    let paths = [
        out.partial("steps.csv"),
        out.partial("layers.csv"),
        out.partial("tensors.csv"),
    ];
    let params = params_csv.then(|| out.partial("params.csv"));
    match start {
        Start::Fresh => CsvExporter::new(paths, params),
        Start::Resume {
            journal_dir,
            lengths,
            ..
        } => {
            let len = |name: &str| -> Result<u64> {
                let want = crate::output::partial_name(name);
                lengths
                    .iter()
                    .find(|(n, _)| *n == want)
                    .map(|(_, l)| *l)
                    .ok_or_else(|| LcaError::Output {
                        path: journal_dir.to_path_buf(),
                        msg: format!(
                            "the resume journal does not record the length of {want}; delete it to start over"
                        ),
                    })
            };
            CsvExporter::resume(
                paths,
                params,
                [len("steps.csv")?, len("layers.csv")?, len("tensors.csv")?],
            )
        }
    }
}
