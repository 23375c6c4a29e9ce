//! Pooling on NCHW batches, with PyTorch's semantics (no ceil mode):
//!
//! - [`MaxPool2d`]: padding counts as −∞. The gradient goes to the arg-max of each window,
//!   chosen as PyTorch's CPU kernel does: the first maximum in scan order (row by row), and a
//!   NaN wins over any number (the last NaN of the window). Backward repeats the scan instead
//!   of storing indices.
//! - [`AvgPool2d`]: with `count_include_pad` (PyTorch's default) every window divides by
//!   `kh·kw`; without, by the number of its taps inside the input; `divisor_override` replaces
//!   both.
//! - [`AdaptiveAvgPool2d`]: PyTorch's adaptive windows `⌊i·H/oh⌋ .. ⌈(i+1)·H/oh⌉`; with
//!   `flatten` (the spec's `global_avg_pool`) a 1×1 output is returned as `[C]`.
//!
//! ```
//! use lca::net::{conv::Window2d, pool::MaxPool2d, Layer, Saved};
//! use ndarray::{Array4, ArrayD};
//! let pool = MaxPool2d { window: Window2d::new([2, 2], [2, 2], [1, 1], [0, 0], [0, 0]) };
//! let x: ArrayD<f32> = Array4::from_shape_fn((1, 1, 2, 4), |(_, _, i, j)| (4 * i + j) as f32).into_dyn();
//! assert_eq!(<MaxPool2d as Layer<f32>>::out_shape(&pool, &[vec![1, 2, 4]]).unwrap(), vec![1, 1, 2]);
//! let y = pool.forward(&[], &[x.view()], &mut Saved::None);
//! assert_eq!(y.as_slice().unwrap(), &[5.0, 7.0]);
//! ```

use super::conv::{Window2d, chw};
use super::{Backward, Layer, Real, Saved};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use std::mem::MaybeUninit;

/// Number of planes (samples × channels) and their (height, width) in an NCHW batch.
fn planes<T>(x: &ArrayViewD<T>) -> (usize, [usize; 2]) {
    let s = x.shape();
    (s[0] * s[1], [s[2], s[3]])
}

/// `nn.MaxPool2d`.
#[derive(Debug, Clone)]
pub struct MaxPool2d {
    pub window: Window2d,
}

/// The in-range taps of every output position along axis `a` of a window, as input offsets
/// times `scale` (the row length for rows, 1 for columns).
fn taps(win: &Window2d, a: usize, n: usize, out: usize, scale: usize) -> Vec<Vec<usize>> {
    (0..out)
        .map(|o| {
            (0..win.kernel[a])
                .filter_map(|k| {
                    let p = win.input_pos(a, o, k);
                    (p >= 0 && (p as usize) < n).then(|| p as usize * scale)
                })
                .collect()
        })
        .collect()
}

impl MaxPool2d {
    /// Windows that tile the input without overlap or padding (stride = kernel, dilation 1,
    /// no padding: the usual 2×2 pooling), for which [`MaxPool2d::scan_tiled`] applies.
    fn tiled(&self) -> bool {
        let w = &self.window;
        w.stride == w.kernel && w.dilation == [1, 1] && w.pad_begin == [0, 0] && w.pad_end == [0, 0]
    }

    /// [`MaxPool2d::scan`] for tiled windows: the same choice of maximum (first in scan
    /// order, a NaN wins), with the window's taps read directly.
    fn scan_tiled<T: Real>(
        &self,
        xs: &[T],
        np: usize,
        hw: [usize; 2],
        mut f: impl FnMut(usize, usize),
    ) {
        let [kh, kw] = self.window.kernel;
        let [oh, ow] = self.window.out_checked(hw[0], hw[1]);
        let (h, w) = (hw[0], hw[1]);
        let mut o = 0;
        for p in 0..np {
            let base = p * h * w;
            let plane = &xs[base..base + h * w];
            for oy in 0..oh {
                let row0 = oy * kh * w;
                for ox in 0..ow {
                    let first = row0 + ox * kw;
                    let mut best = plane[first];
                    let mut at = first;
                    for ky in 0..kh {
                        let r = row0 + ky * w + ox * kw;
                        for (kx, &v) in plane[r..r + kw].iter().enumerate() {
                            if ky == 0 && kx == 0 {
                                continue;
                            }
                            let better = (v > best) | v.is_nan();
                            best = if better { v } else { best };
                            at = if better { r + kx } else { at };
                        }
                    }
                    f(o, base + at);
                    o += 1;
                }
            }
        }
    }

