//! `lca summarize`: coarser views of an analysis, read back from its output directory.
//!
//! - `layer`, `tensor`: totals over the run (from `summary.json`);
//! - `step` (alias `iteration`): per-step losses, ΣLCA, residual, helped fraction;
//! - `neuron`: a neuron (channel) is index `i` along axis 0 of its layer's weight — the sum
//!   over every other axis of the weight, plus its bias entry (from `params.csv`); a layer
//!   with sub-modules (attention's `c_attn`, `c_proj`) has neurons per sub-module;
//! - `param`: single parameters (from `params.csv`);
//! - `head`: attention heads — head h's rows of q, k and v in the in-projection and its
//!   columns of the output projection, with the output bias as a row of its own (from
//!   `params.csv` and the attention layers recorded in `summary.json`).
//!
//! Output as an aligned table for people, or CSV / JSON for scripts.

use crate::error::{LcaError, Result};
use crate::output::ParamTotals;
use crate::output::totals::read_totals;
use crate::output::{Summary, json::read_summary};
use std::collections::BTreeMap;
use std::path::Path;

/// Which view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Layer,
    /// Layers grouped by block: the name up to its first numeric component
    /// (`layer1.0.conv1` → `layer1.0`, `transformer.h.3.attn` → `transformer.h.3`).
    Block,
    Tensor,
    Neuron,
    #[value(alias = "iteration")]
    Step,
    Param,
    /// Attention heads: head h's q, k, v rows of the in-projection and its columns of the
    /// output projection; the output-projection bias is shared and gets its own row.
    Head,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// Row order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sort {
    /// Model (or step) order; the default for layer, tensor and step.
    Order,
    /// Most helpful (most negative LCA) first; the default for neuron and param.
    Helped,
    /// Most hurtful (most positive LCA) first.
    Hurt,
    /// Largest |LCA| first.
    Abs,
}

/// A value in a table.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Str(String),
    Int(u64),
    Float(f64),
}

/// A view as columns and rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Cell>>,
    /// Index of the LCA column used for sorting.
    lca_col: usize,
}

fn share(lca: f64, delta: f64) -> f64 {
    if delta != 0.0 {
        lca / delta.abs()
    } else {
        f64::NAN
    }
}

/// The table of group totals (layers, tensors or blocks), with the `layer` column for tensors.
fn group_table(g: &[crate::output::GroupTotal], with_layer: bool, delta: f64) -> Table {
    let mut columns = vec!["name"];
    if with_layer {
        columns.push("layer");
    }
    columns.extend([
        "params",
        "lca",
        "share_of_abs_delta",
        "helped",
        "zero",
        "hurt",
        "helped_fraction",
    ]);
    let has_val = g.iter().any(|t| t.val_lca.is_some());
    let has_l2 = g.iter().any(|t| t.l2_lca.is_some());
    if has_val {
        columns.push("val_lca");
    }
    if has_l2 {
        columns.push("l2_lca");
    }
    // The error bar of `lca` (docs/integration.md, "Error estimate"), when the run has one.
    let has_err = g.iter().any(|t| t.lca_err.is_some());
    if has_err {
        columns.push("±lca");
    }
    let rows = g
        .iter()
        .map(|t| {
            let mut r = vec![Cell::Str(t.name.clone())];
            if with_layer {
                r.push(Cell::Str(t.layer.clone()));
            }
            r.extend([
                Cell::Int(t.params as u64),
                Cell::Float(t.lca),
                Cell::Float(share(t.lca, delta)),
                Cell::Int(t.helped),
                Cell::Int(t.zero),
                Cell::Int(t.hurt),
                Cell::Float(t.helped_fraction),
            ]);
            if has_val {
                r.push(Cell::Float(t.val_lca.unwrap_or(f64::NAN)));
            }
            if has_l2 {
                r.push(Cell::Float(t.l2_lca.unwrap_or(f64::NAN)));
            }
            if has_err {
                r.push(Cell::Float(t.lca_err.unwrap_or(f64::NAN)));
            }
            r
        })
        .collect();
    Table {
        columns,
        rows,
        lca_col: if with_layer { 3 } else { 2 },
    }
}

