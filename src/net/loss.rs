//! Losses on the model output: mean softmax cross-entropy (stable log-sum-exp) and mean squared
//! error, as PyTorch's `F.cross_entropy` and `F.mse_loss` with `reduction="mean"`.
//!
//! Each chunk returns the **sum** of its loss terms, how many terms it had, and the gradient of
//! that sum; the evaluator divides by the total count over the whole set. Cross-entropy has one
//! term per output row (sample, or sample × position for sequences); MSE one per element.
//!
//! ```
//! use lca::net::{loss::loss_sum_and_grad, LossKind, TargetsView};
//! use ndarray::{arr2, ArrayD};
//! let logits: ArrayD<f64> = arr2(&[[0.0, 0.0]]).into_dyn();
//! let (sum, n, g) = loss_sum_and_grad(LossKind::CrossEntropy, logits.view(), TargetsView::Classes(&[1]));
//! assert!((sum - 2f64.ln()).abs() < 1e-12 && n == 1);
//! assert_eq!(g.as_slice().unwrap(), &[0.5, -0.5]);
//! ```

use super::{LossKind, Real, TargetsView, as_rows, fastmath};
use ndarray::{ArrayD, ArrayViewD, Zip};

/// Summed loss, number of terms, and gradient of the sum with respect to `out`.
pub fn loss_sum_and_grad<T: Real>(
    kind: LossKind,
    out: ArrayViewD<T>,
    y: TargetsView,
) -> (f64, usize, ArrayD<T>) {
    match (kind, y) {
        (LossKind::CrossEntropy, TargetsView::Classes(cls)) => {
            let z = as_rows(&out);
            let (rows, k) = z.dim();
            assert!(cls.len() >= rows, "one target per output row");
            let z = z.as_standard_layout();
            let zs = z.as_slice().expect("standard layout");
            let mut sum = 0.0f64;
            // SAFETY: every row of the gradient is written in full by `cross_entropy_rows`.
            let g = unsafe {
                super::filled(out.shape(), |gs| {
                    sum = cross_entropy_rows(zs, k, &cls[..rows], gs);
                })
            };
            (sum, rows, g)
        }
        (LossKind::Mse, TargetsView::Values(t)) => {
            let mut g = ArrayD::<T>::zeros(out.shape());
            let mut sum = 0.0f64;
            let t = t
                .into_shape_with_order(out.shape())
                .expect("targets have the output's shape (checked at load)");
            Zip::from(&mut g).and(&out).and(&t).for_each(|g, &o, &y| {
                let d = o.f64() - y as f64;
                sum += d * d;
                *g = T::of(2.0 * d);
            });
            (sum, out.len(), g)
        }
        (LossKind::CrossEntropy, TargetsView::Values(_))
        | (LossKind::Mse, TargetsView::Classes(_)) => {
            unreachable!("targets are loaded for the spec's loss")
        }
    }
}

