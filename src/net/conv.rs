//! `nn.Conv2d` on NCHW batches, with PyTorch's layout and semantics: weight
//! `[out_channels, in_channels / groups, kh, kw]`, bias `[out_channels]`, stride, zero padding
//! (symmetric, or PyTorch's `"same"`, which puts the odd extra row/column at the bottom/right),
//! dilation and groups.
//!
//! Computed through GEMM: a block of samples is unfolded (im2col) into a
//! `[in/groups·kh·kw, samples·oh·ow]` matrix per group, multiplied by the group's weight rows,
//! and folded back (col2im) for the input gradient. The unfolded block is recomputed in
//! backward rather than kept, so memory stays at one block per chunk.
//!
//! ```
//! use lca::net::{conv::{Conv2d, Window2d}, Layer, Saved};
//! use ndarray::{Array4, ArrayD};
//! // 1 → 1 channel, 2×2 kernel of ones, stride 1, no padding: sums of 2×2 neighbourhoods.
//! let conv = Conv2d {
//!     in_channels: 1,
//!     out_channels: 1,
//!     groups: 1,
//!     bias: true,
//!     window: Window2d::new([2, 2], [1, 1], [1, 1], [0, 0], [0, 0]),
//! };
//! let w = [1.0f32; 4];
//! let b = [0.5f32];
//! let x: ArrayD<f32> = Array4::from_shape_fn((1, 1, 3, 3), |(_, _, i, j)| (3 * i + j) as f32).into_dyn();
//! assert_eq!(<Conv2d as Layer<f32>>::out_shape(&conv, &[vec![1, 3, 3]]).unwrap(), vec![1, 2, 2]);
//! let y = conv.forward(&[&w, &b], &[x.view()], &mut Saved::None);
//! assert_eq!(y.as_slice().unwrap(), &[8.5, 12.5, 20.5, 24.5]);
//! ```

use super::conv_small;
use super::conv3x3;
use super::fastmath::{f32_slice, f32_slice_mut, f32_uninit};
use super::gemm::mat_mul;
use super::scratch::Scratch;
use super::winograd;
use super::{Backward, Layer, ParamDecl, Real, Saved};
use crate::spec::{Padding, Pair};
use ndarray::{ArrayD, ArrayView2, ArrayViewD, ArrayViewMut2, IxDyn, s};

/// Geometry of a 2-D sliding window: kernel, stride, dilation and padding per axis
/// (height, width), with PyTorch's output-size rule (no ceil mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window2d {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// Padding before the first row / column.
    pub pad_begin: [usize; 2],
    /// Padding after the last row / column.
    pub pad_end: [usize; 2],
}

impl Window2d {
    pub fn new(
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        pad_begin: [usize; 2],
        pad_end: [usize; 2],
    ) -> Window2d {
        Window2d {
            kernel,
            stride,
            dilation,
            pad_begin,
            pad_end,
        }
    }

    /// A window with the same padding on both sides.
    pub fn symmetric(kernel: Pair, stride: Pair, dilation: Pair, padding: Pair) -> Window2d {
        Window2d::new(kernel.0, stride.0, dilation.0, padding.0, padding.0)
    }

    /// A convolution's window for a spec `padding`. `"same"` pads `dilation·(kernel − 1)` in
    /// total per axis, half (rounded down) before and the rest after, as PyTorch does.
    pub fn conv(kernel: Pair, stride: Pair, dilation: Pair, padding: Padding) -> Window2d {
        match padding {
            Padding::Explicit(p) => Window2d::symmetric(kernel, stride, dilation, p),
            Padding::Valid => Window2d::symmetric(kernel, stride, dilation, Pair([0, 0])),
            Padding::Same => {
                let total = [0, 1].map(|a| dilation.0[a] * (kernel.0[a] - 1));
                let begin = total.map(|t| t / 2);
                Window2d::new(
                    kernel.0,
                    stride.0,
                    dilation.0,
                    begin,
                    [total[0] - begin[0], total[1] - begin[1]],
                )
            }
        }
    }

    /// Extent of the dilated kernel along axis `a`.
    pub fn span(&self, a: usize) -> usize {
        self.dilation[a] * (self.kernel[a] - 1) + 1
    }

    /// Output size along axis `a` for an input of `n`, or `None` when the window does not fit.
    pub fn out_len(&self, a: usize, n: usize) -> Option<usize> {
        let padded = n
            .checked_add(self.pad_begin[a])?
            .checked_add(self.pad_end[a])?;
        let span = self.span(a);
        (padded >= span).then(|| (padded - span) / self.stride[a] + 1)
    }

    /// Output (height, width) for an input of `h × w`, or why the window does not fit.
    pub fn out_hw(&self, h: usize, w: usize) -> Result<[usize; 2], String> {
        match (self.out_len(0, h), self.out_len(1, w)) {
            (Some(oh), Some(ow)) if oh > 0 && ow > 0 => Ok([oh, ow]),
            _ => Err(format!(
                "its {}×{} window{}{} does not fit in the {h}×{w} input",
                self.span(0),
                self.span(1),
                if self.dilation != [1, 1] {
                    format!(
                        " (kernel {}×{} dilated {}×{})",
                        self.kernel[0], self.kernel[1], self.dilation[0], self.dilation[1]
                    )
                } else {
                    String::new()
                },
                if self.pad_begin != [0, 0] || self.pad_end != [0, 0] {
                    format!(
                        " with padding {}+{} × {}+{}",
                        self.pad_begin[0], self.pad_end[0], self.pad_begin[1], self.pad_end[1]
                    )
                } else {
                    String::new()
                }
            )),
        }
    }

    /// [`Window2d::out_hw`] for an input whose shape the model checked when it was built.
    pub(crate) fn out_checked(&self, h: usize, w: usize) -> [usize; 2] {
        self.out_hw(h, w)
            .expect("shapes are checked when the model is built")
    }

    /// Input position (may be out of range) of output `o`, kernel tap `k` along axis `a`.
    #[inline]
    pub fn input_pos(&self, a: usize, o: usize, k: usize) -> isize {
        (o * self.stride[a] + k * self.dilation[a]) as isize - self.pad_begin[a] as isize
    }

    /// The outputs `lo..hi` along axis `a` whose tap `k` falls inside an input of length `n`.
    pub fn valid_outputs(&self, a: usize, k: usize, n: usize, out: usize) -> (usize, usize) {
        let s = self.stride[a] as isize;
        let off = (k * self.dilation[a]) as isize - self.pad_begin[a] as isize; // pos = o·s + off
        // o·s + off ≥ 0  ⇔  o ≥ ⌈−off / s⌉;  o·s + off ≤ n − 1  ⇔  o ≤ ⌊(n − 1 − off) / s⌋.
        let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
        let last = n as isize - 1 - off;
        let hi = if last < 0 { 0 } else { last / s + 1 };
        let hi = (hi.max(0) as usize).min(out);
        let lo = (lo as usize).min(hi);
        (lo, hi)
    }
}

