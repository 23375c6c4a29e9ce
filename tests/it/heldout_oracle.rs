//! fixtures/mlp_heldout against its PyTorch float64 oracle: held-out LCA along the same path,
//! the explicit L2 column, and adaptive refinement (the run has steps whose plain-Simpson
//! residual exceeds the default bound of 1e-3).

use crate::oracle::*;
use crate::util::*;
use std::collections::HashMap;

fn column(out: &std::path::Path, col: &str) -> HashMap<(u64, String), f64> {
    csv_rows(&out.join("tensors.csv"))
        .into_iter()
        .map(|r| {
            (
                (r["step"].parse().unwrap(), r["tensor"].clone()),
                r[col].parse().unwrap(),
            )
        })
        .collect()
}

fn with_lca(oracle: &serde_json::Value, lca: &serde_json::Value) -> serde_json::Value {
    let mut o = oracle.clone();
    o["lca"] = lca.clone();
    o
}

/// In f64 the evaluator reproduces the oracle's arithmetic: tight agreement.
#[test]
fn plain_simpson_training_and_heldout_lca_match_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    analyze(
        "mlp_heldout",
        &out,
        &["--quiet", "--no-adaptive", "--precision", "f64"],
    );
    let oracle = json(&fixture("mlp_heldout/golden/oracle.json"));
    let steps: Vec<u64> = (0..=40).collect();
    let s = json(&out.join("summary.json"));

    // Losses of both sets at every checkpoint, to 1e-6.
    let (losses, val) = (floats(&oracle["losses"]), floats(&oracle["val_losses"]));
    for (t, r) in s["steps"].as_array().unwrap().iter().enumerate() {
        assert!((r["loss_before"].as_f64().unwrap() - losses[t]).abs() < 1e-6);
        assert!((r["loss_after"].as_f64().unwrap() - losses[t + 1]).abs() < 1e-6);
        assert!((r["val_loss_before"].as_f64().unwrap() - val[t]).abs() < 1e-6);
        assert!((r["val_loss_after"].as_f64().unwrap() - val[t + 1]).abs() < 1e-6);
    }
    let worst = compare_step_tensor_lca(&column(&out, "lca"), &oracle, &steps, 1e-9);
    let worst_val = compare_step_tensor_lca(
        &column(&out, "val_lca"),
        &with_lca(&oracle, &oracle["val_lca"]),
        &steps,
        1e-9,
    );
    eprintln!("worst relative error: training {worst:.2e}, held-out {worst_val:.2e}");
    // Held-out residuals per step are the oracle's.
    let vr = floats(&oracle["val_residuals"]);
    for (t, r) in s["steps"].as_array().unwrap().iter().enumerate() {
        let got = r["val_residual"].as_f64().unwrap();
        assert!(
            (got - vr[t]).abs() < 1e-10,
            "step {t}: held-out residual {got} vs {}",
            vr[t]
        );
    }
    let v = &s["run"]["validation"];
    assert!((v["loss_first"].as_f64().unwrap() - val[0]).abs() < 1e-6);
    assert!((v["loss_last"].as_f64().unwrap() - val[40]).abs() < 1e-6);
    // lca_validation.safetensors holds the held-out per-parameter values.
    let bytes = std::fs::read(out.join("lca_validation.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("fc3.weight").unwrap().shape(), &[40, 10, 32]);
}

/// In f32 (the default), agreement to 1e-4 relative, except where an integration point sits on
/// a ReLU kink: step 4's midpoint has a first-layer pre-activation of 2.8e-9, whose sign f32
/// and f64 arithmetic decide differently. There the two agree within the oracle's own
/// integration error |r_t| at that step, which is all Simpson can resolve.
#[test]
fn f32_training_and_heldout_lca_match_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    analyze(
        "mlp_heldout",
        &out,
        &["--quiet", "--no-adaptive", "--no-lca-tensors"],
    );
    let oracle = json(&fixture("mlp_heldout/golden/oracle.json"));
    let steps: Vec<u64> = (0..=40).collect();
    let (r, vr) = (
        floats(&oracle["residuals"]),
        floats(&oracle["val_residuals"]),
    );
    compare_step_tensor_lca_with(&column(&out, "lca"), &oracle, &steps, 1e-4, &r);
    compare_step_tensor_lca_with(
        &column(&out, "val_lca"),
        &with_lca(&oracle, &oracle["val_lca"]),
        &steps,
        1e-4,
        &vr,
    );
    // Totals over the run to 1e-4 relative, without slack.
    let s = json(&out.join("summary.json"));
    for t in s["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        for (col, key) in [("lca", "lca"), ("val_lca", "val_lca")] {
            let want: f64 = floats(&oracle[key][name]).iter().sum();
            let got = t[col].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-4 * want.abs(),
                "{name} {col}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn l2_column_matches_the_oracle_closed_form() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    analyze("mlp_heldout", &out, &["--quiet", "--no-lca-tensors"]);
    let oracle = json(&fixture("mlp_heldout/golden/oracle.json"));
    let l2 = column(&out, "l2_lca");
    for (name, vals) in oracle["l2_lca"].as_object().unwrap() {
        for (t, want) in floats(vals).into_iter().enumerate() {
            let got = l2[&(t as u64, name.clone())];
            assert!(
                (got - want).abs() <= 1e-14 * want.abs().max(1e-12),
                "step {t} {name}: {got:e} vs {want:e}"
            );
        }
    }
    let s = json(&out.join("summary.json"));
    let pen = floats(&oracle["l2_penalty"]);
    let r = &s["run"]["l2"];
    assert!((r["penalty_first"].as_f64().unwrap() - pen[0]).abs() < 1e-15);
    assert!((r["penalty_last"].as_f64().unwrap() - pen[40]).abs() < 1e-15);
    assert_eq!(r["tensors"].as_array().unwrap().len(), 6);
}

#[test]
fn adaptive_refinement_matches_the_oracle_split_counts_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("p");
    let out = dir.path().join("o");
    analyze(
        "mlp_heldout",
        &plain,
        &[
            "--quiet",
            "--no-lca-tensors",
            "--no-adaptive",
            "--precision",
            "f64",
        ],
    );
    // The oracle's `adaptive` rule is the per-step tolerance policy (uniform doubling).
    let o = analyze(
        "mlp_heldout",
        &out,
        &[
            "--no-lca-tensors",
            "--precision",
            "f64",
            "--policy",
            "tolerance",
        ],
    );
    let oracle = json(&fixture("mlp_heldout/golden/oracle.json"));
    let adaptive = &oracle["adaptive"];
    let s = json(&out.join("summary.json"));
    let p = json(&plain.join("summary.json"));
    let want_splits: Vec<u64> = adaptive["splits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let got_splits: Vec<u64> = s["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["splits"].as_u64().unwrap())
        .collect();
    assert_eq!(got_splits, want_splits);
    assert!(want_splits.iter().filter(|&&n| n > 2).count() >= 5);
    // Refined steps: residual falls below the bound; values match the oracle's composite rule.
    let want_res = floats(&adaptive["residuals"]);
    for (t, (r, q)) in s["steps"]
        .as_array()
        .unwrap()
        .iter()
        .zip(p["steps"].as_array().unwrap())
        .enumerate()
    {
        let (got, before) = (
            r["residual"].as_f64().unwrap(),
            q["residual"].as_f64().unwrap(),
        );
        assert!(
            (got - want_res[t]).abs() < 1e-10,
            "step {t}: residual {got} vs oracle {}",
            want_res[t]
        );
        if want_splits[t] > 2 {
            assert!(
                before.abs() > 1e-3 && got.abs() <= 1e-3,
                "step {t}: {before:e} → {got:e}"
            );
        }
    }
    let steps: Vec<u64> = (0..=40).collect();
    compare_step_tensor_lca(
        &column(&out, "lca"),
        &with_lca(&oracle, &adaptive["lca"]),
        &steps,
        1e-9,
    );
    compare_step_tensor_lca(
        &column(&out, "val_lca"),
        &with_lca(&oracle, &adaptive["val_lca"]),
        &steps,
        1e-9,
    );
    let before = p["run"]["rel_abs_residual"].as_f64().unwrap();
    let after = s["run"]["rel_abs_residual"].as_f64().unwrap();
    assert!(after < before / 5.0, "{before} → {after}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("held-out:") && err.contains("L2 term"),
        "{err}"
    );
}
