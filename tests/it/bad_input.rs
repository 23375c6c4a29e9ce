//! Bad input: every case exits with status 2 and a message naming the culprit, never a panic,
//! never a half-written output.

use crate::util::*;

fn rewrite_ckpt(t: &Tiny, k: usize, tensors: &[T], step: Option<u64>) {
    write_st(
        &t.ckpts.join(format!("ckpt_{k}.safetensors")),
        tensors,
        step,
    );
}

#[test]
fn missing_tensor_names_file_tensor_and_shape() {
    let t = tiny();
    let (w, _) = tiny_params(1);
    rewrite_ckpt(&t, 1, &[T::f32("fc.weight", &[3, 4], &w)], Some(1));
    fails_with(
        &t.run(&[]),
        &["ckpt_1.safetensors", "missing tensor 'fc.bias'", "[3]"],
    );
}

#[test]
fn wrong_shape_names_file_tensor_expected_and_found() {
    let t = tiny();
    let (w, b) = tiny_params(2);
    rewrite_ckpt(
        &t,
        2,
        &[
            T::f32("fc.weight", &[4, 3], &w),
            T::f32("fc.bias", &[3], &b),
        ],
        Some(2),
    );
    fails_with(
        &t.run(&[]),
        &["ckpt_2.safetensors", "'fc.weight'", "[4, 3]", "[3, 4]"],
    );
}

#[test]
fn prefix_mismatch_gets_a_hint() {
    let t = tiny();
    for k in 0..3 {
        let (w, b) = tiny_params(k);
        rewrite_ckpt(
            &t,
            k,
            &[
                T::f32("module.fc.weight", &[3, 4], &w),
                T::f32("module.fc.bias", &[3], &b),
            ],
            Some(k as u64),
        );
    }
    fails_with(
        &t.run(&[]),
        &[
            "missing tensor 'fc.weight'",
            "module.fc.weight",
            "model.prefix",
        ],
    );
}

#[test]
fn non_float_parameter_is_refused() {
    let t = tiny();
    let (_, b) = tiny_params(0);
    rewrite_ckpt(
        &t,
        0,
        &[
            T::i64("fc.weight", &[3, 4], &[1; 12]),
            T::f32("fc.bias", &[3], &b),
        ],
        Some(0),
    );
    fails_with(&t.run(&[]), &["ckpt_0.safetensors", "'fc.weight'", "I64"]);
}

