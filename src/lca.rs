//! Loss Change Allocation for one step θ_t → θ_{t+1}: the path integral of the gradient along
//! the straight segment, split over parameters.
//!
//! `LCA_i = Δθ_i · ∫₀¹ ∂_i L(θ_t + s·Δθ) ds`, integrated with Simpson's rule
//! (weights 1/6, 4/6, 1/6; "RK4" collapses to this for an integrand in s alone), refined
//! adaptively with composite Simpson (2 → 4 → … sub-intervals) while the step's residual
//! `r_t = L(θ_{t+1}) − L(θ_t) − Σ_i LCA_i` exceeds the bound. Only the new points are
//! evaluated at each refinement. The gradient at θ_{t+1} is returned for reuse as the next
//! step's start. Trapezoid and first-order rules exist for comparison.

use crate::error::{LcaError, Result};
use crate::eval::{LossGrad, SharedLevel, SharedSimpson};

pub mod budget;

/// How refinement is decided (docs/integration.md).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// A run-level error budget: plain Simpson on every step, then split the panels with the
    /// largest residuals until Σ|r|/|ΔL| ≤ the target (the default).
    Budget,
    /// A bound per step (`--tolerance`, `--rel-tolerance`), doubling the step's sub-intervals.
    Tolerance,
}

fn legacy_policy() -> Policy {
    Policy::Tolerance
}
fn default_target() -> f64 {
    1e-4
}
fn default_safety() -> f64 {
    0.8
}
fn default_cap() -> f64 {
    4.0
}

/// Quadrature rule.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Composite Simpson, refined adaptively (the default).
    Simpson,
    /// Trapezoid rule on the endpoints (g_t + g_{t+1})/2.
    Trapezoid,
    /// The gradient at θ_t only (biased; for comparison).
    FirstOrder,
}

/// How to integrate each step.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Integration {
    pub method: Method,
    /// Refine Simpson steps whose residual exceeds the bound.
    pub adaptive: bool,
    /// Absolute residual bound, in loss units.
    pub abs_tol: f64,
    /// Optional bound relative to |ΔL_t|; a step is accepted when |r_t| ≤ max(abs, rel·|ΔL_t|).
    pub rel_tol: Option<f64>,
    /// Largest number of Simpson sub-intervals (a power of two ≥ 2).
    pub max_splits: usize,
    /// How refinement is decided; runs of older versions used `tolerance`.
    #[serde(default = "legacy_policy")]
    pub policy: Policy,
    /// Budget policy: the target Σ_t|r_t| / |L_T − L_0|.
    #[serde(default = "default_target")]
    pub target: f64,
    /// Budget policy: the fraction of the target the refinement aims at (room for f32 noise).
    #[serde(default = "default_safety")]
    pub safety: f64,
    /// Budget policy: at most this many times plain Simpson's 1 + 2S evaluations.
    #[serde(default = "default_cap")]
    pub max_evals_factor: f64,
    /// Budget policy, `--converge-layers REL`: then refine until every layer's run-total
    /// error estimate is at most REL · max(|layer LCA|, 1 % of |ΔL|)
    /// ([`budget::converge_layers`]); `None`: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converge_layers: Option<f64>,
}

impl Default for Integration {
    fn default() -> Self {
        Integration {
            method: Method::Simpson,
            adaptive: true,
            abs_tol: 1e-3,
            rel_tol: None,
            max_splits: 32,
            policy: Policy::Budget,
            target: default_target(),
            safety: default_safety(),
            max_evals_factor: default_cap(),
            converge_layers: None,
        }
    }
}

impl Integration {
    /// Whether the run-level budget decides refinement (Simpson, adaptive, `--policy budget`).
    pub fn uses_budget(&self) -> bool {
        self.policy == Policy::Budget && self.method == Method::Simpson && self.adaptive
    }

    /// The per-step settings of the absolute-tolerance policy with the same rule.
    pub fn per_step(&self) -> Integration {
        Integration {
            policy: Policy::Tolerance,
            ..*self
        }
    }

