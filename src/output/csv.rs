//! Tidy CSV tables that pandas, spreadsheets and `csvkit` read as they are:
//!
//! - `steps.csv`: one row per step (losses, ΣLCA, residual, splits, helped/zero/hurt);
//! - `layers.csv`, `tensors.csv`: one row per step × layer / tensor;
//! - `params.csv`: one row per parameter with its LCA summed over all steps, its flat index
//!   and its multi-dimensional index (a JSON array such as `[3, 5]`).
//!
//! Per-step tables are streamed as steps finish; `params.csv` is written at the end, and
//! only on request (`analyze --params-csv`): it takes about 60 bytes per parameter, where
//! `totals.safetensors` ([`super::totals`]) holds the same numbers in 12.

use super::{Exporter, GroupStep, ParamTotals, StepOutput, Summary, create};
use crate::error::{LcaError, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom};
use std::path::{Path, PathBuf};

type Writer = csv::Writer<BufWriter<File>>;

fn open(path: &Path) -> Result<Writer> {
    Ok(csv::Writer::from_writer(create(path)?))
}

fn csv_err(path: &Path, e: csv::Error) -> LcaError {
    LcaError::Output {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

#[derive(Serialize)]
struct GroupRow<'a> {
    step: u64,
    next_step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    tensor: Option<&'a str>,
    layer: &'a str,
    lca: f64,
    helped: u64,
    zero: u64,
    hurt: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_lca: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    l2_lca: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lca_err: Option<f64>,
}

#[derive(Serialize)]
struct ParamRow<'a> {
    tensor: &'a str,
    layer: &'a str,
    flat_index: usize,
    index: String,
    lca: f64,
    helped_steps: u32,
    hurt_steps: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_lca: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    l2_lca: Option<f64>,
}

/// Writes the three per-step CSV tables and, on request, `params.csv`.
pub struct CsvExporter {
    paths: [PathBuf; 3],
    /// Where to write `params.csv`, if at all.
    params: Option<PathBuf>,
    steps: Writer,
    layers: Writer,
    tensors: Writer,
}

/// Reopen a streamed table of an interrupted run, cut back to `len` bytes (the rows of the
/// steps its journal recorded), to append the following rows.
fn reopen(path: &Path, len: u64) -> Result<Writer> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| LcaError::io(path, e))?;
    let have = f.metadata().map_err(|e| LcaError::io(path, e))?.len();
    if have < len {
        return Err(LcaError::Output {
            path: path.to_path_buf(),
            msg: format!(
                "holds {have} bytes but the resume journal recorded {len}: the interrupted run's files were damaged; delete the journal directory to start over"
            ),
        });
    }
    f.set_len(len).map_err(|e| LcaError::io(path, e))?;
    let mut w = BufWriter::new(f);
    w.seek(SeekFrom::End(0))
        .map_err(|e| LcaError::io(path, e))?;
    Ok(csv::WriterBuilder::new()
        .has_headers(len == 0)
        .from_writer(w))
}

impl CsvExporter {
    /// Open the streamed tables at the given (temporary) paths: steps, layers, tensors; and
    /// `params.csv`'s path when it is to be written.
    pub fn new(paths: [PathBuf; 3], params: Option<PathBuf>) -> Result<CsvExporter> {
        Ok(CsvExporter {
            params,
            steps: open(&paths[0])?,
            layers: open(&paths[1])?,
            tensors: open(&paths[2])?,
            paths,
        })
    }

    /// Continue the tables of an interrupted run: `lengths` of steps, layers and tensors as
    /// its journal recorded them (what follows is cut off and written again).
    pub fn resume(
        paths: [PathBuf; 3],
        params: Option<PathBuf>,
        lengths: [u64; 3],
    ) -> Result<CsvExporter> {
        Ok(CsvExporter {
            params,
            steps: reopen(&paths[0], lengths[0])?,
            layers: reopen(&paths[1], lengths[1])?,
            tensors: reopen(&paths[2], lengths[2])?,
            paths,
        })
    }

    /// The streamed tables' paths (steps, layers, tensors).
    pub fn streamed(&self) -> &[PathBuf] {
        &self.paths
    }
}

