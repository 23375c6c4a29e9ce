//! `--converge-layers REL` (issue 20): after the budget, refine until every layer's run-total
//! error bar is at most REL · max(|layer LCA|, 1 % of |ΔL|); checked against the converged
//! float64 references (`golden/converged.*`).

use crate::util::*;
use std::collections::HashMap;

/// One run: per layer (LCA, error bar, actual error against the 32-interval reference, the
/// reference's own uncertainty |lca32 − lca16|), and the summary.
struct Run {
    layers: Vec<(String, f64, f64, f64, f64)>,
    summary: serde_json::Value,
}

fn run(name: &str, extra: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let args: Vec<&str> = ["--quiet", "--no-lca-tensors"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    analyze(name, &out, &args);
    let s = json(&out.join("summary.json"));
    let golden = fixture(&format!("{name}/golden"));
    let conv = json(&golden.join("converged.json"));
    let reference = crate::oracle::read_f64_only(&golden.join("converged.safetensors"));
    let ref_steps: Vec<u64> = conv["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let step_ids: Vec<u64> = s["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["step"].as_u64().unwrap())
        .collect();
    // layer → (Σ actual error, Σ reference uncertainty)
    let mut err: HashMap<String, (f64, f64)> = HashMap::new();
    for r in csv_rows(&out.join("tensors.csv")) {
        let step: u64 = r["step"].parse().unwrap();
        let t = step_ids.iter().position(|&x| x == step).unwrap() as u64;
        let Some(i) = ref_steps.iter().position(|&x| x == t) else {
            continue;
        };
        let Some((_, r32)) = reference.get(&format!("lca32/{}", r["tensor"])) else {
            continue;
        };
        let (_, r16) = &reference[&format!("lca16/{}", r["tensor"])];
        let lca: f64 = r["lca"].parse().unwrap();
        let e = err.entry(r["layer"].clone()).or_default();
        e.0 += lca - r32[i];
        e.1 += (r32[i] - r16[i]).abs();
    }
    let layers = s["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let name = l["name"].as_str().unwrap().to_string();
            let (actual, u) = err[&name];
            (
                name,
                l["lca"].as_f64().unwrap(),
                l["lca_err"].as_f64().unwrap(),
                actual,
                u,
            )
        })
        .collect();
    Run { layers, summary: s }
}

fn converges(name: &str, rel: f64) {
    let plain = run(name, &[]);
    let rel_s = rel.to_string();
    let conv = run(name, &["--converge-layers", &rel_s]);
    let delta = conv.summary["run"]["delta_loss"].as_f64().unwrap().abs();
    let b = &conv.summary["integration"]["budget"];
    let layers = &b["layers"];
    eprintln!("{name}: {b}");
    for ((n, lca, e0, a0, u), (_, _, e1, a1, _)) in plain.layers.iter().zip(&conv.layers) {
        eprintln!(
            "{name} {n}: lca {lca:.4}, bar {e0:.2e} → {e1:.2e}, actual {a0:.2e} → {a1:.2e} (reference ±{u:.1e})"
        );
    }
    assert_eq!(layers["ending"], "met", "{layers}");
    assert_eq!(layers["rel"].as_f64(), Some(rel));
    assert!(layers["worst_after"].as_f64().unwrap() <= 1.0);
    assert!(
        layers["worst_before"].as_f64().unwrap() > 1.0,
        "nothing to do: {layers}"
    );
    // The refinement's evaluations come on top of the budget's.
    let added = layers["evaluations"].as_u64().unwrap();
    assert!(added > 0);
    assert_eq!(
        b["evaluations"].as_u64().unwrap(),
        plain.summary["integration"]["budget"]["evaluations"]
            .as_u64()
            .unwrap()
            + added
    );
    let tol = |lca: f64| rel * lca.abs().max(0.01 * delta);
    let worst = |r: &Run| {
        r.layers
            .iter()
            .map(|(_, lca, e, _, _)| e / tol(*lca))
            .fold(0.0, f64::max)
    };
    // Every layer's bar is within its tolerance (as integrated: the planned estimate to f32
    // rounding), and the bars shrank where they were above it.
    for (n, lca, e, _, _) in &conv.layers {
        assert!(
            *e <= 1.01 * tol(*lca),
            "{name} {n}: bar {e:e} > {:e}",
            tol(*lca)
        );
    }
    assert!(worst(&conv) < worst(&plain));
    // Against the reference: the layer whose bar was furthest above its tolerance got closer
    // to the converged value, and every resolvable layer total is within its bar.
    let (k, _) = plain
        .layers
        .iter()
        .enumerate()
        .map(|(k, (_, lca, e, _, _))| (k, e / tol(*lca)))
        .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
    let (n, _, _, a0, u) = &plain.layers[k];
    let a1 = conv.layers[k].3;
    assert!(
        a1.abs() < a0.abs() || a1.abs() <= *u,
        "{name} {n}: actual error {a0:e} → {a1:e}"
    );
    for (n, _, e, a, u) in &conv.layers {
        assert!(
            a.abs() <= *e || a.abs() <= *u,
            "{name} {n}: actual error {a:e} above its bar {e:e}"
        );
    }
}

#[test]
fn converge_layers_on_cnn_strided() {
    converges("cnn_strided", 1e-3);
}

#[test]
fn converge_layers_on_deep40() {
    converges("deep40", 3e-3);
}

#[test]
fn converge_layers_needs_the_budget_policy() {
    let dir = tempfile::tempdir().unwrap();
    for (args, msg) in [
        (
            vec!["--converge-layers", "1e-3", "--policy", "tolerance"],
            "--converge-layers refines with the budget policy",
        ),
        (
            vec!["--converge-layers", "1e-3", "--no-adaptive"],
            "--converge-layers refines with the budget policy",
        ),
        (
            vec!["--converge-layers", "0"],
            "--converge-layers must be a finite number > 0",
        ),
    ] {
        let o = analyze_run(
            &fixture("mlp/ckpts"),
            &fixture("mlp/model.toml"),
            &dir.path().join("out"),
            &args,
        );
        fails_with(&o, &[msg]);
    }
}