    /// The residual bound of a step with loss change `delta`.
    pub fn bound(&self, delta: f64) -> f64 {
        match self.rel_tol {
            Some(r) => self.abs_tol.max(r * delta.abs()),
            None => self.abs_tol,
        }
    }
}

/// The outcome of integrating one step.
#[derive(Debug, Clone)]
pub struct StepLca {
    /// Per-parameter LCA (model order), f64.
    pub lca: Vec<Vec<f64>>,
    pub loss_before: f64,
    pub loss_after: f64,
    pub lca_sum: f64,
    pub residual: f64,
    /// Number of sub-intervals used (1 for trapezoid/first-order, 2 for plain Simpson).
    pub splits: usize,
    /// Whether the residual still exceeded the bound at `max_splits`.
    pub capped: bool,
    /// Gradient evaluations spent on this step (the start point is not counted: it is reused).
    pub evaluations: usize,
    /// Error estimate of each tensor's LCA (model order; [`budget::estimate`]); `None` where
    /// the rule keeps no per-point samples (the tolerance policy).
    pub err: Option<Vec<f64>>,
}

impl StepLca {
    /// A step from its allocation and end losses (the residual follows); no error estimate.
    fn of(
        (lca, lca_sum): Allocation,
        loss_before: f64,
        loss_after: f64,
        splits: usize,
        capped: bool,
        evaluations: usize,
    ) -> StepLca {
        StepLca {
            lca,
            loss_before,
            loss_after,
            lca_sum,
            residual: loss_after - loss_before - lca_sum,
            splits,
            capped,
            evaluations,
            err: None,
        }
    }
}

/// Interpolate θ_t + s·Δθ in f64, rounded to the evaluator's precision.
///
/// At s = 1 this is exactly θ_{t+1}: Δθ of two f32 values is exact in f64.
pub fn point<T: crate::net::Real>(theta0: &[Vec<f32>], delta: &[Vec<f64>], s: f64) -> Vec<Vec<T>> {
    theta0
        .iter()
        .zip(delta)
        .map(|(a, d)| {
            a.iter()
                .zip(d)
                .map(|(&a, &d)| T::of(a as f64 + s * d))
                .collect()
        })
        .collect()
}

/// Δθ = θ_{t+1} − θ_t in f64.
pub fn difference(theta0: &[Vec<f32>], theta1: &[Vec<f32>]) -> Vec<Vec<f64>> {
    theta0
        .iter()
        .zip(theta1)
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(&a, &b)| b as f64 - a as f64)
                .collect()
        })
        .collect()
}

fn add_into(acc: &mut [Vec<f64>], g: &[Vec<f64>], w: f64) {
    for (a, gi) in acc.iter_mut().zip(g) {
        for (x, y) in a.iter_mut().zip(gi) {
            *x += w * y;
        }
    }
}

fn zeros_like(g: &[Vec<f64>]) -> Vec<Vec<f64>> {
    g.iter().map(|v| vec![0.0; v.len()]).collect()
}

/// Composite-Simpson accumulators of one objective: E (end points), A (interior points of
/// coarser levels), B (the newest, odd points). The rule over n sub-intervals is
/// (E + 2A + 4B) / (3n).
struct SimpsonSums {
    e: Vec<Vec<f64>>,
    a: Vec<Vec<f64>>,
    b: Vec<Vec<f64>>,
}

impl SimpsonSums {
    fn weights(&self, n: usize) -> Vec<Vec<f64>> {
        let mut w = zeros_like(&self.e);
        let k = 1.0 / (3.0 * n as f64);
        add_into(&mut w, &self.e, k);
        add_into(&mut w, &self.a, 2.0 * k);
        add_into(&mut w, &self.b, 4.0 * k);
        w
    }
}

/// Evaluates every objective (loss and gradient) at the points θ_t + s·Δθ of a step, for each
/// `s` of the slice (asked together, so that an engine can evaluate them at once): one `Vec`
/// per point, in order, each holding one [`LossGrad`] per objective.
pub type PointEvaluator<'a> = dyn FnMut(&[f64]) -> Result<Vec<Vec<LossGrad>>> + 'a;

/// Per-parameter LCA of one objective and its sum.
pub(crate) type Allocation = (Vec<Vec<f64>>, f64);

