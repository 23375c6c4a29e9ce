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

/// Per evaluated point of a step (grid units), the per-tensor integrand samples
/// f_k(s) = Σ_{i∈k} Δθ_i ∂_i L (the training objective's).
pub type Samples = BTreeMap<u32, Vec<f64>>;

/// `--converge-layers REL`: refine until every layer's run-total error estimate is at most
/// REL · max(|layer LCA|, [`LAYER_FLOOR`] · |L_T − L_0|).
#[derive(Debug, Clone, Copy)]
pub struct LayerGoal<'a> {
    pub rel: f64,
    /// Tensor → layer index (as the tables group them).
    pub layer_of: &'a [usize],
    pub layers: usize,
}

/// The floor of a layer's tolerance, as a fraction of |ΔL|: layers whose LCA is below 1 % of
/// the loss change are held to REL of 1 % of it, not of their own (tiny) size.
pub const LAYER_FLOOR: f64 = 0.01;

/// What the layer refinement found at its end.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerOutcome {
    /// `met` (every layer within its tolerance) or `narrowest` (the layers still above it
    /// have nothing left to split).
    pub ending: Ending,
    /// Evaluations this refinement added.
    pub evaluations: usize,
    /// max over layers of (run-total estimate ÷ tolerance), before and after.
    pub worst_before: f64,
    pub worst_after: f64,
}

/// Per step, per layer: the error estimate (Σ of its tensors' [`estimate`]s) and the LCA
/// (the step's rule on f_k).
fn layer_terms(panels: &StepPanels, fk: &Samples, goal: &LayerGoal) -> (Vec<f64>, Vec<f64>) {
    let est = estimate(panels, fk, panels.residual());
    let mut e = vec![0.0; goal.layers];
    let mut lca = vec![0.0; goal.layers];
    for (k, v) in est.iter().enumerate() {
        e[goal.layer_of[k]] += v;
    }
    for (j, w) in panels.weights() {
        for (k, f) in fk[&j].iter().enumerate() {
            lca[goal.layer_of[k]] += w * f;
        }
    }
    (e, lca)
}

/// The leaf of step `panels` to split for `layer`: the splittable leaf with the largest
/// Σ_{k∈layer} |d_{P,k}| (the split-step estimator's term; an unsplit step's only panel).
fn leaf_for_layer(
    panels: &StepPanels,
    fk: &Samples,
    goal: &LayerGoal,
    layer: usize,
) -> Option<usize> {
    let n = panels.n;
    let simpson = |lo: u32, hi: u32, t: usize| {
        let h = (hi - lo) as f64 / n as f64;
        h / 6.0 * (fk[&lo][t] + 4.0 * fk[&((lo + hi) / 2)][t] + fk[&hi][t])
    };
    if panels.leaves.len() == 1 {
        let (lo, hi) = panels.leaves[0];
        return (hi - lo >= 4).then_some(0);
    }
    let mut best: Option<(usize, f64)> = None;
    for (i, &(lo, hi)) in panels.leaves.iter().enumerate() {
        let w = hi - lo;
        if w < 4 {
            continue;
        }
        let (qlo, qhi, slo, shi) = if lo % (2 * w) == 0 {
            (lo, lo + 2 * w, hi, hi + w)
        } else {
            (lo - w, hi, lo - w, lo)
        };
        let d: f64 = (0..goal.layer_of.len())
            .filter(|&t| goal.layer_of[t] == layer)
            .map(|t| {
                ((simpson(lo, hi, t) + simpson(slo, shi, t) - simpson(qlo, qhi, t)) / 2.0).abs()
            })
            .sum();
        if best.is_none_or(|(_, b)| d > b) {
            best = Some((i, d));
        }
    }
    best.map(|(i, _)| i)
}

