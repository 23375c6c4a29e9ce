//! Scale-out: `lca analyze --shard K/N` and `lca merge` give outputs identical to a single
//! run (bit for bit); merge refuses missing, duplicated and mismatched parts; `--shards N`
//! takes K from the job array's environment.

use crate::util::*;
use std::path::{Path, PathBuf};

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

/// The environment variables `--shards` reads, removed so that the tests do not depend on
/// where they run (a CI job may itself be a Slurm or Kubernetes task).
const ENV: [&str; 5] = [
    "JOB_COMPLETION_INDEX",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_STEP",
];

/// `lca analyze` of fixture `name` into `out` with `extra` arguments and environment.
fn analyze_env(
    name: &str,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    // Merging is bit for bit the single run with the per-step policy; with the budget policy
    // each shard has its own budget (docs/integration.md), so these tests pin the former.
    let args: Vec<&str> = ["-q", "--policy", "tolerance"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let mut c = assert_cmd::Command::from_std(analyze_cmd(
        &fixture(&format!("{name}/ckpts")),
        &fixture(&format!("{name}/model.toml")),
        out,
        &args,
    ));
    for v in ENV {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("runs")
}

fn ok(o: std::process::Output) -> std::process::Output {
    assert!(
        o.status.success(),
        "lca failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn merge(parts: &[PathBuf], out: &Path) -> std::process::Output {
    lca()
        .arg("merge")
        .args(parts)
        .arg("-o")
        .arg(out)
        .output()
        .expect("runs")
}

/// Run the N shards of fixture `name` into `dir/parts-N/K`.
fn shards(name: &str, dir: &Path, n: usize, extra: &[&str]) -> Vec<PathBuf> {
    (0..n)
        .map(|k| {
            let out = dir.join(format!("parts-{n}/{k}"));
            let spec = format!("{k}/{n}");
            let mut args = vec!["--shard", spec.as_str()];
            args.extend_from_slice(extra);
            ok(analyze_env(name, &out, &args, &[]));
            out
        })
        .collect()
}

/// Every output of `a` and `b` is the same, byte for byte.
fn same_outputs(a: &Path, b: &Path) {
    let mut compared = 0;
    for f in OUTPUTS {
        let (pa, pb) = (a.join(f), b.join(f));
        assert_eq!(pa.exists(), pb.exists(), "{f} exists in one output only");
        if pa.exists() {
            let (x, y) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
            assert!(
                x == y,
                "{f} differs between {} and {}",
                a.display(),
                b.display()
            );
            compared += 1;
        }
    }
    assert!(compared >= 5);
    // The figures of summary.json, compared as numbers too (the byte comparison above also
    // covers the paths, which are the same here).
    let (sa, sb) = (json(&a.join("summary.json")), json(&b.join("summary.json")));
    for key in [
        "run",
        "steps",
        "tensors",
        "layers",
        "checkpoints",
        "warnings",
    ] {
        assert_eq!(sa[key], sb[key], "summary.json `{key}` differs");
    }
    // Nothing of the parts leaks into the merged output.
    for f in ["shard.json", "lca_l2.safetensors"] {
        assert!(!b.join(f).exists(), "{f} in the merged output");
    }
}

#[test]
fn one_two_and_three_shards_merge_to_the_single_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    ok(analyze_env("mlp", &single, &[], &[]));
    let s = json(&single.join("summary.json"));
    let shas: Vec<String> = s["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["sha256"].as_str().unwrap().to_string())
        .collect();
    let single_evals = s["run"]["evaluations"].as_u64().unwrap();
    for n in 1..=3 {
        let mut parts = shards("mlp", dir.path(), n, &[]);
        // Each part says what it covers; together they cover the 100 steps once, and cost
        // one extra evaluation per shard beyond the first.
        let mut next = 0;
        let mut evals = 0;
        for (k, p) in parts.iter().enumerate() {
            let info = json(&p.join("shard.json"));
            assert_eq!(info["index"], k as u64);
            assert_eq!(info["count"], n as u64);
            assert_eq!(info["total_steps"], 100);
            let (a, b) = (
                info["first_step_index"].as_u64().unwrap() as usize,
                info["end_step_index"].as_u64().unwrap() as usize,
            );
            assert_eq!(a, next);
            assert!(b - a == 100 / n || b - a == 100_usize.div_ceil(n));
            next = b;
            let got: Vec<&str> = info["checkpoint_sha256"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(
                got,
                shas[a..=b].iter().map(String::as_str).collect::<Vec<_>>()
            );
            assert_eq!(info["inputs"]["integration"]["abs_tol"], 1e-3);
            assert_eq!(info["inputs"]["precision"], "f32");
            assert_eq!(info["inputs"]["lca_tensors"], "f32");
            assert_eq!(info["chunk_size"], 256);
            assert_eq!(info["inputs"]["checkpoints"].as_array().unwrap().len(), 101);
            let part = json(&p.join("summary.json"));
            assert_eq!(part["run"]["steps"], (b - a) as u64);
            evals += part["run"]["evaluations"].as_u64().unwrap();
        }
        assert_eq!(next, 100);
        assert_eq!(evals, single_evals + n as u64 - 1);
        // Any order of the parts.
        parts.reverse();
        let merged = dir.path().join(format!("merged-{n}"));
        let o = ok(merge(&parts, &merged));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("merged {n} parts")), "{err}");
        assert!(err.contains("analysed 100 steps (0 → 100)"), "{err}");
        same_outputs(&single, &merged);
    }
    // The merged output is an ordinary output: summarize reads it.
    let o = ok(lca()
        .args(["summarize", "--by", "layer"])
        .arg(dir.path().join("merged-3"))
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&o.stdout).contains("fc3"));
}

#[test]
fn held_out_set_l2_term_and_f64_tensors_merge_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    ok(analyze_env(
        "mlp_heldout",
        &single,
        &["--lca-dtype", "f64"],
        &[],
    ));
    let parts = shards("mlp_heldout", dir.path(), 3, &["--lca-dtype", "f64"]);
    assert!(parts[0].join("lca_l2.safetensors").is_file());
    let merged = dir.path().join("merged");
    ok(merge(&parts, &merged));
    same_outputs(&single, &merged);
    assert!(merged.join("lca_validation.safetensors").is_file());
}

