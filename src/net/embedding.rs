//! Embeddings: `nn.Embedding` (a table lookup of integer ids) and a learned positional
//! embedding (nanoGPT's `wpe`: the same table looked up at positions `0..T`).
//!
//! Both own `weight [num_embeddings, embedding_dim]`. The token embedding's input holds integer
//! ids (carried as floats in the data: exact below 2^24) and its output appends an
//! `embedding_dim` axis: `[N, T]` → `[N, T, C]`. The positional embedding reads only the length
//! T of its input's first per-sample axis and outputs `[N, T, C]` (the same rows for every
//! sample), to be joined with the token embedding by an `add` layer. Backward scatters the
//! output gradient into the rows that were looked up (`+=`, so a repeated id, or a weight tied
//! to another layer, accumulates); there is no gradient with respect to ids.
//!
//! ```
//! use lca::net::{embedding::Embedding, Layer, Saved};
//! use ndarray::{arr2, ArrayD};
//! let emb = Embedding { num_embeddings: 3, embedding_dim: 2, padding_idx: None };
//! let w = [0.0f32, 0.5, 1.0, 1.5, 2.0, 2.5]; // rows: id 0, 1, 2
//! let ids: ArrayD<f32> = arr2(&[[2.0f32, 0.0]]).into_dyn(); // one sequence of two tokens
//! let y = emb.forward(&[&w], &[ids.view()], &mut Saved::None);
//! assert_eq!(y.shape(), &[1, 2, 2]);
//! assert_eq!(y.as_slice().unwrap(), &[2.0, 2.5, 0.0, 0.5]);
//! ```

use super::{Backward, Layer, ParamDecl, Real, Saved};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

/// Largest table an f32-carried id can index exactly.
const MAX_IDS: usize = 1 << 24;

/// `nn.Embedding(num_embeddings, embedding_dim, padding_idx)`.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub num_embeddings: usize,
    pub embedding_dim: usize,
    /// Row whose gradient is zero, as PyTorch's `padding_idx` (already made non-negative).
    pub padding_idx: Option<usize>,
}

fn weight_decl(n: usize, c: usize) -> Vec<ParamDecl> {
    vec![ParamDecl {
        suffix: "weight",
        shape: vec![n, c],
    }]
}

impl<T: Real> Layer<T> for Embedding {
    fn params(&self) -> Vec<ParamDecl> {
        weight_decl(self.num_embeddings, self.embedding_dim)
    }

    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let [s] = inputs else {
            return Err(format!("takes 1 input, got {}", inputs.len()));
        };
        if self.num_embeddings == 0 || self.embedding_dim == 0 {
            return Err("num_embeddings and embedding_dim must be at least 1".into());
        }
        if self.num_embeddings > MAX_IDS {
            return Err(format!(
                "num_embeddings = {} is larger than 2^24, beyond the ids lca can carry exactly",
                self.num_embeddings
            ));
        }
        if let Some(p) = self.padding_idx
            && p >= self.num_embeddings
        {
            return Err(format!(
                "padding_idx must lie within num_embeddings = {}",
                self.num_embeddings
            ));
        }
        let mut o = s.clone();
        o.push(self.embedding_dim);
        Ok(o)
    }

    fn forward(
        &self,
        params: &[&[T]],
        inputs: &[ArrayViewD<T>],
        _saved: &mut Saved<T>,
    ) -> ArrayD<T> {
        let ids = &inputs[0];
        let c = self.embedding_dim;
        let w = params[0];
        let mut out = Vec::with_capacity(ids.len() * c);
        for &id in ids.iter() {
            let r = id.f64() as usize;
            out.extend_from_slice(&w[r * c..(r + 1) * c]);
        }
        let mut shape = ids.shape().to_vec();
        shape.push(c);
        ArrayD::from_shape_vec(IxDyn(&shape), out).expect("sizes match")
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        let c = self.embedding_dim;
        let g = b.grad_out.as_slice().expect("gradients are contiguous");
        let mut gp = b.grad_params;
        let gw = &mut *gp[0];
        for (k, &id) in b.inputs[0].iter().enumerate() {
            let r = id.f64() as usize;
            if self.padding_idx == Some(r) {
                continue;
            }
            for (a, &v) in gw[r * c..(r + 1) * c]
                .iter_mut()
                .zip(&g[k * c..(k + 1) * c])
            {
                *a += v;
            }
        }
        // Ids are discrete: no gradient flows into the input.
        vec![None]
    }

    fn check_model_input(&self, x: ArrayViewD<'_, f32>) -> Result<(), String> {
        let n = x.shape().first().copied().unwrap_or(0);
        let per = x.len().checked_div(n).unwrap_or(1).max(1);
        for (i, &v) in x.iter().enumerate() {
            if !(v.fract() == 0.0 && v >= 0.0 && (v as f64) < self.num_embeddings as f64) {
                let at = if per == 1 {
                    format!("sample {}", i / per)
                } else {
                    format!("sample {} position {}", i / per, i % per)
                };
                let what = if v.fract() == 0.0 && v.is_finite() {
                    "out of range"
                } else {
                    "not an integer id"
                };
                return Err(format!(
                    "token id {v} at {at} is {what}: the embedding has num_embeddings = {} (ids 0..{})",
                    self.num_embeddings,
                    self.num_embeddings - 1
                ));
            }
        }
        Ok(())
    }
}

