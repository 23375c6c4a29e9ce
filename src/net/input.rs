//! The model input of one chunk ([`Input`]): f32 values, or one byte per value (a `uint8`
//! training set held as it is stored, [`Codes`]) with a table of the exact f32 value of each
//! byte in each channel ([`CodeTable`]).
//!
//! A byte-held set takes a quarter of the memory of the f32 one (43 MB instead of 172 MB for
//! 55,000 MNIST digits) and a quarter of the memory traffic per pass. Layers see f32 values:
//! [`Input::to_real`] expands a chunk's bytes through the table (the same bits as the f32
//! set, since the table holds what preprocessing computes for each byte), except that a
//! layer which reads the bytes directly (the first `Linear`'s sparse products,
//! [`super::sparse`]) may skip the expansion.

use super::Real;
use ndarray::{ArrayD, ArrayViewD, CowArray, IxDyn};
use std::mem::MaybeUninit;

/// Values a byte can take.
pub const CODES: usize = 256;

/// The f32 value of each byte, per channel (the first per-sample axis), and what the set's
/// bytes look like.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeTable {
    /// One row of [`CODES`] values per channel, or a single row when every channel's is the
    /// same (no per-channel mean or std).
    rows: Vec<[f32; CODES]>,
    /// Values per channel within a sample (position `p` of a sample is in channel
    /// `p / inner`); with a single row, the whole sample.
    inner: usize,
    /// Share of the set's values that are not zero (after preprocessing), measured when
    /// the set was loaded ([`CodeTable::set_density`]); 1 until then.
    density: f64,
}

impl CodeTable {
    /// A table from one row per channel (`rows.len()` channels of `inner` values each);
    /// rows that are all the same are kept once.
    pub fn new(rows: Vec<[f32; CODES]>, inner: usize) -> CodeTable {
        let same = rows.iter().all(|r| {
            r.iter()
                .zip(&rows[0])
                .all(|(a, b)| a.to_bits() == b.to_bits())
        });
        if same && rows.len() > 1 {
            let channels = rows.len();
            return CodeTable {
                rows: vec![rows[0]],
                inner: inner * channels,
                density: 1.0,
            };
        }
        CodeTable {
            rows,
            inner: inner.max(1),
            density: 1.0,
        }
    }

    /// Record the share of non-zero values of the set (see [`CodeTable::density`]).
    pub fn set_density(&mut self, density: f64) {
        self.density = density;
    }

    /// Share of the set's values that are not zero (a NaN is not zero), as measured at load.
    pub fn density(&self) -> f64 {
        self.density
    }

    /// The value row of the channel at position `p` of a sample.
    #[inline]
    pub fn row_at(&self, p: usize) -> &[f32; CODES] {
        if self.rows.len() == 1 {
            &self.rows[0]
        } else {
            &self.rows[(p / self.inner) % self.rows.len()]
        }
    }

    /// Whether one row serves every position.
    pub fn single_row(&self) -> bool {
        self.rows.len() == 1
    }

    /// Values per sample this table was built for, when it has one row per channel (`None`
    /// for a single row, which serves any length).
    pub fn sample_len(&self) -> Option<usize> {
        (self.rows.len() > 1).then(|| self.rows.len() * self.inner)
    }

    /// Whether `code` is zero (±0) at position `p`.
    #[inline]
    pub fn is_zero(&self, p: usize, code: u8) -> bool {
        self.row_at(p)[code as usize] == 0.0
    }

    /// Expand whole samples: `codes` holds samples of `per` values, `out` receives their f32
    /// values (the same length).
    pub fn expand(&self, codes: &[u8], per: usize, out: &mut [MaybeUninit<f32>]) {
        assert_eq!(codes.len(), out.len());
        if self.rows.len() == 1 {
            expand_run(&self.rows[0], codes, out);
            return;
        }
        for (cs, os) in codes.chunks(per).zip(out.chunks_mut(per)) {
            let mut p = 0;
            while p < cs.len() {
                let end = ((p / self.inner + 1) * self.inner).min(cs.len());
                expand_run(self.row_at(p), &cs[p..end], &mut os[p..end]);
                p = end;
            }
        }
    }
}

