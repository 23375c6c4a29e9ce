//! Finite-difference checks in f64 for layers (test-only).
//!
//! For a layer and random inputs/parameters, compares the backward pass against central
//! differences of a random linear functional of the output, for every parameter entry and every
//! input entry.

use super::{Backward, Layer, Saved};
use ndarray::{ArrayD, IxDyn};

/// What [`run_layer`] returns: the output, the parameter gradients, the input gradients.
pub(crate) type LayerRun<T> = (ArrayD<T>, Vec<Vec<T>>, Vec<Option<ArrayD<T>>>);

/// One forward and one backward pass of `layer` (one input `x`, output gradient `gy`), in any
/// precision: the output, the parameter gradients (added by backward to buffers that start at
/// `g_start`, so that a test can check that gradients are added, not stored) and the input
/// gradients. For tests comparing a layer's paths against each other (f32 kernels against
/// the f64 path, which [`check_layer`] checks against finite differences).
pub(crate) fn run_layer<T: super::Real>(
    layer: &dyn Layer<T>,
    params: &[Vec<T>],
    x: &ArrayD<T>,
    gy: &ArrayD<T>,
    need_x: bool,
    g_start: T,
) -> LayerRun<T> {
    run_layer_fused(layer, params, x, gy, need_x, g_start, false)
}

/// [`run_layer`], with `relu` through the layer's fused ReLU (`forward_relu` and
/// `backward_relu`; `gy` is then the gradient of the ReLU's output).
pub(crate) fn run_layer_fused<T: super::Real>(
    layer: &dyn Layer<T>,
    params: &[Vec<T>],
    x: &ArrayD<T>,
    gy: &ArrayD<T>,
    need_x: bool,
    g_start: T,
    relu: bool,
) -> LayerRun<T> {
    let pr: Vec<&[T]> = params.iter().map(|v| v.as_slice()).collect();
    let mut saved = Saved::None;
    let y = if relu {
        layer.forward_relu(&pr, &[x.view()], &mut saved)
    } else {
        layer.forward(&pr, &[x.view()], &mut saved)
    };
    let mut g: Vec<Vec<T>> = params.iter().map(|v| vec![g_start; v.len()]).collect();
    let b = Backward {
        params: &pr,
        inputs: &[x.view()],
        output: y.view(),
        saved: &saved,
        grad_out: gy.view(),
        grad_params: g.iter_mut().map(|v| v.as_mut_slice()).collect(),
        need_input_grad: &[need_x],
    };
    let gx = if relu {
        layer.backward_relu(b)
    } else {
        layer.backward(b)
    };
    (y, g, gx)
}

/// The largest error of `a` against `b` relative to `b`'s largest magnitude (the tolerance
/// measure of the f32-against-f64 kernel tests).
pub(crate) fn max_rel<A: Copy + Into<f64>>(a: &[A], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x.into() - y).abs()));
    err / scale.max(1e-30)
}

/// Deterministic pseudo-random numbers in [-1, 1) (SplitMix64).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub(crate) fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    pub(crate) fn array(&mut self, shape: &[usize]) -> ArrayD<f64> {
        ArrayD::from_shape_fn(IxDyn(shape), |_| self.next())
    }
}

fn objective(
    layer: &dyn Layer<f64>,
    params: &[Vec<f64>],
    xs: &[ArrayD<f64>],
    w: &ArrayD<f64>,
) -> f64 {
    let p: Vec<&[f64]> = params.iter().map(|v| v.as_slice()).collect();
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let y = layer.forward(&p, &views, &mut Saved::None);
    (&y * w).sum()
}

/// Check `layer`'s backward against central finite differences, with `batch` samples of the
/// given per-sample input shapes. Panics with the offending entry on mismatch.
pub(crate) fn check_layer(layer: &dyn Layer<f64>, in_shapes: &[Vec<usize>], batch: usize) {
    check_layer_with(layer, in_shapes, batch, 1234, &|_, _| {})
}

