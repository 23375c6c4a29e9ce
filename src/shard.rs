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

use crate::analyze::{accumulate, capped_warning, group_totals, residual_report, step_groups};
use crate::error::{LcaError, Result};
use crate::journal::Manifest;
use crate::report::{
    Exporter, OutDir, ParamTotals, StepOutput, Summary,
    csv::CsvExporter,
    json::JsonExporter,
    tensors::{StepReader, TensorExporter, TensorSource},
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
        if self.count > nsteps {
            return Err(LcaError::Usage(format!(
                "--shard {self}: {} shards but only {nsteps} step(s) selected; use at most {nsteps} shards",
                self.count
            )));
        }
        let at = |k: usize| k * nsteps / self.count;
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
}

impl ShardInfo {
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
        .range(total)?;
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

/// Merge the parts of a sharded analysis into `out`, with the outputs of a single run.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<Summary> {
    if dirs.is_empty() {
        return Err(usage("lca merge needs at least one part directory".into()));
    }
    let mut parts = Vec::with_capacity(dirs.len());
    for d in dirs {
        let info = ShardInfo::read(d)?;
        let summary = crate::report::json::read_summary(d)?;
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
    let parts = validate(parts)?;
    let base = &parts[0].summary;
    let info = &parts[0].info;
    let params = &base.model.params;
    let layers = &base.model.layers;
    let shapes: Vec<(String, Vec<usize>)> = params
        .iter()
        .map(|q| (q.name.clone(), q.shape.clone()))
        .collect();
    let has_val = base.run.validation.is_some();
    let has_l2 = base.run.l2.is_some();
    let steps: Vec<(u64, u64)> = info
        .inputs
        .checkpoints
        .windows(2)
        .map(|w| (w[0].step, w[1].step))
        .collect();

    let (mut od, _) = OutDir::prepare(out)?;
    od.remove_partials()?;
    let mut exporters: Vec<Box<dyn Exporter>> = vec![Box::new(CsvExporter::new([
        od.partial("steps.csv"),
        od.partial("layers.csv"),
        od.partial("tensors.csv"),
        od.partial("params.csv"),
    ])?)];
    if let Some(dtype) = info.inputs.lca_tensors {
        let mut names = vec![("lca.safetensors", TensorSource::Train)];
        if has_val {
            names.push(("lca_validation.safetensors", TensorSource::Validation));
        }
        for (name, source) in names {
            let mut e = TensorExporter::new(od.partial(name), &shapes, &steps, dtype)?;
            e.source = source;
            exporters.push(Box::new(e));
        }
    }
    exporters.push(Box::new(JsonExporter {
        path: od.partial(crate::report::SUMMARY_FILE),
    }));
    let file_names: Vec<String> = std::iter::once(crate::report::SUMMARY_FILE.to_string())
        .chain(
            od.pending_names()
                .into_iter()
                .filter(|n| n != crate::report::SUMMARY_FILE),
        )
        .collect();

    let zeros = || -> Vec<Vec<f64>> { params.iter().map(|q| vec![0.0; q.numel]).collect() };
    let mut totals = ParamTotals {
        lca: zeros(),
        helped_steps: params.iter().map(|q| vec![0; q.numel]).collect(),
        hurt_steps: params.iter().map(|q| vec![0; q.numel]).collect(),
        val_lca: has_val.then(zeros),
        l2_lca: has_l2.then(zeros),
    };
    let layer_of: Vec<usize> = params
        .iter()
        .map(|q| layers.iter().position(|l| *l == q.layer).unwrap_or(0))
        .collect();
    let loss_first = base.run.loss_first;
    let mut records: Vec<crate::report::StepRecord> = Vec::with_capacity(steps.len());
    let mut checkpoints = Vec::with_capacity(steps.len() + 1);
    for (i, part) in parts.iter().enumerate() {
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
        let mut val_r = if has_val {
            Some(open("lca_validation.safetensors")?)
        } else {
            None
        };
        let mut l2_r = if has_l2 {
            Some(open("lca_l2.safetensors")?)
        } else {
            None
        };
        let skip = usize::from(i > 0);
        checkpoints.extend(part.summary.checkpoints.iter().skip(skip).cloned());
        for (t, rec) in part.summary.steps.iter().enumerate() {
            let lca = lca_r.read(t)?;
            let val = val_r.as_mut().map(|r| r.read(t)).transpose()?;
            let l2 = l2_r.as_mut().map(|r| r.read(t)).transpose()?;
            let (tensors, layer_steps, _) = step_groups(
                params,
                layers,
                &layer_of,
                &lca,
                val.as_deref(),
                l2.as_deref(),
            );
            let mut rec = rec.clone();
            // The running reconstruction starts at the first part's L_0, as in a single run.
            rec.reconstructed_loss =
                records.last().map_or(loss_first, |r| r.reconstructed_loss) + rec.lca_sum;
            let so = StepOutput {
                record: &rec,
                tensors: &tensors,
                layers: &layer_steps,
                lca: &lca,
                val_lca: val.as_deref(),
                l2_lca: l2.as_deref(),
            };
            for e in exporters.iter_mut() {
                e.step(&so)?;
            }
            accumulate(&mut totals, &lca, val.as_deref(), l2.as_deref());
            records.push(rec);
        }
    }

    let train = residual_report(
        loss_first,
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
    let mut warnings = info.leading_warnings.clone();
    warnings.extend(capped_warning(
        &capped_steps,
        base.integration.settings.max_splits,
    ));
    for p in &parts {
        for w in &p.info.directory_warnings {
            if !warnings.contains(w) {
                warnings.push(w.clone());
            }
        }
    }
    let (tensor_totals, layer_totals) = group_totals(params, layers, &totals);
    let last = &parts[parts.len() - 1].summary;
    let mut run = base.run.clone();
    run.steps = records.len();
    run.loss_first = train.loss_first;
    run.loss_last = train.loss_last;
    run.delta_loss = train.delta_loss;
    run.lca_sum = train.lca_sum;
    run.residual_sum = train.residual_sum;
    run.residual_abs_sum = train.residual_abs_sum;
    run.max_abs_residual = train.max_abs_residual;
    run.rel_residual = train.rel_residual;
    run.rel_abs_residual = train.rel_abs_residual;
    run.evaluations = 1 + records.iter().map(|r| r.evaluations).sum::<usize>();
    run.capped_steps = capped_steps;
    run.validation = base
        .run
        .validation
        .as_ref()
        .map(|v| residual_report(v.loss_first, &val_records));
    if let (Some(l2), Some(l2_last)) = (run.l2.as_mut(), last.run.l2.as_ref()) {
        l2.penalty_last = l2_last.penalty_last;
        l2.lca_sum = records.iter().filter_map(|x| x.l2_lca).sum();
        l2.objective_delta = train.delta_loss + (l2.penalty_last - l2.penalty_first);
    }
    let summary = Summary {
        checkpoints,
        steps: records,
        run,
        tensors: tensor_totals,
        layers: layer_totals,
        warnings,
        files: file_names,
        ..base.clone()
    };
    for e in exporters.iter_mut() {
        e.finish(&summary, &totals)?;
    }
    drop(exporters);
    od.commit()?;
    Ok(summary)
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
