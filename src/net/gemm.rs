//! The matrix product every layer uses: the pure-Rust `gemm` crate, whose kernels (SSE, AVX2
//! with FMA, AVX-512) are chosen at run time from the CPU's features, so one build runs at the
//! best speed on any x86-64 machine. Products are single-threaded: the evaluator already runs
//! one chunk per thread. For a given CPU the result does not depend on the thread count.
//!
//! ```
//! use lca::net::gemm::mat_mul;
//! use ndarray::{arr2, Array2};
//! let a = arr2(&[[1.0f32, 2.0], [3.0, 4.0]]);
//! let mut c = Array2::<f32>::zeros((2, 2));
//! mat_mul(a.view(), a.t(), false, c.view_mut());
//! assert_eq!(c, arr2(&[[5.0, 11.0], [11.0, 25.0]]));
//! ```

use super::Real;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, ShapeBuilder};
use std::any::TypeId;

/// `c = a·b`, or `c += a·b` when `accumulate`; the views may have any strides.
///
/// # Panics
/// If the shapes do not chain (`a` is m×k, `b` k×n, `c` m×n).
pub fn mat_mul<T: Real>(a: ArrayView2<T>, b: ArrayView2<T>, accumulate: bool, c: ArrayViewMut2<T>) {
    mat_mul_scaled(T::one(), a, b, accumulate, c);
}

/// `c = α·a·b`, or `c += α·a·b` when `accumulate`; the views may have any strides. The scale
/// is applied inside the product (`gemm`'s β), so it costs no extra pass over `c`. With
/// `alpha == 1` this is exactly [`mat_mul`].
///
/// # Panics
/// If the shapes do not chain (`a` is m×k, `b` k×n, `c` m×n).
pub fn mat_mul_scaled<T: Real>(
    alpha: T,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    accumulate: bool,
    mut c: ArrayViewMut2<T>,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    assert!(
        b.nrows() == k && c.dim() == (m, n),
        "mat_mul: {:?}·{:?} into {:?}",
        a.dim(),
        b.dim(),
        c.dim()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(T::zero());
        }
        return;
    }
    let supported =
        TypeId::of::<T>() == TypeId::of::<f32>() || TypeId::of::<T>() == TypeId::of::<f64>();
    if !supported {
        let beta = if accumulate { T::one() } else { T::zero() };
        ndarray::linalg::general_mat_mul(alpha, &a, &b, beta, &mut c);
        return;
    }
    let cs = c.strides().to_vec();
    // SAFETY: `c` is a live m×n view described by its pointer and strides, borrowed mutably,
    // so it overlaps neither `a` nor `b`, whose shapes were checked above.
    unsafe { raw_gemm(c.as_mut_ptr(), cs[0], cs[1], accumulate, alpha, &a, &b) };
}

/// `dst = α·a·b` (or `dst += α·a·b` with `read_dst`) through the `gemm` crate, for f32 or
/// f64, single-threaded.
///
/// # Safety
/// `T` is f32 or f64; `dst` points to `a.nrows() × b.ncols()` values at row stride `dst_rs`
/// and column stride `dst_cs`, writable and overlapping neither `a` nor `b`; `a.ncols() ==
/// b.nrows()`. With `read_dst == false` `gemm` writes every value without reading it, so they
/// may be uninitialised.
unsafe fn raw_gemm<T: Real>(
    dst: *mut T,
    dst_rs: isize,
    dst_cs: isize,
    read_dst: bool,
    alpha: T,
    a: &ArrayView2<T>,
    b: &ArrayView2<T>,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    let (as_, bs) = (a.strides(), b.strides());
    // SAFETY: the caller's contract; `a` and `b` are live views described by their pointers
    // and strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            read_dst,
            a.as_ptr(),
            as_[1],
            as_[0],
            b.as_ptr(),
            bs[1],
            bs[0],
            T::one(),
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `out = α·a·b` into `out` (`m×n`, row-major) not yet written: the product writes every
/// entry without reading any (for f32 and f64; other types clear `out` first), so a caller
/// can skip clearing a fresh buffer.
///
/// # Panics
/// If the shapes do not chain or `out` does not hold m·n values.
pub fn mat_mul_uninit<T: Real>(
    alpha: T,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    out: &mut [std::mem::MaybeUninit<T>],
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    assert!(
        b.nrows() == k && out.len() == m * n,
        "mat_mul_uninit: {:?}·{:?} into {} values",
        a.dim(),
        b.dim(),
        out.len()
    );
    let supported =
        TypeId::of::<T>() == TypeId::of::<f32>() || TypeId::of::<T>() == TypeId::of::<f64>();
    if !supported || k == 0 || m == 0 || n == 0 {
        for v in out.iter_mut() {
            v.write(T::zero());
        }
        // SAFETY: every value was written just above.
        let c = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<T>(), m * n) };
        let c = ArrayViewMut2::from_shape((m, n), c).expect("sizes match");
        mat_mul_scaled(alpha, a, b, false, c);
        return;
    }
    // SAFETY: `out` holds m·n values (checked above), written row-major (row stride n, column
    // stride 1) and borrowed mutably, so it overlaps neither `a` nor `b`; `T` is f32 or f64.
    unsafe {
        raw_gemm(
            out.as_mut_ptr().cast::<T>(),
            n as isize,
            1,
            false,
            alpha,
            &a,
            &b,
        )
    };
}

