//! The shipped MLP example against the PyTorch float64 oracle (fixtures/mlp/golden), through
//! the real binary and through the library API.

mod common;
use common::*;
use lca::data::Dataset;
use lca::eval::Evaluator;
use lca::net::{LossKind, Model, Real};
use lca::spec::Spec;

#[test]
fn analyze_matches_pytorch_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = analyze("mlp", &out, &["--quiet"]);
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

/// θ_t + s·Δθ for the step starting at `step`: rounded to f32 (as `analyze` evaluates it) and
/// exact in f64 (as the oracle does).
fn load_point(
    files: &[lca::checkpoint::CheckpointFile],
    step: u64,
    s: f64,
    model: &Model<f32>,
) -> (Vec<Vec<f32>>, Vec<Vec<f64>>) {
    let a = files.iter().position(|f| f.step == step).unwrap();
    let t0 = lca::checkpoint::load(&files[a], &model.params)
        .unwrap()
        .theta;
    let t1 = lca::checkpoint::load(&files[a + 1], &model.params)
        .unwrap()
        .theta;
    let d = lca::lca::difference(&t0, &t1);
    let exact = t0
        .iter()
        .zip(&d)
        .map(|(a, d)| a.iter().zip(d).map(|(&a, &d)| a as f64 + s * d).collect())
        .collect();
    (lca::lca::point::<f32>(&t0, &d, s), exact)
}

/// Gradients at the stored Simpson points: the f32 evaluator to 1e-4 of each tensor's largest
/// entry, and the same model evaluated in f64 to 1e-9 (it is the same arithmetic as PyTorch's).
#[test]
fn gradients_match_pytorch_at_simpson_points() {
    let spec = Spec::load(&fixture("mlp/model.toml")).unwrap();
    let data = Dataset::load(&spec.train_path(), &spec.data, None, LossKind::CrossEntropy).unwrap();
    let m32 = Model::<f32>::build(&spec, data.sample_shape()).unwrap();
    let m64 = Model::<f64>::build(&spec, data.sample_shape()).unwrap();
    let files = lca::checkpoint::scan(&fixture("mlp/ckpts")).unwrap();
    let golden_bytes = std::fs::read(fixture("mlp/golden/grads.safetensors")).unwrap();
    let golden = safetensors::SafeTensors::deserialize(&golden_bytes).unwrap();
    let oracle = json(&fixture("mlp/golden/oracle.json"));
    let get = |name: &str| lca::tensors::to_f64(&golden.tensor(name).unwrap()).unwrap();
    let mut checked = 0;
    for step in oracle["grad_steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
    {
        for (s, tag) in [(0.0, "0"), (0.5, "0.5"), (1.0, "1")] {
            let (theta, theta64) = load_point(&files, step, s, &m32);
            let e32 = Evaluator {
                model: &m32,
                data: &data,
                chunk_size: spec.eval.chunk_size,
            };
            let r32 = e32.loss_and_grad(&theta).unwrap();
            let e64 = Evaluator {
                model: &m64,
                data: &data,
                chunk_size: spec.eval.chunk_size,
            };
            let r64 = e64.loss_and_grad(&theta64).unwrap();
            let want_loss = get(&format!("step{step}/s{tag}/loss"))[0];
            assert!(
                (r32.loss - want_loss).abs() < 1e-6,
                "loss {} vs {want_loss}",
                r32.loss
            );
            assert!(
                (r64.loss - want_loss).abs() < 1e-12,
                "f64 loss {} vs {want_loss}",
                r64.loss
            );
            for (pi, p) in m32.params.iter().enumerate() {
                let want = get(&format!("step{step}/s{tag}/{}", p.name));
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                for (k, &w) in want.iter().enumerate() {
                    let d32 = (r32.grads[pi][k] - w).abs();
                    assert!(
                        d32 <= 1e-4 * scale,
                        "{} [{k}] at step {step} s={tag}: {} vs {w}",
                        p.name,
                        r32.grads[pi][k]
                    );
                    let d64 = (r64.grads[pi][k] - w).abs();
                    assert!(
                        d64 <= 1e-9 * scale,
                        "f64 {} [{k}] at step {step} s={tag}: {} vs {w}",
                        p.name,
                        r64.grads[pi][k]
                    );
                }
                checked += want.len();
            }
        }
    }
    assert!(checked > 10_000);
    let _ = 1.0f32.f64();
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
