//! `nn.BatchNorm1d` / `nn.BatchNorm2d` over axis 1 of `[N, C]`, `[N, C, L]` or
//! `[N, C, H, W]`, in one of two modes that define the loss differently:
//!
//! - [`BnMode::BatchStats`] (the LCA study's choice): normalise with the mean and biased
//!   variance of the current evaluation chunk — the chunk size is part of the definition of L;
//!   running statistics are ignored; backward goes through the batch statistics.
//! - [`BnMode::RunningStats`] (PyTorch's `model.eval()`): normalise with the buffers
//!   `running_mean` and `running_var` stored in the checkpoint. They are inputs of the loss
//!   that change between checkpoints too, so they are declared as buffers: the evaluator
//!   computes their gradients and their contribution to ΔL is reported apart.
//!
//! Parameters `weight` (γ) and `bias` (β), `[C]`, when `affine`.
//!
//! ```
//! use lca::net::{batch_norm::{BatchNorm, BnMode}, Layer, Saved};
//! use ndarray::{arr2, ArrayD};
//! let bn = BatchNorm { num_features: 1, eps: 0.0, affine: false, mode: BnMode::BatchStats };
//! let x: ArrayD<f64> = arr2(&[[1.0], [3.0]]).into_dyn();
//! let y = bn.forward(&[], &[x.view()], &mut Saved::None);
//! assert_eq!(y.as_slice().unwrap(), &[-1.0, 1.0]);
//! ```

use super::{Backward, Layer, ParamDecl, Real, Saved};
use ndarray::{ArrayD, ArrayViewD};

/// Which statistics normalise the input: a spec setting (`[model] batch_norm`), owned by
/// [`crate::spec`] and re-exported here.
pub use crate::spec::BnMode;

/// Batch normalisation over the channel axis.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    pub num_features: usize,
    pub eps: f64,
    pub affine: bool,
    pub mode: BnMode,
}

impl BatchNorm {
    /// (batch, channels, positions per channel and sample) of an input.
    fn dims<T>(x: &ArrayViewD<T>) -> (usize, usize, usize) {
        let n = x.shape()[0];
        let c = x.shape()[1];
        let inner = x.shape()[2..].iter().product();
        (n, c, inner)
    }
}

impl<T: Real> Layer<T> for BatchNorm {
    fn params(&self) -> Vec<ParamDecl> {
        if !self.affine {
            return Vec::new();
        }
        ["weight", "bias"]
            .into_iter()
            .map(|suffix| ParamDecl {
                suffix,
                shape: vec![self.num_features],
            })
            .collect()
    }

