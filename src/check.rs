//! `lca check`: gates for CI on an analysis output. Each check yields PASS or FAIL with the
//! figures it compared; unusable input (a missing or invalid output directory, a layer that
//! does not exist, no check requested) is an error instead.
//!
//! - residual: Σ_t |r_t| / |L_T − L_0| ≤ `max_residual` (the honest whole-run figure: per-step
//!   errors cannot cancel), and max_t |r_t| ≤ `max_step_residual` (loss units);
//! - layer hurts: a named layer's total LCA over the run must not be positive;
//! - baseline: every layer's total LCA is within `atol + rtol·|baseline|` of a stored baseline
//!   output's, and both outputs have the same layers.

use crate::error::{LcaError, Result};
use crate::output::{Summary, json::read_summary};
use std::path::{Path, PathBuf};

/// Default relative tolerance of `--baseline` comparisons.
pub const DEFAULT_RTOL: f64 = 1e-4;

/// Which checks to run.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// Largest allowed Σ|r_t| / |ΔL| (a fraction: 1e-3 = 0.1 %).
    pub max_residual: Option<f64>,
    /// Largest allowed max_t |r_t| (loss units).
    pub max_step_residual: Option<f64>,
    /// Layers whose total LCA must not be positive.
    pub fail_if_layer_hurts: Vec<String>,
    /// Output directory of a baseline run.
    pub baseline: Option<PathBuf>,
    /// Relative tolerance against the baseline (default [`DEFAULT_RTOL`]).
    pub rtol: Option<f64>,
    /// Absolute tolerance against the baseline (default 0).
    pub atol: Option<f64>,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckResult {
    pub passed: bool,
    /// What was checked, e.g. `residual Σ|r|/|ΔL|` or `layer fc3 does not hurt`.
    pub name: String,
    /// The figures compared.
    pub detail: String,
}

/// All checks of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckReport {
    pub results: Vec<CheckResult>,
    /// Remarks that are not checks (e.g. the baseline analysed other data).
    pub notes: Vec<String>,
}

impl CheckReport {
    /// True when every check passed.
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.passed)
    }

    /// One line per check (`PASS name: detail`), the notes, and a closing count.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for r in &self.results {
            s.push_str(&format!(
                "{}  {}: {}\n",
                if r.passed { "PASS" } else { "FAIL" },
                r.name,
                r.detail
            ));
        }
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        let failed = self.results.iter().filter(|r| !r.passed).count();
        s.push_str(&format!(
            "{} passed, {} failed\n",
            self.results.len() - failed,
            failed
        ));
        s
    }
}

fn usage(msg: impl Into<String>) -> LcaError {
    LcaError::Usage(msg.into())
}

fn non_negative(name: &str, v: Option<f64>) -> Result<()> {
    match v {
        Some(x) if !(x >= 0.0 && x.is_finite()) => Err(usage(format!(
            "{name} must be a finite number ≥ 0, got {x}"
        ))),
        _ => Ok(()),
    }
}

fn layer_total(s: &Summary, name: &str) -> Option<f64> {
    s.layers.iter().find(|l| l.name == name).map(|l| l.lca)
}

