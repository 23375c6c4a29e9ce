//! `lca inspect`: the dry run lists steps and tensors, validates like `analyze`, estimates the
//! work, and fails with exit status 2 on bad input without writing anything.

use crate::util::*;

fn inspect(
    ckpts: &std::path::Path,
    spec: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    lca()
        .arg("inspect")
        .arg(ckpts)
        .arg("--spec")
        .arg(spec)
        .args(extra)
        .output()
        .unwrap()
}

fn stdout(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn lists_steps_tensors_and_estimates_the_work() {
    let o = inspect(
        &fixture("mlp/ckpts"),
        &fixture("mlp/model.toml"),
        &["-j", "1"],
    );
    let s = stdout(&o);
    for needle in [
        "1797 samples of shape [64], evaluated in 8 chunk(s) of 256",
        "3466 parameters in 3 layer(s): fc1 (2080), fc2 (1056), fc3 (330)",
        "101 of 101 file(s)",
        "steps 0–100 (step numbers from `step` metadata)",
        "100 step(s), 1 training step(s) apart",
        "fc1.weight  fc1    [32, 64]  F32     2048",
        "fc3.bias    fc3    [10]      F32       10",
        "ok: all 101 selected checkpoints hold the 6 tensor(s) the spec needs",
        "201 full-set gradient evaluations (1 + 2·100 steps) before refinement",
        "at most 3201 if every step is refined to 32 sub-intervals",
        // 64·32 + 32·32 + 32·10 multiply-adds per sample.
        "1797 samples × 6 × 3392 MACs = 36.6 MFLOP",
        "total           7.4 GFLOP",
        "lca.safetensors 1.4 MB in f32",
        "measured: one full-set gradient evaluation at step 0 took",
        "on 1 thread(s) (loss 2.304509)",
        "estimate: about",
    ] {
        assert!(s.contains(needle), "lacks {needle:?}:\n{s}");
    }
}

#[test]
fn selection_method_and_no_time() {
    let o = inspect(
        &fixture("mlp/ckpts"),
        &fixture("mlp/model.toml"),
        &[
            "--first",
            "10",
            "--last",
            "20",
            "--every",
            "2",
            "--method",
            "trapezoid",
            "--no-time",
        ],
    );
    let s = stdout(&o);
    for needle in [
        "6 of 101 file(s)",
        "steps 10–20 (every 2)",
        "5 step(s), 2 training step(s) apart (sparse",
        "work (trapezoid):",
        "6 full-set gradient evaluations (1 + 1·5 steps) before refinement\n",
        "time            not measured (--no-time)",
    ] {
        assert!(s.contains(needle), "lacks {needle:?}:\n{s}");
    }
    assert!(!s.contains("measured:"), "{s}");
}

#[test]
fn ignored_tensors_are_listed() {
    let t = tiny();
    for k in 0..3 {
        let (w, b) = tiny_params(k);
        write_st(
            &t.ckpts.join(format!("ckpt_{k}.safetensors")),
            &[
                T::f32("fc.weight", &[3, 4], &w),
                T::f32("fc.bias", &[3], &b),
                T::f32("bn.running_mean", &[3], &[0.0; 3]),
            ],
            Some(k as u64),
        );
    }
    let s = stdout(&inspect(&t.ckpts, &t.spec, &["--no-time"]));
    assert!(s.contains("bn.running_mean  (ignored)  [3]"), "{s}");
    assert!(s.contains("1 tensor(s) will be ignored"), "{s}");
    assert!(s.contains("steps 0–2"), "{s}");
}

#[test]
fn bad_input_exits_2_with_the_culprit_named() {
    let t = tiny();
    // Wrong shape in the spec.
    let spec = t.dir.path().join("bad.toml");
    std::fs::write(
        &spec,
        TINY_SPEC.replace("in_features = 4", "in_features = 5"),
    )
    .unwrap();
    fails_with(
        &inspect(&t.ckpts, &spec, &["--no-time"]),
        &["in_features = 5"],
    );
    // A checkpoint missing a tensor.
    let (w, _) = tiny_params(1);
    write_st(
        &t.ckpts.join("ckpt_1.safetensors"),
        &[T::f32("fc.weight", &[3, 4], &w)],
        Some(1),
    );
    fails_with(
        &inspect(&t.ckpts, &t.spec, &["--no-time"]),
        &["ckpt_1.safetensors", "missing tensor 'fc.bias'"],
    );
    // Missing spec, empty selection, bad --max-splits.
    fails_with(
        &inspect(&t.ckpts, &t.dir.path().join("nope.toml"), &[]),
        &["nope.toml"],
    );
    fails_with(
        &inspect(
            &fixture("mlp/ckpts"),
            &fixture("mlp/model.toml"),
            &["--first", "1000"],
        ),
        &["0 checkpoint(s) selected"],
    );
    fails_with(
        &inspect(
            &fixture("mlp/ckpts"),
            &fixture("mlp/model.toml"),
            &["--max-splits", "3"],
        ),
        &["--max-splits"],
    );
}

#[test]
fn a_tied_weight_stored_under_its_alias_is_labelled_as_such() {
    // fixtures/gpt stores the tied embedding only as `lm_head.weight` (save_model).
    let s = stdout(&inspect(
        &fixture("gpt/ckpts"),
        &fixture("gpt/model.toml"),
        &["--no-time"],
    ));
    let line = s
        .lines()
        .find(|l| l.trim_start().starts_with("lm_head.weight"))
        .unwrap_or_else(|| panic!("{s}"));
    assert!(
        line.contains("transformer.wte (tied: alias of transformer.wte.weight)"),
        "{line}"
    );
    assert!(!s.contains("(ignored)"), "{s}");
    assert!(!s.contains("will be ignored"), "{s}");
}
