//! The training set: `x` and `y` tensors from a `.safetensors` or `.npz` file, with the
//! preprocessing the spec declares (`scale`, then per-feature/per-channel `mean` and `std`).
//!
//! Inputs are held in memory preprocessed once: as f32, or, when the file stores them as
//! bytes (`uint8`, `int8`), as those bytes with a table of each byte's preprocessed f32
//! value per channel ([`Inputs::Codes`], a quarter of the memory; chunks are expanded
//! through the table when a layer reads them, to the same bits). Targets are class indices
//! (for cross-entropy, from any integer dtype or integral floats) or float values (for MSE).

use crate::error::{LcaError, Result};
use crate::net::input::CODES;
use crate::net::{CodeTable, Codes, Input, LossKind, TargetsView};
use crate::spec::DataSpec;
use ndarray::{ArrayD, Axis, IxDyn};
use std::path::{Path, PathBuf};

mod npz;
pub mod order;

pub use order::{DataOrder, LabelRuns};

/// Targets of the whole set.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Class indices, `n × per_sample` of them (per_sample = 1, or the sequence length).
    Classes { ids: Vec<u32>, per_sample: usize },
    /// Float targets `[N, ...]`.
    Values(ArrayD<f32>),
}

/// A loaded, preprocessed data set.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub sha256: String,
    /// Inputs `[N, ...]`, preprocessed.
    pub x: Inputs,
    pub targets: Targets,
    /// Per-sample shape of the stored targets.
    pub y_shape: Vec<usize>,
}

/// The inputs of a data set, `[N, ...]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Inputs {
    /// Preprocessed values.
    F32(ArrayD<f32>),
    /// One byte per value as stored in the file (shifted by 128 for `int8`), and the
    /// preprocessed f32 value of each byte per channel.
    Codes { codes: ArrayD<u8>, table: CodeTable },
}

impl From<ArrayD<f32>> for Inputs {
    fn from(x: ArrayD<f32>) -> Inputs {
        Inputs::F32(x)
    }
}

impl Inputs {
    /// Shape `[N, ...]`.
    pub fn shape(&self) -> &[usize] {
        match self {
            Inputs::F32(x) => x.shape(),
            Inputs::Codes { codes, .. } => codes.shape(),
        }
    }

    /// The preprocessed values in row-major order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = &f32> + '_> {
        match self {
            Inputs::F32(x) => Box::new(x.iter()),
            Inputs::Codes { codes, table } => {
                let per: usize = codes.shape()[1..].iter().product::<usize>().max(1);
                Box::new(
                    codes
                        .iter()
                        .enumerate()
                        .map(move |(i, &c)| &table.row_at(i % per)[c as usize]),
                )
            }
        }
    }

    /// The preprocessed values as one f32 array (a copy for a byte-held set).
    pub fn to_f32(&self) -> ArrayD<f32> {
        match self {
            Inputs::F32(x) => x.clone(),
            Inputs::Codes { .. } => match self.rows(0, self.shape()[0]) {
                Input::Codes(c) => c.expand(),
                Input::F32(x) => x.to_owned(),
            },
        }
    }

    /// The inputs of samples `start..end`.
    pub fn rows(&self, start: usize, end: usize) -> Input<'_> {
        match self {
            Inputs::F32(x) => Input::F32(x.slice_axis(Axis(0), (start..end).into())),
            Inputs::Codes { codes, table } => Input::Codes(Codes {
                codes: codes.slice_axis(Axis(0), (start..end).into()),
                table,
            }),
        }
    }

    /// The byte table of a byte-held set.
    pub fn code_table(&self) -> Option<&CodeTable> {
        match self {
            Inputs::F32(_) => None,
            Inputs::Codes { table, .. } => Some(table),
        }
    }
}

/// What a byte of a stored dtype holds: `Some(k)` where a value `v` is held as the byte
/// `v + k` (`uint8`: 0, `int8`: 128); `None` for other dtypes (held as f32).
fn byte_code_offset(dtype: &str) -> Option<f64> {
    match dtype {
        "U8" | "|u1" | "<u1" | ">u1" | "=u1" | "u1" => Some(0.0),
        "I8" | "|i1" | "<i1" | ">i1" | "=i1" | "i1" => Some(128.0),
        _ => None,
    }
}

/// A raw tensor from the file: shape, values and whether the dtype is integral.
struct Raw {
    shape: Vec<usize>,
    values: Values,
    integral: bool,
    dtype: String,
}

/// A tensor's values: in memory as f64, or still in the file (read in blocks when used, so
/// that a large input set is never held twice).
enum Values {
    Mem(Vec<f64>),
    File {
        path: PathBuf,
        /// Byte offset of the first element.
        offset: u64,
        dtype: safetensors::Dtype,
        len: usize,
    },
}

/// Elements converted per block when streaming from the file.
const BLOCK_ELEMS: usize = 1 << 16;

impl Raw {
    /// Visit every value in order as f64 (exact for every supported dtype but 64-bit integers
    /// beyond 2^53), stopping at the first error.
    fn for_each(&self, path: &Path, mut f: impl FnMut(usize, f64) -> Result<()>) -> Result<()> {
        self.for_each_block(path, |start, vals| {
            vals.iter()
                .enumerate()
                .try_for_each(|(j, &v)| f(start + j, v))
        })
    }

