//! `nn.Linear`: `y = x Wᵀ + b`, weight `[out_features, in_features]` (PyTorch layout), bias
//! `[out_features]`. Applies to the last axis, so `[B, in]` and `[B, T, in]` both work (one GEMM
//! over all rows).
//!
//! ```
//! use lca::net::{linear::Linear, Layer, Saved};
//! use ndarray::{arr2, ArrayD};
//! let fc = Linear { in_features: 2, out_features: 1, bias: true };
//! let w = [1.0f32, -1.0];
//! let b = [0.5f32];
//! let x: ArrayD<f32> = arr2(&[[3.0f32, 1.0]]).into_dyn();
//! let y = fc.forward(&[&w, &b], &[x.view()], &mut Saved::None);
//! assert_eq!(y[[0, 0]], 2.5);
//! ```

use super::fastmath::{f32_slice, f32_slice_mut, f32_uninit};
use super::gemm::{mat_mul, mat_mul_uninit, mat_mul_wt_uninit};
use super::sparse;
use super::{Backward, Codes, Layer, ParamDecl, Real, Saved, as_rows};
use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, ArrayViewMut2};

/// A fully connected layer.
#[derive(Debug, Clone)]
pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
}

impl<T: Real> Layer<T> for Linear {
    fn params(&self) -> Vec<ParamDecl> {
        let mut v = vec![ParamDecl {
            suffix: "weight",
            shape: vec![self.out_features, self.in_features],
        }];
        if self.bias {
            v.push(ParamDecl {
                suffix: "bias",
                shape: vec![self.out_features],
            });
        }
        v
    }

    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let [s] = inputs else {
            return Err(format!("takes 1 input, got {}", inputs.len()));
        };
        match s.last() {
            Some(&f) if f == self.in_features => {
                let mut o = s.clone();
                *o.last_mut().expect("non-empty") = self.out_features;
                Ok(o)
            }
            Some(&f) => Err(format!(
                "in_features = {} does not match the {f} features it receives{}",
                self.in_features,
                if s.len() > 1 {
                    " (add a `flatten` layer before it?)"
                } else {
                    ""
                }
            )),
            None => Err("needs an input with a feature axis".into()),
        }
    }

    fn forward(
        &self,
        params: &[&[T]],
        inputs: &[ArrayViewD<T>],
        _saved: &mut Saved<T>,
    ) -> ArrayD<T> {
        let x = as_rows(&inputs[0]);
        let w = weight(params[0], self.out_features, self.in_features);
        let y = affine_rows(x, w, self.bias.then(|| params[1])).into_dyn();
        let mut shape = inputs[0].shape().to_vec();
        *shape.last_mut().expect("non-empty") = self.out_features;
        y.into_shape_with_order(shape)
            .expect("row-major")
            .into_dyn()
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        let x = as_rows(&b.inputs[0]);
        let gy = as_rows(&b.grad_out);
        let mut gp = b.grad_params;
        {
            let gw = ArrayViewMut2::from_shape((self.out_features, self.in_features), &mut *gp[0])
                .expect("weight gradient has the weight's shape");
            mat_mul(gy.t(), x, true, gw);
        }
        if self.bias {
            add_col_sums(gp[1], gy);
        }
        if !b.need_input_grad[0] {
            return vec![None];
        }
        let w = weight(b.params[0], self.out_features, self.in_features);
        // SAFETY: `mat_mul_uninit` writes every value.
        let gx = unsafe {
            super::filled(b.inputs[0].shape(), |gs| {
                mat_mul_uninit(T::one(), gy, w, gs)
            })
        };
        vec![Some(gx)]
    }

    fn affine_in_params(&self) -> bool {
        true
    }

    /// A byte-held input of one row per sample with mostly zero values is read as bytes by
    /// the sparse products ([`sparse::codes_pay`]: decided from the whole set's share of
    /// non-zeros, so every chunk of a run takes the same path); f32 only.
    fn takes_codes(&self, x: &Codes) -> bool {
        f32_slice::<T>(&[]).is_some()
            && x.codes.ndim() == 2
            && x.per_sample() == self.in_features
            && sparse::codes_pay(x.table, self.in_features, self.out_features)
    }

    fn forward_codes(&self, params: &[&[T]], x: &Codes) -> ArrayD<T> {
        let (rows, k, n) = (x.codes.shape()[0], self.in_features, self.out_features);
        let codes = x.codes.as_standard_layout();
        let lhs = code_lhs(x, codes.as_slice().expect("standard layout"));
        let w = f32_slice(params[0]).expect("T is f32");
        let bias = self.bias.then(|| f32_slice(params[1]).expect("T is f32"));
        // SAFETY: `sparse::forward` writes every value.
        unsafe {
            super::filled(&[rows, n], |ys| {
                let ys = f32_uninit(ys).expect("T is f32");
                sparse::forward(lhs, rows, k, w, n, bias, ys)
            })
        }
    }

    fn param_grads_codes(
        &self,
        _params: &[&[T]],
        x: &Codes,
        grad_out: ArrayViewD<T>,
        mut grad_params: Vec<&mut [T]>,
    ) {
        let (rows, k, n) = (x.codes.shape()[0], self.in_features, self.out_features);
        let codes = x.codes.as_standard_layout();
        let lhs = code_lhs(x, codes.as_slice().expect("standard layout"));
        let gy = as_rows(&grad_out);
        let gy = gy.as_standard_layout();
        let g32 = f32_slice(gy.as_slice().expect("standard layout")).expect("T is f32");
        let gw = f32_slice_mut(&mut *grad_params[0]).expect("T is f32");
        sparse::weight_grad(lhs, rows, k, g32, n, gw);
        if self.bias {
            add_col_sums(grad_params[1], gy.view());
        }
    }

    fn macs_per_sample(&self, inputs: &[Vec<usize>]) -> u64 {
        let rows: usize = inputs[0].iter().rev().skip(1).product();
        (rows * self.in_features * self.out_features) as u64
    }
}

