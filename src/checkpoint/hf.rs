//! Hugging Face `Trainer` checkpoints: a `checkpoint-N/` directory holding
//! `model.safetensors`, a sharded `model.safetensors.index.json` (its `weight_map` names the
//! shard of every tensor), or `pytorch_model.bin` (a `torch.save` file). The step is
//! `trainer_state.json`'s `global_step`, else the number in the directory name.

use super::torch_pickle::RawTensor;
use std::path::{Path, PathBuf};

/// The weight files of a Trainer checkpoint directory, in the order looked for.
pub const WEIGHT_FILES: [&str; 3] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
];

/// Whether `dir` is a Trainer checkpoint directory (one of [`WEIGHT_FILES`] inside).
pub fn is_checkpoint_dir(dir: &Path) -> bool {
    dir.is_dir() && WEIGHT_FILES.iter().any(|f| dir.join(f).is_file())
}

/// What a checkpoint directory holds.
pub struct HfCheckpoint {
    pub tensors: Vec<RawTensor>,
    pub step: Option<u64>,
    /// The files read (their total size is the checkpoint's size).
    pub files: Vec<PathBuf>,
    pub what: String,
}

type R<T> = std::result::Result<T, String>;

fn read_file(p: &Path) -> R<Vec<u8>> {
    std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// The tensors of a safetensors buffer (checked by the safetensors library).
fn safetensors_tensors(p: &Path, bytes: &[u8], only: Option<&[&str]>) -> R<Vec<RawTensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("{}: not a valid safetensors file: {e}", p.display()))?;
    let mut out = Vec::new();
    for (name, t) in st.iter() {
        if only.is_some_and(|o| !o.contains(&name)) {
            continue;
        }
        out.push(RawTensor {
            name: name.to_string(),
            dtype: dtype_name(t.dtype()),
            shape: t.shape().to_vec(),
            data: t.data().to_vec(),
        });
    }
    Ok(out)
}

fn dtype_name(d: safetensors::Dtype) -> &'static str {
    use safetensors::Dtype::*;
    match d {
        F64 => "F64",
        F32 => "F32",
        F16 => "F16",
        BF16 => "BF16",
        I64 => "I64",
        I32 => "I32",
        I16 => "I16",
        I8 => "I8",
        U8 => "U8",
        U16 => "U16",
        U32 => "U32",
        U64 => "U64",
        BOOL => "BOOL",
        _ => "U8",
    }
}

/// The weight files [`read`] reads, listed without reading tensors (for sizes and hashes).
pub fn weight_files(dir: &Path) -> Vec<PathBuf> {
    let single = dir.join(WEIGHT_FILES[0]);
    if single.is_file() {
        return vec![single];
    }
    let index = dir.join(WEIGHT_FILES[1]);
    if index.is_file() {
        let mut files = vec![index.clone()];
        let shards = std::fs::read_to_string(&index)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("weight_map").cloned());
        if let Some(serde_json::Value::Object(m)) = shards {
            for f in m.values().filter_map(|f| f.as_str()) {
                let p = dir.join(f);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
        }
        return files;
    }
    vec![dir.join(WEIGHT_FILES[2])]
}

/// `trainer_state.json`'s `global_step`, if readable.
fn global_step(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("trainer_state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("global_step")?.as_u64()
}

/// Read a Trainer checkpoint directory.
pub fn read(dir: &Path) -> R<HfCheckpoint> {
    let step = global_step(dir).or_else(|| {
        dir.file_name()
            .and_then(|n| n.to_str())
            .and_then(super::last_integer)
    });
    let single = dir.join(WEIGHT_FILES[0]);
    if single.is_file() {
        let bytes = read_file(&single)?;
        return Ok(HfCheckpoint {
            tensors: safetensors_tensors(&single, &bytes, None)?,
            step,
            files: vec![single],
            what: "model.safetensors".into(),
        });
    }
    let index = dir.join(WEIGHT_FILES[1]);
    if index.is_file() {
        return read_sharded(dir, &index, step);
    }
    let bin = dir.join(WEIGHT_FILES[2]);
    let bytes = read_file(&bin)?;
    let sd = super::torch_pickle::read(&bytes).map_err(|e| format!("{}: {e}", bin.display()))?;
    Ok(HfCheckpoint {
        tensors: sd.tensors,
        step,
        files: vec![bin],
        what: "pytorch_model.bin".into(),
    })
}

fn read_sharded(dir: &Path, index: &Path, step: Option<u64>) -> R<HfCheckpoint> {
    let text = std::fs::read_to_string(index).map_err(|e| format!("{}: {e}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not valid JSON: {e}", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format!("{}: no `weight_map` object", index.display()))?;
    // shard file -> its tensor names, in first-seen order.
    let mut shards: Vec<(String, Vec<&str>)> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            format!(
                "{}: the shard of '{name}' is not a file name",
                index.display()
            )
        })?;
        if file.contains('/') || file.contains('\\') || file == ".." || file.is_empty() {
            return Err(format!(
                "{}: shard file name {file:?} (of '{name}') is not a plain file name in the checkpoint directory",
                index.display()
            ));
        }
        match shards.iter_mut().find(|(f, _)| f == file) {
            Some((_, names)) => names.push(name),
            None => shards.push((file.to_string(), vec![name])),
        }
    }
    let mut tensors = Vec::new();
    let mut files = vec![index.to_path_buf()];
    for (file, names) in &shards {
        let p = dir.join(file);
        let bytes = read_file(&p)?;
        let got = safetensors_tensors(&p, &bytes, Some(names))?;
        if let Some(missing) = names.iter().find(|n| !got.iter().any(|t| t.name == **n)) {
            return Err(format!(
                "{}: the index puts '{missing}' in this shard, which does not hold it",
                p.display()
            ));
        }
        tensors.extend(got);
        files.push(p);
    }
    Ok(HfCheckpoint {
        tensors,
        step,
        files,
        what: format!("model.safetensors.index.json ({} shard(s))", shards.len()),
    })
}