/// `out[i] = row[codes[i]]`: AVX-512 gathers (16 values at a time) where the CPU has them.
fn expand_run(row: &[f32; CODES], codes: &[u8], out: &mut [MaybeUninit<f32>]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is available.
        unsafe { x86::expand(row, codes, out) };
        return;
    }
    for (o, &c) in out.iter_mut().zip(codes) {
        o.write(row[c as usize]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CODES;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// # Safety
    /// AVX-512F; `codes` and `out` of the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn expand(row: &[f32; CODES], codes: &[u8], out: &mut [MaybeUninit<f32>]) {
        let n = codes.len().min(out.len());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: 16 bytes and 16 values from `i` lie within `codes` and `out`; every index
            // is a byte, within the 256 values of `row`.
            unsafe {
                let c = _mm_loadu_si128(codes.as_ptr().add(i).cast());
                let idx = _mm512_cvtepu8_epi32(c);
                let v = _mm512_i32gather_ps::<4>(idx, row.as_ptr());
                _mm512_storeu_ps(out.as_mut_ptr().add(i).cast(), v);
            }
            i += 16;
        }
        for j in i..n {
            out[j].write(row[codes[j] as usize]);
        }
    }
}

/// A chunk of a byte-held set: its bytes (`[rows, ...]`) and their table.
#[derive(Debug, Clone)]
pub struct Codes<'a> {
    pub codes: ArrayViewD<'a, u8>,
    pub table: &'a CodeTable,
}

impl Codes<'_> {
    /// Values per sample.
    pub fn per_sample(&self) -> usize {
        self.codes.shape()[1..].iter().product()
    }

    /// The chunk's f32 values.
    pub fn expand(&self) -> ArrayD<f32> {
        let codes = self.codes.as_standard_layout();
        let codes = codes.as_slice().expect("standard layout");
        let per = self.per_sample().max(1);
        let mut out: Vec<f32> = Vec::with_capacity(codes.len());
        self.table
            .expand(codes, per, &mut out.spare_capacity_mut()[..codes.len()]);
        // SAFETY: `expand` wrote every value.
        unsafe { out.set_len(codes.len()) };
        ArrayD::from_shape_vec(IxDyn(self.codes.shape()), out).expect("sizes match")
    }
}

/// The model input of one chunk.
#[derive(Debug, Clone)]
pub enum Input<'a> {
    /// Values as f32.
    F32(ArrayViewD<'a, f32>),
    /// Bytes and their table.
    Codes(Codes<'a>),
}

impl<'a> From<ArrayViewD<'a, f32>> for Input<'a> {
    fn from(x: ArrayViewD<'a, f32>) -> Input<'a> {
        Input::F32(x)
    }
}

impl<'a> From<Codes<'a>> for Input<'a> {
    fn from(x: Codes<'a>) -> Input<'a> {
        Input::Codes(x)
    }
}

impl<'a> From<&'a ArrayD<f32>> for Input<'a> {
    fn from(x: &'a ArrayD<f32>) -> Input<'a> {
        Input::F32(x.view())
    }
}

impl Input<'_> {
    /// A view of the same input.
    pub fn view(&self) -> Input<'_> {
        match self {
            Input::F32(x) => Input::F32(x.view()),
            Input::Codes(c) => Input::Codes(Codes {
                codes: c.codes.view(),
                table: c.table,
            }),
        }
    }

    /// Shape `[rows, ...]`.
    pub fn shape(&self) -> &[usize] {
        match self {
            Input::F32(x) => x.shape(),
            Input::Codes(c) => c.codes.shape(),
        }
    }

    /// The values as `T`: borrowed for f32 values, expanded from bytes (or converted)
    /// otherwise.
    pub fn to_real<T: Real>(&self) -> CowArray<'_, T, IxDyn> {
        match self {
            Input::F32(x) => T::from_input(x.view()),
            Input::Codes(c) => {
                let x: Box<dyn std::any::Any> = Box::new(c.expand());
                match x.downcast::<ArrayD<T>>() {
                    Ok(x) => CowArray::from(*x),
                    Err(x) => {
                        let x = x.downcast::<ArrayD<f32>>().expect("expanded as f32");
                        CowArray::from(x.mapv(|v| T::of(f64::from(v))))
                    }
                }
            }
        }
    }
}
