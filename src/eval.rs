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
        for (j, g) in grads.iter_mut().enumerate() {
            for v in g.iter_mut() {
                *v *= inv;
            }
            self.refuse_non_finite(j, g)?;
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
    /// What a Simpson step that shares the first layer carries to the next step (what it
    /// computed at θ_{t+1}, and with `keep` what refining the step needs); `()` for engines
    /// without the capability.
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
    /// [`Engine::shares_first_layer`] is true. `carry` holds what the previous step computed
    /// at θ_t (`None`: evaluate θ_t) and is replaced by the same at θ_{t+1}. With `keep`, the
    /// result holds the gradients by point ([`SharedSimpson::parts`]) and the carry what
    /// [`Engine::refine_sharing_first`] needs.
    fn simpson_sharing_first(
        &self,
        theta0: &[Vec<Self::Real>],
        mid: &[Vec<Self::Real>],
        theta1: &[Vec<Self::Real>],
        carry: &mut Option<Self::Carry>,
        keep: bool,
    ) -> Result<SharedSimpson> {
        let _ = (theta0, mid, theta1, carry, keep);
        Err(LcaError::Numeric(
            "internal: this engine does not share the first layer".into(),
        ))
    }

    /// One refinement level (`n` intervals; the new points θ_t + s·Δθ, `thetas` at `ss`) of the
    /// step last computed by [`Engine::simpson_sharing_first`] with `keep`, the first layer
    /// still shared. Called only after such a step.
    fn refine_sharing_first(
        &self,
        theta0: &[Vec<Self::Real>],
        theta1: &[Vec<Self::Real>],
        n: usize,
        ss: &[f64],
        thetas: &[&[Vec<Self::Real>]],
        carry: &mut Option<Self::Carry>,
    ) -> Result<SharedLevel> {
        let _ = (theta0, theta1, n, ss, thetas, carry);
        Err(LcaError::Numeric(
            "internal: this engine does not share the first layer".into(),
        ))
    }
}

impl<T: Real> Engine for Evaluator<'_, T> {
    type Real = T;
    type Carry = SharedCarry<T>;

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
        carry: &mut Option<SharedCarry<T>>,
        keep: bool,
    ) -> Result<SharedSimpson> {
        Evaluator::simpson_sharing_first(self, theta0, mid, theta1, carry, keep)
    }

    fn refine_sharing_first(
        &self,
        theta0: &[Vec<T>],
        theta1: &[Vec<T>],
        n: usize,
        ss: &[f64],
        thetas: &[&[Vec<T>]],
        carry: &mut Option<SharedCarry<T>>,
    ) -> Result<SharedLevel> {
        Evaluator::refine_sharing_first(self, theta0, theta1, n, ss, thetas, carry)
    }
}

/// What a Simpson step that shares the first layer ([`Evaluator::simpson_sharing_first`])
/// carries to the next step: everything it computed at θ_{t+1} that the next step needs at
/// its θ_t, so that the next step evaluates the network at its midpoint and end only; and,
/// when the step may be refined, what [`Evaluator::refine_sharing_first`] needs.
#[derive(Debug)]
pub struct SharedCarry<T> {
    /// Node 0's outputs at θ_{t+1}, one array per chunk.
    outputs: Vec<ArrayD<T>>,
    /// The gradient of each chunk's summed loss with respect to those outputs.
    output_grads: Vec<ArrayD<T>>,
    /// The chunks' summed losses there, added in chunk order, and the number of loss terms.
    loss_sum: f64,
    count: usize,
    /// The gradients of the tensors after node 0 there, summed in chunk order in f64 (node
    /// 0's tensors are empty: they are never read).
    rest: Vec<Vec<f64>>,
    /// Per chunk, node 0's output gradients of the step just computed summed over its two
    /// ends (δ₀ + δ₁) and over the interior points evaluated so far; `None` unless the step
    /// was computed with `keep` (it may be refined).
    refine: Option<Vec<[ArrayD<T>; 2]>>,
}

