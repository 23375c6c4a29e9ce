//! The CIFAR-10 networks with batch norm in docs/examples:
//!
//! - `resnet20.toml` reads a ResNet-20 `state_dict` saved by PyTorch (`fixtures/resnet20`: two
//!   checkpoints of `docs/examples/resnet20.py`'s model one SGD step apart, and 16 random
//!   CIFAR-shaped uint8 images), analyses it in both BN modes with the PyTorch float64 oracle
//!   of that step, and `summarize` shows the first conv, every block and the last linear;
//! - `allcnn_bn.toml` parses and builds on CIFAR shapes, and its forward and backward run.

use crate::oracle::*;
use crate::util::*;
use lca::net::{Model, Real, TargetsView};
use lca::spec::Spec;
use ndarray::{ArrayD, IxDyn};
use std::path::{Path, PathBuf};

/// docs/examples/resnet20.toml as shipped, except that it reads the fixture's 16 samples in
/// chunks of 8 (two full chunks) and uses the given BN mode.
fn resnet20_spec(dir: &Path, mode: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo("docs/examples/resnet20.toml")).unwrap();
    let data = fixture("resnet20/data/train.safetensors");
    let edited = text
        .replace(
            "train = \"data/cifar10_train.safetensors\"",
            &format!("train = {:?}", data.display().to_string()),
        )
        .replace("chunk_size = 250", "chunk_size = 8")
        .replace(
            "batch_norm = \"batch-stats\"",
            &format!("batch_norm = \"{mode}\""),
        );
    assert_eq!(
        edited
            .lines()
            .zip(text.lines())
            .filter(|(a, b)| a != b)
            .count(),
        if mode == "batch-stats" { 2 } else { 3 },
        "the three edited lines are in the shipped spec"
    );
    let path = dir.join(format!("resnet20_{mode}.toml"));
    std::fs::write(&path, edited).unwrap();
    path
}

/// `lca summarize OUT --by BY --format csv --sort order`: (name, params, lca) per row.
fn view(out: &Path, by: &str) -> Vec<(String, u64, f64)> {
    let o = lca()
        .arg("summarize")
        .arg(out)
        .args(["--by", by, "--format", "csv", "--sort", "order"])
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut r = csv::Reader::from_reader(o.stdout.as_slice());
    r.deserialize::<std::collections::HashMap<String, String>>()
        .map(|row| {
            let row = row.unwrap();
            (
                row[by].clone(),
                row["params"].parse().unwrap(),
                row["lca"].parse().unwrap(),
            )
        })
        .collect()
}

/// Layers of ResNet-20 with parameters, in model order (the state_dict's module names).
fn resnet20_layers() -> Vec<String> {
    let mut v = vec!["conv1".to_string(), "bn1".to_string()];
    for stage in 1..=3 {
        for block in 0..3 {
            let p = format!("layer{stage}.{block}");
            for l in ["conv1", "bn1", "conv2", "bn2"] {
                v.push(format!("{p}.{l}"));
            }
            if stage > 1 && block == 0 {
                v.push(format!("{p}.shortcut.0"));
                v.push(format!("{p}.shortcut.1"));
            }
        }
    }
    v.push("linear".into());
    v
}