/// Sum of a slice in 8 interleaved partial sums (vectorisable, unlike one running sum;
/// a fixed order, so the result does not depend on anything but the values).
fn lanes_sum<T: Real>(v: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let mut tail = T::zero();
    for &x in chunks.remainder() {
        tail += x;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Per-sample `[channels, height, width]` of a layer input, or why it is not an image.
pub(crate) fn chw(s: &[usize]) -> Result<[usize; 3], String> {
    match *s {
        [c, h, w] => Ok([c, h, w]),
        [_, _] => Err(
            "needs [channels, height, width] per sample (for one-channel images, set `model.input_shape = [1, height, width]`)"
                .into(),
        ),
        _ => Err("needs [channels, height, width] per sample".into()),
    }
}

/// Samples per GEMM block: enough columns (samples × output pixels) for an efficient product,
/// while the unfolded block stays small.
const BLOCK_COLUMNS: usize = 2048;

/// Most entries of an unfolded block (512 KiB in f32): ResNet-18's 128-channel 3×3
/// convolutions at 4×4 unfold 1152 rows, and a whole chunk's block (7 MB) went through L3
/// twice; blocks of 7 samples keep it in L2 (one thread, CPU time: backward −20 %).
const BLOCK_ENTRIES: usize = 1 << 17;

/// A 2-D convolution (cross-correlation, as PyTorch).
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub in_channels: usize,
    pub out_channels: usize,
    pub groups: usize,
    pub bias: bool,
    pub window: Window2d,
}

/// Sizes of one forward/backward call.
struct Dims {
    batch: usize,
    /// Input channels per group, height, width.
    cg: usize,
    h: usize,
    w: usize,
    /// Output channels per group.
    mg: usize,
    oh: usize,
    ow: usize,
    /// Unfolded rows per group: cg·(taps that reach the input for some output). Equal to
    /// cg·kh·kw unless some taps fall in the padding for every output (e.g. a 3×3 kernel with
    /// padding 1 on a 1×1 input: only the centre tap), whose all-zero rows are left out of
    /// the products.
    k: usize,
    /// Weight columns per output channel: cg·kh·kw.
    kfull: usize,
    /// The kernel taps (ki, kj) that reach the input for at least one output, in row-major
    /// order; unfolded row of (channel ci, tap t) is ci·taps.len() + t.
    taps: Vec<(usize, usize)>,
    /// Samples per block.
    block: usize,
    /// The gather table of small planes (see [`Frame`]), `None` on larger ones.
    frame: Option<Frame>,
}

/// Unfolding of a small plane through a frame: the input plane is copied into a zero-padded
/// `hp × wp` frame, and entry `p` of used tap `t`'s unfolded row is frame position
/// `idx[t·n + p]`. One copy per plane and a table lookup per entry, where the row-wise copies
/// of [`Conv2d::im2col`] spend more on finding the in-range runs of a 4×4 plane than on copying
/// them. Folding back runs the other way (sums in a zeroed frame, the interior copied out).
#[derive(Debug, Clone)]
struct Frame {
    hp: usize,
    wp: usize,
    idx: Vec<u32>,
}

/// Largest output plane (oh·ow) unfolded through a [`Frame`].
const FRAME_PLANE: usize = 64;

/// `dst[p] = frame[idx[p]]` with `idx` used tap `t`'s row of `fr` (one tap's row of a
/// plane); in f32 with AVX-512F (`simd`), sixteen at a time by vector gathers.
fn gather<T: Real>(dst: &mut [T], frame: &[T], fr: &Frame, t: usize, simd: bool) {
    let idx = &fr.idx[t * dst.len()..][..dst.len()];
    #[cfg(target_arch = "x86_64")]
    if simd && let (Some(d), Some(f)) = (f32_slice_mut(dst), f32_slice(frame)) {
        assert!(f.len() >= fr.hp * fr.wp, "a whole frame");
        // SAFETY: AVX-512F is available (`simd`); `idx` covers `dst`, and its indices are
        // below hp·wp (checked when the frame was made), so inside `frame`.
        unsafe { avx512::gather(d, f, idx) };
        return;
    }
    let _ = simd;
    for (o, &i) in dst.iter_mut().zip(idx) {
        *o = frame[i as usize];
    }
}

/// `frame[idx[p]] += src[p]` with `idx` used tap `t`'s row of `fr` (the indices of a row are
/// distinct, so the vector version adds exactly as the scalar one does).
fn scatter_add<T: Real>(frame: &mut [T], src: &[T], fr: &Frame, t: usize, simd: bool) {
    let idx = &fr.idx[t * src.len()..][..src.len()];
    #[cfg(target_arch = "x86_64")]
    if simd && let (Some(f), Some(s)) = (f32_slice_mut(frame), f32_slice(src)) {
        assert!(f.len() >= fr.hp * fr.wp, "a whole frame");
        // SAFETY: AVX-512F is available (`simd`); `idx` covers `src`, its indices are below
        // hp·wp (checked when the frame was made), so inside `frame`, and distinct.
        unsafe { avx512::scatter_add(f, s, idx) };
        return;
    }
    let _ = simd;
    for (&v, &i) in src.iter().zip(idx) {
        frame[i as usize] += v;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::net::simd::x86::mask;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F; `idx.len() == dst.len()`, every index `< frame.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gather(dst: &mut [f32], frame: &[f32], idx: &[u32]) {
        let n = dst.len();
        let mut p = 0;
        while p < n {
            let m = mask(n - p);
            // SAFETY: the masked lanes are inside `idx` and `dst`, the indices inside `frame`.
            unsafe {
                let vi = _mm512_maskz_loadu_epi32(m, idx.as_ptr().add(p).cast());
                let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, vi, frame.as_ptr());
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(p), m, v);
            }
            p += 16;
        }
    }

    /// # Safety
    /// AVX-512F; `idx.len() == src.len()`, every index `< frame.len()`, no index twice.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scatter_add(frame: &mut [f32], src: &[f32], idx: &[u32]) {
        let n = src.len();
        let mut p = 0;
        while p < n {
            let m = mask(n - p);
            // SAFETY: as in `gather`; distinct indices, so no lane's store hides another's.
            unsafe {
                let vi = _mm512_maskz_loadu_epi32(m, idx.as_ptr().add(p).cast());
                let g = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, vi, frame.as_ptr());
                let v = _mm512_add_ps(g, _mm512_maskz_loadu_ps(m, src.as_ptr().add(p)));
                _mm512_mask_i32scatter_ps::<4>(frame.as_mut_ptr(), m, vi, v);
            }
            p += 16;
        }
    }
}

impl Dims {
    fn plane(&self) -> usize {
        self.oh * self.ow
    }
}

impl Conv2d {
    fn dims(&self, shape: &[usize]) -> Dims {
        let [b, c, h, w] = [shape[0], shape[1], shape[2], shape[3]];
        debug_assert_eq!(c, self.in_channels);
        let [oh, ow] = self.window.out_checked(h, w);
        let cg = c / self.groups;
        let n = oh * ow;
        let [kh, kw] = self.window.kernel;
        let taps: Vec<(usize, usize)> = (0..kh)
            .flat_map(|ki| (0..kw).map(move |kj| (ki, kj)))
            .filter(|&(ki, kj)| {
                let (ylo, yhi) = self.window.valid_outputs(0, ki, h, oh);
                let (xlo, xhi) = self.window.valid_outputs(1, kj, w, ow);
                ylo < yhi && xlo < xhi
            })
            .collect();
        // Columns per block: up to BLOCK_COLUMNS, fewer where the unfolded block would pass
        // BLOCK_ENTRIES (so that it stays in L2 between being written and multiplied).
        let columns = BLOCK_COLUMNS.min(BLOCK_ENTRIES / (cg * taps.len()).max(1));
        let block = (columns / n).clamp(1, b.max(1));
        Dims {
            batch: b,
            cg,
            h,
            w,
            mg: self.out_channels / self.groups,
            oh,
            ow,
            k: cg * taps.len(),
            kfull: cg * kh * kw,
            frame: (n <= FRAME_PLANE).then(|| self.frame(&taps, [h, w], [oh, ow])),
            taps,
            block,
        }
    }

    /// The [`Frame`] of an `h × w` input with `oh × ow` outputs and the used `taps`.
    fn frame(&self, taps: &[(usize, usize)], [h, w]: [usize; 2], [oh, ow]: [usize; 2]) -> Frame {
        let win = &self.window;
        let hp = h + win.pad_begin[0] + win.pad_end[0];
        let wp = w + win.pad_begin[1] + win.pad_end[1];
        let mut idx = Vec::with_capacity(taps.len() * oh * ow);
        for &(ki, kj) in taps {
            for oy in 0..oh {
                for ox in 0..ow {
                    // Frame coordinates: input position + padding before, inside the padded
                    // extent for every window (the output size rule).
                    let fy = oy * win.stride[0] + ki * win.dilation[0];
                    let fx = ox * win.stride[1] + kj * win.dilation[1];
                    idx.push((fy * wp + fx) as u32);
                }
            }
        }
        // The gathers below rely on it (unchecked vector gathers).
        assert!(
            idx.iter().all(|&i| (i as usize) < hp * wp),
            "frame taps inside the frame"
        );
        Frame { hp, wp, idx }
    }

    /// [`Conv2d::im2col`] through the [`Frame`] `fr`; `buf` is scratch for the frame.
    #[allow(clippy::too_many_arguments)]
    fn im2col_framed<T: Real>(
        &self,
        x: &[T],
        d: &Dims,
        fr: &Frame,
        g: usize,
        s0: usize,
        nb: usize,
        col: &mut [T],
        buf: &mut Vec<T>,
    ) {
        let n = d.plane();
        let ld = nb * n;
        let nt = d.taps.len();
        let [pb0, pb1] = self.window.pad_begin;
        buf.clear();
        buf.resize(fr.hp * fr.wp, T::zero());
        let simd = conv3x3::available();
        for j in 0..nb {
            let base = ((s0 + j) * self.in_channels + g * d.cg) * d.h * d.w;
            for ci in 0..d.cg {
                let xc = &x[base + ci * d.h * d.w..][..d.h * d.w];
                for (y, src) in xc.chunks_exact(d.w).enumerate() {
                    buf[(y + pb0) * fr.wp + pb1..][..d.w].copy_from_slice(src);
                }
                for t in 0..nt {
                    let dst = &mut col[(ci * nt + t) * ld + j * n..][..n];
                    gather(dst, buf, fr, t, simd);
                }
            }
        }
    }

    /// [`Conv2d::col2im`] through the [`Frame`] `fr`: each input plane's gradient is summed in
    /// a zeroed frame (taps in order, as `col2im` adds them) and its interior written to `gx`
    /// (every value of the planes of group `g`, samples `s0..s0+nb`).
    #[allow(clippy::too_many_arguments)]
    fn col2im_framed<T: Real>(
        &self,
        col: &[T],
        d: &Dims,
        fr: &Frame,
        g: usize,
        s0: usize,
        nb: usize,
        gx: &mut [T],
        buf: &mut Vec<T>,
    ) {
        let n = d.plane();
        let ld = nb * n;
        let nt = d.taps.len();
        let [pb0, pb1] = self.window.pad_begin;
        buf.clear();
        buf.resize(fr.hp * fr.wp, T::zero());
        let simd = conv3x3::available();
        for j in 0..nb {
            let base = ((s0 + j) * self.in_channels + g * d.cg) * d.h * d.w;
            for ci in 0..d.cg {
                buf.fill(T::zero());
                for t in 0..nt {
                    let src = &col[(ci * nt + t) * ld + j * n..][..n];
                    scatter_add(buf, src, fr, t, simd);
                }
                let gc = &mut gx[base + ci * d.h * d.w..][..d.h * d.w];
                for (y, dst) in gc.chunks_exact_mut(d.w).enumerate() {
                    dst.copy_from_slice(&buf[(y + pb0) * fr.wp + pb1..][..d.w]);
                }
            }
        }
    }

    /// Unfold group `g` of samples `s0..s0+nb` of `x` into `col` (`[k, nb·oh·ow]`, row-major).
    fn im2col<T: Real>(&self, x: &[T], d: &Dims, g: usize, s0: usize, nb: usize, col: &mut [T]) {
        let win = &self.window;
        let kw = win.kernel[1];
        let n = d.plane();
        let ld = nb * n;
        let cols_x: Vec<(usize, usize)> = (0..kw)
            .map(|j| win.valid_outputs(1, j, d.w, d.ow))
            .collect();
        let rows_align = win.stride == [1, 1] && d.ow == d.w;
        for j in 0..nb {
            let base = ((s0 + j) * self.in_channels + g * d.cg) * d.h * d.w;
            for ci in 0..d.cg {
                let xc = &x[base + ci * d.h * d.w..][..d.h * d.w];
                for (t, &(ki, kj)) in d.taps.iter().enumerate() {
                    let (ylo, yhi) = win.valid_outputs(0, ki, d.h, d.oh);
                    let (xlo, xhi) = cols_x[kj];
                    {
                        let row = ci * d.taps.len() + t;
                        let dst = &mut col[row * ld + j * n..][..n];
                        dst[..ylo * d.ow].fill(T::zero());
                        dst[yhi * d.ow..].fill(T::zero());
                        if rows_align && xlo < xhi && ylo < yhi {
                            // Stride 1 and ow = w: the in-range taps of rows ylo..yhi are one
                            // run of the input plane; copy it at once (one memcpy instead of
                            // one per row), then clear the padding columns it carried along.
                            let iy0 = win.input_pos(0, ylo, ki) as usize;
                            let ix0 = win.input_pos(1, xlo, kj) as usize;
                            let start = ylo * d.ow + xlo;
                            let len = (yhi - ylo - 1) * d.ow + (xhi - xlo);
                            dst[start..start + len].copy_from_slice(&xc[iy0 * d.w + ix0..][..len]);
                            for oy in ylo..yhi {
                                let out = &mut dst[oy * d.ow..][..d.ow];
                                out[..xlo].fill(T::zero());
                                out[xhi..].fill(T::zero());
                            }
                            continue;
                        }
                        for oy in ylo..yhi {
                            let iy = win.input_pos(0, oy, ki) as usize;
                            let src = &xc[iy * d.w..][..d.w];
                            let out = &mut dst[oy * d.ow..][..d.ow];
                            out[..xlo].fill(T::zero());
                            out[xhi..].fill(T::zero());
                            if xlo < xhi {
                                let ix0 = win.input_pos(1, xlo, kj) as usize;
                                if win.stride[1] == 1 {
                                    out[xlo..xhi].copy_from_slice(&src[ix0..ix0 + (xhi - xlo)]);
                                } else {
                                    let sw = win.stride[1];
                                    for (o, v) in
                                        out[xlo..xhi].iter_mut().zip(src[ix0..].iter().step_by(sw))
                                    {
                                        *o = *v;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Fold `col` (as [`Conv2d::im2col`] lays it out) back, adding into the gradient `gx`.
    fn col2im<T: Real>(&self, col: &[T], d: &Dims, g: usize, s0: usize, nb: usize, gx: &mut [T]) {
        let win = &self.window;
        let kw = win.kernel[1];
        let n = d.plane();
        let ld = nb * n;
        let cols_x: Vec<(usize, usize)> = (0..kw)
            .map(|j| win.valid_outputs(1, j, d.w, d.ow))
            .collect();
        for j in 0..nb {
            let base = ((s0 + j) * self.in_channels + g * d.cg) * d.h * d.w;
            for ci in 0..d.cg {
                let gc = &mut gx[base + ci * d.h * d.w..][..d.h * d.w];
                for (t, &(ki, kj)) in d.taps.iter().enumerate() {
                    let (ylo, yhi) = win.valid_outputs(0, ki, d.h, d.oh);
                    let (xlo, xhi) = cols_x[kj];
                    {
                        if xlo >= xhi {
                            continue;
                        }
                        let row = ci * d.taps.len() + t;
                        let src = &col[row * ld + j * n..][..n];
                        let ix0 = win.input_pos(1, xlo, kj) as usize;
                        for oy in ylo..yhi {
                            let iy = win.input_pos(0, oy, ki) as usize;
                            let dst = &mut gc[iy * d.w..][..d.w];
                            let from = &src[oy * d.ow + xlo..oy * d.ow + xhi];
                            if win.stride[1] == 1 {
                                for (o, v) in dst[ix0..ix0 + from.len()].iter_mut().zip(from) {
                                    *o += *v;
                                }
                            } else {
                                for (o, v) in dst[ix0..].iter_mut().step_by(win.stride[1]).zip(from)
                                {
                                    *o += *v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Weight rows of group `g` as `[mg, k]`: the weight itself when every tap is used,
    /// else its columns of the used taps, gathered into `buf`.
    fn group_weight<'a, T: Real>(
        &self,
        w: &'a [T],
        d: &Dims,
        g: usize,
        buf: &'a mut Vec<T>,
    ) -> ArrayView2<'a, T> {
        let full = &w[g * d.mg * d.kfull..][..d.mg * d.kfull];
        if d.k == d.kfull {
            return ArrayView2::from_shape((d.mg, d.k), full)
                .expect("weight has its declared shape");
        }
        let kk = self.window.kernel[1];
        let per = self.window.kernel[0] * kk;
        buf.clear();
        for row in full.chunks_exact(d.kfull) {
            for ci in 0..d.cg {
                for &(ki, kj) in &d.taps {
                    buf.push(row[ci * per + ki * kk + kj]);
                }
            }
        }
        ArrayView2::from_shape((d.mg, d.k), &buf[..]).expect("gathered above")
    }

    /// Add the weight gradient of the used taps (`[mg, k]`, compact layout) into group `g`'s
    /// full weight gradient.
    fn scatter_weight_grad<T: Real>(&self, gwc: &[T], d: &Dims, g: usize, gw: &mut [T]) {
        let kk = self.window.kernel[1];
        let per = self.window.kernel[0] * kk;
        let full = &mut gw[g * d.mg * d.kfull..][..d.mg * d.kfull];
        for (row, src) in full.chunks_exact_mut(d.kfull).zip(gwc.chunks_exact(d.k)) {
            for ci in 0..d.cg {
                for (t, &(ki, kj)) in d.taps.iter().enumerate() {
                    row[ci * per + ki * kk + kj] += src[ci * d.taps.len() + t];
                }
            }
        }
    }

    /// The shapes of a call on the direct path ([`conv3x3`]), or `None` when it cannot
    /// take it: f32 on a CPU with AVX-512F, one group, dilation 1, and either a 3×3 kernel
    /// with padding 1 on every side, stride 1, or stride 2 on an even height and width, and an
    /// output of at least 8×8, or a 5×5 kernel with padding 2 ("same"), stride 1 and an output
    /// of at least 6×6 (on smaller ones the frames' padding is a large share of the work, and
    /// im2col + GEMM, which leaves out taps that only read padding, was faster).
    /// Within this path, the 3×3 shapes that [`winograd::fits`] takes (stride 1, widths 8, 16
    /// and 32, at least 16 channels each way) run on Winograd F(2×2, 3×3) instead of the
    /// direct kernels: forward, weight and input gradients.
    fn direct<T: Real>(&self, shape: &[usize]) -> Option<conv3x3::Shape> {
        let w = &self.window;
        let (h, wd) = (shape[2], shape[3]);
        let stride = w.stride[0];
        let k = w.kernel[0];
        let p = k / 2;
        // Measured (`bench_conv --k5`): 5×5 is faster on the direct path from 6×6 outputs on
        // (at 4×4 its forward took 1.4× im2col's time), 3×3 from 8×8.
        let min_out = if k == 5 { 6 } else { 8 };
        let fits = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && self.groups == 1
            && (k == 3 || k == 5)
            && w.kernel == [k, k]
            && w.stride[1] == stride
            && (stride == 1 || (k == 3 && stride == 2 && h % 2 == 0 && wd % 2 == 0))
            && w.dilation == [1, 1]
            && w.pad_begin == [p, p]
            && w.pad_end == [p, p]
            && h / stride >= min_out
            && wd / stride >= min_out
            && conv3x3::available();
        fits.then(|| conv3x3::Shape {
            batch: shape[0],
            cin: self.in_channels,
            cout: self.out_channels,
            h,
            w: wd,
            stride,
            k,
        })
    }

    /// Forward on the direct 3×3 path into `ys` (every element is written).
    fn forward_direct(
        &self,
        params: &[&[f32]],
        xs: &[f32],
        sh: conv3x3::Shape,
        ys: &mut [std::mem::MaybeUninit<f32>],
    ) {
        let bias = self.bias.then(|| params[1]);
        if winograd::fits(&sh) {
            return winograd::forward(xs, params[0], bias, sh, ys);
        }
        conv3x3::with_buffers(|bufs| conv3x3::forward(xs, params[0], bias, sh, bufs, ys));
    }

    /// Backward on the direct 3×3 path (`T` is f32).
    fn backward_direct<T: Real>(
        &self,
        params: &[&[T]],
        xs: &[T],
        gys: &[T],
        sh: conv3x3::Shape,
        mut gp: Vec<&mut [T]>,
        need_x: bool,
    ) -> Vec<Option<ArrayD<T>>> {
        let x32 = f32_slice(xs).expect("direct() checked that T is f32");
        let gy32 = f32_slice(gys).expect("T is f32");
        let w32 = f32_slice(params[0]).expect("T is f32");
        // The bias gradient is summed from the output gradient's frames (in cache then) on
        // the direct kernels, from the NCHW gradient on the Winograd path.
        let (gw, mut gb) = match &mut gp[..] {
            [gw, gb] => (f32_slice_mut(gw), f32_slice_mut(gb)),
            [gw] => (f32_slice_mut(gw), None),
            _ => unreachable!("a weight and at most a bias"),
        };
        let gw = gw.expect("T is f32");
        if winograd::fits(&sh) {
            if let Some(gb) = gb {
                let n = sh.h * sh.w;
                for (o, g) in gb.iter_mut().enumerate() {
                    let mut sum = 0.0f32;
                    for s in 0..sh.batch {
                        sum += lanes_sum(&gy32[(s * sh.cout + o) * n..][..n]);
                    }
                    *g += sum;
                }
            }
            winograd::weight_grad(x32, gy32, sh, gw);
            let gx = need_x.then(|| {
                let shape = [sh.batch, sh.cin, sh.h, sh.w];
                // SAFETY: `winograd::input_grad` writes every value of the input gradient.
                unsafe {
                    super::filled(&shape, |gx: &mut [std::mem::MaybeUninit<T>]| {
                        let gx32 = f32_uninit(gx).expect("T is f32");
                        winograd::input_grad(gy32, w32, sh, gx32);
                    })
                }
            });
            return vec![gx];
        }
        let gx = need_x.then(|| {
            let shape = [sh.batch, sh.cin, sh.h, sh.w];
            // SAFETY: `conv3x3::backward` writes every value of the input gradient.
            unsafe {
                super::filled(&shape, |gx: &mut [std::mem::MaybeUninit<T>]| {
                    let gx32 = f32_uninit(gx).expect("T is f32");
                    conv3x3::with_buffers(|bufs| {
                        conv3x3::backward(x32, w32, gy32, sh, bufs, gw, gb.take(), Some(gx32))
                    });
                })
            }
        });
        if gx.is_none() {
            conv3x3::with_buffers(|bufs| {
                conv3x3::backward(x32, w32, gy32, sh, bufs, gw, gb.take(), None)
            });
        }
        vec![gx]
    }

    /// Forward into `ys` (every element is written): im2col, one product per block and
    /// group, bias added on the way out.
    fn forward_into<T: Real>(
        &self,
        params: &[&[T]],
        xs: &[T],
        d: &Dims,
        col: &mut [T],
        out: &mut [T],
        ys: &mut [std::mem::MaybeUninit<T>],
    ) {
        let n = d.plane();
        let mut fbuf = Vec::new();
        for s0 in (0..d.batch).step_by(d.block) {
            let nb = d.block.min(d.batch - s0);
            let cols = nb * n;
            for g in 0..self.groups {
                let colm = &mut col[..d.k * cols];
                match &d.frame {
                    Some(fr) => self.im2col_framed(xs, d, fr, g, s0, nb, colm, &mut fbuf),
                    None => self.im2col(xs, d, g, s0, nb, colm),
                }
                let colv = ArrayView2::from_shape((d.k, cols), &*colm).expect("sized above");
                let mut outm = ArrayViewMut2::from_shape((d.mg, cols), &mut out[..d.mg * cols])
                    .expect("sized above");
                let mut wbuf = Vec::new();
                mat_mul(
                    self.group_weight(params[0], d, g, &mut wbuf),
                    colv,
                    false,
                    outm.view_mut(),
                );
                // [mg, nb·n] → y[s0 + j, g·mg + m, :]
                for j in 0..nb {
                    for m in 0..d.mg {
                        let o = g * d.mg + m;
                        let dst = &mut ys[((s0 + j) * self.out_channels + o) * n..][..n];
                        let src = outm.slice(s![m, j * n..(j + 1) * n]);
                        let b = if self.bias { params[1][o] } else { T::zero() };
                        for (a, &v) in dst.iter_mut().zip(src) {
                            a.write(v + b);
                        }
                    }
                }
            }
        }
    }
}

impl<T: Real> Layer<T> for Conv2d {
    fn params(&self) -> Vec<ParamDecl> {
        let [kh, kw] = self.window.kernel;
        let mut v = vec![ParamDecl {
            suffix: "weight",
            shape: vec![self.out_channels, self.in_channels / self.groups, kh, kw],
        }];
        if self.bias {
            v.push(ParamDecl {
                suffix: "bias",
                shape: vec![self.out_channels],
            });
        }
        v
    }

    fn out_shape(&self, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
        let [s] = inputs else {
            return Err(format!("takes 1 input, got {}", inputs.len()));
        };
        let [c, h, w] = chw(s)?;
        if c != self.in_channels {
            return Err(format!(
                "in_channels = {} does not match the {c} channel{} it receives",
                self.in_channels,
                if c == 1 { "" } else { "s" }
            ));
        }
        let [oh, ow] = self.window.out_hw(h, w)?;
        Ok(vec![self.out_channels, oh, ow])
    }

    fn forward(
        &self,
        params: &[&[T]],
        inputs: &[ArrayViewD<T>],
        saved: &mut Saved<T>,
    ) -> ArrayD<T> {
        let x = inputs[0].as_standard_layout();
        let xs = x.as_slice().expect("standard layout");
        if let Some(sh) = self.direct::<T>(x.shape()) {
            let shape = [sh.batch, sh.cout, sh.h / sh.stride, sh.w / sh.stride];
            let p32: Vec<&[f32]> = params.iter().filter_map(|p| f32_slice(p)).collect();
            let x32 = f32_slice(xs).expect("direct() checked that T is f32");
            // SAFETY: `forward_direct` writes every output value.
            return unsafe {
                super::filled(&shape, |ys: &mut [std::mem::MaybeUninit<T>]| {
                    let ys32 = f32_uninit(ys).expect("direct() checked that T is f32");
                    self.forward_direct(&p32, x32, sh, ys32)
                })
            };
        }
        let d = self.dims(x.shape());
        if let Some(plan) = self.small(&d, x.shape()) {
            return self.forward_small(&plan, params, xs, &d, saved);
        }
        self.forward_im2col(params, xs, &d)
    }

    fn backward(&self, b: Backward<'_, T>) -> Vec<Option<ArrayD<T>>> {
        let x = b.inputs[0].as_standard_layout();
        let xs = x.as_slice().expect("standard layout");
        let gy = b.grad_out.as_standard_layout();
        let gys = gy.as_slice().expect("standard layout");
        if let Some(sh) = self.direct::<T>(x.shape()) {
            return self.backward_direct(
                b.params,
                xs,
                gys,
                sh,
                b.grad_params,
                b.need_input_grad[0],
            );
        }
        let d = self.dims(x.shape());
        let need_x = b.need_input_grad[0];
        if let Some(plan) = self.small(&d, x.shape()) {
            return vec![self.backward_small(
                &plan,
                b.params,
                xs,
                gys,
                b.saved,
                b.grad_params,
                need_x,
            )];
        }
        vec![self.backward_im2col(b.params, xs, gys, &d, b.grad_params, need_x)]
    }

    fn affine_in_params(&self) -> bool {
        true
    }

    fn macs_per_sample(&self, inputs: &[Vec<usize>]) -> u64 {
        let Ok(out) = <Self as Layer<T>>::out_shape(self, inputs) else {
            return 0;
        };
        let k = (self.in_channels / self.groups) * self.window.kernel[0] * self.window.kernel[1];
        (out.iter().product::<usize>() * k) as u64
    }
}

impl Conv2d {
    /// Forward through im2col and GEMM.
    fn forward_im2col<T: Real>(&self, params: &[&[T]], xs: &[T], d: &Dims) -> ArrayD<T> {
        let n = d.plane();
        let shape = [d.batch, self.out_channels, d.oh, d.ow];
        // im2col and the product's output: this thread's buffers, fully written before read.
        let mut scratch = Scratch::take();
        let [col, out, _] = scratch.slices([d.k * d.block * n, d.mg * d.block * n, 0]);
        // SAFETY: the blocks cover every sample, the groups every output channel, and each
        // (sample, channel) plane of n outputs is written in full below.
        let y =
            unsafe { super::filled(&shape, |ys| self.forward_into(params, xs, d, col, out, ys)) };
        scratch.give_back();
        y
    }

    /// The dense product's plan ([`conv_small`]) for a call, or `None` for im2col.
    fn small(&self, d: &Dims, shape: &[usize]) -> Option<conv_small::Plan> {
        conv_small::Plan::new(
            &self.window,
            self.groups,
            self.out_channels,
            shape,
            [d.oh, d.ow],
            d.taps.len(),
        )
    }

    /// Forward as one dense product; `Wbig` is kept in `saved` for backward.
    fn forward_small<T: Real>(
        &self,
        plan: &conv_small::Plan,
        params: &[&[T]],
        xs: &[T],
        d: &Dims,
        saved: &mut Saved<T>,
    ) -> ArrayD<T> {
        let mut wbig = vec![T::zero(); plan.wbig_len()];
        plan.wbig(params[0], &mut wbig);
        let shape = [d.batch, self.out_channels, d.oh, d.ow];
        let bias = self.bias.then(|| params[1]);
        // SAFETY: `Plan::forward` writes every output value.
        let y = unsafe { super::filled(&shape, |ys| plan.forward(&wbig, bias, xs, ys)) };
        let len = wbig.len();
        *saved = Saved::Arrays(vec![
            ArrayD::from_shape_vec(IxDyn(&[len]), wbig).expect("one axis of its length"),
        ]);
        y
    }

    /// Backward as dense products, with forward's `Wbig` when it was kept.
    #[allow(clippy::too_many_arguments)]
    fn backward_small<T: Real>(
        &self,
        plan: &conv_small::Plan,
        params: &[&[T]],
        xs: &[T],
        gys: &[T],
        saved: &Saved<T>,
        gp: Vec<&mut [T]>,
        need_x: bool,
    ) -> Option<ArrayD<T>> {
        let len = plan.wbig_len();
        let built;
        let wbig: &[T] = match saved {
            Saved::Arrays(v) if v.len() == 1 && v[0].len() == len => {
                v[0].as_slice().expect("kept contiguous")
            }
            _ => {
                let mut w = vec![T::zero(); len];
                plan.wbig(params[0], &mut w);
                built = w;
                &built
            }
        };
        let mut gp = gp.into_iter();
        let gw = gp.next().expect("a weight gradient");
        let gbias = gp.next();
        let mut scratch = Scratch::take();
        let [gwbig, _, _] = scratch.slices([len, 0, 0]);
        let gx = plan.backward(wbig, xs, gys, gw, gbias, gwbig, need_x);
        scratch.give_back();
        gx
    }

    /// Backward through im2col and GEMM.
    fn backward_im2col<T: Real>(
        &self,
        params: &[&[T]],
        xs: &[T],
        gys: &[T],
        d: &Dims,
        mut gp: Vec<&mut [T]>,
        need_x: bool,
    ) -> Option<ArrayD<T>> {
        let n = d.plane();
        let mut gbias = vec![T::zero(); self.out_channels];
        let mut fbuf = Vec::new();
        let mut gx =
            need_x.then(|| ArrayD::<T>::zeros(IxDyn(&[d.batch, self.in_channels, d.h, d.w])));
        // im2col, its gradient and the gathered output gradients: this thread's buffers, each
        // entry written before it is read (im2col and the products write whole blocks, the
        // gather below every row).
        let mut scratch = Scratch::take();
        let len = d.k * d.block * n;
        let [col, gcol, gout] =
            scratch.slices([len, if need_x { len } else { 0 }, d.mg * d.block * n]);
        for s0 in (0..d.batch).step_by(d.block) {
            let nb = d.block.min(d.batch - s0);
            let cols = nb * n;
            for g in 0..self.groups {
                // Gather gy[s0 + j, g·mg + m, :] into [mg, nb·n], summing it for the bias (if any).
                for m in 0..d.mg {
                    let o = g * d.mg + m;
                    for j in 0..nb {
                        let src = &gys[((s0 + j) * self.out_channels + o) * n..][..n];
                        gout[m * cols + j * n..][..n].copy_from_slice(src);
                        if self.bias {
                            gbias[o] += lanes_sum(src);
                        }
                    }
                }
                let goutv = ArrayView2::from_shape((d.mg, cols), &gout[..d.mg * cols])
                    .expect("sized above");
                let colm = &mut col[..d.k * cols];
                match &d.frame {
                    Some(fr) => self.im2col_framed(xs, d, fr, g, s0, nb, colm, &mut fbuf),
                    None => self.im2col(xs, d, g, s0, nb, colm),
                }
                let colv = ArrayView2::from_shape((d.k, cols), &*colm).expect("sized above");
                if d.k == d.kfull {
                    let gw = &mut gp[0][g * d.mg * d.k..][..d.mg * d.k];
                    let gw = ArrayViewMut2::from_shape((d.mg, d.k), gw)
                        .expect("weight gradient has the weight's shape");
                    mat_mul(goutv, colv.t(), true, gw);
                } else {
                    // Only the used taps: their gradient, then added into the full one.
                    let mut gwc = vec![T::zero(); d.mg * d.k];
                    let gwv =
                        ArrayViewMut2::from_shape((d.mg, d.k), &mut gwc[..]).expect("sized above");
                    mat_mul(goutv, colv.t(), false, gwv);
                    self.scatter_weight_grad(&gwc, d, g, gp[0]);
                }
                if let Some(gx) = gx.as_mut() {
                    let mut gcolm = ArrayViewMut2::from_shape((d.k, cols), &mut gcol[..d.k * cols])
                        .expect("sized above");
                    let mut wbuf = Vec::new();
                    mat_mul(
                        self.group_weight(params[0], d, g, &mut wbuf).t(),
                        goutv,
                        false,
                        gcolm.view_mut(),
                    );
                    let gxs = gx.as_slice_mut().expect("fresh array");
                    let gcolm = &gcol[..d.k * cols];
                    match &d.frame {
                        Some(fr) => self.col2im_framed(gcolm, d, fr, g, s0, nb, gxs, &mut fbuf),
                        None => self.col2im(gcolm, d, g, s0, nb, gxs),
                    }
                }
            }
        }
        scratch.give_back();
        if self.bias {
            for (a, v) in gp[1].iter_mut().zip(gbias) {
                *a += v;
            }
        }
        gx
    }
}

// ---------------------------------------------------------------------------------------
// Drafting (`lca init`)

use super::registry::{DraftIn, Drafted, Drafter, ModuleTensors, Recognised, Role, dims, pair};
use crate::spec::LayerKind;

/// `nn.Conv2d`: a 4-D `weight` `[out_channels, in_channels / groups, kh, kw]`, maybe a `bias`
/// `[out_channels]`. A 3-D or 5-D weight is a `Conv1d` or `Conv3d`, which lca cannot evaluate.
pub static DRAFTER: Drafter = Drafter {
    recognise,
    role: Role::Weighted,
    draft,
};

/// Recognised with `in_channels` = the weight's input channels per group and `groups = 1`;
/// [`draft`] decides the groups from the channels that arrive.
fn recognise(m: &ModuleTensors) -> Option<Recognised> {
    if let Some(&[o, i, kh, kw]) = m.weight_and_bias(4) {
        return Some(Recognised::Layer(LayerKind::Conv2d {
            in_channels: i,
            out_channels: o,
            kernel_size: Pair([kh, kw]),
            stride: Pair::one(),
            padding: Padding::default(),
            dilation: Pair::one(),
            groups: 1,
            bias: m.has("bias"),
        }));
    }
    if !m.only(&["weight", "bias"]) {
        return None;
    }
    match *m.shape("weight")? {
        [o, i, k] => Some(Recognised::Unsupported(format!(
            "nn.Conv1d({i}·groups, {o}, kernel_size={k}) (weight [{o}, {i}, {k}])"
        ))),
        [o, i, a, b, c] => Some(Recognised::Unsupported(format!(
            "nn.Conv3d({i}·groups, {o}, kernel_size=({a}, {b}, {c}))"
        ))),
        _ => None,
    }
}

/// Groups from the channels that arrive; stride, padding and dilation guessed (the block's
/// stride, padding that keeps the size for odd kernels).
fn draft(kind: LayerKind, at: DraftIn) -> Drafted {
    let LayerKind::Conv2d {
        in_channels: in_per_group,
        out_channels: out,
        kernel_size: Pair(kernel),
        bias,
        ..
    } = kind
    else {
        return Drafted::as_recognised(kind, at);
    };
    let mut flow = at.flow;
    let have = match &flow.shape {
        Some(s) if s.len() == 3 => Some(s[0]),
        Some(_) => None,
        None => flow.channels,
    };
    let mut groups = 1;
    if let Some(c) = have
        && c != in_per_group
        && c.is_multiple_of(in_per_group)
        && out.is_multiple_of(c / in_per_group)
    {
        groups = c / in_per_group;
    }
    let in_channels = in_per_group * groups;
    let padding = [kernel[0] / 2, kernel[1] / 2];
    let s = at.stride;
    let mut note = format!(
        "'{}': stride, padding and dilation are not stored in a checkpoint; guessed \
         stride {s}, padding {}{}. Pooling after it is not stored either: add your \
         model's max_pool2d / avg_pool2d layers.",
        at.path,
        pair(padding),
        if s == 1 {
            " (keeps the size for odd kernels)"
        } else {
            " (the block's down-sampling)"
        }
    );
    if groups > 1 {
        note.push_str(&format!(
            " groups = {groups}: the weight has {in_per_group} input channels per \
             group and the layer before gives {in_channels}."
        ));
    } else if have.is_none_or(|c| c == in_per_group) {
        note.push_str(" groups = 1 assumed (in_channels = weight.shape[1]).");
    }
    if let Some(sh) = &flow.shape
        && (sh.len() != 3 || sh[0] != in_channels)
    {
        note.push_str(&format!(
            " It receives {} but expects {in_channels} channels × height × width: \
             check [model] input_shape and the layers before it.",
            dims(sh)
        ));
    }
    // Output size: ⌊(H + 2·padding − kernel) / stride⌋ + 1.
    let size = |h: usize, a: usize| {
        (h + 2 * padding[a])
            .checked_sub(kernel[a])
            .map_or(0, |v| v / s + 1)
    };
    flow.shape = match &flow.shape {
        Some(sh) if sh.len() == 3 => Some(vec![out, size(sh[1], 0), size(sh[2], 1)]),
        _ => None,
    };
    flow.after_conv = true;
    flow.channels = Some(out);
    Drafted {
        lead: vec![super::registry::Lead::Todo(note)],
        kind: LayerKind::Conv2d {
            in_channels,
            out_channels: out,
            kernel_size: Pair(kernel),
            stride: Pair([s, s]),
            padding: Padding::Explicit(Pair(padding)),
            dilation: Pair::one(),
            groups,
            bias,
        },
        // Guessed, so written even at their defaults.
        explicit: &["stride", "padding"],
        what: format!("conv2d {in_channels}→{out}, {} kernel", dims(&kernel)),
        flow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::{Rng, check_layer, max_rel, run_layer};

    /// `Conv2d(cin, cout, k, stride, pad, dil, groups, bias)` with `[cin, cout, groups]`.
    fn conv(
        [cin, cout, groups]: [usize; 3],
        k: [usize; 2],
        stride: [usize; 2],
        pad: Padding,
        dil: [usize; 2],
        bias: bool,
    ) -> Conv2d {
        Conv2d {
            in_channels: cin,
            out_channels: cout,
            groups,
            bias,
            window: Window2d::conv(Pair(k), Pair(stride), Pair(dil), pad),
        }
    }

    fn p(a: usize, b: usize) -> Padding {
        Padding::Explicit(Pair([a, b]))
    }

    #[test]
    fn conv_gradients_match_finite_differences() {
        // Plain, no padding.
        check_layer(
            &conv([2, 3, 1], [3, 3], [1, 1], p(0, 0), [1, 1], true),
            &[vec![2, 5, 5]],
            2,
        );
        // Padding, rectangular kernel, no bias.
        check_layer(
            &conv([2, 2, 1], [3, 2], [1, 1], p(1, 2), [1, 1], false),
            &[vec![2, 4, 5]],
            2,
        );
        // Stride 2 (and uneven coverage of the input).
        check_layer(
            &conv([3, 4, 1], [3, 3], [2, 2], p(1, 1), [1, 1], true),
            &[vec![3, 6, 7]],
            2,
        );
        // Different strides per axis.
        check_layer(
            &conv([1, 2, 1], [2, 3], [2, 3], p(0, 1), [1, 1], true),
            &[vec![1, 7, 8]],
            3,
        );
        // Dilation.
        check_layer(
            &conv([2, 3, 1], [3, 3], [1, 1], p(2, 1), [2, 1], true),
            &[vec![2, 6, 6]],
            2,
        );
        // Groups (4 → 6 channels in 2 groups) and depthwise (groups = channels).
        check_layer(
            &conv([4, 6, 2], [3, 3], [1, 1], p(1, 1), [1, 1], true),
            &[vec![4, 5, 5]],
            2,
        );
        check_layer(
            &conv([3, 3, 3], [2, 2], [1, 1], p(0, 0), [1, 1], true),
            &[vec![3, 4, 4]],
            2,
        );
        // "same" with an even kernel and dilation: asymmetric padding.
        check_layer(
            &conv([2, 2, 1], [4, 2], [1, 1], Padding::Same, [1, 3], true),
            &[vec![2, 6, 7]],
            2,
        );
        // 1×1 convolution, and a kernel as large as the padded input.
        check_layer(
            &conv([3, 2, 1], [1, 1], [1, 1], Padding::Valid, [1, 1], true),
            &[vec![3, 3, 3]],
            2,
        );
        check_layer(
            &conv([1, 2, 1], [5, 5], [1, 1], p(1, 1), [1, 1], true),
            &[vec![1, 3, 3]],
            2,
        );
        // Taps that fall in the padding for every output are left out of the products: a 3×3
        // kernel with padding 1 on a 1×1 input (the centre tap only, ResNet's last stage at
        // 32×32), in groups, and with stride 2 on 2×2 (4 of 9 taps).
        check_layer(
            &conv([3, 4, 1], [3, 3], [1, 1], p(1, 1), [1, 1], false),
            &[vec![3, 1, 1]],
            3,
        );
        check_layer(
            &conv([4, 2, 2], [3, 3], [1, 1], p(1, 1), [1, 1], true),
            &[vec![4, 1, 2]],
            2,
        );
        check_layer(
            &conv([2, 3, 1], [3, 3], [2, 2], p(1, 1), [1, 1], false),
            &[vec![2, 2, 2]],
            2,
        );
    }

    /// The direct 3×3 path (f32, AVX-512F) against the im2col path in f64, which the finite
    /// differences above check: forward, weight, bias and input gradients, over shapes with
    /// channel counts that are not multiples of the kernels' tiles, odd sizes, and batches
    /// that span several blocks of frames.
    #[test]
    fn direct_3x3_matches_the_f64_path() {
        if !conv3x3::available() {
            eprintln!("no AVX-512F: the direct 3×3 path is not used on this CPU");
            return;
        }
        for &(cin, cout, h, w, batch, bias, stride) in &[
            (3, 16, 32, 32, 2, false, 1),
            (16, 16, 8, 8, 5, true, 1),
            (5, 7, 9, 11, 3, true, 1),
            (64, 64, 8, 8, 3, false, 1),
            (2, 3, 8, 8, 7, true, 1),
            (32, 8, 32, 32, 4, false, 1),
            (16, 16, 16, 16, 30, true, 1),
            // Stride 2 (even sizes): four parity planes per channel.
            (16, 32, 32, 32, 3, false, 2),
            (3, 5, 16, 18, 4, true, 2),
            (32, 64, 16, 16, 40, false, 2),
        ] {
            let c = conv(
                [cin, cout, 1],
                [3, 3],
                [stride, stride],
                p(1, 1),
                [1, 1],
                bias,
            );
            assert!(c.direct::<f32>(&[batch, cin, h, w]).is_some());
            assert!(c.direct::<f64>(&[batch, cin, h, w]).is_none());
            // Odd sizes with stride 2 and small outputs take the im2col path.
            assert!(
                c.direct::<f32>(&[batch, cin, 7 * stride, 7 * stride])
                    .is_none()
            );
            if stride == 2 {
                assert!(c.direct::<f32>(&[batch, cin, h + 1, w]).is_none());
            }
            let mut rng = Rng::new((cin * 1000 + h) as u64);
            let x = rng.array(&[batch, cin, h, w]);
            let gy = rng.array(&[batch, cout, h / stride, w / stride]);
            let params: Vec<Vec<f64>> = <Conv2d as Layer<f64>>::params(&c)
                .iter()
                .map(|d| rng.array(&d.shape).into_raw_vec_and_offset().0)
                .collect();
            let p32: Vec<Vec<f32>> = params
                .iter()
                .map(|v| v.iter().map(|&x| x as f32).collect())
                .collect();
            let (x32, gy32) = (x.mapv(|v| v as f32), gy.mapv(|v| v as f32));
            let (y, g, gx) = run_layer::<f64>(&c, &params, &x, &gy, true, 0.0);
            let run32 = |need_x: bool| {
                // Gradients are added to what is there.
                let (y, mut g, gx) = run_layer::<f32>(&c, &p32, &x32, &gy32, need_x, 1.0);
                for v in g.iter_mut().flatten() {
                    *v -= 1.0;
                }
                (y, g, gx)
            };
            for need_x in [true, false] {
                let (y32, g32, gx32) = run32(need_x);
                let what = format!("{cin}→{cout} {h}×{w} ×{batch}");
                let e = max_rel(y32.as_slice().unwrap(), y.as_slice().unwrap());
                assert!(e < 1e-6, "{what}: forward {e}");
                for (a, b) in g32.iter().zip(&g) {
                    let e = max_rel(a, b);
                    assert!(e < 1e-5, "{what}: parameter gradient {e}");
                }
                assert_eq!(gx32.len(), 1);
                match (&gx32[0], need_x) {
                    (Some(a), true) => {
                        let e = max_rel(
                            a.as_slice().unwrap(),
                            gx[0].as_ref().unwrap().as_slice().unwrap(),
                        );
                        assert!(e < 1e-6, "{what}: input gradient {e}");
                    }
                    (None, false) => {}
                    _ => panic!("{what}: input gradient given iff asked for"),
                }
            }
        }
    }

    /// The direct path's 5×5 "same" convolutions (f32, AVX-512F; LeNet's) against the im2col
    /// path in f64, which the finite differences above check, and in f32: forward, weight,
    /// bias and input gradients, with and without the input gradient, over one input channel,
    /// channel counts that are not multiples of the tiles (4 output channels, 16 lanes), odd
    /// sizes, batches of one sample and batches that span several blocks of frames.
    #[test]
    fn direct_5x5_matches_the_im2col_path() {
        if !conv3x3::available() {
            eprintln!("no AVX-512F: the direct 5×5 path is not used on this CPU");
            return;
        }
        fn im2col_run<T: Real>(
            c: &Conv2d,
            params: &[Vec<T>],
            x: &ArrayD<T>,
            gy: &ArrayD<T>,
        ) -> (Vec<f64>, Vec<Vec<f64>>, Vec<f64>) {
            let up = |v: &[T]| v.iter().map(|x| x.to_f64().unwrap()).collect::<Vec<f64>>();
            let d = c.dims(x.shape());
            let pr: Vec<&[T]> = params.iter().map(|v| v.as_slice()).collect();
            let xs = x.as_slice().unwrap();
            let y = c.forward_im2col(&pr, xs, &d);
            let mut g: Vec<Vec<T>> = params.iter().map(|v| vec![T::zero(); v.len()]).collect();
            let gp = g.iter_mut().map(|v| v.as_mut_slice()).collect();
            let gx = c.backward_im2col(&pr, xs, gy.as_slice().unwrap(), &d, gp, true);
            let g = g.iter().map(|v| up(v)).collect();
            (
                up(y.as_slice().unwrap()),
                g,
                up(gx.unwrap().as_slice().unwrap()),
            )
        }
        // (cin, cout, h, w, batch, bias)
        for &(cin, cout, h, w, batch, bias) in &[
            (1, 20, 28, 28, 3, true),
            (20, 40, 14, 14, 5, true),
            (1, 20, 28, 28, 1, false),
            (20, 40, 14, 14, 23, true),
            (5, 7, 9, 11, 3, true),
            (17, 19, 8, 8, 1, false),
            (3, 33, 10, 23, 2, true),
            (2, 1, 8, 8, 4, false),
            (6, 5, 6, 7, 2, true),
            // Winograd's widths and channel counts: 3×3 only.
            (16, 16, 16, 16, 2, true),
        ] {
            let c = conv([cin, cout, 1], [5, 5], [1, 1], p(2, 2), [1, 1], bias);
            let what = format!("5×5 {cin}→{cout} {h}×{w} ×{batch}");
            assert!(c.direct::<f32>(&[batch, cin, h, w]).is_some(), "{what}");
            assert!(c.direct::<f64>(&[batch, cin, h, w]).is_none(), "{what}");
            let mut rng = Rng::new((cin * 1000 + h * 10 + batch) as u64);
            let x = rng.array(&[batch, cin, h, w]);
            let gy = rng.array(&[batch, cout, h, w]);
            let params: Vec<Vec<f64>> = <Conv2d as Layer<f64>>::params(&c)
                .iter()
                .map(|d| rng.array(&d.shape).into_raw_vec_and_offset().0)
                .collect();
            let p32: Vec<Vec<f32>> = params
                .iter()
                .map(|v| v.iter().map(|&x| x as f32).collect())
                .collect();
            let (x32, gy32) = (x.mapv(|v| v as f32), gy.mapv(|v| v as f32));
            let refs = [
                ("f64", im2col_run::<f64>(&c, &params, &x, &gy), 4e-6, 2e-5),
                ("f32", im2col_run::<f32>(&c, &p32, &x32, &gy32), 4e-6, 2e-5),
            ];
            for need_x in [true, false] {
                // Gradients are added to what is there.
                let (y32, mut g32, gx32) = run_layer::<f32>(&c, &p32, &x32, &gy32, need_x, 1.0);
                for v in g32.iter_mut().flatten() {
                    *v -= 1.0;
                }
                for (name, (y, g, gx), tol, gtol) in &refs {
                    let e = max_rel(y32.as_slice().unwrap(), y);
                    assert!(e < *tol, "{what}: forward against {name} im2col: {e}");
                    for (a, b) in g32.iter().zip(g) {
                        let e = max_rel(a, b);
                        assert!(e < *gtol, "{what}: parameter gradient ({name}): {e}");
                    }
                    match (&gx32[0], need_x) {
                        (Some(a), true) => {
                            let e = max_rel(a.as_slice().unwrap(), gx);
                            assert!(e < *tol, "{what}: input gradient ({name}): {e}");
                        }
                        (None, false) => {}
                        _ => panic!("{what}: input gradient given iff asked for"),
                    }
                }
            }
        }
        // Left to the other paths: padding other than 2, stride 2, dilation, small outputs.
        for (c, shape) in [
            (
                conv([4, 4, 1], [5, 5], [1, 1], p(1, 1), [1, 1], false),
                [2, 4, 12, 12],
            ),
            (
                conv([4, 4, 1], [5, 5], [2, 2], p(2, 2), [1, 1], false),
                [2, 4, 16, 16],
            ),
            (
                conv([4, 4, 1], [5, 5], [1, 1], p(4, 4), [2, 2], false),
                [2, 4, 12, 12],
            ),
            (
                conv([4, 4, 1], [5, 5], [1, 1], p(2, 2), [1, 1], false),
                [2, 4, 5, 8],
            ),
        ] {
            assert!(c.direct::<f32>(&shape).is_none(), "{shape:?}");
        }
    }

    /// The dense product of tiny planes ([`conv_small`]) against the im2col path in f64
    /// (which the finite differences above check): outputs, weight, bias and input gradients,
    /// in f64 and in f32, with and without forward's kept `Wbig`, on every kind of plane it
    /// takes (2×2 and 1×1 outputs, stride 2 onto 1×1, a 1×1 kernel reading one position of
    /// four, a 1×2 plane, a 5×5 kernel) and not on the shapes it leaves to im2col.
    #[test]
    fn small_planes_match_the_im2col_path() {
        fn im2col_run(
            c: &Conv2d,
            params: &[Vec<f64>],
            x: &ArrayD<f64>,
            gy: &ArrayD<f64>,
        ) -> (ArrayD<f64>, Vec<Vec<f64>>, ArrayD<f64>) {
            let d = c.dims(x.shape());
            let pr: Vec<&[f64]> = params.iter().map(|v| v.as_slice()).collect();
            let xs = x.as_slice().unwrap();
            let y = c.forward_im2col(&pr, xs, &d);
            let mut g: Vec<Vec<f64>> = params.iter().map(|v| vec![0.0; v.len()]).collect();
            let gp = g.iter_mut().map(|v| v.as_mut_slice()).collect();
            let gx = c.backward_im2col(&pr, xs, gy.as_slice().unwrap(), &d, gp, true);
            (y, g, gx.unwrap())
        }
        // (cin, cout, h, w, batch, kernel, stride, padding, bias)
        for &(cin, cout, h, w, batch, k, stride, pad, bias) in &[
            (8, 6, 2, 2, 5, 3, 1, 1, true),
            (5, 7, 1, 1, 4, 3, 1, 1, false),
            (6, 4, 2, 2, 3, 3, 2, 1, true),
            (6, 5, 2, 2, 3, 1, 2, 0, true),
            (3, 2, 1, 2, 2, 3, 1, 1, false),
            (4, 3, 2, 2, 3, 5, 1, 2, true),
            (16, 9, 1, 1, 1, 3, 1, 1, true),
        ] {
            let c = conv(
                [cin, cout, 1],
                [k, k],
                [stride, stride],
                p(pad, pad),
                [1, 1],
                bias,
            );
            let what = format!("{cin}→{cout} {h}×{w} k{k} s{stride} ×{batch}");
            let d = c.dims(&[batch, cin, h, w]);
            assert!(c.small(&d, &[batch, cin, h, w]).is_some(), "{what}");
            let mut rng = Rng::new((cin * 100 + h * 10 + k) as u64);
            let x = rng.array(&[batch, cin, h, w]);
            let gy = rng.array(&[batch, cout, d.oh, d.ow]);
            let params: Vec<Vec<f64>> = <Conv2d as Layer<f64>>::params(&c)
                .iter()
                .map(|d| rng.array(&d.shape).into_raw_vec_and_offset().0)
                .collect();
            let (y, g, gx) = im2col_run(&c, &params, &x, &gy);
            // f64 through the layer (forward keeps Wbig), then backward rebuilding it.
            let (y64, g64, gx64) = run_layer::<f64>(&c, &params, &x, &gy, true, 0.0);
            let e = max_rel(y64.as_slice().unwrap(), y.as_slice().unwrap());
            assert!(e < 1e-13, "{what}: f64 forward {e}");
            for (a, b) in g64.iter().zip(&g) {
                let e = max_rel(a, b);
                assert!(e < 1e-13, "{what}: f64 parameter gradient {e}");
            }
            let gx64 = gx64[0].as_ref().unwrap();
            let e = max_rel(gx64.as_slice().unwrap(), gx.as_slice().unwrap());
            assert!(e < 1e-13, "{what}: f64 input gradient {e}");
            let pr: Vec<&[f64]> = params.iter().map(|v| v.as_slice()).collect();
            let mut g2: Vec<Vec<f64>> = params.iter().map(|v| vec![0.0; v.len()]).collect();
            let gx2 = c.backward(Backward {
                params: &pr,
                inputs: &[x.view()],
                output: y.view(),
                saved: &Saved::None,
                grad_out: gy.view(),
                grad_params: g2.iter_mut().map(|v| v.as_mut_slice()).collect(),
                need_input_grad: &[false],
            });
            assert!(gx2[0].is_none(), "{what}: no input gradient asked for");
            assert_eq!(g2, g64, "{what}: Wbig rebuilt in backward");
            // f32, gradients added to what is there.
            let p32: Vec<Vec<f32>> = params
                .iter()
                .map(|v| v.iter().map(|&x| x as f32).collect())
                .collect();
            let (x32, gy32) = (x.mapv(|v| v as f32), gy.mapv(|v| v as f32));
            let (y32, g32, gx32) = run_layer::<f32>(&c, &p32, &x32, &gy32, true, 1.0);
            let up = |a: &[f32]| a.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
            let e = max_rel(&up(y32.as_slice().unwrap()), y.as_slice().unwrap());
            assert!(e < 1e-6, "{what}: f32 forward {e}");
            for (a, b) in g32.iter().zip(&g) {
                let a: Vec<f64> = a.iter().map(|&v| f64::from(v) - 1.0).collect();
                let e = max_rel(&a, b);
                assert!(e < 1e-5, "{what}: f32 parameter gradient {e}");
            }
            let gx32 = gx32[0].as_ref().unwrap();
            let e = max_rel(&up(gx32.as_slice().unwrap()), gx.as_slice().unwrap());
            assert!(e < 1e-6, "{what}: f32 input gradient {e}");
        }
        // Left to im2col: 4×4 planes, a 1×1 kernel reading 4 of 16 positions, groups.
        for (c, shape) in [
            (
                conv([8, 8, 1], [3, 3], [1, 1], p(1, 1), [1, 1], false),
                [2, 8, 4, 4],
            ),
            (
                conv([8, 8, 1], [1, 1], [2, 2], p(0, 0), [1, 1], false),
                [2, 8, 4, 4],
            ),
            (
                conv([8, 8, 2], [3, 3], [1, 1], p(1, 1), [1, 1], false),
                [2, 8, 2, 2],
            ),
            (
                conv([8, 8, 1], [1, 1], [1, 1], p(0, 0), [1, 1], false),
                [2, 8, 2, 2],
            ),
        ] {
            let d = c.dims(&shape);
            assert!(c.small(&d, &shape).is_none(), "{shape:?}");
        }
    }

    #[test]
    fn blocks_of_samples_give_the_same_result() {
        // More samples than one GEMM block holds (1024 columns / 9 pixels = 113 per block).
        check_layer(
            &conv([1, 2, 1], [3, 3], [2, 2], p(1, 1), [1, 1], true),
            &[vec![1, 5, 5]],
            120,
        );
    }

    #[test]
    fn same_padding_follows_pytorch() {
        // F.conv2d(x, w, padding="same", dilation=(2, 1)) with x = arange(30).reshape(1, 1, 5, 6)
        // and a 2×4 kernel that is 1 at [0, 0] and 0 elsewhere: total padding 2 rows (1 + 1)
        // and 3 columns (1 before, 2 after).
        let c = conv([1, 1, 1], [2, 4], [1, 1], Padding::Same, [2, 1], false);
        assert_eq!(c.window.pad_begin, [1, 1]);
        assert_eq!(c.window.pad_end, [1, 2]);
        let mut w = [0.0f64; 8];
        w[0] = 1.0;
        let x = ndarray::Array::from_shape_fn((1, 1, 5, 6), |(_, _, i, j)| (6 * i + j) as f64)
            .into_dyn();
        let y = c.forward(&[&w], &[x.view()], &mut Saved::None);
        #[rustfmt::skip]
        let want = [
            0., 0., 0., 0., 0., 0.,
            0., 0., 1., 2., 3., 4.,
            0., 6., 7., 8., 9., 10.,
            0., 12., 13., 14., 15., 16.,
            0., 18., 19., 20., 21., 22.,
        ];
        assert_eq!(y.shape(), &[1, 1, 5, 6]);
        assert_eq!(y.as_slice().unwrap(), &want);
    }

    #[test]
    fn grouped_weight_layout_matches_pytorch() {
        // Conv2d(2, 4, 1, groups=2, bias=False): output channels 0,1 read input channel 0 and
        // 2,3 read channel 1; weight [4, 1, 1, 1].
        let c = conv([2, 4, 2], [1, 1], [1, 1], p(0, 0), [1, 1], false);
        let w = [1.0f64, 2.0, 3.0, 4.0];
        let x = ndarray::Array::from_shape_vec((1, 2, 1, 1), vec![10.0, 100.0])
            .unwrap()
            .into_dyn();
        let y = c.forward(&[&w], &[x.view()], &mut Saved::None);
        assert_eq!(y.as_slice().unwrap(), &[10.0, 20.0, 300.0, 400.0]);
    }

    #[test]
    fn shape_errors_are_explained() {
        let c = conv([3, 8, 1], [5, 5], [1, 1], p(0, 0), [1, 1], true);
        let e = <Conv2d as Layer<f32>>::out_shape(&c, &[vec![1, 28, 28]]).unwrap_err();
        assert!(
            e.contains("in_channels = 3") && e.contains("1 channel "),
            "{e}"
        );
        let e = <Conv2d as Layer<f32>>::out_shape(&c, &[vec![3, 4, 4]]).unwrap_err();
        assert!(e.contains("5×5 window") && e.contains("4×4 input"), "{e}");
        let e = <Conv2d as Layer<f32>>::out_shape(&c, &[vec![28, 28]]).unwrap_err();
        assert!(e.contains("model.input_shape = [1, height, width]"), "{e}");
        let e = <Conv2d as Layer<f32>>::out_shape(&c, &[vec![784]]).unwrap_err();
        assert!(e.contains("[channels, height, width]"), "{e}");
        // Padding so large that the padded size overflows is refused, not wrapped.
        let huge = Conv2d {
            window: Window2d::new(
                [3, 3],
                [1, 1],
                [1, 1],
                [usize::MAX / 2; 2],
                [usize::MAX / 2; 2],
            ),
            ..c.clone()
        };
        let e = <Conv2d as Layer<f32>>::out_shape(&huge, &[vec![3, 9, 7]]).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        assert_eq!(
            <Conv2d as Layer<f32>>::out_shape(&c, &[vec![3, 9, 7]]).unwrap(),
            vec![8, 5, 3]
        );
    }

    /// A whole CNN through `Model` (graph, parameter naming, input gradients between layers,
    /// none for the data) against central differences of its summed loss, in f64.
    #[test]
    fn small_cnn_model_gradient_matches_finite_differences() {
        use crate::net::{Model, TargetsView};
        let src = r#"
[[layers]]
name = "c1"
type = "conv2d"
in_channels = 2
out_channels = 4
kernel_size = 3
padding = "same"
[[layers]]
type = "relu"
[[layers]]
type = "max_pool2d"
kernel_size = 2
[[layers]]
name = "c2"
type = "conv2d"
in_channels = 4
out_channels = 6
kernel_size = [3, 2]
stride = 2
padding = 1
groups = 2
[[layers]]
type = "avg_pool2d"
kernel_size = 2
stride = 1
padding = 1
count_include_pad = false
[[layers]]
type = "flatten"
[[layers]]
name = "fc"
type = "linear"
in_features = 54
out_features = 3
[loss]
type = "cross_entropy"
[data]
train = "unused"
"#;
        let spec = crate::spec::Spec::parse(src, std::path::Path::new("t.toml")).unwrap();
        let m: Model<f64> = Model::build(&spec, &[2, 6, 5]).unwrap();
        let names: Vec<_> = m
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.shape.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("c1.weight", vec![4, 2, 3, 3]),
                ("c1.bias", vec![4]),
                ("c2.weight", vec![6, 2, 3, 2]),
                ("c2.bias", vec![6]),
                ("fc.weight", vec![3, 54]),
                ("fc.bias", vec![3]),
            ]
        );
        assert_eq!(m.output_shape(), &[3]);
        let mut rng = Rng::new(11);
        let theta: Vec<Vec<f64>> = m
            .params
            .iter()
            .map(|p| rng.array(&p.shape).into_raw_vec_and_offset().0)
            .collect();
        let x = rng.array(&[3, 2, 6, 5]).mapv(|v| v as f32);
        let y = [0u32, 2, 1];
        let f = |th: &[Vec<f64>]| {
            let mut g: Vec<Vec<f64>> = th.iter().map(|t| vec![0.0; t.len()]).collect();
            m.chunk_loss_grad(th, x.view(), TargetsView::Classes(&y), &mut g)
                .0
        };
        let mut g: Vec<Vec<f64>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
        m.chunk_loss_grad(&theta, x.view(), TargetsView::Classes(&y), &mut g);
        let h = 1e-6;
        for (pi, gp) in g.iter().enumerate() {
            for k in 0..gp.len() {
                let mut p = theta.clone();
                p[pi][k] += h;
                let mut q = theta.clone();
                q[pi][k] -= h;
                let fd = (f(&p) - f(&q)) / (2.0 * h);
                assert!(
                    (fd - gp[k]).abs() < 1e-7 * (1.0 + fd.abs()),
                    "{} [{k}]: fd {fd} vs {}",
                    m.params[pi].name,
                    gp[k]
                );
            }
        }
    }

    #[test]
    fn valid_outputs_cover_exactly_the_in_range_taps() {
        for &(k, s, dil, pb, pe, n) in &[
            (3, 1, 1, 1, 1, 5),
            (3, 2, 1, 1, 1, 6),
            (4, 3, 2, 2, 3, 9),
            (2, 1, 1, 0, 0, 2),
            (5, 1, 1, 1, 1, 3),
        ] {
            let w = Window2d::new([k, k], [s, s], [dil, dil], [pb, pb], [pe, pe]);
            let out = w.out_len(0, n).unwrap();
            for tap in 0..k {
                let (lo, hi) = w.valid_outputs(0, tap, n, out);
                for o in 0..out {
                    let pos = w.input_pos(0, o, tap);
                    let inside = pos >= 0 && (pos as usize) < n;
                    assert_eq!(
                        inside,
                        (lo..hi).contains(&o),
                        "k{k} s{s} d{dil} pad{pb}+{pe} n{n} tap{tap} o{o}"
                    );
                }
            }
        }
    }
}