#[test]
fn nan_in_checkpoint_names_tensor_and_index() {
    let t = tiny();
    let (mut w, b) = tiny_params(2);
    w[5] = f32::NAN;
    rewrite_ckpt(
        &t,
        2,
        &[
            T::f32("fc.weight", &[3, 4], &w),
            T::f32("fc.bias", &[3], &b),
        ],
        Some(2),
    );
    // The NaN is met at the second step: the first is kept for --resume. (With the budget
    // policy every checkpoint is evaluated in its first pass, before any step is written: the
    // same error, with nothing kept; this test is about the streamed policy.)
    fails_with(
        &t.run(&["--policy", "tolerance"]),
        &[
            "ckpt_2.safetensors",
            "'fc.weight'",
            "NaN",
            "flat index 5",
            "1 of 2 steps are finished",
            "--resume",
        ],
    );
    // Nothing half-written: the failed run leaves no file under an output's name, only the
    // hidden journal and temporary files.
    let out = t.dir.path().join("out");
    let left: Vec<String> = std::fs::read_dir(&out)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.iter().all(|n| n.starts_with('.')),
        "left behind: {left:?}"
    );
    // A NaN in the first checkpoint stops the run before any step: nothing is left at all.
    let t = tiny();
    let (mut w, b) = tiny_params(0);
    w[0] = f32::NEG_INFINITY;
    rewrite_ckpt(
        &t,
        0,
        &[
            T::f32("fc.weight", &[3, 4], &w),
            T::f32("fc.bias", &[3], &b),
        ],
        Some(0),
    );
    let err = fails_with(&t.run(&[]), &["ckpt_0.safetensors", "-inf", "flat index 0"]);
    assert!(!err.contains("--resume"), "{err}");
    let out = t.dir.path().join("out");
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn truncated_checkpoint_is_reported() {
    let t = tiny();
    let p = t.ckpts.join("ckpt_1.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 7]).unwrap();
    fails_with(&t.run(&[]), &["ckpt_1.safetensors"]);
    std::fs::write(&p, &bytes[..5]).unwrap();
    fails_with(&t.run(&[]), &["ckpt_1.safetensors", "truncated"]);
}

#[test]
fn absurd_header_length_is_rejected() {
    let t = tiny();
    let p = t.ckpts.join("ckpt_1.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    fails_with(&t.run(&[]), &["ckpt_1.safetensors", "header length"]);
}

#[test]
fn empty_directory_and_single_checkpoint() {
    let t = tiny();
    for k in 1..3 {
        std::fs::remove_file(t.ckpts.join(format!("ckpt_{k}.safetensors"))).unwrap();
    }
    fails_with(&t.run(&[]), &["ckpts", "at least two"]);
    std::fs::remove_file(t.ckpts.join("ckpt_0.safetensors")).unwrap();
    fails_with(&t.run(&[]), &["ckpts", "no *.safetensors"]);
}

#[test]
fn duplicate_steps_name_both_files() {
    let t = tiny();
    let (w, b) = tiny_params(1);
    rewrite_ckpt(
        &t,
        2,
        &[
            T::f32("fc.weight", &[3, 4], &w),
            T::f32("fc.bias", &[3], &b),
        ],
        Some(1),
    );
    fails_with(
        &t.run(&[]),
        &[
            "step 1 appears twice",
            "ckpt_1.safetensors",
            "ckpt_2.safetensors",
        ],
    );
}

#[test]
fn file_without_step_is_named() {
    let t = tiny();
    let (w, b) = tiny_params(1);
    write_st(
        &t.ckpts.join("final.safetensors"),
        &[
            T::f32("fc.weight", &[3, 4], &w),
            T::f32("fc.bias", &[3], &b),
        ],
        None,
    );
    fails_with(&t.run(&[]), &["final.safetensors", "no step"]);
}

#[test]
fn unknown_spec_keys_name_key_and_line() {
    let t = tiny();
    std::fs::write(
        &t.spec,
        TINY_SPEC.replace(
            "out_features = 3",
            "out_features = 3\nactivation = \"relu\"",
        ),
    )
    .unwrap();
    fails_with(&t.run(&[]), &["model.toml:6", "activation", "'fc'"]);
    std::fs::write(
        &t.spec,
        TINY_SPEC.replace("chunk_size = 4", "chunk_size = 4\nthreads = 2"),
    )
    .unwrap();
    fails_with(&t.run(&[]), &["model.toml:15", "threads"]);
    std::fs::write(
        &t.spec,
        TINY_SPEC.replace("type = \"linear\"", "type = \"dense\""),
    )
    .unwrap();
    fails_with(&t.run(&[]), &["model.toml:3", "dense"]);
}

#[test]
fn shapes_that_do_not_chain_name_both_layers() {
    let t = tiny();
    let spec = TINY_SPEC.replace(
        "[loss]",
        "[[layers]]\ntype = \"relu\"\n\n[[layers]]\nname = \"head\"\ntype = \"linear\"\nin_features = 5\nout_features = 3\n\n[loss]",
    );
    std::fs::write(&t.spec, spec).unwrap();
    fails_with(
        &t.run(&[]),
        &["layer 'head'", "in_features = 5", "layer 'relu_1' gives 3"],
    );
}

fn rewrite_data(t: &Tiny, tensors: &[T]) {
    write_st(&t.dir.path().join("train.safetensors"), tensors, None);
}

#[test]
fn labels_out_of_range_name_the_sample() {
    let t = tiny();
    let mut y: Vec<i64> = (0..10).map(|i| i % 3).collect();
    y[7] = 3;
    rewrite_data(
        &t,
        &[T::f32("x", &[10, 4], &tiny_x()), T::i64("y", &[10], &y)],
    );
    fails_with(
        &t.run(&[]),
        &["train.safetensors", "label 3 at sample 7", "3 classes"],
    );
    y[7] = -1;
    rewrite_data(
        &t,
        &[T::f32("x", &[10, 4], &tiny_x()), T::i64("y", &[10], &y)],
    );
    fails_with(&t.run(&[]), &["train.safetensors", "sample 7 is -1"]);
}

#[test]
fn non_integer_labels_are_refused() {
    let t = tiny();
    let mut y: Vec<f32> = (0..10).map(|i| (i % 3) as f32).collect();
    y[4] = 1.5;
    rewrite_data(
        &t,
        &[T::f32("x", &[10, 4], &tiny_x()), T::f32("y", &[10], &y)],
    );
    fails_with(&t.run(&[]), &["train.safetensors", "sample 4 is 1.5"]);
}

#[test]
fn sample_count_mismatch_is_reported() {
    let t = tiny();
    let y: Vec<i64> = (0..9).map(|i| i % 3).collect();
    rewrite_data(
        &t,
        &[T::f32("x", &[10, 4], &tiny_x()), T::i64("y", &[9], &y)],
    );
    fails_with(&t.run(&[]), &["train.safetensors", "10 samples", "has 9"]);
}

#[test]
fn nan_in_data_names_the_sample() {
    let t = tiny();
    let mut x = tiny_x();
    x[4 * 6 + 2] = f32::INFINITY;
    let y: Vec<i64> = (0..10).map(|i| i % 3).collect();
    rewrite_data(&t, &[T::f32("x", &[10, 4], &x), T::i64("y", &[10], &y)]);
    fails_with(&t.run(&[]), &["train.safetensors", "sample 6"]);
}

#[test]
fn missing_data_file_and_tensor() {
    let t = tiny();
    let y: Vec<i64> = (0..10).map(|i| i % 3).collect();
    rewrite_data(
        &t,
        &[
            T::f32("inputs", &[10, 4], &tiny_x()),
            T::i64("y", &[10], &y),
        ],
    );
    fails_with(
        &t.run(&[]),
        &["train.safetensors", "no tensor 'x'", "inputs"],
    );
    std::fs::remove_file(t.dir.path().join("train.safetensors")).unwrap();
    fails_with(&t.run(&[]), &["train.safetensors"]);
}

#[test]
fn output_directory_with_foreign_content_is_refused() {
    let t = tiny();
    let out = t.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    fails_with(&t.run(&[]), &["out", "not empty"]);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn missing_spec_and_bad_options() {
    let t = tiny();
    std::fs::remove_file(&t.spec).unwrap();
    fails_with(&t.run(&[]), &["model.toml"]);
    let t = tiny();
    fails_with(&t.run(&["--max-splits", "12"]), &["--max-splits"]);
    fails_with(&t.run(&["--every", "0"]), &["--every"]);
}

/// The tiny checkpoint `k` as a raw header and data section, for hand-made damage.
fn tiny_raw(k: usize) -> (serde_json::Value, Vec<u8>) {
    let (w, b) = tiny_params(k);
    let mut data = f32_bytes(&w);
    data.extend(f32_bytes(&b));
    let header = serde_json::json!({
        "__metadata__": {"step": k.to_string()},
        "fc.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
        "fc.bias": {"dtype": "F32", "shape": [3], "data_offsets": [48, 60]},
    });
    (header, data)
}

#[test]
fn header_offsets_overrunning_the_file_name_the_tensor() {
    let t = tiny();
    let (h, data) = tiny_raw(1);
    // The data section lost its last 4 bytes, but the header still promises 60.
    write_raw_st(&t.ckpts.join("ckpt_1.safetensors"), &h, &data[..56]);
    let err = fails_with(
        &t.run(&[]),
        &[
            "ckpt_1.safetensors",
            "'fc.bias'",
            "data_offsets [48, 60]",
            "56 bytes",
        ],
    );
    // Reported when the directory is listed, before any step is computed.
    assert!(!err.contains("--resume"), "{err}");
    no_visible_outputs(&t.dir.path().join("out"));
}

#[test]
fn header_offsets_overlapping_name_both_tensors() {
    let t = tiny();
    let (mut h, data) = tiny_raw(2);
    h["fc.bias"]["data_offsets"] = serde_json::json!([40, 52]);
    write_raw_st(&t.ckpts.join("ckpt_2.safetensors"), &h, &data[..52]);
    fails_with(
        &t.run(&[]),
        &["ckpt_2.safetensors", "'fc.weight'", "'fc.bias'", "overlap"],
    );
}

#[test]
fn header_offsets_of_the_wrong_size_are_reported() {
    let t = tiny();
    let (mut h, data) = tiny_raw(0);
    h["fc.bias"]["shape"] = serde_json::json!([2]);
    write_raw_st(&t.ckpts.join("ckpt_0.safetensors"), &h, &data);
    fails_with(
        &t.run(&[]),
        &[
            "ckpt_0.safetensors",
            "'fc.bias'",
            "needs 8 bytes",
            "span 12",
        ],
    );
}

#[test]
fn header_that_is_not_json_is_reported() {
    let t = tiny();
    let p = t.ckpts.join("ckpt_1.safetensors");
    let mut bytes = (16u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"this is no json!");
    std::fs::write(&p, bytes).unwrap();
    fails_with(&t.run(&[]), &["ckpt_1.safetensors", "not valid JSON"]);
}

#[test]
fn header_metadata_that_is_not_strings_is_reported() {
    let t = tiny();
    let (mut h, data) = tiny_raw(1);
    h["__metadata__"] = serde_json::json!({"step": 1});
    write_raw_st(&t.ckpts.join("ckpt_1.safetensors"), &h, &data);
    fails_with(&t.run(&[]), &["ckpt_1.safetensors", "__metadata__"]);
}

#[test]
fn metadata_step_that_is_not_a_number_is_reported() {
    let t = tiny();
    let (mut h, data) = tiny_raw(1);
    h["__metadata__"]["step"] = "ten".into();
    write_raw_st(&t.ckpts.join("ckpt_1.safetensors"), &h, &data);
    fails_with(
        &t.run(&[]),
        &["ckpt_1.safetensors", "metadata `step`", "\"ten\""],
    );
}

#[test]
fn unsupported_dtypes_are_named() {
    // A dtype safetensors knows but parameters cannot be stored in.
    let t = tiny();
    let (mut h, mut data) = tiny_raw(1);
    h["fc.weight"]["dtype"] = "F8_E4M3".into();
    h["fc.weight"]["data_offsets"] = serde_json::json!([0, 12]);
    h["fc.bias"]["data_offsets"] = serde_json::json!([12, 24]);
    data.drain(12..48);
    write_raw_st(&t.ckpts.join("ckpt_1.safetensors"), &h, &data);
    fails_with(
        &t.run(&[]),
        &["ckpt_1.safetensors", "'fc.weight'", "F8_E4M3", "F32, F64"],
    );
    // A dtype nobody knows.
    let (mut h, data) = tiny_raw(1);
    h["fc.weight"]["dtype"] = "Q4_K".into();
    write_raw_st(&t.ckpts.join("ckpt_1.safetensors"), &h, &data);
    fails_with(
        &t.run(&[]),
        &[
            "ckpt_1.safetensors",
            "'fc.weight'",
            "unknown dtype \"Q4_K\"",
        ],
    );
}

#[test]
fn same_tensor_with_another_shape_in_a_later_step() {
    // Same number of values, another shape: never silently reinterpreted.
    let t = tiny();
    let (w, b) = tiny_params(2);
    rewrite_ckpt(
        &t,
        2,
        &[
            T::f32("fc.weight", &[2, 6], &w),
            T::f32("fc.bias", &[3], &b),
        ],
        Some(2),
    );
    fails_with(
        &t.run(&[]),
        &["ckpt_2.safetensors", "'fc.weight'", "[2, 6]", "[3, 4]"],
    );
}

#[test]
fn inf_in_a_half_precision_checkpoint_and_f64_beyond_f32() {
    let t = tiny();
    let (w, b) = tiny_params(1);
    let mut wb: Vec<u8> = w
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    wb[6..8].copy_from_slice(&half::f16::INFINITY.to_bits().to_le_bytes());
    let h = serde_json::json!({
        "__metadata__": {"step": "1"},
        "fc.weight": {"dtype": "F16", "shape": [3, 4], "data_offsets": [0, 24]},
        "fc.bias": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]},
    });
    wb.extend(f32_bytes(&b));
    write_raw_st(&t.ckpts.join("ckpt_1.safetensors"), &h, &wb);
    fails_with(
        &t.run(&[]),
        &["ckpt_1.safetensors", "'fc.weight'", "inf", "flat index 3"],
    );
    let t = tiny();
    let (w, b) = tiny_params(0);
    let mut wd: Vec<u8> = w.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect();
    wd[8..16].copy_from_slice(&1e300f64.to_le_bytes());
    let h = serde_json::json!({
        "__metadata__": {"step": "0"},
        "fc.bias": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
        "fc.weight": {"dtype": "F64", "shape": [3, 4], "data_offsets": [12, 108]},
    });
    let mut data = f32_bytes(&b);
    data.extend(wd);
    write_raw_st(&t.ckpts.join("ckpt_0.safetensors"), &h, &data);
    fails_with(
        &t.run(&[]),
        &[
            "ckpt_0.safetensors",
            "'fc.weight'",
            "1e300",
            "f32 range",
            "flat index 1",
        ],
    );
}

#[test]
fn overflow_in_the_forward_pass_names_the_checkpoint() {
    let t = tiny();
    let (_, b) = tiny_params(0);
    rewrite_ckpt(
        &t,
        0,
        &[
            T::f32("fc.weight", &[3, 4], &[3e38; 12]),
            T::f32("fc.bias", &[3], &b),
        ],
        Some(0),
    );
    fails_with(&t.run(&[]), &["ckpt_0.safetensors", "step 0", "loss"]);
}

#[test]
fn unreadable_checkpoint_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let t = tiny();
    let p = t.ckpts.join("ckpt_1.safetensors");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::File::open(&p).is_ok() {
        eprintln!(
            "skipped: running as a user (root?) whom mode 000 does not stop from reading; the case is covered where tests run unprivileged"
        );
        return;
    }
    fails_with(&t.run(&[]), &["ckpt_1.safetensors", "Permission denied"]);
}