/// `x·wᵀ` (`x` `[rows, in]`, `w` `[out, in]`, PyTorch's layout) into `out` not yet written,
/// as [`mat_mul_uninit`]`(1, x, w.t(), out)` with the same bits. Where `w` is wide, tall and
/// at most 1 MiB ([`transpose_pays`]) the product reads a transposed copy of `w` made here:
/// otherwise `gemm` packs `wᵀ` one value at a time along a stride of `in` values, which cost
/// up to a fifth of the product (`[512, 512]·[128, 512]ᵀ`, a C = 128 GPT's MLP output
/// projection: 710 µs through the strided view, 598 µs with the copy included; one thread,
/// AMD EPYC, `examples/bench_wt.rs`). `gemm` runs the same multiply-adds in the same order
/// for either layout.
pub fn mat_mul_wt_uninit<T: Real>(
    x: ArrayView2<T>,
    w: ArrayView2<T>,
    out: &mut [std::mem::MaybeUninit<T>],
) {
    let (n, k) = w.dim();
    if !transpose_pays(n, k) {
        return mat_mul_uninit(T::one(), x, w.t(), out);
    }
    let wt = transposed(w);
    mat_mul_uninit(T::one(), x, wt.view(), out)
}

/// Whether [`mat_mul_wt_uninit`] copies `w` (`out × in`) transposed first: at `in ≥ 512`,
/// `out ≥ 128` and at most 2¹⁸ values (1 MiB of f32). Timed on one thread by
/// `examples/bench_wt.rs` (AMD EPYC, Zen 4; copy included; rows 250, 512 and 1,375): the
/// copy took 0.68–0.95 of the strided product's
/// time for `in × out` 512 × 128, 2048 × 128 and 512 × 512, and 1.06–1.08 for 784 × 1000
/// (3 MiB), which the size bound leaves out; below the other bounds (128 × 65, 128 × 384,
/// 128 × 512, 400 × 120, 120 × 84, 512 × 10, 784 × 100) it was 0.94–1.05, mostly ≈ 1.
pub fn transpose_pays(out: usize, inp: usize) -> bool {
    inp >= 512 && out >= 128 && inp * out <= 1 << 18
}

/// `wᵀ` as a fresh standard-layout array, by 16 × 16 tiles (each tile's source rows stay in
/// cache while it is written); in f32 on a CPU with AVX-512F the whole tiles are transposed
/// in registers ([`super::simd::x86::transpose16`]). A copy: the same values.
pub fn transposed<T: Real>(w: ArrayView2<T>) -> Array2<T> {
    const B: usize = 16;
    let (n, k) = w.dim();
    let w = w.as_standard_layout();
    let src = w.as_slice().expect("standard layout");
    let mut t = Array2::<T>::uninit((k, n));
    let dst = t.as_slice_mut().expect("a fresh array is contiguous");
    #[cfg(target_arch = "x86_64")]
    let registers = std::arch::is_x86_feature_detected!("avx512f");
    for j0 in (0..n).step_by(B) {
        for k0 in (0..k).step_by(B) {
            let (nj, nk) = ((n - j0).min(B), (k - k0).min(B));
            #[cfg(target_arch = "x86_64")]
            if registers
                && nj == B
                && nk == B
                && let (Some(s), Some(d)) = (
                    super::fastmath::f32_slice(src),
                    super::fastmath::f32_uninit(&mut *dst),
                )
            {
                // SAFETY: the CPU supports AVX-512F (`registers`, checked before the loops);
                // the tile's 16 rows of 16 lie inside both arrays (nj = nk = 16).
                unsafe { x86_tile(s, k, j0, k0, d, n) };
                continue;
            }
            for j in j0..j0 + nj {
                let row = &src[j * k + k0..j * k + k0 + nk];
                for (kk, &v) in (k0..k0 + nk).zip(row) {
                    dst[kk * n + j].write(v);
                }
            }
        }
    }
    // SAFETY: the tiles cover every (kk, j) of the k × n array once.
    unsafe { t.assume_init() }
}