    /// Forward and backward of tiled 2×2 windows (the usual `MaxPool2d(2)`), written so that
    /// the compiler vectorises them across a row (in an AVX2 build chosen at run time when the
    /// CPU has it: compares and selects only, so the bits do not depend on the build): the
    /// same maxima as [`MaxPool2d::scan`] (taps in scan order, `v > best || isnan(v)` moves).
    /// Backward writes every input of a window (its gradient or 0), so `gx` needs no clearing
    /// where windows cover it.
    fn pool2x2<T: Real>(
        xs: &[T],
        np: usize,
        hw: [usize; 2],
        out: &mut [T],
        backward: Option<(&[T], &mut [std::mem::MaybeUninit<T>])>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            use super::fastmath::{f32_slice, f32_slice_mut, f32_uninit};
            if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
                let f32s = "T is f32";
                let xf = f32_slice(xs).expect(f32s);
                let of = f32_slice_mut(out).expect(f32s);
                let bf = backward
                    .map(|(gy, gx)| (f32_slice(gy).expect(f32s), f32_uninit(gx).expect(f32s)));
                // SAFETY: the CPU supports AVX2 (checked just above).
                unsafe { pool2x2_f32_avx2(xf, np, hw, of, bf) };
                return;
            }
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { pool2x2_avx2(xs, np, hw, out, backward) };
            return;
        }
        pool2x2_impl(xs, np, hw, out, backward);
    }

    /// [`MaxPool2d::scan`] one window at a time: the same maxima (the window's in-range taps in
    /// scan order from −∞, moving on `v > max || isnan(v)`), with each output's running
    /// maximum in a register instead of a row of them in memory, and every window's in-range
    /// taps listed once per call as plane offsets (ResNet's 3×3 stride-2 pool of 16×16
    /// planes: about 4× faster).
    fn scan_windows<T: Real>(
        &self,
        xs: &[T],
        np: usize,
        hw: [usize; 2],
        mut f: impl FnMut(usize, usize),
    ) {
        let win = &self.window;
        let [oh, ow] = win.out_checked(hw[0], hw[1]);
        let rows = taps(win, 0, hw[0], oh, hw[1]);
        let cols = taps(win, 1, hw[1], ow, 1);
        // Output o's taps are offs[ends[o - 1]..ends[o]], in scan order.
        let mut offs: Vec<u32> = Vec::new();
        let mut ends: Vec<usize> = Vec::with_capacity(oh * ow);
        for r in &rows {
            for c in &cols {
                for &ry in r {
                    offs.extend(c.iter().map(|&cx| (ry + cx) as u32));
                }
                ends.push(offs.len());
            }
        }
        let size = hw[0] * hw[1];
        let mut o = 0;
        for p in 0..np {
            let plane = &xs[p * size..][..size];
            let mut from = 0;
            for &end in &ends {
                let window = &offs[from..end];
                from = end;
                let mut best = T::neg_infinity();
                let mut at = window[0];
                for &i in window {
                    let v = plane[i as usize];
                    let better = (v > best) | v.is_nan();
                    best = if better { v } else { best };
                    at = if better { i } else { at };
                }
                f(o, p * size + at as usize);
                o += 1;
            }
        }
    }

    /// Calls `f(output index, input index of its maximum)` for every output of the batch `xs`
    /// (`np` planes of `hw`). The maximum is PyTorch's choice: its CPU kernel starts from −∞ at
    /// the window's first in-range tap and moves on `v > max || isnan(v)` in scan order (row by
    /// row), so the first maximum wins, and the last NaN. A whole output row is updated tap by
    /// tap, which keeps the per-output comparisons independent (no branch, no serial chain).
    /// The reference of [`MaxPool2d::scan_windows`] in tests.
    #[cfg(test)]
    fn scan<T: Real>(&self, xs: &[T], np: usize, hw: [usize; 2], mut f: impl FnMut(usize, usize)) {
        let win = &self.window;
        let [oh, ow] = win.out_checked(hw[0], hw[1]);
        let rows = taps(win, 0, hw[0], oh, hw[1]);
        let cols = taps(win, 1, hw[1], ow, 1);
        // Per column tap kj: the outputs whose tap is in range, and the input column of output 0.
        let col_taps: Vec<((usize, usize), isize)> = (0..win.kernel[1])
            .map(|kj| (win.valid_outputs(1, kj, hw[1], ow), win.input_pos(1, 0, kj)))
            .collect();
        let sw = win.stride[1];
        let size = hw[0] * hw[1];
        let mut best = vec![T::zero(); ow];
        let mut at = vec![0usize; ow];
        let mut o = 0;
        for p in 0..np {
            let plane = &xs[p * size..][..size];
            for r in &rows {
                best.fill(T::neg_infinity());
                for (a, c) in at.iter_mut().zip(&cols) {
                    *a = r[0] + c[0];
                }
                for &ry in r {
                    for &((lo, hi), ix0) in &col_taps {
                        for ox in lo..hi {
                            let i = ry + (ix0 + (ox * sw) as isize) as usize;
                            let v = plane[i];
                            let better = (v > best[ox]) | v.is_nan();
                            best[ox] = if better { v } else { best[ox] };
                            at[ox] = if better { i } else { at[ox] };
                        }
                    }
                }
                for &a in &at {
                    f(o, p * size + a);
                    o += 1;
                }
            }
        }
    }
}

/// [`MaxPool2d::pool2x2`] compiled with AVX2 enabled.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pool2x2_avx2<T: Real>(
    xs: &[T],
    np: usize,
    hw: [usize; 2],
    out: &mut [T],
    backward: Option<(&[T], &mut [std::mem::MaybeUninit<T>])>,
) {
    pool2x2_impl(xs, np, hw, out, backward)
}

/// The body of [`MaxPool2d::pool2x2`]: branch-free selects over each window's four taps.
#[inline(always)]
fn pool2x2_impl<T: Real>(
    xs: &[T],
    np: usize,
    hw: [usize; 2],
    out: &mut [T],
    backward: Option<(&[T], &mut [std::mem::MaybeUninit<T>])>,
) {
    pool2x2_rows(
        xs,
        np,
        hw,
        out,
        backward,
        |r0, r1, o| fwd_row(r0, r1, o, 0),
        |r, g, g0, g1| bwd_row(r, g, g0, g1, 0),
    );
}

/// The loops over planes and row pairs of the tiled 2×2 pooling, with the work on one pair of
/// input rows (`fwd(r0, r1, out)`, `bwd([r0, r1], gy, gx0, gx1)`, each `2·ow` / `ow` long)
/// handed to the caller's kernels. Backward writes 0 to the inputs outside every window (an
/// odd last row or column).
#[inline(always)]
fn pool2x2_rows<T: Real>(
    xs: &[T],
    np: usize,
    hw: [usize; 2],
    out: &mut [T],
    backward: Option<(&[T], &mut [std::mem::MaybeUninit<T>])>,
    mut fwd: impl FnMut(&[T], &[T], &mut [T]),
    mut bwd: impl FnMut([&[T]; 2], &[T], &mut [MaybeUninit<T>], &mut [MaybeUninit<T>]),
) {
    let (h, w) = (hw[0], hw[1]);
    let (oh, ow) = (h / 2, w / 2);
    match backward {
        None => {
            for p in 0..np {
                let plane = &xs[p * h * w..][..h * w];
                for oy in 0..oh {
                    let r0 = &plane[2 * oy * w..][..2 * ow];
                    let r1 = &plane[(2 * oy + 1) * w..][..2 * ow];
                    fwd(r0, r1, &mut out[(p * oh + oy) * ow..][..ow]);
                }
            }
        }
        Some((gy, gx)) => {
            let z = T::zero();
            for p in 0..np {
                let plane = &xs[p * h * w..][..h * w];
                let gplane = &mut gx[p * h * w..][..h * w];
                for v in &mut gplane[2 * oh * w..] {
                    v.write(z);
                }
                for oy in 0..oh {
                    for r in [2 * oy, 2 * oy + 1] {
                        for v in &mut gplane[r * w + 2 * ow..(r + 1) * w] {
                            v.write(z);
                        }
                    }
                    let r0 = &plane[2 * oy * w..][..2 * ow];
                    let r1 = &plane[(2 * oy + 1) * w..][..2 * ow];
                    let g = &gy[(p * oh + oy) * ow..][..ow];
                    let (g0, g1) = gplane[2 * oy * w..].split_at_mut(w);
                    bwd([r0, r1], g, &mut g0[..2 * ow], &mut g1[..2 * ow]);
                }
            }
        }
    }
}

