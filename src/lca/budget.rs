//! The run-level error budget (the default policy, `--policy budget`; docs/integration.md).
//!
//! Every step starts as the one dyadic panel [0, 1] (plain Simpson: points 0, ½, 1). When
//! Σ_t |r_t| exceeds the budget B, the "halving" refinement of docs/integration-study.md
//! splits the panels with the largest panel residuals e_P = L(b) − L(a) − S_P[F] of the
//! steps with the largest |r_t|, reusing every evaluated point, until Σ_t |r_t| ≤ B, every
//! panel is at its narrowest, or the evaluations reach the cap.
//!
//! Everything here is scalar: per point the loss L(s) and F(s) = Δθ·∇L(θ_t + s·Δθ). Points are
//! integers in units of 1/n of the step (n = `max_splits`), so the narrowest panel is 2/n wide.

use crate::error::Result;
use std::collections::BTreeMap;

/// The loss and F = Δθ·∇L at one point of a step.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PointValue {
    pub loss: f64,
    pub f: f64,
}

/// The panel set of one step and the scalars of its evaluated points.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepPanels {
    /// Grid units per step (`max_splits`).
    pub n: u32,
    /// Evaluated points (grid units → values).
    pub points: BTreeMap<u32, PointValue>,
    /// Leaf panels [lo, hi] in grid units, ascending.
    pub leaves: Vec<(u32, u32)>,
    /// Whether the step still wanted refinement when it ran out of splittable panels.
    pub capped: bool,
}

impl StepPanels {
    /// A plain Simpson step from its values at s = 0, ½, 1.
    pub fn plain(n: u32, v0: PointValue, vm: PointValue, v1: PointValue) -> StepPanels {
        let mut points = BTreeMap::new();
        points.insert(0, v0);
        points.insert(n / 2, vm);
        points.insert(n, v1);
        StepPanels {
            n,
            points,
            leaves: vec![(0, n)],
            capped: false,
        }
    }

    fn value(&self, j: u32) -> PointValue {
        self.points[&j]
    }

    /// Simpson on panel [lo, hi] of a function of the point values.
    fn simpson(&self, lo: u32, hi: u32, f: impl Fn(PointValue) -> f64) -> f64 {
        let h = (hi - lo) as f64 / self.n as f64;
        let m = (lo + hi) / 2;
        h / 6.0 * (f(self.value(lo)) + 4.0 * f(self.value(m)) + f(self.value(hi)))
    }

    /// The panel residual e_P = L(hi) − L(lo) − S_P[F].
    pub fn panel_error(&self, lo: u32, hi: u32) -> f64 {
        self.value(hi).loss - self.value(lo).loss - self.simpson(lo, hi, |v| v.f)
    }

    /// The step's residual as the scalars see it: Σ over leaves of e_P.
    pub fn residual(&self) -> f64 {
        self.leaves
            .iter()
            .map(|&(lo, hi)| self.panel_error(lo, hi))
            .sum()
    }

    /// Sub-intervals used (two per panel).
    pub fn splits(&self) -> usize {
        2 * self.leaves.len()
    }

    /// Evaluations of the step, its start point not counted (it is the previous step's end).
    pub fn evaluations(&self) -> usize {
        self.points.len() - 1
    }

    /// The leaf with the largest |e_P| that can still be split (ties: the leftmost).
    fn worst_splittable(&self) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, &(lo, hi)) in self.leaves.iter().enumerate() {
            if hi - lo < 4 {
                continue;
            }
            let e = self.panel_error(lo, hi).abs();
            if best.is_none_or(|(_, b)| e > b) {
                best = Some((i, e));
            }
        }
        best.map(|(i, _)| i)
    }

    /// The quadrature weights of the leaf panels, per point (ascending): each leaf adds h/6
    /// at its ends and 4h/6 at its midpoint.
    pub fn weights(&self) -> Vec<(u32, f64)> {
        let mut w: BTreeMap<u32, f64> = BTreeMap::new();
        for &(lo, hi) in &self.leaves {
            let h = (hi - lo) as f64 / self.n as f64;
            let m = (lo + hi) / 2;
            *w.entry(lo).or_default() += h / 6.0;
            *w.entry(m).or_default() += 4.0 * h / 6.0;
            *w.entry(hi).or_default() += h / 6.0;
        }
        w.into_iter().collect()
    }
}

