//! Element-wise activations: ReLU, LeakyReLU, Tanh, Sigmoid, GELU (exact and tanh), with
//! PyTorch's definitions. Backward multiplies the output gradient by the derivative. GELU in
//! f32 runs through the vectorised kernels of [`super::fastmath`]; f64 uses the exact scalar
//! definitions below.
//!
//! ```
//! use lca::net::{activation::Activation, Layer, Saved};
//! use ndarray::{arr1, ArrayD};
//! let x: ArrayD<f32> = arr1(&[-1.0f32, 2.0]).into_dyn();
//! let y = Activation::Relu.forward(&[], &[x.view()], &mut Saved::None);
//! assert_eq!(y.as_slice().unwrap(), &[0.0, 2.0]);
//! ```

use super::{Backward, Layer, Real, Saved};
use ndarray::{ArrayD, ArrayViewD, Zip};

/// An element-wise activation function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Relu,
    /// Negative slope.
    LeakyRelu(f64),
    Tanh,
    Sigmoid,
    /// Exact GELU, `x·Φ(x)`.
    Gelu,
    /// GELU with PyTorch's tanh approximation.
    GeluTanh,
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

impl Activation {
    fn f(&self, x: f64) -> f64 {
        match *self {
            Activation::Relu => x.max(0.0),
            Activation::LeakyRelu(a) => {
                if x > 0.0 {
                    x
                } else {
                    a * x
                }
            }
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            Activation::GeluTanh => {
                0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh())
            }
        }
    }

    /// Derivative at input `x` with output `y`.
    fn df(&self, x: f64, y: f64) -> f64 {
        match *self {
            Activation::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::LeakyRelu(a) => {
                if x > 0.0 {
                    1.0
                } else {
                    a
                }
            }
            Activation::Tanh => 1.0 - y * y,
            Activation::Sigmoid => y * (1.0 - y),
            Activation::Gelu => {
                let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
                let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                cdf + x * pdf
            }
            Activation::GeluTanh => {
                let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
                let t = u.tanh();
                0.5 * (1.0 + t)
                    + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
            }
        }
    }
}

/// GELU in f32 runs through the vectorised kernels of [`super::fastmath`]; these return `None`
/// for other types and activations (the scalar path).
impl Activation {
    /// Whether this is GELU's tanh form; `None` if it is not GELU.
    fn gelu_tanh(&self) -> Option<bool> {
        match self {
            Activation::Gelu => Some(false),
            Activation::GeluTanh => Some(true),
            _ => None,
        }
    }

    /// Forward for backward: the output and the derivative `GELU'(x)`, from one evaluation
    /// of the CDF ([`super::fastmath::gelu_and_grad_uninit`]); backward multiplies by it.
    fn gelu_and_grad_f32<T: Real>(&self, x: &ArrayViewD<T>) -> Option<(ArrayD<T>, ArrayD<T>)> {
        let tanh = self.gelu_tanh()?;
        let xs = super::fastmath::f32_slice(x.as_slice()?)?;
        let mut d = ArrayD::<T>::uninit(x.shape());
        // SAFETY: `gelu_and_grad_uninit` writes every value of both outputs (`T` is f32:
        // `f32_slice` succeeded above).
        let y = unsafe {
            super::filled(x.shape(), |o| {
                let ys = super::fastmath::f32_uninit(o).expect("T is f32");
                let ds = d.as_slice_mut().expect("a fresh array is contiguous");
                let ds = super::fastmath::f32_uninit(ds).expect("T is f32");
                super::fastmath::gelu_and_grad_uninit(xs, ys, ds, tanh);
            })
        };
        // SAFETY: written in full just above.
        Some((y, unsafe { d.assume_init() }))
    }

    /// The input gradient `dy·GELU'(x)` computed from `x` (where forward saved no derivative).
    fn gelu_backward_f32<T: Real>(
        &self,
        x: &ArrayViewD<T>,
        g: &ArrayViewD<T>,
    ) -> Option<ArrayD<T>> {
        let tanh = self.gelu_tanh()?;
        let xs = super::fastmath::f32_slice(x.as_slice()?)?;
        let gs = super::fastmath::f32_slice(g.as_slice()?)?;
        // SAFETY: `gelu_backward_uninit` writes every value (`T` is f32: `f32_slice`
        // succeeded above).
        Some(unsafe {
            super::filled(x.shape(), |o| {
                let os = super::fastmath::f32_uninit(o).expect("T is f32");
                super::fastmath::gelu_backward_uninit(xs, gs, os, tanh);
            })
        })
    }

