//! `nn.LayerNorm(normalized_shape)` over the last axis, as PyTorch:
//! `y = (x − mean) / sqrt(var + eps) · weight + bias`, with the mean and the biased variance of
//! each row (one position of one sample). `weight` and `bias` are `[normalized_shape]`; both
//! are absent without `elementwise_affine`, and `bias = false` (PyTorch ≥ 2.1, nanoGPT's own
//! `LayerNorm(ndim, bias)`) drops only the bias.
//!
//! Forward keeps only each row's mean and 1/σ for backward (two numbers a row), which is one
//! pass over the rows: x̂ is recomputed from the input exactly as forward computed it, then
//! `dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) / σ` with `ĝ = dy·weight`; the parameter gradients are
//! column sums of `dy·x̂` and `dy`. Outputs are written once, without zero-filling first. Row statistics use two passes (mean, then
//! the mean of squared deviations) in the element type.
//!
//! ```
//! use lca::net::{layer_norm::LayerNorm, Layer, Saved};
//! use ndarray::{arr2, ArrayD};
//! let ln = LayerNorm { normalized_shape: 2, eps: 0.0, weight: true, bias: true };
//! let x: ArrayD<f64> = arr2(&[[1.0, 3.0]]).into_dyn();
//! let y = ln.forward(&[&[2.0, 1.0], &[0.0, 0.5]], &[x.view()], &mut Saved::None);
//! assert_eq!(y.as_slice().unwrap(), &[-2.0, 1.5]);
//! ```

use super::{Backward, Layer, ParamDecl, Real, Saved, fastmath};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

/// Layer normalisation over the last axis.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub normalized_shape: usize,
    pub eps: f64,
    /// Whether the layer has `weight` (PyTorch's `elementwise_affine`).
    pub weight: bool,
    /// Whether the layer has `bias`.
    pub bias: bool,
}

impl<T: Real> Layer<T> for LayerNorm {
    fn params(&self) -> Vec<ParamDecl> {
        let mut v = Vec::new();
        if self.weight {
            v.push(ParamDecl {
                suffix: "weight",
                shape: vec![self.normalized_shape],
            });
        }
        if self.bias {
            v.push(ParamDecl {
                suffix: "bias",
                shape: vec![self.normalized_shape],
            });
        }
        v
    }

    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let [s] = inputs else {
            return Err(format!("takes 1 input, got {}", inputs.len()));
        };
        match s.last() {
            Some(&c) if c == self.normalized_shape => Ok(s.clone()),
            Some(&c) => Err(format!(
                "normalized_shape = {} does not match the last axis of its input ({c})",
                self.normalized_shape
            )),
            None => Err("needs an input with a feature axis".into()),
        }
    }

    fn forward(
        &self,
        params: &[&[T]],
        inputs: &[ArrayViewD<T>],
        saved: &mut Saved<T>,
    ) -> ArrayD<T> {
        let x = &inputs[0];
        let c = self.normalized_shape;
        let xs = x.as_slice().expect("activations are contiguous");
        let rows = xs.len() / c;
        let gamma = self.weight.then(|| params[0]);
        let beta = self.bias.then(|| params[usize::from(self.weight)]);
        // Forward keeps only each row's mean and 1/σ (2 numbers a row, not a copy of the
        // input): backward recomputes x̂ from its input with the same operations, bit for bit.
        let mut stats = Vec::with_capacity(2 * rows);
        let mut y = Vec::with_capacity(xs.len());
        let eps = T::of(self.eps);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            unsafe { forward_rows_avx512(xs, c, gamma, beta, eps, &mut stats, &mut y) };
        } else if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { forward_rows_avx2(xs, c, gamma, beta, eps, &mut stats, &mut y) };
        } else {
            forward_rows(xs, c, gamma, beta, eps, &mut stats, &mut y);
        }
        #[cfg(not(target_arch = "x86_64"))]
        forward_rows(xs, c, gamma, beta, eps, &mut stats, &mut y);
        *saved = Saved::Arrays(vec![
            ArrayD::from_shape_vec(IxDyn(&[2 * rows]), stats).expect("sizes match"),
        ]);
        ArrayD::from_shape_vec(x.raw_dim(), y).expect("sizes match")
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        let Saved::Arrays(sv) = b.saved else {
            unreachable!("forward saves each row's mean and 1/σ")
        };
        let stats = sv[0].as_slice().expect("contiguous");
        let c = self.normalized_shape;
        let xs = b.inputs[0].as_slice().expect("activations are contiguous");
        let gy = b.grad_out.as_slice().expect("gradients are contiguous");
        let mut gp = b.grad_params;
        let gamma = self.weight.then(|| b.params[0]);
        let need_gx = b.need_input_grad[0];
        let mut gx = Vec::with_capacity(if need_gx { gy.len() } else { 0 });
        let (gw, gb) = match (self.weight, self.bias) {
            (true, true) => {
                let (w, b) = gp.split_at_mut(1);
                (Some(&mut *w[0]), Some(&mut *b[0]))
            }
            (true, false) => (Some(&mut *gp[0]), None),
            (false, true) => (None, Some(&mut *gp[0])),
            (false, false) => (None, None),
        };
        let gx_out = need_gx.then_some(&mut gx);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            unsafe { backward_rows_avx512(xs, gy, stats, c, gamma, gw, gb, gx_out) };
        } else if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { backward_rows_avx2(xs, gy, stats, c, gamma, gw, gb, gx_out) };
        } else {
            backward_rows(xs, gy, stats, c, gamma, gw, gb, gx_out);
        }
        #[cfg(not(target_arch = "x86_64"))]
        backward_rows(xs, gy, stats, c, gamma, gw, gb, gx_out);
        if !need_gx {
            return vec![None];
        }
        vec![Some(
            ArrayD::from_shape_vec(b.inputs[0].raw_dim(), gx).expect("sizes match"),
        )]
    }
}

