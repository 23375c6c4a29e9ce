//! Output writers: one per format behind the [`Exporter`] trait (`summary.json`, the tidy CSV
//! tables, `lca.safetensors`), and [`OutDir`], which makes every file appear atomically.
//!
//! Exporters receive each finished step as it is computed (so per-step tables stream to disk
//! and memory stays flat), then the run's summary and per-parameter totals at the end.

pub mod csv;
pub mod json;
pub mod summary;
pub mod tensors;
pub mod totals;

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
    /// Error estimate of `lca` (docs/integration.md), when the policy gives one.
    pub lca_err: Option<f64>,
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
    /// Per-parameter LCA of the L2 term, when configured.
    pub l2_lca: Option<&'a [Vec<f64>]>,
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
    /// Σ_t est_{t,k}² per tensor and Σ_t est_{t,ℓ}² per layer (the error estimates' run
    /// totals are their square roots), when the policy gives estimates.
    pub err_sq: Option<ErrSquares>,
}

/// Sums of squared per-step error estimates.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrSquares {
    pub tensors: Vec<f64>,
    pub layers: Vec<f64>,
}

/// A writer of one output format.
pub trait Exporter {
    /// Called once per analysed step, in step order.
    fn step(&mut self, out: &StepOutput<'_>) -> Result<()>;
    /// Called once at the end with the run's summary and per-parameter totals.
    fn finish(&mut self, summary: &Summary, totals: &ParamTotals) -> Result<()>;
    /// Push everything written so far to stable storage (for the resume journal) and return
    /// the byte length of each file that grows step by step; files written in place need no
    /// length.
    fn sync(&mut self) -> Result<Vec<(PathBuf, u64)>> {
        Ok(Vec::new())
    }
}

/// The output directory. Files are written under temporary names (`.NAME.partial`) and
/// renamed into place by [`OutDir::commit`]; if the run fails before any step is journaled,
/// the temporary files are removed and any previous outputs are left untouched.
pub struct OutDir {
    pub dir: PathBuf,
    pending: Vec<(PathBuf, PathBuf)>,
    committed: bool,
    /// Leave the temporary files for `--resume` when dropped without commit.
    keep: bool,
    /// The directory, opened and locked (advisory, exclusive) so that two runs never write
    /// into it at once; released when dropped.
    _lock: std::fs::File,
}

/// Name of the file that marks a directory as an lca output.
pub const SUMMARY_FILE: &str = "summary.json";

/// Every file `analyze` may write; those a new run does not write are removed from a previous
/// output on commit, so that a directory never mixes two runs.
pub const OUTPUT_FILES: [&str; 10] = [
    "summary.json",
    "steps.csv",
    "layers.csv",
    "tensors.csv",
    "params.csv",
    "totals.safetensors",
    "lca.safetensors",
    "lca_validation.safetensors",
    // Written by `analyze --shard` only (see docs/scale-out.md).
    "lca_l2.safetensors",
    "shard.json",
];

/// lca's state directory inside an output directory: the resume journal
/// ([`crate::journal`]) and, while a commit is in progress, the writers' [`COMMIT`] marker.
pub const STATE_DIR: &str = ".lca-resume";
/// Marker of a commit in progress (see [`OutDir::commit`]), inside [`STATE_DIR`].
pub const COMMIT: &str = "commit.json";
/// The journal's manifest ([`crate::journal`]), inside [`STATE_DIR`]: a state directory
/// without it (and without [`COMMIT`]) holds nothing to continue.
pub const JOURNAL_MANIFEST: &str = "manifest.json";

/// The temporary name of output file `name`.
pub fn partial_name(name: &str) -> String {
    format!(".{name}.partial")
}

/// Whether a directory entry is one of lca's own: an output, a temporary output or the
/// resume journal.
fn is_lca_entry(name: &str) -> bool {
    name == STATE_DIR
        || OUTPUT_FILES
            .iter()
            .any(|f| name == *f || name == partial_name(f))
}

/// What [`OutDir::prepare`] found in an existing directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// It held a finished output (`summary.json`).
    pub finished_output: bool,
    /// It held an interrupted commit, which was completed.
    pub completed_commit: bool,
}

