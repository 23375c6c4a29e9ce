//! The pure tallies of a run: per-step groups, run totals per tensor and per layer, the
//! residual report and the L2 term. No I/O; `analyze` and `merge` both build on them.

use crate::output::{
    GroupStep, GroupTotal, ParamRef, ParamTotals, ResidualReport, StepOutput, StepRecord,
};

/// Parameters helped (LCA < 0), untouched (= 0) and hurt (> 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub helped: u64,
    pub zero: u64,
    pub hurt: u64,
}

impl Counts {
    fn of(v: &[f64]) -> Counts {
        let mut c = Counts::default();
        for &x in v {
            c.add(x);
        }
        c
    }

    fn add(&mut self, x: f64) {
        if x < 0.0 {
            self.helped += 1;
        } else if x > 0.0 {
            self.hurt += 1;
        } else {
            self.zero += 1;
        }
    }

    fn merge(&mut self, o: Counts) {
        self.helped += o.helped;
        self.zero += o.zero;
        self.hurt += o.hurt;
    }
}

/// `a / n`, 0 when `n` is 0.
pub(crate) fn fraction(a: u64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { a as f64 / n as f64 }
}

/// Where each parameter tensor is reported: the layers with parameters, in order (buffers,
/// if any, last as one group), each tensor's layer index, and the tensors' summary entries.
#[derive(Debug, Clone)]
pub struct Layout {
    pub params: Vec<ParamRef>,
    pub layers: Vec<String>,
    pub layer_of: Vec<usize>,
}

impl Layout {
    /// The layout of the model's parameter tensors.
    pub fn of_model<T: crate::net::Real>(model: &crate::net::Model<T>) -> Layout {
        let mut layers: Vec<String> = Vec::new();
        for prm in model.params.iter().filter(|p| !p.buffer) {
            if !layers.contains(&prm.layer) {
                layers.push(prm.layer.clone());
            }
        }
        if model.params.iter().any(|p| p.buffer) {
            layers.push("buffers".into());
        }
        let params: Vec<ParamRef> = model
            .params
            .iter()
            .map(|q| ParamRef {
                name: q.name.clone(),
                layer: q.group().to_string(),
                buffer: q.buffer,
                role: q.role.clone(),
                shape: q.shape.clone(),
                numel: q.numel(),
                aliases: q.aliases.clone(),
            })
            .collect();
        Layout::new(params, layers)
    }

    /// The layout recorded in a summary (`model.params`, `model.layers`).
    pub fn new(params: Vec<ParamRef>, layers: Vec<String>) -> Layout {
        let layer_of = params
            .iter()
            .map(|q| layers.iter().position(|l| *l == q.layer).unwrap_or(0))
            .collect();
        Layout {
            params,
            layers,
            layer_of,
        }
    }

    /// (name, shape) per tensor, model order.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.params
            .iter()
            .map(|q| (q.name.clone(), q.shape.clone()))
            .collect()
    }

    /// Zeroed run totals for these tensors.
    pub fn zero_totals(&self, val: bool, l2: bool, err: bool) -> ParamTotals {
        let zeros =
            || -> Vec<Vec<f64>> { self.params.iter().map(|q| vec![0.0; q.numel]).collect() };
        ParamTotals {
            lca: zeros(),
            helped_steps: self.params.iter().map(|q| vec![0; q.numel]).collect(),
            hurt_steps: self.params.iter().map(|q| vec![0; q.numel]).collect(),
            val_lca: val.then(zeros),
            l2_lca: l2.then(zeros),
            err_sq: err.then(|| crate::output::ErrSquares {
                tensors: vec![0.0; self.params.len()],
                layers: vec![0.0; self.layers.len()],
            }),
        }
    }
}

/// One step's per-parameter values of the three objectives.
#[derive(Clone, Copy)]
pub struct StepValues<'a> {
    pub lca: &'a [Vec<f64>],
    pub val: Option<&'a [Vec<f64>]>,
    pub l2: Option<&'a [Vec<f64>]>,
    /// Error estimate of each tensor's LCA on this step.
    pub err: Option<&'a [f64]>,
}

/// One step's figures per tensor and per layer, and the trained parameters' counts.
pub struct StepGroups {
    pub tensors: Vec<GroupStep>,
    pub layers: Vec<GroupStep>,
    /// Over trained parameters only (buffers excluded).
    pub counts: Counts,
}

