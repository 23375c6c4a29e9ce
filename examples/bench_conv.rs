//! Times `lca`'s `conv2d` layer (f32, one thread) on ResNet's convolution shapes: forward, and
//! backward with the weight and input gradients, per call on a chunk of samples (a benchmark
//! helper, not a test; indicative on a loaded machine).
//!
//! ```sh
//! cargo run --release --example bench_conv -- [--batch 50] [--reps 20] [--bn] [--k5]
//!     [--only TEXT]
//! ```
//!
//! `--k5` times 5×5 "same" convolutions instead (LeNet's two, then other sizes and channel
//! counts: the shapes behind `Conv2d::direct`'s rule for 5×5 kernels). `--only TEXT` times
//! only the shapes whose name contains `TEXT` (e.g. `--only "16→16 32×32 k3"`).
//!
//! Prints one line per shape: milliseconds per forward and per backward (minimum over the
//! repetitions) and the GFLOP/s of each (2 × nominal multiply-adds; backward counts both
//! products). `--bn` times `batch_norm` (running statistics) on the same output shapes too.

use lca::net::batch_norm::{BatchNorm, BnMode};
use lca::net::conv::{Conv2d, Window2d};
use lca::net::{Backward, Layer, Saved};
use ndarray::{ArrayD, IxDyn};
use std::time::Instant;

fn arg(args: &[String], key: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn random(shape: &[usize], seed: &mut u64) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    })
}

/// Minimum seconds of `reps` runs of `f`.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn bench_layer(layer: &dyn Layer<f32>, shape: &[usize], reps: usize, macs: f64, name: &str) {
    let mut seed = 1u64;
    let x = random(shape, &mut seed);
    let params: Vec<Vec<f32>> = layer
        .params()
        .iter()
        .chain(layer.buffers().iter())
        .map(|d| {
            let mut v = random(&d.shape, &mut seed).into_raw_vec_and_offset().0;
            if d.suffix == "running_var" {
                v.iter_mut().for_each(|x| *x = x.abs() + 0.5);
            }
            v
        })
        .collect();
    let pr: Vec<&[f32]> = params.iter().map(|v| v.as_slice()).collect();
    let mut saved = Saved::None;
    let y = layer.forward(&pr, &[x.view()], &mut saved);
    let gy = random(y.shape(), &mut seed);
    let fwd = time(reps, || {
        let mut s = Saved::None;
        std::hint::black_box(layer.forward(&pr, &[x.view()], &mut s));
    });
    let mut g: Vec<Vec<f32>> = params.iter().map(|v| vec![0.0; v.len()]).collect();
    let bwd = time(reps, || {
        let out = layer.backward(Backward {
            params: &pr,
            inputs: &[x.view()],
            output: y.view(),
            saved: &saved,
            grad_out: gy.view(),
            grad_params: g.iter_mut().map(|v| v.as_mut_slice()).collect(),
            need_input_grad: &[true],
        });
        std::hint::black_box(out);
    });
    println!(
        "{name:<34} fwd {:8.3} ms {:6.1} GFLOP/s   bwd {:8.3} ms {:6.1} GFLOP/s",
        fwd * 1e3,
        2.0 * macs / fwd / 1e9,
        bwd * 1e3,
        4.0 * macs / bwd / 1e9
    );
}

fn main() {
    lca::alloc::tune();
    let args: Vec<String> = std::env::args().collect();
    let batch = arg(&args, "--batch", 50);
    let reps = arg(&args, "--reps", 20);
    let bn = args.iter().any(|a| a == "--bn");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let k5 = [
        (1, 20, 28, 5, 1, 2),
        (20, 40, 14, 5, 1, 2),
        (3, 16, 32, 5, 1, 2),
        (16, 32, 16, 5, 1, 2),
        (32, 32, 8, 5, 1, 2),
        (20, 40, 7, 5, 1, 2),
        (64, 64, 6, 5, 1, 2),
        (40, 40, 4, 5, 1, 2),
    ];
    // (in, out, size, kernel, stride, padding): ResNet-20's and ResNet-18's (at 32×32) shapes.
    let resnet = [
        (3, 16, 32, 3, 1, 1),
        (16, 16, 32, 3, 1, 1),
        (16, 32, 32, 3, 2, 1),
        (16, 32, 32, 1, 2, 0),
        (32, 32, 16, 3, 1, 1),
        (32, 64, 16, 3, 2, 1),
        (64, 64, 8, 3, 1, 1),
        (64, 128, 8, 3, 2, 1),
        (128, 128, 4, 3, 1, 1),
        (256, 256, 2, 3, 1, 1),
        (512, 512, 1, 3, 1, 1),
    ];
    let shapes: &[_] = if args.iter().any(|a| a == "--k5") {
        &k5
    } else {
        &resnet
    };
    for &(cin, cout, size, k, s, p) in shapes {
        let conv = Conv2d {
            in_channels: cin,
            out_channels: cout,
            groups: 1,
            bias: false,
            window: Window2d::new([k, k], [s, s], [1, 1], [p, p], [p, p]),
        };
        let shape = [batch, cin, size, size];
        let out = <Conv2d as Layer<f32>>::out_shape(&conv, &[shape[1..].to_vec()]).unwrap();
        let macs = (batch * out.iter().product::<usize>() * cin * k * k) as f64;
        let name = format!("conv {cin}→{cout} {size}×{size} k{k} s{s} ×{batch}");
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        bench_layer(&conv, &shape, reps, macs, &name);
        if bn && k == 3 {
            let layer = BatchNorm {
                num_features: cout,
                eps: 1e-5,
                affine: true,
                mode: BnMode::RunningStats,
            };
            let oshape = [batch, out[0], out[1], out[2]];
            let n = oshape.iter().product::<usize>() as f64;
            bench_layer(
                &layer,
                &oshape,
                reps,
                n,
                &format!("  batch_norm {:?}", &out),
            );
        }
    }
}
