//! `lca.safetensors`: per-step, per-parameter LCA, one tensor per parameter tensor with a
//! leading step axis (`fc1.weight` → `[steps, 32, 64]`), readable with
//! `safetensors.numpy.load_file`. The header is written first (sizes are known up front) and
//! each step's rows are written in place as the step finishes, so memory stays flat.
//!
//! Metadata: `steps` and `next_steps` (JSON arrays of the steps each row covers).

use super::{Exporter, ParamTotals, StepOutput, Summary};
use crate::error::{LcaError, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
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
    /// Which per-parameter values to store.
    pub source: TensorSource,
}

/// Which per-step, per-parameter values a [`TensorExporter`] stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorSource {
    /// LCA of the training loss (`lca.safetensors`).
    Train,
    /// LCA of the held-out loss (`lca_validation.safetensors`).
    Validation,
    /// LCA of the L2 term (`lca_l2.safetensors`, written by shards only).
    L2,
}

/// The header bytes (length prefix included), each tensor's (offset, elements per step) and
/// the data section's length.
type Layout = (Vec<u8>, Vec<(u64, usize)>, u64);

fn layout(params: &[(String, Vec<usize>)], steps: &[(u64, u64)], dtype: StoreDtype) -> Layout {
    let es = match dtype {
        StoreDtype::F32 => 4u64,
        StoreDtype::F64 => 8,
    };
    let mut header = serde_json::Map::new();
    let list = |f: &dyn Fn(&(u64, u64)) -> u64| {
        serde_json::Value::from(
            serde_json::Value::from(steps.iter().map(f).collect::<Vec<_>>()).to_string(),
        )
    };
    let mut meta = serde_json::Map::new();
    meta.insert("steps".into(), list(&|s| s.0));
    meta.insert("next_steps".into(), list(&|s| s.1));
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
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    (bytes, offsets, at)
}

impl TensorExporter {
    /// Create the file for `steps` steps of the given parameter tensors (name, shape).
    pub fn new(
        path: PathBuf,
        params: &[(String, Vec<usize>)],
        steps: &[(u64, u64)],
        dtype: StoreDtype,
    ) -> Result<TensorExporter> {
        let (header, offsets, data_len) = layout(params, steps, dtype);
        let mut file = File::create(&path).map_err(|e| LcaError::io(&path, e))?;
        let io = |e| LcaError::io(&path, e);
        file.write_all(&header).map_err(io)?;
        let data_start = header.len() as u64;
        file.set_len(data_start + data_len).map_err(io)?;
        Ok(TensorExporter {
            path,
            file,
            data_start,
            offsets,
            dtype,
            step_index: 0,
            steps: steps.len(),
            source: TensorSource::Train,
        })
    }

