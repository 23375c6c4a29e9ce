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

use super::fastmath::{f32_slice, f32_uninit};
use super::{Backward, Layer, ParamDecl, Real, Saved};
use ndarray::{ArrayD, ArrayViewD};
use std::mem::MaybeUninit;

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

impl BatchNorm {
    /// Forward, followed by a ReLU when `relu` (the same bits as the ReLU layer after it).
    fn run_forward<T: Real>(
        &self,
        params: &[&[T]],
        inputs: &[ArrayViewD<T>],
        saved: &mut Saved<T>,
        relu: bool,
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
        let x32 = f32_slice(xs).filter(|_| inner >= 16);
        let mut mean = vec![0.0f64; c];
        let mut inv_std = vec![0.0f64; c];
        let mut stats = vec![T::zero(); 4 * c];
        // Channel ch's statistics, into `mean` and `inv_std` as kept for backward: backward
        // recomputes x̂ from x with the same statistics (kept as T pairs, hi + lo, so that f32
        // keeps them to ~48 bits and f64 exactly) instead of keeping x̂, and forward uses the
        // kept values too, so that backward can recompute the output exactly (the mask of a
        // fused ReLU).
        let stat = |ch: usize, mean: &mut [f64], inv_std: &mut [f64], stats: &mut [T]| {
            let (mu, var) = match (self.mode, x32) {
                (BnMode::BatchStats, Some(x32)) => rows32::stats(x32, n, c, inner, ch),
                (BnMode::BatchStats, None) => {
                    let m = (n * inner) as f64;
                    let rows = || (0..n).map(|i| &xs[(i * c + ch) * inner..][..inner]);
                    let s: f64 = rows().map(|r| lanes_sum_f64(r, |x| x.f64())).sum();
                    let mu = s / m;
                    let v: f64 = rows()
                        .map(|r| lanes_sum_f64(r, |x| (x.f64() - mu).powi(2)))
                        .sum();
                    (mu, v / m)
                }
                (BnMode::RunningStats, _) => (params[buf][ch].f64(), params[buf + 1][ch].f64()),
            };
            let is = 1.0 / (var + self.eps).sqrt();
            for (k, v, dst) in [(0, mu, &mut mean[ch]), (2, is, &mut inv_std[ch])] {
                let hi = T::of(v);
                let lo = T::of(v - hi.f64());
                (stats[k * c + ch], stats[(k + 1) * c + ch]) = (hi, lo);
                *dst = hi.f64() + lo.f64();
            }
        };
        let gb = |ch: usize| {
            (
                gamma.map_or(1.0, |g| g[ch].f64()),
                beta.map_or(0.0, |b| b[ch].f64()),
            )
        };
        // SAFETY: the loops write every (sample, channel) row of `inner` values.
        let y = unsafe {
            super::filled(x.shape(), |ys| {
                if let Some(x32) = x32 {
                    let ys = f32_uninit(ys).expect("T is f32 (f32_slice succeeded)");
                    #[cfg(target_arch = "x86_64")]
                    if avx512() {
                        // The f32 kernels: as below, with their coefficients.
                        let d = (n, c, inner);
                        let mut coef = |ch: usize| {
                            stat(ch, &mut mean, &mut inv_std, &mut stats);
                            let (g, b) = gb(ch);
                            coef32(&stats, c, ch, inv_std[ch], g, b)
                        };
                        if self.mode == BnMode::RunningStats {
                            let coefs: Vec<x16::Coef> = (0..c).map(&mut coef).collect();
                            // (Unsafe: the CPU has AVX-512F, checked just above.)
                            x16::forward_all(x32, ys, d, &coefs, relu);
                        } else {
                            for ch in 0..c {
                                let k = coef(ch);
                                // (Unsafe: the CPU has AVX-512F, checked above.)
                                x16::forward(x32, ys, d, ch, &k, relu);
                            }
                        }
                        return;
                    }
                    if self.mode == BnMode::RunningStats {
                        // No statistics to gather: one pass in memory order.
                        let coefs: Vec<rows32::FwdCoef> = (0..c)
                            .map(|ch| {
                                stat(ch, &mut mean, &mut inv_std, &mut stats);
                                let (g, b) = gb(ch);
                                (mean[ch], inv_std[ch], g, b)
                            })
                            .collect();
                        rows32::forward_all(x32, ys, (n, c, inner), &coefs, relu);
                        return;
                    }
                    // One channel at a time: its statistics, then its outputs while its
                    // values are still in L2.
                    for ch in 0..c {
                        stat(ch, &mut mean, &mut inv_std, &mut stats);
                        let (g, b) = gb(ch);
                        let coef = (mean[ch], inv_std[ch], g, b);
                        rows32::forward(x32, ys, n, c, inner, ch, coef, relu);
                    }
                    return;
                }
                for ch in 0..c {
                    stat(ch, &mut mean, &mut inv_std, &mut stats);
                }
                for i in 0..n {
                    for ch in 0..c {
                        let base = (i * c + ch) * inner;
                        let ((mu, is), (g, b)) = ((mean[ch], inv_std[ch]), gb(ch));
                        let rows = ys[base..base + inner].iter_mut();
                        for (y_out, &xv) in rows.zip(&xs[base..base + inner]) {
                            let y = T::of(g * ((xv.f64() - mu) * is) + b);
                            y_out.write(if !relu || y > T::zero() { y } else { T::zero() });
                        }
                    }
                }
            })
        };
        let stats = ArrayD::from_shape_vec(ndarray::IxDyn(&[4, c]), stats).expect("4·c values");
        *saved = Saved::Arrays(vec![stats]);
        y
    }