/// Build the requested view (every row).
pub fn view(dir: &Path, by: By) -> Result<(Summary, Table)> {
    view_top(dir, by, Sort::Order, None)
}

/// Build the requested view; with `top` and an order other than [`Sort::Order`], the
/// per-parameter view keeps only the rows that [`Table::sort_and_limit`] would keep (so
/// that it never builds millions of rows for a top-N question).
pub fn view_top(dir: &Path, by: By, sort: Sort, top: Option<usize>) -> Result<(Summary, Table)> {
    let s = read_summary(dir)?;
    let delta = s.run.delta_loss;
    let table = match by {
        By::Block => {
            let mut order: Vec<String> = Vec::new();
            let mut acc: BTreeMap<String, crate::output::GroupTotal> = BTreeMap::new();
            for l in &s.layers {
                let b = block_of(&l.name).to_string();
                let e = acc.entry(b.clone()).or_insert_with(|| {
                    order.push(b.clone());
                    crate::output::GroupTotal {
                        name: b.clone(),
                        layer: b.clone(),
                        params: 0,
                        lca: 0.0,
                        helped: 0,
                        zero: 0,
                        hurt: 0,
                        helped_fraction: 0.0,
                        val_lca: l.val_lca.map(|_| 0.0),
                        l2_lca: l.l2_lca.map(|_| 0.0),
                        lca_err: l.lca_err.map(|_| 0.0),
                    }
                });
                // A block's bar: the sum of its layers' (a bound; their errors may correlate).
                if let (Some(a), Some(b)) = (e.lca_err.as_mut(), l.lca_err) {
                    *a += b;
                }
                e.params += l.params;
                e.lca += l.lca;
                e.helped += l.helped;
                e.zero += l.zero;
                e.hurt += l.hurt;
                e.helped_fraction = e.helped as f64 / e.params.max(1) as f64;
                e.val_lca = e.val_lca.zip(l.val_lca).map(|(a, b)| a + b);
                e.l2_lca = e.l2_lca.zip(l.l2_lca).map(|(a, b)| a + b);
            }
            let blocks: Vec<crate::output::GroupTotal> =
                order.iter().map(|b| acc[b].clone()).collect();
            let mut t = group_table(&blocks, false, delta);
            t.columns[0] = "block";
            t
        }
        By::Layer => {
            let mut t = group_table(&s.layers, false, delta);
            t.columns[0] = "layer";
            t
        }
        By::Tensor => {
            let mut t = group_table(&s.tensors, true, delta);
            t.columns[0] = "tensor";
            t
        }
        By::Step => Table {
            columns: vec![
                "step",
                "next_step",
                "loss_before",
                "loss_after",
                "delta_loss",
                "lca_sum",
                "residual",
                "splits",
                "helped_fraction",
            ],
            rows: s
                .steps
                .iter()
                .map(|r| {
                    vec![
                        Cell::Int(r.step),
                        Cell::Int(r.next_step),
                        Cell::Float(r.loss_before),
                        Cell::Float(r.loss_after),
                        Cell::Float(r.delta_loss),
                        Cell::Float(r.lca_sum),
                        Cell::Float(r.residual),
                        Cell::Int(r.splits as u64),
                        Cell::Float(r.helped_fraction),
                    ]
                })
                .collect(),
            lca_col: 5,
        },
        By::Param => param_view(&s, &read_totals(dir, &s)?, sort, top),
        By::Head => head_view(&s, &read_totals(dir, &s)?, delta)?,
        By::Neuron => neuron_view(&s, &read_totals(dir, &s)?, delta),
    };
    Ok((s, table))
}