/// Summed cross-entropy of the rows of `zs` (`k` logits each, row `i` of class `cls[i]`), the
/// gradient of the sum written to `gs`. The loops run in a build for the CPU's vector unit
/// (AVX-512 or AVX2, chosen at run time; they were SSE2 code around the vectorised `exp`, as
/// much time as the `exp` on a tiny GPT): element-wise arithmetic without fused multiply-adds
/// and sums with a fixed order, so every build gives the same bits.
fn cross_entropy_rows<T: Real>(
    zs: &[T],
    k: usize,
    cls: &[u32],
    gs: &mut [std::mem::MaybeUninit<T>],
) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { cross_entropy_rows_avx512(zs, k, cls, gs) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { cross_entropy_rows_avx2(zs, k, cls, gs) };
    }
    cross_entropy_rows_body(zs, k, cls, gs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn cross_entropy_rows_avx512<T: Real>(
    zs: &[T],
    k: usize,
    cls: &[u32],
    gs: &mut [std::mem::MaybeUninit<T>],
) -> f64 {
    cross_entropy_rows_body(zs, k, cls, gs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn cross_entropy_rows_avx2<T: Real>(
    zs: &[T],
    k: usize,
    cls: &[u32],
    gs: &mut [std::mem::MaybeUninit<T>],
) -> f64 {
    cross_entropy_rows_body(zs, k, cls, gs)
}

#[inline(always)]
fn cross_entropy_rows_body<T: Real>(
    zs: &[T],
    k: usize,
    cls: &[u32],
    gs: &mut [std::mem::MaybeUninit<T>],
) -> f64 {
    let mut sum = 0.0f64;
    // exp(z − max) of one row, kept for the gradient: one exp per logit (the softmax is
    // exp(z − max) / Σ, not a second exp of z − log Σ exp), the whole row at once through the
    // vectorised f64 `exp` of `fastmath`.
    let mut e = vec![0.0f64; k];
    for ((row, gr), &c) in zs.chunks_exact(k).zip(gs.chunks_exact_mut(k)).zip(cls) {
        let m = fastmath::max(row).f64();
        for (ei, v) in e.iter_mut().zip(row) {
            *ei = v.f64() - m;
        }
        fastmath::exp64_in_place(&mut e);
        let se = sum8(&e);
        let c = c as usize;
        sum += m + se.ln() - row[c].f64();
        let inv = 1.0 / se;
        for (gi, &ei) in gr.iter_mut().zip(&e) {
            gi.write(T::of(ei * inv));
        }
        gr[c].write(T::of(e[c] * inv) - T::one());
    }
    sum
}

/// Σ with eight independent accumulators (so that a row's sum is not one long chain of
/// dependent additions).
fn sum8(xs: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for &v in rest {
        s += v;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, arr2};

    /// The cross-entropy rows in the CPU's vector build give the baseline build's bits (f32
    /// logits, rows of 82 and of 7 classes: full and partial blocks of the `exp`), and the
    /// values of an f64 computation of log Σ exp − z_c and softmax − one-hot.
    #[test]
    fn cross_entropy_rows_vector_build_matches_baseline_and_f64() {
        use std::mem::MaybeUninit;
        for (rows, k) in [(9usize, 82usize), (5, 7)] {
            let zs: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173)
                .collect();
            let cls: Vec<u32> = (0..rows).map(|r| ((r * 5 + 3) % k) as u32).collect();
            let mut a = vec![MaybeUninit::<f32>::uninit(); rows * k];
            let mut b = vec![MaybeUninit::<f32>::uninit(); rows * k];
            let sa = cross_entropy_rows(&zs, k, &cls, &mut a);
            let sb = cross_entropy_rows_body(&zs, k, &cls, &mut b);
            // SAFETY: both calls write every value.
            let (ga, gb): (Vec<f32>, Vec<f32>) = unsafe {
                (
                    a.iter().map(|v| v.assume_init()).collect(),
                    b.iter().map(|v| v.assume_init()).collect(),
                )
            };
            assert_eq!(sa.to_bits(), sb.to_bits());
            assert!(ga.iter().zip(&gb).all(|(x, y)| x.to_bits() == y.to_bits()));
            let mut want = 0.0f64;
            for r in 0..rows {
                let row: Vec<f64> = zs[r * k..(r + 1) * k].iter().map(|&v| v as f64).collect();
                let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
                let c = cls[r] as usize;
                want += lse - row[c];
                for (j, &z) in row.iter().enumerate() {
                    let g = (z - lse).exp() - if j == c { 1.0 } else { 0.0 };
                    assert!((ga[r * k + j] as f64 - g).abs() < 1e-6, "row {r} class {j}");
                }
            }
            assert!(
                (sa - want).abs() < 1e-9 * want.abs().max(1.0),
                "{sa} vs {want}"
            );
        }
    }

    /// Finite differences in f64 of the summed loss.
    fn check(kind: LossKind, out: ArrayD<f64>, y: TargetsView) {
        let (_, _, g) = loss_sum_and_grad(kind, out.view(), y.clone());
        let h = 1e-6;
        for i in 0..out.len() {
            let mut p = out.clone();
            p.as_slice_mut().unwrap()[i] += h;
            let mut m = out.clone();
            m.as_slice_mut().unwrap()[i] -= h;
            let fd = (loss_sum_and_grad(kind, p.view(), y.clone()).0
                - loss_sum_and_grad(kind, m.view(), y.clone()).0)
                / (2.0 * h);
            let a = g.as_slice().unwrap()[i];
            assert!(
                (fd - a).abs() < 1e-7 * (1.0 + a.abs()),
                "entry {i}: fd {fd} vs {a}"
            );
        }
    }

    #[test]
    fn cross_entropy_matches_finite_differences() {
        let z = arr2(&[[0.3, -1.2, 2.0], [5.0, 0.1, -0.4]]).into_dyn();
        check(LossKind::CrossEntropy, z, TargetsView::Classes(&[2, 1]));
    }

    #[test]
    fn cross_entropy_is_stable_for_large_logits() {
        let z: ArrayD<f32> = arr2(&[[1000.0f32, 0.0], [-1000.0, 1000.0]]).into_dyn();
        let (s, n, g) = loss_sum_and_grad(
            LossKind::CrossEntropy,
            z.view(),
            TargetsView::Classes(&[1, 1]),
        );
        assert_eq!(n, 2);
        assert!((s - 1000.0).abs() < 1e-9, "{s}");
        assert!(g.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn cross_entropy_matches_pytorch_value() {
        // F.cross_entropy(torch.tensor([[0.3,-1.2,2.0],[5.0,0.1,-0.4]],dtype=torch.float64),
        //                 torch.tensor([2,1]), reduction="sum")
        let z = arr2(&[[0.3, -1.2, 2.0], [5.0, 0.1, -0.4]]).into_dyn();
        let (s, _, _) = loss_sum_and_grad::<f64>(
            LossKind::CrossEntropy,
            z.view(),
            TargetsView::Classes(&[2, 1]),
        );
        let expected = 5.113_563_415_959_488;
        assert!((s - expected).abs() < 1e-9, "{s} vs {expected}");
    }

    #[test]
    fn mse_matches_finite_differences() {
        let t: ArrayD<f32> = arr2(&[[1.0f32, 2.0], [0.0, -1.0]]).into_dyn();
        let z = arr2(&[[0.5, 2.5], [1.0, -3.0]]).into_dyn();
        check(LossKind::Mse, z.clone(), TargetsView::Values(t.view()));
        let (s, n, _) = loss_sum_and_grad(LossKind::Mse, z.view(), TargetsView::Values(t.view()));
        assert_eq!(n, 4);
        assert!((s - (0.25 + 0.25 + 1.0 + 4.0)).abs() < 1e-12);
        let _ = arr1(&[0.0]);
    }
}
