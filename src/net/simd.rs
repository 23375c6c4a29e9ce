//! AVX-512F building blocks shared by the f32 kernels (`conv3x3`, `add`, the fused attention):
//! a lane mask for a partial vector, a 16×16 transpose in registers and the exact widening of
//! 16 f32 lanes to f64. Callers check that
//! the CPU has AVX-512F before they reach these (each kernel's `available`).

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// The lanes below `n` (all for `n ≥ 16`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// The 16 lanes of `v` widened exactly to f64: lanes 0–7, then lanes 8–15.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn widen(v: __m512) -> [__m512d; 2] {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        [
            _mm512_cvtps_pd(_mm512_castps512_ps256(v)),
            _mm512_cvtps_pd(hi),
        ]
    }

    /// Transpose a 16×16 block held as 16 rows (`r[a]` lane `l` ↦ `r[l]` lane `a`): unpacks
    /// within 128-bit lanes, then two rounds of lane shuffles.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn transpose16(r: &mut [__m512; 16]) {
        let mut t = [_mm512_setzero_ps(); 16];
        for p in 0..8 {
            t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
            t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
        }
        // u[4g + c], 128-bit lane q: column 4q + c of rows 4g..4g+4.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let b = 4 * g;
            u[b] = _mm512_shuffle_ps::<0x44>(t[b], t[b + 2]);
            u[b + 1] = _mm512_shuffle_ps::<0xEE>(t[b], t[b + 2]);
            u[b + 2] = _mm512_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
            u[b + 3] = _mm512_shuffle_ps::<0xEE>(t[b + 1], t[b + 3]);
        }
        for c in 0..4 {
            let v = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let w = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let v2 = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
            let w2 = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
            r[c] = _mm512_shuffle_f32x4::<0x88>(v, w);
            r[8 + c] = _mm512_shuffle_f32x4::<0xDD>(v, w);
            r[4 + c] = _mm512_shuffle_f32x4::<0x88>(v2, w2);
            r[12 + c] = _mm512_shuffle_f32x4::<0xDD>(v2, w2);
        }
    }
}
