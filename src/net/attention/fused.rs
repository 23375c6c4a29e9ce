//! Attention's per-(sequence, head) work in f32 as one fused AVX-512 kernel: scores, causal
//! mask, softmax and `P V` forward; `dP`, `dS`, `dQ`, `dK`, `dV` backward. Positions `i` (the
//! query side) sit in the 16 lanes of a vector, so that the scores of a block of 16 queries
//! against key j are one vector (`Σ_k K[j][k]·Qᵀ[k][i..i+16]`), the softmax's maximum and sum
//! over j are lane-wise (no horizontal reductions, no ragged causal rows) and `P V` is `d`
//! vector accumulators. The per-head products are far too small (32×32×4 for the fixture's
//! GPT) for a general GEMM to pay for its packing and dispatch per call.
//!
//! The probabilities are kept transposed and packed for backward: query block b (queries
//! `16b..16b+16`) stores `Pᵀ[j][16b..16b+16]` for the keys j it sees (`j < min(t, 16b + 16)`
//! when causal, all t otherwise), 16 values per key, blocks one after another
//! ([`Dims::packed_len`] values per head). Lanes past the last position hold the softmax of
//! zero scores; they meet zeros (padded `Qᵀ` and `dOᵀ`) or are skipped wherever they could
//! contribute. Backward's key side (`dV = Pᵀ dO`, `dK = dSᵀ Q`) turns 16×16 tiles of `Pᵀ` and
//! `dSᵀ` query-major so that keys sit in the lanes.
//!
//! Only on CPUs with AVX-512F ([`available`]); elsewhere attention takes its `gemm` path.

use std::mem::MaybeUninit;

const L: usize = 16;

/// The shapes of one attention layer's call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    /// Sequences.
    pub n: usize,
    /// Positions per sequence.
    pub t: usize,
    /// Channels.
    pub c: usize,
    /// Heads.
    pub h: usize,
    /// Head size (c / h).
    pub d: usize,
    pub causal: bool,
    /// 1/√d.
    pub scale: f32,
}

impl Dims {
    fn blocks(&self) -> usize {
        self.t.div_ceil(L)
    }

    /// Keys seen by query block b.
    fn keys(&self, b: usize) -> usize {
        if self.causal {
            (b * L + L).min(self.t)
        } else {
            self.t
        }
    }

    /// Values of one head's packed probabilities.
    pub fn packed_len(&self) -> usize {
        (0..self.blocks()).map(|b| self.keys(b) * L).sum()
    }

    /// Offset of each block in a head's packed probabilities.
    fn offsets(&self) -> Vec<usize> {
        let mut off = 0;
        (0..self.blocks())
            .map(|b| {
                let o = off;
                off += self.keys(b) * L;
                o
            })
            .collect()
    }
}

/// Whether this CPU runs the fused kernel (AVX-512F).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Forward: `qkv` is `[n·t, 3c]` (q | k | v per position), `probs` `[n·h, packed_len]`,
/// `heads` `[n·t, c]`; both outputs are written in full (every element of both slices is
/// initialised on return, so the caller may pass memory not yet written).
///
/// # Panics
/// If the sizes do not match `dm` or the CPU lacks AVX-512F.
pub(super) fn forward(
    dm: &Dims,
    qkv: &[f32],
    probs: &mut [MaybeUninit<f32>],
    heads: &mut [MaybeUninit<f32>],
) {
    assert!(qkv.len() == dm.n * dm.t * 3 * dm.c && heads.len() == dm.n * dm.t * dm.c);
    assert!(probs.len() == dm.n * dm.h * dm.packed_len() && dm.d * dm.h == dm.c);
    assert!(available(), "the fused attention kernel needs AVX-512F");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU supports AVX-512F (checked just above).
    unsafe {
        x86::forward(dm, qkv, probs, heads)
    }
}

