//! Branch-free f32 kernels for GELU (exact and tanh forms), forward and backward, written so
//! that the compiler vectorises them: an `exp` by range reduction and a polynomial, and the
//! normal CDF through `erfc(z) = t·Q(t)·exp(−z²)`, `t = 1/(1 + z/2)`, where Q is a degree-10
//! polynomial fitted for lca (NumPy/SciPy, relative least squares against
//! `scipy.special.erfcx(z)/t` on t ∈ (0, 1]; fit error 3.7e-8). The same `exp(−z²)` gives the
//! density for the derivative. Tails are computed directly, without cancellation:
//! Φ(x) = erfc(|x|/√2)/2 for x < 0.
//!
//! Accuracy against the f64 definitions (tests below): GELU within 2e-7·max(1, |x|), its
//! derivative within 4e-7·max(1, |x|) — the size of f32 rounding of the result. f64 always
//! takes the exact scalar path in [`super::activation`].
//!
//! ```
//! let x = [-1.5f32, 0.0, 0.3, 2.0];
//! let mut y = [0.0f32; 4];
//! lca::net::fastmath::gelu(&x, &mut y, false);
//! // torch.nn.functional.gelu in float64, rounded
//! for (a, b) in y.iter().zip([-0.100_210_8f32, 0.0, 0.185_373_43, 1.954_499_7]) {
//!     assert!((a - b).abs() < 3e-7, "{a} vs {b}");
//! }
//! ```

use std::any::TypeId;
use std::mem::MaybeUninit;

/// The slice as f32 when `T` is f32 (the kernels' fast path), `None` otherwise.
pub fn f32_slice<T: 'static>(s: &[T]) -> Option<&[f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: `T` is f32, so the slice's memory is a valid `[f32]` of the same length.
        Some(unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len()) })
    } else {
        None
    }
}

/// As [`f32_slice`], mutable.
pub fn f32_slice_mut<T: 'static>(s: &mut [T]) -> Option<&mut [f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: `T` is f32, and the mutable borrow of `s` is handed on unchanged.
        Some(unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) })
    } else {
        None
    }
}

/// As [`f32_slice_mut`], for an output not yet written (`[MaybeUninit<T>]`).
pub fn f32_uninit<T: 'static>(
    s: &mut [std::mem::MaybeUninit<T>],
) -> Option<&mut [std::mem::MaybeUninit<f32>]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: `T` is f32, so the memory is a valid `[MaybeUninit<f32>]` of the same length,
        // and the mutable borrow of `s` is handed on unchanged.
        Some(unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) })
    } else {
        None
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `k·LN2_HI` is exact for |k| < 2^15.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2^23: adding and subtracting it rounds an f32 of magnitude < 2^22 to an integer.
const ROUND: f32 = 12_582_912.0;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// Q(t) = erfcx(z)/t with t = 1/(1 + z/2), lowest degree first: a degree-10 relative
/// least-squares fit on t ∈ (0, 1] (fit error 3.7e-8), made for lca with NumPy/SciPy.
const ERFC_Q: [f32; 11] = [
    0.282_094_8,
    0.282_093_05,
    0.246_902_76,
    0.175_107_02,
    0.094_748_93,
    -0.063_891_86,
    0.142_715_53,
    -0.469_808_8,
    0.506_396_1,
    -0.240_779_46,
    0.044_421_95,
];

/// e^x for x in [−87.3, 88.3] (clamped outside), relative error below 2e-7.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    // k = round(x·log2 e) sits in the low mantissa bits of `kr` (integer ops only, so the
    // loop vectorises: no float-to-int conversion).
    let kr = x * LOG2E + ROUND;
    let k = kr - ROUND;
    let two_k = f32::from_bits(kr.to_bits().wrapping_sub(ROUND.to_bits() - 127) << 23);
    let r = x - k * LN2_HI - k * LN2_LO;
    // e^r on |r| ≤ 0.35: Taylor to r^7 (truncation below 6e-9).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * two_k
}

/// 1.5·2^52: adding and subtracting it rounds an f64 of magnitude < 2^51 to an integer.
const ROUND64: f64 = 6_755_399_441_055_744.0;
/// ln 2 split (fdlibm's) so that `k·LN2_HI64` is exact for |k| < 2^11.
const LN2_HI64: f64 = 6.931_471_803_691_238e-1;
const LN2_LO64: f64 = 1.908_214_929_270_587_7e-10;