/// Single parameters (buffers excluded: they are not trained), with their flat and
/// multi-dimensional index.
fn param_view(s: &Summary, t: &ParamTotals, sort: Sort, top: Option<usize>) -> Table {
    let mut keys: Vec<(f64, u32, u32)> = Vec::new();
    for (pi, p) in s.model.params.iter().enumerate() {
        if p.buffer {
            continue;
        }
        keys.extend(
            t.lca[pi]
                .iter()
                .enumerate()
                .map(|(k, &v)| (v, pi as u32, k as u32)),
        );
    }
    if let Some(n) = top.filter(|_| sort != Sort::Order) {
        let key = |v: f64| match sort {
            Sort::Helped => v,
            Sort::Hurt => -v,
            _ => -v.abs(),
        };
        if n < keys.len() {
            keys.select_nth_unstable_by(n, |a, b| key(a.0).total_cmp(&key(b.0)));
            keys.truncate(n);
        }
    }
    let rows = keys
        .into_iter()
        .map(|(v, pi, k)| {
            let (pi, k) = (pi as usize, k as usize);
            let p = &s.model.params[pi];
            let index = crate::output::csv::unravel(k, &p.shape)
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            vec![
                Cell::Str(p.name.clone()),
                Cell::Str(p.layer.clone()),
                Cell::Int(k as u64),
                Cell::Str(format!("[{index}]")),
                Cell::Float(v),
                Cell::Int(t.helped_steps[pi][k] as u64),
                Cell::Int(t.hurt_steps[pi][k] as u64),
            ]
        })
        .collect();
    Table {
        columns: vec![
            "tensor",
            "layer",
            "flat_index",
            "index",
            "lca",
            "helped_steps",
            "hurt_steps",
        ],
        rows,
        lca_col: 4,
    }
}

/// Neurons (channels): index i along axis 0 of each of a layer's (sub-module's) tensors.
fn neuron_view(s: &Summary, t: &ParamTotals, delta: f64) -> Table {
    let order: Vec<&str> = s.model.layers.iter().map(|l| l.as_str()).collect();
    let mut acc: BTreeMap<(usize, &str, usize), (f64, usize)> = BTreeMap::new();
    for (pi, p) in s.model.params.iter().enumerate() {
        if p.shape.is_empty() || p.buffer {
            continue;
        }
        let per = (p.numel / p.shape[0].max(1)).max(1);
        let unit = unit_of(&p.role);
        let li = order
            .iter()
            .position(|l| *l == p.layer)
            .unwrap_or(usize::MAX);
        for (n, chunk) in t.lca[pi].chunks(per).enumerate() {
            let e = acc.entry((li, unit, n)).or_insert((0.0, 0));
            e.0 += chunk.iter().sum::<f64>();
            e.1 += chunk.len();
        }
    }
    Table {
        columns: vec!["layer", "neuron", "params", "lca", "share_of_abs_delta"],
        rows: acc
            .into_iter()
            .map(|((li, unit, n), (lca, k))| {
                let layer = order.get(li).map_or("?".into(), |s| s.to_string());
                vec![
                    Cell::Str(if unit.is_empty() {
                        layer
                    } else {
                        format!("{layer}.{unit}")
                    }),
                    Cell::Int(n as u64),
                    Cell::Int(k as u64),
                    Cell::Float(lca),
                    Cell::Float(share(lca, delta)),
                ]
            })
            .collect(),
        lca_col: 3,
    }
}

/// The sub-module of a parameter role: `c_attn.weight` → `c_attn`, `in_proj_bias` →
/// `in_proj`, `weight` → `` (the layer itself).
pub fn unit_of(role: &str) -> &str {
    match role.rsplit_once('.') {
        Some((unit, _)) => unit,
        None => role
            .strip_suffix("_weight")
            .or_else(|| role.strip_suffix("_bias"))
            .unwrap_or(""),
    }
}

