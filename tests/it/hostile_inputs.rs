//! Issue 19, the input side: special files, reads bounded by the file, signals while inputs
//! are read, files replaced during a run, spec values and names checked at their key, caps on
//! numeric options, full-range integers, long output names. Each case runs the real binary.

use crate::util::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Wait for `child` at most `secs` seconds; kill it and fail if it is still running.
fn wait_at_most(mut child: std::process::Child, secs: u64) -> std::process::Output {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(secs) {
            child.kill().ok();
            panic!("lca still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(path: &std::path::Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

#[test]
fn device_files_as_data_or_spec_are_refused_promptly() {
    let t = tiny();
    std::fs::write(&t.spec, TINY_SPEC.replace("train.safetensors", "/dev/zero")).unwrap();
    let child = analyze_cmd(&t.ckpts, &t.spec, &t.dir.path().join("out"), &["--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_at_most(child, 60);
    fails_with(&o, &["/dev/zero", "not a regular file"]);
    let o = analyze_run(
        &t.ckpts,
        std::path::Path::new("/dev/zero"),
        &t.dir.path().join("out"),
        &["--quiet"],
    );
    fails_with(&o, &["/dev/zero", "not a regular file"]);
}

#[test]
fn a_fifo_as_data_or_checkpoint_is_refused_without_blocking() {
    let t = tiny();
    let fifo = t.ckpts.join("ckpt_3.safetensors");
    mkfifo(&fifo);
    let child = analyze_cmd(&t.ckpts, &t.spec, &t.dir.path().join("out"), &["--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_at_most(child, 60);
    fails_with(&o, &["ckpt_3.safetensors", "FIFO", "not a regular file"]);
    std::fs::remove_file(&fifo).unwrap();
    let data = t.dir.path().join("pipe.safetensors");
    mkfifo(&data);
    std::fs::write(
        &t.spec,
        TINY_SPEC.replace("train.safetensors", "pipe.safetensors"),
    )
    .unwrap();
    let child = analyze_cmd(&t.ckpts, &t.spec, &t.dir.path().join("out"), &["--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_at_most(child, 60);
    fails_with(&o, &["pipe.safetensors", "FIFO"]);
}

#[test]
fn first_sigterm_while_inputs_are_read_ends_the_run_at_once() {
    let t = tiny();
    let out = t.dir.path().join("out");
    let child = analyze_cmd(&t.ckpts, &t.spec, &out, &["--quiet"])
        .env("LCA_TEST_PREPARE_DELAY_MS", "60000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let o = wait_at_most(child, 10);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted while reading the inputs"),
        "{err}"
    );
    assert!(!out.join("summary.json").exists());
}

#[test]
fn dangling_symlink_or_loop_named_like_a_checkpoint_is_reported() {
    let t = tiny();
    let link = t.ckpts.join("ckpt_9.safetensors");
    std::os::unix::fs::symlink(t.dir.path().join("gone.safetensors"), &link).unwrap();
    fails_with(&t.run(&[]), &["ckpt_9.safetensors", "symbolic link"]);
    std::fs::remove_file(&link).unwrap();
    let (a, b) = (t.ckpts.join("a.safetensors"), t.ckpts.join("b.safetensors"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    fails_with(&t.run(&[]), &["symbolic link", "loop"]);
}

#[test]
fn step_number_too_large_for_u64_in_a_name_is_said_so() {
    let t = tiny();
    let (w, b) = tiny_params(5);
    write_st(
        &t.ckpts
            .join("ckpt_123456789012345678901234567890.safetensors"),
        &[
            T::f32("fc.weight", &[3, 4], &w),
            T::f32("fc.bias", &[3], &b),
        ],
        None,
    );
    fails_with(
        &t.run(&[]),
        &["123456789012345678901234567890", "too large for a step"],
    );
}

#[test]
fn checkpoint_replaced_by_another_of_the_same_size_during_the_run_is_named() {
    let t = tiny();
    for k in 3..8 {
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
    let victim = t.ckpts.join("ckpt_7.safetensors");
    let before = std::fs::metadata(&victim).unwrap().len();
    let out = t.dir.path().join("out");
    let child = analyze_cmd(&t.ckpts, &t.spec, &out, &["--quiet"])
        .env("LCA_TEST_STEP_DELAY_MS", "400")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the run has listed the checkpoints (its journal exists), then replace one
    // not yet loaded by a file of the same size with other values.
    let t0 = Instant::now();
    while !out.join(".lca-resume").exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (w, b) = tiny_params(1);
    let tmp = t.dir.path().join("other.safetensors");
    write_st(
        &tmp,
        &[
            T::f32("fc.weight", &[3, 4], &w),
            T::f32("fc.bias", &[3], &b),
        ],
        Some(7),
    );
    assert_eq!(std::fs::metadata(&tmp).unwrap().len(), before);
    std::fs::rename(&tmp, &victim).unwrap();
    let o = wait_at_most(child, 120);
    fails_with(&o, &["ckpt_7.safetensors", "replaced or rewritten"]);
}

#[test]
fn thread_and_split_counts_are_capped() {
    let t = tiny();
    fails_with(
        &t.run(&["--threads", "100000"]),
        &["--threads must be at most 1024"],
    );
    fails_with(
        &t.run(&["--max-splits", "1048576"]),
        &["--max-splits must be at most 65536"],
    );
}

#[test]
fn tied_naming_a_tensor_that_exists_nowhere_is_an_error() {
    let t = tiny();
    std::fs::write(
        &t.spec,
        TINY_SPEC.replace(
            "out_features = 3\n",
            "out_features = 3\ntied = { weight = \"fc.wieght\" }\n",
        ),
    )
    .unwrap();
    fails_with(
        &t.run(&[]),
        &[
            "model.toml",
            "tied.weight",
            "'fc.wieght'",
            "not a parameter of any layer",
        ],
    );
}

#[test]
fn nan_or_negative_eps_and_nan_slope_are_refused_at_their_key() {
    let t = tiny();
    for (layer, needle) in [
        (
            "[[layers]]\nname = \"ln\"\ntype = \"layer_norm\"\nnormalized_shape = 3\neps = nan\n",
            "`eps` must be a finite number > 0, got NaN",
        ),
        (
            "[[layers]]\nname = \"ln\"\ntype = \"layer_norm\"\nnormalized_shape = 3\neps = -1e-5\n",
            "`eps` must be a finite number > 0",
        ),
        (
            "[[layers]]\nname = \"act\"\ntype = \"leaky_relu\"\nnegative_slope = nan\n",
            "`negative_slope` must be a finite number",
        ),
    ] {
        let spec = TINY_SPEC.replace("[loss]", &format!("{layer}\n[loss]"));
        std::fs::write(&t.spec, spec).unwrap();
        fails_with(&t.run(&[]), &["model.toml:", needle]);
    }
}

#[test]
fn a_spec_of_100000_layers_parses_and_builds() {
    // Linear in the number of layers (it was quadratic: minutes for this size). No timing
    // assertion: the run must simply complete.
    let t = tiny();
    let mut spec = TINY_SPEC.to_string();
    let at = spec.find("[loss]").unwrap();
    let mut layers = String::new();
    for i in 0..100_000 {
        layers.push_str(&format!("[[layers]]\nname = \"r{i}\"\ntype = \"relu\"\n\n"));
    }
    spec.insert_str(at, &layers);
    std::fs::write(&t.spec, spec).unwrap();
    let child = analyze_cmd(&t.ckpts, &t.spec, &t.dir.path().join("out"), &["--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_at_most(child, 300);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn report_with_a_long_but_legal_file_name_is_written() {
    let t = tiny();
    let out = t.dir.path().join("out");
    assert!(t.run(&[]).status.success());
    let name = format!("{}.html", "r".repeat(250));
    let file = t.dir.path().join(&name);
    let o = lca()
        .arg("report")
        .arg(&out)
        .arg("-o")
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(file.is_file());
}

#[test]
fn truncated_npz_member_is_reported_as_truncated() {
    let t = tiny();
    std::fs::write(&t.spec, TINY_SPEC.replace("train.safetensors", "train.npz")).unwrap();
    let x = npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (10, 4), }",
        &[0; 40],
    );
    let y = npy(
        "{'descr': '<i8', 'fortran_order': False, 'shape': (10,), }",
        &[0; 80],
    );
    std::fs::write(
        t.dir.path().join("train.npz"),
        stored_zip(&[("x.npy", &x), ("y.npy", &y)]),
    )
    .unwrap();
    let err = fails_with(&t.run(&[]), &["train.npz", "array 'x'", "truncated"]);
    assert!(!err.contains("unsupported dtype"), "{err}");
}

#[test]
fn npz_data_set_still_reads() {
    let t = tiny();
    std::fs::write(&t.spec, TINY_SPEC.replace("train.safetensors", "train.npz")).unwrap();
    let xb: Vec<u8> = tiny_x().iter().flat_map(|v| v.to_le_bytes()).collect();
    let yb: Vec<u8> = (0..10i64).flat_map(|i| (i % 3).to_le_bytes()).collect();
    let x = npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (10, 4), }",
        &xb,
    );
    let y = npy(
        "{'descr': '<i8', 'fortran_order': False, 'shape': (10,), }",
        &yb,
    );
    std::fs::write(
        t.dir.path().join("train.npz"),
        stored_zip(&[("x.npy", &x), ("y.npy", &y)]),
    )
    .unwrap();
    let npz_out = t.dir.path().join("npz");
    let o = t.run_to(&npz_out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(&t.spec, TINY_SPEC).unwrap();
    let st_out = t.dir.path().join("st");
    assert!(t.run_to(&st_out, &[]).status.success());
    let a = json(&npz_out.join("summary.json"));
    let b = json(&st_out.join("summary.json"));
    assert_eq!(a["tensors"], b["tensors"]);
    assert_eq!(a["steps"], b["steps"]);
}

#[test]
fn merge_part_with_data_offsets_ending_before_they_start_is_refused() {
    // fuzz/regressions/merge: overflowed in the part tensors reader.
    let bytes = std::fs::read(repo(
        "fuzz/regressions/merge/crash-c897279c393dcfb5a02bd55f2016185f529d5ec3",
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("part");
    std::fs::create_dir(&part).unwrap();
    let sep = b"\n--lca-fuzz-file--\n";
    let mut rest = &bytes[..];
    for name in ["shard.json", "summary.json", "lca.safetensors"] {
        let (this, next) = match rest.windows(sep.len()).position(|w| w == sep) {
            Some(i) if name != "lca.safetensors" => (&rest[..i], &rest[i + sep.len()..]),
            _ => (rest, &rest[rest.len()..]),
        };
        std::fs::write(part.join(name), this).unwrap();
        rest = next;
    }
    let o = lca()
        .arg("merge")
        .arg(&part)
        .arg("-o")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn negative_token_id_is_reported_against_tokens_not_y() {
    let dir = tempfile::tempdir().unwrap();
    let spec = std::fs::read_to_string(fixture("gpt/model.toml")).unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let mut ids: Vec<i64> = (0..4 * 33).map(|i| (i * 7 % 82) as i64).collect();
    ids[2 * 33 + 32] = -3; // only a target: sample 2, target position 31
    write_st(
        &dir.path().join("data/train.safetensors"),
        &[T::i64("tokens", &[4, 33], &ids)],
        None,
    );
    std::fs::write(dir.path().join("model.toml"), spec).unwrap();
    let o = analyze_run(
        &fixture("gpt/ckpts"),
        &dir.path().join("model.toml"),
        &dir.path().join("out"),
        &["--quiet", "--last", "1"],
    );
    let err = fails_with(
        &o,
        &[
            "'tokens' must hold token ids",
            "sample 2 target position 31",
            "-3",
        ],
    );
    assert!(!err.contains("'y'"), "{err}");
}

/// Run `lca init CKPT -o SPEC` and return (exit success, stdout + stderr).
fn init_draft(ckpt: &std::path::Path, spec: &std::path::Path) -> (bool, String) {
    let o = lca()
        .arg("init")
        .arg(ckpt)
        .arg("-o")
        .arg(spec)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    assert!(!text.contains("internal error"), "{text}");
    (o.status.success(), text)
}

/// A chain of `Linear(4→4)` modules with these names.
fn linear_chain(names: &[&str]) -> Vec<T> {
    names
        .iter()
        .flat_map(|n| {
            [
                T::f32(&format!("{n}.weight"), &[4, 4], &[0.5; 16]),
                T::f32(&format!("{n}.bias"), &[4], &[0.0; 4]),
            ]
        })
        .collect()
}

#[test]
fn init_with_hostile_tensor_names_writes_toml_that_reads_back_the_same_names() {
    let dir = tempfile::tempdir().unwrap();
    let names = [
        "q\"uote",
        "back\\slash",
        "new\nline",
        "x\n[[layers]]\ntype = \"relu\"\n#",
        "close]bracket",
        "[[layers]]",
        "ctrl\u{1}char",
        "nul\u{0}char",
        "carriage\rreturn",
        "tab\tname",
        "del\u{7f}char",
        "non-ascii é中",
        "line\u{2028}separator",
        "apostrophe's",
    ];
    let ckpt = dir.path().join("ckpt_0.safetensors");
    write_st(&ckpt, &linear_chain(&names), Some(0));
    let spec = dir.path().join("model.toml");
    let (ok, out) = init_draft(&ckpt, &spec);
    assert!(ok, "{out}");
    // The notice escapes control characters: a name cannot break or rewrite the terminal's lines.
    for c in ['\u{0}', '\u{1}', '\r', '\u{7f}'] {
        assert!(!out.contains(c), "{out:?}");
    }
    assert!(out.contains("new\\nline"), "{out}");
    // The draft parses, and its layers with parameters are exactly the checkpoint's modules,
    // names read back unchanged; nothing was injected by a name (only the guessed activations
    // between the layers, which the draft writes without a name).
    let text = std::fs::read_to_string(&spec).unwrap();
    let parsed = lca::spec::Spec::parse(&text, &spec).unwrap();
    let mut linear: Vec<&str> = parsed
        .layers
        .iter()
        .filter(|l| l.kind.type_name() == "linear")
        .map(|l| l.name.as_str())
        .collect();
    linear.sort();
    let mut want = names.to_vec();
    want.sort();
    assert_eq!(linear, want, "{text}");
    assert!(
        parsed
            .layers
            .iter()
            .all(|l| l.kind.type_name() == "linear" || (!l.named && l.kind.type_name() == "relu")),
        "{text}"
    );
    assert_eq!(parsed.layers.len(), 2 * names.len() - 1, "{text}");
}

#[test]
fn init_leaves_out_modules_whose_name_cannot_be_a_layer_name_and_names_their_tensors() {
    let dir = tempfile::tempdir().unwrap();
    // `weight` / `bias` (no module name) and `input.*` (the model input's reserved name)
    // beside a usable layer: the draft leaves them out, naming their tensors.
    let mut tensors = vec![
        T::f32("weight", &[4, 4], &[0.5; 16]),
        T::f32("bias", &[4], &[0.0; 4]),
    ];
    tensors.extend(linear_chain(&["input", "fc"]));
    let ckpt = dir.path().join("ckpt_0.safetensors");
    write_st(&ckpt, &tensors, Some(0));
    let spec = dir.path().join("model.toml");
    let (ok, out) = init_draft(&ckpt, &spec);
    assert!(ok, "{out}");
    assert!(
        out.contains("left out (written as comments): bias, weight, input"),
        "{out}"
    );
    let text = std::fs::read_to_string(&spec).unwrap();
    // The notes as one line each (comments are wrapped at about 96 columns).
    let unwrapped = text.replace("\n#   ", " ");
    for needle in [
        "its tensors have no module name",
        "'bias', 'weight'",
        "its module is named 'input'",
        "'input.bias', 'input.weight'",
    ] {
        assert!(unwrapped.contains(needle), "{needle}: {text}");
    }
    let parsed = lca::spec::Spec::parse(&text, &spec).unwrap();
    let names: Vec<&str> = parsed.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["fc"], "{text}");

    // With no usable module at all there is no spec to write: an error naming the tensors.
    let only = dir.path().join("only").join("ckpt_0.safetensors");
    std::fs::create_dir_all(only.parent().unwrap()).unwrap();
    write_st(
        &only,
        &[
            T::f32(".weight", &[4, 4], &[0.5; 16]),
            T::f32(".bias", &[4], &[0.0; 4]),
        ],
        Some(0),
    );
    let spec2 = dir.path().join("only.toml");
    let (ok, out) = init_draft(&only, &spec2);
    assert!(!ok, "{out}");
    for needle in ["ckpt_0.safetensors", "no layer", "'.bias', '.weight'"] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    assert!(!spec2.exists());
}
