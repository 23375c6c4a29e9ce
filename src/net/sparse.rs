//! Products with a sparse left-hand matrix, for [`super::linear::Linear`] when its input is
//! mostly zeros (a data set of images with blank backgrounds, one-hot features): f32, CPUs
//! with AVX-512F (chosen at run time; [`available`]). The input is f32 rows, or the bytes of a
//! byte-held training set ([`super::input::Codes`]) with their table, read without expanding
//! them (non-zero bytes found 64 at a time with AVX-512BW, their values looked up).
//!
//! The rows `x` (`[rows, k]`) are taken in groups of [`ROWS`]; a group's non-zeros are found
//! in one pass along its rows (a bit per value, one word per row and block of [`KB`] columns,
//! with the vector compare instructions), which also brings the group into the cache. Then,
//! block by block (so that the block's rows of the weight stay in the L1 cache):
//! - the forward product `y[i, :] = b + Σ_j x[i, j]·Wᵀ[j, :]` adds, for every non-zero of row
//!   `i`, one row of `Wᵀ` to `y[i, :]`, held in registers while the block is done;
//! - the weight gradient `gWᵀ[j, :] += Σ_i x[i, j]·gy[i, :]` adds `gy[i, :]` (held in
//!   registers) to row `j` of `gWᵀ` for every non-zero of row `i`.
//!
//! Skipping a zero skips adding `0·w`, which changes a sum only where `w` is not finite (the
//! dense product's `0·∞ = NaN`); a NaN or infinite input is not zero and is kept. The sums run
//! over the non-zeros in column order (forward) and the rows in order (weight gradient), fixed
//! by the data alone, so results do not depend on the thread count.
//!
//! At 15 % non-zeros, the two products of a 1375 × 784 → 100 chunk took 0.6–0.8× the dense
//! products' time on the development machine (docs/performance.md).

use super::input::{CODES, CodeTable};

/// Values per vector.
const L: usize = 16;
/// Output columns per tile (vectors of [`L`] held in registers).
const MAX_NV: usize = 8;
/// Rows per group (their inputs and outputs stay in the L2 cache while the group is done).
const ROWS: usize = 64;
/// Input columns per block (their rows of the weight stay in the L1 cache).
const KB: usize = 64;
/// Inputs at or below this share of non-zeros take the sparse kernels.
const MAX_DENSITY: f64 = 0.3;

/// Whether the kernels can run on this CPU (AVX-512F and BW).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The byte whose value is zero in a byte-held set's table, when the kernels on bytes can
/// read it: one table row for every position, and some byte of value ±0 (the smallest such
/// byte; another byte of value zero is then treated as a non-zero, which changes nothing).
pub(crate) fn zero_code(table: &CodeTable) -> Option<u8> {
    if !table.single_row() {
        return None;
    }
    let row = table.row_at(0);
    (0..CODES).find(|&c| row[c] == 0.0).map(|c| c as u8)
}

/// Whether a product with `k` inputs per row, read as bytes through `table`, and `n` outputs
/// takes the kernels on bytes: a CPU that runs them, a zero byte ([`zero_code`]), `k` and
/// `n` large enough for the dense product to be the slower one, and a set whose share of non-zeros, measured over the whole set when
/// it was loaded ([`CodeTable::density`]), is at most [`MAX_DENSITY`]. Depends on the data
/// set only, so every chunk of a run takes the same path, whatever the thread count.
pub(crate) fn codes_pay(table: &CodeTable, k: usize, n: usize) -> bool {
    k >= L && n >= 8 && table.density() <= MAX_DENSITY && zero_code(table).is_some() && available()
}

/// Where the kernels read the sparse left-hand matrix `[rows, k]` from: bytes with the value
/// of each byte (`row`), and the byte whose value is zero.
#[derive(Clone, Copy)]
pub(crate) enum Lhs<'a> {
    Codes {
        codes: &'a [u8],
        row: &'a [f32; CODES],
        zero: u8,
    },
}

