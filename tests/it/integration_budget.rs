//! The default integration policy (the run-level error budget, issue 20) on the fixtures:
//! Σ|r|/|ΔL| ≤ 0.01 % at ≤ 4× plain Simpson's evaluations, and the error estimates against the
//! converged float64 references (`golden/converged.*`: composite Simpson with 32 sub-intervals).

use crate::util::*;
use std::collections::HashMap;

/// What one fixture's default run gave; printed as the table of docs/integration.md.
struct Validation {
    evaluations: u64,
    plain: u64,
    rel_abs_residual: f64,
    /// Per (step, tensor), entries whose actual error the reference resolves: bounded / all.
    entries_bounded: usize,
    /// ... of which the estimate is also within 10× (actual ≤ est ≤ 10·actual).
    entries_within10: usize,
    entries: usize,
    /// Per layer run total (resolvable ones): bounded / all, and the largest est/actual.
    layers_bounded: usize,
    layers_within10: usize,
    layers: usize,
    /// The layer with the largest run-total error against the reference: error ÷ |ΔL|, and
    /// its estimate ÷ its error.
    max_layer_err: f64,
    max_layer_ratio: f64,
}

fn validate(name: &str) -> Validation {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    analyze(name, &out, &["--quiet", "--no-lca-tensors"]);
    let s = json(&out.join("summary.json"));
    assert_eq!(s["integration"]["policy"], "budget", "{name}");
    let nsteps = s["run"]["steps"].as_u64().unwrap();
    let plain = 1 + 2 * nsteps;
    let evaluations = s["run"]["evaluations"].as_u64().unwrap();
    let rel_abs_residual = s["run"]["rel_abs_residual"].as_f64().unwrap();
    let delta = s["run"]["delta_loss"].as_f64().unwrap().abs();

    let golden = fixture(&format!("{name}/golden"));
    let conv = json(&golden.join("converged.json"));
    let st = crate::oracle::read_f64_only(&golden.join("converged.safetensors"));
    let ref_steps: Vec<u64> = conv["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    // (step index, tensor) → (lca, est, layer)
    let rows = csv_rows(&out.join("tensors.csv"));
    let mut ours: HashMap<(usize, String), (f64, f64, String)> = HashMap::new();
    let step_ids: Vec<u64> = s["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["step"].as_u64().unwrap())
        .collect();
    for r in rows {
        let step: u64 = r["step"].parse().unwrap();
        let t = step_ids.iter().position(|&x| x == step).unwrap();
        ours.insert(
            (t, r["tensor"].clone()),
            (
                r["lca"].parse().unwrap(),
                r["lca_err"].parse().unwrap(),
                r["layer"].clone(),
            ),
        );
    }
    let (mut entries, mut entries_bounded, mut entries_within10) = (0, 0, 0);
    // layer → (Σ actual signed error, Σ reference uncertainty)
    let mut layer_err: HashMap<String, (f64, f64)> = HashMap::new();
    for name_v in conv["names"].as_array().unwrap() {
        let tname = name_v.as_str().unwrap();
        let Some((_, r32)) = st.get(&format!("lca32/{tname}")) else {
            continue;
        };
        let (_, r16) = &st[&format!("lca16/{tname}")];
        for (i, &step) in ref_steps.iter().enumerate() {
            let t = step as usize;
            let Some((lca, est, layer)) = ours.get(&(t, tname.to_string())) else {
                panic!("{name}: no row for step {t} tensor {tname}");
            };
            let actual = lca - r32[i];
            let u = (r32[i] - r16[i]).abs();
            let e = layer_err.entry(layer.clone()).or_default();
            e.0 += actual;
            e.1 += u;
            if actual.abs() > u {
                entries += 1;
                if *est >= actual.abs() {
                    entries_bounded += 1;
                    if *est <= 10.0 * actual.abs() {
                        entries_within10 += 1;
                    }
                }
            }
        }
    }
    let (mut layers, mut layers_bounded, mut layers_within10) = (0, 0, 0);
    let (mut max_layer_err, mut max_layer_ratio) = (0.0, f64::NAN);
    for l in s["layers"].as_array().unwrap() {
        let lname = l["name"].as_str().unwrap();
        let Some(&(err, u)) = layer_err.get(lname) else {
            continue;
        };
        let est = l["lca_err"].as_f64().unwrap();
        if err.abs() / delta > max_layer_err {
            max_layer_err = err.abs() / delta;
            max_layer_ratio = est / err.abs();
        }
        if err.abs() > u {
            layers += 1;
            if est >= err.abs() {
                layers_bounded += 1;
                if est <= 10.0 * err.abs() {
                    layers_within10 += 1;
                }
            }
        }
    }
    Validation {
        evaluations,
        plain,
        rel_abs_residual,
        entries_bounded,
        entries_within10,
        entries,
        layers_bounded,
        layers_within10,
        layers,
        max_layer_err,
        max_layer_ratio,
    }
}

fn check(name: &str) {
    let v = validate(name);
    eprintln!(
        "| {name} | {} ({:.2}× plain {}) | {:.4} % | {:.1e} | {:.1} | {}/{} | {}/{} | {}/{} | {}/{} |",
        v.evaluations,
        v.evaluations as f64 / v.plain as f64,
        v.plain,
        100.0 * v.rel_abs_residual,
        v.max_layer_err,
        v.max_layer_ratio,
        v.entries_bounded,
        v.entries,
        v.entries_within10,
        v.entries,
        v.layers_bounded,
        v.layers,
        v.layers_within10,
        v.layers,
    );
    // The policy's promise.
    assert!(v.rel_abs_residual <= 1e-4, "{name}: {}", v.rel_abs_residual);
    assert!(v.evaluations <= 4 * v.plain, "{name}: {}", v.evaluations);
    // The estimate: every resolvable layer run total is bounded (the study: 100 %), and at
    // least 85 % of the resolvable (step, tensor) entries (the study, f64: 90–100 %; f32
    // rounding adds a little to the actual errors here).
    assert_eq!(v.layers_bounded, v.layers, "{name}: layer run totals");
    assert!(
        v.entries_bounded as f64 >= 0.85 * v.entries as f64,
        "{name}: {}/{} entries bounded",
        v.entries_bounded,
        v.entries
    );
}

#[test]
fn budget_default_on_mlp() {
    check("mlp");
}

#[test]
fn budget_default_on_mlp_tanh_adam() {
    check("mlp_tanh_adam");
}

#[test]
fn budget_default_on_cnn() {
    check("cnn");
}

#[test]
fn budget_default_on_cnn_strided() {
    check("cnn_strided");
}

#[test]
fn budget_default_on_deep40() {
    check("deep40");
}

#[test]
fn large_residual_warns_and_check_fails_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trap");
    // The trapezoid rule: Σ|r|/|ΔL| ≈ 0.5 % on this run.
    let o = analyze("mlp", &out, &["--no-lca-tensors", "--method", "trapezoid"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("exceeds 0.1 %"), "{err}");
    assert!(err.contains("--policy budget"), "{err}");
    let s = json(&out.join("summary.json"));
    assert!(
        s["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("exceeds 0.1 %"))
    );
    // Any check also runs the default residual gate, and fails on it.
    let c = lca()
        .args(["check"])
        .arg(&out)
        .args(["--fail-if-layer-hurts", "fc1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&c.stdout);
    assert!(!c.status.success(), "{text}");
    assert!(text.contains("default gate"), "{text}");
    // An explicit bound replaces it.
    let c = lca()
        .args(["check"])
        .arg(&out)
        .args(["--max-residual", "0.1"])
        .output()
        .unwrap();
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));
    // No error estimates with the trapezoid rule: the layer-error gate says so.
    let c = lca()
        .args(["check"])
        .arg(&out)
        .args(["--max-layer-error", "0.1"])
        .output()
        .unwrap();
    assert!(!c.status.success());
    assert!(String::from_utf8_lossy(&c.stderr).contains("no error estimates"));
}

#[test]
fn layer_error_gate_and_tolerance_policy_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("budget");
    analyze("mlp_tanh_adam", &out, &["--quiet", "--no-lca-tensors"]);
    let check = |v: &str| {
        lca()
            .args(["check"])
            .arg(&out)
            .args(["--max-layer-error", v])
            .output()
            .unwrap()
    };
    let ok = check("1e-2");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let bad = check("1e-9");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("layer error bars"));
    // --tolerance implies the per-step policy: no refinement on this run, no estimates.
    let tol = dir.path().join("tol");
    analyze(
        "mlp_tanh_adam",
        &tol,
        &["--quiet", "--no-lca-tensors", "--tolerance", "1e-3"],
    );
    let s = json(&tol.join("summary.json"));
    assert_eq!(s["integration"]["policy"], "tolerance");
    assert!(s["integration"].get("budget").is_none());
    assert!(s["layers"][0].get("lca_err").is_none());
    assert_eq!(s["run"]["evaluations"].as_u64().unwrap(), 161);
    // Both policies named at once is a usage error.
    let o = lca()
        .args(["analyze"])
        .arg(fixture("mlp_tanh_adam/ckpts"))
        .args(["--spec"])
        .arg(fixture("mlp_tanh_adam/model.toml"))
        .args(["-o"])
        .arg(dir.path().join("x"))
        .args(["--policy", "budget", "--tolerance", "1e-3"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--policy tolerance"));
}
