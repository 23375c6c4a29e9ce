//! `--kind layers`: cumulative LCA of every layer over the steps (from `layers.csv`), with
//! their sum, which is the rebuilt loss change L(θ_t) − L(θ₀). A line going down is a layer
//! lowering the loss; one ending above zero is a layer that hurt over the run.

use super::DrawResult;
use super::style::{self, AXIS, LegendEntry, LegendKind, TICKS, font, padded, tick};
use crate::error::{LcaError, Result};
use crate::output::Summary;
use crate::output::csv::read_layer_steps;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// Data of the layers figure.
pub struct LayersFigure {
    /// Checkpoint steps: the first step, then every step's next step.
    pub x: Vec<f64>,
    /// (layer, cumulative LCA at each x, starting at 0).
    pub layers: Vec<(String, Vec<f64>)>,
}

/// Per-layer, per-step LCA from `layers.csv`, in model order: (layer, values per step).
pub fn per_step(dir: &Path, s: &Summary) -> Result<Vec<(String, Vec<f64>)>> {
    let rows = read_layer_steps(dir)?;
    let index: std::collections::HashMap<u64, usize> = s
        .steps
        .iter()
        .enumerate()
        .map(|(i, r)| (r.step, i))
        .collect();
    let mut out: Vec<(String, Vec<f64>)> = s
        .model
        .layers
        .iter()
        .map(|l| (l.clone(), vec![f64::NAN; s.steps.len()]))
        .collect();
    let path = dir.join("layers.csv");
    for r in rows {
        let (Some(&t), Some(l)) = (
            index.get(&r.step),
            out.iter_mut().find(|(name, _)| *name == r.layer),
        ) else {
            return Err(LcaError::Output {
                path,
                msg: format!(
                    "row for step {} layer '{}' does not match summary.json",
                    r.step, r.layer
                ),
            });
        };
        l.1[t] = r.lca;
    }
    if let Some((l, v)) = out.iter().find(|(_, v)| v.iter().any(|x| x.is_nan())) {
        let t = v.iter().position(|x| x.is_nan()).unwrap_or(0);
        return Err(LcaError::Output {
            path,
            msg: format!(
                "no row for layer '{l}' at step {} (incomplete output?)",
                s.steps[t].step
            ),
        });
    }
    Ok(out)
}

impl LayersFigure {
    pub fn load(dir: &Path, s: &Summary) -> Result<LayersFigure> {
        let mut x = vec![s.steps[0].step as f64];
        x.extend(s.steps.iter().map(|r| r.next_step as f64));
        let layers = per_step(dir, s)?
            .into_iter()
            .map(|(name, v)| {
                let mut cum = vec![0.0];
                let mut acc = 0.0;
                for d in v {
                    acc += d;
                    cum.push(acc);
                }
                (name, cum)
            })
            .collect();
        Ok(LayersFigure { x, layers })
    }

    pub fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let area = style::titled(
            root,
            "Cumulative LCA per layer",
            &["going down = the layer lowered the loss; above 0 at the end = it hurt over the run"],
        )?;
        let total: Vec<f64> = (0..self.x.len())
            .map(|i| self.layers.iter().map(|(_, v)| v[i]).sum())
            .collect();
        let (w, _) = area.dim_in_pixel();
        let (left, legend) = area.split_horizontally(w.saturating_sub(300));
        let x0 = self.x[0];
        let x1 = self.x.last().copied().unwrap_or(x0).max(x0 + 1.0);
        let all = self.layers.iter().flat_map(|(_, v)| v.iter()).copied();
        let (lo, hi) = all.fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
        let (y0, y1) = padded(lo, hi, 0.05);
        let mut chart = ChartBuilder::on(&left)
            .margin_left(10)
            .margin_right(20)
            .margin_top(5)
            .x_label_area_size(50)
            .y_label_area_size(95)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc("checkpoint step t")
            .y_desc("cumulative LCA (loss units)")
            .axis_desc_style(font(AXIS))
            .label_style(font(TICKS))
            .x_label_formatter(&|v| tick(*v, x0, x1))
            .y_label_formatter(&|v| tick(*v, y0, y1))
            .light_line_style(TRANSPARENT)
            .bold_line_style(style::GRID)
            .draw()?;
        chart.draw_series(LineSeries::new(
            [(x0, 0.0), (x1, 0.0)],
            style::AXIS_GREY.stroke_width(1),
        ))?;
        let mut entries = Vec::new();
        for (i, (name, v)) in self.layers.iter().enumerate() {
            let (c, dashed) = style::layer_colour(i);
            let pts = self.x.iter().copied().zip(v.iter().copied());
            if dashed {
                chart.draw_series(DashedLineSeries::new(pts, 8, 5, c.stroke_width(3)))?;
            } else {
                chart.draw_series(LineSeries::new(pts, c.stroke_width(3)))?;
            }
            entries.push(LegendEntry {
                label: format!("{name}  {}", style::short(*v.last().unwrap_or(&0.0))),
                colour: c,
                kind: if dashed {
                    LegendKind::Dashed
                } else {
                    LegendKind::Line
                },
            });
        }
        let y = style::draw_legend(&legend, Some("layer  total LCA"), &entries, 10)?;
        legend.draw(&Text::new(
            format!("sum  {}", style::short(*total.last().unwrap_or(&0.0))),
            (48, y),
            font(style::LEGEND),
        ))?;
        legend.draw(&Text::new(
            "(ΣLCA ≈ ΔL of the run)",
            (48, y + style::LEGEND as i32 + 6),
            style::grey_font(style::TICKS),
        ))?;
        Ok(())
    }
}
