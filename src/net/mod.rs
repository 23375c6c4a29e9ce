//! The evaluator: a graph of layers with forward and backward passes on CPU.
//!
//! Every layer implements [`Layer`] (one file per layer in this directory, forward and backward
//! side by side, with its finite-difference test). [`Model::build`] turns the spec's layers into
//! a graph, checks that shapes chain and names each layer's parameters by their PyTorch
//! `state_dict` names. [`Model::chunk_loss_grad`] runs forward and backward on one chunk of
//! samples and accumulates the gradient of the chunk's *summed* loss; [`crate::eval`] combines
//! chunks into the full-training-set mean.
//!
//! The element type is generic ([`Real`]): the tool computes in `f32`, the tests also run every
//! layer in `f64` against finite differences.

pub mod activation;
pub mod add;
pub mod attention;
pub mod batch_norm;
pub mod conv;
pub(crate) mod conv3x3;
pub(crate) mod conv_small;
pub mod embedding;
pub mod fastmath;
pub mod gemm;
pub mod input;
pub mod layer_norm;
pub mod linear;
pub mod loss;
pub mod pool;
pub mod registry;
pub mod reshape;
pub(crate) mod scratch;
pub(crate) mod simd;
pub(crate) mod sparse;
pub(crate) mod winograd;

#[cfg(test)]
pub(crate) mod gradcheck;

use crate::error::{LcaError, Result};
use crate::spec::{LayerKind, Spec};
use batch_norm::BnMode;
pub use input::{CodeTable, Codes, Input};
use ndarray::{ArrayD, ArrayViewD, CowArray, IxDyn};
use std::fmt::Debug;

/// Floating-point element type of the evaluator (`f32` in production, `f64` in tests).
pub trait Real:
    ndarray::LinalgScalar
    + num_traits::Float
    + num_traits::FromPrimitive
    + num_traits::ToPrimitive
    + Send
    + Sync
    + Debug
    + Default
    + std::ops::AddAssign
    + std::iter::Sum
    + 'static
{
    /// Convert from f64 (rounding for f32).
    fn of(v: f64) -> Self {
        <Self as num_traits::FromPrimitive>::from_f64(v).unwrap_or_else(Self::nan)
    }
    /// Widen to f64.
    fn f64(self) -> f64 {
        num_traits::ToPrimitive::to_f64(&self).unwrap_or(f64::NAN)
    }
    /// The (f32) input data as this type: borrowed for f32, converted otherwise.
    fn from_input(x: ArrayViewD<'_, f32>) -> CowArray<'_, Self, IxDyn>;
}
impl Real for f32 {
    fn from_input(x: ArrayViewD<'_, f32>) -> CowArray<'_, f32, IxDyn> {
        CowArray::from(x)
    }
}
impl Real for f64 {
    fn from_input(x: ArrayViewD<'_, f32>) -> CowArray<'_, f64, IxDyn> {
        CowArray::from(x.mapv(f64::from))
    }
}

/// A parameter a layer owns: its `state_dict` suffix (`weight`, `bias`) and expected shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamDecl {
    pub suffix: &'static str,
    pub shape: Vec<usize>,
}

/// Values a layer keeps from forward for its backward pass.
#[derive(Debug, Default)]
pub enum Saved<T> {
    #[default]
    None,
    Arrays(Vec<ArrayD<T>>),
    Indices(Vec<usize>),
}

/// Everything a layer's backward pass may read, and where it adds its parameter gradients.
pub struct Backward<'a, T> {
    /// This layer's parameter values, in [`Layer::params`] order.
    pub params: &'a [&'a [T]],
    /// The inputs of forward.
    pub inputs: &'a [ArrayViewD<'a, T>],
    /// The output of forward.
    pub output: ArrayViewD<'a, T>,
    /// What forward saved.
    pub saved: &'a Saved<T>,
    /// Gradient of the loss with respect to the output.
    pub grad_out: ArrayViewD<'a, T>,
    /// Parameter gradients, to be *added to* (`+=`), in [`Layer::params`] order.
    pub grad_params: Vec<&'a mut [T]>,
    /// Which inputs need a gradient (false for the model input and constant branches).
    pub need_input_grad: &'a [bool],
}

/// One layer: its parameters, shape rule, forward and backward.
///
/// Shapes passed to [`Layer::out_shape`] are per sample (no batch axis); arrays passed to
/// forward and backward carry the batch as axis 0.
pub trait Layer<T: Real>: Send + Sync {
    /// Parameters owned by the layer, in a fixed order.
    fn params(&self) -> Vec<ParamDecl> {
        Vec::new()
    }
    /// Buffers the layer reads from the checkpoint (e.g. batch norm's running statistics):
    /// not trained, but inputs of the loss that may change between checkpoints. They follow
    /// the parameters in the slices passed to forward and backward, and backward computes
    /// their gradients too, so that their contribution to ΔL can be reported apart.
    fn buffers(&self) -> Vec<ParamDecl> {
        Vec::new()
    }
    /// Per-sample output shape for the given per-sample input shapes, or why they do not fit.
    fn out_shape(&self, inputs: &[Vec<usize>]) -> std::result::Result<Vec<usize>, String>;
    /// Forward pass over a batch.
    fn forward(&self, params: &[&[T]], inputs: &[ArrayViewD<T>], saved: &mut Saved<T>)
    -> ArrayD<T>;
    /// Backward pass: returns the gradient for each input that needs one (`None` otherwise).
    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>>;
    /// Multiply-adds per sample of forward (for work estimates); 0 when negligible.
    fn macs_per_sample(&self, _inputs: &[Vec<usize>]) -> u64 {
        0
    }
    /// Whether, for fixed inputs, the output is affine in the parameters (`y = A(x)·θ + c(x)`)
    /// **and** backward's parameter gradients depend only on the inputs and `grad_out` (not on
    /// the parameter values, the output or what forward saved). Then the layer's output at any
    /// point of a straight path interpolates its outputs at the ends, and a weighted sum of
    /// its parameter gradients over several points is one backward pass of the weighted sum of
    /// their output gradients: the evaluator shares a first layer with this property between
    /// Simpson's integration points ([`Model::first_layer_shareable`]).
    fn affine_in_params(&self) -> bool {
        false
    }
    /// Whether this layer, reading the model input directly, takes a byte-held chunk `x` as
    /// its bytes ([`Layer::forward_codes`], [`Layer::param_grads_codes`]) instead of their
    /// expanded values. Must depend on the layer and the data set only (not on the chunk), so
    /// that every chunk of a run takes the same path.
    fn takes_codes(&self, _x: &Codes) -> bool {
        false
    }
    /// Forward from a byte-held input (when [`Layer::takes_codes`]); the default expands it.
    fn forward_codes(&self, params: &[&[T]], x: &Codes) -> ArrayD<T> {
        let x = Input::Codes(x.clone());
        let x = x.to_real::<T>();
        self.forward(params, &[x.view()], &mut Saved::None)
    }
    /// Backward's parameter gradients (added to `grad_params`) for a byte-held input that
    /// needs no gradient (when [`Layer::takes_codes`], a layer whose backward reads neither
    /// its output nor what forward saved); the default expands it.
    fn param_grads_codes(
        &self,
        params: &[&[T]],
        x: &Codes,
        grad_out: ArrayViewD<T>,
        grad_params: Vec<&mut [T]>,
    ) {
        let x = Input::Codes(x.clone());
        let x = x.to_real::<T>();
        let out = ArrayD::<T>::zeros(IxDyn(&[0]));
        self.backward(Backward {
            params,
            inputs: &[x.view()],
            output: out.view(),
            saved: &Saved::None,
            grad_out,
            grad_params,
            need_input_grad: &[false],
        });
    }
    /// Check the values of the model input when this layer reads it directly (e.g. that token
    /// ids are integers within the embedding), naming the first offending sample and position.
    fn check_model_input(&self, _x: ArrayViewD<'_, f32>) -> std::result::Result<(), String> {
        Ok(())
    }
    /// Whether the layer has no parameters and the gradient of each of its inputs is the
    /// gradient of its output, unchanged (a plain sum: [`add::Add`]). The executor then hands
    /// the output's gradient on without calling [`Layer::backward`] (which must still return
    /// copies of `grad_out`): moved to the first input whose gradient it starts, added into
    /// those that already have one, copied only for further inputs
    /// ([`Model::chunk_pass`]'s `pass_gradient_on`).
    fn passes_gradient_through(&self) -> bool {
        false
    }
    /// Whether the layer evaluates `relu(layer(x))` in one pass ([`Layer::forward_relu`],
    /// [`Layer::backward_relu`]): the executor then fuses a ReLU that is this layer's only
    /// reader into it. Such a layer's backward must not read its own output.
    fn fuses_relu(&self) -> bool {
        false
    }
    /// `relu(forward(..))`, the same bits as forward followed by the ReLU layer (ReLU maps
    /// NaN to 0 as [`activation::Activation::Relu`] does).
    fn forward_relu(
        &self,
        params: &[&[T]],
        inputs: &[ArrayViewD<T>],
        saved: &mut Saved<T>,
    ) -> ArrayD<T> {
        let mut y = self.forward(params, inputs, saved);
        y.mapv_inplace(|v| if v > T::zero() { v } else { T::zero() });
        y
    }
    /// Backward of `relu ∘ layer`: `grad_out` is the gradient with respect to the ReLU's
    /// output and `output` that output ([`Layer::forward_relu`]'s). The default masks the
    /// gradient where the output is not positive and runs [`Layer::backward`].
    fn backward_relu(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        let mut g = b.grad_out.to_owned();
        g.zip_mut_with(&b.output, |g, &y| {
            if y <= T::zero() {
                *g = T::zero()
            }
        });
        self.backward(Backward {
            grad_out: g.view(),
            ..b
        })
    }
}

