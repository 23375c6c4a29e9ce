//! `lca report`: one self-contained HTML file — no network references, no external scripts,
//! styles or fonts — with every figure as inline SVG, the tables, the residual figures, the
//! run's metadata and warnings; well-formed (parsed as XML here); written atomically; bad
//! requests exit 2. The browser check (console errors, screenshot) is tests/browser/report.sh.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One analysis of the example, shared by the tests of this file.
fn out() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // The per-step policy: the residual figures the docs quote for the example.
        analyze("mlp", &out, &["--quiet", "--policy", "tolerance"]);
        (dir, out)
    })
    .1
}

fn report(dir: &Path, file: &Path, extra: &[&str]) -> std::process::Output {
    lca()
        .arg("report")
        .arg(dir)
        .arg("-o")
        .arg(file)
        .args(extra)
        .output()
        .unwrap()
}

/// Write the report and return its text.
fn page(dir: &Path, file: &Path, extra: &[&str]) -> String {
    let o = report(dir, file, extra);
    assert!(
        o.status.success(),
        "lca report failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read_to_string(file).unwrap()
}

/// Every `http://` / `https://` in the page is the SVG namespace.
fn assert_self_contained(html: &str) {
    let ns = "xmlns=\"http://www.w3.org/2000/svg\"";
    let stripped = html.replace(ns, "");
    for needle in [
        "http://",
        "https://",
        "<link",
        "<script src",
        "@import",
        "url(",
    ] {
        assert!(
            !stripped.contains(needle),
            "the page refers to something outside it: {needle}"
        );
    }
    // The only script is inline.
    assert_eq!(html.matches("<script").count(), 1);
}

/// The page parsed as XML (its markup is well-formed XHTML as well as HTML).
fn with_doc<R>(html: &str, f: impl FnOnce(&roxmltree::Document) -> R) -> R {
    let body = html.trim_start_matches("<!DOCTYPE html>");
    let doc = roxmltree::Document::parse(body).unwrap_or_else(|e| panic!("not well-formed: {e}"));
    f(&doc)
}

fn by_id<'a>(doc: &'a roxmltree::Document, id: &str) -> roxmltree::Node<'a, 'a> {
    doc.descendants()
        .find(|n| n.attribute("id") == Some(id))
        .unwrap_or_else(|| panic!("no element #{id}"))
}

fn text_of(n: roxmltree::Node) -> String {
    n.descendants()
        .filter(|d| d.is_text())
        .filter_map(|d| d.text())
        .collect()
}

fn body_rows(table: roxmltree::Node) -> Vec<Vec<String>> {
    table
        .descendants()
        .filter(|n| n.has_tag_name("tbody"))
        .flat_map(|b| b.children().filter(|r| r.has_tag_name("tr")))
        .map(|r| {
            r.children()
                .filter(|c| c.is_element())
                .map(text_of)
                .collect()
        })
        .collect()
}

#[test]
fn report_is_self_contained_with_figures_tables_and_residuals() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("report.html");
    let html = page(out(), &file, &[]);
    assert_self_contained(&html);
    assert!(html.starts_with("<!DOCTYPE html>"));
    let s = json(&out().join("summary.json"));
    with_doc(&html, |doc| {
        // Five figures, each an inline SVG with its texts (the heat map shows the layer with
        // the largest |LCA|: fc1 on the example).
        for (id, title) in [
            ("fig-loss", "Training loss: actual vs rebuilt from LCA"),
            ("fig-layers", "Cumulative LCA per layer"),
            ("fig-helped", "Parameters that helped"),
            ("fig-peaks", "Learning peaks per layer"),
            ("fig-heatmap", "layer fc1"),
        ] {
            let fig = by_id(doc, id);
            let svg = fig
                .descendants()
                .find(|n| n.has_tag_name("svg"))
                .unwrap_or_else(|| panic!("{id}: no <svg>"));
            assert!(svg.attribute("viewBox").is_some(), "{id}");
            assert!(text_of(svg).contains(title), "{id} lacks {title:?}");
        }
        // The residual figures as `analyze` prints them.
        let res = text_of(by_id(doc, "residual-table"));
        assert!(res.contains("training loss"), "{res}");
        assert!(res.contains("0.0469 %"), "{res}");
        assert!(res.contains("0.0058 %"), "{res}");
        let summary = text_of(by_id(doc, "summary"));
        assert!(summary.contains("-1.896906"), "{summary}");
        // Per-layer table: one row per layer in model order with its total.
        let layers = body_rows(by_id(doc, "layers-table"));
        let names: Vec<&str> = layers.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(names, ["fc1", "fc2", "fc3"]);
        let fc1 = s["layers"][0]["lca"].as_f64().unwrap();
        assert_eq!(layers[0][2], format!("{fc1:.6}"));
        // Sortable tables carry exact values for the script.
        let lca_cell = by_id(doc, "layers-table")
            .descendants()
            .filter(|n| n.has_tag_name("td"))
            .nth(2)
            .unwrap();
        let v: f64 = lca_cell.attribute("data-v").unwrap().parse().unwrap();
        assert_eq!(v, fc1);
        assert_eq!(body_rows(by_id(doc, "tensors-table")).len(), 6);
        // Top parameters: the 15 most helpful, all negative and ascending.
        let helped = body_rows(by_id(doc, "helped-table"));
        assert_eq!(helped.len(), 15);
        let vals: Vec<f64> = helped.iter().map(|r| r[4].parse().unwrap()).collect();
        assert!(vals.windows(2).all(|w| w[0] <= w[1]) && vals[14] < 0.0);
        assert!(!body_rows(by_id(doc, "hurt-table")).is_empty());
        assert_eq!(body_rows(by_id(doc, "steps-table")).len(), 100);
        // Metadata with checksums, settings, and the spec text (unchanged since the run).
        let run = text_of(by_id(doc, "run"));
        for needle in [
            s["spec"]["sha256"].as_str().unwrap(),
            s["data"]["sha256"].as_str().unwrap(),
            s["checkpoints"][100]["sha256"].as_str().unwrap(),
            "simpson",
            "f32",
            "[[layers]]",
        ] {
            assert!(run.contains(needle), "run metadata lacks {needle}");
        }
        assert!(text_of(by_id(doc, "warnings")).contains("no warnings"));
    });
    // Written atomically: nothing else is left beside the report.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["report.html"]);
}

