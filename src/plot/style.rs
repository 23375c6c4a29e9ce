//! Shared look of the figures: the embedded font, font sizes, colours, the diverging colour
//! map, tick-label formatting and a legend drawn beside a chart.

use plotters::chart::MeshStyle;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// DejaVu Sans 2.37 (Bitstream Vera licence; see assets/fonts/README.md).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The font family every text uses.
pub const FAMILY: &str = "sans-serif";

/// Register the embedded font (once) under the family names plotters asks for.
pub fn register_fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for family in [FAMILY, "serif", "monospace"] {
            for style in [FontStyle::Normal, FontStyle::Bold] {
                // The font is valid TrueType; a failure would show as missing text.
                let _ = plotters::style::register_font(family, style, FONT);
            }
        }
    });
}

/// Font sizes in pixels (for the default 1200-pixel-wide figures).
pub const TITLE: u32 = 30;
pub const SUBTITLE: u32 = 20;
pub const AXIS: u32 = 22;
pub const TICKS: u32 = 18;
pub const LEGEND: u32 = 19;

pub fn font(size: u32) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&BLACK)
}

pub fn grey_font(size: u32) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&RGBColor(70, 70, 70))
}

/// Helped (negative LCA), did not move, hurt (positive LCA).
pub const HELPED: RGBColor = RGBColor(33, 102, 172);
pub const ZERO: RGBColor = RGBColor(200, 200, 200);
pub const HURT: RGBColor = RGBColor(178, 24, 43);
pub const AXIS_GREY: RGBColor = RGBColor(90, 90, 90);

/// Qualitative colours for layers (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(89, 161, 79),
    RGBColor(225, 87, 89),
    RGBColor(176, 122, 161),
    RGBColor(118, 183, 178),
    RGBColor(237, 201, 72),
    RGBColor(156, 117, 95),
    RGBColor(255, 157, 167),
    RGBColor(186, 176, 172),
];

/// Colour of "the rest" (layers summed into one line) and of the buffers.
pub const REST: RGBColor = RGBColor(110, 110, 110);
pub const BUFFER: RGBColor = RGBColor(20, 20, 20);

/// Colour of the i-th layer, and whether its line is dashed (past the tenth layer).
pub fn layer_colour(i: usize) -> (RGBColor, bool) {
    (PALETTE[i % PALETTE.len()], i >= PALETTE.len())
}

/// Diverging map (ColorBrewer RdBu, reversed): -1 → dark blue (helped), 0 → white,
/// +1 → dark red (hurt). Values outside [-1, 1] saturate.
pub fn diverging(v: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 11] = [
        (5, 48, 97),
        (33, 102, 172),
        (67, 147, 195),
        (146, 197, 222),
        (209, 229, 240),
        (247, 247, 247),
        (253, 219, 199),
        (244, 165, 130),
        (214, 96, 77),
        (178, 24, 43),
        (103, 0, 31),
    ];
    let v = if v.is_finite() {
        v.clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let x = (v + 1.0) / 2.0 * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let lerp = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2))
}

/// A number for a tick label on an axis spanning `lo..hi`: plain decimals with the precision
/// the span needs, or scientific notation for very small or large magnitudes.
pub fn tick(v: f64, lo: f64, hi: f64) -> String {
    let span = (hi - lo).abs();
    let m = lo.abs().max(hi.abs());
    if span > 0.0 && v.abs() < span * 1e-9 {
        return "0".into();
    }
    if m == 0.0 || !m.is_finite() {
        return format!("{v}");
    }
    if !(1e-2..1e6).contains(&m) {
        return sci(v);
    }
    let step = span / 8.0;
    let mut decimals = if step > 0.0 {
        (-step.log10().floor()).clamp(0.0, 6.0) as usize
    } else {
        2
    };
    // Never round a tick to a wrong value (0.25 is not "0.2").
    while decimals < 6 {
        let f = 10f64.powi(decimals as i32);
        if ((v * f).round() / f - v).abs() <= step.abs() * 1e-3 {
            break;
        }
        decimals += 1;
    }
    format!("{v:.decimals$}")
}