/// Run the requested checks on the output directory `dir`.
pub fn check(dir: &Path, opts: &CheckOptions) -> Result<CheckReport> {
    non_negative("--max-residual", opts.max_residual)?;
    non_negative("--max-step-residual", opts.max_step_residual)?;
    non_negative("--rtol", opts.rtol)?;
    non_negative("--atol", opts.atol)?;
    if opts.baseline.is_none() && (opts.rtol.is_some() || opts.atol.is_some()) {
        return Err(usage("--rtol and --atol need --baseline OTHER_OUT/"));
    }
    if opts.max_residual.is_none()
        && opts.max_step_residual.is_none()
        && opts.fail_if_layer_hurts.is_empty()
        && opts.baseline.is_none()
    {
        return Err(usage(
            "nothing to check: give --max-residual, --max-step-residual, --fail-if-layer-hurts or --baseline",
        ));
    }
    let s = read_summary(dir)?;
    let run = &s.run;
    let mut results = Vec::new();
    let mut notes = Vec::new();

    if let Some(max) = opts.max_residual {
        let v = run.rel_abs_residual;
        results.push(CheckResult {
            passed: v.is_finite() && v <= max,
            name: "residual Σ|r|/|ΔL|".into(),
            detail: if v.is_finite() {
                format!(
                    "{v:.3e} ({:.4}%) {} {max:.3e} ({:.4}%) [Σ|r| = {:.3e}, ΔL = {:+.6}]",
                    100.0 * v,
                    if v <= max { "≤" } else { ">" },
                    100.0 * max,
                    run.residual_abs_sum,
                    run.delta_loss
                )
            } else {
                format!(
                    "undefined: the run's loss did not change (ΔL = {:+e}); use --max-step-residual",
                    run.delta_loss
                )
            },
        });
    }
    if let Some(max) = opts.max_step_residual {
        let v = run.max_abs_residual;
        let worst = s
            .steps
            .iter()
            .max_by(|a, b| a.residual.abs().total_cmp(&b.residual.abs()))
            .map(|r| format!(" at step {}→{}", r.step, r.next_step))
            .unwrap_or_default();
        results.push(CheckResult {
            passed: v <= max,
            name: "max step residual |r_t|".into(),
            detail: format!(
                "{v:.3e}{worst} {} {max:.3e}",
                if v <= max { "≤" } else { ">" }
            ),
        });
    }
    for name in &opts.fail_if_layer_hurts {
        let Some(v) = layer_total(&s, name) else {
            return Err(usage(format!(
                "--fail-if-layer-hurts {name}: no layer '{name}' in {}; its layers are {}",
                dir.display(),
                s.model.layers.join(", ")
            )));
        };
        results.push(CheckResult {
            passed: v <= 0.0,
            name: format!("layer {name} does not hurt"),
            detail: format!(
                "total LCA {v:+.6e} {} 0 ({})",
                if v <= 0.0 { "≤" } else { ">" },
                if v < 0.0 {
                    "it lowered the loss"
                } else if v > 0.0 {
                    "it raised the loss"
                } else {
                    "no change"
                }
            ),
        });
    }
    if let Some(base_dir) = &opts.baseline {
        let b = read_summary(base_dir)?;
        let rtol = opts.rtol.unwrap_or(DEFAULT_RTOL);
        let atol = opts.atol.unwrap_or(0.0);
        if b.data.sha256 != s.data.sha256 {
            notes.push(format!(
                "the baseline analysed other training data (sha256 {} vs {})",
                short(&b.data.sha256),
                short(&s.data.sha256)
            ));
        }
        if b.spec.sha256 != s.spec.sha256 {
            notes.push("the baseline used another model spec (different sha256)".into());
        }
        let steps = |x: &Summary| {
            (
                x.steps.first().map_or(0, |r| r.step),
                x.steps.last().map_or(0, |r| r.next_step),
                x.steps.len(),
            )
        };
        let (sa, sb) = (steps(&s), steps(&b));
        if sa != sb {
            notes.push(format!(
                "the runs cover different steps: {}→{} ({} steps) vs baseline {}→{} ({} steps)",
                sa.0, sa.1, sa.2, sb.0, sb.1, sb.2
            ));
        }
        for l in &s.layers {
            let name = format!("layer {} matches the baseline", l.name);
            match layer_total(&b, &l.name) {
                None => results.push(CheckResult {
                    passed: false,
                    name,
                    detail: format!(
                        "total LCA {:+.6e}, but the baseline has no layer '{}'",
                        l.lca, l.name
                    ),
                }),
                Some(want) => {
                    let diff = (l.lca - want).abs();
                    let tol = atol + rtol * want.abs();
                    let ok = diff <= tol;
                    results.push(CheckResult {
                        passed: ok,
                        name,
                        detail: format!(
                            "total LCA {:+.6e} vs baseline {want:+.6e}: |diff| {diff:.2e} {} tol {tol:.2e} (atol {atol:e} + rtol {rtol:e}·|baseline|)",
                            l.lca,
                            if ok { "≤" } else { ">" },
                        ),
                    });
                }
            }
        }
        for l in &b.layers {
            if layer_total(&s, &l.name).is_none() {
                results.push(CheckResult {
                    passed: false,
                    name: format!("layer {} matches the baseline", l.name),
                    detail: format!(
                        "the baseline has layer '{}' (total LCA {:+.6e}), this output does not",
                        l.name, l.lca
                    ),
                });
            }
        }
    }
    Ok(CheckReport { results, notes })
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}