/// The error estimate of each tensor's LCA on one step (docs/integration.md, "Error
/// estimate"), from the per-tensor integrand samples f_k(s_j) = Σ_{i∈k} Δθ_i ∂_i L at the
/// step's points (`fk[j]`, one value per tensor) and the step's exact residual.
///
/// Unsplit step: d_k = (2 f_k(½) − f_k(0) − f_k(1)) / 3 (Simpson − trapezoid),
/// ρ = clamp(|r| / |Σ_k d_k|, 0.1, 1) (1 when Σ d_k = 0), est_k = 5 ρ |d_k|.
/// Split step: per leaf P with parent Q and sibling P′, d_{P,k} = (S_P + S_P′ − S_Q)[f_k] / 2,
/// est_k = 1.5 Σ_P |d_{P,k}|.
pub fn estimate(panels: &StepPanels, fk: &BTreeMap<u32, Vec<f64>>, residual: f64) -> Vec<f64> {
    let n = panels.n;
    let k = fk.values().next().map_or(0, Vec::len);
    let simpson = |lo: u32, hi: u32, t: usize| {
        let h = (hi - lo) as f64 / n as f64;
        h / 6.0 * (fk[&lo][t] + 4.0 * fk[&((lo + hi) / 2)][t] + fk[&hi][t])
    };
    if panels.leaves.len() == 1 {
        let (lo, hi) = panels.leaves[0];
        let m = (lo + hi) / 2;
        let d: Vec<f64> = (0..k)
            .map(|t| (2.0 * fk[&m][t] - fk[&lo][t] - fk[&hi][t]) / 3.0)
            .collect();
        let total: f64 = d.iter().sum();
        let rho = if total == 0.0 {
            1.0
        } else {
            (residual.abs() / total.abs()).clamp(0.1, 1.0)
        };
        return d.iter().map(|d| 5.0 * rho * d.abs()).collect();
    }
    let mut est = vec![0.0; k];
    for &(lo, hi) in &panels.leaves {
        let w = hi - lo;
        let (qlo, qhi, slo, shi) = if lo % (2 * w) == 0 {
            (lo, lo + 2 * w, hi, hi + w)
        } else {
            (lo - w, hi, lo - w, lo)
        };
        for (t, e) in est.iter_mut().enumerate() {
            let d = (simpson(lo, hi, t) + simpson(slo, shi, t) - simpson(qlo, qhi, t)) / 2.0;
            *e += 1.5 * d.abs();
        }
    }
    est
}

/// Limits of the refinement.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// B: stop once Σ_t |r_t| ≤ B.
    pub bound: f64,
    /// At most this many distinct evaluations in all (the run's 1 + 2S plain points included).
    pub max_evaluations: usize,
}

/// How the refinement ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ending {
    /// Σ_t |r_t| ≤ B.
    Met,
    /// The next split would have passed the evaluation cap.
    EvaluationCap,
    /// Every step above the level is at its narrowest panels.
    Narrowest,
}

/// Σ_t |r_t|.
pub fn total_abs_residual(steps: &[StepPanels]) -> f64 {
    steps.iter().map(|s| s.residual().abs()).sum()
}

