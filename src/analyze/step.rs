//! The run itself: a [`Run`] holds the state of an analysis in progress (the output
//! directory, the journal, the exporters, the totals, θ_t and its evaluations) and goes
//! through the stages — open the exporters, start or restore, one step at a time (load,
//! integrate, record), finish — with one stop path for every failure.
//!
//! The loop owns persistence: a step counts as finished only once every exporter has it, and
//! the journal is saved from finished steps only (see `docs/reliability.md`).

use super::AnalyzeOptions;
use super::exporters::{ExportPlan, Exporters, Start};
use super::plan::Plan;
use super::prepare::Prepared;
use super::resume::{Saved, verify};
use super::summary::{L2Ends, Outcome, build};
use super::tallies::{Layout, StepValues, accumulate, fraction, l2_penalty, l2_step, step_groups};
use crate::checkpoint::{self, CheckpointFile};
use crate::error::{LcaError, Result};
use crate::eval::{Engine, LossGrad, SharedLevel, SharedSimpson};
use crate::journal::{Journal, RunState};
use crate::lca::{StepLca, difference, integrate_step, point, refine_shared_step};
use crate::net::Real;
use crate::output::{CheckpointRef, OutDir, StepRecord, Summary};
use crate::progress::Progress;

/// The training objective and, when the spec names a validation set, the held-out one,
/// evaluated at the same points; each evaluation advances the progress bar.
pub(crate) struct Objectives<'a, E: Engine> {
    pub train: &'a E,
    pub val: Option<&'a E>,
    pub progress: Progress,
}

fn on_validation(e: LcaError) -> LcaError {
    match e {
        LcaError::Numeric(m) => LcaError::Numeric(format!("validation set: {m}")),
        other => other,
    }
}

fn interrupted() -> Result<()> {
    if crate::interrupt::requested() {
        return Err(LcaError::Interrupted(crate::error::Interruption::Requested));
    }
    Ok(())
}

impl<E: Engine> Objectives<'_, E> {
    /// Loss and gradient of every objective at `theta`.
    pub(super) fn at(&self, theta: &[Vec<E::Real>]) -> Result<Vec<LossGrad>> {
        Ok(self.at_many(&[theta])?.remove(0))
    }

    /// Loss and gradient of every objective at each of `thetas` (one `Vec` per point, in
    /// order), the points evaluated together ([`Engine::loss_and_grad_many`]).
    pub(super) fn at_many(&self, thetas: &[&[Vec<E::Real>]]) -> Result<Vec<Vec<LossGrad>>> {
        interrupted()?;
        let mut r: Vec<Vec<LossGrad>> = self
            .train
            .loss_and_grad_many(thetas)?
            .into_iter()
            .map(|t| vec![t])
            .collect();
        if let Some(v) = self.val {
            let vs = v.loss_and_grad_many(thetas).map_err(on_validation)?;
            for (r, v) in r.iter_mut().zip(vs) {
                r.push(v);
            }
        }
        for _ in thetas {
            self.progress.inc();
        }
        Ok(r)
    }

    /// A shared-first-layer Simpson step of every objective; `carries` holds what each
    /// objective's previous step computed at θ_t. With `keep` the step can be refined
    /// ([`Objectives::refine_shared`]).
    fn shared(
        &self,
        pts: [&[Vec<E::Real>]; 3],
        carries: &mut [Option<E::Carry>; 2],
        keep: bool,
    ) -> Result<Vec<SharedSimpson>> {
        interrupted()?;
        let [t0, mid, t1] = pts;
        let mut r = vec![
            self.train
                .simpson_sharing_first(t0, mid, t1, &mut carries[0], keep)?,
        ];
        if let Some(v) = self.val {
            r.push(
                v.simpson_sharing_first(t0, mid, t1, &mut carries[1], keep)
                    .map_err(on_validation)?,
            );
        }
        self.progress.inc();
        self.progress.inc();
        Ok(r)
    }

    /// One refinement level of the shared step just computed, for every objective: the new
    /// points `thetas` at `ss` of composite Simpson over `n` intervals.
    fn refine_shared(
        &self,
        ends: [&[Vec<E::Real>]; 2],
        n: usize,
        ss: &[f64],
        thetas: &[&[Vec<E::Real>]],
        carries: &mut [Option<E::Carry>; 2],
    ) -> Result<Vec<SharedLevel>> {
        interrupted()?;
        let [t0, t1] = ends;
        let mut r =
            vec![
                self.train
                    .refine_sharing_first(t0, t1, n, ss, thetas, &mut carries[0])?,
            ];
        if let Some(v) = self.val {
            r.push(
                v.refine_sharing_first(t0, t1, n, ss, thetas, &mut carries[1])
                    .map_err(on_validation)?,
            );
        }
        for _ in ss {
            self.progress.inc();
        }
        Ok(r)
    }
}

