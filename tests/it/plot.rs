//! `lca plot`: every kind renders a valid, non-empty SVG and PNG from the shipped example, with
//! its title and legend; bad requests fail with exit status 2 and a clear message.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One analysis of the example, shared by the tests of this file.
fn out() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        analyze("mlp", &out, &["--quiet"]);
        (dir, out)
    })
    .1
}

fn plot(args: &[&str], file: &Path) -> std::process::Output {
    lca()
        .arg("plot")
        .arg(out())
        .args(args)
        .arg("-o")
        .arg(file)
        .output()
        .unwrap()
}

/// Decode a PNG; returns (width, height, number of distinct colours).
fn decode_png(path: &Path) -> (u32, u32, usize) {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{}: no PNG signature",
        path.display()
    );
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let colours: std::collections::HashSet<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    (info.width, info.height, colours.len())
}

/// Parse an SVG; returns all its text content joined.
fn svg_text(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&text)
        .unwrap_or_else(|e| panic!("{}: not XML: {e}", path.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect::<Vec<_>>()
        .join("\n")
}

fn kind_args(kind: &str) -> Vec<&str> {
    let mut a = vec!["--kind", kind];
    if kind == "heatmap" {
        a.extend(["--layer", "fc2"]);
    }
    a
}

#[test]
fn every_kind_renders_svg_and_png() {
    let dir = tempfile::tempdir().unwrap();
    // Kind, texts the figure must show (title, legend, axis labels).
    let expect: [(&str, &[&str]); 5] = [
        (
            "loss",
            &[
                "Training loss: actual vs rebuilt from LCA",
                "actual L(θ_t)",
                "rebuilt L(θ₀) + cumulative ΣLCA",
                "per-step residual",
                "checkpoint step t",
            ],
        ),
        (
            "layers",
            &["Cumulative LCA per layer", "fc1", "fc3", "cumulative LCA"],
        ),
        (
            "helped",
            &[
                "Parameters that helped",
                "helped (LCA < 0)",
                "zero (LCA = 0)",
                "hurt (LCA > 0)",
                "% of parameters",
            ],
        ),
        (
            "heatmap",
            &[
                "LCA per neuron and step: layer fc2",
                "fc2.weight + fc2.bias",
                "helped (< 0)",
                "hurt (> 0)",
                "neuron",
            ],
        ),
        (
            "peaks",
            &["Learning peaks per layer", "fc1", "fc2", "fc3", "max |LCA|"],
        ),
    ];
    for (kind, texts) in expect {
        let svg = dir.path().join(format!("{kind}.svg"));
        let o = plot(&kind_args(kind), &svg);
        assert!(
            o.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let text = svg_text(&svg);
        for t in texts {
            assert!(text.contains(t), "{kind}.svg lacks {t:?}");
        }

        let png = dir.path().join(format!("{kind}.png"));
        let o = plot(&kind_args(kind), &png);
        assert!(
            o.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let (w, h, colours) = decode_png(&png);
        assert_eq!(w, 1200, "{kind}");
        assert!(h >= 800, "{kind}: height {h}");
        // Not a blank canvas: text, lines and fills in several colours.
        assert!(colours > 20, "{kind}: only {colours} colours");
    }
}

#[test]
fn size_options_are_honoured_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("small.png");
    let o = plot(
        &["--kind", "loss", "--width", "640", "--height", "480"],
        &png,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (w, h, _) = decode_png(&png);
    assert_eq!((w, h), (640, 480));
    let o = plot(&["--kind", "loss", "--width", "5"], &png);
    fails_with(&o, &["--width", "between 200 and 20000"]);
}

#[test]
fn bad_requests_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.svg");
    fails_with(
        &plot(&["--kind", "heatmap"], &f),
        &["--layer", "fc1, fc2, fc3"],
    );
    fails_with(
        &plot(&["--kind", "heatmap", "--layer", "fc9"], &f),
        &["fc9", "fc1, fc2, fc3"],
    );
    fails_with(
        &plot(&["--kind", "loss", "--layer", "fc1"], &f),
        &["--layer", "heatmap"],
    );
    fails_with(
        &plot(&["--kind", "loss"], &dir.path().join("x.jpg")),
        &["x.jpg", ".svg or .png"],
    );
    fails_with(
        &plot(&["--kind", "loss"], &dir.path().join("no/such/dir/x.png")),
        &["does not exist"],
    );
    assert!(!f.exists());
    // Not an lca output.
    let o = lca()
        .arg("plot")
        .arg(dir.path())
        .args(["--kind", "loss", "-o"])
        .arg(&f)
        .output()
        .unwrap();
    fails_with(&o, &["summary.json", "lca analyze"]);
}

#[test]
fn heatmap_needs_the_lca_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let o2 = dir.path().join("out");
    analyze("mlp", &o2, &["--quiet", "--no-lca-tensors", "--last", "5"]);
    let o = lca()
        .arg("plot")
        .arg(&o2)
        .args(["--kind", "heatmap", "--layer", "fc1", "-o"])
        .arg(dir.path().join("h.png"))
        .output()
        .unwrap();
    fails_with(&o, &["lca.safetensors", "not found", "--no-lca-tensors"]);
    // The other kinds do not need it.
    let o = lca()
        .arg("plot")
        .arg(&o2)
        .args(["--kind", "peaks", "-o"])
        .arg(dir.path().join("p.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn heatmap_rows_are_the_neurons_of_the_layer() {
    // The neuron values behind the heat map equal `summarize --by neuron` summed over steps.
    let names = vec!["fc3.weight".to_string(), "fc3.bias".to_string()];
    let ns =
        lca::output::tensors::read_neuron_steps(&out().join("lca.safetensors"), &names).unwrap();
    assert_eq!(ns.values.len(), 100);
    assert_eq!(ns.values[0].len(), 10);
    assert_eq!(ns.steps[0], 0);
    assert_eq!(ns.next_steps[99], 100);
    let o = lca()
        .arg("summarize")
        .arg(out())
        .args(["--by", "neuron", "--format", "json"])
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for r in rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["layer"] == "fc3")
    {
        let i = r["neuron"].as_u64().unwrap() as usize;
        let total: f64 = ns.values.iter().map(|v| v[i]).sum();
        let want = r["lca"].as_f64().unwrap();
        // lca.safetensors is f32: compare to f32 precision of the per-step values.
        assert!(
            (total - want).abs() <= 1e-5 * want.abs().max(1e-3),
            "neuron {i}: {total} vs {want}"
        );
    }
}

#[test]
fn long_runs_are_binned_in_the_heatmap_and_drawn_everywhere() {
    // 700 steps of the tiny problem: the heat map sums pairs of steps into 350 columns. The
    // parameters cycle with period 7, so θ_700 = θ_0 and the run's ΔL is exactly 0: the
    // relative residuals are undefined (null in summary.json) and must not break the readers.
    let t = tiny();
    for k in 3..=700 {
        let (w, b) = tiny_params(k % 7);
        write_st(
            &t.ckpts.join(format!("ckpt_{k}.safetensors")),
            &[
                T::f32("fc.weight", &[3, 4], &w),
                T::f32("fc.bias", &[3], &b),
            ],
            Some(k as u64),
        );
    }
    let o = t.run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = t.dir.path().join("out");
    let fig = lca::plot::Figure::load(&out, lca::plot::PlotKind::Heatmap, Some("fc")).unwrap();
    let lca::plot::Figure::Heatmap(h) = &fig else {
        panic!("not a heat map")
    };
    assert_eq!(h.bin, 2);
    assert_eq!(h.columns.len(), 350);
    assert_eq!((h.columns[0].0, h.columns[0].1), (0.0, 2.0));
    assert_eq!(h.columns[349].1, 700.0);
    let svg = t.dir.path().join("h.svg");
    let o = lca()
        .arg("plot")
        .arg(&out)
        .args(["--kind", "heatmap", "--layer", "fc", "-o"])
        .arg(&svg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(svg_text(&svg).contains("2 steps per column"));
    for kind in ["loss", "layers", "helped", "peaks"] {
        let png = t.dir.path().join(format!("{kind}.png"));
        let o = plot_dir(&out, &["--kind", kind], &png);
        assert!(o.status.success(), "{kind}");
        assert!(decode_png(&png).2 > 10, "{kind}");
    }
    let s = json(&out.join("summary.json"));
    assert_eq!(s["run"]["delta_loss"], 0.0);
    assert!(s["run"]["rel_abs_residual"].is_null());
    let o = lca()
        .arg("check")
        .arg(&out)
        .args(["--max-residual", "1e-3", "--max-step-residual", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.contains("FAIL  residual Σ|r|/|ΔL|: undefined: the run's loss did not change"),
        "{text}"
    );
    assert!(text.contains("PASS  max step residual"), "{text}");
}

fn plot_dir(dir: &Path, args: &[&str], file: &Path) -> std::process::Output {
    lca()
        .arg("plot")
        .arg(dir)
        .args(args)
        .arg("-o")
        .arg(file)
        .output()
        .unwrap()
}
