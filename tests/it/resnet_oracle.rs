//! The small-ResNet fixture (`fixtures/resnet`: stem conv + BN, an identity-shortcut block, a
//! stride-2 block with a 1×1 conv + BN shortcut, global average pool, linear; 1×8×8 digits)
//! against its PyTorch float64 oracles, one per batch-norm mode (`fixtures/resnet/golden/
//! {batch_stats,running_stats}`, see fixtures/README.md):
//!
//! - `--precision f64` reproduces the oracle's arithmetic: per-step, per-tensor LCA to 1e-9
//!   relative, losses to 1e-10, residuals to 1e-10;
//! - the default f32 evaluation: per-step, per-tensor LCA to 1e-4 relative, losses to 1e-6;
//! - running-stats mode reports the running statistics as a `buffers` group (per tensor, as the
//!   oracle, which interpolates them along the path like parameters); batch-stats mode has none;
//! - the residual is small in both modes;
//! - `summarize --by layer` lists the stem, every layer of both blocks and the last linear, and
//!   `--by block` groups them;
//! - the library's full-set gradients (buffers included) at the oracle's stored points.

use crate::oracle::*;
use crate::util::*;
use std::collections::HashMap;
use std::path::Path;

/// `fixtures/resnet/golden/<mode>/<file>`.
fn golden(mode: &str, file: &str) -> std::path::PathBuf {
    fixture(&format!("resnet/golden/{}/{file}", mode.replace('-', "_")))
}

fn spec_path(mode: &str) -> std::path::PathBuf {
    fixture(&format!("resnet/model_{}.toml", mode.replace('-', "_")))
}

