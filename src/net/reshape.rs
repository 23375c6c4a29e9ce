//! Layers that only move values: `nn.Flatten` (C order, as PyTorch) and identity-like layers
//! (`nn.Identity`, `nn.Dropout` in evaluation mode).
//!
//! ```
//! use lca::net::{reshape::Flatten, Layer};
//! let f = Flatten { start_dim: 1, end_dim: -1 };
//! assert_eq!(<Flatten as Layer<f32>>::out_shape(&f, &[vec![3, 4, 5]]).unwrap(), vec![60]);
//! ```

use super::{Backward, Layer, Real, Saved};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

/// `nn.Flatten(start_dim, end_dim)`; dims count the batch axis as 0, negative from the end.
#[derive(Debug, Clone)]
pub struct Flatten {
    pub start_dim: i64,
    pub end_dim: i64,
}

impl Flatten {
    /// Per-sample output shape for a per-sample input shape.
    fn flat_shape(&self, s: &[usize]) -> Result<Vec<usize>, String> {
        let rank = s.len() as i64 + 1; // with the batch axis
        let norm = |d: i64| if d < 0 { d + rank } else { d };
        let (a, b) = (norm(self.start_dim), norm(self.end_dim));
        if a < 1 || b >= rank || a > b {
            return Err(format!(
                "start_dim = {}, end_dim = {} do not fit an input of rank {rank} (batch axis included; flattening the batch axis is not supported)",
                self.start_dim, self.end_dim
            ));
        }
        let (a, b) = (a as usize - 1, b as usize - 1);
        let mut o = s[..a].to_vec();
        o.push(s[a..=b].iter().product());
        o.extend_from_slice(&s[b + 1..]);
        Ok(o)
    }
}

impl<T: Real> Layer<T> for Flatten {
    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        match inputs {
            [s] => self.flat_shape(s),
            _ => Err(format!("takes 1 input, got {}", inputs.len())),
        }
    }

    fn forward(&self, _p: &[&[T]], inputs: &[ArrayViewD<T>], _saved: &mut Saved<T>) -> ArrayD<T> {
        let x = &inputs[0];
        let mut shape = vec![x.shape()[0]];
        shape.extend(self.flat_shape(&x.shape()[1..]).expect("checked at build"));
        x.to_owned()
            .into_shape_with_order(IxDyn(&shape))
            .expect("contiguous")
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        if !b.need_input_grad[0] {
            return vec![None];
        }
        let g = b
            .grad_out
            .to_owned()
            .into_shape_with_order(IxDyn(b.inputs[0].shape()))
            .expect("contiguous");
        vec![Some(g)]
    }
}

/// Passes its input through unchanged (`nn.Identity`, and `nn.Dropout` at evaluation).
#[derive(Debug, Clone)]
pub struct Identity;

impl<T: Real> Layer<T> for Identity {
    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        match inputs {
            [s] => Ok(s.clone()),
            _ => Err(format!("takes 1 input, got {}", inputs.len())),
        }
    }

    fn forward(&self, _p: &[&[T]], inputs: &[ArrayViewD<T>], _saved: &mut Saved<T>) -> ArrayD<T> {
        inputs[0].to_owned()
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        if !b.need_input_grad[0] {
            return vec![None];
        }
        vec![Some(b.grad_out.to_owned())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::check_layer;

    #[test]
    fn flatten_shapes_follow_pytorch() {
        let f = |a, b| Flatten {
            start_dim: a,
            end_dim: b,
        };
        let s = vec![2, 3, 4];
        assert_eq!(f(1, -1).flat_shape(&s).unwrap(), vec![24]);
        assert_eq!(f(2, -1).flat_shape(&s).unwrap(), vec![2, 12]);
        assert_eq!(f(1, 2).flat_shape(&s).unwrap(), vec![6, 4]);
        assert!(f(0, -1).flat_shape(&s).is_err());
        assert!(f(3, 1).flat_shape(&s).is_err());
    }

    #[test]
    fn flatten_and_identity_match_finite_differences() {
        check_layer(
            &Flatten {
                start_dim: 1,
                end_dim: -1,
            },
            &[vec![2, 3, 2]],
            2,
        );
        check_layer(&Identity, &[vec![4]], 3);
    }
}
