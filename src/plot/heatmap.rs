//! `--kind heatmap --layer NAME`: LCA of every neuron of one layer on every step, from
//! `lca.safetensors`. A neuron is index `i` along axis 0 of each of the layer's tensors
//! (weight row summed over its other axes, plus the bias entry). Diverging colours centred at
//! 0: blue = helped, red = hurt, white = nothing. The colour scale is clipped at the 99th
//! percentile of |LCA| so that a few extreme cells do not wash out the rest; the subtitle says
//! where and how many cells saturate.

use super::DrawResult;
use super::style::{self, AXIS, TICKS, font, tick};
use crate::error::{LcaError, Result};
use crate::output::Summary;
use crate::output::tensors::{NeuronSteps, read_bucket_steps, read_neuron_steps};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// At most this many step columns are drawn; longer runs are summed into bins of consecutive
/// steps (LCA adds up over steps, so a bin holds the LCA of its whole span).
pub const MAX_COLUMNS: usize = 600;

/// Data of the heat map.
pub struct HeatmapFigure {
    pub layer: String,
    /// Tensors the neurons sum over.
    pub tensors: Vec<String>,
    /// Label of every row (neuron index, `c_proj 3`, a token, `h0 q`).
    pub rows: Vec<String>,
    /// What a row is (the first subtitle line).
    pub what: String,
    /// Columns: (first step, last next step, LCA per neuron).
    pub columns: Vec<(f64, f64, Vec<f64>)>,
    /// Steps per column (1 unless binned).
    pub bin: usize,
    /// Half-width of the colour scale.
    pub scale: f64,
    /// Largest |LCA| of a cell.
    pub max_abs: f64,
    /// Cells beyond ±scale.
    pub saturated: usize,
}

fn lca_file(dir: &Path) -> Result<std::path::PathBuf> {
    let path = dir.join("lca.safetensors");
    if !path.is_file() {
        return Err(LcaError::Output {
            path,
            msg: "not found: the heat map needs the per-step, per-parameter LCA that `lca analyze` writes unless --no-lca-tensors is given; rerun analyze without it".into(),
        });
    }
    Ok(path)
}

/// Append the rows of `ns` below those of `acc` (same steps).
fn stack(acc: &mut Option<NeuronSteps>, ns: NeuronSteps) {
    match acc {
        None => *acc = Some(ns),
        Some(a) => {
            for (row, more) in a.values.iter_mut().zip(ns.values) {
                row.extend(more);
            }
        }
    }
}

impl HeatmapFigure {
    /// The heat map of one layer. A layer whose tensors belong to sub-modules (attention's
    /// `c_attn` and `c_proj`) gets the neurons of each sub-module, one block of rows each.
    /// `vocab` labels the rows of a layer with as many rows as tokens (an embedding).
    pub fn load(
        dir: &Path,
        s: &Summary,
        layer: &str,
        vocab: Option<&[String]>,
    ) -> Result<HeatmapFigure> {
        let all: Vec<&crate::output::ParamRef> =
            s.model.params.iter().filter(|p| p.layer == layer).collect();
        if !all.is_empty() && all.iter().all(|p| p.buffer) {
            return Err(LcaError::Usage(format!(
                "--layer {layer}: these are batch-norm running statistics (buffers), not a layer; the layers are {}",
                layer_list(s)
            )));
        }
        let params: Vec<&crate::output::ParamRef> = all
            .into_iter()
            .filter(|p| !p.buffer && !p.shape.is_empty())
            .collect();
        if params.is_empty() {
            return Err(LcaError::Usage(format!(
                "--layer {layer}: no layer with parameters of that name in {}; the layers are {}",
                dir.display(),
                layer_list(s)
            )));
        }
        let path = lca_file(dir)?;
        let mut units: Vec<(&str, Vec<String>)> = Vec::new();
        for p in &params {
            let u = crate::summarize::unit_of(&p.role);
            match units.iter_mut().find(|(k, _)| *k == u) {
                Some((_, v)) => v.push(p.name.clone()),
                None => units.push((u, vec![p.name.clone()])),
            }
        }
        let mut acc = None;
        let mut rows = Vec::new();
        for (unit, names) in &units {
            let ns = read_neuron_steps(&path, names)?;
            let n = ns.values.first().map_or(0, |r| r.len());
            for i in 0..n {
                let token = vocab
                    .filter(|v| units.len() == 1 && v.len() == n)
                    .map(|v| v[i].as_str());
                rows.push(match (unit.is_empty(), token) {
                    (_, Some(t)) => format!("{i} {}", printable(t)),
                    (true, None) => i.to_string(),
                    (false, None) => format!("{unit} {i}"),
                });
            }
            stack(&mut acc, ns);
        }
        let tensors: Vec<String> = params.iter().map(|p| p.name.clone()).collect();
        let what = if units.len() > 1 {
            format!(
                "rows: neurons of {} (index along axis 0, summed over the other axes)",
                units
                    .iter()
                    .map(|u| u.0)
                    .collect::<Vec<_>>()
                    .join(", then ")
            )
        } else {
            format!(
                "neuron i = index i along axis 0 of {}, summed over the other axes",
                tensors.join(" + ")
            )
        };
        let ns = acc.expect("a layer with parameters");
        Self::from_steps(s, &path, layer.to_string(), tensors, rows, what, ns)
    }

