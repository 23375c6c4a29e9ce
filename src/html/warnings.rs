//! The warnings the run reported, and figures that could not be drawn.

use super::*;

/// Write this section.
pub(super) fn write(h: &mut String, p: &Page, missing: &[String]) -> Result<()> {
    let Page { s, .. } = *p;
    // Warnings.
    h.push_str("<section id=\"warnings\"><h2>Warnings</h2>");
    if s.warnings.is_empty() {
        h.push_str("<p class=\"none\">The run reported no warnings.</p>");
    } else {
        h.push_str("<ul class=\"warnings\">");
        for w in &s.warnings {
            let _ = write!(h, "<li>{}</li>", esc(w));
        }
        h.push_str("</ul>");
    }
    if !s.ignored_tensors.is_empty() {
        let _ = write!(
            h,
            "<p>Tensors in the checkpoints that the spec does not use (ignored): {}.</p>",
            s.ignored_tensors
                .iter()
                .map(|t| code(t))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !missing.is_empty() {
        h.push_str("<p>Figures not drawn: ");
        h.push_str(&esc(&missing.join("; ")));
        h.push_str("</p>");
    }
    h.push_str("</section>");

    Ok(())
}
