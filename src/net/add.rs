//! `add`: the element-wise sum of two or more inputs of the same shape — the join of a
//! residual (skip) connection, `out = main(x) + shortcut(x)`.
//!
//! ```
//! use lca::net::{add::Add, Layer, Saved};
//! use ndarray::{arr2, ArrayD};
//! let a: ArrayD<f32> = arr2(&[[1.0f32, 2.0]]).into_dyn();
//! let b: ArrayD<f32> = arr2(&[[0.5f32, -2.0]]).into_dyn();
//! let y = Add.forward(&[], &[a.view(), b.view()], &mut Saved::None);
//! assert_eq!(y.as_slice().unwrap(), &[1.5, 0.0]);
//! ```

use super::fastmath::{f32_slice, f32_slice_mut, f32_uninit};
use super::{Backward, Layer, Real, Saved};
use ndarray::{ArrayD, ArrayViewD, Zip};

/// Sum of its inputs.
#[derive(Debug, Clone)]
pub struct Add;

impl<T: Real> Layer<T> for Add {
    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        if inputs.len() < 2 {
            return Err(format!(
                "adds two or more inputs (`input = [\"a\", \"b\"]`), got {}",
                inputs.len()
            ));
        }
        if inputs.iter().any(|s| s != &inputs[0]) {
            return Err("its inputs must have the same shape".into());
        }
        Ok(inputs[0].clone())
    }

    fn forward(&self, _p: &[&[T]], inputs: &[ArrayViewD<T>], _saved: &mut Saved<T>) -> ArrayD<T> {
        sum(inputs, false)
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        b.need_input_grad
            .iter()
            .map(|&need| need.then(|| b.grad_out.to_owned()))
            .collect()
    }

    /// Each input's gradient is the output's: the executor hands it on without copying.
    fn passes_gradient_through(&self) -> bool {
        true
    }

    /// The sum and its ReLU in one pass (the residual join of a ResNet block).
    fn fuses_relu(&self) -> bool {
        true
    }

    fn forward_relu(
        &self,
        _p: &[&[T]],
        inputs: &[ArrayViewD<T>],
        _saved: &mut Saved<T>,
    ) -> ArrayD<T> {
        sum(inputs, true)
    }

    /// The mask is read from the ReLU's output (`relu(z) > 0` exactly where `z > 0`; a NaN
    /// sum, which the ReLU maps to 0, gets a zero gradient here where the unfused ReLU
    /// passes its gradient on).
    fn backward_relu(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        if let ([true, true], Some(gs), Some(ys)) = (
            b.need_input_grad,
            b.grad_out.as_slice(),
            b.output.as_slice(),
        ) {
            // The usual residual join: both gradients written in one pass.
            let mut second = ArrayD::<T>::uninit(b.output.raw_dim());
            let s2 = second.as_slice_mut().expect("a fresh array is contiguous");
            // SAFETY: the loop writes every element of both arrays (all have the output's
            // shape).
            let first = unsafe { super::filled(b.output.shape(), |s1| masked2(gs, ys, s1, s2)) };
            // SAFETY: written in full just above.
            return vec![Some(first), Some(unsafe { second.assume_init() })];
        }
        let mut g = Some(
            Zip::from(&b.grad_out)
                .and(&b.output)
                .map_collect(|&g, &y| if y > T::zero() { g } else { T::zero() }),
        );
        let last = b.need_input_grad.iter().rposition(|&n| n);
        (0..b.need_input_grad.len())
            .map(|k| match (b.need_input_grad[k], Some(k) == last) {
                (false, _) => None,
                (true, false) => g.clone(),
                (true, true) => g.take(),
            })
            .collect()
    }
}

/// `Σ inputs` (in input order), with `relu` its ReLU (0 for NaN, as the ReLU layer), in one
/// pass where the inputs are two contiguous arrays.
fn sum<T: Real>(inputs: &[ArrayViewD<T>], relu: bool) -> ArrayD<T> {
    if let [a, b] = inputs
        && let (Some(xa), Some(xb)) = (a.as_slice(), b.as_slice())
    {
        // SAFETY: `sum2` writes every element (the inputs have the output's shape).
        return unsafe {
            super::filled(a.shape(), |ys| match relu {
                true => sum2::<T, true>(xa, xb, ys),
                false => sum2::<T, false>(xa, xb, ys),
            })
        };
    }
    let mut y = inputs[0].to_owned();
    for x in &inputs[1..] {
        y += x;
    }
    if relu {
        y.mapv_inplace(|v| if v > T::zero() { v } else { T::zero() });
    }
    y
}

