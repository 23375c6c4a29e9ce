//! Scale-out: `lca analyze --shard K/N` analyses one of N contiguous ranges of steps and
//! writes a *part* (a normal output directory plus `shard.json` and f64 per-step values);
//! `lca merge PART…` checks that the parts come from the same inputs and options and cover
//! every step exactly once, and replays their steps through the exporters of a single run,
//! so that every output is what one unsharded run writes. See `docs/scale-out.md`.
//!
//! Shards are numbered from 0: `--shard 0/N` … `--shard N-1/N`. `--shards N` takes K from the
//! environment: `JOB_COMPLETION_INDEX` (Kubernetes Indexed Jobs, 0-based) or
//! `SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN` (Slurm job arrays, whatever the array's first
//! index; `SLURM_ARRAY_TASK_COUNT` must be N and `SLURM_ARRAY_TASK_STEP` 1 when set).

use super::AnalyzeOptions;
use super::plan::Plan;
use super::prepare::Prepared;
use crate::error::{LcaError, Result};
use crate::journal::{Manifest, RunState};
use crate::net::Real;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Name of the file that marks an output directory as a part of a sharded run.
pub const FILE: &str = "shard.json";
/// Version of `shard.json`.
pub const FORMAT: u32 = 1;

/// Shard `index` (0-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    /// `K/N`, 0 ≤ K < N.
    fn from_str(s: &str) -> std::result::Result<Shard, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("expected K/N (shard K of N, K from 0 to N-1), got {s:?}"))?;
        let num = |x: &str, what: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("{what} in {s:?} is not a whole number"))
        };
        let (index, count) = (num(k, "K")?, num(n, "N")?);
        Shard::new(index, count)
    }
}

impl Shard {
    /// Shard `index` of `count`, checked: `count` ≥ 1 and `index` < `count`.
    pub fn new(index: usize, count: usize) -> std::result::Result<Shard, String> {
        if count == 0 {
            return Err("the number of shards must be at least 1".into());
        }
        if index >= count {
            return Err(format!(
                "shard {index} of {count} does not exist: shards are numbered 0 to {} (K is 0-based)",
                count - 1
            ));
        }
        Ok(Shard { index, count })
    }

    /// Shard K of `count`, K taken from the environment (`get` reads a variable):
    /// `JOB_COMPLETION_INDEX`, else `SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN`.
    pub fn from_env(
        count: usize,
        get: &dyn Fn(&str) -> Option<String>,
    ) -> std::result::Result<Shard, String> {
        let num = |name: &str| -> std::result::Result<Option<usize>, String> {
            match get(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| format!("{name}={v:?} is not a whole number")),
            }
        };
        if let Some(k) = num("JOB_COMPLETION_INDEX")? {
            return Shard::new(k, count).map_err(|e| format!("JOB_COMPLETION_INDEX={k}: {e}"));
        }
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            if let Some(step) = num("SLURM_ARRAY_TASK_STEP")?
                && step != 1
            {
                return Err(format!(
                    "the Slurm job array has a step of {step} (SLURM_ARRAY_TASK_STEP): use a contiguous array such as --array=0-{} or --array=1-{count}",
                    count - 1
                ));
            }
            if let Some(c) = num("SLURM_ARRAY_TASK_COUNT")?
                && c != count
            {
                return Err(format!(
                    "the Slurm job array has {c} tasks (SLURM_ARRAY_TASK_COUNT) but --shards is {count}: give the array exactly one task per shard (--array=0-{} or --array=1-{count})",
                    count - 1
                ));
            }
            let k = id.checked_sub(min).ok_or_else(|| {
                format!("SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}")
            })?;
            return Shard::new(k, count).map_err(|e| {
                format!(
                    "SLURM_ARRAY_TASK_ID={id} − SLURM_ARRAY_TASK_MIN={min} = {k}: {e} (use a contiguous array such as --array=0-{} or --array=1-{count})",
                    count - 1
                )
            });
        }
        Err(format!(
            "--shards {count} takes the shard index from JOB_COMPLETION_INDEX (Kubernetes Indexed Job) or SLURM_ARRAY_TASK_ID (Slurm job array), and neither is set: give it explicitly with --shard K/{count} (K from 0 to {})",
            count - 1
        ))
    }

    /// The steps of this shard among `nsteps`: step indices `[a, b)`, which are also the
    /// indices of its first and last checkpoint. Contiguous ranges, sizes differing by at most
    /// one, in order. More shards than steps is an error.
    pub fn range(&self, nsteps: usize) -> Result<(usize, usize)> {
        // The command line refuses these; a shard.json read by `merge` may hold anything
        // (found by the `merge` fuzz target: a count of 0 divided by zero).
        if self.count == 0 || self.index >= self.count {
            return Err(LcaError::Usage(format!(
                "shard {}/{}: the index must be below the number of shards, which must be at least 1",
                self.index, self.count
            )));
        }
        if self.count > nsteps {
            return Err(LcaError::Usage(format!(
                "--shard {self}: {} shards but only {nsteps} step(s) selected; use at most {nsteps} shards",
                self.count
            )));
        }
        // In u128: k · nsteps cannot overflow; the result is at most nsteps.
        let at = |k: usize| (k as u128 * nsteps as u128 / self.count as u128) as usize;
        Ok((at(self.index), at(self.index + 1)))
    }
}

