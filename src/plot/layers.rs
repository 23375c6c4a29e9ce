//! `--kind layers`: cumulative LCA of every layer over the steps (from `layers.csv`), with
//! their sum, which is the rebuilt loss change L(θ_t) − L(θ₀). A line going down is a layer
//! lowering the loss; one ending above zero is a layer that hurt over the run.

use super::DrawResult;
use super::series::{GroupBy, MAX_SERIES, Series, SeriesKind, select};
use super::style::{self, LegendEntry, LegendKind, font, padded, tick};
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
    /// Lines: the largest layers (or blocks), "the rest" and the buffers, with their
    /// cumulative LCA at each x, starting at 0.
    pub series: Vec<Series>,
    /// How layers are grouped.
    pub by: GroupBy,
    /// Layers (or blocks) in the run, buffers not counted.
    pub groups: usize,
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
    pub fn load(dir: &Path, s: &Summary, by: GroupBy) -> Result<LayersFigure> {
        let mut x = vec![s.steps[0].step as f64];
        x.extend(s.steps.iter().map(|r| r.next_step as f64));
        let per = per_step(dir, s)?;
        let groups = select(per.clone(), by, usize::MAX)
            .iter()
            .filter(|g| g.kind == SeriesKind::Group)
            .count();
        let series = select(per, by, MAX_SERIES)
            .into_iter()
            .map(|mut g| {
                let mut cum = vec![0.0];
                let mut acc = 0.0;
                for d in &g.values {
                    acc += d;
                    cum.push(acc);
                }
                g.values = cum;
                g
            })
            .collect();
        Ok(LayersFigure {
            x,
            series,
            by,
            groups,
        })
    }

    pub fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let what = match self.by {
            GroupBy::Layer => "layer",
            GroupBy::Block => "block",
        };
        let shown = self
            .series
            .iter()
            .filter(|g| g.kind == SeriesKind::Group)
            .count();
        let sub2 = if shown < self.groups {
            format!(
                "the {shown} {what}s with the largest |total| of {}; the others summed into one line",
                self.groups
            )
        } else {
            format!("all {} {what}s", self.groups)
        };
        let area = style::titled(
            root,
            &format!("Cumulative LCA per {what}"),
            &[
                "going down = it lowered the loss; above 0 at the end = it hurt over the run",
                &sub2,
            ],
        )?;
        let total: Vec<f64> = (0..self.x.len())
            .map(|i| self.series.iter().map(|g| g.values[i]).sum())
            .collect();
        let mut entries = Vec::new();
        let mut rank = 0;
        let styled: Vec<(RGBColor, LegendKind)> = self
            .series
            .iter()
            .map(|g| match g.kind {
                SeriesKind::Group => {
                    let (c, dashed) = style::layer_colour(rank);
                    rank += 1;
                    (
                        c,
                        if dashed {
                            LegendKind::Dashed
                        } else {
                            LegendKind::Line
                        },
                    )
                }
                SeriesKind::Rest(_) => (style::REST, LegendKind::Dashed),
                SeriesKind::Buffers => (style::BUFFER, LegendKind::Dotted),
            })
            .collect();
        for (g, (c, kind)) in self.series.iter().zip(&styled) {
            entries.push(LegendEntry {
                label: format!(
                    "{}  {}",
                    g.label(self.by),
                    style::short(*g.values.last().unwrap_or(&0.0))
                ),
                colour: *c,
                kind: *kind,
            });
        }
        let (w, _) = area.dim_in_pixel();
        let labels: Vec<String> = entries.iter().map(|e| e.label.clone()).collect();
        let lw = style::legend_width(&area, &labels, 240, w * 2 / 5);
        let (left, legend) = area.split_horizontally(w.saturating_sub(lw));
        let x0 = self.x[0];
        let x1 = self.x.last().copied().unwrap_or(x0).max(x0 + 1.0);
        let all = self.series.iter().flat_map(|g| g.values.iter()).copied();
        let (lo, hi) = all.fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
        let (y0, y1) = padded(lo, hi, 0.05);
        let mut chart = ChartBuilder::on(&left)
            .margin_left(10)
            .margin_right(20)
            .margin_top(5)
            .x_label_area_size(50)
            .y_label_area_size(style::y_label_width(&left, y0, y1))
            .build_cartesian_2d(x0..x1, y0..y1)?;
        style::step_mesh(&mut chart.configure_mesh(), x0, x1)
            .x_desc("checkpoint step t")
            .y_desc("cumulative LCA (loss units)")
            .y_label_formatter(&|v| tick(*v, y0, y1))
            .draw()?;
        chart.draw_series(LineSeries::new(
            [(x0, 0.0), (x1, 0.0)],
            style::AXIS_GREY.stroke_width(1),
        ))?;
        for (g, (c, kind)) in self.series.iter().zip(&styled) {
            let pts = self.x.iter().copied().zip(g.values.iter().copied());
            match kind {
                LegendKind::Dashed => {
                    chart.draw_series(DashedLineSeries::new(pts, 8, 5, c.stroke_width(3)))?;
                }
                LegendKind::Dotted => {
                    chart.draw_series(DashedLineSeries::new(pts, 3, 4, c.stroke_width(3)))?;
                }
                _ => {
                    chart.draw_series(LineSeries::new(pts, c.stroke_width(3)))?;
                }
            }
        }
        let y = style::draw_legend(&legend, Some(&format!("{what}  total LCA")), &entries, 10)?;
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