#[test]
fn paths_of_the_wrong_kind_are_named() {
    let t = tiny();
    // The checkpoint "directory" is a file.
    let o = analyze_run(
        &t.ckpts.join("ckpt_0.safetensors"),
        &t.spec,
        &t.dir.path().join("out"),
        &[],
    );
    fails_with(&o, &["ckpt_0.safetensors", "is not a directory"]);
    // The spec is a directory.
    let o = analyze_run(&t.ckpts, &t.ckpts, &t.dir.path().join("out"), &[]);
    fails_with(&o, &["ckpts", "is a directory, not a spec file"]);
    // The training set is a directory.
    std::fs::write(
        &t.spec,
        TINY_SPEC.replace("train = \"train.safetensors\"", "train = \"ckpts\""),
    )
    .unwrap();
    fails_with(&t.run(&[]), &["ckpts", "is a directory, not a data file"]);
}

#[test]
fn unwritable_output_paths_are_named() {
    let t = tiny();
    let file = t.dir.path().join("notes.txt");
    std::fs::write(&file, "mine").unwrap();
    // -o is an existing file.
    fails_with(&t.run_to(&file, &[]), &["notes.txt", "not a directory"]);
    // -o lies under a regular file.
    let under = file.join("out");
    fails_with(
        &t.run_to(&under, &[]),
        &["notes.txt/out", "cannot create the output directory"],
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
}

#[test]
fn spec_that_is_not_utf8_names_the_line() {
    let t = tiny();
    let mut bytes = TINY_SPEC.as_bytes().to_vec();
    let at = TINY_SPEC.find("linear").unwrap();
    bytes[at] = 0xff;
    std::fs::write(&t.spec, bytes).unwrap();
    fails_with(&t.run(&[]), &["model.toml:3", "UTF-8"]);
}

#[test]
fn spec_that_is_not_toml_names_the_line() {
    let t = tiny();
    std::fs::write(&t.spec, "{\n  \"layers\": []\n}\n").unwrap();
    fails_with(&t.run(&[]), &["model.toml:1"]);
    std::fs::write(&t.spec, TINY_SPEC.replace("[loss]", "[loss")).unwrap();
    fails_with(&t.run(&[]), &["model.toml:7"]);
}

#[test]
fn spec_missing_a_required_key_or_layers() {
    let t = tiny();
    std::fs::write(
        &t.spec,
        TINY_SPEC.replace("train = \"train.safetensors\"", ""),
    )
    .unwrap();
    fails_with(&t.run(&[]), &["model.toml", "train"]);
    std::fs::write(
        &t.spec,
        "layers = []\n\n[loss]\ntype = \"mse\"\n\n[data]\ntrain = \"train.safetensors\"\n",
    )
    .unwrap();
    fails_with(&t.run(&[]), &["model.toml", "`layers` is empty"]);
}

#[test]
fn duplicate_layer_names_name_both_lines() {
    let t = tiny();
    let spec = TINY_SPEC.replace(
        "[loss]",
        "[[layers]]\nname = \"fc\"\ntype = \"relu\"\n\n[loss]",
    );
    std::fs::write(&t.spec, spec).unwrap();
    fails_with(
        &t.run(&[]),
        &["model.toml:7", "'fc' is used twice", "line 1"],
    );
}

#[test]
fn chunk_size_zero_names_the_line() {
    let t = tiny();
    std::fs::write(
        &t.spec,
        TINY_SPEC.replace("chunk_size = 4", "chunk_size = 0"),
    )
    .unwrap();
    fails_with(&t.run(&[]), &["model.toml:14", "chunk_size"]);
}

#[test]
fn preprocessing_settings_that_do_not_fit() {
    let t = tiny();
    std::fs::write(
        &t.spec,
        TINY_SPEC.replace(
            "train = \"train.safetensors\"",
            "train = \"train.safetensors\"\nmean = [0.1, 0.2]",
        ),
    )
    .unwrap();
    fails_with(
        &t.run(&[]),
        &["train.safetensors", "`data.mean` has 2 values", "4"],
    );
    std::fs::write(
        &t.spec,
        TINY_SPEC.replace(
            "train = \"train.safetensors\"",
            "train = \"train.safetensors\"\nstd = [0.0]",
        ),
    )
    .unwrap();
    fails_with(&t.run(&[]), &["model.toml:12", "`data.std` must not be 0"]);
    std::fs::write(
        &t.spec,
        format!("[model]\ninput_shape = [5]\n\n{TINY_SPEC}"),
    )
    .unwrap();
    fails_with(
        &t.run(&[]),
        &["train.safetensors", "`model.input_shape` is [5]"],
    );
}

#[test]
fn regularization_naming_an_unknown_tensor() {
    let t = tiny();
    std::fs::write(
        &t.spec,
        format!("{TINY_SPEC}\n[regularization]\nl2 = 0.01\ntensors = [\"fc.wieght\"]\n"),
    )
    .unwrap();
    fails_with(
        &t.run(&[]),
        &["model.toml:18", "fc.wieght", "fc.weight, fc.bias"],
    );
}

#[test]
fn data_file_that_is_not_safetensors_or_npz() {
    let t = tiny();
    std::fs::write(
        t.dir.path().join("train.safetensors"),
        b"PK\x03\x04 garbage",
    )
    .unwrap();
    fails_with(
        &t.run(&[]),
        &[
            "train.safetensors",
            "not a valid safetensors file",
            "header length",
        ],
    );
    std::fs::write(&t.spec, TINY_SPEC.replace("train.safetensors", "train.npz")).unwrap();
    std::fs::write(
        t.dir.path().join("train.npz"),
        b"PK\x03\x04 not a zip archive at all",
    )
    .unwrap();
    fails_with(&t.run(&[]), &["train.npz", "not a valid .npz file"]);
}

/// A `.npz` whose `x.npy` header declares 2^46 × 1 f32 values (256 TiB) over 16 bytes of
/// data must be refused for its size, naming the file, before anything of that size is
/// allocated (found by the `npz` fuzz target: today the process aborts with "memory
/// allocation of 281474976710656 bytes failed"). Crash input: fuzz/regressions/npz/.
#[test]
fn npz_header_declaring_an_enormous_shape_is_refused_before_allocating() {
    let t = tiny();
    std::fs::write(&t.spec, TINY_SPEC.replace("train.safetensors", "train.npz")).unwrap();
    let x = npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (70368744177664, 1), }",
        &[0; 16],
    );
    let y = npy(
        "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }",
        &[0; 16],
    );
    std::fs::write(
        t.dir.path().join("train.npz"),
        stored_zip(&[("x.npy", &x), ("y.npy", &y)]),
    )
    .unwrap();
    fails_with(&t.run(&[]), &["train.npz"]);
    no_visible_outputs(&t.dir.path().join("out"));
}

