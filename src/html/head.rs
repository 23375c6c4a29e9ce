//! The document head, the page header and the navigation.

use super::*;

/// Write this section.
pub(super) fn write(h: &mut String, p: &Page) -> Result<()> {
    let Page {
        s,
        spec_name,
        first,
        last,
        ..
    } = *p;
    let r = &s.run;
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>");
    h.push_str("<meta name=\"generator\" content=\"lca\"/>");
    let _ = write!(
        h,
        "<title>LCA report: {} ({} steps)</title><style>{CSS}</style></head><body>",
        esc(spec_name),
        r.steps
    );

    // Header and navigation.
    let _ = write!(
        h,
        "<header><h1>Loss Change Allocation report</h1><p class=\"sub\">{} · {} steps ({first} → {last}) · {} samples · {} parameters · {}</p>",
        code(&s.spec.path),
        r.steps,
        s.data.samples,
        s.model.num_params,
        esc(&s.model.loss)
    );
    h.push_str("<nav><a href=\"#summary\">Summary</a><a href=\"#residuals\">Residuals</a><a href=\"#figures\">Figures</a><a href=\"#layers\">Layers</a><a href=\"#tensors\">Tensors</a><a href=\"#params\">Top parameters</a><a href=\"#steps\">Steps</a><a href=\"#warnings\">Warnings</a><a href=\"#run\">Run</a></nav></header><main>");

    Ok(())
}