/// Where a node reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    /// The model input (the data).
    Input,
    /// The output of node `i`.
    Node(usize),
}

/// A node of the graph: a layer, its inputs and its parameters.
pub struct Node<T: Real> {
    pub name: String,
    pub type_name: &'static str,
    pub layer: Box<dyn Layer<T>>,
    pub inputs: Vec<Src>,
    /// Indices into [`Model::params`], in the layer's [`Layer::params`] order.
    pub param_ids: Vec<usize>,
    pub in_shapes: Vec<Vec<usize>>,
    pub out_shape: Vec<usize>,
    /// Whether any parameter upstream (or here) influences this node's output.
    pub depends_on_params: bool,
    /// This node also applies node `i + 1`, a ReLU that is its only reader
    /// ([`Layer::fuses_relu`]): node `i + 1` then passes values and gradients through.
    pub fuses_next_relu: bool,
}

impl<T: Real> Node<T> {
    /// This node's parameter values in `theta` (all of the model's tensors), in its layer's
    /// [`Layer::params`] order.
    pub fn param_slices<'a>(&self, theta: &'a [Vec<T>]) -> Vec<&'a [T]> {
        self.param_ids
            .iter()
            .map(|&j| theta[j].as_slice())
            .collect()
    }
}

/// A parameter tensor of the model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ParamInfo {
    /// Full `state_dict` name, e.g. `fc1.weight`.
    pub name: String,
    /// Name of the layer that owns it (`fc1`).
    pub layer: String,
    /// The suffix (`weight`, `bias`, `running_mean`).
    pub role: String,
    pub shape: Vec<usize>,
    /// A buffer (not trained), not a parameter: its LCA is reported in the "buffers" group.
    pub buffer: bool,
    /// Other `state_dict` names of the same tensor (weight tying: `lm_head.weight` for
    /// `transformer.wte.weight`). A checkpoint may store it under any of them.
    pub aliases: Vec<String>,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether a checkpoint tensor of this name holds this parameter (its name or an alias).
    pub fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.iter().any(|a| a == name)
    }

    /// The group this tensor's LCA is reported under: its layer, or `buffers` for buffers.
    pub fn group(&self) -> &str {
        if self.buffer { "buffers" } else { &self.layer }
    }
}

/// The loss applied to the last node's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    CrossEntropy,
    Mse,
}

