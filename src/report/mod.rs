//! Output writers: one per format behind the [`Exporter`] trait (`summary.json`, the tidy CSV
//! tables, `lca.safetensors`), and [`OutDir`], which makes every file appear atomically.
//!
//! Exporters receive each finished step as it is computed (so per-step tables stream to disk
//! and memory stays flat), then the run's summary and per-parameter totals at the end.

pub mod csv;
pub mod json;
pub mod summary;
pub mod tensors;

use crate::error::{LcaError, Result};
use std::path::{Path, PathBuf};
pub use summary::*;

/// Totals of one step for a tensor or a layer.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStep {
    pub name: String,
    pub layer: String,
    pub lca: f64,
    pub helped: u64,
    pub zero: u64,
    pub hurt: u64,
    /// Held-out LCA of the group, when a validation set is given.
    pub val_lca: Option<f64>,
    /// LCA of the L2 term, when configured.
    pub l2_lca: Option<f64>,
}

/// One finished step, as exporters see it.
pub struct StepOutput<'a> {
    pub record: &'a StepRecord,
    pub tensors: &'a [GroupStep],
    pub layers: &'a [GroupStep],
    /// Per-parameter LCA of the step, model order.
    pub lca: &'a [Vec<f64>],
    /// Per-parameter held-out LCA, when a validation set is given.
    pub val_lca: Option<&'a [Vec<f64>]>,
}

/// Per-parameter totals over the run.
#[derive(Debug, Clone)]
pub struct ParamTotals {
    pub lca: Vec<Vec<f64>>,
    /// Steps on which the parameter helped (LCA < 0) / hurt (LCA > 0).
    pub helped_steps: Vec<Vec<u32>>,
    pub hurt_steps: Vec<Vec<u32>>,
    pub val_lca: Option<Vec<Vec<f64>>>,
    pub l2_lca: Option<Vec<Vec<f64>>>,
}

/// A writer of one output format.
pub trait Exporter {
    /// Called once per analysed step, in step order.
    fn step(&mut self, out: &StepOutput<'_>) -> Result<()>;
    /// Called once at the end with the run's summary and per-parameter totals.
    fn finish(&mut self, summary: &Summary, totals: &ParamTotals) -> Result<()>;
}

/// The output directory. Files are written under temporary names and renamed into place by
/// [`OutDir::commit`]; if the run fails, the temporary files are removed and any previous
/// outputs are left untouched.
pub struct OutDir {
    pub dir: PathBuf,
    pending: Vec<(PathBuf, PathBuf)>,
    committed: bool,
}

/// Name of the file that marks a directory as an lca output.
pub const SUMMARY_FILE: &str = "summary.json";

/// Every file `analyze` may write; those a new run does not write are removed from a previous
/// output on commit, so that a directory never mixes two runs.
pub const OUTPUT_FILES: [&str; 7] = [
    "summary.json",
    "steps.csv",
    "layers.csv",
    "tensors.csv",
    "params.csv",
    "lca.safetensors",
    "lca_validation.safetensors",
];

impl OutDir {
    /// Prepare `dir` for output. It may be new, empty, or hold a previous lca output (which is
    /// replaced); anything else is refused so that user files are never overwritten.
    pub fn prepare(dir: &Path) -> Result<OutDir> {
        if dir.exists() {
            if !dir.is_dir() {
                return Err(LcaError::Output {
                    path: dir.to_path_buf(),
                    msg: "exists and is not a directory".into(),
                });
            }
            let mut entries = std::fs::read_dir(dir).map_err(|e| LcaError::io(dir, e))?;
            let non_empty = entries.next().is_some();
            if non_empty && !dir.join(SUMMARY_FILE).is_file() {
                return Err(LcaError::Output {
                    path: dir.to_path_buf(),
                    msg: "exists, is not empty and does not hold an lca output (no summary.json); choose another -o".into(),
                });
            }
        } else {
            std::fs::create_dir_all(dir).map_err(|e| LcaError::io(dir, e))?;
        }
        Ok(OutDir {
            dir: dir.to_path_buf(),
            pending: Vec::new(),
            committed: false,
        })
    }

    /// A temporary path for the output file `name`, renamed to `name` on commit.
    pub fn partial(&mut self, name: &str) -> PathBuf {
        let tmp = self.dir.join(format!(".{name}.partial"));
        self.pending.push((tmp.clone(), self.dir.join(name)));
        tmp
    }

    /// Rename every temporary file into place (summary.json last).
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        self.pending
            .sort_by_key(|(_, f)| f.file_name().is_some_and(|n| n == SUMMARY_FILE));
        for name in OUTPUT_FILES {
            let stale = self.dir.join(name);
            if !self.pending.iter().any(|(_, f)| *f == stale) && stale.is_file() {
                std::fs::remove_file(&stale).map_err(|e| LcaError::io(&stale, e))?;
            }
        }
        let mut done = Vec::new();
        for (tmp, fin) in &self.pending {
            std::fs::rename(tmp, fin).map_err(|e| LcaError::io(fin, e))?;
            done.push(fin.clone());
        }
        self.committed = true;
        Ok(done)
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if !self.committed {
            for (tmp, _) in &self.pending {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

/// A sorted list of steps written compactly: runs of three or more equally spaced steps become
/// ranges (`0–99`, or `0–100 (every 5)`), the rest are listed: `0–99, 120, 130`.
pub fn step_list(steps: &[u64]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < steps.len() {
        let d = steps.get(i + 1).map(|b| b.wrapping_sub(steps[i]));
        let run = match d {
            Some(d)
                if d > 0
                    && steps
                        .get(i + 2)
                        .is_some_and(|c| c.wrapping_sub(steps[i + 1]) == d) =>
            {
                let mut j = i + 2;
                while steps
                    .get(j + 1)
                    .is_some_and(|c| c.wrapping_sub(steps[j]) == d)
                {
                    j += 1;
                }
                Some((j, d))
            }
            _ => None,
        };
        match run {
            Some((j, 1)) => {
                parts.push(format!("{}–{}", steps[i], steps[j]));
                i = j + 1;
            }
            Some((j, d)) => {
                parts.push(format!("{}–{} (every {d})", steps[i], steps[j]));
                i = j + 1;
            }
            None => {
                parts.push(steps[i].to_string());
                i += 1;
            }
        }
    }
    parts.join(", ")
}

/// Create a file for writing, naming it in the error.
pub(crate) fn create(path: &Path) -> Result<std::io::BufWriter<std::fs::File>> {
    let f = std::fs::File::create(path).map_err(|e| LcaError::io(path, e))?;
    Ok(std::io::BufWriter::new(f))
}

#[cfg(test)]
mod tests {
    use super::step_list;

    #[test]
    fn step_lists_are_compact() {
        assert_eq!(step_list(&[]), "");
        assert_eq!(step_list(&[7]), "7");
        assert_eq!(step_list(&[3, 9]), "3, 9");
        assert_eq!(step_list(&(0..100).collect::<Vec<_>>()), "0–99");
        assert_eq!(
            step_list(&[0, 5, 10, 15, 20, 21, 40]),
            "0–20 (every 5), 21, 40"
        );
        assert_eq!(step_list(&[1, 2, 3, 10, 11, 12, 13]), "1–3, 10–13");
    }
}
