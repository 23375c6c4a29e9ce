//! The budget policy's two passes over the steps (docs/integration.md, "The budget policy").
//!
//! Pass 1 evaluates plain Simpson's points of every step and keeps, per step, the scalars the
//! decisions need (the loss and F = Δθ·∇L per point); pass 2 refines the steps with the largest
//! residuals ([`crate::lca::budget::refine`]). The gradients of the evaluated points are kept in
//! a cache bounded by `LCA_GRAD_CACHE_MIB` (default 2048 MiB); the step stage then integrates
//! each step with its final panels from the cache, evaluating again only the points that did
//! not fit. Every point is a deterministic evaluation, so cached and re-evaluated gradients
//! are the same bits: results do not depend on the cache size, the thread count or a resume.

use super::step::Objectives;
use crate::checkpoint::{self, CheckpointFile};
use crate::error::Result;
use crate::eval::{Engine, LossGrad};
use crate::lca::budget::{
    Ending, LayerGoal, LayerOutcome, Limits, PointValue, Samples, StepPanels, converge_layers,
    estimate, refine, total_abs_residual,
};
use crate::lca::{Integration, StepLca, difference, point};
use crate::net::ParamInfo;
use std::collections::{BTreeMap, HashMap};

/// Default bound of the gradient cache, MiB.
const DEFAULT_CACHE_MIB: usize = 2048;

/// The gradients of evaluated points, keyed by (step, grid point); the end of step t is
/// stored as the start of step t + 1.
struct Cache {
    map: HashMap<(usize, u32), Vec<LossGrad>>,
    bytes: usize,
    limit: usize,
    /// Steps before this one are finished (a resumed run): their points are not kept.
    from: usize,
    n: u32,
}

impl Cache {
    fn key(&self, t: usize, j: u32) -> (usize, u32) {
        if j == self.n { (t + 1, 0) } else { (t, j) }
    }

    fn put(&mut self, t: usize, j: u32, v: Vec<LossGrad>) {
        let key = self.key(t, j);
        if key.0 < self.from {
            return;
        }
        let size: usize = v
            .iter()
            .map(|o| o.grads.iter().map(Vec::len).sum::<usize>() * 8)
            .sum();
        if self.bytes + size > self.limit {
            return;
        }
        self.bytes += size;
        self.map.insert(key, v);
    }
}

/// The plan of the budget policy: every step's panels, and the cache of gradients.
pub(crate) struct BudgetPlan {
    pub steps: Vec<StepPanels>,
    pub ending: Ending,
    /// B = safety · target · |L_T − L_0|.
    pub bound: f64,
    /// Distinct points of the run (1 + 2S for plain Simpson).
    pub evaluations: usize,
    /// What `--converge-layers` did, when asked.
    pub layers: Option<LayerOutcome>,
    cache: Cache,
}

fn dot(delta: &[Vec<f64>], g: &[Vec<f64>]) -> f64 {
    delta
        .iter()
        .zip(g)
        .map(|(d, g)| d.iter().zip(g).map(|(d, g)| d * g).sum::<f64>())
        .sum()
}

fn value(delta: &[Vec<f64>], lg: &[LossGrad]) -> PointValue {
    PointValue {
        loss: lg[0].loss,
        f: dot(delta, &lg[0].grads),
    }
}

/// The training objective's per-tensor samples f_k = Σ_{i∈k} Δθ_i ∂_i L at a point.
fn per_tensor(delta: &[Vec<f64>], lg: &[LossGrad]) -> Vec<f64> {
    delta
        .iter()
        .zip(&lg[0].grads)
        .map(|(d, g)| d.iter().zip(g).map(|(d, g)| d * g).sum())
        .collect()
}

fn widen<T: crate::net::Real>(theta: &[Vec<f32>]) -> Vec<Vec<T>> {
    theta
        .iter()
        .map(|t| t.iter().map(|&v| T::of(v as f64)).collect())
        .collect()
}

/// θ_t (f32) and Δθ_t (f64) of one step.
type Segment = (Vec<Vec<f32>>, Vec<Vec<f64>>);

