//! `lca report OUT/ -o report.html`: one self-contained HTML page of an analysis, to share or
//! archive. Everything is inside the file — the figures of `lca plot` as inline SVG (a very
//! large heat map as an embedded PNG), CSS and a small script that makes the tables sortable
//! — so it opens offline and makes no network request. Without JavaScript the tables are
//! shown in model order; printing gives one readable document (print CSS, collapsed sections
//! opened).
//!
//! The page holds the run's metadata (inputs with checksums, the spec text when it is still
//! the analysed one, integration settings, precision, batch-norm mode), the residual summary
//! (training, held-out, L2), the five figures, per-layer, per-tensor, top-parameter and
//! per-step tables, and the run's warnings. The markup is well-formed XML as well as HTML,
//! which the tests use to check its structure.

use crate::error::{LcaError, Result};
use crate::plot::{Figure, PlotKind};
use crate::report::{Summary, json::read_summary, step_list};
use crate::summarize::{By, Cell, Sort, Table, view};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What to write.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// The HTML file.
    pub file: PathBuf,
    /// Layer of the heat map (default: the layer with the largest |LCA|).
    pub heatmap_layer: Option<String>,
    /// Rows of the most helpful and of the most hurtful parameters.
    pub top: usize,
    /// Heat maps with more cells are embedded as PNG ([`MAX_SVG_CELLS`] by default).
    pub max_svg_cells: usize,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    pub file: PathBuf,
    pub bytes: usize,
    /// Figures included, by kind name.
    pub figures: Vec<String>,
    /// Figures that could not be drawn and why (e.g. no lca.safetensors for the heat map).
    pub missing: Vec<String>,
}

/// Heat maps with more cells than this are embedded as PNG instead of SVG (one SVG element
/// per cell would make the page slow to open).
pub const MAX_SVG_CELLS: usize = 40_000;

/// Write the report of the analysis in `dir`.
pub fn report(dir: &Path, opts: &ReportOptions) -> Result<Written> {
    match opts
        .file
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
    {
        Some(e) if e == "html" || e == "htm" => {}
        _ => {
            return Err(LcaError::Usage(format!(
                "-o {}: the report's file name must end in .html",
                opts.file.display()
            )));
        }
    }
    if opts.file.is_dir() {
        return Err(LcaError::Output {
            path: opts.file.clone(),
            msg: "is a directory".into(),
        });
    }
    let (html, figures, missing) = render(dir, opts)?;
    crate::init::write_atomically(&opts.file, html.as_bytes(), true)?;
    Ok(Written {
        file: opts.file.clone(),
        bytes: html.len(),
        figures,
        missing,
    })
}

/// Escape text for HTML (and XML) content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A number as the tables of `summarize` show it.
fn num(f: f64) -> String {
    if f.is_nan() {
        "–".into()
    } else if f == 0.0 {
        "0".into()
    } else if f.abs() >= 1e-3 && f.abs() < 1e4 {
        format!("{f:.6}")
    } else {
        format!("{f:.4e}")
    }
}

fn pct(f: f64) -> String {
    if f.is_nan() {
        "– (ΔL = 0)".into()
    } else {
        format!("{:.4} %", 100.0 * f)
    }
}

fn shape(s: &[usize]) -> String {
    if s.is_empty() {
        "scalar".into()
    } else {
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(" × ")
    }
}

/// Column headings and their explanations (shown as tooltips).
fn heading(col: &str) -> (&str, &str) {
    match col {
        "lca" => (
            "LCA",
            "Σ LCA over the run: negative = lowered the training loss (helped)",
        ),
        "share_of_abs_delta" => (
            "share of |ΔL|",
            "LCA / |L_T − L_0|: the fraction of the run's loss change accounted for",
        ),
        "helped" => ("helped", "parameters whose summed LCA is negative"),
        "zero" => ("zero", "parameters whose summed LCA is exactly zero"),
        "hurt" => ("hurt", "parameters whose summed LCA is positive"),
        "helped_fraction" => ("helped fraction", "helped / params"),
        "val_lca" => (
            "held-out LCA",
            "LCA of the held-out loss along the same path",
        ),
        "l2_lca" => ("L2 LCA", "change of the λ‖θ‖² term (its exact LCA)"),
        "flat_index" => ("flat index", "C-order index in the tensor"),
        "index" => ("index", "multi-dimensional index (row, column, …)"),
        "helped_steps" => (
            "steps helped",
            "steps on which this parameter's LCA was negative",
        ),
        "hurt_steps" => (
            "steps hurt",
            "steps on which this parameter's LCA was positive",
        ),
        "next_step" => ("next step", ""),
        "loss_before" => ("loss before", "L(θ_t)"),
        "loss_after" => ("loss after", "L(θ_{t+1})"),
        "delta_loss" => ("ΔL", "L(θ_{t+1}) − L(θ_t)"),
        "lca_sum" => ("Σ LCA", "LCA of the step summed over all parameters"),
        "residual" => ("residual", "ΔL − Σ LCA: the integration error of the step"),
        "splits" => ("splits", "Simpson sub-intervals used on the step"),
        other => (other, ""),
    }
}