#[test]
fn without_lca_tensors_the_merge_writes_none() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    ok(analyze_env(
        "mlp",
        &single,
        &["--no-lca-tensors", "--last", "20"],
        &[],
    ));
    let parts = shards("mlp", dir.path(), 2, &["--no-lca-tensors", "--last", "20"]);
    // Parts keep their f64 per-step values for the merge.
    assert!(parts[0].join("lca.safetensors").is_file());
    let merged = dir.path().join("merged");
    ok(merge(&parts, &merged));
    assert!(!merged.join("lca.safetensors").exists());
    same_outputs(&single, &merged);
}

#[test]
fn merge_refuses_missing_duplicated_and_mismatched_parts() {
    let dir = tempfile::tempdir().unwrap();
    let parts = shards("mlp", dir.path(), 3, &["--last", "30"]);
    let out = dir.path().join("merged");
    let show = |p: &Path| p.display().to_string();

    // A missing shard: named, with its steps.
    let o = merge(&[parts[0].clone(), parts[2].clone()], &out);
    fails_with(
        &o,
        &[
            "do not cover every step",
            "missing shard 1/3",
            "steps 10→20",
            &show(&parts[0]),
        ],
    );
    assert!(!out.join("summary.json").exists());

    // A duplicated shard.
    let o = merge(
        &[
            parts[0].clone(),
            parts[1].clone(),
            parts[2].clone(),
            parts[1].clone(),
        ],
        &out,
    );
    fails_with(&o, &["both shard 1/3", "given twice", &show(&parts[1])]);

    // A part made with another --tolerance.
    let other = dir.path().join("other-1");
    ok(analyze_env(
        "mlp",
        &other,
        &["--shard", "1/3", "--last", "30", "--tolerance", "1e-2"],
        &[],
    ));
    let o = merge(&[parts[0].clone(), other.clone(), parts[2].clone()], &out);
    fails_with(
        &o,
        &[
            "different inputs or options",
            "--tolerance was 1e-3, now 1e-2",
            &show(&other),
        ],
    );

    // A part of another split of the same steps.
    let two = dir.path().join("two-1");
    ok(analyze_env(
        "mlp",
        &two,
        &["--shard", "1/2", "--last", "30"],
        &[],
    ));
    let o = merge(&[parts[0].clone(), two.clone()], &out);
    fails_with(&o, &["is shard 1/2", "is shard 0/3", "same --shard N"]);

    // A part of another selection of checkpoints.
    let sel = dir.path().join("sel-2");
    ok(analyze_env(
        "mlp",
        &sel,
        &["--shard", "2/3", "--last", "33"],
        &[],
    ));
    let o = merge(&[parts[0].clone(), parts[1].clone(), sel.clone()], &out);
    fails_with(
        &o,
        &["different inputs or options", "selected checkpoints differ"],
    );

    // An ordinary output is not a part; nor is the output directory one.
    let single = dir.path().join("single");
    ok(analyze_env("mlp", &single, &["--last", "30"], &[]));
    let o = merge(&[parts[0].clone(), single.clone()], &out);
    fails_with(
        &o,
        &["is not a finished part", "no shard.json", &show(&single)],
    );
    let o = merge(&parts, &parts[0]);
    fails_with(&o, &["is also one of the parts"]);
    assert!(!out.exists() || !out.join("summary.json").exists());

    // All three: fine.
    ok(merge(&parts, &out));
}