/// Refine by halving levels (docs/integration-study.md, "Recommended default policy").
/// `evaluations` counts the run's distinct points so far and is advanced by 2 per split;
/// `eval(t, j)` evaluates step t at grid point j (units of 1/n).
pub fn refine(
    steps: &mut [StepPanels],
    limits: Limits,
    evaluations: &mut usize,
    eval: &mut dyn FnMut(usize, u32) -> Result<PointValue>,
) -> Result<Ending> {
    let mut residuals: Vec<f64> = steps.iter().map(|s| s.residual().abs()).collect();
    let total = |r: &[f64]| r.iter().sum::<f64>();
    if total(&residuals) <= limits.bound {
        return Ok(Ending::Met);
    }
    let mut level = residuals.iter().copied().fold(0.0, f64::max);
    loop {
        if total(&residuals) <= limits.bound {
            return Ok(Ending::Met);
        }
        let open: Vec<usize> = (0..steps.len())
            .filter(|&t| !steps[t].capped && residuals[t] > 0.0)
            .collect();
        if open.is_empty() || level <= 0.0 || !level.is_finite() {
            return Ok(Ending::Narrowest);
        }
        level /= 2.0;
        let mut order: Vec<usize> = open.into_iter().filter(|&t| residuals[t] > level).collect();
        order.sort_by(|&a, &b| residuals[b].total_cmp(&residuals[a]).then(a.cmp(&b)));
        for t in order {
            if total(&residuals) <= limits.bound {
                return Ok(Ending::Met);
            }
            while residuals[t] > level {
                let Some(i) = steps[t].worst_splittable() else {
                    steps[t].capped = true;
                    break;
                };
                if *evaluations + 2 > limits.max_evaluations {
                    return Ok(Ending::EvaluationCap);
                }
                let (lo, hi) = steps[t].leaves[i];
                let m = (lo + hi) / 2;
                for j in [(lo + m) / 2, (m + hi) / 2] {
                    let v = eval(t, j)?;
                    steps[t].points.insert(j, v);
                }
                *evaluations += 2;
                steps[t].leaves.splice(i..=i, [(lo, m), (m, hi)]);
                residuals[t] = steps[t].residual().abs();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// L(s) = |s − c|·k + s³ (a kink at c): F = dL/ds.
    fn kinked(c: f64, k: f64) -> impl Fn(f64) -> PointValue {
        move |s| PointValue {
            loss: k * (s - c).abs() + s * s * s,
            f: k * (s - c).signum() + 3.0 * s * s,
        }
    }

    fn plain_of(n: u32, f: &dyn Fn(f64) -> PointValue) -> StepPanels {
        StepPanels::plain(n, f(0.0), f(0.5), f(1.0))
    }

    #[test]
    fn weights_of_plain_and_split_panels() {
        let f = kinked(0.3, 1.0);
        let mut s = plain_of(32, &f);
        assert_eq!(
            s.weights(),
            vec![(0, 1.0 / 6.0), (16, 4.0 / 6.0), (32, 1.0 / 6.0)]
        );
        s.points.insert(8, f(0.25));
        s.points.insert(24, f(0.75));
        s.leaves = vec![(0, 16), (16, 32)];
        let w = s.weights();
        let want = [1.0 / 12.0, 4.0 / 12.0, 2.0 / 12.0, 4.0 / 12.0, 1.0 / 12.0];
        for ((_, a), b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-15);
        }
        assert_eq!(s.splits(), 4);
        assert_eq!(s.evaluations(), 4);
    }

    #[test]
    fn refinement_meets_the_budget_and_splits_at_the_kink() {
        let fs: Vec<Box<dyn Fn(f64) -> PointValue>> = (0..5)
            .map(|t| Box::new(kinked(0.1 + 0.17 * t as f64, 1.0 + t as f64)) as Box<_>)
            .collect();
        let mut steps: Vec<StepPanels> = fs.iter().map(|f| plain_of(128, f.as_ref())).collect();
        let before = total_abs_residual(&steps);
        let bound = before / 10.0;
        let mut evals = 11;
        let ending = refine(
            &mut steps,
            Limits {
                bound,
                max_evaluations: 1000,
            },
            &mut evals,
            &mut |t, j| Ok(fs[t](j as f64 / 128.0)),
        )
        .unwrap();
        assert_eq!(ending, Ending::Met);
        assert!(total_abs_residual(&steps) <= bound);
        assert_eq!(
            evals,
            11 + steps.iter().map(|s| s.evaluations() - 2).sum::<usize>()
        );
        // The narrowest leaf of each refined step contains its kink.
        for (t, s) in steps.iter().enumerate() {
            if s.leaves.len() == 1 {
                continue;
            }
            let c = 0.1 + 0.17 * t as f64;
            let w = s.leaves.iter().map(|(lo, hi)| hi - lo).min().unwrap();
            assert!(
                s.leaves.iter().any(|&(lo, hi)| hi - lo == w
                    && lo as f64 / 128.0 <= c
                    && c <= hi as f64 / 128.0),
                "{t}: {:?}",
                s.leaves
            );
        }
    }

    #[test]
    fn the_cap_and_the_narrowest_panel_stop_refinement() {
        let f = kinked(0.3, 1.0);
        let mut steps = vec![plain_of(32, &f)];
        let mut evals = 3;
        let e = refine(
            &mut steps,
            Limits {
                bound: 0.0,
                max_evaluations: 7,
            },
            &mut evals,
            &mut |_, j| Ok(f(j as f64 / 32.0)),
        )
        .unwrap();
        assert_eq!((e, evals), (Ending::EvaluationCap, 7));
        let mut steps = vec![plain_of(8, &f)];
        let mut evals = 3;
        let e = refine(
            &mut steps,
            Limits {
                bound: 0.0,
                max_evaluations: 1000,
            },
            &mut evals,
            &mut |_, j| Ok(f(j as f64 / 8.0)),
        )
        .unwrap();
        assert_eq!(e, Ending::Narrowest);
        assert!(steps[0].capped);
        assert!(steps[0].leaves.iter().all(|(lo, hi)| hi - lo >= 2));
    }

    #[test]
    fn estimates_of_unsplit_and_split_steps() {
        // Two "tensors": f_0 = s² (Simpson exact), f_1 = |s − 0.3| (a kink).
        let f = |s: f64| vec![s * s, (s - 0.3).abs()];
        let mut p = StepPanels::plain(
            8,
            PointValue { loss: 0.0, f: 0.0 },
            PointValue { loss: 0.0, f: 0.0 },
            PointValue { loss: 0.0, f: 0.0 },
        );
        let mut fk: BTreeMap<u32, Vec<f64>> = [0, 4, 8].map(|j| (j, f(j as f64 / 8.0))).into();
        // d_0 = (2·¼ − 0 − 1)/3 = −1/6; d_1 = (2·0.2 − 0.3 − 0.7)/3 = −0.2; ρ = clamp(r/|Σd|).
        let e = estimate(&p, &fk, 0.1);
        let rho = 0.1 / (1.0 / 6.0 + 0.2);
        assert!((e[0] - 5.0 * rho / 6.0).abs() < 1e-12, "{e:?}");
        assert!((e[1] - 5.0 * rho * 0.2).abs() < 1e-12);
        // Split [0, 8] then [0, 4]: leaves [0,2], [2,4], [4,8].
        for j in [1, 2, 3, 6] {
            fk.insert(j, f(j as f64 / 8.0));
            p.points.insert(j, PointValue { loss: 0.0, f: 0.0 });
        }
        p.leaves = vec![(0, 2), (2, 4), (4, 8)];
        let e = estimate(&p, &fk, 0.0);
        // f_0 is a quadratic: every Simpson difference vanishes.
        assert!(e[0].abs() < 1e-15, "{e:?}");
        assert!(e[1] > 0.0);
    }

    #[test]
    fn nothing_extra_when_plain_simpson_suffices() {
        let f = |s: f64| PointValue {
            loss: s * s,
            f: 2.0 * s,
        };
        let mut steps = vec![plain_of(32, &f), plain_of(32, &f)];
        let mut evals = 5;
        let e = refine(
            &mut steps,
            Limits {
                bound: 1e-12,
                max_evaluations: 20,
            },
            &mut evals,
            &mut |_, _| panic!("no evaluation expected"),
        )
        .unwrap();
        assert_eq!((e, evals), (Ending::Met, 5));
    }
}
