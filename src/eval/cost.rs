//! The cost model that decides whether a plain Simpson step shares the first layer between its
//! points ([`super::Evaluator::simpson_sharing_first`]).
//!
//! A step with every point in full costs two evaluations (the midpoint and θ_{t+1}; θ_t is the
//! previous step's end): `2·(F₀ + W₀ + R)`, where `F₀` is node 0's forward, `W₀` its
//! weight-gradient product (its input gradient is never computed) and `R` the forward and
//! backward of every other node and the loss. A shared step computes node 0 once and its weight
//! gradient once, evaluates the rest at the midpoint and θ_{t+1} (what it needs at θ_t, node
//! 0's outputs and output gradients among it, is carried from the previous step), and moves
//! node 0's outputs and output gradients through memory a few more times (the carried ones read
//! back, the midpoint's mean, the weighted sum of the three output gradients):
//! `F₀ + W₀ + 2·R + CARRY·|z₀|`. Sharing pays when the second is clearly below the first,
//! i.e. when node 0 dominates the arithmetic and its output is not wide.
//!
//! Each node's cost is `MAC` per multiply-add plus `ELEM` per value it reads or writes, for its
//! forward, for its weight gradient (nodes with parameters) and for its input gradient (nodes
//! whose input depends on parameters). The constants are in units of one multiply-add of a
//! large f32 matrix product (the loss's per-logit `exp` is priced apart). They were set from
//! single-thread profiles on the 2-core development machine (Intel Xeon, AVX-512: GEMM at
//! ~50 G multiply-adds/s, elementwise passes and small-inner-dimension products ~8× slower per
//! value, libm's f64 `exp` ~250 multiply-adds) and checked against measured step ratios: MNIST-FC
//! shared/unshared 0.73 measured vs 0.68 estimated; the fixtures' MLP and CNNs, where forced
//! sharing measured 1.4–2.5× slower, estimated ≥ 1.2 (docs/performance.md, "Sharing
//! decision"). The decision depends only on the model's shapes, never on a measurement of
//! this run, so it is the same on every machine, thread count, resume and shard: outputs stay
//! byte-identical across them.

use crate::net::{Model, Real, Src};

/// Cost of one multiply-add (the unit).
const MAC: f64 = 1.0;
/// Cost of one value read or written by a pass (activations, packing, im2col, the loss).
const ELEM: f64 = 8.0;
/// Cost of the loss per model output value: cross-entropy takes an f64 `exp` per logit
/// (libm, ~250 multiply-adds' time) plus its passes; it runs at every evaluated point.
const LOSS: f64 = 300.0;
/// Passes over node 0's output that a shared step adds per value: the carried θ_t outputs and
/// output gradients read back from memory, the midpoint's mean (two reads, one write), the
/// weighted sum of the three output gradients (three reads, one write) and keeping θ_{t+1}'s
/// outputs and output gradients.
const CARRY: f64 = 14.0;
/// Share only when the shared step is estimated at most this fraction of the unshared one: a
/// margin for the model's error, so that a borderline model never becomes slower.
const MAX_RATIO: f64 = 0.85;

/// Estimated cost per sample of one plain Simpson step, with and without sharing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    /// Node 0's forward.
    pub first_forward: f64,
    /// Node 0's weight-gradient product.
    pub first_weight_grad: f64,
    /// Forward and backward of every other node, and the loss.
    pub rest: f64,
    /// What a shared step adds by moving node 0's outputs around.
    pub carry: f64,
}

impl StepCost {
    /// The model's estimate (`None` when node 0 cannot be shared at all).
    pub fn of<T: Real>(model: &Model<T>) -> Option<StepCost> {
        if !model.first_layer_shareable() {
            return None;
        }
        let elems = |s: &[usize]| s.iter().product::<usize>() as f64;
        let mut rest = 0.0;
        let mut first = (0.0, 0.0);
        for (i, node) in model.nodes.iter().enumerate() {
            let macs = node.layer.macs_per_sample(&node.in_shapes) as f64;
            let io = node.in_shapes.iter().map(|s| elems(s)).sum::<f64>() + elems(&node.out_shape);
            let pass = MAC * macs + ELEM * io;
            if i == 0 {
                first = (pass, pass);
                continue;
            }
            let weight_grad = if node.param_ids.is_empty() { 0.0 } else { pass };
            let needs_input_grad = node
                .inputs
                .iter()
                .any(|s| matches!(s, Src::Node(j) if model.nodes[*j].depends_on_params));
            // The input gradient also reads the output gradient.
            let input_grad = if needs_input_grad {
                pass + ELEM * elems(&node.out_shape)
            } else {
                0.0
            };
            rest += pass + weight_grad + input_grad;
        }
        // The loss: forward and its gradient over the logits.
        rest += LOSS * elems(model.output_shape());
        Some(StepCost {
            first_forward: first.0,
            first_weight_grad: first.1,
            rest,
            carry: CARRY * ELEM * elems(&model.nodes[0].out_shape),
        })
    }