/// Which tap wins, as PyTorch's scan decides: a later tap moves the maximum when it is larger
/// or NaN. Returns the maximum and the masks of taps 1, 2, 3 having moved it.
#[inline(always)]
fn moves<T: Real>(a: T, b: T, c: T, d: T) -> (T, bool, bool, bool) {
    let mb = (b > a) | b.is_nan();
    let m1 = if mb { b } else { a };
    let mc = (c > m1) | c.is_nan();
    let m2 = if mc { c } else { m1 };
    let md = (d > m2) | d.is_nan();
    (if md { d } else { m2 }, mb, mc, md)
}

/// Forward of outputs `from..` of one output row: the maxima of input rows `r0`, `r1`.
#[inline(always)]
fn fwd_row<T: Real>(r0: &[T], r1: &[T], o: &mut [T], from: usize) {
    for (i, o) in o.iter_mut().enumerate().skip(from) {
        *o = moves(r0[2 * i], r0[2 * i + 1], r1[2 * i], r1[2 * i + 1]).0;
    }
}

/// Backward of outputs `from..` of one output row: each window's gradient to the last tap
/// that moved its maximum, 0 to its other taps.
#[inline(always)]
fn bwd_row<T: Real>(
    [r0, r1]: [&[T]; 2],
    g: &[T],
    g0: &mut [MaybeUninit<T>],
    g1: &mut [MaybeUninit<T>],
    from: usize,
) {
    let z = T::zero();
    for (i, &g) in g.iter().enumerate().skip(from) {
        let (_, mb, mc, md) = moves(r0[2 * i], r0[2 * i + 1], r1[2 * i], r1[2 * i + 1]);
        let (t3, t2) = (md, mc & !md);
        let t1 = mb & !mc & !md;
        let t0 = !(mb | mc | md);
        g0[2 * i].write(if t0 { g } else { z });
        g0[2 * i + 1].write(if t1 { g } else { z });
        g1[2 * i].write(if t2 { g } else { z });
        g1[2 * i + 1].write(if t3 { g } else { z });
    }
}

/// [`MaxPool2d::pool2x2`] for f32 with AVX2 intrinsics, 8 outputs at a time
/// ([`fwd_row_avx2`], [`bwd_row_avx2`]): each pair of input rows is split into its even and
/// odd columns, the four taps compared as [`moves`] does, and backward's four gradient
/// vectors interleaved back; the same comparisons and selects as the scalar kernels, so the
/// same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pool2x2_f32_avx2(
    xs: &[f32],
    np: usize,
    hw: [usize; 2],
    out: &mut [f32],
    backward: Option<(&[f32], &mut [MaybeUninit<f32>])>,
) {
    pool2x2_rows(
        xs,
        np,
        hw,
        out,
        backward,
        // SAFETY: the CPU supports AVX2 (this function's callers check it).
        |r0, r1, o| unsafe { fwd_row_avx2(r0, r1, o) },
        // SAFETY: as above.
        |r, g, g0, g1| unsafe { bwd_row_avx2(r, g, g0, g1) },
    );
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m256, __m256i, _CMP_GT_OQ, _CMP_UNORD_Q, _mm256_and_ps, _mm256_andnot_ps, _mm256_blendv_ps,
    _mm256_castpd_ps, _mm256_castps_pd, _mm256_cmp_ps, _mm256_cmpgt_epi32, _mm256_loadu_ps,
    _mm256_maskload_ps, _mm256_maskstore_ps, _mm256_or_ps, _mm256_permute2f128_ps,
    _mm256_permute4x64_pd, _mm256_set1_epi32, _mm256_setr_epi32, _mm256_shuffle_ps,
    _mm256_storeu_ps, _mm256_unpackhi_ps, _mm256_unpacklo_ps,
};

/// The mask of lanes `i < n` (all lanes for n ≥ 8, none for n ≤ 0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn lanes_below(n: usize) -> __m256i {
    let n = n.min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// 8 values of `s` from `at` (lanes past the end of `s` read as 0, without touching memory).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load8(s: &[f32], at: usize) -> __m256 {
    let p = s.as_ptr().wrapping_add(at);
    if at + 8 <= s.len() {
        // SAFETY: `s[at..at + 8]` is in bounds.
        unsafe { _mm256_loadu_ps(p) }
    } else {
        // SAFETY: only the lanes below `s.len() − at` are read, all in bounds.
        unsafe { _mm256_maskload_ps(p, lanes_below(s.len().saturating_sub(at))) }
    }
}

/// Store the lanes of `v` that fall inside `d` from `at` on (at most 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store8(d: &mut [MaybeUninit<f32>], at: usize, v: __m256) {
    let p = d.as_mut_ptr().cast::<f32>().wrapping_add(at);
    if at + 8 <= d.len() {
        // SAFETY: `d[at..at + 8]` is in bounds.
        unsafe { _mm256_storeu_ps(p, v) }
    } else {
        // SAFETY: only the lanes below `d.len() − at` are written, all in bounds.
        unsafe { _mm256_maskstore_ps(p, lanes_below(d.len().saturating_sub(at)), v) }
    }
}

