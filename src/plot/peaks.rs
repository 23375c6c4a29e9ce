//! `--kind peaks`: every layer's LCA per step divided by that layer's own largest |LCA| per
//! step, one panel per layer on a shared step axis, so that learning peaks can be compared
//! across layers of very different size (the study found them synchronised, often on the
//! same iteration).

use super::DrawResult;
use super::layers::per_step;
use super::series::{GroupBy, SeriesKind, select};
use super::style::{self, font, grey_font};
use crate::error::Result;
use crate::output::Summary;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// Data of the peaks figure.
pub struct PeaksFigure {
    /// Step t of each value.
    pub x: Vec<f64>,
    /// (label, LCA per step / max |LCA|, max |LCA|): the largest layers (or blocks), "the
    /// rest" and the buffers (see [`super::series`]).
    pub layers: Vec<(String, Vec<f64>, f64)>,
    /// Kind of each panel, as `layers`.
    pub kinds: Vec<SeriesKind>,
}

/// At most this many layer (or block) panels; the others are summed into one.
pub const MAX_PANELS: usize = 8;

const X_LABELS: u32 = 70;

impl PeaksFigure {
    pub fn load(dir: &Path, s: &Summary, by: GroupBy) -> Result<PeaksFigure> {
        let series = select(per_step(dir, s)?, by, MAX_PANELS);
        let kinds = series.iter().map(|g| g.kind).collect();
        let layers = series
            .into_iter()
            .map(|g| {
                let v = &g.values;
                let m = v.iter().fold(0.0f64, |a, x| a.max(x.abs()));
                let norm = v
                    .iter()
                    .map(|x| if m > 0.0 { x / m } else { 0.0 })
                    .collect();
                (g.label(by), norm, m)
            })
            .collect();
        Ok(PeaksFigure {
            x: s.steps.iter().map(|r| r.step as f64).collect(),
            layers,
            kinds,
        })
    }

    /// 150 pixels per layer, at least 800.
    pub fn default_height(&self) -> u32 {
        (170 + X_LABELS + 150 * self.layers.len() as u32).clamp(800, 4000)
    }

    pub fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let area = style::titled(
            root,
            "Learning peaks per layer",
            &[
                "each layer's LCA per step ÷ that layer's largest |LCA| (right); down = it lowered the loss",
                "dips on the same step in several layers = synchronised learning",
            ],
        )?;
        let k = self.layers.len().max(1) as u32;
        let (w, h) = area.dim_in_pixel();
        let panel = (h.saturating_sub(X_LABELS + 10) / k).max(40);
        // The axis runs over the steps that have values (θ_t → θ_t+1 is drawn at t).
        let (mut x0, mut x1) = (self.x[0], self.x.last().copied().unwrap_or(self.x[0]));
        if x1 <= x0 {
            x0 -= 0.5;
            x1 += 0.5;
        }
        let mut rest = area;
        for (i, (name, v, m)) in self.layers.iter().enumerate() {
            let last = i + 1 == self.layers.len();
            let (this, below) = if last {
                let (a, b) = rest.split_vertically(panel + X_LABELS);
                (a, b)
            } else {
                rest.split_vertically(panel)
            };
            rest = below;
            let (plot_area, label) = this.split_horizontally(w.saturating_sub(260));
            let c = match self.kinds.get(i) {
                Some(SeriesKind::Rest(_)) => style::REST,
                Some(SeriesKind::Buffers) => style::BUFFER,
                _ => style::layer_colour(i).0,
            };
            let mut chart = ChartBuilder::on(&plot_area)
                .margin_left(10)
                .margin_right(10)
                .margin_top(6)
                .x_label_area_size(if last { X_LABELS } else { 0 })
                .y_label_area_size(80)
                .build_cartesian_2d(x0..x1, -1.15..1.15)?;
            let yfmt = |v: &f64| format!("{v:.0}");
            let mut mesh = chart.configure_mesh();
            style::step_mesh(&mut mesh, x0, x1)
                .y_labels(3)
                .y_label_formatter(&yfmt);
            if last {
                mesh.x_desc("step t (θ_t → θ_t+1)");
            }
            mesh.draw()?;
            chart.draw_series(LineSeries::new(
                [(x0, 0.0), (x1, 0.0)],
                style::AXIS_GREY.stroke_width(1),
            ))?;
            let pts: Vec<(f64, f64)> = self.x.iter().copied().zip(v.iter().copied()).collect();
            chart.draw_series(AreaSeries::new(pts.iter().copied(), 0.0, c.mix(0.3)))?;
            chart.draw_series(LineSeries::new(pts, c.stroke_width(2)))?;
            // The layer's name and scale beside its panel.
            let (_, ph) = label.dim_in_pixel();
            let ph = if last {
                ph.saturating_sub(X_LABELS)
            } else {
                ph
            } as i32;
            let (lw, _) = label.dim_in_pixel();
            label.draw(&Text::new(
                style::fit_text(&label, name, style::AXIS, lw.saturating_sub(14)),
                (10, ph / 2 - 22),
                font(style::AXIS).color(&c),
            ))?;
            label.draw(&Text::new(
                format!("max |LCA| {}", style::short(*m)),
                (10, ph / 2 + 6),
                grey_font(style::TICKS),
            ))?;
        }
        Ok(())
    }
}