    /// Backward; with `relu`, of `relu ∘ batch norm` (`b.grad_out` is the gradient of the
    /// ReLU's output; the mask is recomputed from the input, `b.output` is not read).
    fn run_backward<T: Real>(&self, b: Backward<'_, T>, relu: bool) -> Vec<Option<ArrayD<T>>> {
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
        let (gamma, beta): (Vec<f64>, Vec<f64>) = if self.affine {
            let f = |p: &[T]| p.iter().map(|v| v.f64()).collect();
            (f(b.params[0]), f(b.params[1]))
        } else {
            (vec![1.0; c], vec![0.0; c])
        };
        let need_x = b.need_input_grad[0];
        let running = self.mode == BnMode::RunningStats;
        // Per channel: Σ dy and Σ dy·x̂ (dy masked by a fused ReLU).
        let mut sum_dy = vec![0.0f64; c];
        let mut sum_dy_xh = vec![0.0f64; c];
        let stats = Stats {
            mean: &mean,
            inv_std: &inv_std,
            gamma: &gamma,
            beta: &beta,
        };
        let fast = f32_slice(gy).zip(f32_slice(xs)).filter(|_| inner >= 16);
        let gx = 'gx: {
            if let Some((g32, x32)) = fast {
                #[cfg(target_arch = "x86_64")]
                if avx512() {
                    let sums = (&mut sum_dy[..], &mut sum_dy_xh[..]);
                    let d = (n, c, inner);
                    break 'gx backward16(
                        x.shape(),
                        (g32, x32),
                        st,
                        d,
                        &stats,
                        (running, relu, need_x),
                        sums,
                    );
                }
                // One channel at a time: its sums, then (batch statistics) its input gradient
                // while its values are still in L2; with running statistics the input gradient,
                // γ/σ·dy, is written in the sums' pass. A fused ReLU's mask is applied as the
                // gradient is read, forward's output recomputed as forward computed it.
                let mut pass = |mut gs: Option<&mut [MaybeUninit<f32>]>| {
                    for ch in 0..c {
                        let (mu, is, g, bt) = (mean[ch], inv_std[ch], gamma[ch], beta[ch]);
                        let write = if running { gs.as_deref_mut() } else { None };
                        let coef = (mu, is, g * is, g, bt);
                        let (s1, s2) =
                            rows32::backward(g32, x32, write, n, c, inner, ch, coef, relu);
                        (sum_dy[ch], sum_dy_xh[ch]) = (s1, s2);
                        if let (false, Some(gs)) = (running, gs.as_deref_mut()) {
                            let coef = (mu, is, g * is, s1 / m, s2 / m, g, bt);
                            rows32::input_grad(g32, x32, gs, n, c, inner, ch, coef, relu);
                        }
                    }
                };
                if need_x {
                    // SAFETY: the passes write every (sample, channel) row of `inner` values.
                    Some(unsafe {
                        super::filled(x.shape(), |gs| {
                            pass(Some(
                                f32_uninit(gs).expect("T is f32 (f32_slice succeeded)"),
                            ))
                        })
                    })
                } else {
                    pass(None);
                    None
                }
            } else {
                let sums = (&mut sum_dy[..], &mut sum_dy_xh[..]);
                self.generic_backward(x.shape(), xs, gy, &stats, relu, need_x, sums)
            }
        };
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
        vec![gx]
    }

    /// Backward's passes for any `T` and row length: the sums into `sums` (Σ dy, Σ dy·x̂ per
    /// channel) and, when `need_x`, the input gradient. A fused ReLU's mask is applied to a
    /// copy of the gradient first.
    #[allow(clippy::too_many_arguments)]
    fn generic_backward<T: Real>(
        &self,
        shape: &[usize],
        xs: &[T],
        gy: &[T],
        st: &Stats,
        relu: bool,
        need_x: bool,
        (sum_dy, sum_dy_xh): (&mut [f64], &mut [f64]),
    ) -> Option<ArrayD<T>> {
        let (n, c) = (shape[0], shape[1]);
        let inner: usize = shape[2..].iter().product();
        let m = (n * inner) as f64;
        let rows = |ch: usize| (0..n).map(move |i| (i * c + ch) * inner);
        let masked: Option<Vec<T>> = relu.then(|| {
            let mut v = gy.to_vec();
            for ch in 0..c {
                let (mu, is, g, bb) = (st.mean[ch], st.inv_std[ch], st.gamma[ch], st.beta[ch]);
                for base in rows(ch) {
                    for (d, &xv) in v[base..base + inner].iter_mut().zip(&xs[base..]) {
                        if T::of(g * ((xv.f64() - mu) * is) + bb) <= T::zero() {
                            *d = T::zero();
                        }
                    }
                }
            }
            v
        });
        let gy: &[T] = masked.as_deref().unwrap_or(gy);
        for ch in 0..c {
            for base in rows(ch) {
                let (g, xr) = (&gy[base..base + inner], &xs[base..base + inner]);
                sum_dy[ch] += lanes_sum_f64(g, |v| v.f64());
                sum_dy_xh[ch] += lanes_dot_xhat(g, xr, st.mean[ch], st.inv_std[ch]);
            }
        }
        if !need_x {
            return None;
        }
        let running = self.mode == BnMode::RunningStats;
        // SAFETY: the loops write every (sample, channel) row of `inner` values.
        Some(unsafe {
            super::filled(shape, |gs| {
                for ch in 0..c {
                    let k0 = st.gamma[ch] * st.inv_std[ch];
                    let (mu, is) = (st.mean[ch], st.inv_std[ch]);
                    let (a, bb) = (sum_dy[ch] / m, sum_dy_xh[ch] / m);
                    for base in rows(ch) {
                        let rows = gs[base..base + inner]
                            .iter_mut()
                            .zip(&gy[base..base + inner])
                            .zip(&xs[base..base + inner]);
                        for ((o, &g), &xv) in rows {
                            if running {
                                o.write(T::of(k0 * g.f64()));
                            } else {
                                let h = (xv.f64() - mu) * is;
                                o.write(T::of(k0 * (g.f64() - a - h * bb)));
                            }
                        }
                    }
                }
            })
        })
    }
}

/// Prefetches the cache line of `p` into L1 (`write`: for writing), where the CPU can; `p`
/// may point anywhere (a prefetch does not fault).
#[inline(always)]
fn prefetch(p: *const f32, write: bool) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing and faults on no address.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_ET0, _MM_HINT_T0, _mm_prefetch};
        if write {
            _mm_prefetch::<_MM_HINT_ET0>(p.cast());
        } else {
            _mm_prefetch::<_MM_HINT_T0>(p.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, write);
}

/// Whether the CPU has AVX-512F (the f32 kernels of [`x16`]).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// The f32 kernels' coefficients of channel `ch`: the mean as kept (`st`'s first two rows,
/// hi and lo), `k` = γ/σ and β rounded to f32. Forward and backward build them from the same
/// values (the kept statistics, γ, β), so they compute the same outputs.
#[cfg(target_arch = "x86_64")]
fn coef32<T: Real>(st: &[T], c: usize, ch: usize, inv_std: f64, g: f64, b: f64) -> x16::Coef {
    x16::Coef {
        mh: st[ch].f64() as f32,
        ml: st[c + ch].f64() as f32,
        k: (g * inv_std) as f32,
        b: b as f32,
        c1: 0.0,
        c2: 0.0,
    }
}

/// Backward on the f32 kernels of [`x16`]: the sums into `sums` (Σ dy, Σ dy·x̂ per channel)
/// and, when `need_x`, the input gradient. With running statistics one pass in memory order
/// (sums and input gradient, `k·dy`); with batch statistics, channel by channel, its sums and
/// then its input gradient while its values are still in L2.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn backward16<T: Real>(
    shape: &[usize],
    (g32, x32): (&[f32], &[f32]),
    kept: &[T],
    d: (usize, usize, usize),
    st: &Stats,
    (running, relu, need_x): (bool, bool, bool),
    (sum_dy, sum_dy_xh): (&mut [f64], &mut [f64]),
) -> Option<ArrayD<T>> {
    let (n, c, inner) = d;
    let m = (n * inner) as f64;
    let coefs: Vec<x16::Coef> = (0..c)
        .map(|ch| coef32(kept, c, ch, st.inv_std[ch], st.gamma[ch], st.beta[ch]))
        .collect();
    let mut pass = |mut gs: Option<&mut [MaybeUninit<f32>]>| {
        let sums = if running {
            // SAFETY: the caller checked AVX-512F.
            unsafe { x16::backward_all(g32, x32, gs, d, &coefs, relu) }
        } else {
            let mut sums = Vec::with_capacity(c);
            for (ch, coef) in coefs.iter().enumerate() {
                // SAFETY: the caller checked AVX-512F.
                let (s1, s2) = unsafe { x16::backward(g32, x32, None, d, ch, coef, relu) };
                if let Some(gs) = gs.as_deref_mut() {
                    // γ/σ·(dy − Σdy/m − x̂·Σdy·x̂/m) with x̂ = d/σ, Σdy·x̂ = Σdy·d/σ.
                    let (k0, is) = (st.gamma[ch] * st.inv_std[ch], st.inv_std[ch]);
                    let coef = x16::Coef {
                        c1: (k0 * (s1 / m)) as f32,
                        c2: (k0 * is * is * (s2 / m)) as f32,
                        ..*coef
                    };
                    // SAFETY: the caller checked AVX-512F.
                    unsafe { x16::input_grad(g32, x32, gs, d, ch, &coef, relu) };
                }
                sums.push((s1, s2));
            }
            sums
        };
        for (ch, (s1, s2)) in sums.into_iter().enumerate() {
            (sum_dy[ch], sum_dy_xh[ch]) = (s1, s2 * st.inv_std[ch]);
        }
    };
    if !need_x {
        pass(None);
        return None;
    }
    // SAFETY: the passes write every (sample, channel) row of `inner` values.
    Some(unsafe {
        super::filled(shape, |gs| {
            pass(Some(
                f32_uninit(gs).expect("T is f32 (f32_slice succeeded)"),
            ))
        })
    })
}

