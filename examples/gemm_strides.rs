use lca::net::gemm::mat_mul;
use ndarray::Array2;
use std::time::Instant;

fn matrix(r: usize, c: usize, seed: u64) -> Array2<f32> {
    let mut s = seed;
    Array2::from_shape_simple_fn((r, c), || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    })
}

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

fn transpose(w: &[f32], n: usize, k: usize, out: &mut [f32]) {
    const B: usize = 16;
    for j0 in (0..n).step_by(B) {
        for k0 in (0..k).step_by(B) {
            for j in j0..(j0 + B).min(n) {
                for kk in k0..(k0 + B).min(k) {
                    out[kk * n + j] = w[j * k + kk];
                }
            }
        }
    }
}

fn main() {
    for m in [512usize, 250, 1375] {
        for (n, k) in [
            (65usize, 128usize),
            (128, 512),
            (384, 128),
            (512, 128),
            (120, 400),
            (84, 120),
            (10, 512),
            (10, 64),
            (100, 784),
            (1000, 784),
            (128, 2048),
            (512, 512),
        ] {
            let x = matrix(m, k, 1);
            let w = matrix(n, k, 2);
            let mut wt = vec![0.0f32; n * k];
            let mut y = Array2::<f32>::zeros((m, n));
            let a = time(|| mat_mul(x.view(), w.t(), false, y.view_mut()));
            let tt = time(|| transpose(w.as_slice().unwrap(), n, k, &mut wt));
            let b = time(|| {
                let v = ndarray::ArrayView2::from_shape((k, n), &wt).unwrap();
                mat_mul(x.view(), v, false, y.view_mut())
            });
            println!(
                "m={m} out={n} in={k}: W.t() {a:.1} us, WT {b:.1} us + transpose {tt:.1} us: gain {:.1} us ({:.1} %)",
                a - b - tt,
                100.0 * (a - b - tt) / a
            );
        }
    }
}