/// The sparse products' view of a byte-held chunk (`codes`, its bytes in standard layout):
/// the table's single row and its zero byte ([`Linear::takes_codes`] made sure of both).
fn code_lhs<'a>(x: &'a Codes, codes: &'a [u8]) -> sparse::Lhs<'a> {
    sparse::Lhs::Codes {
        codes,
        row: x.table.row_at(0),
        zero: sparse::zero_code(x.table).expect("a zero byte (takes_codes)"),
    }
}

/// `y = x·wᵀ + b` for `x` `[rows, in]` and `w` `[out, in]` (PyTorch's layout), the affine map of
/// [`Linear`] and of attention's projections. The product writes y without it being cleared
/// first, then the bias is added to every row: the same bits as starting every row from the
/// bias and accumulating the product onto it (`b + p = p + b`), but the product's stores are
/// the first touch of y's memory, where the bias rows written first (a `memmove` pass) took
/// ~4.5 % of a C = 128 GPT's gradient and the add takes about half that.
pub(crate) fn affine_rows<T: Real>(
    x: ArrayView2<T>,
    w: ArrayView2<T>,
    bias: Option<&[T]>,
) -> Array2<T> {
    let (rows, out) = (x.nrows(), w.nrows());
    // SAFETY: `mat_mul_wt_uninit` writes every value.
    let y = unsafe { super::filled(&[rows, out], |ys| mat_mul_wt_uninit(x, w, ys)) };
    let Some(b) = bias else {
        return y.into_dimensionality().expect("2-D");
    };
    assert_eq!(b.len(), out, "bias has one value per output");
    let mut y: Array2<T> = y.into_dimensionality().expect("2-D");
    for row in y.as_slice_mut().expect("contiguous").chunks_exact_mut(out) {
        for (v, &bv) in row.iter_mut().zip(b) {
            *v += bv;
        }
    }
    y
}

/// `acc += Σ_rows g`, the bias gradient of a layer applied to every row of `g`: the column
/// sums are added up row after row from zero and then added onto `acc`, the order of
/// `acc += g.sum_axis(Axis(0))` (the same bits), without its per-row array arithmetic (which
/// cost more than the sums for narrow layers).
fn add_col_sums<T: Real>(acc: &mut [T], g: ArrayView2<T>) {
    let mut s = vec![T::zero(); acc.len()];
    for row in g.rows() {
        match row.as_slice() {
            Some(r) => {
                for (a, &v) in s.iter_mut().zip(r) {
                    *a += v;
                }
            }
            None => {
                for (a, &v) in s.iter_mut().zip(row) {
                    *a += v;
                }
            }
        }
    }
    for (a, v) in acc.iter_mut().zip(s) {
        *a += v;
    }
}

fn weight<T>(w: &[T], out: usize, inp: usize) -> ArrayView2<'_, T> {
    ArrayView2::from_shape((out, inp), w).expect("weight has its declared shape")
}

// ---------------------------------------------------------------------------------------
// Drafting (`lca init`)

use super::registry::{
    DraftIn, Drafted, Drafter, Flow, Lead, ModuleTensors, Recognised, Role, dims,
};
use crate::spec::LayerKind;

/// `nn.Linear`: a 2-D `weight` `[out_features, in_features]`, maybe a `bias` `[out_features]`.
pub static DRAFTER: Drafter = Drafter {
    recognise,
    role: Role::Weighted,
    draft,
};

fn recognise(m: &ModuleTensors) -> Option<Recognised> {
    let w = m.weight_and_bias(2)?;
    Some(Recognised::Layer(LayerKind::Linear {
        in_features: w[1],
        out_features: w[0],
        bias: m.has("bias"),
    }))
}

/// `nn.Flatten()`.
fn flatten() -> Lead {
    Lead::Table(LayerKind::Flatten {
        start_dim: 1,
        end_dim: -1,
    })
}

