//! Multi-head self-attention over `[N, T, C]`, causal by default, in two `state_dict` layouts
//! with the same arithmetic:
//!
//! - nanoGPT's `CausalSelfAttention` ([`Layout::NanoGpt`]): `c_attn.weight [3C, C]`,
//!   `c_attn.bias [3C]`, `c_proj.weight [C, C]`, `c_proj.bias [C]`;
//! - PyTorch's `nn.MultiheadAttention` used as self-attention ([`Layout::Multihead`]):
//!   `in_proj_weight [3C, C]`, `in_proj_bias [3C]`, `out_proj.weight [C, C]`,
//!   `out_proj.bias [C]`.
//!
//! The in-projection's rows are q, k and v in that order; head h owns rows `[h·d, (h+1)·d)`
//! of each (d = C / heads) and columns `[h·d, (h+1)·d)` of the output projection. Per sequence
//! and head, `P = softmax(Q Kᵀ / √d)` with position i attending to positions j ≤ i (the causal
//! mask), computed stably (row maximum subtracted; in f32 with the vectorised `exp` of
//! [`super::fastmath`]), and the heads' `P V` are concatenated and
//! projected. Dropout is the identity. The projections are matrix products (GEMM) over all
//! N·T rows at once. Per sequence and head, f32 on a CPU with AVX-512F takes one fused
//! kernel (`attention/fused.rs`: scores, mask, softmax and `P V` with the queries in the
//! vector lanes, and the matching backward); f64 and other CPUs take `gemm` products on
//! strided views of the one q/k/v buffer and a row-wise softmax. Forward keeps q/k/v, the
//! attention probabilities (in the path's own layout) and the concatenated heads for
//! backward.
//!
//! ```
//! use lca::net::{attention::{Attention, Layout}, Layer, Saved};
//! use ndarray::ArrayD;
//! let att = Attention { embed_dim: 2, num_heads: 1, bias: false, causal: true, layout: Layout::NanoGpt };
//! let w_qkv = [0.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]; // q = k = 0, v = x
//! let eye = [1.0f32, 0.0, 0.0, 1.0];
//! let x = ArrayD::from_shape_vec(vec![1, 2, 2], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
//! let y = att.forward(&[&w_qkv, &eye], &[x.view()], &mut Saved::None);
//! // Equal scores: position 0 sees only itself, position 1 averages positions 0 and 1.
//! assert_eq!(y.as_slice().unwrap(), &[1.0, 2.0, 2.0, 3.0]);
//! ```

mod fused;

use super::gemm::{mat_mul_scaled as mat_mul, mat_mul_uninit};
use super::linear::affine_rows;
use super::{Backward, Layer, Model, ParamDecl, Real, Saved, as_rows, fastmath};
use crate::spec::{LayerKind, Spec};
use ndarray::{Array2, Array3, ArrayD, ArrayView2, ArrayView3, ArrayViewD, ArrayViewMut2, Axis, s};

/// The slice as f32, where [`Attention::fused_dims`] found `T` to be f32.
fn f32_of<T: 'static>(s: &[T]) -> &[f32] {
    fastmath::f32_slice(s).expect("T is f32")
}

/// As [`f32_of`], mutable.
fn f32_of_mut<T: 'static>(s: &mut [T]) -> &mut [f32] {
    fastmath::f32_slice_mut(s).expect("T is f32")
}

/// Parameter names of an attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// nanoGPT: `c_attn.{weight,bias}`, `c_proj.{weight,bias}`.
    NanoGpt,
    /// `nn.MultiheadAttention`: `in_proj_{weight,bias}`, `out_proj.{weight,bias}`.
    Multihead,
}

impl Layout {
    /// Suffixes of the in-projection weight and bias and the output-projection weight and bias.
    pub fn suffixes(self) -> [&'static str; 4] {
        match self {
            Layout::NanoGpt => [
                "c_attn.weight",
                "c_attn.bias",
                "c_proj.weight",
                "c_proj.bias",
            ],
            Layout::Multihead => [
                "in_proj_weight",
                "in_proj_bias",
                "out_proj.weight",
                "out_proj.bias",
            ],
        }
    }
}

/// Multi-head self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    pub embed_dim: usize,
    pub num_heads: usize,
    /// Whether both projections have a bias.
    pub bias: bool,
    /// Whether position i attends only to positions j ≤ i.
    pub causal: bool,
    pub layout: Layout,
}