/// e^x in f64 for x in [−708, 709] (clamped outside; NaN stays NaN), within 2 ulp of the
/// correctly rounded value (tested below): range reduction x = k·ln 2 + r, |r| ≤ ln 2 / 2,
/// and the Taylor polynomial of e^r to r^13 (truncation below 1e-17). Branch-free, so that
/// loops of it vectorise (unlike libm's `exp`).
#[inline(always)]
pub fn exp64(x: f64) -> f64 {
    let x = x.clamp(-708.0, 709.0);
    let kr = x * std::f64::consts::LOG2_E + ROUND64;
    let k = kr - ROUND64;
    let two_k = f64::from_bits(kr.to_bits().wrapping_sub(ROUND64.to_bits() - 1023) << 52);
    let r = x - k * LN2_HI64 - k * LN2_LO64;
    const C: [f64; 14] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5_040.0,
        1.0 / 40_320.0,
        1.0 / 362_880.0,
        1.0 / 3_628_800.0,
        1.0 / 39_916_800.0,
        1.0 / 479_001_600.0,
        1.0 / 6_227_020_800.0,
    ];
    let mut p = C[13];
    for &c in C[..13].iter().rev() {
        p = p * r + c;
    }
    p * two_k
}

/// `x ← exp(x)` ([`exp64`]) for every element, in vector registers (AVX-512 or AVX2 build
/// chosen at run time; the same bits as the baseline build: no fused multiply-adds).
pub fn exp64_in_place(x: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { exp64_avx512(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { exp64_avx2(x) };
    }
    exp64_body(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp64_avx512(x: &mut [f64]) {
    exp64_body(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp64_avx2(x: &mut [f64]) {
    exp64_body(x)
}

/// In blocks of 8, the last one padded (as [`exp_shifted`]).
#[inline(always)]
fn exp64_body(x: &mut [f64]) {
    const B: usize = 8;
    let mut blocks = x.chunks_exact_mut(B);
    for b in &mut blocks {
        for e in b.iter_mut() {
            *e = exp64(*e);
        }
    }
    let rest = blocks.into_remainder();
    if !rest.is_empty() {
        let mut buf = [0.0f64; B];
        buf[..rest.len()].copy_from_slice(rest);
        for e in buf.iter_mut() {
            *e = exp64(*e);
        }
        rest.copy_from_slice(&buf[..rest.len()]);
    }
}

/// [`exp`] with fused multiply-adds (`mul_add`: one rounding each, so every build gives the same
/// bits; the vector builds enable FMA, the baseline build calls libm's `fmaf`), for GELU: half
/// the arithmetic instructions of `exp`, whose loops were throughput-bound. The softmax keeps
/// `exp` (the generic attention path and the fused kernel's tests compare against it).
#[inline(always)]
fn exp_fma(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let kr = x.mul_add(LOG2E, ROUND);
    let k = kr - ROUND;
    let two_k = f32::from_bits(kr.to_bits().wrapping_sub(ROUND.to_bits() - 127) << 23);
    let r = (-k).mul_add(LN2_LO, (-k).mul_add(LN2_HI, x));
    const C: [f32; 8] = [
        1.0,
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
    ];
    let mut p = C[7];
    for &c in C[..7].iter().rev() {
        p = p.mul_add(r, c);
    }
    p * two_k
}

/// Φ(x) (the standard normal CDF) and φ(x) (its density), from one `exp`:
/// erfc(z) = t·Q(t)·e^{−z²} with z = |x|/√2, and φ(x) = e^{−z²}/√(2π). Horner's scheme and the
/// exponential in fused multiply-adds.
#[inline(always)]
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / z.mul_add(0.5, 1.0);
    let mut q = ERFC_Q[10];
    for &c in ERFC_Q[..10].iter().rev() {
        q = q.mul_add(t, c);
    }
    let e = exp_fma(-0.5 * x * x); // e^{−z²}, with z² = x²/2 rounded once
    let half_erfc = 0.5 * t * q * e;
    let cdf = if x < 0.0 { half_erfc } else { 1.0 - half_erfc };
    (cdf, FRAC_1_SQRT_2PI * e)
}

/// 1/(1 + e^{−2u}) = (1 + tanh u)/2.
#[inline(always)]
fn half_one_plus_tanh(x: f32) -> (f32, f32) {
    let u = SQRT_2_OVER_PI * (GELU_C * x * x).mul_add(x, x);
    (1.0 / (1.0 + exp_fma(-2.0 * u)), u)
}

/// `y = GELU(x)`: exact (`x·Φ(x)`) or, with `tanh`, PyTorch's tanh approximation.
pub fn gelu(x: &[f32], y: &mut [f32], tanh: bool) {
    gelu_uninit(x, as_uninit(y), tanh)
}

/// [`gelu`] into an output not yet written: every value of `y` is written.
pub fn gelu_uninit(x: &[f32], y: &mut [MaybeUninit<f32>], tanh: bool) {
    assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU supports AVX-512F and FMA (checked just above).
        return unsafe { gelu_avx512(x, y, tanh) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { gelu_avx2(x, y, tanh) };
    }
    gelu_body(x, y, tanh)
}

/// `dx = dy · GELU'(x)`.
pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32], tanh: bool) {
    gelu_backward_uninit(x, dy, as_uninit(dx), tanh)
}

/// [`gelu_backward`] into an output not yet written: every value of `dx` is written.
pub fn gelu_backward_uninit(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>], tanh: bool) {
    assert!(x.len() == dy.len() && x.len() == dx.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU supports AVX-512F and FMA (checked just above).
        return unsafe { gelu_backward_avx512(x, dy, dx, tanh) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { gelu_backward_avx2(x, dy, dx, tanh) };
    }
    gelu_backward_body(x, dy, dx, tanh)
}

/// [`gelu_uninit`] that also writes `d = GELU'(x)` (the derivative [`gelu_backward`] multiplies
/// by, the same bits: the same operations on the same `Φ(x)` and `φ(x)`, which forward computes
/// anyway), so that backward is the product `dy·d` ([`mul_uninit`]) instead of a second pass
/// of the CDF's polynomial and `exp`. Every value of `y` and `d` is written.
pub fn gelu_and_grad_uninit(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    d: &mut [MaybeUninit<f32>],
    tanh: bool,
) {
    assert!(x.len() == y.len() && x.len() == d.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU supports AVX-512F and FMA (checked just above).
        return unsafe { gelu_and_grad_avx512(x, y, d, tanh) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { gelu_and_grad_avx2(x, y, d, tanh) };
    }
    gelu_and_grad_body(x, y, d, tanh)
}

/// `out = a·b` element-wise, into an output not yet written (every value is written): GELU's
/// backward from the derivative [`gelu_and_grad_uninit`] saved.
pub fn mul_uninit(a: &[f32], b: &[f32], out: &mut [MaybeUninit<f32>]) {
    assert!(a.len() == b.len() && a.len() == out.len());
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        o.write(a * b);
    }
}

/// A written slice seen as one that may be written again (every value stays initialised:
/// callers only write `f32` values).
fn as_uninit(y: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`; the borrow is handed on unchanged,
    // and writing through it only stores initialised values.
    unsafe { std::slice::from_raw_parts_mut(y.as_mut_ptr().cast(), y.len()) }
}

/// Softmax of one row in place, stably: `e^(x − max) / Σ e^(x − max)` with this module's
/// `exp` and four-accumulator max and sum (the operations of the generic path in
/// [`super::attention`], in the same order, so both give the same bits).
pub fn softmax(row: &mut [f32]) {
    let n = row.len();
    softmax_prefix(row, n)
}

/// [`softmax`] of `row[..n]`, with the entries after `n` used as scratch (they hold garbage
/// afterwards): the `exp` loop runs on to the next multiple of 16 entries (or the row's end),
/// so that a short prefix, such as a causal attention row, is done in whole vector registers
/// instead of a scalar remainder loop. `row[..n]` gets the same bits as `softmax(&mut
/// row[..n])`.
pub fn softmax_prefix(row: &mut [f32], n: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { softmax_avx512(row, n) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { softmax_avx2(row, n) };
    }
    softmax_body(row, n)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax_avx2(row: &mut [f32], n: usize) {
    softmax_body(row, n)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(row: &mut [f32], n: usize) {
    softmax_body(row, n)
}

#[inline(always)]
fn softmax_body(row: &mut [f32], n: usize) {
    let m = max(&row[..n]);
    let ext = n.next_multiple_of(16).min(row.len());
    for e in row[..ext].iter_mut() {
        *e = exp(*e - m);
    }
    let row = &mut row[..n];
    let inv = 1.0 / sum(row);
    for e in row.iter_mut() {
        *e *= inv;
    }
}

/// The same loops compiled for 8-wide AVX2 (with FMA) and 16-wide AVX-512 registers. The
/// arithmetic per element is the same (fused multiply-adds exactly where the source asks for
/// them with `mul_add`), so the results are bit-identical to the baseline build's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(x: &[f32], y: &mut [MaybeUninit<f32>], tanh: bool) {
    gelu_body(x, y, tanh)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn gelu_avx512(x: &[f32], y: &mut [MaybeUninit<f32>], tanh: bool) {
    gelu_body(x, y, tanh)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_backward_avx2(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>], tanh: bool) {
    gelu_backward_body(x, dy, dx, tanh)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn gelu_backward_avx512(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>], tanh: bool) {
    gelu_backward_body(x, dy, dx, tanh)
}

#[inline(always)]
fn gelu_body(x: &[f32], y: &mut [MaybeUninit<f32>], tanh: bool) {
    if tanh {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(x * half_one_plus_tanh(x).0);
        }
    } else {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(x * normal_cdf_pdf(x).0);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_and_grad_avx2(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    d: &mut [MaybeUninit<f32>],
    tanh: bool,
) {
    gelu_and_grad_body(x, y, d, tanh)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn gelu_and_grad_avx512(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    d: &mut [MaybeUninit<f32>],
    tanh: bool,
) {
    gelu_and_grad_body(x, y, d, tanh)
}

/// GELU'(x) of the tanh form from `s = (1 + tanh u)/2`: d/dx [x·s(u)] = s + x·2s(1−s)·u'.
#[inline(always)]
fn gelu_tanh_grad(x: f32, s: f32) -> f32 {
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
    s + 2.0 * x * s * (1.0 - s) * du
}

/// [`gelu_body`] and the derivative of [`gelu_backward_body`], from one evaluation of the CDF.
#[inline(always)]
fn gelu_and_grad_body(
    x: &[f32],
    y: &mut [MaybeUninit<f32>],
    d: &mut [MaybeUninit<f32>],
    tanh: bool,
) {
    if tanh {
        for ((y, d), &x) in y.iter_mut().zip(d.iter_mut()).zip(x) {
            let (s, _) = half_one_plus_tanh(x);
            y.write(x * s);
            d.write(gelu_tanh_grad(x, s));
        }
    } else {
        for ((y, d), &x) in y.iter_mut().zip(d.iter_mut()).zip(x) {
            let (cdf, pdf) = normal_cdf_pdf(x);
            y.write(x * cdf);
            d.write(cdf + x * pdf);
        }
    }
}

#[inline(always)]
fn gelu_backward_body(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>], tanh: bool) {
    if tanh {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
            let (s, _) = half_one_plus_tanh(x);
            dx.write(g * gelu_tanh_grad(x, s));
        }
    } else {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
            let (cdf, pdf) = normal_cdf_pdf(x);
            dx.write(g * (cdf + x * pdf));
        }
    }
}

/// Sum with four independent accumulators (so that the loop vectorises), for any element type.
#[inline]
pub(crate) fn sum<T: super::Real>(xs: &[T]) -> T {
    let mut acc = [T::zero(); 4];
    let chunks = xs.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..4 {
            acc[k] += c[k];
        }
    }
    let mut s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    for &v in rest {
        s += v;
    }
    s
}

/// Σ a_i·b_i with four independent accumulators.
#[inline]
pub(crate) fn dot<T: super::Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 4];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    for (&x, &y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The largest element (−∞ for an empty slice; NaNs are skipped), with four accumulators.
#[inline]
pub(crate) fn max<T: super::Real>(xs: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 4];
    let chunks = xs.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..4 {
            if c[k] > acc[k] {
                acc[k] = c[k];
            }
        }
    }
    let mut m = acc[0];
    for &v in acc[1..].iter().chain(rest) {
        if v > m {
            m = v;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> Vec<f32> {
        (0..=300_000).map(|i| -15.0 + i as f32 * 1e-4).collect()
    }

    /// The largest relative error of `f` against f64's `exp` on a grid over [−87, 88].
    fn worst_exp_error(f: fn(f32) -> f32) -> f64 {
        (0..=200_000)
            .map(|i| {
                let x = -87.0 + i as f32 * (175.0 / 200_000.0);
                let want = (x as f64).exp();
                (f(x) as f64 - want).abs() / want
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn exp_is_accurate() {
        let worst = worst_exp_error(exp);
        assert!(worst < 2e-7, "{worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
    }

    /// GELU's `exp` in fused multiply-adds: as accurate as `exp`, the same clamping.
    #[test]
    fn exp_fma_is_accurate() {
        let worst = worst_exp_error(exp_fma);
        assert!(worst < 2e-7, "{worst}");
        assert_eq!(exp_fma(0.0), 1.0);
        assert!(exp_fma(-1000.0) >= 0.0 && exp_fma(-1000.0) < 1e-37);
        assert!(exp_fma(1000.0).is_finite() && exp_fma(1000.0) > 1e38);
    }

    /// The f64 `exp` against libm's: within 2 ulp over the whole range, exact at 0, and the
    /// vector builds give the baseline's bits.
    #[test]
    fn exp64_is_accurate_and_build_independent() {
        let xs: Vec<f64> = (0..=400_001)
            .map(|i| -708.0 + i as f64 * (1417.0 / 400_001.0))
            .chain([
                0.0, -0.0, 1e-300, -1e-17, 0.5, -0.5, 1.0, 700.0, 709.0, -708.0,
            ])
            .collect();
        let mut worst = 0.0f64;
        for &x in &xs {
            let (got, want) = (exp64(x), x.exp());
            let ulp = f64::EPSILON * want;
            worst = worst.max((got - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!(exp64(0.0), 1.0);
        assert!(exp64(f64::NAN).is_nan());
        assert!(exp64(-1e6) < 1e-307 && exp64(-1e6) >= 0.0);
        for len in [1, 7, 8, 9, 65, 1000] {
            let mut a: Vec<f64> = xs.iter().step_by(397).take(len).copied().collect();
            let mut b = a.clone();
            exp64_body(&mut a);
            exp64_in_place(&mut b);
            assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
            #[cfg(target_arch = "x86_64")]
            for (ok, f) in [
                (
                    std::arch::is_x86_feature_detected!("avx2"),
                    exp64_avx2 as unsafe fn(&mut [f64]),
                ),
                (std::arch::is_x86_feature_detected!("avx512f"), exp64_avx512),
            ] {
                if ok {
                    let mut c = xs
                        .iter()
                        .step_by(397)
                        .take(len)
                        .copied()
                        .collect::<Vec<_>>();
                    // SAFETY: the CPU supports the build's features (checked above).
                    unsafe { f(&mut c) };
                    assert!(a.iter().zip(&c).all(|(p, q)| p.to_bits() == q.to_bits()));
                }
            }
        }
    }

    #[test]
    fn gelu_matches_the_f64_definitions() {
        let x = grid();
        let g = vec![1.0f32; x.len()];
        for tanh in [false, true] {
            let mut y = vec![0.0; x.len()];
            let mut d = vec![0.0; x.len()];
            gelu(&x, &mut y, tanh);
            gelu_backward(&x, &g, &mut d, tanh);
            let (mut wy, mut wd) = (0.0f64, 0.0f64);
            for ((&x, &y), &d) in x.iter().zip(&y).zip(&d) {
                let xf = x as f64;
                let (fy, fd) = if tanh {
                    let u = 0.797_884_560_802_865_4 * (xf + 0.044_715 * xf.powi(3));
                    let t = u.tanh();
                    (
                        0.5 * xf * (1.0 + t),
                        0.5 * (1.0 + t)
                            + 0.5
                                * xf
                                * (1.0 - t * t)
                                * 0.797_884_560_802_865_4
                                * (1.0 + 3.0 * 0.044_715 * xf * xf),
                    )
                } else {
                    let cdf = 0.5 * (1.0 + libm::erf(xf / std::f64::consts::SQRT_2));
                    let pdf = (-0.5 * xf * xf).exp() / (2.0 * std::f64::consts::PI).sqrt();
                    (xf * cdf, cdf + xf * pdf)
                };
                let s = xf.abs().max(1.0);
                wy = wy.max((y as f64 - fy).abs() / s);
                wd = wd.max((d as f64 - fd).abs() / s);
            }
            assert!(wy < 2e-7, "tanh={tanh}: GELU error {wy:e}");
            assert!(wd < 4e-7, "tanh={tanh}: derivative error {wd:e}");
        }
    }

    /// Forward's saved derivative gives backward's bits: `y` is [`gelu`]'s and `dy·d` is
    /// [`gelu_backward`]'s, in every build the CPU can run, in the tails and at zero too.
    #[test]
    fn saved_derivative_gives_the_backward_bits() {
        let mut x = grid();
        x.extend([
            0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 1e4, -1e4, 88.0, -88.0, 1e30, -1e30,
        ]);
        let g: Vec<f32> = x.iter().map(|v| 0.5 - v * 0.1).collect();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let init = |v: Vec<MaybeUninit<f32>>| -> Vec<f32> {
            // SAFETY: every caller passes a buffer the kernel under test wrote in full.
            v.into_iter().map(|u| unsafe { u.assume_init() }).collect()
        };
        type Build = unsafe fn(&[f32], &mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>], bool);
        let mut builds: Vec<Build> = vec![gelu_and_grad_uninit, |x, y, d, t| {
            gelu_and_grad_body(x, y, d, t)
        }];
        #[cfg(target_arch = "x86_64")]
        {
            let fma = std::arch::is_x86_feature_detected!("fma");
            if std::arch::is_x86_feature_detected!("avx2") && fma {
                builds.push(gelu_and_grad_avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") && fma {
                builds.push(gelu_and_grad_avx512);
            }
        }
        for tanh in [false, true] {
            let (mut y0, mut dx0) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
            gelu(&x, &mut y0, tanh);
            gelu_backward(&x, &g, &mut dx0, tanh);
            for build in &builds {
                let mut y = vec![MaybeUninit::<f32>::uninit(); x.len()];
                let mut d = vec![MaybeUninit::<f32>::uninit(); x.len()];
                // SAFETY: the builds pushed above run on this CPU (checked where pushed).
                unsafe { build(&x, &mut y, &mut d, tanh) };
                let (y, d) = (init(y), init(d));
                let mut dx = vec![MaybeUninit::<f32>::uninit(); x.len()];
                mul_uninit(&g, &d, &mut dx);
                assert_eq!(bits(&y), bits(&y0), "tanh={tanh}: output");
                assert_eq!(bits(&init(dx)), bits(&dx0), "tanh={tanh}: input gradient");
            }
        }
    }

    /// The AVX2 build of the loops gives the baseline build's bits.
    #[test]
    fn vector_widths_agree_bitwise() {
        let x = grid();
        let g: Vec<f32> = x.iter().map(|v| 0.5 - v * 0.1).collect();
        for tanh in [false, true] {
            let (mut a, mut b) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
            gelu_body(&x, as_uninit(&mut a), tanh);
            gelu(&x, &mut b, tanh);
            assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
            // Into memory not yet written: every value is written, the same bits.
            let mut u = vec![MaybeUninit::<f32>::uninit(); x.len()];
            gelu_uninit(&x, &mut u, tanh);
            // SAFETY: `gelu_uninit` wrote every value.
            assert!(
                a.iter()
                    .zip(&u)
                    .all(|(p, q)| p.to_bits() == unsafe { q.assume_init() }.to_bits())
            );
            gelu_backward_body(&x, &g, as_uninit(&mut a), tanh);
            gelu_backward(&x, &g, &mut b, tanh);
            assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
            // Each SIMD build the CPU can run, not only the one the dispatch picks.
            #[cfg(target_arch = "x86_64")]
            for (ok, f, fb) in [
                (
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma"),
                    gelu_avx2 as unsafe fn(&[f32], &mut [MaybeUninit<f32>], bool),
                    gelu_backward_avx2 as unsafe fn(&[f32], &[f32], &mut [MaybeUninit<f32>], bool),
                ),
                (
                    std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("fma"),
                    gelu_avx512,
                    gelu_backward_avx512,
                ),
            ] {
                if !ok {
                    continue;
                }
                gelu_body(&x, as_uninit(&mut a), tanh);
                // SAFETY: the CPU supports the build's features (checked above).
                unsafe { f(&x, as_uninit(&mut b), tanh) };
                assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
                gelu_backward_body(&x, &g, as_uninit(&mut a), tanh);
                // SAFETY: as above.
                unsafe { fb(&x, &g, as_uninit(&mut b), tanh) };
                assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
            }
        }
    }

    /// The f32 softmax: the AVX2 and baseline builds give the same bits, and every row of
    /// lengths 1..=70 (scores up to ±60) is within f32 rounding of the f64 definition: 3e-7
    /// relative, plus the rounding of `x − max` in f32 (6e-8·|x − max| relative, as for any f32
    /// softmax), plus 1.3e-38 absolute (`exp` clamps its argument at −87.3: e^−87.3 = 1.2e-38).
    #[test]
    fn softmax_matches_the_f64_definition() {
        let mut rng = crate::net::gradcheck::Rng::new(11);
        for len in 1..=70 {
            for spread in [0.1, 3.0, 60.0] {
                let x: Vec<f32> = (0..len)
                    .map(|_| (rng.array(&[1])[[0]] * spread) as f32)
                    .collect();
                let (mut a, mut b) = (x.clone(), x.clone());
                softmax_body(&mut a, len);
                #[cfg(target_arch = "x86_64")]
                for (ok, f) in [
                    (
                        std::arch::is_x86_feature_detected!("avx2"),
                        softmax_avx2 as unsafe fn(&mut [f32], usize),
                    ),
                    (
                        std::arch::is_x86_feature_detected!("avx512f"),
                        softmax_avx512,
                    ),
                ] {
                    if ok {
                        let mut c = x.clone();
                        // SAFETY: the CPU supports the build's features (checked above).
                        unsafe { f(&mut c, len) };
                        assert!(a.iter().zip(&c).all(|(p, q)| p.to_bits() == q.to_bits()));
                    }
                }
                softmax(&mut b);
                assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
                let m = x
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
                let e: Vec<f64> = x.iter().map(|&v| (f64::from(v) - m).exp()).collect();
                let s: f64 = e.iter().sum();
                for ((got, want), &v) in b.iter().zip(e.iter().map(|v| v / s)).zip(&x) {
                    let err = (f64::from(*got) - want).abs();
                    let tol = want * (3e-7 + 1e-7 * (m - f64::from(v))) + 1.3e-38;
                    assert!(err <= tol, "len {len}: {got} vs {want}");
                }
            }
        }
    }

    /// `softmax_prefix` gives `row[..n]` the bits of the softmax of that prefix alone, whatever
    /// follows it (large scores, NaN), for every prefix length of rows up to 40.
    #[test]
    fn softmax_prefix_equals_softmax_of_the_prefix() {
        let mut rng = crate::net::gradcheck::Rng::new(3);
        for len in 1..=40usize {
            let x: Vec<f32> = (0..len)
                .map(|i| match i % 11 {
                    7 => 200.0,
                    9 => f32::NAN,
                    _ => (rng.array(&[1])[[0]] * 5.0) as f32,
                })
                .collect();
            for n in 1..=len {
                if x[..n].iter().any(|v| v.is_nan()) {
                    continue;
                }
                let mut want = x[..n].to_vec();
                softmax(&mut want);
                let mut got = x.clone();
                softmax_prefix(&mut got, n);
                assert!(
                    want.iter()
                        .zip(&got)
                        .all(|(p, q)| p.to_bits() == q.to_bits()),
                    "len {len}, n {n}"
                );
            }
        }
    }

    #[test]
    fn reductions() {
        let v: Vec<f64> = (0..11).map(|i| (i as f64 - 4.5).powi(2)).collect();
        assert_eq!(sum(&v), v.iter().sum::<f64>());
        assert_eq!(max(&v), 30.25);
        assert_eq!(dot(&v, &v), v.iter().map(|x| x * x).sum::<f64>());
        assert_eq!(max::<f32>(&[]), f32::NEG_INFINITY);
        assert_eq!(sum::<f32>(&[1.5]), 1.5);
    }

    #[test]
    fn tails_are_relative_accurate() {
        // Φ(−6) = 9.865876450377e-10: no cancellation on the negative side.
        let mut y = [0.0f32];
        gelu(&[-6.0], &mut y, false);
        let want = -6.0 * 9.865_876_450_377e-10;
        assert!(((y[0] as f64 - want) / want).abs() < 1e-6, "{}", y[0]);
    }
}
