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
use crate::output::tensors::read_neuron_steps;
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

impl HeatmapFigure {
    pub fn load(dir: &Path, s: &Summary, layer: &str) -> Result<HeatmapFigure> {
        let tensors: Vec<String> = s
            .model
            .params
            .iter()
            .filter(|p| p.layer == layer)
            .map(|p| p.name.clone())
            .collect();
        if tensors.is_empty() {
            return Err(LcaError::Usage(format!(
                "--layer {layer}: no layer with parameters of that name in {}; the layers are {}",
                dir.display(),
                s.model.layers.join(", ")
            )));
        }
        let path = dir.join("lca.safetensors");
        if !path.is_file() {
            return Err(LcaError::Output {
                path,
                msg: "not found: the heat map needs the per-step, per-parameter LCA that `lca analyze` writes unless --no-lca-tensors is given; rerun analyze without it".into(),
            });
        }
        let ns = read_neuron_steps(&path, &tensors)?;
        if ns.steps.len() != s.steps.len() {
            return Err(LcaError::Output {
                path,
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
            layer: layer.to_string(),
            tensors,
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
            "neuron i = index i along axis 0 of {}, summed over the other axes{}",
            self.tensors.join(" + "),
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
            &format!("LCA per neuron and step: layer {}", self.layer),
            &[&what, &scale],
        )?;
        let (w, _) = area.dim_in_pixel();
        let (left, right) = area.split_horizontally(w.saturating_sub(190));
        let x0 = self.columns[0].0;
        let x1 = self.columns.last().map_or(x0 + 1.0, |c| c.1).max(x0 + 1.0);
        let (y0, y1) = (-0.5, n as f64 - 0.5);
        let mut chart = ChartBuilder::on(&left)
            .margin_left(10)
            .margin_right(10)
            .margin_top(5)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step t (θ_t → θ_t+1)")
            .y_desc("neuron")
            .axis_desc_style(font(AXIS))
            .label_style(font(TICKS))
            .x_label_formatter(&|v| tick(*v, x0, x1))
            .y_labels(n.clamp(2, 17))
            .y_label_formatter(&|v| {
                if (v - v.round()).abs() < 1e-6 {
                    format!("{}", v.round())
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