    /// `dy·GELU'(x)` from the derivative forward saved; `None` where forward saved none (f64,
    /// or a forward run without keeping what it saved).
    fn gelu_grad_from_saved<T: Real>(
        &self,
        saved: &Saved<T>,
        g: &ArrayViewD<T>,
    ) -> Option<ArrayD<T>> {
        self.gelu_tanh()?;
        let Saved::Arrays(a) = saved else { return None };
        let [d] = a.as_slice() else { return None };
        let ds = super::fastmath::f32_slice(d.as_slice()?)?;
        let gs = super::fastmath::f32_slice(g.as_slice()?)?;
        if d.shape() != g.shape() {
            return None;
        }
        // SAFETY: `mul_uninit` writes every value (`T` is f32: `f32_slice` succeeded above).
        Some(unsafe {
            super::filled(g.shape(), |o| {
                let os = super::fastmath::f32_uninit(o).expect("T is f32");
                super::fastmath::mul_uninit(gs, ds, os);
            })
        })
    }
}

impl<T: Real> Layer<T> for Activation {
    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        match inputs {
            [s] => Ok(s.clone()),
            _ => Err(format!("takes 1 input, got {}", inputs.len())),
        }
    }

    fn forward(&self, _p: &[&[T]], inputs: &[ArrayViewD<T>], saved: &mut Saved<T>) -> ArrayD<T> {
        if let Some((y, d)) = self.gelu_and_grad_f32(&inputs[0]) {
            *saved = Saved::Arrays(vec![d]);
            return y;
        }
        match *self {
            Activation::Relu => inputs[0].mapv(|v| if v > T::zero() { v } else { T::zero() }),
            _ => inputs[0].mapv(|v| T::of(self.f(v.f64()))),
        }
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        if !b.need_input_grad[0] {
            return vec![None];
        }
        let gelu = self
            .gelu_grad_from_saved(b.saved, &b.grad_out)
            .or_else(|| self.gelu_backward_f32(&b.inputs[0], &b.grad_out));
        if let Some(g) = gelu {
            return vec![Some(g)];
        }
        if let Activation::Relu = *self {
            // One pass, written as a select (no branch on the sign, which is random).
            let g = Zip::from(&b.grad_out)
                .and(&b.inputs[0])
                .map_collect(|&g, &x| if x <= T::zero() { T::zero() } else { g });
            return vec![Some(g)];
        }
        let mut g = b.grad_out.to_owned();
        match *self {
            Activation::Relu => unreachable!("handled above"),
            _ => Zip::from(&mut g)
                .and(&b.inputs[0])
                .and(&b.output)
                .for_each(|g, &x, &y| *g = *g * T::of(self.df(x.f64(), y.f64()))),
        }
        vec![Some(g)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::check_layer;

    #[test]
    fn activations_match_finite_differences() {
        for a in [
            Activation::Relu,
            Activation::LeakyRelu(0.1),
            Activation::Tanh,
            Activation::Sigmoid,
            Activation::Gelu,
            Activation::GeluTanh,
        ] {
            check_layer(&a, &[vec![7]], 5);
        }
    }

    /// Backward from the derivative forward saved and backward from `x` alone (a forward
    /// whose saved state was not kept) give the same bits, in f32 where the saved path runs.
    #[test]
    fn gelu_backward_from_saved_derivative_matches_recomputing_it() {
        use crate::net::Backward;
        let x: ArrayD<f32> = ndarray::Array::linspace(-9.0f32, 9.0, 1001).into_dyn();
        let g: ArrayD<f32> = x.mapv(|v| 0.3 - 0.07 * v);
        for a in [Activation::Gelu, Activation::GeluTanh] {
            let mut saved = Saved::None;
            let y = a.forward(&[], &[x.view()], &mut saved);
            assert!(
                matches!(&saved, Saved::Arrays(v) if v.len() == 1),
                "{a:?} saves GELU'"
            );
            let run = |saved: &Saved<f32>| {
                let b = Backward {
                    params: &[],
                    inputs: &[x.view()],
                    output: y.view(),
                    saved,
                    grad_out: g.view(),
                    grad_params: Vec::new(),
                    need_input_grad: &[true],
                };
                Layer::<f32>::backward(&a, b)
                    .remove(0)
                    .expect("input gradient")
            };
            let (with, without) = (run(&saved), run(&Saved::None));
            let bits = |v: &ArrayD<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&with), bits(&without), "{a:?}");
        }
    }

    #[test]
    fn gelu_matches_pytorch_values() {
        // torch.nn.functional.gelu(torch.tensor([-1.5, 0.3, 2.0], dtype=torch.float64))
        let exact = [
            -0.100_210_801_903_287_04,
            0.185_373_426_656_685_8,
            1.954_499_736_103_641_6,
        ];
        // approximate="tanh"
        let tanh = [
            -0.100_428_423_019_767_07,
            0.185_370_923_542_759_22,
            1.954_597_694_087_775,
        ];
        for (i, x) in [-1.5, 0.3, 2.0].into_iter().enumerate() {
            assert!((Activation::Gelu.f(x) - exact[i]).abs() < 1e-12);
            assert!((Activation::GeluTanh.f(x) - tanh[i]).abs() < 1e-12);
        }
    }
}
