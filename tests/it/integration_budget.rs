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
    entries: usize,
    /// Per layer run total (resolvable ones): bounded / all, and the largest est/actual.
    layers_bounded: usize,
    layers: usize,
    /// The layer with the largest run-total error against the reference: error ÷ |ΔL|, and
    /// its estimate ÷ its error.
    max_layer_err: f64,
    max_layer_ratio: f64,
}

/// The f64 tensors of a safetensors file by name (others, such as the int64 `steps`, skipped).
fn read_f64(path: &std::path::Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F64)
        .map(|(name, t)| {
            let v = t
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, (t.shape().to_vec(), v))
        })
        .collect()
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
    let st = read_f64(&golden.join("converged.safetensors"));
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
    let (mut entries, mut entries_bounded) = (0, 0);
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
                }
            }
        }
    }
    let (mut layers, mut layers_bounded) = (0, 0);
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
            }
        }
    }
    Validation {
        evaluations,
        plain,
        rel_abs_residual,
        entries_bounded,
        entries,
        layers_bounded,
        layers,
        max_layer_err,
        max_layer_ratio,
    }
}

fn check(name: &str) {
    let v = validate(name);
    eprintln!(
        "| {name} | {} ({:.2}× plain {}) | {:.4} % | {:.1e} | {:.1} | {}/{} | {}/{} |",
        v.evaluations,
        v.evaluations as f64 / v.plain as f64,
        v.plain,
        100.0 * v.rel_abs_residual,
        v.max_layer_err,
        v.max_layer_ratio,
        v.entries_bounded,
        v.entries,
        v.layers_bounded,
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
