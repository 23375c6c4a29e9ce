//! `lca init`: draft a model spec (`model.toml`) from one checkpoint, and optionally the
//! training set.
//!
//! A `state_dict` stores parameters, not the forward pass. The draft therefore recognises
//! what the tensors tell (PyTorch's module patterns: `X.weight` 2-D → `nn.Linear`, 4-D →
//! `nn.Conv2d`, BatchNorm's `weight/bias/running_mean/running_var/num_batches_tracked`, a 1-D
//! `weight`/`bias` pair → LayerNorm, embedding names, attention layouts), orders the layers,
//! chains their sizes, and writes everything it had to guess — activations, pooling, strides
//! and padding, residual wiring, the loss, preprocessing — as lines starting with
//! `# TODO(lca init):` with the most likely choice filled in. A layer type this build of `lca`
//! cannot evaluate is written as a commented-out block, so the file always parses. The whole
//! procedure is described in `docs/init.md`.
//!
//! ```
//! use lca::init::{Source, draft_from};
//! let tensors = vec![
//!     ("fc1.weight".to_string(), "F32".to_string(), vec![32, 64]),
//!     ("fc1.bias".to_string(), "F32".to_string(), vec![32]),
//!     ("fc2.weight".to_string(), "F32".to_string(), vec![10, 32]),
//!     ("fc2.bias".to_string(), "F32".to_string(), vec![10]),
//! ];
//! let src = Source { checkpoint: "ckpt_0.safetensors".into(), tensors, order: None, aliases: vec![] };
//! let d = draft_from(&src, None, std::path::Path::new("model.toml")).unwrap();
//! assert!(d.text.contains("in_features = 64"));
//! assert!(d.text.contains("type = \"relu\""));
//! lca::spec::Spec::parse(&d.text, std::path::Path::new("model.toml")).unwrap();
//! ```

use crate::checkpoint;
use crate::data::{Dataset, Targets};
use crate::error::{LcaError, Result};
use crate::net::{LossKind, Model};
use crate::spec::{LayerKind, Spec};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The marker that starts every line of the draft that needs a human decision.
pub const TODO: &str = "# TODO(lca init):";

/// What to draft from and where to write.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// A checkpoint file, or a directory of checkpoints (its first checkpoint is used).
    pub ckpt: PathBuf,
    /// The training set, to infer the input shape, preprocessing, loss and classes.
    pub data: Option<PathBuf>,
    /// The spec file to write.
    pub out: PathBuf,
    /// Replace an existing file.
    pub force: bool,
}

/// The tensors of one checkpoint: `(name, dtype, shape)` as in the safetensors header, and
/// the `state_dict` order when the file's metadata records one.
#[derive(Debug, Clone)]
pub struct Source {
    pub checkpoint: PathBuf,
    pub tensors: Vec<(String, String, Vec<usize>)>,
    pub order: Option<Vec<String>>,
    /// Names of one shared (tied) tensor, `(name, other name)`: a name that
    /// `safetensors.torch.save_model` left out and recorded in the metadata with the name it
    /// kept, or two stored tensors with identical bytes that look like an embedding and a
    /// head.
    pub aliases: Vec<(String, String)>,
}

/// A drafted spec.
#[derive(Debug, Clone)]
pub struct Draft {
    /// The checkpoint the draft was made from.
    pub checkpoint: PathBuf,
    /// The TOML text.
    pub text: String,
    /// 1-based line and text of every `TODO(lca init)` note.
    pub todos: Vec<(usize, String)>,
    /// Layers with parameters written as real layers: (name, short description).
    pub layers: Vec<(String, String)>,
    /// Modules written as commented-out blocks (unsupported or unrecognised).
    pub skipped: Vec<String>,
    /// With data: whether the draft builds a model that fits the data (`Err` holds the first
    /// problem, as `lca inspect` would report it).
    pub builds: Option<std::result::Result<(), String>>,
}

