//! Which lines a per-layer figure draws, so that it stays readable with 50 layers and more:
//! layers (or blocks, `--by block`) in model order, at most [`MAX_SERIES`] of them — the
//! largest by |total LCA| — and the others summed into one "the rest" series; the running
//! statistics of batch norm (`buffers`) are a series of their own, marked as buffers, never
//! counted as a layer.

use crate::summarize::block_of;

/// At most this many layer (or block) series; the others are summed into "the rest".
pub const MAX_SERIES: usize = 9;

/// The name of the group that holds batch-norm running statistics.
pub const BUFFERS: &str = "buffers";

/// How figures group layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum GroupBy {
    /// One series per layer (the largest ones and "the rest").
    #[default]
    Layer,
    /// One series per block: the layer name up to its first numeric component
    /// (`layer1.0.conv1` → `layer1.0`), as `summarize --by block`.
    Block,
}

/// What a series stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesKind {
    /// A layer or block.
    Group,
    /// The sum of this many layers or blocks not drawn on their own.
    Rest(usize),
    /// Batch-norm running statistics (not a layer).
    Buffers,
}

/// One line of a per-layer figure: its name, kind and per-step values.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub kind: SeriesKind,
    pub values: Vec<f64>,
}

impl Series {
    /// The label of the series in a legend.
    pub fn label(&self, by: GroupBy) -> String {
        match self.kind {
            SeriesKind::Group => self.name.clone(),
            SeriesKind::Rest(n) => format!(
                "the other {n} {}",
                match (by, n) {
                    (GroupBy::Layer, 1) => "layer",
                    (GroupBy::Layer, _) => "layers",
                    (GroupBy::Block, 1) => "block",
                    (GroupBy::Block, _) => "blocks",
                }
            ),
            SeriesKind::Buffers => "buffers (running stats)".into(),
        }
    }
}

/// Group per-layer, per-step values (model order) into the series to draw: at most `max`
/// layers or blocks, the largest by |Σ values|, in model order, then "the rest", then the
/// buffers.
pub fn select(per_layer: Vec<(String, Vec<f64>)>, by: GroupBy, max: usize) -> Vec<Series> {
    let n = per_layer.first().map_or(0, |(_, v)| v.len());
    let mut buffers = None;
    let mut groups: Vec<(String, Vec<f64>)> = Vec::new();
    for (name, v) in per_layer {
        if name == BUFFERS {
            buffers = Some(v);
            continue;
        }
        let key = match by {
            GroupBy::Layer => name.clone(),
            GroupBy::Block => block_of(&name).to_string(),
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, acc)) => acc.iter_mut().zip(&v).for_each(|(a, b)| *a += b),
            None => groups.push((key, v)),
        }
    }
    let mut out: Vec<Series> = Vec::new();
    if groups.len() <= max {
        out.extend(groups.into_iter().map(|(name, values)| Series {
            name,
            kind: SeriesKind::Group,
            values,
        }));
    } else {
        let total = |v: &[f64]| v.iter().sum::<f64>().abs();
        let mut rank: Vec<usize> = (0..groups.len()).collect();
        rank.sort_by(|&a, &b| total(&groups[b].1).total_cmp(&total(&groups[a].1)));
        let keep: std::collections::BTreeSet<usize> = rank[..max].iter().copied().collect();
        let mut rest = vec![0.0; n];
        let mut count = 0;
        for (i, (name, values)) in groups.into_iter().enumerate() {
            if keep.contains(&i) {
                out.push(Series {
                    name,
                    kind: SeriesKind::Group,
                    values,
                });
            } else {
                rest.iter_mut().zip(&values).for_each(|(a, b)| *a += b);
                count += 1;
            }
        }
        out.push(Series {
            name: "rest".into(),
            kind: SeriesKind::Rest(count),
            values: rest,
        });
    }
    if let Some(values) = buffers {
        out.push(Series {
            name: BUFFERS.into(),
            kind: SeriesKind::Buffers,
            values,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(n: usize) -> Vec<(String, Vec<f64>)> {
        (0..n)
            .map(|i| {
                (
                    format!("blocks.{}.fc{}", i / 2, i % 2 + 1),
                    vec![-(i as f64), 1.0],
                )
            })
            .collect()
    }

    #[test]
    fn many_layers_become_the_largest_and_the_rest() {
        let s = select(layers(40), GroupBy::Layer, 9);
        assert_eq!(s.len(), 10);
        let kept: Vec<&str> = s[..9].iter().map(|x| x.name.as_str()).collect();
        // The largest |total| are the last layers (total 1 − i), in model order.
        assert_eq!(kept[0], "blocks.15.fc2");
        assert_eq!(kept[8], "blocks.19.fc2");
        assert_eq!(s[9].kind, SeriesKind::Rest(31));
        // Nothing is lost: the series add up to the layers.
        for t in 0..2 {
            let all: f64 = layers(40).iter().map(|(_, v)| v[t]).sum();
            let drawn: f64 = s.iter().map(|x| x.values[t]).sum();
            assert!((all - drawn).abs() < 1e-12);
        }
        assert_eq!(s[9].label(GroupBy::Layer), "the other 31 layers");
    }

    #[test]
    fn blocks_and_buffers() {
        let mut l = layers(6);
        l.push(("buffers".into(), vec![0.5, 0.5]));
        let s = select(l, GroupBy::Block, 9);
        let names: Vec<&str> = s.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["blocks.0", "blocks.1", "blocks.2", "buffers"]);
        assert_eq!(s[0].values, vec![-1.0, 2.0]);
        assert_eq!(s[3].kind, SeriesKind::Buffers);
        assert_eq!(s[3].label(GroupBy::Block), "buffers (running stats)");
    }
}
