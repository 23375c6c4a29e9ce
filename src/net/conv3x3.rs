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
//!
//! **5×5 "same" (stride 1; LeNet's).** The same frames with `p = 2` zeros starting each row
//! and `p` zero rows between samples (`l = w + p`, [`Frame::padded`]); the 25 taps read the
//! frame at `q + ki·l + kj`, the input gradient flips them (`t ↦ 24 − t`), and the weight
//! gradient's kernel takes one input channel × 25 taps at a time. The weight gradient (both
//! sizes) runs over the output rows only, skipping the padding positions.
//!
//! **Data movement.** Frames are filled and results copied out with AVX-512 masked loads and
//! stores (a `memcpy` call per short row cost more than the copy), the input read in memory
//! order; with stride 2 each input row is read once and split into its even and odd columns
//! in registers (and the input gradient's parity planes joined back the same way). Backward
//! reads the output gradient once per block, into its frame; the weight gradient's transposed
//! copy (`[q][16 channels]`) is made from that frame by 16×16 transposes in registers.

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
    /// Padding on every side, `(k − 1) / 2` for a `k × k` kernel (1 for 3×3).
    p: usize,
    /// Row stride, `w + p`.
    l: usize,
    /// Output positions computed (a multiple of 16; the last tile of [`conv_frames`] may be
    /// shorter than [`TILE`]).
    q: usize,
    /// Values per channel of a frame (every read of a tile stays inside).
    len: usize,
}

impl Frame {
    /// The frames of a `(2p + 1) × (2p + 1)` kernel: `p` zeros start each row (the right-hand
    /// padding of the row before too) and `p` zero rows lead and separate the samples.
    pub(crate) fn padded(h: usize, w: usize, nb: usize, p: usize) -> Frame {
        let l = w + p;
        let q = (nb * (h + p) * l).div_ceil(16) * 16;
        let len = (q + 2 * p * l + 2 * p).div_ceil(16) * 16;
        Frame {
            h,
            w,
            nb,
            p,
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
        (self.p + j * (self.h + self.p) + y) * self.l + self.p
    }

    /// Output-frame index of output `(j, y, 0)` (= `row(j, y) − p·l − p`).
    fn out_row(&self, j: usize, y: usize) -> usize {
        (j * (self.h + self.p) + y) * self.l
    }
}

/// Lay samples `s0..s0 + f.nb` of the NCHW batch `x` (`c` channels of `h × w`) out as frames
/// in `dst`, writing every value (padding included). With stride 1 a channel is one frame
/// (`[c][f.len]`, `h × w` = the frame's size); with stride 2 it is four, one per parity of row
/// and column (`[c][2·pr + pc][f.len]`, holding `x[2r + pr][2c + pc]`; `h × w` is twice the
/// frame's size on each axis). AVX-512 copies (stride 2: each input row read once and split
/// into its even and odd columns in registers).
fn fill_frames(x: &[f32], c: usize, stride: usize, s0: usize, f: &Frame, dst: &mut [f32]) {
    assert!(stride == 1 || stride == 2);
    let (h, w) = (f.h * stride, f.w * stride);
    assert!(dst.len() >= c * stride * stride * f.len);
    assert!(x.len() >= (s0 + f.nb) * c * h * w);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(), "conv3x3 needs AVX-512F");
        // SAFETY: AVX-512F is available (asserted above); the kernel indexes slices.
        unsafe { avx512::fill_frames(x, c, stride, s0, f, dst) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, c, s0, f, dst);
        unreachable!("conv3x3 runs only where `available()`");
    }
}