#[test]
fn shards_takes_the_index_from_slurm_or_kubernetes() {
    let dir = tempfile::tempdir().unwrap();
    let index = |out: &Path| json(&out.join("shard.json"))["index"].as_u64().unwrap();
    let args = ["--shards", "3", "--last", "9"];
    // Slurm arrays numbered from 1 (--array=1-3) or from 0 (--array=0-2): the same shard.
    let a = dir.path().join("slurm1");
    ok(analyze_env(
        "mlp",
        &a,
        &args,
        &[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ],
    ));
    assert_eq!(index(&a), 1);
    let b = dir.path().join("slurm0");
    ok(analyze_env(
        "mlp",
        &b,
        &args,
        &[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_MIN", "0")],
    ));
    assert_eq!(index(&b), 1);
    assert_eq!(
        std::fs::read(a.join("steps.csv")).unwrap(),
        std::fs::read(b.join("steps.csv")).unwrap()
    );
    // Kubernetes Indexed Job: 0-based, and preferred when both are set.
    let c = dir.path().join("k8s");
    ok(analyze_env(
        "mlp",
        &c,
        &args,
        &[("JOB_COMPLETION_INDEX", "2"), ("SLURM_ARRAY_TASK_ID", "1")],
    ));
    assert_eq!(index(&c), 2);
    let info = json(&c.join("shard.json"));
    assert_eq!(info["first_step_index"], 6);
    assert_eq!(info["end_step_index"], 9);

    // Neither set, an array of the wrong size, an index out of range: refused.
    let bad = dir.path().join("bad");
    fails_with(
        &analyze_env("mlp", &bad, &args, &[]),
        &["JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID", "--shard K/3"],
    );
    fails_with(
        &analyze_env(
            "mlp",
            &bad,
            &args,
            &[
                ("SLURM_ARRAY_TASK_ID", "1"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
        ),
        &["4 tasks", "--shards is 3"],
    );
    fails_with(
        &analyze_env("mlp", &bad, &args, &[("JOB_COMPLETION_INDEX", "3")]),
        &["JOB_COMPLETION_INDEX=3", "numbered 0 to 2"],
    );
    fails_with(
        &analyze_env("mlp", &bad, &["--shard", "3/3"], &[]),
        &["numbered 0 to 2"],
    );
    // More shards than steps.
    fails_with(
        &analyze_env("mlp", &bad, &["--shard", "0/6", "--last", "5"], &[]),
        &["6 shards but only 5 step(s)"],
    );
    assert!(!bad.exists());
}

#[test]
fn merge_refuses_an_output_directory_holding_an_interrupted_analysis() {
    // `merge -o DIR` used to replace an interrupted analysis in DIR and delete its journal.
    let t = crate::resume::tiny_n(4);
    let out = t.dir.path().join("out");
    crate::crash::interrupted_before_commit(&t, &out);
    let parts: Vec<PathBuf> = (0..2)
        .map(|k| {
            let p = t.dir.path().join(format!("part{k}"));
            // The per-step policy: a merged run equals the single run bit for bit only there
            // (the budget policy budgets each shard on its own, docs/scale-out.md).
            ok(t.run_to(&p, &["--shard", &format!("{k}/2"), "--policy", "tolerance"]));
            p
        })
        .collect();
    fails_with(
        &merge(&parts, &out),
        &[
            "holds an interrupted analysis",
            "of 3 steps finished",
            "--resume",
            "choose another -o",
        ],
    );
    // Nothing was touched: the interrupted run still finishes with --resume.
    assert!(out.join(".lca-resume/state.bin").is_file());
    assert!(out.join(".steps.csv.partial").is_file());
    assert!(!out.join("summary.json").exists());
    ok(t.run_to(&out, &["--resume"]));
    let reference = t.dir.path().join("ref");
    ok(t.run_to(&reference, &[]));
    crate::resume::same_outputs(&reference, &out);
    // A directory with a finished output is replaced by merge, as by analyze.
    let single = t.dir.path().join("single");
    ok(t.run_to(&single, &["--policy", "tolerance"]));
    ok(merge(&parts, &out));
    crate::resume::same_outputs(&single, &out);
}

/// The part's `shard.json`, as JSON.
fn shard_json(part: &Path) -> serde_json::Value {
    json(&part.join("shard.json"))
}

/// Overwrite the first f64 of the tensor at data offset 0 in `path`; returns its name.
fn poke_first_value(path: &Path, v: f64) -> String {
    let mut b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let name = header
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, e)| *k != "__metadata__" && e["data_offsets"][0] == 0)
        .map(|(k, _)| k.clone())
        .unwrap();
    b[8 + n..8 + n + 8].copy_from_slice(&v.to_le_bytes());
    std::fs::write(path, b).unwrap();
    name
}

#[test]
fn merge_verifies_each_part_and_refuses_non_finite_values() {
    let dir = tempfile::tempdir().unwrap();
    let parts = shards("mlp", dir.path(), 2, &["--last", "10"]);
    let out = dir.path().join("merged");
    // Every file of a part has its sha256 in shard.json.
    let sums = shard_json(&parts[1])["files_sha256"].clone();
    for f in [
        "summary.json",
        "steps.csv",
        "tensors.csv",
        "lca.safetensors",
    ] {
        assert_eq!(sums[f].as_str().map(str::len), Some(64), "{f}: {sums}");
    }
    let edited = dir.path().join("edited");
    let fresh = |from: &Path| {
        let _ = std::fs::remove_dir_all(&edited);
        std::fs::create_dir_all(&edited).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), edited.join(e.file_name())).unwrap();
        }
    };
    let with = |p: &Path| vec![parts[0].clone(), p.to_path_buf()];
    let lca_file = edited.join("lca.safetensors");

    // An edited value: refused by its checksum (the merged output would contradict itself:
    // steps.csv from the part's summary, tensors.csv from the edited data).
    fresh(&parts[1]);
    poke_first_value(&lca_file, 1e-3);
    fails_with(
        &merge(&with(&edited), &out),
        &[
            &lca_file.display().to_string(),
            "differs from the file the shard wrote",
            "edited or damaged",
        ],
    );
    assert!(!out.exists());

    // An edited row of a table, likewise.
    fresh(&parts[1]);
    let steps = edited.join("steps.csv");
    let text = std::fs::read_to_string(&steps).unwrap();
    std::fs::write(&steps, text.replacen(",2,", ",3,", 1)).unwrap();
    assert_ne!(std::fs::read_to_string(&steps).unwrap(), text);
    fails_with(
        &merge(&with(&edited), &out),
        &["steps.csv", "differs from the file the shard wrote"],
    );

    // NaN, even with a matching checksum: refused naming the part's file, the tensor and the
    // step (it used to be merged into `"lca": null`, which summarize and check cannot read).
    for (bad, word) in [(f64::NAN, "NaN"), (f64::INFINITY, "inf")] {
        fresh(&parts[1]);
        let tensor = poke_first_value(&lca_file, bad);
        let mut info = shard_json(&edited);
        info["files_sha256"]["lca.safetensors"] =
            sha256_hex(&std::fs::read(&lca_file).unwrap()).into();
        std::fs::write(edited.join("shard.json"), info.to_string()).unwrap();
        let first = info["first_step"].as_u64().unwrap();
        fails_with(
            &merge(&with(&edited), &out),
            &[
                &lca_file.display().to_string(),
                &format!("tensor '{tensor}' holds {word} at step {first} (flat index 0)"),
                "run the shard again",
            ],
        );
        // Nothing is left behind (the replay stopped before the commit).
        let left: Vec<_> = std::fs::read_dir(&out).map_or(Vec::new(), |d| d.collect());
        assert!(left.is_empty(), "{left:?}");
    }

    // A part without checksums (an older lca, or a hand-made part) is refused.
    fresh(&parts[1]);
    let mut info = shard_json(&edited);
    info.as_object_mut().unwrap().remove("files_sha256");
    std::fs::write(edited.join("shard.json"), info.to_string()).unwrap();
    fails_with(
        &merge(&with(&edited), &out),
        &["records no checksums", "run the shard again"],
    );

    // The untouched parts still merge.
    ok(merge(&parts, &out));
}

