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
use ndarray::{ArrayD, ArrayViewD};

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
        let mut y = inputs[0].to_owned();
        for x in &inputs[1..] {
            y += x;
        }
        y
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        b.need_input_grad
            .iter()
            .map(|&need| need.then(|| b.grad_out.to_owned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::check_layer;

    #[test]
    fn add_matches_finite_differences() {
        check_layer(&Add, &[vec![3, 2], vec![3, 2]], 2);
        check_layer(&Add, &[vec![4], vec![4], vec![4]], 3);
    }

    #[test]
    fn add_needs_matching_shapes() {
        let e = <Add as Layer<f32>>::out_shape(&Add, &[vec![3], vec![4]]).unwrap_err();
        assert!(e.contains("same shape"), "{e}");
        assert!(<Add as Layer<f32>>::out_shape(&Add, &[vec![3]]).is_err());
    }
}