impl StepGroups {
    /// One finished step as the exporters see it.
    pub fn output<'a>(&'a self, record: &'a StepRecord, v: StepValues<'a>) -> StepOutput<'a> {
        StepOutput {
            record,
            tensors: &self.tensors,
            layers: &self.layers,
            lca: v.lca,
            val_lca: v.val,
            l2_lca: v.l2,
        }
    }
}

/// Per-step figures of a tensor or layer, before they go to the exporters.
pub(crate) fn step_groups(layout: &Layout, v: StepValues) -> StepGroups {
    let params = &layout.params;
    let mut tensors = Vec::with_capacity(params.len());
    let mut layer_steps: Vec<GroupStep> = layout
        .layers
        .iter()
        .map(|l| GroupStep {
            name: l.clone(),
            layer: l.clone(),
            lca: 0.0,
            helped: 0,
            zero: 0,
            hurt: 0,
            val_lca: v.val.map(|_| 0.0),
            l2_lca: v.l2.map(|_| 0.0),
            lca_err: v.err.map(|_| 0.0),
        })
        .collect();
    let mut counts = Counts::default();
    for (pi, x) in v.lca.iter().enumerate() {
        let c = Counts::of(x);
        let sum: f64 = x.iter().sum();
        let vsum = v.val.map(|x| x[pi].iter().sum::<f64>());
        let lsum = v.l2.map(|x| x[pi].iter().sum::<f64>());
        if !params[pi].buffer {
            // Helped/zero/hurt fractions are over trained parameters only.
            counts.merge(c);
        }
        let ls = &mut layer_steps[layout.layer_of[pi]];
        ls.lca += sum;
        ls.helped += c.helped;
        ls.zero += c.zero;
        ls.hurt += c.hurt;
        if let (Some(a), Some(b)) = (ls.val_lca.as_mut(), vsum) {
            *a += b;
        }
        if let (Some(a), Some(b)) = (ls.l2_lca.as_mut(), lsum) {
            *a += b;
        }
        let err = v.err.map(|e| e[pi]);
        if let (Some(a), Some(b)) = (ls.lca_err.as_mut(), err) {
            *a += b;
        }
        tensors.push(GroupStep {
            name: params[pi].name.clone(),
            layer: params[pi].layer.clone(),
            lca: sum,
            helped: c.helped,
            zero: c.zero,
            hurt: c.hurt,
            val_lca: vsum,
            l2_lca: lsum,
            lca_err: err,
        });
    }
    StepGroups {
        tensors,
        layers: layer_steps,
        counts,
    }
}

fn add_to(acc: &mut [Vec<f64>], v: &[Vec<f64>]) {
    for (a, b) in acc.iter_mut().zip(v) {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    }
}

/// Add one step's per-parameter values (and its groups' error estimates) to the run's totals.
pub(crate) fn accumulate(totals: &mut ParamTotals, v: StepValues, groups: &StepGroups) {
    if let Some(sq) = totals.err_sq.as_mut() {
        for (a, g) in sq.tensors.iter_mut().zip(&groups.tensors) {
            *a += g.lca_err.unwrap_or(0.0).powi(2);
        }
        for (a, g) in sq.layers.iter_mut().zip(&groups.layers) {
            *a += g.lca_err.unwrap_or(0.0).powi(2);
        }
    }
    for (pi, x) in v.lca.iter().enumerate() {
        for (k, &x) in x.iter().enumerate() {
            totals.lca[pi][k] += x;
            if x < 0.0 {
                totals.helped_steps[pi][k] += 1;
            } else if x > 0.0 {
                totals.hurt_steps[pi][k] += 1;
            }
        }
    }
    if let (Some(acc), Some(x)) = (totals.val_lca.as_mut(), v.val) {
        add_to(acc, x);
    }
    if let (Some(acc), Some(x)) = (totals.l2_lca.as_mut(), v.l2) {
        add_to(acc, x);
    }
}

/// Run totals per tensor and per layer.
pub struct GroupTotals {
    pub tensors: Vec<GroupTotal>,
    pub layers: Vec<GroupTotal>,
}

