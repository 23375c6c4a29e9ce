//! `lca check`: exit 0 when every check holds, 1 when one fails (saying which and with what
//! figures), 2 on unusable input.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn out() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // The figures asserted below are plain Simpson's (the per-step policy, which never
        // refines this run) with the first layer shared, as these figures were taken (the
        // cost model alone would not share this MLP's; the last digit differs by rounding);
        // the budget default is checked in integration_budget.rs.
        analyze(
            "mlp",
            &out,
            &[
                "--quiet",
                "--no-lca-tensors",
                "--policy",
                "tolerance",
                "--share-first-layer",
            ],
        );
        (dir, out)
    })
    .1
}

fn check(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let o = lca().arg("check").arg(dir).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        o.status.code().expect("exit code"),
        String::from_utf8(o.stdout).unwrap(),
        stderr,
    )
}

/// A copy of the example's output whose summary.json is edited by `f`.
fn edited(f: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut s = json(&out().join("summary.json"));
    f(&mut s);
    std::fs::write(
        dir.path().join("summary.json"),
        serde_json::to_string(&s).unwrap(),
    )
    .unwrap();
    dir
}

#[test]
fn passing_checks_exit_0_and_print_the_figures() {
    let (code, stdout, _) = check(
        out(),
        &[
            "--max-residual",
            "1e-3",
            "--max-step-residual",
            "1e-4",
            "--fail-if-layer-hurts",
            "fc1",
            "--fail-if-layer-hurts",
            "fc3",
            "--baseline",
            out().to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 8, "{stdout}");
    assert!(
        lines[..7].iter().all(|l| l.starts_with("PASS  ")),
        "{stdout}"
    );
    assert!(stdout.contains("residual Σ|r|/|ΔL|: 4.6"), "{stdout}");
    assert!(stdout.contains("(0.0469%) ≤ 1.000e-3"), "{stdout}");
    assert!(
        stdout.contains("layer fc3 does not hurt: total LCA -6.54"),
        "{stdout}"
    );
    assert!(
        stdout.contains("layer fc2 matches the baseline"),
        "{stdout}"
    );
    assert_eq!(lines[7], "7 passed, 0 failed");
}

#[test]
fn failing_checks_exit_1_and_say_which() {
    let (code, stdout, _) = check(
        out(),
        &["--max-residual", "1e-5", "--max-step-residual", "1e-3"],
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("FAIL  residual Σ|r|/|ΔL|: 4.689e-4 (0.0469%) > 1.000e-5"),
        "{stdout}"
    );
    assert!(stdout.contains("PASS  max step residual"), "{stdout}");
    assert!(stdout.ends_with("1 passed, 1 failed\n"), "{stdout}");

    let (code, stdout, _) = check(out(), &["--max-step-residual", "1e-6"]);
    assert_eq!(code, 1);
    assert!(
        stdout.contains("FAIL  max step residual |r_t|: 5.395e-5 at step 98→99 > 1.000e-6"),
        "{stdout}"
    );

    // A layer that hurt: make fc2's total positive.
    let hurt = edited(|s| s["layers"][1]["lca"] = 0.25.into());
    let (code, stdout, _) = check(
        hurt.path(),
        &[
            "--fail-if-layer-hurts",
            "fc2",
            "--fail-if-layer-hurts",
            "fc3",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        stdout.contains(
            "FAIL  layer fc2 does not hurt: total LCA +2.500000e-1 > 0 (it raised the loss)"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("PASS  layer fc3 does not hurt"), "{stdout}");
}

#[test]
fn baseline_comparison_uses_rtol_and_atol_and_missing_layers_fail() {
    // fc1 drifts by 1e-3 relative.
    let drift = edited(|s| {
        let v = s["layers"][0]["lca"].as_f64().unwrap();
        s["layers"][0]["lca"] = (v * 1.001).into();
    });
    let base = drift.path().to_str().unwrap();
    let (code, stdout, _) = check(out(), &["--baseline", base]);
    assert_eq!(code, 1, "default rtol 1e-4: {stdout}");
    assert!(
        stdout.contains("FAIL  layer fc1 matches the baseline"),
        "{stdout}"
    );
    assert!(
        stdout.contains("PASS  layer fc2 matches the baseline"),
        "{stdout}"
    );
    let (code, stdout, _) = check(out(), &["--baseline", base, "--rtol", "2e-3"]);
    assert_eq!(code, 0, "{stdout}");
    let (code, stdout, _) = check(
        out(),
        &["--baseline", base, "--rtol", "0", "--atol", "1e-3"],
    );
    assert_eq!(code, 0, "{stdout}");
    let (code, _, _) = check(
        out(),
        &["--baseline", base, "--rtol", "0", "--atol", "1e-4"],
    );
    assert_eq!(code, 1);

    // A layer on one side only fails, whichever side.
    let renamed = edited(|s| s["layers"][2]["name"] = "head".into());
    let (code, stdout, _) = check(out(), &["--baseline", renamed.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stdout.contains("FAIL  layer fc3 matches the baseline: total LCA -6.542269e-1, but the baseline has no layer 'fc3'"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAIL  layer head matches the baseline: the baseline has layer 'head'"),
        "{stdout}"
    );
}

#[test]
fn unusable_input_exits_2() {
    let empty = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (
            vec![
                empty.path().join("nope").display().to_string(),
                "--max-residual".into(),
                "1e-3".into(),
            ],
            &["no such directory"],
        ),
        (
            vec![
                empty.path().display().to_string(),
                "--max-residual".into(),
                "1e-3".into(),
            ],
            &["summary.json", "not found"],
        ),
        (vec![out().display().to_string()], &["nothing to check"]),
        (
            vec![
                out().display().to_string(),
                "--fail-if-layer-hurts".into(),
                "fc9".into(),
            ],
            &["no layer 'fc9'", "fc1, fc2, fc3"],
        ),
        (
            vec![out().display().to_string(), "--max-residual=-1".into()],
            &["--max-residual", "≥ 0"],
        ),
        (
            vec![
                out().display().to_string(),
                "--max-residual".into(),
                "1e-3".into(),
                "--rtol".into(),
                "1e-3".into(),
            ],
            &["--baseline"],
        ),
        (
            vec![
                out().display().to_string(),
                "--baseline".into(),
                empty.path().display().to_string(),
            ],
            &["summary.json", "not found"],
        ),
    ];
    for (args, needles) in cases {
        let o = lca().arg("check").args(&args).output().unwrap();
        fails_with(&o, needles);
        assert!(o.stdout.is_empty(), "{args:?}: stdout on error");
    }
    // A corrupt summary.
    std::fs::write(empty.path().join("summary.json"), "{\"schema_version\": 1").unwrap();
    let o = lca()
        .arg("check")
        .arg(empty.path())
        .args(["--max-residual", "1"])
        .output()
        .unwrap();
    fails_with(&o, &["not an lca summary"]);
}
