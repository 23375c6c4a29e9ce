//! Recognising modules: group the tensors by module, say what each module is, and order them.

use super::*;
// ---------------------------------------------------------------------------------------
// Recognising modules

/// One tensor of the checkpoint.
#[derive(Debug, Clone)]
pub(super) struct Tensor {
    /// Full name, as in the file.
    pub(super) full: String,
    pub(super) dtype: String,
    pub(super) shape: Vec<usize>,
}

/// What a module's tensors say it is.
#[derive(Debug, Clone)]
pub(super) enum Kind {
    /// A layer type of the registry ([`DRAFTERS`]): the spec layer its tensors tell and the
    /// drafter that recognised it.
    Layer {
        kind: LayerKind,
        drafter: &'static Drafter,
    },
    /// Recognised but not supported, or not recognised: why.
    Other { what: String },
}

impl Kind {
    /// The spec layer, when the module is one.
    pub(super) fn layer(&self) -> Option<&LayerKind> {
        match self {
            Kind::Layer { kind, .. } => Some(kind),
            Kind::Other { .. } => None,
        }
    }

    /// The part the layer plays, when the module is one.
    pub(super) fn role(&self) -> Option<Role> {
        match self {
            Kind::Layer { drafter, .. } => Some(drafter.role),
            Kind::Other { .. } => None,
        }
    }

    pub(super) fn is(&self, role: Role) -> bool {
        self.role() == Some(role)
    }

    pub(super) fn is_conv(&self) -> bool {
        matches!(self.layer(), Some(LayerKind::Conv2d { .. }))
    }

    pub(super) fn is_batch_norm(&self) -> bool {
        matches!(
            self.layer(),
            Some(LayerKind::BatchNorm1d(_) | LayerKind::BatchNorm2d(_))
        )
    }
}

#[derive(Debug, Clone)]
pub(super) struct Module {
    /// Module path without the prefix (`features.0`), the layer name.
    pub(super) path: String,
    pub(super) tensors: Vec<Tensor>,
    pub(super) kind: Kind,
    /// Position in the metadata order, when there is one.
    pub(super) rank: Option<usize>,
    /// Tied parameters: `(suffix, name of the tensor it shares, without the prefix)`, set on
    /// the later of two modules that share a tensor.
    pub(super) tied: Vec<(String, String)>,
}

pub(super) fn is_float(dtype: &str) -> bool {
    matches!(dtype, "F32" | "F64" | "F16" | "BF16")
}

pub(super) fn last_component(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// What a module is: the first drafter of the registry that recognises its tensors; a
/// module with a tensor that is not a float parameter, or that no drafter claims, is left out.
pub(super) fn classify(path: &str, t: &BTreeMap<String, Tensor>) -> Kind {
    // A layer's name is its module path: the spec needs it non-empty and not `input`.
    if path.is_empty() || path == "input" {
        return Kind::Other {
            what: format!(
                "{}: a [[layers]] name must be non-empty and not 'input' (the model input), \
                 so no spec layer can own {}",
                if path.is_empty() {
                    "its tensors have no module name"
                } else {
                    "its module is named 'input'"
                },
                t.values()
                    .map(|x| format!("'{}'", x.full))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
    }
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
    let view = ModuleTensors {
        path,
        shapes: t
            .iter()
            .filter(|(k, _)| *k != "num_batches_tracked")
            .map(|(k, x)| (k.as_str(), x.shape.as_slice()))
            .collect(),
    };
    for &drafter in DRAFTERS {
        match (drafter.recognise)(&view) {
            Some(Recognised::Layer(kind)) => return Kind::Layer { kind, drafter },
            Some(Recognised::Unsupported(what)) => return Kind::Other { what },
            None => {}
        }
    }
    Kind::Other {
        what: if view.shapes.is_empty() {
            "only a num_batches_tracked counter".into()
        } else {
            "an unrecognised set of tensors".into()
        },
    }
}

/// Strip wrappers that prefix every name (`module.` of DataParallel, `_orig_mod.` of
/// torch.compile) into `model.prefix`.
pub(super) fn common_prefix(names: &[&str]) -> String {
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

pub(super) fn group(src: &Source) -> (String, Vec<Module>) {
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
pub(super) enum Seg {
    Num(u64),
    Text(String),
}

pub(super) fn segments(s: &str) -> Vec<Seg> {
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

pub(super) fn seg(s: &str, digits: bool) -> Seg {
    match (digits, s.parse()) {
        (true, Ok(n)) => Seg::Num(n),
        _ => Seg::Text(s.to_string()),
    }
}

/// Where a component goes among its siblings: token embeddings first, then position tables;
/// final norms and heads last.
pub(super) fn component_class(c: &str) -> u8 {
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

pub(super) fn natural_key(path: &str) -> Vec<(u8, Vec<Seg>)> {
    path.split('.')
        .map(|c| (component_class(c), segments(c)))
        .collect()
}

/// The number at the end of a module's last component (`bn1` → 1), with the component's
/// letters.
pub(super) fn trailing_number(path: &str) -> Option<(&str, u64)> {
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
pub(super) fn order_modules(modules: &mut [Module]) {
    if modules.iter().all(|m| m.rank.is_some()) {
        modules.sort_by_key(|m| m.rank);
        return;
    }
    let is_norm = |k: &Kind| k.is(Role::Norm);
    let is_weighted = |k: &Kind| k.is(Role::Weighted);
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
        .filter(|m| m.kind.is(Role::Attention))
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