/// `shard.json`: which range a part covers and what it was computed from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardInfo {
    pub format: u32,
    /// Shard index (0-based) and number of shards.
    pub index: usize,
    pub count: usize,
    /// Always `0-based`: a reminder for readers of the file.
    pub indexing: String,
    /// Index (in the whole selection) of the shard's first step, which is also the index of
    /// its first checkpoint.
    pub first_step_index: usize,
    /// One past the index of its last step = the index of its last checkpoint.
    pub end_step_index: usize,
    /// Steps in this shard and in the whole selection.
    pub steps: usize,
    pub total_steps: usize,
    /// Training steps of the shard's first and last checkpoints.
    pub first_step: u64,
    pub last_step: u64,
    /// `eval.chunk_size` (also covered by the spec's sha256).
    pub chunk_size: usize,
    /// Inputs and options of the whole run: spec, data and validation sha256, integration
    /// options, precision, the requested lca.safetensors dtype, every selected checkpoint of
    /// the whole run (file and step) and the parameter tensors.
    pub inputs: Manifest,
    /// sha256 of the shard's checkpoints, first to last.
    pub checkpoint_sha256: Vec<String>,
    /// Warnings a single run gives before any step (sparse checkpoints, batch statistics).
    pub leading_warnings: Vec<String>,
    /// Checkpoint files that appeared or changed while the shard ran.
    pub directory_warnings: Vec<String>,
    /// sha256 of every other file of the part (`summary.json`, the tables, the f64 tensors),
    /// recorded when the part is written and checked by `merge` ([`ShardInfo::verify_files`]).
    #[serde(default)]
    pub files_sha256: std::collections::BTreeMap<String, String>,
}

impl ShardInfo {
    /// The description of the part a sharded run wrote.
    pub(crate) fn of_run<T: Real>(
        shard: Shard,
        p: &Prepared<T>,
        plan: &Plan,
        opts: &AnalyzeOptions,
        state: &RunState,
        directory_warnings: Vec<String>,
    ) -> ShardInfo {
        let files = plan.files(p);
        ShardInfo {
            format: FORMAT,
            index: shard.index,
            count: shard.count,
            indexing: "0-based".into(),
            first_step_index: plan.lo,
            end_step_index: plan.hi,
            steps: plan.hi - plan.lo,
            total_steps: p.files.len() - 1,
            first_step: files[0].step,
            last_step: files[files.len() - 1].step,
            chunk_size: p.spec.eval.chunk_size,
            inputs: plan.manifest_of(opts, p, &p.files),
            checkpoint_sha256: state.checkpoint_sha256.clone(),
            leading_warnings: plan.leading_warnings.clone(),
            directory_warnings,
            files_sha256: Default::default(),
        }
    }

    /// Record the sha256 of the part's files, written (under their temporary names) in `out`.
    pub(crate) fn record_files(&mut self, out: &crate::output::OutDir) -> Result<()> {
        for name in out.pending_names() {
            if name == FILE {
                continue;
            }
            let p = out.dir.join(crate::output::partial_name(&name));
            let sha = crate::tensors::sha256_file(&p).map_err(|e| LcaError::io(&p, e))?;
            self.files_sha256.insert(name, sha);
        }
        Ok(())
    }

    /// Check the files of the part in `dir` against the sha256 recorded when it was written:
    /// an edited or damaged file, one missing or one not recorded is refused, naming it.
    pub fn verify_files(&self, dir: &Path) -> Result<()> {
        let rerun = "run the shard again";
        if self.files_sha256.is_empty() {
            return Err(LcaError::Output {
                path: dir.join(FILE),
                msg: format!(
                    "records no checksums of the part's files (written by an older lca?): {rerun}"
                ),
            });
        }
        for name in crate::output::OUTPUT_FILES {
            if name != FILE && dir.join(name).exists() && !self.files_sha256.contains_key(name) {
                return Err(LcaError::Output {
                    path: dir.join(name),
                    msg: format!("is not one of the part's files recorded in {FILE}: {rerun}"),
                });
            }
        }
        for (name, then) in &self.files_sha256 {
            let p = dir.join(name);
            if !crate::output::OUTPUT_FILES.contains(&name.as_str()) || name == FILE {
                return Err(LcaError::Output {
                    path: dir.join(FILE),
                    msg: format!("records a checksum of an unknown file {name:?}: {rerun}"),
                });
            }
            let now = crate::tensors::sha256_file(&p).map_err(|e| LcaError::io(&p, e))?;
            if now != *then {
                return Err(LcaError::Output {
                    path: p,
                    msg: format!(
                        "differs from the file the shard wrote (sha256 {}… recorded in {FILE}, {}… now): it was edited or damaged; {rerun}",
                        &then[..then.len().min(12)],
                        &now[..12]
                    ),
                });
            }
        }
        Ok(())
    }

