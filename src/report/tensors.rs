//! `lca.safetensors`: per-step, per-parameter LCA, one tensor per parameter tensor with a
//! leading step axis (`fc1.weight` → `[steps, 32, 64]`), readable with
//! `safetensors.numpy.load_file`. The header is written first (sizes are known up front) and
//! each step's rows are written in place as the step finishes, so memory stays flat.
//!
//! Metadata: `steps` and `next_steps` (JSON arrays of the steps each row covers).

use super::{Exporter, ParamTotals, StepOutput, Summary};
use crate::error::{LcaError, Result};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;

/// Element type of the stored per-step LCA.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    F32,
    F64,
}

/// Streams per-step LCA into a safetensors file.
pub struct TensorExporter {
    path: PathBuf,
    file: File,
    data_start: u64,
    /// Byte offset of each tensor in the data section, and its elements per step.
    offsets: Vec<(u64, usize)>,
    dtype: StoreDtype,
    step_index: u64,
    steps: usize,
}

impl TensorExporter {
    /// Create the file for `steps` steps of the given parameter tensors (name, shape).
    pub fn new(
        path: PathBuf,
        params: &[(String, Vec<usize>)],
        steps: &[(u64, u64)],
        dtype: StoreDtype,
    ) -> Result<TensorExporter> {
        let es = match dtype {
            StoreDtype::F32 => 4u64,
            StoreDtype::F64 => 8,
        };
        let mut header = serde_json::Map::new();
        let list = |f: &dyn Fn(&(u64, u64)) -> u64| {
            serde_json::to_string(&steps.iter().map(f).collect::<Vec<_>>()).expect("numbers")
        };
        let mut meta = serde_json::Map::new();
        meta.insert("steps".into(), list(&|s| s.0).into());
        meta.insert("next_steps".into(), list(&|s| s.1).into());
        meta.insert(
            "producer".into(),
            format!("lca {}", env!("CARGO_PKG_VERSION")).into(),
        );
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
        let mut offsets = Vec::new();
        let mut at = 0u64;
        for (name, shape) in params {
            let numel: usize = shape.iter().product();
            let len = numel as u64 * steps.len() as u64 * es;
            let mut full = vec![steps.len()];
            full.extend(shape);
            header.insert(
                name.clone(),
                serde_json::json!({
                    "dtype": match dtype { StoreDtype::F32 => "F32", StoreDtype::F64 => "F64" },
                    "shape": full,
                    "data_offsets": [at, at + len],
                }),
            );
            offsets.push((at, numel));
            at += len;
        }
        let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut file = File::create(&path).map_err(|e| LcaError::io(&path, e))?;
        let io = |e| LcaError::io(&path, e);
        file.write_all(&(h.len() as u64).to_le_bytes())
            .map_err(io)?;
        file.write_all(&h).map_err(io)?;
        let data_start = 8 + h.len() as u64;
        file.set_len(data_start + at).map_err(io)?;
        Ok(TensorExporter {
            path,
            file,
            data_start,
            offsets,
            dtype,
            step_index: 0,
            steps: steps.len(),
        })
    }
}

impl Exporter for TensorExporter {
    fn step(&mut self, out: &StepOutput<'_>) -> Result<()> {
        if self.step_index as usize >= self.steps {
            return Err(LcaError::Output {
                path: self.path.clone(),
                msg: "more steps than announced".into(),
            });
        }
        let io = |e| LcaError::io(&self.path, e);
        for ((off, numel), vals) in self.offsets.iter().zip(out.lca) {
            let bytes: Vec<u8> = match self.dtype {
                StoreDtype::F32 => vals
                    .iter()
                    .flat_map(|v| (*v as f32).to_le_bytes())
                    .collect(),
                StoreDtype::F64 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            let pos = self.data_start + off + self.step_index * bytes.len() as u64;
            debug_assert_eq!(
                bytes.len(),
                numel * if self.dtype == StoreDtype::F32 { 4 } else { 8 }
            );
            self.file.seek(SeekFrom::Start(pos)).map_err(io)?;
            self.file.write_all(&bytes).map_err(io)?;
        }
        self.step_index += 1;
        Ok(())
    }

    fn finish(&mut self, _summary: &Summary, _totals: &ParamTotals) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| LcaError::io(&self.path, e))
    }
}
