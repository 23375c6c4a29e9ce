//! Convolutions on tiny planes (ResNet-18's last stages at 32×32: 2×2 and 1×1 outputs) as one
//! dense product per call, with no unfolding and no copies.
//!
//! On a plane of `n` outputs that reads `nq` input positions, a convolution is a linear map
//! from the `cin·nq` inputs of a sample to its `cout·n` outputs: the matrix
//! `Wbig[(o, p), (c, q)] = W[o, c, tap(p, q)]`, zero where no tap joins output `p` to input
//! `q` (two taps never join the same pair). When every input position is read
//! (`nq = h·w`, the sample's whole `[cin, h, w]` block) or only one is, the samples' inputs,
//! outputs and their gradients are plain strided matrices of the NCHW arrays, `[(c, q), s]`
//! and `[(o, p), s]`, so
//!
//! - forward is `Y = Wbig · X`, written straight into the output;
//! - the input gradient is `gX = Wbigᵀ · gY`, written straight into its array;
//! - the weight gradient is `gWbig = gY · Xᵀ`, folded back onto the taps.
//!
//! The products count `cout·n · cin·nq` multiply-adds per sample, against `cout·n · cin·taps`
//! for im2col (taps: the kernel taps that reach the input for some output). A 3×3 kernel with
//! padding 1 on a 2×2 plane joins every output to every input (4 of the 9 taps each, where
//! im2col multiplies 5 of 9 by zero), and on a 1×1 plane, or from 2×2 with stride 2, the
//! same pairs as im2col's used taps but without its copies. [`Plan::new`] takes a call only
//! where the dense product does no more multiply-adds than im2col and the plane is tiny, so
//! `Wbig` (built once per forward, kept for backward) stays a few MB.
//!
//! Every sum runs in a fixed order (the products', then the fold over output positions), so
//! results do not depend on the thread count; they differ from the im2col path's only by
//! f32 rounding (tested against it in f64 in `conv.rs`).

use super::Real;
use super::conv::Window2d;
use super::gemm::{mat_mul, mat_mul_strided_uninit};
use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};

/// No tap joins the output and the input position.
const NONE: u32 = u32::MAX;

/// Most outputs × read positions per sample (`n·nq`): 2×2 planes reading 2×2 inputs.
const MAX_PAIRS: usize = 16;

/// Most entries of `Wbig` (16 MiB in f32).
const MAX_WBIG: usize = 1 << 22;

/// The geometry of one call on the dense path.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    batch: usize,
    cin: usize,
    cout: usize,
    /// Input plane size h·w.
    hw: usize,
    /// The input's `[batch, cin, h, w]`.
    in_shape: [usize; 4],
    /// Outputs per plane, oh·ow.
    n: usize,
    /// Kernel taps kh·kw.
    kk: usize,
    /// Input positions read: all `hw` (`q0 = 0`), or the one position `q0`.
    nq: usize,
    q0: usize,
    /// `tap[p·nq + qi]`: the tap joining output `p` to read position `qi`, or [`NONE`].
    tap: Vec<u32>,
    /// The taps that join some pair, in order.
    used: Vec<usize>,
}

