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
    layer_sentences(h, s);
    h.push_str("</section>");

    Ok(())
}

/// A number with three significant digits (scientific notation when small or large), so that
/// a small value never reads as `+0.0000`.
pub(super) fn sig(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e-2 && v.abs() < 1e4 {
        let d = (2 - v.abs().log10().floor() as i32).clamp(0, 4) as usize;
        format!("{v:+.d$}")
    } else {
        format!("{v:+.2e}")
    }
}

/// The summary's sentences on layers: the one that lowered the loss most (buffers are not a
/// layer and are reported apart), the ones that truly hurt, with shares of Σ|LCA| (which,
/// unlike shares of |ΔL|, never exceed 100 %).
fn layer_sentences(h: &mut String, s: &Summary) {
    let is_layer = |name: &str| s.model.params.iter().any(|p| p.layer == name && !p.buffer);
    let layers: Vec<&crate::output::GroupTotal> =
        s.layers.iter().filter(|l| is_layer(&l.name)).collect();
    let abs_sum: f64 = s.layers.iter().map(|l| l.lca.abs()).sum();
    let share = |v: f64| {
        if abs_sum > 0.0 {
            format!("{:.1} %", 100.0 * v.abs() / abs_sum)
        } else {
            "–".into()
        }
    };
    let best = layers
        .iter()
        .filter(|l| l.lca < 0.0)
        .min_by(|a, b| a.lca.total_cmp(&b.lca));
    match best {
        Some(b) => {
            let _ = write!(
                h,
                "<p>The layer that lowered the loss most: {} with LCA {} ({} of Σ|LCA|, the sum of every layer's |LCA|{}).",
                code(&b.name),
                sig(b.lca),
                share(b.lca),
                if s.layers.iter().any(|l| !is_layer(&l.name)) {
                    " and the buffers'"
                } else {
                    ""
                }
            );
        }
        None => h.push_str("<p>No layer lowered the loss over the run."),
    }
    // Layers that truly hurt: a positive total above 0.1 % of Σ|LCA| (smaller ones are within
    // what integration error and rounding can move).
    let floor = 1e-3 * abs_sum;
    let mut hurt: Vec<&&crate::output::GroupTotal> =
        layers.iter().filter(|l| l.lca > floor).collect();
    hurt.sort_by(|a, b| b.lca.total_cmp(&a.lca));
    let slight = layers
        .iter()
        .filter(|l| l.lca > 0.0 && l.lca <= floor)
        .count();
    const SHOWN: usize = 10;
    let listed: Vec<String> = hurt
        .iter()
        .take(SHOWN)
        .map(|l| format!("{} ({}, {})", code(&l.name), sig(l.lca), share(l.lca)))
        .collect();
    let _ = write!(
        h,
        " Layers that raised the loss over the run (total LCA above 0.1 % of Σ|LCA|): {}{}.",
        if listed.is_empty() {
            "none".to_string()
        } else {
            listed.join(", ")
        },
        if hurt.len() > SHOWN {
            format!(" and {} more (see the Layers table)", hurt.len() - SHOWN)
        } else {
            String::new()
        }
    );
    if slight > 0 {
        let _ = write!(
            h,
            " {slight} more {} a positive total below that, within integration error.",
            if slight == 1 { "has" } else { "have" }
        );
    }
    h.push_str("</p>");
    for b in s.layers.iter().filter(|l| !is_layer(&l.name)) {
        let _ = write!(
            h,
            "<p>{} (batch-norm running statistics; not a layer, not trained) account for LCA {} ({} of Σ|LCA|): the statistics moving along the path change the loss in <code>running-stats</code> mode.</p>",
            code(&b.name),
            sig(b.lca),
            share(b.lca)
        );
    }
}