    /// A step with every point evaluated in full (two evaluations).
    pub fn unshared(&self) -> f64 {
        2.0 * (self.first_forward + self.first_weight_grad + self.rest)
    }

    /// A step with node 0 shared between its three points (θ_t's evaluation carried).
    pub fn shared(&self) -> f64 {
        self.first_forward + self.first_weight_grad + 2.0 * self.rest + self.carry
    }

    /// Whether sharing is estimated to pay, with the safety margin.
    pub fn sharing_pays(&self) -> bool {
        self.shared() <= MAX_RATIO * self.unshared()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Spec;

    fn model(layers: &str, input: &str) -> Model<f32> {
        let text = format!(
            "[model]\ninput_shape = {input}\n{layers}\n[loss]\ntype = \"cross_entropy\"\n\
             [data]\ntrain = \"x.safetensors\"\n"
        );
        let spec = Spec::parse(&text, std::path::Path::new("t.toml")).unwrap();
        let shape: Vec<usize> = spec.model.input_shape.clone().unwrap();
        Model::build(&spec, &shape).unwrap()
    }

    fn linear(name: &str, i: usize, o: usize) -> String {
        format!(
            "[[layers]]\nname = \"{name}\"\ntype = \"linear\"\nin_features = {i}\nout_features = {o}\n"
        )
    }

    const RELU: &str = "[[layers]]\ntype = \"relu\"\n";

    #[test]
    fn a_dominant_first_layer_is_shared_and_a_small_one_is_not() {
        // The study's MNIST-FC: the first layer is ~93 % of the arithmetic (measured: a shared
        // step takes ~0.73 of an unshared one).
        let fc = model(
            &[
                linear("fc1", 784, 100),
                RELU.into(),
                linear("fc2", 100, 50),
                RELU.into(),
                linear("fc3", 50, 10),
            ]
            .concat(),
            "[784]",
        );
        let c = StepCost::of(&fc).unwrap();
        assert!(c.sharing_pays(), "{c:?}");
        assert!(c.shared() / c.unshared() < 0.7, "{c:?}");
        // The fixture MLP 64-32-32-10: the first layer is 60 % of the multiply-adds, and the
        // rest of the network (its elementwise passes, the loss) and the carried arrays eat
        // the saving.
        let mlp = model(
            &[
                linear("fc1", 64, 32),
                RELU.into(),
                linear("fc2", 32, 32),
                RELU.into(),
                linear("fc3", 32, 10),
            ]
            .concat(),
            "[64]",
        );
        assert!(!StepCost::of(&mlp).unwrap().sharing_pays());
        // Like issue 22's CNN: a 1→6 3×3 conv on 8×8 digits, here ~63 % of the multiply-adds
        // (the old threshold, a quarter, shared it; it was ~1.4× slower): the elementwise
        // passes after it and its wide output make sharing a loss.
        let cnn = model(
            "[[layers]]\nname = \"c1\"\ntype = \"conv2d\"\nin_channels = 1\nout_channels = 6\n\
             kernel_size = 3\npadding = 1\n[[layers]]\ntype = \"relu\"\n\
             [[layers]]\ntype = \"max_pool2d\"\nkernel_size = 2\n\
             [[layers]]\nname = \"c2\"\ntype = \"conv2d\"\nin_channels = 6\nout_channels = 8\n\
             kernel_size = 3\nstride = 2\npadding = 1\n[[layers]]\ntype = \"relu\"\n\
             [[layers]]\ntype = \"flatten\"\n[[layers]]\nname = \"fc\"\ntype = \"linear\"\n\
             in_features = 32\nout_features = 10\n",
            "[1, 8, 8]",
        );
        let first = cnn.nodes[0].layer.macs_per_sample(&cnn.nodes[0].in_shapes) as f64;
        assert!(first >= 0.6 * cnn.macs_per_sample() as f64);
        assert!(!StepCost::of(&cnn).unwrap().sharing_pays());
    }

    #[test]
    fn a_first_layer_that_cannot_be_shared_has_no_estimate() {
        let m = model(&[RELU.to_string(), linear("fc", 4, 3)].concat(), "[4]");
        assert_eq!(StepCost::of(&m), None);
    }
}
