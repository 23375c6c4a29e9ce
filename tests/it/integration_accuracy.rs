//! Integration accuracy (issue 4): adaptive refinement, the cheap rules against the oracle,
//! the L2 column against its closed form.

use crate::oracle::*;
use crate::util::*;
use std::collections::HashMap;

fn steps_of(summary: &serde_json::Value) -> Vec<serde_json::Value> {
    summary["steps"].as_array().unwrap().clone()
}

#[test]
fn adaptive_refinement_refines_steps_and_their_residuals_fall() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    let refined = dir.path().join("refined");
    analyze(
        "mlp",
        &plain,
        &[
            "--quiet",
            "--no-lca-tensors",
            "--no-adaptive",
            "--no-share-first-layer",
        ],
    );
    // Every point evaluated in full; and the first layer shared between Simpson's points
    // (--share-first-layer: the cost model alone would not share this small MLP's;
    // docs/performance.md), kept shared through the refinement of a step that needs it.
    let refined_shared = dir.path().join("refined_shared");
    analyze(
        "mlp",
        &refined,
        &[
            "--quiet",
            "--no-lca-tensors",
            "--tolerance",
            "1e-5",
            "--no-share-first-layer",
        ],
    );
    analyze(
        "mlp",
        &refined_shared,
        &[
            "--quiet",
            "--no-lca-tensors",
            "--tolerance",
            "1e-5",
            "--share-first-layer",
        ],
    );
    let p = json(&plain.join("summary.json"));
    let r = json(&refined.join("summary.json"));
    let rsh = json(&refined_shared.join("summary.json"));
    assert_eq!(rsh["integration"]["shared_first_layer"], true);
    assert_eq!(r["integration"]["shared_first_layer"], false);
    let (ps, rs) = (steps_of(&p), steps_of(&r));
    let mut shared_refined = 0;
    for (a, b) in rs.iter().zip(steps_of(&rsh)) {
        let splits = a["splits"].as_u64().unwrap();
        assert_eq!(splits, b["splits"].as_u64().unwrap(), "step {}", a["step"]);
        // The same points (the first layer's outputs interpolated along the step, exact up to
        // f32 rounding), and no more evaluations: n splits cost n, the shared try's included.
        assert_eq!(
            b["evaluations"].as_u64().unwrap(),
            splits,
            "step {}",
            a["step"]
        );
        assert_eq!(a["loss_after"], b["loss_after"], "step {}", a["step"]);
        let (x, y) = (
            a["residual"].as_f64().unwrap(),
            b["residual"].as_f64().unwrap(),
        );
        assert!((x - y).abs() < 1e-8, "step {}: {x:e} vs {y:e}", a["step"]);
        shared_refined += usize::from(splits > 2);
    }
    assert!(
        shared_refined >= 5,
        "only {shared_refined} shared steps refined"
    );
    let mut n_refined = 0;
    for (a, b) in ps.iter().zip(&rs) {
        let ra = a["residual"].as_f64().unwrap();
        let rb = b["residual"].as_f64().unwrap();
        let splits = b["splits"].as_u64().unwrap();
        assert_eq!(a["splits"], 2);
        // Same end points: the losses do not change with refinement.
        assert_eq!(a["loss_after"], b["loss_after"]);
        if ra.abs() <= 1e-5 {
            assert_eq!(splits, 2, "step {} needed no refinement", a["step"]);
            assert_eq!(ra, rb);
        } else {
            n_refined += 1;
            assert!(
                splits > 2,
                "step {}: |r| = {ra:e} > 1e-5 but not refined",
                a["step"]
            );
            assert!(
                rb.abs() < ra.abs(),
                "step {}: residual {ra:e} → {rb:e} did not fall",
                a["step"]
            );
            assert!(
                rb.abs() <= 1e-5 || b["capped"] == true,
                "step {}: stopped at {splits} splits with |r| = {rb:e}",
                a["step"]
            );
            // Only new points are evaluated: n splits cost n evaluations (end point included).
            assert_eq!(b["evaluations"].as_u64().unwrap(), splits);
        }
    }
    assert!(n_refined >= 5, "only {n_refined} steps refined");
    let before = p["run"]["rel_abs_residual"].as_f64().unwrap();
    let after = r["run"]["rel_abs_residual"].as_f64().unwrap();
    assert!(after < 0.5 * before, "Σ|r|/|ΔL| {before:e} → {after:e}");
    // Capped steps are listed in the summary and warned about.
    let capped: Vec<u64> = rs
        .iter()
        .filter(|s| s["capped"] == true)
        .map(|s| s["step"].as_u64().unwrap())
        .collect();
    let listed: Vec<u64> = r["run"]["capped_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(capped, listed);
}