/// A learned positional embedding: rows `0..T` of `weight [num_embeddings, embedding_dim]`,
/// the same for every sample, where T is the length of the input's first per-sample axis and
/// `num_embeddings` is the context length (nanoGPT's `block_size`).
#[derive(Debug, Clone)]
pub struct PositionalEmbedding {
    pub num_embeddings: usize,
    pub embedding_dim: usize,
}

impl<T: Real> Layer<T> for PositionalEmbedding {
    fn params(&self) -> Vec<ParamDecl> {
        weight_decl(self.num_embeddings, self.embedding_dim)
    }

    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let [s] = inputs else {
            return Err(format!("takes 1 input, got {}", inputs.len()));
        };
        match s.first() {
            None => Err("needs an input with a sequence axis ([T] token ids or [T, C])".into()),
            Some(&t) if t > self.num_embeddings => Err(format!(
                "sequences of {t} positions are longer than num_embeddings = {} (the context length, block_size)",
                self.num_embeddings
            )),
            Some(&t) => Ok(vec![t, self.embedding_dim]),
        }
    }

    fn forward(
        &self,
        params: &[&[T]],
        inputs: &[ArrayViewD<T>],
        _saved: &mut Saved<T>,
    ) -> ArrayD<T> {
        let (n, t) = (inputs[0].shape()[0], inputs[0].shape()[1]);
        let rows = &params[0][..t * self.embedding_dim];
        let mut out = Vec::with_capacity(n * rows.len());
        for _ in 0..n {
            out.extend_from_slice(rows);
        }
        ArrayD::from_shape_vec(IxDyn(&[n, t, self.embedding_dim]), out).expect("sizes match")
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        let g = b.grad_out.as_slice().expect("gradients are contiguous");
        let mut gp = b.grad_params;
        let block = b.grad_out.shape()[1] * self.embedding_dim;
        let gw = &mut gp[0][..block];
        for sample in g.chunks_exact(block) {
            for (a, &v) in gw.iter_mut().zip(sample) {
                *a += v;
            }
        }
        // The output does not depend on the input's values.
        vec![None]
    }
}

// ---------------------------------------------------------------------------------------
// Drafting (`lca init`)

use super::registry::{DraftIn, Drafted, Drafter, Lead, ModuleTensors, Recognised, Role};
use crate::spec::LayerKind;

/// `nn.Embedding`: a 2-D `weight` `[num_embeddings, embedding_dim]` and no bias, in a module
/// named like an embedding (`wte`, `embed`); a learned position table when named like one
/// (`wpe`, `pos_emb`).
pub static DRAFTER: Drafter = Drafter {
    recognise,
    role: Role::Embedding,
    draft,
};

/// A module name that reads as an embedding: `wte`, `wpe`, or containing `emb`.
pub fn embedding_like(component: &str) -> bool {
    let c = component.to_ascii_lowercase();
    c == "wte" || c == "wpe" || c.contains("emb")
}

/// A learned position table: `wpe` (nanoGPT, GPT-2), `pos_emb`, `position_embeddings`.
pub fn positional_like(component: &str) -> bool {
    let c = component.to_ascii_lowercase();
    embedding_like(&c) && (c == "wpe" || c.contains("pos"))
}

fn recognise(m: &ModuleTensors) -> Option<Recognised> {
    let w = m.weight_and_bias(2)?;
    if !embedding_like(m.last_component()) || m.has("bias") {
        return None;
    }
    let (num_embeddings, embedding_dim) = (w[0], w[1]);
    Some(Recognised::Layer(if positional_like(m.last_component()) {
        LayerKind::PositionalEmbedding {
            num_embeddings,
            embedding_dim,
        }
    } else {
        LayerKind::Embedding {
            num_embeddings,
            embedding_dim,
            padding_idx: None,
        }
    }))
}

