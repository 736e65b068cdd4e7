//! AVX-512 forms of the attention's two inner loops (see `attn.rs` for the arithmetic they
//! share with the portable code, bit for bit): several queries against several tiles of 16
//! keys (transposed in the cache), and several queries' probabilities times the same value rows. Each output
//! element is one FMA chain in the same order as the portable code; what these add is enough
//! independent chains in registers (up to 16) to cover the FMA latency.

// Register tiles index several arrays with the same loop variable.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

/// Keys per tile (one vector of scores).
const LANES: usize = 16;

/// Scores of `Q` queries (`q[i]`, `hd` values each) against `T` tiles of 16 keys (tile `k`'s
/// dimension `d` at `kt[k] + d * stride`: the cache's transposed f16 keys, or a widened f32
/// copy) into `out[i][k]` (`[4][4][16]`, the first `Q` x `T` written):
/// `out[i][k][j] = fma(q[i][d], kt[k][d][j], ...)` over `d` in order.
///
/// # Safety
/// AVX-512 F and F16C; `q[i]` holds `hd` values; 16 values readable at each `kt[k] + d *
/// stride`, `d < hd`.
#[target_feature(enable = "avx512f,f16c")]
pub(crate) unsafe fn scores<const Q: usize, const T: usize, R: Row>(
    q: [*const f32; Q],
    kt: [R; T],
    stride: usize,
    hd: usize,
    out: &mut [[[f32; LANES]; 4]; 4],
) {
    let mut s = [[_mm512_setzero_ps(); T]; Q];
    for d in 0..hd {
        let k: [__m512; T] = std::array::from_fn(|k| kt[k].load(d * stride));
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

/// [`scores`] with `Q` and `T` (1..=4 each, `kt.len()`) chosen at run time.
///
/// # Safety
/// As [`scores`], with `q.len() == nq`.
#[inline(always)]
pub(crate) unsafe fn scores_dyn<R: Row>(
    q: &[*const f32],
    kt: &[R],
    stride: usize,
    hd: usize,
    out: &mut [[[f32; LANES]; 4]; 4],
) {
    macro_rules! go {
        ($q:literal, $($t:literal)*) => {
            match kt.len() {
                $($t => scores::<$q, $t, R>(
                    std::array::from_fn(|i| q[i]),
                    std::array::from_fn(|k| kt[k]),
                    stride,
                    hd,
                    out,
                ),)*
                nt => unreachable!("{nt} tiles"),
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

/// [`crate::attn::exp`] on 16 lanes: the same operations in the same order, so the same bits.
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_359_4), x);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166_666_65));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    let e = _mm512_add_ps(
        _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r),
        _mm512_set1_ps(1.0),
    );
    let i = _mm512_sub_epi32(
        _mm512_castps_si512(_mm512_add_ps(n, _mm512_set1_ps(12_582_912.0))),
        _mm512_set1_epi32(0x4B40_0000),
    );
    let two_n = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        i,
        _mm512_set1_epi32(127),
    )));
    _mm512_mul_ps(e, two_n)
}

/// The attention's softmax in three passes (max; exponentials and their f64 lane sums; times
/// 1 / sum rounded to f16): the operations of `attn::softmax` lane for lane, so the same bits.
///
/// # Safety
/// AVX-512 F and F16C.
#[target_feature(enable = "avx512f,f16c,fma")]
pub(crate) unsafe fn softmax(s: &mut [f32], scale: f32) {
    let (n, p) = (s.len(), s.as_mut_ptr());
    let n16 = n / LANES * LANES;
    let vs = _mm512_set1_ps(scale);
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    for j in (0..n16).step_by(LANES) {
        m = _mm512_max_ps(m, _mm512_mul_ps(_mm512_loadu_ps(p.add(j)), vs));
    }
    let mut lanes = [0f32; LANES];
    _mm512_storeu_ps(lanes.as_mut_ptr(), m);
    let max = (n16..n)
        .map(|j| *p.add(j) * scale)
        .chain(lanes)
        .fold(f32::NEG_INFINITY, f32::max);
    let vmax = _mm512_set1_ps(max);
    let mut acc = _mm512_setzero_pd();
    for j in (0..n16).step_by(LANES) {
        let e = exp16(_mm512_sub_ps(
            _mm512_mul_ps(_mm512_loadu_ps(p.add(j)), vs),
            vmax,
        ));
        _mm512_storeu_ps(p.add(j), e);
        acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
        acc = _mm512_add_pd(acc, _mm512_cvtps_pd(hi));
    }
    let mut sums = [0f64; 8];
    _mm512_storeu_pd(sums.as_mut_ptr(), acc);
    for j in n16..n {
        let e = crate::attn::exp(*p.add(j) * scale - max);
        *p.add(j) = e;
        sums[j % 8] += e as f64;
    }
    let sum = (((sums[0] + sums[1]) + (sums[2] + sums[3]))
        + ((sums[4] + sums[5]) + (sums[6] + sums[7]))) as f32;
    let inv = 1.0 / sum;
    let vi = _mm512_set1_ps(inv);
    for j in (0..n16).step_by(LANES) {
        let x = _mm512_mul_ps(_mm512_loadu_ps(p.add(j)), vi);
        let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        _mm512_storeu_ps(p.add(j), _mm512_cvtph_ps(h));
    }
    for j in n16..n {
        *p.add(j) = half::f16::from_f32(*p.add(j) * inv).to_f32();
    }
}