/// Metadata keys that may hold the `state_dict` order (a JSON array of names, or names
/// separated by commas or newlines).
pub const ORDER_KEYS: [&str; 3] = ["order", "state_dict_order", "keys"];

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
fn identical_head(
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

fn parse_order(s: &str) -> Vec<String> {
    if let Ok(v) = serde_json::from_str::<Vec<String>>(s) {
        return v;
    }
    s.split([',', '\n'])
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

/// Draft a spec and write it atomically to `opts.out` (refusing to replace an existing file
/// unless `opts.force`).
pub fn init(opts: &InitOptions) -> Result<Draft> {
    if opts.out.is_dir() {
        return Err(LcaError::Output {
            path: opts.out.clone(),
            msg: "is a directory; -o names the spec file to write".into(),
        });
    }
    if opts.out.exists() && !opts.force {
        return Err(LcaError::Output {
            path: opts.out.clone(),
            msg: "exists; lca init never replaces a file unless --force is given".into(),
        });
    }
    let src = read_source(&opts.ckpt)?;
    let data = match &opts.data {
        Some(p) => Some(DataFacts::read(p)?),
        None => None,
    };
    let draft = draft_from(&src, data.as_ref(), &opts.out)?;
    write_atomically(&opts.out, draft.text.as_bytes(), opts.force)?;
    Ok(draft)
}

/// Write `bytes` to `path` through a temporary file in the same directory, renamed into
/// place; without `replace`, an existing file is never replaced (checked again at the end).
pub fn write_atomically(path: &Path, bytes: &[u8], replace: bool) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(LcaError::Output {
            path: path.to_path_buf(),
            msg: format!("directory {} does not exist", dir.display()),
        });
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.{}.partial", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| LcaError::io(&tmp, e))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| LcaError::io(&tmp, e))?;
        drop(f);
        if replace {
            std::fs::rename(&tmp, path).map_err(|e| LcaError::io(path, e))
        } else {
            // A hard link fails if the target appeared meanwhile: never replace a file.
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(LcaError::Output {
                    path: path.to_path_buf(),
                    msg: "exists; not replaced (use --force)".into(),
                }),
                Err(_) if !path.exists() => {
                    std::fs::rename(&tmp, path).map_err(|e| LcaError::io(path, e))
                }
                Err(e) => Err(LcaError::io(path, e)),
            }
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// What `lca init` prints after writing the draft: the layers, every TODO line with its line
/// number, and whether the draft builds for the data.
pub fn describe(d: &Draft, out: &Path) -> String {
    let mut s = format!(
        "wrote {}: {} layer(s) with parameters{}\n",
        out.display(),
        d.layers.len(),
        if d.layers.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                d.layers
                    .iter()
                    .map(|(n, w)| format!("{n}: {w}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    if !d.skipped.is_empty() {
        s.push_str(&format!(
            "left out (written as comments): {}\n",
            d.skipped.join(", ")
        ));
    }
    s.push_str(&format!(
        "{} TODO(lca init) note(s) to review:\n",
        d.todos.len()
    ));
    for (line, text) in &d.todos {
        let mut t: String = text.chars().take(100).collect();
        if t.len() < text.len() {
            t.push('…');
        }
        s.push_str(&format!("  {}:{line}: {t}\n", out.display()));
    }
    let dir = match d.checkpoint.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let next = format!("lca inspect {} --spec {}", dir.display(), out.display());
    match &d.builds {
        Some(Ok(())) => s.push_str(&format!(
            "the draft builds a model that fits the data; next: review the TODO lines, then {next}\n"
        )),
        Some(Err(e)) => s.push_str(&format!(
            "the draft does not fit the data yet (resolve the TODO lines, then {next}):\n  {e}\n"
        )),
        None => s.push_str(&format!(
            "without --data the draft was not checked against a training set; next: review the TODO lines, then {next}\n"
        )),
    }
    s
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
            let names = match tokens {
                Some(t) => format!("tokens = {}", quote(t)),
                None => format!("x = {}\ny = {}", quote(&x), quote(&y)),
            };
            toml::from_str(&format!(
                "train = {}\n{names}\n",
                quote(&path.to_string_lossy())
            ))
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
fn sibling_validation(train: &Path) -> Option<PathBuf> {
    let name = train.file_name()?.to_str()?;
    if !name.contains("train") {
        return None;
    }
    ["val", "valid", "validation", "test"]
        .iter()
        .map(|r| train.with_file_name(name.replacen("train", r, 1)))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------------------
// Recognising modules

/// One tensor of the checkpoint.
#[derive(Debug, Clone)]
struct Tensor {
    /// Full name, as in the file.
    full: String,
    dtype: String,
    shape: Vec<usize>,
}

/// What a module's tensors say it is.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Linear {
        inp: usize,
        out: usize,
        bias: bool,
    },
    Conv2d {
        /// Input channels per group (`weight.shape[1]`).
        in_per_group: usize,
        out: usize,
        kernel: [usize; 2],
        bias: bool,
    },
    BatchNorm {
        c: usize,
        affine: bool,
        running: bool,
    },
    LayerNorm {
        c: usize,
        bias: bool,
    },
    Embedding {
        num: usize,
        dim: usize,
        /// A learned position table (`wpe`, `pos_emb`, `position_embeddings`).
        positional: bool,
    },
    /// Multi-head self-attention: `nn.MultiheadAttention` (`in_proj_weight`, `out_proj`) or
    /// nanoGPT's `CausalSelfAttention` (`c_attn`, `c_proj`).
    Attention {
        mha: bool,
        c: usize,
        bias: bool,
    },
    /// Recognised but not supported, or not recognised: why.
    Other {
        what: String,
    },
}

#[derive(Debug, Clone)]
struct Module {
    /// Module path without the prefix (`features.0`), the layer name.
    path: String,
    tensors: Vec<Tensor>,
    kind: Kind,
    /// Position in the metadata order, when there is one.
    rank: Option<usize>,
    /// Tied parameters: `(suffix, name of the tensor it shares, without the prefix)`, set on
    /// the later of two modules that share a tensor.
    tied: Vec<(String, String)>,
}

fn is_float(dtype: &str) -> bool {
    matches!(dtype, "F32" | "F64" | "F16" | "BF16")
}

fn last_component(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

fn embedding_like(component: &str) -> bool {
    let c = component.to_ascii_lowercase();
    c == "wte" || c == "wpe" || c.contains("emb")
}

/// A learned position table: `wpe` (nanoGPT, GPT-2), `pos_emb`, `position_embeddings`.
fn positional_like(component: &str) -> bool {
    let c = component.to_ascii_lowercase();
    embedding_like(&c) && (c == "wpe" || c.contains("pos"))
}

fn classify(path: &str, t: &BTreeMap<String, Tensor>) -> Kind {
    let shape = |k: &str| t.get(k).map(|x| x.shape.clone());
    let keys: Vec<&str> = t
        .keys()
        .map(|k| k.as_str())
        .filter(|k| *k != "num_batches_tracked")
        .collect();
    let only = |allowed: &[&str]| keys.iter().all(|k| allowed.contains(k));
    if let Some(bad) = t
        .values()
        .find(|x| !is_float(&x.dtype) && !x.full.ends_with("num_batches_tracked"))
    {
        return Kind::Other {
            what: format!(
                "tensor '{}' has dtype {}, not a float parameter",
                bad.full, bad.dtype
            ),
        };
    }
    if keys.contains(&"in_proj_weight") {
        if let Some(s) = shape("in_proj_weight")
            && s.len() == 2
            && s[0] == 3 * s[1]
            && only(&[
                "in_proj_weight",
                "in_proj_bias",
                "out_proj.weight",
                "out_proj.bias",
            ])
        {
            return Kind::Attention {
                mha: true,
                c: s[1],
                bias: keys.contains(&"in_proj_bias"),
            };
        }
        return Kind::Other {
            what: "an attention layer with an unusual in_proj_weight".into(),
        };
    }
    if keys.contains(&"c_attn.weight")
        && let Some(s) = shape("c_attn.weight")
        && s.len() == 2
        && s[0] == 3 * s[1]
    {
        let bias = keys.contains(&"c_attn.bias");
        if only(&[
            "c_attn.weight",
            "c_attn.bias",
            "c_proj.weight",
            "c_proj.bias",
        ]) && keys.contains(&"c_proj.bias") == bias
        {
            return Kind::Attention {
                mha: false,
                c: s[1],
                bias,
            };
        }
        return Kind::Other {
            what: "an attention layer with an unusual set of tensors".into(),
        };
    }
    if keys.contains(&"running_mean") && keys.contains(&"running_var") {
        let c = shape("running_mean").map_or(0, |s| s.iter().product());
        let affine = keys.contains(&"weight");
        if only(&["weight", "bias", "running_mean", "running_var"]) {
            return Kind::BatchNorm {
                c,
                affine,
                running: true,
            };
        }
    }
    let w = shape("weight");
    let bias_ok = |n: usize| shape("bias").is_none_or(|b| b == [n]);
    match w.as_deref() {
        Some([c]) if only(&["weight", "bias"]) && bias_ok(*c) => {
            let name = last_component(path).to_ascii_lowercase();
            if name.contains("bn") || name.contains("batch") {
                Kind::BatchNorm {
                    c: *c,
                    affine: true,
                    running: false,
                }
            } else {
                Kind::LayerNorm {
                    c: *c,
                    bias: keys.contains(&"bias"),
                }
            }
        }
        Some([a, b]) if only(&["weight", "bias"]) && bias_ok(*a) => {
            if embedding_like(last_component(path)) && !keys.contains(&"bias") {
                Kind::Embedding {
                    num: *a,
                    dim: *b,
                    positional: positional_like(last_component(path)),
                }
            } else {
                Kind::Linear {
                    inp: *b,
                    out: *a,
                    bias: keys.contains(&"bias"),
                }
            }
        }
        Some([o, i, kh, kw]) if only(&["weight", "bias"]) && bias_ok(*o) => Kind::Conv2d {
            in_per_group: *i,
            out: *o,
            kernel: [*kh, *kw],
            bias: keys.contains(&"bias"),
        },
        Some([o, i, k]) if only(&["weight", "bias"]) => Kind::Other {
            what: format!("nn.Conv1d({i}·groups, {o}, kernel_size={k}) (weight [{o}, {i}, {k}])"),
        },
        Some([o, i, a, b, c]) if only(&["weight", "bias"]) => Kind::Other {
            what: format!("nn.Conv3d({i}·groups, {o}, kernel_size=({a}, {b}, {c}))"),
        },
        _ => Kind::Other {
            what: if keys.is_empty() {
                "only a num_batches_tracked counter".into()
            } else {
                "an unrecognised set of tensors".into()
            },
        },
    }
}

/// Strip wrappers that prefix every name (`module.` of DataParallel, `_orig_mod.` of
/// torch.compile) into `model.prefix`.
fn common_prefix(names: &[&str]) -> String {
    let mut prefix = String::new();
    loop {
        let found = ["module.", "_orig_mod."].into_iter().find(|w| {
            names
                .iter()
                .all(|n| n[prefix.len()..].starts_with(w) && n.len() > prefix.len() + w.len())
        });
        match found {
            Some(w) => prefix.push_str(w),
            None => return prefix,
        }
    }
}

fn group(src: &Source) -> (String, Vec<Module>) {
    let names: Vec<&str> = src.tensors.iter().map(|t| t.0.as_str()).collect();
    let prefix = common_prefix(&names);
    let mut by_module: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
    for (name, dtype, shape) in &src.tensors {
        let rel = &name[prefix.len()..];
        let (module, suffix) = match rel.rsplit_once('.') {
            Some((m, s)) => (m.to_string(), s.to_string()),
            None => (String::new(), rel.to_string()),
        };
        by_module.entry(module).or_default().insert(
            suffix,
            Tensor {
                full: name.clone(),
                dtype: dtype.clone(),
                shape: shape.clone(),
            },
        );
    }
    // A tied tensor stored once: its other name belongs to its own module too.
    let split = |n: &str| -> Option<(String, String)> {
        let rel = n.strip_prefix(prefix.as_str())?;
        let (m, s) = rel.rsplit_once('.')?;
        Some((m.to_string(), s.to_string()))
    };
    for (a, b) in &src.aliases {
        for (missing, stored) in [(a, b), (b, a)] {
            let Some(t) = src.tensors.iter().find(|t| &t.0 == stored) else {
                continue;
            };
            if src.tensors.iter().any(|t| &t.0 == missing) {
                continue;
            }
            if let Some((m, s)) = split(missing) {
                by_module.entry(m).or_default().insert(
                    s,
                    Tensor {
                        full: missing.clone(),
                        dtype: t.1.clone(),
                        shape: t.2.clone(),
                    },
                );
            }
        }
    }
    // Attention modules own submodules: nn.MultiheadAttention's `out_proj`, nanoGPT's
    // `c_attn` and `c_proj`.
    let paths: Vec<String> = by_module.keys().cloned().collect();
    for p in &paths {
        let mha = by_module
            .get(p)
            .is_some_and(|t| t.contains_key("in_proj_weight"));
        let children: &[&str] = if mha {
            &["out_proj"]
        } else if let Some(parent) = p.strip_suffix(".c_attn") {
            if by_module.contains_key(&format!("{parent}.c_proj")) {
                let parent = parent.to_string();
                for child in ["c_attn", "c_proj"] {
                    if let Some(t) = by_module.remove(&format!("{parent}.{child}")) {
                        let e = by_module.entry(parent.clone()).or_default();
                        for (s, x) in t {
                            e.insert(format!("{child}.{s}"), x);
                        }
                    }
                }
            }
            &[]
        } else {
            &[]
        };
        for child in children {
            if let Some(t) = by_module.remove(&format!("{p}.{child}")) {
                let e = by_module.entry(p.clone()).or_default();
                for (s, x) in t {
                    e.insert(format!("{child}.{s}"), x);
                }
            }
        }
    }
    let rank_of = |m: &str| -> Option<usize> {
        let order = src.order.as_ref()?;
        order.iter().position(|n| {
            n.strip_prefix(prefix.as_str())
                .unwrap_or(n)
                .strip_prefix(m)
                .is_some_and(|rest| rest.starts_with('.'))
        })
    };
    let mut modules: Vec<Module> = by_module
        .into_iter()
        .map(|(path, t)| Module {
            kind: classify(&path, &t),
            rank: rank_of(&path),
            tensors: t.into_values().collect(),
            path,
            tied: Vec::new(),
        })
        .collect();
    order_modules(&mut modules);
    // The later of two modules sharing a tensor reads it under the earlier one's name.
    for (a, b) in &src.aliases {
        let (Some((ma, sa)), Some((mb, sb))) = (split(a), split(b)) else {
            continue;
        };
        let (Some(ia), Some(ib)) = (
            modules.iter().position(|m| m.path == ma),
            modules.iter().position(|m| m.path == mb),
        ) else {
            continue;
        };
        let (later, suffix, target) = if ia < ib {
            (ib, sb, format!("{ma}.{sa}"))
        } else {
            (ia, sa, format!("{mb}.{sb}"))
        };
        if ia != ib && !modules[later].tied.iter().any(|t| t.0 == suffix) {
            modules[later].tied.push((suffix, target));
        }
    }
    (prefix, modules)
}

/// One segment of a natural sort key: a run of digits compares as a number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Seg {
    Num(u64),
    Text(String),
}

fn segments(s: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut digits = false;
    for ch in s.chars() {
        let d = ch.is_ascii_digit();
        if !cur.is_empty() && d != digits {
            out.push(seg(&cur, digits));
            cur.clear();
        }
        digits = d;
        cur.push(ch);
    }
    if !cur.is_empty() {
        out.push(seg(&cur, digits));
    }
    out
}

fn seg(s: &str, digits: bool) -> Seg {
    match (digits, s.parse()) {
        (true, Ok(n)) => Seg::Num(n),
        _ => Seg::Text(s.to_string()),
    }
}

/// Where a component goes among its siblings: token embeddings first, then position tables;
/// final norms and heads last.
fn component_class(c: &str) -> u8 {
    let l = c.to_ascii_lowercase();
    if positional_like(&l) {
        1
    } else if embedding_like(&l) {
        0
    } else if [
        "ln_f",
        "norm_f",
        "final_norm",
        "final_ln",
        "final_layer_norm",
    ]
    .contains(&l.as_str())
    {
        3
    } else if [
        "fc",
        "head",
        "lm_head",
        "classifier",
        "output",
        "out",
        "logits",
    ]
    .contains(&l.as_str())
    {
        4
    } else {
        2
    }
}

fn natural_key(path: &str) -> Vec<(u8, Vec<Seg>)> {
    path.split('.')
        .map(|c| (component_class(c), segments(c)))
        .collect()
}

/// The number at the end of a module's last component (`bn1` → 1), with the component's
/// letters.
fn trailing_number(path: &str) -> Option<(&str, u64)> {
    let c = last_component(path);
    let i = c.trim_end_matches(|ch: char| ch.is_ascii_digit()).len();
    if i == c.len() || i == 0 {
        return None;
    }
    Some((&c[..i], c[i..].parse().ok()?))
}

/// Order modules as the `state_dict` does: by the metadata order when the file records one;
/// otherwise by the natural order of module paths (`features.10` after `features.9`), with
/// embeddings first, final norms and heads (`fc`, `head`, `classifier`) last among their
/// siblings, and a norm `bnK` placed right after its sibling `convK` / `fcK`.
fn order_modules(modules: &mut [Module]) {
    if modules.iter().all(|m| m.rank.is_some()) {
        modules.sort_by_key(|m| m.rank);
        return;
    }
    let is_norm = |k: &Kind| matches!(k, Kind::BatchNorm { .. } | Kind::LayerNorm { .. });
    let is_weighted = |k: &Kind| matches!(k, Kind::Linear { .. } | Kind::Conv2d { .. });
    let anchors: Vec<(String, String, u64)> = modules
        .iter()
        .filter(|m| is_weighted(&m.kind))
        .filter_map(|m| {
            let (_, n) = trailing_number(&m.path)?;
            let parent = m.path.rsplit_once('.').map_or("", |p| p.0);
            Some((m.path.clone(), parent.to_string(), n))
        })
        .collect();
    // A transformer block with an attention module and norms numbered 1 (and 2): pre-norm
    // order, `ln_1`, `attn`, `ln_2`, `mlp` (`norm1`, `attn`, `norm2`, `mlp`).
    let norm_number = |c: &str| -> Option<u64> {
        let (letters, n) = trailing_number(c)?;
        let l = letters.to_ascii_lowercase();
        ["ln", "ln_", "norm", "norm_", "layernorm", "layer_norm"]
            .contains(&l.as_str())
            .then_some(n)
    };
    let blocks: Vec<(String, String)> = modules
        .iter()
        .filter(|m| matches!(m.kind, Kind::Attention { .. }))
        .filter_map(|m| {
            let (parent, attn) = m.path.rsplit_once('.')?;
            let child = |n: u64| {
                modules.iter().any(|x| {
                    is_norm(&x.kind)
                        && x.path
                            .rsplit_once('.')
                            .is_some_and(|(p, c)| p == parent && norm_number(c) == Some(n))
                })
            };
            child(1).then(|| (parent.to_string(), attn.to_string()))
        })
        .collect();
    let block_key = |path: &str| -> Vec<(u8, Vec<Seg>)> {
        let mut k = natural_key(path);
        for (parent, attn) in &blocks {
            if let Some(rest) = path.strip_prefix(parent.as_str())
                && let Some(rest) = rest.strip_prefix('.')
            {
                let depth = parent.split('.').count();
                let c = rest.split('.').next().unwrap_or(rest);
                k[depth].0 = match norm_number(c) {
                    _ if c == attn => 1,
                    Some(1) => 0,
                    Some(2) => 2,
                    _ => 3,
                };
            }
        }
        k
    };
    let key = |m: &Module| -> (Vec<(u8, Vec<Seg>)>, u8) {
        if is_norm(&m.kind)
            && let Some((letters, n)) = trailing_number(&m.path)
            && ["bn", "norm", "ln", "batchnorm", "batch_norm", "n"]
                .contains(&letters.to_ascii_lowercase().as_str())
        {
            let parent = m.path.rsplit_once('.').map_or("", |p| p.0);
            if let Some((anchor, _, _)) = anchors.iter().find(|a| a.1 == parent && a.2 == n) {
                return (block_key(anchor), 1);
            }
        }
        (block_key(&m.path), 0)
    };
    modules.sort_by(|a, b| key(a).cmp(&key(b)).then_with(|| a.path.cmp(&b.path)));
}

// ---------------------------------------------------------------------------------------
// Writing the draft

/// The text being written, with its TODO notes.
struct Out {
    lines: Vec<String>,
    todos: Vec<(usize, String)>,
}

impl Out {
    fn line(&mut self, s: impl Into<String>) {
        self.lines.push(s.into());
    }

    /// The name of the last layer table written, giving it one (`base`, made unique) when it
    /// has none; `None` when no layer has been written.
    fn name_last(&mut self, names: &mut BTreeSet<String>, base: &str) -> Option<String> {
        let start = self.lines.iter().rposition(|l| l == "[[layers]]")?;
        let end = self.lines[start + 1..]
            .iter()
            .position(|l| l.is_empty())
            .map_or(self.lines.len(), |k| start + 1 + k);
        let value = |l: &str, key: &str| -> Option<String> {
            let v = l.strip_prefix(key)?.strip_prefix(" = ")?;
            toml::from_str::<toml::Table>(&format!("v = {v}"))
                .ok()?
                .get("v")?
                .as_str()
                .map(|s| s.to_string())
        };
        let table = &self.lines[start + 1..end];
        if let Some(n) = table.iter().find_map(|l| value(l, "name")) {
            return Some(n);
        }
        let ty = table.iter().find_map(|l| value(l, "type"));
        let name = unique(names, ty.as_deref().unwrap_or(base));
        self.lines
            .insert(start + 1, format!("name = {}", quote(&name)));
        for t in &mut self.todos {
            if t.0 > start + 1 {
                t.0 += 1;
            }
        }
        Some(name)
    }

    /// A `# TODO(lca init): …` note, wrapped at about 96 columns.
    fn todo(&mut self, text: &str) {
        self.todos.push((self.lines.len() + 1, text.to_string()));
        self.comment(TODO, text);
    }

    /// A plain comment, wrapped, with `lead` on its first line.
    fn comment(&mut self, lead: &str, text: &str) {
        let mut cur = lead.to_string();
        // Words, with `code spans` kept on one line.
        let mut words: Vec<String> = Vec::new();
        let mut open = false;
        for w in text.split(' ') {
            match words.last_mut() {
                Some(last) if open => {
                    last.push(' ');
                    last.push_str(w);
                }
                _ => words.push(w.to_string()),
            }
            if w.matches('`').count() % 2 == 1 {
                open = !open;
            }
        }
        for word in &words {
            if cur.chars().count() + 1 + word.chars().count() > 96 && cur.len() > lead.len() {
                self.lines.push(cur);
                cur = "#  ".to_string();
            }
            cur.push(' ');
            cur.push_str(word);
        }
        self.lines.push(cur);
    }
}

/// TOML string literal.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn pair(p: [usize; 2]) -> String {
    if p[0] == p[1] {
        p[0].to_string()
    } else {
        format!("[{}, {}]", p[0], p[1])
    }
}

fn dims(s: &[usize]) -> String {
    s.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("×")
}

/// Whether this build's spec parser accepts a layer table (so that new layer types are used
/// as soon as they exist, and never before).
fn supported(table: &[String]) -> bool {
    // `name`, `input` and `tied` are read by the spec parser, not by the layer type.
    let keys: Vec<&str> = table
        .iter()
        .map(|l| l.as_str())
        .filter(|l| {
            !l.starts_with("name =") && !l.starts_with("input =") && !l.starts_with("tied =")
        })
        .collect();
    toml::from_str::<toml::Table>(&keys.join("\n"))
        .ok()
        .and_then(|t| toml::Value::Table(t).try_into::<LayerKind>().ok())
        .is_some()
}

/// The per-sample shape flowing between layers, as far as it is known.
#[derive(Debug, Clone)]
struct Flow {
    shape: Option<Vec<usize>>,
    /// Kind of the last layer with parameters written.
    after_conv: bool,
}

/// Draft a spec from a checkpoint's tensors and, optionally, facts about the training set.
/// `out` is where the spec will live (relative data paths are written against its directory).
pub fn draft_from(src: &Source, data: Option<&DataFacts>, out: &Path) -> Result<Draft> {
    let (prefix, modules) = group(src);
    let mut o = Out {
        lines: Vec::new(),
        todos: Vec::new(),
    };
    let spec_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    o.comment(
        "#",
        &format!(
            "Drafted by `lca init` (lca {}) from {}{}.",
            env!("CARGO_PKG_VERSION"),
            src.checkpoint.display(),
            data.map(|d| format!(" and {}", d.path.display()))
                .unwrap_or_default()
        ),
    );
    o.comment(
        "#",
        "A checkpoint stores parameters, not the forward pass: every line marked TODO(lca init) \
         is a guess with the most likely choice filled in. Review them (docs/init.md), then run \
         `lca inspect CKPTS/ --spec THIS_FILE`, which points at the first layer that does not fit.",
    );
    match &src.order {
        Some(_) if modules.iter().all(|m| m.rank.is_some()) => o.comment(
            "#",
            "Layer order: as the state_dict order recorded in the checkpoint's metadata.",
        ),
        _ => o.todo(
            "layer order guessed: safetensors stores tensors sorted by name, so the layers are in \
             the natural order of their module names (features.10 after features.9; embeddings \
             first, final norms and heads last, bnK after convK). Check it against your model's \
             forward().",
        ),
    }
    o.line("");

    // Facts that decide the [model] section come from a first pass.
    let has_bn = modules
        .iter()
        .any(|m| matches!(m.kind, Kind::BatchNorm { running: true, .. }));
    let transformer = modules
        .iter()
        .any(|m| matches!(m.kind, Kind::Embedding { .. } | Kind::Attention { .. }));
    let first_weighted = modules.iter().find(|m| {
        matches!(
            m.kind,
            Kind::Linear { .. } | Kind::Conv2d { .. } | Kind::Embedding { .. }
        )
    });
    let mut input_shape: Option<Vec<usize>> = None;
    let mut input_note: Option<String> = None;
    if let (Some(d), Some(m)) = (data, first_weighted)
        && let Kind::Conv2d {
            in_per_group,
            kernel: _,
            ..
        } = m.kind
        && d.sample_shape.len() == 1
    {
        let f = d.sample_shape[0];
        if f.is_multiple_of(in_per_group) {
            let hw = f / in_per_group;
            let side = (hw as f64).sqrt().round() as usize;
            if side * side == hw {
                input_shape = Some(vec![in_per_group, side, side]);
                input_note = Some(format!(
                    "the data holds {f} values per sample and '{}' is a convolution with \
                     {in_per_group} input channel(s): reshaped to {in_per_group}×{side}×{side} \
                     (C, H, W). Check the height and width.",
                    m.path
                ));
            }
        }
    }
    o.line("[model]");
    o.line(format!("prefix = {}", quote(&prefix)));
    if let Some(s) = &input_shape {
        if let Some(n) = &input_note {
            o.todo(n);
        }
        o.line(format!(
            "input_shape = [{}]",
            s.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if has_bn {
        o.todo(
            "batch norm: \"running-stats\" normalises with the checkpoints' running_mean and \
             running_var, as model.eval(); \"batch-stats\" uses the statistics of each \
             evaluation chunk, as training and the LCA study (set [eval] chunk_size to your \
             batch size then).",
        );
        o.line("batch_norm = \"running-stats\"");
    }
    o.line("");

    // Layers.
    let model_input = Flow {
        shape: data.map(|d| {
            input_shape
                .clone()
                .unwrap_or_else(|| d.sample_shape.clone())
        }),
        after_conv: false,
    };
    let mut flow = model_input.clone();
    let mut layers = Vec::new();
    let mut skipped = Vec::new();
    let weighted: Vec<usize> = modules
        .iter()
        .enumerate()
        .filter(|(_, m)| matches!(m.kind, Kind::Linear { .. } | Kind::Conv2d { .. }))
        .map(|(i, _)| i)
        .collect();
    let last_weighted = weighted.last().copied();
    let activation = if transformer { "gelu" } else { "relu" };
    let mut channels: Option<usize> = None;
    let add_supported = supported(&["type = \"add\"".into()]);
    let mut names: BTreeSet<String> = modules.iter().map(|m| m.path.clone()).collect();
    let plans = plan(&modules, add_supported, &mut names);
    // Output shape of every named layer written so far (None: unknown without data).
    let mut shapes: BTreeMap<String, Option<Vec<usize>>> = BTreeMap::new();
    shapes.insert("input".into(), model_input.shape.clone());
    // The current residual block: its input's name, flow and channels, and its stride.
    let mut block_in: Option<(String, Flow, Option<usize>)> = None;
    let mut stride = 1;
    for (i, m) in modules.iter().enumerate() {
        let p = &plans[i];
        match &p.starts {
            Some(start) => {
                let ty_hint = activation;
                let inp = o
                    .name_last(&mut names, ty_hint)
                    .unwrap_or_else(|| "input".to_string());
                if !shapes.contains_key(&inp) {
                    shapes.insert(inp.clone(), flow.shape.clone());
                }
                block_in = Some((inp.clone(), flow.clone(), channels));
                match start {
                    Start::Res {
                        block,
                        main_out,
                        shortcut,
                    } => {
                        let cin = match &flow.shape {
                            Some(s) if s.len() == 3 => Some(s[0]),
                            _ => channels,
                        };
                        stride = if cin.is_some_and(|c| *main_out == 2 * c) {
                            2
                        } else {
                            1
                        };
                        o.todo(&format!(
                            "the layers named {block}.* look like a ResNet block ({} → \
                             {main_out} channels). A skip connection is not stored in a \
                             checkpoint: guessed `{block}.add` = the last layer of the main \
                             path + {}, then a {activation}, with '{inp}' as the block's input \
                             (docs/spec.md, \"Residual connections\"). {}",
                            cin.map_or("?".to_string(), |c| c.to_string()),
                            if *shortcut {
                                "the shortcut's"
                            } else {
                                "the block's input (identity shortcut)"
                            },
                            if stride == 2 {
                                "The channels double: stride 2 guessed on the first convolution \
                                 with a kernel larger than 1 and on the shortcut's convolution."
                            } else {
                                "Stride 1 guessed (the channels do not double)."
                            }
                        ));
                    }
                    Start::PreNorm { block } => o.todo(&format!(
                        "the layers named {block}.* look like a pre-norm transformer block: \
                         guessed x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)), with '{inp}' as \
                         the block's input and an `add` layer for each residual join \
                         (docs/spec.md, \"Language models\"). A post-norm block \
                         (nn.TransformerEncoderLayer's default) puts each norm after its add."
                    )),
                }
                o.line("");
            }
            None => {
                if let Some(b) = block_name(m)
                    && (i == 0 || block_name(&modules[i - 1]).as_ref() != Some(&b))
                    && modules[i..]
                        .iter()
                        .take_while(|n| block_name(n).as_ref() == Some(&b))
                        .count()
                        > 1
                    && !p.planned
                {
                    o.todo(&format!(
                        "the layers named {b}.* form one block (a ResNet or transformer block?). \
                         A skip connection is not stored in a checkpoint: if the block has one, \
                         write it {}(docs/spec.md, \"Residual connections\"), and check where its activations go.",
                        if add_supported {
                            "as a layer `type = \"add\"` with `input = [\"<layer before the block>\", \"<last layer of the block>\"]` "
                        } else {
                            ""
                        }
                    ));
                    o.line("");
                }
            }
        }
        let mut head = vec![format!("name = {}", quote(&m.path))];
        if p.from_model_input {
            head.push("input = \"input\"".into());
            flow = model_input.clone();
        } else if p.from_block_input
            && let Some((name, f, c)) = &block_in
        {
            head.push(format!("input = {}", quote(name)));
            flow = f.clone();
            channels = *c;
        }
        let head = head;
        match &m.kind {
            Kind::Linear { inp, out, bias } => {
                let inp = *inp;
                match flow.shape.clone() {
                    Some(s) if flow.after_conv && s.len() == 3 => {
                        if s.iter().product::<usize>() == inp {
                            write_table(&mut o, &["type = \"flatten\"".into()]);
                            flow.shape = Some(vec![inp]);
                        } else {
                            pool_to_fit(&mut o, &mut flow, &m.path, inp);
                        }
                    }
                    Some(s)
                        if s.len() >= 2
                            && s.last() != Some(&inp)
                            && s.iter().product::<usize>() == inp =>
                    {
                        o.todo(&format!(
                            "'{}' takes {inp} features and each sample is {} = {inp} values: \
                             flattened first (nn.Flatten).",
                            m.path,
                            dims(&s)
                        ));
                        write_table(&mut o, &["type = \"flatten\"".into()]);
                        flow.shape = Some(vec![inp]);
                    }
                    None if flow.after_conv => {
                        o.todo(&format!(
                            "a linear layer after convolutions: the feature maps are flattened \
                             first; '{}' expects {inp} = channels × height × width (add the \
                             pooling of your model before it).",
                            m.path
                        ));
                        write_table(&mut o, &["type = \"flatten\"".into()]);
                    }
                    _ => {}
                }
                if let Some(s) = &flow.shape {
                    let last = s.last().copied().unwrap_or(1);
                    if last != inp {
                        o.todo(&format!(
                            "'{}' expects {inp} input features but receives {} ({}): fix the \
                             layers before it (or the data).",
                            m.path,
                            last,
                            dims(s)
                        ));
                    }
                }
                let mut t = head.clone();
                t.extend([
                    "type = \"linear\"".into(),
                    format!("in_features = {inp}"),
                    format!("out_features = {out}"),
                ]);
                if !bias {
                    t.push("bias = false".into());
                }
                emit(
                    &mut o,
                    m,
                    &t,
                    &mut layers,
                    &mut skipped,
                    format!("linear {inp}→{out}"),
                );
                flow.shape = Some(match flow.shape.take() {
                    Some(mut s) if !s.is_empty() => {
                        *s.last_mut().expect("non-empty") = *out;
                        s
                    }
                    _ => vec![*out],
                });
                flow.after_conv = false;
                channels = Some(*out);
            }
            Kind::Conv2d {
                in_per_group,
                out,
                kernel,
                bias,
            } => {
                let have = match &flow.shape {
                    Some(s) if s.len() == 3 => Some(s[0]),
                    Some(_) => None,
                    None => channels,
                };
                let mut groups = 1;
                if let Some(c) = have
                    && c != *in_per_group
                    && c.is_multiple_of(*in_per_group)
                    && out.is_multiple_of(c / in_per_group)
                {
                    groups = c / in_per_group;
                }
                let in_channels = in_per_group * groups;
                let padding = [kernel[0] / 2, kernel[1] / 2];
                let s = if p.strided { stride } else { 1 };
                let mut note = format!(
                    "'{}': stride, padding and dilation are not stored in a checkpoint; guessed \
                     stride {s}, padding {}{}. Pooling after it is not stored either: add your \
                     model's max_pool2d / avg_pool2d layers.",
                    m.path,
                    pair(padding),
                    if s == 1 {
                        " (keeps the size for odd kernels)"
                    } else {
                        " (the block's down-sampling)"
                    }
                );
                if groups > 1 {
                    note.push_str(&format!(
                        " groups = {groups}: the weight has {in_per_group} input channels per \
                         group and the layer before gives {in_channels}."
                    ));
                } else if have.is_none_or(|c| c == *in_per_group) {
                    note.push_str(" groups = 1 assumed (in_channels = weight.shape[1]).");
                }
                if let Some(sh) = &flow.shape
                    && (sh.len() != 3 || sh[0] != in_channels)
                {
                    note.push_str(&format!(
                        " It receives {} but expects {in_channels} channels × height × width: \
                         check [model] input_shape and the layers before it.",
                        dims(sh)
                    ));
                }
                o.todo(&note);
                let mut t = head.clone();
                t.extend([
                    "type = \"conv2d\"".into(),
                    format!("in_channels = {in_channels}"),
                    format!("out_channels = {out}"),
                    format!("kernel_size = {}", pair(*kernel)),
                    format!("stride = {s}"),
                    format!("padding = {}", pair(padding)),
                ]);
                if groups > 1 {
                    t.push(format!("groups = {groups}"));
                }
                if !bias {
                    t.push("bias = false".into());
                }
                emit(
                    &mut o,
                    m,
                    &t,
                    &mut layers,
                    &mut skipped,
                    format!("conv2d {in_channels}→{out}, {} kernel", dims(kernel)),
                );
                // Output size: ⌊(H + 2·padding − kernel) / stride⌋ + 1.
                let size = |h: usize, a: usize| {
                    (h + 2 * padding[a])
                        .checked_sub(kernel[a])
                        .map_or(0, |v| v / s + 1)
                };
                flow.shape = match &flow.shape {
                    Some(sh) if sh.len() == 3 => Some(vec![*out, size(sh[1], 0), size(sh[2], 1)]),
                    _ => None,
                };
                flow.after_conv = true;
                channels = Some(*out);
            }
            Kind::BatchNorm { c, affine, running } => {
                let two_d = match &flow.shape {
                    Some(s) => s.len() == 3,
                    None => flow.after_conv,
                };
                let ty = if two_d {
                    "batch_norm2d"
                } else {
                    "batch_norm1d"
                };
                let have = match &flow.shape {
                    Some(s) if s.len() >= 2 => Some(s[0]),
                    Some(s) => s.first().copied(),
                    None => channels,
                };
                if have.is_some_and(|h| h != *c) {
                    o.todo(&format!(
                        "'{}' normalises {c} channels but the layer before gives {}: check the \
                         layer order.",
                        m.path,
                        have.unwrap_or(0)
                    ));
                }
                let mut t = head.clone();
                t.extend([format!("type = \"{ty}\""), format!("num_features = {c}")]);
                if !affine {
                    t.push("affine = false".into());
                }
                if !running {
                    t.push("track_running_stats = false".into());
                }
                emit(
                    &mut o,
                    m,
                    &t,
                    &mut layers,
                    &mut skipped,
                    format!("{ty} {c}"),
                );
            }
            Kind::LayerNorm { c, bias } => {
                let mut t = head.clone();
                t.extend([
                    "type = \"layer_norm\"".into(),
                    format!("normalized_shape = {c}"),
                ]);
                if !bias {
                    t.push("bias = false".into());
                }
                emit(
                    &mut o,
                    m,
                    &t,
                    &mut layers,
                    &mut skipped,
                    format!("layer_norm {c}"),
                );
            }
            Kind::Embedding {
                num,
                dim,
                positional,
            } => {
                let ty = if *positional {
                    if let Some(s) = &flow.shape
                        && let Some(&t) = s.last()
                        && t > *num
                    {
                        o.todo(&format!(
                            "'{}' holds {num} positions but the sequences are {t} long.",
                            m.path
                        ));
                    }
                    o.todo(&format!(
                        "'{}' is read as a learned position table (nanoGPT's wpe): rows 0..T \
                         of it, added to the token embeddings. If it is a second token \
                         embedding, make it type = \"embedding\".",
                        m.path
                    ));
                    "positional_embedding"
                } else {
                    "embedding"
                };
                let mut t = head.clone();
                t.extend([
                    format!("type = \"{ty}\""),
                    format!("num_embeddings = {num}"),
                    format!("embedding_dim = {dim}"),
                ]);
                emit(
                    &mut o,
                    m,
                    &t,
                    &mut layers,
                    &mut skipped,
                    format!("{ty} {num}×{dim}"),
                );
                flow.shape = flow.shape.take().map(|mut s| {
                    s.push(*dim);
                    s
                });
                channels = Some(*dim);
            }
            Kind::Attention { mha, c, bias } => {
                let heads = guess_heads(*c);
                let divisors: Vec<String> = (1..=*c)
                    .filter(|h| c.is_multiple_of(*h))
                    .map(|h| h.to_string())
                    .collect();
                o.todo(&format!(
                    "'{}' is multi-head self-attention ({}, {c} channels). The number of heads \
                     is not stored: {heads} guessed ({}); {c} channels split into {} heads. \
                     Set your model's {}.",
                    m.path,
                    if *mha {
                        "nn.MultiheadAttention: in_proj_weight [3C, C] holds q, k, v"
                    } else {
                        "nanoGPT CausalSelfAttention: c_attn [3C, C] holds q, k, v"
                    },
                    if heads == 1 {
                        "one head, as the channels are not a multiple of GPT-2's head size 64"
                    } else {
                        "head size 64, as GPT-2"
                    },
                    divisors.join(", "),
                    if *mha { "num_heads" } else { "n_head" }
                ));
                let mut t = head.clone();
                if *mha {
                    o.todo(
                        "causal mask guessed (mha(x, x, x, attn_mask=causal mask), as a language \
                         model): set causal = false if forward() passes no mask.",
                    );
                    t.extend([
                        "type = \"multihead_attention\"".into(),
                        format!("embed_dim = {c}"),
                        format!("num_heads = {heads}"),
                        "causal = true".into(),
                    ]);
                } else {
                    t.extend([
                        "type = \"causal_self_attention\"".into(),
                        format!("n_embd = {c}"),
                        format!("n_head = {heads}"),
                    ]);
                }
                if !bias {
                    t.push("bias = false".into());
                }
                emit(
                    &mut o,
                    m,
                    &t,
                    &mut layers,
                    &mut skipped,
                    format!("self-attention {c}, {heads} head(s)"),
                );
            }
            Kind::Other { what } => {
                o.todo(&format!(
                    "module '{}' ({what}) is not a layer lca init recognises; left out. Its \
                     tensors:",
                    m.path
                ));
                for t in &m.tensors {
                    o.line(format!("#     {}  {} {:?}", t.full, t.dtype, t.shape));
                }
                o.line("");
                skipped.push(m.path.clone());
            }
        }
        shapes.insert(m.path.clone(), flow.shape.clone());
        // An activation after a linear or conv layer (after its norm, if one follows), except
        // after the last one; inside a recognised block, where the block puts them.
        let next_is_norm = modules.get(i + 1).is_some_and(|n| {
            matches!(n.kind, Kind::BatchNorm { .. })
                && matches!(m.kind, Kind::Linear { .. } | Kind::Conv2d { .. })
        });
        let ends_hidden = match m.kind {
            Kind::Linear { .. } | Kind::Conv2d { .. } => Some(i),
            Kind::BatchNorm { .. } if i > 0 => Some(i - 1),
            _ => None,
        };
        if let Some(j) = ends_hidden
            && !p.planned
            && !next_is_norm
            && Some(j) != last_weighted
            && weighted.contains(&j)
            && last_weighted.is_some_and(|l| l > i)
        {
            o.todo(&format!(
                "activation not stored in a checkpoint: {activation} guessed after '{}' (or \
                 tanh, sigmoid, gelu, leaky_relu; none if the model has none).",
                m.path
            ));
            write_table(&mut o, &[format!("type = \"{activation}\"")]);
        }
        for extra in &p.after {
            match extra {
                Extra::Act(name) => {
                    let mut t = Vec::new();
                    if let Some(n) = name {
                        t.push(format!("name = {}", quote(n)));
                        shapes.insert(n.clone(), flow.shape.clone());
                    }
                    t.push(format!("type = \"{activation}\""));
                    write_table(&mut o, &t);
                }
                Extra::Add { name, inputs } => {
                    let inputs: Vec<String> = inputs
                        .iter()
                        .map(|r| match r {
                            Ref::BlockInput => block_in
                                .as_ref()
                                .map_or("input".to_string(), |b| b.0.clone()),
                            Ref::Layer(n) => n.clone(),
                        })
                        .collect();
                    let known: Vec<&Vec<usize>> = inputs
                        .iter()
                        .filter_map(|n| shapes.get(n).and_then(|s| s.as_ref()))
                        .collect();
                    let list = inputs
                        .iter()
                        .map(|n| quote(n))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let t = vec![
                        format!("name = {}", quote(name)),
                        "type = \"add\"".into(),
                        format!("input = [{list}]"),
                    ];
                    if known.windows(2).any(|w| w[0] != w[1]) {
                        o.todo(&format!(
                            "the residual join '{name}' adds {}: the shapes differ (a stride, a \
                             shortcut, or the channels were guessed wrong), so it is left \
                             commented out.",
                            known
                                .iter()
                                .map(|s| dims(s))
                                .collect::<Vec<_>>()
                                .join(" and ")
                        ));
                        o.line("# [[layers]]");
                        for k in &t {
                            o.line(format!("# {k}"));
                        }
                        o.line("");
                    } else {
                        write_table(&mut o, &t);
                        if let Some(s) = known.first() {
                            flow.shape = Some(s.to_vec());
                        }
                        shapes.insert(name.clone(), flow.shape.clone());
                    }
                }
            }
        }
    }

    // Loss.
    o.line("[loss]");
    let loss_ce = match data {
        Some(d) => d.classes.is_some(),
        None => true,
    };
    match data {
        Some(d) if loss_ce => {
            let classes = d.classes.unwrap_or(0);
            let logits = flow.shape.as_ref().and_then(|s| s.last().copied());
            let mut note = if d.tokens.is_some() {
                format!(
                    "next-token targets are ids 0..{}: cross-entropy guessed (the mean over \
                     every position of every sequence).",
                    classes.saturating_sub(1)
                )
            } else {
                format!(
                    "y holds integer labels 0..{}: classification with cross-entropy guessed.",
                    classes.saturating_sub(1)
                )
            };
            match logits {
                Some(k) if k == classes => note.push_str(&format!(
                    " The last layer gives {k} logits for {classes} classes."
                )),
                Some(k) if k > classes => note.push_str(&format!(
                    " The last layer gives {k} logits; labels above {} do not occur in the data.",
                    classes - 1
                )),
                Some(k) => note.push_str(&format!(
                    " But the last layer gives only {k} logits for labels up to {}: the data or \
                     the last layer is not the one trained.",
                    classes - 1
                )),
                None => {}
            }
            o.todo(&note);
        }
        Some(d) => {
            o.todo(&format!(
                "y holds non-integer values (shape {:?} per sample): regression with mean \
                 squared error guessed.",
                d.y_shape
            ));
        }
        None => o.todo(
            "loss guessed (no --data): cross_entropy for class labels, mse for float targets.",
        ),
    }
    o.line(if loss_ce {
        "type = \"cross_entropy\""
    } else {
        "type = \"mse\""
    });
    o.line("");

    // Data.
    o.line("[data]");
    match data {
        Some(d) => {
            o.line(format!(
                "train = {}",
                quote(&spec_path(&d.path, &spec_dir).to_string_lossy())
            ));
            if let Some(t) = &d.tokens {
                o.todo(&format!(
                    "'{t}' holds token ids [N, T+1] = [{}, {}]: each row gives the inputs (its \
                     first {} ids) and the next-token targets (its last {}).",
                    d.samples,
                    d.sample_shape.first().map_or(0, |t| t + 1),
                    d.sample_shape.first().copied().unwrap_or(0),
                    d.sample_shape.first().copied().unwrap_or(0),
                ));
                o.line(format!("tokens = {}", quote(t)));
            } else {
                if d.names_guessed {
                    o.todo(&format!(
                        "the data file has no tensors named x and y: '{}' taken as the inputs \
                         and '{}' as the targets.",
                        d.x, d.y
                    ));
                }
                o.line(format!("x = {}", quote(&d.x)));
                o.line(format!("y = {}", quote(&d.y)));
            }
            let token_ids = matches!(
                first_weighted.map(|m| &m.kind),
                Some(Kind::Embedding { .. })
            );
            if d.tokens.is_some() {
                // Token ids: no preprocessing (a [data] tokens tensor has none).
            } else if token_ids {
                o.todo("x holds token ids for an embedding: no preprocessing.");
            } else if d.x_integral && d.x_max > 1.0 {
                let (scale, why) = if d.x_max > 128.0 && d.x_max <= 255.0 {
                    (
                        1.0 / 255.0,
                        "scale = 1/255 guessed (8-bit images, as ToTensor())".to_string(),
                    )
                } else {
                    (
                        1.0 / d.x_max,
                        format!("scale = 1/{} guessed (maps the inputs to [0, 1])", d.x_max),
                    )
                };
                o.todo(&format!(
                    "x holds integers {}..{}{}; {why}. Use your training transform; a \
                     Normalize(mean, std) after it is written as `mean = [...]` and `std = [...]` \
                     (one value, or one per channel).",
                    d.x_min,
                    d.x_max,
                    d.x_dtype
                        .as_deref()
                        .map(|t| format!(" ({t})"))
                        .unwrap_or_default(),
                ));
                o.line(format!("scale = {scale:?}"));
            } else {
                o.todo(&format!(
                    "x holds values {}..{}, used as they are. If your training transform \
                     rescales or normalises them, add `scale = ...`, `mean = [...]`, \
                     `std = [...]` (one value, or one per channel).",
                    d.x_min, d.x_max
                ));
            }
            let val = d
                .validation
                .as_ref()
                .map(|v| spec_path(v, &spec_dir).to_string_lossy().to_string());
            o.todo(&format!(
                "a held-out set to allocate along the same path? Uncomment{}:",
                if val.is_some() {
                    " (this file was found next to the training set)"
                } else {
                    " and set the path"
                }
            ));
            o.line(format!(
                "# validation = {}",
                quote(val.as_deref().unwrap_or("val.safetensors"))
            ));
        }
        None => {
            o.todo(
                "the training set (no --data given): a .safetensors or .npz file with inputs x \
                 [N, ...] and targets y; set its path (relative to this file) and preprocessing.",
            );
            o.line("train = \"train.safetensors\"");
            o.line("x = \"x\"");
            o.line("y = \"y\"");
        }
    }
    o.line("");
    o.line("[eval]");
    o.line("chunk_size = 256");
    o.line("");
    o.todo(
        "an explicit L2 term λ‖θ‖² in the training objective? Uncomment and set λ (its LCA is \
         reported in its own column; SGD's weight_decay = wd is λ = wd / 2):",
    );
    o.line("# [regularization]");
    o.line("# l2 = 1e-4");

    let mut text = o.lines.join("\n");
    text.push('\n');
    // The draft must parse, whatever was left out.
    let spec = Spec::parse(&text, out).map_err(|e| {
        LcaError::Usage(format!(
            "internal error: lca init drafted a spec that does not parse ({e}); please report \
             this with the checkpoint's tensor list"
        ))
    })?;
    let builds = data.map(|d| {
        let shape = spec
            .model
            .input_shape
            .clone()
            .unwrap_or_else(|| d.sample_shape.clone());
        match Model::<f32>::build(&spec, &shape) {
            Ok(m) => {
                let want = d.classes.map(|k| (k, m.output_shape().last().copied()));
                match want {
                    Some((k, Some(have))) if have < k => Err(format!(
                        "the model gives {have} logits but labels go up to {}",
                        k - 1
                    )),
                    _ => Ok(()),
                }
            }
            Err(e) => Err(e.to_string()),
        }
    });
    Ok(Draft {
        checkpoint: src.checkpoint.clone(),
        text,
        todos: o.todos,
        layers,
        skipped,
        builds,
    })
}

/// The residual block a module belongs to (`layer1.0.conv1` → `layer1.0`), if any.
fn block_name(m: &Module) -> Option<String> {
    let b = crate::summarize::block_of(&m.path);
    (b != m.path).then(|| b.to_string())
}

/// How many heads a self-attention layer of `c` channels is guessed to have: head size 64
/// (GPT-2, nanoGPT's configurations) when `c` is a multiple of 64, else one head.
fn guess_heads(c: usize) -> usize {
    if c >= 64 && c.is_multiple_of(64) {
        c / 64
    } else {
        1
    }
}

/// A layer the draft writes that has no module: an activation or a residual join.
#[derive(Debug, Clone)]
enum Extra {
    /// The model's activation, named or not.
    Act(Option<String>),
    /// An `add` layer of the given inputs.
    Add { name: String, inputs: Vec<Ref> },
}

/// An input of an `add` layer.
#[derive(Debug, Clone)]
enum Ref {
    /// The input of the current block (the layer written before its first layer).
    BlockInput,
    Layer(String),
}

/// The first module of a recognised block.
#[derive(Debug, Clone)]
enum Start {
    /// A ResNet basic or bottleneck block: convolutions and batch norms, with an optional
    /// shortcut (`shortcut.*`, `downsample.*`) from the block's input.
    Res {
        block: String,
        main_out: usize,
        shortcut: bool,
    },
    /// A pre-norm transformer block: norm, self-attention, norm, MLP.
    PreNorm { block: String },
}

/// What the draft writes around one module, beyond the module's own table.
#[derive(Debug, Clone, Default)]
struct Plan {
    starts: Option<Start>,
    /// Reads the block's input (written as `input = ...`) rather than the previous layer.
    from_block_input: bool,
    /// Reads the model input (`input = "input"`): the embeddings of a language model.
    from_model_input: bool,
    /// A convolution that takes the block's stride.
    strided: bool,
    /// The block decides the activations after this module.
    planned: bool,
    /// Layers written after this module.
    after: Vec<Extra>,
}

/// A layer name not used yet: `base`, else `base.2`, `base.3`, … (never `<type>_<index>`,
/// the spec's default names).
fn unique(names: &mut BTreeSet<String>, base: &str) -> String {
    let mut name = base.to_string();
    let mut k = 2;
    while names.contains(&name) || name == "input" {
        name = format!("{base}.{k}");
        k += 1;
    }
    names.insert(name.clone());
    name
}

/// Recognise the blocks whose wiring the draft can guess — ResNet blocks, pre-norm
/// transformer blocks, token + position embeddings — and plan their extra layers.
fn plan(modules: &[Module], add: bool, names: &mut BTreeSet<String>) -> Vec<Plan> {
    let mut plans = vec![Plan::default(); modules.len()];
    if !add {
        return plans;
    }
    // Token and position embeddings, joined by an add after the later one.
    let tok = modules.iter().position(|m| {
        matches!(
            m.kind,
            Kind::Embedding {
                positional: false,
                ..
            }
        )
    });
    let pos = modules.iter().position(|m| {
        matches!(
            m.kind,
            Kind::Embedding {
                positional: true,
                ..
            }
        )
    });
    if let (Some(t), Some(q)) = (tok, pos) {
        plans[t].from_model_input = true;
        plans[q].from_model_input = true;
        let parent = modules[t].path.rsplit_once('.').map_or("", |p| p.0);
        let name = unique(
            names,
            &if parent.is_empty() {
                "embed_add".to_string()
            } else {
                format!("{parent}.embed_add")
            },
        );
        plans[t.max(q)].after.push(Extra::Add {
            name,
            inputs: vec![
                Ref::Layer(modules[t].path.clone()),
                Ref::Layer(modules[q].path.clone()),
            ],
        });
    }
    let mut i = 0;
    while i < modules.len() {
        let Some(b) = block_name(&modules[i]) else {
            i += 1;
            continue;
        };
        let end = i + modules[i..]
            .iter()
            .take_while(|m| block_name(m).as_ref() == Some(&b))
            .count();
        let members: Vec<usize> = (i..end).collect();
        if members.len() > 1 {
            plan_res_block(modules, &members, &b, &mut plans, names);
            plan_prenorm_block(modules, &members, &b, &mut plans, names);
        }
        i = end;
    }
    plans
}

fn plan_res_block(
    modules: &[Module],
    members: &[usize],
    block: &str,
    plans: &mut [Plan],
    names: &mut BTreeSet<String>,
) {
    let is_conv = |i: usize| matches!(modules[i].kind, Kind::Conv2d { .. });
    let is_bn = |i: usize| matches!(modules[i].kind, Kind::BatchNorm { .. });
    if !members.iter().all(|&i| is_conv(i) || is_bn(i))
        || members.iter().filter(|&&i| is_conv(i)).count() < 2
    {
        return;
    }
    let shortcut_like = |i: usize| {
        let rest = &modules[i].path[block.len() + 1..];
        let c = rest.split('.').next().unwrap_or(rest).to_ascii_lowercase();
        ["shortcut", "downsample", "skip", "residual", "proj"].contains(&c.as_str())
    };
    let (short, main): (Vec<usize>, Vec<usize>) = members.iter().partition(|&&i| shortcut_like(i));
    if !is_conv(main[0]) || short.first().is_some_and(|&i| !is_conv(i)) {
        return;
    }
    let main_out = main
        .iter()
        .rev()
        .find_map(|&i| match modules[i].kind {
            Kind::Conv2d { out, .. } => Some(out),
            _ => None,
        })
        .unwrap_or(0);
    plans[members[0]].starts = Some(Start::Res {
        block: block.to_string(),
        main_out,
        shortcut: !short.is_empty(),
    });
    for &i in members {
        plans[i].planned = true;
    }
    plans[main[0]].from_block_input = true;
    if let Some(&s) = short.first() {
        plans[s].from_block_input = true;
        plans[s].strided = true;
    }
    let strided = main
        .iter()
        .copied()
        .find(|&i| matches!(modules[i].kind, Kind::Conv2d { kernel, .. } if kernel != [1, 1]))
        .unwrap_or(main[0]);
    plans[strided].strided = true;
    // An activation after each convolution (after its batch norm) but the last.
    for (k, &i) in main.iter().enumerate() {
        let next_is_bn = main.get(k + 1).is_some_and(|&j| is_bn(j));
        if k + 1 < main.len() && !(is_conv(i) && next_is_bn) {
            plans[i].after.push(Extra::Act(None));
        }
    }
    let add = unique(names, &format!("{block}.add"));
    let act = unique(names, &format!("{block}.relu"));
    let last = *members.last().expect("members");
    plans[last].after.push(Extra::Add {
        name: add,
        inputs: vec![
            Ref::Layer(modules[*main.last().expect("main")].path.clone()),
            match short.last() {
                Some(&s) => Ref::Layer(modules[s].path.clone()),
                None => Ref::BlockInput,
            },
        ],
    });
    plans[last].after.push(Extra::Act(Some(act)));
}

fn plan_prenorm_block(
    modules: &[Module],
    members: &[usize],
    block: &str,
    plans: &mut [Plan],
    names: &mut BTreeSet<String>,
) {
    let kind = |k: usize| &modules[members[k]].kind;
    if members.len() < 4
        || !matches!(kind(0), Kind::LayerNorm { .. })
        || !matches!(kind(1), Kind::Attention { .. })
        || !matches!(kind(2), Kind::LayerNorm { .. })
        || !(3..members.len()).all(|k| matches!(kind(k), Kind::Linear { .. }))
    {
        return;
    }
    plans[members[0]].starts = Some(Start::PreNorm {
        block: block.to_string(),
    });
    for &i in members {
        plans[i].planned = true;
    }
    let add1 = unique(names, &format!("{block}.add1"));
    let add2 = unique(names, &format!("{block}.add2"));
    plans[members[1]].after.push(Extra::Add {
        name: add1.clone(),
        inputs: vec![
            Ref::BlockInput,
            Ref::Layer(modules[members[1]].path.clone()),
        ],
    });
    let mlp = &members[3..];
    for &i in &mlp[..mlp.len() - 1] {
        plans[i].after.push(Extra::Act(None));
    }
    let last = *mlp.last().expect("an MLP layer");
    plans[last].after.push(Extra::Add {
        name: add2,
        inputs: vec![Ref::Layer(add1), Ref::Layer(modules[last].path.clone())],
    });
}

/// Write a parameter-free layer table.
fn write_table(o: &mut Out, keys: &[String]) {
    o.line("[[layers]]");
    for k in keys {
        o.line(k.clone());
    }
    o.line("");
}

/// Write a layer with parameters: as a real table when this build supports it, else as a
/// commented-out block with a TODO.
fn emit(
    o: &mut Out,
    m: &Module,
    table: &[String],
    layers: &mut Vec<(String, String)>,
    skipped: &mut Vec<String>,
    what: String,
) {
    let mut table = table.to_vec();
    // name, type, then input, as the spec's examples.
    if let Some(k) = table.iter().position(|l| l.starts_with("input ="))
        && let Some(t) = table.iter().position(|l| l.starts_with("type ="))
        && k < t
    {
        let line = table.remove(k);
        table.insert(t, line);
    }
    if !m.tied.is_empty() {
        let list = m
            .tied
            .iter()
            .map(|(k, v)| format!("{k} = {}", quote(v)))
            .collect::<Vec<_>>()
            .join(", ");
        o.todo(&format!(
            "'{}' shares {} with an earlier layer (tied weights: the checkpoint stores the \
             tensor once, or twice with the same values): one parameter, reported under the \
             earlier layer. Delete the `tied` line if the two are separate parameters.",
            m.path,
            m.tied
                .iter()
                .map(|(k, v)| format!("its {k} ({v})"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        table.push(format!("tied = {{ {list} }}"));
    }
    let table = &table[..];
    if supported(table) {
        write_table(o, table);
        layers.push((m.path.clone(), what));
    } else {
        let ty = table
            .iter()
            .find_map(|l| l.strip_prefix("type = "))
            .unwrap_or("?");
        o.todo(&format!(
            "'{}' is a {what} layer, but this build of lca has no layer type {ty}: the block \
             below is left commented out and its tensors ({}) are not analysed.",
            m.path,
            m.tensors
                .iter()
                .map(|t| t.full.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        o.line("# [[layers]]");
        for k in table {
            o.line(format!("# {k}"));
        }
        o.line("");
        skipped.push(m.path.clone());
    }
}

/// The convolutions give `[C, H, W]` but the linear layer `name` takes `inp` features: write
/// the pooling that makes the sizes fit (global average pooling when `inp = C`, an adaptive
/// average pool to the size `inp / C` implies otherwise), marked TODO.
fn pool_to_fit(o: &mut Out, flow: &mut Flow, name: &str, inp: usize) {
    let Some(s) = flow.shape.clone() else { return };
    let (c, h, w) = (s[0], s[1], s[2]);
    let flatten = ["type = \"flatten\"".to_string()];
    if inp == c {
        let gap = ["type = \"global_avg_pool\"".to_string()];
        o.todo(&format!(
            "the convolutions give {c}×{h}×{w} and '{name}' takes {inp} = {c} channels: a \
             global average pool (ResNet-style, nn.AdaptiveAvgPool2d(1) + flatten) guessed."
        ));
        if supported(&gap) {
            write_table(o, &gap);
        } else {
            let ada = [
                "type = \"adaptive_avg_pool2d\"".to_string(),
                "output_size = 1".into(),
            ];
            if supported(&ada) {
                write_table(o, &ada);
                write_table(o, &flatten);
            } else {
                o.line("# [[layers]]");
                o.line("# type = \"global_avg_pool\"");
                o.line("");
                write_table(o, &flatten);
            }
        }
        flow.shape = Some(vec![c]);
        return;
    }
    let side = if inp.is_multiple_of(c) {
        let a = inp / c;
        let r = (a as f64).sqrt().round() as usize;
        (r * r == a && r <= h.min(w)).then_some(r)
    } else {
        None
    };
    match side {
        Some(r) => {
            let ada = [
                "type = \"adaptive_avg_pool2d\"".to_string(),
                format!("output_size = {r}"),
            ];
            let ok = supported(&ada);
            o.todo(&format!(
                "the convolutions (with the guessed strides and padding) give {c}×{h}×{w} = {} \
                 values, but '{name}' takes {inp} = {c}×{r}×{r}: the maps must shrink from \
                 {h}×{w} to {r}×{r}. {} Replace it by your model's pooling (max_pool2d, \
                 avg_pool2d) and strides.",
                c * h * w,
                if ok {
                    "An adaptive average pool to that size is written so that the file runs."
                } else {
                    "Pooling is needed here."
                }
            ));
            if ok {
                write_table(o, &ada);
            }
            write_table(o, &flatten);
            flow.shape = Some(vec![if ok { inp } else { c * h * w }]);
        }
        None => {
            o.todo(&format!(
                "the convolutions give {c}×{h}×{w} = {} values but '{name}' takes {inp}: add \
                 the pooling and strides of your model.",
                c * h * w
            ));
            write_table(o, &flatten);
            flow.shape = Some(vec![c * h * w]);
        }
    }
}

/// How the spec refers to `path`: relative to the spec's directory when that needs at most
/// two `..`, else absolute.
fn spec_path(path: &Path, spec_dir: &Path) -> PathBuf {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn src(tensors: &[(&str, &[usize])]) -> Source {
        Source {
            checkpoint: "ckpt.safetensors".into(),
            tensors: tensors
                .iter()
                .map(|(n, s)| (n.to_string(), "F32".to_string(), s.to_vec()))
                .collect(),
            order: None,
            aliases: vec![],
        }
    }

    fn draft(s: &Source) -> Draft {
        let d = draft_from(s, None, Path::new("model.toml")).unwrap();
        Spec::parse(&d.text, Path::new("model.toml")).unwrap();
        d
    }

    #[test]
    fn natural_order_of_sequential_indices() {
        let mut t = vec![];
        let shapes: Vec<Vec<usize>> = (0..12).map(|i| vec![10 + i + 1, 10 + i]).collect();
        let names: Vec<String> = (0..12).map(|i| format!("features.{i}.weight")).collect();
        for (n, s) in names.iter().zip(&shapes) {
            t.push((n.as_str(), s.as_slice()));
        }
        let d = draft(&src(&t));
        let order: Vec<&str> = d.layers.iter().map(|l| l.0.as_str()).collect();
        let want: Vec<String> = (0..12).map(|i| format!("features.{i}")).collect();
        assert_eq!(order, want);
        assert!(d.text.contains("bias = false"));
        // 11 activations between 12 linear layers, none after the last.
        assert_eq!(d.text.matches("type = \"relu\"").count(), 11);
    }

    #[test]
    fn prefix_and_batch_norm_after_its_linear() {
        let d = draft(&src(&[
            ("module.bn1.bias", &[8]),
            ("module.bn1.num_batches_tracked", &[]),
            ("module.bn1.running_mean", &[8]),
            ("module.bn1.running_var", &[8]),
            ("module.bn1.weight", &[8]),
            ("module.fc1.bias", &[8]),
            ("module.fc1.weight", &[8, 4]),
            ("module.fc2.bias", &[3]),
            ("module.fc2.weight", &[3, 8]),
        ]));
        assert!(d.text.contains("prefix = \"module.\""), "{}", d.text);
        assert!(d.text.contains("batch_norm = \"running-stats\""));
        let fc1 = d.text.find("name = \"fc1\"").unwrap();
        let bn1 = d.text.find("name = \"bn1\"").unwrap();
        let relu = d.text.find("type = \"relu\"").unwrap();
        let fc2 = d.text.find("name = \"fc2\"").unwrap();
        assert!(fc1 < bn1 && bn1 < relu && relu < fc2, "{}", d.text);
        assert!(d.text.contains("type = \"batch_norm1d\""));
    }

    #[test]
    fn metadata_order_wins() {
        let mut s = src(&[
            ("a.weight", &[4, 4]),
            ("b.weight", &[4, 4]),
            ("c.weight", &[2, 4]),
        ]);
        s.order = Some(vec![
            "b.weight".into(),
            "a.weight".into(),
            "c.weight".into(),
        ]);
        let d = draft(&s);
        let order: Vec<&str> = d.layers.iter().map(|l| l.0.as_str()).collect();
        assert_eq!(order, ["b", "a", "c"]);
        assert!(d.text.contains("state_dict order recorded"));
    }

    #[test]
    fn convolutions_flatten_and_groups() {
        let d = draft(&src(&[
            ("conv1.weight", &[8, 1, 3, 3]),
            ("conv1.bias", &[8]),
            ("conv2.weight", &[16, 4, 3, 3]),
            ("conv2.bias", &[16]),
            ("fc.weight", &[10, 144]),
            ("fc.bias", &[10]),
        ]));
        // Whatever this build supports, the file parses and says what to do about convs.
        assert!(d.text.contains("kernel_size = 3"), "{}", d.text);
        assert!(d.text.contains("groups = 2"), "{}", d.text);
        assert!(d.text.contains("stride 1, padding 1"), "{}", d.text);
        let conv_supported = supported(&[
            "type = \"conv2d\"".into(),
            "in_channels = 1".into(),
            "out_channels = 1".into(),
            "kernel_size = 3".into(),
        ]);
        assert_eq!(d.skipped.is_empty(), conv_supported, "{:?}", d.skipped);
        let fc = d.text.find("name = \"fc\"").unwrap();
        let flatten = d.text.find("type = \"flatten\"").unwrap();
        assert!(flatten < fc);
    }

    #[test]
    fn transformer_parts_are_recognised() {
        let s = src(&[
            ("transformer.wte.weight", &[65, 32]),
            ("transformer.wpe.weight", &[32, 32]),
            ("transformer.h.0.ln_1.weight", &[32]),
            ("transformer.h.0.ln_1.bias", &[32]),
            ("transformer.h.0.attn.c_attn.weight", &[96, 32]),
            ("transformer.h.0.attn.c_attn.bias", &[96]),
            ("transformer.h.0.attn.c_proj.weight", &[32, 32]),
            ("transformer.h.0.attn.c_proj.bias", &[32]),
            ("transformer.h.0.mlp.c_fc.weight", &[128, 32]),
            ("transformer.h.0.mlp.c_proj.weight", &[32, 128]),
            ("transformer.ln_f.weight", &[32]),
            ("transformer.ln_f.bias", &[32]),
            ("mha.in_proj_weight", &[48, 16]),
            ("mha.in_proj_bias", &[48]),
            ("mha.out_proj.weight", &[16, 16]),
            ("mha.out_proj.bias", &[16]),
        ]);
        let (_, modules) = group(&s);
        let kinds: Vec<(&str, &Kind)> =
            modules.iter().map(|m| (m.path.as_str(), &m.kind)).collect();
        let find = |p: &str| kinds.iter().find(|k| k.0 == p).map(|k| k.1.clone());
        assert_eq!(
            find("transformer.wte"),
            Some(Kind::Embedding {
                num: 65,
                dim: 32,
                positional: false
            })
        );
        assert_eq!(
            find("transformer.wpe"),
            Some(Kind::Embedding {
                num: 32,
                dim: 32,
                positional: true
            })
        );
        assert!(matches!(
            find("transformer.h.0.attn"),
            Some(Kind::Attention {
                c: 32,
                mha: false,
                bias: true
            })
        ));
        assert!(matches!(
            find("mha"),
            Some(Kind::Attention {
                c: 16,
                mha: true,
                ..
            })
        ));
        assert_eq!(
            find("transformer.ln_f"),
            Some(Kind::LayerNorm { c: 32, bias: true })
        );
        let order: Vec<&str> = modules.iter().map(|m| m.path.as_str()).collect();
        // The state_dict order of nanoGPT: token then position embeddings, each block as
        // ln_1, attn, (ln_2,) mlp, then ln_f.
        assert_eq!(
            order,
            [
                "mha",
                "transformer.wte",
                "transformer.wpe",
                "transformer.h.0.ln_1",
                "transformer.h.0.attn",
                "transformer.h.0.mlp.c_fc",
                "transformer.h.0.mlp.c_proj",
                "transformer.ln_f"
            ]
        );
        let d = draft(&s);
        assert!(d.text.contains("multi-head self-attention"));
        assert!(d.text.contains("type = \"gelu\""));
    }

    /// The layer tables of a draft, in order: (name, type, input) with "" when absent.
    fn tables(text: &str) -> Vec<(String, String, String)> {
        let spec: toml::Table = toml::from_str(text).unwrap();
        let get = |t: &toml::Value, k: &str| match t.get(k) {
            Some(toml::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        };
        spec["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (get(t, "name"), get(t, "type"), get(t, "input")))
            .collect()
    }

    #[test]
    fn nanogpt_blocks_are_wired_with_adds_and_a_tied_head() {
        let mut s = src(&[
            ("lm_head.weight", &[65, 32]),
            ("transformer.wpe.weight", &[16, 32]),
            ("transformer.h.0.ln_1.weight", &[32]),
            ("transformer.h.0.ln_1.bias", &[32]),
            ("transformer.h.0.attn.c_attn.weight", &[96, 32]),
            ("transformer.h.0.attn.c_attn.bias", &[96]),
            ("transformer.h.0.attn.c_proj.weight", &[32, 32]),
            ("transformer.h.0.attn.c_proj.bias", &[32]),
            ("transformer.h.0.ln_2.weight", &[32]),
            ("transformer.h.0.ln_2.bias", &[32]),
            ("transformer.h.0.mlp.c_fc.weight", &[128, 32]),
            ("transformer.h.0.mlp.c_fc.bias", &[128]),
            ("transformer.h.0.mlp.c_proj.weight", &[32, 128]),
            ("transformer.h.0.mlp.c_proj.bias", &[32]),
            ("transformer.ln_f.weight", &[32]),
            ("transformer.ln_f.bias", &[32]),
        ]);
        // save_model stored the tied tensor once, under lm_head.weight.
        s.aliases = vec![("transformer.wte.weight".into(), "lm_head.weight".into())];
        let d = draft(&s);
        let t = tables(&d.text);
        let want = [
            ("transformer.wte", "embedding", "input"),
            ("transformer.wpe", "positional_embedding", "input"),
            (
                "transformer.embed_add",
                "add",
                r#"["transformer.wte", "transformer.wpe"]"#,
            ),
            ("transformer.h.0.ln_1", "layer_norm", ""),
            ("transformer.h.0.attn", "causal_self_attention", ""),
            (
                "transformer.h.0.add1",
                "add",
                r#"["transformer.embed_add", "transformer.h.0.attn"]"#,
            ),
            ("transformer.h.0.ln_2", "layer_norm", ""),
            ("transformer.h.0.mlp.c_fc", "linear", ""),
            ("", "gelu", ""),
            ("transformer.h.0.mlp.c_proj", "linear", ""),
            (
                "transformer.h.0.add2",
                "add",
                r#"["transformer.h.0.add1", "transformer.h.0.mlp.c_proj"]"#,
            ),
            ("transformer.ln_f", "layer_norm", ""),
            ("lm_head", "linear", ""),
        ];
        let got: Vec<(&str, &str, &str)> = t
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
            .collect();
        assert_eq!(got, want, "{}", d.text);
        assert!(
            d.text
                .contains("tied = { weight = \"transformer.wte.weight\" }"),
            "{}",
            d.text
        );
        // 32 channels: not a multiple of 64, one head guessed, and the TODO says so.
        assert!(d.text.contains("n_head = 1"), "{}", d.text);
        assert!(d.text.contains("1, 2, 4, 8, 16, 32 heads"), "{}", d.text);
        assert!(d.skipped.is_empty(), "{:?}", d.skipped);
    }

    #[test]
    fn multihead_attention_layout() {
        let d = draft(&src(&[
            ("enc.0.norm1.weight", &[128]),
            ("enc.0.norm1.bias", &[128]),
            ("enc.0.attn.in_proj_weight", &[384, 128]),
            ("enc.0.attn.in_proj_bias", &[384]),
            ("enc.0.attn.out_proj.weight", &[128, 128]),
            ("enc.0.attn.out_proj.bias", &[128]),
            ("enc.0.norm2.weight", &[128]),
            ("enc.0.norm2.bias", &[128]),
            ("enc.0.mlp.fc1.weight", &[512, 128]),
            ("enc.0.mlp.fc1.bias", &[512]),
            ("enc.0.mlp.fc2.weight", &[128, 512]),
            ("enc.0.mlp.fc2.bias", &[128]),
        ]));
        assert!(
            d.text.contains("type = \"multihead_attention\""),
            "{}",
            d.text
        );
        assert!(d.text.contains("embed_dim = 128"), "{}", d.text);
        assert!(d.text.contains("num_heads = 2"), "{}", d.text);
        assert!(d.text.contains("causal = true"), "{}", d.text);
        let names: Vec<String> = tables(&d.text).into_iter().map(|t| t.0).collect();
        assert_eq!(
            names,
            [
                "enc.0.norm1",
                "enc.0.attn",
                "enc.0.add1",
                "enc.0.norm2",
                "enc.0.mlp.fc1",
                "",
                "enc.0.mlp.fc2",
                "enc.0.add2"
            ]
        );
    }

    #[test]
    fn resnet_blocks_get_shortcuts_strides_and_adds() {
        let d = draft(&src(&[
            ("conv1.weight", &[8, 3, 3, 3]),
            ("bn1.weight", &[8]),
            ("bn1.bias", &[8]),
            ("bn1.running_mean", &[8]),
            ("bn1.running_var", &[8]),
            ("layer1.0.conv1.weight", &[16, 8, 3, 3]),
            ("layer1.0.bn1.weight", &[16]),
            ("layer1.0.bn1.bias", &[16]),
            ("layer1.0.bn1.running_mean", &[16]),
            ("layer1.0.bn1.running_var", &[16]),
            ("layer1.0.conv2.weight", &[16, 16, 3, 3]),
            ("layer1.0.bn2.weight", &[16]),
            ("layer1.0.bn2.bias", &[16]),
            ("layer1.0.bn2.running_mean", &[16]),
            ("layer1.0.bn2.running_var", &[16]),
            ("layer1.0.downsample.0.weight", &[16, 8, 1, 1]),
            ("layer1.0.downsample.1.weight", &[16]),
            ("layer1.0.downsample.1.bias", &[16]),
            ("layer1.0.downsample.1.running_mean", &[16]),
            ("layer1.0.downsample.1.running_var", &[16]),
            ("fc.weight", &[10, 16]),
            ("fc.bias", &[10]),
        ]));
        let t = tables(&d.text);
        let row = |n: &str| t.iter().find(|r| r.0 == n).unwrap().clone();
        // The stem's activation is named so that the block can read it.
        assert_eq!(row("layer1.0.conv1").2, "relu");
        assert_eq!(row("layer1.0.downsample.0").2, "relu");
        assert_eq!(
            row("layer1.0.add").2,
            r#"["layer1.0.bn2", "layer1.0.downsample.1"]"#
        );
        assert_eq!(row("layer1.0.relu").1, "relu");
        let spec: toml::Table = toml::from_str(&d.text).unwrap();
        let layer = |n: &str| {
            spec["layers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l.get("name").and_then(|v| v.as_str()) == Some(n))
                .unwrap()
                .clone()
        };
        // 8 → 16 channels: stride 2 on conv1 and the shortcut, not on conv2; the shortcut
        // reads 8 channels (no groups).
        assert_eq!(layer("layer1.0.conv1")["stride"].as_integer(), Some(2));
        assert_eq!(layer("layer1.0.conv2")["stride"].as_integer(), Some(1));
        let short = layer("layer1.0.downsample.0");
        assert_eq!(short["stride"].as_integer(), Some(2));
        assert_eq!(short["in_channels"].as_integer(), Some(8));
        assert!(short.get("groups").is_none());
        // One activation inside the block (after bn1), none after bn2 (the add comes first).
        let types: Vec<&str> = t.iter().map(|r| r.1.as_str()).collect();
        let i = types.iter().position(|&x| x == "add").unwrap();
        assert_eq!(types[i + 1], "relu");
        assert_eq!(types.iter().filter(|&&x| x == "relu").count(), 3);
    }

    #[test]
    fn unknown_modules_become_comments() {
        let d = draft(&src(&[
            ("fc.weight", &[3, 4]),
            ("fc.bias", &[3]),
            ("odd.weight_g", &[3, 1]),
            ("odd.weight_v", &[3, 4]),
        ]));
        assert_eq!(d.skipped, ["odd"]);
        assert!(d.text.contains("#     odd.weight_g"));
    }

    #[test]
    fn relative_spec_paths() {
        let dir = std::env::temp_dir().join(format!("lca-init-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/data")).unwrap();
        std::fs::write(dir.join("a/data/train.safetensors"), b"x").unwrap();
        assert_eq!(
            spec_path(&dir.join("a/data/train.safetensors"), &dir.join("a")),
            PathBuf::from("data/train.safetensors")
        );
        std::fs::create_dir_all(dir.join("b")).unwrap();
        assert_eq!(
            spec_path(&dir.join("a/data/train.safetensors"), &dir.join("b")),
            PathBuf::from("../a/data/train.safetensors")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn segments_compare_naturally() {
        assert!(natural_key("features.10") > natural_key("features.9"));
        assert!(natural_key("fc10") > natural_key("fc9"));
        assert!(natural_key("layer1.0.conv1") < natural_key("layer1.0.conv2"));
        assert!(natural_key("fc") > natural_key("layer4.1.conv2"));
    }
}
