//! Times `lca`'s full-training-set loss and gradient through the library API (benchmark helper
//! for `bench/compare.sh`; not a test).
//!
//! Builds `Spec` → `Dataset` → `Model::<f32>` → `Evaluator` and times
//! `Evaluator::loss_and_grad` over `--reps` repetitions after one warm-up, printing one JSON
//! object with every time, the median and the work per evaluation.
//!
//! ```sh
//! cargo run --release --example bench_grad -- --spec S.toml [--data D.safetensors]
//!     [--chunk N] [--threads T] [--reps R] [--ckpt C.safetensors]
//! ```
//!
//! `--data` replaces the spec's `data.train`; `--chunk` its `eval.chunk_size`. Parameters come
//! from `--ckpt`, else from a fixed-seed uniform initialisation (±1/√fan_in, as PyTorch's
//! default); timings do not depend on the values. Exit status 3 means the spec cannot be
//! built by this version of `lca` (e.g. a layer type it does not have yet).

use lca::data::Dataset;
use lca::eval::Evaluator;
use lca::net::{LossKind, Model, Src};
use lca::spec::{LossSpec, Spec};
use std::path::PathBuf;
use std::time::Instant;

fn value<'a>(args: &'a [String], key: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .map(|s| s.as_str())
}

fn number(args: &[String], key: &str) -> Option<usize> {
    value(args, key).map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{key} takes a number, got {v}"))
    })
}

/// Floating-point operations of one evaluation per sample: forward (2·MACs), weight gradient
/// (2·MACs of layers with parameters) and input gradient (2·MACs of layers whose input
/// depends on parameters; the first layer's input gradient is not computed).
fn flops_per_sample(model: &Model<f32>) -> (u64, u64) {
    let (mut fwd, mut total) = (0u64, 0u64);
    for node in &model.nodes {
        let m = node.layer.macs_per_sample(&node.in_shapes);
        fwd += m;
        total += 2 * m;
        if !node.param_ids.is_empty() {
            total += 2 * m;
        }
        let needs_input_grad = node
            .inputs
            .iter()
            .any(|s| matches!(s, Src::Node(j) if model.nodes[*j].depends_on_params));
        if needs_input_grad {
            total += 2 * m;
        }
    }
    (fwd, total)
}

/// Fixed-seed uniform initialisation, ±1/√fan_in (a bias takes its layer's weight's fan-in).
fn init(model: &Model<f32>) -> Vec<Vec<f32>> {
    let mut s: u64 = 0x5EED;
    let mut fan_in = 1usize;
    model
        .params
        .iter()
        .map(|p| {
            if p.shape.len() >= 2 {
                fan_in = p.shape[1..].iter().product();
            }
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
            (0..p.numel())
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = (s >> 11) as f64 / (1u64 << 53) as f64;
                    ((2.0 * u - 1.0) * bound) as f32
                })
                .collect()
        })
        .collect()
}

fn main() {
    lca::alloc::tune();
    let args: Vec<String> = std::env::args().collect();
    let spec_path = PathBuf::from(value(&args, "--spec").expect("--spec SPEC.toml is required"));
    let threads = number(&args, "--threads").unwrap_or(2).max(1);
    let reps = number(&args, "--reps").unwrap_or(7).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("rayon pool");

    let spec = match Spec::load(&spec_path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot build the spec: {e}");
            std::process::exit(3);
        }
    };
    let data_path = value(&args, "--data")
        .map(PathBuf::from)
        .unwrap_or_else(|| spec.train_path());
    let chunk = number(&args, "--chunk")
        .unwrap_or(spec.eval.chunk_size)
        .max(1);
    let loss = match spec.loss {
        LossSpec::CrossEntropy {} => LossKind::CrossEntropy,
        LossSpec::Mse {} => LossKind::Mse,
    };
    let data = Dataset::load(
        &data_path,
        &spec.data,
        spec.model.input_shape.as_deref(),
        loss,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let model = match Model::<f32>::build(&spec, data.sample_shape()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot build the model: {e}");
            std::process::exit(3);
        }
    };
    data.check_targets(model.output_shape(), model.loss)
        .unwrap_or_else(|e| panic!("{e}"));
    let theta = match value(&args, "--ckpt") {
        Some(c) => {
            let file = lca::checkpoint::describe(std::path::Path::new(c))
                .unwrap_or_else(|e| panic!("{e}"));
            lca::checkpoint::load(&file, &model.params)
                .unwrap_or_else(|e| panic!("{e}"))
                .theta
        }
        None => init(&model),
    };
    let eval = Evaluator {
        model: &model,
        data: &data,
        chunk_size: chunk,
    };

    let first = eval.loss_and_grad(&theta).unwrap_or_else(|e| panic!("{e}")); // warm-up
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            let r = eval.loss_and_grad(&theta).unwrap_or_else(|e| panic!("{e}"));
            let dt = t.elapsed().as_secs_f64();
            assert_eq!(
                r.loss.to_bits(),
                first.loss.to_bits(),
                "evaluation is not deterministic"
            );
            dt
        })
        .collect();
    let all = times.clone();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let (fwd, flops) = flops_per_sample(&model);
    let n = data.len();
    println!(
        "{}",
        serde_json::json!({
            "kind": "grad",
            "spec": spec_path.display().to_string(),
            "data": data_path.display().to_string(),
            "samples": n,
            "chunk": chunk,
            "threads": threads,
            "params": model.num_params(),
            "loss": first.loss,
            "macs_forward_per_sample": fwd,
            "flops_per_sample": flops,
            "flops": flops as f64 * n as f64,
            "seconds": all,
            "median_seconds": median,
            "min_seconds": times[0],
            "gflops": flops as f64 * n as f64 / median / 1e9,
        })
    );
}