/// A channel's statistics and affine parameters in f64 (γ = 1, β = 0 without them).
struct Stats<'a> {
    mean: &'a [f64],
    inv_std: &'a [f64],
    gamma: &'a [f64],
    beta: &'a [f64],
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
        self.run_forward(params, inputs, saved, false)
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        self.run_backward(b, false)
    }

    /// Batch norm computes `max(y, 0)` as it writes `y`, and backward recomputes `y` from the
    /// input (with the saved statistics, which forward also used) for the ReLU's mask.
    fn fuses_relu(&self) -> bool {
        true
    }

    fn forward_relu(
        &self,
        params: &[&[T]],
        inputs: &[ArrayViewD<T>],
        saved: &mut Saved<T>,
    ) -> ArrayD<T> {
        self.run_forward(params, inputs, saved, true)
    }

    fn backward_relu(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        self.run_backward(b, true)
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

/// The f32 path of the per-element passes in f64 arithmetic per element (the generic path's),
/// with the sums in 16 f64 lanes per channel summed at the end (in a fixed order, so results
/// depend on the values only): the batch statistics (compiled for AVX-512F when the CPU has
/// it: f32 sums there, even in blocks of two values, moved the ResNet-20 oracle's `bn1` LCA
/// past its 1e-4 tolerance), and the other passes on CPUs without AVX-512F ([`x16`] has
/// them in f32 arithmetic). Used for rows of at least 16 values (shorter ones take the
/// generic loops). Each call handles one channel (its `n` rows of `inner` values), so that
/// the passes of a channel that follow each other (statistics, then output; sums, then input
/// gradient) find its values in the L2 cache.
mod rows32 {
    use std::mem::MaybeUninit;

    /// Channel coefficients for forward: (mean, 1/σ, γ, β).
    pub(super) type FwdCoef = (f64, f64, f64, f64);
    /// Channel coefficients for backward: (mean, 1/σ, γ/σ, γ, β).
    pub(super) type BwdCoef = (f64, f64, f64, f64, f64);
    /// Channel coefficients for the batch-statistics input gradient:
    /// (mean, 1/σ, γ/σ, Σdy/m, Σdy·x̂/m, γ, β).
    pub(super) type GradCoef = (f64, f64, f64, f64, f64, f64, f64);

    /// The rows of channel `ch`: (start, end) of each of the `n` samples.
    #[inline(always)]
    fn rows(n: usize, c: usize, inner: usize, ch: usize) -> impl Iterator<Item = usize> {
        (0..n).map(move |i| (i * c + ch) * inner)
    }

    /// `max(v, 0)`, 0 for NaN (the ReLU layer's forward), when `RELU`.
    #[inline(always)]
    fn act<const RELU: bool>(v: f32) -> f32 {
        if !RELU || v > 0.0 { v } else { 0.0 }
    }

    /// `g` where `y` > 0 or is NaN, else 0 (the ReLU layer's backward at its input `y`), when
    /// `RELU`.
    #[inline(always)]
    fn mask<const RELU: bool>(g: f32, y: f32) -> f32 {
        if RELU && y <= 0.0 { 0.0 } else { g }
    }

    /// The 16 lanes summed in f64, pairwise in a fixed order.
    #[inline(always)]
    pub(super) fn lanes(a: &[f64; 16]) -> f64 {
        let mut v = *a;
        for half in [8, 4, 2, 1] {
            for k in 0..half {
                v[k] += v[k + half];
            }
        }
        v[0]
    }

    /// Runs `body` compiled for AVX-512F when the CPU has it (the bodies are
    /// `#[inline(always)]`, so they are compiled again inside the AVX-512F function).
    macro_rules! dispatch {
        ($avx:ident, $body:expr) => {{
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                #[target_feature(enable = "avx512f")]
                unsafe fn $avx<R>(f: impl FnOnce() -> R) -> R {
                    f()
                }
                // SAFETY: the CPU supports AVX-512F (checked just above).
                return unsafe { $avx(|| $body) };
            }
            $body
        }};
    }

    /// Mean and biased variance of channel `ch` (batch statistics), in one pass: the sums of
    /// `d = x − s` and `d²` in 16 f64 lanes, `s` the channel's first value. Then
    /// `var = (Σd² − (Σd)²/m)/m`, whose rounding error is at most a few f64 ulps of
    /// `var + (μ − s)²`, and `(μ − s)² ≤ m·var` since `s` is one of the values: relative
    /// error below ~1e-9 for a chunk's m ≤ 10⁶ values, far below f32's resolution.
    pub(super) fn stats(xs: &[f32], n: usize, c: usize, inner: usize, ch: usize) -> (f64, f64) {
        dispatch!(stats_avx512, stats_body(xs, n, c, inner, ch))
    }

    #[inline(always)]
    fn stats_body(xs: &[f32], n: usize, c: usize, inner: usize, ch: usize) -> (f64, f64) {
        let m = (n * inner) as f64;
        let s = f64::from(xs[ch * inner]);
        let (mut a1, mut a2) = ([0.0f64; 16], [0.0f64; 16]);
        let (mut t1, mut t2) = (0.0f64, 0.0f64);
        for base in rows(n, c, inner, ch) {
            let xc = xs[base..base + inner].chunks_exact(16);
            for &x in xc.remainder() {
                let d = f64::from(x) - s;
                t1 += d;
                t2 += d * d;
            }
            // The channel's next row, a line ahead per 16 values (rows of 4 KiB are a page
            // each, which the hardware prefetchers do not cross).
            let next = xs.as_ptr().wrapping_add(base + c * inner);
            for (j, x) in xc.enumerate() {
                super::prefetch(next.wrapping_add(16 * j), false);
                for k in 0..16 {
                    let d = f64::from(x[k]) - s;
                    a1[k] += d;
                    a2[k] += d * d;
                }
            }
        }
        let (s1, s2) = (lanes(&a1) + t1, lanes(&a2) + t2);
        (s + s1 / m, ((s2 - s1 * (s1 / m)) / m).max(0.0))
    }

    /// `y = γ·((x − μ)·is) + β` for channel `ch`, its values of `ys` written; with `relu`,
    /// `max(y, 0)` (0 for NaN, as the ReLU layer).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        xs: &[f32],
        ys: &mut [MaybeUninit<f32>],
        n: usize,
        c: usize,
        inner: usize,
        ch: usize,
        coef: FwdCoef,
        relu: bool,
    ) {
        match relu {
            true => forward_body::<true>(xs, ys, (n, c, inner), ch, coef),
            false => forward_body::<false>(xs, ys, (n, c, inner), ch, coef),
        }
    }

    #[inline(always)]
    fn forward_body<const RELU: bool>(
        xs: &[f32],
        ys: &mut [MaybeUninit<f32>],
        (n, c, inner): (usize, usize, usize),
        ch: usize,
        coef: FwdCoef,
    ) {
        for base in rows(n, c, inner, ch) {
            forward_row::<RELU>(&xs[base..base + inner], &mut ys[base..base + inner], coef);
        }
    }

    /// One row of [`forward`].
    #[inline(always)]
    fn forward_row<const RELU: bool>(
        xs: &[f32],
        ys: &mut [MaybeUninit<f32>],
        (mu, is, g, b): FwdCoef,
    ) {
        for (y, &x) in ys.iter_mut().zip(xs) {
            y.write(act::<RELU>((g * ((f64::from(x) - mu) * is) + b) as f32));
        }
    }

    /// [`forward`] of every channel (`coefs[ch]`), the rows in memory order (sample by
    /// sample): with running statistics no pass needs a channel's values again, and reading in
    /// order streams (a channel's row of an 8×8 map is only 256 bytes). The same bits.
    pub(super) fn forward_all(
        xs: &[f32],
        ys: &mut [MaybeUninit<f32>],
        (n, c, inner): (usize, usize, usize),
        coefs: &[FwdCoef],
        relu: bool,
    ) {
        assert!(coefs.len() >= c);
        let d = (n, c, inner);
        match relu {
            true => forward_all_body::<true>(xs, ys, d, coefs),
            false => forward_all_body::<false>(xs, ys, d, coefs),
        }
    }

    #[inline(always)]
    fn forward_all_body<const RELU: bool>(
        xs: &[f32],
        ys: &mut [MaybeUninit<f32>],
        (n, c, inner): (usize, usize, usize),
        coefs: &[FwdCoef],
    ) {
        for i in 0..n {
            for (ch, &coef) in coefs.iter().enumerate().take(c) {
                let base = (i * c + ch) * inner;
                forward_row::<RELU>(&xs[base..base + inner], &mut ys[base..base + inner], coef);
            }
        }
    }

    /// (Σ dy, Σ dy·x̂) of channel `ch`; when `gs` is given, writes `γ/σ·dy` into its values
    /// of it. With `relu`, `dy` is first masked where forward's output was not positive (the
    /// ReLU layer's backward), that output recomputed as forward computed it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        gy: &[f32],
        xs: &[f32],
        gs: Option<&mut [MaybeUninit<f32>]>,
        n: usize,
        c: usize,
        inner: usize,
        ch: usize,
        coef: BwdCoef,
        relu: bool,
    ) -> (f64, f64) {
        let d = (n, c, inner);
        match (relu, gs) {
            (false, None) => backward_body::<false, false>(gy, xs, &mut [], d, ch, coef),
            (true, None) => backward_body::<true, false>(gy, xs, &mut [], d, ch, coef),
            (false, Some(gs)) => backward_body::<false, true>(gy, xs, gs, d, ch, coef),
            (true, Some(gs)) => backward_body::<true, true>(gy, xs, gs, d, ch, coef),
        }
    }

    /// [`backward`] for one choice of ReLU mask and of writing `gs` (`WRITE`; else empty).
    #[inline(always)]
    fn backward_body<const RELU: bool, const WRITE: bool>(
        gy: &[f32],
        xs: &[f32],
        gs: &mut [MaybeUninit<f32>],
        (n, c, inner): (usize, usize, usize),
        ch: usize,
        (mu, is, k0, gam, bet): BwdCoef,
    ) -> (f64, f64) {
        // 16 f64 lanes.
        let (mut a1, mut a2) = ([0.0f64; 16], [0.0f64; 16]);
        let (mut t1, mut t2) = (0.0f64, 0.0f64);
        let as16 = |v: &[f32]| -> [f32; 16] { v.try_into().expect("16 values") };
        for base in rows(n, c, inner, ch) {
            let (g, x) = (&gy[base..base + inner], &xs[base..base + inner]);
            // One block of 16: the masked gradient, its sums into the lanes.
            let mut block = |g: &[f32; 16], x: &[f32; 16]| {
                let mut gv = [0.0f64; 16];
                for k in 0..16 {
                    let h = (f64::from(x[k]) - mu) * is;
                    gv[k] = f64::from(mask::<RELU>(g[k], (gam * h + bet) as f32));
                    a1[k] += gv[k];
                    a2[k] += gv[k] * h;
                }
                gv
            };
            let (gc, xc) = (g.chunks_exact(16), x.chunks_exact(16));
            let (gr, xr) = (gc.remainder(), xc.remainder());
            if WRITE {
                let os = gs[base..base + inner].chunks_exact_mut(16);
                for ((g, x), o) in gc.zip(xc).zip(os) {
                    let gv = block(&as16(g), &as16(x));
                    for (o, gv) in o.iter_mut().zip(gv) {
                        o.write((k0 * gv) as f32);
                    }
                }
            } else {
                for (g, x) in gc.zip(xc) {
                    block(&as16(g), &as16(x));
                }
            }
            let tail = base + inner - gr.len();
            for (j, (&g, &x)) in gr.iter().zip(xr).enumerate() {
                let h = (f64::from(x) - mu) * is;
                let gv = f64::from(mask::<RELU>(g, (gam * h + bet) as f32));
                t1 += gv;
                t2 += gv * h;
                if WRITE {
                    gs[tail + j].write((k0 * gv) as f32);
                }
            }
        }
        (lanes(&a1) + t1, lanes(&a2) + t2)
    }

    /// The input gradient of channel `ch` with batch statistics,
    /// `γ/σ·(dy − Σdy/m − x̂·Σdy·x̂/m)`, the generic path's f64 arithmetic per element; its
    /// values of `gs` written. With `relu`, `dy` masked as in [`backward`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn input_grad(
        gy: &[f32],
        xs: &[f32],
        gs: &mut [MaybeUninit<f32>],
        n: usize,
        c: usize,
        inner: usize,
        ch: usize,
        coef: GradCoef,
        relu: bool,
    ) {
        let d = (n, c, inner);
        match relu {
            true => input_grad_body::<true>(gy, xs, gs, d, ch, coef),
            false => input_grad_body::<false>(gy, xs, gs, d, ch, coef),
        }
    }

    #[inline(always)]
    fn input_grad_body<const RELU: bool>(
        gy: &[f32],
        xs: &[f32],
        gs: &mut [MaybeUninit<f32>],
        (n, c, inner): (usize, usize, usize),
        ch: usize,
        (mu, is, k0, a, bb, gam, bet): GradCoef,
    ) {
        for base in rows(n, c, inner, ch) {
            let rows = gs[base..base + inner]
                .iter_mut()
                .zip(&gy[base..base + inner])
                .zip(&xs[base..base + inner]);
            for ((o, &g), &x) in rows {
                let h = (f64::from(x) - mu) * is;
                let g = mask::<RELU>(g, (gam * h + bet) as f32);
                o.write((k0 * (f64::from(g) - a - h * bb)) as f32);
            }
        }
    }
}

