//! The training set: `x` and `y` tensors from a `.safetensors` or `.npz` file, with the
//! preprocessing the spec declares (`scale`, then per-feature/per-channel `mean` and `std`).
//!
//! Inputs are held in memory as f32, preprocessed once. Targets are class indices (for
//! cross-entropy, from any integer dtype or integral floats) or float values (for MSE).

use crate::error::{LcaError, Result};
use crate::net::{LossKind, TargetsView};
use crate::spec::DataSpec;
use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};
use std::path::{Path, PathBuf};

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
    pub x: ArrayD<f32>,
    pub targets: Targets,
    /// Per-sample shape of the stored targets.
    pub y_shape: Vec<usize>,
}

/// A raw tensor read from the file: shape, values as f64 and whether the dtype is integral.
struct Raw {
    shape: Vec<usize>,
    values: Vec<f64>,
    integral: bool,
    dtype: String,
}

fn read_safetensors(path: &Path, bytes: &[u8], names: [&str; 2]) -> Result<[Raw; 2]> {
    let err = |msg: String| LcaError::Data {
        path: path.to_path_buf(),
        msg,
    };
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let get = |name: &str| -> Result<Raw> {
        let t = st.tensor(name).map_err(|_| {
            let mut have: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
            have.sort();
            err(format!(
                "has no tensor '{name}' (it holds: {}); set `data.x`/`data.y` in the spec",
                have.join(", ")
            ))
        })?;
        let values = crate::tensors::to_f64(&t)
            .map_err(|d| err(format!("tensor '{name}' has unsupported dtype {d}")))?;
        Ok(Raw {
            shape: t.shape().to_vec(),
            values,
            integral: crate::tensors::is_int_dtype(t.dtype()),
            dtype: format!("{:?}", t.dtype()),
        })
    };
    Ok([get(names[0])?, get(names[1])?])
}

fn read_npz(path: &Path, names: [&str; 2]) -> Result<[Raw; 2]> {
    use ndarray_npy::NpzReader;
    let err = |msg: String| LcaError::Data {
        path: path.to_path_buf(),
        msg,
    };
    let file = std::fs::File::open(path).map_err(|e| LcaError::io(path, e))?;
    let mut npz = NpzReader::new(file).map_err(|e| err(format!("not a valid .npz file: {e}")))?;
    let available = npz
        .names()
        .map_err(|e| err(format!("not a valid .npz file: {e}")))?;
    let mut get = |name: &str| -> Result<Raw> {
        let key = [name.to_string(), format!("{name}.npy")]
            .into_iter()
            .find(|k| available.contains(k))
            .ok_or_else(|| {
                err(format!(
                    "has no array '{name}' (it holds: {}); set `data.x`/`data.y` in the spec",
                    available.join(", ")
                ))
            })?;
        macro_rules! try_type {
            ($($ty:ty => $int:expr),*) => {{
                $(
                    if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<$ty>, IxDyn>(&key) {
                        return Ok(Raw {
                            shape: a.shape().to_vec(),
                            values: a.iter().map(|&v| v as f64).collect(),
                            integral: $int,
                            dtype: stringify!($ty).to_string(),
                        });
                    }
                )*
            }};
        }
        try_type!(f32 => false, f64 => false, u8 => true, i64 => true, i32 => true, i16 => true, i8 => true, u16 => true, u32 => true, u64 => true);
        Err(err(format!(
            "array '{name}' has an unsupported dtype (supported: float32/64, (u)int8-64)"
        )))
    };
    Ok([get(names[0])?, get(names[1])?])
}

/// `[N, T+1]` token ids → inputs (the first T columns) and targets (the last T).
fn split_tokens(tok: Raw, name: &str) -> std::result::Result<[Raw; 2], String> {
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
    for row in tok.values.chunks_exact(len) {
        xs.extend_from_slice(&row[..t]);
        ys.extend_from_slice(&row[1..]);
    }
    let part = |values| Raw {
        shape: vec![n, t],
        values,
        integral: true,
        dtype: tok.dtype.clone(),
    };
    Ok([part(xs), part(ys)])
}

