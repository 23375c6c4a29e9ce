//! Winograd F(2×2, 3×3) for the stride-1 3×3 convolutions (padding 1) of ResNet's stages, f32,
//! on CPUs with AVX-512F: the forward pass, the input gradient (the same convolution of the
//! output gradient with the weights transposed and flipped) and the weight gradient.
//!
//! **Method.** Each 2×2 block of outputs ("tile") is computed from the 4×4 block of padded input
//! around it: `Y = Aᵀ·[Σ_c (G·g·Gᵀ) ⊙ (Bᵀ·d·B)]·A`, with
//!
//! ```text
//!      ⎡1  0 −1  0⎤        ⎡ 1   0   0⎤       ⎡1 1  1  0⎤
//! Bᵀ = ⎢0  1  1  0⎥    G = ⎢1/2 1/2 1/2⎥  Aᵀ = ⎣0 1 −1 −1⎦
//!      ⎢0 −1  1  0⎥        ⎢1/2 −1/2 1/2⎥
//!      ⎣0  1  0 −1⎦        ⎣ 0   0   1⎦
//! ```
//!
//! so the channel sum is 16 independent matrix products `M_ξ = U_ξ·V_ξ` (`U_ξ`: output ×
//! input channels, `V_ξ`: input channels × tiles) with 16 multiply-adds per tile, input and
//! output channel, against 36 for the four outputs computed directly (2.25× fewer; and no
//! padding positions are computed, which the direct path's frames add: 6 % at 32×32, 27 % at
//! 8×8). The transforms' coefficients are 0, ±1 and ±1/2 (the weights', computed in f64), so
//! the results stay within a few f32 roundings of the direct sums (tested against the f64
//! path with the direct path's tolerances).
//!
//! **Layout.** The 16 vector lanes hold 16 tiles of one sample: one row of tiles at width 32,
//! two rows at 16, four at 8. An input row is loaded whole and each of a tile's four columns
//! is one two-source lane permute (`vpermt2ps`) of the rows, the padding columns masked to
//! zero; padding rows read a zero row. The outputs' even and odd columns are interleaved back
//! by the same permute and stored a row at a time. The transformed inputs `V` and products `M`
//! of a block of samples stay in L2 (`BLOCK_TARGET`), starting at a cache line (every vector
//! load and store of them touches one line, not two). The
//! products use tiles of 4 output channels × 6 or 4 vectors (never a 2-vector remainder,
//! whose 8 accumulators cannot hide the multiply-adds' latency); the weight gradient's tiles
//! take 4 × 4 pairs of channels, whose 16 lane sums one transposing reduction adds up, and
//! add them into the f64 totals a vector at a time.
//!
//! **Which shapes** ([`fits`], a fixed rule of the shape, not of timings): stride 1, width 8,
//! 16 or 32 (the widths whose tile rows fill the 16 lanes exactly), a height whose tile rows
//! fill whole vectors (a multiple of 2, 4 or 8 for widths 32, 16, 8), and at least
//! `MIN_CHANNELS` (16) input and output channels: with fewer, the transforms cost about as
//! much as the products they save (ResNet's 3 → 16 first convolution stays direct), and the
//! 8-channel convolutions of the `fixtures/resnet` oracle stay on the direct path whose f32
//! roundings that test's residual tolerance was set with (on Winograd one step's residual
//! moved by 1.2·10⁻⁵ against its 10⁻⁵ bound, while its gradients stay within their 10⁻⁴).

use super::conv3x3::{self, Shape, grow};
use std::mem::MaybeUninit;

/// Output channels per product tile.
const MR: usize = 4;
/// Vectors of 16 tiles per product tile.
const NV: usize = 6;
/// Target size (f32 values) of one block's transformed inputs and products: 1 MiB, in L2.
const BLOCK_TARGET: usize = 256 * 1024;
/// Fewest input and output channels taken (see the module's documentation).
const MIN_CHANNELS: usize = 16;
/// Extra values between the planes `ξ` of the transformed inputs and of the products.
const PAD: usize = 16;

/// Whether a call of shape `sh` takes the Winograd path (the rule in the module's
/// documentation; also needs AVX-512F).
pub(crate) fn fits(sh: &Shape) -> bool {
    sh.k == 3
        && sh.stride == 1
        && matches!(sh.w, 8 | 16 | 32)
        && sh.h >= 2
        && sh.h.is_multiple_of(2)
        && (sh.h / 2).is_multiple_of(32 / sh.w)
        && sh.cin >= MIN_CHANNELS
        && sh.cout >= MIN_CHANNELS
        && conv3x3::available()
}

/// Buffers a call reuses: transformed inputs and products (one set per thread).
#[derive(Default)]
struct Buffers {
    v: Vec<f32>,
    m: Vec<f32>,
}

thread_local! {
    static BUFFERS: std::cell::Cell<Option<Box<Buffers>>> = const { std::cell::Cell::new(None) };
}

fn with_buffers<R>(f: impl FnOnce(&mut Buffers) -> R) -> R {
    let mut b = BUFFERS.with(|c| c.take()).unwrap_or_default();
    let r = f(&mut b);
    BUFFERS.with(|c| c.set(Some(b)));
    r
}

