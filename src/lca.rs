//! Loss Change Allocation for one step θ_t → θ_{t+1}: the path integral of the gradient along
//! the straight segment, split over parameters.
//!
//! `LCA_i = Δθ_i · ∫₀¹ ∂_i L(θ_t + s·Δθ) ds`, integrated with Simpson's rule
//! (weights 1/6, 4/6, 1/6; "RK4" collapses to this for an integrand in s alone), refined
//! adaptively with composite Simpson (2 → 4 → … sub-intervals) while the step's residual
//! `r_t = L(θ_{t+1}) − L(θ_t) − Σ_i LCA_i` exceeds the bound. Only the new points are
//! evaluated at each refinement. The gradient at θ_{t+1} is returned for reuse as the next
//! step's start. Trapezoid and first-order rules exist for comparison.

use crate::error::Result;
use crate::eval::LossGrad;

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
}

impl Default for Integration {
    fn default() -> Self {
        Integration {
            method: Method::Simpson,
            adaptive: true,
            abs_tol: 1e-3,
            rel_tol: None,
            max_splits: 32,
        }
    }
}

impl Integration {
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
}

/// Interpolate θ_t + s·Δθ in f64, rounded to f32.
pub fn point(theta0: &[Vec<f32>], delta: &[Vec<f64>], s: f64) -> Vec<Vec<f32>> {
    theta0
        .iter()
        .zip(delta)
        .map(|(a, d)| {
            a.iter()
                .zip(d)
                .map(|(&a, &d)| (a as f64 + s * d) as f32)
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

/// Integrate one step. `grad_at` evaluates the full-set loss and gradient at a point;
/// `start` is the (reused) evaluation at θ_t. Returns the step's LCA and the evaluation at
/// θ_{t+1} (exactly `theta1`, so it can start the next step).
pub fn integrate_step(
    theta0: &[Vec<f32>],
    theta1: &[Vec<f32>],
    start: &LossGrad,
    opts: &Integration,
    grad_at: &mut dyn FnMut(&[Vec<f32>]) -> Result<LossGrad>,
) -> Result<(StepLca, LossGrad)> {
    let delta = difference(theta0, theta1);
    let end = grad_at(theta1)?;
    let mut evaluations = 1;
    let (l0, l1) = (start.loss, end.loss);
    let finish = |weights: &[Vec<f64>]| -> (Vec<Vec<f64>>, f64) {
        let mut sum = 0.0;
        let lca: Vec<Vec<f64>> = weights
            .iter()
            .zip(&delta)
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
    };
    let (lca, lca_sum, splits, capped) = match opts.method {
        Method::FirstOrder => {
            let (lca, s) = finish(&start.grads);
            (lca, s, 1, false)
        }
        Method::Trapezoid => {
            let mut avg = zeros_like(&start.grads);
            add_into(&mut avg, &start.grads, 0.5);
            add_into(&mut avg, &end.grads, 0.5);
            let (lca, s) = finish(&avg);
            (lca, s, 1, false)
        }
        Method::Simpson => {
            // Composite Simpson over n sub-intervals: (E + 2A + 4B) / (3n), with E the end
            // points, A all interior points of coarser levels, B the newest (odd) points.
            let mut e = zeros_like(&start.grads);
            add_into(&mut e, &start.grads, 1.0);
            add_into(&mut e, &end.grads, 1.0);
            let mut a = zeros_like(&e);
            let mid = grad_at(&point(theta0, &delta, 0.5))?;
            evaluations += 1;
            let mut b = mid.grads;
            let mut n = 2usize;
            loop {
                let mut w = zeros_like(&e);
                let k = 1.0 / (3.0 * n as f64);
                add_into(&mut w, &e, k);
                add_into(&mut w, &a, 2.0 * k);
                add_into(&mut w, &b, 4.0 * k);
                let (lca, s) = finish(&w);
                let r = (l1 - l0 - s).abs();
                let ok = r <= opts.bound(l1 - l0);
                if ok || !opts.adaptive || n * 2 > opts.max_splits {
                    let capped = !ok && opts.adaptive;
                    break (lca, s, n, capped);
                }
                // Refine: all current points become "interior of coarser levels".
                add_into(&mut a, &b, 1.0);
                n *= 2;
                let mut newb = zeros_like(&e);
                for j in (1..n).step_by(2) {
                    let g = grad_at(&point(theta0, &delta, j as f64 / n as f64))?;
                    evaluations += 1;
                    add_into(&mut newb, &g.grads, 1.0);
                }
                b = newb;
            }
        }
    };
    Ok((
        StepLca {
            lca,
            loss_before: l0,
            loss_after: l1,
            lca_sum,
            residual: l1 - l0 - lca_sum,
            splits,
            capped,
            evaluations,
        },
        end,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quartic "loss" L(θ) = Σ c_i θ_i⁴ + θ_0 θ_1: Simpson is exact for cubics along the
    /// path, so the quartic leaves a residual that refinement must shrink by ~16× per level.
    fn quartic(theta: &[Vec<f32>]) -> Result<LossGrad> {
        let t: Vec<f64> = theta[0].iter().map(|&v| v as f64).collect();
        let c = [1.0, 0.5, 2.0];
        let loss = t.iter().zip(c).map(|(x, c)| c * x.powi(4)).sum::<f64>() + t[0] * t[1];
        let mut g: Vec<f64> = t.iter().zip(c).map(|(x, c)| 4.0 * c * x.powi(3)).collect();
        g[0] += t[1];
        g[1] += t[0];
        Ok(LossGrad {
            loss,
            grads: vec![g],
        })
    }

    fn run(opts: Integration) -> StepLca {
        let t0 = vec![vec![1.0f32, -0.5, 0.25]];
        let t1 = vec![vec![0.0f32, 0.5, 1.0]];
        let start = quartic(&t0).unwrap();
        integrate_step(&t0, &t1, &start, &opts, &mut quartic)
            .unwrap()
            .0
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
        assert!((ratio - 16.0).abs() < 0.5, "ratio {ratio}");
    }

    #[test]
    fn first_order_and_trapezoid_use_endpoint_gradients() {
        let fo = run(Integration {
            method: Method::FirstOrder,
            ..Default::default()
        });
        // g(θ0) = [4*1 + (-0.5), 4*0.5*(-0.125) + 1, 8*0.015625]
        let g0 = [3.5, 0.75, 0.125];
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
        let start = quartic(&t0).unwrap();
        let (s, _) =
            integrate_step(&t0, &t1, &start, &Integration::default(), &mut quartic).unwrap();
        assert_eq!(s.lca[0][1], 0.0);
    }
}
