//! Time one full-set loss + gradient of the study's LeNet (docs/examples/lenet.toml) on 10,000
//! random 1×28×28 inputs, chunk size 1000, on 2 threads (or `LCA_THREADS`).
//!
//! ```sh
//! cargo run --release --example lenet_timing
//! ```

use lca::data::{Dataset, Targets};
use lca::eval::Evaluator;
use lca::net::Model;
use lca::spec::Spec;
use ndarray::{ArrayD, IxDyn};
use std::path::Path;
use std::time::Instant;

/// SplitMix64 in [0, 1).
fn uniform(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn main() -> lca::Result<()> {
    let threads: usize = std::env::var("LCA_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let samples: usize = std::env::var("LCA_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| lca::LcaError::Usage(e.to_string()))?;
    let spec_file = std::env::var("LCA_SPEC").unwrap_or_else(|_| "docs/examples/lenet.toml".into());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(spec_file);
    let spec = Spec::load(&path)?;
    let input: Vec<usize> = spec
        .model
        .input_shape
        .clone()
        .unwrap_or_else(|| vec![1, 28, 28]);
    let chunk = spec.eval.chunk_size;
    let model = Model::<f32>::build(&spec, &input)?;
    let mut rng = 42u64;
    let mut shape = vec![samples];
    shape.extend(&input);
    let x = ArrayD::from_shape_fn(IxDyn(&shape), |_| uniform(&mut rng) as f32);
    let ids = (0..samples)
        .map(|_| (uniform(&mut rng) * 10.0) as u32)
        .collect();
    let data = Dataset {
        path: "random".into(),
        sha256: String::new(),
        x: x.into(),
        targets: Targets::Classes { ids, per_sample: 1 },
        y_shape: vec![],
    };
    // PyTorch's default init: U(−1/√fan_in, 1/√fan_in) for weights and biases.
    let theta: Vec<Vec<f32>> = model
        .params
        .iter()
        .map(|p| {
            let fan_in: usize = if p.shape.len() > 1 {
                p.shape[1..].iter().product()
            } else {
                1
            };
            let fan_in = if p.role == "bias" {
                model
                    .params
                    .iter()
                    .find(|q| q.layer == p.layer && q.role == "weight")
                    .map_or(1, |w| w.shape[1..].iter().product())
            } else {
                fan_in
            };
            let b = 1.0 / (fan_in as f64).sqrt();
            (0..p.numel())
                .map(|_| ((2.0 * uniform(&mut rng) - 1.0) * b) as f32)
                .collect()
        })
        .collect();
    let eval = Evaluator {
        model: &model,
        data: &data,
        chunk_size: chunk,
    };
    println!(
        "{}: {} parameters, {:.2} M MACs per sample forward; {samples} samples, chunk {chunk}, {threads} threads",
        path.display(),
        model.num_params(),
        model.macs_per_sample() as f64 / 1e6
    );
    let mut times = Vec::new();
    for rep in 0..4 {
        let t = Instant::now();
        let r = eval.loss_and_grad(&theta)?;
        let s = t.elapsed().as_secs_f64();
        println!("run {rep}: loss {:.6}, {s:.3} s", r.loss);
        times.push(s);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "best {:.3} s, median {:.3} s",
        times[0],
        (times[1] + times[2]) / 2.0
    );
    Ok(())
}
