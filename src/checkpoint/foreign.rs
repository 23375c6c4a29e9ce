//! Checkpoints in formats other than safetensors, converted in memory to a safetensors
//! buffer that the rest of [`crate::checkpoint`] reads as usual: `torch.save` files
//! ([`super::torch_pickle`]: `.pt`, `.pth`, `.bin`, Lightning `.ckpt`, zip or legacy) and
//! Hugging Face `checkpoint-N/` directories ([`super::hf`]). [`open`] is the one dispatch
//! point; it also says what a file that is none of these looks like.

use super::torch_pickle::{self, RawTensor};
use crate::error::{LcaError, Result};
use std::path::{Path, PathBuf};

/// File extensions of `torch.save` checkpoints in a checkpoint directory.
pub const TORCH_EXTENSIONS: [&str; 4] = ["pt", "pth", "bin", "ckpt"];

/// A checkpoint converted to safetensors in memory.
pub struct Converted {
    pub bytes: Vec<u8>,
    /// Size of the source (the file, or the sum of a directory's weight files).
    pub source_len: u64,
    /// sha256 of the source (of the file; of its files' hashes for a directory).
    pub sha256: String,
}

fn err(path: &Path, msg: impl Into<String>) -> LcaError {
    LcaError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A safetensors buffer holding `tensors` (a later tensor of the same name replaces an
/// earlier one) with `metadata`.
pub fn assemble(tensors: &[RawTensor], metadata: &[(&str, String)]) -> Vec<u8> {
    let mut keep: Vec<&RawTensor> = Vec::new();
    for t in tensors {
        keep.retain(|k| k.name != t.name);
        keep.push(t);
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in &keep {
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.dtype,
                "shape": t.shape,
                "data_offsets": [offset, offset + t.data.len()],
            }),
        );
        offset += t.data.len();
    }
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut h = serde_json::to_vec(&header).expect("a JSON map serialises");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for t in keep {
        out.extend_from_slice(&t.data);
    }
    out
}

/// Whether the bytes start like a safetensors file (a header length that fits, then `{`).
fn looks_like_safetensors(b: &[u8]) -> bool {
    b.len() >= 10
        && u64::from_le_bytes(b[..8].try_into().unwrap()) <= (b.len() - 8) as u64
        && b[8] == b'{'
}

/// What a file that is no checkpoint looks like.
pub fn what_it_looks_like(b: &[u8]) -> String {
    if b.is_empty() {
        return "an empty file".into();
    }
    if torch_pickle::is_zip(b) {
        return match torch_pickle::read_zip(b) {
            Ok(sd) => format!(
                "a torch.save zip archive holding {} tensor(s)",
                sd.tensors.len()
            ),
            Err(e) => e,
        };
    }
    if torch_pickle::is_pickle(b) {
        return torch_pickle::describe_legacy(b);
    }
    if b.starts_with(b"\x93NUMPY") {
        return "a numpy .npy file".into();
    }
    if b.starts_with(b"\x89HDF") {
        return "an HDF5 file (e.g. Keras .h5)".into();
    }
    let head = &b[..b.len().min(512)];
    if let Ok(text) = std::str::from_utf8(head)
        && text.chars().all(|c| !c.is_control() || c.is_whitespace())
    {
        let first = text.lines().next().unwrap_or("").trim();
        let first: String = first.chars().take(60).collect();
        return if first.starts_with("version https://git-lfs") {
            "a Git LFS pointer (text), not the file it points to: run `git lfs pull`".into()
        } else {
            format!("text (first line: {first:?})")
        };
    }
    if b.len() >= 8 {
        let hlen = u64::from_le_bytes(b[..8].try_into().unwrap());
        let rest = (b.len() - 8) as u64;
        if hlen <= rest {
            return format!(
                "binary data; read as a safetensors file it would have a header length of {hlen} bytes, but no JSON header follows"
            );
        }
        return format!(
            "binary data, not a safetensors file (read as one, its header length would be {hlen} bytes, more than the file's {} bytes)",
            b.len()
        );
    }
    format!("{} byte(s) of binary data", b.len())
}