/// Columns whose sign means helped / hurt (coloured).
fn signed(col: &str) -> bool {
    matches!(
        col,
        "lca" | "share_of_abs_delta" | "val_lca" | "l2_lca" | "delta_loss" | "lca_sum"
    )
}

/// A sortable table: numeric cells carry their exact value in `data-v`.
fn table_html(t: &Table, id: &str, caption: &str) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<div class=\"scroll\"><table class=\"sortable\" id=\"{id}\"><caption>{}</caption><thead><tr>",
        esc(caption)
    );
    let numeric: Vec<bool> = (0..t.columns.len())
        .map(|i| {
            t.rows
                .first()
                .is_some_and(|r| !matches!(r[i], Cell::Str(_)))
        })
        .collect();
    for (i, c) in t.columns.iter().enumerate() {
        let (label, tip) = heading(c);
        let _ = write!(
            h,
            "<th scope=\"col\" data-type=\"{}\"{}{}>{}</th>",
            if numeric[i] { "num" } else { "text" },
            if numeric[i] { " class=\"n\"" } else { "" },
            if tip.is_empty() {
                String::new()
            } else {
                format!(" title=\"{}\"", esc(tip))
            },
            esc(label)
        );
    }
    h.push_str("</tr></thead><tbody>");
    for r in &t.rows {
        h.push_str("<tr>");
        for (i, c) in r.iter().enumerate() {
            match c {
                Cell::Str(s) => {
                    let _ = write!(h, "<td>{}</td>", esc(s));
                }
                Cell::Int(v) => {
                    let _ = write!(h, "<td class=\"n\" data-v=\"{v}\">{v}</td>");
                }
                Cell::Float(v) => {
                    let class = if signed(t.columns[i]) && *v < 0.0 {
                        "n neg"
                    } else if signed(t.columns[i]) && *v > 0.0 {
                        "n pos"
                    } else {
                        "n"
                    };
                    let shown = if t.columns[i] == "helped_fraction" && v.is_finite() {
                        format!("{:.1} %", 100.0 * v)
                    } else if t.columns[i] == "share_of_abs_delta" && v.is_finite() {
                        format!("{:+.2} %", 100.0 * v)
                    } else {
                        num(*v)
                    };
                    let _ = write!(
                        h,
                        "<td class=\"{class}\" data-v=\"{}\">{}</td>",
                        if v.is_nan() {
                            "NaN".to_string()
                        } else {
                            format!("{v:e}")
                        },
                        esc(&shown)
                    );
                }
            }
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table></div>");
    h
}

/// Rows of a definition list.
fn dl(rows: &[(&str, String)]) -> String {
    let mut h = String::from("<dl class=\"meta\">");
    for (k, v) in rows {
        let _ = write!(h, "<dt>{}</dt><dd>{v}</dd>", esc(k));
    }
    h.push_str("</dl>");
    h
}

fn code(s: &str) -> String {
    format!("<code>{}</code>", esc(s))
}

/// The layer the heat map shows by default: the largest |LCA| among layers with parameters.
fn default_heatmap_layer(s: &Summary) -> Option<String> {
    s.layers
        .iter()
        .filter(|l| s.model.layers.contains(&l.name))
        .max_by(|a, b| a.lca.abs().total_cmp(&b.lca.abs()))
        .map(|l| l.name.clone())
}

/// Draw one figure for the page: inline SVG, or a PNG data URI for a huge heat map.
fn figure_markup(fig: &Figure, tmp_dir: &Path, max_cells: usize) -> Result<String> {
    let size = fig.default_size();
    if fig.cells() > max_cells {
        let tmp = tmp_dir.join(format!(".lca-report-{}.png", std::process::id()));
        let r = fig.render(&tmp, size);
        let bytes = r.and_then(|_| std::fs::read(&tmp).map_err(|e| LcaError::io(&tmp, e)));
        let _ = std::fs::remove_file(&tmp);
        let bytes = bytes?;
        return Ok(format!(
            "<img src=\"data:image/png;base64,{}\" width=\"{}\" height=\"{}\" alt=\"heat map\"/>",
            base64(&bytes),
            size.0,
            size.1
        ));
    }
    let svg = fig.svg_string(size)?;
    // role and label for screen readers; the XML declaration, if any, cannot be inline.
    let svg = svg.trim_start_matches(|c: char| c.is_whitespace());
    let svg = match svg.strip_prefix("<?xml") {
        Some(rest) => rest.split_once("?>").map_or(rest, |x| x.1).trim_start(),
        None => svg,
    };
    Ok(svg.replacen("<svg ", "<svg role=\"img\" ", 1))
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut o = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                o.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                o.push('=');
            }
        }
    }
    o
}