/// `U_ξ = G·g·Gᵀ` of every (output, input) channel pair, computed in f64, packed as
/// `u[ξ][o / MR][i][o % MR]` (output channels rounded up to `MR` with zeros); `tap(o, i, t)`
/// is the 3×3 kernel's tap `t = 3·ki + kj`.
fn transform_weights(
    cout: usize,
    cin: usize,
    tap: impl Fn(usize, usize, usize) -> f32,
) -> Vec<f32> {
    let nob = cout.div_ceil(MR);
    let mut u = vec![0.0f32; 16 * nob * MR * cin];
    for o in 0..cout {
        for i in 0..cin {
            let g: [f64; 9] = std::array::from_fn(|t| f64::from(tap(o, i, t)));
            // G·g: 4 × 3.
            let mut gg = [[0.0f64; 3]; 4];
            for j in 0..3 {
                let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
                gg[0][j] = a;
                gg[1][j] = 0.5 * (a + b + c);
                gg[2][j] = 0.5 * (a - b + c);
                gg[3][j] = c;
            }
            // (G·g)·Gᵀ: 4 × 4.
            for (r, row) in gg.iter().enumerate() {
                let [a, b, c] = *row;
                let vals = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                for (k, &val) in vals.iter().enumerate() {
                    let xi = 4 * r + k;
                    u[((xi * nob + o / MR) * cin + i) * MR + o % MR] = val as f32;
                }
            }
        }
    }
    u
}

/// Forward: `y[s][o] = Σ_i w[o][i] ⋆ x[s][i] + bias[o]` (3×3, padding 1, stride 1; no bias:
/// nothing added), NCHW, weight `[cout, cin, 3, 3]`, into `y` (every value written). `sh` must
/// [`fits`].
pub(crate) fn forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    sh: Shape,
    y: &mut [MaybeUninit<f32>],
) {
    let (cin, cout) = (sh.cin, sh.cout);
    assert!(w.len() >= cout * cin * 9);
    let u = transform_weights(cout, cin, |o, i, t| w[(o * cin + i) * 9 + t]);
    run(x, cin, cout, &u, bias, sh, y);
}

/// The input gradient: `gx[s][i] = Σ_o flip(w[o][i]) ⋆ gy[s][o]` (the forward convolution of
/// the output gradient with the weights transposed and flipped), NCHW, into `gx` (every value
/// written). `sh` (the forward call's shape) must [`fits`].
pub(crate) fn input_grad(gy: &[f32], w: &[f32], sh: Shape, gx: &mut [MaybeUninit<f32>]) {
    let (cin, cout) = (sh.cin, sh.cout);
    assert!(w.len() >= cout * cin * 9);
    let u = transform_weights(cin, cout, |i, o, t| w[(o * cin + i) * 9 + 8 - t]);
    let back = Shape {
        cin: cout,
        cout: cin,
        ..sh
    };
    run(gy, cout, cin, &u, None, back, gx);
}

