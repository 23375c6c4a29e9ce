//! The sortable tables: layers, tensors, top parameters, steps.

use super::*;

/// Write this section.
pub(super) fn write(h: &mut String, p: &Page) -> Result<()> {
    let Page { dir, opts, s, .. } = *p;
    // Tables.
    let hint =
        "<p class=\"hint js-only\">Click a column heading to sort; click again to reverse.</p>";
    let (_, layers) = view(dir, By::Layer)?;
    let _ = write!(
        h,
        "<section id=\"layers\"><h2>Layers</h2>{hint}{}</section>",
        table_html(
            &layers,
            "layers-table",
            if s.layers.iter().any(|l| l.name == "buffers") {
                "Totals over the run per layer, in model order; \"buffers\" is the batch-norm running statistics read from the checkpoints (running-stats mode)."
            } else {
                "Totals over the run per layer, in model order."
            }
        )
    );
    let (_, tensors) = view(dir, By::Tensor)?;
    let _ = write!(
        h,
        "<section id=\"tensors\"><h2>Tensors</h2>{}</section>",
        table_html(
            &tensors,
            "tensors-table",
            "Totals over the run per parameter tensor, in model order."
        )
    );
    match view_top(dir, By::Param, Sort::Helped, Some(opts.top)).and_then(|(_, helped)| {
        view_top(dir, By::Param, Sort::Hurt, Some(opts.top)).map(|(_, hurt)| (helped, hurt))
    }) {
        Ok((mut helped, mut hurt)) => {
            helped.sort_and_limit(Sort::Helped, Some(opts.top));
            helped
                .rows
                .retain(|r| matches!(r[4], Cell::Float(v) if v < 0.0));
            hurt.sort_and_limit(Sort::Hurt, Some(opts.top));
            hurt.rows
                .retain(|r| matches!(r[4], Cell::Float(v) if v > 0.0));
            let _ = write!(
                h,
                "<section id=\"params\"><h2>Top parameters</h2><p>Single parameters by their LCA summed over the run (<code>lca summarize --by param</code>); the index is (row, column, …) in the tensor.</p><h3>Most helpful</h3>{}<h3>Most hurtful</h3>{}</section>",
                if helped.rows.is_empty() {
                    "<p class=\"none\">No parameter has a negative total LCA.</p>".to_string()
                } else {
                    table_html(
                        &helped,
                        "helped-table",
                        &format!(
                            "The {} parameters with the most negative LCA.",
                            helped.rows.len()
                        ),
                    )
                },
                if hurt.rows.is_empty() {
                    "<p class=\"none\">No parameter has a positive total LCA.</p>".to_string()
                } else {
                    table_html(
                        &hurt,
                        "hurt-table",
                        &format!(
                            "The {} parameters with the most positive LCA.",
                            hurt.rows.len()
                        ),
                    )
                }
            );
        }
        Err(e) => {
            let _ = write!(
                h,
                "<section id=\"params\"><h2>Top parameters</h2><p class=\"none\">Not available: {}</p></section>",
                esc(&e.to_string())
            );
        }
    }
    let (_, steps) = view(dir, By::Step)?;
    let _ = write!(
        h,
        "<section id=\"steps\"><h2>Steps</h2><details><summary>Per-step losses, Σ LCA and residuals ({} steps)</summary>{}</details></section>",
        s.steps.len(),
        table_html(
            &steps,
            "steps-table",
            "One row per step θ_t → θ_{t+1} (steps.csv)."
        )
    );

    Ok(())
}
