//! The checkpoint directory: every `*.safetensors` file in it is one checkpoint (other
//! formats — `torch.save` files, Hugging Face `checkpoint-N/` folders — are converted in
//! memory by [`foreign::open`], the one dispatch point; docs/checkpoints.md).
//!
//! The step of a file comes from its header metadata key `step` when present, else from the
//! last integer in its file name (`ckpt_10.safetensors` → 10); files are ordered by step.
//! [`scan`] reads headers only, and checks them completely (dtypes, shapes, that every
//! tensor's byte range lies inside the file and that no two overlap), so a damaged file is
//! reported before any computation. [`load`] reads one file's parameters as f32 (F32, F64,
//! F16 and BF16 are converted), checking names and shapes against the model.
//! [`describe_bytes`] and [`load_bytes`] do the same on a buffer (used by the fuzz targets).

use crate::error::{LcaError, Result};
use crate::net::ParamInfo;
use crate::safetensors_header::{Header, read_checked};
pub use crate::safetensors_header::{
    HeaderTensor, MAX_HEADER_BYTES, read_file_header, read_header,
};
use std::path::{Path, PathBuf};

pub mod foreign;
pub mod hf;
pub mod run_dir;
pub mod torch_pickle;
pub use foreign::{source_len, source_sha256};

/// Where a checkpoint's step number came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepSource {
    Metadata,
    FileName,
}

/// A checkpoint file found by [`scan`].
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    pub path: PathBuf,
    pub step: u64,
    pub step_source: StepSource,
    /// File size when scanned (to notice files still being written).
    pub len: u64,
    /// Which file it was when scanned (to notice a file replaced by another of the same
    /// size); `None` for a checkpoint described from memory.
    pub identity: Option<crate::files::FileIdentity>,
    pub tensors: Vec<HeaderTensor>,
}

/// Parameters of one checkpoint, in model order.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub theta: Vec<Vec<f32>>,
    pub sha256: String,
    /// Tensors present in the file that the model does not use (buffers, other heads).
    pub unused: Vec<String>,
}

fn ck_err(path: &Path, msg: impl Into<String>) -> LcaError {
    LcaError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The last run of decimal digits in a file stem.
pub fn last_integer(stem: &str) -> Option<u64> {
    last_digits(stem)?.parse().ok()
}

/// The last run of decimal digits in a file stem, as text.
fn last_digits(stem: &str) -> Option<&str> {
    let bytes = stem.as_bytes();
    let end = bytes.iter().rposition(|b| b.is_ascii_digit())? + 1;
    let start = bytes[..end]
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    Some(&stem[start..end])
}

/// Build a [`CheckpointFile`] from a checked header: find the step.
fn describe_header(
    path: &Path,
    len: u64,
    header: &Header,
    tensors: Vec<HeaderTensor>,
) -> Result<CheckpointFile> {
    let meta_step = header
        .get("__metadata__")
        .and_then(|m| m.get("step"))
        .map(|s| match s {
            serde_json::Value::String(s) => s.trim().parse::<u64>().map_err(|_| s.clone()),
            other => Err(other.to_string()),
        });
    let (step, step_source) = match meta_step {
        Some(Ok(s)) => (s, StepSource::Metadata),
        Some(Err(bad)) => {
            return Err(ck_err(
                path,
                format!("metadata `step` is {bad:?}, not a non-negative integer"),
            ));
        }
        None => {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            match last_integer(stem) {
                Some(s) => (s, StepSource::FileName),
                None if last_digits(stem).is_some() => {
                    return Err(ck_err(
                        path,
                        format!(
                            "no step: the header has no `step` metadata and the number in the file name ({}) is too large for a step (at most {})",
                            last_digits(stem).unwrap_or_default(),
                            u64::MAX
                        ),
                    ));
                }
                None => {
                    return Err(ck_err(
                        path,
                        "no step: the header has no `step` metadata and the file name contains no number",
                    ));
                }
            }
        }
    };
    Ok(CheckpointFile {
        path: path.to_path_buf(),
        step,
        step_source,
        len,
        identity: None,
        tensors,
    })
}

/// Describe a checkpoint file from its header (the tensor data is not read).
pub fn describe(path: &Path) -> Result<CheckpointFile> {
    if let Some(c) = foreign::open(path)? {
        let mut f = describe_bytes(path, &c.bytes)?;
        f.len = c.source_len;
        return Ok(f);
    }
    let (mut f, meta) = crate::files::open_regular(path)?;
    let len = meta.len();
    let (_, header, tensors) = read_checked(path, len, &mut f)?;
    let mut c = describe_header(path, len, &header, tensors)?;
    c.identity = Some(crate::files::FileIdentity::of(&meta));
    Ok(c)
}

/// Check that `bytes` form a valid safetensors file (the header checks of [`describe`],
/// without looking for a step) and return its tensors.
pub fn check_bytes(path: &Path, bytes: &[u8]) -> Result<Vec<HeaderTensor>> {
    Ok(read_checked(path, bytes.len() as u64, &mut &bytes[..])?.2)
}

/// [`describe`] a checkpoint held in memory; `path` names it in messages and may give the
/// step.
pub fn describe_bytes(path: &Path, bytes: &[u8]) -> Result<CheckpointFile> {
    let len = bytes.len() as u64;
    let (_, header, tensors) = read_checked(path, len, &mut &bytes[..])?;
    describe_header(path, len, &header, tensors)
}

/// List the checkpoints of a directory, ordered by step.
pub fn scan(dir: &Path) -> Result<Vec<CheckpointFile>> {
    let paths = list(dir)?;
    if paths.is_empty() {
        return Err(ck_err(
            dir,
            "contains no *.safetensors files (nor torch.save files *.pt, *.pth, *.bin, *.ckpt, nor Hugging Face checkpoint-N/ folders)",
        ));
    }
    let mut files: Vec<CheckpointFile> =
        paths.iter().map(|p| describe(p)).collect::<Result<_>>()?;
    files.sort_by_key(|f| f.step);
    for w in files.windows(2) {
        if w[0].step == w[1].step {
            return Err(ck_err(
                dir,
                format!(
                    "step {} appears twice: {} and {}",
                    w[0].step,
                    w[0].path.display(),
                    w[1].path.display()
                ),
            ));
        }
    }
    Ok(files)
}

/// The `*.safetensors` files of a directory (not recursive), sorted by path.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(dir).map_err(|e| LcaError::io(dir, e))?;
    if !meta.is_dir() {
        return Err(ck_err(dir, "is not a directory of checkpoints"));
    }
    let hf = foreign::hf_dirs(dir)?;
    if !hf.is_empty() {
        return Ok(hf);
    }
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LcaError::io(dir, e))? {
        let entry = entry.map_err(|e| LcaError::io(dir, e))?;
        let p = entry.path();
        if !p.extension().is_some_and(|e| e == "safetensors") {
            continue;
        }
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => {}
            // Not a regular file (a FIFO, a device): `describe` refuses it by name.
            Ok(_) => paths.push(p),
            // A symbolic link to nothing, or a loop of them, named like a checkpoint.
            Err(e) => {
                let what = if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_symlink()) {
                    "is a symbolic link that leads to no file (dangling, or a loop)"
                } else {
                    "cannot be read"
                };
                return Err(ck_err(&p, format!("{what}: {e}")));
            }
        }
    }
    paths.sort();
    if paths.is_empty() {
        return foreign::torch_files(dir);
    }
    Ok(paths)
}