/// Pass 3 of the budget policy with `--converge-layers` (docs/integration.md): while some
/// layer's run-total estimate √(Σ_t est_{t,ℓ}²) exceeds its tolerance
/// REL · max(|LCA_ℓ|, [`LAYER_FLOOR`]·|ΔL|), split, in the step contributing most to the layer
/// whose estimate is furthest above its tolerance, the leaf with the largest term for that
/// layer. Bounded by the narrowest panel (`--max-splits`). `eval(t, j)` evaluates step t at
/// grid point j, with its per-tensor samples.
pub fn converge_layers(
    steps: &mut [StepPanels],
    samples: &mut [Samples],
    goal: &LayerGoal,
    evaluations: &mut usize,
    eval: &mut dyn FnMut(usize, u32) -> Result<(PointValue, Vec<f64>)>,
) -> Result<LayerOutcome> {
    let n = steps[0].n;
    let delta = (steps[steps.len() - 1].points[&n].loss - steps[0].points[&0].loss).abs();
    let mut terms: Vec<(Vec<f64>, Vec<f64>)> = steps
        .iter()
        .zip(samples.iter())
        .map(|(p, fk)| layer_terms(p, fk, goal))
        .collect();
    let start = *evaluations;
    let ratios = |terms: &[(Vec<f64>, Vec<f64>)]| -> Vec<f64> {
        (0..goal.layers)
            .map(|l| {
                let est = terms.iter().map(|(e, _)| e[l] * e[l]).sum::<f64>().sqrt();
                let lca: f64 = terms.iter().map(|(_, c)| c[l]).sum();
                let tol = goal.rel * lca.abs().max(LAYER_FLOOR * delta);
                if tol > 0.0 {
                    est / tol
                } else if est > 0.0 {
                    f64::INFINITY
                } else {
                    0.0
                }
            })
            .collect()
    };
    let worst = |r: &[f64]| r.iter().copied().fold(0.0, f64::max);
    let worst_before = worst(&ratios(&terms));
    let mut exhausted = vec![false; goal.layers];
    loop {
        let r = ratios(&terms);
        let pick = (0..goal.layers)
            .filter(|&l| r[l] > 1.0 && !exhausted[l])
            .max_by(|&a, &b| r[a].total_cmp(&r[b]).then(b.cmp(&a)));
        let Some(l) = pick else {
            let ending = if r.iter().all(|&x| x <= 1.0) {
                Ending::Met
            } else {
                Ending::Narrowest
            };
            return Ok(LayerOutcome {
                ending,
                evaluations: *evaluations - start,
                worst_before,
                worst_after: worst(&r),
            });
        };
        // The steps by their share of this layer's estimate, largest first.
        let mut order: Vec<usize> = (0..steps.len()).filter(|&t| terms[t].0[l] > 0.0).collect();
        order.sort_by(|&a, &b| terms[b].0[l].total_cmp(&terms[a].0[l]).then(a.cmp(&b)));
        let target = order
            .into_iter()
            .find_map(|t| leaf_for_layer(&steps[t], &samples[t], goal, l).map(|i| (t, i)));
        let Some((t, i)) = target else {
            exhausted[l] = true;
            continue;
        };
        let (lo, hi) = steps[t].leaves[i];
        let m = (lo + hi) / 2;
        for j in [(lo + m) / 2, (m + hi) / 2] {
            let (v, fk) = eval(t, j)?;
            steps[t].points.insert(j, v);
            samples[t].insert(j, fk);
        }
        *evaluations += 2;
        steps[t].leaves.splice(i..=i, [(lo, m), (m, hi)]);
        terms[t] = layer_terms(&steps[t], &samples[t], goal);
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

    /// Two layers on five kinked steps: refinement until each layer's run-total estimate is
    /// within REL of its LCA shrinks the estimates and the actual errors.
    #[test]
    fn layers_converge_and_their_errors_shrink() {
        // Tensor 0 (layer 0): f = k·sign(s − c) (a kink); tensor 1 (layer 1): f = s² + s.
        let f = |t: usize, s: f64| {
            let c = 0.13 + 0.17 * t as f64;
            let k = 1.0 + t as f64;
            vec![k * (s - c).signum(), s * s + s]
        };
        let exact = |t: usize| {
            let c = 0.13 + 0.17 * t as f64;
            let k = 1.0 + t as f64;
            [k * ((1.0 - c) - c), 1.0 / 3.0 + 0.5]
        };
        let n = 256u32;
        let pv = |t: usize, s: f64| {
            let v = f(t, s);
            let c = 0.13 + 0.17 * t as f64;
            let k = 1.0 + t as f64;
            PointValue {
                loss: -(t as f64) * 10.0 + k * (s - c).abs() + s * s * s / 3.0 + s * s / 2.0,
                f: v.iter().sum(),
            }
        };
        let mut steps: Vec<StepPanels> = (0..5)
            .map(|t| StepPanels::plain(n, pv(t, 0.0), pv(t, 0.5), pv(t, 1.0)))
            .collect();
        let mut samples: Vec<Samples> = (0..5)
            .map(|t| [0, n / 2, n].map(|j| (j, f(t, j as f64 / n as f64))).into())
            .collect();
        let layer_of = [0usize, 1];
        let goal = LayerGoal {
            rel: 1e-3,
            layer_of: &layer_of,
            layers: 2,
        };
        let error = |steps: &[StepPanels], samples: &[Samples]| {
            let mut e = [0.0f64; 2];
            for t in 0..5 {
                let (_, lca) = layer_terms(&steps[t], &samples[t], &goal);
                for l in 0..2 {
                    e[l] += lca[l] - exact(t)[l];
                }
            }
            e
        };
        let before = error(&steps, &samples);
        let mut evals = 11;
        let out = converge_layers(&mut steps, &mut samples, &goal, &mut evals, &mut |t, j| {
            let s = j as f64 / n as f64;
            Ok((pv(t, s), f(t, s)))
        })
        .unwrap();
        let after = error(&steps, &samples);
        assert!(out.worst_before > 1.0, "{out:?}");
        assert!(out.worst_after < out.worst_before / 10.0, "{out:?}");
        assert_eq!(out.evaluations, evals - 11);
        assert!(
            after[0].abs() < before[0].abs() / 10.0,
            "{before:?} {after:?}"
        );
        // The smooth layer needs nothing: Simpson is exact on it.
        assert!(before[1].abs() < 1e-12 && after[1].abs() < 1e-12);
        // With the narrowest panel the kinks cannot be resolved to 1e-3: it stops there.
        assert!(matches!(out.ending, Ending::Met | Ending::Narrowest));
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