/// Per-parameter LCA Δθ ⊙ w and its sum.
pub(crate) fn allocate(weights: &[Vec<f64>], delta: &[Vec<f64>]) -> Allocation {
    let mut sum = 0.0;
    let lca: Vec<Vec<f64>> = weights
        .iter()
        .zip(delta)
        .map(|(w, d)| {
            w.iter()
                .zip(d)
                .map(|(&w, &d)| {
                    let v = w * d;
                    sum += v;
                    v
                })
                .collect()
        })
        .collect();
    (lca, sum)
}

/// Integrate one step for one or more objectives evaluated at the same points (objective 0
/// is the training loss, which alone decides refinement; others, such as a held-out set,
/// follow the same path and points). `grad_at(s)` evaluates every objective at
/// θ_t + s·Δθ (see [`point`]); `start` holds the (reused) evaluations at θ_t. Returns one
/// [`StepLca`] per objective and the evaluations at θ_{t+1} (s = 1), which start the next step.
pub fn integrate_step(
    delta: &[Vec<f64>],
    start: &[LossGrad],
    opts: &Integration,
    grad_at: &mut PointEvaluator<'_>,
) -> Result<(Vec<StepLca>, Vec<LossGrad>)> {
    // Simpson's midpoint is asked for with the end, so that both are evaluated together.
    let (end, mid) = if opts.method == Method::Simpson {
        let mut v = grad_at(&[1.0, 0.5])?.into_iter();
        (v.next().expect("two points"), v.next())
    } else {
        (grad_at(&[1.0])?.remove(0), None)
    };
    let mut evaluations = 1;
    let k = start.len();
    // Per objective: (lca, sum); plus splits and capped (shared).
    let (results, splits, capped): (Vec<Allocation>, usize, bool) = match opts.method {
        Method::FirstOrder => (
            start.iter().map(|s| allocate(&s.grads, delta)).collect(),
            1,
            false,
        ),
        Method::Trapezoid => (
            start
                .iter()
                .zip(&end)
                .map(|(s, e)| {
                    let mut avg = zeros_like(&s.grads);
                    add_into(&mut avg, &s.grads, 0.5);
                    add_into(&mut avg, &e.grads, 0.5);
                    allocate(&avg, delta)
                })
                .collect(),
            1,
            false,
        ),
        Method::Simpson => {
            let mid = mid.expect("asked with the end");
            evaluations += 1;
            let mut sums: Vec<SimpsonSums> = (0..k)
                .map(|o| {
                    let mut e = zeros_like(&start[o].grads);
                    add_into(&mut e, &start[o].grads, 1.0);
                    add_into(&mut e, &end[o].grads, 1.0);
                    SimpsonSums {
                        a: zeros_like(&e),
                        e,
                        b: Vec::new(),
                    }
                })
                .collect();
            for (s, m) in sums.iter_mut().zip(mid) {
                s.b = m.grads;
            }
            let dl = end[0].loss - start[0].loss;
            let mut n = 2usize;
            loop {
                let (lca0, s0) = allocate(&sums[0].weights(n), delta);
                let ok = (dl - s0).abs() <= opts.bound(dl);
                if ok || !opts.adaptive || n * 2 > opts.max_splits {
                    let mut res = vec![(lca0, s0)];
                    res.extend(sums[1..].iter().map(|s| allocate(&s.weights(n), delta)));
                    break (res, n, !ok && opts.adaptive);
                }
                // Refine: every current point becomes "interior of a coarser level".
                n *= 2;
                let mut newb: Vec<Vec<Vec<f64>>> = sums.iter().map(|s| zeros_like(&s.e)).collect();
                // The new points two at a time (together, without holding a whole level).
                let new: Vec<f64> = (1..n).step_by(2).map(|j| j as f64 / n as f64).collect();
                for pair in new.chunks(2) {
                    for g in grad_at(pair)? {
                        evaluations += 1;
                        for (nb, gi) in newb.iter_mut().zip(&g) {
                            add_into(nb, &gi.grads, 1.0);
                        }
                    }
                }
                for (s, nb) in sums.iter_mut().zip(newb) {
                    let old_b = std::mem::replace(&mut s.b, nb);
                    add_into(&mut s.a, &old_b, 1.0);
                }
            }
        }
    };
    let steps = results
        .into_iter()
        .zip(start.iter().zip(&end))
        .map(|(a, (s, e))| StepLca::of(a, s.loss, e.loss, splits, capped, evaluations))
        .collect();
    Ok((steps, end))
}

