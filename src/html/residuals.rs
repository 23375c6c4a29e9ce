//! The residuals table: what the integration did not allocate.

use super::*;

/// Write this section.
pub(super) fn write(h: &mut String, p: &Page) -> Result<()> {
    let Page { s, .. } = *p;
    let r = &s.run;
    // Residuals.
    h.push_str("<section id=\"residuals\"><h2>Residuals</h2><p>For every step, the residual r_t = ΔL_t − Σ LCA_t is what the integration did not allocate. Σ|r|/|ΔL| cannot hide per-step errors that cancel and is the honest figure.</p>");
    h.push_str("<div class=\"scroll\"><table id=\"residual-table\"><thead><tr><th scope=\"col\">objective</th><th class=\"n\">L first</th><th class=\"n\">L last</th><th class=\"n\">ΔL</th><th class=\"n\">Σ LCA</th><th class=\"n\">Σ r</th><th class=\"n\">Σ|r| / |ΔL|</th><th class=\"n\">|Σ r| / |ΔL|</th><th class=\"n\">max |r_t|</th></tr></thead><tbody>");
    let row = |name: &str, a: f64, b: f64, d: f64, l: f64, rs: f64, ra: f64, rr: f64, mx: f64| {
        format!(
            "<tr><th scope=\"row\">{}</th><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:+.6}</td><td class=\"n\">{:+.6}</td><td class=\"n\">{:.3e}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:.3e}</td></tr>",
            esc(name),
            num(a),
            num(b),
            d,
            l,
            rs,
            esc(&pct(ra)),
            esc(&pct(rr)),
            mx
        )
    };
    h.push_str(&row(
        "training loss",
        r.loss_first,
        r.loss_last,
        r.delta_loss,
        r.lca_sum,
        r.residual_sum,
        r.rel_abs_residual,
        r.rel_residual,
        r.max_abs_residual,
    ));
    if let Some(v) = &r.validation {
        h.push_str(&row(
            "held-out loss",
            v.loss_first,
            v.loss_last,
            v.delta_loss,
            v.lca_sum,
            v.residual_sum,
            v.rel_abs_residual,
            v.rel_residual,
            v.max_abs_residual,
        ));
    }
    h.push_str("</tbody></table></div>");
    if let Some(l2) = &r.l2 {
        let _ = write!(
            h,
            "<h3>L2 term</h3>{}",
            dl(&[
                ("λ", format!("{}", l2.lambda)),
                (
                    "λ‖θ‖²",
                    format!("{} → {}", num(l2.penalty_first), num(l2.penalty_last)),
                ),
                (
                    "its LCA column sums to",
                    format!("{:+.6} (exact, closed form)", l2.lca_sum),
                ),
                (
                    "objective ΔL (data loss + L2)",
                    format!("{:+.6}", l2.objective_delta),
                ),
                (
                    "tensors",
                    if l2.tensors.len() == s.model.params.iter().filter(|p| !p.buffer).count() {
                        "all parameter tensors".to_string()
                    } else {
                        esc(&l2.tensors.join(", "))
                    },
                ),
            ])
        );
    }
    let refined: Vec<u64> = s
        .steps
        .iter()
        .filter(|x| x.splits > 2)
        .map(|x| x.step)
        .collect();
    let _ = write!(
        h,
        "<p>{} gradient evaluations; {} step(s) refined beyond plain Simpson{}; {} step(s) at the split cap{}.</p></section>",
        r.evaluations,
        refined.len(),
        if refined.is_empty() {
            String::new()
        } else {
            format!(" ({})", esc(&step_list(&refined)))
        },
        r.capped_steps.len(),
        if r.capped_steps.is_empty() {
            String::new()
        } else {
            format!(" ({})", esc(&step_list(&r.capped_steps)))
        }
    );

    Ok(())
}
