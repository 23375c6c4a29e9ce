//! Tidy CSV tables that pandas, spreadsheets and `csvkit` read as they are:
//!
//! - `steps.csv`: one row per step (losses, ΣLCA, residual, splits, helped/zero/hurt);
//! - `layers.csv`, `tensors.csv`: one row per step × layer / tensor;
//! - `params.csv`: one row per parameter with its LCA summed over all steps, its flat index
//!   and its multi-dimensional index (a JSON array such as `[3, 5]`).
//!
//! Per-step tables are streamed as steps finish; `params.csv` is written at the end.

use super::{Exporter, GroupStep, ParamTotals, StepOutput, Summary, create};
use crate::error::{LcaError, Result};
use serde::Serialize;
use std::fs::File;
use std::io::BufWriter;
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
}

/// Writes the four CSV tables.
pub struct CsvExporter {
    paths: [PathBuf; 4],
    steps: Writer,
    layers: Writer,
    tensors: Writer,
}

impl CsvExporter {
    /// Open the streamed tables at the given (temporary) paths: steps, layers, tensors, params.
    pub fn new(paths: [PathBuf; 4]) -> Result<CsvExporter> {
        Ok(CsvExporter {
            steps: open(&paths[0])?,
            layers: open(&paths[1])?,
            tensors: open(&paths[2])?,
            paths,
        })
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
        })
        .map_err(|e| csv_err(path, e))?;
    }
    Ok(())
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

    fn finish(&mut self, summary: &Summary, totals: &ParamTotals) -> Result<()> {
        for (w, p) in [
            (&mut self.steps, &self.paths[0]),
            (&mut self.layers, &self.paths[1]),
            (&mut self.tensors, &self.paths[2]),
        ] {
            w.flush().map_err(|e| LcaError::io(p, e))?;
        }
        let path = &self.paths[3];
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
