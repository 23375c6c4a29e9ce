//! The journal and the output commit are crash-safe at every file-system operation: the test
//! hook `LCA_TEST_CRASH_AT=N` kills `lca analyze` (SIGKILL) right before its N-th operation
//! (every write, fsync, rename and removal of the journal and of the commit goes through one
//! counting function, `files::op`), and for every N until the run completes, `--resume` or a
//! plain rerun — following the advice of the other's refusal — ends with outputs
//! byte-identical to an uninterrupted run's and no journal left.

use crate::resume::{same_outputs, tiny_n};
use crate::util::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Run the tiny problem into `out`, killed before file-system operation `n`.
fn run_crashing(t: &Tiny, out: &Path, n: usize) -> std::process::Output {
    analyze_cmd(&t.ckpts, &t.spec, out, &["--quiet"])
        .env("LCA_TEST_CRASH_AT", n.to_string())
        .output()
        .unwrap()
}

/// The operation the hook killed the run before (from its last words on stderr).
fn killed_before(o: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.signal(), Some(9), "not killed by the hook: {err}");
    err.lines()
        .find_map(|l| l.split_once("killed before file-system operation "))
        .and_then(|(_, op)| op.split_once(": "))
        .map(|(_, op)| op.to_string())
        .unwrap_or_else(|| panic!("no hook message: {err}"))
}

/// Recover `out` with `--resume` (`resume`) or a plain run; when that is refused with the
/// designed message, follow its advice. Outputs must then equal `reference`.
fn recover(t: &Tiny, out: &Path, resume: bool, reference: &Path, what: &str) {
    let (first, then, refusal): (&[&str], &[&str], &str) = if resume {
        (&["--resume"], &[], "nothing to resume")
    } else {
        (&[], &["--resume"], "interrupted analysis")
    };
    let o = t.run_to(out, first);
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(refusal) && !err.contains("panicked"),
            "after a kill before {what}: {first:?} failed: {err}"
        );
        let o = t.run_to(out, then);
        assert!(
            o.status.success(),
            "after a kill before {what}: {first:?} refused, then {then:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    same_outputs(reference, out);
    assert!(
        !out.join(".lca-resume").exists(),
        "journal left after {what}"
    );
}

#[test]
fn a_kill_at_every_file_system_operation_is_recovered() {
    let t = tiny_n(4);
    let reference = t.dir.path().join("ref");
    assert!(t.run_to(&reference, &[]).status.success());
    // The directory holds a previous output of another kind (a part: its shard.json and
    // lca_l2.safetensors must go, its summary.json be replaced).
    let template = t.dir.path().join("template");
    assert!(t.run_to(&template, &["--shard", "0/1"]).status.success());
    assert!(template.join("shard.json").is_file());
    let mut ops = Vec::new();
    for n in 1.. {
        assert!(n < 500, "the run never got past the hook");
        let out = t.dir.path().join(format!("out{n}"));
        copy_dir(&template, &out);
        let o = run_crashing(&t, &out, n);
        if o.status.success() {
            // Past the last operation: an uninterrupted run.
            same_outputs(&reference, &out);
            break;
        }
        let what = killed_before(&o);
        let other = t.dir.path().join(format!("out{n}b"));
        copy_dir(&out, &other);
        recover(&t, &out, true, &reference, &what);
        recover(&t, &other, false, &reference, &what);
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
        ops.push(what);
    }
    // The sequence covered the journal's creation and saves and every stage of the commit.
    for needle in [
        "mkdir",
        "manifest.json",
        "state.bin",
        "fsync",
        "commit.json",
        "remove",
        "shard.json",
        "rename",
        "summary.json",
        "rmdir",
    ] {
        assert!(
            ops.iter().any(|o| o.contains(needle)),
            "no operation on {needle}: {ops:#?}"
        );
    }
    assert!(ops.len() > 30, "{ops:#?}");
}

#[test]
fn a_journal_left_beside_the_outputs_it_produced_is_removed_by_either_command() {
    // What a kill in the middle of removing the journal left in earlier versions: complete
    // outputs, no commit marker, the manifest and the state of the finished run. `--resume`
    // used to fail for ever, telling the user to run --resume; a plain run refused too.
    let t = tiny_n(4);
    let reference = t.dir.path().join("ref");
    assert!(t.run_to(&reference, &[]).status.success());
    let out = t.dir.path().join("out");
    // Kill the run at the commit's first operation: the journal holds finished steps.
    interrupted_before_commit(&t, &out);
    let saved = t.dir.path().join("journal");
    copy_dir(&out.join(".lca-resume"), &saved);
    assert!(saved.join("state.bin").is_file() && saved.join("manifest.json").is_file());
    assert!(t.run_to(&out, &["--resume"]).status.success());
    same_outputs(&reference, &out);
    copy_dir(&saved, &out.join(".lca-resume"));
    let other = t.dir.path().join("other");
    copy_dir(&out, &other);
    for (dir, args) in [(&out, &["--resume"][..]), (&other, &[][..])] {
        let o = analyze_run(&t.ckpts, &t.spec, dir, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("removed a resume journal left behind"),
            "{err}"
        );
        same_outputs(&reference, dir);
        assert!(!dir.join(".lca-resume").exists());
    }
}

/// Leave in `out` an analysis of `t` killed at the first operation of its commit: every step
/// is finished and in the journal, nothing is in place.
pub(crate) fn interrupted_before_commit(t: &Tiny, out: &Path) {
    for n in 1..200 {
        let _ = std::fs::remove_dir_all(out);
        let o = run_crashing(t, out, n);
        assert!(!o.status.success(), "no commit found");
        let what = killed_before(&o);
        if what.starts_with("fsync") && what.ends_with(".steps.csv.partial") {
            assert!(out.join(".lca-resume/state.bin").is_file());
            return;
        }
    }
    panic!("no commit found");
}