/// Backward: from `qkv` and `probs` as forward left them and `gheads` (`[n·t, c]`, the
/// gradient of the concatenated heads), write every entry of `gqkv` (`[n·t, 3c]`).
///
/// # Panics
/// If the sizes do not match `dm` or the CPU lacks AVX-512F.
pub(super) fn backward(dm: &Dims, qkv: &[f32], probs: &[f32], gheads: &[f32], gqkv: &mut [f32]) {
    assert!(qkv.len() == dm.n * dm.t * 3 * dm.c && gqkv.len() == qkv.len());
    assert!(gheads.len() == dm.n * dm.t * dm.c && dm.d * dm.h == dm.c);
    assert!(probs.len() == dm.n * dm.h * dm.packed_len());
    assert!(available(), "the fused attention kernel needs AVX-512F");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU supports AVX-512F (checked just above).
    unsafe {
        x86::backward(dm, qkv, probs, gheads, gqkv)
    }
}

/// `dst[k·tp + i] = α·src[i·stride + k]` for i < t, k < d (a transpose; lanes t..tp stay as
/// they are, zero in a fresh buffer): the definition that the kernels' tiled
/// `x86::transpose_in16` is tested against.
#[cfg(test)]
fn transpose_in(src: &[f32], stride: usize, t: usize, d: usize, alpha: f32, dst: &mut [f32]) {
    let tp = dst.len() / d;
    for i in 0..t {
        let row = &src[i * stride..i * stride + d];
        for (k, &v) in row.iter().enumerate() {
            dst[k * tp + i] = alpha * v;
        }
    }
}

/// The widest of 8, 4, 2, 1 that fits in `rest` columns.
#[inline(always)]
fn width(rest: usize) -> usize {
    if rest >= 8 {
        8
    } else if rest >= 4 {
        4
    } else if rest >= 2 {
        2
    } else {
        1
    }
}

/// Where a block product reads its `U` columns and writes its result.
struct Cols<'a> {
    /// Row 0 of the `U` source columns (stride `src_stride`).
    src: &'a [f32],
    src_stride: usize,
    /// First output column and the output's row stride.
    out_col: usize,
    out_stride: usize,
    /// First query of the block, positions per sequence.
    i0: usize,
    t: usize,
}