/// Scientific notation with up to three significant digits (`2.5e-6`, `-1e-5`).
fn sci(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let s = format!("{v:.2e}");
    match s.split_once('e') {
        Some((m, e)) if m.contains('.') => {
            let m = m.trim_end_matches('0').trim_end_matches('.');
            format!("{m}e{e}")
        }
        _ => s,
    }
}

/// A short number for a legend or title (`-0.720`, `3.5e-5`).
pub fn short(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e-2 && v.abs() < 1e5 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

/// Number of x labels for a step axis from `x0` to `x1`: at most one per step, so that the
/// ticks of a short run fall on whole steps (with [`step_tick`]).
pub fn step_labels(x0: f64, x1: f64) -> usize {
    (((x1 - x0).abs().round() as usize) + 1).clamp(2, 11)
}

/// A tick label on a step axis: the whole step, or nothing at a fractional position.
/// The mesh of every chart over checkpoint steps: step ticks and labels on x, the axis and
/// tick fonts, grid lines without the light ones. The caller adds the axis descriptions, the
/// y ticks, and draws.
pub fn step_mesh<'m, 'a, 'b, DB: DrawingBackend>(
    mesh: &'m mut MeshStyle<'a, 'b, RangedCoordf64, RangedCoordf64, DB>,
    x0: f64,
    x1: f64,
) -> &'m mut MeshStyle<'a, 'b, RangedCoordf64, RangedCoordf64, DB> {
    fn x_label(v: &f64) -> String {
        step_tick(*v)
    }
    mesh.axis_desc_style(font(AXIS))
        .label_style(font(TICKS))
        .x_labels(step_labels(x0, x1))
        .x_label_formatter(&x_label)
        .light_line_style(TRANSPARENT)
        .bold_line_style(GRID)
}

pub fn step_tick(v: f64) -> String {
    if (v - v.round()).abs() < 1e-6 {
        format!("{}", v.round() as i64)
    } else {
        String::new()
    }
}

/// Width in pixels of the widest tick label `tick` gives on an axis spanning `lo..hi` (nine
/// sample values), plus room for the axis title: the size of a y label area that never clips
/// a number.
pub fn y_label_width<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, lo: f64, hi: f64) -> u32 {
    let widest = (0..=8)
        .map(|i| lo + (hi - lo) * i as f64 / 8.0)
        .chain([lo, hi, -(lo.abs().max(hi.abs()))])
        .map(|v| text_width(area, &tick(v, lo, hi), TICKS))
        .max()
        .unwrap_or(60);
    // Scientific ticks between the samples may have one more digit.
    widest + TICKS + AXIS + 24
}

/// Width in pixels of `text` at `size`.
pub fn text_width<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, text: &str, size: u32) -> u32 {
    area.estimate_text_size(text, &font(size))
        .map(|(w, _)| w)
        .unwrap_or((text.chars().count() as f64 * size as f64 * 0.62) as u32)
}

/// `text` shortened in the middle (`blocks.1…fc2`) so that it is at most `max` pixels wide.
pub fn fit_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    size: u32,
    max: u32,
) -> String {
    if text_width(area, text, size) <= max {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    let mut keep = chars.len();
    while keep > 2 {
        keep -= 1;
        let head = keep.div_ceil(2);
        let tail = keep - head;
        let s: String = chars[..head]
            .iter()
            .chain(std::iter::once(&'…'))
            .chain(&chars[chars.len() - tail..])
            .collect();
        if text_width(area, &s, size) <= max {
            return s;
        }
    }
    "…".into()
}

/// Width of a legend column for `labels` (sample, gap and text), between `min` and `max`.
pub fn legend_width<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    labels: &[String],
    min: u32,
    max: u32,
) -> u32 {
    let widest = labels
        .iter()
        .map(|l| text_width(area, l, LEGEND))
        .max()
        .unwrap_or(0);
    // 10 % and 24 px to spare: a browser draws an SVG's text in its own sans-serif font,
    // which may be wider than the embedded one.
    (widest + widest / 10 + 48 + 24).clamp(min, max.max(min))
}

/// One legend line: a label and how its sample is drawn.
pub struct LegendEntry {
    pub label: String,
    pub colour: RGBColor,
    pub kind: LegendKind,
}

/// How a legend sample is drawn.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LegendKind {
    Line,
    Dashed,
    Dotted,
    Box,
}