/// Forward of every row of `xs` (rows of `c`): each row's mean and 1/σ appended to `stats`,
/// its output to `y`. Two passes in the element type (f32 accumulation over one row, as
/// PyTorch's float kernel; exact arithmetic for f64).
#[inline(always)]
fn forward_rows<T: Real>(
    xs: &[T],
    c: usize,
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
    eps: T,
    stats: &mut Vec<T>,
    y: &mut Vec<T>,
) {
    assert!(
        gamma.is_none_or(|g| g.len() == c) && beta.is_none_or(|b| b.len() == c),
        "weight and bias have normalized_shape values"
    );
    let mut xh = vec![T::zero(); c];
    let inv_c = T::of(1.0 / c as f64);
    for xr in xs.chunks_exact(c) {
        let m = fastmath::sum(xr) * inv_c;
        for (h, &v) in xh.iter_mut().zip(xr) {
            *h = v - m;
        }
        let var = fastmath::dot(&xh, &xh) * inv_c;
        let s = T::one() / (var + eps).sqrt();
        stats.push(m);
        stats.push(s);
        // x̂·γ + β written straight into `y`'s spare capacity, one plain loop per case (a
        // per-element `match` on the options kept the loop scalar): the same operations in the
        // same order.
        let start = y.len();
        y.reserve(c);
        let out = &mut y.spare_capacity_mut()[..c];
        match (gamma, beta) {
            (Some(g), Some(b)) => {
                for (((o, &h), &gk), &bk) in out.iter_mut().zip(&xh).zip(g).zip(b) {
                    o.write(h * s * gk + bk);
                }
            }
            (Some(g), None) => {
                for ((o, &h), &gk) in out.iter_mut().zip(&xh).zip(g) {
                    o.write(h * s * gk);
                }
            }
            (None, Some(b)) => {
                for ((o, &h), &bk) in out.iter_mut().zip(&xh).zip(b) {
                    o.write(h * s + bk);
                }
            }
            (None, None) => {
                for (o, &h) in out.iter_mut().zip(&xh) {
                    o.write(h * s);
                }
            }
        }
        // SAFETY: the loop above wrote all c values after `start` (γ and β, when present,
        // have c values: asserted above).
        unsafe { y.set_len(start + c) };
    }
}

