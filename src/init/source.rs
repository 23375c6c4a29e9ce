//! Reading the source: the checkpoint's tensor list and facts about the training set.

use super::*;
/// Read the tensor list of a checkpoint file, or of the first checkpoint of a directory.
pub fn read_source(path: &Path) -> Result<Source> {
    let file = if path.is_dir() {
        let files = checkpoint::scan(path)?;
        files[0].path.clone()
    } else {
        path.to_path_buf()
    };
    let (_, header) = checkpoint::read_header(&file)?;
    let mut tensors = Vec::new();
    let mut order = None;
    let mut aliases = Vec::new();
    for (name, v) in &header {
        if name == "__metadata__" {
            if let Some(m) = v.as_object() {
                order = ORDER_KEYS
                    .iter()
                    .find_map(|k| m.get(*k).and_then(|s| s.as_str()).map(parse_order));
                // save_model: {"<name left out>": "<name kept>"} for tied tensors.
                for (k, v) in m {
                    if let Some(kept) = v.as_str()
                        && !header.contains_key(k)
                        && k.contains('.')
                        && header.get(kept).is_some_and(|t| t.get("shape").is_some())
                    {
                        aliases.push((k.clone(), kept.to_string()));
                    }
                }
            }
            continue;
        }
        let dtype = v
            .get("dtype")
            .and_then(|d| d.as_str())
            .unwrap_or("?")
            .to_string();
        let shape = v
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_u64().map(|d| d as usize))
                    .collect()
            })
            .unwrap_or_default();
        tensors.push((name.clone(), dtype, shape));
    }
    if tensors.is_empty() {
        return Err(LcaError::Checkpoint {
            path: file,
            msg: "holds no tensors".into(),
        });
    }
    aliases.extend(identical_head(&file, &header, &tensors));
    Ok(Source {
        checkpoint: file,
        tensors,
        order,
        aliases,
    })
}

/// A head stored as a copy of an embedding (a `state_dict` of clones of tied tensors): a 2-D
/// `weight` of a module named like an embedding and the bias-free 2-D `weight` of a head
/// module (`lm_head`, `head`, ...) with the same dtype, shape and bytes.
pub(super) fn identical_head(
    file: &Path,
    header: &serde_json::Map<String, serde_json::Value>,
    tensors: &[(String, String, Vec<usize>)],
) -> Vec<(String, String)> {
    let module = |n: &str| n.rsplit_once('.').map(|(m, _)| m.to_string());
    let weight2d = |n: &str, s: &[usize]| n.ends_with(".weight") && s.len() == 2;
    let has_bias = |m: &str| tensors.iter().any(|t| t.0 == format!("{m}.bias"));
    let mut out = Vec::new();
    for (e, edt, es) in tensors {
        let Some(em) = module(e) else { continue };
        if !weight2d(e, es) || !embedding_like(last_component(&em)) || !is_float(edt) {
            continue;
        }
        for (h, hdt, hs) in tensors {
            let Some(hm) = module(h) else { continue };
            if h == e
                || !weight2d(h, hs)
                || hs != es
                || hdt != edt
                || has_bias(&hm)
                || component_class(last_component(&hm)) != 4
            {
                continue;
            }
            let bytes = |n: &str| -> Option<Vec<u8>> {
                use std::io::{Read, Seek, SeekFrom};
                let r = header.get(n)?.get("data_offsets")?.as_array()?;
                let (a, b) = (r.first()?.as_u64()?, r.get(1)?.as_u64()?);
                let mut f = std::fs::File::open(file).ok()?;
                let mut len = [0u8; 8];
                f.read_exact(&mut len).ok()?;
                let start = 8u64.checked_add(u64::from_le_bytes(len))?.checked_add(a)?;
                f.seek(SeekFrom::Start(start)).ok()?;
                let mut buf = vec![0; b.checked_sub(a)? as usize];
                f.read_exact(&mut buf).ok()?;
                Some(buf)
            };
            if let (Some(x), Some(y)) = (bytes(e), bytes(h))
                && x == y
            {
                out.push((e.clone(), h.clone()));
            }
        }
    }
    out
}