#[test]
fn resnet20_state_dict_saved_by_pytorch_loads_and_analyses() {
    for mode in ["batch-stats", "running-stats"] {
        let dir = tempfile::tempdir().unwrap();
        let spec = resnet20_spec(dir.path(), mode);
        let out = dir.path().join("out");
        let o = analyze_run(
            &fixture("resnet20/ckpts"),
            &spec,
            &out,
            // The oracle evaluated the rows in file order.
            &["--no-adaptive", "--quiet", "--data-order", "file"],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let s = json(&out.join("summary.json"));
        let oracle = json(&fixture(&format!(
            "resnet20/oracle_{}.json",
            mode.replace('-', "_")
        )));
        assert_eq!(oracle["batch_norm"], mode);
        assert_eq!(s["model"]["batch_norm"], mode);
        assert_eq!(s["data"]["sample_shape"], serde_json::json!([3, 32, 32]));
        // No warning, except the one issue 20 asks for: plain Simpson (--no-adaptive) leaves
        // Σ|r|/|ΔL| = 0.24 % > 0.1 % on the running-stats step, and analyze must say so.
        let warnings: Vec<&str> = s["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        let rel = s["run"]["rel_abs_residual"].as_f64().unwrap();
        if rel > 1e-3 {
            assert_eq!(warnings.len(), 1, "{mode}: {warnings:?}");
            assert!(
                warnings[0].contains("exceeds 0.1 %"),
                "{mode}: {warnings:?}"
            );
        } else {
            assert!(warnings.is_empty(), "{mode}: {warnings:?}");
        }

        // The PyTorch loss at both checkpoints, and the per-tensor LCA of the step.
        let losses = floats(&oracle["losses"]);
        let step = &s["steps"][0];
        for (got, want) in [
            (&step["loss_before"], losses[0]),
            (&step["loss_after"], losses[1]),
        ] {
            let got = got.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-5 * want.abs(),
                "{mode}: loss {got} vs PyTorch {want}"
            );
        }
        let worst = compare_step_tensor_lca(&tensor_steps(&out), &oracle, &[0, 1], 1e-4);
        let r = step["residual"].as_f64().unwrap();
        let want_r = floats(&oracle["residuals"])[0];
        assert!(
            (r - want_r).abs() <= 1e-3 * (losses[1] - losses[0]).abs(),
            "{mode}: residual {r} vs oracle {want_r}"
        );
        eprintln!(
            "resnet20 {mode}: loss {:.6} → {:.6}, residual {r:.2e} (oracle {want_r:.2e}), max relative LCA error {worst:.1e}",
            losses[0], losses[1]
        );

        // --by layer: the first conv, every block's layers, the last linear; 272,474
        // parameters; the buffers group last in running-stats mode.
        let layers = view(&out, "layer");
        let names: Vec<&str> = layers.iter().map(|l| l.0.as_str()).collect();
        let want = resnet20_layers();
        assert_eq!(&names[..want.len()], want);
        let params: u64 = layers
            .iter()
            .filter(|l| l.0 != "buffers")
            .map(|l| l.1)
            .sum();
        assert_eq!(params, 272_474);
        if mode == "running-stats" {
            assert_eq!(names.last(), Some(&"buffers"));
            // running_mean and running_var of 19 BN layers (16 + 3·3·2 + 2 shortcut BNs).
            let bn_channels = 16 + 3 * (16 + 16) + 3 * (32 + 32) + 3 * (64 + 64) + 32 + 64;
            assert_eq!(layers.last().unwrap().1, 2 * bn_channels);
        } else {
            assert_eq!(names.len(), want.len());
        }
        for (name, _, v) in &layers {
            assert!(v.is_finite() && *v != 0.0, "{mode} {name}: lca {v}");
        }

        // --by block: stem conv and BN, the nine blocks, the linear layer (and buffers).
        let blocks = view(&out, "block");
        let names: Vec<&str> = blocks.iter().map(|b| b.0.as_str()).collect();
        let mut want = vec!["conv1".to_string(), "bn1".to_string()];
        for stage in 1..=3 {
            for block in 0..3 {
                want.push(format!("layer{stage}.{block}"));
            }
        }
        want.push("linear".into());
        if mode == "running-stats" {
            want.push("buffers".into());
        }
        assert_eq!(names, want);
        let total: f64 = blocks.iter().map(|b| b.2).sum();
        let lca_sum = s["run"]["lca_sum"].as_f64().unwrap();
        assert!((total - lca_sum).abs() <= 1e-9 * lca_sum.abs());
    }
}

/// PyTorch-like initial values: convolution weights U(−1/√fan_in, 1/√fan_in), BN weight 1,
/// bias 0, running mean 0, running variance 1.
fn init<T: Real>(model: &Model<T>, rng: &mut Rng) -> Vec<Vec<T>> {
    model
        .params
        .iter()
        .map(|p| {
            let fill = |v: f64| vec![T::of(v); p.numel()];
            match p.role.as_str() {
                "weight" if p.shape.len() > 1 => {
                    let bound = 1.0 / (p.shape[1..].iter().product::<usize>() as f64).sqrt();
                    (0..p.numel())
                        .map(|_| T::of((2.0 * rng.next() - 1.0) * bound))
                        .collect()
                }
                "weight" | "running_var" => fill(1.0),
                _ => fill(0.0),
            }
        })
        .collect()
}

#[test]
fn allcnn_bn_example_builds_and_runs_on_cifar_shapes() {
    let text = std::fs::read_to_string(repo("docs/examples/allcnn_bn.toml")).unwrap();
    for mode in ["batch-stats", "running-stats"] {
        let src = text.replace(
            "batch_norm = \"batch-stats\"",
            &format!("batch_norm = \"{mode}\""),
        );
        let spec = Spec::parse(&src, &repo("docs/examples/allcnn_bn.toml")).unwrap();
        assert_eq!(spec.model.input_shape.as_deref(), Some(&[3, 32, 32][..]));
        let m32 = Model::<f32>::build(&spec, &[3, 32, 32]).unwrap();
        let m64 = Model::<f64>::build(&spec, &[3, 32, 32]).unwrap();
        assert_eq!(m32.output_shape(), &[10]);
        let trained: usize = m32
            .params
            .iter()
            .filter(|p| !p.buffer)
            .map(|p| p.numel())
            .sum();
        assert_eq!(trained, 1_370_996);
        let buffers: Vec<&str> = m32
            .params
            .iter()
            .filter(|p| p.buffer)
            .map(|p| p.name.as_str())
            .collect();
        if mode == "running-stats" {
            assert_eq!(buffers.len(), 18);
            assert!(buffers.contains(&"bn9.running_var"));
        } else {
            assert!(buffers.is_empty());
        }
        // (Some draws put a pre-activation within f32 rounding of a ReLU kink, where f32 and f64
        // legitimately take different sides; this one does not.)
        let mut rng = Rng(12);
        let t64 = init(&m64, &mut rng);
        let t32: Vec<Vec<f32>> = t64
            .iter()
            .map(|v| v.iter().map(|&x| x as f32).collect())
            .collect();
        let t64: Vec<Vec<f64>> = t32
            .iter()
            .map(|v| v.iter().map(|&x| x as f64).collect())
            .collect();
        let x = ArrayD::from_shape_fn(IxDyn(&[3, 3, 32, 32]), |_| rng.next() as f32);
        let y = [3u32, 8, 0];
        let mut g32: Vec<Vec<f32>> = t32.iter().map(|v| vec![0.0; v.len()]).collect();
        let mut g64: Vec<Vec<f64>> = t64.iter().map(|v| vec![0.0; v.len()]).collect();
        let (l32, n) = m32.chunk_loss_grad(&t32, x.view(), TargetsView::Classes(&y), &mut g32);
        let (l64, _) = m64.chunk_loss_grad(&t64, x.view(), TargetsView::Classes(&y), &mut g64);
        assert_eq!(n, 3);
        assert!(l64.is_finite() && l64 > 0.0, "{mode}: loss {l64}");
        assert!(
            (l32 - l64).abs() < 1e-5 * l64,
            "{mode}: f32 loss {l32} vs f64 {l64}"
        );
        for ((p, a), b) in m32.params.iter().zip(&g32).zip(&g64) {
            let max = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(max > 0.0, "{mode}: {} has no gradient", p.name);
            let err = a
                .iter()
                .zip(b)
                .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
            assert!(
                err <= 1e-4 * max,
                "{mode}: {} f32 gradient differs from f64 by {err} (max {max})",
                p.name
            );
        }
    }
}
