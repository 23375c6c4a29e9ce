//! Direct 3×3 convolution with stride 1 and padding 1 (ResNet's convolutions), f32, for CPUs
//! with AVX-512F (chosen at run time; [`available`] says whether this path can run, and
//! [`super::conv`] falls back to im2col + GEMM where it cannot).
//!
//! **Frames.** A block of `nb` samples of one channel is laid out as one zero-padded plane
//! whose rows are `l = w + 1` values long: a zero, then the `w` values of an image row. The
//! zero at the start of the next row is also the right-hand padding of this one, and the
//! samples' images are stacked with one zero row between them (the bottom padding of one
//! sample and the top padding of the next), after one leading zero row:
//!
//! ```text
//! row 0                 0 0 0 … 0            (top padding of sample 0)
//! row 1 + j(h+1) + y    0 x[j,y,0] … x[j,y,w−1]
//! row 1 + j(h+1) + h    0 0 0 … 0            (padding between samples j and j+1)
//! ```
//!
//! Output `(j, y, x)` is then computed at frame position `q = (j(h+1) + y)·l + x`, and its
//! tap `(ki, kj)` reads the frame at `q + ki·l + kj`: the same offset for every output, so
//! the convolution is a matrix product whose right-hand matrix is read straight from the frame
//! (no im2col, no packing), 16 positions per vector. Positions with `x = w` or `y = h` are
//! computed too and thrown away (1.06× the work at 32×32, 1.27× at 8×8).
//!
//! The input gradient is the same convolution of the output gradient's frame with the weights
//! transposed (input ↔ output channels) and flipped (tap `t ↦ 8 − t`); the weight gradient is
//! `Σ_q gy[m][q]·x[c][q + offset(t)]` over the frames, 16 lanes per (m, c, t) summed at the
//! end of each block. The order of every sum is fixed by the shapes alone, so results do not
//! depend on the thread count.

/// Output positions per forward tile ([`NV`] vectors of 16).
const NV: usize = 6;
/// Output channels per forward tile.
const MR: usize = 4;
/// Positions per tile.
const TILE: usize = 16 * NV;
/// Target size of one block's frame (values per buffer) — it stays in L2.
const FRAME_TARGET: usize = 96 * 1024;

/// Whether the direct kernels can run on this CPU.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Geometry of the frames of one block of samples.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Frame {
    h: usize,
    w: usize,
    nb: usize,
    /// Row stride, `w + 1`.
    l: usize,
    /// Output positions computed (a multiple of [`TILE`]).
    q: usize,
    /// Values per channel of a frame (every read of a tile stays inside).
    len: usize,
}

impl Frame {
    pub(crate) fn new(h: usize, w: usize, nb: usize) -> Frame {
        let l = w + 1;
        let q = (nb * (h + 1) * l).div_ceil(TILE) * TILE;
        let len = (q + 2 * l + 2).div_ceil(16) * 16;
        Frame {
            h,
            w,
            nb,
            l,
            q,
            len,
        }
    }

    /// Samples per block for `channels` channels of `h × w` (at least 1, at most `batch`).
    pub(crate) fn block(h: usize, w: usize, channels: usize, batch: usize) -> usize {
        (FRAME_TARGET / (channels.max(1) * (h + 1) * (w + 1))).clamp(1, batch.max(1))
    }

    /// Frame index of input `(j, y, 0)`.
    fn row(&self, j: usize, y: usize) -> usize {
        (1 + j * (self.h + 1) + y) * self.l + 1
    }

    /// Output-frame index of output `(j, y, 0)` (= `row(j, y) − l − 1`).
    fn out_row(&self, j: usize, y: usize) -> usize {
        (j * (self.h + 1) + y) * self.l
    }
}