/// Run totals per tensor and per layer from the per-parameter totals.
pub(crate) fn group_totals(layout: &Layout, totals: &ParamTotals) -> GroupTotals {
    let params = &layout.params;
    let group_total = |name: &str, layer: &str, ids: &[usize]| {
        let (mut n, mut lca, mut c) = (0usize, 0.0, Counts::default());
        for &pi in ids {
            for &v in &totals.lca[pi] {
                n += 1;
                lca += v;
                c.add(v);
            }
        }
        let sum_of = |t: &Option<Vec<Vec<f64>>>| {
            t.as_ref()
                .map(|t| ids.iter().map(|&pi| t[pi].iter().sum::<f64>()).sum())
        };
        GroupTotal {
            name: name.to_string(),
            layer: layer.to_string(),
            params: n,
            lca,
            helped: c.helped,
            zero: c.zero,
            hurt: c.hurt,
            helped_fraction: fraction(c.helped, n as u64),
            val_lca: sum_of(&totals.val_lca),
            l2_lca: sum_of(&totals.l2_lca),
            lca_err: None,
        }
    };
    let sq = totals.err_sq.as_ref();
    let tensors = params
        .iter()
        .enumerate()
        .map(|(pi, q)| GroupTotal {
            lca_err: sq.map(|s| s.tensors[pi].sqrt()),
            ..group_total(&q.name, &q.layer, &[pi])
        })
        .collect();
    let layers = layout
        .layers
        .iter()
        .enumerate()
        .map(|(li, l)| {
            let ids: Vec<usize> = (0..params.len())
                .filter(|&pi| params[pi].layer == *l)
                .collect();
            GroupTotal {
                lca_err: sq.map(|s| s.layers[li].sqrt()),
                ..group_total(l, l, &ids)
            }
        })
        .collect();
    GroupTotals { tensors, layers }
}

/// One step's row of the residual report of an objective.
#[derive(Debug, Clone, Copy)]
pub struct ResidualRow {
    pub loss_after: f64,
    pub lca_sum: f64,
    pub residual: f64,
}

/// How well the allocated LCA adds up to the loss change over the run.
pub(crate) fn residual_report(first: f64, rows: &[ResidualRow]) -> ResidualReport {
    let last = rows.last().map_or(first, |r| r.loss_after);
    let delta = last - first;
    let rs: f64 = rows.iter().map(|r| r.residual).sum();
    let ra: f64 = rows.iter().map(|r| r.residual.abs()).sum();
    let rel = |x: f64| {
        if delta != 0.0 {
            x / delta.abs()
        } else {
            f64::NAN
        }
    };
    ResidualReport {
        loss_first: first,
        loss_last: last,
        delta_loss: delta,
        lca_sum: rows.iter().map(|r| r.lca_sum).sum(),
        residual_sum: rs,
        residual_abs_sum: ra,
        max_abs_residual: rows.iter().map(|r| r.residual.abs()).fold(0.0, f64::max),
        rel_residual: rel(rs.abs()),
        rel_abs_residual: rel(ra),
    }
}

/// The warning about steps whose residual stayed above the bound at the split cap.
pub(crate) fn capped_warning(capped_steps: &[u64], max_splits: usize) -> Option<String> {
    (!capped_steps.is_empty()).then(|| {
        format!(
            "{} step(s) kept a residual above the bound at {} splits: {}",
            capped_steps.len(),
            max_splits,
            crate::output::step_list(capped_steps)
        )
    })
}

/// λ(θ₁² − θ₀²) per parameter: the exact LCA of λ‖θ‖² over a step (Simpson integrates the
/// linear gradient 2λθ exactly, so this closed form is what any rule would give).
pub fn l2_step(
    lambda: f64,
    theta0: &[Vec<f32>],
    theta1: &[Vec<f32>],
    mask: &[bool],
) -> Vec<Vec<f64>> {
    theta0
        .iter()
        .zip(theta1)
        .zip(mask)
        .map(|((a, b), &on)| {
            a.iter()
                .zip(b)
                .map(|(&a, &b)| {
                    if on {
                        let (a, b) = (a as f64, b as f64);
                        lambda * (b * b - a * a)
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

/// λ‖θ‖² over the masked tensors.
pub(crate) fn l2_penalty(lambda: f64, theta: &[Vec<f32>], mask: &[bool]) -> f64 {
    theta
        .iter()
        .zip(mask)
        .filter(|(_, on)| **on)
        .map(|(t, _)| t.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .sum::<f64>()
        * lambda
}
