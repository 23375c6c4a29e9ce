//! The shipped MLP example against the PyTorch float64 oracle (fixtures/mlp/golden), through
//! the real binary and through the library API.

use crate::oracle::*;
use crate::util::*;

#[test]
fn analyze_matches_pytorch_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = analyze("mlp", &out, &["--quiet", "--policy", "tolerance"]); // the oracle is plain Simpson
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("Σ|r|/|ΔL|"),
        "residual report printed: {stderr}"
    );

    let oracle = json(&fixture("mlp/golden/oracle.json"));
    let summary = json(&out.join("summary.json"));
    let steps: Vec<u64> = oracle["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    let losses = floats(&oracle["losses"]);

    // Per-step losses to 1e-6.
    let srows = summary["steps"].as_array().unwrap();
    assert_eq!(srows.len(), steps.len() - 1);
    for (t, r) in srows.iter().enumerate() {
        assert_eq!(r["step"].as_u64().unwrap(), steps[t]);
        let lb = r["loss_before"].as_f64().unwrap();
        let la = r["loss_after"].as_f64().unwrap();
        assert!(
            (lb - losses[t]).abs() < 1e-6,
            "step {t}: loss {lb} vs {}",
            losses[t]
        );
        assert!(
            (la - losses[t + 1]).abs() < 1e-6,
            "step {t}: loss {la} vs {}",
            losses[t + 1]
        );
    }

    // Per-tensor totals over the run to 1e-4 relative (they agree to ~1e-7).
    for t in summary["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let want: f64 = floats(&oracle["lca"][name]).iter().sum();
        let got = t["lca"].as_f64().unwrap();
        let rel = (got - want).abs() / want.abs();
        assert!(
            rel < 1e-4,
            "{name}: total lca {got} vs oracle {want} ({rel:.2e})"
        );
    }

    // Per-step, per-tensor LCA to 1e-4 relative.
    let worst = compare_step_tensor_lca(&tensor_steps(&out), &oracle, &steps, 1e-4);
    eprintln!("worst per-step per-tensor relative error: {worst:.2e}");

    // Residual report: Σ|r|/|ΔL| below 0.1 %, and it matches the oracle's Simpson figure.
    let run = &summary["run"];
    let rel_abs = run["rel_abs_residual"].as_f64().unwrap();
    assert!(rel_abs < 1e-3, "Σ|r|/|ΔL| = {rel_abs}");
    let oracle_rel = oracle["summary"]["simpson"]["sum_abs_over_abs_dL"]
        .as_f64()
        .unwrap();
    assert!(
        (rel_abs - oracle_rel).abs() < 1e-5,
        "{rel_abs} vs oracle {oracle_rel}"
    );
    // ΣLCA matches ΔL within the residual, step by step.
    for r in srows {
        let d = r["delta_loss"].as_f64().unwrap();
        let s = r["lca_sum"].as_f64().unwrap();
        let res = r["residual"].as_f64().unwrap();
        assert!((d - s - res).abs() < 1e-12);
        assert!(res.abs() < 1e-3);
    }
}

/// Gradients at the stored Simpson points: the f32 evaluator to 1e-4 of each tensor's largest
/// entry, and the same model evaluated in f64 to 1e-9 (it is the same arithmetic as PyTorch's).
#[test]
fn gradients_match_pytorch_at_simpson_points() {
    let p = Problem::load(&fixture("mlp/model.toml"), &fixture("mlp/ckpts"));
    let golden = Golden::load(&fixture("mlp/golden"));
    let of_largest = |rtol| Tol { rtol, floor: 1.0 };
    let r32 = p.gradients_at_stored_points(
        &p.model::<f32>(),
        &golden,
        GradTol {
            loss: 1e-6,
            grad: of_largest(1e-4),
            except: &[],
        },
        "mlp f32",
    );
    let r64 = p.gradients_at_stored_points(
        &p.model::<f64>(),
        &golden,
        GradTol {
            loss: 1e-12,
            grad: of_largest(1e-9),
            except: &[],
        },
        "mlp f64",
    );
    assert_eq!(r32.entries, r64.entries);
    assert!(r32.entries > 10_000);
    eprintln!(
        "mlp gradients: f32 within {:.1e}, f64 within {:.1e} of each tensor's largest entry",
        r32.worst, r64.worst
    );
}

#[test]
fn first_order_is_much_worse_than_simpson() {
    let dir = tempfile::tempdir().unwrap();
    let simpson = dir.path().join("s");
    let first = dir.path().join("f");
    analyze("mlp", &simpson, &["--quiet", "--no-lca-tensors"]);
    analyze("mlp", &first, &["--quiet", "--method", "first-order"]);
    let rs = json(&simpson.join("summary.json"))["run"]["rel_abs_residual"]
        .as_f64()
        .unwrap();
    let rf = json(&first.join("summary.json"))["run"]["rel_abs_residual"]
        .as_f64()
        .unwrap();
    assert!(rf >= 10.0 * rs, "first-order {rf} vs simpson {rs}");
    // And it agrees with the oracle's first-order LCA.
    let oracle = json(&fixture("mlp/golden/oracle.json"));
    let want = oracle["summary"]["first_order"]["sum_abs_over_abs_dL"]
        .as_f64()
        .unwrap();
    assert!((rf - want).abs() < 1e-4 * want, "{rf} vs {want}");
    let steps: Vec<u64> = (0..=100).collect();
    let mut fo = oracle.clone();
    fo["lca"] = oracle["lca_first_order"].clone();
    compare_step_tensor_lca(&tensor_steps(&first), &fo, &steps, 1e-4);
}
