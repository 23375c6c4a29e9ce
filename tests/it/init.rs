//! `lca init`: a spec drafted from a fixture's checkpoint analyses to exactly the numbers of
//! the fixture's own spec — with no edits for `mlp`, and with only the documented edits
//! (docs/init.md: uncomment the held-out set and the L2 term) for `mlp_heldout`. The draft is
//! never written over an existing file without --force, and `lca inspect` points at the line
//! of a draft that does not fit.

use crate::util::*;
use std::path::Path;

/// Run `lca init` and return (stdout + stderr, success).
fn init(args: &[&std::ffi::OsStr]) -> (String, bool) {
    let o = lca().arg("init").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (text, o.status.success())
}

fn os(s: &Path) -> &std::ffi::OsStr {
    s.as_os_str()
}

/// Draft a spec for fixture `name` from its first checkpoint and its training set.
fn draft(name: &str, spec: &Path) -> String {
    let (out, ok) = init(&[
        os(&fixture(&format!("{name}/ckpts/ckpt_0.safetensors"))),
        "--data".as_ref(),
        os(&fixture(&format!("{name}/data/train.safetensors"))),
        "-o".as_ref(),
        os(spec),
    ]);
    assert!(ok, "lca init failed: {out}");
    assert!(
        out.contains("the draft builds a model that fits the data"),
        "{out}"
    );
    std::fs::read_to_string(spec).unwrap()
}

/// Analyse fixture `name`'s checkpoints with `spec` into `out`.
fn analyze_with(name: &str, spec: &Path, out: &Path) {
    analyze_ok(&fixture(&format!("{name}/ckpts")), spec, out, &["--quiet"]);
}

/// The run figures of summary.json and tensors.csv must be identical, bit for bit.
fn assert_same_numbers(ours: &Path, theirs: &Path) {
    let a = json(&ours.join("summary.json"));
    let b = json(&theirs.join("summary.json"));
    assert_eq!(a["run"], b["run"], "summary.json run figures differ");
    assert_eq!(a["model"]["params"], b["model"]["params"]);
    assert_eq!(a["data"]["sample_shape"], b["data"]["sample_shape"]);
    let ta = std::fs::read(ours.join("tensors.csv")).unwrap();
    let tb = std::fs::read(theirs.join("tensors.csv")).unwrap();
    assert!(ta == tb, "tensors.csv differs");
}

#[test]
fn mlp_draft_needs_no_edits() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("model.toml");
    let text = draft("mlp", &spec);
    assert!(text.contains("# TODO(lca init):"), "{text}");
    assert!(text.contains("scale = 0.0625"), "{text}");
    assert!(text.contains("type = \"cross_entropy\""), "{text}");
    analyze_with("mlp", &spec, &dir.path().join("ours"));
    analyze("mlp", &dir.path().join("theirs"), &["--quiet"]);
    assert_same_numbers(&dir.path().join("ours"), &dir.path().join("theirs"));
}

/// The edits docs/init.md documents for a held-out set and an L2 term: uncomment the
/// `validation` line the draft found next to the training set, and the `[regularization]`
/// block with λ set.
fn resolve_heldout_todos(text: &str, lambda: &str) -> String {
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("# validation = ") {
            out.push(format!("validation = {v}"));
        } else if line == "# [regularization]" {
            out.push("[regularization]".to_string());
        } else if line.starts_with("# l2 = ") {
            out.push(format!("l2 = {lambda}"));
        } else {
            out.push(line.to_string());
        }
    }
    out.join("\n") + "\n"
}

#[test]
fn mlp_heldout_draft_needs_only_the_documented_edits() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("model.toml");
    let text = draft("mlp_heldout", &spec);
    // The held-out set next to the training set is found and offered, commented out (as an
    // absolute path, or relative to the spec's directory when that is short).
    assert!(
        text.lines().any(|l| l.starts_with("# validation = \"")
            && l.ends_with("mlp_heldout/data/val.safetensors\"")),
        "{text}"
    );
    std::fs::write(&spec, resolve_heldout_todos(&text, "1e-4")).unwrap();
    analyze_with("mlp_heldout", &spec, &dir.path().join("ours"));
    analyze("mlp_heldout", &dir.path().join("theirs"), &["--quiet"]);
    assert_same_numbers(&dir.path().join("ours"), &dir.path().join("theirs"));
    let s = json(&dir.path().join("ours/summary.json"));
    assert!(s["run"]["validation"].is_object() && s["run"]["l2"].is_object());
}