/// What each figure shows (from docs/plots.md).
fn caption(kind: PlotKind, layer: Option<&str>) -> String {
    match kind {
        PlotKind::Loss => "<b>Loss.</b> The full-training-set loss at every checkpoint (light blue) and the loss rebuilt from LCA, L(θ₀) + cumulative ΣLCA (dashed); they coincide when the allocation is exact. Below: the per-step residual r_t = ΔL_t − ΣLCA_t.".into(),
        PlotKind::Layers => "<b>Layers.</b> Cumulative LCA of every layer. Going down = the layer lowered the loss; a layer that ends above 0 hurt over the run.".into(),
        PlotKind::Helped => "<b>Helped.</b> On each step, the percentage of parameters whose LCA was negative (helped, blue), zero (grey) and positive (hurt, red).".into(),
        PlotKind::Peaks => "<b>Peaks.</b> Each layer's LCA per step, divided by its own largest |LCA| per step: dips on the same step in several layers are synchronised learning peaks.".into(),
        PlotKind::Heatmap => format!(
            "<b>Heat map of {}.</b> LCA of every neuron (rows: index along axis 0 of the layer's tensors) on every step (columns). Blue = helped, red = hurt; the scale is clipped at the 99th percentile of |LCA|.",
            esc(layer.unwrap_or("?"))
        ),
    }
}

