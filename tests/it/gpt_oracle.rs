//! fixtures/gpt (a tiny character-level nanoGPT with a tied head, checkpoints written by
//! `safetensors.torch.save_model`) against its PyTorch float64 oracle, through the binary and
//! the library API; the per-head and per-block views; the docs' nanoGPT spec; tied tensors
//! stored under one name, both names, or inconsistent values; token-data errors.

use crate::oracle::*;
use crate::util::*;
use lca::net::Model;
use lca::spec::Spec;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

const STEPS: u64 = 60;

fn oracle() -> Value {
    json(&fixture("gpt/golden/oracle.json"))
}

fn with_lca(oracle: &Value, lca: &Value) -> Value {
    let mut o = oracle.clone();
    o["lca"] = lca.clone();
    o
}

fn steps() -> Vec<u64> {
    (0..=STEPS).collect()
}

fn check_losses(summary: &Value, oracle: &Value, tol: f64) -> f64 {
    let losses = floats(&oracle["losses"]);
    let mut worst = 0.0f64;
    for (t, r) in summary["steps"].as_array().unwrap().iter().enumerate() {
        for (got, want) in [
            (r["loss_before"].as_f64().unwrap(), losses[t]),
            (r["loss_after"].as_f64().unwrap(), losses[t + 1]),
        ] {
            assert!((got - want).abs() < tol, "step {t}: loss {got} vs {want}");
            worst = worst.max((got - want).abs());
        }
    }
    worst
}

/// In f64 the evaluator does PyTorch's arithmetic: plain Simpson per step and tensor to 1e-9.
#[test]
fn f64_plain_simpson_matches_the_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    analyze(
        "gpt",
        &out,
        &["--quiet", "--no-adaptive", "--precision", "f64"],
    );
    let oracle = oracle();
    let s = json(&out.join("summary.json"));
    let dl = check_losses(&s, &oracle, 1e-10);
    let worst = compare_step_tensor_lca(&tensor_steps(&out), &oracle, &steps(), 1e-9);
    let res = floats(&oracle["residuals"]);
    for (t, r) in s["steps"].as_array().unwrap().iter().enumerate() {
        let got = r["residual"].as_f64().unwrap();
        assert!(
            (got - res[t]).abs() < 1e-10,
            "step {t}: {got} vs {}",
            res[t]
        );
    }
    let rel = s["run"]["rel_abs_residual"].as_f64().unwrap();
    let want = oracle["summary"]["simpson"]["sum_abs_over_abs_dL"]
        .as_f64()
        .unwrap();
    assert!((rel - want).abs() < 1e-9, "{rel} vs {want}");
    eprintln!(
        "f64 plain Simpson: losses within {dl:.1e}, worst per-step per-tensor relative error {worst:.2e}, Σ|r|/|ΔL| = {:.4}%",
        100.0 * rel
    );

    // Per head: the heads' sums of the oracle's per-entry LCA totals, sliced independently.
    let o = lca()
        .args(["summarize", "--by", "head", "--format", "json"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success());
    let heads: Value = serde_json::from_slice(&o.stdout).unwrap();
    let bytes = std::fs::read(fixture("gpt/golden/lca_elementwise.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let total =
        |name: &str| lca::tensors::to_f64(&st.tensor(&format!("total/{name}")).unwrap()).unwrap();
    let (c, d) = (16usize, 4usize);
    for block in 0..2 {
        let p = format!("transformer.h.{block}.attn");
        let (w_in, b_in) = (
            total(&format!("{p}.c_attn.weight")),
            total(&format!("{p}.c_attn.bias")),
        );
        let (w_out, b_out) = (
            total(&format!("{p}.c_proj.weight")),
            total(&format!("{p}.c_proj.bias")),
        );
        for h in 0..4 {
            let mut want = [0.0f64; 4];
            for (part, acc) in want.iter_mut().take(3).enumerate() {
                for r in part * c + h * d..part * c + (h + 1) * d {
                    *acc += w_in[r * c..(r + 1) * c].iter().sum::<f64>() + b_in[r];
                }
            }
            want[3] = (0..c)
                .map(|r| {
                    w_out[r * c + h * d..r * c + (h + 1) * d]
                        .iter()
                        .sum::<f64>()
                })
                .sum();
            let row = heads
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["layer"] == p.as_str() && r["head"] == h.to_string().as_str())
                .unwrap_or_else(|| panic!("no row for {p} head {h}"));
            for (k, col) in ["q_lca", "k_lca", "v_lca", "out_lca"].iter().enumerate() {
                let got = row[*col].as_f64().unwrap();
                assert!(
                    (got - want[k]).abs() <= 1e-9 * want[k].abs().max(1e-6),
                    "{p} head {h} {col}: {got} vs {}",
                    want[k]
                );
            }
        }
        let bias = heads
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["layer"] == p.as_str() && r["head"] == "bias")
            .unwrap();
        let want: f64 = b_out.iter().sum();
        assert!((bias["lca"].as_f64().unwrap() - want).abs() <= 1e-9 * want.abs());
    }
}