/// The layer, after what makes the flow fit its `in_features`: a flatten (after
/// convolutions, or of a multi-axis sample), or the pooling that shrinks feature maps.
fn draft(kind: LayerKind, at: DraftIn) -> Drafted {
    let LayerKind::Linear {
        in_features: inp,
        out_features: out,
        ..
    } = kind
    else {
        return Drafted::as_recognised(kind, at);
    };
    let name = at.path;
    let mut flow = at.flow;
    let mut lead = Vec::new();
    match flow.shape.clone() {
        Some(s) if flow.after_conv && s.len() == 3 => {
            if s.iter().product::<usize>() == inp {
                lead.push(flatten());
                flow.shape = Some(vec![inp]);
            } else {
                pool_to_fit(&mut lead, &mut flow, name, inp);
            }
        }
        Some(s) if s.len() >= 2 && s.last() != Some(&inp) && s.iter().product::<usize>() == inp => {
            lead.push(Lead::Todo(format!(
                "'{name}' takes {inp} features and each sample is {} = {inp} values: \
                 flattened first (nn.Flatten).",
                dims(&s)
            )));
            lead.push(flatten());
            flow.shape = Some(vec![inp]);
        }
        None if flow.after_conv => {
            lead.push(Lead::Todo(format!(
                "a linear layer after convolutions: the feature maps are flattened \
                 first; '{name}' expects {inp} = channels × height × width (add the \
                 pooling of your model before it)."
            )));
            lead.push(flatten());
        }
        _ => {}
    }
    if let Some(s) = &flow.shape {
        let last = s.last().copied().unwrap_or(1);
        if last != inp {
            lead.push(Lead::Todo(format!(
                "'{name}' expects {inp} input features but receives {last} ({}): fix the \
                 layers before it (or the data).",
                dims(s)
            )));
        }
    }
    flow.shape = Some(match flow.shape.take() {
        Some(mut s) if !s.is_empty() => {
            *s.last_mut().expect("non-empty") = out;
            s
        }
        _ => vec![out],
    });
    flow.after_conv = false;
    flow.channels = Some(out);
    Drafted {
        lead,
        kind,
        explicit: &[],
        what: format!("linear {inp}→{out}"),
        flow,
    }
}

/// The convolutions give `[C, H, W]` but the linear layer `name` takes `inp` features: the
/// pooling that makes the sizes fit (global average pooling when `inp = C`, an adaptive
/// average pool to the size `inp / C` implies otherwise), marked TODO.
fn pool_to_fit(lead: &mut Vec<Lead>, flow: &mut Flow, name: &str, inp: usize) {
    let Some(s) = flow.shape.clone() else { return };
    let (c, h, w) = (s[0], s[1], s[2]);
    if inp == c {
        lead.push(Lead::Todo(format!(
            "the convolutions give {c}×{h}×{w} and '{name}' takes {inp} = {c} channels: a \
             global average pool (ResNet-style, nn.AdaptiveAvgPool2d(1) + flatten) guessed."
        )));
        lead.push(Lead::Table(LayerKind::GlobalAvgPool {}));
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
            lead.push(Lead::Todo(format!(
                "the convolutions (with the guessed strides and padding) give {c}×{h}×{w} = {} \
                 values, but '{name}' takes {inp} = {c}×{r}×{r}: the maps must shrink from \
                 {h}×{w} to {r}×{r}. An adaptive average pool to that size is written so that \
                 the file runs. Replace it by your model's pooling (max_pool2d, avg_pool2d) and \
                 strides.",
                c * h * w,
            )));
            lead.push(Lead::Table(LayerKind::AdaptiveAvgPool2d {
                output_size: crate::spec::Pair([r, r]),
            }));
            lead.push(flatten());
            flow.shape = Some(vec![inp]);
        }
        None => {
            lead.push(Lead::Todo(format!(
                "the convolutions give {c}×{h}×{w} = {} values but '{name}' takes {inp}: add \
                 the pooling and strides of your model.",
                c * h * w
            )));
            lead.push(flatten());
            flow.shape = Some(vec![c * h * w]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::check_layer;

    #[test]
    fn linear_gradients_match_finite_differences() {
        check_layer(
            &Linear {
                in_features: 5,
                out_features: 3,
                bias: true,
            },
            &[vec![5]],
            4,
        );
        check_layer(
            &Linear {
                in_features: 4,
                out_features: 2,
                bias: false,
            },
            &[vec![4]],
            3,
        );
        // Applied per position of a sequence: [B, T, C].
        check_layer(
            &Linear {
                in_features: 3,
                out_features: 4,
                bias: true,
            },
            &[vec![5, 3]],
            2,
        );
    }

    #[test]
    fn shape_mismatch_is_reported() {
        let l = Linear {
            in_features: 5,
            out_features: 3,
            bias: true,
        };
        let e = <Linear as Layer<f32>>::out_shape(&l, &[vec![4]]).unwrap_err();
        assert!(e.contains("in_features = 5"), "{e}");
        assert!(e.contains("4 features"), "{e}");
    }
}