/// Add the column sums of `g` to `acc`.
fn add_col_sums<T: Real>(acc: &mut [T], g: ArrayView2<T>) {
    for row in g.rows() {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
}

impl Attention {
    fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Indices of (in weight, in bias, out weight, out bias) in the parameter slices.
    fn idx(&self) -> (usize, Option<usize>, usize, Option<usize>) {
        if self.bias {
            (0, Some(1), 2, Some(3))
        } else {
            (0, None, 1, None)
        }
    }

    /// The fused f32 kernel's shapes, when `T` is f32 and the CPU runs the kernel.
    fn fused_dims<T: Real>(&self, n: usize, t: usize) -> Option<fused::Dims> {
        fastmath::f32_slice::<T>(&[])?;
        let d = self.head_dim();
        if d == 0 || !fused::available() {
            return None;
        }
        Some(fused::Dims {
            n,
            t,
            c: self.embed_dim,
            h: self.num_heads,
            d,
            causal: self.causal,
            scale: (1.0 / (d as f64).sqrt()) as f32,
        })
    }

    /// The attention probabilities (`[n·h, t, t]`) and the concatenated heads (`[n·t, c]`)
    /// from q/k/v, per sequence and head with `gemm` products (the path of f64; f32 takes
    /// [`fused::forward`]).
    fn heads_forward<T: Real>(
        &self,
        qkv: ArrayView2<T>,
        n: usize,
        t: usize,
    ) -> (ArrayD<T>, Array2<T>) {
        let (c, h, d) = (self.embed_dim, self.num_heads, self.head_dim());
        let scale = T::of(1.0 / (d as f64).sqrt());
        let mut probs = Array3::<T>::zeros((n * h, t, t));
        let mut heads = Array2::<T>::zeros((n * t, c));
        for seq in 0..n {
            let rows = seq * t..(seq + 1) * t;
            for hd in 0..h {
                let cols = hd * d..(hd + 1) * d;
                let q = qkv.slice(s![rows.clone(), cols.clone()]);
                let k = qkv.slice(s![rows.clone(), c + hd * d..c + (hd + 1) * d]);
                let v = qkv.slice(s![rows.clone(), 2 * c + hd * d..2 * c + (hd + 1) * d]);
                let mut p = probs.index_axis_mut(Axis(0), seq * h + hd);
                // Scores q·kᵀ/√d: the scale is the GEMM's α.
                mat_mul(scale, q, k.t(), false, p.view_mut());
                let ps = p.as_slice_mut().expect("contiguous");
                for i in 0..t {
                    let row = &mut ps[i * t..(i + 1) * t];
                    let seen = self.visible(i, t);
                    softmax_prefix(row, seen);
                    row[seen..].fill(T::zero());
                }
                mat_mul(
                    T::one(),
                    p.view(),
                    v,
                    false,
                    heads.slice_mut(s![rows.clone(), cols]),
                );
            }
        }
        (probs.into_dyn(), heads)
    }

    /// Back through the heads with `gemm` products (the path of f64; f32 takes
    /// [`fused::backward`]): every entry of `gqkv` is written.
    fn heads_backward<T: Real>(
        &self,
        qkv: ArrayView2<T>,
        probs: ArrayView3<T>,
        gheads: ArrayView2<T>,
        mut gqkv: ArrayViewMut2<T>,
        gs: &mut Vec<T>,
    ) {
        let (n, t) = (probs.shape()[0] / self.num_heads, probs.shape()[1]);
        let (c, h, d) = (self.embed_dim, self.num_heads, self.head_dim());
        // Per sequence and head: back through P V, the softmax and Q Kᵀ.
        let scale = T::of(1.0 / (d as f64).sqrt());
        let mut gs = scratch_view(gs, t, t);
        for seq in 0..n {
            let rows = seq * t..(seq + 1) * t;
            for hd in 0..h {
                let (qc, kc, vc) = (hd * d, c + hd * d, 2 * c + hd * d);
                let q = qkv.slice(s![rows.clone(), qc..qc + d]);
                let k = qkv.slice(s![rows.clone(), kc..kc + d]);
                let v = qkv.slice(s![rows.clone(), vc..vc + d]);
                let p = probs.index_axis(Axis(0), seq * h + hd);
                let g = gheads.slice(s![rows.clone(), qc..qc + d]);
                // dV = Pᵀ dO, dP = dO Vᵀ.
                mat_mul(
                    T::one(),
                    p.t(),
                    g,
                    false,
                    gqkv.slice_mut(s![rows.clone(), vc..vc + d]),
                );
                mat_mul(T::one(), g, v.t(), false, gs.view_mut());
                // dS = P ⊙ (dP − rowsum(dP ⊙ P)); masked entries are 0.
                let ps = p.as_slice().expect("contiguous");
                let gss = gs.as_slice_mut().expect("contiguous");
                for i in 0..t {
                    let (pr, gr) = (&ps[i * t..(i + 1) * t], &mut gss[i * t..(i + 1) * t]);
                    let lim = self.visible(i, t);
                    let dot = fastmath::dot(&pr[..lim], &gr[..lim]);
                    for (g, &p) in gr[..lim].iter_mut().zip(&pr[..lim]) {
                        *g = p * (*g - dot);
                    }
                    gr[lim..].fill(T::zero());
                }
                // dQ = dS K/√d, dK = dSᵀ Q/√d (the scale is the GEMMs' α).
                mat_mul(
                    scale,
                    gs.view(),
                    k,
                    false,
                    gqkv.slice_mut(s![rows.clone(), qc..qc + d]),
                );
                mat_mul(
                    scale,
                    gs.t(),
                    q,
                    false,
                    gqkv.slice_mut(s![rows.clone(), kc..kc + d]),
                );
            }
        }
    }

    /// Entries of row i of the scores that take part (the causal mask keeps j ≤ i).
    fn visible(&self, i: usize, t: usize) -> usize {
        if self.causal { i + 1 } else { t }
    }
}

impl<T: Real> Layer<T> for Attention {
    fn params(&self) -> Vec<ParamDecl> {
        let [w_in, b_in, w_out, b_out] = self.layout.suffixes();
        let c = self.embed_dim;
        let mut v = vec![ParamDecl {
            suffix: w_in,
            shape: vec![3 * c, c],
        }];
        if self.bias {
            v.push(ParamDecl {
                suffix: b_in,
                shape: vec![3 * c],
            });
        }
        v.push(ParamDecl {
            suffix: w_out,
            shape: vec![c, c],
        });
        if self.bias {
            v.push(ParamDecl {
                suffix: b_out,
                shape: vec![c],
            });
        }
        v
    }

    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let [s] = inputs else {
            return Err(format!("takes 1 input, got {}", inputs.len()));
        };
        let (dim, heads) = match self.layout {
            Layout::NanoGpt => ("n_embd", "n_head"),
            Layout::Multihead => ("embed_dim", "num_heads"),
        };
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return Err(format!(
                "{dim} = {} is not a multiple of {heads} = {}",
                self.embed_dim, self.num_heads
            ));
        }
        match s.as_slice() {
            [_, c] if *c == self.embed_dim => Ok(s.clone()),
            [_, c] => Err(format!(
                "{dim} = {} does not match the {c} features per position it receives",
                self.embed_dim
            )),
            _ => Err(format!(
                "needs a sequence input [T, {dim}] per sample, got {} axes",
                s.len()
            )),
        }
    }

    fn forward(
        &self,
        params: &[&[T]],
        inputs: &[ArrayViewD<T>],
        saved: &mut Saved<T>,
    ) -> ArrayD<T> {
        let (n, t) = (inputs[0].shape()[0], inputs[0].shape()[1]);
        let (c, h) = (self.embed_dim, self.num_heads);
        let (iw, ib, ow, ob) = self.idx();
        let x = as_rows(&inputs[0]);
        // q | k | v for every position: one GEMM over all N·T rows.
        let w_in = ArrayView2::from_shape((3 * c, c), params[iw]).expect("declared shape");
        let qkv = affine_rows(x, w_in, ib.map(|i| params[i]));

        let (probs, heads) = match self.fused_dims::<T>(n, t) {
            Some(dm) => {
                // Not cleared: `fused::forward` writes both in full.
                let mut probs = Array2::<T>::uninit((n * h, dm.packed_len()));
                let mut heads = Array2::<T>::uninit((n * t, c));
                fused::forward(
                    &dm,
                    f32_of(qkv.as_slice().expect("contiguous")),
                    fastmath::f32_uninit(probs.as_slice_mut().expect("contiguous"))
                        .expect("T is f32"),
                    fastmath::f32_uninit(heads.as_slice_mut().expect("contiguous"))
                        .expect("T is f32"),
                );
                // SAFETY: `fused::forward` initialised every element of both.
                unsafe { (probs.assume_init().into_dyn(), heads.assume_init()) }
            }
            None => self.heads_forward(qkv.view(), n, t),
        };
        let w_out = ArrayView2::from_shape((c, c), params[ow]).expect("declared shape");
        let y = affine_rows(heads.view(), w_out, ob.map(|i| params[i]));
        *saved = Saved::Arrays(vec![qkv.into_dyn(), probs.into_dyn(), heads.into_dyn()]);
        y.into_shape_with_order(vec![n, t, c])
            .expect("row-major")
            .into_dyn()
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        let Saved::Arrays(sv) = b.saved else {
            unreachable!("forward saves q/k/v, probabilities and heads")
        };
        let (n, t) = (b.inputs[0].shape()[0], b.inputs[0].shape()[1]);
        let c = self.embed_dim;
        let (iw, ib, ow, ob) = self.idx();
        let qkv = sv[0]
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .expect("2-D");
        let heads = sv[2]
            .view()
            .into_dimensionality::<ndarray::Ix2>()
            .expect("2-D");
        let x = as_rows(&b.inputs[0]);
        let gy = as_rows(&b.grad_out);
        let mut gp = b.grad_params;

        // Output projection.
        {
            let gw = ArrayViewMut2::from_shape((c, c), &mut *gp[ow]).expect("declared shape");
            mat_mul(T::one(), gy.t(), heads, true, gw);
        }
        if let Some(i) = ob {
            add_col_sums(gp[i], gy);
        }
        let w_out = ArrayView2::from_shape((c, c), b.params[ow]).expect("declared shape");
        // Backward's temporaries (dHeads, dQKV, one head's dS) are this thread's scratch
        // buffers, reused from chunk to chunk; every entry is written before it is read.
        let mut scratch = Scratch::<T>::take();
        let [gheads, gqkv, gs] = &mut scratch.bufs;
        let mut gheads = scratch_view(gheads, n * t, c);
        mat_mul(T::one(), gy, w_out, false, gheads.view_mut());

        let mut gqkv = scratch_view(gqkv, n * t, 3 * c);
        match self.fused_dims::<T>(n, t) {
            Some(dm) => fused::backward(
                &dm,
                f32_of(qkv.as_slice().expect("contiguous")),
                f32_of(sv[1].as_slice().expect("contiguous")),
                f32_of(gheads.as_slice().expect("contiguous")),
                f32_of_mut(gqkv.as_slice_mut().expect("contiguous")),
            ),
            None => {
                let probs = sv[1]
                    .view()
                    .into_dimensionality::<ndarray::Ix3>()
                    .expect("3-D");
                self.heads_backward(qkv, probs, gheads.view(), gqkv.view_mut(), gs);
            }
        }

        // In-projection.
        {
            let gw = ArrayViewMut2::from_shape((3 * c, c), &mut *gp[iw]).expect("declared shape");
            mat_mul(T::one(), gqkv.t(), x, true, gw);
        }
        if let Some(i) = ib {
            add_col_sums(gp[i], gqkv.view());
        }
        if !b.need_input_grad[0] {
            scratch.give_back();
            return vec![None];
        }
        let w_in = ArrayView2::from_shape((3 * c, c), b.params[iw]).expect("declared shape");
        // SAFETY: `mat_mul_uninit` writes every value.
        let gx = unsafe {
            super::filled(&[n, t, c], |gs| {
                mat_mul_uninit(T::one(), gqkv.view(), w_in, gs)
            })
        };
        scratch.give_back();
        vec![Some(gx)]
    }

    fn macs_per_sample(&self, inputs: &[Vec<usize>]) -> u64 {
        let t = inputs[0][0];
        let c = self.embed_dim;
        (t * c * 3 * c + 2 * t * t * c + t * c * c) as u64
    }
}