impl<T> SharedCarry<T> {
    /// The number of chunks it holds.
    pub fn chunks(&self) -> usize {
        self.outputs.len()
    }
}

/// One plain Simpson step (points θ_t, θ_t + ½Δθ, θ_{t+1}) computed with the first layer
/// shared between the points.
#[derive(Debug, Clone)]
pub struct SharedSimpson {
    /// Full-set mean loss at s = 0, ½ and 1.
    pub loss: [f64; 3],
    /// Simpson's weighted gradient (g₀ + 4·g½ + g₁)/6 of every parameter tensor, model order.
    pub weighted: Vec<Vec<f64>>,
    /// With `keep`: the mean gradients g₀ + g₁ and g½ of every tensor after node 0 (node 0's
    /// are empty), for refining the step ([`crate::lca::refine_shared_step`]).
    pub parts: Option<[Vec<Vec<f64>>; 2]>,
}

/// The new points of one refinement level of a shared step
/// ([`Evaluator::refine_sharing_first`]).
#[derive(Debug, Clone)]
pub struct SharedLevel {
    /// Σ over the new points of the mean gradient of every tensor after node 0 (node 0's
    /// are empty).
    pub rest: Vec<Vec<f64>>,
    /// Composite Simpson's weighted gradient of node 0's tensors over all the level's points,
    /// h/3·Σ wᵢ gᵢ (h = 1/n; weights 1, 4, 2, 4, …, 4, 1); the others are empty.
    pub first: Vec<Vec<f64>>,
}

/// What one chunk contributes to a shared Simpson step.
struct SharedChunk<T> {
    /// Summed losses at s = 0 (0 when carried), ½ and 1.
    loss: [f64; 3],
    count: usize,
    /// Gradients of the summed loss at the points evaluated (node 0's tensors empty; none at
    /// s = 0 when carried).
    grads: [Vec<Vec<T>>; 3],
    /// Node 0's parameter gradients for the output gradient δ₀ + 4·δ½ + δ₁.
    first: Vec<Vec<T>>,
    /// Node 0's output at θ_{t+1} and the loss's gradient with respect to it.
    end: ArrayD<T>,
    end_grad: ArrayD<T>,
    /// With `keep`: δ₀ + δ₁ and δ½.
    refine: Option<[ArrayD<T>; 2]>,
}

