//! The run: inputs, checkpoints, model, integration settings, the spec text and the footer.

use super::*;

/// Write this section.
pub(super) fn write(h: &mut String, p: &Page) -> Result<()> {
    let Page { dir, s, .. } = *p;
    // Run metadata.
    h.push_str("<section id=\"run\"><h2>Run</h2><h3>Inputs</h3>");
    let mut inputs = vec![
        (
            "spec",
            format!(
                "{} <br/>sha256 {}",
                code(&s.spec.path),
                code(&s.spec.sha256)
            ),
        ),
        (
            "training set",
            format!(
                "{} <br/>sha256 {}<br/>{} samples of shape {}, evaluated in {} chunk(s) of {}{}",
                code(&s.data.path),
                code(&s.data.sha256),
                s.data.samples,
                esc(&shape(&s.data.sample_shape)),
                s.data.chunks,
                s.data.chunk_size,
                if s.model.batch_norm == Some(crate::net::batch_norm::BnMode::BatchStats) {
                    match s.data.seed {
                        Some(seed) => format!(
                            " (batch statistics: chunks drawn by the permutation of seed {seed})"
                        ),
                        None => {
                            format!(" (batch statistics: rows in {} order)", esc(&s.data.order))
                        }
                    }
                } else {
                    String::new()
                }
            ),
        ),
    ];
    if let Some(v) = &s.data.validation {
        inputs.push((
            "held-out set",
            format!(
                "{} <br/>sha256 {}<br/>{} samples",
                code(&v.path),
                code(&v.sha256),
                v.samples
            ),
        ));
    }
    let sp = &s.step_spacing;
    inputs.push((
        "checkpoints",
        format!(
            "{} files, steps {}; {}{}",
            s.checkpoints.len(),
            esc(&step_list(
                &s.checkpoints.iter().map(|c| c.step).collect::<Vec<_>>()
            )),
            match (sp.min, sp.max) {
                (1, 1) => "one every training step".to_string(),
                (a, b) if a == b => format!("{a} training steps apart"),
                (a, b) => format!("{a}–{b} training steps apart"),
            },
            if sp.sparse {
                " (sparse: the split over parameters follows the straight chord between checkpoints)"
            } else {
                ""
            }
        ),
    ));
    h.push_str(&dl(&inputs));
    h.push_str("<details><summary>Every checkpoint with its sha256</summary><div class=\"scroll\"><table id=\"checkpoints-table\"><thead><tr><th class=\"n\">step</th><th>file</th><th>step from</th><th>sha256</th></tr></thead><tbody>");
    for c in &s.checkpoints {
        let _ = write!(
            h,
            "<tr><td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            c.step,
            code(&c.path),
            match c.step_source {
                crate::checkpoint::StepSource::Metadata => "metadata",
                crate::checkpoint::StepSource::FileName => "file name",
            },
            code(&c.sha256)
        );
    }
    h.push_str("</tbody></table></div></details>");

    let m = &s.model;
    let _ = write!(
        h,
        "<h3>Model</h3>{}",
        dl(&[
            ("loss", esc(&m.loss)),
            ("parameters", format!("{} in {} tensors", m.num_params, m.params.iter().filter(|p| !p.buffer).count())),
            (
                "input → output (per sample)",
                format!("{} → {}", esc(&shape(&m.input_shape)), esc(&shape(&m.output_shape))),
            ),
            (
                "layers with parameters",
                m.layers.iter().map(|l| code(l)).collect::<Vec<_>>().join(", "),
            ),
            (
                "batch norm",
                match m.batch_norm {
                    Some(crate::spec::BnMode::BatchStats) => "batch-stats (statistics of each evaluation chunk; the chunk size is part of the loss)".into(),
                    Some(crate::spec::BnMode::RunningStats) => "running-stats (the checkpoints' running_mean / running_var; their LCA is the \"buffers\" row)".into(),
                    None => "none in the model".to_string(),
                },
            ),
        ])
    );
    let i = &s.integration.settings;
    let _ = write!(
        h,
        "<h3>Integration</h3>{}",
        dl(&[
            (
                "method",
                esc(&format!("{:?}", i.method).to_lowercase()).replace("firstorder", "first-order"),
            ),
            (
                "adaptive refinement",
                if i.adaptive {
                    format!("yes, up to {} sub-intervals per step", i.max_splits)
                } else {
                    "no".into()
                },
            ),
            (
                "residual bound",
                format!(
                    "{:e} (loss units){}",
                    i.abs_tol,
                    i.rel_tol
                        .map(|r| format!(", or {r:e} × |ΔL_t|"))
                        .unwrap_or_default()
                ),
            ),
            ("precision", esc(&s.integration.precision)),
            (
                "tool",
                format!("{} {}", esc(&s.tool.name), esc(&s.tool.version))
            ),
        ])
    );
    // The spec text, when the file is still the analysed one.
    h.push_str("<h3>Spec</h3>");
    let spec_path = Path::new(&s.spec.path);
    match crate::files::read_regular(spec_path, crate::spec::MAX_SPEC_BYTES, "a spec") {
        Ok(bytes) if crate::tensors::sha256_hex(&bytes) == s.spec.sha256 => {
            let _ = write!(
                h,
                "<details><summary>{} as analysed (sha256 matches)</summary><pre>{}</pre></details>",
                code(&s.spec.path),
                esc(&String::from_utf8_lossy(&bytes))
            );
        }
        Ok(_) => {
            let _ = write!(
                h,
                "<p class=\"none\">{} has changed since the analysis (its sha256 differs), so its text is not included.</p>",
                code(&s.spec.path)
            );
        }
        Err(_) => {
            let _ = write!(
                h,
                "<p class=\"none\">{} cannot be read from here, so its text is not included (its sha256 is above).</p>",
                code(&s.spec.path)
            );
        }
    }
    h.push_str("</section></main>");
    let _ = write!(
        h,
        "<footer>Made by {} {} <code>report</code> from {} · Loss Change Allocation: Lan, Liu, Zhou, Yosinski, NeurIPS 2019. This page is self-contained: it makes no network request.</footer>",
        esc(&s.tool.name),
        esc(env!("CARGO_PKG_VERSION")),
        code(&dir.display().to_string())
    );
    Ok(())
}