    /// The per-head heat map of the attention layers: for every head, its q, k and v rows of
    /// the in-projection and its columns of the output projection (as `summarize --by head`),
    /// one row each, on every step.
    pub fn load_heads(dir: &Path, s: &Summary) -> Result<HeatmapFigure> {
        let att = &s.model.attention;
        if att.is_empty() {
            return Err(LcaError::Usage(
                "--kind heads: the analysed model has no attention layers".into(),
            ));
        }
        let path = lca_file(dir)?;
        let width = |name: &str| s.model.last_axis(name);
        let mut acc: Option<NeuronSteps> = None;
        let mut rows = Vec::new();
        let mut tensors = Vec::new();
        for a in att {
            let (c, hd, nh) = (a.heads * a.head_dim, a.head_dim.max(1), a.heads);
            let n = 4 * nh;
            let mut sum: Option<NeuronSteps> = None;
            let mut add = |ns: NeuronSteps| match &mut sum {
                None => sum = Some(ns),
                Some(t) => {
                    for (r, m) in t.values.iter_mut().zip(ns.values) {
                        r.iter_mut().zip(m).for_each(|(x, y)| *x += y);
                    }
                }
            };
            let cols = width(&a.in_proj_weight);
            add(read_bucket_steps(&path, &a.in_proj_weight, n, &|k| {
                let r = k / cols;
                ((r % c) / hd) * 4 + r / c
            })?);
            if let Some(b) = &a.in_proj_bias {
                add(read_bucket_steps(&path, b, n, &|k| {
                    ((k % c) / hd) * 4 + k / c
                })?);
                tensors.push(b.clone());
            }
            let cols = width(&a.out_proj_weight);
            add(read_bucket_steps(&path, &a.out_proj_weight, n, &|k| {
                ((k % cols) / hd) * 4 + 3
            })?);
            tensors.push(a.in_proj_weight.clone());
            tensors.push(a.out_proj_weight.clone());
            for h in 0..nh {
                for part in ["q", "k", "v", "out"] {
                    rows.push(format!("{} h{h} {part}", a.layer));
                }
            }
            if let Some(ns) = sum {
                stack(&mut acc, ns);
            }
        }
        let what = "rows: each head's q, k, v rows of the in-projection and its columns of the output projection (summarize --by head)".to_string();
        let ns = acc.expect("attention layers");
        Self::from_steps(s, &path, "attention heads".into(), tensors, rows, what, ns)
    }