/// Per-head totals of attention layers from per-parameter totals; see [`By::Head`].
fn head_view(s: &Summary, totals: &ParamTotals, delta: f64) -> Result<Table> {
    let att = &s.model.attention;
    if att.is_empty() {
        return Err(LcaError::Usage(
            "--by head: the analysed model has no attention layers".into(),
        ));
    }
    // Parts of a head's row: q, k, v (in-projection) and out (output projection).
    #[derive(Default, Clone)]
    struct Acc {
        params: usize,
        lca: f64,
        parts: [f64; 4],
        signs: [u64; 3],
    }
    let width = |name: &str| s.model.last_axis(name);
    // For every tensor of an attention layer: (layer index, role).
    #[derive(Clone, Copy)]
    enum Role {
        InWeight(usize),
        InBias,
        OutWeight(usize),
        OutBias,
    }
    let mut roles: BTreeMap<&str, (usize, Role)> = BTreeMap::new();
    for (li, a) in att.iter().enumerate() {
        roles.insert(
            &a.in_proj_weight,
            (li, Role::InWeight(width(&a.in_proj_weight))),
        );
        roles.insert(
            &a.out_proj_weight,
            (li, Role::OutWeight(width(&a.out_proj_weight))),
        );
        if let Some(b) = &a.in_proj_bias {
            roles.insert(b, (li, Role::InBias));
        }
        if let Some(b) = &a.out_proj_bias {
            roles.insert(b, (li, Role::OutBias));
        }
    }
    // heads + 1 slots per layer: the heads, then the shared output bias.
    let mut acc: Vec<Vec<Acc>> = att
        .iter()
        .map(|a| vec![Acc::default(); a.heads + 1])
        .collect();
    for (pi, p) in s.model.params.iter().enumerate() {
        let Some(&(li, role)) = roles.get(p.name.as_str()) else {
            continue;
        };
        let a = &att[li];
        let c = a.heads * a.head_dim;
        for (flat, &lca) in totals.lca[pi].iter().enumerate() {
            let (slot, part) = match role {
                Role::InWeight(cols) => {
                    let r = flat / cols;
                    ((r % c) / a.head_dim, r / c)
                }
                Role::InBias => ((flat % c) / a.head_dim, flat / c),
                Role::OutWeight(cols) => ((flat % cols) / a.head_dim, 3),
                Role::OutBias => (a.heads, 3),
            };
            let e = &mut acc[li][slot.min(a.heads)];
            e.params += 1;
            e.lca += lca;
            e.parts[part.min(3)] += lca;
            e.signs[if lca < 0.0 {
                0
            } else if lca > 0.0 {
                2
            } else {
                1
            }] += 1;
        }
    }
    let mut out = Vec::new();
    for (a, heads) in att.iter().zip(acc) {
        for (h, e) in heads.into_iter().enumerate() {
            if h == a.heads && e.params == 0 {
                continue;
            }
            out.push(vec![
                Cell::Str(a.layer.clone()),
                Cell::Str(if h == a.heads {
                    "bias".into()
                } else {
                    h.to_string()
                }),
                Cell::Int(e.params as u64),
                Cell::Float(e.lca),
                Cell::Float(share(e.lca, delta)),
                Cell::Int(e.signs[0]),
                Cell::Int(e.signs[1]),
                Cell::Int(e.signs[2]),
                Cell::Float(e.signs[0] as f64 / e.params.max(1) as f64),
                Cell::Float(e.parts[0]),
                Cell::Float(e.parts[1]),
                Cell::Float(e.parts[2]),
                Cell::Float(e.parts[3]),
            ]);
        }
    }
    Ok(Table {
        columns: vec![
            "layer",
            "head",
            "params",
            "lca",
            "share_of_abs_delta",
            "helped",
            "zero",
            "hurt",
            "helped_fraction",
            "q_lca",
            "k_lca",
            "v_lca",
            "out_lca",
        ],
        rows: out,
        lca_col: 3,
    })
}

/// The block of a layer name: up to and including its first purely numeric dotted component
/// (PyTorch's `nn.Sequential`/`nn.ModuleList` index), else the whole name.
pub fn block_of(name: &str) -> &str {
    let mut end = 0;
    for part in name.split('.') {
        end += part.len();
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            return &name[..end];
        }
        end += 1;
    }
    name
}

impl Table {
    /// Sort rows and keep the first `top`.
    pub fn sort_and_limit(&mut self, sort: Sort, top: Option<usize>) {
        let c = self.lca_col;
        let key = |r: &Vec<Cell>| match r[c] {
            Cell::Float(v) => v,
            _ => 0.0,
        };
        match sort {
            Sort::Order => {}
            Sort::Helped => self.rows.sort_by(|a, b| key(a).total_cmp(&key(b))),
            Sort::Hurt => self.rows.sort_by(|a, b| key(b).total_cmp(&key(a))),
            Sort::Abs => self
                .rows
                .sort_by(|a, b| key(b).abs().total_cmp(&key(a).abs())),
        }
        if let Some(n) = top {
            self.rows.truncate(n);
        }
    }

