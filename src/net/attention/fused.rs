//! Attention's per-(sequence, head) work in f32 as one fused kernel: scores, causal mask,
//! softmax and `P V` forward; `dP`, `dS`, `dQ`, `dK`, `dV` backward. Positions `i` (the query
//! side) sit in the 16 lanes of a vector, so that the scores of a block of 16 queries against
//! key j are one vector (`Σ_k K[j][k]·Qᵀ[k][i..i+16]`), the softmax's maximum and sum over j are
//! lane-wise (no horizontal reductions, no ragged causal rows) and `P V` is `d` vector
//! accumulators. The per-head products are far too small (32×32×4 for the fixture's GPT) for a
//! general GEMM to pay for its packing and dispatch per call.
//!
//! The probabilities are kept transposed and packed for backward: query block b (queries
//! `16b..16b+16`) stores `Pᵀ[j][16b..16b+16]` for the keys j it sees (`j < min(t, 16b + 16)`
//! when causal, all t otherwise), 16 values per key, blocks one after another
//! ([`Dims::packed_len`] values per head). Lanes past the last position hold the softmax of
//! zero scores; they meet zeros (padded `Qᵀ` and `dOᵀ`) everywhere they could contribute.
//!
//! The loops are plain Rust on `[f32; 16]`, compiled for AVX-512 and AVX2 (chosen at run time)
//! and for the baseline; the arithmetic is the same in every build (no fused multiply-adds).

use crate::net::fastmath;

const L: usize = 16;
type V = [f32; L];

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