/// Even and odd entries of `r[at..at + 16]`, each in order (entries past the end of `r` read
/// as 0): two in-lane shuffles (`[x0 x2 x8 x10 | x4 x6 x12 x14]`) and a permute of the 64-bit
/// pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn split16(r: &[f32], at: usize) -> (__m256, __m256) {
    // SAFETY: AVX2 is enabled here too; `load8` reads in bounds only.
    let (v0, v1) = unsafe { (load8(r, at), load8(r, at + 8)) };
    let fix = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)));
    (
        fix(_mm256_shuffle_ps::<0x88>(v0, v1)),
        fix(_mm256_shuffle_ps::<0xDD>(v0, v1)),
    )
}

/// `[x0 y0 x1 y1 …]`, the 16 values of two vectors interleaved, stored at `dst[at..]` (those
/// inside `dst`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn interleave16(x: __m256, y: __m256, dst: &mut [MaybeUninit<f32>], at: usize) {
    let lo = _mm256_unpacklo_ps(x, y);
    let hi = _mm256_unpackhi_ps(x, y);
    // SAFETY: AVX2 is enabled here too; `store8` writes in bounds only.
    unsafe {
        store8(dst, at, _mm256_permute2f128_ps::<0x20>(lo, hi));
        store8(dst, at + 8, _mm256_permute2f128_ps::<0x31>(lo, hi));
    }
}

/// The vector form of [`moves`] on the 8 windows of rows `r0`, `r1` from column `at`: the
/// maximum and the masks of taps b, c, d having moved it (`>` ordered, or NaN; blends).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn vmoves(r0: &[f32], r1: &[f32], at: usize) -> [__m256; 4] {
    // SAFETY: AVX2 is enabled here too.
    let ((a, b), (c, d)) = unsafe { (split16(r0, at), split16(r1, at)) };
    let moved = |x: __m256, m: __m256| {
        _mm256_or_ps(
            _mm256_cmp_ps::<_CMP_GT_OQ>(x, m),
            _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x),
        )
    };
    let mb = moved(b, a);
    let m1 = _mm256_blendv_ps(a, b, mb);
    let mc = moved(c, m1);
    let m2 = _mm256_blendv_ps(m1, c, mc);
    let md = moved(d, m2);
    [_mm256_blendv_ps(m2, d, md), mb, mc, md]
}

/// Forward of one output row (`o.len()` windows) of input rows `r0`, `r1`, 8 windows per
/// step; a partial last block through masked loads and stores. Same bits as [`fwd_row`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fwd_row_avx2(r0: &[f32], r1: &[f32], o: &mut [f32]) {
    // SAFETY: the same memory as `o`, viewed as possibly uninitialised (stores only).
    let out = unsafe {
        std::slice::from_raw_parts_mut(o.as_mut_ptr().cast::<MaybeUninit<f32>>(), o.len())
    };
    for j in 0..out.len().div_ceil(8) {
        // SAFETY: AVX2 is enabled here; loads and stores stay in bounds.
        unsafe { store8(out, 8 * j, vmoves(r0, r1, 16 * j)[0]) };
    }
}

/// Backward of one output row: each window's gradient `g` to the last tap that moved its
/// maximum, +0 to the others (the masks and-ed with `g`, as the scalar selects give), 8
/// windows per step. Same bits as [`bwd_row`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bwd_row_avx2(
    [r0, r1]: [&[f32]; 2],
    g: &[f32],
    g0: &mut [MaybeUninit<f32>],
    g1: &mut [MaybeUninit<f32>],
) {
    for j in 0..g.len().div_ceil(8) {
        // SAFETY: AVX2 is enabled here; loads and stores stay in bounds.
        unsafe {
            let [_, mb, mc, md] = vmoves(r0, r1, 16 * j);
            let gv = load8(g, 8 * j);
            let any = _mm256_or_ps(mb, _mm256_or_ps(mc, md));
            let v0 = _mm256_andnot_ps(any, gv);
            let v1 = _mm256_and_ps(_mm256_andnot_ps(_mm256_or_ps(mc, md), mb), gv);
            let v2 = _mm256_and_ps(_mm256_andnot_ps(md, mc), gv);
            let v3 = _mm256_and_ps(md, gv);
            interleave16(v0, v1, g0, 16 * j);
            interleave16(v2, v3, g1, 16 * j);
        }
    }
}

impl<T: Real> Layer<T> for MaxPool2d {
    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let out = pooled_shape(&self.window, inputs)?;
        let s = &inputs[0];
        for (a, n) in [(0, s[1]), (1, s[2])] {
            if taps(&self.window, a, n, out[a + 1], 1)
                .iter()
                .any(|t| t.is_empty())
            {
                return Err(format!(
                    "a {} window would lie entirely in the padding of the {}×{} input",
                    ["row", "column"][a],
                    s[1],
                    s[2]
                ));
            }
        }
        Ok(out)
    }

    /// Overlapping or padded windows keep each output's arg-max (`Saved::Indices`), so that
    /// backward scatters instead of scanning again.
    fn forward(&self, _p: &[&[T]], inputs: &[ArrayViewD<T>], saved: &mut Saved<T>) -> ArrayD<T> {
        let x = inputs[0].as_standard_layout();
        let xs = x.as_slice().expect("standard layout");
        let (np, hw) = planes(&x.view());
        let [oh, ow] = self.window.out_checked(hw[0], hw[1]);
        let mut y = ArrayD::<T>::zeros(IxDyn(&[x.shape()[0], x.shape()[1], oh, ow]));
        let ys = y.as_slice_mut().expect("fresh array");
        if self.tiled() && self.window.kernel == [2, 2] {
            Self::pool2x2(xs, np, hw, ys, None);
        } else if self.tiled() {
            self.scan_tiled(xs, np, hw, |o, i| ys[o] = xs[i]);
        } else {
            let mut at = Vec::with_capacity(ys.len());
            self.scan_windows(xs, np, hw, |o, i| {
                ys[o] = xs[i];
                at.push(i);
            });
            *saved = Saved::Indices(at);
        }
        y
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        if !b.need_input_grad[0] {
            return vec![None];
        }
        let x = b.inputs[0].as_standard_layout();
        let xs = x.as_slice().expect("standard layout");
        let gy = b.grad_out.as_standard_layout();
        let gys = gy.as_slice().expect("standard layout");
        let (np, hw) = planes(&x.view());
        if self.tiled() && self.window.kernel == [2, 2] {
            // SAFETY: pool2x2's backward writes every input position of every plane.
            let gx = unsafe {
                super::filled(x.shape(), |gxs| {
                    Self::pool2x2(xs, np, hw, &mut [], Some((gys, gxs)))
                })
            };
            return vec![Some(gx)];
        }
        let mut gx = ArrayD::<T>::zeros(x.shape());
        let gxs = gx.as_slice_mut().expect("fresh array");
        if self.tiled() {
            self.scan_tiled(xs, np, hw, |o, i| gxs[i] = gys[o]);
        } else if let Saved::Indices(at) = b.saved
            && at.len() == gys.len()
        {
            // Forward's arg-maxes, in output order: the same sums as the scan below.
            for (&i, &g) in at.iter().zip(gys) {
                gxs[i] += g;
            }
        } else {
            self.scan_windows(xs, np, hw, |o, i| gxs[i] += gys[o]);
        }
        vec![Some(gx)]
    }
}

