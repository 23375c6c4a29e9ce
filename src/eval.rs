//! Full-training-set loss and gradient.
//!
//! The set is cut into chunks of `chunk_size` samples (the last one may be shorter: nothing is
//! dropped). Chunks run in parallel (rayon), each single-threaded; their summed losses and
//! gradients are added **in chunk order** in f64, so the result is the exact mean over all
//! samples and does not depend on the number of threads.

use crate::data::Dataset;
use crate::error::{LcaError, Result};
use crate::net::{Model, Real};
use ndarray::ArrayD;
use rayon::prelude::*;

mod cost;
pub use cost::StepCost;

/// When a plain Simpson step shares the first layer between its points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FirstLayerSharing {
    /// When the engine can and its cost model says it pays ([`Engine::shares_first_layer`]).
    #[default]
    Auto,
    /// Whenever the engine can ([`Engine::can_share_first_layer`]; `--share-first-layer`).
    Always,
    /// Never: every point in full (`--no-share-first-layer`).
    Never,
}

impl FirstLayerSharing {
    /// Whether `engine` shares under this setting.
    pub fn decide<E: Engine + ?Sized>(self, engine: &E) -> bool {
        match self {
            FirstLayerSharing::Auto => engine.shares_first_layer(),
            FirstLayerSharing::Always => engine.can_share_first_layer(),
            FirstLayerSharing::Never => false,
        }
    }
}

/// Chunks evaluated per parallel wave; bounds memory to this many gradient buffers and does
/// not depend on the thread count.
const WAVE: usize = 8;