impl<T: Real> Evaluator<'_, T> {
    /// Whether [`Evaluator::simpson_sharing_first`] applies to this model and pays: node 0 is
    /// shareable and the cost model ([`StepCost`]: per-node multiply-adds and memory traffic,
    /// the carried outputs and output gradients) estimates a shared step clearly cheaper than
    /// two full evaluations. Depends on the model's shapes only, so the choice is the same for
    /// every thread count, resume and shard.
    pub fn shares_first_layer(&self) -> bool {
        StepCost::of(self.model).is_some_and(|c| c.sharing_pays())
    }

    /// Gradient buffers of the tensors after node 0 (`first` false: node 0's are left empty,
    /// the passes after node 0 never touch them) or of node 0's (`first` true).
    fn split_zeros(&self, first: bool) -> Vec<Vec<T>> {
        let ids = &self.model.nodes[0].param_ids;
        self.model
            .params
            .iter()
            .enumerate()
            .map(|(j, p)| {
                if ids.contains(&j) == first {
                    vec![T::zero(); p.numel()]
                } else {
                    Vec::new()
                }
            })
            .collect()
    }

    /// Simpson's rule over one step with the model's first layer (node 0, see
    /// [`crate::net::Model::first_layer_shareable`]) shared between the three points. Exact up
    /// to rounding, because node 0 is affine in its parameters for the fixed data:
    /// - its output at the midpoint is the mean of its outputs at the ends;
    /// - the Simpson-weighted sum of its parameter gradients is one backward pass of the
    ///   weighted sum of its output gradients (δ₀ + 4·δ½ + δ₁).
    ///
    /// Everything needed at θ_t (node 0's outputs and output gradients, the loss and the
    /// other tensors' gradients) is carried from the previous step (`carry`, replaced by the
    /// same at θ_{t+1}; when `None`, θ_t is evaluated). So a step costs node 0 one forward and
    /// one weight-gradient product instead of two of each, and the rest of the network the two
    /// evaluations of a plain step. A carried start gives the same bits as evaluating θ_t
    /// afresh. With `keep`, the step's node-0 output gradients stay in the carry and the
    /// result holds the other tensors' gradients by point, so that the step can be refined
    /// ([`Evaluator::refine_sharing_first`]). Chunks are combined in order in f64, as in
    /// [`Evaluator::loss_and_grad`], so the result does not depend on the thread count.
    pub fn simpson_sharing_first(
        &self,
        theta0: &[Vec<T>],
        mid: &[Vec<T>],
        theta1: &[Vec<T>],
        carry: &mut Option<SharedCarry<T>>,
        keep: bool,
    ) -> Result<SharedSimpson> {
        let model = self.model;
        let chunks = self.num_chunks();
        let first_ids = &model.nodes[0].param_ids;
        let zeros_f64 = || self.per_param(0.0f64);
        let mut loss = [0.0f64; 3];
        let mut count = 0usize;
        // The start: carried, or evaluated with the other points.
        let (mut start, mut acc0, carried) = match carry.take() {
            Some(c) if c.chunks() == chunks => {
                loss[0] = c.loss_sum;
                count = c.count;
                let start = c
                    .outputs
                    .into_iter()
                    .zip(c.output_grads)
                    .map(|(z, g)| Some((z, Some(g))));
                (start.collect::<Vec<_>>(), c.rest, true)
            }
            _ => ((0..chunks).map(|_| None).collect(), zeros_f64(), false),
        };
        let mut acc = [zeros_f64(), zeros_f64()];
        let mut first_acc = zeros_f64();
        let mut outputs: Vec<ArrayD<T>> = Vec::with_capacity(chunks);
        let mut output_grads: Vec<ArrayD<T>> = Vec::with_capacity(chunks);
        let mut kept: Vec<[ArrayD<T>; 2]> = Vec::new();
        let mut wave = 0;
        while wave < chunks {
            let end = (wave + WAVE).min(chunks);
            let jobs: Vec<(usize, Option<StartOfChunk<T>>)> =
                (wave..end).map(|c| (c, start[c].take())).collect();
            let parts: Vec<SharedChunk<T>> = jobs
                .into_par_iter()
                .map(|(c, z0)| self.shared_chunk(c, [theta0, mid, theta1], z0, keep))
                .collect();
            if !carried {
                let gs: Vec<&[Vec<T>]> = parts.iter().map(|p| p.grads[0].as_slice()).collect();
                add_in_chunk_order(&mut acc0, &gs);
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let gs: Vec<&[Vec<T>]> = parts.iter().map(|p| p.grads[i + 1].as_slice()).collect();
                add_in_chunk_order(acc, &gs);
            }
            let gs: Vec<&[Vec<T>]> = parts.iter().map(|p| p.first.as_slice()).collect();
            add_in_chunk_order(&mut first_acc, &gs);
            for part in parts {
                let from = if carried { 1 } else { 0 };
                for (l, pl) in loss.iter_mut().zip(part.loss).skip(from) {
                    *l += pl;
                }
                if !carried {
                    count += part.count;
                }
                outputs.push(part.end);
                output_grads.push(part.end_grad);
                kept.extend(part.refine);
            }
            wave = end;
        }
        let sums = loss;
        let inv = 1.0 / count as f64;
        let loss = loss.map(|l| l * inv);
        if let Some(l) = loss.iter().find(|l| !l.is_finite()) {
            return Err(LcaError::Numeric(format!(
                "the full-set loss is {l} (overflow or NaN in the forward pass)"
            )));
        }
        let [acc1, acc2] = acc;
        let mut weighted = zeros_f64();
        for (j, w) in weighted.iter_mut().enumerate() {
            if first_ids.contains(&j) {
                for (w, f) in w.iter_mut().zip(&first_acc[j]) {
                    *w = f * inv / 6.0;
                }
            } else {
                for (k, w) in w.iter_mut().enumerate() {
                    *w = (acc0[j][k] + 4.0 * acc1[j][k] + acc2[j][k]) * inv / 6.0;
                }
            }
            self.refuse_non_finite(j, w)?;
        }
        let parts = keep.then(|| {
            let mean = |f: &dyn Fn(usize, usize) -> f64| -> Vec<Vec<f64>> {
                (0..model.params.len())
                    .map(|j| {
                        if first_ids.contains(&j) {
                            Vec::new()
                        } else {
                            (0..model.params[j].numel())
                                .map(|k| f(j, k) * inv)
                                .collect()
                        }
                    })
                    .collect()
            };
            [
                mean(&|j, k| acc0[j][k] + acc2[j][k]),
                mean(&|j, k| acc1[j][k]),
            ]
        });
        *carry = Some(SharedCarry {
            outputs,
            output_grads,
            loss_sum: sums[2],
            count,
            rest: acc2,
            refine: keep.then_some(kept),
        });
        Ok(SharedSimpson {
            loss,
            weighted,
            parts,
        })
    }

    /// Refuses a non-finite value in tensor `j`'s gradient.
    fn refuse_non_finite(&self, j: usize, w: &[f64]) -> Result<()> {
        match w.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(LcaError::Numeric(format!(
                "the gradient of '{}' is {} at flat index {i}",
                self.model.params[j].name, w[i]
            ))),
            None => Ok(()),
        }
    }

    /// One chunk of [`Evaluator::simpson_sharing_first`] at the points θ_t, the midpoint and
    /// θ_{t+1}. `start` holds node 0's output at θ_t and, when carried, the loss's gradient
    /// with respect to it (then θ_t is not evaluated).
    fn shared_chunk(
        &self,
        c: usize,
        pts: [&[Vec<T>]; 3],
        start: Option<StartOfChunk<T>>,
        keep: bool,
    ) -> SharedChunk<T> {
        let model = self.model;
        let (x, y) = self.chunk(c);
        let (z0, g0) = start.unwrap_or_else(|| (model.first_output(pts[0], x.view()), None));
        let z1 = model.first_output(pts[2], x.view());
        let half = T::of(0.5);
        let zm = map2(&z0, &z1, |a, b| (a + b) * half);
        let carried = g0.is_some();
        let mut grads: [Vec<Vec<T>>; 3] =
            [Vec::new(), self.split_zeros(false), self.split_zeros(false)];
        let mut losses = [0.0; 3];
        let mut k = 0;
        // Node 0's output gradients at the three points (the carried δ₀ first).
        let mut deltas: [Option<ArrayD<T>>; 3] = [g0, None, None];
        for (i, z) in [&z0, &zm, &z1].into_iter().enumerate() {
            if i == 0 {
                if carried {
                    continue;
                }
                grads[0] = self.split_zeros(false);
            }
            let (l, cnt, g) = model.chunk_loss_grad_after_first(
                pts[i],
                x.view(),
                y.clone(),
                z.view(),
                &mut grads[i],
            );
            losses[i] = l;
            k = cnt;
            deltas[i] = Some(g);
        }
        drop(z0);
        drop(zm);
        let [d0, dm, d1] = deltas.map(|d| d.expect("every point has its output gradient"));
        let four = T::of(4.0);
        let mut first = self.split_zeros(true);
        let refine = if keep {
            // δ₀ + δ₁ and δ½ are kept; the product reads δ₀ + δ₁ + 4·δ½.
            let mut ends = d0;
            ends += &d1;
            let sum = map2(&ends, &dm, |e, m| e + m * four);
            model.first_param_grad(pts[2], x.view(), z1.view(), sum.view(), &mut first);
            Some([ends, dm])
        } else {
            // δ₀ + 4·δ½ + δ₁, in the carried δ₀'s buffer.
            let mut sum = d0;
            match (sum.as_slice_mut(), dm.as_slice(), d1.as_slice()) {
                // Slices, so that the loop vectorises (ndarray's three-way Zip does not).
                (Some(s), Some(m), Some(e)) => {
                    for ((s, &m), &e) in s.iter_mut().zip(m).zip(e) {
                        *s = *s + m * four + e;
                    }
                }
                _ => ndarray::Zip::from(&mut sum)
                    .and(&dm)
                    .and(&d1)
                    .for_each(|s, &m, &e| *s = *s + m * four + e),
            }
            model.first_param_grad(pts[2], x.view(), z1.view(), sum.view(), &mut first);
            None
        };
        SharedChunk {
            loss: losses,
            count: k,
            grads,
            first,
            end: z1,
            end_grad: d1,
            refine,
        }
    }
}