/// Targets for one chunk.
#[derive(Debug, Clone)]
pub enum TargetsView<'a> {
    /// Class indices, one per output row.
    Classes(&'a [u32]),
    /// Float targets with the output's shape.
    Values(ArrayViewD<'a, f32>),
}

/// A built model: the graph, its parameters and its loss.
pub struct Model<T: Real> {
    pub nodes: Vec<Node<T>>,
    pub params: Vec<ParamInfo>,
    pub loss: LossKind,
    pub input_shape: Vec<usize>,
    /// Tensors that `tied` tables name but no layer owns: they must be in the checkpoints.
    pub external_tied: Vec<ExternalTied>,
}

/// A `tied` name that no layer of the spec owns.
#[derive(Debug, Clone)]
pub struct ExternalTied {
    pub layer: String,
    pub role: String,
    pub name: String,
    /// The spec line of the layer whose `tied` table names it.
    pub line: Option<usize>,
}

/// A shape as the error messages write it: `3×32×32`, or `scalar`.
fn shape_text(shape: &[usize]) -> String {
    if shape.is_empty() {
        "scalar".into()
    } else {
        shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("×")
    }
}

impl<T: Real> Model<T> {
    /// Build the graph from the spec for inputs of the given per-sample shape, checking that
    /// every layer's input shape fits before any computation.
    pub fn build(spec: &Spec, input_shape: &[usize]) -> Result<Model<T>> {
        Self::build_with(spec, input_shape, true)
    }

    /// [`Model::build`], with the equivalent reordering of `relu → max_pool2d` and the fused
    /// ReLUs ([`Node::fuses_next_relu`]) optional (off only to test that they change nothing).
    pub(crate) fn build_with(
        spec: &Spec,
        input_shape: &[usize],
        reorder: bool,
    ) -> Result<Model<T>> {
        let mut nodes: Vec<Node<T>> = Vec::new();
        let mut params: Vec<ParamInfo> = Vec::new();
        let mut param_index: std::collections::HashMap<String, usize> =
            std::collections::HashMap::new();
        let mut index_of = std::collections::HashMap::new();
        let mut own_names = std::collections::HashSet::new();
        let has_bn = spec.layers.iter().any(|l| {
            matches!(
                l.kind,
                LayerKind::BatchNorm1d(_) | LayerKind::BatchNorm2d(_)
            )
        });
        if has_bn && spec.model.batch_norm.is_none() {
            return Err(LcaError::Spec {
                path: spec.path.clone(),
                line: None,
                msg: "the model has batch norm layers: choose how they normalise with `[model] batch_norm = \"batch-stats\"` (statistics of each evaluation chunk, as the LCA study) or `\"running-stats\"` (the checkpoints' running_mean/running_var, as model.eval())".into(),
            });
        }
        for (i, ls) in spec.layers.iter().enumerate() {
            let layer = registry::build_layer::<T>(&ls.kind, spec.model.batch_norm);
            let where_ = format!(
                "layer '{}' ({}, {}:{})",
                ls.name,
                ls.kind.type_name(),
                spec.path.display(),
                ls.line
            );
            let inputs: Vec<Src> = if ls.input.is_empty() {
                if i == 0 {
                    vec![Src::Input]
                } else {
                    vec![Src::Node(i - 1)]
                }
            } else {
                let mut v = Vec::new();
                for name in &ls.input {
                    if name == "input" {
                        v.push(Src::Input);
                    } else if let Some(&j) = index_of.get(name.as_str()) {
                        v.push(Src::Node(j));
                    } else if spec.layers.iter().any(|l| &l.name == name) {
                        return Err(LcaError::Model(format!(
                            "{where_}: input '{name}' is defined after this layer; layers must be listed in evaluation order"
                        )));
                    } else {
                        return Err(LcaError::Model(format!(
                            "{where_}: input '{name}' is not a layer of the spec"
                        )));
                    }
                }
                v
            };
            let in_shapes: Vec<Vec<usize>> = inputs
                .iter()
                .map(|s| match s {
                    Src::Input => input_shape.to_vec(),
                    Src::Node(j) => nodes[*j].out_shape.clone(),
                })
                .collect();
            let out_shape = layer.out_shape(&in_shapes).map_err(|msg| {
                let from = inputs
                    .iter()
                    .zip(&in_shapes)
                    .map(|(s, sh)| match s {
                        Src::Input => format!("the model input gives {}", shape_text(sh)),
                        Src::Node(j) => {
                            format!("layer '{}' gives {}", nodes[*j].name, shape_text(sh))
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                LcaError::Model(format!("{where_}: {msg}, but {from}"))
            })?;
            let mut param_ids = Vec::new();
            let decls: Vec<(ParamDecl, bool)> = layer
                .params()
                .into_iter()
                .map(|d| (d, false))
                .chain(layer.buffers().into_iter().map(|d| (d, true)))
                .collect();
            if let Some((suffix, _)) = ls
                .tied
                .iter()
                .find(|(s, _)| !decls.iter().any(|(d, _)| d.suffix == s))
            {
                return Err(LcaError::Spec {
                    path: spec.path.clone(),
                    line: Some(ls.line),
                    msg: format!(
                        "layer '{}': `tied.{suffix}` is not a parameter of a {} layer (it has: {})",
                        ls.name,
                        ls.kind.type_name(),
                        decls
                            .iter()
                            .map(|(d, _)| d.suffix)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            for (decl, buffer) in decls {
                let own = spec.param_name(&ls.name, decl.suffix);
                own_names.insert(own.clone());
                let name = match ls.tied.iter().find(|(s, _)| s == decl.suffix) {
                    Some((_, target)) => format!("{}{target}", spec.model.prefix),
                    None => own.clone(),
                };
                if let Some(&j) = param_index.get(&name) {
                    if params[j].shape != decl.shape {
                        return Err(LcaError::Model(format!(
                            "{where_}: parameter '{name}' is shared with another layer with shape {} but here needs {}",
                            shape_text(&params[j].shape),
                            shape_text(&decl.shape)
                        )));
                    }
                    if param_ids.contains(&j) {
                        return Err(LcaError::Model(format!(
                            "{where_}: uses parameter '{name}' twice; a layer's parameters must be distinct tensors"
                        )));
                    }
                    if own != name && !params[j].aliases.contains(&own) {
                        params[j].aliases.push(own);
                    }
                    param_ids.push(j);
                } else {
                    params.push(ParamInfo {
                        name: name.clone(),
                        layer: ls.name.clone(),
                        role: decl.suffix.to_string(),
                        shape: decl.shape.clone(),
                        buffer,
                        aliases: if own != name { vec![own] } else { vec![] },
                    });
                    param_index.insert(name.clone(), params.len() - 1);
                    param_ids.push(params.len() - 1);
                }
            }
            let depends_on_params = !param_ids.is_empty()
                || inputs.iter().any(|s| match s {
                    Src::Input => false,
                    Src::Node(j) => nodes[*j].depends_on_params,
                });
            index_of.insert(ls.name.as_str(), i);
            nodes.push(Node {
                name: ls.name.clone(),
                type_name: ls.kind.type_name(),
                layer,
                inputs,
                param_ids,
                in_shapes,
                out_shape,
                depends_on_params,
                fuses_next_relu: false,
            });
        }
        // A tensor a `tied` table names that no layer owns (a weight used functionally, e.g.
        // `F.linear(h, self.proj.weight)`) must be stored in the checkpoints: checked against
        // them when they are read (`analyze::prepare`), so that a typo is an error rather than
        // a new, untied parameter.
        let external_tied = params
            .iter()
            .filter(|p| !own_names.contains(&p.name))
            .map(|p| ExternalTied {
                layer: p.layer.clone(),
                role: p.role.clone(),
                name: p.name.clone(),
                line: spec
                    .layers
                    .iter()
                    .find(|l| l.name == p.layer)
                    .map(|l| l.line),
            })
            .collect();
        let loss = match spec.loss {
            crate::spec::LossSpec::CrossEntropy {} => LossKind::CrossEntropy,
            crate::spec::LossSpec::Mse {} => LossKind::Mse,
        };
        if params.iter().all(|p| p.buffer) {
            return Err(LcaError::Model(
                "the model has no parameters: there is nothing to allocate the loss change to"
                    .into(),
            ));
        }
        if reorder {
            pool_before_relu(&mut nodes);
            fuse_relus(&mut nodes);
        }
        Ok(Model {
            nodes,
            params,
            loss,
            input_shape: input_shape.to_vec(),
            external_tied,
        })
    }

    /// Shape of the model output per sample.
    pub fn output_shape(&self) -> &[usize] {
        // A model without nodes holds only the parameter list of a foreign engine's model.
        self.nodes.last().map_or(&[], |n| &n.out_shape)
    }

    /// Number of trained parameter values (buffers not counted).
    pub fn num_params(&self) -> usize {
        self.params
            .iter()
            .filter(|p| !p.buffer)
            .map(|p| p.numel())
            .sum()
    }

    /// Number of buffer values read from checkpoints (batch norm's running statistics in
    /// `running-stats` mode).
    pub fn num_buffer_values(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.buffer)
            .map(|p| p.numel())
            .sum()
    }

    /// Check the model input's values with every layer that reads it directly (token ids
    /// within their embedding, ...): the first problem, naming the layer, sample and position.
    pub fn check_input(&self, x: ArrayViewD<'_, f32>) -> std::result::Result<(), String> {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.inputs.contains(&Src::Input) {
                node.layer.check_model_input(x.view()).map_err(|m| {
                    format!(
                        "layer '{}' ({}, #{}): {m}",
                        node.name,
                        node.type_name,
                        i + 1
                    )
                })?;
            }
        }
        Ok(())
    }

    /// Multiply-adds of one forward pass per sample.
    pub fn macs_per_sample(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.layer.macs_per_sample(&n.in_shapes))
            .sum()
    }

    /// Whether node 0 can be shared between integration points: it reads the model input
    /// only, is affine in its parameters ([`Layer::affine_in_params`]), owns parameters that no
    /// other node uses, and has no buffers.
    pub fn first_layer_shareable(&self) -> bool {
        let Some(first) = self.nodes.first() else {
            return false;
        };
        first.inputs == [Src::Input]
            && first.layer.affine_in_params()
            && !first.param_ids.is_empty()
            && first.param_ids.iter().all(|&j| !self.params[j].buffer)
            && self.nodes[1..]
                .iter()
                .all(|n| n.param_ids.iter().all(|j| !first.param_ids.contains(j)))
    }

    /// The byte-held input when node `i` reads it as bytes: its only input is the model
    /// input, it applies no fused ReLU, and its layer takes the bytes ([`Layer::takes_codes`]).
    fn codes_for<'x, 'a>(&self, i: usize, x: &'x Input<'a>) -> Option<&'x Codes<'a>> {
        let Input::Codes(c) = x else { return None };
        let node = &self.nodes[i];
        (node.inputs == [Src::Input] && !node.fuses_next_relu && node.layer.takes_codes(c))
            .then_some(c)
    }

    /// Node 0's output for one chunk at parameters `theta` (for [`Model::chunk_loss_grad_after_first`]).
    pub fn first_output<'x>(&self, theta: &[Vec<T>], x: impl Into<Input<'x>>) -> ArrayD<T> {
        let x = x.into();
        let node = &self.nodes[0];
        let p = node.param_slices(theta);
        if let Some(c) = self.codes_for(0, &x) {
            return node.layer.forward_codes(&p, c);
        }
        let x = x.to_real::<T>();
        node.layer.forward(&p, &[x.view()], &mut Saved::None)
    }

    /// Adds node 0's parameter gradients for the output gradient `grad_first` to `grads`
    /// (for a shareable first layer they do not depend on the parameter values; `theta` only
    /// fills the call).
    pub fn first_param_grad<'x>(
        &self,
        theta: &[Vec<T>],
        x: impl Into<Input<'x>>,
        output: ArrayViewD<T>,
        grad_first: ArrayViewD<T>,
        grads: &mut [Vec<T>],
    ) {
        let x = x.into();
        let node = &self.nodes[0];
        let p = node.param_slices(theta);
        let gp = disjoint_mut(grads, &node.param_ids);
        if let Some(c) = self.codes_for(0, &x) {
            node.layer.param_grads_codes(&p, c, grad_first, gp);
            return;
        }
        let x = x.to_real::<T>();
        node.layer.backward(Backward {
            params: &p,
            inputs: &[x.view()],
            output,
            saved: &Saved::None,
            grad_out: grad_first,
            grad_params: gp,
            need_input_grad: &[false],
        });
    }

    /// Forward and backward over one chunk. Adds the gradient of the chunk's **summed** loss
    /// to `grads` (one buffer per parameter tensor, model order) and returns the summed loss
    /// and the number of loss terms it contains.
    pub fn chunk_loss_grad<'x>(
        &self,
        theta: &[Vec<T>],
        x: impl Into<Input<'x>>,
        y: TargetsView,
        grads: &mut [Vec<T>],
    ) -> (f64, usize) {
        let (loss, count, _) = self.chunk_pass(theta, x.into(), y, grads, None);
        (loss, count)
    }

    /// As [`Model::chunk_loss_grad`], with node 0's output given (`first`) instead of computed,
    /// and node 0's backward pass left out: node 0's parameters get no gradient; the gradient
    /// of the chunk's summed loss with respect to `first` is returned instead.
    pub fn chunk_loss_grad_after_first<'x>(
        &self,
        theta: &[Vec<T>],
        x: impl Into<Input<'x>>,
        y: TargetsView,
        first: ArrayViewD<T>,
        grads: &mut [Vec<T>],
    ) -> (f64, usize, ArrayD<T>) {
        let shape = first.shape().to_vec();
        let (loss, count, g) = self.chunk_pass(theta, x.into(), y, grads, Some(first));
        let g = g.unwrap_or_else(|| ArrayD::zeros(IxDyn(&shape)));
        (loss, count, g)
    }

    fn chunk_pass(
        &self,
        theta: &[Vec<T>],
        x: Input,
        y: TargetsView,
        grads: &mut [Vec<T>],
        first: Option<ArrayViewD<T>>,
    ) -> (f64, usize, Option<ArrayD<T>>) {
        let n = self.nodes.len();
        let given = first.is_some();
        // Bytes are expanded only when a node that runs reads the model input.
        // Nodes that read a byte-held input as bytes (`codes[i]`).
        let codes: Vec<Option<&Codes>> = (0..n).map(|i| self.codes_for(i, &x)).collect();
        let reads_input = self.nodes.iter().enumerate().any(|(i, node)| {
            !(i == 0 && given) && codes[i].is_none() && node.inputs.contains(&Src::Input)
        });
        let xr = if reads_input {
            x.to_real::<T>()
        } else {
            CowArray::from(ArrayD::<T>::zeros(IxDyn(&[0])))
        };
        let mut outs: Vec<ArrayD<T>> = Vec::with_capacity(n);
        let mut saved: Vec<Saved<T>> = Vec::with_capacity(n);
        // The output of node j (node 0's may be given).
        fn output<'a, T>(
            outs: &'a [ArrayD<T>],
            first: &'a Option<ArrayViewD<'_, T>>,
            j: usize,
        ) -> ArrayViewD<'a, T> {
            match (first, j) {
                (Some(f), 0) => f.view(),
                _ => outs[j].view(),
            }
        }
        let xv = xr.view();
        // The inputs of a node: the chunk's inputs or earlier nodes' outputs.
        fn inputs_of<'a, T: Real>(
            node: &Node<T>,
            x: &ArrayViewD<'a, T>,
            outs: &'a [ArrayD<T>],
            first: &'a Option<ArrayViewD<'_, T>>,
        ) -> Vec<ArrayViewD<'a, T>> {
            node.inputs
                .iter()
                .map(|s| match s {
                    Src::Input => x.clone(),
                    Src::Node(j) => output(outs, first, *j),
                })
                .collect()
        }
        // The output of a node that applied the next node's ReLU: that node's output.
        let mut fused_out = None;
        for (i, node) in self.nodes.iter().enumerate() {
            if i == 0 && given {
                outs.push(ArrayD::zeros(IxDyn(&[0])));
                saved.push(Saved::None);
                continue;
            }
            if let Some(y) = fused_out.take() {
                outs.push(y);
                saved.push(Saved::None);
                continue;
            }
            let p = node.param_slices(theta);
            if let Some(c) = codes[i] {
                outs.push(node.layer.forward_codes(&p, c));
                saved.push(Saved::None);
                continue;
            }
            let ins = inputs_of(node, &xv, &outs, &first);
            let mut sv = Saved::None;
            if node.fuses_next_relu {
                fused_out = Some(node.layer.forward_relu(&p, &ins, &mut sv));
                // Read by nobody: the ReLU node was its only reader.
                outs.push(ArrayD::zeros(IxDyn(&[0])));
            } else {
                outs.push(node.layer.forward(&p, &ins, &mut sv));
            }
            saved.push(sv);
        }
        let (loss_sum, count, g_last) =
            loss::loss_sum_and_grad(self.loss, output(&outs, &first, n - 1), y);
        let mut gouts: Vec<Option<ArrayD<T>>> = (0..n).map(|_| None).collect();
        gouts[n - 1] = Some(g_last);
        for i in (0..n).rev() {
            if i == 0 && given {
                return (loss_sum, count, gouts[0].take());
            }
            let node = &self.nodes[i];
            if !node.depends_on_params {
                continue;
            }
            let Some(g) = gouts[i].take() else { continue };
            if i > 0 && self.nodes[i - 1].fuses_next_relu {
                // A fused ReLU: node i − 1's backward takes the gradient of its output.
                gouts[i - 1] = Some(g);
                continue;
            }
            if let Some(c) = codes[i] {
                // Its only input is the model input, which needs no gradient.
                let p = node.param_slices(theta);
                let gp = disjoint_mut(grads, &node.param_ids);
                node.layer.param_grads_codes(&p, c, g.view(), gp);
                if i > 0 || !given {
                    outs[i] = ArrayD::zeros(IxDyn(&[0]));
                }
                continue;
            }
            let need: Vec<bool> = node
                .inputs
                .iter()
                .map(|s| match s {
                    Src::Input => false,
                    Src::Node(j) => self.nodes[*j].depends_on_params,
                })
                .collect();
            let fused = node.fuses_next_relu;
            // A plain sum's input gradients are `g` itself: handed on below, not copied.
            let passes = !fused && node.layer.passes_gradient_through();
            let gin = if passes {
                Vec::new()
            } else {
                let p = node.param_slices(theta);
                let ins = inputs_of(node, &xv, &outs, &first);
                let b = Backward {
                    params: &p,
                    inputs: &ins,
                    output: output(&outs, &first, i + usize::from(fused)),
                    saved: &saved[i],
                    grad_out: g.view(),
                    grad_params: disjoint_mut(grads, &node.param_ids),
                    need_input_grad: &need,
                };
                if fused {
                    node.layer.backward_relu(b)
                } else {
                    node.layer.backward(b)
                }
            };
            // Every reader of node i's output has a larger index and is done: free it and
            // what forward saved, to hold fewer chunk-sized arrays at once.
            saved[i] = Saved::None;
            if i > 0 || !given {
                outs[i] = ArrayD::zeros(IxDyn(&[0]));
            }
            if fused {
                outs[i + 1] = ArrayD::zeros(IxDyn(&[0]));
            }
            if passes {
                pass_gradient_on(&mut gouts, &node.inputs, &need, g);
                continue;
            }
            for (s, gi) in node.inputs.iter().zip(gin) {
                if let (Src::Node(j), Some(gi)) = (s, gi) {
                    match &mut gouts[*j] {
                        Some(acc) => add::accumulate(acc, &gi),
                        slot @ None => *slot = Some(gi),
                    }
                }
            }
        }
        (loss_sum, count, None)
    }
}