#[test]
fn heldout_l2_and_warnings_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Every other checkpoint: sparse steps give a warning.
    analyze("mlp_heldout", &out, &["--quiet", "--every", "2"]);
    let file = dir.path().join("r.html");
    let html = page(&out, &file, &["--heatmap-layer", "fc3", "--top", "5"]);
    assert_self_contained(&html);
    with_doc(&html, |doc| {
        let res = text_of(by_id(doc, "residual-table"));
        assert!(res.contains("held-out loss"), "{res}");
        let l2 = text_of(by_id(doc, "residuals"));
        assert!(l2.contains("L2 term") && l2.contains("0.0001"), "{l2}");
        let layers = by_id(doc, "layers-table");
        let heads = text_of(
            layers
                .descendants()
                .find(|n| n.has_tag_name("thead"))
                .unwrap(),
        );
        assert!(
            heads.contains("held-out LCA") && heads.contains("L2 LCA"),
            "{heads}"
        );
        assert!(text_of(by_id(doc, "fig-heatmap")).contains("layer fc3"));
        assert_eq!(body_rows(by_id(doc, "helped-table")).len(), 5);
        let w = text_of(by_id(doc, "warnings"));
        assert!(w.contains("2 training steps apart"), "{w}");
        assert!(text_of(by_id(doc, "run")).contains("held-out set"));
    });
}

#[test]
fn without_lca_tensors_the_heatmap_is_left_out_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    analyze(
        "mlp",
        &out,
        &["--quiet", "--last", "10", "--no-lca-tensors"],
    );
    let file = dir.path().join("r.html");
    let o = report(&out, &file, &[]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("heatmap"), "{err}");
    let html = std::fs::read_to_string(&file).unwrap();
    assert_eq!(html.matches("<svg").count(), 4);
    assert!(html.contains("The heatmap figure is not available"));
}

#[test]
fn bad_requests_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.html");
    let o = report(out(), &file, &["--heatmap-layer", "nope"]);
    fails_with(&o, &["nope", "fc1, fc2, fc3", "--heatmap-layer"]);
    assert!(!file.exists());
    let o = report(out(), &dir.path().join("r.txt"), &[]);
    fails_with(&o, &["r.txt", ".html"]);
    let o = report(&dir.path().join("missing"), &file, &[]);
    fails_with(&o, &["missing"]);
    let o = report(out(), &dir.path().join("no/r.html"), &[]);
    fails_with(&o, &["does not exist"]);
    // An existing report is replaced.
    std::fs::write(&file, "old").unwrap();
    assert!(report(out(), &file, &[]).status.success());
    assert!(std::fs::read_to_string(&file).unwrap().len() > 1000);
}

/// A heat map too large for SVG is embedded as a PNG data URI (still self-contained).
#[test]
fn large_heatmaps_are_embedded_as_png() {
    let dir = tempfile::tempdir().unwrap();
    let opts = lca::html::ReportOptions {
        file: dir.path().join("r.html"),
        heatmap_layer: Some("fc2".into()),
        top: 3,
        max_svg_cells: 100,
    };
    let w = lca::html::report(out(), &opts).unwrap();
    assert_eq!(w.figures.len(), 5);
    let html = std::fs::read_to_string(&opts.file).unwrap();
    assert_self_contained(&html);
    assert_eq!(html.matches("<svg").count(), 4);
    let start = html.find("data:image/png;base64,").expect("PNG heat map") + 22;
    let b64 = &html[start..start + 12];
    // "\x89PNG\r\n\x1a\n" in base64.
    assert_eq!(b64, "iVBORw0KGgoA");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["r.html"], "temporary PNG left behind");
}