/// As [`check_layer`], with a hook that may adjust the random inputs (e.g. to avoid kinks).
pub(crate) fn check_layer_with(
    layer: &dyn Layer<f64>,
    in_shapes: &[Vec<usize>],
    batch: usize,
    seed: u64,
    adjust: &dyn Fn(usize, &mut ArrayD<f64>),
) {
    check(layer, in_shapes, batch, seed, adjust, false)
}

/// As [`check_layer_with`] for a layer whose inputs carry no gradient (token ids, or an input
/// whose values the output does not depend on): backward must return `None` for every input,
/// and only the parameter gradients are compared.
pub(crate) fn check_layer_discrete(
    layer: &dyn Layer<f64>,
    in_shapes: &[Vec<usize>],
    batch: usize,
    seed: u64,
    adjust: &dyn Fn(usize, &mut ArrayD<f64>),
) {
    check(layer, in_shapes, batch, seed, adjust, true)
}

fn check(
    layer: &dyn Layer<f64>,
    in_shapes: &[Vec<usize>],
    batch: usize,
    seed: u64,
    adjust: &dyn Fn(usize, &mut ArrayD<f64>),
    discrete: bool,
) {
    let mut rng = Rng::new(seed);
    let out_shape = layer.out_shape(in_shapes).expect("shapes fit");
    let params: Vec<Vec<f64>> = layer
        .params()
        .iter()
        .map(|d| rng.array(&d.shape).into_raw_vec_and_offset().0)
        .collect();
    let xs: Vec<ArrayD<f64>> = in_shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut full = vec![batch];
            full.extend(s);
            let mut a = rng.array(&full);
            adjust(i, &mut a);
            a
        })
        .collect();
    let mut full_out = vec![batch];
    full_out.extend(&out_shape);
    let w = rng.array(&full_out);

    // Analytic gradients.
    let p: Vec<&[f64]> = params.iter().map(|v| v.as_slice()).collect();
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let mut saved = Saved::None;
    let y = layer.forward(&p, &views, &mut saved);
    assert_eq!(y.shape(), &full_out[..], "forward output shape");
    let mut gparams: Vec<Vec<f64>> = params.iter().map(|v| vec![0.0; v.len()]).collect();
    let need = vec![true; xs.len()];
    let gin = layer.backward(Backward {
        params: &p,
        inputs: &views,
        output: y.view(),
        saved: &saved,
        grad_out: w.view(),
        grad_params: gparams.iter_mut().map(|g| g.as_mut_slice()).collect(),
        need_input_grad: &need,
    });

    let h = 1e-6;
    let close = |fd: f64, a: f64| (fd - a).abs() <= 1e-6 * (1.0 + fd.abs().max(a.abs()));
    for (pi, g) in gparams.iter().enumerate() {
        for k in 0..g.len() {
            let mut plus = params.clone();
            plus[pi][k] += h;
            let mut minus = params.clone();
            minus[pi][k] -= h;
            let fd =
                (objective(layer, &plus, &xs, &w) - objective(layer, &minus, &xs, &w)) / (2.0 * h);
            assert!(
                close(fd, g[k]),
                "param {pi} entry {k}: finite difference {fd} vs backward {}",
                g[k]
            );
        }
    }
    if discrete {
        assert!(
            gin.iter().all(|g| g.is_none()),
            "a discrete input has no gradient"
        );
        return;
    }
    for (xi, gx) in gin.iter().enumerate() {
        let gx = gx.as_ref().expect("input gradient requested");
        assert_eq!(gx.shape(), xs[xi].shape(), "input gradient shape");
        for k in 0..xs[xi].len() {
            let mut plus = xs.clone();
            plus[xi].as_slice_mut().unwrap()[k] += h;
            let mut minus = xs.clone();
            minus[xi].as_slice_mut().unwrap()[k] -= h;
            let fd = (objective(layer, &params, &plus, &w) - objective(layer, &params, &minus, &w))
                / (2.0 * h);
            let a = gx.as_slice().unwrap()[k];
            assert!(
                close(fd, a),
                "input {xi} entry {k}: finite difference {fd} vs backward {a}"
            );
        }
    }
}