#[cfg(test)]
/// The scalar reference of [`fill_frames`] (tests).
///
/// Lay samples `s0..s0 + f.nb` of the NCHW batch `x` (`c` channels of `h × w`) out as frames
/// in `dst`, writing every value (padding included). With stride 1 a channel is one frame
/// (`[c][f.len]`, `h × w` = the frame's size); with stride 2 it is four, one per parity of row
/// and column (`[c][2·pr + pc][f.len]`, holding `x[2r + pr][2c + pc]`; `h × w` is twice the
/// frame's size on each axis).
fn fill_frames_scalar(x: &[f32], c: usize, stride: usize, s0: usize, f: &Frame, dst: &mut [f32]) {
    let (fh, fw, l, pad) = (f.h, f.w, f.l, f.p);
    let (h, w) = (fh * stride, fw * stride);
    let planes = stride * stride;
    for ch in 0..c {
        for p in 0..planes {
            let (pr, pc) = (p / stride, p % stride);
            let d = &mut dst[(ch * planes + p) * f.len..][..f.len];
            d[..pad * l].fill(0.0);
            for j in 0..f.nb {
                let src = &x[((s0 + j) * c + ch) * h * w..][..h * w];
                for y in 0..fh {
                    let r = f.row(j, y);
                    d[r - pad..r].fill(0.0);
                    let row = &src[(stride * y + pr) * w..][..w];
                    if stride == 1 {
                        d[r..r + fw].copy_from_slice(row);
                    } else {
                        for (o, v) in d[r..r + fw]
                            .iter_mut()
                            .zip(row[pc..].iter().step_by(stride))
                        {
                            *o = *v;
                        }
                    }
                }
                let sep = f.row(j, fh) - pad;
                d[sep..sep + pad * l].fill(0.0);
            }
            d[f.row(f.nb, 0) - pad..].fill(0.0);
        }
    }
}

/// Frame offsets of the forward taps (row-major, `k = 2p + 1` per axis) for a stride: with
/// stride 2 (3×3 only), tap `(ki, kj)` reads the plane of its parities (rows `2y + ki − 1`:
/// odd for ki = 0, 2), one row / column further on unless it is the first tap of its axis.
fn forward_offsets(f: &Frame, stride: usize) -> Vec<usize> {
    let k = 2 * f.p + 1;
    assert!(stride == 1 || k == 3);
    (0..k * k)
        .map(|t| {
            let (ki, kj) = (t / k, t % k);
            if stride == 1 {
                ki * f.l + kj
            } else {
                let plane = 2 * usize::from(ki != 1) + usize::from(kj != 1);
                plane * f.len + usize::from(ki > 0) * f.l + usize::from(kj > 0)
            }
        })
        .collect()
}