impl OutDir {
    /// Prepare `dir` for output. It may be new, empty, hold a previous lca output (which is
    /// replaced on commit) or lca's temporary files and resume journal; anything else is
    /// refused so that user files are never overwritten. A commit that was interrupted is
    /// completed first.
    pub fn prepare(dir: &Path) -> Result<(OutDir, Found)> {
        let mut found = Found {
            finished_output: false,
            completed_commit: false,
        };
        let mut lock = None;
        if dir.exists() || dir.is_symlink() {
            if !dir.is_dir() {
                return Err(LcaError::Output {
                    path: dir.to_path_buf(),
                    msg: "exists and is not a directory; choose another -o".into(),
                });
            }
            let mut foreign = Vec::new();
            for e in std::fs::read_dir(dir).map_err(|e| LcaError::io(dir, e))? {
                let e = e.map_err(|e| LcaError::io(dir, e))?;
                let name = e.file_name().to_string_lossy().to_string();
                if !is_lca_entry(&name) {
                    foreign.push(name);
                }
            }
            let ours = dir.join(SUMMARY_FILE).is_file() || dir.join(STATE_DIR).is_dir();
            if !foreign.is_empty() && !ours {
                foreign.sort();
                return Err(LcaError::Output {
                    path: dir.to_path_buf(),
                    msg: format!(
                        "exists, is not empty and does not hold an lca output (no summary.json; it has {}); choose another -o",
                        foreign
                            .iter()
                            .take(3)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                            + if foreign.len() > 3 { ", …" } else { "" }
                    ),
                });
            }
            lock = Some(lock_dir(dir)?);
            found.completed_commit = complete_commit(dir)?;
            // A state directory with neither a commit marker nor a journal manifest is what a
            // kill leaves at the very end of a commit's clean-up (or before a new journal's
            // manifest was written): it holds nothing to continue.
            let jdir = dir.join(STATE_DIR);
            if jdir.is_dir() && !jdir.join(JOURNAL_MANIFEST).is_file() {
                remove_state_dir(dir)?;
            }
            found.finished_output = dir.join(SUMMARY_FILE).is_file();
        } else {
            std::fs::create_dir_all(dir).map_err(|e| LcaError::Output {
                path: dir.to_path_buf(),
                msg: format!("cannot create the output directory: {e}"),
            })?;
        }
        let lock = match lock {
            Some(l) => l,
            None => lock_dir(dir)?,
        };
        Ok((
            OutDir {
                dir: dir.to_path_buf(),
                pending: Vec::new(),
                committed: false,
                keep: false,
                _lock: lock,
            },
            found,
        ))
    }

    /// Remove temporary files a previous run left (a fresh run rewrites them all).
    pub fn remove_partials(&self) -> Result<()> {
        for f in OUTPUT_FILES {
            let p = self.dir.join(partial_name(f));
            if p.is_file() {
                crate::files::remove_file(&p)?;
            }
        }
        Ok(())
    }

    /// A temporary path for the output file `name`, renamed to `name` on commit.
    pub fn partial(&mut self, name: &str) -> PathBuf {
        let tmp = self.dir.join(partial_name(name));
        self.pending.push((tmp.clone(), self.dir.join(name)));
        tmp
    }

    /// Final names of the files registered with [`OutDir::partial`], in order.
    pub fn pending_names(&self) -> Vec<String> {
        self.pending
            .iter()
            .filter_map(|(_, f)| f.file_name().map(|n| n.to_string_lossy().to_string()))
            .collect()
    }

    /// Keep the temporary files if the run stops before [`OutDir::commit`] (they belong to a
    /// journaled run that `--resume` continues).
    pub fn keep_partials(&mut self) {
        self.keep = true;
    }