/// Forward: `qkv` is `[n·t, 3c]` (q | k | v per position), `probs` `[n·h, packed_len]`,
/// `heads` `[n·t, c]`; both outputs are written in full.
pub(super) fn forward(dm: &Dims, qkv: &[f32], probs: &mut [f32], heads: &mut [f32]) {
    assert!(qkv.len() == dm.n * dm.t * 3 * dm.c && heads.len() == dm.n * dm.t * dm.c);
    assert!(probs.len() == dm.n * dm.h * dm.packed_len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { forward_avx512(dm, qkv, probs, heads) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { forward_avx2(dm, qkv, probs, heads) };
    }
    forward_body(dm, qkv, probs, heads)
}

/// Backward: from `qkv` and `probs` as forward left them and `gheads` (`[n·t, c]`, the
/// gradient of the concatenated heads), write every entry of `gqkv` (`[n·t, 3c]`).
pub(super) fn backward(
    dm: &Dims,
    qkv: &[f32],
    probs: &[f32],
    gheads: &[f32],
    gqkv: &mut [f32],
) {
    assert!(qkv.len() == dm.n * dm.t * 3 * dm.c && gqkv.len() == qkv.len());
    assert!(gheads.len() == dm.n * dm.t * dm.c);
    assert!(probs.len() == dm.n * dm.h * dm.packed_len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { backward_avx512(dm, qkv, probs, gheads, gqkv) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { backward_avx2(dm, qkv, probs, gheads, gqkv) };
    }
    backward_body(dm, qkv, probs, gheads, gqkv)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn forward_avx512(dm: &Dims, qkv: &[f32], probs: &mut [f32], heads: &mut [f32]) {
    forward_body(dm, qkv, probs, heads)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn forward_avx2(dm: &Dims, qkv: &[f32], probs: &mut [f32], heads: &mut [f32]) {
    forward_body(dm, qkv, probs, heads)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn backward_avx512(
    dm: &Dims,
    qkv: &[f32],
    probs: &[f32],
    gheads: &[f32],
    gqkv: &mut [f32],
) {
    backward_body(dm, qkv, probs, gheads, gqkv)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn backward_avx2(dm: &Dims, qkv: &[f32], probs: &[f32], gheads: &[f32], gqkv: &mut [f32]) {
    backward_body(dm, qkv, probs, gheads, gqkv)
}

#[inline(always)]
fn lanes(s: &[f32], at: usize) -> &V {
    s[at..at + L].try_into().expect("16 values")
}

#[inline(always)]
fn lanes_mut(s: &mut [f32], at: usize) -> &mut V {
    (&mut s[at..at + L]).try_into().expect("16 values")
}

/// `dst[k·tp + i] = α·src[i·stride + k]` for i < t, k < d (a transpose; lanes t..tp stay as
/// they are, zero in a fresh buffer).
#[inline(always)]
fn transpose_in(src: &[f32], stride: usize, t: usize, d: usize, alpha: f32, dst: &mut [f32]) {
    let tp = dst.len() / d;
    for i in 0..t {
        let row = &src[i * stride..i * stride + d];
        for (k, &v) in row.iter().enumerate() {
            dst[k * tp + i] = alpha * v;
        }
    }
}

#[inline(always)]
fn forward_body(dm: &Dims, qkv: &[f32], probs: &mut [f32], heads: &mut [f32]) {
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
            transpose_in(&rows[qc..], rs, t, d, dm.scale, &mut qt);
            for (b, &off) in offs.iter().enumerate() {
                let jm = dm.keys(b);
                let blk = &mut pt[off..off + jm * L];
                softmax_block(dm, &rows[kc..], &qt, b * L, blk);
                let mut k0 = 0;
                while k0 < d {
                    let at = Cols {
                        src: &rows[vc + k0..],
                        src_stride: rs,
                        out_col: qc + k0,
                        out_stride: c,
                        i0: b * L,
                        t,
                    };
                    let u = width(d - k0);
                    match u {
                        8 => product::<8>(blk, &at, 1.0, out),
                        4 => product::<4>(blk, &at, 1.0, out),
                        2 => product::<2>(blk, &at, 1.0, out),
                        _ => product::<1>(blk, &at, 1.0, out),
                    }
                    k0 += u;
                }
            }
        }
    }
}

/// The widest of 8, 4, 2, 1 that fits in `rest` columns (no closures here: a closure would
/// not be compiled with the calling kernel's target features).
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

/// The probabilities of query block `i0..i0+16` against its keys, transposed: `blk[j·16 + l]`
/// = P[i0 + l][j]. `k` is the first key's row (stride 3c), `qt` the scaled `Qᵀ` (`[d][tp]`).
#[inline(always)]
fn softmax_block(dm: &Dims, k: &[f32], qt: &[f32], i0: usize, blk: &mut [f32]) {
    let (d, rs) = (dm.d, 3 * dm.c);
    let tp = qt.len() / d;
    let jm = blk.len() / L;
    let mut m = [f32::NEG_INFINITY; L];
    for j in 0..jm {
        let kr = &k[j * rs..j * rs + d];
        let mut s = [0.0f32; L];
        for (kk, &kv) in kr.iter().enumerate() {
            let q = lanes(qt, kk * tp + i0);
            for l in 0..L {
                s[l] += kv * q[l];
            }
        }
        if dm.causal && j > i0 {
            for (l, v) in s.iter_mut().enumerate() {
                if i0 + l < j {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        for l in 0..L {
            m[l] = if s[l] > m[l] { s[l] } else { m[l] };
        }
        *lanes_mut(blk, j * L) = s;
    }
    let mut sum = [0.0f32; L];
    for j in 0..jm {
        let e = lanes_mut(blk, j * L);
        for l in 0..L {
            let v = if e[l] == f32::NEG_INFINITY {
                0.0
            } else {
                fastmath::exp(e[l] - m[l])
            };
            e[l] = v;
            sum[l] += v;
        }
    }
    let mut inv = [0.0f32; L];
    for l in 0..L {
        inv[l] = 1.0 / sum[l];
    }
    for j in 0..jm {
        let e = lanes_mut(blk, j * L);
        for l in 0..L {
            e[l] *= inv[l];
        }
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

/// `out[i0 + l][out_col + u] = α·Σ_j blk[j·16 + l]·src[j][u]` for the block's queries (l with
/// i0 + l < t) and u < U.
#[inline(always)]
fn product<const U: usize>(blk: &[f32], at: &Cols, alpha: f32, out: &mut [f32]) {
    let mut acc = [[0.0f32; L]; U];
    for j in 0..blk.len() / L {
        let p = lanes(blk, j * L);
        let v = &at.src[j * at.src_stride..j * at.src_stride + U];
        for u in 0..U {
            for l in 0..L {
                acc[u][l] += v[u] * p[l];
            }
        }
    }
    for l in 0..L.min(at.t - at.i0) {
        let row = &mut out[(at.i0 + l) * at.out_stride + at.out_col..][..U];
        for u in 0..U {
            row[u] = alpha * acc[u][l];
        }
    }
}

/// Σ of the 16 lanes, pairwise.
#[inline(always)]
fn hsum(a: &V) -> f32 {
    let mut s = [0.0f32; 8];
    for l in 0..8 {
        s[l] = a[l] + a[l + 8];
    }
    let s4 = [s[0] + s[4], s[1] + s[5], s[2] + s[6], s[3] + s[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

#[inline(always)]
fn backward_body(dm: &Dims, qkv: &[f32], probs: &[f32], gheads: &[f32], gqkv: &mut [f32]) {
    let Dims { t, c, h, d, .. } = *dm;
    let tp = dm.blocks() * L;
    let pl = dm.packed_len();
    let offs = dm.offsets();
    let rs = 3 * c;
    let (mut got, mut qt) = (vec![0.0f32; d * tp], vec![0.0f32; d * tp]);
    let mut ds = vec![0.0f32; pl];
    for (((rows, g), pseq), grows) in qkv
        .chunks_exact(t * rs)
        .zip(gheads.chunks_exact(t * c))
        .zip(probs.chunks_exact(h * pl))
        .zip(gqkv.chunks_exact_mut(t * rs))
    {
        for (hd, pt) in pseq.chunks_exact(pl).enumerate() {
            let (qc, kc, vc) = (hd * d, c + hd * d, 2 * c + hd * d);
            transpose_in(&g[qc..], c, t, d, 1.0, &mut got);
            transpose_in(&rows[qc..], rs, t, d, dm.scale, &mut qt);
            // Per query block: dPᵀ = V dOᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ − Σ_j Pᵀ ⊙ dPᵀ), dQ = dS K/√d.
            for (b, &off) in offs.iter().enumerate() {
                let i0 = b * L;
                let jm = dm.keys(b);
                let (p, s) = (&pt[off..off + jm * L], &mut ds[off..off + jm * L]);
                let mut dot = [0.0f32; L];
                for j in 0..jm {
                    let vr = &rows[j * rs + vc..j * rs + vc + d];
                    let mut dp = [0.0f32; L];
                    for (kk, &vv) in vr.iter().enumerate() {
                        let go = lanes(&got, kk * tp + i0);
                        for l in 0..L {
                            dp[l] += vv * go[l];
                        }
                    }
                    let pj = lanes(p, j * L);
                    for l in 0..L {
                        dot[l] += pj[l] * dp[l];
                    }
                    *lanes_mut(s, j * L) = dp;
                }
                for j in 0..jm {
                    let pj = *lanes(p, j * L);
                    let sj = lanes_mut(s, j * L);
                    for l in 0..L {
                        sj[l] = pj[l] * (sj[l] - dot[l]);
                    }
                }
                let mut k0 = 0;
                while k0 < d {
                    let at = Cols {
                        src: &rows[kc + k0..],
                        src_stride: rs,
                        out_col: qc + k0,
                        out_stride: rs,
                        i0,
                        t,
                    };
                    let u = width(d - k0);
                    match u {
                        8 => product::<8>(s, &at, dm.scale, grows),
                        4 => product::<4>(s, &at, dm.scale, grows),
                        2 => product::<2>(s, &at, dm.scale, grows),
                        _ => product::<1>(s, &at, dm.scale, grows),
                    }
                    k0 += u;
                }
            }
            // Per key j: dV[j] = Σ_i P[i][j]·dO[i], dK[j] = Σ_i dS[i][j]·Q[i]/√d.
            for j in 0..t {
                let first = if dm.causal { j / L } else { 0 };
                let mut k0 = 0;
                while k0 < d {
                    let kv = KeyCols {
                        offs: &offs[first..],
                        first,
                        j,
                        k0,
                        tp,
                    };
                    let out = &mut grows[j * rs..(j + 1) * rs];
                    let u = width(d - k0);
                    match u {
                        8 => key_grads::<8>(&kv, pt, &ds, &got, &qt, out, kc, vc),
                        4 => key_grads::<4>(&kv, pt, &ds, &got, &qt, out, kc, vc),
                        2 => key_grads::<2>(&kv, pt, &ds, &got, &qt, out, kc, vc),
                        _ => key_grads::<1>(&kv, pt, &ds, &got, &qt, out, kc, vc),
                    }
                    k0 += u;
                }
            }
        }
    }
}

/// Which entries of the packed `Pᵀ`/`dSᵀ` hold key j, and which columns of the result.
struct KeyCols<'a> {
    /// Offsets of the blocks that see key j.
    offs: &'a [usize],
    /// Index of the first of them.
    first: usize,
    j: usize,
    k0: usize,
    tp: usize,
}

/// `out[vc + k0 + u] = Σ_i Pᵀ[j][i]·dOᵀ[k0 + u][i]` and `out[kc + k0 + u] = Σ_i dSᵀ[j][i]·
/// (Qᵀ/√d)[k0 + u][i]` over the blocks that see key j.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn key_grads<const U: usize>(
    kv: &KeyCols,
    pt: &[f32],
    ds: &[f32],
    got: &[f32],
    qt: &[f32],
    out: &mut [f32],
    kc: usize,
    vc: usize,
) {
    let (mut av, mut ak) = ([[0.0f32; L]; U], [[0.0f32; L]; U]);
    for (bi, &off) in kv.offs.iter().enumerate() {
        let i0 = (kv.first + bi) * L;
        let p = lanes(pt, off + kv.j * L);
        let s = lanes(ds, off + kv.j * L);
        for u in 0..U {
            let go = lanes(got, (kv.k0 + u) * kv.tp + i0);
            let q = lanes(qt, (kv.k0 + u) * kv.tp + i0);
            for l in 0..L {
                av[u][l] += p[l] * go[l];
                ak[u][l] += s[l] * q[l];
            }
        }
    }
    for u in 0..U {
        out[vc + kv.k0 + u] = hsum(&av[u]);
        out[kc + kv.k0 + u] = hsum(&ak[u]);
    }
}
