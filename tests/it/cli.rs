//! The binary end to end on valid input: checkpoint discovery and selection, dtypes, outputs,
//! `summarize` views and formats, determinism across thread counts.

use crate::util::*;

#[test]
fn filename_steps_sort_naturally_and_selection_options_work() {
    let t = tiny();
    // Rewrite without metadata: steps come from file names; add ckpt_10 to test natural order.
    for (k, name) in [(0, "ckpt_0"), (1, "ckpt_9"), (2, "ckpt_10")] {
        let (w, b) = tiny_params(k);
        std::fs::remove_file(t.ckpts.join(format!("ckpt_{k}.safetensors"))).ok();
        write_st(
            &t.ckpts.join(format!("{name}.safetensors")),
            &[
                T::f32("fc.weight", &[3, 4], &w),
                T::f32("fc.bias", &[3], &b),
            ],
            None,
        );
    }
    let o = t.run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&t.dir.path().join("out/summary.json"));
    let steps: Vec<(u64, u64)> = s["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["next_step"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(steps, vec![(0, 9), (9, 10)]);
    assert_eq!(s["checkpoints"][0]["step_source"], "file_name");
    assert_eq!(s["step_spacing"]["sparse"], true);
    assert!(!s["warnings"].as_array().unwrap().is_empty());

    let o = t.run(&["--first", "9"]);
    assert!(o.status.success());
    let s = json(&t.dir.path().join("out/summary.json"));
    assert_eq!(s["run"]["steps"], 1);
    assert_eq!(s["steps"][0]["step"], 9);
    let o = t.run(&["--every", "2"]);
    assert!(o.status.success());
    let s = json(&t.dir.path().join("out/summary.json"));
    assert_eq!(s["steps"][0]["next_step"], 10);
}

fn half_bytes(v: &[f32], bf: bool) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| {
            if bf {
                half::bf16::from_f32(x).to_bits().to_le_bytes()
            } else {
                half::f16::from_f32(x).to_bits().to_le_bytes()
            }
        })
        .collect()
}

#[test]
fn half_and_double_checkpoints_load() {
    for dtype in [
        safetensors::Dtype::F16,
        safetensors::Dtype::BF16,
        safetensors::Dtype::F64,
    ] {
        let t = tiny();
        for k in 0..3 {
            let (w, b) = tiny_params(k);
            let enc = |v: &[f32]| match dtype {
                safetensors::Dtype::F16 => half_bytes(v, false),
                safetensors::Dtype::BF16 => half_bytes(v, true),
                _ => v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
            };
            let ts = [
                T {
                    name: "fc.weight".into(),
                    dtype,
                    shape: vec![3, 4],
                    bytes: enc(&w),
                },
                T {
                    name: "fc.bias".into(),
                    dtype,
                    shape: vec![3],
                    bytes: enc(&b),
                },
                T::f32("fc.running_mean_unused", &[3], &[0.0; 3]),
            ];
            write_st(
                &t.ckpts.join(format!("ckpt_{k}.safetensors")),
                &ts,
                Some(k as u64),
            );
        }
        let o = analyze_run(&t.ckpts, &t.spec, &t.dir.path().join("out"), &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{dtype:?}: {err}");
        assert!(err.contains("ignoring 1 tensor"), "{err}");
        let s = json(&t.dir.path().join("out/summary.json"));
        assert_eq!(s["ignored_tensors"][0], "fc.running_mean_unused");
        assert!(
            s["run"]["rel_abs_residual"].as_f64().unwrap() < 1e-3,
            "{dtype:?}"
        );
    }
}

#[test]
fn outputs_are_identical_for_one_and_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    analyze("mlp", &a, &["--quiet", "-j", "1", "--params-csv"]);
    analyze("mlp", &b, &["--quiet", "-j", "2", "--params-csv"]);
    for f in [
        "summary.json",
        "steps.csv",
        "layers.csv",
        "tensors.csv",
        "params.csv",
        "totals.safetensors",
        "lca.safetensors",
    ] {
        let x = std::fs::read(a.join(f)).unwrap();
        let y = std::fs::read(b.join(f)).unwrap();
        assert!(x == y, "{f} differs between 1 and 2 threads");
    }
}