#[test]
fn tight_tolerance_reaches_a_hundredth_of_a_percent() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let o = analyze("mlp", &out, &["--no-lca-tensors", "--tolerance", "3e-6"]);
    let s = json(&out.join("summary.json"));
    let rel = s["run"]["rel_abs_residual"].as_f64().unwrap();
    assert!(rel <= 1e-4, "Σ|r|/|ΔL| = {rel:e}");
    let err = String::from_utf8_lossy(&o.stderr);
    if !s["run"]["capped_steps"].as_array().unwrap().is_empty() {
        assert!(
            err.contains("warning:") && err.contains("at 32 splits"),
            "{err}"
        );
    }
}

#[test]
fn relative_tolerance_bounds_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    analyze(
        "mlp",
        &out,
        &[
            "--quiet",
            "--no-lca-tensors",
            "--tolerance",
            "0",
            "--rel-tolerance",
            "1e-3",
        ],
    );
    for s in steps_of(&json(&out.join("summary.json"))) {
        let r = s["residual"].as_f64().unwrap().abs();
        let d = s["delta_loss"].as_f64().unwrap().abs();
        assert!(
            r <= 1e-3 * d || s["capped"] == true,
            "step {}: |r| {r:e} > 1e-3·|ΔL| {d:e}",
            s["step"]
        );
    }
}

#[test]
fn trapezoid_matches_the_oracle_and_sits_between() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    analyze(
        "mlp",
        &out,
        &["--quiet", "--no-lca-tensors", "--method", "trapezoid"],
    );
    let oracle = json(&fixture("mlp/golden/oracle.json"));
    let mut tr = oracle.clone();
    tr["lca"] = oracle["lca_trapezoid"].clone();
    let steps: Vec<u64> = (0..=100).collect();
    compare_step_tensor_lca(&tensor_steps(&out), &tr, &steps, 1e-4);
    let s = json(&out.join("summary.json"));
    assert_eq!(s["integration"]["method"], "trapezoid");
    let rel = s["run"]["rel_abs_residual"].as_f64().unwrap();
    let want = oracle["summary"]["trapezoid"]["sum_abs_over_abs_dL"]
        .as_f64()
        .unwrap();
    assert!((rel - want).abs() < 1e-3 * want, "{rel} vs {want}");
}