fn draft(kind: LayerKind, at: DraftIn) -> Drafted {
    let (num, dim, positional) = match kind {
        LayerKind::Embedding {
            num_embeddings,
            embedding_dim,
            ..
        } => (num_embeddings, embedding_dim, false),
        LayerKind::PositionalEmbedding {
            num_embeddings,
            embedding_dim,
        } => (num_embeddings, embedding_dim, true),
        _ => return Drafted::as_recognised(kind, at),
    };
    let mut flow = at.flow;
    let mut lead = Vec::new();
    if positional {
        if let Some(s) = &flow.shape
            && let Some(&t) = s.last()
            && t > num
        {
            lead.push(Lead::Todo(format!(
                "'{}' holds {num} positions but the sequences are {t} long.",
                at.path
            )));
        }
        lead.push(Lead::Todo(format!(
            "'{}' is read as a learned position table (nanoGPT's wpe): rows 0..T \
             of it, added to the token embeddings. If it is a second token \
             embedding, make it type = \"embedding\".",
            at.path
        )));
    }
    flow.shape = flow.shape.take().map(|mut s| {
        s.push(dim);
        s
    });
    flow.channels = Some(dim);
    Drafted {
        lead,
        what: format!("{} {num}×{dim}", kind.type_name()),
        kind,
        explicit: &[],
        flow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::check_layer_discrete;

    /// Random integer ids in 0..n (only parameters are perturbed: ids have no gradient).
    fn ids(n: usize) -> impl Fn(usize, &mut ArrayD<f64>) {
        move |_, a: &mut ArrayD<f64>| {
            a.mapv_inplace(|v| ((v + 1.0) * 0.5 * n as f64).floor().min(n as f64 - 1.0))
        }
    }

    #[test]
    fn embedding_matches_finite_differences() {
        let e = Embedding {
            num_embeddings: 5,
            embedding_dim: 3,
            padding_idx: None,
        };
        // [N, T] ids → [N, T, C]; with 4×6 = 24 lookups of 5 rows, rows repeat (scatter-add).
        check_layer_discrete(&e, &[vec![6]], 4, 11, &ids(5));
        let p = Embedding {
            num_embeddings: 5,
            embedding_dim: 2,
            padding_idx: Some(1),
        };
        check_layer_discrete(&p, &[vec![3]], 3, 12, &ids(5));
    }

    #[test]
    fn padding_row_gets_no_gradient_and_ids_repeat() {
        let e = Embedding {
            num_embeddings: 3,
            embedding_dim: 1,
            padding_idx: Some(0),
        };
        let w = [1.0f64, 2.0, 3.0];
        let ids = ndarray::arr2(&[[0.0f64, 2.0, 2.0]]).into_dyn();
        let y = e.forward(&[&w], &[ids.view()], &mut Saved::None);
        let mut g = vec![0.0f64; 3];
        let go = ndarray::arr3(&[[[1.0f64], [10.0], [100.0]]]).into_dyn();
        e.backward(Backward {
            params: &[&w],
            inputs: &[ids.view()],
            output: y.view(),
            saved: &Saved::None,
            grad_out: go.view(),
            grad_params: vec![&mut g],
            need_input_grad: &[false],
        });
        assert_eq!(g, vec![0.0, 0.0, 110.0]);
    }

    #[test]
    fn positional_embedding_matches_finite_differences() {
        let p = PositionalEmbedding {
            num_embeddings: 7,
            embedding_dim: 3,
        };
        // Reads T = 5 of 7 rows; rows 5 and 6 get zero gradient.
        check_layer_discrete(&p, &[vec![5]], 4, 13, &ids(9));
        check_layer_discrete(&p, &[vec![4, 2]], 2, 14, &|_, _| {});
        let e = <PositionalEmbedding as Layer<f32>>::out_shape(&p, &[vec![8]]).unwrap_err();
        assert!(e.contains("longer than num_embeddings = 7"), "{e}");
    }

    #[test]
    fn token_ids_are_checked_with_sample_and_position() {
        let e = Embedding {
            num_embeddings: 4,
            embedding_dim: 2,
            padding_idx: None,
        };
        let ok = ndarray::arr2(&[[0.0f32, 3.0], [1.0, 2.0]]).into_dyn();
        assert!(<Embedding as Layer<f32>>::check_model_input(&e, ok.view()).is_ok());
        let bad = ndarray::arr2(&[[0.0f32, 3.0], [1.0, 4.0]]).into_dyn();
        let m = <Embedding as Layer<f32>>::check_model_input(&e, bad.view()).unwrap_err();
        assert!(
            m.contains("token id 4 at sample 1 position 1 is out of range"),
            "{m}"
        );
        let frac = ndarray::arr2(&[[0.5f32, 3.0]]).into_dyn();
        let m = <Embedding as Layer<f32>>::check_model_input(&e, frac.view()).unwrap_err();
        assert!(m.contains("not an integer id"), "{m}");
    }
}