/// One key block's tiles, query-major: for each query block from the first that sees the
/// keys, `P[i0 + l][j0 + a]` at `[l·16 + a]` and then `dS` the same way.
struct KeyTiles<'a> {
    tiles: &'a [f32],
    /// First query of the first tile, positions per sequence.
    i0: usize,
    t: usize,
    /// First key and number of keys of the block.
    j0: usize,
    nj: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Cols, Dims, KeyTiles, L, width};
    use crate::net::simd::x86::{mask, transpose16};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Stores 16 lanes into memory that may not be written yet.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn st_uninit(s: &mut [MaybeUninit<f32>], at: usize, v: __m512) {
        let s = &mut s[at..at + L];
        // SAFETY: `s` holds 16 floats (`MaybeUninit<f32>` has f32's layout).
        unsafe { _mm512_storeu_ps(s.as_mut_ptr().cast::<f32>(), v) }
    }

    /// `s` seen as memory not yet written, for a writer that writes only initialised values.
    ///
    /// # Safety
    /// The caller must write only initialised values through the result (never
    /// `MaybeUninit::uninit()`), so that `s` stays initialised.
    #[inline(always)]
    unsafe fn as_uninit(s: &mut [f32]) -> &mut [MaybeUninit<f32>] {
        // SAFETY: same layout; the caller keeps every element initialised.
        unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn ld(s: &[f32], at: usize) -> __m512 {
        let s = &s[at..at + L];
        // SAFETY: `s` holds 16 floats.
        unsafe { _mm512_loadu_ps(s.as_ptr()) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn st(s: &mut [f32], at: usize, v: __m512) {
        let s = &mut s[at..at + L];
        // SAFETY: `s` holds 16 floats.
        unsafe { _mm512_storeu_ps(s.as_mut_ptr(), v) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn lanes(v: __m512) -> [f32; L] {
        let mut a = [0.0f32; L];
        st(&mut a, 0, v);
        a
    }

    /// `dst[l·16 + a] = src[a·16 + l]` for the `src.len() / 16` (≤ 16) rows a of a tile, the
    /// other columns of `dst` zero: a 16×16 transpose in registers
    /// ([`crate::net::simd::x86::transpose16`]).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose_tile(src: &[f32], dst: &mut [f32]) {
        let mut r = [_mm512_setzero_ps(); L];
        for (a, r) in r.iter_mut().enumerate().take(src.len() / L) {
            *r = ld(src, a * L);
        }
        transpose16(&mut r);
        for (k, r) in r.iter().enumerate() {
            st(dst, k * L, *r);
        }
    }

    /// [`transpose_in`] (`dst[k·tp + i] = α·src[i·stride + k]` for i < t, k < d; lanes t..tp
    /// untouched) by 16×16 tiles transposed in registers: a tile's rows are read with masked
    /// loads (`min(16, d − k0)` values each) into registers, scaled, transposed there
    /// ([`crate::net::simd::x86::transpose16`]),
    /// and its columns written with masked stores (`min(16, t − i0)` lanes). The same
    /// products `α·v`, so the same bits as the scalar loop, which wrote one value at a time
    /// with a stride of `tp` (a sixth of the fused backward's samples at C = 128).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose_in16(
        src: &[f32],
        stride: usize,
        t: usize,
        d: usize,
        alpha: f32,
        dst: &mut [f32],
    ) {
        if t == 0 || d == 0 {
            return;
        }
        let tp = dst.len() / d;
        assert!(t <= tp && (t - 1) * stride + d <= src.len());
        let a = _mm512_set1_ps(alpha);
        for i0 in (0..t).step_by(L) {
            let rows = (t - i0).min(L);
            let row_mask = mask(rows);
            for k0 in (0..d).step_by(L) {
                let w = (d - k0).min(L);
                let col_mask = mask(w);
                // The tile's rows (the rest zero), scaled, then transposed in registers.
                let mut r = [_mm512_setzero_ps(); L];
                for (i, r) in r.iter_mut().enumerate().take(rows) {
                    let row = &src[(i0 + i) * stride + k0..(i0 + i) * stride + k0 + w];
                    // SAFETY: `row` holds the w values the mask reads.
                    let v = unsafe { _mm512_maskz_loadu_ps(col_mask, row.as_ptr()) };
                    *r = _mm512_mul_ps(v, a);
                }
                transpose16(&mut r);
                for (l, r) in r.iter().enumerate().take(w) {
                    let col = &mut dst[(k0 + l) * tp + i0..(k0 + l) * tp + i0 + rows];
                    // SAFETY: `col` holds the `rows` values the mask writes.
                    unsafe { _mm512_mask_storeu_ps(col.as_mut_ptr(), row_mask, *r) };
                }
            }
        }
    }

    /// e^x lane-wise: `fastmath::exp`'s reduction and polynomial, with fused multiply-adds.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp(x: __m512) -> __m512 {
        const ROUND: f32 = 12_582_912.0;
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.3)),
            _mm512_set1_ps(88.3),
        );
        let kr = _mm512_fmadd_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
            _mm512_set1_ps(ROUND),
        );
        let k = _mm512_sub_ps(kr, _mm512_set1_ps(ROUND));
        let bits = _mm512_sub_epi32(
            _mm512_castps_si512(kr),
            _mm512_set1_epi32((ROUND.to_bits() - 127) as i32),
        );
        let two_k = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(bits));
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_mul_ps(p, two_k)
    }

    /// Rows j..j+J of a head's d columns (`src`, stride `stride`) against the block's 16
    /// transposed positions: `Σ_k src[j + r][k]·xt[k·tp + i0 + l]`, J independent sums.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    fn dots<const J: usize>(
        src: &[f32],
        stride: usize,
        d: usize,
        xt: &[f32],
        tp: usize,
        i0: usize,
        j: usize,
    ) -> [__m512; J] {
        let mut acc = [_mm512_setzero_ps(); J];
        let rows: [&[f32]; J] =
            std::array::from_fn(|r| &src[(j + r) * stride..(j + r) * stride + d]);
        for k in 0..d {
            let x = ld(xt, k * tp + i0);
            for r in 0..J {
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(rows[r][k]), x, acc[r]);
            }
        }
        acc
    }

    /// Calls `f(j, values)` for the rows 0..jm of [`dots`], eight at a time, then four, then
    /// one. Eight independent sums keep both FMA units of a core with two 512-bit units busy
    /// (latency 4 × 2 units); four left them half idle. Each row's sum runs over k in the
    /// same order at any width, so the bits do not depend on it.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn each_dot(
        src: &[f32],
        stride: usize,
        d: usize,
        xt: &[f32],
        tp: usize,
        i0: usize,
        jm: usize,
        mut f: impl FnMut(usize, __m512),
    ) {
        let mut j = 0;
        while j + 8 <= jm {
            let v = dots::<8>(src, stride, d, xt, tp, i0, j);
            for (r, v) in v.into_iter().enumerate() {
                f(j + r, v);
            }
            j += 8;
        }
        while j + 4 <= jm {
            let v = dots::<4>(src, stride, d, xt, tp, i0, j);
            for (r, v) in v.into_iter().enumerate() {
                f(j + r, v);
            }
            j += 4;
        }
        while j < jm {
            f(j, dots::<1>(src, stride, d, xt, tp, i0, j)[0]);
            j += 1;
        }
    }

    /// The lanes of query block i0 that see key j (all but those with i0 + l < j).
    #[inline(always)]
    fn seen(causal: bool, i0: usize, j: usize) -> __mmask16 {
        if causal && j > i0 {
            !((1u16 << (j - i0)) - 1)
        } else {
            0xffff
        }
    }

    /// The probabilities of query block `i0..i0+16` against its keys, transposed: `blk[j·16 +
    /// l]` = P[i0 + l][j]. `k` is the first key's row (stride 3c), `qt` the scaled `Qᵀ`.
    /// `blk` may be memory not yet written: every element is written, and the block is
    /// returned initialised.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn softmax_block<'a>(
        dm: &Dims,
        k: &[f32],
        qt: &[f32],
        i0: usize,
        blk: &'a mut [MaybeUninit<f32>],
    ) -> &'a [f32] {
        let (d, rs) = (dm.d, 3 * dm.c);
        let tp = qt.len() / d;
        let jm = blk.len() / L;
        assert_eq!(blk.len(), jm * L);
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        // `each_dot` calls the closure once for every j < jm: all jm·16 values are written.
        each_dot(k, rs, d, qt, tp, i0, jm, |j, s| {
            m = _mm512_mask_max_ps(m, seen(dm.causal, i0, j), m, s);
            st_uninit(blk, j * L, s);
        });
        // SAFETY: every element of `blk` was written just above (its length is jm·16).
        let blk: &mut [f32] =
            unsafe { std::slice::from_raw_parts_mut(blk.as_mut_ptr().cast(), blk.len()) };
        let mut sum = _mm512_setzero_ps();
        for j in 0..jm {
            let e = exp(_mm512_sub_ps(ld(blk, j * L), m));
            let e = _mm512_maskz_mov_ps(seen(dm.causal, i0, j), e);
            st(blk, j * L, e);
            sum = _mm512_add_ps(sum, e);
        }
        let inv = _mm512_div_ps(_mm512_set1_ps(1.0), sum);
        for j in 0..jm {
            st(blk, j * L, _mm512_mul_ps(ld(blk, j * L), inv));
        }
        blk
    }

    /// `out[i0 + l][out_col + u] = α·Σ_j blk[j·16 + l]·src[j][u]` for the block's queries (l
    /// with i0 + l < t) and u < U.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn product<const U: usize>(blk: &[f32], at: &Cols, alpha: f32, out: &mut [MaybeUninit<f32>]) {
        let mut acc = [_mm512_setzero_ps(); U];
        for j in 0..blk.len() / L {
            let p = ld(blk, j * L);
            let v = &at.src[j * at.src_stride..j * at.src_stride + U];
            for u in 0..U {
                acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(v[u]), p, acc[u]);
            }
        }
        let a: [[f32; L]; U] =
            std::array::from_fn(|u| lanes(_mm512_mul_ps(acc[u], _mm512_set1_ps(alpha))));
        for l in 0..L.min(at.t - at.i0) {
            let row = &mut out[(at.i0 + l) * at.out_stride + at.out_col..][..U];
            for u in 0..U {
                row[u].write(a[u][l]);
            }
        }
    }

    /// [`product`] over all of a block's head columns, U at a time.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn products(blk: &[f32], at: Cols, d: usize, alpha: f32, out: &mut [MaybeUninit<f32>]) {
        let mut k0 = 0;
        while k0 < d {
            let u = width(d - k0);
            let at = Cols {
                src: &at.src[k0..],
                out_col: at.out_col + k0,
                ..at
            };
            match u {
                8 => product::<8>(blk, &at, alpha, out),
                4 => product::<4>(blk, &at, alpha, out),
                2 => product::<2>(blk, &at, alpha, out),
                _ => product::<1>(blk, &at, alpha, out),
            }
            k0 += u;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn forward(
        dm: &Dims,
        qkv: &[f32],
        probs: &mut [MaybeUninit<f32>],
        heads: &mut [MaybeUninit<f32>],
    ) {
        let Dims { t, c, h, d, .. } = *dm;
        let tp = dm.blocks() * L;
        let pl = dm.packed_len();
        let offs = dm.offsets();
        let rs = 3 * c;
        let mut qt = vec![0.0f32; d * tp];
        for ((rows, out), pseq) in qkv
            .chunks_exact(t * rs)
            .zip(heads.chunks_exact_mut(t * c))
            .zip(probs.chunks_exact_mut(h * pl))
        {
            for (hd, pt) in pseq.chunks_exact_mut(pl).enumerate() {
                let (qc, kc, vc) = (hd * d, c + hd * d, 2 * c + hd * d);
                transpose_in16(&rows[qc..], rs, t, d, dm.scale, &mut qt);
                for (b, &off) in offs.iter().enumerate() {
                    let blk = &mut pt[off..off + dm.keys(b) * L];
                    let blk = softmax_block(dm, &rows[kc..], &qt, b * L, blk);
                    let at = Cols {
                        src: &rows[vc..],
                        src_stride: rs,
                        out_col: qc,
                        out_stride: c,
                        i0: b * L,
                        t,
                    };
                    products(blk, at, d, 1.0, out);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn backward(
        dm: &Dims,
        qkv: &[f32],
        probs: &[f32],
        gheads: &[f32],
        gqkv: &mut [f32],
    ) {
        let Dims { t, c, h, d, .. } = *dm;
        let tp = dm.blocks() * L;
        let pl = dm.packed_len();
        let offs = dm.offsets();
        let rs = 3 * c;
        let (mut got, mut qt) = (vec![0.0f32; d * tp], vec![0.0f32; d * tp]);
        let mut ds = vec![0.0f32; pl];
        let mut tiles = vec![0.0f32; dm.blocks() * 2 * L * L];
        for (((rows, g), pseq), grows) in qkv
            .chunks_exact(t * rs)
            .zip(gheads.chunks_exact(t * c))
            .zip(probs.chunks_exact(h * pl))
            .zip(gqkv.chunks_exact_mut(t * rs))
        {
            for (hd, pt) in pseq.chunks_exact(pl).enumerate() {
                let (qc, kc, vc) = (hd * d, c + hd * d, 2 * c + hd * d);
                transpose_in16(&g[qc..], c, t, d, 1.0, &mut got);
                transpose_in16(&rows[qc..], rs, t, d, 1.0, &mut qt);
                // Per query block: dPᵀ = V dOᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ − Σ_j Pᵀ ⊙ dPᵀ), dQ = dS K/√d.
                for (b, &off) in offs.iter().enumerate() {
                    let i0 = b * L;
                    let jm = dm.keys(b);
                    let (p, s) = (&pt[off..off + jm * L], &mut ds[off..off + jm * L]);
                    let mut dot = _mm512_setzero_ps();
                    each_dot(&rows[vc..], rs, d, &got, tp, i0, jm, |j, dp| {
                        dot = _mm512_fmadd_ps(ld(p, j * L), dp, dot);
                        st(s, j * L, dp);
                    });
                    for j in 0..jm {
                        let v = _mm512_mul_ps(ld(p, j * L), _mm512_sub_ps(ld(s, j * L), dot));
                        st(s, j * L, v);
                    }
                    let at = Cols {
                        src: &rows[kc..],
                        src_stride: rs,
                        out_col: qc,
                        out_stride: rs,
                        i0,
                        t,
                    };
                    // SAFETY: `products` writes only initialised values.
                    products(s, at, d, dm.scale, unsafe { as_uninit(grows) });
                }
                // Per block of 16 keys: dV = Pᵀ dO and dK = dSᵀ Q/√d, from the 16×16 tiles of
                // the query blocks that see those keys, turned key-major (keys in the lanes).
                for jb in 0..dm.blocks() {
                    let (j0, first) = (jb * L, if dm.causal { jb } else { 0 });
                    let nj = (t - j0).min(L);
                    for (b, &off) in offs.iter().enumerate().skip(first) {
                        let at = off + j0 * L;
                        let (pt_b, dt_b) = tiles[(b - first) * 2 * L * L..].split_at_mut(L * L);
                        transpose_tile(&pt[at..at + nj * L], &mut pt_b[..L * L]);
                        transpose_tile(&ds[at..at + nj * L], &mut dt_b[..L * L]);
                    }
                    let kt = KeyTiles {
                        tiles: &tiles[..(dm.blocks() - first) * 2 * L * L],
                        i0: first * L,
                        t,
                        j0,
                        nj,
                    };
                    let mut k0 = 0;
                    while k0 < d {
                        let u = width(d - k0);
                        let (gc, qk) = (&g[qc + k0..], &rows[qc + k0..]);
                        let cols = (kc + k0, vc + k0);
                        match u {
                            8 => key_block::<8>(&kt, gc, c, qk, rs, dm.scale, grows, cols),
                            4 => key_block::<4>(&kt, gc, c, qk, rs, dm.scale, grows, cols),
                            2 => key_block::<2>(&kt, gc, c, qk, rs, dm.scale, grows, cols),
                            _ => key_block::<1>(&kt, gc, c, qk, rs, dm.scale, grows, cols),
                        }
                        k0 += u;
                    }
                }
            }
        }
    }

    /// For the block's keys j0 + a and u < U: `out[j0 + a][vc + u] = Σ_i P[i][j0 + a]·g[i·gs +
    /// u]` and `out[j0 + a][kc + u] = α·Σ_i dS[i][j0 + a]·q[i·qs + u]` (output row stride
    /// `qs`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn key_block<const U: usize>(
        kt: &KeyTiles,
        g: &[f32],
        gs: usize,
        q: &[f32],
        qs: usize,
        alpha: f32,
        out: &mut [f32],
        (kc, vc): (usize, usize),
    ) {
        let (mut av, mut ak) = ([_mm512_setzero_ps(); U], [_mm512_setzero_ps(); U]);
        for (n, tile) in kt.tiles.chunks_exact(2 * L * L).enumerate() {
            let i0 = kt.i0 + n * L;
            let (pt, dt) = tile.split_at(L * L);
            for l in 0..L.min(kt.t - i0) {
                let i = i0 + l;
                let (p, s) = (ld(pt, l * L), ld(dt, l * L));
                let (gr, qr) = (&g[i * gs..i * gs + U], &q[i * qs..i * qs + U]);
                for u in 0..U {
                    av[u] = _mm512_fmadd_ps(_mm512_set1_ps(gr[u]), p, av[u]);
                    ak[u] = _mm512_fmadd_ps(_mm512_set1_ps(qr[u]), s, ak[u]);
                }
            }
        }
        let av: [[f32; L]; U] = std::array::from_fn(|u| lanes(av[u]));
        let ak: [[f32; L]; U] =
            std::array::from_fn(|u| lanes(_mm512_mul_ps(ak[u], _mm512_set1_ps(alpha))));
        for a in 0..kt.nj {
            let row = &mut out[(kt.j0 + a) * qs..];
            for u in 0..U {
                row[vc + u] = av[u][a];
                row[kc + u] = ak[u][a];
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The register transpose against the definition, for full and partial tiles; and the
    /// vector `exp` against `fastmath::exp`.
    #[test]
    fn tile_transpose_and_exp() {
        if !available() {
            return;
        }
        let src: Vec<f32> = (0..256).map(|v| v as f32).collect();
        for rows in [16, 9, 1] {
            let mut dst = vec![-1.0f32; 256];
            // SAFETY: the CPU supports AVX-512F (checked above).
            unsafe { x86::transpose_tile(&src[..rows * L], &mut dst) };
            for l in 0..L {
                for a in 0..L {
                    let want = if a < rows { src[a * L + l] } else { 0.0 };
                    assert_eq!(dst[l * L + a], want, "rows {rows}, [{l}][{a}]");
                }
            }
        }
        let xs: Vec<f32> = (0..4000).map(|i| -90.0 + 0.045 * i as f32).collect();
        for x in xs.chunks_exact(L) {
            let mut got = [0.0f32; L];
            // SAFETY: as above.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(got.as_mut_ptr(), x86::exp(_mm512_loadu_ps(x.as_ptr())));
            }
            for (g, &x) in got.iter().zip(x) {
                let want = crate::net::fastmath::exp(x);
                assert!((g - want).abs() <= 4e-7 * want, "exp({x}): {g} vs {want}");
            }
        }
    }

    /// Forward writes every element of both outputs: the same bits whether they start as
    /// zeros (as they did when the caller cleared them) or as NaN, causal or not, for
    /// sequence lengths around the block size and several head sizes.
    #[test]
    fn forward_writes_both_outputs_in_full() {
        if !available() {
            return;
        }
        for causal in [true, false] {
            for (t, c, h) in [
                (1usize, 4usize, 1usize),
                (5, 8, 2),
                (17, 12, 3),
                (40, 32, 4),
            ] {
                let (n, d) = (2, c / h);
                let dm = Dims {
                    n,
                    t,
                    c,
                    h,
                    d,
                    causal,
                    scale: (1.0 / (d as f64).sqrt()) as f32,
                };
                let qkv: Vec<f32> = (0..n * t * 3 * c)
                    .map(|v| (v as f32 * 0.61).sin() * 2.0)
                    .collect();
                let run = |fill: f32| {
                    let mut p = vec![MaybeUninit::new(fill); n * h * dm.packed_len()];
                    let mut o = vec![MaybeUninit::new(fill); n * t * c];
                    forward(&dm, &qkv, &mut p, &mut o);
                    // SAFETY: initialised above (and written by `forward`).
                    let bits = |v: &[MaybeUninit<f32>]| -> Vec<u32> {
                        v.iter()
                            .map(|x| unsafe { x.assume_init() }.to_bits())
                            .collect()
                    };
                    (bits(&p), bits(&o))
                };
                let (zeroed, nan) = (run(0.0), run(f32::NAN));
                assert_eq!(zeroed, nan, "t {t}, c {c}, h {h}, causal {causal}");
                assert!(zeroed.1.iter().all(|&b| f32::from_bits(b).is_finite()));
            }
        }
    }

    /// The tiled register transpose writes what the scalar loop writes, bit for bit, for
    /// sequence lengths and head sizes around the tile size and row strides wider than d;
    /// the lanes after t keep what they held.
    #[test]
    fn tiled_transpose_equals_the_scalar_loop() {
        if !available() {
            return;
        }
        for t in [1usize, 5, 16, 17, 31, 48, 128] {
            for d in [1usize, 4, 7, 16, 20, 32, 33] {
                let tp = t.div_ceil(L) * L;
                for (stride, alpha) in [(d, 1.0f32), (3 * d + 5, 0.176_776_7)] {
                    let src: Vec<f32> = (0..(t - 1) * stride + d)
                        .map(|v| (v as f32 * 0.37).sin() * 3.0)
                        .collect();
                    let mut want = vec![-7.0f32; d * tp];
                    let mut got = want.clone();
                    transpose_in(&src, stride, t, d, alpha, &mut want);
                    // SAFETY: the CPU supports AVX-512F (checked above).
                    unsafe { x86::transpose_in16(&src, stride, t, d, alpha, &mut got) };
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "t {t}, d {d}, stride {stride}");
                }
            }
        }
    }
}
