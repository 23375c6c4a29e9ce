//! The comparisons with the PyTorch float64 oracles (`fixtures/<name>/golden`, see
//! fixtures/README.md), shared by every oracle test:
//!
//! - [`Golden`] loads a fixture's golden files (`oracle.json`, `grads.safetensors`);
//! - [`rel_err`] / [`Tol`] is the one tolerance rule: a value agrees with the oracle's when
//!   |got − want| ≤ rtol · max(|want|, floor). Each test states its `rtol` and `floor` (an f32
//!   evaluation is held to less than an f64 one; a floor keeps a value that cancels to near
//!   zero from being measured against its own arbitrarily small size);
//! - [`Problem`] loads a fixture through the library as `analyze` does, and
//!   [`Problem::gradients_at_stored_points`] compares the full-set loss and gradient at the
//!   oracle's stored points θ_t + s·Δθ_t (s = 0, ½, 1) with the golden values;
//! - the analyses themselves run through `util::analyze_run` (the one way to run `analyze`).

use crate::util::*;
use lca::checkpoint::{self, CheckpointFile};
use lca::data::Dataset;
use lca::eval::Evaluator;
use lca::net::{LossKind, Model, Real};
use lca::spec::{LossSpec, Spec};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// The one tolerance rule: the relative error of `got` against `want`, measured against
/// max(|want|, floor). An exact match is 0 (also when `want` and `floor` are both 0).
pub fn rel_err(got: f64, want: f64, floor: f64) -> f64 {
    let d = (got - want).abs();
    if d == 0.0 {
        0.0
    } else {
        d / want.abs().max(floor)
    }
}

/// A tolerance under the one rule: `rel_err(got, want, floor) ≤ rtol`, where `floor` is
/// given as a fraction of a scale that the comparison names (for gradients: the tensor's
/// largest oracle entry).
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub rtol: f64,
    /// The floor as a fraction of the comparison's scale.
    pub floor: f64,
}

impl Tol {
    /// Whether `got` agrees with `want` when the comparison's scale is `scale`; returns the
    /// relative error too.
    pub fn check(&self, got: f64, want: f64, scale: f64) -> (bool, f64) {
        let e = rel_err(got, want, self.floor * scale);
        (e <= self.rtol, e)
    }
}

/// How closely one precision's evaluation must match the golden points.
#[derive(Clone, Copy, Debug)]
pub struct GradTol {
    /// |loss − oracle loss| < `loss`.
    pub loss: f64,
    /// Every gradient entry, the floor a fraction of the tensor's largest oracle entry.
    pub grad: Tol,
    /// Points (step, s tag) that are held to another gradient tolerance (documented where
    /// the test declares it).
    pub except: &'static [(u64, &'static str, Tol)],
}

impl GradTol {
    fn at(&self, step: u64, tag: &str) -> Tol {
        self.except
            .iter()
            .find(|(t, s, _)| *t == step && *s == tag)
            .map_or(self.grad, |e| e.2)
    }
}

/// A fixture's golden files: `oracle.json` and the f64 tensors of `grads.safetensors`.
pub struct Golden {
    pub oracle: Value,
    grads: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Golden {
    /// The golden files in `dir` (e.g. `fixture("mlp/golden")`).
    pub fn load(dir: &Path) -> Golden {
        Golden {
            oracle: json(&dir.join("oracle.json")),
            grads: read_f64(&dir.join("grads.safetensors")),
        }
    }

    /// The steps whose points have stored gradients.
    pub fn grad_steps(&self) -> Vec<u64> {
        self.oracle["grad_steps"]
            .as_array()
            .expect("grad_steps")
            .iter()
            .map(|s| s.as_u64().expect("step"))
            .collect()
    }

    /// Shape and values of the stored tensor `step{step}/s{tag}/{name}`.
    pub fn grad(&self, step: u64, tag: &str, name: &str) -> &(Vec<usize>, Vec<f64>) {
        let key = format!("step{step}/s{tag}/{name}");
        self.grads
            .get(&key)
            .unwrap_or_else(|| panic!("no golden tensor {key}"))
    }
}

/// Per-step, per-tensor comparison against an oracle with relative tolerance `rtol`.
///
/// A per-tensor value is compared relative to its own magnitude, except that magnitudes below
/// 1 % of the step's total allocation (Σ over tensors of |oracle LCA|) are measured relative
/// to that 1 %: an f32 evaluator cannot resolve cancellations finer than that, and such a
/// tensor carries under 1 % of the step's allocation. Returns the worst relative error.
pub fn compare_step_tensor_lca(
    ours: &std::collections::HashMap<(u64, String), f64>,
    oracle: &Value,
    steps: &[u64],
    rtol: f64,
) -> f64 {
    compare_step_tensor_lca_with(ours, oracle, steps, rtol, &[])
}

/// As [`compare_step_tensor_lca`], but a difference no larger than `slack[t]` (the oracle's
/// own integration error |r_t| at that step) also passes: the two evaluations then agree
/// within what the quadrature can resolve. Used for f32 runs whose integration points sit on
/// a ReLU kink, where f32 and f64 arithmetic legitimately pick different sides.
pub fn compare_step_tensor_lca_with(
    ours: &std::collections::HashMap<(u64, String), f64>,
    oracle: &Value,
    steps: &[u64],
    rtol: f64,
    slack: &[f64],
) -> f64 {
    let lca = oracle["lca"].as_object().expect("lca object");
    let mut worst = 0.0f64;
    for (t, &step) in steps.iter().enumerate().take(steps.len() - 1) {
        let scale: f64 = lca.values().map(|v| v[t].as_f64().unwrap().abs()).sum();
        for (name, vals) in lca {
            let want = vals[t].as_f64().unwrap();
            let got = *ours
                .get(&(step, name.clone()))
                .unwrap_or_else(|| panic!("no row for step {step} tensor {name}"));
            let rel = rel_err(got, want, 0.01 * scale);
            let within_slack = slack.get(t).is_some_and(|s| (got - want).abs() <= s.abs());
            assert!(
                rel <= rtol || within_slack,
                "step {step} tensor {name}: lca {got} vs oracle {want} (relative error {rel:.2e} > {rtol:e})"
            );
            if !within_slack {
                worst = worst.max(rel);
            }
        }
    }
    worst
}

/// The f64 tensors of a safetensors file, by name, with their shapes (every golden tensor is
/// f64).
pub fn read_f64(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    f64_tensors(path, false)
}

/// As [`read_f64`], leaving out the tensors of other dtypes (the int64 `steps` of
/// `golden/converged.safetensors`).
pub fn read_f64_only(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    f64_tensors(path, true)
}

fn f64_tensors(path: &Path, skip_others: bool) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .filter(|(_, t)| !skip_others || t.dtype() == safetensors::Dtype::F64)
        .map(|(name, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F64, "{name}");
            let v = t
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, (t.shape().to_vec(), v))
        })
        .collect()
}