    /// Visit the values in order, a block at a time, as f64: `f(index of the block's first
    /// value, the block)`, stopping at the first error.
    fn for_each_block(
        &self,
        path: &Path,
        mut f: impl FnMut(usize, &[f64]) -> Result<()>,
    ) -> Result<()> {
        match &self.values {
            Values::Mem(v) => f(0, v),
            Values::File {
                path: file,
                offset,
                dtype,
                len,
            } => {
                use std::io::{Read, Seek, SeekFrom};
                let (mut r, _) = crate::files::open_regular(file)?;
                r.seek(SeekFrom::Start(*offset))
                    .map_err(|e| LcaError::io(path, e))?;
                let size = dtype.bitsize().div_ceil(8);
                let mut buf = vec![0u8; BLOCK_ELEMS * size];
                let mut i = 0;
                while i < *len {
                    if crate::interrupt::requested() {
                        return Err(LcaError::Interrupted(crate::error::Interruption::Requested));
                    }
                    let k = BLOCK_ELEMS.min(len - i);
                    let bytes = &mut buf[..k * size];
                    r.read_exact(bytes).map_err(|e| LcaError::io(path, e))?;
                    let view = safetensors::tensor::TensorView::new(*dtype, vec![k], bytes)
                        .map_err(|e| LcaError::Data {
                            path: path.to_path_buf(),
                            msg: format!("cannot read a block of values: {e}"),
                        })?;
                    let vals = crate::tensors::to_f64(&view).map_err(|d| LcaError::Data {
                        path: path.to_path_buf(),
                        msg: format!("unsupported dtype {d}"),
                    })?;
                    f(i, &vals)?;
                    i += k;
                }
                Ok(())
            }
        }
    }

    /// Visit the values of a byte dtype (`uint8`, `int8`) in order, a block at a time, as
    /// bytes `v + offset` ([`byte_code_offset`]): read straight from the file, or converted
    /// from the values in memory.
    fn for_each_code_block(
        &self,
        path: &Path,
        offset: f64,
        mut f: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        match &self.values {
            Values::File {
                path: file,
                offset: at,
                dtype,
                len,
            } if dtype.bitsize() == 8 => {
                use std::io::{Read, Seek, SeekFrom};
                let (mut r, _) = crate::files::open_regular(file)?;
                r.seek(SeekFrom::Start(*at))
                    .map_err(|e| LcaError::io(path, e))?;
                let flip = if offset == 0.0 { 0 } else { 0x80 };
                let mut buf = vec![0u8; 4 * BLOCK_ELEMS];
                let mut i = 0;
                while i < *len {
                    if crate::interrupt::requested() {
                        return Err(LcaError::Interrupted(crate::error::Interruption::Requested));
                    }
                    let k = buf.len().min(len - i);
                    let bytes = &mut buf[..k];
                    r.read_exact(bytes).map_err(|e| LcaError::io(path, e))?;
                    if flip != 0 {
                        // int8 `v` (two's complement) ↦ v + 128.
                        bytes.iter_mut().for_each(|b| *b ^= flip);
                    }
                    f(i, bytes)?;
                    i += k;
                }
                Ok(())
            }
            _ => {
                let mut buf = Vec::with_capacity(BLOCK_ELEMS);
                self.for_each_block(path, |start, vals| {
                    buf.clear();
                    buf.extend(vals.iter().map(|&v| (v + offset) as u8));
                    f(start, &buf)
                })
            }
        }
    }

    /// All values in memory as f64.
    fn into_values(self, path: &Path) -> Result<Vec<f64>> {
        if let Values::Mem(v) = self.values {
            return Ok(v);
        }
        let mut out = Vec::new();
        self.for_each(path, |_, v| {
            out.push(v);
            Ok(())
        })?;
        Ok(out)
    }
}

fn read_safetensors(path: &Path, names: [&str; 2]) -> Result<[Raw; 2]> {
    let err = |msg: String| LcaError::Data {
        path: path.to_path_buf(),
        msg,
    };
    // The same complete header check as for checkpoints, for messages that say what is wrong;
    // the data section is read later, in blocks.
    let (data_start, tensors) =
        crate::safetensors_header::read_file_header(path).map_err(|e| match e {
            LcaError::Checkpoint { msg, .. } => err(format!("not a valid safetensors file: {msg}")),
            other => other,
        })?;
    let get = |name: &str| -> Result<Raw> {
        let t = tensors.iter().find(|t| t.name == name).ok_or_else(|| {
            let mut have: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
            have.sort();
            err(format!(
                "has no tensor '{name}' (it holds: {}); set `data.x`/`data.y` in the spec",
                have.join(", ")
            ))
        })?;
        let dtype: safetensors::Dtype =
            serde_json::from_value(serde_json::Value::String(t.dtype.clone()))
                .map_err(|_| err(format!("tensor '{name}' has unsupported dtype {}", t.dtype)))?;
        // Refuse dtypes that carry no usable numbers before reading anything.
        let empty = safetensors::tensor::TensorView::new(dtype, vec![0], &[])
            .map_err(|e| err(format!("tensor '{name}': {e}")))?;
        crate::tensors::to_f64(&empty)
            .map_err(|d| err(format!("tensor '{name}' has unsupported dtype {d}")))?;
        Ok(Raw {
            shape: t.shape.clone(),
            values: Values::File {
                path: path.to_path_buf(),
                offset: data_start + t.data_offsets[0],
                dtype,
                len: t.shape.iter().product(),
            },
            integral: crate::tensors::is_int_dtype(dtype),
            dtype: format!("{dtype:?}"),
        })
    };
    Ok([get(names[0])?, get(names[1])?])
}

fn read_npz(path: &Path, names: [&str; 2]) -> Result<[Raw; 2]> {
    let raw = |a: npz::NpyArray| Raw {
        shape: a.shape,
        values: Values::Mem(a.values),
        integral: a.integral,
        dtype: a.dtype,
    };
    // The token stream is one array read once.
    let wanted: &[&str] = if names[0] == names[1] {
        &names[..1]
    } else {
        &names
    };
    let mut arrays = npz::read(path, wanted)?.into_iter();
    let x = arrays.next().map(raw).expect("one array per name");
    let y = match arrays.next() {
        Some(a) => raw(a),
        None => Raw {
            shape: x.shape.clone(),
            values: Values::Mem(Vec::new()),
            integral: x.integral,
            dtype: x.dtype.clone(),
        },
    };
    Ok([x, y])
}

