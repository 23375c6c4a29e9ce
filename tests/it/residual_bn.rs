//! Residual (add) graphs and batch norm in both modes, end to end on a small generated
//! problem. The activation is smooth (tanh) so that refinement converges and the residual
//! checks the allocation itself, not ReLU kinks. The PyTorch-oracle comparison for a small
//! ResNet is tests/resnet_oracle.rs.

use crate::util::*;

const SPEC: &str = r#"[model]
batch_norm = "MODE"

[[layers]]
name = "fc1"
type = "linear"
in_features = 4
out_features = 6

[[layers]]
name = "bn1"
type = "batch_norm1d"
num_features = 6

[[layers]]
name = "act"
type = "tanh"

[[layers]]
name = "fc2"
type = "linear"
in_features = 6
out_features = 6

[[layers]]
name = "join"
type = "add"
input = ["fc2", "act"]

[[layers]]
name = "head"
type = "linear"
in_features = 6
out_features = 3

[loss]
type = "cross_entropy"

[data]
train = "train.safetensors"

[eval]
chunk_size = 25
"#;

fn vals(n: usize, seed: usize, scale: f32, offset: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 37 + seed * 11) % 23) as f32 / 23.0 - 0.5) * scale + offset)
        .collect()
}

fn problem(mode: &str) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let ckpts = dir.path().join("ckpts");
    std::fs::create_dir(&ckpts).unwrap();
    for k in 0..4 {
        let d = k as f32 * 0.02;
        let ts = vec![
            T::f32("fc1.weight", &[6, 4], &vals(24, 1, 1.0, d)),
            T::f32("fc1.bias", &[6], &vals(6, 2, 0.2, -d)),
            T::f32("bn1.weight", &[6], &vals(6, 3, 0.3, 1.0 + d)),
            T::f32("bn1.bias", &[6], &vals(6, 4, 0.2, d)),
            T::f32("bn1.running_mean", &[6], &vals(6, 5, 0.2, d)),
            T::f32("bn1.running_var", &[6], &vals(6, 6, 0.4, 1.0 + 2.0 * d)),
            T::i64("bn1.num_batches_tracked", &[], &[k as i64]),
            T::f32("fc2.weight", &[6, 6], &vals(36, 7, 0.8, -d)),
            T::f32("fc2.bias", &[6], &vals(6, 8, 0.2, d)),
            T::f32("head.weight", &[3, 6], &vals(18, 9, 1.0, d)),
            T::f32("head.bias", &[3], &vals(3, 10, 0.1, 0.0)),
        ];
        write_st(
            &ckpts.join(format!("ckpt_{k}.safetensors")),
            &ts,
            Some(k as u64),
        );
    }
    let x = vals(50 * 4, 12, 2.0, 0.1);
    let y: Vec<i64> = (0..50).map(|i| (i * 7 % 3) as i64).collect();
    write_st(
        &dir.path().join("train.safetensors"),
        &[T::f32("x", &[50, 4], &x), T::i64("y", &[50], &y)],
        None,
    );
    let spec = dir.path().join("model.toml");
    std::fs::write(&spec, SPEC.replace("MODE", mode)).unwrap();
    Tiny { dir, ckpts, spec }
}