/// Backward of every row, one pass: x̂ recomputed as forward computed it, the parameter
/// gradients' column sums of dy·x̂ (`gw`) and dy (`gb`), and dx appended to `gx` when asked.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_rows<T: Real>(
    xs: &[T],
    gy: &[T],
    stats: &[T],
    c: usize,
    gamma: Option<&[T]>,
    mut gw: Option<&mut [T]>,
    mut gb: Option<&mut [T]>,
    mut gx: Option<&mut Vec<T>>,
) {
    let inv_c = T::of(1.0 / c as f64);
    let (mut xh, mut ghat) = (vec![T::zero(); c], vec![T::zero(); c]);
    for ((xr, g), ms) in xs
        .chunks_exact(c)
        .zip(gy.chunks_exact(c))
        .zip(stats.chunks_exact(2))
    {
        let (m, s) = (ms[0], ms[1]);
        for (h, &v) in xh.iter_mut().zip(xr) {
            *h = (v - m) * s;
        }
        if let Some(gw) = gw.as_deref_mut() {
            for ((a, &gk), &hk) in gw.iter_mut().zip(g).zip(&xh) {
                *a += gk * hk;
            }
        }
        if let Some(gb) = gb.as_deref_mut() {
            for (a, &gk) in gb.iter_mut().zip(g) {
                *a += gk;
            }
        }
        let Some(gx) = gx.as_deref_mut() else {
            continue;
        };
        match gamma {
            Some(w) => {
                for ((o, &gk), &wk) in ghat.iter_mut().zip(g).zip(w) {
                    *o = gk * wk;
                }
            }
            None => ghat.copy_from_slice(g),
        }
        let (mg, mgh) = (
            fastmath::sum(&ghat) * inv_c,
            fastmath::dot(&ghat, &xh) * inv_c,
        );
        gx.extend(
            ghat.iter()
                .zip(&xh)
                .map(|(&gk, &hk)| (gk - mg - hk * mgh) * s),
        );
    }
}

/// [`forward_rows`] compiled with AVX2 (the same operations in the same order, so the same
/// bits: no fused multiply-adds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn forward_rows_avx2<T: Real>(
    xs: &[T],
    c: usize,
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
    eps: T,
    stats: &mut Vec<T>,
    y: &mut Vec<T>,
) {
    forward_rows(xs, c, gamma, beta, eps, stats, y)
}

/// [`backward_rows`] compiled with AVX2 (the same bits).
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn backward_rows_avx2<T: Real>(
    xs: &[T],
    gy: &[T],
    stats: &[T],
    c: usize,
    gamma: Option<&[T]>,
    gw: Option<&mut [T]>,
    gb: Option<&mut [T]>,
    gx: Option<&mut Vec<T>>,
) {
    backward_rows(xs, gy, stats, c, gamma, gw, gb, gx)
}

/// [`forward_rows`] compiled with AVX-512F (the same bits: the element-wise loops run 16
/// lanes wide, the row sums keep their four accumulators).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn forward_rows_avx512<T: Real>(
    xs: &[T],
    c: usize,
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
    eps: T,
    stats: &mut Vec<T>,
    y: &mut Vec<T>,
) {
    forward_rows(xs, c, gamma, beta, eps, stats, y)
}

/// [`backward_rows`] compiled with AVX-512F (the same bits).
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn backward_rows_avx512<T: Real>(
    xs: &[T],
    gy: &[T],
    stats: &[T],
    c: usize,
    gamma: Option<&[T]>,
    gw: Option<&mut [T]>,
    gb: Option<&mut [T]>,
    gx: Option<&mut Vec<T>>,
) {
    backward_rows(xs, gy, stats, c, gamma, gw, gb, gx)
}

