//! The plan of a run, fixed before any step: which checkpoints it analyses (all, or a shard's
//! range), what it stores, the warnings known in advance and the manifest that the resume
//! journal and `merge` check.

use super::prepare::Prepared;
use super::{AnalyzeOptions, Precision};
use crate::checkpoint::CheckpointFile;
use crate::error::Result;
use crate::journal::{Manifest, ManifestCheckpoint};
use crate::net::Real;
use crate::net::batch_norm::BnMode;
use crate::output::{Spacing, tensors::StoreDtype};

/// What a run does, decided from the options and the prepared inputs.
pub(crate) struct Plan {
    /// Index of the first and last checkpoint of this run in the whole selection.
    pub lo: usize,
    pub hi: usize,
    pub nsteps: usize,
    /// Element type of the stored per-parameter tensors, if written.
    pub store: Option<StoreDtype>,
    /// Whether plain Simpson steps share the first layer's work between their points.
    pub shared: bool,
    /// Over the whole selection, so that every shard reports what a single run would.
    pub spacing: Spacing,
    /// Warnings known before any step (the same in every shard).
    pub leading_warnings: Vec<String>,
    /// The manifest of this run's checkpoints (what `--resume` must find unchanged).
    pub manifest: Manifest,
}

impl Plan {
    pub fn new<T: Real>(
        opts: &AnalyzeOptions,
        p: &Prepared<T>,
        engine_shares_first_layer: bool,
        note: &mut dyn FnMut(&str),
    ) -> Result<Plan> {
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
        // Plain Simpson steps share the first layer's work between their points when it allows.
        let shared = engine_shares_first_layer
            && opts.integration.method == crate::lca::Method::Simpson
            && !opts.integration.uses_budget();
        let mut leading_warnings = Vec::new();
        let spacing = spacing(all);
        if let Some(w) = sparse_warning(&spacing) {
            note(&format!("warning: {w}"));
            leading_warnings.push(w);
        }
        if let Some(w) = batch_stats_warning(p) {
            note(&format!("warning: {w}"));
            leading_warnings.push(w);
        }
        if let Some(w) = p.order_warning() {
            note(&format!("warning: {w}"));
            leading_warnings.push(w);
        }
        if p.order_matters()
            && let crate::data::DataOrder::Shuffled { seed } = p.order
        {
            note(&format!(
                "note: batch statistics: evaluation chunks are drawn by the permutation of seed {seed} (--data-seed; --data-order file keeps the file's order)"
            ));
        }
        Ok(Plan {
            lo,
            hi,
            nsteps: files.len() - 1,
            store,
            shared,
            spacing,
            leading_warnings,
            manifest: manifest_of(opts, p, shared, files),
        })
    }

    /// This run's checkpoints.
    pub fn files<'a, T: Real>(&self, p: &'a Prepared<T>) -> &'a [CheckpointFile] {
        &p.files[self.lo..=self.hi]
    }

    /// The manifest of the checkpoints `sel`.
    pub fn manifest_of<T: Real>(
        &self,
        opts: &AnalyzeOptions,
        p: &Prepared<T>,
        sel: &[CheckpointFile],
    ) -> Manifest {
        manifest_of(opts, p, self.shared, sel)
    }
}

fn manifest_of<T: Real>(
    opts: &AnalyzeOptions,
    p: &Prepared<T>,
    shared: bool,
    sel: &[CheckpointFile],
) -> Manifest {
    let mut m = Manifest::new(
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
        p.model
            .params
            .iter()
            .map(|q| (q.name.clone(), q.shape.clone()))
            .collect(),
    );
    m.engine = p.engine.clone();
    m.data_order = p.order;
    m
}

fn spacing(all: &[CheckpointFile]) -> Spacing {
    let gaps: Vec<u64> = all.windows(2).map(|w| w[1].step - w[0].step).collect();
    // prepare() guarantees at least two checkpoints, so at least one gap.
    let min = gaps.iter().copied().min().unwrap_or(0);
    let max = gaps.iter().copied().max().unwrap_or(0);
    Spacing {
        min,
        max,
        sparse: max > 1,
    }
}

fn sparse_warning(spacing: &Spacing) -> Option<String> {
    spacing.sparse.then(|| {
        format!(
            "checkpoints are {}{} training steps apart: each step's total LCA is exact, but its split over parameters follows the straight chord between checkpoints, not the optimiser's path",
            spacing.min,
            if spacing.max != spacing.min {
                format!("–{}", spacing.max)
            } else {
                String::new()
            }
        )
    })
}

fn batch_stats_warning<T: Real>(p: &Prepared<T>) -> Option<String> {
    let chunk_size = p.spec.eval.chunk_size;
    let remainder = p.data.len() % chunk_size;
    let batch_stats = p.batch_norm == Some(BnMode::BatchStats);
    (batch_stats && remainder > 0 && (remainder < 8 || remainder * 4 < chunk_size)).then(|| {
        format!(
            "batch norm uses batch statistics and the last evaluation chunk has {remainder} samples ({} in all, chunk_size {chunk_size}): its statistics are noisy and can make the loss jump along a step; choose a chunk_size that divides the set or leaves a larger remainder",
            p.data.len()
        )
    })
}