/// An analysis in progress.
pub(crate) struct Run<'a, E: Engine> {
    opts: &'a AnalyzeOptions,
    p: &'a Prepared<E::Real>,
    plan: &'a Plan,
    files: &'a [CheckpointFile],
    layout: Layout,
    l2: Option<f64>,
    objectives: Objectives<'a, E>,
    out: OutDir,
    journal: Journal,
    exporters: Option<Exporters>,
    /// The totals so far; `None` until the first checkpoint is evaluated or restored.
    state: Option<RunState>,
    /// Set while a step is being handed to the exporters: if that fails, the streamed files
    /// may hold part of the step, so the journal keeps its last saved state.
    exporting: bool,
    /// θ_t and its evaluations (empty when the previous step was shared).
    theta0: Vec<Vec<f32>>,
    start: Vec<LossGrad>,
    carries: [Option<E::Carry>; 2],
    /// The budget policy's plan (`None` with the tolerance policy).
    budget: Option<super::budget::BudgetPlan>,
}

impl<'a, E: Engine> Run<'a, E> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        opts: &'a AnalyzeOptions,
        p: &'a Prepared<E::Real>,
        plan: &'a Plan,
        train: &'a E,
        val: Option<&'a E>,
        out: OutDir,
        journal: Journal,
    ) -> Run<'a, E> {
        Run {
            opts,
            p,
            plan,
            files: plan.files(p),
            layout: Layout::of_model(&p.model),
            l2: p.spec.regularization.as_ref().map(|r| r.l2),
            objectives: Objectives {
                train,
                val,
                progress: Progress::new((1 + 2 * plan.nsteps) as u64, opts.quiet),
            },
            out,
            journal,
            exporters: None,
            state: None,
            exporting: false,
            theta0: Vec::new(),
            start: Vec::new(),
            carries: [None, None],
            budget: None,
        }
    }

    /// Run every stage; on failure, keep what the journal holds and say how to continue.
    pub fn execute(mut self, saved: Option<Saved>, note: &mut dyn FnMut(&str)) -> Result<Summary> {
        match self.stages(saved, note) {
            Ok(summary) => {
                let Run { out, exporters, .. } = self;
                drop(exporters);
                out.commit()?;
                Ok(summary)
            }
            Err(e) => Err(self.stop(e, note)),
        }
    }

    fn stages(&mut self, saved: Option<Saved>, note: &mut dyn FnMut(&str)) -> Result<Summary> {
        self.open_exporters(saved.as_ref())?;
        let fresh = saved.is_none();
        match saved {
            None => self.start_fresh(note)?,
            Some((state, _)) => self.restore(state, note)?,
        }
        if self.opts.integration.uses_budget() {
            self.plan_budget(fresh, note)?;
        }
        for i in self.finished()..self.plan.nsteps {
            self.step(i)?;
        }
        self.objectives.progress.finish();
        self.start = Vec::new();
        self.finish(note)
    }

    fn finished(&self) -> usize {
        self.state.as_ref().map_or(0, RunState::finished)
    }

    fn open_exporters(&mut self, saved: Option<&Saved>) -> Result<()> {
        let plan = ExportPlan {
            shapes: self.layout.shapes(),
            steps: self
                .files
                .windows(2)
                .map(|w| (w[0].step, w[1].step))
                .collect(),
            store: self.plan.store,
            validation: self.objectives.val.is_some(),
            l2: self.opts.shard.is_some() && self.l2.is_some(),
            params_csv: self.opts.params_csv,
        };
        let jdir = Journal::dir_of(&self.opts.out);
        let start = match saved {
            None => Start::Fresh,
            Some((state, lengths)) => Start::Resume {
                journal_dir: &jdir,
                lengths,
                done: state.finished(),
            },
        };
        self.exporters = Some(Exporters::open(&mut self.out, &plan, &start)?);
        Ok(())
    }

    fn exporters(&mut self) -> &mut Exporters {
        self.exporters
            .as_mut()
            .expect("the exporters are opened first")
    }

    /// Evaluate the first checkpoint and start the totals.
    fn start_fresh(&mut self, note: &mut dyn FnMut(&str)) -> Result<()> {
        let first = checkpoint::load(&self.files[0], &self.p.model.params)?;
        if !first.unused.is_empty() {
            note(&format!(
                "note: ignoring {} tensor(s) the spec does not use: {}",
                first.unused.len(),
                first.unused.join(", ")
            ));
        }
        let start = self
            .objectives
            .at(&widen::<E::Real>(&first.theta))
            .map_err(|e| at_checkpoint(e, &self.files[0]))?;
        // Verification against PyTorch, before any step and before any output is committed.
        super::verify::check(
            &self.files[0],
            start[0].loss,
            self.opts.verify_loss,
            self.p.batch_norm,
            self.p.order,
            note,
        )?;
        self.state = Some(RunState {
            records: Vec::with_capacity(self.plan.nsteps),
            checkpoint_sha256: vec![first.sha256],
            loss_first: start[0].loss,
            val_first: start.get(1).map(|v| v.loss),
            l2_first: self
                .l2
                .map(|lam| l2_penalty(lam, &first.theta, &self.p.l2_mask)),
            ignored: first.unused,
            totals: self.layout.zero_totals(
                self.objectives.val.is_some(),
                self.l2.is_some(),
                self.opts.integration.uses_budget(),
            ),
        });
        self.theta0 = first.theta;
        self.start = start;
        Ok(())
    }

    /// Continue from a saved state: check it, and evaluate θ_k again (deterministic: the same
    /// bits as the interrupted run's end-point evaluation; it is not counted twice).
    fn restore(&mut self, state: RunState, note: &mut dyn FnMut(&str)) -> Result<()> {
        let jdir = Journal::dir_of(&self.opts.out);
        let cur = verify(&state, self.files, &self.p.model.params, &jdir)?;
        let (k, nsteps) = (state.finished(), self.plan.nsteps);
        let evals: usize = state.records.iter().map(|r| r.evaluations).sum();
        let extra: usize = state
            .records
            .iter()
            .map(|r| r.evaluations.saturating_sub(2))
            .sum();
        let progress = &self.objectives.progress;
        progress.add_length(extra as u64);
        progress.advance(1 + evals as u64);
        note(&format!(
            "note: resuming after step {} ({k} of {nsteps} steps were finished)",
            self.files[k].step
        ));
        self.start = if k < nsteps {
            self.objectives
                .at(&widen::<E::Real>(&cur.theta))
                .map_err(|e| at_checkpoint(e, &self.files[k]))?
        } else {
            Vec::new()
        };
        self.state = Some(state);
        self.theta0 = cur.theta;
        Ok(())
    }

    /// The budget policy's passes 1 and 2 (`super::budget`): every step's panels.
    fn plan_budget(&mut self, fresh: bool, note: &mut dyn FnMut(&str)) -> Result<()> {
        let first = fresh.then(|| self.start.clone());
        let b = super::budget::plan(
            &self.objectives,
            self.files,
            &self.p.model.params,
            &self.opts.integration,
            first,
            self.finished(),
            &self.layout.layer_of,
        )?;
        if b.ending == crate::lca::budget::Ending::EvaluationCap {
            note(&format!(
                "warning: error budget: refinement stopped at the evaluation cap ({} evaluations, {}× plain Simpson's {}) with Σ|r|/|ΔL| = {:.4} % > {} %; a larger --max-evals-factor refines further",
                b.evaluations,
                self.opts.integration.max_evals_factor,
                1 + 2 * b.steps.len(),
                100.0 * b.planned_ratio(),
                100.0 * self.opts.integration.target
            ));
        }
        self.budget = Some(b);
        Ok(())
    }

    /// Integrate step `i` (θ_i → θ_{i+1}) and its tallies; the objectives' step figures
    /// (training first) and the evaluations at θ_{i+1} when the next step can reuse them.
    fn integrate(
        &mut self,
        i: usize,
        delta: &[Vec<f64>],
        a: &CheckpointFile,
        b: &CheckpointFile,
    ) -> Result<(Vec<StepLca>, Vec<LossGrad>)> {
        if let Some(plan) = self.budget.as_mut() {
            let objs = plan
                .integrate(i, &self.theta0, delta, &self.objectives)
                .map_err(|e| at_step(e, a, b))?;
            return Ok((objs, Vec::new()));
        }
        let integration = &self.opts.integration;
        let theta0 = &self.theta0;
        let at = |s: f64| point::<E::Real>(theta0, delta, s);
        let objectives = &self.objectives;
        let plain = |start: &[LossGrad]| {
            integrate_step(delta, start, integration, &mut |ss: &[f64]| {
                let pts: Vec<Vec<Vec<E::Real>>> = ss.iter().map(|&s| at(s)).collect();
                let refs: Vec<&[Vec<E::Real>]> = pts.iter().map(|p| p.as_slice()).collect();
                objectives.at_many(&refs)
            })
            .map_err(|e| at_step(e, a, b))
        };
        if !self.plan.shared {
            return plain(&self.start);
        }
        let pts = [at(0.0), at(0.5), at(1.0)];
        // A step that may be refined keeps what refining it with the first layer still shared
        // needs.
        let keep = integration.adaptive && integration.max_splits >= 4;
        let mut shared = objectives
            .shared([&pts[0], &pts[1], &pts[2]], &mut self.carries, keep)
            .map_err(|e| at_step(e, a, b))?;
        if let Some(objs) = crate::lca::finish_shared_step(delta, &shared, integration) {
            return Ok((objs, Vec::new()));
        }
        // Refinement: composite Simpson from the try's points, the first layer still shared.
        let carries = &mut self.carries;
        let objs = refine_shared_step(delta, &mut shared, integration, &mut |n, ss| {
            let new: Vec<Vec<Vec<E::Real>>> = ss.iter().map(|&s| at(s)).collect();
            let refs: Vec<&[Vec<E::Real>]> = new.iter().map(|p| p.as_slice()).collect();
            objectives.refine_shared([&pts[0], &pts[2]], n, ss, &refs, carries)
        })
        .map_err(|e| at_step(e, a, b))?;
        Ok((objs, Vec::new()))
    }

    /// One step: load θ_{i+1}, integrate, record, hand to the exporters, then count it.
    fn step(&mut self, i: usize) -> Result<()> {
        interrupted()?;
        let (a, b) = (&self.files[i], &self.files[i + 1]);
        let next = checkpoint::load(b, &self.p.model.params)?;
        let delta = difference(&self.theta0, &next.theta);
        let (mut objs, end) = self.integrate(i, &delta, a, b)?;
        let val = if objs.len() > 1 { objs.pop() } else { None };
        let s = objs.pop().ok_or_else(|| {
            LcaError::Numeric("internal: no training objective in the step".into())
        })?;
        let l2_lca = self
            .l2
            .map(|lam| l2_step(lam, &self.theta0, &next.theta, &self.p.l2_mask));
        let values = StepValues {
            lca: &s.lca,
            val: val.as_ref().map(|v| v.lca.as_slice()),
            l2: l2_lca.as_deref(),
            err: s.err.as_deref(),
        };
        let groups = step_groups(&self.layout, values);
        let state = self.state.as_ref().expect("started");
        self.project_length(s.evaluations);
        let rec = record(state, a, b, &s, val.as_ref(), &groups);
        self.progress_message(&rec);
        self.exporting = true;
        self.exporters().step(&groups.output(&rec, values))?;
        self.exporting = false;
        // The step is written: only now does it count as finished.
        let state = self.state.as_mut().expect("started");
        accumulate(&mut state.totals, values, &groups);
        state.records.push(rec);
        state.checkpoint_sha256.push(next.sha256);
        self.theta0 = next.theta;
        self.start = end;
        if i + 1 < self.plan.nsteps && self.journal.due() {
            self.save_journal()?;
        }
        test_delay();
        Ok(())
    }

    /// Project the total from the evaluations per step so far, so that the ETA accounts for
    /// adaptive refinement.
    fn project_length(&self, step_evaluations: usize) {
        let state = self.state.as_ref().expect("started");
        let done = state.records.len() + 1;
        let evals =
            1 + step_evaluations + state.records.iter().map(|r| r.evaluations).sum::<usize>();
        let per_step = (evals - 1) as f64 / done as f64;
        self.objectives
            .progress
            .set_length(evals as u64 + ((self.plan.nsteps - done) as f64 * per_step).ceil() as u64);
    }

    fn progress_message(&self, rec: &StepRecord) {
        let state = self.state.as_ref().expect("started");
        let max_abs_r = state
            .records
            .iter()
            .map(|r| r.residual.abs())
            .fold(rec.residual.abs(), f64::max);
        self.objectives.progress.message(&format!(
            "step {}→{} r {:+.1e} (max |r| {:.1e}) ΔL {:+.2e}{}",
            rec.step,
            rec.next_step,
            rec.residual,
            max_abs_r,
            rec.delta_loss,
            if rec.splits > 2 {
                format!(" [{} splits]", rec.splits)
            } else {
                String::new()
            },
        ));
    }

    /// Flush the exporters to disk and save the run's state in the journal.
    fn save_journal(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        let files = self.exporters().sync()?;
        let state = self.state.as_ref().expect("started");
        self.journal.save(state, &files, started)?;
        self.out.keep_partials();
        Ok(())
    }

    /// The summary, written by every exporter (and a shard's part description).
    fn finish(&mut self, note: &mut dyn FnMut(&str)) -> Result<Summary> {
        let dir_warnings = super::directory_changes(
            &self.opts.ckpt_dir,
            &self.p.listed,
            self.files,
            self.opts.first,
            self.opts.last,
        );
        let state = self.state.as_ref().expect("started");
        let mut header = super::header(self.opts, self.p, self.plan, &self.layout, state);
        header.integration.budget = self.budget.as_ref().map(|b| crate::output::BudgetInfo {
            target: self.opts.integration.target,
            safety: self.opts.integration.safety,
            bound: b.bound,
            max_evals_factor: self.opts.integration.max_evals_factor,
            ending: b.ending,
            evaluations: b.evaluations,
            plain_evaluations: 1 + 2 * b.steps.len(),
            refined_steps: b.steps.iter().filter(|s| s.leaves.len() > 1).count(),
            layers: b.layers.map(|o| crate::output::LayerConvergence {
                rel: self.opts.integration.converge_layers.unwrap_or(0.0),
                floor: crate::lca::budget::LAYER_FLOOR,
                ending: o.ending,
                evaluations: o.evaluations,
                worst_before: o.worst_before,
                worst_after: o.worst_after,
            }),
        });
        let l2 = match (&self.p.spec.regularization, state.l2_first) {
            (Some(r), Some(first)) => Some(L2Ends {
                lambda: r.l2,
                tensors: self
                    .p
                    .model
                    .params
                    .iter()
                    .zip(&self.p.l2_mask)
                    .filter(|(_, on)| **on)
                    .map(|(q, _)| q.name.clone())
                    .collect(),
                penalty_first: first,
                penalty_last: l2_penalty(r.l2, &self.theta0, &self.p.l2_mask),
            }),
            _ => None,
        };
        let outcome = Outcome {
            layout: &self.layout,
            checkpoints: self
                .files
                .iter()
                .zip(&state.checkpoint_sha256)
                .map(|(f, sha)| CheckpointRef {
                    path: f.path.display().to_string(),
                    step: f.step,
                    step_source: f.step_source,
                    sha256: sha.clone(),
                })
                .collect(),
            records: state.records.clone(),
            totals: &state.totals,
            loss_first: state.loss_first,
            val_first: state.val_first,
            l2,
            max_splits: self.opts.integration.max_splits,
            leading_warnings: self.plan.leading_warnings.clone(),
            closing_warnings: dir_warnings.clone(),
            files: self.exporters.as_ref().expect("opened").files.clone(),
        };
        let summary = build(header, outcome, note);
        let state = self.state.as_ref().expect("started");
        let exporters = self.exporters.as_mut().expect("opened");
        exporters.finish(&summary, &state.totals)?;
        if let Some(s) = self.opts.shard {
            let mut info = super::shard::ShardInfo::of_run(
                s,
                self.p,
                self.plan,
                self.opts,
                state,
                dir_warnings,
            );
            info.record_files(&self.out)?;
            info.write(&self.out.partial(super::shard::FILE))?;
        }
        Ok(summary)
    }

    /// The run stopped with `e`: keep what the journal holds (saving the last finished step
    /// first) and say how to continue, or, when no step was saved, clean up.
    fn stop(mut self, e: LcaError, note: &mut dyn FnMut(&str)) -> LcaError {
        let keep_state = !self.exporting
            && self.exporters.is_some()
            && self
                .state
                .as_ref()
                .is_some_and(|s| s.finished() > self.journal.saved());
        if keep_state && let Err(se) = self.save_journal() {
            note(&format!(
                "warning: could not update the resume journal: {se}"
            ));
        }
        let nsteps = self.plan.nsteps;
        if self.journal.saved() == 0 {
            let _ = crate::output::remove_state_dir(&self.opts.out);
            return match e {
                LcaError::Interrupted(_) => {
                    LcaError::Interrupted(crate::error::Interruption::NothingKept)
                }
                other => other,
            };
        }
        self.out.keep_partials();
        let kept = format!(
            "{} of {nsteps} steps are finished and kept in {}",
            self.journal.saved(),
            self.journal.dir().display()
        );
        match e {
            LcaError::Interrupted(_) => {
                LcaError::Interrupted(crate::error::Interruption::Kept(kept))
            }
            other => LcaError::Stopped {
                error: Box::new(other),
                kept: format!(
                    "{kept}: once the problem is fixed, run the same command with --resume to continue"
                ),
            },
        }
    }
}

