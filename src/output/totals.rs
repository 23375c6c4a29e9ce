//! `totals.safetensors`: every parameter's LCA summed over the run, in the tensor's own shape
//! (the compact form of `params.csv`, which is written only on request).
//!
//! Tensors (per parameter tensor `NAME` of the model, buffers included):
//!
//! - `lca/NAME` (F64, the tensor's shape): LCA summed over all steps;
//! - `helped_steps/NAME`, `hurt_steps/NAME` (U16, or U32 for runs of more than 65,535 steps):
//!   on how many steps the entry's LCA was negative / positive;
//! - `val_lca/NAME`, `l2_lca/NAME` (F64): held-out and L2 totals, when the run has them.
//!
//! Metadata: `format` = `lca-totals-v1`, `steps` (the number of steps summed).
//!
//! 12 bytes per parameter (20 with a held-out set or an L2 term), independent of the number
//! of steps. `summarize --by neuron|param|head` and `report` read it instead of `params.csv`.

use super::{Exporter, ParamTotals, StepOutput, Summary, create};
use crate::error::{LcaError, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The file name.
pub const TOTALS_FILE: &str = "totals.safetensors";

/// Writes `totals.safetensors` at the end of the run.
pub struct TotalsExporter {
    pub path: PathBuf,
}

fn out_err(path: &Path, msg: impl Into<String>) -> LcaError {
    LcaError::Output {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// One tensor to write: name, dtype, shape, little-endian bytes.
type Entry = (String, &'static str, Vec<usize>, Vec<u8>);

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn count_bytes(v: &[u32], wide: bool) -> Vec<u8> {
    if wide {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    } else {
        v.iter()
            .flat_map(|&x| (x.min(u16::MAX as u32) as u16).to_le_bytes())
            .collect()
    }
}

/// Write the totals of `summary.model.params` to `path`.
pub fn write_totals(path: &Path, summary: &Summary, totals: &ParamTotals) -> Result<()> {
    let nsteps = summary.steps.len();
    let wide = nsteps > u16::MAX as usize;
    let cdt = if wide { "U32" } else { "U16" };
    let mut entries: Vec<Entry> = Vec::new();
    for (pi, p) in summary.model.params.iter().enumerate() {
        let shape = p.shape.clone();
        entries.push((
            format!("lca/{}", p.name),
            "F64",
            shape.clone(),
            f64_bytes(&totals.lca[pi]),
        ));
        entries.push((
            format!("helped_steps/{}", p.name),
            cdt,
            shape.clone(),
            count_bytes(&totals.helped_steps[pi], wide),
        ));
        entries.push((
            format!("hurt_steps/{}", p.name),
            cdt,
            shape.clone(),
            count_bytes(&totals.hurt_steps[pi], wide),
        ));
        if let Some(v) = &totals.val_lca {
            entries.push((
                format!("val_lca/{}", p.name),
                "F64",
                shape.clone(),
                f64_bytes(&v[pi]),
            ));
        }
        if let Some(v) = &totals.l2_lca {
            entries.push((
                format!("l2_lca/{}", p.name),
                "F64",
                shape,
                f64_bytes(&v[pi]),
            ));
        }
    }
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "lca-totals-v1", "steps": nsteps.to_string()}),
    );
    let mut at = 0u64;
    for (name, dtype, shape, bytes) in &entries {
        let end = at + bytes.len() as u64;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, end]}),
        );
        at = end;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut w = create(path)?;
    let io = |e| LcaError::io(path, e);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    for (_, _, _, bytes) in &entries {
        w.write_all(bytes).map_err(io)?;
    }
    w.flush().map_err(io)
}

impl Exporter for TotalsExporter {
    fn step(&mut self, _out: &StepOutput<'_>) -> Result<()> {
        Ok(())
    }

    fn finish(&mut self, summary: &Summary, totals: &ParamTotals) -> Result<()> {
        write_totals(&self.path, summary, totals)
    }
}

/// Read the per-parameter totals of an output directory, in `summary.model.params` order:
/// from `totals.safetensors`, or from `params.csv` for outputs written before it existed.
pub fn read_totals(dir: &Path, summary: &Summary) -> Result<ParamTotals> {
    let path = dir.join(TOTALS_FILE);
    if path.is_file() {
        return read_totals_file(&path, summary);
    }
    let csv = dir.join("params.csv");
    if csv.is_file() {
        return read_params_csv(&csv, summary);
    }
    Err(out_err(
        &path,
        "not found (nor params.csv): is this the output directory of `lca analyze` (version 0.1 or later)?",
    ))
}

