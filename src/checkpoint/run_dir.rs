//! A run directory written by the Python Recorder (docs/recorder.md): a directory holding
//! `lca-run.json`, whose checkpoints directory and spec `lca analyze RUN_DIR` and
//! `lca inspect RUN_DIR` use.

use crate::error::{LcaError, Result};
use std::path::{Path, PathBuf};

/// The manifest's file name.
pub const MANIFEST: &str = "lca-run.json";

/// Whether `dir` is a Recorder run directory.
pub fn is_run_dir(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// The checkpoint directory and spec of an analysis given `input` (a checkpoint directory or
/// a Recorder run directory) and the `--spec` given, if any.
pub fn resolve(input: &Path, spec: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    if !is_run_dir(input) {
        return match spec {
            Some(s) => Ok((input.to_path_buf(), s.to_path_buf())),
            None => Err(LcaError::Usage(format!(
                "--spec is needed: {} is not a Recorder run directory (one holding {MANIFEST})",
                input.display()
            ))),
        };
    }
    let path = input.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| LcaError::io(&path, e))?;
    let bad = |msg: String| LcaError::Checkpoint {
        path: path.clone(),
        msg,
    };
    let m: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    if m.get("format").and_then(|f| f.as_str()) != Some("lca-run") {
        return Err(bad(
            "not an lca run manifest (`format` is not \"lca-run\")".into()
        ));
    }
    let ckpts = match m.get("checkpoints") {
        None => input.join("checkpoints"),
        Some(serde_json::Value::String(c)) => input.join(c),
        Some(other) => return Err(bad(format!("`checkpoints` is {other}, not a path"))),
    };
    if let Some(s) = spec {
        return Ok((ckpts, s.to_path_buf()));
    }
    match m.get("spec") {
        Some(serde_json::Value::String(s)) => Ok((ckpts, input.join(s))),
        _ => Err(LcaError::Usage(no_spec_message(input, &m))),
    }
}

/// Why a run has no spec: the unsupported ops its manifest lists.
fn no_spec_message(input: &Path, m: &serde_json::Value) -> String {
    let ops: Vec<String> = m
        .get("unsupported")
        .and_then(|u| u.as_array())
        .map(|a| {
            a.iter()
                .map(|o| {
                    let s = |k: &str| o.get(k).and_then(|v| v.as_str()).unwrap_or("");
                    let place = if s("where").is_empty() {
                        "the top-level module".to_string()
                    } else {
                        s("where").to_string()
                    };
                    let source = o
                        .get("source")
                        .and_then(|v| v.as_str())
                        .map(|src| format!(" ({src})"))
                        .unwrap_or_default();
                    let reason = if s("reason").is_empty() {
                        String::new()
                    } else {
                        format!(": {}", s("reason"))
                    };
                    format!("  - {} in {place}{source}{reason}", s("op"))
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "the run in {} has no model spec: lca cannot evaluate {} op(s) of its model{}\n\
         Analyse it with PyTorch evaluating the loss (`--engine torch`), or write a spec by hand and pass --spec.",
        input.display(),
        ops.len(),
        if ops.is_empty() {
            String::new()
        } else {
            format!(":\n{}", ops.join("\n"))
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs_give_their_checkpoints_and_spec_or_list_what_is_unsupported() {
        let tmp = std::env::temp_dir().join(format!("lca-rundir-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        // Not a run directory: --spec is needed.
        let e = resolve(&tmp, None).unwrap_err().to_string();
        assert!(e.contains("--spec is needed"), "{e}");
        let s = Path::new("m.toml");
        assert_eq!(resolve(&tmp, Some(s)).unwrap(), (tmp.clone(), s.into()));
        std::fs::write(
            tmp.join(MANIFEST),
            r#"{"format":"lca-run","checkpoints":"ck","spec":"model.toml"}"#,
        )
        .unwrap();
        assert_eq!(
            resolve(&tmp, None).unwrap(),
            (tmp.join("ck"), tmp.join("model.toml"))
        );
        assert_eq!(resolve(&tmp, Some(s)).unwrap(), (tmp.join("ck"), s.into()));
        std::fs::write(
            tmp.join(MANIFEST),
            r#"{"format":"lca-run","checkpoints":"checkpoints","spec":null,
                "unsupported":[{"op":"torch.sin","where":"","source":"net.py:43: h = torch.sin(x)","reason":"no lca layer type computes it"}]}"#,
        )
        .unwrap();
        let e = resolve(&tmp, None).unwrap_err().to_string();
        for want in [
            "no model spec",
            "1 op(s)",
            "torch.sin in the top-level module (net.py:43: h = torch.sin(x)): no lca layer type computes it",
            "--engine torch",
        ] {
            assert!(e.contains(want), "{want} not in {e}");
        }
        std::fs::write(tmp.join(MANIFEST), "{").unwrap();
        assert!(
            resolve(&tmp, None)
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
