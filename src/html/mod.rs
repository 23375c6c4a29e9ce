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
use crate::output::{Summary, json::read_summary, step_list};
use crate::plot::{Figure, PlotKind};
use crate::summarize::{By, Cell, Sort, Table, view};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

mod figures;
mod head;
mod overview;
mod residuals;
mod run;
mod tables;
mod warnings;

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
    let Rendered {
        html,
        figures,
        missing,
    } = render(dir, opts)?;
    crate::files::write_atomic(&opts.file, html.as_bytes(), crate::files::Mode::Replace)?;
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

/// What [`render`] returns: the page, and the figures drawn and left out.
pub struct Rendered {
    /// The HTML text.
    pub html: String,
    /// Names of the figures drawn.
    pub figures: Vec<String>,
    /// Figures that could not be drawn, with why.
    pub missing: Vec<String>,
}

/// The figures section's result: names drawn, and what could not be drawn.
struct Figures {
    drawn: Vec<String>,
    missing: Vec<String>,
}

/// What every section reads.
#[derive(Clone, Copy)]
struct Page<'a> {
    dir: &'a Path,
    opts: &'a ReportOptions,
    s: &'a Summary,
    spec_name: &'a str,
    /// First and last step of the run.
    first: u64,
    last: u64,
}

/// The page, section by section.
pub fn render(dir: &Path, opts: &ReportOptions) -> Result<Rendered> {
    let s = read_summary(dir)?;
    let spec_name = Path::new(&s.spec.path)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| s.spec.path.clone());
    let p = Page {
        dir,
        opts,
        s: &s,
        spec_name: &spec_name,
        first: s.steps.first().map_or(0, |x| x.step),
        last: s.steps.last().map_or(0, |x| x.next_step),
    };
    let mut h = String::new();
    head::write(&mut h, &p)?;
    overview::write(&mut h, &p)?;
    residuals::write(&mut h, &p)?;
    let Figures { drawn, missing } = figures::write(&mut h, &p)?;
    tables::write(&mut h, &p)?;
    warnings::write(&mut h, &p, &missing)?;
    run::write(&mut h, &p)?;
    let _ = writeln!(h, "<script>//<![CDATA[{SCRIPT}//]]></script></body></html>");
    Ok(Rendered {
        html: h,
        figures: drawn,
        missing,
    })
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