// ---------------------------------------------------------------------------------------
// Drafting (`lca init`)

use super::registry::{DraftIn, Drafted, Drafter, ModuleTensors, Recognised, Role};
use crate::spec::LayerKind;

/// `nn.LayerNorm(C)`: a 1-D `weight` `[C]`, maybe a `bias` `[C]` (a batch norm without
/// running statistics is recognised first, by its name).
pub static DRAFTER: Drafter = Drafter {
    recognise,
    role: Role::Norm,
    draft,
};

fn recognise(m: &ModuleTensors) -> Option<Recognised> {
    let w = m.weight_and_bias(1)?;
    Some(Recognised::Layer(LayerKind::LayerNorm {
        normalized_shape: w[0],
        eps: 1e-5,
        elementwise_affine: true,
        bias: m.has("bias"),
    }))
}

fn draft(kind: LayerKind, at: DraftIn) -> Drafted {
    let LayerKind::LayerNorm {
        normalized_shape, ..
    } = kind
    else {
        return Drafted::as_recognised(kind, at);
    };
    Drafted {
        lead: Vec::new(),
        kind,
        explicit: &[],
        what: format!("layer_norm {normalized_shape}"),
        flow: at.flow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::check_layer;

    /// The AVX2 and AVX-512F builds of the row loops give the generic build's bits (f32,
    /// widths around the vector sizes, with and without the affine parameters).
    #[test]
    fn vector_builds_give_the_same_bits() {
        type Fwd = unsafe fn(
            &[f32],
            usize,
            Option<&[f32]>,
            Option<&[f32]>,
            f32,
            &mut Vec<f32>,
            &mut Vec<f32>,
        );
        type Bwd = unsafe fn(
            &[f32],
            &[f32],
            &[f32],
            usize,
            Option<&[f32]>,
            Option<&mut [f32]>,
            Option<&mut [f32]>,
            Option<&mut Vec<f32>>,
        );
        #[allow(unused_mut)]
        let mut builds: Vec<(&str, Fwd, Bwd)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                builds.push(("avx2", forward_rows_avx2, backward_rows_avx2));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                builds.push(("avx512f", forward_rows_avx512, backward_rows_avx512));
            }
        }
        let mut rng = crate::net::gradcheck::Rng::new(9);
        for c in [1usize, 7, 16, 37, 64, 129] {
            let rows = 5;
            let f = |n: usize, rng: &mut crate::net::gradcheck::Rng| -> Vec<f32> {
                rng.array(&[n]).iter().map(|&v| (v * 3.0) as f32).collect()
            };
            let (xs, gy, w, b) = (
                f(rows * c, &mut rng),
                f(rows * c, &mut rng),
                f(c, &mut rng),
                f(c, &mut rng),
            );
            for affine in [false, true] {
                let (gamma, beta) = (affine.then_some(&w[..]), affine.then_some(&b[..]));
                let (mut s1, mut y1) = (vec![], vec![]);
                forward_rows(&xs, c, gamma, beta, 1e-5, &mut s1, &mut y1);
                let (mut gw1, mut gb1, mut gx1) = (vec![0.5f32; c], vec![0.25f32; c], vec![]);
                let (gw0, gb0) = (gw1.clone(), gb1.clone());
                backward_rows(
                    &xs,
                    &gy,
                    &s1,
                    c,
                    gamma,
                    Some(&mut gw1),
                    Some(&mut gb1),
                    Some(&mut gx1),
                );
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for &(name, fwd, bwd) in &builds {
                    let (mut s2, mut y2) = (vec![], vec![]);
                    // SAFETY: the CPU supports the build's features (checked where pushed).
                    unsafe { fwd(&xs, c, gamma, beta, 1e-5, &mut s2, &mut y2) };
                    assert_eq!(bits(&s1), bits(&s2), "{name}, c = {c}: statistics");
                    assert_eq!(bits(&y1), bits(&y2), "{name}, c = {c}: output");
                    let (mut gw2, mut gb2, mut gx2) = (gw0.clone(), gb0.clone(), vec![]);
                    // SAFETY: as above.
                    unsafe {
                        bwd(
                            &xs,
                            &gy,
                            &s1,
                            c,
                            gamma,
                            Some(&mut gw2),
                            Some(&mut gb2),
                            Some(&mut gx2),
                        )
                    };
                    assert_eq!(bits(&gw1), bits(&gw2), "{name}, c = {c}: weight gradient");
                    assert_eq!(bits(&gb1), bits(&gb2), "{name}, c = {c}: bias gradient");
                    assert_eq!(bits(&gx1), bits(&gx2), "{name}, c = {c}: input gradient");
                }
            }
        }
    }

    /// Every combination of weight and bias: each output is `(x − mean)·(1/σ)·γ + β` from the
    /// row's kept statistics, in that order, bit for bit.
    #[test]
    fn forward_rows_follow_the_formula_in_every_case() {
        let mut rng = crate::net::gradcheck::Rng::new(4);
        let c = 19;
        let v = |n: usize, rng: &mut crate::net::gradcheck::Rng| -> Vec<f32> {
            rng.array(&[n]).iter().map(|&v| (v * 2.0) as f32).collect()
        };
        let (xs, w, b) = (v(3 * c, &mut rng), v(c, &mut rng), v(c, &mut rng));
        for (gamma, beta) in [
            (Some(&w[..]), Some(&b[..])),
            (Some(&w[..]), None),
            (None, Some(&b[..])),
            (None, None),
        ] {
            let (mut st, mut y) = (vec![], vec![]);
            forward_rows(&xs, c, gamma, beta, 1e-5f32, &mut st, &mut y);
            for (i, (&x, &got)) in xs.iter().zip(&y).enumerate() {
                let (r, k) = (i / c, i % c);
                let mut want = (x - st[2 * r]) * st[2 * r + 1];
                if let Some(g) = gamma {
                    want *= g[k];
                }
                if let Some(b) = beta {
                    want += b[k];
                }
                assert_eq!(got.to_bits(), want.to_bits(), "{gamma:?} {beta:?} at {i}");
            }
        }
    }

    #[test]
    fn layer_norm_matches_finite_differences() {
        for (weight, bias) in [(true, true), (true, false), (false, false)] {
            let ln = LayerNorm {
                normalized_shape: 5,
                eps: 1e-5,
                weight,
                bias,
            };
            check_layer(&ln, &[vec![5]], 3);
            // Per position of a sequence: [N, T, C].
            check_layer(&ln, &[vec![4, 5]], 2);
        }
    }

    #[test]
    fn layer_norm_matches_pytorch_values() {
        // torch.nn.functional.layer_norm(x, (3,), w, b, 1e-5) in float64 with
        // x = [[0.5, -1.0, 2.0]], w = [1.5, -0.5, 2.0], b = [0.1, 0.2, -0.3]
        let ln = LayerNorm {
            normalized_shape: 3,
            eps: 1e-5,
            weight: true,
            bias: true,
        };
        let x = ndarray::arr2(&[[0.5f64, -1.0, 2.0]]).into_dyn();
        let y = ln.forward(
            &[&[1.5, -0.5, 2.0], &[0.1, 0.2, -0.3]],
            &[x.view()],
            &mut Saved::None,
        );
        let want = [0.1, 0.812_370_394_464_548_4, 2.149_481_577_858_193_5];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn shape_mismatch_is_reported() {
        let ln = LayerNorm {
            normalized_shape: 4,
            eps: 1e-5,
            weight: true,
            bias: true,
        };
        let e = <LayerNorm as Layer<f32>>::out_shape(&ln, &[vec![7, 3]]).unwrap_err();
        assert!(e.contains("normalized_shape = 4"), "{e}");
    }
}