/// `[C, H, W]` → `[C, oh, ow]` for a window, or why not.
fn pooled_shape(win: &Window2d, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
    let [s] = inputs else {
        return Err(format!("takes 1 input, got {}", inputs.len()));
    };
    let [c, h, w] = chw(s)?;
    let [oh, ow] = win.out_hw(h, w)?;
    Ok(vec![c, oh, ow])
}

/// Average pools as their windows: output (oy, ox) is the sum of input rows `y0..y1` and
/// columns `x0..x1` divided by a divisor. Forward and backward are shared.
trait AvgWindows {
    /// Output (height, width) for an input of `hw`.
    fn out(&self, hw: [usize; 2]) -> [usize; 2];
    /// `[y0, y1, x0, x1]` and the divisor of output (oy, ox).
    fn window(&self, hw: [usize; 2], oy: usize, ox: usize) -> ([usize; 4], usize);
}

/// Average-pool forward; `shape` is the output's shape (batch and channel axes first).
fn avg_forward<T: Real>(pool: &impl AvgWindows, x: &ArrayViewD<T>, shape: &[usize]) -> ArrayD<T> {
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout");
    let (np, hw) = planes(&x.view());
    let [oh, ow] = pool.out(hw);
    let mut y = ArrayD::<T>::zeros(IxDyn(shape));
    let ys = y.as_slice_mut().expect("fresh array");
    let size = hw[0] * hw[1];
    for p in 0..np {
        let plane = &xs[p * size..][..size];
        for oy in 0..oh {
            for ox in 0..ow {
                let ([y0, y1, x0, x1], div) = pool.window(hw, oy, ox);
                let mut acc = T::zero();
                for iy in y0..y1 {
                    acc += plane[iy * hw[1] + x0..iy * hw[1] + x1]
                        .iter()
                        .copied()
                        .sum::<T>();
                }
                ys[(p * oh + oy) * ow + ox] = acc / T::of(div as f64);
            }
        }
    }
    y
}

/// Average-pool backward: each output's gradient, divided by its divisor, to its window.
fn avg_backward<T: Real>(pool: &impl AvgWindows, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
    if !b.need_input_grad[0] {
        return vec![None];
    }
    let gy = b.grad_out.as_standard_layout();
    let gys = gy.as_slice().expect("standard layout");
    let x = &b.inputs[0];
    let (np, hw) = planes(x);
    let [oh, ow] = pool.out(hw);
    let mut gx = ArrayD::<T>::zeros(x.shape());
    let gxs = gx.as_slice_mut().expect("fresh array");
    let size = hw[0] * hw[1];
    for p in 0..np {
        let gplane = &mut gxs[p * size..][..size];
        for oy in 0..oh {
            for ox in 0..ow {
                let ([y0, y1, x0, x1], div) = pool.window(hw, oy, ox);
                let g = gys[(p * oh + oy) * ow + ox] / T::of(div as f64);
                for iy in y0..y1 {
                    for v in &mut gplane[iy * hw[1] + x0..iy * hw[1] + x1] {
                        *v += g;
                    }
                }
            }
        }
    }
    vec![Some(gx)]
}

/// `nn.AvgPool2d` (the window has no dilation).
#[derive(Debug, Clone)]
pub struct AvgPool2d {
    pub window: Window2d,
    pub count_include_pad: bool,
    pub divisor_override: Option<usize>,
}

impl AvgWindows for AvgPool2d {
    fn out(&self, hw: [usize; 2]) -> [usize; 2] {
        self.window.out_checked(hw[0], hw[1])
    }

    #[inline]
    fn window(&self, hw: [usize; 2], oy: usize, ox: usize) -> ([usize; 4], usize) {
        let win = &self.window;
        let span = |a: usize, o: usize, n: usize| {
            let start = (o * win.stride[a]) as isize - win.pad_begin[a] as isize;
            // PyTorch clips the window to the padded input before counting it...
            let end = (start + win.kernel[a] as isize).min((n + win.pad_end[a]) as isize);
            let padded = (end - start) as usize;
            // ...then to the input itself.
            let (lo, hi) = (start.max(0) as usize, (end.max(0) as usize).min(n));
            (lo, hi.max(lo), padded)
        };
        let (y0, y1, ph) = span(0, oy, hw[0]);
        let (x0, x1, pw) = span(1, ox, hw[1]);
        let divisor = match self.divisor_override {
            Some(d) => d,
            None if self.count_include_pad => ph * pw,
            None => (y1 - y0) * (x1 - x0),
        };
        ([y0, y1, x0, x1], divisor)
    }
}

impl<T: Real> Layer<T> for AvgPool2d {
    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        pooled_shape(&self.window, inputs)
    }

    fn forward(&self, _p: &[&[T]], inputs: &[ArrayViewD<T>], _saved: &mut Saved<T>) -> ArrayD<T> {
        let s = inputs[0].shape();
        let [oh, ow] = self.out([s[2], s[3]]);
        avg_forward(self, &inputs[0], &[s[0], s[1], oh, ow])
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        avg_backward(self, b)
    }
}