impl Lhs<'_> {
    fn len(&self) -> usize {
        match self {
            Lhs::Codes { codes, .. } => codes.len(),
        }
    }

    /// The kernels on bytes need AVX-512F and BW.
    fn runs_here(&self) -> bool {
        available()
    }

    /// The kernels' view of the rows, `k` values each.
    #[cfg(target_arch = "x86_64")]
    fn code_rows(&self, k: usize) -> x86::CodeRows<'_> {
        match *self {
            Lhs::Codes { codes, row, zero } => x86::CodeRows {
                codes,
                row,
                zero,
                k,
            },
        }
    }
}

/// `y = x·Wᵀ (+ b)`: `x` `[rows, k]` (mostly zeros), `w` `[n, k]` (PyTorch's Linear layout),
/// `bias` `[n]` or none, `y` `[rows, n]`, every value written. Requires [`available`].
pub(crate) fn forward(
    x: Lhs,
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [std::mem::MaybeUninit<f32>],
) {
    assert!(x.runs_here(), "sparse::forward needs AVX-512");
    assert_eq!(x.len(), rows * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(y.len(), rows * n);
    assert!(bias.is_none_or(|b| b.len() == n));
    let wt = transpose_padded(w, n, k);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU runs the kernel for `x` (asserted); the shapes are checked above.
    unsafe {
        x86::forward(&x.code_rows(k), rows, k, &wt, n, bias, y)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, bias, &wt, &y);
}

/// `gw += gyᵀ·x`: `x` `[rows, k]` (mostly zeros), `gy` `[rows, n]`, `gw` `[n, k]` (the
/// weight's gradient, PyTorch's Linear layout). Requires [`available`].
pub(crate) fn weight_grad(x: Lhs, rows: usize, k: usize, gy: &[f32], n: usize, gw: &mut [f32]) {
    assert!(x.runs_here(), "sparse::weight_grad needs AVX-512");
    assert_eq!(x.len(), rows * k);
    assert_eq!(gy.len(), rows * n);
    assert_eq!(gw.len(), n * k);
    let np = padded(n);
    let mut gwt = Aligned::zeros(k * np);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU runs the kernel for `x` (asserted); the shapes are checked above.
    unsafe {
        x86::weight_grad(&x.code_rows(k), rows, k, gy, n, &mut gwt)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, gy, &gwt);
    for (o, g) in gw.chunks_exact_mut(k).enumerate() {
        for (j, g) in g.iter_mut().enumerate() {
            *g += gwt[j * np + o];
        }
    }
}

/// A zeroed f32 buffer aligned to 64 bytes, so that the whole-vector loads and stores of its
/// padded rows never cross a cache line (a split load costs two).
struct Aligned {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; L]);

impl Aligned {
    fn zeros(len: usize) -> Aligned {
        Aligned {
            lines: vec![Line([0.0; L]); len.div_ceil(L)],
            len,
        }
    }
}