#[test]
fn never_overwrites_without_force_and_writes_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("model.toml");
    std::fs::write(&spec, "# mine\n").unwrap();
    let ckpt = fixture("mlp/ckpts");
    let (out, ok) = init(&[os(&ckpt), "-o".as_ref(), os(&spec)]);
    assert!(!ok);
    assert!(out.contains("exists") && out.contains("--force"), "{out}");
    assert_eq!(std::fs::read_to_string(&spec).unwrap(), "# mine\n");
    // --force replaces it; a directory of checkpoints uses its first one.
    let (out, ok) = init(&[os(&ckpt), "-o".as_ref(), os(&spec), "--force".as_ref()]);
    assert!(ok, "{out}");
    let text = std::fs::read_to_string(&spec).unwrap();
    assert!(text.contains("ckpt_0.safetensors"), "{text}");
    assert!(out.contains("without --data"), "{out}");
    lca::spec::Spec::parse(&text, &spec).unwrap();
    // Nothing else is left in the directory (no temporary file).
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["model.toml"]);
    // A missing directory or a bad checkpoint is an error naming the culprit.
    let (out, ok) = init(&[os(&ckpt), "-o".as_ref(), os(&dir.path().join("no/m.toml"))]);
    assert!(!ok && out.contains("does not exist"), "{out}");
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"nonsense").unwrap();
    let (out, ok) = init(&[os(&bad), "-o".as_ref(), os(&dir.path().join("m.toml"))]);
    assert!(!ok && out.contains("bad.safetensors"), "{out}");
}