/// The record of one step.
fn record(
    state: &RunState,
    a: &CheckpointFile,
    b: &CheckpointFile,
    s: &StepLca,
    val: Option<&StepLca>,
    groups: &super::tallies::StepGroups,
) -> StepRecord {
    let c = groups.counts;
    let cum = state
        .records
        .last()
        .map_or(state.loss_first, |r| r.reconstructed_loss)
        + s.lca_sum;
    StepRecord {
        step: a.step,
        next_step: b.step,
        loss_before: s.loss_before,
        loss_after: s.loss_after,
        delta_loss: s.loss_after - s.loss_before,
        lca_sum: s.lca_sum,
        residual: s.residual,
        reconstructed_loss: cum,
        splits: s.splits,
        capped: s.capped,
        evaluations: s.evaluations,
        helped: c.helped,
        zero: c.zero,
        hurt: c.hurt,
        helped_fraction: fraction(c.helped, c.helped + c.zero + c.hurt),
        val_loss_before: val.map(|v| v.loss_before),
        val_loss_after: val.map(|v| v.loss_after),
        val_lca_sum: val.map(|v| v.lca_sum),
        val_residual: val.map(|v| v.residual),
        l2_lca: groups.tensors.iter().map(|t| t.l2_lca).sum(),
    }
}