#[test]
fn lca_tensors_hold_per_step_values_that_sum_to_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    analyze(
        "mlp",
        &out,
        &["--quiet", "--lca-dtype", "f64", "--params-csv"],
    );
    let bytes = std::fs::read(out.join("lca.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = st.tensor("fc2.weight").unwrap();
    assert_eq!(w.shape(), &[100, 32, 32]);
    let v = lca::tensors::to_f64(&w).unwrap();
    let steps = tensor_steps(&out);
    for t in [0u64, 37, 99] {
        let s: f64 = v[t as usize * 1024..(t as usize + 1) * 1024].iter().sum();
        let want = steps[&(t, "fc2.weight".to_string())];
        assert!(
            (s - want).abs() <= 1e-12 * want.abs().max(1e-9),
            "step {t}: {s} vs {want}"
        );
    }
    // params.csv totals equal the per-step sums.
    let rows = csv_rows(&out.join("params.csv"));
    let r = rows
        .iter()
        .find(|r| r["tensor"] == "fc2.weight" && r["flat_index"] == "37")
        .unwrap();
    assert_eq!(r["index"], "[1, 5]");
    let total: f64 = (0..100).map(|t| v[t * 1024 + 37]).sum();
    let got: f64 = r["lca"].parse().unwrap();
    assert!(
        (got - total).abs() <= 1e-12 * total.abs().max(1e-12),
        "{got} vs {total}"
    );
    // totals.safetensors holds the same totals and step counts, bit for bit: the per-parameter
    // view read from it equals params.csv row for row.
    let o = lca()
        .args([
            "summarize",
            "--by",
            "param",
            "--sort",
            "order",
            "--format",
            "csv",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let view = csv_rows_str(&String::from_utf8(o.stdout).unwrap());
    assert_eq!(view.len(), rows.len());
    for (a, b) in view.iter().zip(&rows) {
        for k in [
            "tensor",
            "layer",
            "flat_index",
            "index",
            "helped_steps",
            "hurt_steps",
        ] {
            assert_eq!(a[k], b[k], "{k}");
        }
        let (x, y): (f64, f64) = (a["lca"].parse().unwrap(), b["lca"].parse().unwrap());
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "{} {}",
            a["tensor"],
            a["flat_index"]
        );
    }
}

#[test]
fn params_csv_is_written_only_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    analyze("mlp", &out, &["--quiet"]);
    assert!(!out.join("params.csv").exists());
    let totals = out.join("totals.safetensors");
    let bytes = std::fs::read(&totals).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = st.tensor("lca/fc1.weight").unwrap();
    assert_eq!(w.shape(), &[32, 64]);
    assert_eq!(
        st.tensor("helped_steps/fc1.weight").unwrap().dtype(),
        safetensors::Dtype::U16
    );
    // 12 bytes per parameter plus the header.
    let n = 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10;
    let len = std::fs::metadata(&totals).unwrap().len() as usize;
    assert!(
        len >= 12 * n && len < 12 * n + 4096,
        "{len} bytes for {n} parameters"
    );
    // The neuron view reads it.
    let o = lca()
        .args(["summarize", "--by", "neuron", "--top", "3"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8(o.stdout).unwrap().lines().count(), 4);
}

#[test]
fn summarize_views_and_formats() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    analyze("mlp", &out, &["--quiet", "--no-lca-tensors"]);
    let s = json(&out.join("summary.json"));
    let run = |args: &[&str]| {
        let o = lca()
            .arg("summarize")
            .arg(&out)
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    // Layers: table and json agree with summary.json; layers add up to ΣLCA.
    let table = run(&["--by", "layer"]);
    assert!(table.starts_with("layer"), "{table}");
    assert_eq!(table.lines().count(), 4);
    let layers: serde_json::Value =
        serde_json::from_str(&run(&["--by", "layer", "--format", "json"])).unwrap();
    let total: f64 = layers
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lca"].as_f64().unwrap())
        .sum();
    let lca_sum = s["run"]["lca_sum"].as_f64().unwrap();
    assert!((total - lca_sum).abs() < 1e-9, "{total} vs {lca_sum}");
    // Neurons: a neuron = weight row + bias entry; neurons add up to their layer.
    let neurons: serde_json::Value =
        serde_json::from_str(&run(&["--by", "neuron", "--format", "json"])).unwrap();
    let n = neurons.as_array().unwrap();
    assert_eq!(n.len(), 32 + 32 + 10);
    let fc3: f64 = n
        .iter()
        .filter(|r| r["layer"] == "fc3")
        .map(|r| r["lca"].as_f64().unwrap())
        .sum();
    let fc3_layer = layers
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["layer"] == "fc3")
        .unwrap()["lca"]
        .as_f64()
        .unwrap();
    assert!((fc3 - fc3_layer).abs() < 1e-9);
    assert!(n.iter().all(|r| r["params"] == 65 || r["params"] == 33));
    // Sorted most helpful first.
    let l: Vec<f64> = n.iter().map(|r| r["lca"].as_f64().unwrap()).collect();
    assert!(l.windows(2).all(|w| w[0] <= w[1]));
    // Steps as CSV, params with --top.
    let steps = run(&["--by", "iteration", "--format", "csv"]);
    assert_eq!(steps.lines().count(), 101);
    assert!(steps.starts_with("step,next_step,loss_before"));
    let top = run(&["--by", "param", "--top", "5", "--format", "csv"]);
    assert_eq!(top.lines().count(), 6);
    let tensors = run(&["--by", "tensor", "--sort", "hurt"]);
    assert_eq!(tensors.lines().count(), 7);
}

#[test]
fn summarize_rejects_a_directory_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let o = lca().arg("summarize").arg(dir.path()).output().unwrap();
    fails_with(&o, &["summary.json"]);
}