/// The input gradients of a layer that [passes its gradient through](Layer::passes_gradient_through),
/// `g` for every input that needs one, into `gouts` as the executor adds up gradients: the
/// same operations as for the copies its backward returns (a slot still empty takes the
/// value, a filled one gets `g` added with [`add::accumulate`], inputs in order), so the same
/// bits, without copying `g` for the last input that needs it.
fn pass_gradient_on<T: Real>(
    gouts: &mut [Option<ArrayD<T>>],
    inputs: &[Src],
    need: &[bool],
    g: ArrayD<T>,
) {
    let last = need.iter().rposition(|&n| n);
    let mut g = Some(g);
    for (k, s) in inputs.iter().enumerate() {
        let (Src::Node(j), true) = (*s, need[k]) else {
            continue;
        };
        let gk = g.as_ref().expect("kept until the last input that needs it");
        match &mut gouts[j] {
            Some(acc) => add::accumulate(acc, gk),
            slot @ None if Some(k) == last => *slot = g.take(),
            slot @ None => *slot = Some(gk.clone()),
        }
    }
}

/// A new array of `shape` whose elements `fill` writes, without clearing it first (the
/// evaluator's largest arrays are written in full right away, and clearing them cost ~8 % of a
/// LeNet gradient).
///
/// # Safety
/// `fill` must write every element of the slice it is given.
pub(crate) unsafe fn filled<T: Real>(
    shape: &[usize],
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>]),
) -> ArrayD<T> {
    let mut a = ArrayD::<T>::uninit(IxDyn(shape));
    fill(a.as_slice_mut().expect("a fresh array is contiguous"));
    // SAFETY: the caller guarantees that `fill` initialised every element.
    unsafe { a.assume_init() }
}

