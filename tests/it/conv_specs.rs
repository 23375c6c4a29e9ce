//! Convolutional specs: the study's LeNet and AllCNN examples in docs/examples build and run
//! on MNIST/CIFAR-shaped inputs, and a spec whose shapes do not chain is refused by
//! `lca analyze` before any gradient is computed.

use crate::util::{Rng, analyze_run, repo};
use lca::net::{Model, Real, TargetsView};
use lca::spec::Spec;
use ndarray::{ArrayD, IxDyn};
use std::path::Path;

/// Parameters drawn like PyTorch's default init, U(−1/√fan_in, 1/√fan_in) per layer.
fn init<T: Real>(model: &Model<T>, rng: &mut Rng) -> Vec<Vec<T>> {
    model
        .params
        .iter()
        .map(|p| {
            let weight = model
                .params
                .iter()
                .find(|q| q.layer == p.layer && q.role == "weight")
                .expect("every layer with parameters has a weight");
            let bound = 1.0 / (weight.shape[1..].iter().product::<usize>() as f64).sqrt();
            (0..p.numel())
                .map(|_| T::of((2.0 * rng.next() - 1.0) * bound))
                .collect()
        })
        .collect()
}

/// Build a docs example for its input shape, run forward and backward on two random samples
/// in f32 and f64, and check the loss and gradients.
fn run_example(file: &str, input: &[usize], params: usize) {
    let spec = Spec::load(&repo(file)).unwrap();
    assert_eq!(spec.model.input_shape.as_deref(), Some(input), "{file}");
    let m32 = Model::<f32>::build(&spec, input).unwrap();
    let m64 = Model::<f64>::build(&spec, input).unwrap();
    assert_eq!(m32.num_params(), params, "{file}");
    assert_eq!(m32.output_shape(), &[10], "{file}");
    let mut rng = Rng(7);
    let t64 = init(&m64, &mut rng);
    let t32: Vec<Vec<f32>> = t64
        .iter()
        .map(|v| v.iter().map(|&x| x as f32).collect())
        .collect();
    let t64: Vec<Vec<f64>> = t32
        .iter()
        .map(|v| v.iter().map(|&x| x as f64).collect())
        .collect();
    let mut shape = vec![2];
    shape.extend(input);
    let x = ArrayD::from_shape_fn(IxDyn(&shape), |_| rng.next() as f32);
    let y = [3u32, 8];
    let mut g32: Vec<Vec<f32>> = t32.iter().map(|v| vec![0.0; v.len()]).collect();
    let mut g64: Vec<Vec<f64>> = t64.iter().map(|v| vec![0.0; v.len()]).collect();
    let (l32, n) = m32.chunk_loss_grad(&t32, x.view(), TargetsView::Classes(&y), &mut g32);
    let (l64, _) = m64.chunk_loss_grad(&t64, x.view(), TargetsView::Classes(&y), &mut g64);
    assert_eq!(n, 2);
    // Near ln 10 per sample at initialisation.
    assert!((l64 / 2.0 - 10f64.ln()).abs() < 0.5, "{file}: loss {l64}");
    assert!(
        (l32 - l64).abs() < 1e-5 * l64,
        "{file}: f32 loss {l32} vs f64 {l64}"
    );
    for ((p, a), b) in m32.params.iter().zip(&g32).zip(&g64) {
        let max = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(max > 0.0, "{file}: {} has no gradient", p.name);
        let err = a
            .iter()
            .zip(b)
            .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        assert!(
            err <= 1e-3 * max,
            "{file}: {} f32 gradient differs from f64 by {err} (max {max})",
            p.name
        );
    }
}

#[test]
fn lenet_example_runs_on_mnist_shaped_inputs() {
    run_example("docs/examples/lenet.toml", &[1, 28, 28], 808_970);
}

#[test]
fn allcnn_example_runs_on_cifar_shaped_inputs() {
    run_example("docs/examples/allcnn.toml", &[3, 32, 32], 1_369_738);
}

/// `lca analyze fixtures/cnn/ckpts --spec SPEC -o OUT`.
fn analyze_cnn_ckpts(spec: &Path, out: &Path) -> std::process::Output {
    analyze_run(&repo("fixtures/cnn/ckpts"), spec, out, &[])
}

/// The CNN fixture's spec with `fc.in_features` wrong: `lca analyze` must stop at the model
/// check, naming both layers and sizes, before any checkpoint is read or gradient computed.
#[test]
fn shapes_that_do_not_chain_are_refused_before_any_gradient() {
    let good = std::fs::read_to_string(repo("fixtures/cnn/model.toml")).unwrap();
    let data = repo("fixtures/cnn/data/train.safetensors");
    let bad = good
        .replace("in_features = 144", "in_features = 400")
        .replace(
            "train = \"data/train.safetensors\"",
            &format!("train = {:?}", data.display().to_string()),
        );
    assert_ne!(bad, good);
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("model.toml");
    std::fs::write(&spec, &bad).unwrap();
    let out = tmp.path().join("out");
    let o = analyze_cnn_ckpts(&spec, &out);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let line = bad
        .lines()
        .position(|l| l.contains("name = \"fc\""))
        .unwrap();
    for want in [
        format!("layer 'fc' (linear, {}:{line})", spec.display()),
        "in_features = 400".into(),
        "144 features".into(),
        "layer 'flatten_6' gives 144".into(),
    ] {
        assert!(err.contains(&want), "missing {want:?} in: {err}");
    }
    // Nothing was computed or written.
    assert!(!err.contains("analysed"), "{err}");
    assert!(!out.exists());

    // The same for a convolution fed the wrong number of channels.
    let bad = bad
        .replace("in_features = 400", "in_features = 144")
        .replace(
            "in_channels = 8\nout_channels = 16",
            "in_channels = 6\nout_channels = 16",
        );
    std::fs::write(&spec, &bad).unwrap();
    let o = analyze_cnn_ckpts(&spec, &out);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    for want in [
        "layer 'conv2' (conv2d",
        "in_channels = 6 does not match the 8 channels",
        "layer 'max_pool2d_2' gives 8×4×4",
    ] {
        assert!(err.contains(want), "missing {want:?} in: {err}");
    }
    assert!(!out.exists());
}
