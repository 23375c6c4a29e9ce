//! Building a model from a spec and running it: `Spec::parse` on arbitrary text, then
//! `Model::build` for a few input shapes and, where the model is small, one forward and
//! backward pass (`chunk_loss_grad`) on a batch of two samples, in f32 and f64.
//!
//! Besides "never panics": the loss and the gradient buffers have the sizes the model
//! declares, and the number of loss terms is what the targets hold.
#![no_main]

use lca::net::{LossKind, Model, Real, TargetsView};
use lca::spec::Spec;
use libfuzzer_sys::fuzz_target;
use ndarray::{ArrayD, IxDyn};
use std::path::Path;

/// Parameters, inputs and outputs beyond these are not run (the build is still checked).
const MAX_PARAMS: usize = 1 << 16;
const MAX_VALUES: usize = 1 << 12;

fn run<T: Real>(model: &Model<T>, input: &[usize]) {
    const BATCH: usize = 2;
    let out = model.output_shape();
    if model.num_params() > MAX_PARAMS
        || input.iter().product::<usize>() > MAX_VALUES
        || out.iter().product::<usize>() > MAX_VALUES
    {
        return;
    }
    // Small deterministic parameters; inputs 0 (a valid token id for embeddings).
    let theta: Vec<Vec<T>> = model
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (0..p.numel())
                .map(|k| T::of((((i * 31 + k * 17) % 13) as f64 - 6.0) * 0.01))
                .collect()
        })
        .collect();
    let mut grads: Vec<Vec<T>> = theta.iter().map(|v| vec![T::of(0.0); v.len()]).collect();
    let mut shape = vec![BATCH];
    shape.extend_from_slice(input);
    let x = ArrayD::<f32>::zeros(IxDyn(&shape));
    let (loss, terms) = match model.loss {
        LossKind::CrossEntropy => {
            // One class index per output row, class 0.
            let Some((&classes, rows)) = out.split_last() else {
                return;
            };
            if classes == 0 {
                return;
            }
            let y = vec![0u32; BATCH * rows.iter().product::<usize>()];
            let r = model.chunk_loss_grad(&theta, x.view(), TargetsView::Classes(&y), &mut grads);
            assert_eq!(r.1, y.len(), "loss terms");
            r
        }
        LossKind::Mse => {
            let mut yshape = vec![BATCH];
            yshape.extend_from_slice(out);
            let y = ArrayD::<f32>::zeros(IxDyn(&yshape));
            let r = model.chunk_loss_grad(&theta, x.view(), TargetsView::Values(y.view()), &mut grads);
            assert_eq!(r.1, y.len(), "loss terms");
            r
        }
    };
    let _ = (loss, terms);
    for (g, p) in grads.iter().zip(&model.params) {
        assert_eq!(g.len(), p.numel(), "{}", p.name);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = Spec::parse(text, Path::new("runs/model.toml")) else {
        return;
    };
    let declared = spec.model.input_shape.clone();
    let shapes: Vec<Vec<usize>> = declared
        .into_iter()
        .chain([vec![4], vec![8], vec![1, 4, 4], vec![2, 3, 3]])
        .collect();
    for shape in &shapes {
        if let Ok(m) = Model::<f32>::build(&spec, shape) {
            run(&m, shape);
        }
        if let Ok(m) = Model::<f64>::build(&spec, shape) {
            run(&m, shape);
        }
    }
});