fn sha256_hex(b: &[u8]) -> String {
    lca::tensors::sha256_hex(b)
}

/// Parts of the budget policy carry their error estimates (`lca_err`) through the merge: the
/// merged tables hold the parts' rows, and the run totals are √(Σ_t est_t²) over all steps.
#[test]
fn budget_parts_carry_their_error_estimates_through_merge() {
    let dir = tempfile::tempdir().unwrap();
    // The budget policy (the default; `shards` pins the per-step one).
    let parts: Vec<PathBuf> = (0..2)
        .map(|k| {
            let out = dir.path().join(format!("budget/{k}"));
            let shard = format!("{k}/2");
            analyze_ok(
                &fixture("mlp/ckpts"),
                &fixture("mlp/model.toml"),
                &out,
                &["-q", "--shard", &shard],
            );
            out
        })
        .collect();
    let merged = dir.path().join("merged");
    ok(merge(&parts, &merged));
    for table in ["tensors.csv", "layers.csv"] {
        let text = std::fs::read_to_string(merged.join(table)).unwrap();
        let header = text.lines().next().unwrap();
        assert!(header.ends_with(",lca_err"), "{table}: {header}");
        let rows: Vec<&str> = text.lines().skip(1).collect();
        let from_parts: Vec<String> = parts
            .iter()
            .flat_map(|p| {
                let t = std::fs::read_to_string(p.join(table)).unwrap();
                t.lines().skip(1).map(String::from).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(rows, from_parts, "{table}: the merged rows are the parts'");
    }
    let s = json(&merged.join("summary.json"));
    let rows = csv_rows(&merged.join("layers.csv"));
    for l in s["layers"].as_array().unwrap() {
        let name = l["name"].as_str().unwrap();
        let sq: f64 = rows
            .iter()
            .filter(|r| r["layer"] == name)
            .map(|r| r["lca_err"].parse::<f64>().unwrap().powi(2))
            .sum();
        let got = l["lca_err"]
            .as_f64()
            .expect("a merged layer has an error bar");
        assert!(
            (got - sq.sqrt()).abs() <= 1e-12 * got,
            "{name}: {got} vs {}",
            sq.sqrt()
        );
    }
    // A part without estimates (the tolerance policy) merges without them.
    let tol = shards("mlp", &dir.path().join("tol"), 2, &[]);
    let m2 = dir.path().join("merged-tol");
    ok(merge(&tol, &m2));
    let s = json(&m2.join("summary.json"));
    assert!(s["layers"][0].get("lca_err").is_none_or(|v| v.is_null()));
}