/// The f32 path's per-element passes in f32 arithmetic, 16 lanes (AVX-512F; used when the CPU
/// has it, [`rows32`] otherwise). A channel's output is
/// `y = ((x − μ_hi) − μ_lo)·k + β` (one FMA), `μ_hi + μ_lo` the mean kept as an f32 pair (so
/// `x − μ` is formed to a rounding or two of its own size however large the mean is against
/// the spread: `x − μ_hi` is exact when x is near μ) and `k` = γ/σ rounded to f32: each output
/// within a few f32 roundings of `|γ·x̂| + |β|`, and forward and backward compute it with the
/// same instructions (the mask of a fused ReLU). Sums (Σd, Σd² of statistics; Σdy, Σdy·d of
/// backward, `d = x − μ`) go into 4 f32 accumulators per sum, at most 4 vectors each, then
/// pairwise into one vector whose 16 lanes are added into 16 f64 lanes: a block of at most 256
/// values of one row. Each term so passes at most 5 f32 additions (3 in its accumulator, 2 in
/// the pairwise step), so a block's sum is within 5·u·Σ|terms| (u = 2⁻²⁴), and the f64
/// additions of the blocks and lanes (in a fixed order: results depend on the values only) add
/// ~1e-16 relative. The error bounds of each sum are at the kernels.
#[cfg(target_arch = "x86_64")]
mod x16 {
    use super::prefetch;
    use crate::net::simd::x86::{mask, widen};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// A channel's f32 coefficients: `y = ((x − mh) − ml)·k + b`, with (for the batch-statistics
    /// input gradient) `c1` = γ/σ·Σdy/m and `c2` = γ/σ³·Σdy·d/m.
    #[derive(Clone, Copy, Debug, Default)]
    pub(super) struct Coef {
        pub mh: f32,
        pub ml: f32,
        pub k: f32,
        pub b: f32,
        pub c1: f32,
        pub c2: f32,
    }