#[test]
fn data_with_zero_samples_or_no_sample_axis() {
    let t = tiny();
    rewrite_data(&t, &[T::f32("x", &[0, 4], &[]), T::i64("y", &[0], &[])]);
    fails_with(&t.run(&[]), &["train.safetensors", "'x' holds no samples"]);
    rewrite_data(&t, &[T::f32("x", &[], &[1.0]), T::i64("y", &[], &[0])]);
    fails_with(
        &t.run(&[]),
        &["train.safetensors", "'x' must have a sample axis"],
    );
}

/// Samples of no values: `x` or `y` of shape (N, 0). Found by the `npz` fuzz target (an
/// `.npz` with `x` and `y` of shape (4, 0) loaded, then `Dataset::chunk` indexed past the
/// empty targets and panicked); the same for `.safetensors`.
#[test]
fn data_whose_samples_hold_no_values_is_refused() {
    let t = tiny();
    rewrite_data(
        &t,
        &[T::f32("x", &[4, 0], &[]), T::i64("y", &[4], &[0, 1, 2, 0])],
    );
    fails_with(
        &t.run(&[]),
        &[
            "train.safetensors",
            "'x' has shape [4, 0]: each sample holds no values",
        ],
    );
    rewrite_data(
        &t,
        &[T::f32("x", &[4, 4], &[0.5; 16]), T::i64("y", &[4, 0], &[])],
    );
    fails_with(
        &t.run(&[]),
        &[
            "train.safetensors",
            "'y' has shape [4, 0]: each sample holds no values",
        ],
    );
    std::fs::write(&t.spec, TINY_SPEC.replace("train.safetensors", "train.npz")).unwrap();
    let x = npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 0), }",
        &[],
    );
    let y = npy(
        "{'descr': '<i8', 'fortran_order': False, 'shape': (4, 0), }",
        &[],
    );
    std::fs::write(
        t.dir.path().join("train.npz"),
        stored_zip(&[("x.npy", &x), ("y.npy", &y)]),
    )
    .unwrap();
    fails_with(&t.run(&[]), &["train.npz", "each sample holds no values"]);
    no_visible_outputs(&t.dir.path().join("out"));
}

