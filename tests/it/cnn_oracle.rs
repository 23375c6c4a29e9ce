//! The CNN fixture (`fixtures/cnn`: conv, max-pool, strided grouped conv, avg-pool, flatten,
//! linear on 1×8×8 digits) against its PyTorch float64 oracle (`fixtures/cnn/golden`, see
//! fixtures/README.md): the real binary's losses, per-step and total per-tensor LCA, and
//! per-channel totals of `lca summarize --by neuron`; and the library's full-set gradients at
//! the stored points.
//!
//! `lca` evaluates in f32 (accumulating in f64), the oracle in f64. Tolerances:
//! - losses: 1e-6 absolute;
//! - LCA (per step and tensor, per tensor over the run, per channel over the run): 1e-4
//!   relative to max(|oracle value|, 1e-3·|ΔL|), where ΔL is the loss change of that step (of
//!   the run for totals). A value that cancels to near zero is thus measured against a
//!   thousandth of the loss change it is part of, which is below anything the tool reports
//!   as meaningful, instead of against its own (arbitrarily small) size;
//! - gradients: 1e-4 relative to max(|oracle entry|, 1e-3·max|oracle entry of the tensor|),
//!   for the same reason (an entry is a sum over 1797 samples that may cancel).

use crate::oracle::*;
use crate::util::*;
use std::collections::HashMap;

const RTOL: f64 = 1e-4;
const LOSS_ATOL: f64 = 1e-6;
/// Floor of the LCA comparisons, as a fraction of the loss change (see the module doc).
const LCA_FLOOR: f64 = 1e-3;
/// Floor of the gradient comparisons, as a fraction of the tensor's largest entry.
const GRAD_FLOOR: f64 = 1e-3;

#[test]
fn analyze_matches_pytorch_oracle() {
    let oracle = json(&fixture("cnn/golden/oracle.json"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // Plain Simpson, like the oracle (every oracle residual is below the default refinement
    // bound anyway; --no-adaptive makes the comparison independent of it).
    analyze("cnn", &out, &["--no-adaptive", "--quiet"]);

    let losses = floats(&oracle["losses"]);
    let steps = losses.len() - 1;
    let summary = json(&out.join("summary.json"));
    let recs = summary["steps"].as_array().unwrap();
    assert_eq!(recs.len(), steps);
    let mut worst_loss = 0.0f64;
    for r in recs {
        let t = r["step"].as_u64().unwrap() as usize;
        assert_eq!(r["next_step"].as_u64().unwrap() as usize, t + 1);
        for (got, want) in [
            (&r["loss_before"], losses[t]),
            (&r["loss_after"], losses[t + 1]),
        ] {
            let err = (got.as_f64().unwrap() - want).abs();
            assert!(err <= LOSS_ATOL, "step {t}: loss {got} vs oracle {want}");
            worst_loss = worst_loss.max(err);
        }
        assert_eq!(r["splits"].as_u64().unwrap(), 2, "plain Simpson");
    }

    // Per step and tensor (tensors.csv).
    let per_step = oracle["lca"].as_object().unwrap();
    let rows = csv_rows(&out.join("tensors.csv"));
    assert_eq!(rows.len(), steps * per_step.len());
    let mut worst_step = 0.0f64;
    for row in &rows {
        let t: usize = row["step"].parse().unwrap();
        let name = &row["tensor"];
        let want = per_step[name.as_str()][t].as_f64().unwrap();
        let got: f64 = row["lca"].parse().unwrap();
        let e = rel_err(got, want, LCA_FLOOR * (losses[t + 1] - losses[t]).abs());
        assert!(
            e <= RTOL,
            "step {t} {name}: lca {got} vs oracle {want} (relative error {e:.2e})"
        );
        worst_step = worst_step.max(e);
    }

    // Per tensor over the run (summary.json).
    let delta = losses[steps] - losses[0];
    let mut worst_total = 0.0f64;
    let tensors = summary["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), per_step.len());
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let want: f64 = floats(&per_step[name]).iter().sum();
        let got = t["lca"].as_f64().unwrap();
        let e = rel_err(got, want, LCA_FLOOR * delta.abs());
        assert!(
            e <= RTOL,
            "{name}: total lca {got} vs oracle {want} (relative error {e:.2e})"
        );
        worst_total = worst_total.max(e);
    }

    // Per channel over the run: `summarize --by neuron` sums, for output channel i, every
    // entry of weight[i, ...] and bias[i]; the oracle's per-entry totals give the same sums.
    let o = lca()
        .arg("summarize")
        .arg(&out)
        .args(["--by", "neuron", "--format", "csv", "--sort", "order"])
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut r = csv::Reader::from_reader(o.stdout.as_slice());
    let neurons: Vec<HashMap<String, String>> = r.deserialize().map(|x| x.unwrap()).collect();
    let elem = read_f64(&fixture("cnn/golden/lca_elementwise.safetensors"));
    let mut worst_neuron = 0.0f64;
    let mut checked = 0;
    for (layer, channels, per_channel) in [("conv1", 8, 9), ("conv2", 16, 4 * 9), ("fc", 10, 144)] {
        let (wshape, w) = &elem[&format!("total/{layer}.weight")];
        let (_, b) = &elem[&format!("total/{layer}.bias")];
        assert_eq!(wshape[0], channels);
        for i in 0..channels {
            let want: f64 = w[i * per_channel..(i + 1) * per_channel]
                .iter()
                .sum::<f64>()
                + b[i];
            let row = neurons
                .iter()
                .find(|n| n["layer"] == layer && n["neuron"] == i.to_string())
                .unwrap_or_else(|| panic!("no neuron row for {layer} {i}"));
            assert_eq!(row["params"], (per_channel + 1).to_string(), "{layer} {i}");
            let got: f64 = row["lca"].parse().unwrap();
            let e = rel_err(got, want, LCA_FLOOR * delta.abs());
            assert!(
                e <= RTOL,
                "{layer} channel {i}: lca {got} vs oracle {want} (relative error {e:.2e})"
            );
            worst_neuron = worst_neuron.max(e);
            checked += 1;
        }
    }
    assert_eq!(neurons.len(), checked, "one row per output channel");
    eprintln!(
        "cnn oracle: max loss error {worst_loss:.2e}; max relative LCA error per step {worst_step:.2e}, \
         per tensor total {worst_total:.2e}, per channel total {worst_neuron:.2e}"
    );
}

#[test]
fn gradients_match_pytorch_at_stored_points() {
    let p = Problem::load(&fixture("cnn/model.toml"), &fixture("cnn/ckpts"));
    assert_eq!(p.data.sample_shape(), &[1, 8, 8]);
    let r = p.gradients_at_stored_points(
        &p.model::<f32>(),
        &Golden::load(&fixture("cnn/golden")),
        GradTol {
            loss: LOSS_ATOL,
            grad: Tol {
                rtol: RTOL,
                floor: GRAD_FLOOR,
            },
            except: &[],
        },
        "cnn f32",
    );
    assert_eq!(r.tensors, 4 * 3 * 6);
    eprintln!(
        "cnn oracle gradients: max relative error {:.2e}, max loss error {:.2e}",
        r.worst, r.worst_loss
    );
}