const CSS: &str = r#"
:root { --fg: #1d1d1f; --muted: #5a5a60; --line: #d9d9de; --bg2: #f5f5f7; --helped: #2166ac; --hurt: #b2182b; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0 auto; max-width: 1180px; padding: 0 28px 48px; color: var(--fg); background: #fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; }
header { padding: 28px 0 4px; }
h1 { font-size: 1.7em; margin: 0 0 4px; font-weight: 650; letter-spacing: -0.01em; }
h2 { font-size: 1.3em; margin: 36px 0 10px; padding-top: 8px; border-top: 1px solid var(--line); }
h3 { font-size: 1.05em; margin: 22px 0 8px; }
.sub { color: var(--muted); margin: 0 0 8px; }
nav { margin: 10px 0 0; font-size: 0.93em; }
nav a { margin-right: 14px; color: var(--helped); text-decoration: none; white-space: nowrap; }
nav a:hover { text-decoration: underline; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(175px, 1fr)); gap: 10px; margin: 16px 0; }
.card { background: var(--bg2); border-radius: 8px; padding: 10px 14px; }
.card .k { color: var(--muted); font-size: 0.85em; }
.card .v { font-size: 1.2em; font-weight: 600; font-variant-numeric: tabular-nums; white-space: nowrap; }
.verdict { padding: 10px 14px; border-radius: 8px; margin: 12px 0; }
.ok { background: #e8f3ea; border-left: 4px solid #2e7d32; }
.warn { background: #fdf3e1; border-left: 4px solid #c77700; }
.scroll { overflow-x: auto; margin: 8px 0 16px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 0.92em; min-width: 50%; }
caption { text-align: left; color: var(--muted); padding: 0 0 6px; font-size: 0.95em; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: var(--bg2); font-weight: 600; position: sticky; top: 0; }
td.n, th.n { text-align: right; }
td.neg { color: var(--helped); }
td.pos { color: var(--hurt); }
tbody tr:hover { background: #fafafc; }
th button { font: inherit; color: inherit; background: none; border: 0; padding: 0; cursor: pointer; text-align: inherit; }
th button:focus-visible { outline: 2px solid var(--helped); outline-offset: 2px; }
th[aria-sort="ascending"] button::after { content: " \25B2"; font-size: 0.75em; }
th[aria-sort="descending"] button::after { content: " \25BC"; font-size: 0.75em; }
.js-only { display: none; }
.js .js-only { display: block; }
.hint { color: var(--muted); font-size: 0.88em; margin: 0; }
figure { margin: 18px 0 28px; }
figure svg, figure img { display: block; width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 0.92em; margin-top: 6px; max-width: 900px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 8px 0 16px; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 0.9em; }
pre { background: var(--bg2); padding: 12px 14px; border-radius: 6px; overflow-x: auto; line-height: 1.4; }
details { margin: 8px 0 14px; }
summary { cursor: pointer; color: var(--helped); }
ul.warnings li { margin: 4px 0; }
.none { color: var(--muted); }
footer { margin-top: 40px; color: var(--muted); font-size: 0.85em; border-top: 1px solid var(--line); padding-top: 10px; }
@media (max-width: 700px) { body { padding: 0 12px 32px; } dl.meta { grid-template-columns: 1fr; } }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  nav, .js-only, .hint { display: none !important; }
  h2 { break-after: avoid; page-break-after: avoid; }
  figure, .card, .verdict, tr, dl.meta { break-inside: avoid; page-break-inside: avoid; }
  figure svg, figure img { border: 0; }
  th { position: static; }
  .scroll { overflow: visible; }
  th, td { white-space: normal; }
  a { color: inherit; text-decoration: none; }
  summary { color: inherit; }
}
"#;

/// Sortable tables (click a heading; again to reverse), and collapsed sections opened for
/// printing. Without JavaScript, the page is complete and the tables are in model order.
const SCRIPT: &str = r#"
(function () {
  "use strict";
  document.documentElement.className += " js";
  function key(td, num) {
    var v = td.getAttribute("data-v");
    if (num) {
      var x = parseFloat(v);
      return isNaN(x) ? Infinity : x;
    }
    return (v === null ? td.textContent : v).toLowerCase();
  }
  function sortBy(table, col, th) {
    var num = th.getAttribute("data-type") === "num";
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var heads = table.tHead.rows[0].cells;
    for (var h = 0; h < heads.length; h++) heads[h].setAttribute("aria-sort", "none");
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (r, i) { return { r: r, i: i, k: key(r.cells[col], num) }; });
    keyed.sort(function (a, b) {
      var c = a.k < b.k ? -1 : (a.k > b.k ? 1 : 0);
      if (!asc) c = -c;
      return c !== 0 ? c : a.i - b.i;
    });
    keyed.forEach(function (x) { body.appendChild(x.r); });
  }
  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      var b = document.createElement("button");
      b.type = "button";
      while (th.firstChild) b.appendChild(th.firstChild);
      th.appendChild(b);
      th.setAttribute("aria-sort", "none");
      b.addEventListener("click", function () { sortBy(table, col, th); });
    });
  });
  window.addEventListener("beforeprint", function () {
    Array.prototype.forEach.call(document.querySelectorAll("details"), function (d) { d.open = true; });
  });
})();
"#;