    /// Render as aligned text columns.
    pub fn to_text(&self) -> String {
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                r.iter()
                    .map(|c| match c {
                        Cell::Str(s) => s.clone(),
                        Cell::Int(i) => i.to_string(),
                        Cell::Float(f) if f.is_nan() => "-".into(),
                        Cell::Float(f) if *f == 0.0 => "0".into(),
                        Cell::Float(f) if f.abs() >= 1e-3 && f.abs() < 1e4 => format!("{f:.6}"),
                        Cell::Float(f) => format!("{f:.4e}"),
                    })
                    .collect()
            })
            .collect();
        let mut width: Vec<usize> = self.columns.iter().map(|c| c.len()).collect();
        for r in &cells {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let numeric: Vec<bool> = (0..self.columns.len())
            .map(|i| {
                self.rows
                    .first()
                    .is_some_and(|r| !matches!(r[i], Cell::Str(_)))
            })
            .collect();
        let line = |vals: Vec<String>| {
            vals.iter()
                .enumerate()
                .map(|(i, v)| {
                    if numeric[i] {
                        format!("{v:>w$}", w = width[i])
                    } else {
                        format!("{v:<w$}", w = width[i])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let mut out = line(self.columns.iter().map(|c| c.to_string()).collect());
        out.push('\n');
        for r in cells {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }

    /// Render as CSV.
    pub fn to_csv(&self) -> Result<String> {
        let mut w = csv::Writer::from_writer(Vec::new());
        let err = |e: csv::Error| LcaError::Usage(e.to_string());
        w.write_record(&self.columns).map_err(err)?;
        for r in &self.rows {
            w.write_record(r.iter().map(|c| match c {
                Cell::Str(s) => s.clone(),
                Cell::Int(i) => i.to_string(),
                Cell::Float(f) => f.to_string(),
            }))
            .map_err(err)?;
        }
        let bytes = w.into_inner().map_err(|e| LcaError::Usage(e.to_string()))?;
        Ok(String::from_utf8(bytes).expect("csv of UTF-8 strings"))
    }

    /// Render as a JSON array of objects.
    pub fn to_json(&self) -> String {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                let m: serde_json::Map<String, serde_json::Value> = self
                    .columns
                    .iter()
                    .zip(r)
                    .map(|(k, c)| {
                        let v = match c {
                            Cell::Str(s) => serde_json::Value::from(s.clone()),
                            Cell::Int(i) => serde_json::Value::from(*i),
                            Cell::Float(f) if f.is_finite() => serde_json::Value::from(*f),
                            Cell::Float(_) => serde_json::Value::Null,
                        };
                        (k.to_string(), v)
                    })
                    .collect();
                serde_json::Value::Object(m)
            })
            .collect();
        serde_json::to_string_pretty(&rows).expect("json values") + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::block_of;

    #[test]
    fn neuron_units_follow_sub_modules() {
        use super::unit_of;
        assert_eq!(unit_of("weight"), "");
        assert_eq!(unit_of("bias"), "");
        assert_eq!(unit_of("running_mean"), "");
        assert_eq!(unit_of("c_attn.weight"), "c_attn");
        assert_eq!(unit_of("out_proj.bias"), "out_proj");
        assert_eq!(unit_of("in_proj_weight"), "in_proj");
        assert_eq!(unit_of("in_proj_bias"), "in_proj");
    }

    #[test]
    fn blocks_follow_module_indices() {
        assert_eq!(block_of("layer1.0.conv1"), "layer1.0");
        assert_eq!(block_of("transformer.h.3.attn.c_attn"), "transformer.h.3");
        assert_eq!(block_of("conv1"), "conv1");
        assert_eq!(block_of("features.0"), "features.0");
        assert_eq!(block_of("transformer.wte"), "transformer.wte");
        assert_eq!(block_of("buffers"), "buffers");
    }
}