/// The L2 column is λ(θ_{t+1}² − θ_t²) per parameter, computed here independently from the
/// checkpoints; it is reported apart from the data-loss LCA, which it does not change.
#[test]
fn l2_column_is_the_closed_form() {
    let dir = tempfile::tempdir().unwrap();
    let spec = std::fs::read_to_string(fixture("mlp/model.toml"))
        .unwrap()
        .replace(
            "data/train.safetensors",
            &fixture("mlp/data/train.safetensors")
                .display()
                .to_string()
                .replace('\\', "/"),
        )
        + "\n[regularization]\nl2 = 2.5e-4\ntensors = [\"fc1.weight\", \"fc3.weight\", \"fc3.bias\"]\n";
    let spec_path = dir.path().join("model.toml");
    std::fs::write(&spec_path, spec).unwrap();
    let out = dir.path().join("o");
    let o = lca()
        .args([
            "analyze",
            &fixture("mlp/ckpts").display().to_string(),
            "--spec",
        ])
        .arg(&spec_path)
        .arg("-o")
        .arg(&out)
        .arg("--quiet")
        // The oracle is plain Simpson (the per-step policy never refines this run).
        .args(["--policy", "tolerance"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lambda = 2.5e-4;
    let files = lca::checkpoint::scan(&fixture("mlp/ckpts")).unwrap();
    let names = [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "fc3.weight",
        "fc3.bias",
    ];
    let on = |n: &str| ["fc1.weight", "fc3.weight", "fc3.bias"].contains(&n);
    let load = |f: &lca::checkpoint::CheckpointFile| {
        let bytes = std::fs::read(&f.path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    lca::tensors::to_f64(&st.tensor(n).unwrap()).unwrap(),
                )
            })
            .collect::<HashMap<String, Vec<f64>>>()
    };
    let rows = csv_rows(&out.join("tensors.csv"));
    let by: HashMap<(u64, String), f64> = rows
        .iter()
        .map(|r| {
            (
                (r["step"].parse().unwrap(), r["tensor"].clone()),
                r["l2_lca"].parse().unwrap(),
            )
        })
        .collect();
    let mut total = 0.0;
    let mut prev = load(&files[0]);
    let first = prev.clone();
    for (t, f) in files.iter().enumerate().skip(1) {
        let cur = load(f);
        for n in names {
            let want: f64 = if on(n) {
                prev[n]
                    .iter()
                    .zip(&cur[n])
                    .map(|(a, b)| lambda * (b * b - a * a))
                    .sum()
            } else {
                0.0
            };
            let got = by[&((t - 1) as u64, n.to_string())];
            assert!(
                (got - want).abs() <= 1e-15 * want.abs().max(1e-12),
                "step {} {n}: {got:e} vs {want:e}",
                t - 1
            );
            total += want;
        }
        prev = cur;
    }
    let s = json(&out.join("summary.json"));
    let l2 = &s["run"]["l2"];
    let pen = |m: &HashMap<String, Vec<f64>>| -> f64 {
        names
            .iter()
            .filter(|n| on(n))
            .map(|n| m[*n].iter().map(|v| v * v).sum::<f64>())
            .sum::<f64>()
            * lambda
    };
    assert!((l2["penalty_first"].as_f64().unwrap() - pen(&first)).abs() < 1e-15);
    assert!((l2["penalty_last"].as_f64().unwrap() - pen(&prev)).abs() < 1e-15);
    // The column telescopes to the change of the penalty.
    let sum = l2["lca_sum"].as_f64().unwrap();
    assert!((sum - total).abs() < 1e-14, "{sum} vs {total}");
    assert!((sum - (pen(&prev) - pen(&first))).abs() < 1e-12);
    // The data-loss LCA is unchanged by declaring a regulariser.
    let oracle = json(&fixture("mlp/golden/oracle.json"));
    compare_step_tensor_lca(
        &tensor_steps(&out),
        &oracle,
        &(0..=100).collect::<Vec<u64>>(),
        1e-4,
    );
    // The unregularised tensors carry zeros, the layer view shows the column.
    let layers = lca()
        .args(["summarize"])
        .arg(&out)
        .args(["--format", "json"])
        .output()
        .unwrap();
    let layers: serde_json::Value = serde_json::from_slice(&layers.stdout).unwrap();
    assert_eq!(layers[1]["l2_lca"].as_f64().unwrap(), 0.0);
}

#[test]
fn unknown_regularised_tensor_is_named() {
    let t = tiny();
    std::fs::write(
        &t.spec,
        format!("{TINY_SPEC}\n[regularization]\nl2 = 1e-3\ntensors = [\"fc.wieght\"]\n"),
    )
    .unwrap();
    fails_with(&t.run(&[]), &["model.toml:18", "fc.wieght", "fc.weight"]);
    std::fs::write(&t.spec, format!("{TINY_SPEC}\n[regularization]\nl2 = -1\n")).unwrap();
    fails_with(&t.run(&[]), &["model.toml:17", "l2"]);
}

/// The sharing decision (docs/performance.md, "Sharing decision"): the cost model does not
/// share the fixture MLP's first layer (60 % of its multiply-adds: the third evaluation of the
/// rest costs more than the saving), `--share-first-layer` forces it, and the two options
/// contradict each other.
#[test]
fn the_cost_model_decides_sharing_and_the_options_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let shared_of = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["--quiet", "--no-lca-tensors", "--no-adaptive"];
        args.extend_from_slice(extra);
        analyze("mlp", &out, &args);
        json(&out.join("summary.json"))["integration"]["shared_first_layer"].clone()
    };
    assert_eq!(shared_of("auto", &[]), false);
    assert_eq!(shared_of("forced", &["--share-first-layer"]), true);
    assert_eq!(shared_of("never", &["--no-share-first-layer"]), false);
    let o = analyze_run(
        &fixture("mlp/ckpts"),
        &fixture("mlp/model.toml"),
        &dir.path().join("both"),
        &["--share-first-layer", "--no-share-first-layer"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