/// A fixture loaded through the library as `analyze` loads it: spec, training set,
/// checkpoints.
pub struct Problem {
    pub spec: Spec,
    pub data: Dataset,
    pub files: Vec<CheckpointFile>,
}

/// What [`Problem::gradients_at_stored_points`] compared.
#[derive(Debug, Default)]
pub struct GradReport {
    /// Largest |loss − oracle loss|.
    pub worst_loss: f64,
    /// Largest relative error of a gradient entry under the rule (exceptions included).
    pub worst: f64,
    /// Gradient entries compared.
    pub entries: usize,
    /// Tensors compared (one per parameter and point).
    pub tensors: usize,
}

impl Problem {
    /// `spec` with its training set, and the checkpoints in `ckpts`.
    pub fn load(spec: &Path, ckpts: &Path) -> Problem {
        let spec = Spec::load(spec).unwrap();
        let loss = match spec.loss {
            LossSpec::CrossEntropy {} => LossKind::CrossEntropy,
            LossSpec::Mse {} => LossKind::Mse,
        };
        let data = Dataset::load(
            &spec.train_path(),
            &spec.data,
            spec.model.input_shape.as_deref(),
            loss,
        )
        .unwrap();
        let files = checkpoint::scan(ckpts).unwrap();
        Problem { spec, data, files }
    }

    /// The model in precision `R`.
    pub fn model<R: Real>(&self) -> Model<R> {
        Model::<R>::build(&self.spec, self.data.sample_shape()).unwrap()
    }

    /// The full-set loss and gradient, evaluated in the precision of `model`, at every stored
    /// point θ_t + s·Δθ_t (s = 0, ½, 1 of each step of `golden.grad_steps()`; the point is
    /// formed in f64 and rounded to the precision as `analyze` does), against the golden
    /// values: the loss to `tol.loss` absolute, every gradient entry under the one rule with
    /// its floor a fraction of the tensor's largest oracle entry. `label` names the run in
    /// failure messages.
    pub fn gradients_at_stored_points<R: Real>(
        &self,
        model: &Model<R>,
        golden: &Golden,
        tol: GradTol,
        label: &str,
    ) -> GradReport {
        let eval = Evaluator {
            model,
            data: &self.data,
            chunk_size: self.spec.eval.chunk_size,
        };
        let mut report = GradReport::default();
        for step in golden.grad_steps() {
            let a = self
                .files
                .iter()
                .position(|f| f.step == step)
                .unwrap_or_else(|| panic!("{label}: no checkpoint of step {step}"));
            let t0 = checkpoint::load(&self.files[a], &model.params)
                .unwrap()
                .theta;
            let t1 = checkpoint::load(&self.files[a + 1], &model.params)
                .unwrap()
                .theta;
            let d = lca::lca::difference(&t0, &t1);
            for (s, tag) in [(0.0, "0"), (0.5, "0.5"), (1.0, "1")] {
                let r = eval
                    .loss_and_grad(&lca::lca::point::<R>(&t0, &d, s))
                    .unwrap();
                let want_loss = golden.grad(step, tag, "loss").1[0];
                let e = (r.loss - want_loss).abs();
                assert!(
                    e < tol.loss,
                    "{label} step {step} s={tag}: loss {} vs oracle {want_loss}",
                    r.loss
                );
                report.worst_loss = report.worst_loss.max(e);
                let rule = tol.at(step, tag);
                for (p, got) in model.params.iter().zip(&r.grads) {
                    let (shape, want) = golden.grad(step, tag, &p.name);
                    assert_eq!(shape, &p.shape, "{label}: shape of {}", p.name);
                    assert_eq!(got.len(), want.len(), "{label}: size of {}", p.name);
                    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
                        let (ok, e) = rule.check(g, w, scale);
                        assert!(
                            ok,
                            "{label} {}[{k}] at step {step} s={tag}: gradient {g} vs oracle {w} \
                             (relative error {e:.2e} > {:e})",
                            p.name, rule.rtol
                        );
                        report.worst = report.worst.max(e);
                    }
                    report.entries += want.len();
                    report.tensors += 1;
                }
            }
        }
        report
    }
}