#[test]
fn data_beyond_f32_after_preprocessing_names_the_sample() {
    let t = tiny();
    let mut x: Vec<f64> = tiny_x().iter().map(|&v| v as f64).collect();
    x[4 * 3 + 1] = 1e300;
    let y: Vec<i64> = (0..10).map(|i| i % 3).collect();
    rewrite_data(
        &t,
        &[
            T {
                name: "x".into(),
                dtype: safetensors::Dtype::F64,
                shape: vec![10, 4],
                bytes: x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
            T::i64("y", &[10], &y),
        ],
    );
    fails_with(
        &t.run(&[]),
        &["train.safetensors", "sample 3", "1e300", "f32 range"],
    );
}

#[test]
fn validation_set_with_a_bad_label_is_named() {
    let t = tiny();
    let mut y: Vec<i64> = (0..10).map(|i| i % 3).collect();
    y[2] = 5;
    write_st(
        &t.dir.path().join("val.safetensors"),
        &[T::f32("x", &[10, 4], &tiny_x()), T::i64("y", &[10], &y)],
        None,
    );
    std::fs::write(
        &t.spec,
        TINY_SPEC.replace(
            "train = \"train.safetensors\"",
            "train = \"train.safetensors\"\nvalidation = \"val.safetensors\"",
        ),
    )
    .unwrap();
    fails_with(&t.run(&[]), &["val.safetensors", "label 5 at sample 2"]);
}

#[test]
fn mse_targets_of_the_wrong_shape() {
    let t = tiny();
    std::fs::write(&t.spec, TINY_SPEC.replace("cross_entropy", "mse")).unwrap();
    rewrite_data(
        &t,
        &[
            T::f32("x", &[10, 4], &tiny_x()),
            T::f32("y", &[10, 2], &[0.5; 20]),
        ],
    );
    fails_with(
        &t.run(&[]),
        &["train.safetensors", "MSE targets have 2 values", "3"],
    );
}

#[test]
fn selection_leaving_one_checkpoint() {
    let t = tiny();
    fails_with(
        &t.run(&["--first", "2"]),
        &["ckpts", "1 checkpoint(s) selected"],
    );
    fails_with(&t.run(&["--last", "0"]), &["1 checkpoint(s) selected"]);
}

#[test]
fn bad_numeric_options_are_named() {
    let t = tiny();
    fails_with(&t.run(&["--tolerance=-1"]), &["--tolerance"]);
    fails_with(&t.run(&["--rel-tolerance", "NaN"]), &["--rel-tolerance"]);
    fails_with(&t.run(&["--threads", "0"]), &["--threads"]);
}

#[test]
fn header_naming_a_tensor_twice_is_reported() {
    // JSON parsers disagree on repeated keys (most keep the last): refused, as the safetensors
    // library does. Found by the checkpoint fuzz target.
    let t = tiny();
    let (w, b) = tiny_params(1);
    let h = r#"{"fc.bias":{"dtype":"F32","shape":[3],"data_offsets":[48,60]},"fc.weight":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]},"fc.bias":{"dtype":"F32","shape":[3],"data_offsets":[48,60]}}"#;
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend(f32_bytes(&w));
    bytes.extend(f32_bytes(&b));
    std::fs::write(t.ckpts.join("ckpt_1.safetensors"), bytes).unwrap();
    fails_with(
        &t.run(&[]),
        &["ckpt_1.safetensors", "header names 'fc.bias' twice"],
    );
}