/// Typical mistakes of a draft are reported by `lca inspect` at the line of the culprit.
#[test]
fn inspect_points_at_the_layer_that_does_not_fit() {
    let t = tiny();
    // A training set with 5 features, while the checkpoint's first layer takes 4.
    let x: Vec<f32> = (0..50).map(|i| (i % 7) as f32).collect();
    let y: Vec<i64> = (0..10).map(|i| i % 3).collect();
    let data = t.dir.path().join("other.safetensors");
    write_st(
        &data,
        &[T::f32("x", &[10, 5], &x), T::i64("y", &[10], &y)],
        None,
    );
    let spec = t.dir.path().join("draft.toml");
    let (out, ok) = init(&[
        os(&t.ckpts),
        "--data".as_ref(),
        os(&data),
        "-o".as_ref(),
        os(&spec),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("does not fit the data yet"), "{out}");
    let text = std::fs::read_to_string(&spec).unwrap();
    assert!(
        text.contains("'fc' expects 4 input features but receives 5"),
        "{text}"
    );
    // Errors name the 1-based line of the layer's [[layers]] header, the line before its
    // name: that is the 0-based index of the name line.
    let fc_line = text
        .lines()
        .position(|l| l == "name = \"fc\"")
        .expect("fc layer");
    let o = lca()
        .arg("inspect")
        .arg(&t.ckpts)
        .arg("--spec")
        .arg(&spec)
        .arg("--no-time")
        .output()
        .unwrap();
    fails_with(
        &o,
        &[
            &format!("draft.toml:{fc_line}"),
            "layer 'fc'",
            "in_features = 4",
            "5",
        ],
    );
}

/// Image-shaped data in front of a linear layer gets a flatten; float inputs are not scaled.
#[test]
fn image_data_is_flattened_for_a_linear_layer() {
    let t = tiny();
    let x: Vec<f32> = (0..40).map(|i| (i % 7) as f32 * 0.1).collect();
    let y: Vec<i64> = (0..10).map(|i| i % 3).collect();
    let data = t.dir.path().join("img.safetensors");
    write_st(
        &data,
        &[T::f32("x", &[10, 1, 2, 2], &x), T::i64("y", &[10], &y)],
        None,
    );
    let spec = t.dir.path().join("img.toml");
    let (out, ok) = init(&[
        os(&t.ckpts.join("ckpt_1.safetensors")),
        "--data".as_ref(),
        os(&data),
        "-o".as_ref(),
        os(&spec),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("builds a model that fits"), "{out}");
    let text = std::fs::read_to_string(&spec).unwrap();
    assert!(text.contains("type = \"flatten\""), "{text}");
    assert!(!text.contains("\nscale ="), "{text}");
    assert!(text.contains("train = \"img.safetensors\""), "{text}");
    analyze_ok(&t.ckpts, &spec, &t.dir.path().join("out"), &["--quiet"]);
}

/// The edits docs/init.md lists for the CNN fixture: the pooling and the stride a checkpoint
/// does not store, and the Normalize of the training transform.
fn resolve_cnn_todos(text: &str) -> String {
    let mut s = text.to_string();
    // A max-pool after the first activation.
    let i = s.find("type = \"relu\"\n").expect("an activation") + "type = \"relu\"\n".len();
    s.insert_str(i, "\n[[layers]]\ntype = \"max_pool2d\"\nkernel_size = 2\n");
    // conv2 has stride 2.
    let a = s.find("name = \"conv2\"").expect("conv2");
    let b = a + s[a..].find("stride = 1").expect("conv2's stride");
    s.replace_range(b..b + "stride = 1".len(), "stride = 2");
    // The model's average pool instead of the adaptive one written to make the sizes fit.
    s = s.replace(
        "type = \"adaptive_avg_pool2d\"\noutput_size = 3",
        "type = \"avg_pool2d\"\nkernel_size = 2\nstride = 1\npadding = 1",
    );
    s.replace(
        "scale = 0.0625\n",
        "scale = 0.0625\nmean = [0.3]\nstd = [0.45]\n",
    )
}

/// Runs once fixtures/cnn exists (it arrives with the convolution layers): the draft, after
/// the documented edits, analyses exactly like the fixture's own spec.
#[test]
fn cnn_draft_after_the_documented_edits() {
    if !fixture("cnn/model.toml").is_file() {
        eprintln!("fixtures/cnn is not in this tree: nothing to check");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("model.toml");
    let text = draft("cnn", &spec);
    assert!(text.contains("groups = 2"), "{text}");
    std::fs::write(&spec, resolve_cnn_todos(&text)).unwrap();
    analyze_with("cnn", &spec, &dir.path().join("ours"));
    analyze("cnn", &dir.path().join("theirs"), &["--quiet"]);
    assert_same_numbers(&dir.path().join("ours"), &dir.path().join("theirs"));
}

/// `text` with every line equal to `from` replaced by `to`; there must be exactly `times`.
fn edit_lines(text: &str, from: &str, to: &str, times: usize) -> String {
    assert_eq!(
        text.lines().filter(|l| *l == from).count(),
        times,
        "expected {times} line(s) `{from}` in the draft:\n{text}"
    );
    let mut out: Vec<&str> = text
        .lines()
        .map(|l| if l == from { to } else { l })
        .collect();
    out.push("");
    out.join("\n")
}

/// The edits docs/init.md lists for a batch-norm ResNet: the batch-norm mode and the
/// evaluation chunk of the fixture's spec (in batch-stats mode part of the loss; in
/// running-stats mode it only changes the rounding of the full-set mean).
fn resolve_resnet_todos(text: &str, mode: &str, chunk: usize) -> String {
    let text = edit_lines(
        text,
        "batch_norm = \"running-stats\"",
        &format!("batch_norm = \"{mode}\""),
        1,
    );
    edit_lines(
        &text,
        "chunk_size = 256",
        &format!("chunk_size = {chunk}"),
        1,
    )
}

/// The draft with its wrapped comments joined into one line each.
fn unwrapped(text: &str) -> String {
    text.replace("\n#   ", " ")
}

/// What the ResNet drafts must say by themselves: every residual join and its activation,
/// the down-sampling guessed from the channels, and TODO lines for what was guessed.
fn assert_resnet_draft(text: &str, blocks: &[&str]) {
    for b in blocks {
        assert!(
            text.contains(&format!(
                "name = \"{b}.add\"\ntype = \"add\"\ninput = [\"{b}.bn2\", "
            )) && text.contains(&format!("name = \"{b}.relu\"\ntype = \"relu\"")),
            "block {b}:\n{text}"
        );
        assert!(
            unwrapped(text).contains(&format!(
                "# TODO(lca init): the layers named {b}.* look like a ResNet block"
            )),
            "{text}"
        );
    }
    assert!(text.contains("type = \"global_avg_pool\""), "{text}");
    assert!(!text.contains("\ngroups ="), "{text}");
}

fn resnet_draft_after_the_documented_edits(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("model.toml");
    let text = draft("resnet", &spec);
    assert_resnet_draft(&text, &["layer1.0", "layer2.0"]);
    assert!(
        text.contains("input = [\"layer2.0.bn2\", \"layer2.0.shortcut.1\"]"),
        "{text}"
    );
    std::fs::write(&spec, resolve_resnet_todos(&text, mode, 512)).unwrap();
    analyze_with("resnet", &spec, &dir.path().join("ours"));
    let theirs = fixture(&format!("resnet/model_{}.toml", mode.replace('-', "_")));
    analyze_with("resnet", &theirs, &dir.path().join("theirs"));
    assert_same_numbers(&dir.path().join("ours"), &dir.path().join("theirs"));
}

/// fixtures/resnet (batch norm, residual adds, a 1×1-conv shortcut with stride 2): after the
/// two documented edits the draft analyses exactly like the fixture's own spec, in both
/// batch-norm modes.
#[test]
fn resnet_draft_running_stats() {
    resnet_draft_after_the_documented_edits("running-stats");
}

#[test]
fn resnet_draft_batch_stats() {
    resnet_draft_after_the_documented_edits("batch-stats");
}

/// The ResNet-20 state_dict PyTorch saved (fixtures/resnet20): the draft, with the batch-norm
/// mode and chunk size set, analyses exactly like docs/examples/resnet20.toml with the same
/// two settings (and the fixture's data), as tests/resnet20.rs runs it.
#[test]
fn resnet20_draft_matches_the_example_spec() {
    let text = {
        let dir = tempfile::tempdir().unwrap();
        draft("resnet20", &dir.path().join("model.toml"))
    };
    let blocks: Vec<String> = (1..=3)
        .flat_map(|s| (0..3).map(move |b| format!("layer{s}.{b}")))
        .collect();
    assert_resnet_draft(
        &text,
        &blocks.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    );
    assert!(text.contains("scale = 0.00392156862745098"), "{text}");
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/resnet20.toml"),
    )
    .unwrap();
    let data = fixture("resnet20/data/train.safetensors");
    for mode in ["batch-stats", "running-stats"] {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("model.toml");
        std::fs::write(&spec, resolve_resnet_todos(&text, mode, 8)).unwrap();
        let reference = dir.path().join("resnet20.toml");
        let e = edit_lines(
            &example,
            "train = \"data/cifar10_train.safetensors\"",
            &format!("train = {:?}", data.display().to_string()),
            1,
        );
        let e = edit_lines(&e, "chunk_size = 250", "chunk_size = 8", 1);
        let e = edit_lines(
            &e,
            "batch_norm = \"batch-stats\"",
            &format!("batch_norm = \"{mode}\""),
            1,
        );
        std::fs::write(&reference, e).unwrap();
        analyze_with("resnet20", &spec, &dir.path().join("ours"));
        analyze_with("resnet20", &reference, &dir.path().join("theirs"));
        assert_same_numbers(&dir.path().join("ours"), &dir.path().join("theirs"));
    }
}

/// The edits docs/init.md lists for the GPT fixture: its head count (not stored in a
/// checkpoint) in both blocks, and its evaluation chunk of 32 sequences.
fn resolve_gpt_todos(text: &str) -> String {
    let text = edit_lines(text, "n_head = 1", "n_head = 4", 2);
    edit_lines(&text, "chunk_size = 256", "chunk_size = 32", 1)
}

/// fixtures/gpt (nanoGPT: token and position embeddings, pre-norm blocks with causal
/// self-attention and a GELU MLP, the head tied to the token embedding and saved once by
/// save_model, token data): after the documented edits the draft analyses exactly like the
/// fixture's own spec.
#[test]
fn gpt_draft_after_the_documented_edits() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("model.toml");
    let text = draft("gpt", &spec);
    for want in [
        "name = \"transformer.wte\"\ntype = \"embedding\"\ninput = \"input\"",
        "name = \"transformer.wpe\"\ntype = \"positional_embedding\"\ninput = \"input\"\nnum_embeddings = 32",
        "type = \"add\"\ninput = [\"transformer.wte\", \"transformer.wpe\"]",
        "type = \"causal_self_attention\"\nn_embd = 16\nn_head = 1",
        "input = [\"transformer.h.0.add2\", \"transformer.h.1.attn\"]",
        "input = [\"transformer.h.1.add1\", \"transformer.h.1.mlp.c_proj\"]",
        "name = \"transformer.ln_f\"\ntype = \"layer_norm\"",
        "bias = false\ntied = { weight = \"transformer.wte.weight\" }",
        "tokens = \"tokens\"",
        "# TODO(lca init): 'lm_head' shares its weight",
        "The number of heads is not stored",
    ] {
        assert!(
            unwrapped(&text).contains(want),
            "missing {want:?} in\n{text}"
        );
    }
    assert_eq!(text.matches("type = \"gelu\"").count(), 2, "{text}");
    assert!(!text.contains("\nx = "), "{text}");
    std::fs::write(&spec, resolve_gpt_todos(&text)).unwrap();
    analyze_with("gpt", &spec, &dir.path().join("ours"));
    analyze("gpt", &dir.path().join("theirs"), &["--quiet"]);
    assert_same_numbers(&dir.path().join("ours"), &dir.path().join("theirs"));
}