    fn buffers(&self) -> Vec<ParamDecl> {
        match self.mode {
            BnMode::BatchStats => Vec::new(),
            BnMode::RunningStats => ["running_mean", "running_var"]
                .into_iter()
                .map(|suffix| ParamDecl {
                    suffix,
                    shape: vec![self.num_features],
                })
                .collect(),
        }
    }

    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let [s] = inputs else {
            return Err(format!("takes 1 input, got {}", inputs.len()));
        };
        match s.first() {
            Some(&c) if c == self.num_features => Ok(s.clone()),
            Some(&c) => Err(format!(
                "num_features = {} does not match the {c} channels it receives",
                self.num_features
            )),
            None => Err("needs an input with a channel axis".into()),
        }
    }

    fn forward(
        &self,
        params: &[&[T]],
        inputs: &[ArrayViewD<T>],
        saved: &mut Saved<T>,
    ) -> ArrayD<T> {
        let x = &inputs[0];
        let (n, c, inner) = Self::dims(x);
        let xs = x.as_slice().expect("activations are contiguous");
        let (gamma, beta) = if self.affine {
            (Some(params[0]), Some(params[1]))
        } else {
            (None, None)
        };
        let buf = if self.affine { 2 } else { 0 };
        let mut mean = vec![0.0f64; c];
        let mut inv_std = vec![0.0f64; c];
        match self.mode {
            BnMode::BatchStats => {
                let m = (n * inner) as f64;
                for ch in 0..c {
                    let mut s = 0.0;
                    for i in 0..n {
                        let base = (i * c + ch) * inner;
                        s += lanes_sum_f64(&xs[base..base + inner], |x| x.f64());
                    }
                    let mu = s / m;
                    let mut v = 0.0;
                    for i in 0..n {
                        let base = (i * c + ch) * inner;
                        v += lanes_sum_f64(&xs[base..base + inner], |x| (x.f64() - mu).powi(2));
                    }
                    mean[ch] = mu;
                    inv_std[ch] = 1.0 / (v / m + self.eps).sqrt();
                }
            }
            BnMode::RunningStats => {
                for ch in 0..c {
                    mean[ch] = params[buf][ch].f64();
                    inv_std[ch] = 1.0 / (params[buf + 1][ch].f64() + self.eps).sqrt();
                }
            }
        }
        let shape = x.shape().to_vec();
        // SAFETY: the loops write every (sample, channel) row of `inner` values.
        let y = unsafe {
            super::filled(&shape, |ys| {
                for i in 0..n {
                    for ch in 0..c {
                        let base = (i * c + ch) * inner;
                        let (g, b) = (
                            gamma.map_or(1.0, |g| g[ch].f64()),
                            beta.map_or(0.0, |b| b[ch].f64()),
                        );
                        let (mu, is) = (mean[ch], inv_std[ch]);
                        let rows = ys[base..base + inner].iter_mut();
                        for (y_out, &xv) in rows.zip(&xs[base..base + inner]) {
                            y_out.write(T::of(g * ((xv.f64() - mu) * is) + b));
                        }
                    }
                }
            })
        };
        // Backward recomputes x̂ from x with the same statistics (kept as T pairs, hi + lo,
        // so that f32 keeps them to ~48 bits and f64 exactly) instead of keeping x̂.
        let split = |v: f64| {
            let hi = T::of(v);
            (hi, T::of(v - hi.f64()))
        };
        let mut stats = Vec::with_capacity(4 * c);
        for v in [&mean, &inv_std] {
            let (hi, lo): (Vec<T>, Vec<T>) = v.iter().map(|&m| split(m)).unzip();
            stats.extend(hi);
            stats.extend(lo);
        }
        let stats = ArrayD::from_shape_vec(ndarray::IxDyn(&[4, c]), stats).expect("4·c values");
        *saved = Saved::Arrays(vec![stats]);
        y
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        let x = &b.inputs[0];
        let (n, c, inner) = Self::dims(x);
        let Saved::Arrays(sv) = b.saved else {
            unreachable!("forward saves the statistics")
        };
        let st = sv[0].as_slice().expect("contiguous");
        let join = |k: usize, ch: usize| st[k * c + ch].f64() + st[(k + 1) * c + ch].f64();
        let mean: Vec<f64> = (0..c).map(|ch| join(0, ch)).collect();
        let inv_std: Vec<f64> = (0..c).map(|ch| join(2, ch)).collect();
        let xs = x.as_slice().expect("activations are contiguous");
        let gy = b.grad_out.as_standard_layout();
        let gy = gy.as_slice().expect("contiguous");
        let m = (n * inner) as f64;
        let gamma: Vec<f64> = if self.affine {
            b.params[0].iter().map(|v| v.f64()).collect()
        } else {
            vec![1.0; c]
        };
        let need_x = b.need_input_grad[0];
        // Per channel: Σ dy and Σ dy·x̂; with running statistics the input gradient
        // (γ/σ·dy) is written in the same pass, row by row.
        let mut sum_dy = vec![0.0f64; c];
        let mut sum_dy_xh = vec![0.0f64; c];
        let running = self.mode == BnMode::RunningStats;
        let sums = |gs: Option<&mut [std::mem::MaybeUninit<T>]>,
                    sum_dy: &mut [f64],
                    sum_dy_xh: &mut [f64]| {
            let mut gs = gs;
            for i in 0..n {
                for ch in 0..c {
                    let base = (i * c + ch) * inner;
                    let (g, xr) = (&gy[base..base + inner], &xs[base..base + inner]);
                    sum_dy[ch] += lanes_sum_f64(g, |v| v.f64());
                    sum_dy_xh[ch] += lanes_dot_xhat(g, xr, mean[ch], inv_std[ch]);
                    if let Some(gs) = gs.as_deref_mut() {
                        let k0 = gamma[ch] * inv_std[ch];
                        for (o, &gv) in gs[base..base + inner].iter_mut().zip(g) {
                            o.write(T::of(k0 * gv.f64()));
                        }
                    }
                }
            }
        };
        let mut gx = None;
        if running && need_x {
            // SAFETY: the pass writes every (sample, channel) row of `inner` values.
            gx = Some(unsafe {
                super::filled(x.shape(), |gs| sums(Some(gs), &mut sum_dy, &mut sum_dy_xh))
            });
        } else {
            sums(None, &mut sum_dy, &mut sum_dy_xh);
        }
        let mut gp = b.grad_params;
        if self.affine {
            for ch in 0..c {
                gp[0][ch] += T::of(sum_dy_xh[ch]);
                gp[1][ch] += T::of(sum_dy[ch]);
            }
        }
        if running {
            // x̂ = (x − μ_r)·(v_r + ε)^(-1/2): ∂/∂μ_r = −γ/σ Σ dy; ∂/∂v_r = −½ γ/σ² Σ dy·x̂.
            let buf = if self.affine { 2 } else { 0 };
            for ch in 0..c {
                gp[buf][ch] += T::of(-gamma[ch] * inv_std[ch] * sum_dy[ch]);
                gp[buf + 1][ch] +=
                    T::of(-0.5 * gamma[ch] * inv_std[ch] * inv_std[ch] * sum_dy_xh[ch]);
            }
        }
        if !need_x || running {
            return vec![gx];
        }
        // SAFETY: the loops write every (sample, channel) row of `inner` values.
        let gx = unsafe {
            super::filled(x.shape(), |gs| {
                for i in 0..n {
                    for ch in 0..c {
                        let base = (i * c + ch) * inner;
                        let k0 = gamma[ch] * inv_std[ch];
                        let (mu, is) = (mean[ch], inv_std[ch]);
                        let (a, bb) = (sum_dy[ch] / m, sum_dy_xh[ch] / m);
                        let rows = gs[base..base + inner]
                            .iter_mut()
                            .zip(&gy[base..base + inner])
                            .zip(&xs[base..base + inner]);
                        for ((o, &g), &xv) in rows {
                            let h = (xv.f64() - mu) * is;
                            o.write(T::of(k0 * (g.f64() - a - h * bb)));
                        }
                    }
                }
            })
        };
        vec![Some(gx)]
    }

    fn macs_per_sample(&self, inputs: &[Vec<usize>]) -> u64 {
        2 * inputs[0].iter().product::<usize>() as u64
    }
}