/// `f` of two arrays of one shape, elementwise, into a new array: a plain loop over their
/// slices when both are contiguous (it vectorises; ndarray's `Zip::map_collect` did not, ~3 %
/// of a shared MNIST-FC step), the same values either way.
fn map2<T: Real>(a: &ArrayD<T>, b: &ArrayD<T>, f: impl Fn(T, T) -> T) -> ArrayD<T> {
    assert_eq!(a.shape(), b.shape(), "map2: shapes differ");
    if let (Some(x), Some(y)) = (a.as_slice(), b.as_slice()) {
        let v: Vec<T> = x.iter().zip(y).map(|(&p, &q)| f(p, q)).collect();
        return ArrayD::from_shape_vec(a.raw_dim(), v).expect("same shape");
    }
    ndarray::Zip::from(a).and(b).map_collect(|&p, &q| f(p, q))
}

/// A chunk's start for [`Evaluator::shared_chunk`]: node 0's output at θ_t and, when carried,
/// the loss's gradient with respect to it.
type StartOfChunk<T> = (ArrayD<T>, Option<ArrayD<T>>);

/// What one chunk contributes to a refinement level ([`Evaluator::refine_chunk`]): the
/// gradients after node 0 summed over the new points, node 0's gradients for the level's
/// weighted output gradient, and the kept output-gradient sums (ends, interior points).
type RefinedChunk<T> = (Vec<Vec<T>>, Vec<Vec<T>>, [ArrayD<T>; 2]);