/// The input gradient as convolutions of the output gradient's frame: one pass per input
/// plane, each a list of (weight tap, frame offset). Stride 1: one plane, all taps flipped;
/// stride 2: per parity plane the taps of that parity (4, 2, 2, 1 of them).
fn grad_passes(f: &Frame, stride: usize) -> Vec<Vec<(usize, usize)>> {
    let k = 2 * f.p + 1;
    let taps = |par: usize| -> Vec<usize> {
        match (stride, par) {
            (1, _) => (0..k).collect(),
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
                        (k * (k - 1 - ki) + (k - 1 - kj), ki * f.l + kj)
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
                // (cin·taps·MR values), the frame at i·cs + q0 + offset + 0..16·nv for i < cin,
                // below (i + 1)·cs since q0 + 16·nv ≤ f.q and offset + f.q ≤ cs (asserted), and
                // writes out[(b·MR + r)·f.q + q0 ..][..16·nv] for r < MR, inside `out`.
                unsafe {
                    let (x, o) = (
                        frame.as_ptr().add(q0),
                        out.as_mut_ptr().add(b * MR * f.q + q0),
                    );
                    let ap = a.as_ptr();
                    // The last tile: the vectors left (f.q is a multiple of 16).
                    match (f.q - q0).min(TILE) / 16 {
                        NV => avx512::conv_tile::<MR, NV>(ap, x, cs, cin, offs, o, f.q),
                        5 => avx512::conv_tile::<MR, 5>(ap, x, cs, cin, offs, o, f.q),
                        4 => avx512::conv_tile::<MR, 4>(ap, x, cs, cin, offs, o, f.q),
                        3 => avx512::conv_tile::<MR, 3>(ap, x, cs, cin, offs, o, f.q),
                        2 => avx512::conv_tile::<MR, 2>(ap, x, cs, cin, offs, o, f.q),
                        _ => avx512::conv_tile::<MR, 1>(ap, x, cs, cin, offs, o, f.q),
                    }
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

/// The output gradient of a block laid out for [`weight_grad`], from its frame `g` (as
/// [`fill_frames`] lays out the output gradient, `[cout][f.len]`): `gt[ob][q][r]` = the
/// gradient of output channel `16·ob + r` at output-frame position `q`, i.e. `g[16·ob + r][q +
/// p·l + p]` (zero at positions that are not outputs, which read the frame's padding, and for
/// channels past `cout`). `gt` is `[⌈cout / 16⌉][f.q][16]`; every value is written, 16×16
/// blocks transposed in registers.
fn transpose_frames(g: &[f32], cout: usize, f: &Frame, gt: &mut [f32]) {
    assert!(g.len() >= cout * f.len && f.q + f.p * f.l + f.p <= f.len);
    assert!(gt.len() >= cout.div_ceil(16) * f.q * 16);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(), "conv3x3 needs AVX-512F");
        // SAFETY: AVX-512F is available (asserted above); the kernel indexes slices.
        unsafe { avx512::transpose_frames(g, cout, f, gt) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (g, cout, f, gt);
        unreachable!("conv3x3 runs only where `available()`");
    }
}

#[cfg(test)]
/// The scalar reference of [`transpose_frames`] (tests), from the NCHW gradient: `gt[ob][q][r]` = the gradient
/// of output channel `16·ob + r` at output-frame position `q` (zero at positions that are not
/// outputs and for channels past `cout`). `gt` is `[⌈cout / 16⌉][f.q][16]`; every value is
/// written.
fn fill_transposed_scalar(gy: &[f32], cout: usize, s0: usize, f: &Frame, gt: &mut [f32]) {
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

/// Positions per weight-gradient tile (whole output rows, at least one): each tile's sums are
/// added into the gradient, so no f32 sum runs over more than this many terms (or one row).
const QT: usize = 512;

/// `gw[o][i][t] += Σ_q gt[o][q]·frame[i][q + offset(t)]` over the block's output positions
/// (`gt` as [`transpose_frames`] writes it; the frame's padding positions, where it is zero,
/// are skipped), in tiles of whole output rows of at most [`QT`] positions, 16 output
/// channels × 3 input channels × 9 taps at a time (5×5: 1 input channel × 25 taps).
#[allow(clippy::too_many_arguments)]
fn weight_grad(
    gt: &[f32],
    cout: usize,
    frame: &[f32],
    cs: usize,
    cin: usize,
    offs: &[usize],
    f: &Frame,
    gw: &mut [f32],
) {
    match offs.len() {
        9 => weight_grad_taps::<9, 3>(gt, cout, frame, cs, cin, offs, f, gw),
        25 => weight_grad_taps::<25, 1>(gt, cout, frame, cs, cin, offs, f, gw),
        t => unreachable!("{t} taps: only 3×3 and 5×5 kernels take the direct path"),
    }
}

/// [`weight_grad`] with `T` taps, `IB` input channels at a time.
#[allow(clippy::too_many_arguments)]
fn weight_grad_taps<const T: usize, const IB: usize>(
    gt: &[f32],
    cout: usize,
    frame: &[f32],
    cs: usize,
    cin: usize,
    offs: &[usize],
    f: &Frame,
    gw: &mut [f32],
) {
    let obs = cout.div_ceil(16);
    let offs: &[usize; T] = offs.try_into().expect("T taps");
    assert!(gt.len() >= obs * f.q * 16 && frame.len() >= cin * cs);
    assert!(offs.iter().all(|&o| o + f.q <= cs));
    assert!(gw.len() >= cout * cin * T);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(), "conv3x3 needs AVX-512F");
        let mut sums = [[[0.0f32; 16]; T]; IB];
        // Only the output rows' positions (the frame's padding positions hold zero gradients):
        // tiles of whole rows, at most QT positions (at least one row).
        let rows: Vec<usize> = (0..f.nb)
            .flat_map(|j| (0..f.h).map(move |y| f.out_row(j, y)))
            .collect();
        assert!(rows.last().is_none_or(|&r| r + f.w <= f.q));
        for tile in rows.chunks((QT / f.w).max(1)) {
            for ob in 0..obs {
                let g = &gt[ob * f.q * 16..][..f.q * 16];
                for i0 in (0..cin).step_by(IB) {
                    let ic = IB.min(cin - i0);
                    // SAFETY: AVX-512F is available (asserted above); the kernel reads g[16·q
                    // ..][..16] and frame[(i0 + c)·cs + offset + q] for c < ic and q in the
                    // tile's rows, q < f.q (asserted), below (i0 + c + 1)·cs since offset + f.q
                    // ≤ cs (asserted).
                    unsafe {
                        let x = frame.as_ptr().add(i0 * cs);
                        let (g, w) = (g.as_ptr(), f.w);
                        match ic {
                            3 => avx512::wgrad::<3, T>(x, cs, offs, g, tile, w, &mut sums),
                            2 => avx512::wgrad::<2, T>(x, cs, offs, g, tile, w, &mut sums),
                            _ => avx512::wgrad::<1, T>(x, cs, offs, g, tile, w, &mut sums),
                        }
                    }
                    for (c, sc) in sums.iter().enumerate().take(ic) {
                        for o in ob * 16..cout.min(ob * 16 + 16) {
                            let dst = &mut gw[(o * cin + i0 + c) * T..][..T];
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
/// stride (1, or 2 with an even height and width), kernel size `k` (3, or 5 with stride 1;
/// padding `(k − 1) / 2`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub stride: usize,
    pub k: usize,
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
        let (batch, p) = (self.batch, (self.k - 1) / 2);
        (0..batch)
            .step_by(nb)
            .map(move |s0| (s0, Frame::padded(oh, ow, nb.min(batch - s0), p)))
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

/// `len` values of `v` starting at a 64-byte boundary (a cache line: a vector load or store
/// at a multiple of 16 values from it never spans two lines), `v` grown with zeros when
/// shorter; the contents are whatever an earlier call left (thread buffers here and in
/// [`super::winograd`], written before they are read).
pub(super) fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len + 15 {
        v.resize(len + 15, 0.0);
    }
    let off = v.as_ptr().align_offset(64).min(15);
    &mut v[off..off + len]
}

/// Forward: `y[s][o] = Σ_i w[o][i] ⋆ x[s][i] + bias[o]` (k × k, padding (k − 1) / 2, the
/// shape's stride; no bias: `+ 0.0`), NCHW, weight `[cout, cin, k, k]`, into `y` (`[batch, cout, h / stride, w /
/// stride]`, every value written).
pub(crate) fn forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    sh: Shape,
    bufs: &mut Buffers,
    y: &mut [std::mem::MaybeUninit<f32>],
) {
    let (cin, cout, planes) = (sh.cin, sh.cout, sh.stride * sh.stride);
    let (oh, ow) = sh.out_hw();
    let kk = sh.k * sh.k;
    assert!(y.len() >= sh.batch * cout * oh * ow);
    assert!(bias.is_none_or(|b| b.len() >= cout));
    assert!(w.len() >= cout * cin * kk);
    bufs.packed.clear();
    pack(
        cout,
        cin,
        kk,
        |o, i, t| w[(o * cin + i) * kk + t],
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
        let ys = &mut y[s0 * cout * oh * ow..][..f.nb * cout * oh * ow];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is available (`conv_frames` asserted it); the kernel indexes slices.
        unsafe {
            avx512::emit(out, cout, bias, &f, ys)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = ys;
    }
}

/// The input gradient's passes packed once for every block: per pass, its weights (transposed:
/// output channel i, input channel o, the pass's taps) at an offset of `packed`, and its frame
/// offsets.
fn pack_passes(
    w: &[f32],
    cin: usize,
    cout: usize,
    f: &Frame,
    stride: usize,
    packed: &mut Vec<f32>,
) -> Vec<(usize, Vec<usize>)> {
    packed.clear();
    let kk = (2 * f.p + 1) * (2 * f.p + 1);
    grad_passes(f, stride)
        .iter()
        .map(|taps| {
            let at = packed.len();
            pack(
                cin,
                cout,
                taps.len(),
                |i, o, k| w[(o * cin + i) * kk + taps[k].0],
                packed,
            );
            (at, taps.iter().map(|t| t.1).collect())
        })
        .collect()
}

/// Backward: adds the weight gradient into `gw` (`[cout, cin, k, k]`) and, when `gb` is
/// given, the bias gradient into it (`[cout]`, summed from the output gradient's frames, a
/// block at a time); when `gx` is given, writes the input gradient into it (NCHW, every value
/// written).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    sh: Shape,
    bufs: &mut Buffers,
    gw: &mut [f32],
    mut gb: Option<&mut [f32]>,
    mut gx: Option<&mut [std::mem::MaybeUninit<f32>]>,
) {
    let (cin, cout, stride) = (sh.cin, sh.cout, sh.stride);
    let planes = stride * stride;
    let cinr = cin.div_ceil(MR) * MR;
    let mut passes = None;
    for (s0, f) in sh.blocks() {
        let frame = grow(&mut bufs.a, cin * planes * f.len);
        fill_frames(x, cin, stride, s0, &f, frame);
        let gframe = grow(&mut bufs.b, cout * f.len);
        fill_frames(gy, cout, 1, s0, &f, gframe);
        if let Some(gb) = gb.as_deref_mut() {
            assert!(gb.len() >= cout);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is available (`fill_frames` asserted it); the kernel indexes
            // slices.
            unsafe {
                avx512::channel_sums(gframe, f.len, &mut gb[..cout])
            };
        }
        let gt = grow(&mut bufs.c, cout.div_ceil(16) * f.q * 16);
        transpose_frames(gframe, cout, &f, gt);
        let offs = forward_offsets(&f, stride);
        weight_grad(gt, cout, frame, planes * f.len, cin, &offs, &f, gw);
        let Some(gx) = gx.as_deref_mut() else {
            continue;
        };
        // The passes' frame offsets depend on the row stride only, the same for every block.
        let passes =
            passes.get_or_insert_with(|| pack_passes(w, cin, cout, &f, stride, &mut bufs.packed));
        let out = grow(&mut bufs.c, planes * cinr * f.q);
        for (p, (at, offs)) in passes.iter().enumerate() {
            let dst = &mut out[p * cinr * f.q..][..cinr * f.q];
            conv_frames(&bufs.packed[*at..], cin, cout, gframe, f.len, offs, &f, dst);
        }
        let (h, wd) = (sh.h, sh.w);
        let gxs = &mut gx[s0 * cin * h * wd..][..f.nb * cin * h * wd];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is available (`conv_frames` asserted it); the kernel indexes slices.
        unsafe {
            avx512::emit_grad(out, cin, cinr, stride, &f, gxs)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = gxs;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Frame;
    use crate::net::simd::x86::{mask, transpose16};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// `d[k] = s[k] (+ add)` for `k < n`, `ADD` saying whether to add.
    ///
    /// # Safety
    /// `s` valid for `n` reads, `d` for `n` writes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn copy_n<const ADD: bool>(s: *const f32, d: *mut f32, n: usize, add: __m512) {
        // Masked throughout: the compiler would turn an unmasked copy loop into a `memcpy`
        // call, which costs more than the copy for rows of 8–32 values.
        let op = |v: __m512| if ADD { _mm512_add_ps(v, add) } else { v };
        let mut k = 0;
        // SAFETY: lanes below `n` only.
        unsafe {
            while k < n {
                let m = mask(n - k);
                _mm512_mask_storeu_ps(d.add(k), m, op(_mm512_maskz_loadu_ps(m, s.add(k))));
                k += 16;
            }
        }
    }

    /// `dst = src` (`dst.len()` values, `src` at least as long).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn copy(src: &[f32], dst: &mut [f32]) {
        assert!(src.len() >= dst.len());
        // SAFETY: `dst.len()` values of each.
        unsafe {
            copy_n::<false>(
                src.as_ptr(),
                dst.as_mut_ptr(),
                dst.len(),
                _mm512_setzero_ps(),
            )
        }
    }

    /// `dst = src` into memory not yet written (`dst.len()` values, `src` at least as long).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn copy_uninit(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
        assert!(src.len() >= dst.len());
        // SAFETY: `dst.len()` values of each.
        unsafe {
            copy_n::<false>(
                src.as_ptr(),
                dst.as_mut_ptr().cast(),
                dst.len(),
                _mm512_setzero_ps(),
            )
        }
    }

    /// `dst = src + add` lane-wise into memory not yet written.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn copy_add(src: &[f32], add: __m512, dst: &mut [MaybeUninit<f32>]) {
        assert!(src.len() >= dst.len());
        // SAFETY: `dst.len()` values of each.
        unsafe { copy_n::<true>(src.as_ptr(), dst.as_mut_ptr().cast(), dst.len(), add) }
    }

    /// `dst = 0`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn zero(dst: &mut [f32]) {
        let n = dst.len();
        let d = dst.as_mut_ptr();
        let mut k = 0;
        // SAFETY: lanes below `n` only.
        unsafe {
            while k < n {
                _mm512_mask_storeu_ps(d.add(k), mask(n - k), _mm512_setzero_ps());
                k += 16;
            }
        }
    }

    /// `even[k] = row[2k]`, `odd[k] = row[2k + 1]` for `k < even.len()` (`row` at least twice
    /// as long; `odd` as long as `even`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn deinterleave(row: &[f32], even: &mut [f32], odd: &mut [f32]) {
        let n = even.len();
        assert!(odd.len() == n && row.len() >= 2 * n);
        let ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let s = row.as_ptr();
        let mut k = 0;
        while k < n {
            let left = 2 * (n - k);
            // SAFETY: lanes below `2n` of `row` and below `n` of `even` and `odd` only (the
            // pointers are formed with wrapping arithmetic: a fully masked load reads nothing).
            unsafe {
                let lo = _mm512_maskz_loadu_ps(mask(left), s.wrapping_add(2 * k));
                let hi = _mm512_maskz_loadu_ps(
                    mask(left.saturating_sub(16)),
                    s.wrapping_add(2 * k + 16),
                );
                let m = mask(n - k);
                let e = _mm512_permutex2var_ps(lo, ie, hi);
                let o = _mm512_permutex2var_ps(lo, io, hi);
                _mm512_mask_storeu_ps(even.as_mut_ptr().add(k), m, e);
                _mm512_mask_storeu_ps(odd.as_mut_ptr().add(k), m, o);
            }
            k += 16;
        }
    }

    /// `dst[2k] = even[k]`, `dst[2k + 1] = odd[k]` for `2k < dst.len()` (`even`, `odd` at
    /// least half as long, rounded up).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn interleave(even: &[f32], odd: &[f32], dst: &mut [MaybeUninit<f32>]) {
        let n = dst.len();
        let half = n.div_ceil(2);
        assert!(even.len() >= half && odd.len() >= half);
        let il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let ih = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let d = dst.as_mut_ptr().cast::<f32>();
        let mut k = 0;
        while k < half {
            let m = mask(half - k);
            let left = n - 2 * k;
            // SAFETY: lanes below `half` of `even` and `odd`, below `n` of `dst` only (wrapping
            // pointer arithmetic: a fully masked store writes nothing).
            unsafe {
                let e = _mm512_maskz_loadu_ps(m, even.as_ptr().add(k));
                let o = _mm512_maskz_loadu_ps(m, odd.as_ptr().add(k));
                let lo = _mm512_permutex2var_ps(e, il, o);
                let hi = _mm512_permutex2var_ps(e, ih, o);
                _mm512_mask_storeu_ps(d.wrapping_add(2 * k), mask(left), lo);
                _mm512_mask_storeu_ps(
                    d.wrapping_add(2 * k + 16),
                    mask(left.saturating_sub(16)),
                    hi,
                );
            }
            k += 16;
        }
    }

    /// [`super::fill_frames`] (its checks done by the caller).
    #[target_feature(enable = "avx512f")]
    pub(super) fn fill_frames(
        x: &[f32],
        c: usize,
        stride: usize,
        s0: usize,
        f: &Frame,
        dst: &mut [f32],
    ) {
        let (fh, fw, l, len, p) = (f.h, f.w, f.l, f.len, f.p);
        let (h, w) = (fh * stride, fw * stride);
        let planes = stride * stride;
        let tail = f.row(f.nb, 0) - p;
        for d in dst[..c * planes * len].chunks_exact_mut(len) {
            zero(&mut d[..p * l]);
            for j in 0..f.nb {
                let sep = f.row(j, fh) - p;
                zero(&mut d[sep..sep + p * l]);
            }
            zero(&mut d[tail..]);
        }
        // Sample by sample, its channels in order: the input is read in memory order (a
        // channel of an 8×8 map is only 256 bytes).
        for j in 0..f.nb {
            for ch in 0..c {
                let chd = &mut dst[ch * planes * len..][..planes * len];
                let src = &x[((s0 + j) * c + ch) * h * w..][..h * w];
                for y in 0..fh {
                    let r = f.row(j, y);
                    for pr in 0..stride {
                        let row = &src[(stride * y + pr) * w..][..w];
                        if stride == 1 {
                            zero(&mut chd[r - p..r]);
                            copy(row, &mut chd[r..r + fw]);
                        } else {
                            let (a, b) = chd[2 * pr * len..][..2 * len].split_at_mut(len);
                            a[r - 1] = 0.0;
                            b[r - 1] = 0.0;
                            deinterleave(row, &mut a[r..r + fw], &mut b[r..r + fw]);
                        }
                    }
                }
            }
        }
    }

    /// `gb[c] += Σ frame[c·len..][..len]` (16 lanes in 4 accumulators, added up in a fixed
    /// tree); `len` a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) fn channel_sums(frame: &[f32], len: usize, gb: &mut [f32]) {
        assert!(len.is_multiple_of(16) && frame.len() >= gb.len() * len);
        for (c, g) in gb.iter_mut().enumerate() {
            let src = &frame[c * len..][..len];
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut k = 0;
            while k + 64 <= len {
                for (a, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: `k + 16·a + 16 ≤ len`.
                    *acc = _mm512_add_ps(*acc, unsafe {
                        _mm512_loadu_ps(src.as_ptr().add(k + 16 * a))
                    });
                }
                k += 64;
            }
            while k < len {
                // SAFETY: `k + 16 ≤ len` (a multiple of 16).
                acc[0] = _mm512_add_ps(acc[0], unsafe { _mm512_loadu_ps(src.as_ptr().add(k)) });
                k += 16;
            }
            let v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            *g += _mm512_reduce_add_ps(v);
        }
    }

    /// [`super::transpose_frames`] (its checks done by the caller).
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose_frames(g: &[f32], cout: usize, f: &Frame, gt: &mut [f32]) {
        let (len, shift) = (f.len, f.p * f.l + f.p);
        for ob in 0..cout.div_ceil(16) {
            let rows = 16.min(cout - 16 * ob);
            let src = &g[16 * ob * len..][..rows * len];
            let dst = &mut gt[ob * f.q * 16..][..f.q * 16];
            for q0 in (0..f.q).step_by(16) {
                let mut r = [_mm512_setzero_ps(); 16];
                for (a, r) in r.iter_mut().enumerate().take(rows) {
                    let v = &src[a * len + q0 + shift..][..16];
                    // SAFETY: `v` holds 16 values.
                    *r = unsafe { _mm512_loadu_ps(v.as_ptr()) };
                }
                transpose16(&mut r);
                let d = &mut dst[q0 * 16..][..256];
                for (k, r) in r.iter().enumerate() {
                    // SAFETY: `d` holds 16 × 16 values.
                    unsafe { _mm512_storeu_ps(d.as_mut_ptr().add(16 * k), *r) };
                }
            }
        }
    }

    /// The forward outputs of a block (`out`, `[cout][f.q]` at output-frame positions) into
    /// the NCHW block `ys` (`[f.nb][cout][f.h][f.w]`), plus the bias (no bias: `+ 0.0`).
    #[target_feature(enable = "avx512f")]
    pub(super) fn emit(
        out: &[f32],
        cout: usize,
        bias: Option<&[f32]>,
        f: &Frame,
        ys: &mut [MaybeUninit<f32>],
    ) {
        let (oh, ow) = (f.h, f.w);
        for (j, ys) in ys.chunks_exact_mut(cout * oh * ow).take(f.nb).enumerate() {
            for (o, ys) in ys.chunks_exact_mut(oh * ow).enumerate() {
                let b = _mm512_set1_ps(bias.map_or(0.0, |b| b[o]));
                let plane = &out[o * f.q..][..f.q];
                for (y, dst) in ys.chunks_exact_mut(ow).enumerate() {
                    copy_add(&plane[f.out_row(j, y)..], b, dst);
                }
            }
        }
    }

    /// The input-gradient passes' outputs of a block (`out`, `[planes][cinr][f.q]`) into the
    /// NCHW block `gx` (`[f.nb][cin][stride·f.h][stride·f.w]`, every value written): stride 2
    /// interleaves the column parities of each row.
    #[target_feature(enable = "avx512f")]
    pub(super) fn emit_grad(
        out: &[f32],
        cin: usize,
        cinr: usize,
        stride: usize,
        f: &Frame,
        gx: &mut [MaybeUninit<f32>],
    ) {
        let (oh, ow) = (f.h, f.w);
        let (h, w) = (oh * stride, ow * stride);
        for (j, gx) in gx.chunks_exact_mut(cin * h * w).take(f.nb).enumerate() {
            for (i, gx) in gx.chunks_exact_mut(h * w).enumerate() {
                for y in 0..oh {
                    let at = f.out_row(j, y);
                    for pr in 0..stride {
                        let dst = &mut gx[(stride * y + pr) * w..][..w];
                        let plane = |pc: usize| &out[((stride * pr + pc) * cinr + i) * f.q + at..];
                        if stride == 1 {
                            copy_uninit(plane(0), dst);
                        } else {
                            interleave(plane(0), plane(1), dst);
                        }
                    }
                }
            }
        }
    }

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

    /// `sums[c][t][r] = Σ_q x[c·len + offs[t] + q]·g[16·q + r]` for `c < IC` (`sums` at
    /// least `IC` long), `t < T`, over the positions `q` of the runs `s..s + w` for `s` in
    /// `runs`, each sum in that order.
    ///
    /// # Safety
    /// AVX-512F; `g` valid for reads at `16·q..16·q + 16`, `x` at `c·len + offs[t] + q`,
    /// `c < IC`, for those `q`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn wgrad<const IC: usize, const T: usize>(
        x: *const f32,
        len: usize,
        offs: &[usize; T],
        g: *const f32,
        runs: &[usize],
        w: usize,
        sums: &mut [[[f32; 16]; T]],
    ) {
        let mut acc = [[_mm512_setzero_ps(); T]; IC];
        for &s in runs {
            for q in s..s + w {
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
        }
        for (s, acc) in sums.iter_mut().zip(&acc) {
            for (s, a) in s.iter_mut().zip(acc) {
                // SAFETY: `s` is 16 f32.
                unsafe { _mm512_storeu_ps(s.as_mut_ptr(), *a) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::Rng;

    fn values(rng: &mut Rng, n: usize) -> Vec<f32> {
        rng.array(&[n]).iter().map(|&v: &f64| v as f32).collect()
    }

    /// The AVX-512 frames hold the same values as the scalar reference, padding included, for
    /// both strides, both paddings (3×3 and 5×5 kernels), row lengths that are not multiples
    /// of 16 and blocks inside a batch.
    #[test]
    fn frames_match_the_scalar_reference() {
        if !available() {
            return;
        }
        let mut rng = Rng::new(11);
        for (stride, h, w, p) in [
            (1, 8, 8, 1),
            (1, 5, 37, 1),
            (1, 32, 32, 1),
            (2, 16, 16, 1),
            (2, 6, 42, 1),
            (1, 14, 14, 2),
            (1, 28, 28, 2),
            (1, 5, 37, 2),
            (1, 8, 3, 2),
        ] {
            let (batch, c) = (5, 3);
            let x = values(&mut rng, batch * c * h * w);
            for (s0, nb) in [(0, 5), (1, 3), (4, 1)] {
                let f = Frame::padded(h / stride, w / stride, nb, p);
                let n = c * stride * stride * f.len;
                let (mut a, mut b) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                fill_frames(&x, c, stride, s0, &f, &mut a);
                fill_frames_scalar(&x, c, stride, s0, &f, &mut b);
                let same = a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits());
                assert!(
                    same,
                    "stride {stride}, padding {p}, {h}×{w}, block {s0}+{nb}"
                );
            }
        }
    }

    /// The transposed output gradient built from its frame equals the scalar layout built from
    /// the NCHW gradient, for channel counts below, at and past 16.
    #[test]
    fn transposed_frames_match_the_scalar_reference() {
        if !available() {
            return;
        }
        let mut rng = Rng::new(12);
        for (cout, h, w, p) in [
            (3, 8, 8, 1),
            (16, 5, 11, 1),
            (21, 16, 16, 1),
            (32, 9, 8, 1),
            (20, 28, 28, 2),
            (40, 14, 14, 2),
            (17, 5, 9, 2),
        ] {
            let batch = 3;
            let gy = values(&mut rng, batch * cout * h * w);
            for (s0, nb) in [(0, 3), (1, 2)] {
                let f = Frame::padded(h, w, nb, p);
                let mut frame = vec![f32::NAN; cout * f.len];
                fill_frames(&gy, cout, 1, s0, &f, &mut frame);
                let n = cout.div_ceil(16) * f.q * 16;
                let (mut a, mut b) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                transpose_frames(&frame, cout, &f, &mut a);
                fill_transposed_scalar(&gy, cout, s0, &f, &mut b);
                let same = a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits());
                assert!(
                    same,
                    "{cout} channels, {h}×{w}, padding {p}, block {s0}+{nb}"
                );
            }
        }
    }
}
