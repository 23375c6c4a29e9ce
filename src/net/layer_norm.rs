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
        let mut xh = vec![T::zero(); c];
        let inv_c = T::of(1.0 / c as f64);
        let eps = T::of(self.eps);
        for xr in xs.chunks_exact(c) {
            // Two passes in the element type (f32 accumulation over one row, as PyTorch's
            // float kernel; exact arithmetic for f64).
            let m = fastmath::sum(xr) * inv_c;
            for (h, &v) in xh.iter_mut().zip(xr) {
                *h = v - m;
            }
            let var = fastmath::dot(&xh, &xh) * inv_c;
            let s = T::one() / (var + eps).sqrt();
            stats.push(m);
            stats.push(s);
            y.extend(xh.iter().enumerate().map(|(k, &h)| {
                let h = h * s;
                let mut v = match gamma {
                    Some(g) => h * g[k],
                    None => h,
                };
                if let Some(b) = beta {
                    v += b[k];
                }
                v
            }));
        }
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
        let inv_c = T::of(1.0 / c as f64);
        let mut gx = Vec::with_capacity(if need_gx { gy.len() } else { 0 });
        let (mut xh, mut ghat) = (vec![T::zero(); c], vec![T::zero(); c]);
        // One pass over the rows: x̂ recomputed as forward computed it, the parameter
        // gradients' column sums of dy·x̂ and dy, and dx.
        for ((xr, g), ms) in xs
            .chunks_exact(c)
            .zip(gy.chunks_exact(c))
            .zip(stats.chunks_exact(2))
        {
            let (m, s) = (ms[0], ms[1]);
            for (h, &v) in xh.iter_mut().zip(xr) {
                *h = (v - m) * s;
            }
            if self.weight {
                for ((a, &gk), &hk) in gp[0].iter_mut().zip(g).zip(&xh) {
                    *a += gk * hk;
                }
            }
            if self.bias {
                for (a, &gk) in gp[usize::from(self.weight)].iter_mut().zip(g) {
                    *a += gk;
                }
            }
            if !need_gx {
                continue;
            }
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
        if !need_gx {
            return vec![None];
        }
        vec![Some(
            ArrayD::from_shape_vec(b.inputs[0].raw_dim(), gx).expect("sizes match"),
        )]
    }
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