/// `[N, T+1]` token ids → inputs (the first T columns) and targets (the last T).
fn split_tokens(tok: Raw, values: &[f64], name: &str) -> std::result::Result<[Raw; 2], String> {
    let (n, len) = match tok.shape.as_slice() {
        [n, len] if *len >= 2 => (*n, *len),
        other => {
            return Err(format!(
                "'{name}' must be token ids [N, T+1] (inputs are the first T of each row, targets the last T), found shape {other:?}"
            ));
        }
    };
    if !tok.integral {
        return Err(format!(
            "'{name}' must hold token ids of an integer dtype, found {}",
            tok.dtype
        ));
    }
    let t = len - 1;
    let mut xs = Vec::with_capacity(n * t);
    let mut ys = Vec::with_capacity(n * t);
    for row in values.chunks_exact(len) {
        xs.extend_from_slice(&row[..t]);
        ys.extend_from_slice(&row[1..]);
    }
    let part = |values| Raw {
        shape: vec![n, t],
        values: Values::Mem(values),
        integral: true,
        dtype: tok.dtype.clone(),
    };
    Ok([part(xs), part(ys)])
}

/// Read `x` and `y` (or the token stream, split into inputs and next-token targets).
fn read_xy(path: &Path, spec: &DataSpec) -> Result<[Raw; 2]> {
    let names = match &spec.tokens {
        Some(t) => [t.as_str(), t.as_str()],
        None => [spec.x.as_str(), spec.y.as_str()],
    };
    let is_npz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"));
    let [x, y] = if is_npz {
        read_npz(path, names)?
    } else {
        read_safetensors(path, names)?
    };
    Ok(match &spec.tokens {
        Some(name) => {
            drop(y);
            let shape = x.shape.clone();
            let dtype = x.dtype.clone();
            let integral = x.integral;
            let values = x.into_values(path)?;
            let tok = Raw {
                shape,
                values: Values::Mem(Vec::new()),
                integral,
                dtype,
            };
            split_tokens(tok, &values, name).map_err(|msg| LcaError::Data {
                path: path.to_path_buf(),
                msg,
            })?
        }
        None => [x, y],
    })
}

/// The preprocessing of the inputs: `(v·scale − mean[c]) / std[c]` along the first
/// per-sample axis (channel `c` = position / `inner`), computed in f64 and rounded to f32.
struct Preprocess<'a> {
    /// The tensor's name in the spec (`data.x`), for messages.
    name: &'a str,
    /// Values per sample.
    per: usize,
    /// Values per channel.
    inner: usize,
    mean: &'a [f64],
    std: &'a [f64],
    scale: f64,
}

impl Preprocess<'_> {
    fn err(path: &Path, msg: String) -> LcaError {
        LcaError::Data {
            path: path.to_path_buf(),
            msg,
        }
    }

    /// The message for the value `v` at flat index `at` (of the whole tensor) that is not
    /// finite, or that preprocessing took beyond the f32 range.
    fn bad_value(&self, path: &Path, at: usize, v: f64) -> LcaError {
        let (name, per) = (self.name, self.per);
        Self::err(
            path,
            if !v.is_finite() {
                format!(
                    "'{name}' holds a non-finite value ({v}) in sample {} (flat index {})",
                    at / per,
                    at % per
                )
            } else {
                format!(
                    "'{name}' sample {} (flat index {}) holds {v:e}, beyond the f32 range after preprocessing (scale, mean, std)",
                    at / per,
                    at % per,
                )
            },
        )
    }

    /// One pass over the stored values: refuse non-finite values, preprocess, and refuse
    /// values that preprocessing takes beyond the f32 range the evaluator computes in.
    fn values(&self, x: &Raw, path: &Path) -> Result<Vec<f32>> {
        let (per, inner, scale) = (self.per, self.inner, self.scale);
        let total = x.shape.iter().product::<usize>();
        let mut xs: Vec<f32> = Vec::with_capacity(total);
        // Each position of a sample has its channel's mean and std (tables of one sample's
        // length), so a block converts in runs along the sample without a division per value.
        let offsets: Vec<f64> = (0..per).map(|p| self.mean[p / inner]).collect();
        let divisors: Vec<f64> = (0..per).map(|p| self.std[p / inner]).collect();
        x.for_each_block(path, |start, vals| {
            let mut i = start;
            let mut rest = vals;
            while !rest.is_empty() {
                let p = i % per;
                let k = (per - p).min(rest.len());
                let (run, tail) = rest.split_at(k);
                let from = xs.len();
                xs.extend(
                    run.iter()
                        .zip(&offsets[p..p + k])
                        .zip(&divisors[p..p + k])
                        .map(|((&v, &m), &d)| ((v * scale - m) / d) as f32),
                );
                let finite = run
                    .iter()
                    .zip(&xs[from..])
                    .fold(true, |ok, (v, p)| ok & v.is_finite() & p.is_finite());
                if !finite {
                    let j = (0..k)
                        .find(|&j| !run[j].is_finite() || !xs[from + j].is_finite())
                        .expect("a non-finite value in the run");
                    return Err(self.bad_value(path, i + j, run[j]));
                }
                i += k;
                rest = tail;
            }
            Ok(())
        })?;
        Ok(xs)
    }

    /// The stored bytes (each value `v` as the byte `v + offset`) and the table of their
    /// preprocessed values: the value of byte `c` in channel `ch` is what
    /// [`Preprocess::values`] computes for `c − offset` there (the same formula, the same
    /// bits), and a value it would refuse is refused here with the same message, at its
    /// first place in the file. Also measures the share of non-zero values.
    fn codes(&self, x: &Raw, path: &Path, offset: f64) -> Result<(Vec<u8>, CodeTable)> {
        let (per, inner, scale) = (self.per, self.inner, self.scale);
        let channels = per / inner.max(1);
        let rows: Vec<[f32; CODES]> = (0..channels)
            .map(|ch| {
                std::array::from_fn(|c| {
                    let v = c as f64 - offset;
                    ((v * scale - self.mean[ch]) / self.std[ch]) as f32
                })
            })
            .collect();
        // Per channel: whether some byte's value is refused, and which bytes are zero.
        let bad_rows: Vec<bool> = rows
            .iter()
            .map(|r| r.iter().any(|v| !v.is_finite()))
            .collect();
        let zero_rows: Vec<[bool; CODES]> = rows
            .iter()
            .map(|r| std::array::from_fn(|c| r[c] == 0.0))
            .collect();
        let table = CodeTable::new(rows.clone(), inner);
        // Runs of one channel row: the whole block when every channel has the same row.
        let unit = if table.single_row() {
            usize::MAX
        } else {
            inner.max(1)
        };
        let total = x.shape.iter().product::<usize>();
        let mut codes: Vec<u8> = Vec::with_capacity(total);
        let mut nonzero = 0usize;
        x.for_each_code_block(path, offset, |start, block| {
            codes.extend_from_slice(block);
            let mut i = start;
            let mut rest = block;
            while !rest.is_empty() {
                let (ch, k) = if unit == usize::MAX {
                    (0, rest.len())
                } else {
                    (
                        (i % per) / unit,
                        ((i / unit + 1) * unit - i).min(rest.len()),
                    )
                };
                let (run, tail) = rest.split_at(k);
                let zero = &zero_rows[ch];
                nonzero += if run.len() < 4 * CODES {
                    run.iter().filter(|&&c| !zero[c as usize]).count()
                } else {
                    // A histogram of the bytes: one pass without a lookup per byte.
                    let mut hist = [0usize; CODES];
                    for &c in run {
                        hist[c as usize] += 1;
                    }
                    (0..CODES).filter(|&c| !zero[c]).map(|c| hist[c]).sum()
                };
                if bad_rows[ch] {
                    let row = &rows[ch];
                    if let Some(j) = run.iter().position(|&c| !row[c as usize].is_finite()) {
                        let v = run[j] as f64 - offset;
                        return Err(self.bad_value(path, i + j, v));
                    }
                }
                i += k;
                rest = tail;
            }
            Ok(())
        })?;
        let mut table = table;
        table.set_density(nonzero as f64 / total.max(1) as f64);
        Ok((codes, table))
    }
}