/// Evaluate `relu → max_pool2d` as `max_pool2d → relu` where the ReLU's output feeds only the
/// pool: the two commute (max and x ↦ max(x, 0) are both monotone, and a window whose maximum
/// is ≤ 0 gets a zero gradient either way), so values and gradients are the same bits, and the
/// ReLU then runs on a quarter of the values (for 2×2 pooling). Names stay with their
/// positions, so a layer that reads the pool's name still gets relu(pool(x)).
fn pool_before_relu<T: Real>(nodes: &mut [Node<T>]) {
    // Whether node i is read by a node other than i + 1, computed once (a scan per node made
    // building a deep model quadratic in its depth).
    let mut read_elsewhere_by = vec![false; nodes.len()];
    for (j, n) in nodes.iter().enumerate() {
        for s in &n.inputs {
            if let Src::Node(k) = *s
                && j != k + 1
            {
                read_elsewhere_by[k] = true;
            }
        }
    }
    for i in 0..nodes.len().saturating_sub(1) {
        let read_elsewhere = read_elsewhere_by[i];
        if nodes[i].type_name != "relu"
            || nodes[i + 1].type_name != "max_pool2d"
            || nodes[i + 1].inputs != [Src::Node(i)]
            || nodes[i].inputs.len() != 1
            || read_elsewhere
        {
            continue;
        }
        let (a, b) = nodes.split_at_mut(i + 1);
        let (relu, pool) = (&mut a[i], &mut b[0]);
        std::mem::swap(&mut relu.layer, &mut pool.layer);
        std::mem::swap(&mut relu.type_name, &mut pool.type_name);
        // Position i now pools the ReLU's input; position i + 1 applies the ReLU to that.
        relu.out_shape = pool.out_shape.clone();
        pool.in_shapes = vec![pool.out_shape.clone()];
    }
}