/// `ys = a + b`, with `RELU` its ReLU, as a select the compiler vectorises (f32 on AVX-512F:
/// [`avx512::sum2`], the same operations).
fn sum2<T: Real, const RELU: bool>(a: &[T], b: &[T], ys: &mut [std::mem::MaybeUninit<T>]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && let (Some(a), Some(b)) = (f32_slice(a), f32_slice(b))
    {
        let ys = f32_uninit(ys).expect("T is f32 (f32_slice succeeded)");
        // SAFETY: the CPU supports AVX-512F (checked just above).
        unsafe { avx512::sum2::<RELU>(a, b, ys) };
        return;
    }
    for ((y, &u), &v) in ys.iter_mut().zip(a).zip(b) {
        let s = u + v;
        y.write(if !RELU || s > T::zero() { s } else { T::zero() });
    }
}

/// `d1 = d2 = (y > 0 ? g : 0)` element-wise (the fused ReLU's backward written for both
/// inputs of the join); f32 on AVX-512F: [`avx512::masked2`], the same selection.
fn masked2<T: Real>(
    gs: &[T],
    ys: &[T],
    d1: &mut [std::mem::MaybeUninit<T>],
    d2: &mut [std::mem::MaybeUninit<T>],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && let (Some(g), Some(y)) = (f32_slice(gs), f32_slice(ys))
    {
        let d1 = f32_uninit(d1).expect("T is f32 (f32_slice succeeded)");
        let d2 = f32_uninit(d2).expect("T is f32");
        // SAFETY: the CPU supports AVX-512F (checked just above).
        unsafe { avx512::masked2(g, y, d1, d2) };
        return;
    }
    for (((d1, d2), &g), &y) in d1.iter_mut().zip(d2.iter_mut()).zip(gs).zip(ys) {
        let v = if y > T::zero() { g } else { T::zero() };
        d1.write(v);
        d2.write(v);
    }
}

/// `acc += g` element-wise (the executor's sum of the gradients of a value read by several
/// layers): f32 on AVX-512F through [`avx512::add_assign`] (the same additions), else
/// ndarray's.
pub(crate) fn accumulate<T: Real>(acc: &mut ArrayD<T>, g: &ArrayD<T>) {
    #[cfg(target_arch = "x86_64")]
    if acc.shape() == g.shape()
        && std::arch::is_x86_feature_detected!("avx512f")
        && let (Some(a), Some(g)) = (acc.as_slice_mut(), g.as_slice())
        && let (Some(a), Some(g)) = (f32_slice_mut(a), f32_slice(g))
    {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        unsafe { avx512::add_assign(a, g) };
        return;
    }
    *acc += g;
}