    fn from_steps(
        s: &Summary,
        path: &Path,
        layer: String,
        tensors: Vec<String>,
        rows: Vec<String>,
        what: String,
        ns: NeuronSteps,
    ) -> Result<HeatmapFigure> {
        if ns.steps.len() != s.steps.len() {
            return Err(LcaError::Output {
                path: path.to_path_buf(),
                msg: format!(
                    "{} steps, but summary.json has {} (files of two different runs?)",
                    ns.steps.len(),
                    s.steps.len()
                ),
            });
        }
        let n = ns.steps.len();
        let bin = n.div_ceil(MAX_COLUMNS).max(1);
        let columns: Vec<(f64, f64, Vec<f64>)> = (0..n)
            .step_by(bin)
            .map(|a| {
                let b = (a + bin).min(n);
                let mut v = vec![0.0; ns.values[a].len()];
                for row in &ns.values[a..b] {
                    for (x, y) in v.iter_mut().zip(row) {
                        *x += y;
                    }
                }
                (ns.steps[a] as f64, ns.next_steps[b - 1] as f64, v)
            })
            .collect();
        let mut abs: Vec<f64> = columns
            .iter()
            .flat_map(|c| c.2.iter().map(|v| v.abs()))
            .collect();
        abs.sort_by(f64::total_cmp);
        let max_abs = abs.last().copied().unwrap_or(0.0);
        let p99 = abs
            .get(((abs.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0);
        let scale = if p99 > 0.0 {
            p99
        } else if max_abs > 0.0 {
            max_abs
        } else {
            1.0
        };
        let saturated = abs.iter().filter(|&&v| v > scale).count();
        Ok(HeatmapFigure {
            layer,
            tensors,
            rows,
            what,
            columns,
            bin,
            scale,
            max_abs,
            saturated,
        })
    }

    fn neurons(&self) -> usize {
        self.columns.first().map_or(0, |c| c.2.len())
    }

    /// Taller figures for layers with many neurons.
    pub fn default_height(&self) -> u32 {
        (300 + 12 * self.neurons() as u32).clamp(800, 2400)
    }

    pub fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let n = self.neurons();
        let what = format!(
            "{}{}",
            self.what,
            if self.bin > 1 {
                format!(" · {} steps per column", self.bin)
            } else {
                String::new()
            }
        );
        let scale = format!(
            "colour clipped at ±{} (99th percentile of |LCA|): {} of {} cells beyond, largest {}",
            style::short(self.scale),
            self.saturated,
            n * self.columns.len(),
            style::short(self.max_abs),
        );
        let area = style::titled(
            root,
            &if self.layer == "attention heads" {
                "LCA per attention head and step".to_string()
            } else {
                format!("LCA per neuron and step: layer {}", self.layer)
            },
            &[&what, &scale],
        )?;
        let (w, _) = area.dim_in_pixel();
        let (left, right) = area.split_horizontally(w.saturating_sub(190));
        let x0 = self.columns[0].0;
        let x1 = self.columns.last().map_or(x0 + 1.0, |c| c.1).max(x0 + 1.0);
        let (y0, y1) = (-0.5, n as f64 - 0.5);
        let widest = self
            .rows
            .iter()
            .map(|r| style::text_width(&left, r, TICKS))
            .max()
            .unwrap_or(40)
            .min(w / 3);
        let mut chart = ChartBuilder::on(&left)
            .margin_left(10)
            .margin_right(10)
            .margin_top(5)
            .x_label_area_size(50)
            .y_label_area_size(widest + AXIS + 30)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        let rows = &self.rows;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step t (θ_t → θ_t+1)")
            .y_desc(if self.layer == "attention heads" {
                "head"
            } else {
                "neuron"
            })
            .axis_desc_style(font(AXIS))
            .label_style(font(TICKS))
            .x_labels(style::step_labels(x0, x1))
            .x_label_formatter(&|v| style::step_tick(*v))
            .y_labels(if n <= 48 { n.max(2) } else { 17 })
            .y_label_formatter(&|v| {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 {
                    rows.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .draw()?;
        let scale = self.scale;
        chart.draw_series(self.columns.iter().flat_map(|(a, b, v)| {
            v.iter().enumerate().map(move |(i, &x)| {
                Rectangle::new(
                    [(*a, i as f64 - 0.5), (*b, i as f64 + 0.5)],
                    style::diverging(x / scale).filled(),
                )
            })
        }))?;
        self.colour_bar(&right)
    }

    fn colour_bar<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let s = self.scale;
        let (_, h) = area.dim_in_pixel();
        let (top, rest) = area.split_vertically(64);
        let (mid, bottom) = rest.split_vertically(h.saturating_sub(64 + 80));
        let centre = plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        );
        // Centre of the bar: 20 px margin + half of its 40 px.
        let cx = 40;
        top.draw(&Text::new("LCA", (cx + 20, 14), font(AXIS).pos(centre)))?;
        top.draw(&Text::new(
            "hurt (> 0)",
            (cx + 20, 46),
            font(TICKS).color(&style::HURT).pos(centre),
        ))?;
        let mut bar = ChartBuilder::on(&mid)
            .margin_top(5)
            .margin_left(20)
            .margin_bottom(5)
            .right_y_label_area_size(110)
            .build_cartesian_2d(0.0..1.0, -s..s)?;
        bar.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .label_style(font(TICKS))
            .y_labels(9)
            .y_label_formatter(&|v| tick(*v, -s, s))
            .draw()?;
        let k = 200;
        bar.draw_series((0..k).map(|j| {
            let a = -s + 2.0 * s * j as f64 / k as f64;
            let b = -s + 2.0 * s * (j + 1) as f64 / k as f64;
            Rectangle::new(
                [(0.0, a), (1.0, b)],
                style::diverging((a + b) / 2.0 / s).filled(),
            )
        }))?;
        bar.draw_series([Rectangle::new(
            [(0.0, -s), (1.0, s)],
            style::AXIS_GREY.stroke_width(1),
        )])?;
        bottom.draw(&Text::new(
            "helped (< 0)",
            (cx + 20, 20),
            font(TICKS).color(&style::HELPED).pos(centre),
        ))?;
        Ok(())
    }
}

/// The layers a heat map can show (buffers excluded).
fn layer_list(s: &Summary) -> String {
    s.model
        .layers
        .iter()
        .filter(|l| s.model.params.iter().any(|p| &p.layer == *l && !p.buffer))
        .cloned()
        .collect::<Vec<_>>()
        .join(", ")
}

/// A token as a row label: control characters and spaces made visible, at most 16 characters.
fn printable(t: &str) -> String {
    let s: String = t
        .chars()
        .map(|c| match c {
            ' ' => '␣',
            '\n' => '↵',
            '\t' => '⇥',
            c if c.is_control() => '·',
            c => c,
        })
        .take(16)
        .collect();
    format!("‘{s}’")
}