/// Lay samples `s0..s0 + f.nb` of the NCHW batch `x` (`c` channels of `h × w`) out as frames
/// in `dst`, writing every value (padding included). With stride 1 a channel is one frame
/// (`[c][f.len]`, `h × w` = the frame's size); with stride 2 it is four, one per parity of row
/// and column (`[c][2·pr + pc][f.len]`, holding `x[2r + pr][2c + pc]`; `h × w` is twice the
/// frame's size on each axis).
fn fill_frames(x: &[f32], c: usize, stride: usize, s0: usize, f: &Frame, dst: &mut [f32]) {
    let (fh, fw, l) = (f.h, f.w, f.l);
    let (h, w) = (fh * stride, fw * stride);
    let planes = stride * stride;
    for ch in 0..c {
        for p in 0..planes {
            let (pr, pc) = (p / stride, p % stride);
            let d = &mut dst[(ch * planes + p) * f.len..][..f.len];
            d[..l].fill(0.0);
            for j in 0..f.nb {
                let src = &x[((s0 + j) * c + ch) * h * w..][..h * w];
                for y in 0..fh {
                    let r = f.row(j, y);
                    d[r - 1] = 0.0;
                    let row = &src[(stride * y + pr) * w..][..w];
                    if stride == 1 {
                        copy_row(row, &mut d[r..r + fw]);
                    } else {
                        for (o, v) in d[r..r + fw]
                            .iter_mut()
                            .zip(row[pc..].iter().step_by(stride))
                        {
                            *o = *v;
                        }
                    }
                }
                let sep = f.row(j, fh) - 1;
                d[sep..sep + l].fill(0.0);
            }
            d[f.row(f.nb, 0) - 1..].fill(0.0);
        }
    }
}

/// Frame offsets of the forward taps (row-major) for a stride: with stride 2, tap `(ki, kj)`
/// reads the plane of its parities (rows `2y + ki − 1`: odd for ki = 0, 2), one row / column
/// further on unless it is the first tap of its axis.
fn forward_offsets(f: &Frame, stride: usize) -> [usize; 9] {
    std::array::from_fn(|t| {
        let (ki, kj) = (t / 3, t % 3);
        if stride == 1 {
            ki * f.l + kj
        } else {
            let plane = 2 * usize::from(ki != 1) + usize::from(kj != 1);
            plane * f.len + usize::from(ki > 0) * f.l + usize::from(kj > 0)
        }
    })
}

/// The input gradient as convolutions of the output gradient's frame: one pass per input
/// plane, each a list of (weight tap, frame offset). Stride 1: one plane, all taps flipped;
/// stride 2: per parity plane the taps of that parity (4, 2, 2, 1 of them).
fn grad_passes(f: &Frame, stride: usize) -> Vec<Vec<(usize, usize)>> {
    let taps = |par: usize| -> Vec<usize> {
        match (stride, par) {
            (1, _) => vec![0, 1, 2],
            (_, 0) => vec![1],
            _ => vec![0, 2],
        }
    };
    (0..stride * stride)
        .map(|p| {
            let mut v = Vec::new();
            for &ki in &taps(p / stride) {
                for &kj in &taps(p % stride) {
                    // Stride 1: gy(y + 1 − ki, x + 1 − kj), the flipped kernel, in order of
                    // increasing offset. Stride 2: gy(r + [ki = 0], c + [kj = 0]).
                    v.push(if stride == 1 {
                        (3 * (2 - ki) + (2 - kj), ki * f.l + kj)
                    } else {
                        let off = (1 + usize::from(ki == 0)) * f.l + 1 + usize::from(kj == 0);
                        (3 * ki + kj, off)
                    });
                }
            }
            v
        })
        .collect()
}

/// `dst = src` for a short row, in 8-value pieces the compiler keeps inline (a `memcpy` call
/// per row of 8–32 values cost more than the copy).
#[inline(always)]
fn copy_row(src: &[f32], dst: &mut [f32]) {
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        let v: [f32; 8] = s.try_into().expect("8 values");
        d.copy_from_slice(&v);
    }
    for (d, &v) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = v;
    }
}

/// Weights `get(o, i, k)` (`o < mout` output channels, `i < cin` inputs, `k < taps`) appended
/// to `dst` as `[⌈mout / MR⌉][cin][taps][MR]`, rows past `mout` zero.
fn pack(
    mout: usize,
    cin: usize,
    taps: usize,
    get: impl Fn(usize, usize, usize) -> f32,
    dst: &mut Vec<f32>,
) {
    for m0 in (0..mout).step_by(MR) {
        for i in 0..cin {
            for k in 0..taps {
                for r in 0..MR {
                    let o = m0 + r;
                    dst.push(if o < mout { get(o, i, k) } else { 0.0 });
                }
            }
        }
    }
}