/// Draw a legend as a column in `area` (beside the chart), starting at `top` pixels; returns
/// the y just below it. Labels wider than the column are shortened in the middle, so that
/// nothing is clipped.
pub fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: Option<&str>,
    entries: &[LegendEntry],
    top: i32,
) -> Result<i32, DrawingAreaErrorKind<DB::ErrorType>> {
    let line_h = (LEGEND as f64 * 1.6) as i32;
    let mut y = top;
    if let Some(t) = title {
        area.draw(&Text::new(t.to_string(), (8, y), font(LEGEND)))?;
        y += line_h;
    }
    for e in entries {
        let mid = y + LEGEND as i32 / 2;
        match e.kind {
            LegendKind::Box => {
                area.draw(&Rectangle::new(
                    [(10, mid - 8), (38, mid + 8)],
                    e.colour.filled(),
                ))?;
            }
            LegendKind::Line => {
                area.draw(&PathElement::new(
                    vec![(8, mid), (40, mid)],
                    e.colour.stroke_width(3),
                ))?;
            }
            LegendKind::Dashed => {
                for k in 0..3 {
                    area.draw(&PathElement::new(
                        vec![(8 + k * 12, mid), (16 + k * 12, mid)],
                        e.colour.stroke_width(3),
                    ))?;
                }
            }
            LegendKind::Dotted => {
                for k in 0..6 {
                    area.draw(&PathElement::new(
                        vec![(8 + k * 6, mid), (11 + k * 6, mid)],
                        e.colour.stroke_width(3),
                    ))?;
                }
            }
        }
        let (w, _) = area.dim_in_pixel();
        let room = w.saturating_sub(72);
        let label = fit_text(area, &e.label, LEGEND, room - room / 11);
        area.draw(&Text::new(label, (48, y), font(LEGEND)))?;
        y += line_h;
    }
    Ok(y)
}

/// A title and subtitle lines across the top of `area`; returns the area below them.
pub fn titled<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    subtitles: &[&str],
) -> Result<DrawingArea<DB, Shift>, DrawingAreaErrorKind<DB::ErrorType>> {
    let (w, _) = area.dim_in_pixel();
    let centre = (w / 2) as i32;
    let pos = plotters::style::text_anchor::Pos::new(
        plotters::style::text_anchor::HPos::Center,
        plotters::style::text_anchor::VPos::Top,
    );
    area.draw(&Text::new(
        title.to_string(),
        (centre, 12),
        font(TITLE).pos(pos),
    ))?;
    let mut used = 12 + TITLE as i32 + 10;
    for s in subtitles {
        area.draw(&Text::new(
            s.to_string(),
            (centre, used),
            grey_font(SUBTITLE).pos(pos),
        ))?;
        used += SUBTITLE as i32 + 8;
    }
    Ok(area.split_vertically(used + 6).1)
}

/// Faint grid lines: the bold mesh only, no minor lines.
pub const GRID: RGBColor = RGBColor(225, 225, 225);

/// Padding of a value range so lines do not touch the frame; a flat range gets a unit span.
pub fn padded(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (-1.0, 1.0);
    }
    if hi <= lo {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * frac;
    (lo - d, hi + d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_read_well() {
        assert_eq!(tick(50.0, 0.0, 100.0), "50");
        assert_eq!(tick(0.5, 0.0, 2.5), "0.5");
        assert_eq!(tick(0.25, 0.0, 1.0), "0.25");
        assert_eq!(tick(-0.4, -0.75, 0.0), "-0.40");
        assert_eq!(tick(2.0e-5, -5e-5, 5e-5), "2e-5");
        assert_eq!(tick(2.5e-5, -5e-5, 5e-5), "2.5e-5");
        assert_eq!(tick(1e-20, -1.0, 1.0), "0");
        assert_eq!(short(-0.720161), "-0.720");
        assert_eq!(short(5.4e-5), "5.40e-5");
    }

    #[test]
    fn diverging_map_is_centred() {
        assert_eq!(diverging(0.0), RGBColor(247, 247, 247));
        assert_eq!(diverging(-1.0), RGBColor(5, 48, 97));
        assert_eq!(diverging(1.0), RGBColor(103, 0, 31));
        assert_eq!(diverging(7.0), diverging(1.0));
        assert_eq!(diverging(f64::NAN), diverging(0.0));
    }
}