impl Dataset {
    /// Check the inputs' values against the layers that read them directly (token ids within
    /// their embedding), naming the sample and position of the first offending value.
    pub fn check_inputs<T: crate::net::Real>(&self, model: &crate::net::Model<T>) -> Result<()> {
        let err = |m: String| LcaError::Data {
            path: self.path.clone(),
            msg: format!("inputs: {m}"),
        };
        let codes = match &self.x {
            Inputs::F32(x) => return model.check_input(x.view()).map_err(err),
            Inputs::Codes { codes, .. } => codes,
        };
        // A byte-held set is checked in blocks of expanded samples; a block with a problem is
        // checked again from the first sample, so that the message names its sample.
        const BLOCK: usize = 4096;
        let n = codes.shape()[0];
        for a in (0..n).step_by(BLOCK) {
            let b = (a + BLOCK).min(n);
            let x = self.x.rows(a, b).to_real::<f32>().into_owned();
            if model.check_input(x.view()).is_err() {
                let x = self.x.rows(0, b).to_real::<f32>().into_owned();
                return model.check_input(x.view()).map_err(err);
            }
        }
        Ok(())
    }

    /// Load and preprocess a data set. `input_shape` (from `[model]`) reshapes each sample
    /// when given; `loss` decides how targets are read.
    pub fn load(
        path: &Path,
        spec: &DataSpec,
        input_shape: Option<&[usize]>,
        loss: LossKind,
    ) -> Result<Dataset> {
        let err = |msg: String| LcaError::Data {
            path: path.to_path_buf(),
            msg,
        };
        if path.is_dir() {
            return Err(err(
                "is a directory, not a data file (.safetensors or .npz)".into(),
            ));
        }
        // Only a regular file: a FIFO or a device (/dev/zero) would block or read forever.
        drop(crate::files::open_regular(path)?);
        let sha256 = crate::tensors::sha256_file(path).map_err(|e| LcaError::io(path, e))?;
        let [x, y] = read_xy(path, spec)?;
        let y_values = {
            let shape = y.shape.clone();
            let integral = y.integral;
            let dtype = y.dtype.clone();
            (y.into_values(path)?, shape, integral, dtype)
        };
        let n = *x.shape.first().ok_or_else(|| {
            err(format!(
                "'{}' must have a sample axis, found a scalar",
                spec.x
            ))
        })?;
        if n == 0 {
            return Err(err(format!("'{}' holds no samples", spec.x)));
        }
        match y_values.1.first() {
            Some(&m) if m == n => {}
            Some(&m) => {
                return Err(err(format!(
                    "'{}' has {n} samples but '{}' has {m}",
                    spec.x, spec.y
                )));
            }
            None => {
                return Err(err(format!(
                    "'{}' must have a sample axis, found a scalar",
                    spec.y
                )));
            }
        }
        // A sample of no values (a shape such as (N, 0)) has nothing to evaluate or to train
        // towards; refused here, before anything is sized by it.
        for (key, shape) in [(&spec.x, &x.shape), (&spec.y, &y_values.1)] {
            if shape[1..].contains(&0) {
                return Err(err(format!(
                    "'{key}' has shape {shape:?}: each sample holds no values"
                )));
            }
        }
        let mut sample_shape = x.shape[1..].to_vec();
        if let Some(want) = input_shape {
            let have: usize = sample_shape.iter().product();
            let need: usize = want.iter().product();
            if have != need {
                return Err(err(format!(
                    "samples of '{}' have shape {:?} ({have} values) but `model.input_shape` is {:?} ({need} values)",
                    spec.x, sample_shape, want
                )));
            }
            sample_shape = want.to_vec();
        }
        let per: usize = sample_shape.iter().product::<usize>().max(1);
        // Preprocessing: x*scale, then (x - mean[c]) / std[c] along the first per-sample axis.
        let channels = sample_shape.first().copied().unwrap_or(1);
        let inner = if sample_shape.is_empty() {
            1
        } else {
            per / channels.max(1)
        };
        let per_channel = |key: &str, v: &Option<Vec<f64>>, default: f64| -> Result<Vec<f64>> {
            match v {
                None => Ok(vec![default; channels]),
                Some(v) if v.len() == 1 => Ok(vec![v[0]; channels]),
                Some(v) if v.len() == channels => Ok(v.clone()),
                Some(v) => Err(LcaError::Data {
                    path: path.to_path_buf(),
                    msg: format!(
                        "`data.{key}` has {} values but samples have {channels} features/channels along their first axis (shape {:?})",
                        v.len(),
                        sample_shape
                    ),
                }),
            }
        };
        let mean = per_channel("mean", &spec.mean, 0.0)?;
        let std = per_channel("std", &spec.std, 1.0)?;
        let scale = spec.scale.unwrap_or(1.0);
        let mut shape = vec![n];
        shape.extend(&sample_shape);
        let pre = Preprocess {
            name: &spec.x,
            per,
            inner,
            mean: &mean,
            std: &std,
            scale,
        };
        let xarr = match byte_code_offset(&x.dtype) {
            Some(offset) if spec.tokens.is_none() => {
                let codes = pre.codes(&x, path, offset)?;
                let (codes, table) = codes;
                Inputs::Codes {
                    codes: ArrayD::from_shape_vec(IxDyn(&shape), codes).map_err(|e| {
                        err(format!("'{}' cannot take shape {shape:?}: {e}", spec.x))
                    })?,
                    table,
                }
            }
            _ => Inputs::F32(
                ArrayD::from_shape_vec(IxDyn(&shape), pre.values(&x, path)?)
                    .map_err(|e| err(format!("'{}' cannot take shape {shape:?}: {e}", spec.x)))?,
            ),
        };

        let (y_vals, y_full_shape, y_integral, _) = y_values;
        let y_shape = y_full_shape[1..].to_vec();
        let targets = match loss {
            LossKind::CrossEntropy => {
                let per_y: usize = y_shape.iter().product::<usize>().max(1);
                let mut ids = Vec::with_capacity(y_vals.len());
                for (i, &v) in y_vals.iter().enumerate() {
                    if !v.is_finite() || v.fract() != 0.0 || v < 0.0 || v > u32::MAX as f64 {
                        // With `data.tokens` the targets are columns 1..=T of the token rows:
                        // name that array and its column, not `y`.
                        if let Some(tok) = &spec.tokens {
                            return Err(err(format!(
                                "'{tok}' must hold token ids (non-negative integers); sample {} target position {} (column {} of the row) is {v}",
                                i / per_y,
                                i % per_y,
                                i % per_y + 1
                            )));
                        }
                        let at = if y_shape.is_empty() {
                            format!("sample {i}")
                        } else {
                            format!("sample {} position {}", i / per_y, i % per_y)
                        };
                        return Err(err(format!(
                            "'{}' must hold class indices (non-negative integers) for cross_entropy; {at} is {v}{}",
                            spec.y,
                            if y_integral { "" } else { " (float dtype)" }
                        )));
                    }
                    ids.push(v as u32);
                }
                Targets::Classes {
                    ids,
                    per_sample: per_y,
                }
            }
            LossKind::Mse => {
                if let Some(i) = y_vals.iter().position(|v| !v.is_finite()) {
                    let per_y: usize = y_shape.iter().product::<usize>().max(1);
                    return Err(err(format!(
                        "'{}' holds a non-finite value in sample {}",
                        spec.y,
                        i / per_y
                    )));
                }
                let mut s = vec![n];
                s.extend(&y_shape);
                let vals: Vec<f32> = y_vals.iter().map(|&v| v as f32).collect();
                if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
                    let per_y: usize = y_shape.iter().product::<usize>().max(1);
                    return Err(err(format!(
                        "'{}' sample {} holds {:e}, beyond the f32 range",
                        spec.y,
                        i / per_y,
                        y_vals[i]
                    )));
                }
                Targets::Values(
                    ArrayD::from_shape_vec(IxDyn(&s), vals)
                        .map_err(|e| err(format!("'{}' cannot take shape {s:?}: {e}", spec.y)))?,
                )
            }
        };
        Ok(Dataset {
            path: path.to_path_buf(),
            sha256,
            x: xarr,
            targets,
            y_shape,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.x.shape()[0]
    }

    /// Whether the set is empty (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Per-sample input shape.
    pub fn sample_shape(&self) -> &[usize] {
        &self.x.shape()[1..]
    }

    /// Check the targets against the model's per-sample output shape and loss.
    pub fn check_targets(&self, out_shape: &[usize], loss: LossKind) -> Result<()> {
        let err = |msg: String| LcaError::Data {
            path: self.path.clone(),
            msg,
        };
        match (&self.targets, loss) {
            (Targets::Classes { ids, per_sample }, LossKind::CrossEntropy) => {
                let (k, lead) = match out_shape.split_last() {
                    Some((k, lead)) if *k > 0 => (*k, lead),
                    _ => {
                        return Err(err(format!(
                            "the model output {out_shape:?} has no class axis with at least one class"
                        )));
                    }
                };
                let rows: usize = lead.iter().product::<usize>().max(1);
                if rows != *per_sample {
                    return Err(err(format!(
                        "targets have shape {:?} per sample but the model gives {} rows of {k} logits per sample (output {:?})",
                        self.y_shape, rows, out_shape
                    )));
                }
                if let Some(i) = ids.iter().position(|&c| c as usize >= k) {
                    let at = if *per_sample == 1 {
                        format!("sample {i}")
                    } else {
                        format!("sample {} position {}", i / per_sample, i % per_sample)
                    };
                    return Err(err(format!(
                        "label {} at {at} is out of range: the model has {k} classes (0..{})",
                        ids[i],
                        k - 1
                    )));
                }
                Ok(())
            }
            (Targets::Values(v), LossKind::Mse) => {
                let per: usize = v.shape()[1..].iter().product();
                let want: usize = out_shape.iter().product();
                if per != want {
                    return Err(err(format!(
                        "MSE targets have {per} values per sample (shape {:?}) but the model output has {want} (shape {:?})",
                        &v.shape()[1..],
                        out_shape
                    )));
                }
                Ok(())
            }
            _ => Err(err("targets do not match the loss".into())),
        }
    }

    /// Reorder the rows in place for evaluation in `order` (nothing for file order): row k
    /// becomes the file's row `permutation(n, seed)[k]` ([`order`]).
    pub fn reorder(&mut self, order: DataOrder) {
        let DataOrder::Shuffled { seed } = order else {
            return;
        };
        let n = self.len();
        let perm = order::permutation(n, seed);
        let per: usize = self.x.shape()[1..].iter().product();
        match &mut self.x {
            Inputs::F32(x) => match x.as_slice_mut() {
                Some(v) => order::permute_rows(v, per, &perm),
                None => *x = x.select(Axis(0), &perm),
            },
            Inputs::Codes { codes, .. } => match codes.as_slice_mut() {
                Some(v) => order::permute_rows(v, per, &perm),
                None => *codes = codes.select(Axis(0), &perm),
            },
        }
        match &mut self.targets {
            Targets::Classes { ids, per_sample } => order::permute_rows(ids, *per_sample, &perm),
            Targets::Values(v) => {
                let per: usize = v.shape()[1..].iter().product();
                match v.as_slice_mut() {
                    Some(s) => order::permute_rows(s, per, &perm),
                    None => *v = v.select(Axis(0), &perm),
                }
            }
        }
    }

    /// How clustered the class labels are in the current row order (classification with one
    /// label per sample only).
    pub fn label_runs(&self) -> Option<LabelRuns> {
        match &self.targets {
            Targets::Classes { ids, per_sample: 1 } => LabelRuns::of(ids),
            _ => None,
        }
    }

    /// Inputs and targets of samples `start..end`.
    pub fn chunk(&self, start: usize, end: usize) -> (Input<'_>, TargetsView<'_>) {
        let x = self.x.rows(start, end);
        let y = match &self.targets {
            Targets::Classes { ids, per_sample } => {
                TargetsView::Classes(&ids[start * per_sample..end * per_sample])
            }
            Targets::Values(v) => TargetsView::Values(v.slice_axis(Axis(0), (start..end).into())),
        };
        (x, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::Dtype;
    use safetensors::tensor::{TensorView, serialize_to_file};

    /// Write `x` (u8, given shape) and `y` (i64) to a safetensors file.
    fn write(path: &Path, x: &[u8], shape: &[usize], y: &[i64]) {
        let yb: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            ("x", TensorView::new(Dtype::U8, shape.to_vec(), x).unwrap()),
            (
                "y",
                TensorView::new(Dtype::I64, vec![y.len()], &yb).unwrap(),
            ),
        ];
        serialize_to_file(views, None, path).unwrap();
    }

    fn spec(mean: Option<Vec<f64>>, std: Option<Vec<f64>>) -> DataSpec {
        DataSpec {
            train: "x.safetensors".into(),
            x: "x".into(),
            y: "y".into(),
            tokens: None,
            scale: Some(0.5),
            mean,
            std,
            validation: None,
        }
    }

    /// `[N, C, H, W]` images: scale, then per-channel mean and std along axis 1.
    #[test]
    fn nchw_images_are_normalised_per_channel() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        // 2 samples × 3 channels × 2 × 2; value = 10·channel + pixel + 40·sample.
        let x: Vec<u8> = (0..2)
            .flat_map(|n| {
                (0..3).flat_map(move |c| (0..4).map(move |p| (40 * n + 10 * c + p) as u8))
            })
            .collect();
        write(&path, &x, &[2, 3, 2, 2], &[1, 0]);
        let s = spec(Some(vec![1.0, 2.0, 3.0]), Some(vec![1.0, 2.0, 4.0]));
        let d = Dataset::load(&path, &s, None, LossKind::CrossEntropy).unwrap();
        assert_eq!(d.sample_shape(), &[3, 2, 2]);
        let dx = d.x.to_f32();
        for n in 0..2 {
            for c in 0..3 {
                for p in 0..4 {
                    let raw = (40 * n + 10 * c + p) as f64;
                    let want = ((raw * 0.5 - [1.0, 2.0, 3.0][c]) / [1.0, 2.0, 4.0][c]) as f32;
                    assert_eq!(
                        dx[[n, c, p / 2, p % 2]],
                        want,
                        "sample {n} channel {c} pixel {p}"
                    );
                }
            }
        }
        // A mean per pixel row is not a mean per channel.
        let s = spec(Some(vec![1.0, 2.0]), None);
        let e = Dataset::load(&path, &s, None, LossKind::CrossEntropy)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`data.mean` has 2 values") && e.contains("3 features/channels"),
            "{e}"
        );
    }

