//! `lca plot`: figures of an analysis, as SVG or PNG (chosen by the file extension).
//!
//! Kinds, one module each:
//! - [`loss`]: the actual loss curve against the one rebuilt from LCA (L₀ + cumulative ΣLCA),
//!   with the per-step residuals in a second panel;
//! - [`layers`]: cumulative LCA per layer over the steps;
//! - [`helped`]: share of parameters that helped / did not move / hurt on each step;
//! - [`heatmap`]: neuron × step LCA of one layer (from `lca.safetensors`);
//! - [`peaks`]: per-layer LCA per step, each layer scaled by its own largest |LCA|, to see
//!   learning peaks that coincide across layers.
//!
//! Everything is drawn with `plotters` in pure Rust: text is rendered with the DejaVu Sans
//! font embedded in the binary (`assets/fonts`), so no system font library is involved and
//! figures look the same on every machine. Colours are consistent across kinds: blue =
//! helped (negative LCA), red = hurt (positive LCA).

pub mod heatmap;
pub mod helped;
pub mod layers;
pub mod loss;
pub mod peaks;
mod style;

use crate::error::{LcaError, Result};
use crate::output::json::read_summary;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Which figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlotKind {
    /// Actual vs reconstructed loss curve, and the per-step residuals.
    Loss,
    /// Cumulative LCA per layer over the steps.
    Layers,
    /// Percentage of parameters that helped / did not move / hurt, per step.
    Helped,
    /// Neuron × step heat map of one layer (needs `--layer` and lca.safetensors).
    Heatmap,
    /// Per-layer LCA per step, each layer normalised by its own max |LCA|.
    Peaks,
}

/// What to draw and where.
#[derive(Debug, Clone)]
pub struct PlotOptions {
    pub kind: PlotKind,
    /// Output file: `.svg` or `.png`.
    pub file: PathBuf,
    /// Layer of the heat map.
    pub layer: Option<String>,
    /// Size in pixels (SVG: user units); `None` = the kind's default.
    pub width: Option<u32>,
    pub height: Option<u32>,
}

/// Output format, from the file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Svg,
    Png,
}

impl ImageFormat {
    /// The format of `path`, by extension (case-insensitive).
    pub fn of(path: &Path) -> Result<ImageFormat> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("svg") => Ok(ImageFormat::Svg),
            Some("png") => Ok(ImageFormat::Png),
            _ => Err(LcaError::Usage(format!(
                "-o {}: the figure's file name must end in .svg or .png",
                path.display()
            ))),
        }
    }
}

/// A figure ready to draw: its data has been read and checked.
pub enum Figure {
    Loss(loss::LossFigure),
    Layers(layers::LayersFigure),
    Helped(helped::HelpedFigure),
    Heatmap(heatmap::HeatmapFigure),
    Peaks(peaks::PeaksFigure),
}

impl Figure {
    /// Read what the figure of `kind` needs from the output directory `dir`.
    pub fn load(dir: &Path, kind: PlotKind, layer: Option<&str>) -> Result<Figure> {
        if kind != PlotKind::Heatmap && layer.is_some() {
            return Err(LcaError::Usage(
                "--layer is only used by --kind heatmap".into(),
            ));
        }
        let s = read_summary(dir)?;
        if s.steps.is_empty() {
            return Err(LcaError::Output {
                path: dir.join(crate::output::SUMMARY_FILE),
                msg: "the run has no steps to plot".into(),
            });
        }
        Ok(match kind {
            PlotKind::Loss => Figure::Loss(loss::LossFigure::new(&s)),
            PlotKind::Layers => Figure::Layers(layers::LayersFigure::load(dir, &s)?),
            PlotKind::Helped => Figure::Helped(helped::HelpedFigure::new(&s)),
            PlotKind::Heatmap => {
                let Some(layer) = layer else {
                    return Err(LcaError::Usage(format!(
                        "--kind heatmap needs --layer NAME; the layers are {}",
                        s.model.layers.join(", ")
                    )));
                };
                Figure::Heatmap(heatmap::HeatmapFigure::load(dir, &s, layer)?)
            }
            PlotKind::Peaks => Figure::Peaks(peaks::PeaksFigure::load(dir, &s)?),
        })
    }

    /// Default size in pixels.
    pub fn default_size(&self) -> (u32, u32) {
        match self {
            Figure::Peaks(p) => (1200, p.default_height()),
            Figure::Heatmap(h) => (1200, h.default_height()),
            _ => (1200, 800),
        }
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        match self {
            Figure::Loss(f) => f.draw(root),
            Figure::Layers(f) => f.draw(root),
            Figure::Helped(f) => f.draw(root),
            Figure::Heatmap(f) => f.draw(root),
            Figure::Peaks(f) => f.draw(root),
        }
    }

    /// Draw into `file` (SVG or PNG by extension) at `size`.
    pub fn render(&self, file: &Path, size: (u32, u32)) -> Result<()> {
        let format = ImageFormat::of(file)?;
        style::register_fonts();
        let err = |msg: String| LcaError::Plot {
            path: file.to_path_buf(),
            msg,
        };
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty())
            && !parent.is_dir()
        {
            return Err(err(format!(
                "directory {} does not exist",
                parent.display()
            )));
        }
        match format {
            ImageFormat::Svg => {
                let root = SVGBackend::new(file, size).into_drawing_area();
                self.draw(&root).map_err(|e| err(e.to_string()))?;
                root.present().map_err(|e| err(e.to_string()))?;
            }
            ImageFormat::Png => {
                let root = BitMapBackend::new(file, size).into_drawing_area();
                self.draw(&root).map_err(|e| err(e.to_string()))?;
                root.present().map_err(|e| err(e.to_string()))?;
            }
        }
        // The SVG backend reports write errors only through a panic-free drop; make sure the
        // file really is there.
        match std::fs::metadata(file) {
            Ok(m) if m.len() > 0 => Ok(()),
            Ok(_) => Err(err("the written file is empty".into())),
            Err(e) => Err(LcaError::io(file, e)),
        }
    }
}

impl Figure {
    /// Draw as an SVG document in memory (for `lca report`).
    pub fn svg_string(&self, size: (u32, u32)) -> Result<String> {
        style::register_fonts();
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
            let err = |e: String| LcaError::Plot {
                path: PathBuf::from("(in memory)"),
                msg: e,
            };
            self.draw(&root).map_err(|e| err(e.to_string()))?;
            root.present().map_err(|e| err(e.to_string()))?;
        }
        Ok(svg)
    }

    /// Number of cells of a heat map (0 for other kinds): one SVG element each, so a large
    /// one is better embedded as a bitmap.
    pub fn cells(&self) -> usize {
        match self {
            Figure::Heatmap(h) => h.columns.len() * h.columns.first().map_or(0, |c| c.2.len()),
            _ => 0,
        }
    }
}

/// Result of drawing on a backend.
pub type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Draw the figure `opts.kind` of the output directory `dir` into `opts.file`.
pub fn plot(dir: &Path, opts: &PlotOptions) -> Result<()> {
    ImageFormat::of(&opts.file)?;
    for (name, v) in [("--width", opts.width), ("--height", opts.height)] {
        if let Some(v) = v
            && !(200..=20000).contains(&v)
        {
            return Err(LcaError::Usage(format!(
                "{name} must be between 200 and 20000 pixels, got {v}"
            )));
        }
    }
    let fig = Figure::load(dir, opts.kind, opts.layer.as_deref())?;
    let (w, h) = fig.default_size();
    fig.render(
        &opts.file,
        (opts.width.unwrap_or(w), opts.height.unwrap_or(h)),
    )
}