/// The f32 loops in AVX-512F intrinsics, with masked loads and stores for a partial last
/// vector.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::net::simd::x86::mask;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// `ys = a + b` (with `RELU`, `s > 0 ? s : 0`: 0 for NaN and −0, as the ReLU layer).
    #[target_feature(enable = "avx512f")]
    pub(super) fn sum2<const RELU: bool>(a: &[f32], b: &[f32], ys: &mut [MaybeUninit<f32>]) {
        let n = ys.len();
        assert!(a.len() >= n && b.len() >= n);
        let d = ys.as_mut_ptr().cast::<f32>();
        for k in (0..n).step_by(16) {
            let m = mask(n - k);
            // SAFETY: lanes below `n` of the three slices only.
            unsafe {
                let s = _mm512_add_ps(
                    _mm512_maskz_loadu_ps(m, a.as_ptr().add(k)),
                    _mm512_maskz_loadu_ps(m, b.as_ptr().add(k)),
                );
                let s = if RELU {
                    let pos = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(s, _mm512_setzero_ps());
                    _mm512_maskz_mov_ps(pos, s)
                } else {
                    s
                };
                _mm512_mask_storeu_ps(d.add(k), m, s);
            }
        }
    }

    /// `d1 = d2 = (y > 0 ? g : 0)`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn masked2(
        g: &[f32],
        y: &[f32],
        d1: &mut [MaybeUninit<f32>],
        d2: &mut [MaybeUninit<f32>],
    ) {
        let n = d1.len();
        assert!(g.len() >= n && y.len() >= n && d2.len() >= n);
        let (p1, p2) = (d1.as_mut_ptr().cast::<f32>(), d2.as_mut_ptr().cast::<f32>());
        for k in (0..n).step_by(16) {
            let m = mask(n - k);
            // SAFETY: lanes below `n` of the four slices only.
            unsafe {
                let yv = _mm512_maskz_loadu_ps(m, y.as_ptr().add(k));
                let pos = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(yv, _mm512_setzero_ps());
                let v = _mm512_maskz_loadu_ps(m & pos, g.as_ptr().add(k));
                _mm512_mask_storeu_ps(p1.add(k), m, v);
                _mm512_mask_storeu_ps(p2.add(k), m, v);
            }
        }
    }

    /// `a += g`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn add_assign(a: &mut [f32], g: &[f32]) {
        let n = a.len();
        assert!(g.len() >= n);
        let p = a.as_mut_ptr();
        for k in (0..n).step_by(16) {
            let m = mask(n - k);
            // SAFETY: lanes below `n` of both slices only.
            unsafe {
                let v = _mm512_add_ps(
                    _mm512_maskz_loadu_ps(m, p.add(k)),
                    _mm512_maskz_loadu_ps(m, g.as_ptr().add(k)),
                );
                _mm512_mask_storeu_ps(p.add(k), m, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::check_fused_relu;
    use crate::net::gradcheck::{Rng, check_layer};

    #[test]
    fn add_matches_finite_differences() {
        check_layer(&Add, &[vec![3, 2], vec![3, 2]], 2);
        check_layer(&Add, &[vec![4], vec![4], vec![4]], 3);
    }

    /// The sum with the next ReLU fused: the same bits as the sum and then the ReLU layer,
    /// on two contiguous inputs (one pass) and on three (the general path), f32 and f64.
    #[test]
    fn fused_relu_gives_the_same_bits_as_the_relu_layer() {
        let mut rng = Rng::new(3);
        for count in [2, 3] {
            let xs: Vec<ArrayD<f64>> = (0..count).map(|_| rng.array(&[4, 3, 5])).collect();
            let gy = rng.array(&[4, 3, 5]);
            let zeroed = check_fused_relu(&Add, &[], &xs, &gy);
            assert!(zeroed > 0.1 && zeroed < 0.9, "{zeroed}");
            let x32: Vec<ArrayD<f32>> = xs.iter().map(|x| x.mapv(|v| v as f32)).collect();
            check_fused_relu(&Add, &[], &x32, &gy.mapv(|v| v as f32));
        }
    }

    /// The executor's gradient sum gives ndarray's bits, for lengths around a vector's 16.
    #[test]
    fn accumulate_matches_ndarray() {
        let mut rng = Rng::new(5);
        for n in [1, 15, 16, 17, 40] {
            let a = rng.array(&[n, 3]).mapv(|v| v as f32);
            let g = rng.array(&[n, 3]).mapv(|v| v as f32);
            let mut fast = a.clone();
            accumulate(&mut fast, &g);
            let plain = &a + &g;
            let same = fast
                .iter()
                .zip(&plain)
                .all(|(u, v)| u.to_bits() == v.to_bits());
            assert!(same, "{n}");
            let mut a64 = a.mapv(f64::from);
            accumulate(&mut a64, &g.mapv(f64::from));
            assert_eq!(a64, a.mapv(f64::from) + g.mapv(f64::from));
        }
    }

    #[test]
    fn add_needs_matching_shapes() {
        let e = <Add as Layer<f32>>::out_shape(&Add, &[vec![3], vec![4]]).unwrap_err();
        assert!(e.contains("same shape"), "{e}");
        assert!(<Add as Layer<f32>>::out_shape(&Add, &[vec![3]]).is_err());
    }
}