/// The f32 run with the per-step tolerance policy (`--policy tolerance`, the oracle's
/// `adaptive` rule: uniform doubling while |r_t| > 1e-3): the oracle's split counts, per-step per-tensor
/// LCA at those counts to 1e-4 relative, the residual report, and the head and block views.
#[test]
fn f32_default_run_matches_the_oracle_and_views_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let o = analyze("gpt", &out, &["--quiet", "--policy", "tolerance"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("Σ|r|/|ΔL|"), "residual report: {stderr}");
    let oracle = oracle();
    let s = json(&out.join("summary.json"));
    let dl = check_losses(&s, &oracle, 1e-6);
    let ad = &oracle["adaptive"];
    let want_splits: Vec<u64> = ad["splits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let got_splits: Vec<u64> = s["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["splits"].as_u64().unwrap())
        .collect();
    assert_eq!(got_splits, want_splits);
    assert_eq!(want_splits[0], 8, "the first AdamW step needs refinement");
    let worst = compare_step_tensor_lca(
        &tensor_steps(&out),
        &with_lca(&oracle, &ad["lca"]),
        &steps(),
        1e-4,
    );
    let rel = s["run"]["rel_abs_residual"].as_f64().unwrap();
    let want_rel = oracle["summary"]["refinement"]["adaptive"]["sum_abs_over_abs_dL"]
        .as_f64()
        .unwrap();
    assert!((rel - want_rel).abs() < 1e-6, "{rel} vs {want_rel}");
    // Totals over the run per tensor, to 1e-4 relative.
    let mut worst_total = 0.0f64;
    for t in s["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let want: f64 = floats(&ad["lca"][name]).iter().sum();
        let got = t["lca"].as_f64().unwrap();
        let e = (got - want).abs() / want.abs();
        assert!(e < 1e-4, "{name}: {got} vs {want}");
        worst_total = worst_total.max(e);
    }
    eprintln!(
        "f32 adaptive: losses within {dl:.1e}, worst per-step per-tensor relative error {worst:.2e}, worst run total {worst_total:.2e}, Σ|r|/|ΔL| = {:.4}% (oracle {:.4}%)",
        100.0 * rel,
        100.0 * want_rel
    );

    // One parameter row for the tied weight, under the embedding, with its other name noted.
    let wte = s["model"]["params"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            let n = p["name"].as_str().unwrap();
            n.contains("wte") || n.contains("lm_head")
        })
        .collect::<Vec<_>>();
    assert_eq!(wte.len(), 1);
    assert_eq!(wte[0]["name"], "transformer.wte.weight");
    assert_eq!(wte[0]["aliases"][0], "lm_head.weight");

    // --by head: every head of both blocks, plus the shared output bias; they add up to the
    // layer, and q + k + v + out to the head.
    let view = |by: &str| -> Vec<Value> {
        let o = lca()
            .args(["summarize", "--by", by, "--format", "json"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<Value>(&o.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let heads = view("head");
    assert_eq!(heads.len(), 2 * 5);
    let layers: HashMap<String, f64> = s["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap().to_string(),
                l["lca"].as_f64().unwrap(),
            )
        })
        .collect();
    for block in 0..2 {
        let layer = format!("transformer.h.{block}.attn");
        let rows: Vec<&Value> = heads
            .iter()
            .filter(|r| r["layer"] == layer.as_str())
            .collect();
        let names: Vec<&str> = rows.iter().map(|r| r["head"].as_str().unwrap()).collect();
        assert_eq!(names, ["0", "1", "2", "3", "bias"]);
        let sum: f64 = rows.iter().map(|r| r["lca"].as_f64().unwrap()).sum();
        let params: i64 = rows.iter().map(|r| r["params"].as_i64().unwrap()).sum();
        assert_eq!(params, 3 * 16 * 16 + 3 * 16 + 16 * 16 + 16);
        let want = layers[&layer];
        assert!(
            (sum - want).abs() <= 1e-12 * want.abs(),
            "{layer}: {sum} vs {want}"
        );
        for r in &rows {
            let parts: f64 = ["q_lca", "k_lca", "v_lca", "out_lca"]
                .iter()
                .map(|c| r[*c].as_f64().unwrap())
                .sum();
            let l = r["lca"].as_f64().unwrap();
            assert!((parts - l).abs() <= 1e-12 * l.abs().max(1e-9));
        }
    }
    // The text table too.
    let o = lca()
        .args(["summarize", "--by", "head"])
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with("layer") && text.contains("transformer.h.1.attn  3"),
        "{text}"
    );

    // --by block: the embeddings and the final LayerNorm are rows of their own; lm_head has no
    // row (its weight is the embedding's).
    let blocks: Vec<String> = view("block")
        .iter()
        .map(|r| r["block"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        blocks,
        [
            "transformer.wte",
            "transformer.wpe",
            "transformer.h.0",
            "transformer.h.1",
            "transformer.ln_f"
        ]
    );
}

/// Gradients at the stored points through the library API: f32 to 1e-4 of each tensor's
/// largest entry, f64 to 1e-9 (the tied weight's gradient sums both uses, as autograd's).
#[test]
fn gradients_match_pytorch_at_stored_points() {
    let p = Problem::load(&fixture("gpt/model.toml"), &fixture("gpt/ckpts"));
    assert_eq!(p.data.sample_shape(), &[32]);
    let (m32, m64) = (p.model::<f32>(), p.model::<f64>());
    p.data.check_targets(m32.output_shape(), m32.loss).unwrap();
    p.data.check_inputs(&m32).unwrap();
    let golden = Golden::load(&fixture("gpt/golden"));
    let of_largest = |rtol| Tol { rtol, floor: 1.0 };
    let r32 = p.gradients_at_stored_points(
        &m32,
        &golden,
        GradTol {
            loss: 1e-6,
            grad: of_largest(1e-4),
            except: &[],
        },
        "gpt f32",
    );
    let r64 = p.gradients_at_stored_points(
        &m64,
        &golden,
        GradTol {
            loss: 1e-12,
            grad: of_largest(1e-9),
            except: &[],
        },
        "gpt f64",
    );
    assert_eq!(r32.entries, r64.entries);
    assert!(r32.entries > 40_000, "{}", r32.entries);
    eprintln!(
        "gradients: f32 within {:.1e}, f64 within {:.1e} of each tensor's largest entry",
        r32.worst, r64.worst
    );
}

/// docs/examples/nanogpt.toml is the fixture's architecture: it parses, builds for 32-token
/// inputs, and names exactly the tensors that PyTorch saved from docs/examples/nanogpt.py.
#[test]
fn docs_nanogpt_spec_builds_with_the_state_dict_shapes() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/nanogpt.toml");
    let spec = Spec::load(&docs).unwrap();
    let m = Model::<f32>::build(&spec, &[32]).unwrap();
    assert_eq!(m.output_shape(), &[32, 82]);
    let oracle = oracle();
    let names: Vec<&str> = m.params.iter().map(|p| p.name.as_str()).collect();
    let want: Vec<&str> = oracle["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(names, want, "parameters in state_dict order");
    for (p, shape) in m.params.iter().zip(oracle["shapes"].as_array().unwrap()) {
        let shape: Vec<usize> = shape
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(p.shape, shape, "{}", p.name);
    }
    assert_eq!(m.num_params(), 8_416);
    // Every tensor of a save_model checkpoint is a parameter (the tied one under its alias).
    let f = &lca::checkpoint::scan(&fixture("gpt/ckpts")).unwrap()[0];
    let mut stored: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    stored.sort();
    let mut expected: Vec<&str> = names
        .iter()
        .map(|n| {
            if *n == "transformer.wte.weight" {
                "lm_head.weight"
            } else {
                *n
            }
        })
        .collect();
    expected.sort();
    assert_eq!(stored, expected);
    let loaded = lca::checkpoint::load(f, &m.params).unwrap();
    assert!(loaded.unused.is_empty(), "{:?}", loaded.unused);
    // The fixture's spec has the same layers.
    let fx = Spec::load(&fixture("gpt/model.toml")).unwrap();
    assert_eq!(fx.layers.len(), spec.layers.len());
    for (a, b) in fx.layers.iter().zip(&spec.layers) {
        assert_eq!(
            (&a.name, &a.input, &a.kind, &a.tied),
            (&b.name, &b.input, &b.kind, &b.tied)
        );
    }
    // The attention layers' summary entries.
    let att = lca::net::attention::describe(&spec, &m);
    assert_eq!(att.len(), 2);
    assert_eq!(att[1].layer, "transformer.h.1.attn");
    assert_eq!((att[1].heads, att[1].head_dim), (4, 4));
    assert_eq!(att[1].out_proj_weight, "transformer.h.1.attn.c_proj.weight");
}

/// What to write in place of one stored tensor (name, shape, values).
type Rewrite<'a> = &'a dyn Fn(&str, &[usize], &[f32]) -> Vec<T>;

/// Rewrite the first `n` checkpoints of fixtures/gpt into `dir`, mapping each stored tensor
/// through `f`.
fn rewrite_ckpts(dir: &Path, n: u64, f: Rewrite) {
    std::fs::create_dir_all(dir).unwrap();
    for step in 0..n {
        let bytes = std::fs::read(fixture(&format!("gpt/ckpts/ckpt_{step}.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out = Vec::new();
        for (name, t) in st.tensors() {
            let v: Vec<f32> = lca::tensors::to_f64(&t)
                .unwrap()
                .into_iter()
                .map(|x| x as f32)
                .collect();
            out.extend(f(&name, t.shape(), &v));
        }
        write_st(
            &dir.join(format!("ckpt_{step}.safetensors")),
            &out,
            Some(step),
        );
    }
}

fn run(ckpts: &Path, out: &Path) -> std::process::Output {
    analyze_run(
        ckpts,
        &fixture("gpt/model.toml"),
        out,
        &["--quiet", "--no-lca-tensors"],
    )
}

/// A tied tensor stored once under either name, or under both (a state_dict of clones), gives
/// the same analysis; two different tensors under the tied names are refused.
#[test]
fn tied_weight_loads_from_either_or_both_names() {
    let dir = tempfile::tempdir().unwrap();
    let variants: [(&str, Rewrite); 3] = [
        ("as_saved", &|n, s, v| vec![T::f32(n, s, v)]),
        ("embedding_name", &|n, s, v| {
            let n = if n == "lm_head.weight" {
                "transformer.wte.weight"
            } else {
                n
            };
            vec![T::f32(n, s, v)]
        }),
        ("both", &|n, s, v| {
            let mut o = vec![T::f32(n, s, v)];
            if n == "lm_head.weight" {
                o.push(T::f32("transformer.wte.weight", s, v));
            }
            o
        }),
    ];
    let mut reference: Option<Vec<(String, String)>> = None;
    for (name, f) in variants {
        let ck = dir.path().join(name);
        rewrite_ckpts(&ck, 3, f);
        let out = dir.path().join(format!("out_{name}"));
        let o = run(&ck, &out);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let rows: Vec<(String, String)> = csv_rows(&out.join("tensors.csv"))
            .into_iter()
            .map(|r| (r["tensor"].clone(), r["lca"].clone()))
            .collect();
        match &reference {
            None => reference = Some(rows),
            Some(r) => assert_eq!(&rows, r, "{name}"),
        }
        let s = json(&out.join("summary.json"));
        assert!(
            s["ignored_tensors"].as_array().unwrap().is_empty(),
            "{name}"
        );
    }
    let ck = dir.path().join("different");
    rewrite_ckpts(&ck, 3, &|n, s, v| {
        let mut o = vec![T::f32(n, s, v)];
        if n == "lm_head.weight" {
            let w: Vec<f32> = v.iter().map(|x| x + 1.0).collect();
            o.push(T::f32("transformer.wte.weight", s, &w));
        }
        o
    });
    let o = run(&ck, &dir.path().join("out_different"));
    fails_with(
        &o,
        &[
            "transformer.wte.weight",
            "lm_head.weight",
            "different values",
        ],
    );
}

/// Token data: ids beyond the embedding are reported with sample and position, and so are
/// targets beyond the logits; token tensors must be integer [N, T+1]; x/y/scale cannot be
/// combined with `tokens`.
#[test]
fn token_data_errors_name_sample_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let spec_src = std::fs::read_to_string(fixture("gpt/model.toml")).unwrap();
    let case = |name: &str, tokens: T, spec: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(d.join("data")).unwrap();
        write_st(&d.join("data/train.safetensors"), &[tokens], None);
        std::fs::write(d.join("model.toml"), spec).unwrap();
        analyze_run(
            &fixture("gpt/ckpts"),
            &d.join("model.toml"),
            &d.join("out"),
            &["--quiet", "--last", "1"],
        )
    };
    let mut ids: Vec<i64> = (0..4 * 33).map(|i| (i * 7 % 82) as i64).collect();
    ids[33 + 5] = 82; // sample 1, input position 5 (and target position 4)
    let o = case("x_range", T::i64("tokens", &[4, 33], &ids), &spec_src);
    fails_with(
        &o,
        &[
            "transformer.wte",
            "token id 82 at sample 1 position 5",
            "out of range",
        ],
    );
    let mut ids: Vec<i64> = (0..4 * 33).map(|i| (i * 7 % 82) as i64).collect();
    ids[2 * 33 + 32] = 90; // only a target: sample 2, target position 31
    let o = case("y_range", T::i64("tokens", &[4, 33], &ids), &spec_src);
    fails_with(&o, &["label 90 at sample 2 position 31", "82 classes"]);
    let o = case("float", T::f32("tokens", &[1, 33], &[1.0; 33]), &spec_src);
    fails_with(&o, &["'tokens' must hold token ids of an integer dtype"]);
    let o = case("short", T::i64("tokens", &[33], &[1; 33]), &spec_src);
    fails_with(&o, &["must be token ids [N, T+1]"]);
    let o = case("long", T::i64("tokens", &[1, 34], &[1; 34]), &spec_src);
    fails_with(&o, &["33 positions", "num_embeddings = 32"]);
    let bad_spec = spec_src.replace("tokens = \"tokens\"", "tokens = \"tokens\"\nx = \"x\"");
    let o = case("xy", T::i64("tokens", &[1, 33], &[1; 33]), &bad_spec);
    fails_with(&o, &["`data.x` cannot be combined with `data.tokens"]);
}

/// Separate integer `x` and `y` tensors `[N, T]` give the same analysis as `tokens [N, T+1]`.
#[test]
fn separate_x_and_y_equal_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("gpt/data/train.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tok = lca::tensors::to_f64(&st.tensor("tokens").unwrap()).unwrap();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for row in tok.chunks_exact(33) {
        x.extend(row[..32].iter().map(|&v| v as i64));
        y.extend(row[1..].iter().map(|&v| v as i64));
    }
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    write_st(
        &dir.path().join("data/train.safetensors"),
        &[T::i64("x", &[256, 32], &x), T::i64("y", &[256, 32], &y)],
        None,
    );
    let spec = std::fs::read_to_string(fixture("gpt/model.toml"))
        .unwrap()
        .replace("tokens = \"tokens\"", "x = \"x\"\ny = \"y\"");
    std::fs::write(dir.path().join("model.toml"), spec).unwrap();
    let run = |spec: &Path, out: &Path| {
        analyze_ok(
            &fixture("gpt/ckpts"),
            spec,
            out,
            &["--quiet", "--no-lca-tensors", "--last", "2"],
        );
        std::fs::read_to_string(out.join("tensors.csv")).unwrap()
    };
    let a = run(&dir.path().join("model.toml"), &dir.path().join("a"));
    let b = run(&fixture("gpt/model.toml"), &dir.path().join("b"));
    assert_eq!(a, b);
}