/// `nn.AdaptiveAvgPool2d(output_size)`; with `flatten`, a 1×1 output is returned as `[C]`
/// (the spec's `global_avg_pool`).
#[derive(Debug, Clone)]
pub struct AdaptiveAvgPool2d {
    pub output_size: [usize; 2],
    pub flatten: bool,
}

impl AvgWindows for AdaptiveAvgPool2d {
    fn out(&self, _hw: [usize; 2]) -> [usize; 2] {
        self.output_size
    }

    /// PyTorch's adaptive windows: `⌊i·n/out⌋ .. ⌈(i+1)·n/out⌉` along each axis.
    #[inline]
    fn window(&self, hw: [usize; 2], oy: usize, ox: usize) -> ([usize; 4], usize) {
        let [oh, ow] = self.output_size;
        let (y0, y1) = (oy * hw[0] / oh, ((oy + 1) * hw[0]).div_ceil(oh));
        let (x0, x1) = (ox * hw[1] / ow, ((ox + 1) * hw[1]).div_ceil(ow));
        ([y0, y1, x0, x1], (y1 - y0) * (x1 - x0))
    }
}

impl<T: Real> Layer<T> for AdaptiveAvgPool2d {
    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let [s] = inputs else {
            return Err(format!("takes 1 input, got {}", inputs.len()));
        };
        let [c, h, w] = chw(s)?;
        if h == 0 || w == 0 {
            return Err(format!("cannot average an empty {h}×{w} input"));
        }
        Ok(if self.flatten {
            vec![c]
        } else {
            vec![c, self.output_size[0], self.output_size[1]]
        })
    }

    fn forward(&self, _p: &[&[T]], inputs: &[ArrayViewD<T>], _saved: &mut Saved<T>) -> ArrayD<T> {
        let mut shape = inputs[0].shape()[..2].to_vec();
        if !self.flatten {
            shape.extend(self.output_size);
        }
        avg_forward(self, &inputs[0], &shape)
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        avg_backward(self, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::check_layer;
    use ndarray::Array;

    fn win(k: [usize; 2], s: [usize; 2], d: [usize; 2], p: [usize; 2]) -> Window2d {
        Window2d::new(k, s, d, p, p)
    }

    /// Random inputs are tie-free; padding, stride, dilation and overlap are exercised.
    #[test]
    fn max_pool_gradients_match_finite_differences() {
        for w in [
            win([2, 2], [2, 2], [1, 1], [0, 0]),
            win([3, 3], [2, 2], [1, 1], [1, 1]),
            win([3, 2], [1, 2], [1, 1], [1, 0]),
            win([2, 2], [1, 1], [2, 2], [1, 1]),
            win([3, 3], [3, 3], [1, 1], [1, 1]),
        ] {
            check_layer(&MaxPool2d { window: w }, &[vec![2, 6, 7]], 2);
        }
    }

    #[test]
    fn max_pool_ties_go_to_the_first_maximum_like_pytorch() {
        // x = [[1,2,2,0],[2,1,0,2],[3,3,1,1],[3,3,1,1]]; F.max_pool2d(x, 2, return_indices=True)
        // gives indices [[1, 2], [8, 10]], and max_pool2d(x, 2).sum().backward() puts 1 there.
        let x = Array::from_shape_vec(
            (1, 1, 4, 4),
            vec![
                1., 2., 2., 0., 2., 1., 0., 2., 3., 3., 1., 1., 3., 3., 1., 1.,
            ],
        )
        .unwrap()
        .into_dyn();
        let pool = MaxPool2d {
            window: win([2, 2], [2, 2], [1, 1], [0, 0]),
        };
        let y = pool.forward(&[], &[x.view()], &mut Saved::None);
        assert_eq!(y.as_slice().unwrap(), &[2.0, 2.0, 3.0, 1.0]);
        let g = ArrayD::from_elem(IxDyn(&[1, 1, 2, 2]), 1.0f64);
        let gx = pool.backward(Backward {
            params: &[],
            inputs: &[x.view()],
            output: y.view(),
            saved: &Saved::None,
            grad_out: g.view(),
            grad_params: vec![],
            need_input_grad: &[true],
        });
        let gx = gx[0].as_ref().unwrap();
        let hot: Vec<usize> = gx
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0.0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(hot, vec![1, 2, 8, 10]);
        assert!(gx.iter().all(|&v| v == 0.0 || v == 1.0));
    }

    /// Input index of the maximum of every output (one sample, one channel).
    fn argmaxes(pool: &MaxPool2d, x: &[f64], hw: [usize; 2]) -> Vec<usize> {
        let mut at = Vec::new();
        pool.scan(x, 1, hw, |o, i| {
            assert_eq!(o, at.len());
            at.push(i)
        });
        at
    }

    /// The tiled fast path picks the same maxima as the general scan, with ties, NaN and −∞,
    /// on sizes the windows do not divide.
    #[test]
    fn tiled_max_pool_scan_equals_the_general_scan() {
        let mut rng = crate::net::gradcheck::Rng::new(11);
        for k in [[2, 2], [3, 3], [1, 4], [2, 3]] {
            let pool = MaxPool2d {
                window: win(k, k, [1, 1], [0, 0]),
            };
            assert!(pool.tiled());
            let hw = [7, 9];
            let x: Vec<f64> = rng
                .array(&[3 * 7 * 9])
                .iter()
                .enumerate()
                .map(|(i, v)| match i % 17 {
                    5 => f64::NAN,
                    9 => f64::NEG_INFINITY,
                    _ => (v * 3.0).round(),
                })
                .collect();
            let mut general = Vec::new();
            pool.scan(&x, 3, hw, |o, i| general.push((o, i)));
            let mut tiled = Vec::new();
            pool.scan_tiled(&x, 3, hw, |o, i| tiled.push((o, i)));
            assert_eq!(general, tiled, "kernel {k:?}");
            if k == [2, 2] {
                // The vectorised 2×2 kernels: forward values, and backward's gradient placed
                // at the same maxima (positions outside every window stay 0).
                let (oh, ow) = (3, 4);
                let mut y = vec![0.0; 3 * oh * ow];
                MaxPool2d::pool2x2(&x, 3, hw, &mut y, None);
                let gy: Vec<f64> = (0..y.len()).map(|i| i as f64 + 1.0).collect();
                let unset = || vec![std::mem::MaybeUninit::new(f64::NAN); x.len()];
                // SAFETY: the buffers were initialised (to NaN) when made.
                let read = |v: Vec<std::mem::MaybeUninit<f64>>| -> Vec<f64> {
                    v.into_iter().map(|v| unsafe { v.assume_init() }).collect()
                };
                let mut gx = unset();
                MaxPool2d::pool2x2(&x, 3, hw, &mut [], Some((&gy, &mut gx)));
                let gx = read(gx);
                // The generic build gives the same bits as the one chosen at run time.
                let (mut y2, mut gx2) = (vec![0.0; y.len()], unset());
                pool2x2_impl(&x, 3, hw, &mut y2, None);
                pool2x2_impl(&x, 3, hw, &mut [], Some((&gy, &mut gx2)));
                let gx2 = read(gx2);
                assert!(y.iter().zip(&y2).all(|(a, b)| a.to_bits() == b.to_bits()));
                assert_eq!(gx, gx2);
                let mut want = vec![0.0; x.len()];
                for &(o, i) in &general {
                    assert!(y[o].to_bits() == x[i].to_bits() || (y[o].is_nan() && x[i].is_nan()));
                    want[i] = gy[o];
                }
                assert_eq!(gx, want);
            }
        }
        assert!(
            !MaxPool2d {
                window: win([3, 3], [2, 2], [1, 1], [0, 0])
            }
            .tiled()
        );
    }

    /// The f32 kernels chosen at run time (AVX2 intrinsics, 8 windows per step, padded
    /// partial blocks) give the scalar kernels' bits, forward and backward, for row lengths
    /// that are and are not multiples of the block, odd sizes, ties, ±0, NaN and −∞.
    #[test]
    fn f32_max_pool_2x2_kernels_agree_bitwise() {
        let mut rng = crate::net::gradcheck::Rng::new(5);
        for (h, w) in [
            (2, 2),
            (3, 5),
            (4, 14),
            (6, 15),
            (2, 16),
            (5, 33),
            (28, 28),
            (14, 14),
            (7, 9),
        ] {
            let np = 3;
            let x: Vec<f32> = rng
                .array(&[np * h * w])
                .iter()
                .enumerate()
                .map(|(i, v)| match i % 13 {
                    3 => f32::NAN,
                    7 => f32::NEG_INFINITY,
                    11 => -0.0,
                    _ => (v * 3.0).round() as f32,
                })
                .collect();
            let (oh, ow) = (h / 2, w / 2);
            let (mut y, mut y2) = (vec![0.0f32; np * oh * ow], vec![1.0f32; np * oh * ow]);
            MaxPool2d::pool2x2(&x, np, [h, w], &mut y, None);
            pool2x2_impl(&x, np, [h, w], &mut y2, None);
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&y2), "{h}x{w} forward");
            let gy: Vec<f32> = (0..y.len()).map(|i| i as f32 * 0.5 - 3.0).collect();
            let unset = || vec![std::mem::MaybeUninit::new(f32::NAN); x.len()];
            // SAFETY: the buffers were initialised (to NaN) when made.
            let read = |v: Vec<std::mem::MaybeUninit<f32>>| -> Vec<u32> {
                v.into_iter()
                    .map(|v| unsafe { v.assume_init() }.to_bits())
                    .collect()
            };
            let (mut gx, mut gx2) = (unset(), unset());
            MaxPool2d::pool2x2(&x, np, [h, w], &mut [], Some((&gy, &mut gx)));
            pool2x2_impl(&x, np, [h, w], &mut [], Some((&gy, &mut gx2)));
            let (gx, gx2) = (read(gx), read(gx2));
            assert!(gx.iter().all(|&b| !f32::from_bits(b).is_nan()));
            assert_eq!(gx, gx2, "{h}x{w} backward");
        }
    }

    /// The window-at-a-time scan picks the general scan's maxima (ties, NaN, −∞, padding,
    /// stride, dilation), and backward from forward's kept arg-maxes gives the bits of
    /// backward by a new scan.
    #[test]
    fn window_scan_and_kept_argmaxes_equal_the_general_scan() {
        let mut rng = crate::net::gradcheck::Rng::new(5);
        for w in [
            win([3, 3], [2, 2], [1, 1], [1, 1]),
            win([3, 2], [1, 2], [1, 1], [1, 0]),
            win([2, 2], [1, 1], [2, 2], [1, 1]),
            win([3, 3], [3, 3], [1, 1], [1, 1]),
            win([1, 1], [2, 2], [1, 1], [0, 0]),
        ] {
            let pool = MaxPool2d { window: w };
            let (np, hw) = (6, [9, 8]);
            let x: Vec<f64> = rng
                .array(&[np * 9 * 8])
                .iter()
                .enumerate()
                .map(|(i, v)| match i % 13 {
                    5 => f64::NAN,
                    9 | 10 => f64::NEG_INFINITY,
                    _ => (v * 3.0).round(),
                })
                .collect();
            let mut general = Vec::new();
            pool.scan(&x, np, hw, |o, i| general.push((o, i)));
            let mut windows = Vec::new();
            pool.scan_windows(&x, np, hw, |o, i| windows.push((o, i)));
            assert_eq!(general, windows, "{w:?}");
            let xa = Array::from_shape_vec((2, 3, 9, 8), x.clone())
                .unwrap()
                .into_dyn();
            let mut saved = Saved::None;
            let y = pool.forward(&[], &[xa.view()], &mut saved);
            assert!(matches!(saved, Saved::Indices(_)));
            let gy = y.mapv(|_| rng.next());
            let run = |saved: &Saved<f64>| {
                pool.backward(Backward {
                    params: &[],
                    inputs: &[xa.view()],
                    output: y.view(),
                    saved,
                    grad_out: gy.view(),
                    grad_params: vec![],
                    need_input_grad: &[true],
                })
                .remove(0)
                .unwrap()
            };
            let (kept, rescanned) = (run(&saved), run(&Saved::None));
            let bits = |a: &ArrayD<f64>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&kept), bits(&rescanned), "{w:?}");
        }
    }

    #[test]
    fn max_pool_nan_and_padding_follow_pytorch() {
        // F.max_pool2d(tensor([[[[nan, 2, nan, 5]]]]), (1, 4), return_indices=True) → nan at 2.
        let pool = MaxPool2d {
            window: win([1, 4], [1, 4], [1, 1], [0, 0]),
        };
        assert_eq!(
            argmaxes(&pool, &[f64::NAN, 2.0, f64::NAN, 5.0], [1, 4]),
            vec![2]
        );
        // Padding is −∞: an all-negative input still gives its own values.
        // F.max_pool2d(-ones(1,1,3,3), 2, stride=2, padding=1, return_indices=True) → indices 0,1,3,4.
        let pool = MaxPool2d {
            window: win([2, 2], [2, 2], [1, 1], [1, 1]),
        };
        let x = ArrayD::from_elem(IxDyn(&[1, 1, 3, 3]), -1.0f64);
        let y = pool.forward(&[], &[x.view()], &mut Saved::None);
        assert_eq!(y.as_slice().unwrap(), &[-1.0; 4]);
        assert_eq!(
            argmaxes(&pool, x.as_slice().unwrap(), [3, 3]),
            vec![0, 1, 3, 4]
        );
        // A dilated window whose taps all fall in the padding is refused at build time.
        let pool = MaxPool2d {
            window: win([2, 2], [1, 1], [3, 3], [2, 2]),
        };
        let e = <MaxPool2d as Layer<f32>>::out_shape(&pool, &[vec![1, 1, 1]]).unwrap_err();
        assert!(e.contains("entirely in the padding"), "{e}");
    }

    #[test]
    fn avg_pool_gradients_match_finite_differences() {
        for (w, include, over) in [
            (win([2, 2], [2, 2], [1, 1], [0, 0]), true, None),
            (win([3, 3], [2, 2], [1, 1], [1, 1]), true, None),
            (win([3, 3], [2, 2], [1, 1], [1, 1]), false, None),
            (win([3, 2], [1, 1], [1, 1], [1, 1]), false, None),
            (win([2, 3], [2, 1], [1, 1], [1, 1]), true, Some(5)),
        ] {
            let l = AvgPool2d {
                window: w,
                count_include_pad: include,
                divisor_override: over,
            };
            check_layer(&l, &[vec![2, 5, 6]], 2);
        }
    }

    #[test]
    fn avg_pool_divisors_follow_pytorch() {
        // F.avg_pool2d(arange(16.).reshape(1,1,4,4), 3, stride=2, padding=1,
        //              count_include_pad=...): True → [[10/9, 24/9], [51/9, 90/9]]
        // (PyTorch: 1.1111, 2.6667, 5.6667, 10.0); False → [[2.5, 4.0], [8.5, 10.0]].
        let x = Array::from_shape_fn((1, 1, 4, 4), |(_, _, i, j)| (4 * i + j) as f64).into_dyn();
        let mk = |include| AvgPool2d {
            window: win([3, 3], [2, 2], [1, 1], [1, 1]),
            count_include_pad: include,
            divisor_override: None,
        };
        let y = mk(true).forward(&[], &[x.view()], &mut Saved::None);
        let want = [10.0 / 9.0, 24.0 / 9.0, 51.0 / 9.0, 10.0];
        assert!(
            y.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
            "{y}"
        );
        let y = mk(false).forward(&[], &[x.view()], &mut Saved::None);
        assert_eq!(y.as_slice().unwrap(), &[2.5, 4.0, 8.5, 10.0]);
    }

    #[test]
    fn adaptive_and_global_avg_pool() {
        for (out, flatten) in [
            ([1, 1], false),
            ([1, 1], true),
            ([2, 3], false),
            ([4, 4], false),
        ] {
            check_layer(
                &AdaptiveAvgPool2d {
                    output_size: out,
                    flatten,
                },
                &[vec![2, 5, 7]],
                2,
            );
        }
        let g = AdaptiveAvgPool2d {
            output_size: [1, 1],
            flatten: true,
        };
        assert_eq!(
            <AdaptiveAvgPool2d as Layer<f32>>::out_shape(&g, &[vec![10, 8, 8]]).unwrap(),
            vec![10]
        );
        // F.adaptive_avg_pool2d(arange(5.).reshape(1,1,1,5), (1, 3)) → [0.5, 2.0, 3.5]
        let a = AdaptiveAvgPool2d {
            output_size: [1, 3],
            flatten: false,
        };
        let x = Array::from_shape_fn((1, 1, 1, 5), |(_, _, _, j)| j as f64).into_dyn();
        let y = a.forward(&[], &[x.view()], &mut Saved::None);
        assert_eq!(y.as_slice().unwrap(), &[0.5, 2.0, 3.5]);
    }

    #[test]
    fn pool_shapes_and_errors() {
        let m = MaxPool2d {
            window: win([2, 2], [2, 2], [1, 1], [0, 0]),
        };
        assert_eq!(
            <MaxPool2d as Layer<f32>>::out_shape(&m, &[vec![20, 28, 28]]).unwrap(),
            vec![20, 14, 14]
        );
        // Odd sizes are floored, as without ceil_mode.
        assert_eq!(
            <MaxPool2d as Layer<f32>>::out_shape(&m, &[vec![3, 7, 5]]).unwrap(),
            vec![3, 3, 2]
        );
        let e = <MaxPool2d as Layer<f32>>::out_shape(&m, &[vec![3, 1, 5]]).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        let e = <MaxPool2d as Layer<f32>>::out_shape(&m, &[vec![64]]).unwrap_err();
        assert!(e.contains("[channels, height, width]"), "{e}");
    }
}
