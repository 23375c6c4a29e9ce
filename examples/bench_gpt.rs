//! Time the full-training-set loss and gradient of a model at one checkpoint, as
//! `lca analyze` evaluates it (f32 compute, chunks in parallel, f64 accumulation).
//!
//! ```sh
//! cargo run --release --example bench_gpt -- fixtures/gpt/model.toml fixtures/gpt/ckpts/ckpt_30.safetensors [REPEATS] [THREADS]
//! ```
//!
//! Prints one JSON line: `{"threads", "repeats", "median_s", "min_s", "loss", "samples",
//! "params", "chunk_size"}`. `bench/gpt_compare.py` runs it beside PyTorch.

use lca::data::Dataset;
use lca::eval::Evaluator;
use lca::net::Model;
use std::path::Path;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    lca::alloc::tune(); // as `lca` itself does at start-up
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: bench_gpt SPEC CHECKPOINT [REPEATS=10] [THREADS=2]");
        std::process::exit(2);
    }
    let repeats: usize = args.get(3).map_or(Ok(10), |s| s.parse())?;
    let threads: usize = args.get(4).map_or(Ok(2), |s| s.parse())?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let spec = lca::spec::Spec::load(Path::new(&args[1]))?;
    let loss = match spec.loss {
        lca::spec::LossSpec::CrossEntropy {} => lca::net::LossKind::CrossEntropy,
        lca::spec::LossSpec::Mse {} => lca::net::LossKind::Mse,
    };
    let data = Dataset::load(
        &spec.train_path(),
        &spec.data,
        spec.model.input_shape.as_deref(),
        loss,
    )?;
    let model = Model::<f32>::build(&spec, data.sample_shape())?;
    let file = lca::checkpoint::describe(Path::new(&args[2]))?;
    let theta = lca::checkpoint::load(&file, &model.params)?.theta;
    let eval = Evaluator {
        model: &model,
        data: &data,
        chunk_size: spec.eval.chunk_size,
    };
    let mut loss = eval.loss_and_grad(&theta)?.loss; // warm-up
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t0 = Instant::now();
        loss = eval.loss_and_grad(&theta)?.loss;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"threads\": {threads}, \"repeats\": {repeats}, \"median_s\": {}, \"min_s\": {}, \"loss\": {loss}, \"samples\": {}, \"params\": {}, \"chunk_size\": {}}}",
        times[times.len() / 2],
        times[0],
        data.len(),
        model.num_params(),
        spec.eval.chunk_size
    );
    Ok(())
}