/// Finish a plain Simpson step computed with the first layer shared
/// ([`crate::eval::Evaluator::simpson_sharing_first`]), one [`SharedSimpson`] per objective
/// (objective 0, the training loss, decides). Returns `None` when adaptive refinement is on
/// and the step's residual exceeds the bound: the caller then integrates the step with
/// [`integrate_step`].
pub fn finish_shared_step(
    delta: &[Vec<f64>],
    shared: &[SharedSimpson],
    opts: &Integration,
) -> Option<Vec<StepLca>> {
    let s0 = shared.first()?;
    let dl = s0.loss[2] - s0.loss[0];
    let (lca0, sum0) = allocate(&s0.weighted, delta);
    let ok = (dl - sum0).abs() <= opts.bound(dl);
    if !ok && opts.adaptive && opts.max_splits >= 4 {
        return None;
    }
    let step = |a: Allocation, s: &SharedSimpson| {
        StepLca::of(a, s.loss[0], s.loss[2], 2, !ok && opts.adaptive, 2)
    };
    let mut out = vec![step((lca0, sum0), s0)];
    out.extend(
        shared[1..]
            .iter()
            .map(|s| step(allocate(&s.weighted, delta), s)),
    );
    Some(out)
}

/// Evaluates the new points `ss` of refinement level `n` of a shared step for every objective
/// ([`refine_shared_step`]).
pub type LevelEvaluator<'a> = dyn FnMut(usize, &[f64]) -> Result<Vec<SharedLevel>> + 'a;