pub(super) fn parse_order(s: &str) -> Vec<String> {
    if let Ok(v) = serde_json::from_str::<Vec<String>>(s) {
        return v;
    }
    s.split([',', '\n'])
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

// ---------------------------------------------------------------------------------------
// The training set

/// What the draft needs to know about the training set.
#[derive(Debug, Clone)]
pub struct DataFacts {
    pub path: PathBuf,
    pub x: String,
    pub y: String,
    /// A tensor of token ids `[N, T+1]` read as `[data] tokens` (inputs its first T columns,
    /// targets its last T) instead of `x` and `y`.
    pub tokens: Option<String>,
    /// The tensor names were guessed (the file has no `x`/`y`).
    pub names_guessed: bool,
    pub samples: usize,
    pub sample_shape: Vec<usize>,
    /// Stored dtype of x (safetensors only).
    pub x_dtype: Option<String>,
    /// All inputs are whole numbers.
    pub x_integral: bool,
    pub x_min: f64,
    pub x_max: f64,
    /// Per-sample shape of y.
    pub y_shape: Vec<usize>,
    /// Largest label + 1 when y holds class indices.
    pub classes: Option<usize>,
    /// Held-out files next to the training set (`val`, `valid`, `validation`, `test`).
    pub validation: Option<PathBuf>,
}

impl DataFacts {
    /// Read the training set (as `analyze` does, without preprocessing).
    pub fn read(path: &Path) -> Result<DataFacts> {
        if !path.is_file() {
            return Err(LcaError::Data {
                path: path.to_path_buf(),
                msg: "not found (or not a file)".into(),
            });
        }
        let is_st = path.extension().is_some_and(|e| e == "safetensors");
        let (mut x, mut y, mut guessed, mut x_dtype) =
            ("x".to_string(), "y".to_string(), false, None);
        let mut tokens: Option<String> = None;
        // Integer 2-D tensors that may hold token ids.
        let mut int2d: Vec<String> = Vec::new();
        if is_st {
            let (_, header) = checkpoint::read_header(path).map_err(|e| LcaError::Data {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
            let mut names: Vec<(&String, usize)> = header
                .iter()
                .filter(|(k, _)| *k != "__metadata__")
                .map(|(k, v)| {
                    let dims = v
                        .get("shape")
                        .and_then(|s| s.as_array())
                        .map_or(0, |a| a.len());
                    (k, dims)
                })
                .collect();
            for (k, v) in header.iter().filter(|(k, _)| *k != "__metadata__") {
                let dtype = v.get("dtype").and_then(|d| d.as_str()).unwrap_or("F");
                let dims = v
                    .get("shape")
                    .and_then(|s| s.as_array())
                    .map_or(0, |a| a.len());
                if dims == 2 && (dtype.starts_with('I') || dtype.starts_with('U')) {
                    int2d.push(k.clone());
                }
            }
            let xy = header.contains_key("x") && header.contains_key("y");
            if !xy {
                tokens = ["tokens", "input_ids", "token_ids", "ids"]
                    .iter()
                    .find(|k| int2d.iter().any(|n| n == *k))
                    .map(|k| k.to_string());
            }
            if !xy && tokens.is_none() && names.len() == 2 {
                // Two tensors: the one with more dimensions (or named like an input) is x.
                names.sort_by_key(|(k, d)| {
                    let input_like = ["x", "input", "inputs", "images", "data", "tokens"]
                        .contains(&k.to_ascii_lowercase().as_str());
                    (std::cmp::Reverse(input_like), std::cmp::Reverse(*d))
                });
                x = names[0].0.clone();
                y = names[1].0.clone();
                guessed = true;
            }
            x_dtype = header
                .get(&x)
                .and_then(|v| v.get("dtype"))
                .and_then(|d| d.as_str())
                .map(|s| s.to_string());
        }
        let data_spec = |tokens: &Option<String>| -> Result<crate::spec::DataSpec> {
            let mut t = toml::Table::new();
            let mut set = |k: &str, v: &str| t.insert(k.into(), toml::Value::String(v.into()));
            set("train", &path.to_string_lossy());
            match tokens {
                Some(tk) => set("tokens", tk),
                None => {
                    set("x", &x);
                    set("y", &y)
                }
            };
            toml::Value::Table(t)
                .try_into()
                .map_err(|e| LcaError::Usage(e.to_string()))
        };
        let load = |tokens: &Option<String>| -> Result<Dataset> {
            let spec = data_spec(tokens)?;
            match Dataset::load(path, &spec, None, LossKind::CrossEntropy) {
                Ok(d) => Ok(d),
                Err(_) => Dataset::load(path, &spec, None, LossKind::Mse),
            }
        };
        let set = match load(&tokens) {
            Ok(d) => d,
            // Two tensors that do not pair as inputs and targets: the integer 2-D one may be
            // token ids.
            Err(e) if guessed && tokens.is_none() && int2d.contains(&x) => {
                tokens = Some(x.clone());
                load(&tokens).map_err(|_| e)?
            }
            Err(e) => return Err(e),
        };
        if let Some(t) = &tokens {
            x_dtype = None;
            x = t.clone();
        }
        let (mut lo, mut hi, mut integral) = (f64::INFINITY, f64::NEG_INFINITY, true);
        for &v in set.x.iter() {
            let v = v as f64;
            lo = lo.min(v);
            hi = hi.max(v);
            integral &= v.fract() == 0.0;
        }
        if let Some(d) = &x_dtype {
            integral = !d.starts_with('F') && d != "BF16";
        }
        let classes = match &set.targets {
            Targets::Classes { ids, .. } => ids.iter().max().map(|&m| m as usize + 1),
            Targets::Values(_) => None,
        };
        Ok(DataFacts {
            path: path.to_path_buf(),
            x,
            y,
            tokens,
            names_guessed: guessed,
            samples: set.len(),
            sample_shape: set.sample_shape().to_vec(),
            x_dtype,
            x_integral: integral,
            x_min: lo,
            x_max: hi,
            y_shape: set.y_shape.clone(),
            classes,
            validation: sibling_validation(path),
        })
    }
}

/// A held-out file next to the training set: `train` in the file name replaced by `val`,
/// `valid`, `validation` or `test`.
pub(super) fn sibling_validation(train: &Path) -> Option<PathBuf> {
    let name = train.file_name()?.to_str()?;
    if !name.contains("train") {
        return None;
    }
    ["val", "valid", "validation", "test"]
        .iter()
        .map(|r| train.with_file_name(name.replacen("train", r, 1)))
        .find(|p| p.is_file())
}

/// How the spec refers to `path`: relative to the spec's directory when that needs at most
/// two `..`, else absolute.
pub(super) fn spec_path(path: &Path, spec_dir: &Path) -> PathBuf {
    let abs = |p: &Path| std::fs::canonicalize(p).ok();
    let (Some(target), Some(base)) = (abs(path), abs(spec_dir)) else {
        return path.to_path_buf();
    };
    let t: Vec<_> = target.components().collect();
    let b: Vec<_> = base.components().collect();
    let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let ups = b.len() - common;
    // Sharing only the root (or one top directory) is no reason for a relative path.
    if ups > 2 || common <= 1 {
        return target;
    }
    let mut rel = PathBuf::new();
    for _ in 0..ups {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c);
    }
    rel
}