/// One whole 16 × 16 tile of [`transposed`] in registers: rows `j0..j0+16`, columns
/// `k0..k0+16` of `src` (row stride `k`) to rows `k0..` , columns `j0..` of `dst` (stride `n`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn x86_tile(
    src: &[f32],
    k: usize,
    j0: usize,
    k0: usize,
    dst: &mut [std::mem::MaybeUninit<f32>],
    n: usize,
) {
    use std::arch::x86_64::*;
    let mut r = [_mm512_setzero_ps(); 16];
    for (a, r) in r.iter_mut().enumerate() {
        let row = &src[(j0 + a) * k + k0..(j0 + a) * k + k0 + 16];
        // SAFETY: `row` holds the 16 values read.
        *r = unsafe { _mm512_loadu_ps(row.as_ptr()) };
    }
    super::simd::x86::transpose16(&mut r);
    for (l, r) in r.iter().enumerate() {
        let out = &mut dst[(k0 + l) * n + j0..(k0 + l) * n + j0 + 16];
        // SAFETY: `out` holds the 16 values written.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().cast::<f32>(), *r) };
    }
}

/// `dst = a·b` into `m×n` values at row stride `rs` and column stride `cs` not yet written:
/// the product writes every entry without reading any (for f32 and f64; other types write
/// zeros first), so a caller can write straight into a fresh array in any layout.
///
/// # Safety
/// `dst` points to `a.nrows() × b.ncols()` writable values at strides `rs`, `cs` (no two
/// entries at one address), overlapping neither `a` nor `b`.
///
/// # Panics
/// If the shapes do not chain.
pub(crate) unsafe fn mat_mul_strided_uninit<T: Real>(
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    dst: *mut T,
    rs: isize,
    cs: isize,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    assert!(b.nrows() == k, "mat_mul: {:?}·{:?}", a.dim(), b.dim());
    if m == 0 || n == 0 {
        return;
    }
    let supported =
        TypeId::of::<T>() == TypeId::of::<f32>() || TypeId::of::<T>() == TypeId::of::<f64>();
    if !supported || k == 0 {
        for i in 0..m as isize {
            for j in 0..n as isize {
                // SAFETY: the caller's contract: entry (i, j) is inside `dst`.
                unsafe { dst.offset(i * rs + j * cs).write(T::zero()) };
            }
        }
        // SAFETY: every entry was written just above; the caller's contract otherwise.
        let c = unsafe {
            ArrayViewMut2::from_shape_ptr((m, n).strides((rs as usize, cs as usize)), dst)
        };
        mat_mul(a, b, false, c);
        return;
    }
    // SAFETY: the caller's contract; `T` is f32 or f64 and the shapes chain.
    unsafe { raw_gemm(dst, rs, cs, false, T::one(), &a, &b) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::Rng;
    use ndarray::{Array2, Ix2, s};

    /// The product through the transposed copy has the bits of the product with the strided
    /// `wᵀ`, at shapes on both sides of [`transpose_pays`] (ragged tiles included), in f32
    /// and f64.
    #[test]
    fn transposed_copy_gives_the_same_bits() {
        for (rows, out, inp) in [
            (7, 128, 512),
            (512, 128, 512),
            (33, 130, 517),
            (5, 300, 1030),
            (9, 65, 128),
        ] {
            let (x, w) = (random(rows, inp, 1), random(out, inp, 2));
            assert_eq!(transposed(w.view()), w.t());
            assert_same_product(&x, &w);
            assert_same_product(&x.mapv(|v| v as f32), &w.mapv(|v| v as f32));
        }
    }

    /// `mat_mul_wt_uninit(x, w)` and `mat_mul_uninit(1, x, wᵀ)` write the same bits.
    fn assert_same_product<T: Real>(x: &Array2<T>, w: &Array2<T>) {
        let n = x.nrows() * w.nrows();
        let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
        a.resize_with(n, std::mem::MaybeUninit::uninit);
        b.resize_with(n, std::mem::MaybeUninit::uninit);
        mat_mul_wt_uninit(x.view(), w.view(), &mut a);
        mat_mul_uninit(T::one(), x.view(), w.t(), &mut b);
        // SAFETY: both products wrote every value.
        let bits = |v: &[std::mem::MaybeUninit<T>]| -> Vec<u64> {
            v.iter()
                .map(|u| unsafe { u.assume_init() }.f64().to_bits())
                .collect()
        };
        assert_eq!(bits(&a), bits(&b), "{:?}·{:?}ᵀ", x.dim(), w.dim());
    }

    fn random(r: usize, c: usize, seed: u64) -> Array2<f64> {
        Rng::new(seed)
            .array(&[r, c])
            .into_dimensionality::<Ix2>()
            .unwrap()
    }

    /// Products of transposed, strided and odd-sized views against a naive triple loop, in f64
    /// and f32, writing and accumulating.
    #[test]
    fn matches_naive_product_for_any_layout() {
        for &(m, k, n) in &[(1, 1, 1), (7, 13, 5), (33, 70, 17), (130, 9, 64)] {
            let a = random(m, k, 1);
            let bt = random(n, k, 2); // b = btᵀ, a transposed view
            let big = random(2 * m, 3 * k, 3); // a strided view
            for (av, bv) in [
                (a.view(), bt.t()),
                (big.slice(s![..;2, ..;3]), bt.t()),
                (a.view(), bt.t().to_owned().view()),
            ] {
                let mut want = Array2::<f64>::zeros((m, n));
                for i in 0..m {
                    for j in 0..n {
                        want[[i, j]] = (0..k).map(|l| av[[i, l]] * bv[[l, j]]).sum();
                    }
                }
                let mut c = Array2::<f64>::ones((m, n));
                mat_mul(av, bv, false, c.view_mut());
                assert!((&c - &want).iter().all(|d| d.abs() < 1e-12));
                mat_mul(av, bv, true, c.view_mut());
                assert!((&c - &(&want * 2.0)).iter().all(|d| d.abs() < 1e-12));
                // f32, into a transposed (column-major) destination.
                let (af, bf) = (av.mapv(|v| v as f32), bv.mapv(|v| v as f32));
                let mut cf = Array2::<f32>::zeros((n, m));
                mat_mul(af.view(), bf.view(), false, cf.view_mut().reversed_axes());
                let err = (&cf.t().mapv(f64::from) - &want)
                    .iter()
                    .fold(0.0f64, |e, d| e.max(d.abs()));
                assert!(err < 1e-4 * k as f64, "{err}");
            }
        }
    }

    /// The scaled product equals the scale times the plain one, writing and accumulating, in
    /// f64 and f32; with α = 1 it is the plain product bit for bit.
    #[test]
    fn scaled_product_is_alpha_times_product() {
        let (a, bt) = (random(19, 23, 4), random(11, 23, 5));
        let mut plain = Array2::<f64>::zeros((19, 11));
        mat_mul(a.view(), bt.t(), false, plain.view_mut());
        let mut c = Array2::<f64>::ones((19, 11));
        mat_mul_scaled(0.125, a.view(), bt.t(), false, c.view_mut());
        assert!((&c - &(&plain * 0.125)).iter().all(|d| d.abs() < 1e-13));
        mat_mul_scaled(-0.5, a.view(), bt.t(), true, c.view_mut());
        assert!((&c - &(&plain * -0.375)).iter().all(|d| d.abs() < 1e-13));
        let (af, btf) = (a.mapv(|v| v as f32), bt.mapv(|v| v as f32));
        let mut p32 = Array2::<f32>::zeros((19, 11));
        let mut s32 = Array2::<f32>::ones((19, 11));
        mat_mul(af.view(), btf.t(), false, p32.view_mut());
        mat_mul_scaled(1.0, af.view(), btf.t(), false, s32.view_mut());
        assert_eq!(p32, s32);
        mat_mul_scaled(0.25, af.view(), btf.t(), false, s32.view_mut());
        assert!((&s32 - &(&p32 * 0.25)).iter().all(|d| d.abs() < 1e-5));
    }

    /// The product into unwritten memory equals the ordinary one bit for bit (f32, f64), for
    /// transposed views and an empty inner dimension.
    #[test]
    fn product_into_uninit_memory_equals_mat_mul() {
        fn run<T: Real>(a: ArrayView2<T>, b: ArrayView2<T>) {
            let (m, n) = (a.nrows(), b.ncols());
            let mut want = Array2::<T>::from_elem((m, n), T::one());
            mat_mul_scaled(T::of(0.5), a, b, false, want.view_mut());
            let mut out = vec![std::mem::MaybeUninit::<T>::uninit(); m * n];
            mat_mul_uninit(T::of(0.5), a, b, &mut out);
            // SAFETY: mat_mul_uninit writes every value.
            let got: Vec<T> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert_eq!(got, want.into_raw_vec_and_offset().0);
        }
        for &(m, k, n) in &[(1, 1, 1), (7, 13, 5), (33, 70, 17), (4, 0, 3)] {
            let (a, bt) = (random(m, k, 6), random(n, k, 7));
            run(a.view(), bt.t());
            let (af, btf) = (a.mapv(|v| v as f32), bt.mapv(|v| v as f32));
            run(af.view(), btf.t());
        }
    }

    #[test]
    fn empty_inner_dimension_gives_zeros() {
        let a = Array2::<f32>::zeros((3, 0));
        let b = Array2::<f32>::zeros((0, 2));
        let mut c = Array2::<f32>::ones((3, 2));
        mat_mul(a.view(), b.view(), true, c.view_mut());
        assert!(c.iter().all(|&v| v == 1.0));
        mat_mul(a.view(), b.view(), false, c.view_mut());
        assert!(c.iter().all(|&v| v == 0.0));
    }
}
