//! Full-training-set loss and gradient.
//!
//! The set is cut into chunks of `chunk_size` samples (the last one may be shorter: nothing is
//! dropped). Chunks run in parallel (rayon), each single-threaded; their summed losses and
//! gradients are added **in chunk order** in f64, so the result is the exact mean over all
//! samples and does not depend on the number of threads.

use crate::data::Dataset;
use crate::error::{LcaError, Result};
use crate::net::{Model, Real};
use rayon::prelude::*;

/// Chunks evaluated per parallel wave; bounds memory to this many gradient buffers and does
/// not depend on the thread count.
const WAVE: usize = 8;

/// Loss and gradient of the full-set mean loss at one point.
#[derive(Debug, Clone)]
pub struct LossGrad {
    pub loss: f64,
    /// One buffer per parameter tensor, model order.
    pub grads: Vec<Vec<f64>>,
}

/// Evaluates a model over a whole data set.
pub struct Evaluator<'a, T: Real> {
    pub model: &'a Model<T>,
    pub data: &'a Dataset,
    pub chunk_size: usize,
}

impl<T: Real> Evaluator<'_, T> {
    /// Number of chunks.
    pub fn num_chunks(&self) -> usize {
        self.data.len().div_ceil(self.chunk_size)
    }

    /// Mean loss and its gradient over the whole data set at parameters `theta`.
    pub fn loss_and_grad(&self, theta: &[Vec<T>]) -> Result<LossGrad> {
        let n = self.data.len();
        let chunks = self.num_chunks();
        let mut grads: Vec<Vec<f64>> = self
            .model
            .params
            .iter()
            .map(|p| vec![0.0; p.numel()])
            .collect();
        let mut loss = 0.0f64;
        let mut count = 0usize;
        let mut start = 0;
        while start < chunks {
            let end = (start + WAVE).min(chunks);
            let parts: Vec<(f64, usize, Vec<Vec<T>>)> = (start..end)
                .into_par_iter()
                .map(|c| {
                    let a = c * self.chunk_size;
                    let b = ((c + 1) * self.chunk_size).min(n);
                    let (x, y) = self.data.chunk(a, b);
                    let mut g: Vec<Vec<T>> = self
                        .model
                        .params
                        .iter()
                        .map(|p| vec![T::zero(); p.numel()])
                        .collect();
                    let (l, k) = self.model.chunk_loss_grad(theta, x, y, &mut g);
                    (l, k, g)
                })
                .collect();
            for (l, k, g) in parts {
                loss += l;
                count += k;
                for (acc, gi) in grads.iter_mut().zip(&g) {
                    for (a, v) in acc.iter_mut().zip(gi) {
                        *a += v.f64();
                    }
                }
            }
            start = end;
        }
        let inv = 1.0 / count as f64;
        let loss = loss * inv;
        if !loss.is_finite() {
            return Err(LcaError::Numeric(format!(
                "the full-set loss is {loss} (overflow or NaN in the forward pass)"
            )));
        }
        for (g, p) in grads.iter_mut().zip(&self.model.params) {
            for v in g.iter_mut() {
                *v *= inv;
            }
            if let Some(i) = g.iter().position(|v| !v.is_finite()) {
                return Err(LcaError::Numeric(format!(
                    "the gradient of '{}' is {} at flat index {i}",
                    p.name, g[i]
                )));
            }
        }
        Ok(LossGrad { loss, grads })
    }
}