#[test]
fn running_stats_report_a_buffers_row_and_keep_the_residual_small() {
    let t = problem("running-stats");
    let o = t.run(&["--tolerance", "1e-7"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&t.dir.path().join("out/summary.json"));
    assert_eq!(s["model"]["batch_norm"], "running-stats");
    let layers: Vec<&str> = s["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(layers, ["fc1", "bn1", "fc2", "head", "buffers"]);
    let buffers = s["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "buffers")
        .unwrap();
    assert_eq!(buffers["params"], 12);
    assert!(buffers["lca"].as_f64().unwrap() != 0.0);
    let tensors: Vec<&str> = s["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert!(tensors.contains(&"bn1.running_var"));
    assert_eq!(
        s["ignored_tensors"],
        serde_json::json!(["bn1.num_batches_tracked"])
    );
    // ΔL is fully allocated, buffers included.
    let rel = s["run"]["rel_abs_residual"].as_f64().unwrap();
    assert!(rel < 1e-4, "Σ|r|/|ΔL| = {rel}");
    // Buffers do not count among the helped/zero/hurt parameters of a step.
    let step = &s["steps"][0];
    let counted = step["helped"].as_u64().unwrap()
        + step["zero"].as_u64().unwrap()
        + step["hurt"].as_u64().unwrap();
    // num_params counts trained values only; the 12 running-statistics values are buffers.
    assert_eq!(s["model"]["num_buffers"].as_u64().unwrap(), 12);
    assert_eq!(counted, s["model"]["num_params"].as_u64().unwrap());
}

#[test]
fn batch_stats_ignore_running_statistics() {
    let t = problem("batch-stats");
    let o = t.run(&["--tolerance", "1e-7"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&t.dir.path().join("out/summary.json"));
    assert_eq!(s["model"]["batch_norm"], "batch-stats");
    assert_eq!(s["data"]["chunk_size"], 25);
    let layers: Vec<&str> = s["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(layers, ["fc1", "bn1", "fc2", "head"]);
    let ignored = s["ignored_tensors"].as_array().unwrap();
    assert_eq!(ignored.len(), 3, "{ignored:?}");
    assert!(
        s["run"]["rel_abs_residual"].as_f64().unwrap() < 1e-4,
        "{}",
        s["steps"]
    );
    assert!(s["warnings"].as_array().unwrap().is_empty());
    // The loss depends on the chunk size in this mode.
    let t2 = problem("batch-stats");
    std::fs::write(
        &t2.spec,
        SPEC.replace("MODE", "batch-stats")
            .replace("chunk_size = 25", "chunk_size = 50"),
    )
    .unwrap();
    assert!(t2.run(&[]).status.success());
    let s2 = json(&t2.dir.path().join("out/summary.json"));
    assert_ne!(s["run"]["loss_first"], s2["run"]["loss_first"]);
}

#[test]
fn a_tiny_last_chunk_in_batch_stats_mode_is_warned_about() {
    let t = problem("batch-stats");
    std::fs::write(
        &t.spec,
        SPEC.replace("MODE", "batch-stats")
            .replace("chunk_size = 25", "chunk_size = 16"),
    )
    .unwrap();
    let o = t.run(&[]);
    assert!(o.status.success());
    let s = json(&t.dir.path().join("out/summary.json"));
    let w = s["warnings"][0].as_str().unwrap();
    assert!(w.contains("last evaluation chunk has 2 samples"), "{w}");
}

#[test]
fn batch_norm_mode_must_be_chosen() {
    let t = problem("batch-stats");
    std::fs::write(&t.spec, SPEC.replace("batch_norm = \"MODE\"\n", "")).unwrap();
    fails_with(
        &t.run(&[]),
        &["model.toml", "batch_norm", "batch-stats", "running-stats"],
    );
    std::fs::write(&t.spec, SPEC.replace("MODE", "train")).unwrap();
    fails_with(&t.run(&[]), &["model.toml:2", "train"]);
    // A join of mismatched shapes names the layers.
    std::fs::write(
        &t.spec,
        SPEC.replace("MODE", "batch-stats")
            .replace("input = [\"fc2\", \"act\"]", "input = [\"fc2\", \"input\"]"),
    )
    .unwrap();
    fails_with(
        &t.run(&[]),
        &[
            "layer 'join'",
            "same shape",
            "layer 'fc2' gives 6",
            "the model input gives 4",
        ],
    );
}

#[test]
fn block_view_groups_layers() {
    let t = problem("running-stats");
    assert!(t.run(&[]).status.success());
    let o = lca()
        .arg("summarize")
        .arg(t.dir.path().join("out"))
        .args(["--by", "block", "--format", "csv"])
        .output()
        .unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.starts_with("block,params,lca"), "{text}");
    assert_eq!(text.lines().count(), 6);
}
