//! `--kind loss`: the actual full-set loss at every checkpoint against the loss rebuilt from
//! LCA, L₀ + cumulative ΣLCA (they coincide when the allocation is exact), and below it the
//! per-step residuals r_t = ΔL_t − ΣLCA_t that separate them.

use super::DrawResult;
use super::style::{self, AXIS, font, padded, tick};
use crate::output::Summary;
use plotters::coord::Shift;
use plotters::prelude::*;

/// Data of the loss figure.
pub struct LossFigure {
    /// (checkpoint step, actual loss, reconstructed loss), first checkpoint included.
    pub points: Vec<(f64, f64, f64)>,
    /// (step, next step, residual) per step.
    pub residuals: Vec<(f64, f64, f64)>,
    pub rel_abs_residual: f64,
    pub rel_residual: f64,
    pub max_abs_residual: f64,
}

impl LossFigure {
    pub fn new(s: &Summary) -> LossFigure {
        let first = &s.steps[0];
        let mut points = vec![(first.step as f64, s.run.loss_first, s.run.loss_first)];
        points.extend(
            s.steps
                .iter()
                .map(|r| (r.next_step as f64, r.loss_after, r.reconstructed_loss)),
        );
        LossFigure {
            points,
            residuals: s
                .steps
                .iter()
                .map(|r| (r.step as f64, r.next_step as f64, r.residual))
                .collect(),
            rel_abs_residual: s.run.rel_abs_residual,
            rel_residual: s.run.rel_residual,
            max_abs_residual: s.run.max_abs_residual,
        }
    }

    pub fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let pct = |x: f64| {
            if x.is_finite() {
                format!("{:.3}%", 100.0 * x)
            } else {
                "n/a".into()
            }
        };
        let area = style::titled(
            root,
            "Training loss: actual vs rebuilt from LCA",
            &[&format!(
                "{} steps · Σ|r|/|ΔL| = {} · |Σr|/|ΔL| = {} · max |r_t| = {}",
                self.residuals.len(),
                pct(self.rel_abs_residual),
                pct(self.rel_residual),
                style::short(self.max_abs_residual)
            )],
        )?;
        let (_, h) = area.dim_in_pixel();
        let (top, bottom) = area.split_vertically((h as f64 * 0.64) as u32);

        let x0 = self.points[0].0;
        let x1 = self.points.last().map_or(x0 + 1.0, |p| p.0).max(x0 + 1.0);
        let lo = self
            .points
            .iter()
            .map(|p| p.1.min(p.2))
            .fold(f64::INFINITY, f64::min);
        let hi = self
            .points
            .iter()
            .map(|p| p.1.max(p.2))
            .fold(f64::NEG_INFINITY, f64::max);
        let (y0, y1) = padded(lo, hi, 0.05);
        let mut chart = ChartBuilder::on(&top)
            .margin_left(10)
            .margin_right(30)
            .margin_top(5)
            .x_label_area_size(50)
            .y_label_area_size(95)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        style::step_mesh(&mut chart.configure_mesh(), x0, x1)
            .x_desc("checkpoint step t")
            .y_desc("full-training-set loss L(θ_t)")
            .y_label_formatter(&|v| tick(*v, y0, y1))
            .draw()?;
        let actual = RGBColor(120, 170, 220);
        chart
            .draw_series(LineSeries::new(
                self.points.iter().map(|p| (p.0, p.1)),
                actual.stroke_width(7),
            ))?
            .label("actual L(θ_t)")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 30, y)], actual.stroke_width(7))
            });
        let rebuilt = RGBColor(20, 20, 20);
        chart
            .draw_series(DashedLineSeries::new(
                self.points.iter().map(|p| (p.0, p.2)),
                10,
                6,
                rebuilt.stroke_width(2),
            ))?
            .label("rebuilt L(θ₀) + cumulative ΣLCA")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 30, y)], rebuilt.stroke_width(2))
            });
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .margin(15)
            .legend_area_size(40)
            .label_font(font(style::LEGEND))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(150, 150, 150))
            .draw()?;

        let m = self.residuals.iter().map(|r| r.2.abs()).fold(0.0, f64::max);
        let m = if m > 0.0 { m * 1.15 } else { 1e-9 };
        let mut res = ChartBuilder::on(&bottom)
            .caption(
                "per-step residual r_t = ΔL_t − ΣLCA_t (what the allocation missed)",
                font(AXIS),
            )
            .margin_left(10)
            .margin_right(30)
            .margin_top(10)
            .margin_bottom(5)
            .x_label_area_size(50)
            .y_label_area_size(95)
            .build_cartesian_2d(x0..x1, -m..m)?;
        style::step_mesh(&mut res.configure_mesh(), x0, x1)
            .x_desc("step t (θ_t → θ_t+1)")
            .y_desc("residual (loss)")
            .y_label_formatter(&|v| tick(*v, -m, m))
            .y_labels(7)
            .draw()?;
        res.draw_series(self.residuals.iter().map(|&(a, b, r)| {
            let gap = (b - a) * 0.15;
            Rectangle::new(
                [(a + gap, 0.0), (b - gap, r)],
                RGBColor(80, 80, 80).filled(),
            )
        }))?;
        res.draw_series(LineSeries::new(
            [(x0, 0.0), (x1, 0.0)],
            BLACK.stroke_width(1),
        ))?;
        Ok(())
    }
}