fn run(mode: &str, out: &Path, extra: &[&str]) {
    // The oracle evaluated the rows in file order (batch-stats chunks depend on it).
    let args: Vec<&str> = ["--quiet", "--data-order", "file"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    analyze_ok(&fixture("resnet/ckpts"), &spec_path(mode), out, &args);
}

/// `lca summarize OUT --by BY --format csv` as rows.
fn summarize(out: &Path, by: &str) -> Vec<HashMap<String, String>> {
    let o = lca()
        .arg("summarize")
        .arg(out)
        .args(["--by", by, "--format", "csv", "--sort", "order"])
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut r = csv::Reader::from_reader(o.stdout.as_slice());
    r.deserialize().map(|x| x.unwrap()).collect()
}

const LAYERS: [&str; 13] = [
    "conv1",
    "bn1",
    "layer1.0.conv1",
    "layer1.0.bn1",
    "layer1.0.conv2",
    "layer1.0.bn2",
    "layer2.0.conv1",
    "layer2.0.bn1",
    "layer2.0.conv2",
    "layer2.0.bn2",
    "layer2.0.shortcut.0",
    "layer2.0.shortcut.1",
    "linear",
];

/// Compare one analysis with the oracle of its mode: losses, per-step per-tensor LCA,
/// residuals, buffers; returns (worst loss error, worst relative LCA error, Σ|r|/|ΔL|).
/// With `slack`, a per-step LCA that differs from the oracle's by no more than the oracle's
/// own residual |r_t| at that step also passes (see `compare_step_tensor_lca_with`).
fn check_against_oracle(
    mode: &str,
    out: &Path,
    rtol: f64,
    loss_tol: f64,
    res_tol: f64,
    slack: bool,
) -> (f64, f64, f64) {
    let oracle = json(&golden(mode, "oracle.json"));
    assert_eq!(oracle["batch_norm"], mode);
    let s = json(&out.join("summary.json"));
    assert_eq!(s["model"]["batch_norm"], mode);
    assert_eq!(s["data"]["chunk_size"], 512);
    // These runs are plain Simpson (like the oracle), whose Σ|r|/|ΔL| may exceed the 0.1 %
    // gate of issue 20 on these short runs: that warning, and no other, is expected.
    assert!(
        s["warnings"].as_array().unwrap().iter().all(|w| w
            .as_str()
            .is_some_and(|w| w.starts_with("Σ|r|/|ΔL| = ") && w.contains("exceeds 0.1 %"))),
        "{}",
        s["warnings"]
    );

    // Losses at every checkpoint, and residuals per step.
    let losses = floats(&oracle["losses"]);
    let residuals = floats(&oracle["residuals"]);
    let recs = s["steps"].as_array().unwrap();
    assert_eq!(recs.len(), losses.len() - 1);
    let mut worst_loss = 0.0f64;
    for (t, r) in recs.iter().enumerate() {
        assert_eq!(r["step"].as_u64().unwrap() as usize, t);
        assert_eq!(r["splits"].as_u64().unwrap(), 2, "plain Simpson");
        for (got, want) in [
            (&r["loss_before"], losses[t]),
            (&r["loss_after"], losses[t + 1]),
        ] {
            let e = (got.as_f64().unwrap() - want).abs();
            assert!(
                e <= loss_tol,
                "{mode} step {t}: loss {got} vs oracle {want}"
            );
            worst_loss = worst_loss.max(e);
        }
        let got = r["residual"].as_f64().unwrap();
        assert!(
            (got - residuals[t]).abs() <= res_tol,
            "{mode} step {t}: residual {got} vs oracle {}",
            residuals[t]
        );
    }

    // Per step and tensor, buffers included in running-stats mode.
    let steps: Vec<u64> = (0..losses.len() as u64).collect();
    let ours = tensor_steps(out);
    let n_tensors = oracle["lca"].as_object().unwrap().len();
    assert_eq!(
        ours.len(),
        recs.len() * n_tensors,
        "one row per step and tensor"
    );
    // The worst relative error over every value, then the check (with the slack if asked).
    let worst = compare_step_tensor_lca(&ours, &oracle, &steps, f64::INFINITY);
    let slack = if slack { residuals.clone() } else { Vec::new() };
    compare_step_tensor_lca_with(&ours, &oracle, &steps, rtol, &slack);
    let over: Vec<String> = (0..recs.len())
        .flat_map(|t| {
            let lca = oracle["lca"].as_object().unwrap();
            let scale: f64 = lca.values().map(|v| v[t].as_f64().unwrap().abs()).sum();
            let ours = &ours;
            lca.iter().filter_map(move |(name, v)| {
                let want = v[t].as_f64().unwrap();
                let got = ours[&(t as u64, name.clone())];
                ((got - want).abs() > rtol * want.abs().max(0.01 * scale))
                    .then(|| format!("{t}/{name}"))
            })
        })
        .collect();
    if !over.is_empty() {
        eprintln!(
            "resnet {mode}: {} of {} values beyond {rtol:e}, each within the oracle's |r_t|: {over:?}",
            over.len(),
            ours.len()
        );
    }

    // Per tensor over the run: 1e-4 relative to max(|total|, 1e-3·|ΔL|), with no slack.
    let dl = losses[losses.len() - 1] - losses[0];
    for t in s["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let want: f64 = floats(&oracle["lca"][name]).iter().sum();
        let got = t["lca"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= rtol * want.abs().max(1e-3 * dl.abs()),
            "{mode} {name}: total lca {got} vs oracle {want}"
        );
    }

    // The buffers group: present exactly in running-stats mode, one tensor per running
    // statistic, and its LCA is the oracle's.
    let buffers: Vec<String> = oracle
        .get("path_buffers")
        .map(|b| {
            b.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    let layers: Vec<&str> = s["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    let mut want_layers = LAYERS.to_vec();
    if mode == "running-stats" {
        assert_eq!(
            buffers.len(),
            2 * 6,
            "running_mean and running_var of 6 BN layers"
        );
        want_layers.push("buffers");
    } else {
        assert!(buffers.is_empty());
    }
    assert_eq!(layers, want_layers);
    let buffer_rows: Vec<&serde_json::Value> = s["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["layer"] == "buffers")
        .collect();
    let names: Vec<&str> = buffer_rows
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, buffers, "buffer tensors");
    if !buffers.is_empty() {
        let want: f64 = buffers
            .iter()
            .map(|b| floats(&oracle["lca"][b]).iter().sum::<f64>())
            .sum();
        let got = s["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "buffers")
            .unwrap()["lca"]
            .as_f64()
            .unwrap();
        let dl = (losses[losses.len() - 1] - losses[0]).abs();
        assert!(
            (got - want).abs() <= rtol * want.abs().max(0.01 * dl),
            "buffers lca {got} vs oracle {want}"
        );
        assert!(
            want.abs() > 1e-3 * dl,
            "the buffers' share is not negligible"
        );
    }
    // Every num_batches_tracked is ignored (with a note), in both modes; in batch-stats mode
    // the running statistics too.
    let ignored = s["ignored_tensors"].as_array().unwrap();
    assert_eq!(ignored.len(), if buffers.is_empty() { 18 } else { 6 });

    // Small in both modes (the oracle: 0.13 % with batch statistics, 0.33 % with running
    // statistics, whose buffers are part of the allocation).
    let rel_abs = s["run"]["rel_abs_residual"].as_f64().unwrap();
    assert!(rel_abs < 5e-3, "{mode}: Σ|r|/|ΔL| = {rel_abs}");
    (worst_loss, worst, rel_abs)
}

/// `--precision f64`: the oracle's arithmetic, so agreement to 1e-9 in both modes.
///
/// Each batch-norm mode is a test of its own, so that the harness runs them in parallel.
fn f64_matches_the_oracle(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    run(mode, &out, &["--no-adaptive", "--precision", "f64"]);
    let (loss, lca, res) = check_against_oracle(mode, &out, 1e-9, 1e-10, 1e-10, false);
    let oracle = json(&golden(mode, "oracle.json"));
    let want = oracle["summary"]["simpson"]["sum_abs_over_abs_dL"]
        .as_f64()
        .unwrap();
    assert!(
        (res - want).abs() <= 1e-9,
        "Σ|r|/|ΔL| {res} vs oracle {want}"
    );
    eprintln!(
        "resnet {mode} f64: max loss error {loss:.1e}, max relative LCA error {lca:.1e}, Σ|r|/|ΔL| {:.4}%",
        100.0 * res
    );
}

#[test]
fn f64_matches_the_oracle_with_batch_stats() {
    f64_matches_the_oracle("batch-stats");
}

#[test]
fn f64_matches_the_oracle_with_running_stats() {
    f64_matches_the_oracle("running-stats");
}

/// f32 evaluation (accumulated in f64) and the per-step tolerance policy
/// (`--policy tolerance`, the default before issue 20) at its 1e-3 bound, which no step needs (the oracle's largest |r_t| is 6.0e-4, in running-stats
/// mode), so every step is plain Simpson like the oracle: 1e-4 relative, or within the
/// oracle's own |r_t| (integration points that sit within f32 rounding of a ReLU kink, such
/// as step 0's midpoint, see below), losses to 1e-6; and the per-layer and per-block views.
fn f32_matches_the_oracle_and_summarize_shows_layers_and_blocks(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    run(mode, &out, &["--policy", "tolerance"]);
    let (loss, lca, res) = check_against_oracle(mode, &out, 1e-4, 1e-6, 1e-5, true);
    eprintln!(
        "resnet {mode} f32: max loss error {loss:.1e}, max relative LCA error {lca:.1e}, Σ|r|/|ΔL| {:.4}%",
        100.0 * res
    );

    // --by layer: the first conv, every layer of both blocks, the last linear, in model
    // order (then the buffers group in running-stats mode); totals are the oracle's.
    let oracle = json(&golden(mode, "oracle.json"));
    let delta = {
        let l = floats(&oracle["losses"]);
        l[l.len() - 1] - l[0]
    };
    let layers = summarize(&out, "layer");
    let names: Vec<&str> = layers.iter().map(|r| r["layer"].as_str()).collect();
    assert_eq!(&names[..LAYERS.len()], LAYERS);
    assert_eq!(
        names.len(),
        LAYERS.len() + usize::from(mode == "running-stats")
    );
    let lca_map = oracle["lca"].as_object().unwrap();
    let mut layer_lca = HashMap::new();
    for r in &layers {
        let name = r["layer"].as_str();
        let want: f64 = lca_map
            .iter()
            .filter(|(k, _)| {
                if name == "buffers" {
                    k.ends_with(".running_mean") || k.ends_with(".running_var")
                } else {
                    k.rsplit_once('.').unwrap().0 == name
                        && !k.ends_with(".running_mean")
                        && !k.ends_with(".running_var")
                }
            })
            .map(|(_, v)| floats(v).iter().sum::<f64>())
            .sum();
        let got: f64 = r["lca"].parse().unwrap();
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1e-3 * delta.abs()),
            "{mode} layer {name}: {got} vs oracle {want}"
        );
        layer_lca.insert(name.to_string(), got);
    }

    // --by block: stem conv and BN, the two blocks, the linear layer (and buffers); each
    // block's LCA is the sum of its layers'.
    let blocks = summarize(&out, "block");
    let names: Vec<&str> = blocks.iter().map(|r| r["block"].as_str()).collect();
    let mut want = vec!["conv1", "bn1", "layer1.0", "layer2.0", "linear"];
    if mode == "running-stats" {
        want.push("buffers");
    }
    assert_eq!(names, want);
    for r in &blocks {
        let b = r["block"].as_str();
        let sum: f64 = layer_lca
            .iter()
            .filter(|(l, _)| *l == b || l.starts_with(&format!("{b}.")))
            .map(|(_, v)| v)
            .sum();
        let got: f64 = r["lca"].parse().unwrap();
        assert!(
            (got - sum).abs() <= 1e-9 * sum.abs().max(1e-6),
            "block {b}: {got} vs Σ layers {sum}"
        );
    }
    let p = |b: &str| -> usize {
        blocks.iter().find(|r| r["block"] == b).unwrap()["params"]
            .parse()
            .unwrap()
    };
    // 3·3·8·8 ·2 convs + 4·8 BN; 3·3·8·16 + 3·3·16·16 + 8·16 convs + 3·(2·16) BN.
    assert_eq!(p("layer1.0"), 1152 + 32);
    assert_eq!(p("layer2.0"), 1152 + 2304 + 128 + 96);
}

#[test]
fn f32_matches_the_oracle_and_summarize_shows_layers_and_blocks_with_batch_stats() {
    f32_matches_the_oracle_and_summarize_shows_layers_and_blocks("batch-stats");
}

#[test]
fn f32_matches_the_oracle_and_summarize_shows_layers_and_blocks_with_running_stats() {
    f32_matches_the_oracle_and_summarize_shows_layers_and_blocks("running-stats");
}

/// The library's full-set loss and gradient at the oracle's stored points θ_t + s·Δθ_t
/// (s = 0, ½, 1): in f64 to 1e-9 of each tensor's largest entry (loss to 1e-12), in f32 to
/// 1e-4; in running-stats mode the buffers' gradients too.
///
/// One exception in f32: at step 0's midpoint in batch-stats mode, pre-activations of
/// `layer1.0`'s ReLUs lie within 3.2e-8 and 8.3e-8 of the kink (f64 oracle), where f32 and
/// f64 arithmetic legitimately take different sides; the gradients of `layer1.0` and the
/// layers before it then differ by up to 7e-4 of their largest entry (1e-3 allowed there; the
/// other points stay below 2e-5).
fn gradients_match_pytorch_at_stored_points(mode: &str) {
    let p = Problem::load(&spec_path(mode), &fixture("resnet/ckpts"));
    let (m32, m64) = (p.model::<f32>(), p.model::<f64>());
    let n_buffers = m32.params.iter().filter(|p| p.buffer).count();
    assert_eq!(n_buffers, if mode == "running-stats" { 12 } else { 0 });
    let golden = Golden::load(&golden(mode, ""));
    let of_largest = |rtol| Tol { rtol, floor: 1.0 };
    // The one point near a ReLU kink (see above), in batch-stats mode only.
    const KINK: &[(u64, &str, Tol)] = &[(
        0,
        "0.5",
        Tol {
            rtol: 1e-3,
            floor: 1.0,
        },
    )];
    let r32 = p.gradients_at_stored_points(
        &m32,
        &golden,
        GradTol {
            loss: 1e-6,
            grad: of_largest(1e-4),
            except: if mode == "batch-stats" { KINK } else { &[] },
        },
        &format!("{mode} f32"),
    );
    let r64 = p.gradients_at_stored_points(
        &m64,
        &golden,
        GradTol {
            loss: 1e-12,
            grad: of_largest(1e-9),
            except: &[],
        },
        &format!("{mode} f64"),
    );
    assert_eq!(r32.tensors, 2 * 3 * m32.params.len());
    assert_eq!(r64.tensors, r32.tensors);
    eprintln!(
        "resnet {mode} gradients: f32 {:.1e}, f64 {:.1e}",
        r32.worst, r64.worst
    );
}

#[test]
fn gradients_match_pytorch_at_stored_points_with_batch_stats() {
    gradients_match_pytorch_at_stored_points("batch-stats");
}

#[test]
fn gradients_match_pytorch_at_stored_points_with_running_stats() {
    gradients_match_pytorch_at_stored_points("running-stats");
}