    /// Values are converted a file block at a time, in runs along the sample; blocks end in
    /// the middle of samples. Every value matches the per-value formula, and a non-finite
    /// value after the first block is named by its sample and flat index.
    #[test]
    fn blocks_that_split_samples_convert_every_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let (n, c, hw) = (1000, 3, 49);
        let per = c * hw;
        let x: Vec<u8> = (0..n * per).map(|i| (i * 7 % 251) as u8).collect();
        assert!(x.len() > 2 * BLOCK_ELEMS && !BLOCK_ELEMS.is_multiple_of(per));
        write(&path, &x, &[n, c, 7, 7], &vec![0; n]);
        let (mean, std) = ([1.0, 2.0, 3.0], [1.0, 3.0, 7.0]);
        let s = spec(Some(mean.to_vec()), Some(std.to_vec()));
        let d = Dataset::load(&path, &s, None, LossKind::CrossEntropy).unwrap();
        let dx = d.x.to_f32();
        let flat = dx.as_slice().unwrap();
        for (i, (&got, &raw)) in flat.iter().zip(&x).enumerate() {
            let ch = (i % per) / hw;
            let want = ((raw as f64 * 0.5 - mean[ch]) / std[ch]) as f32;
            assert_eq!(got.to_bits(), want.to_bits(), "flat value {i}");
        }