impl<T: Real> Evaluator<'_, T> {
    /// One refinement level of a step computed by [`Evaluator::simpson_sharing_first`] with
    /// `keep` (composite Simpson over `n` intervals, `n` ≥ 4 a power of two): evaluates the new
    /// points `thetas` (θ_t + s·Δθ for `ss`, the odd multiples of 1/n) with node 0 still
    /// shared. Node 0's output there is (1 − s)·z₀ + s·z₁ (exact up to rounding: it is affine
    /// along the step), z₁ carried and z₀ computed again once per chunk; the network after
    /// node 0 is evaluated at each new point; node 0's weighted gradient over all the level's
    /// points is one product of the weighted sum of its output gradients (the ends and earlier
    /// points are kept in the carry). So a level costs node 0 one forward and one
    /// weight-gradient product however many points it has, instead of one of each per point.
    pub fn refine_sharing_first(
        &self,
        theta0: &[Vec<T>],
        theta1: &[Vec<T>],
        n: usize,
        ss: &[f64],
        thetas: &[&[Vec<T>]],
        carry: &mut Option<SharedCarry<T>>,
    ) -> Result<SharedLevel> {
        let chunks = self.num_chunks();
        let carry = carry
            .as_mut()
            .filter(|c| c.chunks() == chunks && c.refine.is_some())
            .ok_or_else(|| {
                LcaError::Numeric("internal: refining a shared step that was not kept".into())
            })?;
        let mut kept: Vec<Option<[ArrayD<T>; 2]>> = carry
            .refine
            .take()
            .expect("checked")
            .into_iter()
            .map(Some)
            .collect();
        let first_ids = &self.model.nodes[0].param_ids;
        let mut rest = self.per_param(0.0f64);
        let mut first_acc = self.per_param(0.0f64);
        let mut wave = 0;
        while wave < chunks {
            let end = (wave + WAVE).min(chunks);
            let jobs: Vec<(usize, [ArrayD<T>; 2])> = (wave..end)
                .map(|c| (c, kept[c].take().expect("each chunk once")))
                .collect();
            let outputs = &carry.outputs;
            let parts: Vec<RefinedChunk<T>> = jobs
                .into_par_iter()
                .map(|(c, k)| self.refine_chunk(c, [theta0, theta1], &outputs[c], ss, thetas, k))
                .collect();
            let gs: Vec<&[Vec<T>]> = parts.iter().map(|p| p.0.as_slice()).collect();
            add_in_chunk_order(&mut rest, &gs);
            let gs: Vec<&[Vec<T>]> = parts.iter().map(|p| p.1.as_slice()).collect();
            add_in_chunk_order(&mut first_acc, &gs);
            for (c, part) in (wave..end).zip(parts) {
                kept[c] = Some(part.2);
            }
            wave = end;
        }
        carry.refine = Some(kept.into_iter().map(|k| k.expect("returned")).collect());
        let inv = 1.0 / carry.count as f64;
        let h3 = 1.0 / (3.0 * n as f64);
        let (mut r, mut f) = (Vec::new(), Vec::new());
        for (j, (mut rj, mut fj)) in rest.into_iter().zip(first_acc).enumerate() {
            if first_ids.contains(&j) {
                fj.iter_mut().for_each(|v| *v *= inv * h3);
                self.refuse_non_finite(j, &fj)?;
                rj = Vec::new();
            } else {
                rj.iter_mut().for_each(|v| *v *= inv);
                self.refuse_non_finite(j, &rj)?;
                fj = Vec::new();
            }
            r.push(rj);
            f.push(fj);
        }
        Ok(SharedLevel { rest: r, first: f })
    }

    /// One chunk of [`Evaluator::refine_sharing_first`]: the gradients after node 0 summed
    /// over the new points, node 0's gradients for the level's weighted output gradient, and
    /// the kept output gradients (δ₀ + δ₁, the interior points') with the new points added.
    fn refine_chunk(
        &self,
        c: usize,
        ends: [&[Vec<T>]; 2],
        z1: &ArrayD<T>,
        ss: &[f64],
        thetas: &[&[Vec<T>]],
        kept: [ArrayD<T>; 2],
    ) -> RefinedChunk<T> {
        let model = self.model;
        let (x, y) = self.chunk(c);
        let z0 = model.first_output(ends[0], x.view());
        let mut grads = self.split_zeros(false);
        let mut newest: Option<ArrayD<T>> = None;
        for (&s, th) in ss.iter().zip(thetas) {
            let (a, b) = (T::of(1.0 - s), T::of(s));
            let z = map2(&z0, z1, |p, q| p * a + q * b);
            let (_, _, g) =
                model.chunk_loss_grad_after_first(th, x.view(), y.clone(), z.view(), &mut grads);
            match newest.as_mut() {
                None => newest = Some(g),
                Some(acc) => *acc += &g,
            }
        }
        drop(z0);
        let newest = newest.expect("a level has new points");
        let [ends_d, mut interior] = kept;
        let (two, four) = (T::of(2.0), T::of(4.0));
        let sum = ndarray::Zip::from(&ends_d)
            .and(&interior)
            .and(&newest)
            .map_collect(|&e, &i, &b| e + i * two + b * four);
        let mut first = self.split_zeros(true);
        model.first_param_grad(ends[1], x.view(), z1.view(), sum.view(), &mut first);
        interior += &newest;
        (grads, first, [ends_d, interior])
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
        carry: &mut Option<SharedCarry<T>>,
    ) -> SharedSimpson {
        on_threads(model, data, chunk, threads, |e| {
            assert!(e.model.first_layer_shareable());
            e.simpson_sharing_first(pts[0], pts[1], pts[2], carry, false)
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
        assert_eq!(carry.as_ref().unwrap().chunks(), p.data.len().div_ceil(256));
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

    /// Refining a shared step keeps the first layer shared and equals composite Simpson over
    /// 4 and 8 intervals from plain evaluations: f64 to 1e-12, f32 to f32 rounding; with the
    /// start carried from the previous step or evaluated.
    #[test]
    fn refining_a_shared_step_equals_composite_simpson() {
        fn check<T: Real>(tol: f64) {
            let (p, model) = fixture::<T>();
            for (t, carried) in [(3, false), (60, true)] {
                let (a, b) = (theta(&p, t), theta(&p, t + 1));
                let d = crate::lca::difference(&a, &b);
                let at = |s: f64| crate::lca::point::<T>(&a, &d, s);
                let grid: Vec<Vec<Vec<T>>> = (0..=8).map(|j| at(j as f64 / 8.0)).collect();
                let plain: Vec<LossGrad> = grid
                    .iter()
                    .map(|th| run(&model, &p.data, 300, 2, th))
                    .collect();
                let (levels, try_) = on_threads(&model, &p.data, 300, 2, |e| {
                    let mut carry = None;
                    if carried {
                        let prev = points::<T>(&p, t - 1);
                        e.simpson_sharing_first(&prev[0], &prev[1], &prev[2], &mut carry, false)
                            .unwrap();
                    }
                    let s = e
                        .simpson_sharing_first(&grid[0], &grid[4], &grid[8], &mut carry, true)
                        .unwrap();
                    let l4 = e
                        .refine_sharing_first(
                            &grid[0],
                            &grid[8],
                            4,
                            &[0.25, 0.75],
                            &[&grid[2], &grid[6]],
                            &mut carry,
                        )
                        .unwrap();
                    let l8 = e
                        .refine_sharing_first(
                            &grid[0],
                            &grid[8],
                            8,
                            &[0.125, 0.375, 0.625, 0.875],
                            &[&grid[1], &grid[3], &grid[5], &grid[7]],
                            &mut carry,
                        )
                        .unwrap();
                    (vec![l4, l8], s)
                });
                let [e, m] = try_.parts.clone().unwrap();
                for (li, (n, w)) in [
                    (4usize, [1.0, 4.0, 2.0, 4.0, 1.0].as_slice()),
                    (8, &[1.0, 4.0, 2.0, 4.0, 2.0, 4.0, 2.0, 4.0, 1.0]),
                ]
                .into_iter()
                .enumerate()
                {
                    let step = 8 / n;
                    let oracle: Vec<Vec<f64>> = (0..model.params.len())
                        .map(|j| {
                            (0..model.params[j].numel())
                                .map(|k| {
                                    w.iter()
                                        .enumerate()
                                        .map(|(i, wi)| wi * plain[i * step].grads[j][k])
                                        .sum::<f64>()
                                        / (3.0 * n as f64)
                                })
                                .collect()
                        })
                        .collect();
                    // The rest of the network: ends, the try's midpoint, the levels' points.
                    let got: Vec<Vec<f64>> = (0..model.params.len())
                        .map(|j| {
                            let f = &levels[li].first[j];
                            if !f.is_empty() {
                                return f.clone();
                            }
                            (0..model.params[j].numel())
                                .map(|k| {
                                    let (a, b) = if n == 4 {
                                        (m[j][k], levels[0].rest[j][k])
                                    } else {
                                        (m[j][k] + levels[0].rest[j][k], levels[1].rest[j][k])
                                    };
                                    (e[j][k] + 2.0 * a + 4.0 * b) / (3.0 * n as f64)
                                })
                                .collect()
                        })
                        .collect();
                    let err = rel_err(&got, &oracle);
                    assert!(err < tol, "step {t} carried {carried} n {n}: {err:e}");
                    assert!(
                        levels[li].first.iter().any(|f| !f.is_empty())
                            && levels[li].rest.iter().any(|r| !r.is_empty()),
                        "both halves are filled"
                    );
                }
                assert_eq!(try_.loss[0].to_bits(), plain[0].loss.to_bits());
                assert_eq!(try_.loss[2].to_bits(), plain[8].loss.to_bits());
            }
        }
        check::<f64>(1e-12);
        check::<f32>(1e-5);
    }
}