    /// Put every finished file in place and drop the resume journal.
    ///
    /// 1. fsync every temporary file (all at once, [`crate::files::sync_files`]), then record
    ///    the renames in `.lca-resume/commit.json`;
    /// 2. remove the old `summary.json` first (so that the directory never holds a summary
    ///    beside tables of another run) and any output of a previous run this one does not
    ///    write;
    /// 3. rename the temporary files into place, `summary.json` last;
    /// 4. remove the journal, the commit marker last ([`remove_state_dir`]).
    ///
    /// A run killed after 1 leaves the marker until the very end; the next `analyze` (or
    /// `merge`) into the directory completes the commit before anything else. Every step
    /// goes through [`crate::files::op`] (the crash test hook).
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        self.pending
            .sort_by_key(|(_, f)| f.file_name().is_some_and(|n| n == SUMMARY_FILE));
        crate::files::sync_files(self.pending.iter().map(|(tmp, _)| tmp.as_path()))?;
        let jdir = self.dir.join(STATE_DIR);
        crate::files::create_dir_all(&jdir)?;
        let names: Vec<String> = self
            .pending
            .iter()
            .filter_map(|(_, f)| f.file_name().map(|n| n.to_string_lossy().to_string()))
            .collect();
        let marker = serde_json::to_vec(&names).map_err(|e| LcaError::Output {
            path: jdir.join(COMMIT),
            msg: e.to_string(),
        })?;
        crate::files::write_atomic(&jdir.join(COMMIT), &marker, crate::files::Mode::Replace)?;
        self.committed = true;
        complete_commit(&self.dir)?;
        Ok(self.pending.iter().map(|(_, f)| f.clone()).collect())
    }
}

/// Remove lca's state directory `OUT/.lca-resume` (the journal and the commit marker), the
/// commit marker last: until the marker goes, a kill leaves a commit that the next run
/// completes (and the journal files it still finds are then garbage); after it, only an
/// empty directory or one without a manifest, which is garbage too ([`OutDir::prepare`]
/// removes it).
pub fn remove_state_dir(out: &Path) -> Result<()> {
    crate::files::remove_dir_ordered(&out.join(STATE_DIR), &|name| name == COMMIT)
}

/// Open `dir` and take an exclusive advisory lock on it, or say that another run holds it.
fn lock_dir(dir: &Path) -> Result<std::fs::File> {
    let f = std::fs::File::open(dir).map_err(|e| LcaError::io(dir, e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(LcaError::Output {
            path: dir.to_path_buf(),
            msg: "is in use by another lca analyze (wait for it to finish, or choose another -o)"
                .into(),
        }),
        // File systems without locks: go on unprotected rather than refuse to work.
        Err(std::fs::TryLockError::Error(_)) => Ok(f),
    }
}

/// Carry out the renames recorded in `.lca-resume/commit.json`, if there is one, and remove
/// the journal. Returns whether there was one.
fn complete_commit(dir: &Path) -> Result<bool> {
    let jdir = dir.join(STATE_DIR);
    let marker = jdir.join(COMMIT);
    if !marker.is_file() {
        return Ok(false);
    }
    let bad = |msg: String| LcaError::Output {
        path: marker.clone(),
        msg,
    };
    let text = std::fs::read(&marker).map_err(|e| LcaError::io(&marker, e))?;
    let names: Vec<String> = serde_json::from_slice(&text).map_err(|e| {
        bad(format!(
            "unreadable commit record ({e}); delete {} and run again",
            jdir.display()
        ))
    })?;
    if let Some(n) = names.iter().find(|n| !OUTPUT_FILES.contains(&n.as_str())) {
        return Err(bad(format!("names an unknown output file {n:?}")));
    }
    let summary = dir.join(SUMMARY_FILE);
    if names.iter().any(|n| n == SUMMARY_FILE)
        && dir.join(partial_name(SUMMARY_FILE)).is_file()
        && summary.is_file()
    {
        crate::files::remove_file(&summary)?;
    }
    for name in OUTPUT_FILES {
        let stale = dir.join(name);
        if !names.iter().any(|n| n == name) && stale.is_file() {
            crate::files::remove_file(&stale)?;
        }
    }
    let mut order: Vec<&String> = names.iter().filter(|n| *n != SUMMARY_FILE).collect();
    order.extend(names.iter().filter(|n| *n == SUMMARY_FILE));
    for name in order {
        let tmp = dir.join(partial_name(name));
        if tmp.is_file() {
            crate::files::rename(&tmp, &dir.join(name))?;
        }
    }
    crate::files::sync_dir(dir);
    remove_state_dir(dir)?;
    Ok(true)
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if !self.committed && !self.keep {
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