/// Mark the nodes that apply the next node's ReLU themselves ([`Node::fuses_next_relu`]):
/// a layer that [fuses ReLUs](Layer::fuses_relu), followed by a ReLU that reads only it and is
/// its only reader. Node 0 is left alone (its output may be given, shared between integration
/// points).
fn fuse_relus<T: Real>(nodes: &mut [Node<T>]) {
    let mut readers = vec![0usize; nodes.len()];
    for n in nodes.iter() {
        for s in &n.inputs {
            if let Src::Node(k) = *s {
                readers[k] += 1;
            }
        }
    }
    for i in 1..nodes.len().saturating_sub(1) {
        if nodes[i].layer.fuses_relu()
            && !nodes[i - 1].fuses_next_relu
            && nodes[i + 1].type_name == "relu"
            && nodes[i + 1].inputs == [Src::Node(i)]
            && readers[i] == 1
        {
            nodes[i].fuses_next_relu = true;
        }
    }
}

/// Test helper: `layer.forward_relu` / `layer.backward_relu` against `layer` followed by the
/// ReLU layer, in two passes each: the same bits of output, input gradients and parameter
/// gradients. Returns the fraction of outputs the ReLU zeroed (so that a test can check that
/// its data exercise the mask).
#[cfg(test)]
pub(crate) fn check_fused_relu<T: Real>(
    layer: &dyn Layer<T>,
    params: &[Vec<T>],
    inputs: &[ArrayD<T>],
    gy: &ArrayD<T>,
) -> f64 {
    let relu = activation::Activation::Relu;
    let pr: Vec<&[T]> = params.iter().map(|v| v.as_slice()).collect();
    let ins: Vec<ArrayViewD<T>> = inputs.iter().map(|a| a.view()).collect();
    let need = vec![true; inputs.len()];
    let zeros = || -> Vec<Vec<T>> { params.iter().map(|v| vec![T::zero(); v.len()]).collect() };
    // Unfused: the layer, then the ReLU layer.
    let mut s1 = Saved::None;
    let z = layer.forward(&pr, &ins, &mut s1);
    let r1 = relu.forward(&[], &[z.view()], &mut Saved::None);
    let gz = relu
        .backward(Backward {
            params: &[],
            inputs: &[z.view()],
            output: r1.view(),
            saved: &Saved::None,
            grad_out: gy.view(),
            grad_params: Vec::new(),
            need_input_grad: &[true],
        })
        .remove(0)
        .expect("the ReLU's input gradient");
    let mut g1 = zeros();
    let gx1 = layer.backward(Backward {
        params: &pr,
        inputs: &ins,
        output: z.view(),
        saved: &s1,
        grad_out: gz.view(),
        grad_params: g1.iter_mut().map(|v| v.as_mut_slice()).collect(),
        need_input_grad: &need,
    });
    // Fused.
    let mut s2 = Saved::None;
    let r2 = layer.forward_relu(&pr, &ins, &mut s2);
    let mut g2 = zeros();
    let gx2 = layer.backward_relu(Backward {
        params: &pr,
        inputs: &ins,
        output: r2.view(),
        saved: &s2,
        grad_out: gy.view(),
        grad_params: g2.iter_mut().map(|v| v.as_mut_slice()).collect(),
        need_input_grad: &need,
    });
    let bits = |a: &mut dyn Iterator<Item = T>| a.map(|v| v.f64().to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&mut r1.iter().copied()),
        bits(&mut r2.iter().copied()),
        "output"
    );
    for (k, (a, b)) in gx1.iter().zip(&gx2).enumerate() {
        let (a, b) = (a.as_ref().expect("gradient"), b.as_ref().expect("gradient"));
        assert_eq!(
            bits(&mut a.iter().copied()),
            bits(&mut b.iter().copied()),
            "input gradient {k}"
        );
    }
    for (k, (a, b)) in g1.iter().zip(&g2).enumerate() {
        assert_eq!(
            bits(&mut a.iter().copied()),
            bits(&mut b.iter().copied()),
            "parameter gradient {k}"
        );
    }
    r2.iter().filter(|&&v| v == T::zero()).count() as f64 / r2.len().max(1) as f64
}

/// Mutable slices of `grads` at the given distinct indices, in that order.
fn disjoint_mut<'a, T>(grads: &'a mut [Vec<T>], ids: &[usize]) -> Vec<&'a mut [T]> {
    let mut slots: Vec<Option<&'a mut [T]>> =
        grads.iter_mut().map(|g| Some(g.as_mut_slice())).collect();
    ids.iter()
        .map(|&j| slots[j].take().expect("a layer lists each parameter once"))
        .collect()
}