/// Adds the weight gradient `gw[o][i][t] += Σ_s Σ_p gy[s][o][p]·x[s][i][p + offset(t)]` (the
/// forward call's shape `sh`, which must [`fits`]) into `gw` (`[cout, cin, 3, 3]`), as
/// `Gᵀ·dU·G` with `dU_ξ = Σ_tiles (A·dY·Aᵀ)_ξ·(Bᵀ·d·B)_ξ`: per block of samples 16 products
/// over the tiles (16 lanes of partial sums per pair of channels, added up at the end of the
/// block into f64 totals), the fixed order of every sum given by the shape.
pub(crate) fn weight_grad(x: &[f32], gy: &[f32], sh: Shape, gw: &mut [f32]) {
    assert!(fits(&sh), "winograd: shape {sh:?} does not fit");
    let (cin, cout, h, w, batch) = (sh.cin, sh.cout, sh.h, sh.w, sh.batch);
    assert!(x.len() >= batch * cin * h * w && gy.len() >= batch * cout * h * w);
    assert!(gw.len() >= cout * cin * 9);
    let p = (h / 2) * (w / 2);
    let nob = cout.div_ceil(MR);
    let coutr = nob * MR;
    let nb = (BLOCK_TARGET / (16 * (cin + coutr) * p)).clamp(1, batch.max(1));
    // dU[ξ][o / MR][i][o % MR] in f64 (rows past `cout` hold sums of unused values).
    let mut du = vec![0.0f64; 16 * coutr * cin];
    with_buffers(|bufs| {
        for s0 in (0..batch).step_by(nb) {
            let n = nb.min(batch - s0);
            let t = n * p;
            let (vs, ms) = (cin * t + PAD, coutr * t + PAD);
            let v = grow(&mut bufs.v, 16 * vs);
            let d = grow(&mut bufs.m, 16 * ms);
            let xs = &x[s0 * cin * h * w..][..n * cin * h * w];
            let gys = &gy[s0 * cout * h * w..][..n * cout * h * w];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is available (`fits` checked it); the kernels index slices.
            unsafe {
                avx512::input_transform(xs, cin, h, w, n, vs, v);
                avx512::grad_transform(gys, cout, h, w, n, ms, d);
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (xs, gys);
            for xi in 0..16 {
                for ob in 0..nob {
                    let da = &d[xi * ms + ob * MR * t..][..MR * t];
                    for (i0, nc) in channel_groups(cin) {
                        let va = &v[xi * vs + i0 * t..][..nc * t];
                        let dst = &mut du[((xi * nob + ob) * cin + i0) * MR..][..nc * MR];
                        weight_products(da, va, nc, t, dst);
                    }
                }
            }
        }
    });
    // gw += Gᵀ·dU·G, G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]].
    let gt = |a: [f64; 4]| {
        [
            a[0] + 0.5 * (a[1] + a[2]),
            0.5 * (a[1] - a[2]),
            0.5 * (a[1] + a[2]) + a[3],
        ]
    };
    for o in 0..cout {
        for i in 0..cin {
            let u: [f64; 16] =
                std::array::from_fn(|xi| du[((xi * nob + o / MR) * cin + i) * MR + o % MR]);
            // Columns first: for each row r of dU, (dU_r·G) = Gᵀ applied to the row.
            let rows: [[f64; 3]; 4] =
                std::array::from_fn(|r| gt([u[4 * r], u[4 * r + 1], u[4 * r + 2], u[4 * r + 3]]));
            for b in 0..3 {
                let col = gt([rows[0][b], rows[1][b], rows[2][b], rows[3][b]]);
                for (a, &val) in col.iter().enumerate() {
                    let g = &mut gw[(o * cin + i) * 9 + 3 * a + b];
                    *g = (f64::from(*g) + val) as f32;
                }
            }
        }
    }
}

/// `n` vectors split into consecutive product tiles of 6 and 4 vectors where `n` allows it
/// (`(start, len)`; a fixed function of `n`): a narrow tile has too few accumulators to hide
/// the multiply-adds' latency, and 6 + 2 took longer than 4 + 4.
fn vector_tiles(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let (a, r) = (n / NV, n % NV);
    // Tiles `0..six` have 6 vectors, the rest `last` each.
    let (count, six, last) = match r {
        0 => (a, a, 0),
        4 => (a + 1, a, 4),
        2 if a >= 1 => (a + 1, a - 1, 4),
        _ => (a + 1, a, r),
    };
    (0..count).scan(0, move |start, j| {
        let len = if j < six { NV } else { last };
        let part = (*start, len);
        *start += len;
        Some(part)
    })
}

/// `n` input channels split into groups of 4 (the last one shorter): the weight-gradient
/// tile's `MR × 4` accumulators are added up by one 16-vector reduction.
fn channel_groups(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(4).map(move |i| (i, (n - i).min(4)))
}

/// `du[c·MR + r] += Σ_{q < t} d[r·t + q]·v[c·t + q]` (the sum in f32, added in f64) for
/// `r < MR`, `c < nc ≤ 4`, the f32 sum in 16 lanes of `q` added up at the end (the same
/// order for the same `t`).
fn weight_products(d: &[f32], v: &[f32], nc: usize, t: usize, du: &mut [f64]) {
    assert!(d.len() >= MR * t && v.len() >= nc * t && (1..=4).contains(&nc));
    assert!(du.len() >= nc * MR);
    assert_eq!(t % 16, 0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (checked by `fits`); the kernel reads `d[r·t + q]` and `v[c·t + q]`
    // for `q < t`, `r < MR`, `c < nc` and updates `du[c·MR + r]`: in bounds (asserted).
    unsafe {
        let (dp, vp, up) = (d.as_ptr(), v.as_ptr(), du.as_mut_ptr());
        match nc {
            4 => avx512::wtile::<4>(dp, vp, t, up),
            3 => avx512::wtile::<3>(dp, vp, t, up),
            2 => avx512::wtile::<2>(dp, vp, t, up),
            _ => avx512::wtile::<1>(dp, vp, t, up),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (d, v, nc, t, du);
        unreachable!("winograd runs only where `fits`");
    }
}

/// The convolution of `x` (`cin` channels) with the transformed weights `u` into `y`.
fn run(
    x: &[f32],
    cin: usize,
    cout: usize,
    u: &[f32],
    bias: Option<&[f32]>,
    sh: Shape,
    y: &mut [MaybeUninit<f32>],
) {
    assert!(fits(&sh), "winograd: shape {sh:?} does not fit");
    let (h, w, batch) = (sh.h, sh.w, sh.batch);
    assert!(x.len() >= batch * cin * h * w);
    assert!(y.len() >= batch * cout * h * w);
    assert!(bias.is_none_or(|b| b.len() >= cout));
    let p = (h / 2) * (w / 2);
    debug_assert_eq!(p % 16, 0);
    let nob = cout.div_ceil(MR);
    let coutr = nob * MR;
    let nb = (BLOCK_TARGET / (16 * (cin + coutr) * p)).clamp(1, batch.max(1));
    with_buffers(|bufs| {
        for s0 in (0..batch).step_by(nb) {
            let n = nb.min(batch - s0);
            let t = n * p;
            // Planes ξ are `PAD` values more than a multiple of 4 KiB apart (else the 16 loads
            // or stores of a tile's transform map to one L1 set).
            let (vs, ms) = (cin * t + PAD, coutr * t + PAD);
            let v = grow(&mut bufs.v, 16 * vs);
            let xs = &x[s0 * cin * h * w..][..n * cin * h * w];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is available (`fits` checked it); the kernel indexes slices.
            unsafe {
                avx512::input_transform(xs, cin, h, w, n, vs, v)
            };
            let m = grow(&mut bufs.m, 16 * ms);
            for xi in 0..16 {
                for ob in 0..nob {
                    let ua = &u[(xi * nob + ob) * cin * MR..][..cin * MR];
                    let va = &v[xi * vs..][..cin * t];
                    let ma = &mut m[xi * ms + ob * MR * t..][..MR * t];
                    products(ua, va, cin, t, ma);
                }
            }
            let ys = &mut y[s0 * cout * h * w..][..n * cout * h * w];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512F is available (`fits` checked it); the kernel indexes slices.
            unsafe {
                avx512::output_transform(m, ms, cout, bias, h, w, n, ys)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (xs, ys, m);
        }
    });
}

/// `m[r][q] = Σ_c u[c][r]·v[c][q]` for `r < MR`, `q < t` (`t` a multiple of 16), each sum in
/// order of `c`.
fn products(u: &[f32], v: &[f32], cin: usize, t: usize, m: &mut [f32]) {
    assert!(u.len() >= cin * MR && v.len() >= cin * t && m.len() >= MR * t);
    assert_eq!(t % 16, 0);
    #[cfg(target_arch = "x86_64")]
    {
        for (v0, nv) in vector_tiles(t / 16) {
            let q = 16 * v0;
            // SAFETY: AVX-512F (checked by `fits`); the tile reads `v[c·t + q .. + 16·nv]`
            // for `c < cin` and writes `m[r·t + q .. + 16·nv]` for `r < MR`: in bounds.
            unsafe {
                let (up, vp, mp) = (u.as_ptr(), v.as_ptr().add(q), m.as_mut_ptr().add(q));
                match nv {
                    6 => avx512::tile::<6>(up, vp, cin, t, mp),
                    5 => avx512::tile::<5>(up, vp, cin, t, mp),
                    4 => avx512::tile::<4>(up, vp, cin, t, mp),
                    3 => avx512::tile::<3>(up, vp, cin, t, mp),
                    2 => avx512::tile::<2>(up, vp, cin, t, mp),
                    _ => avx512::tile::<1>(up, vp, cin, t, mp),
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (u, v, cin, t, m);
        unreachable!("winograd runs only where `fits`");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::MR;
    use crate::net::simd::x86::widen;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Lane permutes and masks that pick, for the 16 tiles of a vector, tile column `k` of
    /// the padded input (`k = 0..4`) out of the 32 values of the vector's input rows.
    fn column_picks(w: usize) -> ([[i32; 16]; 4], [u16; 4]) {
        let tw = w / 2;
        let mut idx = [[0i32; 16]; 4];
        let mut msk = [0u16; 4];
        for (k, (idx, msk)) in idx.iter_mut().zip(&mut msk).enumerate() {
            for (lane, idx) in idx.iter_mut().enumerate() {
                let (s, tx) = (lane / tw, lane % tw);
                // Padded column 2·tx + k is input column 2·tx + k − 1.
                let col = 2 * tx + k;
                if col >= 1 && col - 1 < w {
                    *idx = (s * w + col - 1) as i32;
                    *msk |= 1 << lane;
                }
            }
        }
        (idx, msk)
    }

    /// The 32 values of the input rows `r, r + 2, …` (one row at width 32, two at 16, four at
    /// 8) of the plane `x` (`h × w`), rows outside `0..h` read as zeros.
    ///
    /// # Safety
    /// AVX-512F; `x` valid for `h·w` reads.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows(x: *const f32, h: usize, w: usize, r: isize, zero: &[f32; 32]) -> [__m512; 2] {
        let row = |r: isize| -> *const f32 {
            if r >= 0 && (r as usize) < h {
                // SAFETY: row `r` is inside the plane.
                unsafe { x.add(r as usize * w) }
            } else {
                zero.as_ptr()
            }
        };
        // SAFETY: each pointer is valid for `w` reads (a row, or the zero row).
        unsafe {
            match w {
                32 => {
                    let p = row(r);
                    [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
                }
                16 => [_mm512_loadu_ps(row(r)), _mm512_loadu_ps(row(r + 2))],
                _ => {
                    let pair = |a: *const f32, b: *const f32| {
                        let lo = _mm512_castps256_ps512(_mm256_loadu_ps(a));
                        let hi = _mm256_castps_pd(_mm256_loadu_ps(b));
                        _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(lo), hi, 1))
                    };
                    [pair(row(r), row(r + 2)), pair(row(r + 4), row(r + 6))]
                }
            }
        }
    }

    /// `v[ξ·vs + c·t + q] = (Bᵀ·d·B)[ξ]` for every tile `q` (sample-major, then tile row and
    /// column; `t` tiles in all) of the `n` samples of `x` (`[n][cin][h][w]`) and every
    /// channel `c`.
    ///
    /// # Safety
    /// AVX-512F; the shape fits (`super::fits`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn input_transform(
        x: &[f32],
        cin: usize,
        h: usize,
        w: usize,
        n: usize,
        vs: usize,
        v: &mut [f32],
    ) {
        let (g, p) = (32 / w, (h / 2) * (w / 2));
        let t = n * p;
        assert!(x.len() >= n * cin * h * w && vs >= cin * t && v.len() >= 15 * vs + cin * t);
        let zero = [0.0f32; 32];
        let (idx, msk) = column_picks(w);
        let idx: [__m512i; 4] =
            // SAFETY: each index row is 16 i32.
            std::array::from_fn(|k| unsafe { _mm512_loadu_si512(idx[k].as_ptr().cast()) });
        let vp = v.as_mut_ptr();
        for j in 0..n {
            for c in 0..cin {
                let plane = x[(j * cin + c) * h * w..][..h * w].as_ptr();
                for vi in 0..p / 16 {
                    let r0 = 2 * (vi * g) as isize - 1;
                    let mut rt = [[_mm512_setzero_ps(); 4]; 4];
                    for (i, rt) in rt.iter_mut().enumerate() {
                        // SAFETY: `plane` holds the `h × w` plane.
                        let [a, b] = unsafe { rows(plane, h, w, r0 + i as isize, &zero) };
                        let mut d = [_mm512_setzero_ps(); 4];
                        for (k, d) in d.iter_mut().enumerate() {
                            *d = _mm512_maskz_permutex2var_ps(msk[k], a, idx[k], b);
                        }
                        *rt = [
                            _mm512_sub_ps(d[0], d[2]),
                            _mm512_add_ps(d[1], d[2]),
                            _mm512_sub_ps(d[2], d[1]),
                            _mm512_sub_ps(d[1], d[3]),
                        ];
                    }
                    let base = j * p + vi * 16;
                    #[allow(clippy::needless_range_loop)]
                    for k in 0..4 {
                        let vals = [
                            _mm512_sub_ps(rt[0][k], rt[2][k]),
                            _mm512_add_ps(rt[1][k], rt[2][k]),
                            _mm512_sub_ps(rt[2][k], rt[1][k]),
                            _mm512_sub_ps(rt[1][k], rt[3][k]),
                        ];
                        for (i, val) in vals.into_iter().enumerate() {
                            let xi = 4 * i + k;
                            // SAFETY: `ξ·vs + c·t + base + 16 ≤ 15·vs + cin·t` (asserted).
                            unsafe { _mm512_storeu_ps(vp.add(xi * vs + c * t + base), val) };
                        }
                    }
                }
            }
        }
    }

    /// `m[r·t + 16·v + l] = Σ_c u[c·MR + r]·v[c·t + 16·v + l]` for `r < MR`, `v < NV`, each sum
    /// in order of `c`.
    ///
    /// # Safety
    /// AVX-512F; `u` valid for `cin·MR` reads, `v` for `c·t + 16·NV` reads (`c < cin`), `m` for
    /// `r·t + 16·NV` writes (`r < MR`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const NV: usize>(
        u: *const f32,
        v: *const f32,
        cin: usize,
        t: usize,
        m: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for c in 0..cin {
            // SAFETY: within the bounds the caller guarantees.
            unsafe {
                let src = v.add(c * t);
                let mut xv = [_mm512_setzero_ps(); NV];
                for (k, xv) in xv.iter_mut().enumerate() {
                    *xv = _mm512_loadu_ps(src.add(16 * k));
                }
                let up = u.add(c * MR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*up.add(r));
                    for (a, xv) in acc.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(wv, *xv, *a);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (k, a) in acc.iter().enumerate() {
                // SAFETY: within the bounds the caller guarantees.
                unsafe { _mm512_storeu_ps(m.add(r * t + 16 * k), *a) };
            }
        }
    }

    /// `d[ξ·ms + o·t + q] = (A·dY·Aᵀ)[ξ]` (`A = [[1, 0], [1, 1], [1, −1], [0, −1]]`, `dY` the
    /// tile's 2×2 output gradients) for every tile `q` of the `n` samples of `gy`
    /// (`[n][cout][h][w]`) and every channel `o`.
    ///
    /// # Safety
    /// AVX-512F; the shape fits (`super::fits`).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn grad_transform(
        gy: &[f32],
        cout: usize,
        h: usize,
        w: usize,
        n: usize,
        ms: usize,
        d: &mut [f32],
    ) {
        let (g, p) = (32 / w, (h / 2) * (w / 2));
        let t = n * p;
        assert!(gy.len() >= n * cout * h * w && ms >= cout * t && d.len() >= 15 * ms + cout * t);
        let zero = [0.0f32; 32];
        // Lane (s, tx) takes column 2·tx (even) or 2·tx + 1 (odd) of its sub-row's row.
        let even: [i32; 16] =
            std::array::from_fn(|l| ((l / (w / 2)) * w + 2 * (l % (w / 2))) as i32);
        // SAFETY: 16 i32.
        let even = unsafe { _mm512_loadu_si512(even.as_ptr().cast()) };
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        let z = _mm512_setzero_ps();
        let dp = d.as_mut_ptr();
        for j in 0..n {
            for o in 0..cout {
                let plane = gy[(j * cout + o) * h * w..][..h * w].as_ptr();
                for vi in 0..p / 16 {
                    let r0 = 2 * (vi * g) as isize;
                    // dY[a][b] for the 16 tiles.
                    let mut dy = [[z; 2]; 2];
                    for (a, dy) in dy.iter_mut().enumerate() {
                        // SAFETY: `plane` holds the `h × w` plane.
                        let [x0, x1] = unsafe { rows(plane, h, w, r0 + a as isize, &zero) };
                        *dy = [
                            _mm512_permutex2var_ps(x0, even, x1),
                            _mm512_permutex2var_ps(x0, odd, x1),
                        ];
                    }
                    // Rows: A·dY.
                    let rt = [
                        dy[0],
                        [
                            _mm512_add_ps(dy[0][0], dy[1][0]),
                            _mm512_add_ps(dy[0][1], dy[1][1]),
                        ],
                        [
                            _mm512_sub_ps(dy[0][0], dy[1][0]),
                            _mm512_sub_ps(dy[0][1], dy[1][1]),
                        ],
                        [_mm512_sub_ps(z, dy[1][0]), _mm512_sub_ps(z, dy[1][1])],
                    ];
                    let base = j * p + vi * 16;
                    for (i, [c0, c1]) in rt.into_iter().enumerate() {
                        let vals = [
                            c0,
                            _mm512_add_ps(c0, c1),
                            _mm512_sub_ps(c0, c1),
                            _mm512_sub_ps(z, c1),
                        ];
                        for (k, val) in vals.into_iter().enumerate() {
                            // SAFETY: `ξ·ms + o·t + base + 16 ≤ 15·ms + cout·t` (asserted).
                            unsafe {
                                _mm512_storeu_ps(dp.add((4 * i + k) * ms + o * t + base), val)
                            };
                        }
                    }
                }
            }
        }
    }

    /// `du[c·MR + r] += Σ_{q < t} d[r·t + q]·v[c·t + q]` for `r < MR`, `c < NC`: the sum in
    /// 16 f32 lanes of `q` (in order of `q`), the lanes added up, then added in f64.
    ///
    /// # Safety
    /// AVX-512F; `d` valid for `r·t + q` reads, `v` for `c·t + q` (`q < t`, `t` a multiple of
    /// 16), `du` for `NC·MR` reads and writes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn wtile<const NC: usize>(
        d: *const f32,
        v: *const f32,
        t: usize,
        du: *mut f64,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NC]; MR];
        for q in (0..t).step_by(16) {
            // SAFETY: within the bounds the caller guarantees.
            unsafe {
                let mut vv = [_mm512_setzero_ps(); NC];
                for (c, vv) in vv.iter_mut().enumerate() {
                    *vv = _mm512_loadu_ps(v.add(c * t + q));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let dv = _mm512_loadu_ps(d.add(r * t + q));
                    for (a, vv) in acc.iter_mut().zip(&vv) {
                        *a = _mm512_fmadd_ps(dv, *vv, *a);
                    }
                }
            }
        }
        // The lanes added up 16 accumulators at a time (`acc[r][4·g + j]` for r, j < 4): lane
        // `4·j + r` of the sums is `du[(4·g + j)·MR + r]`'s term.
        for g in 0..NC.div_ceil(4) {
            let mut a = [_mm512_setzero_ps(); 16];
            for (k, a) in a.iter_mut().enumerate() {
                let (r, c) = (k / 4, 4 * g + k % 4);
                if c < NC {
                    *a = acc[r][c];
                }
            }
            // SAFETY: AVX-512F (this function's own requirement).
            let e = unsafe { reduce16(&a) };
            let lanes = 4 * (NC - 4 * g).min(4);
            for (hh, val) in widen(e).into_iter().enumerate() {
                let n = lanes.saturating_sub(8 * hh).min(8);
                let k: __mmask8 = ((1u32 << n) - 1) as u8;
                // SAFETY: lanes `16·g + 8·hh + l < NC·MR` for `l < n` (the mask).
                unsafe {
                    let p = du.add(16 * g + 8 * hh);
                    let old = _mm512_maskz_loadu_pd(k, p);
                    _mm512_mask_storeu_pd(p, k, _mm512_add_pd(old, val));
                }
            }
        }
    }

    /// The sums of the lanes of 16 vectors: lane `4·j + m` of the result is the sum of
    /// `a[4·m + j]`'s lanes (a transposing tree of 15 additions, one fixed order).
    ///
    /// # Safety
    /// AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce16(a: &[__m512; 16]) -> __m512 {
        // Halves: low 256 bits a[2i]'s 8 partial sums, high a[2i + 1]'s.
        let mut b = [_mm512_setzero_ps(); 8];
        for (i, b) in b.iter_mut().enumerate() {
            let (x, y) = (a[2 * i], a[2 * i + 1]);
            *b = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x, y),
                _mm512_shuffle_f32x4::<0xEE>(x, y),
            );
        }
        // Quarter j of c[i]: a[4i + j]'s 4 partial sums.
        let mut c = [_mm512_setzero_ps(); 4];
        for (i, c) in c.iter_mut().enumerate() {
            let (x, y) = (b[2 * i], b[2 * i + 1]);
            *c = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            );
        }
        // Quarter j of d[i]: two partial sums of a[8i + j], two of a[8i + 4 + j].
        let mut d = [_mm512_setzero_ps(); 2];
        for (i, d) in d.iter_mut().enumerate() {
            let (x, y) = (c[2 * i], c[2 * i + 1]);
            *d = _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(x, y),
                _mm512_shuffle_ps::<0xEE>(x, y),
            );
        }
        let (x, y) = (d[0], d[1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(x, y),
            _mm512_shuffle_ps::<0xDD>(x, y),
        )
    }

    /// `y[j][o] = Aᵀ·M·A (+ bias[o])` for every tile of the `n` samples, from the products
    /// `m[ξ·ms + o·t + q]`, into `y` (`[n][cout][h][w]`, every value written).
    ///
    /// # Safety
    /// AVX-512F; the shape fits (`super::fits`).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn output_transform(
        m: &[f32],
        ms: usize,
        cout: usize,
        bias: Option<&[f32]>,
        h: usize,
        w: usize,
        n: usize,
        y: &mut [MaybeUninit<f32>],
    ) {
        let (g, p) = (32 / w, (h / 2) * (w / 2));
        let t = n * p;
        assert!(ms >= cout * t && m.len() >= 15 * ms + cout * t && y.len() >= n * cout * h * w);
        // Interleave the even (first source) and odd (second) columns of 8 tiles.
        let lo: [i32; 16] = std::array::from_fn(|l| (l / 2 + 16 * (l % 2)) as i32);
        let hi: [i32; 16] = std::array::from_fn(|l| (8 + l / 2 + 16 * (l % 2)) as i32);
        // SAFETY: 16 i32 each.
        let (lo, hi) = unsafe {
            (
                _mm512_loadu_si512(lo.as_ptr().cast()),
                _mm512_loadu_si512(hi.as_ptr().cast()),
            )
        };
        let yp = y.as_mut_ptr().cast::<f32>();
        let mp = m.as_ptr();
        for j in 0..n {
            for o in 0..cout {
                let b = _mm512_set1_ps(bias.map_or(0.0, |b| b[o]));
                // SAFETY: the plane `(j, o)` is inside `y` (asserted).
                let plane = unsafe { yp.add((j * cout + o) * h * w) };
                for vi in 0..p / 16 {
                    let base = j * p + vi * 16;
                    let mut a = [_mm512_setzero_ps(); 4];
                    let mut bb = [_mm512_setzero_ps(); 4];
                    for i in 0..4 {
                        let mut mv = [_mm512_setzero_ps(); 4];
                        for (k, mv) in mv.iter_mut().enumerate() {
                            // SAFETY: `ξ·ms + o·t + base + 16 ≤ 15·ms + cout·t` (asserted).
                            *mv =
                                unsafe { _mm512_loadu_ps(mp.add((4 * i + k) * ms + o * t + base)) };
                        }
                        a[i] = _mm512_add_ps(_mm512_add_ps(mv[0], mv[1]), mv[2]);
                        bb[i] = _mm512_sub_ps(_mm512_sub_ps(mv[1], mv[2]), mv[3]);
                    }
                    let mut out = [
                        [
                            _mm512_add_ps(_mm512_add_ps(a[0], a[1]), a[2]),
                            _mm512_add_ps(_mm512_add_ps(bb[0], bb[1]), bb[2]),
                        ],
                        [
                            _mm512_sub_ps(_mm512_sub_ps(a[1], a[2]), a[3]),
                            _mm512_sub_ps(_mm512_sub_ps(bb[1], bb[2]), bb[3]),
                        ],
                    ];
                    if bias.is_some() {
                        for v in out.iter_mut().flatten() {
                            *v = _mm512_add_ps(*v, b);
                        }
                    }
                    let ty0 = vi * g;
                    for (ai, [e, od]) in out.into_iter().enumerate() {
                        let pv = _mm512_permutex2var_ps(e, lo, od);
                        let qv = _mm512_permutex2var_ps(e, hi, od);
                        let row = |s: usize| 2 * (ty0 + s) + ai;
                        // SAFETY: rows `< h` of the plane, `w` values each.
                        unsafe {
                            match w {
                                32 => {
                                    let d = plane.add(row(0) * 32);
                                    _mm512_storeu_ps(d, pv);
                                    _mm512_storeu_ps(d.add(16), qv);
                                }
                                16 => {
                                    _mm512_storeu_ps(plane.add(row(0) * 16), pv);
                                    _mm512_storeu_ps(plane.add(row(1) * 16), qv);
                                }
                                _ => {
                                    let halves = |v: __m512| {
                                        let hi = _mm512_extractf64x4_pd(_mm512_castps_pd(v), 1);
                                        (_mm512_castps512_ps256(v), _mm256_castpd_ps(hi))
                                    };
                                    let (p0, p1) = halves(pv);
                                    let (q0, q1) = halves(qv);
                                    _mm256_storeu_ps(plane.add(row(0) * 8), p0);
                                    _mm256_storeu_ps(plane.add(row(1) * 8), p1);
                                    _mm256_storeu_ps(plane.add(row(2) * 8), q0);
                                    _mm256_storeu_ps(plane.add(row(3) * 8), q1);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::{Rng, max_rel};

    /// The direct 3×3 convolution in f64 (padding 1, stride 1): `y[s][o][p] = Σ w·x`.
    fn direct(
        x: &[f64],
        w: &[f64],
        n: usize,
        cin: usize,
        cout: usize,
        h: usize,
        wd: usize,
    ) -> Vec<f64> {
        let mut y = vec![0.0; n * cout * h * wd];
        for s in 0..n {
            for o in 0..cout {
                for r in 0..h {
                    for col in 0..wd {
                        let mut acc = 0.0;
                        for i in 0..cin {
                            for ki in 0..3 {
                                for kj in 0..3 {
                                    let (rr, cc) = (r + ki, col + kj);
                                    if rr < 1 || cc < 1 || rr > h || cc > wd {
                                        continue;
                                    }
                                    acc += w[(o * cin + i) * 9 + 3 * ki + kj]
                                        * x[((s * cin + i) * h + rr - 1) * wd + cc - 1];
                                }
                            }
                        }
                        y[((s * cout + o) * h + r) * wd + col] = acc;
                    }
                }
            }
        }
        y
    }

    /// Forward and input gradient against the f64 direct sums, with the direct path's
    /// tolerance (1e-6 of the largest value), over every width the rule takes, channel counts
    /// that are not multiples of the tiles, batch 1 and batches spanning several blocks.
    #[test]
    fn matches_the_f64_direct_sums() {
        if !conv3x3::available() {
            eprintln!("no AVX-512F: the Winograd path is not used on this CPU");
            return;
        }
        for &(cin, cout, h, w, batch) in &[
            (16, 16, 32, 32, 2),
            (16, 17, 2, 32, 1),
            (19, 16, 4, 16, 3),
            (16, 16, 16, 16, 9),
            (64, 64, 8, 8, 5),
            (23, 21, 16, 8, 1),
            (32, 32, 16, 16, 1),
            (16, 29, 24, 32, 7),
        ] {
            let sh = Shape {
                batch,
                cin,
                cout,
                h,
                w,
                stride: 1,
                k: 3,
            };
            assert!(fits(&sh), "{sh:?}");
            let mut rng = Rng::new((cin * 100 + cout * 7 + h) as u64);
            let x: Vec<f64> = rng
                .array(&[batch * cin * h * w])
                .into_raw_vec_and_offset()
                .0;
            let wt: Vec<f64> = rng.array(&[cout * cin * 9]).into_raw_vec_and_offset().0;
            let gy: Vec<f64> = rng
                .array(&[batch * cout * h * w])
                .into_raw_vec_and_offset()
                .0;
            let bias: Vec<f64> = rng.array(&[cout]).into_raw_vec_and_offset().0;
            let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let (x32, w32, gy32, b32) = (f32s(&x), f32s(&wt), f32s(&gy), f32s(&bias));
            let what = format!("{cin}→{cout} {h}×{w} ×{batch}");

            let mut want = direct(&x, &wt, batch, cin, cout, h, w);
            for (k, v) in want.iter_mut().enumerate() {
                *v += bias[(k / (h * w)) % cout];
            }
            let mut y = vec![MaybeUninit::new(f32::NAN); batch * cout * h * w];
            forward(&x32, &w32, Some(&b32), sh, &mut y);
            // SAFETY: every value was initialised (NaN if never written).
            let y: Vec<f32> = y.iter().map(|v| unsafe { v.assume_init() }).collect();
            let e = max_rel(&y, &want);
            assert!(e < 1e-6, "{what}: forward {e}");

            // The input gradient is the convolution with the flipped, transposed weights.
            let mut wf = vec![0.0; cin * cout * 9];
            for o in 0..cout {
                for i in 0..cin {
                    for t in 0..9 {
                        wf[(i * cout + o) * 9 + 8 - t] = wt[(o * cin + i) * 9 + t];
                    }
                }
            }
            let want = direct(&gy, &wf, batch, cout, cin, h, w);
            let mut gx = vec![MaybeUninit::new(f32::NAN); batch * cin * h * w];
            input_grad(&gy32, &w32, sh, &mut gx);
            // SAFETY: as above.
            let gx: Vec<f32> = gx.iter().map(|v| unsafe { v.assume_init() }).collect();
            let e = max_rel(&gx, &want);
            assert!(e < 1e-6, "{what}: input gradient {e}");

            // The weight gradient, added to what is there.
            let mut want = vec![0.0f64; cout * cin * 9];
            for s in 0..batch {
                for o in 0..cout {
                    for i in 0..cin {
                        for t in 0..9 {
                            let (ki, kj) = (t / 3, t % 3);
                            let mut acc = 0.0;
                            for r in 0..h {
                                for col in 0..w {
                                    let (rr, cc) = (r + ki, col + kj);
                                    if rr < 1 || cc < 1 || rr > h || cc > w {
                                        continue;
                                    }
                                    acc += gy[((s * cout + o) * h + r) * w + col]
                                        * x[((s * cin + i) * h + rr - 1) * w + cc - 1];
                                }
                            }
                            want[(o * cin + i) * 9 + t] += acc;
                        }
                    }
                }
            }
            let mut gw = vec![1.0f32; cout * cin * 9];
            weight_grad(&x32, &gy32, sh, &mut gw);
            let gw: Vec<f32> = gw.iter().map(|v| v - 1.0).collect();
            let e = max_rel(&gw, &want);
            assert!(e < 1e-5, "{what}: weight gradient {e}");
        }
    }

    /// The rule: only stride 1, widths 8, 16 and 32, heights whose tile rows fill vectors,
    /// and enough channels.
    #[test]
    fn takes_only_the_shapes_of_its_rule() {
        if !conv3x3::available() {
            return;
        }
        let sh = |cin, cout, h, w, stride| Shape {
            batch: 2,
            cin,
            cout,
            h,
            w,
            stride,
            k: 3,
        };
        assert!(fits(&sh(16, 16, 32, 32, 1)));
        assert!(fits(&sh(32, 32, 16, 16, 1)));
        assert!(fits(&sh(64, 64, 8, 8, 1)));
        assert!(!fits(&sh(16, 32, 32, 32, 2)));
        assert!(!fits(&sh(3, 16, 32, 32, 1)));
        assert!(!fits(&sh(16, 4, 32, 32, 1)));
        assert!(!fits(&sh(8, 8, 8, 8, 1)));
        assert!(fits(&sh(16, 17, 8, 8, 1)));
        assert!(!fits(&sh(16, 16, 31, 32, 1)));
        assert!(!fits(&sh(16, 16, 32, 24, 1)));
        assert!(!fits(&sh(16, 16, 14, 16, 1)));
        assert!(!fits(&sh(16, 16, 12, 8, 1)));
    }
}