/// `Σ f(v)` over a slice in f64, in 4 interleaved partial sums (vectorisable, unlike one
/// running sum; a fixed order, so the result depends on the values only).
fn lanes_sum_f64<T: Real>(v: &[T], f: impl Fn(T) -> f64) -> f64 {
    let mut acc = [0.0f64; 4];
    let mut chunks = v.chunks_exact(4);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&x| f(x)).sum();
    (acc[0] + acc[2]) + (acc[1] + acc[3]) + tail
}

/// `Σ dy·x̂` with `x̂ = (x − μ)·is` over two slices in f64, as [`lanes_sum_f64`].
fn lanes_dot_xhat<T: Real>(dy: &[T], x: &[T], mu: f64, is: f64) -> f64 {
    let mut acc = [0.0f64; 4];
    let (ca, cb) = (dy.chunks_exact(4), x.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (g, x) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += g[k].f64() * ((x[k].f64() - mu) * is);
        }
    }
    let tail: f64 = ra
        .iter()
        .zip(rb)
        .map(|(g, x)| g.f64() * ((x.f64() - mu) * is))
        .sum();
    (acc[0] + acc[2]) + (acc[1] + acc[3]) + tail
}

// ---------------------------------------------------------------------------------------
// Drafting (`lca init`)

use super::registry::{DraftIn, Drafted, Drafter, Lead, ModuleTensors, Recognised, Role};
use crate::spec::{BatchNormSpec, LayerKind};

/// `nn.BatchNorm1d` / `nn.BatchNorm2d`: `running_mean` and `running_var` (maybe `weight` and
/// `bias`), or a 1-D `weight` (maybe a `bias`) of a module named like a batch norm (`bn1`)
/// without running statistics.
pub static DRAFTER: Drafter = Drafter {
    recognise,
    role: Role::Norm,
    draft,
};

/// Recognised as `batch_norm1d`; [`draft`] picks 1d or 2d from the shape that arrives.
fn recognise(m: &ModuleTensors) -> Option<Recognised> {
    let bn = |num_features: usize, affine: bool, track_running_stats: bool| {
        Recognised::Layer(LayerKind::BatchNorm1d(BatchNormSpec {
            num_features,
            eps: 1e-5,
            momentum: None,
            affine,
            track_running_stats,
        }))
    };
    if m.has("running_mean")
        && m.has("running_var")
        && m.only(&["weight", "bias", "running_mean", "running_var"])
    {
        let c = m.shape("running_mean").map_or(0, |s| s.iter().product());
        return Some(bn(c, m.has("weight"), true));
    }
    let w = m.weight_and_bias(1)?;
    let name = m.last_component().to_ascii_lowercase();
    (name.contains("bn") || name.contains("batch")).then(|| bn(w[0], true, false))
}