/// Adds a wave's per-chunk gradients (`parts`, in chunk order; a part's tensor may be empty:
/// not computed there) to the f64 totals. Every element receives the chunks in order, so the
/// sums are the same for any thread count; the work is split over blocks of each tensor, so
/// that the combine of large models (ResNet-18: 11 M values per chunk) is not serial.
fn add_in_chunk_order<T: Real>(acc: &mut [Vec<f64>], parts: &[&[Vec<T>]]) {
    const BLOCK: usize = 1 << 14;
    acc.par_iter_mut().enumerate().for_each(|(j, a)| {
        a.par_chunks_mut(BLOCK).enumerate().for_each(|(b, blk)| {
            let range = b * BLOCK..b * BLOCK + blk.len();
            for p in parts.iter().filter(|p| !p[j].is_empty()) {
                for (a, v) in blk.iter_mut().zip(&p[j][range.clone()]) {
                    *a += v.f64();
                }
            }
        });
    });
}

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

    /// Chunk `c`'s inputs and targets (the last chunk may be shorter).
    fn chunk(&self, c: usize) -> (crate::net::Input<'_>, crate::net::TargetsView<'_>) {
        let a = c * self.chunk_size;
        let b = ((c + 1) * self.chunk_size).min(self.data.len());
        self.data.chunk(a, b)
    }

    /// One buffer per parameter tensor (model order), every value `v`.
    fn per_param<U: Clone>(&self, v: U) -> Vec<Vec<U>> {
        self.model
            .params
            .iter()
            .map(|p| vec![v.clone(); p.numel()])
            .collect()
    }

    /// Mean loss and its gradient over the whole data set at parameters `theta`.
    pub fn loss_and_grad(&self, theta: &[Vec<T>]) -> Result<LossGrad> {
        Ok(self.loss_and_grad_many(&[theta])?.remove(0))
    }

    /// [`Evaluator::loss_and_grad`] at several points at once: the chunks of all the points
    /// share the parallel waves, so that the threads stay busy when a point's chunks do not
    /// divide among them (5 chunks on 2 threads take 3 rounds alone, 5 rounds for two
    /// points together instead of 6). Each point's chunks are still added in chunk order, so
    /// every result has the same bits as evaluating its point alone.
    pub fn loss_and_grad_many(&self, thetas: &[&[Vec<T>]]) -> Result<Vec<LossGrad>> {
        let chunks = self.num_chunks();
        let mut grads: Vec<Vec<Vec<f64>>> = thetas.iter().map(|_| self.per_param(0.0)).collect();
        let mut loss = vec![0.0f64; thetas.len()];
        let mut count = vec![0usize; thetas.len()];
        // Jobs (point, chunk), point by point, each point's chunks in order.
        let jobs: Vec<(usize, usize)> = (0..thetas.len())
            .flat_map(|p| (0..chunks).map(move |c| (p, c)))
            .collect();
        for wave in jobs.chunks(WAVE) {
            let parts: Vec<(usize, f64, usize, Vec<Vec<T>>)> = wave
                .par_iter()
                .map(|&(p, c)| {
                    let (x, y) = self.chunk(c);
                    let mut g = self.per_param(T::zero());
                    let (l, k) = self.model.chunk_loss_grad(thetas[p], x, y, &mut g);
                    (p, l, k, g)
                })
                .collect();
            for (p, l, k, _) in &parts {
                loss[*p] += l;
                count[*p] += k;
            }
            for (p, acc) in grads.iter_mut().enumerate() {
                let gs: Vec<&[Vec<T>]> = parts
                    .iter()
                    .filter(|part| part.0 == p)
                    .map(|part| part.3.as_slice())
                    .collect();
                if !gs.is_empty() {
                    add_in_chunk_order(acc, &gs);
                }
            }
        }
        loss.into_iter()
            .zip(count)
            .zip(grads)
            .map(|((loss, count), grads)| self.finish(loss, count, grads))
            .collect()
    }

    /// The mean loss and gradient from the chunks' sums, refusing non-finite values.
    fn finish(&self, loss: f64, count: usize, mut grads: Vec<Vec<f64>>) -> Result<LossGrad> {
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

/// The boundary between the integration and whatever evaluates the model: `analyze` and the
/// step stage call only this, so the integration and refinement code ([`crate::lca`]) never
/// knows which engine evaluated. [`Evaluator`] (this crate's networks) is one engine; a
/// foreign one (e.g. a PyTorch worker process) implements the same contract.
///
/// # Contract
/// - **Parameters.** `theta` holds one flat, row-major vector per parameter tensor, in the
///   order of the spec's model ([`crate::net::Model::params`]: the order of the checkpoint
///   tensors as `analyze` loads them, buffers last in their layers' order), each of the length
///   of its tensor. Values are the checkpoint's, converted to [`Engine::Real`] (f32 for the
///   default precision, f64 for `--precision f64`).
/// - **Loss.** The mean of the per-sample loss (the spec's loss function) over the *whole*
///   training set of the engine, in f64; the gradient is that mean's gradient, one f64 buffer
///   per tensor in the same order and lengths as `theta`. Non-finite values are errors
///   ([`LcaError::Numeric`]), not values.
/// - **Buffers and batch norm.** In `running-stats` mode (`model.eval()`) the running mean
///   and variance are buffers: inputs of the loss listed in `theta` like parameters, whose
///   gradient is reported too. In `batch-stats` mode the set is evaluated in chunks of the
///   spec's `chunk_size` samples (the last one shorter), each normalised with its own
///   statistics: the chunking is part of the loss's definition and must be reproduced.
/// - **Determinism.** The same `theta` gives the same bits, whatever the thread count and
///   however often it is asked: `--resume` evaluates θ_t again where the interrupted run
///   stopped, and its outputs are byte-identical to an uninterrupted run's only if this holds.
///   Sums over chunks must therefore be taken in a fixed order.
pub trait Engine {
    /// Element type of the parameter vectors the engine computes with.
    type Real: Real;
    /// What a Simpson step that shares the first layer carries to the next step (the first
    /// layer's outputs at θ_{t+1}); `()` for engines without the capability.
    type Carry;

    /// Mean loss and its gradient over the training set at `theta`.
    fn loss_and_grad(&self, theta: &[Vec<Self::Real>]) -> Result<LossGrad>;

    /// [`Engine::loss_and_grad`] at each of `thetas`, in order: the same results as asking
    /// for them one at a time. An engine may evaluate them together (to keep its threads
    /// busy); the default asks one at a time.
    fn loss_and_grad_many(&self, thetas: &[&[Vec<Self::Real>]]) -> Result<Vec<LossGrad>> {
        thetas.iter().map(|t| self.loss_and_grad(t)).collect()
    }

    /// Mean loss only over the training set at `theta`.
    fn loss(&self, theta: &[Vec<Self::Real>]) -> Result<f64> {
        Ok(self.loss_and_grad(theta)?.loss)
    }

    /// Capability query: whether [`Engine::simpson_sharing_first`] is available for this model
    /// (whether or not it pays). Engines without it keep the default `false`.
    fn can_share_first_layer(&self) -> bool {
        false
    }

    /// Whether [`Engine::simpson_sharing_first`] is available **and** worth using for this
    /// model (the default decision of `lca analyze`). It must depend on the model only (not on
    /// timings of this run), so that resumed and sharded runs make the same choice.
    fn shares_first_layer(&self) -> bool {
        false
    }

    /// One plain Simpson step (θ_t, the midpoint, θ_{t+1}) with the first layer shared between
    /// the three points; exact up to rounding. Called only when
    /// [`Engine::shares_first_layer`] is true. `carry` holds the first layer's outputs at
    /// θ_t from the previous step (`None`: compute them) and is replaced by those at θ_{t+1}.
    fn simpson_sharing_first(
        &self,
        theta0: &[Vec<Self::Real>],
        mid: &[Vec<Self::Real>],
        theta1: &[Vec<Self::Real>],
        carry: &mut Option<Self::Carry>,
    ) -> Result<SharedSimpson> {
        let _ = (theta0, mid, theta1, carry);
        Err(LcaError::Numeric(
            "internal: this engine does not share the first layer".into(),
        ))
    }
}

impl<T: Real> Engine for Evaluator<'_, T> {
    type Real = T;
    type Carry = FirstOutputs<T>;

    fn loss_and_grad(&self, theta: &[Vec<T>]) -> Result<LossGrad> {
        Evaluator::loss_and_grad(self, theta)
    }

    fn loss_and_grad_many(&self, thetas: &[&[Vec<T>]]) -> Result<Vec<LossGrad>> {
        Evaluator::loss_and_grad_many(self, thetas)
    }

    fn can_share_first_layer(&self) -> bool {
        self.model.first_layer_shareable()
    }

    fn shares_first_layer(&self) -> bool {
        Evaluator::shares_first_layer(self)
    }

    fn simpson_sharing_first(
        &self,
        theta0: &[Vec<T>],
        mid: &[Vec<T>],
        theta1: &[Vec<T>],
        carry: &mut Option<FirstOutputs<T>>,
    ) -> Result<SharedSimpson> {
        Evaluator::simpson_sharing_first(self, theta0, mid, theta1, carry)
    }
}

