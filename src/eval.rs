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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyze::prepare;
    use crate::net::Real;
    use std::path::Path;

    /// The shipped MLP fixture: its spec, data and model, and checkpoint `t` (f32).
    fn fixture<T: Real>() -> (crate::analyze::Prepared, Model<T>) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mlp");
        let p = prepare(&dir.join("ckpts"), &dir.join("model.toml"), None, None, 1).unwrap();
        let model = Model::<T>::build(&p.spec, p.data.sample_shape()).unwrap();
        (p, model)
    }

    fn theta(p: &crate::analyze::Prepared, t: u64) -> Vec<Vec<f32>> {
        let f = p.files.iter().find(|f| f.step == t).unwrap();
        crate::checkpoint::load(f, &p.model.params).unwrap().theta
    }

    fn widen(theta: &[Vec<f32>]) -> Vec<Vec<f64>> {
        theta
            .iter()
            .map(|v| v.iter().map(|&x| x as f64).collect())
            .collect()
    }

    /// The PyTorch float64 oracle's loss and gradient at step `t`, point `s` (0, 0.5 or 1).
    fn oracle(p: &crate::analyze::Prepared, t: u64, s: &str) -> (f64, Vec<Vec<f64>>) {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mlp/golden/grads.safetensors");
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let get = |name: &str| {
            crate::tensors::to_f64(&st.tensor(&format!("step{t}/s{s}/{name}")).unwrap()).unwrap()
        };
        let grads = p.model.params.iter().map(|q| get(&q.name)).collect();
        (get("loss")[0], grads)
    }

    fn run<T: Real>(
        model: &Model<T>,
        data: &Dataset,
        chunk: usize,
        threads: usize,
        theta: &[Vec<T>],
    ) -> LossGrad {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let e = Evaluator {
            model,
            data,
            chunk_size: chunk,
        };
        pool.install(|| e.loss_and_grad(theta)).unwrap()
    }

    /// Largest |a − b| over all entries, relative to the largest |b|.
    fn rel_err(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
        let scale = b.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        err / scale
    }

    #[test]
    fn f64_evaluation_matches_the_pytorch_oracle() {
        let (p, model) = fixture::<f64>();
        for t in [0, 1, 50, 99] {
            let (t0, t1) = (widen(&theta(&p, t)), widen(&theta(&p, t + 1)));
            // The oracle's midpoint is θ_t + ½Δθ in f64 (lca rounds it to f32).
            let mid: Vec<Vec<f64>> = t0
                .iter()
                .zip(&t1)
                .map(|(a, b)| a.iter().zip(b).map(|(a, b)| a + 0.5 * (b - a)).collect())
                .collect();
            for (s, th) in [("0", &t0), ("0.5", &mid), ("1", &t1)] {
                let (loss, grads) = oracle(&p, t, s);
                let r = run(&model, &p.data, 256, 2, th);
                assert!(
                    (r.loss - loss).abs() < 1e-12,
                    "step {t} s {s}: loss {} vs {loss}",
                    r.loss
                );
                let e = rel_err(&r.grads, &grads);
                assert!(e < 1e-12, "step {t} s {s}: gradient error {e:e}");
            }
        }
    }

    #[test]
    fn f32_evaluation_matches_the_pytorch_oracle() {
        let (p, model) = fixture::<f32>();
        for t in [0, 50, 99] {
            let (loss, grads) = oracle(&p, t, "0");
            for chunk in [1, 100, 256, 5000] {
                let r = run(&model, &p.data, chunk, 2, &theta(&p, t));
                assert!(
                    (r.loss - loss).abs() < 1e-6,
                    "step {t} chunk {chunk}: loss {} vs {loss}",
                    r.loss
                );
                let e = rel_err(&r.grads, &grads);
                assert!(e < 1e-5, "step {t} chunk {chunk}: gradient error {e:e}");
            }
        }
    }

    #[test]
    fn result_does_not_depend_on_the_thread_count() {
        let (p, model) = fixture::<f32>();
        let th = theta(&p, 50);
        let bits = |r: &LossGrad| -> Vec<u64> {
            std::iter::once(r.loss.to_bits())
                .chain(r.grads.iter().flatten().map(|v| v.to_bits()))
                .collect()
        };
        for chunk in [100, 256] {
            let one = bits(&run(&model, &p.data, chunk, 1, &th));
            for threads in [2, 3, 5] {
                assert!(
                    one == bits(&run(&model, &p.data, chunk, threads, &th)),
                    "chunk {chunk}, {threads} threads"
                );
            }
        }
    }
}