impl Plan {
    /// The plan of a call, or `None` when the dense product does not pay: groups, a plane
    /// larger than [`MAX_PAIRS`] pairs, read positions that are neither all nor one, more
    /// multiply-adds than im2col's `taps_used` taps, or a `Wbig` over [`MAX_WBIG`].
    /// `shape` is the input's `[batch, cin, h, w]`.
    pub(crate) fn new(
        win: &Window2d,
        groups: usize,
        cout: usize,
        shape: &[usize],
        [oh, ow]: [usize; 2],
        taps_used: usize,
    ) -> Option<Plan> {
        let [batch, cin, h, w] = [shape[0], shape[1], shape[2], shape[3]];
        let (n, hw) = (oh * ow, h * w);
        if groups != 1 || batch == 0 || n == 0 || n > MAX_PAIRS {
            return None;
        }
        let [kh, kw] = win.kernel;
        // The input position (if any) of output p through tap t.
        let mut pos = vec![None; n * kh * kw];
        let mut read = vec![false; hw];
        for oy in 0..oh {
            for ox in 0..ow {
                for ki in 0..kh {
                    for kj in 0..kw {
                        let iy = win.input_pos(0, oy, ki);
                        let ix = win.input_pos(1, ox, kj);
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            let q = iy as usize * w + ix as usize;
                            pos[(oy * ow + ox) * kh * kw + ki * kw + kj] = Some(q);
                            read[q] = true;
                        }
                    }
                }
            }
        }
        let nq = read.iter().filter(|&&r| r).count();
        let q0 = if nq == hw {
            0
        } else if nq == 1 {
            read.iter().position(|&r| r)?
        } else {
            return None;
        };
        if nq > taps_used || n * nq > MAX_PAIRS || cout * n * cin * nq > MAX_WBIG {
            return None;
        }
        let mut tap = vec![NONE; n * nq];
        for p in 0..n {
            for t in 0..kh * kw {
                if let Some(q) = pos[p * kh * kw + t] {
                    let qi = if nq == hw { q } else { 0 };
                    debug_assert_eq!(tap[p * nq + qi], NONE, "two taps join one pair");
                    tap[p * nq + qi] = t as u32;
                }
            }
        }
        let used = (0..kh * kw)
            .filter(|&t| tap.contains(&(t as u32)))
            .collect();
        Some(Plan {
            used,
            batch,
            cin,
            cout,
            hw,
            in_shape: [batch, cin, h, w],
            n,
            kk: kh * kw,
            nq,
            q0,
            tap,
        })
    }

    /// Entries of `Wbig`: `[cout·n, cin·nq]`.
    pub(crate) fn wbig_len(&self) -> usize {
        self.cout * self.n * self.cin * self.nq
    }

    /// `Wbig` from the weight `[cout, cin, kh, kw]`, into `out` (every entry written).
    pub(crate) fn wbig<T: Real>(&self, w: &[T], out: &mut [T]) {
        let (n, nq, kk, cin) = (self.n, self.nq, self.kk, self.cin);
        let kc = cin * nq;
        // Row (o, p) is written one read position at a time: a strided copy of one tap of
        // o's weights (a few KB, in L1), or zeros.
        for (o, wo) in w.chunks_exact(cin * kk).enumerate() {
            for p in 0..n {
                let row = &mut out[(o * n + p) * kc..][..kc];
                for qi in 0..nq {
                    let dst = row[qi..].iter_mut().step_by(nq);
                    match self.tap[p * nq + qi] {
                        NONE => dst.for_each(|d| *d = T::zero()),
                        t => {
                            for (d, &v) in dst.zip(wo[t as usize..].iter().step_by(kk)) {
                                *d = v;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The samples' read inputs as `[(c, q), s]`.
    fn x_view<'a, T: Real>(&self, xs: &'a [T]) -> ArrayView2<'a, T> {
        let per = self.cin * self.hw;
        let rows = self.cin * self.nq;
        let rs = if self.nq == self.hw { 1 } else { self.hw };
        ArrayView2::from_shape((rows, self.batch).strides((rs, per)), &xs[self.q0..])
            .expect("the input holds batch × cin × h × w values")
    }

    /// Forward into `ys` (`[batch, cout, oh, ow]`, every entry written): `Y = Wbig · X`, then
    /// the bias.
    pub(crate) fn forward<T: Real>(
        &self,
        wbig: &[T],
        bias: Option<&[T]>,
        xs: &[T],
        ys: &mut [std::mem::MaybeUninit<T>],
    ) {
        let m = self.cout * self.n;
        assert_eq!(ys.len(), self.batch * m, "output of batch × cout × oh × ow");
        let a = ArrayView2::from_shape((m, self.cin * self.nq), wbig).expect("Wbig's shape");
        // SAFETY: `ys` holds batch·m values; entry (r, s) of the m×batch product lands at
        // s·m + r (row stride 1, column stride m), each exactly once, inside `ys`, which is
        // borrowed mutably and so overlaps neither operand.
        unsafe {
            mat_mul_strided_uninit(
                a,
                self.x_view(xs),
                ys.as_mut_ptr().cast::<T>(),
                1,
                m as isize,
            )
        };
        if let Some(b) = bias {
            // SAFETY: every value was written by the product above.
            let y =
                unsafe { std::slice::from_raw_parts_mut(ys.as_mut_ptr().cast::<T>(), ys.len()) };
            // Planes run through the channels of each sample in turn.
            for (i, plane) in y.chunks_exact_mut(self.n).enumerate() {
                let bo = b[i % self.cout];
                plane.iter_mut().for_each(|v| *v += bo);
            }
        }
    }

    /// Adds the weight gradient (`gw`, `[cout, cin, kh, kw]`) and the bias gradient (if
    /// `gbias`), and returns the input gradient when `need_x`. `gwbig` is scratch of
    /// [`Plan::wbig_len`] entries.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward<T: Real>(
        &self,
        wbig: &[T],
        xs: &[T],
        gys: &[T],
        gw: &mut [T],
        gbias: Option<&mut [T]>,
        gwbig: &mut [T],
        need_x: bool,
    ) -> Option<ndarray::ArrayD<T>> {
        let (n, nq, kk) = (self.n, self.nq, self.kk);
        let m = self.cout * n;
        let kc = self.cin * nq;
        let gy = ArrayView2::from_shape((m, self.batch).strides((1, m)), gys)
            .expect("the output gradient holds batch × cout × oh × ow values");
        if let Some(gb) = gbias {
            for (o, g) in gb.iter_mut().enumerate() {
                let mut sum = T::zero();
                for s in 0..self.batch {
                    for &v in &gys[(s * self.cout + o) * n..][..n] {
                        sum += v;
                    }
                }
                *g += sum;
            }
        }
        // gWbig = gY · Xᵀ, then each tap's entries summed over the output positions (in order)
        // and added to the weight gradient.
        let x = self.x_view(xs);
        let gwb = ArrayViewMut2::from_shape((m, kc), &mut gwbig[..m * kc]).expect("sized");
        mat_mul(gy, x.t(), false, gwb);
        // Per output channel o: its taps' sums over the output positions (in order) in `acc`
        // ([cin, kk], as o's weight gradient), then added to the weight gradient.
        let mut acc = vec![T::zero(); self.cin * kk];
        for (o, gwo) in gw.chunks_exact_mut(self.cin * kk).enumerate() {
            let block = &gwbig[o * n * kc..][..n * kc];
            acc.fill(T::zero());
            for p in 0..n {
                for qi in 0..nq {
                    let t = self.tap[p * nq + qi];
                    if t == NONE {
                        continue;
                    }
                    let src = block[p * kc + qi..].iter().step_by(nq);
                    for (a, &v) in acc[t as usize..].iter_mut().step_by(kk).zip(src) {
                        *a += v;
                    }
                }
            }
            for &t in &self.used {
                for (g, &a) in gwo[t..]
                    .iter_mut()
                    .step_by(kk)
                    .zip(acc[t..].iter().step_by(kk))
                {
                    *g += a;
                }
            }
        }
        if !need_x {
            return None;
        }
        let a = ArrayView2::from_shape((m, kc), wbig).expect("Wbig's shape");
        let shape = self.in_shape;
        let per = self.cin * self.hw;
        if nq == self.hw {
            // SAFETY: the product writes entry ((c, q), s) at s·per + c·hw + q: every value
            // of the fresh array exactly once.
            return Some(unsafe {
                super::filled(&shape, |gx: &mut [std::mem::MaybeUninit<T>]| {
                    mat_mul_strided_uninit(a.t(), gy, gx.as_mut_ptr().cast::<T>(), 1, per as isize)
                })
            });
        }
        // One read position: the others get no gradient.
        let mut gx = ndarray::ArrayD::<T>::zeros(ndarray::IxDyn(&shape));
        let gxs = gx.as_slice_mut().expect("fresh array");
        let dst = ArrayViewMut2::from_shape(
            (self.cin, self.batch).strides((self.hw, per)),
            &mut gxs[self.q0..],
        )
        .expect("inside the input gradient");
        mat_mul(a.t(), gy, false, dst);
        Some(gx)
    }
}