/// `out[o][q] = Σ_i Σ_k w[o][i][k]·frame[i·cs + q + offs[k]]` for `o < ⌈mout / MR⌉·MR` (rows
/// past `mout` are zero weights) and `q < f.q`; `packed` as [`pack`] lays it out, `cs` the
/// frame's channel stride, `out` `[⌈mout / MR⌉·MR][f.q]`.
#[allow(clippy::too_many_arguments)]
fn conv_frames(
    packed: &[f32],
    mout: usize,
    cin: usize,
    frame: &[f32],
    cs: usize,
    offs: &[usize],
    f: &Frame,
    out: &mut [f32],
) {
    let blocks = mout.div_ceil(MR);
    let taps = offs.len();
    assert!(packed.len() >= blocks * cin * taps * MR);
    assert!(offs.iter().all(|&o| o + f.q <= cs) && frame.len() >= cin * cs);
    assert!(out.len() >= blocks * MR * f.q);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(), "conv3x3 needs AVX-512F");
        for b in 0..blocks {
            let a = &packed[b * cin * taps * MR..][..cin * taps * MR];
            for q0 in (0..f.q).step_by(TILE) {
                // SAFETY: AVX-512F is available (asserted above). The tile reads `a`
                // (cin·taps·MR values), the frame at i·cs + q0 + offset + 0..TILE for i < cin,
                // below (i + 1)·cs since q0 + TILE ≤ f.q and offset + f.q ≤ cs (asserted), and
                // writes out[(b·MR + r)·f.q + q0 ..][..TILE] for r < MR, inside `out`.
                unsafe {
                    avx512::conv_tile::<MR, NV>(
                        a.as_ptr(),
                        frame.as_ptr().add(q0),
                        cs,
                        cin,
                        offs,
                        out.as_mut_ptr().add(b * MR * f.q + q0),
                        f.q,
                    );
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (packed, frame, cs, out);
        unreachable!("conv3x3 runs only where `available()`");
    }
}

/// The output gradient of a block laid out for [`weight_grad`]: `gt[ob][q][r]` = the gradient
/// of output channel `16·ob + r` at output-frame position `q` (zero at positions that are not
/// outputs and for channels past `cout`). `gt` is `[⌈cout / 16⌉][f.q][16]`; every value is
/// written.
fn fill_transposed(gy: &[f32], cout: usize, s0: usize, f: &Frame, gt: &mut [f32]) {
    let (h, w) = (f.h, f.w);
    gt.fill(0.0);
    for ob in 0..cout.div_ceil(16) {
        let dst = &mut gt[ob * f.q * 16..][..f.q * 16];
        let rows = 16.min(cout - ob * 16);
        for j in 0..f.nb {
            for y in 0..h {
                // One image row of 16 channels: a block of 16·w values that stays in L1.
                let d = &mut dst[f.out_row(j, y) * 16..][..w * 16];
                for r in 0..rows {
                    let src = &gy[((s0 + j) * cout + ob * 16 + r) * h * w + y * w..][..w];
                    for (x, &v) in src.iter().enumerate() {
                        d[x * 16 + r] = v;
                    }
                }
            }
        }
    }
}

/// Positions per weight-gradient tile: each tile's sums are added into the gradient, so no
/// f32 sum runs over more than this many terms.
const QT: usize = 512;

/// `gw[o][i][t] += Σ_q gt[o][q]·frame[i][q + offset(t)]` over the block's output positions
/// (`gt` as [`fill_transposed`] writes it: zero where there is no output, so only real outputs
/// contribute), in tiles of [`QT`] positions, 16 output channels × 3 input channels × 9 taps
/// at a time.
#[allow(clippy::too_many_arguments)]
fn weight_grad(
    gt: &[f32],
    cout: usize,
    frame: &[f32],
    cs: usize,
    cin: usize,
    offs: &[usize; 9],
    f: &Frame,
    gw: &mut [f32],
) {
    let obs = cout.div_ceil(16);
    assert!(gt.len() >= obs * f.q * 16 && frame.len() >= cin * cs);
    assert!(offs.iter().all(|&o| o + f.q <= cs));
    assert!(gw.len() >= cout * cin * 9);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(), "conv3x3 needs AVX-512F");
        let mut sums = [[[0.0f32; 16]; 9]; 3];
        for q0 in (0..f.q).step_by(QT) {
            let n = QT.min(f.q - q0);
            for ob in 0..obs {
                let g = &gt[(ob * f.q + q0) * 16..][..n * 16];
                for i0 in (0..cin).step_by(3) {
                    let ic = 3.min(cin - i0);
                    // SAFETY: AVX-512F is available (asserted above); the kernel reads
                    // g[0..16·n] and frame[(i0 + c)·cs + q0 + offset + 0..n] for c < ic, below
                    // (i0 + c + 1)·cs since q0 + n ≤ f.q and offset + f.q ≤ cs (asserted).
                    unsafe {
                        let x = frame.as_ptr().add(i0 * cs + q0);
                        match ic {
                            3 => avx512::wgrad::<3>(x, cs, offs, g.as_ptr(), n, &mut sums),
                            2 => avx512::wgrad::<2>(x, cs, offs, g.as_ptr(), n, &mut sums),
                            _ => avx512::wgrad::<1>(x, cs, offs, g.as_ptr(), n, &mut sums),
                        }
                    }
                    for (c, sc) in sums.iter().enumerate().take(ic) {
                        for o in ob * 16..cout.min(ob * 16 + 16) {
                            let dst = &mut gw[(o * cin + i0 + c) * 9..][..9];
                            for (d, st) in dst.iter_mut().zip(sc) {
                                *d += st[o % 16];
                            }
                        }
                    }
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (offs, gt, frame, cs, gw);
        unreachable!("conv3x3 runs only where `available()`");
    }
}

/// Shapes of one call: batch, input channels, output channels, input height and width,
/// stride (1, or 2 with an even height and width).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub stride: usize,
}

impl Shape {
    /// Output height and width.
    fn out_hw(&self) -> (usize, usize) {
        (self.h / self.stride, self.w / self.stride)
    }

    /// Samples per block, and the frames of the block at `s0`.
    fn blocks(&self) -> impl Iterator<Item = (usize, Frame)> + use<> {
        let (oh, ow) = self.out_hw();
        let chans = (self.cin * self.stride * self.stride).max(self.cout);
        let nb = Frame::block(oh, ow, chans, self.batch);
        let batch = self.batch;
        (0..batch)
            .step_by(nb)
            .map(move |s0| (s0, Frame::new(oh, ow, nb.min(batch - s0))))
    }
}

/// Buffers a call reuses (frames, outputs, packed weights): one set per thread, see [`with_buffers`].
#[derive(Default)]
pub(crate) struct Buffers {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    packed: Vec<f32>,
}

thread_local! {
    static BUFFERS: std::cell::Cell<Option<Box<Buffers>>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with this thread's buffers (new ones if they are in use or were never made).
pub(crate) fn with_buffers<R>(f: impl FnOnce(&mut Buffers) -> R) -> R {
    let mut b = BUFFERS.with(|c| c.take()).unwrap_or_default();
    let r = f(&mut b);
    BUFFERS.with(|c| c.set(Some(b)));
    r
}

fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// Forward: `y[s][o] = Σ_i w[o][i] ⋆ x[s][i]` (3×3, padding 1, the shape's stride), NCHW,
/// weight `[cout, cin, 3, 3]`; `emit(s, o, y, row)` receives each output row once.
pub(crate) fn forward(
    x: &[f32],
    w: &[f32],
    sh: Shape,
    bufs: &mut Buffers,
    mut emit: impl FnMut(usize, usize, usize, &[f32]),
) {
    let (cin, cout, planes) = (sh.cin, sh.cout, sh.stride * sh.stride);
    let (oh, ow) = sh.out_hw();
    bufs.packed.clear();
    pack(
        cout,
        cin,
        9,
        |o, i, t| w[(o * cin + i) * 9 + t],
        &mut bufs.packed,
    );
    for (s0, f) in sh.blocks() {
        let frame = grow(&mut bufs.a, cin * planes * f.len);
        fill_frames(x, cin, sh.stride, s0, &f, frame);
        let out = grow(&mut bufs.b, cout.div_ceil(MR) * MR * f.q);
        let offs = forward_offsets(&f, sh.stride);
        conv_frames(
            &bufs.packed,
            cout,
            cin,
            frame,
            planes * f.len,
            &offs,
            &f,
            out,
        );
        for j in 0..f.nb {
            for o in 0..cout {
                for y in 0..oh {
                    emit(s0 + j, o, y, &out[o * f.q + f.out_row(j, y)..][..ow]);
                }
            }
        }
    }
}

/// Backward: adds the weight gradient into `gw` (`[cout, cin, 3, 3]`) and, when `gx` is
/// given, writes the input gradient into it (NCHW, every value written).
pub(crate) fn backward(
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    sh: Shape,
    bufs: &mut Buffers,
    gw: &mut [f32],
    mut gx: Option<&mut [std::mem::MaybeUninit<f32>]>,
) {
    let (cin, cout, stride) = (sh.cin, sh.cout, sh.stride);
    let planes = stride * stride;
    let (oh, ow) = sh.out_hw();
    let (h, wd) = (sh.h, sh.w);
    for (s0, f) in sh.blocks() {
        let frame = grow(&mut bufs.a, cin * planes * f.len);
        fill_frames(x, cin, stride, s0, &f, frame);
        let gt = grow(&mut bufs.c, cout.div_ceil(16) * f.q * 16);
        fill_transposed(gy, cout, s0, &f, gt);
        let offs = forward_offsets(&f, stride);
        weight_grad(gt, cout, frame, planes * f.len, cin, &offs, &f, gw);
        let Some(gx) = gx.as_deref_mut() else {
            continue;
        };
        let gframe = grow(&mut bufs.b, cout * f.len);
        fill_frames(gy, cout, 1, s0, &f, gframe);
        for (p, taps) in grad_passes(&f, stride).iter().enumerate() {
            // Transposed: output channel i, input channel o, the pass's taps.
            bufs.packed.clear();
            pack(
                cin,
                cout,
                taps.len(),
                |i, o, k| w[(o * cin + i) * 9 + taps[k].0],
                &mut bufs.packed,
            );
            let offs: Vec<usize> = taps.iter().map(|t| t.1).collect();
            let out = grow(&mut bufs.c, cin.div_ceil(MR) * MR * f.q);
            conv_frames(&bufs.packed, cin, cout, gframe, f.len, &offs, &f, out);
            let (pr, pc) = (p / stride, p % stride);
            for j in 0..f.nb {
                for i in 0..cin {
                    let dst = &mut gx[((s0 + j) * cin + i) * h * wd..][..h * wd];
                    for y in 0..oh {
                        let src = &out[i * f.q + f.out_row(j, y)..][..ow];
                        let row = &mut dst[(stride * y + pr) * wd..][..wd];
                        if stride == 1 {
                            for (d, &v) in row.iter_mut().zip(src) {
                                d.write(v);
                            }
                        } else {
                            for (d, &v) in row[pc..].iter_mut().step_by(stride).zip(src) {
                                d.write(v);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// One tile: `MR` output channels × `16·NV` positions, summed over `cin` channels × the taps
    /// in that order. `a` is the tile's packed weights `[cin][taps][MR]`, `x` the frame at the
    /// tile's first position, `len` the frame's channel stride, `out` the first output, `ld`
    /// its row stride.
    ///
    /// # Safety
    /// AVX-512F; every pointer valid for the reads and writes described.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn conv_tile<const MR: usize, const NV: usize>(
        a: *const f32,
        x: *const f32,
        len: usize,
        cin: usize,
        offs: &[usize],
        out: *mut f32,
        ld: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut ap = a;
        for c in 0..cin {
            // SAFETY: within the bounds the caller guarantees.
            unsafe {
                let base = x.add(c * len);
                for &o in offs {
                    let src = base.add(o);
                    let mut xv = [_mm512_setzero_ps(); NV];
                    for (v, xv) in xv.iter_mut().enumerate() {
                        *xv = _mm512_loadu_ps(src.add(16 * v));
                    }
                    for acc in acc.iter_mut() {
                        let wv = _mm512_set1_ps(*ap);
                        ap = ap.add(1);
                        for (a, xv) in acc.iter_mut().zip(&xv) {
                            *a = _mm512_fmadd_ps(wv, *xv, *a);
                        }
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, a) in acc.iter().enumerate() {
                // SAFETY: within the bounds the caller guarantees.
                unsafe { _mm512_storeu_ps(out.add(r * ld + 16 * v), *a) };
            }
        }
    }

    /// `sums[c][t][r] = Σ_{q < n} x[c·len + offs[t] + q]·g[16·q + r]` for `c < IC`, each sum
    /// in order of `q`.
    ///
    /// # Safety
    /// AVX-512F; `g` valid for `16·n` reads, `x` for `c·len + offs[t] + q`, `c < IC`, `q < n`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn wgrad<const IC: usize>(
        x: *const f32,
        len: usize,
        offs: &[usize; 9],
        g: *const f32,
        n: usize,
        sums: &mut [[[f32; 16]; 9]; 3],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 9]; IC];
        for q in 0..n {
            // SAFETY: within the bounds the caller guarantees.
            unsafe {
                let gv = _mm512_loadu_ps(g.add(16 * q));
                for (c, acc) in acc.iter_mut().enumerate() {
                    let xc = x.add(c * len + q);
                    for (a, &o) in acc.iter_mut().zip(offs) {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(*xc.add(o)), gv, *a);
                    }
                }
            }
        }
        for (s, acc) in sums.iter_mut().zip(&acc) {
            for (s, a) in s.iter_mut().zip(acc) {
                // SAFETY: `s` is 16 f32.
                unsafe { _mm512_storeu_ps(s.as_mut_ptr(), *a) };
            }
        }
    }
}