impl std::ops::Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: the lines are contiguous arrays of f32 (`repr(C)`, a multiple of 64 bytes:
        // no padding between them), at least `len` values.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as for `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// `n` rounded up to whole vectors: the row length of the transposed weight and of the
/// weight gradient's buffer, so that their rows are read and written whole (a store the next
/// load can forward from).
fn padded(n: usize) -> usize {
    n.div_ceil(L) * L
}

/// `a` (`[r, c]`) transposed (`[c, padded(r)]`, the padding zero).
fn transpose_padded(a: &[f32], r: usize, c: usize) -> Aligned {
    let rp = padded(r);
    let mut t = Aligned::zeros(rp * c);
    for (i, row) in a.chunks_exact(c).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * rp + i] = v;
        }
    }
    t
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CODES, KB, L, MAX_NV, ROWS, padded};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// The sparse matrix the kernels read: its non-zeros, 64 columns at a time, and values.
    pub(super) trait Rows {
        /// Bit `j` set where value `c0 + j` of row `i` (`j < len ≤ 64`) is not zero.
        ///
        /// # Safety
        /// The CPU has what the implementation needs (AVX-512F, and BW for bytes).
        unsafe fn nonzeros(&self, i: usize, c0: usize, len: usize) -> u64;
        /// Value `j` of row `i`.
        fn value(&self, i: usize, j: usize) -> f32;
        /// Ask for row `i` to be brought into the L2 cache (nothing if there is none).
        fn prefetch(&self, i: usize);
    }

    /// Byte rows and their values: zero is the byte `zero`.
    pub(super) struct CodeRows<'a> {
        pub codes: &'a [u8],
        pub row: &'a [f32; CODES],
        pub zero: u8,
        pub k: usize,
    }

    impl Rows for CodeRows<'_> {
        #[inline]
        unsafe fn nonzeros(&self, i: usize, c0: usize, len: usize) -> u64 {
            // SAFETY: the caller has AVX-512F and BW.
            unsafe { nonzeros_u8(&self.codes[i * self.k + c0..][..len], self.zero) }
        }
        #[inline]
        fn value(&self, i: usize, j: usize) -> f32 {
            self.row[self.codes[i * self.k + j] as usize]
        }
        #[inline]
        fn prefetch(&self, i: usize) {
            if let Some(next) = self.codes.get(i * self.k..(i + 1) * self.k) {
                for line in next.chunks(64) {
                    // SAFETY: a hint about memory inside `codes`: it reads nothing.
                    unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
                }
            }
        }
    }

    /// Bit `j` set where `row[j]` (`row.len() ≤ 64`) is not the byte `zero`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn nonzeros_u8(row: &[u8], zero: u8) -> u64 {
        let m: __mmask64 = if row.len() >= 64 {
            u64::MAX
        } else {
            (1u64 << row.len()) - 1
        };
        // SAFETY: the mask keeps the load within `row`.
        let v = unsafe { _mm512_maskz_loadu_epi8(m, row.as_ptr().cast()) };
        _mm512_mask_cmpneq_epi8_mask(m, v, _mm512_set1_epi8(zero as i8))
    }

    /// The non-zeros of rows `r0..r1`, one word per row and block of [`KB`] columns
    /// (`bits[(i − r0)·blocks + b]`): read in one pass along the rows, which also brings them
    /// into the cache for the blocks that follow. The next group's rows are asked for on the
    /// way (prefetched into L2), so that they arrive while this group is done.
    ///
    /// # Safety
    /// As [`Rows::nonzeros`].
    #[inline]
    unsafe fn group_bits<X: Rows>(x: &X, k: usize, r0: usize, r1: usize, bits: &mut Vec<u64>) {
        bits.clear();
        for i in r0..r1 {
            for c0 in (0..k).step_by(KB) {
                // SAFETY: as this function's.
                bits.push(unsafe { x.nonzeros(i, c0, KB.min(k - c0)) });
            }
            x.prefetch(i + ROWS);
        }
    }

    /// Calls `tile::<X, NV>(c0, width)` for the column tiles of `0..n` (at most
    /// [`MAX_NV`] vectors each).
    macro_rules! tiles {
        ($n:expr, $x:ty, |$c0:ident, $width:ident| $call:ident($($arg:expr),*)) => {{
            let mut $c0 = 0;
            while $c0 < $n {
                let $width = ($n - $c0).min(MAX_NV * L);
                match $width.div_ceil(L) {
                    1 => $call::<$x, 1>($($arg),*),
                    2 => $call::<$x, 2>($($arg),*),
                    3 => $call::<$x, 3>($($arg),*),
                    4 => $call::<$x, 4>($($arg),*),
                    5 => $call::<$x, 5>($($arg),*),
                    6 => $call::<$x, 6>($($arg),*),
                    7 => $call::<$x, 7>($($arg),*),
                    _ => $call::<$x, 8>($($arg),*),
                }
                $c0 += $width;
            }
        }};
    }

    /// Where one call's tile lies: rows `r0..r1`, block `b` of input columns
    /// (`b·KB..b·KB + KB`) of `blocks`, output columns from `c0` (the call's NV vectors), in
    /// rows of `np` values (`padded(n)`: the transposed weight, gradient and padded rows).
    #[derive(Clone, Copy)]
    struct Tile {
        np: usize,
        r0: usize,
        r1: usize,
        b: usize,
        blocks: usize,
        c0: usize,
    }

    /// # Safety
    /// AVX-512F (and BW for bytes); `x` `[rows, k]`, `wt` `[k, padded(n)]`, `bias` `[n]`,
    /// `y` `[rows, n]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward<X: Rows>(
        x: &X,
        rows: usize,
        k: usize,
        wt: &[f32],
        n: usize,
        bias: Option<&[f32]>,
        y: &mut [MaybeUninit<f32>],
    ) {
        let (np, blocks) = (padded(n), k.div_ceil(KB));
        let mut bits = Vec::with_capacity(ROWS * blocks);
        // The group's outputs, rows padded to whole vectors: read and written whole, never
        // with a masked store that reaches into the next row (which the next row's load would
        // wait for).
        let mut acc = super::Aligned::zeros(ROWS * np);
        for r0 in (0..rows).step_by(ROWS) {
            let r1 = (r0 + ROWS).min(rows);
            for row in acc.chunks_exact_mut(np) {
                match bias {
                    Some(b) => row[..n].copy_from_slice(b),
                    None => row[..n].fill(0.0),
                }
                row[n..].fill(0.0);
            }
            // SAFETY: as this function's.
            unsafe { group_bits(x, k, r0, r1, &mut bits) };
            for b in 0..blocks {
                tiles!(n, X, |c0, width| fwd_tile(
                    x,
                    &bits,
                    wt,
                    &mut acc,
                    Tile {
                        np,
                        r0,
                        r1,
                        b,
                        blocks,
                        c0
                    }
                ));
            }
            for (i, row) in (r0..r1).zip(acc.chunks_exact(np)) {
                for (y, &v) in y[i * n..(i + 1) * n].iter_mut().zip(row) {
                    y.write(v);
                }
            }
        }
    }

    /// Adds the non-zeros of block `b` of rows `r0..r1` to columns `c0..c0 + width` of the
    /// group's padded outputs `acc` (row `i − r0`; whole vectors, the padding gets `x·0`):
    /// two sets of accumulators take the non-zeros in turn (so that one product's latency
    /// does not hold up the next), added at the end.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fwd_tile<X: Rows, const NV: usize>(
        x: &X,
        bits: &[u64],
        wt: &[f32],
        acc: &mut [f32],
        t: Tile,
    ) {
        let k0 = t.b * KB;
        // Row j of the block's rows of `wt`, from column c0: NV whole vectors (padded).
        let w_at = |j: usize| &wt[(k0 + j) * t.np + t.c0..][..NV * L];
        // SAFETY (the loads of `w`): `w` holds NV vectors.
        let load = |w: &[f32], u: usize| unsafe { _mm512_loadu_ps(w.as_ptr().add(u * L)) };
        for i in t.r0..t.r1 {
            let mut nz = bits[(i - t.r0) * t.blocks + t.b];
            if nz == 0 {
                continue;
            }
            let out = &mut acc[(i - t.r0) * t.np + t.c0..][..NV * L];
            let mut a: [__m512; NV] = std::array::from_fn(|u| load(out, u));
            let mut c = [_mm512_setzero_ps(); NV];
            while nz != 0 {
                let j1 = nz.trailing_zeros() as usize;
                nz &= nz - 1;
                let (v1, w1) = (_mm512_set1_ps(x.value(i, k0 + j1)), w_at(j1));
                if nz == 0 {
                    for (u, a) in a.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(v1, load(w1, u), *a);
                    }
                    break;
                }
                let j2 = nz.trailing_zeros() as usize;
                nz &= nz - 1;
                let (v2, w2) = (_mm512_set1_ps(x.value(i, k0 + j2)), w_at(j2));
                for u in 0..NV {
                    a[u] = _mm512_fmadd_ps(v1, load(w1, u), a[u]);
                    c[u] = _mm512_fmadd_ps(v2, load(w2, u), c[u]);
                }
            }
            for u in 0..NV {
                let s = _mm512_add_ps(a[u], c[u]);
                // SAFETY: `out` holds NV vectors.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(u * L), s) };
            }
        }
    }

    /// Rows per group of the weight gradient (one bit each in a column's word).
    const GROWS: usize = 64;

    /// # Safety
    /// AVX-512F (and BW for bytes); `x` `[rows, k]`, `gy` `[rows, n]`, `gwt` `[k, padded(n)]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_grad<X: Rows>(
        x: &X,
        rows: usize,
        k: usize,
        gy: &[f32],
        n: usize,
        gwt: &mut [f32],
    ) {
        let (np, blocks) = (padded(n), k.div_ceil(KB));
        let mut bits = Vec::with_capacity(GROWS * blocks);
        // The group's non-zeros by column: bit i − r0 of `cols[j]` for row i, column b·KB + j.
        let mut cols = [0u64; KB];
        // The group's output-gradient rows, padded to whole vectors (zeros) and aligned.
        let mut gp = super::Aligned::zeros(GROWS * np);
        for r0 in (0..rows).step_by(GROWS) {
            let r1 = (r0 + GROWS).min(rows);
            for (i, row) in (r0..r1).zip(gp.chunks_exact_mut(np)) {
                row[..n].copy_from_slice(&gy[i * n..(i + 1) * n]);
            }
            bits.clear();
            for i in r0..r1 {
                for c0 in (0..k).step_by(KB) {
                    // SAFETY: as this function's.
                    bits.push(unsafe { x.nonzeros(i, c0, KB.min(k - c0)) });
                }
                x.prefetch(i + GROWS);
            }
            for b in 0..blocks {
                cols.fill(0);
                for i in r0..r1 {
                    let mut nz = bits[(i - r0) * blocks + b];
                    while nz != 0 {
                        let j = nz.trailing_zeros() as usize;
                        nz &= nz - 1;
                        cols[j] |= 1 << (i - r0);
                    }
                }
                tiles!(n, X, |c0, width| grad_tile(
                    x,
                    &cols,
                    &gp,
                    gwt,
                    Tile {
                        np,
                        r0,
                        r1,
                        b,
                        blocks,
                        c0
                    }
                ));
            }
        }
    }

    /// For each column `j` of block `b` with non-zeros in rows `r0..r1`: the sum over those
    /// rows, in order, of `x[i, j]·gy[i, c0..c0 + width]` (`gp`: the group's rows of `gy`,
    /// padded with zeros to `np`), in registers (two sets of accumulators taking the rows in
    /// turn, added at the end), then added to row `j` of `gwt` once. The rows of `gwt` are
    /// read and written as whole vectors (the padding lanes get `x·0`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn grad_tile<X: Rows, const NV: usize>(
        x: &X,
        cols: &[u64; KB],
        gp: &[f32],
        gwt: &mut [f32],
        t: Tile,
    ) {
        let k0 = t.b * KB;
        // Row i's vectors from column c0 (NV whole vectors: padded).
        let g_at = |i: usize| &gp[(i - t.r0) * t.np + t.c0..][..NV * L];
        // SAFETY (the loads): `g` holds NV vectors.
        let load = |g: &[f32], u: usize| unsafe { _mm512_loadu_ps(g.as_ptr().add(u * L)) };
        for (j, &col) in cols.iter().enumerate() {
            let mut nz = col;
            if nz == 0 {
                continue;
            }
            let mut a = [_mm512_setzero_ps(); NV];
            let mut c = [_mm512_setzero_ps(); NV];
            while nz != 0 {
                let i1 = t.r0 + nz.trailing_zeros() as usize;
                nz &= nz - 1;
                let (v1, g1) = (_mm512_set1_ps(x.value(i1, k0 + j)), g_at(i1));
                if nz == 0 {
                    for (u, a) in a.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(v1, load(g1, u), *a);
                    }
                    break;
                }
                let i2 = t.r0 + nz.trailing_zeros() as usize;
                nz &= nz - 1;
                let (v2, g2) = (_mm512_set1_ps(x.value(i2, k0 + j)), g_at(i2));
                for u in 0..NV {
                    a[u] = _mm512_fmadd_ps(v1, load(g1, u), a[u]);
                    c[u] = _mm512_fmadd_ps(v2, load(g2, u), c[u]);
                }
            }
            let row = &mut gwt[(k0 + j) * t.np + t.c0..][..NV * L];
            for u in 0..NV {
                // SAFETY: `row` holds NV vectors.
                unsafe {
                    let p = row.as_mut_ptr().add(u * L);
                    let s = _mm512_add_ps(a[u], c[u]);
                    _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), s));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gradcheck::Rng;

    /// A table whose byte `zero` is 0 and whose other bytes have values in (−2, 2) (one of
    /// them −0.0, also a zero value, but not the zero byte: taken as a non-zero).
    fn table(rng: &mut Rng, zero: u8) -> [f32; CODES] {
        std::array::from_fn(|c| match c {
            _ if c == zero as usize => 0.0,
            3 => -0.0,
            _ => 2.0 * rng.next() as f32,
        })
    }

    /// Bytes with about `density` of them other than `zero`.
    fn byte_rows(rng: &mut Rng, len: usize, zero: u8, density: f64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                let r = (rng.next() + 1.0) / 2.0;
                if r < density {
                    ((rng.next() + 1.0) * 127.9) as u8
                } else {
                    zero
                }
            })
            .collect()
    }

    fn dense(rng: &mut Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.next() as f32).collect()
    }

    /// The kernels on bytes against sums in f64 over every value (zeros included), for
    /// widths that leave partial vectors and several tiles, inputs whose width is not a
    /// multiple of 64, empty rows, and a zero byte other than 0.
    #[test]
    fn products_match_dense_sums_in_f64() {
        if !available() {
            eprintln!("skipped: no AVX-512F/BW");
            return;
        }
        let mut rng = Rng::new(7);
        for &(rows, k, n, zero) in &[
            (1, 16, 8, 0u8),
            (5, 17, 1, 9),
            (9, 40, 16, 0),
            (13, 784, 100, 0),
            (40, 784, 100, 128),
            (7, 33, 129, 255),
            (4, 300, 300, 0),
        ] {
            let row = table(&mut rng, zero);
            for &density in &[0.0, 0.1, 0.5, 1.0] {
                let codes = byte_rows(&mut rng, rows * k, zero, density);
                let x: Vec<f32> = codes.iter().map(|&c| row[c as usize]).collect();
                let lhs = Lhs::Codes {
                    codes: &codes,
                    row: &row,
                    zero,
                };
                let w = dense(&mut rng, n * k);
                let b = dense(&mut rng, n);
                let gy = dense(&mut rng, rows * n);
                for bias in [None, Some(&b[..])] {
                    let mut y = vec![std::mem::MaybeUninit::new(f32::NAN); rows * n];
                    forward(lhs, rows, k, &w, n, bias, &mut y);
                    for i in 0..rows {
                        for o in 0..n {
                            let terms = (0..k).map(|j| x[i * k + j] as f64 * w[o * k + j] as f64);
                            let want =
                                bias.map_or(0.0, |b| b[o] as f64) + terms.clone().sum::<f64>();
                            // f32 rounding of a sum grows with the sum of its terms' sizes.
                            let scale = 1.0 + terms.map(f64::abs).sum::<f64>();
                            // SAFETY: `forward` wrote every value.
                            let got = unsafe { y[i * n + o].assume_init() } as f64;
                            assert!(
                                (got - want).abs() <= 1e-6 * scale,
                                "y[{i},{o}] {got} vs {want} (rows {rows}, k {k}, n {n})"
                            );
                        }
                    }
                }
                let start = dense(&mut rng, n * k);
                let mut gw = start.clone();
                weight_grad(lhs, rows, k, &gy, n, &mut gw);
                for o in 0..n {
                    for j in 0..k {
                        let terms = (0..rows).map(|i| gy[i * n + o] as f64 * x[i * k + j] as f64);
                        let want = start[o * k + j] as f64 + terms.clone().sum::<f64>();
                        let scale =
                            1.0 + start[o * k + j].abs() as f64 + terms.map(f64::abs).sum::<f64>();
                        let got = gw[o * k + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * scale,
                            "gw[{o},{j}] {got} vs {want} (rows {rows}, k {k}, n {n})"
                        );
                    }
                }
            }
        }
    }

    /// Non-finite values: a byte whose value is NaN or infinite is not the zero byte and
    /// reaches every output and gradient it feeds; an infinite weight meets only the
    /// non-zeros (the dense product's `0·∞ = NaN` does not happen for a skipped zero).
    #[test]
    fn non_finite_values_and_weights() {
        if !available() {
            return;
        }
        let (rows, k, n) = (2, 20, 3);
        let mut row = [1.0f32; CODES];
        row[0] = 0.0;
        row[1] = f32::NAN;
        row[2] = f32::INFINITY;
        let mut codes = vec![0u8; rows * k];
        codes[3] = 1;
        codes[k + 19] = 2;
        let lhs = Lhs::Codes {
            codes: &codes,
            row: &row,
            zero: 0,
        };
        let w = vec![0.5f32; n * k];
        let mut y = vec![std::mem::MaybeUninit::new(0.0f32); rows * n];
        forward(lhs, rows, k, &w, n, None, &mut y);
        // SAFETY: written by `forward`.
        let y: Vec<f32> = y.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert!(y[..n].iter().all(|v| v.is_nan()));
        assert!(y[n..].iter().all(|&v| v == f32::INFINITY));
        let mut gw = vec![0.0f32; n * k];
        weight_grad(lhs, rows, k, &vec![1.0; rows * n], n, &mut gw);
        assert!(gw[3].is_nan() && gw[19] == f32::INFINITY && gw[0] == 0.0);

        // An infinite weight where every input is zero: skipped, the output stays finite.
        let codes = vec![0u8; k];
        let mut w = vec![0.5f32; n * k];
        w[5] = f32::INFINITY;
        let lhs = Lhs::Codes {
            codes: &codes,
            row: &row,
            zero: 0,
        };
        let mut y = vec![std::mem::MaybeUninit::new(f32::NAN); n];
        forward(lhs, 1, k, &w, n, None, &mut y);
        // SAFETY: written by `forward`.
        assert!(y.iter().all(|v| unsafe { v.assume_init() } == 0.0));
    }

    /// The set's measured share of non-zeros decides, with the shape and the table.
    #[test]
    fn density_and_table_decide() {
        let rows: Vec<[f32; CODES]> = vec![std::array::from_fn(|c| c as f32 / 255.0)];
        let mut t = CodeTable::new(rows, 784);
        assert_eq!(zero_code(&t), Some(0));
        t.set_density(0.19);
        assert_eq!(codes_pay(&t, 784, 100), available());
        assert!(!codes_pay(&t, 784, 4), "too few outputs");
        assert!(!codes_pay(&t, 8, 100), "too few inputs");
        t.set_density(0.5);
        assert!(!codes_pay(&t, 784, 100), "too dense");
        // No byte of value zero (a mean subtracted): nothing to skip.
        let shifted: Vec<[f32; CODES]> = vec![std::array::from_fn(|c| c as f32 + 0.5)];
        let mut t = CodeTable::new(shifted, 784);
        t.set_density(0.1);
        assert_eq!(zero_code(&t), None);
        assert!(!codes_pay(&t, 784, 100));
        // One row per channel (per-channel mean): not read as bytes.
        let two: Vec<[f32; CODES]> = vec![
            std::array::from_fn(|c| c as f32),
            std::array::from_fn(|c| c as f32 * 2.0),
        ];
        let mut t = CodeTable::new(two, 392);
        t.set_density(0.1);
        assert!(!codes_pay(&t, 784, 100));
    }
}
