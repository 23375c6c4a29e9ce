//! `summary.json` writer.

use super::{Exporter, ParamTotals, StepOutput, Summary, create};
use crate::error::{LcaError, Result};
use std::io::Write;
use std::path::PathBuf;

/// Writes the run summary as pretty JSON at the end of the run.
pub struct JsonExporter {
    pub path: PathBuf,
}

impl Exporter for JsonExporter {
    fn step(&mut self, _out: &StepOutput<'_>) -> Result<()> {
        Ok(())
    }

    fn finish(&mut self, summary: &Summary, _totals: &ParamTotals) -> Result<()> {
        let mut w = create(&self.path)?;
        serde_json::to_writer_pretty(&mut w, summary).map_err(|e| LcaError::Output {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        writeln!(w)
            .and_then(|_| w.flush())
            .map_err(|e| LcaError::io(&self.path, e))
    }
}

/// Read a summary back from an output directory.
pub fn read_summary(dir: &std::path::Path) -> Result<Summary> {
    let path = dir.join(super::SUMMARY_FILE);
    if !dir.is_dir() {
        return Err(LcaError::Output {
            path: dir.to_path_buf(),
            msg: "no such directory (expected the output directory of `lca analyze`)".into(),
        });
    }
    if !path.is_file() {
        return Err(LcaError::Output {
            path,
            msg: "not found: is this the output directory of `lca analyze`?".into(),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| LcaError::io(&path, e))?;
    let s: Summary = serde_json::from_str(&text).map_err(|e| LcaError::Output {
        path: path.clone(),
        msg: format!("not an lca summary: {e}"),
    })?;
    if s.schema_version != super::SCHEMA_VERSION {
        return Err(LcaError::Output {
            path,
            msg: format!(
                "schema_version {} is not supported by this lca (expects {})",
                s.schema_version,
                super::SCHEMA_VERSION
            ),
        });
    }
    Ok(s)
}
