//! The figures, drawn as `lca plot` draws them.

use super::*;

/// Write this section.
pub(super) fn write(h: &mut String, p: &Page) -> Result<Figures> {
    let Page { dir, opts, s, .. } = *p;
    // Figures.
    h.push_str("<section id=\"figures\"><h2>Figures</h2><p>Blue = helped (negative LCA, lowered the loss), red = hurt (positive LCA). The same figures as <code>lca plot</code>; their data is in the output directory's tables.</p>");
    let heat_layer = opts
        .heatmap_layer
        .clone()
        .or_else(|| default_heatmap_layer(s));
    let tmp_dir = match opts.file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut drawn = Vec::new();
    let mut missing = Vec::new();
    let mut kinds = vec![
        PlotKind::Loss,
        PlotKind::Layers,
        PlotKind::Helped,
        PlotKind::Peaks,
        PlotKind::Heatmap,
    ];
    if !s.model.attention.is_empty() {
        kinds.push(PlotKind::Heads);
    }
    for kind in kinds {
        let name = match kind {
            PlotKind::Loss => "loss",
            PlotKind::Layers => "layers",
            PlotKind::Helped => "helped",
            PlotKind::Peaks => "peaks",
            PlotKind::Heatmap => "heatmap",
            PlotKind::Heads => "heads",
        };
        let layer = (kind == PlotKind::Heatmap)
            .then_some(heat_layer.as_deref())
            .flatten();
        let fig = match Figure::load(dir, kind, layer) {
            Ok(f) => f,
            Err(e) => {
                // A heat-map layer the user named must exist; a missing lca.safetensors only
                // costs the figure.
                if kind == PlotKind::Heatmap
                    && opts.heatmap_layer.is_some()
                    && matches!(e, LcaError::Usage(_))
                {
                    return Err(LcaError::Usage(
                        e.to_string().replace("--layer", "--heatmap-layer"),
                    ));
                }
                let _ = write!(
                    h,
                    "<figure id=\"fig-{name}\"><p class=\"none\">The {name} figure is not available: {}</p></figure>",
                    esc(&e.to_string())
                );
                missing.push(format!("{name}: {e}"));
                continue;
            }
        };
        let _ = write!(
            h,
            "<figure id=\"fig-{name}\">{}<figcaption>{}</figcaption></figure>",
            figure_markup(&fig, &tmp_dir, opts.max_svg_cells)?,
            caption(kind, layer)
        );
        drawn.push(name.to_string());
    }
    h.push_str("</section>");

    Ok(Figures { drawn, missing })
}
