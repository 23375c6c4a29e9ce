//! Times `x·wᵀ` through the strided view `w.t()` against the product from a transposed copy
//! of `w` (the copy included), the measurements behind `lca::net::gemm::transpose_pays`
//! (benchmark helper; not a test). One thread; each line is the best of 5 × 30 products.
//!
//! ```sh
//! cargo run --release --example bench_wt
//! ```

use lca::net::gemm::{mat_mul_uninit, transpose_pays, transposed};
use ndarray::Array2;
use std::mem::MaybeUninit;
use std::time::Instant;

/// Deterministic `r × c` matrix with entries in [-1, 1).
fn matrix(r: usize, c: usize, seed: u64) -> Array2<f32> {
    let mut s = seed;
    Array2::from_shape_simple_fn((r, c), || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    })
}

/// Best time of `f` in µs.
fn time(mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..30 {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / 30.0);
    }
    best * 1e6
}

fn main() {
    let shapes = [
        (65, 128),
        (128, 512),
        (384, 128),
        (512, 128),
        (120, 400),
        (84, 120),
        (10, 512),
        (100, 784),
        (1000, 784),
        (128, 2048),
        (512, 512),
    ];
    for rows in [250usize, 512, 1375] {
        for (out, inp) in shapes {
            let x = matrix(rows, inp, 1);
            let w = matrix(out, inp, 2);
            let mut y = vec![MaybeUninit::<f32>::uninit(); rows * out];
            let strided = time(|| mat_mul_uninit(1.0, x.view(), w.t(), &mut y));
            let copied = time(|| {
                let wt = transposed(w.view());
                mat_mul_uninit(1.0, x.view(), wt.view(), &mut y)
            });
            println!(
                "rows {rows:>4}, in {inp:>4}, out {out:>4}: w.t() {strided:8.1} µs, copy {copied:8.1} µs, \
                 copy/strided {:.3}, transpose_pays {}",
                copied / strided,
                transpose_pays(out, inp)
            );
        }
    }
}
