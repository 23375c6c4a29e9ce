//! Checkpoints people already have (torch.save zip and legacy, Lightning `.ckpt`, Hugging
//! Face `checkpoint-N/`, single and sharded) give byte-identical tables to the same weights
//! in safetensors; hostile files are refused with a message; a Recorder run directory and
//! the verification of the step-0 loss against PyTorch's.

use crate::util::{analyze_ok, analyze_run, fails_with, fixture, json, lca};
use std::path::Path;

const TABLES: [&str; 5] = [
    "steps.csv",
    "layers.csv",
    "tensors.csv",
    "params.csv",
    "lca.safetensors",
];

fn reference(tmp: &Path) -> std::path::PathBuf {
    let out = tmp.join("ref");
    analyze_ok(
        &fixture("mlp/ckpts"),
        &fixture("mlp/model.toml"),
        &out,
        &["--last", "2", "-q", "-j", "1"],
    );
    out
}

#[test]
fn every_format_gives_the_tables_of_the_safetensors_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let r = reference(tmp.path());
    for f in ["zip", "legacy", "lightning", "hf", "hf_sharded"] {
        let out = tmp.path().join(f);
        analyze_ok(
            &fixture(&format!("torch_formats/{f}")),
            &fixture("mlp/model.toml"),
            &out,
            &["-q", "-j", "1"],
        );
        for t in TABLES {
            let a = std::fs::read(r.join(t)).unwrap();
            let b = std::fs::read(out.join(t)).unwrap();
            assert!(a == b, "{f}: {t} differs from the safetensors analysis");
        }
        let s = json(&out.join("summary.json"));
        let steps: Vec<u64> = s["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [0, 1, 2], "{f}");
    }
}

#[test]
fn inspect_lists_foreign_checkpoints_and_their_steps() {
    // Lightning: steps from `global_step` (the file names say v3..v5).
    let o = lca()
        .args(["inspect", "--no-time", "--spec"])
        .arg(fixture("mlp/model.toml"))
        .arg(fixture("torch_formats/lightning"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains("steps 0–2") || text.contains("steps 0-2"),
        "{text}"
    );
    assert!(text.contains("fc1.weight"), "{text}");
}

fn one_file_dir(tmp: &Path, name: &str) -> std::path::PathBuf {
    let d = tmp.join(format!("d-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        fixture(&format!("torch_formats/hostile/{name}")),
        d.join(name),
    )
    .unwrap();
    d
}

#[test]
fn hostile_and_foreign_files_are_refused_with_what_they_are() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fixture("mlp/model.toml");
    let cases: [(&str, &[&str]); 7] = [
        (
            "evil.pt",
            &["evil.pt", "`os.system`", "never runs pickle code"],
        ),
        ("evil_legacy.pth", &["evil_legacy.pth", "`os.system`"]),
        ("truncated.pt", &["truncated.pt", "damaged zip archive"]),
        (
            "huge.pth",
            &[
                "huge.pth",
                "declares 1152921504606846976 element(s)",
                "left in the file",
            ],
        ),
        (
            "other.pt",
            &["a zip archive without data.pkl", "readme.txt"],
        ),
        ("notes.pt", &["looks like text", "epoch 3: loss 0.25"]),
        ("list.pt", &["holds a list of 1 item(s), not a state dict"]),
    ];
    for (name, needles) in cases {
        let d = one_file_dir(tmp.path(), name);
        let o = analyze_run(&d, &spec, &tmp.path().join("out"), &["-q"]);
        fails_with(&o, needles);
    }
    // An empty directory names every format it looked for.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = analyze_run(&empty, &spec, &tmp.path().join("out"), &["-q"]);
    fails_with(&o, &["no *.safetensors files", "*.pt", "checkpoint-N/"]);
}

/// A copy of the first three MLP checkpoints with metadata added to step 0, and a Recorder
/// run directory around them.
fn run_dir(tmp: &Path, torch_loss: Option<f64>) -> std::path::PathBuf {
    let run = tmp.join("run");
    let ck = run.join("checkpoints");
    std::fs::create_dir_all(&ck).unwrap();
    for s in 0..3 {
        let src = std::fs::read(fixture(&format!("mlp/ckpts/ckpt_{s}.safetensors"))).unwrap();
        let hlen = u64::from_le_bytes(src[..8].try_into().unwrap()) as usize;
        let mut h: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&src[8..8 + hlen]).unwrap();
        let mut meta = serde_json::Map::new();
        meta.insert("step".into(), s.to_string().into());
        if let (0, Some(l)) = (s, torch_loss) {
            meta.insert("lca.torch_loss".into(), format!("{l:?}").into());
            meta.insert("lca.torch_loss_dtype".into(), "float32".into());
            meta.insert("lca.batch_norm".into(), "running-stats".into());
        }
        h.insert("__metadata__".into(), meta.into());
        let mut hb = serde_json::to_vec(&h).unwrap();
        while !hb.len().is_multiple_of(8) {
            hb.push(b' ');
        }
        let mut out = (hb.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&hb);
        out.extend_from_slice(&src[8 + hlen..]);
        std::fs::write(ck.join(format!("step_{s:06}.safetensors")), out).unwrap();
    }
    let spec = std::fs::read_to_string(fixture("mlp/model.toml")).unwrap();
    std::fs::write(run.join("model.toml"), spec).unwrap();
    std::fs::create_dir_all(run.join("data")).unwrap();
    std::fs::copy(
        fixture("mlp/data/train.safetensors"),
        run.join("data/train.safetensors"),
    )
    .unwrap();
    std::fs::write(
        run.join("lca-run.json"),
        r#"{"format":"lca-run","format_version":1,"checkpoints":"checkpoints","spec":"model.toml","unsupported":[]}"#,
    )
    .unwrap();
    run
}