/// A checkpoint's θ and Δθ to the next, loaded on demand (the last pair is kept).
struct Segments<'a> {
    files: &'a [CheckpointFile],
    params: &'a [ParamInfo],
    at: Option<(usize, Segment)>,
}

impl Segments<'_> {
    fn get(&mut self, t: usize) -> Result<&Segment> {
        if self.at.as_ref().is_none_or(|(k, _)| *k != t) {
            let a = checkpoint::load(&self.files[t], self.params)?.theta;
            let b = checkpoint::load(&self.files[t + 1], self.params)?.theta;
            let d = difference(&a, &b);
            self.at = Some((t, (a, d)));
        }
        Ok(&self.at.as_ref().expect("loaded").1)
    }
}

/// Pass 1 and 2: plan every step's panels. `first` is the evaluation at the first checkpoint
/// when the caller has it (a fresh run); `from` is the first unfinished step.
pub(crate) fn plan<E: Engine>(
    objectives: &Objectives<'_, E>,
    files: &[CheckpointFile],
    params: &[ParamInfo],
    opts: &Integration,
    first: Option<Vec<LossGrad>>,
    from: usize,
    layer_of: &[usize],
) -> Result<BudgetPlan> {
    // Per-tensor samples of every point, for --converge-layers only.
    let layered = opts.converge_layers.is_some();
    let mut samples: Vec<Samples> = Vec::new();
    let nsteps = files.len() - 1;
    let n = opts.max_splits as u32;
    let limit = std::env::var("LCA_GRAD_CACHE_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(DEFAULT_CACHE_MIB)
        .saturating_mul(1 << 20);
    let mut cache = Cache {
        map: HashMap::new(),
        bytes: 0,
        limit,
        from,
        n,
    };
    let mut segs = Segments {
        files,
        params,
        at: None,
    };
    let mut start = match first {
        Some(v) => v,
        None => {
            let theta = checkpoint::load(&files[0], params)?.theta;
            objectives.at(&widen::<E::Real>(&theta))?
        }
    };
    let mut steps = Vec::with_capacity(nsteps);
    for t in 0..nsteps {
        let (theta, delta) = segs.get(t)?;
        let v0 = value(delta, &start);
        // The midpoint and the end, evaluated together.
        let (mid, end) = {
            let pts = [0.5, 1.0].map(|s| point::<E::Real>(theta, delta, s));
            let mut v = objectives.at_many(&[&pts[0], &pts[1]])?.into_iter();
            (v.next().expect("two points"), v.next().expect("two points"))
        };
        if layered {
            samples.push(
                [
                    (0, per_tensor(delta, &start)),
                    (n / 2, per_tensor(delta, &mid)),
                    (n, per_tensor(delta, &end)),
                ]
                .into(),
            );
        }
        steps.push(StepPanels::plain(
            n,
            v0,
            value(delta, &mid),
            value(delta, &end),
        ));
        cache.put(t, 0, std::mem::replace(&mut start, end));
        cache.put(t, n / 2, mid);
    }
    cache.put(nsteps, 0, start);
    let d = (steps[nsteps - 1].points[&n].loss - steps[0].points[&0].loss).abs();
    let bound = opts.safety * opts.target * d;
    let plain = 1 + 2 * nsteps;
    let limits = Limits {
        bound,
        max_evaluations: ((opts.max_evals_factor * plain as f64).floor() as usize).max(plain),
    };
    let mut evaluations = plain;
    let mut eval = |t: usize, j: u32| -> Result<(PointValue, Vec<f64>)> {
        let (theta, delta) = segs.get(t)?;
        let v = objectives.at(&point::<E::Real>(theta, delta, j as f64 / n as f64))?;
        let pv = value(delta, &v);
        let fk = if layered {
            per_tensor(delta, &v)
        } else {
            Vec::new()
        };
        cache.put(t, j, v);
        Ok((pv, fk))
    };
    let mut split: Vec<(usize, u32, Vec<f64>)> = Vec::new();
    let ending = refine(&mut steps, limits, &mut evaluations, &mut |t, j| {
        let (pv, fk) = eval(t, j)?;
        if layered {
            split.push((t, j, fk));
        }
        Ok(pv)
    })?;
    for (t, j, fk) in split {
        samples[t].insert(j, fk);
    }
    let layers = match opts.converge_layers {
        Some(rel) => {
            let goal = LayerGoal {
                rel,
                layer_of,
                layers: layer_of.iter().copied().max().map_or(0, |m| m + 1),
            };
            Some(converge_layers(
                &mut steps,
                &mut samples,
                &goal,
                &mut evaluations,
                &mut eval,
            )?)
        }
        None => None,
    };
    Ok(BudgetPlan {
        steps,
        ending,
        bound,
        evaluations,
        layers,
        cache,
    })
}

impl BudgetPlan {
    /// Σ_t |r_t| / |L_T − L_0| as planned (exact up to rounding of the final sums).
    pub fn planned_ratio(&self) -> f64 {
        let n = self.steps[0].n;
        let d = (self.steps[self.steps.len() - 1].points[&n].loss - self.steps[0].points[&0].loss)
            .abs();
        total_abs_residual(&self.steps) / d
    }

    /// Integrate step `t` with its planned panels, every objective: Σ_j w_j ∇L(s_j) in
    /// ascending s, from the cache or evaluated again.
    pub fn integrate<E: Engine>(
        &mut self,
        t: usize,
        theta0: &[Vec<f32>],
        delta: &[Vec<f64>],
        objectives: &Objectives<'_, E>,
    ) -> Result<Vec<StepLca>> {
        let panels = &self.steps[t];
        let n = panels.n;
        let mut acc: Vec<Vec<Vec<f64>>> = Vec::new();
        let mut losses: Vec<[f64; 2]> = Vec::new();
        // Per point, the training objective's per-tensor samples f_k = Σ_{i∈k} Δθ_i ∂_i L.
        let mut fk: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        for (j, w) in panels.weights() {
            let key = self.cache.key(t, j);
            let owned;
            let lg: &Vec<LossGrad> = match self.cache.map.get(&key) {
                Some(v) => v,
                None => {
                    owned = objectives.at(&point::<E::Real>(theta0, delta, j as f64 / n as f64))?;
                    &owned
                }
            };
            fk.insert(
                j,
                lg[0]
                    .grads
                    .iter()
                    .zip(delta)
                    .map(|(g, d)| g.iter().zip(d).map(|(g, d)| g * d).sum())
                    .collect(),
            );
            if acc.is_empty() {
                acc = lg
                    .iter()
                    .map(|o| o.grads.iter().map(|g| vec![0.0; g.len()]).collect())
                    .collect();
                losses = vec![[0.0; 2]; lg.len()];
            }
            for (o, (a, l)) in lg.iter().zip(acc.iter_mut().zip(losses.iter_mut())) {
                for (ai, gi) in a.iter_mut().zip(&o.grads) {
                    for (x, y) in ai.iter_mut().zip(gi) {
                        *x += w * y;
                    }
                }
                if j == 0 {
                    l[0] = o.loss;
                }
                if j == n {
                    l[1] = o.loss;
                }
            }
            // The end point starts the next step; the others are done with.
            if j != n
                && let Some(v) = self.cache.map.remove(&key)
            {
                self.cache.bytes -= v
                    .iter()
                    .map(|o| o.grads.iter().map(Vec::len).sum::<usize>() * 8)
                    .sum::<usize>();
            }
        }
        Ok(acc
            .into_iter()
            .zip(losses)
            .enumerate()
            .map(|(o, (w, [before, after]))| {
                let (lca, sum) = crate::lca::allocate(&w, delta);
                let residual = after - before - sum;
                StepLca {
                    err: (o == 0).then(|| estimate(panels, &fk, residual)),
                    lca,
                    loss_before: before,
                    loss_after: after,
                    lca_sum: sum,
                    residual,
                    splits: panels.splits(),
                    capped: panels.capped,
                    evaluations: panels.evaluations(),
                }
            })
            .collect())
    }
}