/// Reshape a batch array to 2-D `[rows, last]` (rows = product of the leading axes).
pub(crate) fn as_rows<'a, T>(a: &'a ArrayViewD<'a, T>) -> ndarray::ArrayView2<'a, T> {
    let last = *a.shape().last().unwrap_or(&1);
    let rows = a.len().checked_div(last).unwrap_or(0);
    a.view()
        .into_shape_with_order((rows, last))
        .expect("activations are contiguous")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::Rng;

    const SPEC: &str = r#"
[[layers]]
name = "a"
type = "linear"
in_features = 5
out_features = 6

[[layers]]
type = "tanh"

[[layers]]
name = "b"
type = "linear"
in_features = 6
out_features = 6

[[layers]]
type = "gelu"

[[layers]]
type = "dropout"
p = 0.5

[[layers]]
name = "c"
type = "linear"
in_features = 6
out_features = 4
bias = false

[[layers]]
type = "leaky_relu"
negative_slope = 0.2

[[layers]]
name = "d"
type = "linear"
in_features = 4
out_features = 3

[[layers]]
type = "sigmoid"

[loss]
type = "cross_entropy"

[data]
train = "unused"
"#;

    fn model(src: &str) -> Model<f64> {
        let spec = Spec::parse(src, std::path::Path::new("t.toml")).unwrap();
        Model::build(&spec, &[5]).unwrap()
    }

    fn loss(m: &Model<f64>, theta: &[Vec<f64>], x: &ArrayD<f32>, y: &[u32]) -> f64 {
        let mut g: Vec<Vec<f64>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
        m.chunk_loss_grad(theta, x.view(), TargetsView::Classes(y), &mut g)
            .0
    }

    /// The whole model's backward pass against central differences of its summed loss in f64.
    #[test]
    fn model_gradient_matches_finite_differences() {
        for src in [SPEC.to_string(), SPEC.replace("cross_entropy", "mse")] {
            let m = model(&src);
            let mut rng = Rng::new(7);
            let theta: Vec<Vec<f64>> = m
                .params
                .iter()
                .map(|p| rng.array(&p.shape).into_raw_vec_and_offset().0)
                .collect();
            let x = rng.array(&[6, 5]).mapv(|v| v as f32);
            let y = [0u32, 2, 1, 1, 0, 2];
            let yv = rng.array(&[6, 3]).mapv(|v| v as f32);
            let targets = || {
                if m.loss == LossKind::Mse {
                    TargetsView::Values(yv.view())
                } else {
                    TargetsView::Classes(&y)
                }
            };
            let f = |th: &[Vec<f64>]| {
                let mut g: Vec<Vec<f64>> = th.iter().map(|t| vec![0.0; t.len()]).collect();
                m.chunk_loss_grad(th, x.view(), targets(), &mut g).0
            };
            let mut g: Vec<Vec<f64>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
            let (_, count) = m.chunk_loss_grad(&theta, x.view(), targets(), &mut g);
            assert_eq!(count, if m.loss == LossKind::Mse { 18 } else { 6 });
            let h = 1e-6;
            for (pi, gp) in g.iter().enumerate() {
                for k in 0..gp.len() {
                    let mut p = theta.clone();
                    p[pi][k] += h;
                    let mut q = theta.clone();
                    q[pi][k] -= h;
                    let fd = (f(&p) - f(&q)) / (2.0 * h);
                    assert!(
                        (fd - gp[k]).abs() < 1e-7 * (1.0 + fd.abs()),
                        "{} [{k}]: fd {fd} vs {}",
                        m.params[pi].name,
                        gp[k]
                    );
                }
            }
            let _ = loss;
        }
    }

    /// The bits of a chunk's summed loss and of every gradient, for comparing two builds of
    /// one model.
    fn loss_grad_bits(
        m: &Model<f32>,
        theta: &[Vec<f32>],
        x: &ArrayD<f32>,
        y: &[u32],
    ) -> (u64, Vec<u32>) {
        let mut g: Vec<Vec<f32>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
        let (l, _) = m.chunk_loss_grad(theta, x.view(), TargetsView::Classes(y), &mut g);
        let bits: Vec<u32> = g.iter().flatten().map(|v| v.to_bits()).collect();
        (l.to_bits(), bits)
    }

    /// `relu → max_pool2d` evaluated as `max_pool2d → relu` gives the same bits: loss and every
    /// gradient, on inputs with ties and windows of negative values only.
    #[test]
    fn pooling_before_relu_changes_nothing() {
        let src = r#"
[model]
input_shape = [2, 6, 6]

[[layers]]
name = "conv"
type = "conv2d"
in_channels = 2
out_channels = 3
kernel_size = 3
padding = 1

[[layers]]
type = "relu"

[[layers]]
name = "pool"
type = "max_pool2d"
kernel_size = 2

[[layers]]
type = "flatten"

[[layers]]
name = "fc"
type = "linear"
in_features = 27
out_features = 4

[loss]
type = "cross_entropy"

[data]
train = "unused"
"#;
        let spec = Spec::parse(src, std::path::Path::new("t.toml")).unwrap();
        let shape = [2, 6, 6];
        let a: Model<f32> = Model::build_with(&spec, &shape, true).unwrap();
        let b: Model<f32> = Model::build_with(&spec, &shape, false).unwrap();
        assert_eq!(a.nodes[1].type_name, "max_pool2d");
        assert_eq!(a.nodes[2].type_name, "relu");
        assert_eq!(b.nodes[1].type_name, "relu");
        assert_eq!(a.nodes[2].name, b.nodes[2].name);
        assert_eq!(a.macs_per_sample(), b.macs_per_sample());
        let mut rng = Rng::new(5);
        let theta: Vec<Vec<f32>> = a
            .params
            .iter()
            .map(|p| rng.array(&p.shape).iter().map(|&v| v as f32).collect())
            .collect();
        // Rounded inputs: ties within windows, and many windows whose values are all ≤ 0.
        let x = rng
            .array(&[5, 2, 6, 6])
            .mapv(|v| ((v * 2.0).round() / 2.0) as f32);
        let y = [0u32, 3, 1, 2, 1];
        assert_eq!(
            loss_grad_bits(&a, &theta, &x, &y),
            loss_grad_bits(&b, &theta, &x, &y)
        );
    }

    /// A ResNet block (conv → BN → ReLU → conv → BN → add → ReLU) with the ReLUs fused into
    /// batch norm and the add gives the same bits as without fusion: loss and every gradient,
    /// both batch-norm modes, maps of 8×8 (the f32 kernels' rows) and 3×3.
    #[test]
    fn fused_relus_change_nothing() {
        for (mode, hw) in [("batch-stats", 8), ("running-stats", 8), ("batch-stats", 3)] {
            let src = format!(
                r#"
[model]
input_shape = [2, {hw}, {hw}]
batch_norm = "{mode}"

[[layers]]
name = "conv"
type = "conv2d"
in_channels = 2
out_channels = 3
kernel_size = 3
padding = 1
bias = false

[[layers]]
name = "bn"
type = "batch_norm2d"
num_features = 3

[[layers]]
name = "relu"
type = "relu"

[[layers]]
name = "conv2"
type = "conv2d"
in_channels = 3
out_channels = 3
kernel_size = 3
padding = 1
bias = false

[[layers]]
name = "bn2"
type = "batch_norm2d"
num_features = 3

[[layers]]
name = "add"
type = "add"
input = ["bn2", "relu"]

[[layers]]
name = "relu2"
type = "relu"

[[layers]]
type = "flatten"

[[layers]]
name = "fc"
type = "linear"
in_features = {}
out_features = 4

[loss]
type = "cross_entropy"

[data]
train = "unused"
"#,
                3 * hw * hw
            );
            let spec = Spec::parse(&src, std::path::Path::new("t.toml")).unwrap();
            let shape = [2, hw, hw];
            let a: Model<f32> = Model::build_with(&spec, &shape, true).unwrap();
            let b: Model<f32> = Model::build_with(&spec, &shape, false).unwrap();
            let fused: Vec<&str> = a
                .nodes
                .iter()
                .filter(|n| n.fuses_next_relu)
                .map(|n| n.name.as_str())
                .collect();
            assert_eq!(fused, ["bn", "add"]);
            assert!(b.nodes.iter().all(|n| !n.fuses_next_relu));
            let mut rng = Rng::new(9);
            let theta: Vec<Vec<f32>> = a
                .params
                .iter()
                .map(|p| {
                    let v = rng.array(&p.shape);
                    let v = if p.role == "running_var" {
                        v.mapv(|x| x.abs() + 0.5)
                    } else {
                        v
                    };
                    v.iter().map(|&x| x as f32).collect()
                })
                .collect();
            let x = rng.array(&[5, 2, hw, hw]).mapv(|v| v as f32);
            let y = [0u32, 3, 1, 2, 1];
            assert_eq!(
                loss_grad_bits(&a, &theta, &x, &y),
                loss_grad_bits(&b, &theta, &x, &y),
                "{mode}, {hw}×{hw}"
            );
        }
    }

    /// `add` as it was before [`Layer::passes_gradient_through`]: the executor calls its
    /// backward, which returns a copy of the output's gradient per input.
    struct CopyingAdd;

    impl Layer<f32> for CopyingAdd {
        fn out_shape(&self, inputs: &[Vec<usize>]) -> std::result::Result<Vec<usize>, String> {
            Layer::<f32>::out_shape(&add::Add, inputs)
        }
        fn forward(&self, p: &[&[f32]], x: &[ArrayViewD<f32>], sv: &mut Saved<f32>) -> ArrayD<f32> {
            add::Add.forward(p, x, sv)
        }
        fn backward(&self, b: Backward<'_, f32>) -> Vec<Option<ArrayD<f32>>> {
            add::Add.backward(b)
        }
        fn fuses_relu(&self) -> bool {
            true
        }
        fn forward_relu(
            &self,
            p: &[&[f32]],
            x: &[ArrayViewD<f32>],
            sv: &mut Saved<f32>,
        ) -> ArrayD<f32> {
            add::Add.forward_relu(p, x, sv)
        }
        fn backward_relu(&self, b: Backward<'_, f32>) -> Vec<Option<ArrayD<f32>>> {
            add::Add.backward_relu(b)
        }
    }

    /// `m` with every `add` node replaced by [`CopyingAdd`]; the number of plain (unfused)
    /// adds, whose gradients the executor passes on.
    fn with_copying_adds(m: &mut Model<f32>) -> usize {
        let mut plain = 0;
        for n in m.nodes.iter_mut().filter(|n| n.type_name == "add") {
            assert!(n.layer.passes_gradient_through());
            plain += usize::from(!n.fuses_next_relu);
            n.layer = Box::new(CopyingAdd);
        }
        plain
    }

    /// Passing a plain sum's gradient on without copies gives the same bits as its backward's
    /// copies: the fixture GPT (residual stream: each join's gradient feeds a LayerNorm and
    /// the previous join) and a ResNet-like graph with a fused and unfused join, a join of
    /// three inputs and one reading the same value twice; loss and every gradient.
    #[test]
    fn passing_sum_gradients_on_changes_nothing() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gpt");
        let spec = Spec::load(&dir.join("model.toml")).unwrap();
        let mut rng = Rng::new(11);
        let (seqs, t) = (3, 32);
        let x = rng
            .array(&[seqs, t])
            .mapv(|v| ((v + 1.0) * 40.9).floor() as f32);
        let y: Vec<u32> = (0..seqs * t)
            .map(|_| ((rng.next() + 1.0) * 40.9) as u32)
            .collect();
        let a: Model<f32> = Model::build(&spec, &[t]).unwrap();
        let mut b: Model<f32> = Model::build(&spec, &[t]).unwrap();
        assert!(with_copying_adds(&mut b) >= 3);
        let theta: Vec<Vec<f32>> = a
            .params
            .iter()
            .map(|p| rng.array(&p.shape).iter().map(|&v| v as f32).collect())
            .collect();
        assert_eq!(
            loss_grad_bits(&a, &theta, &x, &y),
            loss_grad_bits(&b, &theta, &x, &y),
            "GPT fixture"
        );

        let src = r#"
[model]
input_shape = [2, 6, 6]

[[layers]]
name = "c1"
type = "conv2d"
in_channels = 2
out_channels = 3
kernel_size = 3
padding = 1

[[layers]]
name = "r1"
type = "relu"

[[layers]]
name = "c2"
type = "conv2d"
in_channels = 3
out_channels = 3
kernel_size = 3
padding = 1

[[layers]]
name = "s1"
type = "add"
input = ["c2", "r1"]

[[layers]]
name = "r2"
type = "relu"

[[layers]]
name = "s2"
type = "add"
input = ["r2", "r2", "r1"]

[[layers]]
type = "flatten"

[[layers]]
name = "fc"
type = "linear"
in_features = 108
out_features = 4

[loss]
type = "cross_entropy"

[data]
train = "unused"
"#;
        let spec = Spec::parse(src, std::path::Path::new("t.toml")).unwrap();
        let shape = [2, 6, 6];
        let x = rng.array(&[5, 2, 6, 6]).mapv(|v| v as f32);
        let y = [0u32, 3, 1, 2, 1];
        for reorder in [true, false] {
            let a: Model<f32> = Model::build_with(&spec, &shape, reorder).unwrap();
            let mut b: Model<f32> = Model::build_with(&spec, &shape, reorder).unwrap();
            let plain = with_copying_adds(&mut b);
            assert_eq!(plain, if reorder { 1 } else { 2 });
            let theta: Vec<Vec<f32>> = a
                .params
                .iter()
                .map(|p| rng.array(&p.shape).iter().map(|&v| v as f32).collect())
                .collect();
            assert_eq!(
                loss_grad_bits(&a, &theta, &x, &y),
                loss_grad_bits(&b, &theta, &x, &y),
                "ResNet-like graph, fused ReLUs {reorder}"
            );
        }
    }

    #[test]
    fn graph_inputs_are_resolved_and_checked() {
        let src = SPEC.replace("name = \"b\"", "name = \"b\"\ninput = \"a\"");
        let m = model(&src);
        assert_eq!(m.nodes[2].inputs, vec![Src::Node(0)]);
        let bad = SPEC.replace("name = \"b\"", "name = \"b\"\ninput = \"zz\"");
        let spec = Spec::parse(&bad, std::path::Path::new("t.toml")).unwrap();
        let e = Model::<f32>::build(&spec, &[5]).err().unwrap().to_string();
        assert!(e.contains("'zz' is not a layer"), "{e}");
        let fwd = SPEC.replace("name = \"b\"", "name = \"b\"\ninput = \"c\"");
        let spec = Spec::parse(&fwd, std::path::Path::new("t.toml")).unwrap();
        let e = Model::<f32>::build(&spec, &[5]).err().unwrap().to_string();
        assert!(e.contains("defined after"), "{e}");
    }

    #[test]
    fn f32_and_f64_models_agree() {
        let spec = Spec::parse(SPEC, std::path::Path::new("t.toml")).unwrap();
        let m64: Model<f64> = Model::build(&spec, &[5]).unwrap();
        let m32: Model<f32> = Model::build(&spec, &[5]).unwrap();
        let mut rng = Rng::new(3);
        let t64: Vec<Vec<f64>> = m64
            .params
            .iter()
            .map(|p| {
                rng.array(&p.shape)
                    .mapv(|v| v as f32 as f64)
                    .into_raw_vec_and_offset()
                    .0
            })
            .collect();
        let t32: Vec<Vec<f32>> = t64
            .iter()
            .map(|v| v.iter().map(|&x| x as f32).collect())
            .collect();
        let x = rng.array(&[9, 5]).mapv(|v| v as f32);
        let y = [0u32, 1, 2, 0, 1, 2, 0, 1, 2];
        let l64 = loss(&m64, &t64, &x, &y);
        let mut g32: Vec<Vec<f32>> = t32.iter().map(|t| vec![0.0; t.len()]).collect();
        let (l32, _) = m32.chunk_loss_grad(&t32, x.view(), TargetsView::Classes(&y), &mut g32);
        assert!((l64 - l32).abs() < 1e-5 * l64.abs(), "{l64} vs {l32}");
    }
}