fn loss0(tmp: &Path) -> f64 {
    let r = reference(tmp);
    json(&r.join("summary.json"))["run"]["loss_first"]
        .as_f64()
        .unwrap()
}

#[test]
fn the_step_0_loss_is_verified_against_pytorchs() {
    let tmp = tempfile::tempdir().unwrap();
    let l = loss0(tmp.path());
    // Rounding-sized difference: accepted, recorded in summary.json, shown by inspect.
    let run = run_dir(tmp.path(), Some(l + 3e-9));
    let out = tmp.path().join("ok");
    let o = lca()
        .arg("analyze")
        .arg(&run)
        .arg("-o")
        .arg(&out)
        .args(["-j", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("agrees with PyTorch's"));
    let c = &json(&out.join("summary.json"))["loss_check"];
    assert_eq!(c["agree"], true);
    assert_eq!(c["enforced"], true);
    assert_eq!(c["lca_loss"].as_f64().unwrap(), l);
    assert_eq!(c["torch_loss"].as_f64().unwrap(), l + 3e-9);
    assert!(
        (c["tolerance"].as_f64().unwrap() - 16.0 * f64::from(f32::EPSILON) * (l + 3e-9)).abs()
            < 1e-14
    );
    // The tables equal the plain directory's (the check changes nothing else).
    let r = tmp.path().join("ref");
    assert_eq!(
        std::fs::read(r.join("steps.csv")).unwrap(),
        std::fs::read(out.join("steps.csv")).unwrap()
    );
    let i = lca().arg("inspect").arg(&run).output().unwrap();
    let text = String::from_utf8_lossy(&i.stdout);
    assert!(
        text.contains("loss check") && text.contains("agree"),
        "{text}"
    );

    // A difference of 1e-4 (a wrong spec): refused, exit 2, both numbers, nothing written.
    let bad_torch = l + 1e-4;
    let run2 = run_dir(&tmp.path().join("b"), Some(bad_torch));
    let out2 = tmp.path().join("bad");
    let o = lca()
        .arg("analyze")
        .arg(&run2)
        .arg("-o")
        .arg(&out2)
        .output()
        .unwrap();
    fails_with(
        &o,
        &[
            &format!("{l:.10}"),
            &format!("{bad_torch:.10}"),
            "-1.000e-4",
            "n_head",
            "scale/mean/std",
            "batch-norm mode",
            "--no-verify-loss",
        ],
    );
    assert!(!out2.join("summary.json").exists());
    let i = lca()
        .arg("inspect")
        .arg(&run2)
        .arg("--no-time")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&i.stdout);
    assert!(
        text.contains("DISAGREE") && text.contains("evaluated the loss"),
        "{text}"
    );
    // --no-verify-loss: runs, warns, records the disagreement.
    let o = lca()
        .arg("analyze")
        .arg(&run2)
        .arg("-o")
        .arg(&out2)
        .arg("--no-verify-loss")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning: --no-verify-loss"));
    let c = &json(&out2.join("summary.json"))["loss_check"];
    assert_eq!(c["agree"], false);
    assert_eq!(c["enforced"], false);
}

#[test]
fn checkpoints_without_a_recorded_loss_are_not_checked_and_run_dirs_without_spec_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    analyze_ok(
        &fixture("mlp/ckpts"),
        &fixture("mlp/model.toml"),
        &out,
        &["--last", "1", "-q"],
    );
    assert!(json(&out.join("summary.json")).get("loss_check").is_none());
    let run = run_dir(tmp.path(), None);
    std::fs::write(
        run.join("lca-run.json"),
        r#"{"format":"lca-run","checkpoints":"checkpoints","spec":null,"unsupported":[{"op":"torch.sin","where":"block","source":"net.py:43: h = torch.sin(x)","reason":"no lca layer type computes it"}]}"#,
    )
    .unwrap();
    let o = lca()
        .arg("analyze")
        .arg(&run)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    fails_with(
        &o,
        &[
            "no model spec",
            "torch.sin in block",
            "net.py:43",
            "--engine torch",
        ],
    );
    // Not a run directory and no --spec.
    let o = lca()
        .arg("analyze")
        .arg(fixture("mlp/ckpts"))
        .output()
        .unwrap();
    fails_with(&o, &["--spec is needed"]);
}
