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

use assert_cmd::Command;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const RTOL: f64 = 1e-4;
const LOSS_ATOL: f64 = 1e-6;
/// Floor of the LCA comparisons, as a fraction of the loss change (see the module doc).
const LCA_FLOOR: f64 = 1e-3;
/// Floor of the gradient comparisons, as a fraction of the tensor's largest entry.
const GRAD_FLOOR: f64 = 1e-3;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

fn lca() -> Command {
    Command::cargo_bin("lca").expect("binary built")
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn csv_rows(path: &Path) -> Vec<HashMap<String, String>> {
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    r.deserialize().map(|x| x.expect("csv row")).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// f64 tensors of a safetensors file, by name, with their shapes.
fn read_f64(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F64, "{name}");
            let v = t
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, (t.shape().to_vec(), v))
        })
        .collect()
}

/// Relative error of `got` against `want`, measured against max(|want|, floor).
fn rel(got: f64, want: f64, floor: f64) -> f64 {
    (got - want).abs() / want.abs().max(floor)
}

#[test]
fn analyze_matches_pytorch_oracle() {
    let oracle = json(&fixture("cnn/golden/oracle.json"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // Plain Simpson, like the oracle (every oracle residual is below the default refinement
    // bound anyway; --no-adaptive makes the comparison independent of it).
    let o = lca()
        .arg("analyze")
        .arg(fixture("cnn/ckpts"))
        .arg("--spec")
        .arg(fixture("cnn/model.toml"))
        .arg("-o")
        .arg(&out)
        .args(["--no-adaptive", "--quiet"])
        .output()
        .expect("runs");
    assert!(
        o.status.success(),
        "lca analyze failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );

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
        let e = rel(got, want, LCA_FLOOR * (losses[t + 1] - losses[t]).abs());
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
        let e = rel(got, want, LCA_FLOOR * delta.abs());
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
            let e = rel(got, want, LCA_FLOOR * delta.abs());
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
    use lca::{checkpoint, data::Dataset, eval::Evaluator, net::Model, spec::Spec};
    let oracle = json(&fixture("cnn/golden/oracle.json"));
    let golden = read_f64(&fixture("cnn/golden/grads.safetensors"));
    let spec = Spec::load(&fixture("cnn/model.toml")).unwrap();
    let loss = match spec.loss {
        lca::spec::LossSpec::CrossEntropy {} => lca::net::LossKind::CrossEntropy,
        lca::spec::LossSpec::Mse {} => lca::net::LossKind::Mse,
    };
    let data = Dataset::load(
        &spec.train_path(),
        &spec.data,
        spec.model.input_shape.as_deref(),
        loss,
    )
    .unwrap();
    assert_eq!(data.sample_shape(), &[1, 8, 8]);
    let model = Model::<f32>::build(&spec, data.sample_shape()).unwrap();
    let eval = Evaluator {
        model: &model,
        data: &data,
        chunk_size: spec.eval.chunk_size,
    };
    let files = checkpoint::scan(&fixture("cnn/ckpts")).unwrap();
    let mut worst_grad = 0.0f64;
    let mut worst_loss = 0.0f64;
    let mut compared = 0;
    for t in oracle["grad_steps"].as_array().unwrap() {
        let t = t.as_u64().unwrap() as usize;
        let theta0 = checkpoint::load(&files[t], &model.params).unwrap().theta;
        let theta1 = checkpoint::load(&files[t + 1], &model.params)
            .unwrap()
            .theta;
        let delta = lca::lca::difference(&theta0, &theta1);
        for (sname, s) in [("0", 0.0), ("0.5", 0.5), ("1", 1.0)] {
            let r = eval
                .loss_and_grad(&lca::lca::point(&theta0, &delta, s))
                .unwrap();
            let want_loss = golden[&format!("step{t}/s{sname}/loss")].1[0];
            let e = (r.loss - want_loss).abs();
            assert!(
                e <= LOSS_ATOL,
                "step {t} s {s}: loss {} vs oracle {want_loss}",
                r.loss
            );
            worst_loss = worst_loss.max(e);
            for (p, got) in model.params.iter().zip(&r.grads) {
                let (shape, want) = &golden[&format!("step{t}/s{sname}/{}", p.name)];
                assert_eq!(shape, &p.shape, "{}", p.name);
                let floor = GRAD_FLOOR * want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
                    let e = rel(g, w, floor);
                    assert!(
                        e <= RTOL,
                        "step {t} s {s} {}[{k}]: gradient {g} vs oracle {w} (relative error {e:.2e})",
                        p.name
                    );
                    worst_grad = worst_grad.max(e);
                }
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 4 * 3 * 6);
    eprintln!(
        "cnn oracle gradients: max relative error {worst_grad:.2e}, max loss error {worst_loss:.2e}"
    );
}