    /// Write as pretty JSON.
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| LcaError::Output {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        std::fs::write(path, json).map_err(|e| LcaError::io(path, e))
    }

    /// Read the `shard.json` of a part directory.
    pub fn read(dir: &Path) -> Result<ShardInfo> {
        let path = dir.join(FILE);
        if !path.is_file() {
            return Err(LcaError::Output {
                path: dir.to_path_buf(),
                msg: format!(
                    "is not a finished part of a sharded analysis (no {FILE}; parts are made by `lca analyze … --shard K/N`)"
                ),
            });
        }
        let text = std::fs::read(&path).map_err(|e| LcaError::io(&path, e))?;
        let info: ShardInfo = serde_json::from_slice(&text).map_err(|e| LcaError::Output {
            path: path.clone(),
            msg: format!("unreadable shard description: {e}"),
        })?;
        if info.format != FORMAT {
            return Err(LcaError::Output {
                path,
                msg: format!(
                    "shard format {} is not supported by this lca (expects {FORMAT})",
                    info.format
                ),
            });
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_k_of_n() {
        assert_eq!("0/3".parse::<Shard>(), Ok(Shard { index: 0, count: 3 }));
        assert_eq!("2/3".parse::<Shard>(), Ok(Shard { index: 2, count: 3 }));
        assert!("3/3".parse::<Shard>().unwrap_err().contains("0-based"));
        assert!("1/0".parse::<Shard>().is_err());
        assert!("3".parse::<Shard>().is_err());
        assert!("a/3".parse::<Shard>().is_err());
    }

    #[test]
    fn ranges_tile_the_steps_evenly() {
        for nsteps in 1..40 {
            for count in 1..=nsteps {
                let mut next = 0;
                for index in 0..count {
                    let (a, b) = Shard { index, count }.range(nsteps).unwrap();
                    assert_eq!(a, next);
                    assert!(b > a);
                    let len = b - a;
                    assert!(len == nsteps / count || len == nsteps.div_ceil(count));
                    next = b;
                }
                assert_eq!(next, nsteps);
            }
            assert!(
                Shard {
                    index: 0,
                    count: nsteps + 1
                }
                .range(nsteps)
                .is_err()
            );
        }
    }

    /// What a `shard.json` read by `merge` may hold (found by the `merge` fuzz target: a count
    /// of 0 divided by zero): refused, never a panic or an overflow.
    #[test]
    fn ranges_of_impossible_shards_are_errors() {
        for (index, count, nsteps) in [(0, 0, 0), (0, 0, 5), (3, 3, 5), (usize::MAX, 2, 5)] {
            assert!(
                Shard { index, count }.range(nsteps).is_err(),
                "{index}/{count}"
            );
        }
        let big = usize::MAX;
        let (a, b) = Shard {
            index: big - 1,
            count: big,
        }
        .range(big)
        .unwrap();
        assert_eq!((a, b), (big - 1, big));
    }

    #[test]
    fn index_from_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let k8s = env(&[("JOB_COMPLETION_INDEX", "2")]);
        assert_eq!(Shard::from_env(3, &k8s).unwrap().index, 2);
        // Slurm arrays numbered from 1 or from 0 give the same shards.
        let one = env(&[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_MIN", "1")]);
        assert_eq!(Shard::from_env(3, &one).unwrap().index, 0);
        let zero = env(&[("SLURM_ARRAY_TASK_ID", "0"), ("SLURM_ARRAY_TASK_MIN", "0")]);
        assert_eq!(Shard::from_env(3, &zero).unwrap().index, 0);
        let count = env(&[
            ("SLURM_ARRAY_TASK_ID", "0"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert!(Shard::from_env(3, &count).unwrap_err().contains("4 tasks"));
        let stepped = env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]);
        assert!(
            Shard::from_env(3, &stepped)
                .unwrap_err()
                .contains("step of 2")
        );
        let high = env(&[("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_MIN", "0")]);
        assert!(Shard::from_env(3, &high).is_err());
        assert!(
            Shard::from_env(3, &env(&[]))
                .unwrap_err()
                .contains("--shard K/3")
        );
    }
}