fn read_totals_file(path: &Path, summary: &Summary) -> Result<ParamTotals> {
    let (start, tensors) = crate::safetensors_header::read_file_header(path)
        .map_err(|e| out_err(path, e.to_string()))?;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| LcaError::io(path, e))?;
    let data = &bytes[start as usize..];
    let find = |key: &str| tensors.iter().find(|t| t.name == key);
    let get_f64 = |key: &str, numel: usize| -> Result<Option<Vec<f64>>> {
        let Some(t) = find(key) else { return Ok(None) };
        let raw = &data[t.data_offsets[0] as usize..t.data_offsets[1] as usize];
        if t.dtype != "F64" || raw.len() != numel * 8 {
            return Err(out_err(
                path,
                format!("tensor '{key}': expected F64 with {numel} entries"),
            ));
        }
        Ok(Some(
            raw.chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
        ))
    };
    let get_counts = |key: &str, numel: usize| -> Result<Vec<u32>> {
        let t = find(key).ok_or_else(|| out_err(path, format!("no tensor '{key}'")))?;
        let raw = &data[t.data_offsets[0] as usize..t.data_offsets[1] as usize];
        match (t.dtype.as_str(), raw.len()) {
            ("U16", n) if n == numel * 2 => Ok(raw
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                .collect()),
            ("U32", n) if n == numel * 4 => Ok(raw
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect()),
            _ => Err(out_err(
                path,
                format!("tensor '{key}': expected U16 or U32 with {numel} entries"),
            )),
        }
    };
    let n = summary.model.params.len();
    let mut t = ParamTotals {
        lca: Vec::with_capacity(n),
        helped_steps: Vec::with_capacity(n),
        hurt_steps: Vec::with_capacity(n),
        val_lca: None,
        l2_lca: None,
        // Error estimates live in the tables (tensors.csv, layers.csv), not in this file.
        err_sq: None,
    };
    let mut val = Vec::new();
    let mut l2 = Vec::new();
    for p in &summary.model.params {
        let lca = get_f64(&format!("lca/{}", p.name), p.numel)?
            .ok_or_else(|| out_err(path, format!("no tensor 'lca/{}'", p.name)))?;
        t.lca.push(lca);
        t.helped_steps
            .push(get_counts(&format!("helped_steps/{}", p.name), p.numel)?);
        t.hurt_steps
            .push(get_counts(&format!("hurt_steps/{}", p.name), p.numel)?);
        if let Some(v) = get_f64(&format!("val_lca/{}", p.name), p.numel)? {
            val.push(v);
        }
        if let Some(v) = get_f64(&format!("l2_lca/{}", p.name), p.numel)? {
            l2.push(v);
        }
    }
    if val.len() == n && n > 0 {
        t.val_lca = Some(val);
    }
    if l2.len() == n && n > 0 {
        t.l2_lca = Some(l2);
    }
    Ok(t)
}

#[derive(serde::Deserialize)]
struct CsvRow {
    tensor: String,
    flat_index: usize,
    lca: f64,
    helped_steps: u32,
    hurt_steps: u32,
}

fn read_params_csv(path: &Path, summary: &Summary) -> Result<ParamTotals> {
    let params = &summary.model.params;
    let mut t = ParamTotals {
        lca: params.iter().map(|p| vec![0.0; p.numel]).collect(),
        helped_steps: params.iter().map(|p| vec![0; p.numel]).collect(),
        hurt_steps: params.iter().map(|p| vec![0; p.numel]).collect(),
        val_lca: None,
        l2_lca: None,
        // Error estimates live in the tables (tensors.csv, layers.csv), not in this file.
        err_sq: None,
    };
    let index: std::collections::HashMap<&str, usize> = params
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    let mut r = ::csv::Reader::from_path(path).map_err(|e| out_err(path, e.to_string()))?;
    for row in r.deserialize::<CsvRow>() {
        let row = row.map_err(|e| out_err(path, format!("unreadable row: {e}")))?;
        let Some(&pi) = index.get(row.tensor.as_str()) else {
            continue;
        };
        if row.flat_index >= params[pi].numel {
            return Err(out_err(
                path,
                format!(
                    "row of '{}' with flat_index {} past its {} entries",
                    row.tensor, row.flat_index, params[pi].numel
                ),
            ));
        }
        t.lca[pi][row.flat_index] = row.lca;
        t.helped_steps[pi][row.flat_index] = row.helped_steps;
        t.hurt_steps[pi][row.flat_index] = row.hurt_steps;
    }
    Ok(t)
}