/// Refines a step whose shared Simpson try ([`finish_shared_step`] returned `None`; computed
/// with `keep`) missed the bound, the first layer still shared: composite Simpson over 4, 8, …
/// intervals as [`integrate_step`] refines, with the try's points reused. `level(n, ss)`
/// evaluates the new points of level `n` (at `ss`) for every objective
/// ([`crate::eval::Engine::refine_sharing_first`]). Objective 0 decides, as there.
pub fn refine_shared_step(
    delta: &[Vec<f64>],
    shared: &mut [SharedSimpson],
    opts: &Integration,
    level: &mut LevelEvaluator<'_>,
) -> Result<Vec<StepLca>> {
    let mut sums: Vec<SimpsonSums> = shared
        .iter_mut()
        .map(|s| {
            let [e, b] = s.parts.take().ok_or_else(|| {
                LcaError::Numeric("internal: a shared step to refine was not kept".into())
            })?;
            Ok(SimpsonSums {
                a: zeros_like(&e),
                e,
                b,
            })
        })
        .collect::<Result<_>>()?;
    let dl = shared[0].loss[2] - shared[0].loss[0];
    let mut evaluations = 2;
    let mut n = 2usize;
    loop {
        n *= 2;
        let new: Vec<f64> = (1..n).step_by(2).map(|j| j as f64 / n as f64).collect();
        let levels = level(n, &new)?;
        evaluations += new.len();
        // The rest of the network by composite Simpson's sums; node 0 as the level gives it.
        let mut weighted = Vec::with_capacity(sums.len());
        for (s, SharedLevel { rest, first }) in sums.iter_mut().zip(levels) {
            let old_b = std::mem::replace(&mut s.b, rest);
            add_into(&mut s.a, &old_b, 1.0);
            let mut w = s.weights(n);
            for (wj, fj) in w.iter_mut().zip(first) {
                if !fj.is_empty() {
                    *wj = fj;
                }
            }
            weighted.push(w);
        }
        let results: Vec<Allocation> = weighted.iter().map(|w| allocate(w, delta)).collect();
        let ok = (dl - results[0].1).abs() <= opts.bound(dl);
        if ok || n * 2 > opts.max_splits {
            let steps = results
                .into_iter()
                .zip(shared.iter())
                .map(|(a, s)| StepLca::of(a, s.loss[0], s.loss[2], n, !ok, evaluations))
                .collect();
            return Ok(steps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sextic "loss" L(θ) = Σ c_i θ_i⁶ + θ_0 θ_1: along the path the integrand dL/ds is a
    /// quintic, for which composite Simpson's error is exactly proportional to h⁴, so each
    /// refinement must shrink the residual exactly 16×.
    fn sextic(theta: &[Vec<f32>]) -> Result<Vec<LossGrad>> {
        let t: Vec<f64> = theta[0].iter().map(|&v| v as f64).collect();
        let c = [1.0, 0.5, 2.0];
        let loss = t.iter().zip(c).map(|(x, c)| c * x.powi(6)).sum::<f64>() + t[0] * t[1];
        let mut g: Vec<f64> = t.iter().zip(c).map(|(x, c)| 6.0 * c * x.powi(5)).collect();
        g[0] += t[1];
        g[1] += t[0];
        Ok(vec![LossGrad {
            loss,
            grads: vec![g],
        }])
    }

    fn run(opts: Integration) -> StepLca {
        let t0 = vec![vec![1.0f32, -0.5, 0.25]];
        let t1 = vec![vec![0.0f32, 0.5, 1.0]];
        let start = sextic(&t0).unwrap();
        let d = difference(&t0, &t1);
        integrate_step(&d, &start, &opts, &mut |ss: &[f64]| {
            ss.iter().map(|&s| sextic(&point(&t0, &d, s))).collect()
        })
        .unwrap()
        .0
        .remove(0)
    }

    #[test]
    fn simpson_residual_falls_with_refinement() {
        let plain = run(Integration {
            adaptive: false,
            ..Default::default()
        });
        assert_eq!(plain.splits, 2);
        assert_eq!(plain.evaluations, 2);
        assert!(plain.residual.abs() > 1e-3, "{}", plain.residual);
        let refined = run(Integration {
            abs_tol: 1e-6,
            ..Default::default()
        });
        assert!(refined.splits > 2);
        assert!(refined.residual.abs() <= 1e-6, "{}", refined.residual);
        // New points only: 1 (end) + 1 + 2 + 4 + ... + n/2 = n evaluations.
        assert_eq!(refined.evaluations, refined.splits);
        // Composite Simpson error falls as h^4: one doubling cuts it ~16×.
        let four = run(Integration {
            adaptive: true,
            abs_tol: 0.0,
            max_splits: 4,
            ..Default::default()
        });
        assert_eq!(four.splits, 4);
        assert!(four.capped);
        let ratio = plain.residual / four.residual;
        assert!((ratio - 16.0).abs() < 1e-6, "ratio {ratio}");
    }

    #[test]
    fn first_order_and_trapezoid_use_endpoint_gradients() {
        let fo = run(Integration {
            method: Method::FirstOrder,
            ..Default::default()
        });
        // g(θ0) = [6·1 + (-0.5), 6·0.5·(-0.5)⁵ + 1, 6·2·0.25⁵]
        let g0 = [5.5, 0.90625, 0.01171875];
        let d = [-1.0, 1.0, 0.75];
        let want: f64 = g0.iter().zip(d).map(|(g, d)| g * d).sum();
        assert!((fo.lca_sum - want).abs() < 1e-12);
        let tr = run(Integration {
            method: Method::Trapezoid,
            ..Default::default()
        });
        assert_eq!(tr.splits, 1);
        assert!(tr.residual.abs() < fo.residual.abs());
    }

    #[test]
    fn unmoved_parameter_has_exactly_zero_lca() {
        let t0 = vec![vec![1.0f32, -0.5, 0.25]];
        let t1 = vec![vec![0.0f32, -0.5, 1.0]];
        let start = sextic(&t0).unwrap();
        let d = difference(&t0, &t1);
        let (s, _) = integrate_step(&d, &start, &Integration::default(), &mut |ss: &[f64]| {
            ss.iter().map(|&s| sextic(&point(&t0, &d, s))).collect()
        })
        .unwrap();
        assert_eq!(s[0].lca[0][1], 0.0);
    }
}