fn draft(kind: LayerKind, at: DraftIn) -> Drafted {
    let (LayerKind::BatchNorm1d(bn) | LayerKind::BatchNorm2d(bn)) = kind else {
        return Drafted::as_recognised(kind, at);
    };
    let flow = at.flow;
    let c = bn.num_features;
    let two_d = match &flow.shape {
        Some(s) => s.len() == 3,
        None => flow.after_conv,
    };
    let have = match &flow.shape {
        Some(s) if s.len() >= 2 => Some(s[0]),
        Some(s) => s.first().copied(),
        None => flow.channels,
    };
    let mut lead = Vec::new();
    if let Some(h) = have
        && h != c
    {
        lead.push(Lead::Todo(format!(
            "'{}' normalises {c} channels but the layer before gives {h}: check the \
             layer order.",
            at.path
        )));
    }
    let kind = if two_d {
        LayerKind::BatchNorm2d(bn)
    } else {
        LayerKind::BatchNorm1d(bn)
    };
    Drafted {
        lead,
        what: format!("{} {c}", kind.type_name()),
        kind,
        explicit: &[],
        flow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::{check_layer, check_layer_with};

    #[test]
    fn batch_stats_backward_matches_finite_differences() {
        for affine in [true, false] {
            let bn = BatchNorm {
                num_features: 3,
                eps: 1e-5,
                affine,
                mode: BnMode::BatchStats,
            };
            check_layer(&bn, &[vec![3, 2, 2]], 4);
            check_layer(&bn, &[vec![3]], 5);
            check_layer(&bn, &[vec![3, 4]], 2);
        }
    }

    #[test]
    fn running_stats_backward_matches_finite_differences_including_buffers() {
        let bn = BatchNorm {
            num_features: 2,
            eps: 1e-5,
            affine: true,
            mode: BnMode::RunningStats,
        };
        // Buffers are drawn in [-1, 1); keep the variance buffer positive through the hook
        // of the parameter generator: check_layer_with shifts nothing for params, so test a
        // positive variance by construction below.
        check_layer_with(&PositiveVar(bn), &[vec![2, 3, 3]], 3, 11, &|_, _| {});
    }

    /// Running statistics without the affine parameters (BatchNorm2d(affine=False)), where the
    /// buffers are the layer's only tensors, and the BatchNorm1d shapes `[C]` and `[C, L]`.
    #[test]
    fn running_stats_backward_matches_finite_differences_without_affine_and_in_1d() {
        for affine in [false, true] {
            let bn = BatchNorm {
                num_features: 3,
                eps: 1e-5,
                affine,
                mode: BnMode::RunningStats,
            };
            assert_eq!(
                <BatchNorm as Layer<f64>>::params(&bn).len(),
                2 * affine as usize
            );
            for shape in [vec![3, 2, 2], vec![3], vec![3, 4]] {
                check_layer_with(&PositiveVar(bn.clone()), &[shape], 3, 12, &|_, _| {});
            }
        }
    }

    /// Wraps a running-stats BN so that the variance buffer is mapped to a positive value.
    struct PositiveVar(BatchNorm);

    impl Layer<f64> for PositiveVar {
        fn params(&self) -> Vec<ParamDecl> {
            let mut p = <BatchNorm as Layer<f64>>::params(&self.0);
            p.extend(<BatchNorm as Layer<f64>>::buffers(&self.0));
            p
        }
        fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
            <BatchNorm as Layer<f64>>::out_shape(&self.0, inputs)
        }
        fn forward(&self, p: &[&[f64]], x: &[ArrayViewD<f64>], s: &mut Saved<f64>) -> ArrayD<f64> {
            // The variance buffer is the last tensor (after weight and bias when affine).
            let var: Vec<f64> = p[p.len() - 1].iter().map(|v| v + 2.0).collect();
            let mut q = p.to_vec();
            *q.last_mut().expect("buffers") = &var;
            self.0.forward(&q, x, s)
        }
        fn backward(&self, b: Backward<'_, f64>) -> Vec<Option<ArrayD<f64>>> {
            let var: Vec<f64> = b.params[b.params.len() - 1]
                .iter()
                .map(|v| v + 2.0)
                .collect();
            let mut q = b.params.to_vec();
            *q.last_mut().expect("buffers") = &var;
            self.0.backward(Backward { params: &q, ..b })
        }
    }

    #[test]
    fn batch_stats_normalise_each_channel() {
        let bn = BatchNorm {
            num_features: 2,
            eps: 0.0,
            affine: false,
            mode: BnMode::BatchStats,
        };
        let x = ndarray::Array::from_shape_vec((2, 2, 1), vec![1.0, 10.0, 3.0, 30.0])
            .unwrap()
            .into_dyn();
        let y = bn.forward(&[], &[x.view()], &mut Saved::None);
        assert_eq!(y.as_slice().unwrap(), &[-1.0, -1.0, 1.0, 1.0]);
    }
}