#[test]
fn rerun_replaces_a_previous_output() {
    let t = tiny();
    assert!(t.run(&[]).status.success());
    assert!(t.run(&["--no-lca-tensors"]).status.success());
    let s = json(&t.dir.path().join("out/summary.json"));
    assert_eq!(s["files"].as_array().unwrap().len(), 5);
    assert!(
        !t.dir.path().join("out/lca.safetensors").exists(),
        "stale file of the previous run"
    );
}

#[test]
fn npz_training_set_with_per_feature_normalisation() {
    use ndarray_npy::NpzWriter;
    let t = tiny();
    // The same data as the safetensors file, as .npz (x float64, y int32).
    let x = ndarray::Array2::from_shape_vec((10, 4), tiny_x().iter().map(|&v| v as f64).collect())
        .unwrap();
    let y = ndarray::Array1::from_iter((0..10i32).map(|i| i % 3));
    let npz = t.dir.path().join("train.npz");
    let mut w = NpzWriter::new(std::fs::File::create(&npz).unwrap());
    w.add_array("x", &x).unwrap();
    w.add_array("y", &y).unwrap();
    w.finish().unwrap();
    let a = t.run(&[]);
    assert!(a.status.success());
    let base = json(&t.dir.path().join("out/summary.json"));
    std::fs::write(&t.spec, TINY_SPEC.replace("train.safetensors", "train.npz")).unwrap();
    let b = t.run(&[]);
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let s = json(&t.dir.path().join("out/summary.json"));
    assert_eq!(s["run"]["loss_first"], base["run"]["loss_first"]);
    assert_eq!(s["run"]["lca_sum"], base["run"]["lca_sum"]);
    // Per-feature mean/std change the loss; a wrong count names the key.
    let spec = TINY_SPEC.replace(
        "train = \"train.safetensors\"\n",
        "train = \"train.npz\"\nmean = [0.1, 0.2, 0.3, 0.4]\nstd = [0.5, 0.5, 0.5, 0.25]\n",
    );
    std::fs::write(&t.spec, &spec).unwrap();
    let c = t.run(&[]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let s2 = json(&t.dir.path().join("out/summary.json"));
    assert_ne!(s2["run"]["loss_first"], base["run"]["loss_first"]);
    std::fs::write(
        &t.spec,
        spec.replace("mean = [0.1, 0.2, 0.3, 0.4]", "mean = [0.1, 0.2]"),
    )
    .unwrap();
    fails_with(
        &t.run(&[]),
        &["train.npz", "data.mean", "2 values", "4 features"],
    );
}

#[test]
fn no_progress_output_when_stderr_is_not_a_terminal() {
    // The test harness captures stderr through a pipe: the bar must stay hidden, leaving only
    // the final report, with no carriage returns or escape sequences.
    let t = tiny();
    let o = analyze_run(&t.ckpts, &t.spec, &t.dir.path().join("out"), &[]);
    assert!(o.status.success());
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
    assert!(!err.contains("evals"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 4, "{err}");
    assert!(lines[0].starts_with("analysed 2 steps"), "{err}");
    assert!(lines[2].starts_with("residual: "), "{err}");
    assert!(o.stdout.is_empty());
}

#[test]
fn completions_and_man_page_come_from_the_cli_definitions() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = lca().args(["completions", shell]).output().unwrap();
        assert!(o.status.success(), "{shell}");
        let s = String::from_utf8(o.stdout).unwrap();
        assert!(s.len() > 500, "{shell}: {s}");
        for word in [
            "analyze",
            "summarize",
            "plot",
            "check",
            "inspect",
            "max-residual",
        ] {
            assert!(s.contains(word), "{shell} completion lacks {word}");
        }
    }
    let o = lca().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));

    let o = lca().arg("man").output().unwrap();
    assert!(o.status.success());
    let man = String::from_utf8(o.stdout).unwrap();
    assert!(
        man.starts_with(".ie \\n(.g .ds Aq"),
        "{}",
        &man[..80.min(man.len())]
    );
    assert!(man.contains(".TH lca 1"), "{man}");
    for word in ["analyze", "plot", "check", "inspect", "completions"] {
        assert!(man.contains(word), "man page lacks {word}");
    }
    let dir = tempfile::tempdir().unwrap();
    let o = lca()
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success());
    for page in [
        "lca.1",
        "lca-analyze.1",
        "lca-plot.1",
        "lca-check.1",
        "lca-inspect.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
    let plot = std::fs::read_to_string(dir.path().join("lca-plot.1")).unwrap();
    assert!(plot.contains("heatmap"), "{plot}");
}