/// The checkpoint at `path` converted to safetensors, or `None` when it is a safetensors file
/// (read as before). A directory must be a Hugging Face checkpoint; a file must be a
/// safetensors or `torch.save` file, else the error says what it looks like.
pub fn open(path: &Path) -> Result<Option<Converted>> {
    if path.is_dir() {
        return open_hf(path).map(Some);
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Ok(None);
    }
    // Only regular files (a FIFO or device would block or never end), read whole: torch.save
    // archives are parsed from memory.
    let (mut fh, _) = crate::files::open_regular(path)?;
    let mut b = Vec::new();
    std::io::Read::read_to_end(&mut fh, &mut b).map_err(|e| LcaError::io(path, e))?;
    if looks_like_safetensors(&b) {
        return Ok(None);
    }
    let sd = if torch_pickle::is_zip(&b) {
        torch_pickle::read_zip(&b)
    } else if torch_pickle::is_pickle(&b) {
        torch_pickle::read_legacy(&b)
    } else {
        return Err(err(
            path,
            format!(
                "not a checkpoint lca reads (safetensors, torch.save, Hugging Face checkpoint-N/): it looks like {}",
                what_it_looks_like(&b)
            ),
        ));
    };
    let sd = sd.map_err(|e| err(path, format!("read as a torch.save file: {e}")))?;
    if sd.tensors.is_empty() {
        return Err(err(path, "torch.save file holds no tensors"));
    }
    let mut meta = vec![("lca.source", format!("torch.save, {}", sd.found_in))];
    if let Some(s) = sd.step {
        meta.push(("step", s.to_string()));
    }
    Ok(Some(Converted {
        bytes: assemble(&sd.tensors, &meta),
        source_len: b.len() as u64,
        sha256: crate::tensors::sha256_hex(&b),
    }))
}

fn open_hf(dir: &Path) -> Result<Converted> {
    if !super::hf::is_checkpoint_dir(dir) {
        return Err(err(
            dir,
            format!(
                "is a directory without {} (not a Hugging Face checkpoint)",
                super::hf::WEIGHT_FILES.join(", ")
            ),
        ));
    }
    let c = super::hf::read(dir).map_err(|e| err(dir, e))?;
    if c.tensors.is_empty() {
        return Err(err(dir, format!("{} holds no tensors", c.what)));
    }
    let (source_len, sha256) = files_len_and_hash(&c.files)?;
    let mut meta = vec![("lca.source", format!("Hugging Face checkpoint, {}", c.what))];
    if let Some(s) = c.step {
        meta.push(("step", s.to_string()));
    }
    Ok(Converted {
        bytes: assemble(&c.tensors, &meta),
        source_len,
        sha256,
    })
}

fn files_len_and_hash(files: &[PathBuf]) -> Result<(u64, String)> {
    let mut len = 0;
    let mut hashes = String::new();
    for f in files {
        len += std::fs::metadata(f).map_err(|e| LcaError::io(f, e))?.len();
        hashes.push_str(&crate::tensors::sha256_file(f).map_err(|e| LcaError::io(f, e))?);
    }
    Ok((len, crate::tensors::sha256_hex(hashes.as_bytes())))
}

/// The size of a checkpoint's source: a file's length, or the sum of a Hugging Face
/// checkpoint directory's weight files.
pub fn source_len(path: &Path) -> std::io::Result<u64> {
    if path.is_dir() {
        let files = hf_weight_files(path);
        return files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()))
            .sum();
    }
    std::fs::metadata(path).map(|m| m.len())
}

/// The sha256 of a checkpoint's source, as [`open`] and `load` report it.
pub fn source_sha256(path: &Path) -> std::io::Result<String> {
    if path.is_dir() {
        let mut hashes = String::new();
        for f in hf_weight_files(path) {
            hashes.push_str(&crate::tensors::sha256_file(&f)?);
        }
        return Ok(crate::tensors::sha256_hex(hashes.as_bytes()));
    }
    crate::tensors::sha256_file(path)
}

fn hf_weight_files(dir: &Path) -> Vec<PathBuf> {
    super::hf::weight_files(dir)
}

/// The Hugging Face checkpoint directories of `dir` (`checkpoint-N/` and any other
/// subdirectory holding weights), sorted by path.
pub fn hf_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LcaError::io(dir, e))? {
        let p = entry.map_err(|e| LcaError::io(dir, e))?.path();
        if super::hf::is_checkpoint_dir(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// The `torch.save` files of `dir` (by extension), sorted by path.
pub fn torch_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LcaError::io(dir, e))? {
        let p = entry.map_err(|e| LcaError::io(dir, e))?.path();
        if p.is_file()
            && p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| TORCH_EXTENSIONS.contains(&e))
        {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_hashes_of_sources_match_what_open_reports() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/torch_formats");
        for p in [
            "hf/checkpoint-1",
            "hf_sharded/checkpoint-1",
            "zip/step_1.pt",
            "legacy/ckpt_1.pth",
        ] {
            let p = dir.join(p);
            let c = open(&p).unwrap().expect("converted");
            assert_eq!(c.sha256, source_sha256(&p).unwrap(), "{}", p.display());
            assert_eq!(c.source_len, source_len(&p).unwrap(), "{}", p.display());
        }
        assert!(
            open(&dir.join("../mlp/ckpts/ckpt_1.safetensors"))
                .unwrap()
                .is_none()
        );
        assert_eq!(hf_dirs(&dir.join("hf")).unwrap().len(), 3);
        assert_eq!(torch_files(&dir.join("lightning")).unwrap().len(), 3);
    }
}