    /// [`Coef`] broadcast to 16 lanes.
    #[derive(Clone, Copy)]
    struct Vc {
        mh: __m512,
        ml: __m512,
        k: __m512,
        b: __m512,
        c1: __m512,
        c2: __m512,
    }

    impl Vc {
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn new(c: &Coef) -> Vc {
            Vc {
                mh: _mm512_set1_ps(c.mh),
                ml: _mm512_set1_ps(c.ml),
                k: _mm512_set1_ps(c.k),
                b: _mm512_set1_ps(c.b),
                c1: _mm512_set1_ps(c.c1),
                c2: _mm512_set1_ps(c.c2),
            }
        }
    }

    /// `d = (x − mh) − ml` of a vector of x.
    macro_rules! centred {
        ($x:expr, $v:expr) => {
            _mm512_sub_ps(_mm512_sub_ps($x, $v.mh), $v.ml)
        };
    }

    /// Forward's output before the ReLU, `d·k + b` (one rounding): the same instructions in
    /// forward and backward.
    macro_rules! pre_act {
        ($d:expr, $v:expr) => {
            _mm512_fmadd_ps($d, $v.k, $v.b)
        };
    }

    /// The lanes where the ReLU passes the gradient: `y > 0` or NaN (the ReLU layer's
    /// backward at its input `y`).
    macro_rules! relu_keep {
        ($y:expr) => {
            _mm512_cmp_ps_mask::<_CMP_NLE_UQ>($y, _mm512_setzero_ps())
        };
    }

    /// Two sums of a channel in progress, 16 f64 lanes each (two vectors).
    #[derive(Clone, Copy)]
    pub(super) struct Sums([[__m512d; 2]; 2]);

    impl Sums {
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub(super) fn new() -> Sums {
            Sums([[_mm512_setzero_pd(); 2]; 2])
        }

        /// Adds the 16 lanes of `v` (exactly widened) into sum `s`'s lanes.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn add(&mut self, s: usize, v: __m512) {
            let [lo, hi] = widen(v);
            self.0[s][0] = _mm512_add_pd(self.0[s][0], lo);
            self.0[s][1] = _mm512_add_pd(self.0[s][1], hi);
        }

