//! The summary cards and the one-sentence verdict.

use super::*;

/// Write this section.
pub(super) fn write(h: &mut String, p: &Page) -> Result<()> {
    let Page { s, .. } = *p;
    let r = &s.run;
    // Summary cards and a sentence.
    h.push_str("<section id=\"summary\"><h2>Summary</h2><div class=\"cards\">");
    let card = |k: &str, v: String| {
        format!(
            "<div class=\"card\"><div class=\"k\">{}</div><div class=\"v\">{v}</div></div>",
            esc(k)
        )
    };
    h.push_str(&card(
        "training loss",
        format!("{:.4}\u{2009}→\u{2009}{:.4}", r.loss_first, r.loss_last),
    ));
    h.push_str(&card("ΔL", format!("{:+.6}", r.delta_loss)));
    h.push_str(&card("Σ LCA", format!("{:+.6}", r.lca_sum)));
    h.push_str(&card("Σ|r| / |ΔL|", esc(&pct(r.rel_abs_residual))));
    h.push_str(&card("max |r_t|", format!("{:.2e}", r.max_abs_residual)));
    h.push_str(&card("gradient evaluations", r.evaluations.to_string()));
    h.push_str("</div>");
    let tol = s.integration.settings.abs_tol;
    let rel = r.rel_abs_residual;
    let shown = pct(rel).replace(' ', "\u{a0}");
    let capped = if r.capped_steps.is_empty() {
        String::new()
    } else {
        format!(
            " {} step(s) stayed above the residual bound {tol:e} at the largest number of splits.",
            r.capped_steps.len()
        )
    };
    let (class, text) = if rel.is_finite() && rel <= 1e-3 {
        (
            "ok",
            format!(
                "The allocation is exact to {shown} of the loss change: on every step the per-parameter LCA sums to ΔL up to the residuals below.{capped}"
            ),
        )
    } else if rel.is_finite() && rel <= 1e-2 {
        (
            "ok",
            format!(
                "The allocation accounts for the loss change to within {shown} (Σ|r|/|ΔL|); the largest per-step residual is {:.2e}.{capped}",
                r.max_abs_residual
            ),
        )
    } else {
        (
            "warn",
            format!(
                "The residual is {shown} of the loss change: per-step integration errors are large compared with ΔL, so read per-parameter figures with care (a tighter --tolerance refines more steps; sparse checkpoints cannot be refined below their spacing).{capped}"
            ),
        )
    };
    let class = if r.capped_steps.is_empty() {
        class
    } else {
        "warn"
    };
    let _ = write!(h, "<p class=\"verdict {class}\">{text}</p>");
    let mut layers_sorted: Vec<&crate::output::GroupTotal> = s.layers.iter().collect();
    layers_sorted.sort_by(|a, b| a.lca.total_cmp(&b.lca));
    if let Some(best) = layers_sorted.first() {
        let hurt: Vec<String> = s
            .layers
            .iter()
            .filter(|l| l.lca > 0.0)
            .map(|l| format!("{} ({:+.4})", code(&l.name), l.lca))
            .collect();
        let _ = write!(
            h,
            "<p>The layer that lowered the loss most: {} with LCA {:+.6} ({:.1} % of |ΔL|). Layers whose total LCA is positive (they raised the loss over the run): {}.</p>",
            code(&best.name),
            best.lca,
            if r.delta_loss != 0.0 {
                100.0 * best.lca.abs() / r.delta_loss.abs()
            } else {
                f64::NAN
            },
            if hurt.is_empty() {
                "none".to_string()
            } else {
                hurt.join(", ")
            }
        );
    }
    h.push_str("</section>");

    Ok(())
}
