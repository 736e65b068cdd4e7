//! AVX-512 forms of the attention's two inner loops (see `attn.rs` for the arithmetic they
//! share with the portable code, bit for bit): several queries against several tiles of 16
//! transposed keys, and several queries' probabilities times the same value rows. Each output
//! element is one FMA chain in the same order as the portable code; what these add is enough
//! independent chains in registers (up to 16) to cover the FMA latency.

use std::arch::x86_64::*;

/// Keys per tile (one vector of scores).
const LANES: usize = 16;

/// Scores of `Q` queries (`q[i]`, `hd` values each) against `T` tiles of 16 keys (`kt`:
/// `[T][hd][16]`) into `out[i][k]` (`[4][4][16]`, the first `Q` x `T` written):
/// `out[i][k][j] = fma(q[i][d], kt[k][d][j], ...)` over `d` in order.
///
/// # Safety
/// AVX-512 F; `q[i]` holds `hd` values; `kt` holds `T * hd * 16`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn scores<const Q: usize, const T: usize>(
    q: [*const f32; Q],
    kt: *const f32,
    hd: usize,
    out: &mut [[[f32; LANES]; 4]; 4],
) {
    let mut s = [[_mm512_setzero_ps(); T]; Q];
    for d in 0..hd {
        let k: [__m512; T] = std::array::from_fn(|k| _mm512_loadu_ps(kt.add((k * hd + d) * LANES)));
        for i in 0..Q {
            let qd = _mm512_set1_ps(*q[i].add(d));
            for t in 0..T {
                s[i][t] = _mm512_fmadd_ps(qd, k[t], s[i][t]);
            }
        }
    }
    for i in 0..Q {
        for t in 0..T {
            _mm512_storeu_ps(out[i][t].as_mut_ptr(), s[i][t]);
        }
    }
}

/// [`scores`] with `Q` and `T` (1..=4 each) chosen at run time.
///
/// # Safety
/// As [`scores`], with `q.len() == nq`.
#[inline(always)]
pub(crate) unsafe fn scores_dyn(
    q: &[*const f32],
    kt: *const f32,
    nt: usize,
    hd: usize,
    out: &mut [[[f32; LANES]; 4]; 4],
) {
    macro_rules! go {
        ($q:literal, $($t:literal)*) => {
            match nt {
                $($t => scores::<$q, $t>(std::array::from_fn(|i| q[i]), kt, hd, out),)*
                _ => unreachable!("{nt} tiles"),
            }
        };
    }
    match q.len() {
        1 => go!(1, 1 2 3 4),
        2 => go!(2, 1 2 3 4),
        3 => go!(3, 1 2 3 4),
        4 => go!(4, 1 2 3 4),
        n => unreachable!("{n} queries"),
    }
}

/// Value rows: f32, or f16 widened as they are loaded (exact, so the same products).
pub(crate) trait Row: Copy {
    /// 16 values at `self + at`, as f32.
    ///
    /// # Safety
    /// AVX-512 F (and F16C for f16); 16 values readable there.
    unsafe fn load(self, at: usize) -> __m512;
}

impl Row for *const f32 {
    #[inline(always)]
    unsafe fn load(self, at: usize) -> __m512 {
        _mm512_loadu_ps(self.add(at))
    }
}

impl Row for *const half::f16 {
    #[inline(always)]
    unsafe fn load(self, at: usize) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(self.add(at) as *const __m256i))
    }
}

/// `o[i][c] = fma(p[i][j], v[j][c], o[i][c])` over the `n` rows `j` of `v` (row `j` at
/// `v + j * stride`, its first `w` values used) in order, for `Q` queries, `w` a multiple of
/// 16: per 64 (or 16) outputs, `Q` x 4 (or `Q`) chains.
///
/// # Safety
/// AVX-512 F and F16C; `p[i]` holds `n` values, `o[i]` `w`, `v` `n` rows; `w % 16 == 0`.
#[target_feature(enable = "avx512f,f16c")]
pub(crate) unsafe fn pv<const Q: usize, V: Row>(
    p: [*const f32; Q],
    n: usize,
    v: V,
    stride: usize,
    w: usize,
    o: [*mut f32; Q],
) {
    let mut c = 0;
    while c + 4 * LANES <= w {
        pv_chunk::<Q, 4, V>(p, n, v, stride, o, c);
        c += 4 * LANES;
    }
    while c < w {
        pv_chunk::<Q, 1, V>(p, n, v, stride, o, c);
        c += LANES;
    }
}

#[inline(always)]
unsafe fn pv_chunk<const Q: usize, const M: usize, V: Row>(
    p: [*const f32; Q],
    n: usize,
    v: V,
    stride: usize,
    o: [*mut f32; Q],
    c: usize,
) {
    let mut acc: [[__m512; M]; Q] =
        std::array::from_fn(|i| std::array::from_fn(|m| _mm512_loadu_ps(o[i].add(c + m * LANES))));
    for j in 0..n {
        let row: [__m512; M] = std::array::from_fn(|m| v.load(j * stride + c + m * LANES));
        for i in 0..Q {
            let pj = _mm512_set1_ps(*p[i].add(j));
            for m in 0..M {
                acc[i][m] = _mm512_fmadd_ps(pj, row[m], acc[i][m]);
            }
        }
    }
    for i in 0..Q {
        for m in 0..M {
            _mm512_storeu_ps(o[i].add(c + m * LANES), acc[i][m]);
        }
    }
}

/// [`pv`] with `Q` (1..=4) chosen at run time.
///
/// # Safety
/// As [`pv`], with `p.len() == o.len()`.
#[inline(always)]
pub(crate) unsafe fn pv_dyn<V: Row>(
    p: &[*const f32],
    n: usize,
    v: V,
    stride: usize,
    w: usize,
    o: &[*mut f32],
) {
    let pa = |i: usize| p[i];
    let oa = |i: usize| o[i];
    match p.len() {
        1 => pv::<1, V>(
            std::array::from_fn(pa),
            n,
            v,
            stride,
            w,
            std::array::from_fn(oa),
        ),
        2 => pv::<2, V>(
            std::array::from_fn(pa),
            n,
            v,
            stride,
            w,
            std::array::from_fn(oa),
        ),
        3 => pv::<3, V>(
            std::array::from_fn(pa),
            n,
            v,
            stride,
            w,
            std::array::from_fn(oa),
        ),
        4 => pv::<4, V>(
            std::array::from_fn(pa),
            n,
            v,
            stride,
            w,
            std::array::from_fn(oa),
        ),
        q => unreachable!("{q} queries"),
    }
}
