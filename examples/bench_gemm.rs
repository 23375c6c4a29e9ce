//! The machine's f32 GEMM ceiling through the GEMM `lca` uses, `lca::net::gemm::mat_mul`
//! (benchmark helper for `bench/compare.sh`; not a test).
//!
//! Times `C = A·B` for square `n × n` f32 matrices: once on one thread, then `threads`
//! independent products at once (one per rayon worker), the way `lca` runs one chunk per thread.
//! Prints one JSON object: GFLOP/s counts `2·n³` per product.
//!
//! ```sh
//! cargo run --release --example bench_gemm -- [--n 2048] [--reps 5] [--threads 2]
//! ```

use lca::net::gemm::mat_mul;
use ndarray::Array2;
use rayon::prelude::*;
use std::time::Instant;

fn arg(args: &[String], key: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{key} takes a number, got {v}"))
        })
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Deterministic matrix with entries in [-1, 1).
fn matrix(n: usize, seed: u64) -> Array2<f32> {
    let mut s = seed;
    Array2::from_shape_simple_fn((n, n), || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    })
}

fn product(a: &Array2<f32>, b: &Array2<f32>, c: &mut Array2<f32>) {
    mat_mul(a.view(), b.view(), false, c.view_mut());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = arg(&args, "--n", 2048);
    let reps = arg(&args, "--reps", 5).max(1);
    let threads = arg(&args, "--threads", 2).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("rayon pool");
    let flop = 2.0 * (n as f64).powi(3);

    // One thread.
    let (a, b) = (matrix(n, 1), matrix(n, 2));
    let mut c = Array2::<f32>::zeros((n, n));
    product(&a, &b, &mut c); // warm-up
    let mut single: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            product(&a, &b, &mut c);
            t.elapsed().as_secs_f64()
        })
        .collect();
    let t1 = median(&mut single);

    // `threads` independent products at once.
    let mut work: Vec<(Array2<f32>, Array2<f32>, Array2<f32>)> = (0..threads)
        .map(|i| {
            (
                matrix(n, 10 + i as u64),
                matrix(n, 20 + i as u64),
                Array2::zeros((n, n)),
            )
        })
        .collect();
    let run = |work: &mut Vec<(Array2<f32>, Array2<f32>, Array2<f32>)>| {
        work.par_iter_mut().for_each(|(a, b, c)| product(a, b, c));
    };
    run(&mut work); // warm-up
    let mut multi: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            run(&mut work);
            t.elapsed().as_secs_f64()
        })
        .collect();
    let tp = median(&mut multi);

    println!(
        "{}",
        serde_json::json!({
            "kind": "gemm",
            "backend": "lca::net::gemm::mat_mul (gemm crate, run-time CPU dispatch)",
            "n": n,
            "reps": reps,
            "single_seconds": t1,
            "single_gflops": flop / t1 / 1e9,
            "threads": threads,
            "parallel_seconds": tp,
            "parallel_gflops": threads as f64 * flop / tp / 1e9,
        })
    );
}
