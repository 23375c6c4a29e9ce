//! `add`: the element-wise sum of two or more inputs of the same shape — the join of a
//! residual (skip) connection, `out = main(x) + shortcut(x)`.
//!
//! ```
//! use lca::net::{add::Add, Layer, Saved};
//! use ndarray::{arr2, ArrayD};
//! let a: ArrayD<f32> = arr2(&[[1.0f32, 2.0]]).into_dyn();
//! let b: ArrayD<f32> = arr2(&[[0.5f32, -2.0]]).into_dyn();
//! let y = Add.forward(&[], &[a.view(), b.view()], &mut Saved::None);
//! assert_eq!(y.as_slice().unwrap(), &[1.5, 0.0]);
//! ```

use super::{Backward, Layer, Real, Saved};
use ndarray::{ArrayD, ArrayViewD, Zip};

/// Sum of its inputs.
#[derive(Debug, Clone)]
pub struct Add;

impl<T: Real> Layer<T> for Add {
    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        if inputs.len() < 2 {
            return Err(format!(
                "adds two or more inputs (`input = [\"a\", \"b\"]`), got {}",
                inputs.len()
            ));
        }
        if inputs.iter().any(|s| s != &inputs[0]) {
            return Err("its inputs must have the same shape".into());
        }
        Ok(inputs[0].clone())
    }

    fn forward(&self, _p: &[&[T]], inputs: &[ArrayViewD<T>], _saved: &mut Saved<T>) -> ArrayD<T> {
        sum(inputs, false)
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        b.need_input_grad
            .iter()
            .map(|&need| need.then(|| b.grad_out.to_owned()))
            .collect()
    }

    /// The sum and its ReLU in one pass (the residual join of a ResNet block).
    fn fuses_relu(&self) -> bool {
        true
    }

    fn forward_relu(
        &self,
        _p: &[&[T]],
        inputs: &[ArrayViewD<T>],
        _saved: &mut Saved<T>,
    ) -> ArrayD<T> {
        sum(inputs, true)
    }

    /// The mask is read from the ReLU's output (`relu(z) > 0` exactly where `z > 0`; a NaN
    /// sum, which the ReLU maps to 0, gets a zero gradient here where the unfused ReLU
    /// passes its gradient on).
    fn backward_relu(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        if let ([true, true], Some(gs), Some(ys)) = (
            b.need_input_grad,
            b.grad_out.as_slice(),
            b.output.as_slice(),
        ) {
            // The usual residual join: both gradients written in one pass.
            let mut second = ArrayD::<T>::uninit(b.output.raw_dim());
            let s2 = second.as_slice_mut().expect("a fresh array is contiguous");
            // SAFETY: the loop writes every element of both arrays (all have the output's
            // shape).
            let first = unsafe {
                super::filled(b.output.shape(), |s1| {
                    for (((d1, d2), &g), &y) in s1.iter_mut().zip(s2.iter_mut()).zip(gs).zip(ys) {
                        let v = if y > T::zero() { g } else { T::zero() };
                        d1.write(v);
                        d2.write(v);
                    }
                })
            };
            // SAFETY: written in full just above.
            return vec![Some(first), Some(unsafe { second.assume_init() })];
        }
        let mut g = Some(
            Zip::from(&b.grad_out)
                .and(&b.output)
                .map_collect(|&g, &y| if y > T::zero() { g } else { T::zero() }),
        );
        let last = b.need_input_grad.iter().rposition(|&n| n);
        (0..b.need_input_grad.len())
            .map(|k| match (b.need_input_grad[k], Some(k) == last) {
                (false, _) => None,
                (true, false) => g.clone(),
                (true, true) => g.take(),
            })
            .collect()
    }
}

/// `Σ inputs` (in input order), with `relu` its ReLU (0 for NaN, as the ReLU layer), in one
/// pass where the inputs are two contiguous arrays.
fn sum<T: Real>(inputs: &[ArrayViewD<T>], relu: bool) -> ArrayD<T> {
    if let [a, b] = inputs
        && let (Some(xa), Some(xb)) = (a.as_slice(), b.as_slice())
    {
        // SAFETY: `sum2` writes every element (the inputs have the output's shape).
        return unsafe {
            super::filled(a.shape(), |ys| match relu {
                true => sum2::<T, true>(xa, xb, ys),
                false => sum2::<T, false>(xa, xb, ys),
            })
        };
    }
    let mut y = inputs[0].to_owned();
    for x in &inputs[1..] {
        y += x;
    }
    if relu {
        y.mapv_inplace(|v| if v > T::zero() { v } else { T::zero() });
    }
    y
}

/// `ys = a + b`, with `RELU` its ReLU, as a select the compiler vectorises.
fn sum2<T: Real, const RELU: bool>(a: &[T], b: &[T], ys: &mut [std::mem::MaybeUninit<T>]) {
    for ((y, &u), &v) in ys.iter_mut().zip(a).zip(b) {
        let s = u + v;
        y.write(if !RELU || s > T::zero() { s } else { T::zero() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::check_fused_relu;
    use crate::net::gradcheck::{Rng, check_layer};

    #[test]
    fn add_matches_finite_differences() {
        check_layer(&Add, &[vec![3, 2], vec![3, 2]], 2);
        check_layer(&Add, &[vec![4], vec![4], vec![4]], 3);
    }

    /// The sum with the next ReLU fused: the same bits as the sum and then the ReLU layer,
    /// on two contiguous inputs (one pass) and on three (the general path), f32 and f64.
    #[test]
    fn fused_relu_gives_the_same_bits_as_the_relu_layer() {
        let mut rng = Rng::new(3);
        for count in [2, 3] {
            let xs: Vec<ArrayD<f64>> = (0..count).map(|_| rng.array(&[4, 3, 5])).collect();
            let gy = rng.array(&[4, 3, 5]);
            let zeroed = check_fused_relu(&Add, &[], &xs, &gy);
            assert!(zeroed > 0.1 && zeroed < 0.9, "{zeroed}");
            let x32: Vec<ArrayD<f32>> = xs.iter().map(|x| x.mapv(|v| v as f32)).collect();
            check_fused_relu(&Add, &[], &x32, &gy.mapv(|v| v as f32));
        }
    }

    #[test]
    fn add_needs_matching_shapes() {
        let e = <Add as Layer<f32>>::out_shape(&Add, &[vec![3], vec![4]]).unwrap_err();
        assert!(e.contains("same shape"), "{e}");
        assert!(<Add as Layer<f32>>::out_shape(&Add, &[vec![3]]).is_err());
    }
}
