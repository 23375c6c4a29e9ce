//! Opening the output directory and the resume journal: a fresh run, the continuation of an
//! interrupted one (after checking that nothing it read has changed), or a run that had
//! already finished.

use super::AnalyzeOptions;
use super::plan::Plan;
use super::prepare::Prepared;
use crate::checkpoint::{self, CheckpointFile, Loaded};
use crate::error::{LcaError, Result};
use crate::journal::{Journal, RunState};
use crate::net::Real;
use crate::output::{OutDir, Summary};
use std::path::Path;

/// A saved state to continue from and the streamed files' lengths when it was saved.
pub(crate) type Saved = (RunState, Vec<(String, u64)>);

/// The output directory of a run, opened.
// Built once per run: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Opened {
    /// The run to continue had finished: its summary.
    Finished(Summary),
    /// The directory and its journal; `saved` when continuing an interrupted run.
    Run {
        out: OutDir,
        journal: Journal,
        saved: Option<Saved>,
    },
}

/// Open the output directory and its journal, deciding between a fresh run and `--resume`.
pub(crate) fn open<T: Real>(
    opts: &AnalyzeOptions,
    p: &Prepared<T>,
    plan: &Plan,
    note: &mut dyn FnMut(&str),
) -> Result<Opened> {
    let (mut out, found) = OutDir::prepare(&opts.out)?;
    let jdir = Journal::dir_of(&opts.out);
    let mut saved: Option<Saved> = None;
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
                let diffs = j.manifest.differences(&plan.manifest);
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
                saved = j.state;
            }
        }
        None if opts.resume => {
            if found.completed_commit
                && let Ok(s) = crate::output::json::read_summary(&opts.out)
                && s.spec.sha256 == p.spec_sha256
                && s.data.sha256 == p.data.sha256
                && s.checkpoints.len() == plan.files(p).len()
            {
                note("note: the interrupted run had finished; its outputs are now in place");
                return Ok(Opened::Finished(s));
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
    let journal = match &saved {
        Some((s, _)) => {
            out.keep_partials();
            Journal::resume(&opts.out, s.finished())
        }
        None => {
            out.remove_partials()?;
            Journal::create(&opts.out, &plan.manifest)?
        }
    };
    Ok(Opened::Run {
        out,
        journal,
        saved,
    })
}

/// Check that a saved state fits this run and that the checkpoints it read are unchanged;
/// load the checkpoint to continue from.
pub(crate) fn verify(
    state: &RunState,
    files: &[CheckpointFile],
    params: &[crate::net::ParamInfo],
    jdir: &Path,
) -> Result<Loaded> {
    let k = state.finished();
    if k > files.len() - 1
        || state.checkpoint_sha256.len() != k + 1
        || state.totals.lca.len() != params.len()
    {
        return Err(LcaError::Output {
            path: jdir.to_path_buf(),
            msg: "the resume state does not fit this run; delete it to start over".into(),
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
        let now = checkpoint::source_sha256(&f.path).map_err(|e| LcaError::io(&f.path, e))?;
        if now != *then {
            return Err(changed(f, then, &now));
        }
    }
    let cur = checkpoint::load(&files[k], params)?;
    if cur.sha256 != state.checkpoint_sha256[k] {
        return Err(changed(&files[k], &state.checkpoint_sha256[k], &cur.sha256));
    }
    Ok(cur)
}
