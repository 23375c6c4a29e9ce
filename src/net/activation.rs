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

impl Activation {
    /// GELU in f32 through the vectorised kernels of [`super::fastmath`]: the output, or with
    /// `grad_out` the input gradient. `None` for other types and activations (scalar path).
    fn gelu_f32<T: Real>(
        &self,
        x: &ArrayViewD<T>,
        grad_out: Option<&ArrayViewD<T>>,
    ) -> Option<ArrayD<T>> {
        let tanh = match self {
            Activation::Gelu => false,
            Activation::GeluTanh => true,
            _ => return None,
        };
        let xs = super::fastmath::f32_slice(x.as_slice()?)?;
        let gs = match grad_out {
            None => None,
            Some(g) => Some(super::fastmath::f32_slice(g.as_slice()?)?),
        };
        // SAFETY: `gelu_uninit` and `gelu_backward_uninit` write every value of the output
        // (`T` is f32: `f32_slice` succeeded above).
        let out = unsafe {
            super::filled(x.shape(), |o| {
                let os = super::fastmath::f32_uninit(o).expect("T is f32");
                match gs {
                    None => super::fastmath::gelu_uninit(xs, os, tanh),
                    Some(gs) => super::fastmath::gelu_backward_uninit(xs, gs, os, tanh),
                }
            })
        };
        Some(out)
    }
}

impl<T: Real> Layer<T> for Activation {
    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        match inputs {
            [s] => Ok(s.clone()),
            _ => Err(format!("takes 1 input, got {}", inputs.len())),
        }
    }

    fn forward(&self, _p: &[&[T]], inputs: &[ArrayViewD<T>], _saved: &mut Saved<T>) -> ArrayD<T> {
        if let Some(y) = self.gelu_f32(&inputs[0], None) {
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
        if let Some(g) = self.gelu_f32(&b.inputs[0], Some(&b.grad_out)) {
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