fn group_rows(
    w: &mut Writer,
    path: &Path,
    out: &StepOutput<'_>,
    rows: &[GroupStep],
    tensor: bool,
) -> Result<()> {
    for g in rows {
        w.serialize(GroupRow {
            step: out.record.step,
            next_step: out.record.next_step,
            tensor: tensor.then_some(g.name.as_str()),
            layer: &g.layer,
            lca: g.lca,
            helped: g.helped,
            zero: g.zero,
            hurt: g.hurt,
            val_lca: g.val_lca,
            l2_lca: g.l2_lca,
            lca_err: g.lca_err,
        })
        .map_err(|e| csv_err(path, e))?;
    }
    Ok(())
}

/// One row of `layers.csv`: a layer's LCA on one step.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct LayerStepRow {
    pub step: u64,
    pub next_step: u64,
    pub layer: String,
    pub lca: f64,
    pub helped: u64,
    pub zero: u64,
    pub hurt: u64,
}

/// Read `layers.csv` of an output directory (rows in step order, layers in model order).
pub fn read_layer_steps(dir: &Path) -> Result<Vec<LayerStepRow>> {
    let path = dir.join("layers.csv");
    if !path.is_file() {
        return Err(LcaError::Output {
            path,
            msg: "not found: is this the output directory of `lca analyze`?".into(),
        });
    }
    let mut r = csv::Reader::from_path(&path).map_err(|e| csv_err(&path, e))?;
    r.deserialize()
        .map(|row| {
            row.map_err(|e| LcaError::Output {
                path: path.clone(),
                msg: format!("unreadable row: {e}"),
            })
        })
        .collect()
}

/// Multi-dimensional index of a flat C-order position.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[i] = flat % d;
            flat /= d;
        }
    }
    idx
}

impl Exporter for CsvExporter {
    fn step(&mut self, out: &StepOutput<'_>) -> Result<()> {
        self.steps
            .serialize(out.record)
            .map_err(|e| csv_err(&self.paths[0], e))?;
        group_rows(&mut self.layers, &self.paths[1], out, out.layers, false)?;
        group_rows(&mut self.tensors, &self.paths[2], out, out.tensors, true)?;
        Ok(())
    }

    fn sync(&mut self) -> Result<Vec<(PathBuf, u64)>> {
        let mut out = Vec::with_capacity(3);
        for (w, p) in [
            (&mut self.steps, &self.paths[0]),
            (&mut self.layers, &self.paths[1]),
            (&mut self.tensors, &self.paths[2]),
        ] {
            w.flush().map_err(|e| LcaError::io(p, e))?;
            let f = w.get_ref().get_ref();
            f.sync_data().map_err(|e| LcaError::io(p, e))?;
            let len = f.metadata().map_err(|e| LcaError::io(p, e))?.len();
            out.push((p.clone(), len));
        }
        Ok(out)
    }

    fn finish(&mut self, summary: &Summary, totals: &ParamTotals) -> Result<()> {
        for (w, p) in [
            (&mut self.steps, &self.paths[0]),
            (&mut self.layers, &self.paths[1]),
            (&mut self.tensors, &self.paths[2]),
        ] {
            w.flush().map_err(|e| LcaError::io(p, e))?;
        }
        let Some(path) = &self.params else {
            return Ok(());
        };
        let mut w = open(path)?;
        for (pi, p) in summary.model.params.iter().enumerate() {
            for (k, &v) in totals.lca[pi].iter().enumerate() {
                let index = unravel(k, &p.shape)
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                w.serialize(ParamRow {
                    tensor: &p.name,
                    layer: &p.layer,
                    flat_index: k,
                    index: format!("[{index}]"),
                    lca: v,
                    helped_steps: totals.helped_steps[pi][k],
                    hurt_steps: totals.hurt_steps[pi][k],
                    val_lca: totals.val_lca.as_ref().map(|v| v[pi][k]),
                    l2_lca: totals.l2_lca.as_ref().map(|v| v[pi][k]),
                })
                .map_err(|e| csv_err(path, e))?;
            }
        }
        w.flush().map_err(|e| LcaError::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::unravel;

    #[test]
    fn unravel_is_c_order() {
        assert_eq!(unravel(7, &[3, 4]), vec![1, 3]);
        assert_eq!(unravel(0, &[2, 2, 2]), vec![0, 0, 0]);
        assert_eq!(unravel(23, &[2, 3, 4]), vec![1, 2, 3]);
    }
}