        let mut xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let at = BLOCK_ELEMS + 5 * per + 17;
        xf[at] = f32::NAN;
        let xb: Vec<u8> = xf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let yb: Vec<u8> = vec![0i64; n].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            (
                "x",
                TensorView::new(Dtype::F32, vec![n, c, 7, 7], &xb).unwrap(),
            ),
            ("y", TensorView::new(Dtype::I64, vec![n], &yb).unwrap()),
        ];
        serialize_to_file(views, None, &path).unwrap();
        let e = Dataset::load(&path, &s, None, LossKind::CrossEntropy)
            .unwrap_err()
            .to_string();
        let want = format!(
            "non-finite value (NaN) in sample {} (flat index {})",
            at / per,
            at % per
        );
        assert!(e.contains(&want), "{e}");
    }

    /// `[N, H, W]` one-channel images get their channel axis from `model.input_shape`, so that
    /// a single mean/std applies to the one channel, not to each row.
    #[test]
    fn nhw_images_take_a_channel_axis_from_input_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let x: Vec<u8> = (0..2 * 3 * 4).map(|v| v as u8).collect();
        write(&path, &x, &[2, 3, 4], &[0, 1]);
        let s = spec(Some(vec![1.0]), Some(vec![2.0]));
        let d = Dataset::load(&path, &s, Some(&[1, 3, 4]), LossKind::CrossEntropy).unwrap();
        assert_eq!(d.x.shape(), &[2, 1, 3, 4]);
        assert_eq!(
            d.x.to_f32()[[1, 0, 2, 3]],
            ((23.0 * 0.5 - 1.0) / 2.0) as f32
        );
        // The same file flattened to [N, 12] reshapes the same way.
        write(&path, &x, &[2, 12], &[0, 1]);
        let e = Dataset::load(&path, &s, Some(&[1, 3, 4]), LossKind::CrossEntropy).unwrap();
        assert_eq!(e.x, d.x);
        let bad = Dataset::load(&path, &s, Some(&[1, 4, 4]), LossKind::CrossEntropy).unwrap_err();
        assert!(
            bad.to_string()
                .contains("`model.input_shape` is [1, 4, 4] (16 values)"),
            "{bad}"
        );
    }

    /// Reordering moves inputs and targets together, row by row.
    #[test]
    fn reorder_moves_each_sample_with_its_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let x: Vec<u8> = (0..7 * 3).map(|v| v as u8).collect();
        let y: Vec<i64> = (0..7).collect();
        write(&path, &x, &[7, 3], &y);
        let s = spec(None, None);
        let file = Dataset::load(&path, &s, None, LossKind::CrossEntropy).unwrap();
        let mut d = file.clone();
        d.reorder(DataOrder::File);
        assert_eq!(d.x, file.x);
        d.reorder(DataOrder::Shuffled { seed: 5 });
        let perm = order::permutation(7, 5);
        let Targets::Classes { ids, .. } = &d.targets else {
            panic!("classes")
        };
        for (k, &src) in perm.iter().enumerate() {
            assert_eq!(ids[k] as usize, src);
            assert_eq!(d.x.to_f32()[[k, 2]], file.x.to_f32()[[src, 2]]);
        }
        assert_ne!(d.x, file.x);
    }

    /// A two-layer MLP on 40 features (first Linear 40 → 16) and an evaluator over `d`.
    fn mlp<T: crate::net::Real>() -> crate::net::Model<T> {
        let src = r#"
[[layers]]
name = "fc1"
type = "linear"
in_features = 40
out_features = 16

[[layers]]
type = "relu"

[[layers]]
name = "fc2"
type = "linear"
in_features = 16
out_features = 3

[loss]
type = "cross_entropy"

[data]
train = "unused"
"#;
        let spec = crate::spec::Spec::parse(src, Path::new("t.toml")).unwrap();
        crate::net::Model::build(&spec, &[40]).unwrap()
    }

    fn theta<T: crate::net::Real>(m: &crate::net::Model<T>, seed: u64) -> Vec<Vec<T>> {
        let mut rng = crate::net::gradcheck::Rng::new(seed);
        m.params
            .iter()
            .map(|p| (0..p.numel()).map(|_| T::of(0.3 * rng.next())).collect())
            .collect()
    }

    /// `n` samples of 40 bytes, about `density` of them not 0, and labels 0..3.
    fn byte_set(dir: &Path, n: usize, density: f64) -> PathBuf {
        let path = dir.join("b.safetensors");
        let mut rng = crate::net::gradcheck::Rng::new(5);
        let x: Vec<u8> = (0..n * 40)
            .map(|_| {
                if (rng.next() + 1.0) / 2.0 < density {
                    ((rng.next() + 1.0) * 127.9) as u8
                } else {
                    0
                }
            })
            .collect();
        let y: Vec<i64> = (0..n as i64).map(|i| i % 3).collect();
        write(&path, &x, &[n, 40], &y);
        path
    }

    fn eval_bits<T: crate::net::Real>(
        m: &crate::net::Model<T>,
        d: &Dataset,
        th: &[Vec<T>],
    ) -> (f64, Vec<Vec<f64>>) {
        let e = crate::eval::Evaluator {
            model: m,
            data: d,
            chunk_size: 33,
        };
        let r = e.loss_and_grad(th).unwrap();
        (r.loss, r.grads)
    }

    /// A `uint8` set is held as bytes; with mostly non-zero bytes (no sparse products) its
    /// loss and gradient are the same bits as the same values held as f32, in f32 and f64.
    #[test]
    fn byte_held_set_gives_the_bits_of_the_f32_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = byte_set(dir.path(), 200, 0.9);
        let mut s = spec(None, None);
        s.scale = Some(1.0 / 255.0);
        let d = Dataset::load(&path, &s, None, LossKind::CrossEntropy).unwrap();
        let table = d.x.code_table().expect("held as bytes");
        assert!(table.density() > 0.85 && table.density() < 0.95);
        let mut f = d.clone();
        f.x = Inputs::F32(d.x.to_f32());
        assert_eq!(
            d.x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            f.x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let (m32, m64) = (mlp::<f32>(), mlp::<f64>());
        let (t32, t64) = (theta(&m32, 1), theta(&m64, 1));
        let bits = |r: (f64, Vec<Vec<f64>>)| -> Vec<u64> {
            std::iter::once(r.0.to_bits())
                .chain(r.1.iter().flatten().map(|v| v.to_bits()))
                .collect()
        };
        assert!(bits(eval_bits(&m32, &d, &t32)) == bits(eval_bits(&m32, &f, &t32)));
        assert!(bits(eval_bits(&m64, &d, &t64)) == bits(eval_bits(&m64, &f, &t64)));
        // Reordered together, still the same.
        let (mut d2, mut f2) = (d.clone(), f.clone());
        d2.reorder(DataOrder::Shuffled { seed: 3 });
        f2.reorder(DataOrder::Shuffled { seed: 3 });
        assert_eq!(d2.x.to_f32(), f2.x.to_f32());
    }

    /// A mostly-zero `uint8` set takes the first Linear's sparse products on the bytes (where
    /// the CPU has AVX-512BW): loss and gradient, plain and with the first layer shared over
    /// a Simpson step, agree with the f64 evaluation of the same values to f32 rounding.
    #[test]
    fn sparse_bytes_agree_with_the_dense_f64_evaluation() {
        let dir = tempfile::tempdir().unwrap();
        let path = byte_set(dir.path(), 300, 0.15);
        let mut s = spec(None, None);
        s.scale = Some(1.0 / 255.0);
        let d = Dataset::load(&path, &s, None, LossKind::CrossEntropy).unwrap();
        let table = d.x.code_table().expect("held as bytes");
        assert!(table.density() < 0.2);
        assert_eq!(
            crate::net::sparse::codes_pay(table, 40, 16),
            crate::net::sparse::available()
        );
        let (m32, m64) = (mlp::<f32>(), mlp::<f64>());
        let (t32, t64) = (theta(&m32, 2), theta(&m64, 2));
        let (l32, g32) = eval_bits(&m32, &d, &t32);
        let (l64, g64) = eval_bits(&m64, &d, &t64);
        assert!((l32 - l64).abs() < 1e-6, "{l32} vs {l64}");
        let scale = g64.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
        for (a, b) in g32.iter().flatten().zip(g64.iter().flatten()) {
            assert!((a - b).abs() < 1e-5 * scale, "{a} vs {b}");
        }
        // The shared first-layer step routes node 0 through the same products.
        let t1 = theta(&m32, 3);
        let mid: Vec<Vec<f32>> = t32
            .iter()
            .zip(&t1)
            .map(|(a, b)| a.iter().zip(b).map(|(a, b)| (a + b) * 0.5).collect())
            .collect();
        let e = crate::eval::Evaluator {
            model: &m32,
            data: &d,
            chunk_size: 64,
        };
        assert!(m32.first_layer_shareable());
        let sh = e
            .simpson_sharing_first(&t32, &mid, &t1, &mut None, false)
            .unwrap();
        let plain: Vec<crate::eval::LossGrad> = [&t32, &mid, &t1]
            .iter()
            .map(|t| e.loss_and_grad(t).unwrap())
            .collect();
        for (l, p) in sh.loss.iter().zip(&plain) {
            assert!((l - p.loss).abs() < 1e-6);
        }
        let w: Vec<f64> = (0..plain[0].grads.len())
            .flat_map(|j| {
                let p = &plain;
                (0..p[0].grads[j].len()).map(move |k| {
                    (p[0].grads[j][k] + 4.0 * p[1].grads[j][k] + p[2].grads[j][k]) / 6.0
                })
            })
            .collect();
        let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (a, b) in sh.weighted.iter().flatten().zip(&w) {
            assert!((a - b).abs() < 1e-5 * scale, "{a} vs {b}");
        }
    }

    /// `int8` values are held as bytes too (shifted by 128), with their values; a byte whose
    /// preprocessed value leaves the f32 range is refused at its first place, as for f32.
    #[test]
    fn int8_bytes_and_values_beyond_f32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.safetensors");
        let x: Vec<i8> = (0..2 * 12).map(|v| (v * 11 - 128) as i8).collect();
        let xb: Vec<u8> = x.iter().map(|&v| v as u8).collect();
        let yb: Vec<u8> = [0i64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            ("x", TensorView::new(Dtype::I8, vec![2, 3, 4], &xb).unwrap()),
            ("y", TensorView::new(Dtype::I64, vec![2], &yb).unwrap()),
        ];
        serialize_to_file(views, None, &path).unwrap();
        let s = spec(Some(vec![1.0, -2.0, 3.0]), Some(vec![2.0, 3.0, 0.5]));
        let d = Dataset::load(&path, &s, None, LossKind::CrossEntropy).unwrap();
        assert!(d.x.code_table().is_some());
        let dx = d.x.to_f32();
        for (i, (&got, &raw)) in dx.iter().zip(&x).enumerate() {
            let c = (i % 12) / 4;
            let want = ((raw as f64 * 0.5 - [1.0, -2.0, 3.0][c]) / [2.0, 3.0, 0.5][c]) as f32;
            assert_eq!(got.to_bits(), want.to_bits(), "value {i}");
        }
        // std 1e-300: every byte but the one of value 0 leaves the f32 range.
        let path = dir.path().join("u.safetensors");
        let mut x = vec![0u8; 3 * 10];
        x[17] = 4;
        x[25] = 9;
        write(&path, &x, &[3, 10], &[0, 1, 2]);
        let s = spec(None, Some(vec![1e-300]));
        let e = Dataset::load(&path, &s, None, LossKind::CrossEntropy)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'x' sample 1 (flat index 7) holds 4e0, beyond the f32 range"),
            "{e}"
        );
    }
}
