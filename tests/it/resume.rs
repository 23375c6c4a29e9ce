//! Interrupted runs: `kill -9`, Ctrl-C (SIGINT) and failures mid-run leave a journal from
//! which `--resume` finishes with outputs byte-identical to an uninterrupted run; changed
//! inputs or options are refused; a checkpoint directory that changes during a run is
//! reported. The binary is slowed down with the test hook `LCA_TEST_STEP_DELAY_MS`.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const OUTPUTS: [&str; 8] = [
    "summary.json",
    "steps.csv",
    "layers.csv",
    "tensors.csv",
    "params.csv",
    "totals.safetensors",
    "lca.safetensors",
    "lca_validation.safetensors",
];

/// Start a slowed-down run in the background.
fn spawn_slow(ckpts: &Path, spec: &Path, out: &Path, extra: &[&str], delay_ms: u64) -> Child {
    analyze_cmd(ckpts, spec, out, extra)
        .env("LCA_TEST_STEP_DELAY_MS", delay_ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lca")
}

/// Finished steps recorded in `OUT/.lca-resume/state.bin` (0 when there is none yet).
fn journaled_steps(out: &Path) -> usize {
    let Ok(b) = std::fs::read(out.join(".lca-resume/state.bin")) else {
        return 0;
    };
    if b.len() < 24 || &b[..16] != b"lca-resume-st-1\n" {
        return 0;
    }
    let n = u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize;
    let Some(json) = b.get(24..24 + n) else {
        return 0;
    };
    let v: serde_json::Value = serde_json::from_slice(json).expect("state header");
    v["records"].as_array().map_or(0, |a| a.len())
}

/// Wait until `cond` holds (or panic after a minute, killing `child`).
fn wait_for(child: &mut Child, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            panic!("lca exited ({status}) before {what}: {err}");
        }
        if t0.elapsed() > Duration::from_secs(60) {
            child.kill().ok();
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Assert that two output directories hold the same files with the same bytes.
pub(crate) fn same_outputs(a: &Path, b: &Path) {
    let mut compared = 0;
    for f in OUTPUTS {
        let (pa, pb) = (a.join(f), b.join(f));
        assert_eq!(pa.exists(), pb.exists(), "{f} exists in one output only");
        if pa.exists() {
            let (x, y) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
            assert!(x == y, "{f} differs between the runs");
            compared += 1;
        }
    }
    assert!(compared >= 5);
    let leftovers: Vec<_> = std::fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

fn mlp() -> (PathBuf, PathBuf) {
    (fixture("mlp/ckpts"), fixture("mlp/model.toml"))
}

#[test]
fn kill_9_mid_run_then_resume_gives_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpts, spec) = mlp();
    let reference = dir.path().join("ref");
    let o = analyze_cmd(&ckpts, &spec, &reference, &["-q"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let out = dir.path().join("out");
    let mut child = spawn_slow(&ckpts, &spec, &out, &["-q"], 25);
    wait_for(&mut child, "10 journaled steps", || {
        journaled_steps(&out) >= 10
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let kept = journaled_steps(&out);
    assert!((10..100).contains(&kept), "{kept} steps journaled");
    // Nothing looks complete: only hidden temporary files and the journal.
    no_visible_outputs(&out);
    assert!(out.join(".steps.csv.partial").is_file());

    // A plain rerun does not throw the finished steps away.
    let o = analyze_cmd(&ckpts, &spec, &out, &["-q"]).output().unwrap();
    fails_with(&o, &["interrupted analysis", "--resume"]);
    assert!(journaled_steps(&out) >= kept);

    let o = analyze_cmd(&ckpts, &spec, &out, &["--resume"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming after step"), "{err}");
    same_outputs(&reference, &out);
}

/// The tiny problem with `n` checkpoints, a validation set and an L2 term.
pub(crate) fn tiny_n(n: usize) -> Tiny {
    let t = tiny();
    for k in 3..n {
        let (w, b) = tiny_params(k);
        write_st(
            &t.ckpts.join(format!("ckpt_{k}.safetensors")),
            &[
                T::f32("fc.weight", &[3, 4], &w),
                T::f32("fc.bias", &[3], &b),
            ],
            Some(k as u64),
        );
    }
    let y: Vec<i64> = (0..10).map(|i| (i + 1) % 3).collect();
    let x: Vec<f32> = tiny_x().iter().map(|v| 1.0 - v).collect();
    write_st(
        &t.dir.path().join("val.safetensors"),
        &[T::f32("x", &[10, 4], &x), T::i64("y", &[10], &y)],
        None,
    );
    std::fs::write(
        &t.spec,
        format!(
            "{}\n[regularization]\nl2 = 0.01\n",
            TINY_SPEC.replace(
                "train = \"train.safetensors\"",
                "train = \"train.safetensors\"\nvalidation = \"val.safetensors\"",
            )
        ),
    )
    .unwrap();
    t
}

#[test]
fn ctrl_c_stops_with_130_and_resume_completes() {
    let t = tiny_n(10);
    let args = ["--lca-dtype", "f64"];
    let reference = t.dir.path().join("ref");
    let o = t.run_to(&reference, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(reference.join("lca_validation.safetensors").is_file());

    let out = t.dir.path().join("out");
    let mut child = spawn_slow(&t.ckpts, &t.spec, &out, &args, 300);
    wait_for(&mut child, "2 journaled steps", || {
        journaled_steps(&out) >= 2
    });
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(err.contains("steps are finished and kept in"), "{err}");
    assert!(err.contains("to continue: "), "{err}");
    assert!(err.contains("--lca-dtype f64 --resume"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let kept = journaled_steps(&out);
    assert!((2..9).contains(&kept), "{kept}");
    no_visible_outputs(&out);

    let o = t.run_to(&out, &["--lca-dtype", "f64", "--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    same_outputs(&reference, &out);
}

#[test]
fn changed_inputs_or_options_refuse_to_resume() {
    let t = tiny_n(8);
    let out = t.dir.path().join("out");
    let mut child = spawn_slow(&t.ckpts, &t.spec, &out, &["-q"], 300);
    wait_for(&mut child, "3 journaled steps", || {
        journaled_steps(&out) >= 3
    });
    child.kill().unwrap();
    child.wait().unwrap();

    // Another option that changes the results.
    fails_with(
        &t.run_to(&out, &["--resume", "--method", "trapezoid"]),
        &["cannot resume", "--method was simpson, now trapezoid"],
    );
    fails_with(
        &t.run_to(&out, &["--resume", "--no-lca-tensors"]),
        &[
            "cannot resume",
            "lca.safetensors was --lca-dtype f32, now --no-lca-tensors",
        ],
    );
    // Another selection of checkpoints.
    fails_with(
        &t.run_to(&out, &["--resume", "--last", "5"]),
        &["cannot resume", "no longer ckpt_6.safetensors (step 6)"],
    );
    // A changed spec.
    let spec = std::fs::read_to_string(&t.spec).unwrap();
    std::fs::write(&t.spec, spec.replace("l2 = 0.01", "l2 = 0.02")).unwrap();
    fails_with(&t.run_to(&out, &["--resume"]), &["the spec changed"]);
    std::fs::write(&t.spec, &spec).unwrap();
    // A checkpoint that was already read, changed in place (same size, same header).
    let p = t.ckpts.join("ckpt_1.safetensors");
    let original = std::fs::read(&p).unwrap();
    let (mut w, b) = tiny_params(1);
    w[0] += 0.5;
    write_st(
        &p,
        &[
            T::f32("fc.weight", &[3, 4], &w),
            T::f32("fc.bias", &[3], &b),
        ],
        Some(1),
    );
    assert_eq!(std::fs::metadata(&p).unwrap().len(), original.len() as u64);
    fails_with(
        &t.run_to(&out, &["--resume"]),
        &[
            "ckpt_1.safetensors",
            "changed since the interrupted run read it",
            "sha256",
        ],
    );
    // Every refusal kept the journal: with the original inputs the run resumes.
    std::fs::write(&p, &original).unwrap();
    let o = t.run_to(&out, &["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = t.dir.path().join("ref");
    let o = t.run_to(&reference, &[]);
    assert!(o.status.success());
    same_outputs(&reference, &out);
}

#[test]
fn resume_with_nothing_to_resume() {
    let t = tiny();
    let out = t.dir.path().join("out");
    // No journal: a fresh run, with a note.
    let o = analyze_run(&t.ckpts, &t.spec, &out, &["--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no interrupted run to resume"), "{err}");
    // A finished output and no journal: nothing to resume.
    fails_with(
        &t.run(&["--resume"]),
        &["finished analysis", "nothing to resume"],
    );
    // Without --resume the finished output is replaced, as always.
    assert!(t.run(&[]).status.success());
}

#[test]
fn a_run_killed_during_commit_is_completed_by_the_next() {
    let t = tiny();
    let reference = t.dir.path().join("ref");
    assert!(t.run_to(&reference, &[]).status.success());
    // The state a kill between the commit record and the last rename leaves: some outputs
    // renamed, the rest (summary.json among them) still temporary, an old summary.json of
    // another run in place.
    let out = t.dir.path().join("out");
    std::fs::create_dir_all(out.join(".lca-resume")).unwrap();
    let names = [
        "steps.csv",
        "layers.csv",
        "tensors.csv",
        "totals.safetensors",
        "lca.safetensors",
        "summary.json",
    ];
    for (i, n) in names.iter().enumerate() {
        let to = if i < 2 {
            out.join(n)
        } else {
            out.join(format!(".{n}.partial"))
        };
        std::fs::copy(reference.join(n), to).unwrap();
    }
    std::fs::write(out.join("summary.json"), "{\"old\": true}").unwrap();
    std::fs::write(
        out.join(".lca-resume/commit.json"),
        serde_json::to_vec(&names).unwrap(),
    )
    .unwrap();
    let o = t.run(&["--resume"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    same_outputs(&reference, &out);
}

#[test]
fn failure_mid_run_keeps_finished_steps_for_resume() {
    // A checkpoint truncated while the run goes on (a directory still being written).
    let t = tiny_n(6);
    let out = t.dir.path().join("out");
    let mut child = spawn_slow(&t.ckpts, &t.spec, &out, &[], 300);
    wait_for(&mut child, "1 journaled step", || {
        journaled_steps(&out) >= 1
    });
    let p = t.ckpts.join("ckpt_5.safetensors");
    let original = std::fs::read(&p).unwrap();
    std::fs::write(&p, &original[..original.len() - 10]).unwrap();
    let o = child.wait_with_output().unwrap();
    fails_with(
        &o,
        &[
            "ckpt_5.safetensors",
            "changed size while lca was running",
            "still being written",
            "steps are finished and kept",
            "--resume",
        ],
    );
    no_visible_outputs(&out);
    // Once the file is complete again, the run resumes to the same outputs.
    std::fs::write(&p, &original).unwrap();
    let o = t.run_to(&out, &["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = t.dir.path().join("ref");
    assert!(t.run_to(&reference, &[]).status.success());
    same_outputs(&reference, &out);
}

#[test]
fn checkpoint_appearing_during_the_run_is_reported() {
    let t = tiny_n(5);
    let out = t.dir.path().join("out");
    let mut child = spawn_slow(&t.ckpts, &t.spec, &out, &[], 200);
    // The checkpoints are listed before the journal is created.
    wait_for(&mut child, "the journal", || {
        out.join(".lca-resume/manifest.json").is_file()
    });
    let (w, b) = tiny_params(7);
    write_st(
        &t.ckpts.join("ckpt_7.safetensors"),
        &[
            T::f32("fc.weight", &[3, 4], &w),
            T::f32("fc.bias", &[3], &b),
        ],
        Some(7),
    );
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("ckpt_7.safetensors appeared after the checkpoints were listed"),
        "{err}"
    );
    let s = json(&out.join("summary.json"));
    assert_eq!(s["run"]["steps"], 4);
    let warnings = s["warnings"].to_string();
    assert!(
        warnings.contains("ckpt_7.safetensors appeared"),
        "{warnings}"
    );
}

#[test]
fn two_runs_never_write_into_one_directory() {
    let t = tiny_n(6);
    let out = t.dir.path().join("out");
    let mut child = spawn_slow(&t.ckpts, &t.spec, &out, &["-q"], 200);
    wait_for(&mut child, "the journal", || {
        out.join(".lca-resume/manifest.json").is_file()
    });
    fails_with(
        &t.run_to(&out, &[]),
        &["out", "in use by another lca analyze"],
    );
    fails_with(
        &t.run_to(&out, &["--resume"]),
        &["in use by another lca analyze"],
    );
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = t.dir.path().join("ref");
    assert!(t.run_to(&reference, &[]).status.success());
    same_outputs(&reference, &out);
}

#[test]
fn an_edited_finished_row_in_a_journal_table_is_refused() {
    // It used to be carried into the final steps.csv: the journal recorded only the tables'
    // lengths. Now it records their sha256 too.
    let t = tiny_n(4);
    let out = t.dir.path().join("out");
    crate::crash::interrupted_before_commit(&t, &out);
    let table = out.join(".steps.csv.partial");
    let orig = std::fs::read_to_string(&table).unwrap();
    let row = orig.lines().nth(1).unwrap();
    let pos = orig.find(row).unwrap() + row.find(|c: char| c.is_ascii_digit() && c != '0').unwrap();
    let mut edited = orig.clone().into_bytes();
    edited[pos] = if edited[pos] == b'9' {
        b'8'
    } else {
        edited[pos] + 1
    };
    std::fs::write(&table, &edited).unwrap();
    fails_with(
        &t.run_to(&out, &["--resume"]),
        &[
            ".steps.csv.partial",
            "changed since the interrupted run wrote them",
            "delete",
        ],
    );
    // Restored, the run resumes to the outputs of an uninterrupted one.
    std::fs::write(&table, &orig).unwrap();
    let o = t.run_to(&out, &["--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = t.dir.path().join("ref");
    assert!(t.run_to(&reference, &[]).status.success());
    same_outputs(&reference, &out);
}
