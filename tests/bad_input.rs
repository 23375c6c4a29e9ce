//! Bad input: every case exits with status 2 and a message naming the culprit, never a panic,
//! never a half-written output.

mod common;
use common::*;

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
    // The NaN is met at the second step: the first is kept for --resume.
    fails_with(
        &t.run(&[]),
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
