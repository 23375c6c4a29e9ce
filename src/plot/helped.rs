//! `--kind helped`: on every step, the percentage of parameters whose LCA was negative
//! (helped), exactly zero (did not move, or zero gradient) and positive (hurt), stacked to
//! 100 %. The study found barely more than half helping on any step.

use super::DrawResult;
use super::style::{self, LegendEntry, LegendKind};
use crate::output::Summary;
use plotters::coord::Shift;
use plotters::prelude::*;

/// Data of the helped figure.
pub struct HelpedFigure {
    /// (step, next step, helped %, zero %, hurt %).
    pub steps: Vec<(f64, f64, f64, f64, f64)>,
}

impl HelpedFigure {
    pub fn new(s: &Summary) -> HelpedFigure {
        HelpedFigure {
            steps: s
                .steps
                .iter()
                .map(|r| {
                    let n = (r.helped + r.zero + r.hurt).max(1) as f64;
                    (
                        r.step as f64,
                        r.next_step as f64,
                        100.0 * r.helped as f64 / n,
                        100.0 * r.zero as f64 / n,
                        100.0 * r.hurt as f64 / n,
                    )
                })
                .collect(),
        }
    }

    pub fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let n = self.steps.len().max(1) as f64;
        let mean =
            |f: fn(&(f64, f64, f64, f64, f64)) -> f64| self.steps.iter().map(f).sum::<f64>() / n;
        let (mh, mz, mu) = (mean(|s| s.2), mean(|s| s.3), mean(|s| s.4));
        let area = style::titled(
            root,
            "Parameters that helped, did not move, or hurt on each step",
            &[&format!(
                "mean over {} steps: {mh:.1}% helped · {mz:.1}% zero · {mu:.1}% hurt",
                self.steps.len()
            )],
        )?;
        let (w, _) = area.dim_in_pixel();
        let (left, legend) = area.split_horizontally(w.saturating_sub(280));
        let x0 = self.steps[0].0;
        let x1 = self.steps.last().map_or(x0 + 1.0, |s| s.1).max(x0 + 1.0);
        let mut chart = ChartBuilder::on(&left)
            .margin_left(10)
            .margin_right(20)
            .margin_top(5)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, 0.0..100.0)?;
        style::step_mesh(&mut chart.configure_mesh(), x0, x1)
            .x_desc("step t (θ_t → θ_t+1)")
            .y_desc("% of parameters")
            .y_label_formatter(&|v| format!("{v:.0}%"))
            .y_labels(11)
            .disable_x_mesh()
            .draw()?;
        for &(a, b, h, z, _) in &self.steps {
            chart.draw_series([
                Rectangle::new([(a, 0.0), (b, h)], style::HELPED.filled()),
                Rectangle::new([(a, h), (b, h + z)], style::ZERO.filled()),
                Rectangle::new([(a, h + z), (b, 100.0)], style::HURT.filled()),
            ])?;
        }
        chart.draw_series(DashedLineSeries::new(
            [(x0, 50.0), (x1, 50.0)],
            10,
            6,
            BLACK.mix(0.7).stroke_width(2),
        ))?;
        let entries = [
            LegendEntry {
                label: "helped (LCA < 0)".into(),
                colour: style::HELPED,
                kind: LegendKind::Box,
            },
            LegendEntry {
                label: "zero (LCA = 0)".into(),
                colour: style::ZERO,
                kind: LegendKind::Box,
            },
            LegendEntry {
                label: "hurt (LCA > 0)".into(),
                colour: style::HURT,
                kind: LegendKind::Box,
            },
            LegendEntry {
                label: "50%".into(),
                colour: RGBColor(77, 77, 77),
                kind: LegendKind::Dashed,
            },
        ];
        style::draw_legend(&legend, None, &entries, 10)?;
        Ok(())
    }
}