/// Node 0's outputs at one parameter point, one array per chunk: what a Simpson step that
/// shares the first layer ([`Evaluator::simpson_sharing_first`]) carries to the next step.
pub type FirstOutputs<T> = Vec<ArrayD<T>>;

/// One plain Simpson step (points θ_t, θ_t + ½Δθ, θ_{t+1}) computed with the first layer
/// shared between the points.
#[derive(Debug, Clone)]
pub struct SharedSimpson {
    /// Full-set mean loss at s = 0, ½ and 1.
    pub loss: [f64; 3],
    /// Simpson's weighted gradient (g₀ + 4·g½ + g₁)/6 of every parameter tensor, model order.
    pub weighted: Vec<Vec<f64>>,
}

/// What one chunk contributes to a shared Simpson step.
struct SharedChunk<T> {
    loss: [f64; 3],
    count: usize,
    /// Gradients of the summed loss at the three points (node 0's tensors untouched).
    grads: [Vec<Vec<T>>; 3],
    /// Node 0's parameter gradients for the output gradient g₀ + 4·g½ + g₁.
    first: Vec<Vec<T>>,
    /// Node 0's output at θ_{t+1}.
    end: ArrayD<T>,
}

impl<T: Real> Evaluator<'_, T> {
    /// Whether [`Evaluator::simpson_sharing_first`] applies to this model and pays: node 0 is
    /// shareable and the cost model ([`StepCost`]: per-node multiply-adds and memory traffic,
    /// the third evaluation of the rest of the network and the carried outputs) estimates a
    /// shared step clearly cheaper than two full evaluations. Depends on the model's shapes
    /// only, so the choice is the same for every thread count, resume and shard.
    pub fn shares_first_layer(&self) -> bool {
        StepCost::of(self.model).is_some_and(|c| c.sharing_pays())
    }

    /// Simpson's rule over one step with the model's first layer (node 0, see
    /// [`crate::net::Model::first_layer_shareable`]) shared between the three points. Exact up
    /// to rounding, because node 0 is affine in its parameters for the fixed data:
    /// - its output at the midpoint is the mean of its outputs at the ends, and its output at
    ///   θ_t is carried from the previous step (`carry`, replaced by the outputs at θ_{t+1}; when
    ///   `None`, they are computed);
    /// - the Simpson-weighted sum of its parameter gradients is one backward pass of the
    ///   weighted sum of its output gradients (g₀ + 4·g½ + g₁).
    ///
    /// So a step costs node 0 one forward and one weight-gradient product instead of two of
    /// each; the rest of the network is evaluated at the three points (at θ_t again, for node
    /// 0's output gradient there). Chunks are combined in order in f64, as in
    /// [`Evaluator::loss_and_grad`], so the result does not depend on the thread count.
    pub fn simpson_sharing_first(
        &self,
        theta0: &[Vec<T>],
        mid: &[Vec<T>],
        theta1: &[Vec<T>],
        carry: &mut Option<FirstOutputs<T>>,
    ) -> Result<SharedSimpson> {
        let model = self.model;
        let chunks = self.num_chunks();
        let first_ids = &model.nodes[0].param_ids;
        let zeros_f64 = || self.per_param(0.0f64);
        let mut acc = [zeros_f64(), zeros_f64(), zeros_f64()];
        let mut first_acc = zeros_f64();
        let mut loss = [0.0f64; 3];
        let mut count = 0usize;
        let mut old: Vec<Option<ArrayD<T>>> = match carry.take() {
            Some(v) if v.len() == chunks => v.into_iter().map(Some).collect(),
            _ => (0..chunks).map(|_| None).collect(),
        };
        let mut new: FirstOutputs<T> = Vec::with_capacity(chunks);
        let two = T::of(0.5);
        let four = T::of(4.0);
        let mut start = 0;
        while start < chunks {
            let end = (start + WAVE).min(chunks);
            let jobs: Vec<(usize, Option<ArrayD<T>>)> =
                (start..end).map(|c| (c, old[c].take())).collect();
            let parts: Vec<SharedChunk<T>> = jobs
                .into_par_iter()
                .map(|(c, z0)| {
                    let (x, y) = self.chunk(c);
                    let z0 = z0.unwrap_or_else(|| model.first_output(theta0, x.view()));
                    let z1 = model.first_output(theta1, x.view());
                    let zm = ndarray::Zip::from(&z0)
                        .and(&z1)
                        .map_collect(|&a, &b| (a + b) * two);
                    // Gradient buffers of the rest of the network (node 0's tensors are
                    // left empty: the passes after node 0 never touch them) and of node 0.
                    let zeros = |first: bool| -> Vec<Vec<T>> {
                        model
                            .params
                            .iter()
                            .enumerate()
                            .map(|(j, p)| {
                                if first_ids.contains(&j) == first {
                                    vec![T::zero(); p.numel()]
                                } else {
                                    Vec::new()
                                }
                            })
                            .collect()
                    };
                    let mut grads = [zeros(false), zeros(false), zeros(false)];
                    let mut losses = [0.0; 3];
                    let mut k = 0;
                    let mut gsum: Option<ArrayD<T>> = None;
                    for (i, (th, z)) in [(theta0, &z0), (mid, &zm), (theta1, &z1)]
                        .into_iter()
                        .enumerate()
                    {
                        let (l, cnt, g) = model.chunk_loss_grad_after_first(
                            th,
                            x.view(),
                            y.clone(),
                            z.view(),
                            &mut grads[i],
                        );
                        losses[i] = l;
                        k = cnt;
                        let w = if i == 1 { four } else { T::one() };
                        match gsum.as_mut() {
                            // The first point (θ_t, weight 1): its gradient is the sum so far.
                            None => gsum = Some(g),
                            Some(s) => ndarray::Zip::from(s).and(&g).for_each(|s, &v| *s += v * w),
                        }
                    }
                    drop(z0);
                    drop(zm);
                    let mut first = zeros(true);
                    let gsum = gsum.expect("three points");
                    model.first_param_grad(theta1, x.view(), z1.view(), gsum.view(), &mut first);
                    SharedChunk {
                        loss: losses,
                        count: k,
                        grads,
                        first,
                        end: z1,
                    }
                })
                .collect();
            for (i, acc) in acc.iter_mut().enumerate() {
                let gs: Vec<&[Vec<T>]> = parts.iter().map(|p| p.grads[i].as_slice()).collect();
                add_in_chunk_order(acc, &gs);
            }
            let gs: Vec<&[Vec<T>]> = parts.iter().map(|p| p.first.as_slice()).collect();
            add_in_chunk_order(&mut first_acc, &gs);
            for part in parts {
                for (l, pl) in loss.iter_mut().zip(part.loss) {
                    *l += pl;
                }
                count += part.count;
                new.push(part.end);
            }
            start = end;
        }
        let inv = 1.0 / count as f64;
        let loss = loss.map(|l| l * inv);
        if let Some(l) = loss.iter().find(|l| !l.is_finite()) {
            return Err(LcaError::Numeric(format!(
                "the full-set loss is {l} (overflow or NaN in the forward pass)"
            )));
        }
        let mut weighted = zeros_f64();
        for (j, w) in weighted.iter_mut().enumerate() {
            if first_ids.contains(&j) {
                for (w, f) in w.iter_mut().zip(&first_acc[j]) {
                    *w = f * inv / 6.0;
                }
            } else {
                for (k, w) in w.iter_mut().enumerate() {
                    *w = (acc[0][j][k] + 4.0 * acc[1][j][k] + acc[2][j][k]) * inv / 6.0;
                }
            }
            if let Some(i) = w.iter().position(|v| !v.is_finite()) {
                return Err(LcaError::Numeric(format!(
                    "the gradient of '{}' is {} at flat index {i}",
                    model.params[j].name, w[i]
                )));
            }
        }
        *carry = Some(new);
        Ok(SharedSimpson { loss, weighted })
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

    /// `f` with an evaluator of `model` over `data` in chunks of `chunk`, on `threads` threads.
    fn on_threads<T: Real, R: Send>(
        model: &Model<T>,
        data: &Dataset,
        chunk: usize,
        threads: usize,
        f: impl FnOnce(&Evaluator<'_, T>) -> R + Send,
    ) -> R {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let e = Evaluator {
            model,
            data,
            chunk_size: chunk,
        };
        pool.install(|| f(&e))
    }

    fn run<T: Real>(
        model: &Model<T>,
        data: &Dataset,
        chunk: usize,
        threads: usize,
        theta: &[Vec<T>],
    ) -> LossGrad {
        on_threads(model, data, chunk, threads, |e| e.loss_and_grad(theta)).unwrap()
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

    /// Simpson's weighted gradient (g₀ + 4·g½ + g₁)/6 from three plain evaluations.
    fn plain_simpson<T: Real>(
        model: &Model<T>,
        data: &Dataset,
        chunk: usize,
        threads: usize,
        pts: [&[Vec<T>]; 3],
    ) -> ([f64; 3], Vec<Vec<f64>>) {
        let r: Vec<LossGrad> = pts
            .iter()
            .map(|th| run(model, data, chunk, threads, th))
            .collect();
        let w = r[0]
            .grads
            .iter()
            .enumerate()
            .map(|(j, g)| {
                g.iter()
                    .enumerate()
                    .map(|(k, v)| (v + 4.0 * r[1].grads[j][k] + r[2].grads[j][k]) / 6.0)
                    .collect()
            })
            .collect();
        ([r[0].loss, r[1].loss, r[2].loss], w)
    }

    fn shared<T: Real>(
        model: &Model<T>,
        data: &Dataset,
        chunk: usize,
        threads: usize,
        pts: [&[Vec<T>]; 3],
        carry: &mut Option<FirstOutputs<T>>,
    ) -> SharedSimpson {
        on_threads(model, data, chunk, threads, |e| {
            assert!(e.model.first_layer_shareable());
            e.simpson_sharing_first(pts[0], pts[1], pts[2], carry)
        })
        .unwrap()
    }

    fn points<T: Real>(p: &crate::analyze::Prepared, t: u64) -> [Vec<Vec<T>>; 3] {
        let (a, b) = (theta(p, t), theta(p, t + 1));
        let d = crate::lca::difference(&a, &b);
        [0.0, 0.5, 1.0].map(|s| crate::lca::point::<T>(&a, &d, s))
    }

    /// Sharing the first layer is exact up to rounding: f64 agrees with three plain
    /// evaluations to 1e-12, f32 to f32 rounding; losses at the ends are the same bits.
    #[test]
    fn sharing_the_first_layer_equals_plain_simpson() {
        let (p, m64) = fixture::<f64>();
        let m32 = Model::<f32>::build(&p.spec, p.data.sample_shape()).unwrap();
        for t in [0, 37, 98] {
            let pts = points::<f64>(&p, t);
            let pts = [&pts[0][..], &pts[1][..], &pts[2][..]];
            let (loss, w) = plain_simpson(&m64, &p.data, 300, 2, pts);
            let s = shared(&m64, &p.data, 300, 2, pts, &mut None);
            for (i, (a, b)) in s.loss.iter().zip(loss).enumerate() {
                assert!((a - b).abs() < 1e-13, "step {t} point {i}");
            }
            assert_eq!(s.loss[0].to_bits(), loss[0].to_bits());
            assert_eq!(s.loss[2].to_bits(), loss[2].to_bits());
            let e = rel_err(&s.weighted, &w);
            assert!(e < 1e-12, "step {t}: f64 weighted gradient error {e:e}");

            let pts = points::<f32>(&p, t);
            let pts = [&pts[0][..], &pts[1][..], &pts[2][..]];
            let (loss, w) = plain_simpson(&m32, &p.data, 300, 2, pts);
            let s = shared(&m32, &p.data, 300, 2, pts, &mut None);
            assert!((s.loss[1] - loss[1]).abs() < 1e-6, "step {t}");
            assert_eq!(s.loss[0].to_bits(), loss[0].to_bits());
            let e = rel_err(&s.weighted, &w);
            assert!(e < 1e-5, "step {t}: f32 weighted gradient error {e:e}");
        }
    }

    /// The carried first-layer outputs give the same bits as computing them afresh, and the
    /// result does not depend on the thread count.
    #[test]
    fn shared_steps_do_not_depend_on_the_carry_or_the_threads() {
        let (p, model) = fixture::<f32>();
        let bits = |s: &SharedSimpson| -> Vec<u64> {
            s.loss
                .iter()
                .map(|v| v.to_bits())
                .chain(s.weighted.iter().flatten().map(|v| v.to_bits()))
                .collect()
        };
        let a = points::<f32>(&p, 10);
        let b = points::<f32>(&p, 11);
        let mut carry = None;
        shared(&model, &p.data, 256, 2, [&a[0], &a[1], &a[2]], &mut carry);
        assert_eq!(carry.as_ref().unwrap().len(), p.data.len().div_ceil(256));
        let carried = shared(&model, &p.data, 256, 2, [&b[0], &b[1], &b[2]], &mut carry);
        for threads in [1, 3] {
            let fresh = shared(
                &model,
                &p.data,
                256,
                threads,
                [&b[0], &b[1], &b[2]],
                &mut None,
            );
            assert!(bits(&carried) == bits(&fresh), "{threads} threads");
        }
    }
}