/// Softmax of the first `n` scores of a row in place, with their maximum subtracted (stable);
/// in f32 through the vectorised `exp` of [`fastmath`], which may use the entries after `n` as
/// scratch (the caller overwrites them).
fn softmax_prefix<T: Real>(row: &mut [T], n: usize) {
    if let Some(r) = fastmath::f32_slice_mut(row) {
        return fastmath::softmax_prefix(r, n);
    }
    let row = &mut row[..n];
    let m = fastmath::max(row);
    for e in row.iter_mut() {
        *e = (*e - m).exp();
    }
    let inv = T::one() / fastmath::sum(row);
    for e in row.iter_mut() {
        *e = *e * inv;
    }
}

thread_local! {
    /// Per-thread scratch buffers of attention's backward pass, one set per element type.
    static SCRATCH: std::cell::RefCell<Vec<Box<dyn std::any::Any>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Three buffers taken from this thread's [`SCRATCH`] (or new ones) and returned to it with
/// [`Scratch::give_back`]; a layer nested inside another's backward would just get new ones.
struct Scratch<T: Real> {
    bufs: [Vec<T>; 3],
}

impl<T: Real> Scratch<T> {
    fn take() -> Self {
        let found = SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let i = s.iter().position(|b| b.is::<Self>())?;
            s.swap_remove(i).downcast::<Self>().ok()
        });
        found.map_or_else(
            || Scratch {
                bufs: [Vec::new(), Vec::new(), Vec::new()],
            },
            |b| *b,
        )
    }

    fn give_back(self) {
        SCRATCH.with(|s| s.borrow_mut().push(Box::new(self)));
    }
}

