//! A 42-layer model (fixtures/deep40) stays readable: the layers and peaks figures draw at
//! most ten lines / nine panels with every text inside the canvas and whole-step ticks, and
//! the report's summary names layers with significant digits. (The browser check of its
//! report is tests/browser/report.sh.)

use crate::util::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn out() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        analyze("deep40", &out, &["--quiet"]);
        (dir, out)
    })
    .1
}

/// A text of an SVG figure: its content, anchor position, extent estimate and font size.
struct SvgText {
    text: String,
    x0: f64,
    x1: f64,
    y: f64,
    /// Centred (x-axis tick labels and titles).
    centred: bool,
}

/// Every text element of an SVG file, with a generous width estimate (0.62 em per character,
/// DejaVu Sans' digits are 0.64 em and most letters narrower).
fn texts(path: &Path) -> (f64, f64, Vec<SvgText>) {
    let svg = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let root = doc.root_element();
    let num = |n: roxmltree::Node, a: &str| n.attribute(a).unwrap_or("0").parse::<f64>().unwrap();
    let (w, h) = (num(root, "width"), num(root, "height"));
    let mut out = Vec::new();
    for n in doc.descendants().filter(|n| n.has_tag_name("text")) {
        let text: String = n.text().unwrap_or("").trim().to_string();
        // Rotated axis titles are placed by their transform; they are checked by eye.
        if text.is_empty() || n.attribute("transform").is_some() {
            continue;
        }
        let size = num(n, "font-size");
        let width = 0.58 * size * text.chars().count() as f64;
        let x = num(n, "x");
        let (x0, x1) = match n.attribute("text-anchor") {
            Some("middle") => (x - width / 2.0, x + width / 2.0),
            Some("end") => (x - width, x),
            _ => (x, x + width),
        };
        out.push(SvgText {
            text,
            x0,
            x1,
            y: num(n, "y"),
            centred: n.attribute("text-anchor") == Some("middle"),
        });
    }
    (w, h, out)
}

fn plot(kind: &str, file: &Path, extra: &[&str]) {
    let o = lca()
        .arg("plot")
        .arg(out())
        .args(["--kind", kind, "-o"])
        .arg(file)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn assert_inside(w: f64, h: f64, t: &[SvgText], what: &str) {
    for x in t {
        assert!(
            x.x0 >= -1.0 && x.x1 <= w + 1.0 && x.y >= 0.0 && x.y <= h,
            "{what}: text {:?} at {:.0}..{:.0} leaves the {w}×{h} canvas",
            x.text,
            x.x0,
            x.x1
        );
    }
}

/// Tick labels of the step axis (the numbers along the bottom) are whole steps.
fn assert_integer_step_ticks(h: f64, t: &[SvgText], bottom: f64, what: &str) {
    let ticks: Vec<&SvgText> = t
        .iter()
        .filter(|x| x.centred && x.y > h - bottom && x.text.parse::<f64>().is_ok())
        .collect();
    assert!(ticks.len() >= 2, "{what}: no step ticks found");
    for x in ticks {
        let v: f64 = x.text.parse().unwrap();
        assert_eq!(v.fract(), 0.0, "{what}: step tick {:?}", x.text);
    }
}

#[test]
fn the_layers_figure_of_42_layers_is_readable() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, name) in [
        (&[][..], "layers.svg"),
        (&["--by", "block"][..], "blocks.svg"),
    ] {
        let f = dir.path().join(name);
        plot("layers", &f, extra);
        let (w, h, t) = texts(&f);
        assert_inside(w, h, &t, name);
        assert_integer_step_ticks(h, &t, 90.0, name);
        // Legend entries: "name  total" lines, the largest nine, "the rest" and the sum.
        let entries: Vec<&str> = t
            .iter()
            .filter(|x| x.text.contains("  ") && x.x0 > w * 0.55 && !x.text.contains("total LCA"))
            .map(|x| x.text.as_str())
            .collect();
        assert!(
            (3..=11).contains(&entries.len()),
            "{name}: {} legend entries: {entries:?}",
            entries.len()
        );
        assert!(
            entries.iter().any(|e| e.starts_with("the other ")),
            "{name}: no 'the rest' line: {entries:?}"
        );
        assert!(entries.iter().any(|e| e.starts_with("sum ")), "{entries:?}");
        // No number is cut: every legend value parses.
        for e in &entries {
            let v = e.rsplit("  ").next().unwrap();
            assert!(
                v.parse::<f64>().is_ok(),
                "{name}: legend value {v:?} in {e:?}"
            );
        }
    }
}

#[test]
fn the_peaks_figure_of_42_layers_has_at_most_nine_panels_over_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("peaks.svg");
    plot("peaks", &f, &[]);
    let (w, h, t) = texts(&f);
    assert_inside(w, h, &t, "peaks");
    let panels = t.iter().filter(|x| x.text.starts_with("max |LCA|")).count();
    assert_eq!(panels, 9, "8 layers and the rest");
    assert!(t.iter().any(|x| x.text == "the other 34 layers"));
    assert!(h <= 2000.0, "height {h}");
    // The step axis covers steps 0..=5 (the 6 steps), not one past them.
    assert_integer_step_ticks(h, &t, 90.0, "peaks");
    let last = t
        .iter()
        .filter(|x| x.centred && x.y > h - 90.0)
        .filter_map(|x| x.text.parse::<f64>().ok())
        .fold(f64::MIN, f64::max);
    assert_eq!(last, 5.0);
}

#[test]
fn the_report_of_42_layers_names_layers_with_significant_digits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.html");
    let o = lca()
        .arg("report")
        .arg(out())
        .arg("-o")
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&file).unwrap();
    let body = html.trim_start_matches("<!DOCTYPE html>").trim_start();
    roxmltree::Document::parse(body).expect("well-formed");
    assert!(html.contains("The layer that lowered the loss most: <code>head</code>"));
    assert!(
        !html.contains("+0.0000"),
        "a layer listed as hurting with +0.0000"
    );
    assert!(
        !html.contains("running statistics; not a layer"),
        "no buffers in this model"
    );
    for id in [
        "fig-loss",
        "fig-layers",
        "fig-helped",
        "fig-peaks",
        "fig-heatmap",
    ] {
        assert!(html.contains(&format!("<figure id=\"{id}\"><svg")), "{id}");
    }
    assert!(html.contains("the other 33 layers"));
}

#[test]
fn summarize_by_param_reads_the_compact_totals_fast_and_excludes_buffers() {
    assert!(!out().join("params.csv").exists());
    let o = lca()
        .arg("summarize")
        .arg(out())
        .args(["--by", "param", "--top", "5", "--format", "csv"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = csv_rows_str(&String::from_utf8(o.stdout).unwrap());
    assert_eq!(rows.len(), 5);
    let v: Vec<f64> = rows.iter().map(|r| r["lca"].parse().unwrap()).collect();
    assert!(v.windows(2).all(|w| w[0] <= w[1]), "{v:?}");
}