    /// Reopen the file of an interrupted run whose first `done` steps are written; the rows
    /// of later steps are written again.
    pub fn resume(
        path: PathBuf,
        params: &[(String, Vec<usize>)],
        steps: &[(u64, u64)],
        dtype: StoreDtype,
        done: usize,
    ) -> Result<TensorExporter> {
        let (header, offsets, data_len) = layout(params, steps, dtype);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| LcaError::io(&path, e))?;
        let io = |e| LcaError::io(&path, e);
        let len = file.metadata().map_err(io)?.len();
        let mut head = vec![0u8; header.len()];
        let same = len == header.len() as u64 + data_len
            && file.read_exact(&mut head).is_ok()
            && head == header;
        if !same || done > steps.len() {
            return Err(LcaError::Output {
                path,
                msg: "does not have the layout the resume journal expects: the interrupted run's files were damaged; delete the journal directory to start over".into(),
            });
        }
        Ok(TensorExporter {
            path,
            file,
            data_start: header.len() as u64,
            offsets,
            dtype,
            step_index: done as u64,
            steps: steps.len(),
            source: TensorSource::Train,
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
        let values = match self.source {
            TensorSource::Train => out.lca,
            TensorSource::Validation => out.val_lca.unwrap_or(&[]),
            TensorSource::L2 => out.l2_lca.unwrap_or(&[]),
        };
        if values.len() != self.offsets.len() {
            return Err(LcaError::Output {
                path: self.path.clone(),
                msg: "no values for this step".into(),
            });
        }
        for ((off, numel), vals) in self.offsets.iter().zip(values) {
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

    fn sync(&mut self) -> Result<Vec<(PathBuf, u64)>> {
        self.file
            .sync_data()
            .map_err(|e| LcaError::io(&self.path, e))?;
        Ok(Vec::new())
    }

    /// Nothing left to write (every step went to the file in place). Not fsynced here: the
    /// output commit fsyncs it with the other finished files, all at once
    /// ([`crate::files::sync_files`]); a second fsync of its own cost a small run ~10 ms.
    fn finish(&mut self, _summary: &Summary, _totals: &ParamTotals) -> Result<()> {
        Ok(())
    }
}

/// Per-step LCA of a layer's neurons, read back from `lca.safetensors`.
#[derive(Debug, Clone, PartialEq)]
pub struct NeuronSteps {
    /// The step each row covers (θ_step → θ_next_step).
    pub steps: Vec<u64>,
    pub next_steps: Vec<u64>,
    /// `values[t][i]`: LCA of neuron `i` on step `t`.
    pub values: Vec<Vec<f64>>,
}

fn st_err(path: &std::path::Path, msg: impl Into<String>) -> LcaError {
    LcaError::Output {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn meta_steps(
    path: &std::path::Path,
    meta: Option<&serde_json::Value>,
    key: &str,
) -> Result<Vec<u64>> {
    let text = meta
        .and_then(|m| m.get(key))
        .and_then(|v| v.as_str())
        .ok_or_else(|| st_err(path, format!("metadata `{key}` is missing")))?;
    serde_json::from_str(text).map_err(|e| {
        st_err(
            path,
            format!("metadata `{key}` is not a list of steps: {e}"),
        )
    })
}

/// Per-step LCA of one tensor summed into `buckets`: entry `k` (flat, C order) of each step's
/// row goes to bucket `bucket(k)` (values `>= buckets` are dropped). Used for per-head sums of
/// attention projections.
pub fn read_bucket_steps(
    path: &std::path::Path,
    name: &str,
    buckets: usize,
    bucket: &dyn Fn(usize) -> usize,
) -> Result<NeuronSteps> {
    // One "neuron" per entry, then bucketed: read the tensor row by row.
    let file = StepFile::open(path)?;
    let nsteps = file.steps.len();
    let t = file.tensor(name, 0, "[steps, ...]")?;
    let mut f = file.rows_of(&t)?;
    let map: Vec<usize> = (0..t.row).map(bucket).collect();
    let mut buf = vec![0u8; t.row * t.es];
    let mut values = vec![vec![0.0; buckets]; nsteps];
    for out in values.iter_mut() {
        f.read_exact(&mut buf).map_err(|e| LcaError::io(path, e))?;
        for (k, &b) in map.iter().enumerate() {
            if b < buckets {
                out[b] += le_float(&buf[k * t.es..(k + 1) * t.es]);
            }
        }
    }
    Ok(NeuronSteps {
        steps: file.steps,
        next_steps: file.next_steps,
        values,
    })
}

/// A per-step tensor file (`lca_steps.safetensors` and the like): its header, its steps, and
/// where its data section starts.
struct StepFile<'p> {
    path: &'p std::path::Path,
    len: u64,
    header: crate::safetensors_header::Header,
    data_start: u64,
    steps: Vec<u64>,
    next_steps: Vec<u64>,
}

/// One `[steps, ...]` tensor of a [`StepFile`]: element size, shape, elements per step, and
/// the byte offset of its first row.
struct StepTensor {
    es: usize,
    shape: Vec<usize>,
    row: usize,
    start: u64,
}

impl<'p> StepFile<'p> {
    fn open(path: &'p std::path::Path) -> Result<Self> {
        let (len, header) = crate::safetensors_header::read_header(path)?;
        let meta = header.get("__metadata__");
        let steps = meta_steps(path, meta, "steps")?;
        let next_steps = meta_steps(path, meta, "next_steps")?;
        let mut f = File::open(path).map_err(|e| LcaError::io(path, e))?;
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|e| LcaError::io(path, e))?;
        Ok(StepFile {
            path,
            len,
            header,
            data_start: 8 + u64::from_le_bytes(n),
            steps,
            next_steps,
        })
    }

    /// Tensor `name`, F32 or F64, of shape `[steps, ...]` with at least `axes` axes after the
    /// steps (`expected` says so in the message), its data inside the file.
    fn tensor(&self, name: &str, axes: usize, expected: &str) -> Result<StepTensor> {
        let path = self.path;
        let nsteps = self.steps.len();
        let entry = self
            .header
            .get(name)
            .ok_or_else(|| st_err(path, format!("no tensor '{name}'")))?;
        let bad = |m: &str| st_err(path, format!("tensor '{name}': {m}"));
        let es = match entry.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => 4usize,
            Some("F64") => 8,
            other => return Err(bad(&format!("dtype {other:?}, expected F32 or F64"))),
        };
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad("no shape"))?;
        if shape.len() < 1 + axes || shape[0] != nsteps {
            return Err(bad(&format!(
                "shape {shape:?}, expected {}",
                expected.replacen("steps", &format!("{nsteps} steps"), 1)
            )));
        }
        let row = shape[1..].iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let bytes = row.and_then(|r| r.checked_mul(nsteps)?.checked_mul(es));
        let offs: Vec<u64> = entry
            .get("data_offsets")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .filter(|o: &Vec<u64>| o.len() == 2)
            .ok_or_else(|| bad("no data_offsets"))?;
        let fits = offs[1].checked_sub(offs[0]).is_some_and(|n| {
            Some(n) == bytes.map(|b| b as u64)
                && self
                    .data_start
                    .checked_add(offs[1])
                    .is_some_and(|end| end <= self.len)
        });
        if !fits {
            return Err(bad(
                "data_offsets do not match the shape or the file size (truncated?)",
            ));
        }
        Ok(StepTensor {
            es,
            row: row.unwrap_or(0),
            shape,
            start: self.data_start + offs[0],
        })
    }

    /// The file, positioned at the first row of `t`.
    fn rows_of(&self, t: &StepTensor) -> Result<File> {
        let mut f = File::open(self.path).map_err(|e| LcaError::io(self.path, e))?;
        f.seek(SeekFrom::Start(t.start))
            .map_err(|e| LcaError::io(self.path, e))?;
        Ok(f)
    }
}

/// A little-endian F32 (4 bytes) or F64 (8 bytes) as f64.
fn le_float(c: &[u8]) -> f64 {
    match c.len() {
        4 => f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64,
        _ => f64::from_le_bytes(c.try_into().expect("8 bytes")),
    }
}

/// Per-step, per-neuron LCA of the tensors `names` (one layer's weight and bias): neuron `i`
/// is index `i` along axis 0 of every tensor, summed over the other axes. Each tensor is
/// stored as `[steps, d0, ...]`; all must have the same `d0`. Reads one step row of one
/// tensor at a time, so memory stays at one row plus the result.
pub fn read_neuron_steps(path: &std::path::Path, names: &[String]) -> Result<NeuronSteps> {
    let file = StepFile::open(path)?;
    if file.steps.len() != file.next_steps.len() {
        return Err(st_err(
            path,
            "metadata `steps` and `next_steps` differ in length",
        ));
    }
    let nsteps = file.steps.len();
    let mut values: Option<Vec<Vec<f64>>> = None;
    for name in names {
        let t = file.tensor(name, 1, "[steps, neurons, ...]")?;
        let bad = |m: &str| st_err(path, format!("tensor '{name}': {m}"));
        let (es, neurons) = (t.es, t.shape[1]);
        if t.shape[2..].contains(&0) {
            return Err(bad(
                "data_offsets do not match the shape or the file size (truncated?)",
            ));
        }
        let row = t.row;
        let per_neuron = row.checked_div(neurons).unwrap_or(0);
        let vals = values.get_or_insert_with(|| vec![vec![0.0; neurons]; nsteps]);
        if vals.first().is_some_and(|r| r.len() != neurons) {
            return Err(bad(&format!(
                "{neurons} entries along axis 0, but the layer's other tensors have {}",
                vals[0].len()
            )));
        }
        let mut f = file.rows_of(&t)?;
        let mut buf = vec![0u8; row * es];
        for out in vals.iter_mut() {
            f.read_exact(&mut buf).map_err(|e| LcaError::io(path, e))?;
            for (i, o) in out.iter_mut().enumerate() {
                let chunk = &buf[i * per_neuron * es..(i + 1) * per_neuron * es];
                *o += chunk.chunks_exact(es).map(le_float).sum::<f64>();
            }
        }
    }
    Ok(NeuronSteps {
        steps: file.steps,
        next_steps: file.next_steps,
        values: values.unwrap_or_else(|| vec![Vec::new(); nsteps]),
    })
}

/// Reads the per-step rows of an f64 `lca.safetensors` (as shards write it) back, one step at
/// a time, bit for bit.
pub struct StepReader {
    path: PathBuf,
    file: File,
    data_start: u64,
    /// Per parameter tensor: byte offset in the data section and elements per step.
    entries: Vec<(u64, usize)>,
    pub steps: Vec<u64>,
    pub next_steps: Vec<u64>,
}

impl StepReader {
    /// Open `path`, checking that it holds every tensor of `params` (name, shape) as F64 with
    /// a leading step axis.
    pub fn open(path: &std::path::Path, params: &[(String, Vec<usize>)]) -> Result<StepReader> {
        let StepFile {
            len,
            header,
            data_start,
            steps,
            next_steps,
            ..
        } = StepFile::open(path)?;
        let file = File::open(path).map_err(|e| LcaError::io(path, e))?;
        let mut entries = Vec::with_capacity(params.len());
        for (name, shape) in params {
            let entry = header
                .get(name)
                .ok_or_else(|| st_err(path, format!("no tensor '{name}'")))?;
            let bad = |m: &str| st_err(path, format!("tensor '{name}': {m}"));
            if entry.get("dtype").and_then(|d| d.as_str()) != Some("F64") {
                return Err(bad("not F64 (parts of a sharded run store f64)"));
            }
            let mut want = vec![steps.len()];
            want.extend(shape);
            let got: Option<Vec<usize>> = entry
                .get("shape")
                .and_then(|s| serde_json::from_value(s.clone()).ok());
            if got.as_ref() != Some(&want) {
                return Err(bad(&format!("shape {got:?}, expected {want:?}")));
            }
            let offs: Vec<u64> = entry
                .get("data_offsets")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .filter(|o: &Vec<u64>| o.len() == 2)
                .ok_or_else(|| bad("no data_offsets"))?;
            let numel: usize = shape.iter().product();
            let fits = offs[1].checked_sub(offs[0]).is_some_and(|n| {
                Some(n) == steps.len().checked_mul(numel * 8).map(|b| b as u64)
                    && data_start
                        .checked_add(offs[1])
                        .is_some_and(|end| end <= len)
            });
            if !fits {
                return Err(bad(
                    "data_offsets do not match the shape or the file size (truncated?)",
                ));
            }
            entries.push((offs[0], numel));
        }
        Ok(StepReader {
            path: path.to_path_buf(),
            file,
            data_start,
            entries,
            steps,
            next_steps,
        })
    }

    /// Per-parameter values of step row `t`, model order.
    pub fn read(&mut self, t: usize) -> Result<Vec<Vec<f64>>> {
        let io = |e| LcaError::io(&self.path, e);
        let mut out = Vec::with_capacity(self.entries.len());
        for &(off, numel) in &self.entries {
            let pos = self.data_start + off + (t * numel * 8) as u64;
            self.file.seek(SeekFrom::Start(pos)).map_err(io)?;
            let mut buf = vec![0u8; numel * 8];
            self.file.read_exact(&mut buf).map_err(io)?;
            out.push(
                buf.chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect(),
            );
        }
        Ok(out)
    }
}