/// Pick checkpoints with `first <= step <= last`, then every `every`-th of those.
pub fn select(
    files: Vec<CheckpointFile>,
    first: Option<u64>,
    last: Option<u64>,
    every: usize,
) -> Result<Vec<CheckpointFile>> {
    if every == 0 {
        return Err(LcaError::Usage("--every must be at least 1".into()));
    }
    let in_range: Vec<CheckpointFile> = files
        .into_iter()
        .filter(|f| first.is_none_or(|a| f.step >= a) && last.is_none_or(|b| f.step <= b))
        .collect();
    Ok(in_range.into_iter().step_by(every).collect())
}

/// A hint for a missing tensor `wanted` when the file holds the same name under another
/// prefix (e.g. `module.fc1.weight` for `fc1.weight`): empty when there is none.
pub fn prefix_hint<'a>(wanted: &str, names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .find(|n| n.ends_with(wanted) || wanted.ends_with(*n))
        .map(|n| format!(" (the file has '{n}': check `model.prefix`)"))
        .unwrap_or_default()
}

/// Load one checkpoint's parameters, in model order, as f32.
pub fn load(file: &CheckpointFile, params: &[ParamInfo]) -> Result<Loaded> {
    let path = &file.path;
    if let Some(c) = foreign::open(path)? {
        if c.source_len != file.len {
            return Err(ck_err(path, "changed size while lca was running"));
        }
        let mut loaded = load_bytes(file, &c.bytes, params)?;
        loaded.sha256 = c.sha256;
        return Ok(loaded);
    }
    let (f, meta) = crate::files::open_regular(path)?;
    let now = crate::files::FileIdentity::of(&meta);
    let mut bytes = Vec::with_capacity(meta.len().min(file.len) as usize);
    {
        use std::io::Read;
        // Never more than the size it had when listed (a file still growing is refused below).
        f.take(file.len.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| LcaError::io(path, e))?;
    }
    if bytes.len() as u64 != file.len || meta.len() != file.len {
        return Err(ck_err(
            path,
            format!(
                "changed size while lca was running ({} bytes when listed, {} now): is it still being written?",
                file.len,
                if meta.len() != file.len {
                    meta.len()
                } else {
                    bytes.len() as u64
                }
            ),
        ));
    }
    if let Some(then) = file.identity
        && then != now
    {
        return Err(ck_err(
            path,
            "was replaced or rewritten since lca listed it (same size, but another file or a \
             newer modification): its content may differ from what was checked; restore it, or \
             run again",
        ));
    }
    load_bytes(file, &bytes, params)
}