/// A `[rows, cols]` view of the start of `buf`, grown (with zeros) when too short. Its
/// entries hold whatever the last use left: callers write every entry before reading it.
fn scratch_view<T: Real>(buf: &mut Vec<T>, rows: usize, cols: usize) -> ArrayViewMut2<'_, T> {
    if buf.len() < rows * cols {
        buf.resize(rows * cols, T::zero());
    }
    ArrayViewMut2::from_shape((rows, cols), &mut buf[..rows * cols]).expect("sizes match")
}

/// An attention layer as the per-head view needs it. Head h owns rows
/// `[h·head_dim, (h+1)·head_dim)` of each of q, k and v in the in-projection (weight rows and
/// bias entries) and the same columns of the output-projection weight.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionLayer {
    pub layer: String,
    /// Layer type (`causal_self_attention`, `multihead_attention`).
    pub kind: String,
    pub heads: usize,
    pub head_dim: usize,
    /// `[3·C, C]`: q, k, v rows.
    pub in_proj_weight: String,
    /// `[3·C]`.
    pub in_proj_bias: Option<String>,
    /// `[C, C]`: the heads' columns.
    pub out_proj_weight: String,
    /// `[C]`: shared by the heads.
    pub out_proj_bias: Option<String>,
}

/// The attention layers of a built model, with what the per-head view needs: head count and
/// the names of the projection tensors (after weight tying and `model.prefix`).
pub fn describe<T: Real>(spec: &Spec, model: &Model<T>) -> Vec<AttentionLayer> {
    spec.layers
        .iter()
        .zip(&model.nodes)
        .filter_map(|(ls, node)| {
            let (heads, dim, bias) = match ls.kind {
                LayerKind::CausalSelfAttention {
                    n_embd,
                    n_head,
                    bias,
                    ..
                } => (n_head, n_embd, bias),
                LayerKind::MultiheadAttention {
                    embed_dim,
                    num_heads,
                    bias,
                    ..
                } => (num_heads, embed_dim, bias),
                _ => return None,
            };
            let name = |k: usize| model.params[node.param_ids[k]].name.clone();
            Some(AttentionLayer {
                layer: node.name.clone(),
                kind: node.type_name.to_string(),
                heads,
                head_dim: dim / heads.max(1),
                in_proj_weight: name(0),
                in_proj_bias: bias.then(|| name(1)),
                out_proj_weight: name(if bias { 2 } else { 1 }),
                out_proj_bias: bias.then(|| name(3)),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Drafting (`lca init`)

use super::registry::{DraftIn, Drafted, Drafter, Lead, ModuleTensors, Recognised, Role};

/// Multi-head self-attention: `nn.MultiheadAttention` (`in_proj_weight` `[3C, C]`,
/// `out_proj`) or nanoGPT's `CausalSelfAttention` (`c_attn` `[3C, C]`, `c_proj`).
pub static DRAFTER: Drafter = Drafter {
    recognise,
    role: Role::Attention,
    draft,
};

/// How many heads a self-attention layer of `c` channels is guessed to have: head size 64
/// (GPT-2, nanoGPT's configurations) when `c` is a multiple of 64, else one head.
pub fn guess_heads(c: usize) -> usize {
    if c >= 64 && c.is_multiple_of(64) {
        c / 64
    } else {
        1
    }
}

/// Recognised with the guessed number of heads ([`guess_heads`]) and, for
/// `nn.MultiheadAttention`, a causal mask.
fn recognise(m: &ModuleTensors) -> Option<Recognised> {
    let qkv = |name: &str| m.shape(name).filter(|s| s.len() == 2 && s[0] == 3 * s[1]);
    if m.has("in_proj_weight") {
        if let Some(s) = qkv("in_proj_weight")
            && m.only(&[
                "in_proj_weight",
                "in_proj_bias",
                "out_proj.weight",
                "out_proj.bias",
            ])
        {
            return Some(Recognised::Layer(LayerKind::MultiheadAttention {
                embed_dim: s[1],
                num_heads: guess_heads(s[1]),
                causal: true,
                bias: m.has("in_proj_bias"),
                dropout: 0.0,
                batch_first: None,
            }));
        }
        return Some(Recognised::Unsupported(
            "an attention layer with an unusual in_proj_weight".into(),
        ));
    }
    let s = qkv("c_attn.weight")?;
    let bias = m.has("c_attn.bias");
    if m.only(&[
        "c_attn.weight",
        "c_attn.bias",
        "c_proj.weight",
        "c_proj.bias",
    ]) && m.has("c_proj.bias") == bias
    {
        return Some(Recognised::Layer(LayerKind::CausalSelfAttention {
            n_embd: s[1],
            n_head: guess_heads(s[1]),
            bias,
            dropout: 0.0,
        }));
    }
    Some(Recognised::Unsupported(
        "an attention layer with an unusual set of tensors".into(),
    ))
}

fn draft(kind: LayerKind, at: DraftIn) -> Drafted {
    let (mha, c, heads) = match kind {
        LayerKind::MultiheadAttention {
            embed_dim,
            num_heads,
            ..
        } => (true, embed_dim, num_heads),
        LayerKind::CausalSelfAttention { n_embd, n_head, .. } => (false, n_embd, n_head),
        _ => return Drafted::as_recognised(kind, at),
    };
    let divisors: Vec<String> = (1..=c)
        .filter(|h| c.is_multiple_of(*h))
        .map(|h| h.to_string())
        .collect();
    let mut lead = vec![Lead::Todo(format!(
        "'{}' is multi-head self-attention ({}, {c} channels). The number of heads \
         is not stored: {heads} guessed ({}); {c} channels split into {} heads. \
         Set your model's {}.",
        at.path,
        if mha {
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
        if mha { "num_heads" } else { "n_head" }
    ))];
    if mha {
        lead.push(Lead::Todo(
            "causal mask guessed (mha(x, x, x, attn_mask=causal mask), as a language \
             model): set causal = false if forward() passes no mask."
                .into(),
        ));
    }
    Drafted {
        lead,
        kind,
        // Guessed, so written even at its default.
        explicit: if mha { &["causal"] } else { &[] },
        what: format!("self-attention {c}, {heads} head(s)"),
        flow: at.flow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::check_layer;

    fn att(bias: bool, causal: bool, layout: Layout) -> Attention {
        Attention {
            embed_dim: 6,
            num_heads: 3,
            bias,
            causal,
            layout,
        }
    }

    #[test]
    fn attention_matches_finite_differences() {
        for (bias, causal) in [(true, true), (false, true), (true, false)] {
            check_layer(&att(bias, causal, Layout::NanoGpt), &[vec![5, 6]], 2);
        }
        check_layer(&att(true, true, Layout::Multihead), &[vec![4, 6]], 3);
    }

    /// The f32 path (the fused kernel where the CPU has AVX-512F) against the f64 `gemm` path
    /// that `attention_matches_finite_differences` checks: output, parameter and input
    /// gradients, causal or not, for sequence lengths around the 16-lane blocks and head sizes
    /// that exercise each column width (8, 4, 2, 1).
    #[test]
    fn f32_path_matches_the_f64_path() {
        use crate::net::gradcheck::{Rng, run_layer};
        for (i, &(t, c, h, causal, layout)) in [
            (5, 6, 3, true, Layout::NanoGpt),
            (1, 4, 2, true, Layout::NanoGpt),
            (16, 8, 2, true, Layout::NanoGpt),
            (17, 12, 3, false, Layout::Multihead),
            (33, 16, 4, true, Layout::NanoGpt),
            (40, 30, 2, true, Layout::Multihead),
            (31, 9, 1, false, Layout::NanoGpt),
            (48, 64, 2, true, Layout::NanoGpt),
        ]
        .iter()
        .enumerate()
        {
            let a = Attention {
                embed_dim: c,
                num_heads: h,
                bias: i % 2 == 0,
                causal,
                layout,
            };
            let mut rng = Rng::new(40 + i as u64);
            let params: Vec<Vec<f64>> = <Attention as Layer<f64>>::params(&a)
                .iter()
                .map(|d| rng.array(&d.shape).into_raw_vec_and_offset().0)
                .collect();
            let x = rng.array(&[3, t, c]).mapv(|v| 2.0 * v);
            let gy = rng.array(&[3, t, c]);
            let want = run_layer::<f64>(&a, &params, &x, &gy, true, 0.5);
            let p32: Vec<Vec<f32>> = params
                .iter()
                .map(|v| v.iter().map(|&x| x as f32).collect())
                .collect();
            let (x32, gy32) = (x.mapv(|v| v as f32), gy.mapv(|v| v as f32));
            let got = run_layer::<f32>(&a, &p32, &x32, &gy32, true, 0.5);
            let close = |what: &str, g: &mut dyn Iterator<Item = f32>, w: &[f64]| {
                let scale = w.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                let mut n = 0;
                for (k, (g, &w)) in g.zip(w).enumerate() {
                    assert!(
                        (f64::from(g) - w).abs() < 2e-5 * scale,
                        "case {i} {what}[{k}]: {g} vs {w}"
                    );
                    n += 1;
                }
                assert_eq!(n, w.len(), "case {i} {what}");
            };
            close("y", &mut got.0.iter().copied(), want.0.as_slice().unwrap());
            for (pi, (g, w)) in got.1.iter().zip(&want.1).enumerate() {
                close(&format!("param {pi}"), &mut g.iter().copied(), w);
            }
            let (gx, wx) = (got.2[0].as_ref().unwrap(), want.2[0].as_ref().unwrap());
            close("x", &mut gx.iter().copied(), wx.as_slice().unwrap());
        }
    }

    /// Backward's reused scratch buffers leave no trace: gradients of a batch are bit for bit
    /// the same before and after a larger and a smaller batch ran through the same thread.
    #[test]
    fn scratch_reuse_gives_identical_gradients() {
        let a = att(true, true, Layout::NanoGpt);
        let mut rng = crate::net::gradcheck::Rng::new(7);
        let params: Vec<Vec<f32>> = <Attention as Layer<f32>>::params(&a)
            .iter()
            .map(|d| {
                rng.array(&d.shape)
                    .mapv(|v| v as f32)
                    .into_raw_vec_and_offset()
                    .0
            })
            .collect();
        let p: Vec<&[f32]> = params.iter().map(|v| v.as_slice()).collect();
        let grads = |rng: &mut crate::net::gradcheck::Rng, shape: &[usize]| {
            let x = rng.array(shape).mapv(|v| v as f32);
            let gy = rng.array(shape).mapv(|v| v as f32);
            let mut sv = Saved::None;
            let y = a.forward(&p, &[x.view()], &mut sv);
            let mut gp: Vec<Vec<f32>> = params.iter().map(|v| vec![0.0; v.len()]).collect();
            let gx = a.backward(Backward {
                params: &p,
                inputs: &[x.view()],
                output: y.view(),
                saved: &sv,
                grad_out: gy.view(),
                grad_params: gp.iter_mut().map(|v| v.as_mut_slice()).collect(),
                need_input_grad: &[true],
            });
            (gx[0].clone().expect("input gradient"), gp)
        };
        let first = grads(&mut crate::net::gradcheck::Rng::new(8), &[2, 5, 6]);
        grads(&mut rng, &[3, 7, 6]);
        grads(&mut rng, &[1, 2, 6]);
        assert_eq!(
            grads(&mut crate::net::gradcheck::Rng::new(8), &[2, 5, 6]),
            first
        );
    }

    /// The causal mask: position i's output does not change when later positions do.
    #[test]
    fn causal_mask_hides_later_positions() {
        let a = att(true, true, Layout::NanoGpt);
        let mut rng = crate::net::gradcheck::Rng::new(5);
        let params: Vec<Vec<f64>> = <Attention as Layer<f64>>::params(&a)
            .iter()
            .map(|d| rng.array(&d.shape).into_raw_vec_and_offset().0)
            .collect();
        let p: Vec<&[f64]> = params.iter().map(|v| v.as_slice()).collect();
        let x = rng.array(&[1, 5, 6]);
        let mut x2 = x.clone();
        for c in 0..6 {
            x2[[0, 3, c]] += 1.0;
            x2[[0, 4, c]] -= 2.0;
        }
        let y = a.forward(&p, &[x.view()], &mut Saved::None);
        let y2 = a.forward(&p, &[x2.view()], &mut Saved::None);
        for tpos in 0..5 {
            let same = (0..6).all(|c| y[[0, tpos, c]] == y2[[0, tpos, c]]);
            assert_eq!(same, tpos < 3, "position {tpos}");
        }
        // Without the mask every position sees the change.
        let b = att(true, false, Layout::NanoGpt);
        let y = b.forward(&p, &[x.view()], &mut Saved::None);
        let y2 = b.forward(&p, &[x2.view()], &mut Saved::None);
        assert!(y[[0, 0, 0]] != y2[[0, 0, 0]]);
    }

    #[test]
    fn softmax_is_stable_for_large_scores() {
        let a = Attention {
            embed_dim: 1,
            num_heads: 1,
            bias: false,
            causal: true,
            layout: Layout::NanoGpt,
        };
        // q = k = 1000·x: scores of 1e6 would overflow exp without the row maximum.
        let w_in = [1000.0f32, 1000.0, 1.0];
        let x = ArrayD::from_shape_vec(vec![1, 3, 1], vec![1.0f32, 2.0, 3.0]).unwrap();
        let y = a.forward(&[&w_in, &[1.0]], &[x.view()], &mut Saved::None);
        assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
        assert_eq!(y.as_slice().unwrap(), &[1.0, 2.0, 3.0]);
    }

    /// A one-block GPT in the spec's terms: token + positional embedding, pre-norm attention
    /// and GELU MLP with residual adds, final LayerNorm, and a head tied to the token embedding.
    pub(crate) const TINY_GPT: &str = r#"
[[layers]]
name = "wte"
type = "embedding"
num_embeddings = 7
embedding_dim = 4
input = "input"

[[layers]]
name = "wpe"
type = "positional_embedding"
num_embeddings = 6
embedding_dim = 4
input = "input"

[[layers]]
name = "emb"
type = "add"
input = ["wte", "wpe"]

[[layers]]
name = "h.0.ln_1"
type = "layer_norm"
normalized_shape = 4

[[layers]]
name = "h.0.attn"
type = "causal_self_attention"
n_embd = 4
n_head = 2

[[layers]]
name = "h.0.res1"
type = "add"
input = ["emb", "h.0.attn"]

[[layers]]
name = "h.0.ln_2"
type = "layer_norm"
normalized_shape = 4

[[layers]]
name = "h.0.mlp.c_fc"
type = "linear"
in_features = 4
out_features = 8

[[layers]]
type = "gelu"

[[layers]]
name = "h.0.mlp.c_proj"
type = "linear"
in_features = 8
out_features = 4

[[layers]]
name = "h.0.res2"
type = "add"
input = ["h.0.res1", "h.0.mlp.c_proj"]

[[layers]]
name = "ln_f"
type = "layer_norm"
normalized_shape = 4

[[layers]]
name = "lm_head"
type = "linear"
in_features = 4
out_features = 7
bias = false
tied = { weight = "wte.weight" }

[loss]
type = "cross_entropy"

[data]
train = "unused"
"#;

    /// The whole model's backward against central differences of its summed token loss: the
    /// tied weight's gradient is the sum of the embedding's and the head's.
    #[test]
    fn tiny_gpt_gradient_matches_finite_differences() {
        let spec = Spec::parse(TINY_GPT, std::path::Path::new("t.toml")).unwrap();
        let m: Model<f64> = Model::build(&spec, &[5]).unwrap();
        let names: Vec<&str> = m.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names.iter().filter(|n| **n == "wte.weight").count(), 1);
        assert!(!names.contains(&"lm_head.weight"));
        assert_eq!(m.params[0].aliases, vec!["lm_head.weight".to_string()]);
        assert_eq!(m.output_shape(), &[5, 7]);
        let mut rng = crate::net::gradcheck::Rng::new(21);
        let theta: Vec<Vec<f64>> = m
            .params
            .iter()
            .map(|p| rng.array(&p.shape).into_raw_vec_and_offset().0)
            .collect();
        let x = ArrayD::from_shape_fn(vec![3, 5], |ix| ((ix[0] * 5 + ix[1]) * 3 % 7) as f32);
        let y: Vec<u32> = (0..15).map(|i| (i * 5 % 7) as u32).collect();
        let f = |th: &[Vec<f64>]| {
            let mut g: Vec<Vec<f64>> = th.iter().map(|t| vec![0.0; t.len()]).collect();
            m.chunk_loss_grad(th, x.view(), crate::net::TargetsView::Classes(&y), &mut g)
        };
        let mut g: Vec<Vec<f64>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
        let (_, count) = m.chunk_loss_grad(
            &theta,
            x.view(),
            crate::net::TargetsView::Classes(&y),
            &mut g,
        );
        assert_eq!(count, 15);
        let h = 1e-6;
        for (pi, gp) in g.iter().enumerate() {
            for k in 0..gp.len() {
                let mut p = theta.clone();
                p[pi][k] += h;
                let mut q = theta.clone();
                q[pi][k] -= h;
                let fd = (f(&p).0 - f(&q).0) / (2.0 * h);
                assert!(
                    (fd - gp[k]).abs() < 1e-7 * (1.0 + fd.abs()),
                    "{} [{k}]: fd {fd} vs {}",
                    m.params[pi].name,
                    gp[k]
                );
            }
        }
        // Token ids are checked against the embedding.
        let mut bad = x.clone();
        bad[[2, 4]] = 7.0;
        let e = m.check_input(bad.view()).unwrap_err();
        assert!(
            e.contains("'wte'") && e.contains("sample 2 position 4"),
            "{e}"
        );
    }

    #[test]
    fn tying_errors_are_reported() {
        let src = TINY_GPT.replace(
            "tied = { weight = \"wte.weight\" }",
            "tied = { bias = \"wte.weight\" }",
        );
        let spec = Spec::parse(&src, std::path::Path::new("t.toml")).unwrap();
        let e = Model::<f32>::build(&spec, &[5]).err().unwrap().to_string();
        assert!(e.contains("`tied.bias` is not a parameter"), "{e}");
        let src = TINY_GPT.replace(
            "tied = { weight = \"wte.weight\" }",
            "tied = { weight = \"wpe.weight\" }",
        );
        let spec = Spec::parse(&src, std::path::Path::new("t.toml")).unwrap();
        let e = Model::<f32>::build(&spec, &[5]).err().unwrap().to_string();
        assert!(e.contains("shared with another layer"), "{e}");
    }

    /// `nn.MultiheadAttention(4, 2, batch_first=True)` in float64 with in_proj_weight[i, j] =
    /// sin(i + 2j), in_proj_bias[i] = 0.1·i − 0.5, out_proj.weight[i, j] = cos(3i − j),
    /// out_proj.bias[i] = 0.05·i, x[0, t, j] = sin(t − j) + 0.1·j, called as
    /// `mha(x, x, x, attn_mask=torch.triu(torch.ones(3, 3, dtype=torch.bool), 1),
    /// need_weights=False)`; and the gradient of `(out * w).sum()` with w[0, t, j] = t − j.
    #[test]
    fn multihead_matches_pytorch_values() {
        let a = Attention {
            embed_dim: 4,
            num_heads: 2,
            bias: true,
            causal: true,
            layout: Layout::Multihead,
        };
        let w_in: Vec<f64> = (0..12)
            .flat_map(|i| (0..4).map(move |j| ((i + 2 * j) as f64).sin()))
            .collect();
        let b_in: Vec<f64> = (0..12).map(|i| 0.1 * i as f64 - 0.5).collect();
        let w_out: Vec<f64> = (0..4)
            .flat_map(|i| (0..4).map(move |j| ((3 * i) as f64 - j as f64).cos()))
            .collect();
        let b_out: Vec<f64> = (0..4).map(|i| 0.05 * i as f64).collect();
        let x = ArrayD::from_shape_fn(vec![1, 3, 4], |ix| {
            let (t, j) = (ix[1] as f64, ix[2] as f64);
            (t - j).sin() + 0.1 * j
        });
        let p: [&[f64]; 4] = [&w_in, &b_in, &w_out, &b_out];
        let mut sv = Saved::None;
        let y = a.forward(&p, &[x.view()], &mut sv);
        let want_y = PYTORCH_MHA_OUT;
        for (got, want) in y.iter().zip(want_y) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        let w = ArrayD::from_shape_fn(vec![1, 3, 4], |ix| ix[1] as f64 - ix[2] as f64);
        let mut g: Vec<Vec<f64>> = p.iter().map(|v| vec![0.0; v.len()]).collect();
        let gx = a.backward(Backward {
            params: &p,
            inputs: &[x.view()],
            output: y.view(),
            saved: &sv,
            grad_out: w.view(),
            grad_params: g.iter_mut().map(|v| v.as_mut_slice()).collect(),
            need_input_grad: &[true],
        });
        let gx = gx[0].as_ref().unwrap();
        for (got, want) in gx.iter().zip(PYTORCH_MHA_GRAD_X) {
            assert!((got - want).abs() < 1e-12, "dx {got} vs {want}");
        }
        for (got, want) in g[0].iter().zip(PYTORCH_MHA_GRAD_IN_W) {
            assert!(
                (got - want).abs() < 1e-12,
                "d in_proj_weight {got} vs {want}"
            );
        }
    }

    #[rustfmt::skip]
    const PYTORCH_MHA_OUT: [f64; 12] = [2.012963154471313, -1.8176946652042723, 1.7850442545145087, -1.318667671613837, 1.4941895770035942, -1.3962939479684497, 1.4694507357312068, -1.1151979577072582, 0.8174515017223845, -0.7458446182417328, 0.8583088993159386, -0.5555956226145109];
    #[rustfmt::skip]
    const PYTORCH_MHA_GRAD_X: [f64; 12] = [8.914105728254397, -3.009104082016376, -6.409647439109981, 8.3438130923526, 3.4611662238795877, -1.6719012419809434, -2.0696533981403715, 3.3944606707512617, 0.9271889837296029, -0.3337453054394627, -0.6494148775874186, 0.8742491992687706];
    #[rustfmt::skip]
    const PYTORCH_MHA_GRAD_IN_W: [f64; 48] = [0.022657802700502144, -0.04562451645702803, -0.06905462287489246, -0.023185742048666382, -0.6038010622590781, -0.5283874088934621, -0.02908800637514014, 0.37313237945715155, -0.17678433150663628, -0.21180006604790733, -0.06970681148445915, 0.10123653438101297, 0.03260416891687943, 0.0187065310934418, -0.00895934352991321, -0.02152711579438581, -0.1809908530679077, -0.29806774867713853, -0.14110253076245852, 0.14559170320756565, -0.08611681840407266, -0.06983307703181124, 0.010654873311762606, 0.08134678226996776, 0.11496444336897822, 0.2555039771786989, 0.1611343326872849, -0.08138147416777092, 0.13180069632300526, 0.32458608531605065, 0.21894852437494453, -0.08798930014363239, 1.93652629174009, -1.6963236753986073, -3.2559823254118316, -0.794907535250376, 0.7096545836649206, -0.29383976359621083, -0.8761298283298543, -0.3508114513994846, -0.8715761922597094, 1.753838686023608, 2.4164078455798106, 0.15659373766864965, -1.4632471922045596, 2.4368705078649593, 3.5668750211110436, 0.3581797292415318];
}