impl Dataset {
    /// Check the inputs' values against the layers that read them directly (token ids within
    /// their embedding), naming the sample and position of the first offending value.
    pub fn check_inputs<T: crate::net::Real>(&self, model: &crate::net::Model<T>) -> Result<()> {
        model
            .check_input(self.x.view())
            .map_err(|m| LcaError::Data {
                path: self.path.clone(),
                msg: format!("inputs: {m}"),
            })
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
        let bytes = std::fs::read(path).map_err(|e| LcaError::io(path, e))?;
        let sha256 = crate::tensors::sha256_hex(&bytes);
        let names = match &spec.tokens {
            Some(t) => [t.as_str(), t.as_str()],
            None => [spec.x.as_str(), spec.y.as_str()],
        };
        let is_npz = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("npz"));
        let [x, y] = if is_npz {
            drop(bytes);
            read_npz(path, names)?
        } else {
            read_safetensors(path, &bytes, names)?
        };
        let [x, y] = match &spec.tokens {
            Some(name) => split_tokens(x, name).map_err(err)?,
            None => [x, y],
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
        match y.shape.first() {
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
        // NaN/Inf check, naming the sample.
        if let Some(i) = x.values.iter().position(|v| !v.is_finite()) {
            return Err(err(format!(
                "'{}' holds a non-finite value ({}) in sample {} (flat index {})",
                spec.x,
                x.values[i],
                i / per,
                i % per
            )));
        }
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
        let xs: Vec<f32> = x
            .values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = (i % per) / inner;
                ((v * scale - mean[c]) / std[c]) as f32
            })
            .collect();
        let mut shape = vec![n];
        shape.extend(&sample_shape);
        let xarr = ArrayD::from_shape_vec(IxDyn(&shape), xs).expect("sizes match");

        let y_shape = y.shape[1..].to_vec();
        let targets = match loss {
            LossKind::CrossEntropy => {
                let per_y: usize = y_shape.iter().product::<usize>().max(1);
                let mut ids = Vec::with_capacity(y.values.len());
                for (i, &v) in y.values.iter().enumerate() {
                    if !v.is_finite() || v.fract() != 0.0 || v < 0.0 || v > u32::MAX as f64 {
                        let at = if y_shape.is_empty() {
                            format!("sample {i}")
                        } else {
                            format!("sample {} position {}", i / per_y, i % per_y)
                        };
                        return Err(err(format!(
                            "'{}' must hold class indices (non-negative integers) for cross_entropy; {at} is {v}{}",
                            spec.y,
                            if y.integral { "" } else { " (float dtype)" }
                        )));
                    }
                    ids.push(v as u32);
                }
                let _ = &y.dtype;
                Targets::Classes {
                    ids,
                    per_sample: per_y,
                }
            }
            LossKind::Mse => {
                if let Some(i) = y.values.iter().position(|v| !v.is_finite()) {
                    let per_y: usize = y_shape.iter().product::<usize>().max(1);
                    return Err(err(format!(
                        "'{}' holds a non-finite value in sample {}",
                        spec.y,
                        i / per_y
                    )));
                }
                let mut s = vec![n];
                s.extend(&y_shape);
                Targets::Values(
                    ArrayD::from_shape_vec(IxDyn(&s), y.values.iter().map(|&v| v as f32).collect())
                        .expect("sizes match"),
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
                    Some((k, lead)) => (*k, lead),
                    None => return Err(err("the model output has no class axis".into())),
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

    /// Inputs and targets of samples `start..end`.
    pub fn chunk(&self, start: usize, end: usize) -> (ArrayViewD<'_, f32>, TargetsView<'_>) {
        let x = self.x.slice_axis(Axis(0), (start..end).into());
        let y = match &self.targets {
            Targets::Classes { ids, per_sample } => {
                TargetsView::Classes(&ids[start * per_sample..end * per_sample])
            }
            Targets::Values(v) => TargetsView::Values(v.slice_axis(Axis(0), (start..end).into())),
        };
        (x, y)
    }
}