/// [`load`] from a buffer holding the file's bytes.
pub fn load_bytes(file: &CheckpointFile, bytes: &[u8], params: &[ParamInfo]) -> Result<Loaded> {
    let path = &file.path;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| ck_err(path, format!("not a valid safetensors file: {e}")))?;
    let mut theta = Vec::with_capacity(params.len());
    for p in params {
        // A tied parameter may be stored under any of its names (save_model keeps one).
        let mut stored = std::iter::once(&p.name)
            .chain(&p.aliases)
            .filter(|n| st.tensor(n).is_ok());
        let found = stored.next().unwrap_or(&p.name);
        let also: Vec<&String> = stored.collect();
        let t = st.tensor(found).map_err(|_| {
            let hint = prefix_hint(&p.name, st.names());
            let tied = if p.aliases.is_empty() {
                String::new()
            } else {
                format!(" or its tied name(s) {}", p.aliases.join(", "))
            };
            ck_err(
                path,
                format!(
                    "missing tensor '{}'{tied} (expected shape {:?}){hint}",
                    p.name, p.shape
                ),
            )
        })?;
        if !crate::tensors::is_param_dtype(t.dtype()) {
            return Err(ck_err(
                path,
                format!(
                    "tensor '{}' has dtype {:?}; parameters must be F32, F64, F16 or BF16",
                    found,
                    t.dtype()
                ),
            ));
        }
        if t.shape() != p.shape.as_slice() {
            return Err(ck_err(
                path,
                format!(
                    "tensor '{}' has shape {:?} but the spec expects {:?}",
                    found,
                    t.shape(),
                    p.shape
                ),
            ));
        }
        let v = crate::tensors::to_f64(&t)
            .map_err(|d| ck_err(path, format!("tensor '{found}': unsupported dtype {d}")))?;
        // Values are computed in f32: an F64 value beyond its range is as unusable as Inf.
        if let Some(i) = v.iter().position(|&x| !(x as f32).is_finite()) {
            let what = if v[i].is_finite() {
                format!(
                    "{:e} (beyond the f32 range the evaluator computes in)",
                    v[i]
                )
            } else {
                v[i].to_string()
            };
            return Err(ck_err(
                path,
                format!("tensor '{found}' holds {what} at flat index {i}"),
            ));
        }
        for other in also {
            let o = st
                .tensor(other)
                .map_err(|_| ck_err(path, "unreadable tensor"))?;
            let same = o.shape() == t.shape()
                && crate::tensors::to_f64(&o).is_ok_and(|w| {
                    w.iter()
                        .zip(&v)
                        .all(|(a, b)| a == b || (a.is_nan() && b.is_nan()))
                });
            if !same {
                return Err(ck_err(
                    path,
                    format!(
                        "tensors '{found}' and '{other}' hold different values, but the spec ties them into one parameter"
                    ),
                ));
            }
        }
        theta.push(v.into_iter().map(|x| x as f32).collect());
    }
    let mut unused: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !params.iter().any(|p| p.answers_to(n)))
        .map(|s| s.to_string())
        .collect();
    unused.sort();
    Ok(Loaded {
        theta,
        sha256: crate::tensors::sha256_hex(bytes),
        unused,
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    fn raw(header: &str, data: &[u8]) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn duplicate_names_and_fields_are_refused_like_safetensors_does() {
        let p = Path::new("ckpt_3.safetensors");
        let ok = r#"{"fc.bias":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert_eq!(describe_bytes(p, &raw(ok, &[0; 8])).unwrap().step, 3);
        // Found by the fuzzer: serde_json keeps the last of two equal keys, the safetensors
        // library refuses the file.
        let dup = r#"{"fc.bias":{"data_offsets":[0,8]},"fc.bias":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let e = describe_bytes(p, &raw(dup, &[0; 8]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'fc.bias' twice"), "{e}");
        let dup_field =
            r#"{"fc.bias":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let e = describe_bytes(p, &raw(dup_field, &[0; 8]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid safetensors header"), "{e}");
        assert!(e.contains("dtype"), "{e}");
    }

    #[test]
    fn last_integer_of_names() {
        assert_eq!(last_integer("ckpt_10"), Some(10));
        assert_eq!(last_integer("run3_step_0042"), Some(42));
        assert_eq!(last_integer("model"), None);
        assert_eq!(last_integer("7"), Some(7));
    }
}
