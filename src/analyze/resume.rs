//! Opening the output directory and the resume journal: a fresh run, the continuation of an
//! interrupted one (after checking that nothing it read has changed), or a run that had
//! already finished.

use super::AnalyzeOptions;
use super::plan::Plan;
use super::prepare::Prepared;
use crate::checkpoint::{self, CheckpointFile, Loaded};
use crate::error::{LcaError, Result};
use crate::journal::{self, Journal, RunState};
use crate::net::Real;
use crate::output::{OutDir, Summary};
use std::path::Path;

/// The command that is about to write into an output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Writer {
    Analyze { resume: bool },
    Merge,
}

/// Prepare the output directory `out` for a command that writes into it, and read its journal.
/// The one check `analyze` and `merge` share ([`OutDir::prepare`] refuses foreign content and
/// completes an interrupted commit): a journal with finished steps is refused unless it is
/// being resumed, so that finished work is never thrown away silently; a journal left beside
/// the outputs it produced (their commit was complete) is garbage and removed.
pub(crate) fn prepare_out(
    out: &Path,
    writer: Writer,
    note: &mut dyn FnMut(&str),
) -> Result<(OutDir, crate::output::Found, Option<journal::Found>)> {
    let (od, mut found) = OutDir::prepare(out)?;
    let mut journal = Journal::read(out)?;
    if let Some(j) = &journal
        && let Some((state, files)) = &j.state
        && committed_already(out, state, files)
    {
        note(
            "note: removed a resume journal left behind by a run whose outputs were already in place",
        );
        crate::output::remove_state_dir(out)?;
        journal = None;
        found.completed_commit = true;
    }
    let kept = journal
        .as_ref()
        .and_then(|j| j.state.as_ref())
        .map_or(0, |(s, _)| s.finished());
    if kept > 0 && writer != (Writer::Analyze { resume: true }) {
        let j = journal.as_ref().expect("kept > 0");
        let jdir = Journal::dir_of(out);
        let advice = match writer {
            Writer::Merge => format!(
                "continue it with lca analyze … --resume, delete {} to start over, or choose another -o",
                jdir.display()
            ),
            Writer::Analyze { .. } => format!(
                "add --resume to continue it, or delete {} to start over",
                jdir.display()
            ),
        };
        return Err(LcaError::Output {
            path: out.to_path_buf(),
            msg: format!(
                "holds an interrupted analysis ({kept} of {} steps finished, journal in {}): {advice}",
                j.manifest.checkpoints.len().saturating_sub(1),
                jdir.display(),
            ),
        });
    }
    Ok((od, found, journal))
}

/// Whether the journal state `state` belongs to the run whose outputs are in `out`: every
/// streamed temporary table it describes has been renamed away and `summary.json` holds its
/// finished steps (what a kill in the middle of removing the journal, after a complete commit,
/// left in lca ≤ 0.1's order of removal).
fn committed_already(out: &Path, state: &RunState, files: &[(String, u64)]) -> bool {
    if files.is_empty() || files.iter().any(|(n, _)| out.join(n).exists()) {
        return false;
    }
    let Ok(summary) = crate::output::json::read_summary(out) else {
        return false;
    };
    summary.steps.len() >= state.records.len()
        && summary.steps[..state.records.len()] == state.records[..]
}

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
    let (mut out, found, journal) = prepare_out(
        &opts.out,
        Writer::Analyze {
            resume: opts.resume,
        },
        note,
    )?;
    let jdir = Journal::dir_of(&opts.out);
    let mut saved: Option<Saved> = None;
    match journal {
        Some(j) => {
            let kept = j.state.as_ref().map_or(0, |(s, _)| s.finished());
            // Without --resume, a journal without a finished step is replaced
            // (`prepare_out` refused one with finished steps).
            if opts.resume && kept == 0 {
                note("note: the interrupted run had not finished a step; starting from the first");
            } else if opts.resume {
                let diffs = j.manifest.differences(&plan.manifest);
                if !diffs.is_empty() {
                    return Err(LcaError::Output {
                        path: opts.out.clone(),
                        msg: format!(
                            "cannot resume the interrupted analysis: {}. Run with the inputs and options it was started with (its --shard too, if it was a shard) to continue it; its {kept} finished step(s) are kept in {}",
                            diffs.join("; "),
                            jdir.display()
                        ),
                    });
                }
                j.verify_tables(&opts.out)?;
                saved = j.state;
            }
        }
        None if opts.resume => {
            if found.completed_commit
                && let Ok(s) = crate::output::json::read_summary(&opts.out)
                && s.spec.sha256 == p.spec_sha256
                && s.data.sha256 == p.data.sha256
                && s.checkpoints.len() == plan.files(p).len()
                && s.data.data_order() == Some(p.order)
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