/// Build the page; returns it with the figures drawn and those that could not be.
pub fn render(dir: &Path, opts: &ReportOptions) -> Result<(String, Vec<String>, Vec<String>)> {
    let s = read_summary(dir)?;
    let r = &s.run;
    let spec_name = Path::new(&s.spec.path)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| s.spec.path.clone());
    let first = s.steps.first().map_or(0, |x| x.step);
    let last = s.steps.last().map_or(0, |x| x.next_step);
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>");
    h.push_str("<meta name=\"generator\" content=\"lca\"/>");
    let _ = write!(
        h,
        "<title>LCA report: {} ({} steps)</title><style>{CSS}</style></head><body>",
        esc(&spec_name),
        r.steps
    );

    // Header and navigation.
    let _ = write!(
        h,
        "<header><h1>Loss Change Allocation report</h1><p class=\"sub\">{} · {} steps ({first} → {last}) · {} samples · {} parameters · {}</p>",
        code(&s.spec.path),
        r.steps,
        s.data.samples,
        s.model.num_params,
        esc(&s.model.loss)
    );
    h.push_str("<nav><a href=\"#summary\">Summary</a><a href=\"#residuals\">Residuals</a><a href=\"#figures\">Figures</a><a href=\"#layers\">Layers</a><a href=\"#tensors\">Tensors</a><a href=\"#params\">Top parameters</a><a href=\"#steps\">Steps</a><a href=\"#warnings\">Warnings</a><a href=\"#run\">Run</a></nav></header><main>");

    // Summary cards and a sentence.
    h.push_str("<section id=\"summary\"><h2>Summary</h2><div class=\"cards\">");
    let card = |k: &str, v: String| {
        format!(
            "<div class=\"card\"><div class=\"k\">{}</div><div class=\"v\">{v}</div></div>",
            esc(k)
        )
    };
    h.push_str(&card(
        "training loss",
        format!("{:.4}\u{2009}→\u{2009}{:.4}", r.loss_first, r.loss_last),
    ));
    h.push_str(&card("ΔL", format!("{:+.6}", r.delta_loss)));
    h.push_str(&card("Σ LCA", format!("{:+.6}", r.lca_sum)));
    h.push_str(&card("Σ|r| / |ΔL|", esc(&pct(r.rel_abs_residual))));
    h.push_str(&card("max |r_t|", format!("{:.2e}", r.max_abs_residual)));
    h.push_str(&card("gradient evaluations", r.evaluations.to_string()));
    h.push_str("</div>");
    let tol = s.integration.settings.abs_tol;
    let rel = r.rel_abs_residual;
    let shown = pct(rel).replace(' ', "\u{a0}");
    let capped = if r.capped_steps.is_empty() {
        String::new()
    } else {
        format!(
            " {} step(s) stayed above the residual bound {tol:e} at the largest number of splits.",
            r.capped_steps.len()
        )
    };
    let (class, text) = if rel.is_finite() && rel <= 1e-3 {
        (
            "ok",
            format!(
                "The allocation is exact to {shown} of the loss change: on every step the per-parameter LCA sums to ΔL up to the residuals below.{capped}"
            ),
        )
    } else if rel.is_finite() && rel <= 1e-2 {
        (
            "ok",
            format!(
                "The allocation accounts for the loss change to within {shown} (Σ|r|/|ΔL|); the largest per-step residual is {:.2e}.{capped}",
                r.max_abs_residual
            ),
        )
    } else {
        (
            "warn",
            format!(
                "The residual is {shown} of the loss change: per-step integration errors are large compared with ΔL, so read per-parameter figures with care (a tighter --tolerance refines more steps; sparse checkpoints cannot be refined below their spacing).{capped}"
            ),
        )
    };
    let class = if r.capped_steps.is_empty() {
        class
    } else {
        "warn"
    };
    let _ = write!(h, "<p class=\"verdict {class}\">{text}</p>");
    let mut layers_sorted: Vec<&crate::report::GroupTotal> = s.layers.iter().collect();
    layers_sorted.sort_by(|a, b| a.lca.total_cmp(&b.lca));
    if let Some(best) = layers_sorted.first() {
        let hurt: Vec<String> = s
            .layers
            .iter()
            .filter(|l| l.lca > 0.0)
            .map(|l| format!("{} ({:+.4})", code(&l.name), l.lca))
            .collect();
        let _ = write!(
            h,
            "<p>The layer that lowered the loss most: {} with LCA {:+.6} ({:.1} % of |ΔL|). Layers whose total LCA is positive (they raised the loss over the run): {}.</p>",
            code(&best.name),
            best.lca,
            if r.delta_loss != 0.0 {
                100.0 * best.lca.abs() / r.delta_loss.abs()
            } else {
                f64::NAN
            },
            if hurt.is_empty() {
                "none".to_string()
            } else {
                hurt.join(", ")
            }
        );
    }
    h.push_str("</section>");

    // Residuals.
    h.push_str("<section id=\"residuals\"><h2>Residuals</h2><p>For every step, the residual r_t = ΔL_t − Σ LCA_t is what the integration did not allocate. Σ|r|/|ΔL| cannot hide per-step errors that cancel and is the honest figure.</p>");
    h.push_str("<div class=\"scroll\"><table id=\"residual-table\"><thead><tr><th scope=\"col\">objective</th><th class=\"n\">L first</th><th class=\"n\">L last</th><th class=\"n\">ΔL</th><th class=\"n\">Σ LCA</th><th class=\"n\">Σ r</th><th class=\"n\">Σ|r| / |ΔL|</th><th class=\"n\">|Σ r| / |ΔL|</th><th class=\"n\">max |r_t|</th></tr></thead><tbody>");
    let row = |name: &str, a: f64, b: f64, d: f64, l: f64, rs: f64, ra: f64, rr: f64, mx: f64| {
        format!(
            "<tr><th scope=\"row\">{}</th><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:+.6}</td><td class=\"n\">{:+.6}</td><td class=\"n\">{:.3e}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:.3e}</td></tr>",
            esc(name),
            num(a),
            num(b),
            d,
            l,
            rs,
            esc(&pct(ra)),
            esc(&pct(rr)),
            mx
        )
    };
    h.push_str(&row(
        "training loss",
        r.loss_first,
        r.loss_last,
        r.delta_loss,
        r.lca_sum,
        r.residual_sum,
        r.rel_abs_residual,
        r.rel_residual,
        r.max_abs_residual,
    ));
    if let Some(v) = &r.validation {
        h.push_str(&row(
            "held-out loss",
            v.loss_first,
            v.loss_last,
            v.delta_loss,
            v.lca_sum,
            v.residual_sum,
            v.rel_abs_residual,
            v.rel_residual,
            v.max_abs_residual,
        ));
    }
    h.push_str("</tbody></table></div>");
    if let Some(l2) = &r.l2 {
        let _ = write!(
            h,
            "<h3>L2 term</h3>{}",
            dl(&[
                ("λ", format!("{}", l2.lambda)),
                (
                    "λ‖θ‖²",
                    format!("{} → {}", num(l2.penalty_first), num(l2.penalty_last)),
                ),
                (
                    "its LCA column sums to",
                    format!("{:+.6} (exact, closed form)", l2.lca_sum),
                ),
                (
                    "objective ΔL (data loss + L2)",
                    format!("{:+.6}", l2.objective_delta),
                ),
                (
                    "tensors",
                    if l2.tensors.len() == s.model.params.iter().filter(|p| !p.buffer).count() {
                        "all parameter tensors".to_string()
                    } else {
                        esc(&l2.tensors.join(", "))
                    },
                ),
            ])
        );
    }
    let refined: Vec<u64> = s
        .steps
        .iter()
        .filter(|x| x.splits > 2)
        .map(|x| x.step)
        .collect();
    let _ = write!(
        h,
        "<p>{} gradient evaluations; {} step(s) refined beyond plain Simpson{}; {} step(s) at the split cap{}.</p></section>",
        r.evaluations,
        refined.len(),
        if refined.is_empty() {
            String::new()
        } else {
            format!(" ({})", esc(&step_list(&refined)))
        },
        r.capped_steps.len(),
        if r.capped_steps.is_empty() {
            String::new()
        } else {
            format!(" ({})", esc(&step_list(&r.capped_steps)))
        }
    );

    // Figures.
    h.push_str("<section id=\"figures\"><h2>Figures</h2><p>Blue = helped (negative LCA, lowered the loss), red = hurt (positive LCA). The same figures as <code>lca plot</code>; their data is in the output directory's tables.</p>");
    let heat_layer = opts
        .heatmap_layer
        .clone()
        .or_else(|| default_heatmap_layer(&s));
    let tmp_dir = match opts.file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut drawn = Vec::new();
    let mut missing = Vec::new();
    for kind in [
        PlotKind::Loss,
        PlotKind::Layers,
        PlotKind::Helped,
        PlotKind::Peaks,
        PlotKind::Heatmap,
    ] {
        let name = match kind {
            PlotKind::Loss => "loss",
            PlotKind::Layers => "layers",
            PlotKind::Helped => "helped",
            PlotKind::Peaks => "peaks",
            PlotKind::Heatmap => "heatmap",
        };
        let layer = (kind == PlotKind::Heatmap)
            .then_some(heat_layer.as_deref())
            .flatten();
        let fig = match Figure::load(dir, kind, layer) {
            Ok(f) => f,
            Err(e) => {
                // A heat-map layer the user named must exist; a missing lca.safetensors only
                // costs the figure.
                if kind == PlotKind::Heatmap
                    && opts.heatmap_layer.is_some()
                    && matches!(e, LcaError::Usage(_))
                {
                    return Err(LcaError::Usage(
                        e.to_string().replace("--layer", "--heatmap-layer"),
                    ));
                }
                let _ = write!(
                    h,
                    "<figure id=\"fig-{name}\"><p class=\"none\">The {name} figure is not available: {}</p></figure>",
                    esc(&e.to_string())
                );
                missing.push(format!("{name}: {e}"));
                continue;
            }
        };
        let _ = write!(
            h,
            "<figure id=\"fig-{name}\">{}<figcaption>{}</figcaption></figure>",
            figure_markup(&fig, &tmp_dir, opts.max_svg_cells)?,
            caption(kind, layer)
        );
        drawn.push(name.to_string());
    }
    h.push_str("</section>");

    // Tables.
    let hint =
        "<p class=\"hint js-only\">Click a column heading to sort; click again to reverse.</p>";
    let (_, layers) = view(dir, By::Layer)?;
    let _ = write!(
        h,
        "<section id=\"layers\"><h2>Layers</h2>{hint}{}</section>",
        table_html(
            &layers,
            "layers-table",
            if s.layers.iter().any(|l| l.name == "buffers") {
                "Totals over the run per layer, in model order; \"buffers\" is the batch-norm running statistics read from the checkpoints (running-stats mode)."
            } else {
                "Totals over the run per layer, in model order."
            }
        )
    );
    let (_, tensors) = view(dir, By::Tensor)?;
    let _ = write!(
        h,
        "<section id=\"tensors\"><h2>Tensors</h2>{}</section>",
        table_html(
            &tensors,
            "tensors-table",
            "Totals over the run per parameter tensor, in model order."
        )
    );
    match view(dir, By::Param) {
        Ok((_, mut helped)) => {
            let mut hurt = helped.clone();
            helped.sort_and_limit(Sort::Helped, Some(opts.top));
            helped
                .rows
                .retain(|r| matches!(r[4], Cell::Float(v) if v < 0.0));
            hurt.sort_and_limit(Sort::Hurt, Some(opts.top));
            hurt.rows
                .retain(|r| matches!(r[4], Cell::Float(v) if v > 0.0));
            let _ = write!(
                h,
                "<section id=\"params\"><h2>Top parameters</h2><p>Single parameters by their LCA summed over the run (<code>lca summarize --by param</code>); the index is (row, column, …) in the tensor.</p><h3>Most helpful</h3>{}<h3>Most hurtful</h3>{}</section>",
                if helped.rows.is_empty() {
                    "<p class=\"none\">No parameter has a negative total LCA.</p>".to_string()
                } else {
                    table_html(
                        &helped,
                        "helped-table",
                        &format!(
                            "The {} parameters with the most negative LCA.",
                            helped.rows.len()
                        ),
                    )
                },
                if hurt.rows.is_empty() {
                    "<p class=\"none\">No parameter has a positive total LCA.</p>".to_string()
                } else {
                    table_html(
                        &hurt,
                        "hurt-table",
                        &format!(
                            "The {} parameters with the most positive LCA.",
                            hurt.rows.len()
                        ),
                    )
                }
            );
        }
        Err(e) => {
            let _ = write!(
                h,
                "<section id=\"params\"><h2>Top parameters</h2><p class=\"none\">Not available: {}</p></section>",
                esc(&e.to_string())
            );
        }
    }
    let (_, steps) = view(dir, By::Step)?;
    let _ = write!(
        h,
        "<section id=\"steps\"><h2>Steps</h2><details><summary>Per-step losses, Σ LCA and residuals ({} steps)</summary>{}</details></section>",
        s.steps.len(),
        table_html(
            &steps,
            "steps-table",
            "One row per step θ_t → θ_{t+1} (steps.csv)."
        )
    );

    // Warnings.
    h.push_str("<section id=\"warnings\"><h2>Warnings</h2>");
    if s.warnings.is_empty() {
        h.push_str("<p class=\"none\">The run reported no warnings.</p>");
    } else {
        h.push_str("<ul class=\"warnings\">");
        for w in &s.warnings {
            let _ = write!(h, "<li>{}</li>", esc(w));
        }
        h.push_str("</ul>");
    }
    if !s.ignored_tensors.is_empty() {
        let _ = write!(
            h,
            "<p>Tensors in the checkpoints that the spec does not use (ignored): {}.</p>",
            s.ignored_tensors
                .iter()
                .map(|t| code(t))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !missing.is_empty() {
        h.push_str("<p>Figures not drawn: ");
        h.push_str(&esc(&missing.join("; ")));
        h.push_str("</p>");
    }
    h.push_str("</section>");

    // Run metadata.
    h.push_str("<section id=\"run\"><h2>Run</h2><h3>Inputs</h3>");
    let mut inputs = vec![
        (
            "spec",
            format!(
                "{} <br/>sha256 {}",
                code(&s.spec.path),
                code(&s.spec.sha256)
            ),
        ),
        (
            "training set",
            format!(
                "{} <br/>sha256 {}<br/>{} samples of shape {}, evaluated in {} chunk(s) of {}",
                code(&s.data.path),
                code(&s.data.sha256),
                s.data.samples,
                esc(&shape(&s.data.sample_shape)),
                s.data.chunks,
                s.data.chunk_size
            ),
        ),
    ];
    if let Some(v) = &s.data.validation {
        inputs.push((
            "held-out set",
            format!(
                "{} <br/>sha256 {}<br/>{} samples",
                code(&v.path),
                code(&v.sha256),
                v.samples
            ),
        ));
    }
    let sp = &s.step_spacing;
    inputs.push((
        "checkpoints",
        format!(
            "{} files, steps {}; {}{}",
            s.checkpoints.len(),
            esc(&step_list(
                &s.checkpoints.iter().map(|c| c.step).collect::<Vec<_>>()
            )),
            match (sp.min, sp.max) {
                (1, 1) => "one every training step".to_string(),
                (a, b) if a == b => format!("{a} training steps apart"),
                (a, b) => format!("{a}–{b} training steps apart"),
            },
            if sp.sparse {
                " (sparse: the split over parameters follows the straight chord between checkpoints)"
            } else {
                ""
            }
        ),
    ));
    h.push_str(&dl(&inputs));
    h.push_str("<details><summary>Every checkpoint with its sha256</summary><div class=\"scroll\"><table id=\"checkpoints-table\"><thead><tr><th class=\"n\">step</th><th>file</th><th>step from</th><th>sha256</th></tr></thead><tbody>");
    for c in &s.checkpoints {
        let _ = write!(
            h,
            "<tr><td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            c.step,
            code(&c.path),
            match c.step_source {
                crate::checkpoint::StepSource::Metadata => "metadata",
                crate::checkpoint::StepSource::FileName => "file name",
            },
            code(&c.sha256)
        );
    }
    h.push_str("</tbody></table></div></details>");

    let m = &s.model;
    let _ = write!(
        h,
        "<h3>Model</h3>{}",
        dl(&[
            ("loss", esc(&m.loss)),
            ("parameters", format!("{} in {} tensors", m.num_params, m.params.iter().filter(|p| !p.buffer).count())),
            (
                "input → output (per sample)",
                format!("{} → {}", esc(&shape(&m.input_shape)), esc(&shape(&m.output_shape))),
            ),
            (
                "layers with parameters",
                m.layers.iter().map(|l| code(l)).collect::<Vec<_>>().join(", "),
            ),
            (
                "batch norm",
                match m.batch_norm {
                    Some(crate::spec::BnMode::BatchStats) => "batch-stats (statistics of each evaluation chunk; the chunk size is part of the loss)".into(),
                    Some(crate::spec::BnMode::RunningStats) => "running-stats (the checkpoints' running_mean / running_var; their LCA is the \"buffers\" row)".into(),
                    None => "none in the model".to_string(),
                },
            ),
        ])
    );
    let i = &s.integration.settings;
    let _ = write!(
        h,
        "<h3>Integration</h3>{}",
        dl(&[
            (
                "method",
                esc(&format!("{:?}", i.method).to_lowercase()).replace("firstorder", "first-order"),
            ),
            (
                "adaptive refinement",
                if i.adaptive {
                    format!("yes, up to {} sub-intervals per step", i.max_splits)
                } else {
                    "no".into()
                },
            ),
            (
                "residual bound",
                format!(
                    "{:e} (loss units){}",
                    i.abs_tol,
                    i.rel_tol
                        .map(|r| format!(", or {r:e} × |ΔL_t|"))
                        .unwrap_or_default()
                ),
            ),
            ("precision", esc(&s.integration.precision)),
            (
                "tool",
                format!("{} {}", esc(&s.tool.name), esc(&s.tool.version))
            ),
        ])
    );
    // The spec text, when the file is still the analysed one.
    h.push_str("<h3>Spec</h3>");
    let spec_path = Path::new(&s.spec.path);
    match std::fs::read(spec_path) {
        Ok(bytes) if crate::tensors::sha256_hex(&bytes) == s.spec.sha256 => {
            let _ = write!(
                h,
                "<details><summary>{} as analysed (sha256 matches)</summary><pre>{}</pre></details>",
                code(&s.spec.path),
                esc(&String::from_utf8_lossy(&bytes))
            );
        }
        Ok(_) => {
            let _ = write!(
                h,
                "<p class=\"none\">{} has changed since the analysis (its sha256 differs), so its text is not included.</p>",
                code(&s.spec.path)
            );
        }
        Err(_) => {
            let _ = write!(
                h,
                "<p class=\"none\">{} cannot be read from here, so its text is not included (its sha256 is above).</p>",
                code(&s.spec.path)
            );
        }
    }
    h.push_str("</section></main>");
    let _ = write!(
        h,
        "<footer>Made by {} {} <code>report</code> from {} · Loss Change Allocation: Lan, Liu, Zhou, Yosinski, NeurIPS 2019. This page is self-contained: it makes no network request.</footer>",
        esc(&s.tool.name),
        esc(env!("CARGO_PKG_VERSION")),
        code(&dir.display().to_string())
    );
    let _ = writeln!(h, "<script>//<![CDATA[{SCRIPT}//]]></script></body></html>");
    Ok((h, drawn, missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (a, b) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(a.as_bytes()), b);
        }
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(esc("a<b & \"c\"'"), "a&lt;b &amp; &quot;c&quot;&#39;");
    }
}