        /// The two sums: each one's 16 lanes pairwise in a fixed order.
        #[target_feature(enable = "avx512f")]
        pub(super) fn totals(&self) -> (f64, f64) {
            let mut l = [[0.0f64; 16]; 2];
            for (s, l) in l.iter_mut().enumerate() {
                for half in 0..2 {
                    // SAFETY: each half is 8 of the 16 values.
                    unsafe { _mm512_storeu_pd(l.as_mut_ptr().add(8 * half), self.0[s][half]) };
                }
            }
            (super::rows32::lanes(&l[0]), super::rows32::lanes(&l[1]))
        }
    }

    /// Adds `Σ t1` and `Σ p·q` over a row of `len` values into `sums`, `term(off, lanes)`
    /// giving the vector (t1, p, q) at `off` (zero outside `lanes`), in blocks of at most 16
    /// vectors: vector j of a block goes into f32 accumulator j mod 4 (t1 added, p·q fused),
    /// and at the block's end the 4 are added pairwise and into the f64 lanes.
    #[inline(always)]
    fn row_sums(
        len: usize,
        sums: &mut Sums,
        mut term: impl FnMut(usize, __mmask16) -> (__m512, __m512, __m512),
    ) {
        // SAFETY (every intrinsic below): the callers are compiled with AVX-512F.
        unsafe {
            let z = _mm512_setzero_ps();
            let nv = len.div_ceil(16);
            let mut v = 0;
            while v < nv {
                let block = (nv - v).min(16);
                let (mut a1, mut a2) = ([z; 4], [z; 4]);
                let mut j = 0;
                while j < block {
                    for q in 0..4 {
                        if j + q < block {
                            let off = (v + j + q) * 16;
                            let (t, p, r) = term(off, mask(len - off));
                            a1[q] = _mm512_add_ps(a1[q], t);
                            a2[q] = _mm512_fmadd_ps(p, r, a2[q]);
                        }
                    }
                    j += 4;
                }
                let pair = |a: [__m512; 4]| {
                    _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]))
                };
                sums.add(0, pair(a1));
                sums.add(1, pair(a2));
                v += block;
            }
        }
    }

    /// Forward's output of one row (`RELU`: `max(y, 0)`, 0 for NaN, as the ReLU layer).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fwd_row<const RELU: bool>(x: &[f32], y: &mut [MaybeUninit<f32>], v: &Vc, next: isize) {
        let len = x.len();
        assert_eq!(y.len(), len);
        let mut off = 0;
        while off < len {
            let k = mask(len - off);
            if next != 0 {
                prefetch(x.as_ptr().wrapping_offset(next).wrapping_add(off), false);
                prefetch(
                    y.as_ptr().wrapping_offset(next).wrapping_add(off).cast(),
                    true,
                );
            }
            // SAFETY: the lanes `k` of the vector at `off` are inside both rows.
            unsafe {
                let xv = _mm512_maskz_loadu_ps(k, x.as_ptr().add(off));
                let mut yv = pre_act!(centred!(xv, v), v);
                if RELU {
                    // max(NaN, 0) and max(−0, +0) give the second operand, +0.
                    yv = _mm512_max_ps(yv, _mm512_setzero_ps());
                }
                _mm512_mask_storeu_ps(y.as_mut_ptr().add(off).cast::<f32>(), k, yv);
            }
            off += 16;
        }
    }

    /// The output of channel `ch` (`coef`), its values of `ys` written.
    #[target_feature(enable = "avx512f")]
    pub(super) fn forward(
        xs: &[f32],
        ys: &mut [MaybeUninit<f32>],
        (n, c, inner): (usize, usize, usize),
        ch: usize,
        coef: &Coef,
        relu: bool,
    ) {
        let v = Vc::new(coef);
        // The channel's next row, prefetched as a row is done (a row of 4 KiB is a page,
        // which the hardware prefetchers do not cross).
        let next = (c * inner) as isize;
        for i in 0..n {
            let base = (i * c + ch) * inner;
            let (x, y) = (&xs[base..base + inner], &mut ys[base..base + inner]);
            if relu {
                fwd_row::<true>(x, y, &v, next)
            } else {
                fwd_row::<false>(x, y, &v, next)
            }
        }
    }

    /// The output of every channel (`coefs[ch]`), the rows in memory order (sample by sample):
    /// with running statistics no pass needs a channel's values again.
    #[target_feature(enable = "avx512f")]
    pub(super) fn forward_all(
        xs: &[f32],
        ys: &mut [MaybeUninit<f32>],
        (n, c, inner): (usize, usize, usize),
        coefs: &[Coef],
        relu: bool,
    ) {
        assert!(coefs.len() >= c);
        let vs: Vec<Vc> = coefs.iter().map(|k| Vc::new(k)).collect();
        // The next row in memory, prefetched as a row is done (a row of 4 KiB is a page).
        let step = inner as isize;
        for i in 0..n {
            for (ch, v) in vs.iter().enumerate().take(c) {
                let base = (i * c + ch) * inner;
                let (x, y) = (&xs[base..base + inner], &mut ys[base..base + inner]);
                if relu {
                    fwd_row::<true>(x, y, v, step)
                } else {
                    fwd_row::<false>(x, y, v, step)
                }
            }
        }
    }

    /// One row of backward's sums (Σ dy, Σ dy·d, `dy` masked by a fused ReLU as forward's
    /// output recomputed gives it) into `sums`; with `WRITE`, `k·dy` into `gs` (running
    /// statistics' input gradient). The masked `dy` is exact and `d` within 2u·|x − μ| (two
    /// roundings), so with the blocks' 5u: Σdy within 5u·Σ|dy|, Σdy·d within 7u·Σ|dy·d|.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn bwd_row<const RELU: bool, const WRITE: bool>(
        g: &[f32],
        x: &[f32],
        gs: &mut [MaybeUninit<f32>],
        v: &Vc,
        sums: &mut Sums,
        next: isize,
    ) {
        let len = x.len();
        assert!(g.len() == len && (!WRITE || gs.len() == len));
        let out = gs.as_mut_ptr().cast::<f32>();
        row_sums(len, sums, |off, k| {
            if next != 0 {
                prefetch(x.as_ptr().wrapping_offset(next).wrapping_add(off), false);
                prefetch(g.as_ptr().wrapping_offset(next).wrapping_add(off), false);
            }
            // SAFETY: the lanes `k` of the vector at `off` are inside the rows.
            unsafe {
                let xv = _mm512_maskz_loadu_ps(k, x.as_ptr().add(off));
                let d = centred!(xv, v);
                let keep = if RELU {
                    k & relu_keep!(pre_act!(d, v))
                } else {
                    k
                };
                let gv = _mm512_maskz_loadu_ps(keep, g.as_ptr().add(off));
                if WRITE {
                    _mm512_mask_storeu_ps(out.add(off), k, _mm512_mul_ps(v.k, gv));
                }
                (gv, gv, d)
            }
        });
    }

    /// (Σ dy, Σ dy·d) of channel `ch` with `dy` masked as in [`bwd_row`]; with `gs`, `k·dy`
    /// written into its values of it.
    #[target_feature(enable = "avx512f")]
    pub(super) fn backward(
        gy: &[f32],
        xs: &[f32],
        mut gs: Option<&mut [MaybeUninit<f32>]>,
        (n, c, inner): (usize, usize, usize),
        ch: usize,
        coef: &Coef,
        relu: bool,
    ) -> (f64, f64) {
        let v = Vc::new(coef);
        // The channel's next row, prefetched as a row is done (a row of 4 KiB is a page,
        // which the hardware prefetchers do not cross).
        let next = (c * inner) as isize;
        let mut sums = Sums::new();
        for i in 0..n {
            let r = (i * c + ch) * inner..(i * c + ch + 1) * inner;
            let (g, x) = (&gy[r.clone()], &xs[r.clone()]);
            let s = &mut sums;
            match (relu, gs.as_deref_mut()) {
                (false, None) => bwd_row::<false, false>(g, x, &mut [], &v, s, next),
                (true, None) => bwd_row::<true, false>(g, x, &mut [], &v, s, next),
                (false, Some(o)) => bwd_row::<false, true>(g, x, &mut o[r], &v, s, next),
                (true, Some(o)) => bwd_row::<true, true>(g, x, &mut o[r], &v, s, next),
            }
        }
        sums.totals()
    }

    /// [`backward`] of every channel (`coefs[ch]`), the rows in memory order (sample by
    /// sample), each channel's sums in its own [`Sums`]: the same bits as channel by channel.
    #[target_feature(enable = "avx512f")]
    pub(super) fn backward_all(
        gy: &[f32],
        xs: &[f32],
        mut gs: Option<&mut [MaybeUninit<f32>]>,
        (n, c, inner): (usize, usize, usize),
        coefs: &[Coef],
        relu: bool,
    ) -> Vec<(f64, f64)> {
        assert!(coefs.len() >= c);
        let vs: Vec<Vc> = coefs.iter().map(|k| Vc::new(k)).collect();
        let mut sums = vec![Sums::new(); c];
        // The next row in memory, prefetched as a row is done (a row of 4 KiB is a page).
        let step = inner as isize;
        for i in 0..n {
            for ch in 0..c {
                let r = (i * c + ch) * inner..(i * c + ch + 1) * inner;
                let (g, x) = (&gy[r.clone()], &xs[r.clone()]);
                let (v, s) = (&vs[ch], &mut sums[ch]);
                match (relu, gs.as_deref_mut()) {
                    (false, None) => bwd_row::<false, false>(g, x, &mut [], v, s, step),
                    (true, None) => bwd_row::<true, false>(g, x, &mut [], v, s, step),
                    (false, Some(o)) => bwd_row::<false, true>(g, x, &mut o[r], v, s, step),
                    (true, Some(o)) => bwd_row::<true, true>(g, x, &mut o[r], v, s, step),
                }
            }
        }
        sums.iter().map(|s| s.totals()).collect()
    }

    /// One row of the batch-statistics input gradient, `(dy·k − c1) − d·c2` (two FMAs),
    /// `dy` masked as in [`bwd_row`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn grad_row<const RELU: bool>(
        g: &[f32],
        x: &[f32],
        gs: &mut [MaybeUninit<f32>],
        v: &Vc,
        next: isize,
    ) {
        let len = x.len();
        assert!(g.len() == len && gs.len() == len);
        let mut off = 0;
        while off < len {
            let k = mask(len - off);
            if next != 0 {
                prefetch(x.as_ptr().wrapping_offset(next).wrapping_add(off), false);
                prefetch(g.as_ptr().wrapping_offset(next).wrapping_add(off), false);
                prefetch(
                    gs.as_ptr().wrapping_offset(next).wrapping_add(off).cast(),
                    true,
                );
            }
            // SAFETY: the lanes `k` of the vector at `off` are inside the rows.
            unsafe {
                let xv = _mm512_maskz_loadu_ps(k, x.as_ptr().add(off));
                let d = centred!(xv, v);
                let keep = if RELU {
                    k & relu_keep!(pre_act!(d, v))
                } else {
                    k
                };
                let gv = _mm512_maskz_loadu_ps(keep, g.as_ptr().add(off));
                let o = _mm512_fnmadd_ps(d, v.c2, _mm512_fmsub_ps(gv, v.k, v.c1));
                _mm512_mask_storeu_ps(gs.as_mut_ptr().add(off).cast::<f32>(), k, o);
            }
            off += 16;
        }
    }

    /// The input gradient of channel `ch` with batch statistics,
    /// `γ/σ·(dy − Σdy/m − x̂·Σdy·x̂/m) = dy·k − c1 − d·c2`, its values of `gs` written.
    #[target_feature(enable = "avx512f")]
    pub(super) fn input_grad(
        gy: &[f32],
        xs: &[f32],
        gs: &mut [MaybeUninit<f32>],
        (n, c, inner): (usize, usize, usize),
        ch: usize,
        coef: &Coef,
        relu: bool,
    ) {
        let v = Vc::new(coef);
        // The channel's next row, prefetched as a row is done (a row of 4 KiB is a page,
        // which the hardware prefetchers do not cross).
        let next = (c * inner) as isize;
        for i in 0..n {
            let r = (i * c + ch) * inner..(i * c + ch + 1) * inner;
            let (g, x, o) = (&gy[r.clone()], &xs[r.clone()], &mut gs[r]);
            if relu {
                grad_row::<true>(g, x, o, &v, next)
            } else {
                grad_row::<false>(g, x, o, &v, next)
            }
        }
    }
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
    use crate::net::check_fused_relu;
    use crate::net::gradcheck::{Rng, check_layer, check_layer_with, run_layer, run_layer_fused};

    /// A test case: batch norm over `shape`'s axis 1, an input off-centre (mean 3), an output
    /// gradient, and its parameters and buffers (running variance positive, running mean
    /// near the data's), with their declarations.
    struct Case {
        bn: BatchNorm,
        decls: Vec<ParamDecl>,
        params: Vec<Vec<f64>>,
        x: ArrayD<f64>,
        gy: ArrayD<f64>,
    }

    fn case(mode: BnMode, affine: bool, shape: &[usize], seed: u64) -> Case {
        let bn = BatchNorm {
            num_features: shape[1],
            eps: 1e-5,
            affine,
            mode,
        };
        let mut rng = Rng::new(seed);
        let x = rng.array(shape).mapv(|v| 3.0 + v);
        let gy = rng.array(shape);
        let decls: Vec<ParamDecl> = <BatchNorm as Layer<f64>>::params(&bn)
            .into_iter()
            .chain(<BatchNorm as Layer<f64>>::buffers(&bn))
            .collect();
        let params: Vec<Vec<f64>> = decls
            .iter()
            .map(|d| {
                let v = rng.array(&d.shape).into_raw_vec_and_offset().0;
                match d.suffix {
                    "running_var" => v.iter().map(|x| x.abs() + 0.5).collect(),
                    "running_mean" => v.iter().map(|x| x + 3.0).collect(),
                    _ => v,
                }
            })
            .collect();
        Case {
            bn,
            decls,
            params,
            x,
            gy,
        }
    }

    fn to_f32(params: &[Vec<f64>]) -> Vec<Vec<f32>> {
        params
            .iter()
            .map(|v| v.iter().map(|&x| x as f32).collect())
            .collect()
    }

    /// The f32 path (16 f64 lanes per channel, AVX-512F where the CPU has it) against the f64
    /// path, which the finite differences below check: output, input gradient and every
    /// parameter and buffer gradient, in both modes, with and without affine parameters,
    /// rows that are and are not multiples of 16 values, and data off-centre (mean 3).
    #[test]
    fn f32_path_matches_the_f64_path() {
        for (mode, affine, shape) in [
            (BnMode::RunningStats, true, [5usize, 3, 6, 6]),
            (BnMode::BatchStats, true, [4, 3, 8, 8]),
            (BnMode::BatchStats, false, [3, 2, 5, 7]),
            (BnMode::RunningStats, false, [2, 4, 1, 3]),
            (BnMode::BatchStats, true, [3, 2, 4, 5]),
        ] {
            let Case {
                bn,
                decls,
                params,
                x,
                gy,
            } = case(mode, affine, &shape, 7);
            let (y, g, gx) = run_layer::<f64>(&bn, &params, &x, &gy, true, 0.0);
            let p32 = to_f32(&params);
            let (x32, gy32) = (x.mapv(|v| v as f32), gy.mapv(|v| v as f32));
            let (y32, g32, gx32) = run_layer::<f32>(&bn, &p32, &x32, &gy32, true, 0.0);
            let input_grad = "input gradient";
            let (gx, gx32) = (
                gx[0].as_ref().expect(input_grad),
                gx32[0].as_ref().expect(input_grad),
            );
            let close = |a: &[f32], b: &[f64], what: &str| {
                let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                for (k, (&u, &v)) in a.iter().zip(b).enumerate() {
                    assert!(
                        (f64::from(u) - v).abs() <= 2e-5 * scale,
                        "{mode:?} affine {affine} {what}[{k}]: f32 {u} vs f64 {v}"
                    );
                }
            };
            close(y32.as_slice().unwrap(), y.as_slice().unwrap(), "y");
            close(gx32.as_slice().unwrap(), gx.as_slice().unwrap(), "gx");
            for ((a, b), d) in g32.iter().zip(&g).zip(&decls) {
                close(a, b, d.suffix);
            }
        }
    }

    /// Batch norm with the next ReLU fused (`forward_relu`, `backward_relu`: the mask
    /// recomputed from the input) gives the same bits as batch norm and then the ReLU layer:
    /// f32 rows of at least 16 values (the AVX-512 kernels) and shorter ones, and f64, in both
    /// modes, with and without affine parameters.
    #[test]
    fn fused_relu_gives_the_same_bits_as_the_relu_layer() {
        for (mode, affine, shape) in [
            (BnMode::RunningStats, true, vec![5usize, 3, 6, 6]),
            (BnMode::BatchStats, true, vec![4, 3, 8, 8]),
            (BnMode::BatchStats, false, vec![3, 2, 5, 7]),
            (BnMode::RunningStats, false, vec![2, 4, 1, 3]),
            (BnMode::BatchStats, true, vec![3, 2, 2, 5]),
            (BnMode::RunningStats, true, vec![2, 3, 20]),
        ] {
            let Case {
                bn, params, x, gy, ..
            } = case(mode, affine, &shape, 11);
            let zeroed = check_fused_relu(&bn, &params, std::slice::from_ref(&x), &gy);
            assert!(zeroed > 0.1 && zeroed < 0.9, "{mode:?}: {zeroed}");
            let p32 = to_f32(&params);
            let (x32, gy32) = (x.mapv(|v| v as f32), gy.mapv(|v| v as f32));
            let zeroed = check_fused_relu(&bn, &p32, &[x32], &gy32);
            assert!(zeroed > 0.1 && zeroed < 0.9, "{mode:?}: {zeroed}");
        }
    }

    /// Forward and backward of `bn` (with the next ReLU fused when `relu`): output, parameter
    /// and buffer gradients, input gradient.
    fn run_bn<T: Real>(
        bn: &BatchNorm,
        params: &[Vec<T>],
        x: &ArrayD<T>,
        gy: &ArrayD<T>,
        relu: bool,
    ) -> (ArrayD<T>, Vec<Vec<T>>, ArrayD<T>) {
        let (y, g, mut gx) = run_layer_fused(bn, params, x, gy, true, T::zero(), relu);
        (y, g, gx.remove(0).expect("input gradient"))
    }

    /// The f32 kernels (f32 arithmetic per element, AVX-512F where the CPU has it) against the
    /// f64 path on the same f32-rounded inputs and parameters, on awkward data, in both modes,
    /// with and without the fused ReLU: a mean of 1000 against a spread of 1, a variance of
    /// 1e-6 and one of 1e-8 (below ε = 1e-5), and ReLU ties (integer data with a mean of exactly
    /// 0 and β = 0, so that y = 0 exactly where x = 0: both paths mask it). Rows of 72 values
    /// (4 full vectors and a partial one). Bounds, u = 2⁻²⁴: each output within
    /// 8u·(|γ·x̂| + |β|) (x − μ to two roundings, k = γ/σ and the FMA to one each, and f64's
    /// own rounding to f32); each input gradient within 16u of the sizes of its terms,
    /// |γ/σ|·(|dy| + Σ|dy|/m + |x̂|·Σ|dy·x̂|/m) (batch statistics; the sums to 5u and 7u of
    /// Σ|terms|) or |γ/σ·dy| (running); Σdy-type gradients (β, running mean) within 16u of
    /// their Σ|dy|, Σdy·x̂-type ones (γ, running variance) within 16u of their Σ|dy·x̂|.
    #[test]
    fn f32_kernels_match_f64_on_awkward_data() {
        let u = f64::from(f32::EPSILON) / 2.0;
        let shape = [4usize, 3, 9, 8];
        let (n, c, inner) = (shape[0], shape[1], shape[2] * shape[3]);
        let m = (n * inner) as f64;
        let f32r = |v: f64| f64::from(v as f32);
        let mut worst = 0.0f64;
        for mode in [BnMode::BatchStats, BnMode::RunningStats] {
            for (what, mean, spread) in [
                ("mean 1000, spread 1", 1000.0, 1.0),
                ("variance 1e-6", 1.0, 1e-3),
                ("variance 1e-8 < eps", -2.0, 1e-4),
                ("ReLU ties", 0.0, 0.0),
            ] {
                let ties = spread == 0.0;
                let bn = BatchNorm {
                    num_features: c,
                    eps: 1e-5,
                    affine: true,
                    mode,
                };
                let mut rng = Rng::new(29);
                let mut x = rng.array(&shape).mapv(|v| f32r(mean + spread * 1.7 * v));
                if ties {
                    // Integers in −3..=3, the second half of each channel the negated first:
                    // the mean is exactly 0.
                    let xs = x.as_slice_mut().unwrap();
                    for ch in 0..c {
                        for i in 0..n {
                            for j in 0..inner {
                                let k = (i * c + ch) * inner + j;
                                xs[k] = if i < n / 2 {
                                    (3.5 * rng.next()).round()
                                } else {
                                    -xs[((i - n / 2) * c + ch) * inner + j]
                                };
                            }
                        }
                    }
                }
                let gy = rng.array(&shape).mapv(f32r);
                let gamma: Vec<f64> = (0..c).map(|_| f32r(1.0 + 0.5 * rng.next())).collect();
                let beta: Vec<f64> = (0..c)
                    .map(|_| if ties { 0.0 } else { f32r(0.3 * rng.next()) })
                    .collect();
                // Per channel: the statistics (of the data, or running ones near them).
                let (mut mu, mut var) = (vec![0.0; c], vec![0.0; c]);
                let rows = |ch: usize| {
                    (0..n).flat_map(move |i| (0..inner).map(move |j| (i * c + ch) * inner + j))
                };
                let xs = x.as_slice().unwrap().to_vec();
                for ch in 0..c {
                    let mb = rows(ch).map(|k| xs[k]).sum::<f64>() / m;
                    let vb = rows(ch).map(|k| (xs[k] - mb).powi(2)).sum::<f64>() / m;
                    (mu[ch], var[ch]) = match mode {
                        BnMode::BatchStats => (mb, vb),
                        BnMode::RunningStats if ties => (0.0, f32r(vb)),
                        BnMode::RunningStats => (
                            f32r(mb + 0.1 * spread * rng.next()),
                            f32r(vb * (1.0 + 0.1 * rng.next())),
                        ),
                    };
                }
                let mut params = vec![gamma.clone(), beta.clone()];
                if mode == BnMode::RunningStats {
                    params.push(mu.clone());
                    params.push(var.clone());
                }
                for relu in [false, true] {
                    let (y, g, gx) = run_bn::<f64>(&bn, &params, &x, &gy, relu);
                    let p32 = to_f32(&params);
                    let (x32, gy32) = (x.mapv(|v| v as f32), gy.mapv(|v| v as f32));
                    let (y32, g32, gx32) = run_bn::<f32>(&bn, &p32, &x32, &gy32, relu);
                    let (y, gx) = (y.as_slice().unwrap(), gx.as_slice().unwrap());
                    let (y32, gx32) = (y32.as_slice().unwrap(), gx32.as_slice().unwrap());
                    let mut check = |got: f32, want: f64, scale: f64, tol: f64, at: &str| {
                        let err = (f64::from(got) - want).abs();
                        worst = worst.max(err / (u * scale).max(f64::MIN_POSITIVE));
                        assert!(
                            err <= tol * u * scale,
                            "{mode:?} {what} relu {relu} {at}: f32 {got} vs f64 {want} \
                             (error {err:e} > {tol}u·{scale:e})"
                        );
                    };
                    for ch in 0..c {
                        let is = 1.0 / (var[ch] + bn.eps).sqrt();
                        let (ga, be) = (gamma[ch], beta[ch]);
                        let xh = |k: usize| (xs[k] - mu[ch]) * is;
                        // The ReLU's mask as the f64 path applies it.
                        let dy = |k: usize| {
                            let keep = !relu || y[k] > 0.0;
                            if keep { gy.as_slice().unwrap()[k] } else { 0.0 }
                        };
                        let s_dy: f64 = rows(ch).map(|k| dy(k).abs()).sum();
                        let s_dyx: f64 = rows(ch).map(|k| (dy(k) * xh(k)).abs()).sum();
                        for k in rows(ch) {
                            let sy = ga.abs() * xh(k).abs() + be.abs();
                            check(y32[k], y[k], sy, 8.0, &format!("y[{k}]"));
                            let sg = match mode {
                                BnMode::BatchStats => {
                                    dy(k).abs() + s_dy / m + xh(k).abs() * s_dyx / m
                                }
                                BnMode::RunningStats => dy(k).abs(),
                            };
                            check(
                                gx32[k],
                                gx[k],
                                (ga * is).abs() * sg,
                                16.0,
                                &format!("gx[{k}]"),
                            );
                        }
                        check(g32[0][ch], g[0][ch], s_dyx, 16.0, "weight");
                        check(g32[1][ch], g[1][ch], s_dy, 16.0, "bias");
                        if mode == BnMode::RunningStats {
                            let (a, b) =
                                ((ga * is).abs() * s_dy, 0.5 * (ga * is * is).abs() * s_dyx);
                            check(g32[2][ch], g[2][ch], a, 16.0, "running_mean");
                            check(g32[3][ch], g[3][ch], b, 16.0, "running_var");
                        }
                    }
                }
            }
        }
        eprintln!("worst error of the f32 kernels: {worst:.2}u of its scale");
    }

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