/// Checkpoint values (f32) in the engine's precision.
fn widen<T: Real>(theta: &[Vec<f32>]) -> Vec<Vec<T>> {
    theta
        .iter()
        .map(|t| t.iter().map(|&v| T::of(v as f64)).collect())
        .collect()
}

fn at_checkpoint(e: LcaError, f: &CheckpointFile) -> LcaError {
    match e {
        LcaError::Numeric(m) => {
            LcaError::Numeric(format!("{} (step {}): {m}", f.path.display(), f.step))
        }
        other => other,
    }
}

fn at_step(e: LcaError, a: &CheckpointFile, b: &CheckpointFile) -> LcaError {
    match e {
        LcaError::Numeric(m) => LcaError::Numeric(format!(
            "between {} (step {}) and {} (step {}): {m}",
            a.path.display(),
            a.step,
            b.path.display(),
            b.step
        )),
        other => other,
    }
}

/// Sleep `LCA_TEST_STEP_DELAY_MS` milliseconds after each step: a hook for the tests that
/// interrupt a run. Returns early on an interrupt.
fn test_delay() {
    let ms: u64 = match std::env::var("LCA_TEST_STEP_DELAY_MS") {
        Ok(v) => v.parse().unwrap_or(0),
        Err(_) => return,
    };
    let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    while std::time::Instant::now() < until && !crate::interrupt::requested() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
